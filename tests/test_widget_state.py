"""The logging tutorial executed in a real Jupyter kernel (nbclient, no browser), the way a notebook is saved.

`nbdev_test` runs notebooks outside a kernel, where `LivePlotCallback` shows no widget. Here the kernel is a
real one, so we can check what a saved notebook keeps of the live plot:

- the notebook's widget state holds the plot's `ipywidgets.Image` with the final figure as a PNG,
- the output of the cell that ran the fit holds a static `image/png` (for viewers and the docs site, where no
  widget code runs), the same picture,
- and no output reports an error.

The executed notebook stays in memory; the files the tutorial writes go to a temporary folder (its working
directory), so nothing under nbs/ changes.
"""
import base64
import io
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from PIL import Image

from conftest import ROOT, env_for_subprocess

NOTEBOOK = ROOT / 'nbs' / 'tutorials' / 'logging.ipynb'
WIDGET_STATE = 'application/vnd.jupyter.widget-state+json'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def kernel_command() -> list[str]:
    "The command that starts the kernel named 'python3', as nbclient will find it."
    return KernelManager(kernel_name='python3').format_kernel_cmd()


def runs_this_python() -> bool:
    # not resolved: a venv's python is a link to the base interpreter, which lacks the venv's packages
    return os.path.abspath(kernel_command()[0]) == os.path.abspath(sys.executable)


