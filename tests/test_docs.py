"""The docs site, built as `make docs` builds it (tools/docs.py), and checked page by page.

The build executes every notebook (the tutorials and the index in a Jupyter kernel, as a reader runs them; the
library notebooks as `nbdev_test` runs them) and fails on any error, so building is itself the test that every
page's code runs (`test_notebook_runs`, one test per notebook; each runs once in the whole suite). It is built once for this module; the checks below read `_docs/`, `_proc/` and `_build/`.
"""
import html.parser
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

from conftest import ROOT, env_for_subprocess

sys.path.insert(0, str(ROOT / 'tools'))
import docs  # noqa: E402  (tools/docs.py)

SITE, PROC, STAGE = ROOT / '_docs', ROOT / '_proc', ROOT / '_build' / 'nbs'
NOTEBOOKS = [p.relative_to(ROOT / 'nbs') for p in docs.notebooks(ROOT / 'nbs')]
TUTORIALS = [p for p in NOTEBOOKS if p.parts[0] == 'tutorials']
LIBRARY = [p for p in NOTEBOOKS if len(p.parts) == 1 and p.name != 'index.ipynb']
BUILD_TIMEOUT = 1500


@pytest.fixture(scope='module')
def build() -> dict:
    "Build the site once; return tools/docs.py's timings."
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'docs.py')], cwd=ROOT, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, env=env_for_subprocess())
    assert proc.returncode == 0, f'make docs failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}'
    return json.loads((ROOT / '_build' / 'timings.json').read_text())


class Page(html.parser.HTMLParser):
    "The links, pictures, element ids, headings and text of one HTML page."
    def __init__(self, path: Path):
        super().__init__()
        self.links, self.images, self.ids, self.text = [], [], set(), []
        self.feed(path.read_text(encoding='utf-8'))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'): self.ids.add(a['id'])
        if tag == 'a' and a.get('href'): self.links.append(a['href'])
        if tag in ('link', 'script') and (a.get('href') or a.get('src')): self.links.append(a.get('href') or a.get('src'))
        if tag == 'img' and a.get('src'): self.images.append(a['src'])

    def handle_data(self, data): self.text.append(data)

    @property
    def all_text(self) -> str: return ''.join(self.text)


def page_of(nb: Path) -> Path: return SITE / nb.with_suffix('.html')


def pages() -> list[Path]: return sorted(SITE.rglob('*.html'))


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[str(p) for p in NOTEBOOKS])
def test_notebook_runs(build, nb: Path):
    """Every notebook, run once, by the build: the library notebooks as `nbdev_test` runs them (execnb's shell, in a
    process of their own, the `tst_flags` cells skipped), the tutorials and the index in a Jupyter kernel. A failing
    cell stops the build, which names the notebook; here each notebook is a test of its own in pytest's count."""
    assert str(nb) in build['notebooks'], f'the build did not execute {nb}'
    ran = nbformat.read(STAGE / nb, as_version=4)
    if nb in TUTORIALS: assert not docs.error_outputs(ran), docs.error_outputs(ran)   # (library pages may show one)
    code = [c for c in ran.cells if c.cell_type == 'code' and c.source.strip() and not docs.skipped(c)]
    assert code and any(c.outputs for c in code), f'{nb}: no cell shows an output: was it run?'


def test_every_notebook_has_a_page(build):
    missing = [str(nb) for nb in NOTEBOOKS if not page_of(nb).exists()]
    assert not missing, f'notebooks without a page: {missing}'
    assert len(TUTORIALS) == 7, f'seven tutorials expected, found {[str(t) for t in TUTORIALS]}'
    search = json.loads((SITE / 'search.json').read_text())
    assert {str(nb.with_suffix('.html')) for nb in NOTEBOOKS} <= {e['href'].split('#')[0] for e in search}


def test_navigation_lists_every_tutorial_and_reference_page(build):
    nav = Page(SITE / 'index.html').links
    for nb in NOTEBOOKS:
        assert str(nb.with_suffix('.html')) in nav, f'{nb} is not in the site navigation'


