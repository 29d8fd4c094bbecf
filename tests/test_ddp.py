"""DistributedDataParallel on these machines: torchrun (and `launch`) with 2 CPU processes over gloo.

Every job is tests/ddp_job.py: a tiny MLP with dropout and a random augmentation, shuffled data, every rank
seeded differently, checkpoints every 4 steps. Each run is bounded in time and its whole process group is
killed on the way out.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file

from conftest import ROOT, env_for_subprocess, run
from nbloop.ckpt_format import list_checkpoints, load_state

JOB = ROOT / 'tests' / 'ddp_job.py'
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run']
STEPS_PER_EPOCH = 96 // 2 // 8        # the default job: 96 samples, 2 processes, batches of 8


def torchrun(root: Path, *args, nproc: int = 2, extra=(), timeout: float = 180) -> subprocess.CompletedProcess:
    return run([*TORCHRUN, '--standalone', f'--nproc_per_node={nproc}', *extra, JOB, '--root', root, *args], timeout)


def single(root: Path, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    "The job as one plain process."
    return run([sys.executable, JOB, '--root', root, *args], timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f'exit status {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}'
    return p


def result(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def assert_same_run(a: dict, b: dict) -> None:
    "Bit-exact: the same weights, history, predictions, and identical weights on every rank."
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    assert a['history'] == b['history']
    assert torch.equal(a['preds'], b['preds']) and torch.equal(a['targs'], b['targs'])
    for r in (a, b): assert all(torch.equal(w, r['weights_by_rank'][0]) for w in r['weights_by_rank'])


def traces(folder: Path) -> dict[int, list]:
    "rank -> [(epoch, steps done before the batch, indices)] from the job's --trace files."
    return {int(p.name[len('trace-rank'):]): [tuple(json.loads(line)) for line in p.read_text().splitlines()]
            for p in folder.glob('trace-rank*')}


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> dict:
    "An uninterrupted 2-process run (noise, differently seeded ranks), with traces and a record of file writes."
    d = tmp_path_factory.mktemp('reference')
    ok(torchrun(d / 'run', '--out', d / 'out.pt', '--trace', d / 'trace', '--audit', d))
    return {'dir': d, **result(d / 'out.pt')}


def test_two_processes_train_like_one_with_the_doubled_batch(tmp_path):
    """2 processes with batches of 8 = 1 process with batches of 16, both with fit_one_cycle (whose schedule must
    count each process's batches): weights allclose, validation metrics equal."""
    ok(torchrun(tmp_path / 'a', '--plain', '--one-cycle', '0.05', '--out', tmp_path / 'two.pt'))
    ok(single(tmp_path / 'b', '--plain', '--one-cycle', '0.05', '--bs', '16', '--out', tmp_path / 'one.pt'))
    two = result(tmp_path / 'two.pt')
    one = result(tmp_path / 'one.pt')
    assert two['ddp'] == 'DistributedDataParallel' and two['world_size'] == 2 and one['world_size'] == 1
    for k in one['model']: torch.testing.assert_close(two['model'][k], one['model'][k], rtol=1e-5, atol=1e-6)
    for r2, r1 in zip(two['history'], one['history'], strict=True):
        assert r2['accuracy'] == r1['accuracy']
        for k in ('train_loss', 'valid_loss'): assert r2[k] == pytest.approx(r1[k], rel=1e-5)
    assert torch.equal(two['targs'], one['targs'])            # get_preds gathers in the epoch's order
    torch.testing.assert_close(two['preds'], one['preds'], rtol=1e-5, atol=1e-5)


def test_ranks_agree_on_the_order_and_split_it(reference):
    "Differently seeded ranks train on one order per epoch, each half of it, the same number of batches."
    t = traces(reference['dir'] / 'trace')
    assert len(t[0]) == len(t[1]) == 3 * STEPS_PER_EPOCH
    for epoch in range(3):
        seen = [i for r in (0, 1) for e, _, idx in t[r] if e == epoch for i in idx]
        assert sorted(seen) == list(range(96))
    assert t[0][0][2] != t[1][0][2]
    assert all(torch.equal(w, reference['weights_by_rank'][0]) for w in reference['weights_by_rank'])


def test_only_rank_0_writes(reference):
    d = reference['dir']
    writes = {p.name.split('-')[1]: p.read_text().split() for p in d.glob('writes-rank*')}
    assert set(writes) == {'rank0', 'rank1'}
    assert writes['rank1'] == []
    names = {Path(p).name for p in writes['rank0']}
    assert 'history.csv' in names and 'best.safetensors' in names and 'weights.safetensors' in names
    plain = load_file(d / 'run' / 'weights.safetensors')          # learn.save_weights: the plain keys, no 'module.'
    assert plain.keys() == reference['model'].keys() and all(torch.equal(plain[k], reference['model'][k]) for k in plain)
    assert sum(n.startswith('ckpt-') for n in names) == len(list_checkpoints(d / 'run' / 'checkpoints')) == 7
    state = load_state(list_checkpoints(d / 'run' / 'checkpoints')[0])
    assert state['training']['world_size'] == 2 and len(state['ranks']) == 2
    assert not torch.equal(state['ranks'][0]['rng']['torch'], state['ranks'][1]['rng']['torch'])


def test_sigkill_of_one_rank_then_resume_is_bit_exact(reference, tmp_path):
    "Rank 1 is SIGKILLed mid-epoch 1; a new torchrun with resume='last' ends exactly as the uninterrupted run."
    p = torchrun(tmp_path / 'run', '--die', '1:10:kill')
    assert p.returncode != 0
    newest = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1]
    assert '-epoch0001-batch2' in newest.name, newest           # step 8: mid-epoch 1
    ok(torchrun(tmp_path / 'run', '--resume', 'last', '--out', tmp_path / 'out.pt'))
    resumed = result(tmp_path / 'out.pt')
    assert resumed['resumed_from'].endswith(newest.name)
    assert_same_run(resumed, reference)