def use_this_python(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """Make the 'python3' kernel run this interpreter (the environment's).

    Usually it does already: the environment's own kernelspec says `python`, which jupyter_client replaces by
    `sys.executable`. Where another kernelspec named 'python3' comes first (say, one installed with
    `ipykernel install --user` for another Python), a private one in `tmp` takes precedence, for this test only.
    """
    if runs_this_python(): return
    spec = KernelSpecManager().get_kernel_spec('python3').to_dict()
    spec['argv'] = [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}']
    (tmp / 'kernels' / 'python3').mkdir(parents=True)
    (tmp / 'kernels' / 'python3' / 'kernel.json').write_text(json.dumps(spec))
    monkeypatch.setenv('JUPYTER_PATH', str(tmp))
    assert runs_this_python(), kernel_command()


@pytest.fixture(scope='module')
def executed(tmp_path_factory) -> nbformat.NotebookNode:
    "The tutorial, executed once in a kernel of this Python, with the widget state stored."
    tmp = tmp_path_factory.mktemp('logging_tutorial')
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        use_this_python(mp, tmp / 'jupyter')
        client = NotebookClient(nb, timeout=120, startup_timeout=60, kernel_name='python3', store_widget_state=True,
                                resources={'metadata': {'path': str(tmp)}})
        client.execute(env=env_for_subprocess())   # errors raise CellExecutionError; the kernel is always shut down
    assert (tmp / 'runs' / 'logging' / 'history.csv').exists(), 'the tutorial did not run in the temporary folder'
    return nb


def outputs_of(cell) -> list:
    return cell.get('outputs', [])


def fit_cell(nb):
    "The code cell that creates the `LivePlotCallback` and runs the fit."
    cells = [c for c in nb.cells if c.cell_type == 'code' and 'LivePlotCallback(' in c.source and '.fit' in c.source]
    assert len(cells) == 1, f'expected one cell that fits with LivePlotCallback, found {len(cells)}'
    return cells[0]


def static_pngs(cell) -> list[bytes]:
    return [base64.b64decode(o['data']['image/png']) for o in outputs_of(cell) if 'image/png' in o.get('data', {})]


def check_png(png: bytes) -> Image.Image:
    "A real picture of a plot: the PNG signature, a plot-sized image, and more than a handful of colours."
    assert png[:8] == PNG_SIGNATURE, png[:16]
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.width >= 400 and img.height >= 150, img.size
    colours = img.convert('RGB').getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, f'{len(colours)} colours: an empty figure?'
    return img


def widget_image_pngs(nb) -> list[bytes]:
    "The `value` of every ipywidgets Image model in the notebook's widget state, decoded."
    state = nb.metadata.get('widgets', {}).get(WIDGET_STATE)
    assert state, f'no widget state in the notebook metadata (keys: {list(nb.metadata)})'
    images = [m for m in state['state'].values()
              if m['model_name'] == 'ImageModel' and m['model_module'] == '@jupyter-widgets/controls']
    assert images, f"no ipywidgets Image model in the widget state: {[m['model_name'] for m in state['state'].values()]}"
    pngs = []
    for m in images:
        assert m['state'].get('format') == 'png', m['state']
        buffers = {tuple(b['path']): b for b in m.get('buffers', [])}
        assert ('value',) in buffers, f"the Image model has no value buffer (buffers: {list(buffers)})"
        assert buffers[('value',)]['encoding'] == 'base64'
        pngs.append(base64.b64decode(buffers[('value',)]['data']))
    return pngs


@pytest.mark.timeout(300)
def test_widget_state_keeps_the_final_plot(executed):
    pngs = widget_image_pngs(executed)
    assert len(pngs) == 1, f'expected one plot widget, found {len(pngs)}'
    img = check_png(pngs[0])
    assert img.size == (800, 288), img.size          # LivePlotCallback's default figsize (10, 3.6) at dpi 80


@pytest.mark.timeout(300)
def test_fit_cell_leaves_a_static_image(executed):
    cell = fit_cell(executed)
    pngs = static_pngs(cell)
    assert len(pngs) == 1, f"expected one static image/png output, found {len(pngs)}: {[list(o.get('data', {})) for o in outputs_of(cell)]}"
    check_png(pngs[0])
    # the static image replaced the widget's output (same display), and shows the widget's final picture
    assert not any('application/vnd.jupyter.widget-view+json' in o.get('data', {}) for o in outputs_of(cell))
    assert pngs[0] == widget_image_pngs(executed)[0]


@pytest.mark.timeout(300)
def test_no_output_reports_an_error(executed):
    for i, cell in enumerate(executed.cells):
        for o in outputs_of(cell):
            text = o.get('text', '') + o.get('ename', '') + o.get('evalue', '') + ''.join(o.get('traceback', []))
            text += ''.join(v for k, v in o.get('data', {}).items() if k.startswith('text/') and isinstance(v, str))
            assert o['output_type'] != 'error' and 'Error' not in text, f'cell {i} ({cell.source[:60]!r}): {text[:2000]}'


@pytest.mark.timeout(300)
def test_recorder_plots_show_as_images(executed):
    "`learn.recorder.plot_loss()` etc. as a cell's last line show the figure, as in the docs."
    cells = [c for c in executed.cells if c.cell_type == 'code' and c.source.strip().startswith('learn.recorder.plot_')]
    assert len(cells) == 3, [c.source for c in cells]
    for c in cells:
        pngs = static_pngs(c)
        assert len(pngs) == 1, f'{c.source!r} shows no image: {[o.get("data", {}).get("text/plain") for o in outputs_of(c)]}'
        check_png(pngs[0])


FORMS = {   # a cell's source -> how many pictures it must show (issue 17 point 9: today only the last-line form draws)
    'learn.recorder.plot_loss()': 1,                                        # the cell's value
    'fig = learn.recorder.plot_loss()': 1,                                  # assigned
    'learn.recorder.plot_loss()\nx = 1': 1,                                 # not the last line
    'import matplotlib.pyplot as plt\nlearn.recorder.plot_loss()\nplt.show()': 1,   # with plt.show()
    'fig.axes[0].set_title("again")\nfig': 1,                              # shown again when asked again
    'figs = [learn.recorder.plot_lr(), learn.recorder.plot_loss()]\nfigs[0]': 2,     # each figure of the cell, once
    'y = 2': 0,                                                             # nothing left over from the cells before
}


@pytest.mark.timeout(300)
def test_figures_show_once_however_the_cell_uses_them(tmp_path, monkeypatch):
    "A plot shows once per cell in a real kernel: as the cell's value, assigned, not last, or with plt.show()."
    setup = ('from nbloop.all import *\nlearn = synth_learner()\nwith learn.no_bar(): learn.fit(2)')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup)] +
                                  [nbformat.v4.new_code_cell(src) for src in FORMS])
    use_this_python(monkeypatch, tmp_path / 'jupyter')
    NotebookClient(nb, timeout=120, startup_timeout=60, kernel_name='python3',
                   resources={'metadata': {'path': str(tmp_path)}}).execute(env=env_for_subprocess())
    shown = {c.source: len(static_pngs(c)) for c in nb.cells[1:]}
    assert shown == FORMS, shown
    for c in nb.cells[1:]:
        for png in static_pngs(c): check_png(png)