def test_internal_links_and_images_resolve(build):
    "Every relative link and picture points to a file of the site, and every #fragment to an id on its page."
    parsed = {p: Page(p) for p in pages()}
    broken = []
    for page, doc in parsed.items():
        for ref in doc.links + doc.images:
            url = urlsplit(ref)
            if url.scheme or ref.startswith(('//', 'data:', 'mailto:')): continue
            target = (page.parent / unquote(url.path)).resolve() if url.path else page
            if not target.exists(): broken.append(f'{page.relative_to(SITE)}: {ref}'); continue
            if url.fragment and target.suffix == '.html':
                ids = parsed[target].ids if target in parsed else Page(target).ids
                if url.fragment not in ids: broken.append(f'{page.relative_to(SITE)}: {ref} (no such id)')
        for ref in doc.links:       # nbdev's links to a name on the published site were made relative
            assert not ref.startswith('https://nbloop.github.io/nbloop/'), f'{page}: {ref} was not made relative'
    assert not broken, 'broken links or pictures:\n' + '\n'.join(broken)


def test_each_tutorial_page_shows_a_picture(build):
    for nb in TUTORIALS:
        pics = [s for s in Page(page_of(nb)).images if s.startswith('data:image/')]
        assert pics, f'{nb}: its page shows no plot'


def test_every_notebook_runs_for_the_site(build):
    "Every notebook is executed (its time is in _build/timings.json; no test asserts on it: a loaded machine is slow)."
    took = build['notebooks']
    for nb in TUTORIALS: assert str(nb) in took, f'{nb} was not executed'
    assert set(took) == {str(nb) for nb in NOTEBOOKS}, 'every notebook runs for the site'


def own_names() -> list[str]:
    import nbloop.all
    return [n for n in nbloop.all.__all__ if getattr(getattr(nbloop.all, n), '__module__', 'nbloop').startswith('nbloop')
            and n not in ('torch', 'nn', 'F')]


def test_every_public_name_has_a_signature_on_a_reference_page(build):
    "Each of nbloop's own names in `nbloop.all` is documented by show_doc, with its signature, on a library page."
    import nbloop.all
    text = '\n'.join(Page(page_of(nb)).all_text for nb in LIBRARY)
    missing = []
    for name in own_names():
        obj = getattr(nbloop.all, name)
        if callable(obj): found = re.search(rf'\b(def {re.escape(name)}\(|class {re.escape(name)}\b)', text)
        else: found = re.search(rf'\b{re.escape(name)}\b', text)     # a constant: named on a page
        if not found: missing.append(name)
    assert not missing, f'not on a reference page with a signature: {missing}'


def test_reference_pages_have_examples_and_no_imports(build):
    "After each show_doc comes a runnable example; no visible cell imports (an export cell's imports never show)."
    problems = {}
    for nb in LIBRARY:
        found = docs.lint_reference(docs.page_cells(nbformat.read(PROC / nb, as_version=4)))
        if found: problems[str(nb)] = found
    assert not problems, json.dumps(problems, indent=1)


def export_imports(nb: Path) -> list[str]:
    "The import lines of a notebook's `#| export` cells."
    out = []
    for cell in nbformat.read(ROOT / 'nbs' / nb, as_version=4).cells:
        if cell.cell_type == 'code' and re.search(r'^#\|\s*export\b', cell.source, re.M):
            out += [l.strip() for l in cell.source.splitlines() if docs.IMPORT.match(l)]
    return out


def test_no_page_shows_an_export_cells_imports(build):
    for nb in LIBRARY:
        code = '\n'.join(m for m in re.findall(r'<code[^>]*>(.*?)</code>', page_of(nb).read_text(), re.S))
        code = re.sub(r'<[^>]+>', '', code).replace('&quot;', '"').replace('&#39;', "'").replace('&amp;', '&')
        shown = [line for line in export_imports(nb) if line in code]
        assert not shown, f'{nb}: the page shows its export imports {shown}'
    assert export_imports(Path('09_learner.ipynb')), 'the check reads the export cells'


def show_doc_outputs(nb: Path) -> list[str]:
    "The Markdown that each show_doc of a processed library notebook rendered."
    out = []
    for c in nbformat.read(PROC / nb, as_version=4).cells:
        if c.cell_type == 'code' and 'show_doc(' in c.source:
            out += [o['data']['text/markdown'] for o in c.get('outputs', []) if 'text/markdown' in o.get('data', {})]
    return out


