"""Packaging: `python -m build` makes a wheel and an sdist; the wheel installs into a fresh environment that has
only torch, `python -m nbloop.demo` trains there (the digits asset is in the wheel), and the install stays lean:
fastprogress 1.0.x (no dependencies), none of the web stack that fastprogress 1.1 pulls in through python-fasthtml.

The fresh environment gets the CPU build of torch these machines hold (TORCH_SPEC, as in the Makefile); nbloop's
other dependencies come from the package registry.
"""
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from conftest import ROOT, env_for_subprocess

TORCH_SPEC = os.environ.get('TORCH_SPEC', 'torch==2.13.0')
WEB_STACK = {'python-fasthtml', 'starlette', 'uvicorn', 'uvloop', 'websockets', 'oauthlib', 'beautifulsoup4', 'httpx',
             'fastlite', 'apswutils', 'itsdangerous', 'python-multipart'}
TORCH_AND_ITS_OWN = {'torch', 'filelock', 'typing-extensions', 'sympy', 'mpmath', 'networkx', 'jinja2', 'markupsafe',
                     'fsspec', 'setuptools', 'pip'}


def sh(cmd, cwd, timeout=600) -> subprocess.CompletedProcess:
    env = env_for_subprocess()
    env.pop('PYTHONPATH', None)                  # the installed package, not this checkout
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f'{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return p


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp('dist')
    sh([sys.executable, '-m', 'build', '--no-isolation', '--outdir', out, ROOT], cwd=ROOT)
    wheels, sdists = list(out.glob('nbloop-*.whl')), list(out.glob('nbloop-*.tar.gz'))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return wheels[0], sdists[0]


def test_wheel_and_sdist_hold_what_they_need(built):
    wheel, sdist = built
    names = zipfile.ZipFile(wheel).namelist()
    assert 'nbloop/assets/digits.csv.gz' in names and 'nbloop/learner.py' in names
    assert not any(n.startswith(('tests/', 'nbs/')) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith('dist-info/METADATA'))).decode()
    assert 'Requires-Dist: fastprogress<1.1,>=1.0.5' in meta
    members = tarfile.open(sdist).getnames()
    for needed in ('settings.ini', 'setup.py', 'nbloop/assets/digits.csv.gz'):     # setup.py reads settings.ini
        assert any(m.endswith('/' + needed) for m in members), needed


def test_fresh_install_runs_the_demo_and_stays_lean(built, tmp_path):
    wheel, _ = built
    env = tmp_path / 'env'
    sh([sys.executable, '-m', 'venv', env], cwd=tmp_path, timeout=120)
    py = env / 'bin' / 'python'
    sh([py, '-m', 'pip', 'install', '-q', TORCH_SPEC], cwd=tmp_path)
    sh([py, '-m', 'pip', 'install', '-q', wheel], cwd=tmp_path)
    run = tmp_path / 'run'
    run.mkdir()
    demo = sh([py, '-m', 'nbloop.demo'], cwd=run, timeout=300)
    final = [line for line in demo.stdout.splitlines() if line.startswith('final:')]
    assert final and float(final[0].split('accuracy')[1].split()[0]) > 0.9, demo.stdout[-2000:]
    where = sh([py, '-c', 'import nbloop; print(nbloop.__file__)'], cwd=run).stdout
    assert str(env) in where                     # the installed wheel ran, not this checkout
    listed = sh([py, '-m', 'pip', 'list', '--format=freeze'], cwd=tmp_path).stdout.split()
    versions = {line.split('==')[0].lower().replace('_', '-'): line.split('==')[1] for line in listed if '==' in line}
    assert versions['fastprogress'].startswith('1.0.'), versions['fastprogress']
    assert not WEB_STACK & set(versions), WEB_STACK & set(versions)
    besides_torch = set(versions) - TORCH_AND_ITS_OWN
    # nbloop, fastprogress, ipywidgets (+ IPython), matplotlib, tensorboard, safetensors, numpy and their own: ~40
    assert len(besides_torch) <= 45, sorted(besides_torch)
