"""The live plot in a real browser: JupyterLab + headless Debian Chromium (driven by Playwright) runs a notebook that
fits with `LivePlotCallback()`, and we watch the plot widget's <img> change while training runs.

What it checks: the ipywidgets Image renders (no 'Error displaying widget'), it shows at least 3 distinct images
during the fit (compared by their bytes), and after the fit the widget's output is a static PNG.
A screenshot goes to tests/artifacts/live_plot.png (also when the test fails).
"""
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import nbformat
import psutil
import pytest

from conftest import ROOT, BIN, env_for_subprocess

ARTIFACTS = ROOT / 'tests' / 'artifacts'
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']
MIN_IMAGES = 3

# The fit ends when the plot has drawn MIN_DRAWS times (at an epoch's end, up to 200 epochs), not after a fixed time
# or number of epochs: LivePlotCallback draws at most once a second, and less often when a draw costs more than its
# 2% time budget, so how many draws a fixed fit makes depends on how fast and how busy the machine is. A short sleep
# per batch leaves the CPU to the browser between draws.
MIN_DRAWS = 6
SETUP = """\
import time
from nbloop.all import *
torch.manual_seed(0)
train_dl, valid_dl = load_digits(batch_size=64, num_workers=0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

class Pace(Callback):
    "Sleeps after every training batch, so the browser gets the CPU between draws."
    def after_batch(self, learn):
        if learn.training: time.sleep(0.03)

class UntilDrawn(Callback):
    "Ends the fit once the plot has drawn `n` times."
    order = 70   # after LivePlotCallback's own after_epoch
    def __init__(self, plot, n): self.plot, self.n = plot, n
    def after_epoch(self, learn):
        if self.plot.n_draws >= self.n: raise CancelFitException()"""
FIT = f"""\
plot = LivePlotCallback()
learn = Learner(model, train_dl, valid_dl, metrics=[accuracy], cbs=[Pace(), plot, UntilDrawn(plot, {MIN_DRAWS})])
learn.fit(200)
print(f'draws: {{plot.n_draws}} in {{learn.epoch + 1}} epochs')
print('FIT' + '-DONE')   # split so that the cell's source does not contain the marker"""

