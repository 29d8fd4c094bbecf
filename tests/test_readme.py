"""The README's examples run as written: every ```python block of README.md, in order, in one fresh process.

Each block runs on its own, in a namespace of its own, as a reader pastes one of them into a fresh notebook: every
block has its imports. A block that resumes must really continue a run (not start afresh, not be refused, not find
"nothing left to train"). They run
offline (the digits data are bundled) in a temporary working directory, so the checkpoints and CSV the example
writes don't land in the repository. Commands meant for a shell are ```sh blocks and are not run here.
"""
import json
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, env_for_subprocess

PYTHON_BLOCK = re.compile(r'^```python\n(.*?)^```\s*$', re.MULTILINE | re.DOTALL)

# Runs each block; a block that resumes must really have resumed (not started afresh, not been refused).
RUNNER = textwrap.dedent('''
    import json, sys, traceback, warnings
    blocks = json.load(open(sys.argv[1]))
    for i, src in enumerate(blocks, 1):
        ns = {'__name__': '__main__'}                  # each block on its own
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter('always')
                exec(compile(src, f'README.md python block {i}', 'exec'), ns)
            for w in seen: print(f'block {i} warned: {w.message}', file=sys.stderr)
            if "resume='last'" in src:
                assert ns['learn'].resumed_from is not None, f"block {i} called resume='last' but nothing was resumed"
                assert not any('nothing left to train' in str(w.message) for w in seen), f"block {i} resumed a finished run"
        except BaseException:
            print(f'README.md python block {i} of {len(blocks)} failed:\\n{src}', file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
        print(f'README block {i} ran', flush=True)
''')


def python_blocks(text: str) -> list[str]:
    return PYTHON_BLOCK.findall(text)


def test_python_blocks_are_found():
    text = '```python\na = 1\n```\n\n```sh\nmake demo\n```\n\n```\noutput\n```\n```python\nb = a\n```\n'
    assert python_blocks(text) == ['a = 1\n', 'b = a\n']


@pytest.mark.timeout(600)
def test_readme_python_blocks_run_in_order(tmp_path):
    blocks = python_blocks((ROOT / 'README.md').read_text(encoding='utf-8'))
    assert len(blocks) >= 2, f'expected the README to show python examples, found {len(blocks)} ```python blocks'
    assert any("resume='last'" in b for b in blocks), "the README's example no longer shows resume='last'"
    (tmp_path / 'blocks.json').write_text(json.dumps(blocks))
    (tmp_path / 'run_blocks.py').write_text(RUNNER)
    try:
        proc = subprocess.run([sys.executable, 'run_blocks.py', 'blocks.json'], cwd=tmp_path, capture_output=True,
                              text=True, timeout=540, env=env_for_subprocess())
    except subprocess.TimeoutExpired as e:   # subprocess.run kills the child before raising
        pytest.fail(f'the README blocks did not finish in {e.timeout} s:\n{(e.stdout or b"")[-3000:]!r}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count('README block ') == len(blocks), proc.stdout[-3000:]
    assert (tmp_path / 'history.csv').exists() and (tmp_path / 'checkpoints').is_dir(), sorted(tmp_path.iterdir())
