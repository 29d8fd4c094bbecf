"""Exact resume across processes: kill a training job (tests/resume_job.py) at chosen points, resume it in a new
process, and check that it ends bit for bit where an uninterrupted run ends (weights, optimizer state, history
without 'time', and the final torch RNG state).

The job pauses where it is told and writes a marker file; the test then kills it (SIGKILL, like a crash or the
OOM killer, or SIGTERM, like a scheduler's preemption), so every kill lands at a known point.

Each job is a fresh Python process (about 3 s, most of it importing torch), so the scenarios run two at a time
(the machine has two cores and each job uses one thread): a module fixture starts every selected scenario at once
and each test checks its own scenario's outcome.
"""
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT, env_for_subprocess
from nbloop.ckpt_format import list_checkpoints, load_state, save_state

JOB = Path(__file__).with_name('resume_job.py')
TIMEOUT = 60            # seconds any one job may take (a normal one takes a few)
TOTAL_STEPS = 18        # resume_job.py: 3 epochs of 6 training batches; a checkpoint every 4 steps and at epoch ends


class Job:
    "One run of resume_job.py in its own process group (so DataLoader workers die with it), logging to files."
    def __init__(self, folder: Path, *args: str, out: bool = True):
        self.log = folder.parent / f'{folder.name}-{time.monotonic_ns()}'
        self.out = self.log.with_suffix('.pt') if out else None
        self.marker = self.log.with_suffix('.paused')
        cmd = [sys.executable, str(JOB), str(folder), '--marker', str(self.marker), *args]
        if self.out: cmd += ['--out', str(self.out)]
        with open(self.log.with_suffix('.out'), 'w') as out_f, open(self.log.with_suffix('.err'), 'w') as err_f:
            self.proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env=env_for_subprocess(),
                                         start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        "Send `sig` to the job's process group (the job and its DataLoader workers), if it is still there."
        try: os.killpg(self.proc.pid, sig)
        except ProcessLookupError: pass

    def wait(self) -> int:
        "Wait for the job to end; kill it and fail if it takes longer than TIMEOUT."
        try: return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            pytest.fail(f'resume_job.py took more than {TIMEOUT} s; stderr:\n{self.err()}')

    def wait_paused(self) -> str:
        "Wait until the job pauses where it was told to; returns what its marker says."
        deadline = time.monotonic() + TIMEOUT
        while not self.marker.exists():
            if self.proc.poll() is not None:
                pytest.fail(f'resume_job.py ended (status {self.proc.returncode}) before pausing:\n{self.err()}')
            if time.monotonic() > deadline:
                self.kill()
                self.proc.wait()
                pytest.fail(f'resume_job.py did not pause within {TIMEOUT} s:\n{self.err()}')
            time.sleep(0.02)
        return self.marker.read_text()

    def err(self) -> str: return self.log.with_suffix('.err').read_text()

    def result(self) -> dict:
        "Wait for a job that must succeed and load what it saved."
        status = self.wait()
        assert status == 0, f'resume_job.py failed with status {status}:\n{self.err()[-4000:]}'
        return torch.load(self.out, weights_only=True)


def run(folder: Path, *args: str) -> dict:
    "Run a job to completion; its final state."
    return Job(folder, *args).result()


def paused_job(folder: Path, pause: str, *args: str, sig: int) -> tuple[Job, str]:
    "Start a job, wait until it pauses at `pause` and send it `sig`; the job (ended) and what its marker said."
    job = Job(folder, '--pause', pause, *args, out=False)
    try:
        where = job.wait_paused()
        if sig == signal.SIGKILL: job.kill(sig)        # the job and its workers
        else: job.proc.send_signal(sig)                # the job only, as a scheduler does
        job.wait()
    finally:
        job.kill()
    assert where.startswith(pause)
    return job, where


def assert_same_run(got: dict, ref: dict) -> None:
    "Bit-exact equality of two final states: weights, optimizer state, history (without time), torch RNG."
    assert got['model'].keys() == ref['model'].keys()
    for k in ref['model']:
        assert torch.equal(got['model'][k], ref['model'][k]), f'parameter {k} differs from the uninterrupted run'
    assert got['opt']['state'].keys() == ref['opt']['state'].keys()
    for pid, s in ref['opt']['state'].items():
        for k, v in s.items():
            assert torch.equal(got['opt']['state'][pid][k], v), f'optimizer state {pid}/{k} differs'
    assert got['history'] == ref['history']
    assert torch.equal(got['rng'], ref['rng']), 'the final torch RNG state differs'


