"""Shared helpers for the pytest suite (what notebooks can't test well)."""
import os
import signal
import subprocess
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


def run(cmd: list, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    "Run `cmd` in its own session; on timeout kill the whole session (torchrun and its workers)."
    p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or env_for_subprocess(), start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try: out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f'{cmd} did not finish in {timeout} s:\n{out}\n{err}')
    finally:
        try: os.killpg(p.pid, signal.SIGKILL)      # nothing of the run may outlive it
        except ProcessLookupError: pass
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