def test_async_saves_under_ddp_write_what_synchronous_saves_write(reference, tmp_path):
    """CheckpointCallback(async_save=True) with 2 processes: every rank sends its part, rank 0 writes in the
    background; the same files hold the same states as the reference run's synchronous saves, and the run is the same."""
    ok(torchrun(tmp_path / 'run', '--async-save', '--out', tmp_path / 'out.pt'))
    assert_same_run(result(tmp_path / 'out.pt'), reference)
    mine, theirs = list_checkpoints(tmp_path / 'run' / 'checkpoints'), list_checkpoints(reference['dir'] / 'run' / 'checkpoints')
    assert [re.sub(r'-run[0-9a-f]{8}', '', p.name) for p in mine] == [re.sub(r'-run[0-9a-f]{8}', '', p.name) for p in theirs]
    for a, b in zip(mine, theirs):
        sa, sb = load_state(a), load_state(b)
        assert all(torch.equal(sa['model'][k], sb['model'][k]) for k in sb['model']) and len(sa['ranks']) == 2, a.name
        assert all(torch.equal(x['rng']['torch'], y['rng']['torch']) for x, y in zip(sa['ranks'], sb['ranks'])), a.name


@pytest.mark.parametrize('every_batch', [True, False], ids=['vote-every-batch', 'adaptive-vote'])
def test_sigterm_to_one_rank_stops_all_at_one_boundary(reference, tmp_path, every_batch):
    """SIGTERM reaches rank 1 only: both stop after the same batch, the checkpoint is written, both exit 143, and
    the resumed run ends bit-exactly. Voting after every batch, they stop one batch after the signal (step 9); with
    the adaptive period (tiny batches: a vote every few dozen), at the end of the epoch's training at the latest."""
    vote = ['--vote-every-batch'] if every_batch else []
    p = torchrun(tmp_path / 'run', '--die', '1:7:term', *vote)
    assert p.returncode != 0
    steps = re.findall(r'stopped by SIGTERM at epoch 1, training step (\d+);', p.stderr)
    assert len(steps) == 2 and steps[0] == steps[1], p.stderr[-3000:]
    step = int(steps[0])
    assert step == 9 if every_batch else 8 <= step <= 12
    assert len(set(re.findall(r'exitcode\s*: -?\d+ \(pid: (\d+)\)', p.stderr))) == 2, p.stderr[-3000:]
    assert set(re.findall(r'exitcode\s*: (-?\d+) \(pid', p.stderr)) == {'143'}, p.stderr[-3000:]
    newest = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1]
    assert newest.name.startswith(f'ckpt-step{step:09d}-') and newest.name.endswith(f'-epoch0001-batch{step - 6}.safetensors')
    assert len(load_state(newest)['ranks']) == 2
    ok(torchrun(tmp_path / 'run', '--die', '1:7:term', '--resume', 'last', '--out', tmp_path / 'out.pt'))
    assert_same_run(result(tmp_path / 'out.pt'), reference)