def test_api_pages_have_signatures_tables_and_pictures(build):
    """show_doc renders a signature and a parameter table whose Details come from the docments (on the learner
    page, every parameter has them); defaults never show a memory address; the library pages show plots."""
    docs_ = show_doc_outputs(Path('09_learner.ipynb'))
    fit = next(d for d in docs_ if '### Learner.fit' in d and 'fit_one_cycle' not in d.split('\n', 4)[2])
    assert 'def fit(' in fit and '| `n_epochs` | int |' in fit
    rows = [r for d in docs_ for r in d.splitlines() if r.startswith('| `')]
    assert len(rows) > 40
    empty = [r for r in rows if not r.rstrip(' |').split(' | ')[-1].strip() or r.rstrip().endswith('|  |')]
    assert not empty, f'parameters without a description on the learner page: {empty}'
    assert '<table' in page_of(Path('09_learner.ipynb')).read_text()
    for nb in LIBRARY:
        assert not any(re.search(r'0x[0-9a-f]{6,}', d) for d in show_doc_outputs(nb)), f'{nb}: an address in a signature'
    assert any(Page(page_of(nb)).images for nb in LIBRARY), 'no library page shows a picture'


def test_callbacks_page_has_the_event_table_and_the_loop(build):
    core = Page(page_of(Path('00_core.ipynb'))).all_text
    for ours, s4tf in [('before_fit', 'fitStart'), ('after_epoch', 'epochEnd'), ('before_train', 'trainingStart'),
                       ('before_validate', 'validationStart'), ('before_batch', 'batchStart'),
                       ('after_pred', 'inferencePredictionEnd'), ('before_step', 'updateStart')]:
        assert re.search(rf'{ours}\s*{s4tf}', core), f'the event table does not put {s4tf} beside {ours}'
    assert 'Swift for TensorFlow' in core
    assert re.search(r'before_fit\s*:?.*\n(.*\n)*?\s*after_fit', core), 'show_training_loop() output missing'


def normalized(text: str) -> str:
    """An output's text with what differs between runs masked: numbers and times, a checkpoint's random run id
    (`-run1a2b3c4d`), temporary folders, object addresses, where the checkout is. The rest may not differ."""
    text = re.sub(r'-run[0-9a-f]{8}', '-run#', text)
    text = re.sub(r'/tmp/\S+|0x[0-9a-f]+', '#', re.sub(r'\S*/(?=nbloop/\w+\.py)', '', text))   # the checkout's path
    return re.sub(r'\d+', '#', re.sub(r'\s+', ' ', text)).strip()


