"""Shared helpers for the pytest suite (what notebooks can't test well)."""
import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# A suite started in the background by a non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and so
# would every process it starts: the tests that press Ctrl-C (a notebook's stop button) would test nothing. Run as
# from a terminal, where SIGINT raises KeyboardInterrupt; child processes then start with its default action.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN: signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def root() -> Path:
    return ROOT


def env_for_subprocess(**extra) -> dict:
    "The environment for child processes: one thread each, no GPU surprises, the repo importable."
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', **extra)
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    return env