def base_name(path) -> str:
    "A checkpoint's file name without its run id (`-run<8 hex digits>`), which differs from run to run."
    return re.sub(r'-run[0-9a-f]{8}(?=-epoch)', '', Path(path).name)


def resumed_name(got: dict) -> str | None:
    return got['resumed_from'] and base_name(got['resumed_from'])


def newest_checkpoint_before(step: int) -> str | None:
    "The newest checkpoint the job has written when it starts training step `step` (counting from 1)."
    batch = max(range(0, step, 4))                       # every 4 steps ...
    end = max(range(0, step, 6))                         # ... and at the end of each 6-step epoch (ranked later)
    if batch == end == 0: return None
    if end >= batch: return f'ckpt-step{end:09d}-epoch{end // 6 - 1:04d}-end.safetensors'
    return f'ckpt-step{batch:09d}-epoch{batch // 6:04d}-batch{batch % 6}.safetensors'


SEED = int(os.environ.get('NBLOOP_RESUME_SEED', '20240611'))
RANDOM_STEP = random.Random(SEED).randrange(1, TOTAL_STEPS)

# -- scenarios: each runs its jobs (in a worker thread) and returns what its test checks ---------------------------
SCENARIOS = {}

def scenario(name):
    def register(fn):
        SCENARIOS[name] = fn
        return fn
    return register

@scenario('reference')
def _reference(folder): return run(folder)

@scenario('reference-workers')
def _reference_workers(folder): return run(folder, '--num-workers', '2')

# SIGKILL at `pause`, then resume='last' must start from `expected` (None: no checkpoint yet, a fresh fit)
KILL_POINTS = {
    'early-no-checkpoint-yet': ('train:2', None),
    'mid-epoch': ('train:9', 'ckpt-step000000008-epoch0001-batch2.safetensors'),
    'after-epoch-end-checkpoint': ('train:13', 'ckpt-step000000012-epoch0001-end.safetensors'),
    'inside-validation': ('valid:12:1', 'ckpt-step000000012-epoch0001-batch6.safetensors'),
    # the 4th checkpoint write (step 12's) dies with half its temporary file on disk: step 8's checkpoint is used
    'checkpoint-write-begun': ('write:4', 'ckpt-step000000008-epoch0001-batch2.safetensors'),
    f'random-step-{RANDOM_STEP}': (f'train:{RANDOM_STEP}', newest_checkpoint_before(RANDOM_STEP + 1)),
}

def _sigkill(pause, *args):
    def fn(folder):
        paused_job(folder, pause, *args, sig=signal.SIGKILL)
        ckpts = folder / 'checkpoints'
        leftovers = [p.name for p in ckpts.iterdir() if p.name.endswith('.tmp')] if ckpts.exists() else []
        newest = [base_name(p) for p in list_checkpoints(ckpts)[-1:]]
        return {'leftovers': leftovers, 'newest': newest, 'got': run(folder, '--resume', *args)}
    return fn

for _name, (_pause, _) in KILL_POINTS.items(): scenario(_name)(_sigkill(_pause))
# the same with async_save: the write dies in the background thread while training goes on to the next save
scenario('async-checkpoint-write-begun')(_sigkill(KILL_POINTS['checkpoint-write-begun'][0], '--async-save'))
scenario('workers')(_sigkill('train:10', '--num-workers', '2'))

def _sigterm(pause, *args):
    def fn(folder):
        job, _ = paused_job(folder, pause, *args, sig=signal.SIGTERM)
        err = job.err()
        m = re.search(r'SIGTERM received; saved checkpoint (\S+\.safetensors)\.', err)
        saved = Path(m[1]) if m else None
        got = run(folder.with_name(folder.name + '-resumed'), '--resume', str(saved)) if saved and saved.exists() else None
        return {'status': job.proc.returncode, 'err': err, 'saved': saved, 'got': got}
    return fn

# SIGTERM at `pause`: the batch under way finishes, then the checkpoint callback saves `saved`
SIGTERM_POINTS = {
    'train:9': 'ckpt-step000000010-epoch0001-batch4.safetensors',
    'valid:12:0': 'ckpt-step000000012-epoch0001-valid.safetensors',
}
for _pause in SIGTERM_POINTS: scenario(f'sigterm-{_pause}')(_sigterm(_pause))
scenario('sigterm-async-train:9')(_sigterm('train:9', '--async-save'))   # the interrupt checkpoint, written in the background

def _failed_write(folder, *args):
    job = Job(folder, '--fail-writes-after', '1', *args, out=False)
    status = job.wait()
    files = sorted(p.name for p in (folder / 'checkpoints').iterdir())
    state = load_state(folder / 'checkpoints' / files[0]) if files else None
    return {'status': status, 'err': job.err(), 'files': files, 'state': state, 'got': run(folder, '--resume')}