def test_elastic_restart_after_a_worker_dies(reference, tmp_path):
    "torchrun --max-restarts=1: rank 1 exits with os._exit(1) at step 10; the group restarts from the newest checkpoint."
    p = ok(torchrun(tmp_path / 'run', '--die', '1:10:exit', '--resume', 'last', '--out', tmp_path / 'out.pt',
                    extra=['--max-restarts=1']))
    assert 'restart' in p.stderr.lower() or 'Worker group FAILED' in p.stderr or 'failed' in p.stderr.lower()
    resumed = result(tmp_path / 'out.pt')
    assert resumed['resumed_from'].endswith('-epoch0001-batch2.safetensors')
    assert_same_run(resumed, reference)


def test_two_process_checkpoint_resumed_by_one(tmp_path):
    "One process continues a 2-process run: no sample skipped or repeated in the epoch, and a warning."
    p = torchrun(tmp_path / 'run', '--die', '1:10:kill', '--trace', tmp_path / 'two')
    assert p.returncode != 0
    r = ok(single(tmp_path / 'run', '--resume', 'last', '--trace', tmp_path / 'one', '--out', tmp_path / 'out.pt'))
    assert 'was written by 2 processes and is resumed by 1' in r.stderr and 'not bit-exact' in r.stderr
    two, one = traces(tmp_path / 'two'), traces(tmp_path / 'one')[0]
    before = [i for rank in (0, 1) for e, step, idx in two[rank] if e == 1 and step < 8 for i in idx]
    after = [i for e, _, idx in one if e == 1 for i in idx]
    assert len(before) == 32 and Counter(before + after) == Counter(range(96))
    assert sorted(i for e, _, idx in one if e == 2 for i in idx) == list(range(96))
    out = result(tmp_path / 'out.pt')
    assert out['world_size'] == 1 and len(out['history']) == 3
    # schedules follow the fraction done: 8 of 18 steps done, continued in a run of 36 steps of 8 samples
    assert out['train_iter'] == 16 + (96 - 32) // 8 + 12


