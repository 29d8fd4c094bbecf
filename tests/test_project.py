"""Project-level checks: the README is generated from nbs/index.ipynb (the site is checked in test_docs.py)."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / 'tools'))
import readme  # noqa: E402


def test_readme_is_generated_from_index():
    "README.md is what `make readme` makes from nbs/index.ipynb (edit the notebook, then run make readme)."
    assert (ROOT / 'README.md').read_text(encoding='utf-8') == readme.render(ROOT / 'nbs' / 'index.ipynb')


def test_readme_quick_start_names_the_two_commands():
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert 'make demo' in text and 'make test' in text



def test_readme_links_resolve():
    "Relative links in the README (to the tutorials, on GitHub) point to files of the repository."
    import re
    links = re.findall(r'\]\((?!\w+:|#)([^)#]+)', (ROOT / 'README.md').read_text(encoding='utf-8'))
    assert any(l.startswith('nbs/tutorials/') for l in links)
    missing = [l for l in links if not (ROOT / l).exists()]
    assert not missing, f'README links to missing files: {missing}'
