"""Write README.md from nbs/index.ipynb without Quarto (nbdev_readme needs it).

Markdown cells are copied; code cells become ```python blocks with their text outputs; cells marked `#| hide`
and nbdev's `#|` directive lines are left out. Usage: python tools/readme.py [out_path]
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def render(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding='utf-8'))
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source'])
        lines = src.splitlines()
        if cell['cell_type'] == 'markdown':     # links between notebooks, relative to nbs/, made relative to the root
            parts.append(re.sub(r'\]\((?!\w+:|/|#)([^)]+\.ipynb)\)', r'](nbs/\1)', src.strip()))
            continue
        if any(l.strip().replace(' ', '') in ('#|hide', '#|exporti') for l in lines if l.startswith('#|')):
            continue
        code = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
        if code: parts.append(f'```python\n{code}\n```')
        for out in cell.get('outputs', []):
            text = out.get('text') or out.get('data', {}).get('text/plain')
            if text: parts.append('```\n' + ''.join(text).rstrip() + '\n```')
    header = '<!-- generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file -->'
    return header + '\n\n' + '\n\n'.join(parts) + '\n'


if __name__ == '__main__':
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / 'README.md'
    out.write_text(render(ROOT / 'nbs' / 'index.ipynb'), encoding='utf-8')