def test_uneven_sizes(tmp_path):
    "91 training samples (padded to 92: 46 per rank, equal batch counts), 33 validation samples (17 + 16, exact)."
    ok(torchrun(tmp_path / 'run', '--n-train', '91', '--n-valid', '33', '--epochs', '2', '--trace', tmp_path / 't',
                '--out', tmp_path / 'out.pt'))
    t = traces(tmp_path / 't')
    assert len(t[0]) == len(t[1]) == 2 * 6
    first = [i for r in (0, 1) for e, _, idx in t[r] if e == 0 for i in idx]
    assert len(first) == 92 and set(first) == set(range(91))
    out = result(tmp_path / 'out.pt')
    assert out['preds'].shape[0] == 33 and out['targs'].shape[0] == 33
    # the same weights validated by one process: the same metrics and predictions
    sys.path.insert(0, str(ROOT / 'tests'))
    import ddp_job
    from nbloop.learner import Learner
    from nbloop.metrics import accuracy
    from torch.utils.data import DataLoader
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))
    model.load_state_dict(out['model'])
    valid = DataLoader(ddp_job.NoisyData(33, 2, False), batch_size=16)
    learn = Learner(model, valid, valid, metrics=[accuracy], device='cpu', path=tmp_path)
    values = learn.validate()
    assert values['accuracy'] == out['validate']['accuracy'] == out['history'][-1]['accuracy']
    assert values['valid_loss'] == pytest.approx(out['validate']['valid_loss'], rel=1e-6)
    preds, targs = learn.get_preds()
    assert torch.equal(targs, out['targs'])
    torch.testing.assert_close(preds, out['preds'])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost(reference, tmp_path):
    "Two torchrun launchers, one process each, meet through the c10d rendezvous: the same run as one launcher of 2."
    port = _free_port()
    cmd = [*TORCHRUN, '--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{port}',
           '--rdzv-id=nbloop-two-nodes', JOB, '--root', tmp_path / 'run', '--out', tmp_path / 'out.pt']
    procs = [subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env_for_subprocess(), start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            try: os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError: pass
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_same_run(result(tmp_path / 'out.pt'), reference)


def test_launch_from_a_script(reference, tmp_path):
    "launch(fn, 2) from a plain script: torchrun's environment, the same run, rank 0's return value."
    p = ok(run([sys.executable, ROOT / 'tests' / 'ddp_launch.py', '--root', tmp_path / 'run', '--out', tmp_path / 'out.pt']))
    returned = json.loads(p.stdout.split('RESULT ', 1)[1])
    assert returned['world_size'] == 2 and returned['train_iter'] == 3 * STEPS_PER_EPOCH
    out = result(tmp_path / 'out.pt')
    assert returned['history'] == out['history']
    assert_same_run(out, reference)


def test_gradient_accumulation_skips_the_all_reduce(tmp_path):
    """Accumulating 2 batches under DDP: only stepping batches all-reduce (12 of 21 per run: groups 2, 2, 2, 1 in
    7 batches per epoch), and the weights match one process with the doubled batch."""
    ok(torchrun(tmp_path / 'a', '--plain', '--n-train', '112', '--accum', '2', '--count-allreduce', '--out', tmp_path / 'two.pt'))
    ok(single(tmp_path / 'b', '--plain', '--n-train', '112', '--bs', '16', '--accum', '2', '--out', tmp_path / 'one.pt'))
    two, one = result(tmp_path / 'two.pt'), result(tmp_path / 'one.pt')
    assert two['train_iter'] == 21 and two['allreduces'] == 12
    for k in one['model']: torch.testing.assert_close(two['model'][k], one['model'][k], rtol=1e-5, atol=1e-6)


def test_fp16_overflow_and_resume_under_ddp(tmp_path):
    "float16 on CPU with a forced overflow at step 3: both ranks skip that step, halve the scale, and resume bit-exactly."
    args = ['--precision', 'fp16', '--overflow-at', '3']
    ok(torchrun(tmp_path / 'ref', *args, '--out', tmp_path / 'ref.pt'))
    ref = result(tmp_path / 'ref.pt')
    assert ref['scale'] == 2.0 ** 15                          # 2**16, halved once
    assert all(torch.isfinite(w).all() for w in ref['weights_by_rank'])
    assert torchrun(tmp_path / 'run', *args, '--die', '0:10:kill').returncode != 0
    ok(torchrun(tmp_path / 'run', *args, '--resume', 'last', '--out', tmp_path / 'out.pt'))
    assert_same_run(result(tmp_path / 'out.pt'), ref)


def test_bf16_trains_under_ddp(tmp_path):
    ok(torchrun(tmp_path / 'run', '--precision', 'bf16', '--plain', '--out', tmp_path / 'out.pt'))
    out = result(tmp_path / 'out.pt')
    losses = [row['train_loss'] for row in out['history']]
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    assert all(torch.equal(w, out['weights_by_rank'][0]) for w in out['weights_by_rank'])


def test_compile_under_ddp(tmp_path):
    "compile=True wraps DDP in torch.compile: the same training as without, checkpoints with plain keys."
    ok(torchrun(tmp_path / 'c', '--plain', '--epochs', '1', '--compile', '--out', tmp_path / 'c.pt'), )
    ok(torchrun(tmp_path / 'p', '--plain', '--epochs', '1', '--out', tmp_path / 'p.pt'))
    c, p = result(tmp_path / 'c.pt'), result(tmp_path / 'p.pt')
    assert c['ddp'] == 'OptimizedModule'
    for k in p['model']: torch.testing.assert_close(c['model'][k], p['model'][k], rtol=1e-4, atol=1e-5)
    keys = load_state(list_checkpoints(tmp_path / 'c' / 'checkpoints')[-1])['model'].keys()
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in keys)


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    "TerminateOnNaN sees a NaN loss on rank 1 only: both ranks leave the fit at the same batch boundary, none hangs."
    p = ok(torchrun(tmp_path / 'run', '--nan-at', '1:7', '--out', tmp_path / 'out.pt', timeout=120))
    out = result(tmp_path / 'out.pt')
    assert 8 <= out['train_iter'] <= 12 and len(out['history']) == 1    # flagged in step 8 (epoch 1), agreed by its end
    assert p.stderr.count('UserWarning: TerminateOnNaN: the training loss became NaN') == 1
    assert all(torch.equal(w, out['weights_by_rank'][0]) for w in out['weights_by_rank'])


