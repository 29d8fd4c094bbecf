"""Build the docs site from executed notebooks: `make docs` runs this.

    python tools/docs.py                  execute every notebook, then build the site into _docs/
    python tools/docs.py --write-back     also store the tutorials' fresh outputs in nbs/tutorials/ (commit them)
    python tools/docs.py --only digits    execute only notebooks whose path contains `digits` (the others are
                                          rendered with the outputs they have)

1. `nbs/` is copied to `_build/nbs/`.
2. Each notebook there gets a `show_doc` cell after each export cell, for each public name it defines (as
   nbdev's processor adds them), and runs top to bottom. The tutorials and the index run in a fresh Jupyter
   kernel of this Python (nbclient), as their readers run them: the progress table is HTML, the live plot's final
   picture a PNG. The library notebooks run as `nbdev_test` runs them (execnb's shell, in a process of their own),
   since their tests were written for it. The working directory is the notebook's folder in `_build/`, so what a
   notebook writes stays there. Cells marked with one of settings.ini's `tst_flags` (`slow`, `cuda`, `notest`)
   or `#| eval: false` are shown but not run. A cell that fails, or an output that shows a traceback, stops the
   build. Each notebook's wall time goes to `_build/timings.json`.
3. nbdev's own processors make the pages (`_proc/`): an export cell's source (its imports too) leaves the page,
   and the `show_doc` of each name it exports, added in step 2 before the notebook ran, shows the signature, the
   docstring and a parameter table; `#| hide` cells go. Outputs lose the building machine's paths (a warning's
   file and line, temporary folders, the checkout): a page shows only what its prose explains.
4. With Quarto installed, `quarto render` renders `_proc/`, as `nbdev_docs` does; without it, `smalldocs render
   _proc` renders the same `_quarto.yml` (pure Python), and nbdev's links to a name's page are made relative.
   Either way the site lands in `_docs/`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / '_build'
STAGE = BUILD / 'nbs'
PROC = ROOT / '_proc'
SITE = ROOT / '_docs'
CELL_TIMEOUT = 1200    # a hang guard, not a speed goal: the longest cell takes about a minute alone, several times that on loaded cores
SKIP_FLAGS = {'slow', 'cuda', 'notest'}
DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*)$')


def notebooks(folder: Path) -> list[Path]:
    "Every notebook under `folder`, in the site's order (name order), leaving out checkpoints and private files."
    return sorted(p for p in folder.rglob('*.ipynb')
                  if not any(part.startswith(('.', '_')) for part in p.relative_to(folder).parts))


def directives(source: str) -> dict[str, str]:
    "The `#| name: value` lines at the top of a cell."
    out = {}
    for line in source.splitlines():
        m = DIRECTIVE.match(line)
        if not m: break
        out[m.group(1)] = m.group(2).strip()
    return out


def skipped(cell) -> bool:
    "Whether the build shows a cell without running it (as `nbdev_test` skips it)."
    d = directives(cell.source)
    return bool(SKIP_FLAGS & d.keys()) or d.get('eval', '').lower() == 'false'


def output_text(output) -> str:
    "Everything an output shows as text: streams, error fields, and text/* display data."
    text = output.get('text', '') + output.get('ename', '') + output.get('evalue', '') + '\n'.join(output.get('traceback', []))
    data = output.get('data', {})
    return text + ''.join(v for k, v in data.items() if k.startswith('text/') and isinstance(v, str))


def error_outputs(nb) -> list[str]:
    "Outputs that report an error: error outputs, and tracebacks printed or logged (a caught error a tutorial shows is fine)."
    found = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get('outputs', []):
            text = output_text(o)
            if o['output_type'] == 'error' or 'Traceback (most recent call last)' in text:
                found.append(f'cell {i} ({cell.source[:60]!r}): {o["output_type"]}: {text[:1500]}')
    return found


def kernel_env() -> dict:
    "The kernel's environment: this checkout importable, the 'python3' kernel this interpreter."
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    return env


def use_this_python(folder: Path) -> None:
    "Make the 'python3' kernelspec run this interpreter, whatever other kernelspecs the machine has."
    spec = {'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
            'display_name': 'Python 3 (nbloop build)', 'language': 'python'}
    (folder / 'kernels' / 'python3').mkdir(parents=True, exist_ok=True)
    (folder / 'kernels' / 'python3' / 'kernel.json').write_text(json.dumps(spec))
    os.environ['JUPYTER_PATH'] = str(folder) + os.pathsep + os.environ.get('JUPYTER_PATH', '')


def add_show_docs(path: Path) -> None:
    """Put a `show_doc` cell after each export cell for each public name it defines, as nbdev's processor does, but
    before the notebook runs: the kernel then renders them in the notebook's own context (nbdev's processor would
    rerun the export cells and any cell with an import, alone, in a separate shell)."""
    from execnb.nbio import write_nb
    from nbdev.process import NBProcessor
    from nbdev.processors import add_show_docs as add
    proc = NBProcessor(path, procs=[add], rm_directives=False)
    proc.process()
    if any('show_doc(' in c.source for c in proc.nb.cells if c.cell_type == 'code'):
        proc.nb.cells.insert(1, _hidden_cell(SHOWDOC_SETUP))
    for i, cell in enumerate(proc.nb.cells):
        if not cell.get('id'): cell['id'] = f'nbloop-docs-{i}'      # the cells added here; nbformat wants ids
    write_nb(proc.nb, path)


# Run (hidden) at the top of every page that has show_doc cells. nbdev's show_doc (with fastcore 1.14) writes the
# signature and the docstring; this adds the parameter table below them: each parameter's type, default, and its
# docment (the comment beside it) where it has one. It patches nbdev's renderer class, so every `show_doc` call
# of the notebook uses it, however the notebook imported `show_doc`.
SHOWDOC_SETUP = """from nbdev.showdoc import show_doc
def _nbloop_param_table():
    import inspect
    from fastcore.docments import docments
    from nbdev.showdoc import BasicMarkdownRenderer
    base = BasicMarkdownRenderer._repr_markdown_
    cell = lambda v: str(v).replace('|', chr(92) + '|').replace(chr(10), ' ')
    def table(self):
        if self.sig is None: return ''
        try: notes = docments(self.sym, args_kwargs=True)
        except Exception: notes = {}
        shown = lambda v: f'{v.__module__}.{v.__qualname__}' if hasattr(v, '__qualname__') and hasattr(v, '__module__') else repr(v)
        rows = []
        for i, (name, p) in enumerate(self.sig.parameters.items()):
            if i == 0 and name in ('self', 'cls'): continue
            star = '*' if p.kind == p.VAR_POSITIONAL else '**' if p.kind == p.VAR_KEYWORD else ''
            anno = '' if p.annotation is p.empty else inspect.formatannotation(p.annotation)
            default = '' if p.default is p.empty else shown(p.default)   # a function by its name, not its address
            rows.append(f'| `{star}{name}` | {cell(anno)} | {cell(default)} | {cell((notes or {}).get(name) or "")} |')
        if not rows: return ''
        return '\\n\\n|  | **Type** | **Default** | **Details** |\\n| -- | -------- | ----------- | ----------- |\\n' + '\\n'.join(rows)
    def is_builtin_init(cls):          # no constructor of its own: `object`'s, or a builtin base's (list, Exception)
        return all(c.__module__ == 'builtins' for c in cls.__mro__ if '__init__' in vars(c))
    def as_class(self, md):
        "A class's block as Python says it: `class Name(bases):` and its `__init__`, an Enum's members, a NamedTuple's fields."
        import enum, re
        sym = self.sym
        bases = ', '.join('NamedTuple' if b is tuple and hasattr(sym, '_fields') else b.__name__ for b in sym.__bases__ if b is not object)
        head = f'class {sym.__name__}({bases}):' if bases else f'class {sym.__name__}:'
        block = re.search(r'```python\\ndef \\w+\\(\\n?(.*?)\\n?\\)(?:\\s*->\\s*None)?:\\n```', md, re.DOTALL)
        if block is None: return md, True
        rows, show_table = '', False
        if issubclass(sym, enum.Enum):
            code = head
            rows = '\\n\\n**Members:** ' + ', '.join(f'`{m.name}`' for m in sym)
        elif hasattr(sym, '_fields') and issubclass(sym, tuple):
            notes = getattr(sym, '__annotations__', {})
            code = head + ''.join(f'\\n    {f}: {getattr(notes.get(f), "__forward_arg__", notes.get(f, ""))}' for f in sym._fields)
        elif is_builtin_init(sym): code = head
        else:
            params = '\\n'.join('    ' + line for line in block.group(1).splitlines())
            code, show_table = f'{head}\\n    def __init__(\\n        self,\\n{params}\\n    ):', True
        return md[:block.start()] + f'```python\\n{code}\\n```' + md[block.end():] + rows, show_table
    def render(self):
        md, show_table = as_class(self, base(self)) if inspect.isclass(self.sym) else (base(self), True)
        return md + (table(self) if show_table else '')
    BasicMarkdownRenderer._repr_markdown_ = render