def shape(nb) -> list:
    """Per code cell: its source, and its outputs' kinds and masked text (pictures by kind only). A cell whose source
    says its output `varies by machine` (text sampled from a trained model: another CPU's float rounding draws other
    characters) by kind only."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != 'code': continue
        if 'varies by machine' in cell.source:
            out.append((cell.source, [o.output_type for o in cell.get('outputs', [])]))
            continue
        outs = []
        for o in cell.get('outputs', []):
            data = o.get('data', {})
            if any(k.startswith('image/') for k in data): outs.append('image')
            elif o.output_type in ('stream', 'execute_result', 'display_data') and not data.get('text/html'):
                outs.append(normalized(docs.output_text(o)))
            else: outs.append(o.output_type)
        out.append((cell.source, outs))
    return out


@pytest.mark.parametrize('nb', TUTORIALS, ids=[str(t) for t in TUTORIALS])
def test_committed_tutorial_outputs_are_fresh(build, nb):
    """The tutorials are committed with their outputs (a reader on GitHub sees them), and these are what running
    them now gives: the same cells, the same kinds of output, the same text but for numbers. `make tutorials`
    refreshes them."""
    committed = nbformat.read(ROOT / 'nbs' / nb, as_version=4)
    fresh = nbformat.read(STAGE / nb, as_version=4)
    assert any(c.get('outputs') for c in committed.cells if c.cell_type == 'code'), f'{nb} has no outputs: run make tutorials'
    for (src, old), (_, new) in zip(shape(committed), shape(fresh)):
        assert old == new, f'{nb}: outputs of this cell are stale (run make tutorials):\n{src[:300]}\ncommitted {old}\nnow {new}'


MACHINE = re.compile(r'/tmp/tmp\w+|ipython-input-|' + re.escape(str(ROOT)) + r'|\.py:\d+: \w*Warning')


def test_pages_show_no_path_of_the_building_machine(build):
    "Warnings' file:line, temporary folders and the checkout's path were on 4 reference pages and the scaling tutorial."
    found = {str(p.relative_to(SITE)): sorted(set(m)) for p in SITE.rglob('*.html') if (m := MACHINE.findall(Page(p).all_text))}
    assert not found, found


def test_machine_paths_are_taken_out_of_outputs():
    warned = (f'{ROOT}/nbloop/ckpt_format.py:686: UserWarning: no checkpoint to resume in /tmp/tmpab12_x/ckpts: fresh\n'
              f'  warnings.warn(f"no checkpoint")\n<ipython-input-1-0ac45cb937a7>:3: RuntimeWarning: overflow\nnext line\n')
    assert docs.without_machine_paths(warned) == ('UserWarning: no checkpoint to resume in ckpts: fresh\n'
                                                  'RuntimeWarning: overflow\nnext line\n')
    cell = {'outputs': [{'output_type': 'stream', 'text': [f'saved {ROOT}/runs/a.safetensors\n']},
                        {'output_type': 'execute_result', 'data': {'text/plain': "PosixPath('/tmp/tmpq9/w.safetensors')"}}]}
    docs.clean_outputs(cell)
    assert cell['outputs'][0]['text'] == 'saved runs/a.safetensors\n'
    assert cell['outputs'][1]['data']['text/plain'] == "PosixPath('w.safetensors')"


def test_error_outputs_are_found():
    "The build's check would see an error that a cell printed instead of raising, and a raised one."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('x')])
    nb.cells[0].outputs = [nbformat.v4.new_output('stream', name='stdout', text='fine\n')]
    assert docs.error_outputs(nb) == []
    nb.cells[0].outputs = [nbformat.v4.new_output('stream', name='stderr', text='Traceback (most recent call last):\n  ...')]
    assert len(docs.error_outputs(nb)) == 1
    nb.cells[0].outputs = [nbformat.v4.new_output('stream', name='stdout', text='ScheduleError: too long\n')]
    assert docs.error_outputs(nb) == []       # a tutorial may show an error it caught
    nb.cells[0].outputs = [nbformat.v4.new_output('error', ename='KeyError', evalue="'a'", traceback=[])]
    assert len(docs.error_outputs(nb)) == 1


def test_reference_lint_finds_problems():
    "The reference check itself: a show_doc without an example, and a visible import, are both reported."
    cells = [{'kind': 'show_doc', 'source': 'show_doc(f)', 'outputs': []}, {'kind': 'markdown', 'source': 'x', 'outputs': []},
             {'kind': 'show_doc', 'source': 'show_doc(g)', 'outputs': []}, {'kind': 'code', 'source': 'g(1)', 'outputs': []},
             {'kind': 'code', 'source': 'import os\nos.getcwd()', 'outputs': []}]
    found = docs.lint_reference(cells)
    assert found == ['show_doc(f): no example right below it', "visible code imports: 'import os\\nos.getcwd()'"]


def test_with_quarto_the_build_runs_quarto_render_in_proc(build, tmp_path, monkeypatch):
    """Where Quarto is installed, the pages nbdev's processors made are rendered by `quarto render` in `_proc/`
    (as nbdev_docs does) and the result lands in the site folder. Quarto is not installable here, so a stand-in
    `quarto` records how it was called and writes a page."""
    fake = tmp_path / 'bin' / 'quarto'
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$PWD $@" > "$QUARTO_LOG"\nls "$PWD" >> "$QUARTO_LOG"\n'
                    'mkdir -p _docs && echo rendered > _docs/index.html\n')
    fake.chmod(0o755)
    monkeypatch.setenv('PATH', f'{fake.parent}:' + __import__('os').environ['PATH'])
    monkeypatch.setenv('QUARTO_LOG', str(tmp_path / 'log'))
    monkeypatch.setattr(docs, 'SITE', tmp_path / 'site')
    docs.render()
    called = (tmp_path / 'log').read_text().splitlines()
    assert called[0] == f'{PROC} render --no-cache'
    assert {'_quarto.yml', '09_learner.ipynb', 'tutorials'} <= set(called[1:])
    assert (tmp_path / 'site' / 'index.html').read_text() == 'rendered\n'
    assert 'show_doc' in (PROC / '09_learner.ipynb').read_text()      # nbdev's processed pages were rendered


def test_classes_show_as_python_says_them(build):
    """A class's block says `class Name(bases):` with its `__init__`, not `def Name(`; an Enum lists its members
    (not Enum's internals), a NamedTuple its fields with their types (not ForwardRef), a class with a builtin's
    constructor no parameter table (issue 17, the docs site)."""
    core, fmt, learner = (show_doc_outputs(Path(nb)) for nb in ('00_core.ipynb', '03_ckpt_format.ipynb', '09_learner.ipynb'))
    event = next(d for d in core if '### Event\n' in d)
    assert 'class Event(str, Enum):' in event and '`before_fit`' in event and '`qualname`' not in event, event[:800]
    cpf = next(d for d in fmt if '### CheckpointFile\n' in d)
    assert 'class CheckpointFile(NamedTuple):\n    path: Path\n    run: str | None' in cpf and 'ForwardRef' not in cpf, cpf[:800]
    learn = next(d for d in learner if '### Learner\n' in d)
    assert 'class Learner(CallbackHost, RunStateView' in learn and '    def __init__(' in learn and '| `model` |' in learn
    callback = next(d for d in core if '### Callback\n' in d)
    assert 'class Callback:' in callback and '*args' not in callback, callback[:600]
    assert not [d.split('\n')[0] for nb in (core, fmt, learner) for d in nb if re.search(r'```python\ndef [A-Z]', d)]


def test_code_is_never_cut_at_the_right(build):
    "In a real browser, no code block or output of the reference's widest page runs past its box: long lines wrap."
    from test_browser import CHROMIUM_ARGS, chromium_path
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={'width': 1280, 'height': 900})
            cut = {}
            for name in ('09_learner.html', '11_checkpoint.html', 'tutorials/scaling.html'):
                page.goto((SITE / name).as_uri())
                cut[name] = page.evaluate("[...document.querySelectorAll('pre')].filter(p => p.scrollWidth > p.clientWidth + 1)"
                                          ".map(p => p.innerText.split('\\n').sort((a, b) => b.length - a.length)[0].slice(0, 100))")
                assert page.evaluate("document.querySelectorAll('pre').length") > 5, name
        finally: browser.close()
    assert not any(cut.values()), cut


def test_a_writefile_cell_keeps_its_magic(build):
    "The scaling tutorial's script cell shows its `%%writefile` line, so that it reads as the file it writes."
    assert '%%writefile runs/scaling/train.py' in Page(SITE / 'tutorials' / 'scaling.html').all_text


def test_pages_need_no_network_for_math(build):
    "No page writes TeX for a script from a CDN to typeset: offline it showed raw `$e^{\\text{loss}}$`."
    raw = {p.name: m.group(0) for p in SITE.rglob('*.html')
           for m in [re.search(r'\\(?:text|frac|ln|cdot|sum)\b[^\n]{0,40}', Page(p).all_text)] if m}
    assert not raw, raw


def test_pages_say_their_version_and_tutorials_can_be_downloaded(build):
    "Every page names the version it documents; a tutorial links to its notebook, which the site holds (issue 17)."
    import nbloop
    assert f'nbloop {nbloop.__version__}' in Page(SITE / 'index.html').all_text
    for tut in (SITE / 'tutorials').glob('*.html'):
        assert f'href="{tut.stem}.ipynb"' in tut.read_text(), tut.name
        assert (SITE / 'tutorials' / f'{tut.stem}.ipynb').exists(), tut.name


def test_reference_pages_have_titles_and_leave_tests_out(build):
    "A reference page has a title, not its module's name, and shows no cell that only checks (`test_eq(...)`)."
    learner = Page(SITE / '09_learner.html').all_text
    assert 'Learner: the training loop' in learner
    shown = [c['source'] for nb in LIBRARY for c in docs.page_cells(nbformat.read(PROC / nb, as_version=4))
             if c['kind'] == 'code' and docs.only_checks(c['source'])]
    assert not shown, shown[:3]


MAIN_PAGES = [nb for nb in LIBRARY if nb.stem not in ('14_all', '15_demo')]


def test_reference_pages_lead_with_their_main_names(build):
    """Each reference page begins, right under its title, with a 'Main:' line whose names link to their entries on
    that same page (a newcomer finds `CheckpointCallback` at the top of its page, not as entry 36 of 40)."""
    for nb in MAIN_PAGES:
        cells = nbformat.read(ROOT / 'nbs' / nb, as_version=4).cells
        first = next(c for c in cells[1:] if c.cell_type == 'markdown')
        assert cells.index(first) <= 2 and first.source.startswith('**Main:** '), (nb, first.source[:80])
        names = re.findall(r'`([^`]+)`', first.source)
        page = (SITE / nb.with_suffix('.html')).read_text()
        lead = page[page.index('Main:'):][:3000]
        assert page.index('Main:') < min(page.index(f'id="{n.lower()}"') for n in names), nb   # before the entries
        for n in names:
            assert f'<a href="{nb.stem}.html#{n.lower()}"><code>{n}</code></a>' in lead, (nb, n)
            assert f'id="{n.lower()}"' in page, (nb, n)