def test_lr_find_under_ddp(tmp_path):
    "lr_find decides on the loss averaged over the processes, so all stop together; the model is left as it was."
    ok(torchrun(tmp_path / 'run', '--lr-find', '--epochs', '1', '--out', tmp_path / 'out.pt', timeout=120))
    out = result(tmp_path / 'out.pt')
    assert out['suggestion'] is not None and out['suggestion'] > 0
    assert all(torch.equal(w, out['weights_by_rank'][0]) for w in out['weights_by_rank'])


def interrupted_launch(tmp_path: Path, sig: int, *args) -> tuple[subprocess.Popen, str, str]:
    """tests/ddp_launch.py (the job in 2 processes by `launch`, 200 epochs, traced into tmp_path/t, `args` added),
    sent `sig` once rank 1 has run 8 batches; returns the finished process, its stdout and its stderr."""
    cmd = [sys.executable, ROOT / 'tests' / 'ddp_launch.py', '--root', tmp_path / 'run', '--epochs', '200',
           '--trace', tmp_path / 't', *args]
    p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env_for_subprocess(), start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / 't' / 'trace-rank1').exists() or len((tmp_path / 't' / 'trace-rank1').read_text().splitlines()) < 8:
            assert time.monotonic() < deadline and p.poll() is None, 'the launched processes did not start training'
            time.sleep(0.2)
        os.kill(p.pid, sig)
        out, err = p.communicate(timeout=120)
    finally:
        try: os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError: pass
    return p, out, err


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_ctrl_c_on_launch_stops_every_process(tmp_path, sig):
    """SIGINT to the process that called launch (a notebook's stop button): it passes one SIGINT to each process;
    they stop at one batch boundary, write the interrupt checkpoint and exit, and launch raises KeyboardInterrupt.
    SIGTERM (kill PID, docker stop) is passed on the same way, and then ends the caller (exit -15): before, the
    caller died at once and the processes with it, without a checkpoint."""
    p, out, err = interrupted_launch(tmp_path, sig)
    if sig == signal.SIGINT: assert p.returncode != 0 and 'KeyboardInterrupt' in err, err[-3000:]
    else: assert p.returncode == -signal.SIGTERM, (p.returncode, err[-3000:])
    stops = [line for line in err.splitlines() if f'{sig.name} received; saved checkpoint' in line]
    assert len(stops) == 1, err[-3000:]                     # rank 0 wrote it, once
    newest = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1]
    assert len(load_state(newest)['ranks']) == 2
    t = traces(tmp_path / 't')
    assert len(t[0]) == len(t[1])                           # both stopped after the same batch
