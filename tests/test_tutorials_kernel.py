"""Every tutorial and the index notebook, executed in a real Jupyter kernel (nbclient), one test per notebook.

`nbdev_test` runs notebooks in an in-process shell where fastprogress draws console bars; a Jupyter kernel gets
the notebook bars (HTML), the live-plot widget and real display handles, so some failures show only there (a
resumed fit once failed in `ProgressCallback.before_epoch` with fastprogress's notebook bar, and nowhere else).

Each notebook runs in a temporary copy of its folder, which is also the kernel's working directory, so what the
tutorials write (`runs/...`, `checkpoints/`, `history.csv`) never lands in the repository. Each cell has a
timeout, each test an overall bound, and nbclient always shuts the kernel down, also after an error or a
timeout. A cell that raises fails the test (nbclient's `CellExecutionError`, with the traceback), and so does
any error output or traceback, even one that was printed or logged instead of raised (a tutorial
may print the message of an error it caught on purpose).
"""
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT, env_for_subprocess
from test_widget_state import use_this_python

NOTEBOOKS = sorted((ROOT / 'nbs' / 'tutorials').glob('*.ipynb')) + [ROOT / 'nbs' / 'index.ipynb']
CELL_TIMEOUT = 300          # seconds for one cell (the longest cells train a few epochs of a small CNN)
NOTEBOOK_TIMEOUT = 900      # seconds for a whole notebook, kernel start included


def run_in_kernel(nb_path: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    "Execute a copy of `nb_path`'s folder's notebook in a fresh python3 kernel whose cwd is that copy."
    folder = tmp / nb_path.parent.name
    if nb_path.parent.name == 'tutorials': shutil.copytree(nb_path.parent, folder)
    else:
        folder.mkdir()
        shutil.copy2(nb_path, folder)
    nb = nbformat.read(folder / nb_path.name, as_version=4)
    use_this_python(monkeypatch, tmp / 'jupyter')
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, startup_timeout=60, kernel_name='python3',
                            resources={'metadata': {'path': str(folder)}})
    try: client.execute(env=env_for_subprocess())   # the kernel is shut down however this ends
    except CellExecutionError as e: pytest.fail(f'{nb_path.relative_to(ROOT)} failed in a Jupyter kernel:\n{e}', pytrace=False)
    return nb


def output_text(output) -> str:
    "Everything an output shows as text: streams, error fields, and text/* display data."
    text = output.get('text', '') + output.get('ename', '') + output.get('evalue', '') + '\n'.join(output.get('traceback', []))
    data = output.get('data', {})
    return text + ''.join(v for k, v in data.items() if k.startswith('text/') and isinstance(v, str))


def error_outputs(nb: nbformat.NotebookNode) -> list[str]:
    "Outputs that report an error: error outputs, and tracebacks printed or logged (a caught error a tutorial shows is fine)."
    found = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get('outputs', []):
            text = output_text(o)
            if o['output_type'] == 'error' or 'Traceback (most recent call last)' in text:
                found.append(f'cell {i} ({cell.source[:60]!r}): {o["output_type"]}: {text[:1500]}')
    return found


@pytest.mark.timeout(NOTEBOOK_TIMEOUT)
@pytest.mark.parametrize('nb_path', NOTEBOOKS, ids=[str(p.relative_to(ROOT / 'nbs')) for p in NOTEBOOKS])
def test_notebook_runs_in_a_kernel(nb_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nb = run_in_kernel(nb_path, tmp_path, monkeypatch)
    assert any(c.get('outputs') for c in nb.cells if c.cell_type == 'code'), 'no cell produced any output: did it run?'
    assert not error_outputs(nb), '\n\n'.join(error_outputs(nb))
    if "'runs/" in nb_path.read_text():     # a tutorial that writes under runs/ wrote into the temporary copy
        assert (tmp_path / nb_path.parent.name / 'runs').is_dir(), f'{nb_path.name} wrote its runs/ elsewhere'


def test_error_outputs_are_found():
    "The check above would see an error that a cell printed instead of raising, and a raised one."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('x')])
    nb.cells[0].outputs = [nbformat.v4.new_output('stream', name='stdout', text='fine\n')]
    assert error_outputs(nb) == []
    nb.cells[0].outputs = [nbformat.v4.new_output('stream', name='stderr', text='Traceback (most recent call last):\n  ...')]
    assert len(error_outputs(nb)) == 1
    nb.cells[0].outputs = [nbformat.v4.new_output('stream', name='stdout', text='ScheduleError: too long\n')]
    assert error_outputs(nb) == []       # a tutorial may show an error it caught
    nb.cells[0].outputs = [nbformat.v4.new_output('error', ename='KeyError', evalue="'a'", traceback=[])]
    assert len(error_outputs(nb)) == 1