scenario('failed-write')(_failed_write)
scenario('async-failed-write')(lambda folder: _failed_write(folder, '--async-save'))   # failed in the background


@pytest.fixture(scope='module')
def outcomes(request, tmp_path_factory):
    "Start the reference run(s) and every scenario this session tests, two at a time; {name: future}."
    wanted = {item.callspec.params.get('scenario') for item in request.session.items
              if item.module is request.module and hasattr(item, 'callspec')}
    names = ['reference'] + ['reference-workers'] * ('workers' in wanted) + [n for n in SCENARIOS if n in wanted]
    with ThreadPoolExecutor(2) as pool:
        futures = {n: pool.submit(SCENARIOS[n], tmp_path_factory.mktemp(re.sub(r'\W', '-', n))) for n in names}
        yield futures
        for f in futures.values(): f.cancel()          # after a failure, don't start what no test waits for


@pytest.fixture(scope='module')
def reference(outcomes) -> dict:
    "The uninterrupted run, once per test session."
    ref = outcomes['reference'].result()
    assert len(ref['history']) == 3 and ref['resumed_from'] is None
    return ref


@pytest.fixture(scope='module')
def reference_workers(outcomes, reference) -> dict:
    "The uninterrupted run with two DataLoader workers (the augmentation draws its noise in the workers)."
    ref = outcomes['reference-workers'].result()
    assert ref['history'] != reference['history'], 'with workers the random draws should differ from without'
    return ref


@pytest.mark.parametrize('scenario', [*KILL_POINTS, 'async-checkpoint-write-begun'])
def test_sigkill_then_resume_is_exact(scenario, outcomes, reference):
    pause, expected = KILL_POINTS[scenario.removeprefix('async-')]
    if scenario.startswith('random'):
        print(f'random kill point: {pause} (seed {SEED}; set NBLOOP_RESUME_SEED to draw another)')
    out = outcomes[scenario].result()
    if scenario.endswith('checkpoint-write-begun'):
        # the half-written temporary file is still there, and has no checkpoint name: the previous one is newest
        assert len(out['leftovers']) == 1 and re.fullmatch(r'\.nbl-\d+-[0-9a-f]{8}\.tmp', out['leftovers'][0]), out['leftovers']
        assert out['newest'] == [expected]
    else: assert out['leftovers'] == []
    assert resumed_name(out['got']) == expected
    assert_same_run(out['got'], reference)


@pytest.mark.parametrize('scenario', ['workers'])
def test_sigkill_then_resume_with_workers_is_exact(scenario, outcomes, reference_workers):
    out = outcomes[scenario].result()
    assert resumed_name(out['got']) == 'ckpt-step000000008-epoch0001-batch2.safetensors'
    assert_same_run(out['got'], reference_workers)


@pytest.mark.parametrize('scenario', [*(f'sigterm-{p}' for p in SIGTERM_POINTS), 'sigterm-async-train:9'])
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(scenario, outcomes, reference):
    out = outcomes[scenario].result()
    assert out['status'] == 143, out['err']
    assert 'fit stopped by SIGTERM' in out['err']
    assert out['saved'] is not None, f"no 'saved checkpoint <path>' on stderr:\n{out['err']}"
    assert base_name(out['saved']) == SIGTERM_POINTS[scenario.removeprefix('sigterm-').removeprefix('async-')] and out['saved'].exists()
    assert out['got']['resumed_from'] == str(out['saved'])
    assert_same_run(out['got'], reference)


@pytest.mark.parametrize('scenario', ['failed-write', 'async-failed-write'])
def test_failed_write_leaves_previous_checkpoint_intact(scenario, outcomes, reference):
    "A full disk (RLIMIT_FSIZE below a checkpoint's size) fails the 2nd write clearly; the 1st stays usable."
    out = outcomes[scenario].result()
    err = out['err']
    assert out['status'] == 1, err
    m = re.search(r'CheckpointWriteError: could not write checkpoint (\S+): OSError: \[Errno 27\] File too large', err)
    assert m, err
    assert base_name(m[1]) == 'ckpt-step000000006-epoch0000-end.safetensors'
    assert 'Any previous file at that path is intact.' in err
    assert [base_name(f) for f in out['files']] == ['ckpt-step000000004-epoch0000-batch4.safetensors']   # no temporary file left
    assert out['state']['kind'] == 'training' and out['state']['training']['train_iter'] == 4
    assert resumed_name(out['got']) == base_name(out['files'][0])
    assert_same_run(out['got'], reference)


