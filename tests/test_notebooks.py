"""What the notebooks are: every module is exported from one.

The notebooks run once, when test_docs.py builds the site: the library notebooks as `nbdev_test` runs them, the
tutorials and the index in a Jupyter kernel; `test_docs.test_notebook_runs` is one test per notebook.
"""
from conftest import ROOT

ALL = sorted(p for p in (ROOT / 'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)


def test_every_module_has_a_notebook():
    "Each module in nbloop/ is exported from a notebook (nothing hand-written hides in the package)."
    modules = {p.stem for p in (ROOT / 'nbloop').glob('*.py')} - {'__init__', '_modidx'}
    exported = set()
    for nb in ALL:
        text = nb.read_text()
        for m in modules:
            if f'#| default_exp {m}\\n' in text or f'#| default_exp {m}"' in text: exported.add(m)
    assert modules == exported, f'modules without a notebook: {sorted(modules - exported)}'
