"""Project-level checks: the README is generated from nbs/index.ipynb, and the wheel builds cleanly with its data (the site is checked in test_docs.py)."""
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


def test_the_wheel_builds_cleanly_and_holds_the_assets(tmp_path):
    "setuptools warned that nbloop.assets (the bundled data, no __init__.py) was absent from `packages`."
    import zipfile
    from conftest import run
    p = run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-v', '-w', str(tmp_path), str(ROOT)], 300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert 'absent from the `packages`' not in p.stdout + p.stderr
    names = zipfile.ZipFile(next(tmp_path.glob('nbloop-*.whl'))).namelist()
    assert {'nbloop/assets/digits.csv.gz', 'nbloop/assets/hamlet.txt', 'nbloop/learner.py'} <= set(names)