# Installed before JupyterLab loads: records the bytes (SHA-256) of every image the plot widget shows. The widget
# sets `img.src` to a new blob: URL and revokes the old one right away, so each src is fetched as soon as it appears.
WATCH_JS = """
window.__plot = {srcs: new Set(), hashes: [], errors: [], widgetError: false};
const seen = async (img) => {
  const src = img.getAttribute('src') || '';
  if (!img.classList.contains('widget-image') || !src || window.__plot.srcs.has(src)) return;
  window.__plot.srcs.add(src);
  try {
    const buf = await (await fetch(src)).arrayBuffer();
    if (buf.byteLength === 0) return;   // the widget before its first draw (an empty value)
    const digest = await crypto.subtle.digest('SHA-256', buf);
    window.__plot.hashes.push(Array.from(new Uint8Array(digest), b => b.toString(16).padStart(2, '0')).join(''));
  } catch (e) { window.__plot.errors.push(String(e)); }
};
new MutationObserver((mutations) => {
  for (const m of mutations) {
    if (m.type === 'attributes') { if (m.target.tagName === 'IMG') seen(m.target); continue; }
    for (const n of m.addedNodes) {
      if (n.nodeType !== 1) continue;
      if ((n.textContent || '').includes('Error displaying widget')) window.__plot.widgetError = true;
      if (n.tagName === 'IMG') seen(n); else n.querySelectorAll('img').forEach(seen);
    }
  }
}).observe(document, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r: return json.loads(r.read())


def write_notebook(path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(SETUP), nbformat.v4.new_code_cell(FIT)])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3 (ipykernel)', 'language': 'python'}
    nbformat.write(nb, str(path))


@pytest.fixture
def jupyter_lab(tmp_path):
    "A JupyterLab server on a free port over a temporary root dir; yields (base url, server process, its log)."
    root, home = tmp_path / 'root', tmp_path / 'home'
    root.mkdir(); home.mkdir()
    write_notebook(root / 'live_plot.ipynb')
    # No 'Would you like to get notified about official Jupyter news?' toast over the screenshot.
    settings = home / 'settings' / '@jupyterlab' / 'apputils-extension'
    settings.mkdir(parents=True)
    (settings / 'notification.jupyterlab-settings').write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port = free_port()
    env = env_for_subprocess(
        JUPYTER_CONFIG_DIR=str(home / 'config'), JUPYTER_RUNTIME_DIR=str(home / 'runtime'),
        JUPYTERLAB_SETTINGS_DIR=str(home / 'settings'), JUPYTERLAB_WORKSPACES_DIR=str(home / 'workspaces'))
    cmd = [str(BIN / 'jupyter'), 'lab', '--no-browser', '--allow-root', '--ip=127.0.0.1', f'--port={port}',
           '--ServerApp.port_retries=0', f'--ServerApp.root_dir={root}', '--IdentityProvider.token=',
           '--PasswordIdentityProvider.hashed_password=', '--LabApp.expose_app_in_browser=True',
           '--LabApp.news_url=None', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate']
    log = open(tmp_path / 'jupyter.log', 'w+')
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(f'{base}/api/status', timeout=2); break
            except OSError:
                pass
            assert proc.poll() is None, f'jupyter lab exited ({proc.returncode}):\n{log_tail(log)}'
            assert time.monotonic() < deadline, f'jupyter lab not ready in 60 s:\n{log_tail(log)}'
            time.sleep(0.25)
        yield base, proc, log
    finally:
        stop_server(proc)
        log.close()


def log_tail(log, n: int = 4000) -> str:
    log.flush(); log.seek(0)
    return log.read()[-n:]


def stop_server(proc: subprocess.Popen):
    "Stop the server by its PID (its process group), and every kernel it started (kernels run in their own sessions)."
    try: children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess: children = []
    if proc.poll() is None:
        try: os.killpg(proc.pid, signal.SIGTERM)     # the server shuts its kernels down on SIGTERM
        except ProcessLookupError: pass
        try: proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:
        try: p.kill()
        except psutil.NoSuchProcess: pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    assert not alive, f'processes left behind by jupyter lab: {alive}'


def chromium_path() -> str:
    path = shutil.which('chromium') or '/usr/bin/chromium'
    assert os.access(path, os.X_OK), ('Debian Chromium is needed for the browser test and was not found '
                                       "(`make browser` installs it: apt-get install chromium)")
    return path


def test_live_plot_in_jupyterlab(jupyter_lab):
    from playwright.sync_api import sync_playwright
    base, server, log = jupyter_lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / 'live_plot.png'
    shot.unlink(missing_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={'width': 1280, 'height': 1000})
            page.set_default_timeout(60_000)
            page.add_init_script(WATCH_JS)
            try:
                run_and_watch(page, base, server, log)
            finally:
                page.screenshot(path=str(shot), full_page=True, timeout=15_000)
        finally:
            browser.close()
    assert shot.stat().st_size > 0


def run_and_watch(page, base, server, log):
    t0 = time.monotonic()
    page.goto(f'{base}/lab/tree/live_plot.ipynb?reset', wait_until='domcontentloaded')
    # The notebook is open and its kernel is idle (not just starting): then run all cells.
    page.wait_for_function("""() => {
        const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
        return k && k.status === 'idle' && w.context.path === 'live_plot.ipynb';
    }""", timeout=90_000, polling=250)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")   # not awaited
    t_kernel = time.monotonic()

    deadline = time.monotonic() + 240
    while True:   # read the outputs from the notebook's model: an error shows as soon as the kernel reports it
        outs = page.evaluate("""() => [].concat(...Array.from(window.jupyterapp.shell.currentWidget.content.model.cells,
                                                               c => c.type === 'code' ? c.outputs.toJSON() : []))""")
        text = ''.join(''.join(o.get('text', '')) for o in outs if o['output_type'] == 'stream')
        if 'FIT-DONE' in text: t_done = time.monotonic(); break
        for o in outs:
            if o['output_type'] == 'error':
                pytest.fail('the notebook raised:\n' + re.sub(r'\x1b\[[0-9;]*m', '', '\n'.join(o['traceback']))[-3000:])
        assert server.poll() is None, f'jupyter lab died:\n{log_tail(log)}'
        assert time.monotonic() < deadline, f'the fit did not finish in 240 s; printed so far:\n{text[-3000:]}'
        time.sleep(0.5)

    # The widget's output was replaced by a static PNG (the display update comes before the marker is printed).
    outputs = '.jp-OutputArea-output'
    static = page.locator(f'{outputs} img[src^="data:image/png"]').first
    static.wait_for(state='attached', timeout=15_000)
    static.scroll_into_view_if_needed(timeout=5_000)
    png = base64.b64decode(static.get_attribute('src').split(',', 1)[1])
    assert png.startswith(b'\x89PNG\r\n\x1a\n') and len(png) > 1000, 'the static image is not a PNG'
    page.wait_for_function('e => e.complete && e.naturalWidth > 0', arg=static.element_handle(), timeout=10_000)
    assert page.locator(f'{outputs} img.widget-image').count() == 0, 'the widget is still shown after the fit'

    state = page.evaluate('() => ({hashes: window.__plot.hashes, errors: window.__plot.errors, '
                          'widgetError: window.__plot.widgetError, srcs: window.__plot.srcs.size})')
    body = page.evaluate('() => document.body.innerText')
    assert not state['widgetError'] and 'Error displaying widget' not in body, "JupyterLab showed 'Error displaying widget'"
    assert state['hashes'], f'the plot widget never rendered an image (fetch errors: {state["errors"]})\n{text[-2000:]}'
    distinct = len(set(state['hashes']))
    assert distinct >= MIN_IMAGES, (f'only {distinct} distinct plot images during the fit (of {state["srcs"]} srcs, '
                                    f'fetch errors {state["errors"]}); outputs:\n{text[-2000:]}')
    print(f'browser saw {distinct} distinct plot images; {text.strip().splitlines()[0]}; lab open + kernel idle '
          f'{t_kernel - t0:.1f} s, cells ran {t_done - t_kernel:.1f} s')