_nbloop_param_table()"""


def _hidden_cell(source: str):
    from execnb.nbio import mk_cell
    return mk_cell(f'#| hide\n{source}')


def execute(path: Path) -> float:
    "Run the notebook at `path` in a fresh kernel, store its outputs in place, and return its wall time."
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.read(path, as_version=4)
    held = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == 'code':
            cell.outputs, cell.execution_count = [], None
            if skipped(cell): held[i], cell.source = cell.source, ''
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, startup_timeout=120, kernel_name='python3', coalesce_streams=True,
                            resources={'metadata': {'path': str(path.parent)}})
    start = time.perf_counter()
    try: client.execute(env=kernel_env())        # nbclient shuts the kernel down however this ends
    except CellExecutionError as e: raise SystemExit(f'{path.relative_to(STAGE)} failed:\n{e}') from None
    took = time.perf_counter() - start
    for i, src in held.items(): nb.cells[i].source = src
    bad = error_outputs(nb)
    if bad: raise SystemExit(f'{path.relative_to(STAGE)} shows an error:\n' + '\n\n'.join(bad))
    nbformat.write(nb, path)
    return took


def execute_in_shell(path: Path) -> float:
    """Run a library notebook in a separate process the way `nbdev_test` runs it (execnb's in-process shell), store
    its outputs in place, and return the wall time. Its tests were written for that shell (console progress rows,
    no widgets), so it runs there; the tutorials run in a kernel, as their readers run them."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, '--shell', str(path)], cwd=path.parent, env=kernel_env(),
                          capture_output=True, text=True)
    if proc.returncode: raise SystemExit(f'{path.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
    return time.perf_counter() - start


def _shell_main(path: Path) -> None:
    "In the child process of `execute_in_shell`: run the notebook and write it with its outputs."
    os.environ['IN_TEST'] = '1'
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    nb = read_nb(path)
    for cell in nb.cells:
        if cell.cell_type == 'code': cell.outputs, cell.execution_count = [], None
    k = CaptureShell(path)
    try: k.run_all(nb, exc_stop=True, preproc=lambda c: c.cell_type != 'code' or skipped(c) or 'nbdev_export' + '(' in c.source)
    except Exception:
        sys.stderr.write(k.prettytb(fname=path) + '\n')
        raise SystemExit(1)
    write_nb(nb, path)


IMPORT = re.compile(r'^\s*(import\s+\w|from\s+[\w.]+\s+import\s)', re.MULTILINE)


def page_cells(nb) -> list[dict]:
    "What a processed notebook (nbdev's processors applied) shows: a list of {kind, source, outputs} per cell."
    out = []
    for c in nb.cells:
        src = c.get('source', '')
        src = ''.join(src) if isinstance(src, list) else src
        opts = directives(src)
        code = '\n'.join(l for l in src.splitlines() if not DIRECTIVE.match(l)).strip()
        if c.get('cell_type') == 'markdown': out.append({'kind': 'markdown', 'source': src, 'outputs': []})
        elif c.get('cell_type') == 'code':
            kind = 'show_doc' if code.startswith('show_doc(') else 'code'
            visible = kind == 'code' and code and opts.get('echo', '') != 'false' and opts.get('include', '') != 'false'
            out.append({'kind': kind, 'source': code if visible or kind == 'show_doc' else '', 'outputs': c.get('outputs', [])})
    return out


def lint_reference(cells: list[dict]) -> list[str]:
    """What a reference page gets wrong: a `show_doc` without a runnable example right below it (the next cell
    that is not prose must be visible code), or visible code that imports (imports belong in hidden cells)."""
    problems = []
    for i, c in enumerate(cells):
        if c['kind'] == 'show_doc':
            nxt = next((d for d in cells[i + 1:] if d['kind'] != 'markdown' and (d['kind'] == 'show_doc' or d['source'])), None)
            if nxt is None or nxt['kind'] != 'code':
                problems.append(f'{c["source"]}: no example right below it')
        if c['kind'] == 'code' and IMPORT.search(c['source']):
            problems.append(f'visible code imports: {c["source"][:120]!r}')
    return problems


def processed(path: Path):
    "The notebook at `path` after nbdev's processors (what a page shows), read as execnb does."
    from execnb.nbio import read_nb
    from nbdev.processors import FilterDefaults
    nb = read_nb(path)
    FilterDefaults()(nb)
    return nb


def check_page(name: str) -> int:
    "Stage one library notebook, run it, process it like the site does, print the page as text and its problems."
    import tempfile
    src = ROOT / 'nbs' / (name if name.endswith('.ipynb') else name + '.ipynb')
    tmp = Path(tempfile.mkdtemp(prefix='nbloop-page-'))
    path = tmp / src.name
    shutil.copy2(src, path)
    add_show_docs(path)
    took = execute_in_shell(path)
    cells = page_cells(processed(path))
    for c in cells:
        if c['kind'] == 'markdown': print(c['source'].strip(), end='\n\n')
        elif c['source']:
            print(('[show_doc] ' if c['kind'] == 'show_doc' else '```\n') + c['source'] + ('' if c['kind'] == 'show_doc' else '\n```'))
            for o in c['outputs']:
                data = o.get('data', {})
                text = o.get('text') or data.get('text/markdown') or data.get('text/plain') or ''
                text = ''.join(text) if isinstance(text, list) else text
                print('  -> ' + ('[image]' if 'image/png' in data else text.strip()[:400].replace('\n', '\n     ')))
            print()
    problems = lint_reference(cells)
    print(f'--- {src.name}: ran in {took:.1f} s; {len(problems)} problem(s)')
    for p in problems: print('  ' + p)
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if problems else 0


def write_back(executed: Path, original: Path) -> None:
    "Store an executed notebook's outputs in its source notebook, cell by cell (by id), sources untouched."
    import nbformat
    run, nb = nbformat.read(executed, as_version=4), nbformat.read(original, as_version=4)
    by_id = {c.get('id'): c for c in run.cells}
    for cell in nb.cells:
        if cell.cell_type != 'code': continue
        done = by_id.get(cell.get('id'))
        if done is None or done.source != cell.source:
            raise SystemExit(f'{original.relative_to(ROOT)} changed while it ran: run the build again')
        cell.outputs, cell.execution_count = done.outputs, done.execution_count
    widgets = run.metadata.get('widgets')
    if widgets: nb.metadata['widgets'] = widgets
    else: nb.metadata.pop('widgets', None)
    nbformat.write(nb, original)


_MACHINE = (   # what a page must not show of the machine that built it
    (re.compile(r'(?m)^[^\s:]*?(?:\.py|<ipython-input-[\w-]+>):\d+: (\w*Warning: .*)\n(?:  +\S.*\n)?'), r'\1\n'),
    (re.compile(r'(?:/private)?/tmp/tmp\w+/'), ''),          # a notebook's temporary folder: tempfile.mkdtemp()
    (re.compile(re.escape(str(ROOT)) + r'/'), ''),            # the checkout
)


def without_machine_paths(text: str) -> str:
    """An output's text as a page shows it: a warning without the file and line that raised it (nor the source line
    Python prints under it), paths without the notebook's temporary folder or the checkout they lie in."""
    for pattern, repl in _MACHINE: text = pattern.sub(repl, text)
    return text


def clean_outputs(cell: dict) -> None:
    "Take the building machine's paths out of a processed cell's text outputs (streams, text, HTML, markdown)."
    for o in cell.get('outputs', []):
        if 'text' in o: o['text'] = without_machine_paths(''.join(o['text']) if isinstance(o['text'], list) else o['text'])
        for kind in ('text/plain', 'text/html', 'text/markdown'):
            v = o.get('data', {}).get(kind)
            if v is not None: o['data'][kind] = without_machine_paths(''.join(v) if isinstance(v, list) else v)


CHECKS = re.compile(r'(test_(eq|fail|close|is|ne|eq_type|shuffled)\(|assert\s)')


def only_checks(source: str) -> bool:
    "Whether a code cell only checks (every line a `test_...(` or an `assert`): a test, not an example; pages leave it out."
    lines = [l for l in source.splitlines() if l.strip() and not l.lstrip().startswith('#')]
    return bool(lines) and all(CHECKS.match(l) or l.startswith((' ', ')', ']')) for l in lines) and CHECKS.match(lines[0]) is not None


def render() -> None:
    """Steps 3 and 4: nbdev's processors into `_proc/`, then `quarto render` there as `nbdev_docs` does, or smalldocs.
    (`nbdev_docs` itself would also rewrite README.md with Quarto, which `make readme` writes in its own way.)"""
    from nbdev.serve import proc_nbs
    bin_ = Path(sys.executable).parent
    shutil.rmtree(PROC, ignore_errors=True)
    os.chdir(ROOT)
    proc_nbs(str(STAGE), n_workers=0, force=True)
    magics = {}            # nbdev drops cell magics from pages; a `%%writefile` says what the cell is: it stays
    for nb in STAGE.rglob('*.ipynb'):
        for cell in json.loads(nb.read_text()).get('cells', []):
            src = ''.join(cell.get('source', ''))
            if src.startswith('%%writefile'): magics[(str(nb.relative_to(STAGE)), cell.get('id'))] = src.split('\n', 1)[0]
    quarto = shutil.which('quarto') is not None
    pages = {}     # Quarto names a page by its `output-file`; smalldocs by the notebook's name
    for nb in PROC.rglob('*.ipynb'):
        data = json.loads(nb.read_text())
        for i, cell in enumerate(data['cells']):
            cell.setdefault('id', f'nbloop-proc-{i}')    # nbdev's processors add cells (around show_doc) without ids
            clean_outputs(cell)
            if (str(nb.relative_to(PROC)), cell.get('id')) in magics:
                cell['source'] = magics[(str(nb.relative_to(PROC)), cell['id'])] + '\n' + ''.join(cell['source'])
            src = ''.join(cell.get('source', ''))
            if cell.get('cell_type') == 'code' and only_checks(src): cell['source'] = ''   # a test (its output is no example)
            m = None if quarto else re.search(r'output-file: ([\w.-]+)\.html\n?', src)
            if m:
                pages[str(nb.relative_to(PROC).parent / m.group(1))] = str(nb.relative_to(PROC).with_suffix(''))
                cell['source'] = src.replace(m.group(0), '')
        data['cells'] = [c for c in data['cells'] if c.get('cell_type') != 'code' or ''.join(c.get('source', '')).strip()]
        if nb.relative_to(PROC).parts[0] == 'tutorials':   # a tutorial page links to its notebook, copied beside it
            link = f'<p class="download"><a href="{nb.name}" download>Download this notebook</a></p>'
            data['cells'].insert(1, {'cell_type': 'markdown', 'id': 'nbloop-download', 'metadata': {}, 'source': link})
        nb.write_text(json.dumps(data, indent=1))
    if quarto: subprocess.run(['quarto', 'render', '--no-cache'], cwd=PROC, check=True)
    else: subprocess.run([str(bin_ / 'smalldocs'), 'render', '--strict', '--quiet', str(PROC)], cwd=ROOT, check=True)
    shutil.rmtree(SITE, ignore_errors=True)
    shutil.move(str(PROC / '_docs'), str(SITE))
    (SITE / 'tutorials').mkdir(parents=True, exist_ok=True)
    for nb in (ROOT / 'nbs' / 'tutorials').glob('*.ipynb'): shutil.copy(nb, SITE / 'tutorials' / nb.name)   # to download
    if not quarto: relink(pages)


def relink(pages: dict[str, str]) -> None:
    """nbdev links a name to its page on the published site (`doc_host/doc_baseurl/learner.html#Learner`); here
    those pages are `09_learner.html`, so each such link becomes a relative one to the page that was built."""
    from nbdev.config import get_config
    cfg = get_config()
    host = re.escape(cfg.doc_host.rstrip('/') + '/' + cfg.doc_baseurl.strip('/') + '/')
    for page in SITE.rglob('*.html'):
        up = '../' * (len(page.relative_to(SITE).parts) - 1)
        def local(m):
            built = pages.get(m.group(1))
            return f'{up}{built}.html' if built else m.group(0)
        text = page.read_text()
        new = re.sub(host + r'([\w./-]+?)\.html', local, text)
        if new != text: page.write_text(new)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--write-back', action='store_true', help="store the tutorials' outputs in nbs/tutorials/")
    ap.add_argument('--only', default='', help='execute only notebooks whose path contains this text')
    ap.add_argument('--no-exec', action='store_true', help='execute nothing: render the stored outputs')
    ap.add_argument('--shell', type=Path, help=argparse.SUPPRESS)
    ap.add_argument('--check', help='check one library notebook as a reference page (e.g. 02_progress) and print it')
    args = ap.parse_args(argv)
    if args.check: raise SystemExit(check_page(args.check))
    if args.shell: return _shell_main(args.shell)
    start = time.perf_counter()
    shutil.rmtree(BUILD, ignore_errors=True)
    shutil.copytree(ROOT / 'nbs', STAGE, ignore=shutil.ignore_patterns('.ipynb_checkpoints', 'runs', 'checkpoints',
                                                                      'models', 'ddp_run', '*.safetensors'))
    version = re.search(r"__version__ = ['\"](.+?)['\"]", (ROOT / 'nbloop' / '__init__.py').read_text()).group(1)
    quarto_yml = STAGE / '_quarto.yml'       # the site says which version it documents, beside its name
    quarto_yml.write_text(quarto_yml.read_text().replace('title: "nbloop"', f'title: "nbloop {version}"', 1))
    use_this_python(BUILD / 'jupyter')
    timings = {}
    for path in notebooks(STAGE):
        name = str(path.relative_to(STAGE))
        add_show_docs(path)
        if args.no_exec or args.only not in name: continue
        run = execute if name.startswith('tutorials/') or name == 'index.ipynb' else execute_in_shell
        timings[name] = round(run(path), 1)
        print(f'executed {name} in {timings[name]:.1f} s', flush=True)
        if args.write_back and name.startswith('tutorials/'): write_back(path, ROOT / 'nbs' / name)
    t_exec = time.perf_counter() - start
    render()
    took = time.perf_counter() - start
    (BUILD / 'timings.json').write_text(json.dumps({'notebooks': timings, 'execute': round(t_exec, 1),
                                                    'total': round(took, 1)}, indent=1))
    pages = sorted(str(p.relative_to(SITE)) for p in SITE.rglob('*.html'))
    print(f'built {len(pages)} pages into {SITE.relative_to(ROOT)}/ in {took:.0f} s '
          f'({t_exec:.0f} s executing notebooks)')


if __name__ == '__main__':
    main()
