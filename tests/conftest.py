"""Shared helpers for the pytest suite (what notebooks can't test well)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture
def root() -> Path:
    return ROOT


def env_for_subprocess(**extra) -> dict:
    "The environment for child processes: one thread each, no GPU surprises, the repo importable."
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', **extra)
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    return env
