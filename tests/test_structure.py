"""The shape of the code, so that the redesign (issue 15) cannot quietly grow back: measured by tools/shape.py (with
`ast` on the package and the notebooks; the fit path by tracing one plain fit), against the targets the redesign
set. When a feature would break one of these, change the design, not the limit."""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / 'tools'))
import shape  # noqa: E402


@pytest.fixture(scope='module')
def figures() -> dict:
    return shape.measure(ROOT)


def test_the_learner_is_small(figures):
    "The Learner: its class and the methods its notebook adds cell by cell, together."
    assert figures['learner_lines'] <= 300, figures['learner_lines']
    assert figures['learner_methods'] <= 30, figures['learner_methods']


def test_the_loop_fits_on_one_screen(figures):
    "What a plain fit runs of the Learner (its base class included), down to the optimizer step."
    assert figures['fit_path_functions'] <= 12, figures['fit_path_names']
    assert figures['fit_path_code_lines'] <= 70, figures['fit_path_code_lines']
    assert figures['fit_path_nesting'] <= 3, figures['fit_path_nesting']
    assert {'learner.fit', 'learner._one_batch', 'core._with_events'} <= set(figures['fit_path_names'])


def test_distribution_is_decided_in_runtime_data_and_launch_only(figures):
    assert figures['distribution_tests'] == {}, figures['distribution_tests']


def test_no_module_digs_out_the_last_history_row(figures):
    "`learn.state.last_row` is the epoch's row at after_epoch; nobody checks `history[-1]['epoch']` any more."
    assert figures['history_guards'] == 0


def test_modules_and_exported_cells_stay_small(figures):
    name, lines = figures['largest_module']
    assert lines <= 700, f'nbloop/{name}.py has {lines} lines'
    nb, cell = figures['largest_exported_cell']
    assert cell <= 120, f'{nb} exports a cell of {cell} lines'


def test_imports_point_down_the_layers_only(figures):
    assert figures['import_circles'] == [], figures['import_circles']
    assert figures['upward_imports'] == [], figures['upward_imports']


def test_the_notebooks_before_the_learners_do_not_use_it(figures):
    "The story: the Learner (09_learner) comes before the callbacks that use it; the pages before it use stand-ins."
    assert figures['early_learner_cells'] == {}, figures['early_learner_cells']


def test_the_measures_see_what_they_measure(tmp_path):
    "Each measure finds what it looks for, on a tiny package made for it: the test above could otherwise pass by blindness."
    pkg, nbs = tmp_path / 'nbloop', tmp_path / 'nbs'
    pkg.mkdir(); nbs.mkdir()
    (pkg / 'learner.py').write_text(
        'from .core import patch\n'
        'class Learner:\n    def a(self): pass\n    def b(self): self.x = 1\n'
        '@patch\ndef c(self: Learner):\n    self.y = 2\n'
        'def guard(learn):\n    row = learn.recorder.history[-1]\n    return row if row["epoch"] == learn.epoch else None\n')
    (pkg / 'core.py').write_text('from . import learner\n'
                                 'def f(runtime):\n    if runtime.world_size > 1: return 1\n'
                                 '    return [r for r in range(3) if runtime.is_main]\n')
    (pkg / 'runtime.py').write_text('def g(r):\n    if r.rank == 0: return 1\n')
    import json
    (nbs / '03_x.ipynb').write_text(json.dumps({'cells': [{'cell_type': 'code', 'source': ['#| export\n'] + ['x = 1\n'] * 130},
                                                          {'cell_type': 'code', 'source': ['learn = synth_learner()']}]}))
    f = shape.measure(tmp_path, trace=False)
    assert (f['learner_methods'], f['learner_attributes']) == (3, 2)
    assert f['learner_lines'] == 3 + 3                          # the class, then the patched method with its decorator
    assert f['distribution_tests'] == {'core': 2}               # runtime's own test is allowed
    assert f['history_guards'] == 1
    assert f['import_circles'] == [['core', 'learner']] and f['upward_imports'] == ['core -> learner']
    assert f['largest_exported_cell'] == ('03_x.ipynb', 131)
    assert f['early_learner_cells'] == {'03_x.ipynb': 1}
