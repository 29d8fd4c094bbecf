"""Edit a notebook as one plain text file, then write it back.

    python tools/nbpy.py out nbs/09_learner.ipynb /tmp/09.py    # notebook -> text
    python tools/nbpy.py in  /tmp/09.py nbs/09_learner.ipynb    # text -> notebook

Each cell starts with a marker line `#%%%% code <id>` or `#%%%% markdown <id>`. Cells keep their id, metadata
and outputs when their source is unchanged; a changed code cell loses its (now stale) outputs. A new cell gets
the marker `#%%%% code new` (or `markdown new`) and receives a fresh id. Delete a cell by deleting its block.
"""
import json
import secrets
import sys
from pathlib import Path

MARK = '#%%%% '


def to_text(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding='utf-8'))
    parts = []
    for cell in nb['cells']:
        parts.append(f"{MARK}{cell['cell_type']} {cell.get('id', 'new')}\n{''.join(cell['source'])}\n")
    return ''.join(parts)


def from_text(text: str, nb_path: Path) -> None:
    nb = json.loads(nb_path.read_text(encoding='utf-8'))
    old = {c.get('id'): c for c in nb['cells']}
    cells, used = [], set()
    blocks = text.split('\n' + MARK) if not text.startswith(MARK) else ('\n' + text).split('\n' + MARK)[1:]
    for block in blocks:
        head, _, src = block.partition('\n')
        kind, cid = head.split()
        if src.endswith('\n'): src = src[:-1]
        if cid == 'new' or cid in used or cid not in old:
            cid = secrets.token_hex(4)
            while cid in old or cid in used: cid = secrets.token_hex(4)
            cell = {'cell_type': kind, 'id': cid, 'metadata': {}, 'source': []}
            if kind == 'code': cell.update(execution_count=None, outputs=[])
        else:
            cell = dict(old[cid])
            if kind != cell['cell_type']:
                raise SystemExit(f'cell {cid} changed kind: give it the id "new"')
            if ''.join(cell['source']) != src and kind == 'code': cell.update(execution_count=None, outputs=[])
        used.add(cid)
        lines = src.split('\n')
        cell['source'] = [l + '\n' for l in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        cells.append({k: cell[k] for k in ('cell_type', 'execution_count', 'id', 'metadata', 'outputs', 'source') if k in cell})
    nb['cells'] = cells
    nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')


if __name__ == '__main__':
    cmd, src, dst = sys.argv[1:4]
    if cmd == 'out': Path(dst).write_text(to_text(Path(src)), encoding='utf-8')
    elif cmd == 'in': from_text(Path(src).read_text(encoding='utf-8'), Path(dst))
    else: raise SystemExit(__doc__)
