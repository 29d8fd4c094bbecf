"""The shape of the code, measured: what the redesign (issue 15) keeps from growing back.

    python tools/shape.py            the figures for this checkout
    python tools/shape.py OTHER_DIR  the same figures for another checkout (e.g. a `git worktree` of an older commit)

Everything is measured with `ast` on the package's files, except the fit path: the functions a plain `fit` runs are
found by tracing one (`synth_learner().fit(2)` with the default callbacks, in a subprocess of the checkout), and their
lines and nesting are then measured with `ast`.

- Learner: its class's lines and those of the methods `@patch` adds to it in later cells of its notebook, these
  methods (`def`s), and the distinct attributes they set on `self`.
- fit path: the Learner's methods (its base classes' included) and the functions of `learner.py` that a plain fit
  calls, down to the optimizer step; their code lines (no blank lines, comments or docstrings); the deepest nesting of
  blocks (`if`, `for`, `while`, `try`, `with`) inside one of them. Lambdas and nested functions are part of the
  function they are written in (their lines count there).
- distribution tests outside `runtime`, `distributed`, `data` and `launch`: conditions (`if`, `while`, conditional expressions,
  comprehension filters, `assert`) that mention a process's rank or the number of processes.
- `history[-1]` guards: reads of a history's last row (`<...>.history[-1]`) in a function that checks that row's
  epoch against the learner's (`... == learn.epoch`): what `learn.state.last_row` replaces.
- modules: the longest module; exported cells: the longest `#| export` cell of the notebooks.
- import circles: modules that import each other, directly or not (`TYPE_CHECKING` imports included), and imports
  that point up the layering (a module importing one listed after it in `LAYERS`).
- the story: code cells of the notebooks numbered before 09_learner that use the Learner before it is introduced.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ['core', 'state', 'data', 'state_tree', 'ckpt_format', 'ckpt_sharded', 'launch', 'runtime', 'distributed', 'sharded', 'metrics', 'recorder', 'progress', 'schedule', 'learner',
          'training', 'checkpoint', 'plots', 'loggers', 'trackers', 'all', 'demo']
DISTRIBUTION = {'distributed', 'world_size', 'rank', 'is_main', 'is_main_process', 'get_rank', 'get_world_size',
                'local_rank', 'main_process', 'runs_here'}
DISTRIBUTION_HOMES = {'runtime', 'distributed', 'sharded', 'data', 'launch'}
BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.With, ast.AsyncWith)
if sys.version_info >= (3, 11): BLOCKS += (ast.TryStar,)


def modules(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / 'nbloop').glob('*.py')) if p.stem not in ('__init__', '_modidx')}


def code_lines(fn: ast.AST, source_lines: list[str]) -> int:
    """Lines of `fn` that hold code: its `def` (one line, however many lines its parameters and their comments take),
    and the lines of its body that are not blank, not only a comment, and not its docstring."""
    body = fn.body if hasattr(fn, 'body') and isinstance(fn.body, list) else []
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], 'value', None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body: return 1
    n = 1
    for i in range(body[0].lineno, fn.end_lineno + 1):
        line = source_lines[i - 1].strip()
        if line and not line.startswith('#'): n += 1
    return n


def nesting(fn: ast.AST) -> int:
    "The deepest nesting of blocks inside `fn` (a function's body is depth 0; nested functions are not counted)."
    def depth(node, d):
        best = d
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)): continue
            best = max(best, depth(child, d + 1 if isinstance(child, BLOCKS) else d))
        return best
    return depth(fn, 0)


def learner_class(root: Path) -> tuple[ast.ClassDef, list[str]]:
    src = (root / 'nbloop' / 'learner.py').read_text()
    tree = ast.parse(src)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == 'Learner')
    return cls, src.splitlines()


def patched_methods(tree: ast.Module, cls: str = 'Learner') -> list[ast.FunctionDef]:
    "Module-level functions added to `cls` with `@patch` (`def f(self: Learner, ...)`): methods written in later cells."
    out = []
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                isinstance(d, ast.Name) and d.id == 'patch' for d in n.decorator_list) and n.args.args:
            ann = n.args.args[0].annotation
            if ann is not None and ast.unparse(ann).strip("'\"") == cls: out.append(n)
    return out


def learner_figures(root: Path) -> dict:
    "The Learner's lines, methods and attributes: its class statement and the methods `@patch` adds in later cells."
    cls, _ = learner_class(root)
    patched = patched_methods(ast.parse((root / 'nbloop' / 'learner.py').read_text()))
    methods = [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] + patched
    attrs = set()
    for m in methods:
        for node in ast.walk(m):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            if isinstance(node, (ast.For, ast.comprehension)): targets = [node.target]
            for t in targets:
                for e in ast.walk(t):
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == 'self': attrs.add(e.attr)
    lines = cls.end_lineno - cls.lineno + 1 + sum(f.end_lineno - f.decorator_list[0].lineno + 1 for f in patched)
    return {'learner_lines': lines, 'learner_methods': len(methods), 'learner_attributes': len(attrs)}


TRACE = r'''
import io, json, sys, contextlib
sys.path.insert(0, sys.argv[1])
import nbloop.learner as L
learn = L.synth_learner(n_classes=3)
bases = [c for c in type(learn).__mro__ if c is not object]
codes = {}
for c in bases:
    for name, f in vars(c).items():
        for fn in (f.fget, f.fset) if isinstance(f, property) else (getattr(f, '__func__', f),):
            fn = getattr(fn, '__wrapped__', fn)              # a contextmanager's own function, not contextlib's
            if hasattr(fn, '__code__'): codes[fn.__code__] = (fn.__code__.co_filename, fn.__code__.co_firstlineno)
path = L.__file__
seen = set()
def prof(frame, event, arg):
    if event == 'call':
        co = frame.f_code
        nested = '<locals>' in getattr(co, 'co_qualname', '') or co.co_name == '<lambda>'   # counted in their function
        if (co in codes or co.co_filename == path) and not nested: seen.add((co.co_filename, co.co_firstlineno, co.co_name))
sys.setprofile(prof)
with contextlib.redirect_stdout(io.StringIO()): learn.fit(2)
sys.setprofile(None)
print(json.dumps(sorted(seen)))
'''


def fit_path(root: Path) -> dict:
    "Trace a plain fit in a subprocess of `root`'s package; measure the functions it ran."
    out = subprocess.run([sys.executable, '-c', TRACE, str(root)], capture_output=True, text=True, timeout=300)
    if out.returncode: raise RuntimeError(f'tracing a fit failed:\n{out.stderr[-3000:]}')
    ran = json.loads(out.stdout.strip().splitlines()[-1])
    trees, lines_of, total, deepest, names = {}, {}, 0, 0, []
    for filename, first, name in ran:
        if filename not in trees:
            src = Path(filename).read_text()
            trees[filename], lines_of[filename] = ast.parse(src), src.splitlines()
        node = next((n for n in ast.walk(trees[filename]) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                     and (n.decorator_list[0].lineno if getattr(n, 'decorator_list', None) else n.lineno) == first
                     and getattr(n, 'name', '<lambda>') == name), None)
        if node is None: continue
        total += code_lines(node, lines_of[filename]) if not isinstance(node, ast.Lambda) else 1
        deepest = max(deepest, nesting(node))
        names.append(f'{Path(filename).stem}.{name}')
    return {'fit_path_functions': len(names), 'fit_path_code_lines': total, 'fit_path_nesting': deepest,
            'fit_path_names': sorted(names)}


def _mentions_distribution(expr: ast.AST) -> bool:
    for e in ast.walk(expr):
        if isinstance(e, ast.Attribute) and e.attr == 'is_initialized' and 'dist' in ast.unparse(e.value): return True
        if isinstance(e, ast.Name) and e.id in DISTRIBUTION: return True
        if isinstance(e, ast.Attribute) and e.attr in DISTRIBUTION: return True
        if isinstance(e, ast.Constant) and e.value in DISTRIBUTION: return True
    return False


def distribution_tests(root: Path) -> dict[str, int]:
    "Conditions that test the process's rank or the number of processes, per module outside the distribution homes."
    found = {}
    for name, path in modules(root).items():
        if name in DISTRIBUTION_HOMES: continue
        n = 0
        for node in ast.walk(ast.parse(path.read_text())):
            tests = [node.test] if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)) else \
                    list(node.ifs) if isinstance(node, ast.comprehension) else []
            n += sum(_mentions_distribution(t) for t in tests)
        if n: found[name] = n
    return found


def _last_row_reads(fn: ast.AST) -> int:
    return sum(1 for node in ast.walk(fn)
               if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == 'history'
               and isinstance(node.slice, ast.UnaryOp) and isinstance(node.slice.op, ast.USub)
               and getattr(node.slice.operand, 'value', None) == 1)


def history_guards(root: Path) -> int:
    "Functions that read a history's last row (`<...>.history[-1]`) and check it is the current epoch's (`.epoch`)."
    n = 0
    for path in modules(root).values():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)): continue
            checks_epoch = any(isinstance(c, ast.Compare) and any(isinstance(e, ast.Attribute) and e.attr == 'epoch'
                                                                  for e in ast.walk(c)) for c in ast.walk(fn))
            if checks_epoch: n += _last_row_reads(fn)
    return n


def imports(root: Path) -> dict[str, set[str]]:
    "Each module's imports of other nbloop modules, TYPE_CHECKING and function-level imports included."
    mods = modules(root)
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (node.module or '').split('.')
                if node.level == 1 and node.module: deps.add(base[0])
                elif node.level == 1: deps.update(a.name for a in node.names)
                elif base[0] == 'nbloop' and len(base) > 1: deps.add(base[1])
                elif base[0] == 'nbloop': deps.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split('.')
                    if parts[0] == 'nbloop' and len(parts) > 1: deps.add(parts[1])
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    "The strongly connected groups of more than one module (Tarjan)."
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        for w in graph.get(v, ()):
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop(); on.discard(w); group.append(w)
                if w == v: break
            if len(group) > 1: out.append(sorted(group))
    for v in graph:
        if v not in index: visit(v)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    "Imports of a module listed later in LAYERS than the importer (arrows that point up)."
    rank = {m: i for i, m in enumerate(LAYERS)}
    return sorted(f'{m} -> {d}' for m, deps in graph.items() for d in deps
                  if m in rank and d in rank and rank[d] > rank[m])


def cell_sizes(root: Path) -> tuple[int, str]:
    worst = (0, '')
    for nb in sorted((root / 'nbs').glob('*.ipynb')):
        for c in json.loads(nb.read_text()).get('cells', []):
            src = ''.join(c.get('source', [])) if c.get('cell_type') == 'code' else ''
            if re.search(r'^#\|\s*export', src, re.M): worst = max(worst, (len(src.splitlines()), nb.name))
    return worst


LEARNER_USE = re.compile(r'\bsynth_learner\b|\bLearner\(|nbloop\.learner\b|from nbloop\.all import')


def early_learner_cells(root: Path) -> dict[str, int]:
    "Code cells of the notebooks numbered before the Learner's that use the Learner (it is introduced in 09_learner)."
    found = {}
    for nb in sorted((root / 'nbs').glob('0[0-8]*.ipynb')):
        n = sum(1 for c in json.loads(nb.read_text()).get('cells', [])
                if c.get('cell_type') == 'code' and LEARNER_USE.search(''.join(c.get('source', []))))
        if n: found[nb.name] = n
    return found


def measure(root: Path = ROOT, trace: bool = True) -> dict:
    graph = imports(root)
    sizes = {m: len(p.read_text().splitlines()) for m, p in modules(root).items()}
    biggest = max(sizes, key=sizes.get)
    cell, cell_nb = cell_sizes(root)
    figures = {**learner_figures(root), 'distribution_tests': distribution_tests(root),
               'history_guards': history_guards(root), 'largest_module': (biggest, sizes[biggest]),
               'largest_exported_cell': (cell_nb, cell), 'import_circles': circles(graph),
               'upward_imports': upward_imports(graph), 'early_learner_cells': early_learner_cells(root)}
    if trace: figures.update(fit_path(root))
    return figures


def main():
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    f = measure(root)
    rows = [('Learner: lines / methods / attributes set on self', f"{f['learner_lines']} / {f['learner_methods']} / {f['learner_attributes']}"),
            ('fit path: functions / code lines / deepest nesting', f"{f['fit_path_functions']} / {f['fit_path_code_lines']} / {f['fit_path_nesting']}"),
            ('distribution tests outside runtime(s), data, launch', f"{sum(f['distribution_tests'].values())} {f['distribution_tests'] or ''}"),
            ('history[-1] guards', f['history_guards']),
            ('largest module', f"{f['largest_module'][0]}.py, {f['largest_module'][1]} lines"),
            ('longest exported cell', f"{f['largest_exported_cell'][1]} lines ({f['largest_exported_cell'][0]})"),
            ('import circles', f['import_circles'] or 'none'),
            ('imports up the layering', f['upward_imports'] or 'none'),
            ('cells using the Learner before its notebook', f"{sum(f['early_learner_cells'].values())} {f['early_learner_cells'] or ''}")]
    for k, v in rows: print(f'{k:52} {v}')
    print('fit path:', ', '.join(f['fit_path_names']))


if __name__ == '__main__':
    main()