def test_checkpoints_of_every_header_length_read_back(tmp_path):
    """A checkpoint starts with its header's length (8 bytes, little-endian); no length may be taken for a pickle's
    magic bytes (b'\\x80' for protocol 2+, b'PK' for torch.save's zip): such a file would be skipped by
    resume='last' and refused by resume=path. Covers every low byte of the length, and the length that begins 'PK'."""
    def write(pad: int) -> tuple[int, Path]:
        path = save_state(tmp_path / 'c.safetensors', {'kind': 'training', 'w': torch.arange(3.), 'pad': 'x' * pad})
        return int.from_bytes(path.read_bytes()[:8], 'little'), path
    base, _ = write(0)
    pk = int.from_bytes(b'PK', 'little')                        # 19280, a multiple of 8 like every header length
    lengths = set()
    for pad in [*range(0, 256, 7), *range(pk - base - 8, pk - base + 1)]:
        n, path = write(pad)
        assert torch.equal(load_state(path)['w'], torch.arange(3.)), f'header length {n} ({n:#x})'
        lengths.add(n)
    assert pk in lengths and {n % 256 for n in lengths} >= set(range(0, 256, 8))


# -- checkpoints written before the redesign (issue 15) still resume, bit for bit ----------------------------------
OLD = Path(__file__).parent / 'fixtures' / 'old_checkpoints'
OLD_COMMIT = '7671fce'     # the last commit before the redesign changed the checkpoint's layout


@pytest.fixture(scope='module')
def older_run(tmp_path_factory) -> tuple[Path, Path]:
    """The older code's run (tests/fixtures/old_checkpoints/make.py): its checkpoints' folder and its reference.
    The older nbloop comes from git history and runs here, on this machine: float16 matmuls and SGD steps round
    differently on other CPUs (the stored fixtures, written on another machine, end one rounding apart on an Intel
    Xeon with AVX-512 FP16, with the older code itself). Without git history (a source archive): the stored ones."""
    import io, tarfile
    out = tmp_path_factory.mktemp('older')
    try:
        tar = subprocess.run(['git', '-C', str(ROOT), 'archive', OLD_COMMIT, 'nbloop'],
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        print(f'no git history of {OLD_COMMIT} ({e}): resuming the stored checkpoints, written on another machine')
        return OLD, OLD / 'reference.safetensors'
    with tarfile.open(fileobj=io.BytesIO(tar)) as t: t.extractall(out / 'src', filter='data')
    env = dict(os.environ, PYTHONPATH=str(out / 'src'))
    p = subprocess.run([sys.executable, str(OLD / 'make.py'), str(out)], cwd=out, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert Path(p.stdout.split()[-1]) == out / 'src' / 'nbloop', f'make.py ran another nbloop: {p.stdout}'
    return out / 'checkpoints', out / 'reference.safetensors'


@pytest.mark.parametrize('step', [4, 6, 8], ids=['step4-in-epoch0', 'step6-end-of-epoch0', 'step8-in-epoch1'])
def test_a_checkpoint_of_the_older_layout_resumes_to_the_older_uninterrupted_run(step, older_run, tmp_path):
    """The older nbloop (commit 7671fce; see tests/fixtures/old_checkpoints/README.md) ran a fit with mixed precision
    and a grad scaler, accumulation and early stopping, whose states were callbacks' then. Today's code resumes
    its checkpoints of steps 4, 6 and 8, and ends where the older code's uninterrupted run ended: the same weights and
    history, bit for bit."""
    import importlib.util, io, shutil, warnings
    from contextlib import redirect_stdout
    spec = importlib.util.spec_from_file_location('old_checkpoints_make', OLD / 'make.py')
    make = importlib.util.module_from_spec(spec); spec.loader.exec_module(make)   # its recipe, with today's nbloop
    folder, reference = older_run
    found = sorted(folder.glob(f'ckpt-step{step:09d}-*.safetensors'))
    assert len(found) == 1, f'the older run wrote {[p.name for p in found]} at step {step}'
    (tmp_path / 'checkpoints').mkdir()
    path = tmp_path / 'checkpoints' / found[0].name
    shutil.copyfile(found[0], path)
    learn = make.learner(tmp_path)
    with redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        learn.fit(3, resume=path)
    assert learn.resumed_from == path
    assert not [str(w.message) for w in caught if 'starts fresh' in str(w.message)], 'a callback lost its state'
    ref = load_state(reference)
    for k, v in ref['model'].items(): assert torch.equal(v, learn.model.state_dict()[k]), k
    assert [{k: v for k, v in r.items() if k != 'time'} for r in learn.recorder.history] == ref['history']
