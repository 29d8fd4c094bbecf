"""Run tests/ddp_job.py's `main` in 2 processes with `nbloop.launch.launch`, from a plain script (no torchrun).

Arguments are passed on to the job; prints rank 0's return value (the history) as JSON.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import ddp_job  # noqa: E402

from nbloop.launch import launch  # noqa: E402

if __name__ == '__main__':
    result = launch(ddp_job.main, 2, sys.argv[1:], timeout=240)
    print('RESULT ' + json.dumps(result))
