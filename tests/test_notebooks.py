"""Run every library notebook (and the index) as a test, one pytest test per notebook.

Each runs in its own process through nbdev's test runner, exactly as `nbdev_test` would, so the counts show
in pytest's summary and a failing notebook is named. The tutorials run in a Jupyter kernel, as their readers run
them, when test_docs.py builds the site (a failing cell fails the build), so they are not run twice.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, BIN, env_for_subprocess

ALL = sorted(p for p in (ROOT / 'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
NOTEBOOKS = [p for p in ALL if 'tutorials' not in p.relative_to(ROOT / 'nbs').parts]


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[str(p.relative_to(ROOT / 'nbs')) for p in NOTEBOOKS])
def test_notebook(nb: Path):
    proc = subprocess.run([str(BIN / 'nbdev_test'), '--path', str(nb), '--n_workers', '0'], cwd=ROOT / 'nbs',
                          capture_output=True, text=True, timeout=600, env=env_for_subprocess())
    assert proc.returncode == 0, f'{nb.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}'


def test_every_module_has_a_notebook():
    "Each module in nbloop/ is exported from a notebook (nothing hand-written hides in the package)."
    modules = {p.stem for p in (ROOT / 'nbloop').glob('*.py')} - {'__init__', '_modidx'}
    exported = set()
    for nb in ALL:
        text = nb.read_text()
        for m in modules:
            if f'#| default_exp {m}\\n' in text or f'#| default_exp {m}"' in text: exported.add(m)
    assert modules == exported, f'modules without a notebook: {sorted(modules - exported)}'
