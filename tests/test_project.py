"""Project-level checks: the README is generated from nbs/index.ipynb, and the docs site builds without broken links."""
import subprocess
import sys

from conftest import ROOT, BIN, env_for_subprocess

sys.path.insert(0, str(ROOT / 'tools'))
import readme  # noqa: E402


def test_readme_is_generated_from_index():
    "README.md is what `make readme` makes from nbs/index.ipynb (edit the notebook, then run make readme)."
    assert (ROOT / 'README.md').read_text(encoding='utf-8') == readme.render(ROOT / 'nbs' / 'index.ipynb')


def test_readme_quick_start_names_the_two_commands():
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    assert 'make demo' in text and 'make test' in text


def test_docs_site_builds_without_warnings(tmp_path):
    "The docs configuration is valid and every page and link resolves (smalldocs, since Quarto isn't installable here)."
    proc = subprocess.run([str(BIN / 'smalldocs'), 'render', '--strict', str(ROOT / 'nbs')], capture_output=True,
                          text=True, timeout=300, env=env_for_subprocess())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (ROOT / '_docs' / 'index.html').exists()
