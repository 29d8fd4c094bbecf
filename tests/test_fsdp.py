"""Sharded training (`Learner(..., strategy='fsdp')`, FSDP2) under torchrun with 2 CPU processes over gloo.

The job is tests/ddp_job.py with `--strategy fsdp`: a tiny MLP with dropout and a random augmentation, shuffled
data, every rank seeded differently, sharded checkpoints every 4 steps. Runs that are compared bit for bit use the
same job uninterrupted (the `reference` fixture); runs compared with one process use `--plain` (no noise).
"""
import re
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nbloop.ckpt_format import list_checkpoints, load_state
from nbloop.ckpt_sharded import export_weights, shards_folder, verify_shards
from test_ddp import assert_same_run, interrupted_launch, ok, result, single, torchrun, traces

FSDP = ('--strategy', 'fsdp')


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> dict:
    "An uninterrupted 2-process sharded run (noise, differently seeded ranks), with traces and a record of file writes."
    d = tmp_path_factory.mktemp('fsdp-reference')
    ok(torchrun(d / 'run', *FSDP, '--out', d / 'out.pt', '--trace', d / 'trace', '--audit', d))
    return {'dir': d, **result(d / 'out.pt')}


def test_shards_are_shards_and_two_processes_train_like_one_with_the_doubled_batch(tmp_path):
    """Each process holds its rows of every parameter (387 values: 210 + 177, FSDP's chunks), and 2 sharded processes
    with batches of 8 train as 1 plain process with batches of 16: weights allclose, validation metrics equal."""
    ok(torchrun(tmp_path / 'a', *FSDP, '--plain', '--out', tmp_path / 'two.pt'))
    ok(single(tmp_path / 'b', '--plain', '--bs', '16', '--out', tmp_path / 'one.pt'))
    two, one = result(tmp_path / 'two.pt'), result(tmp_path / 'one.pt')
    total = sum(v.numel() for v in one['model'].values())
    assert two['ddp'] == 'FSDPSequential' and two['world_size'] == 2
    assert sum(two['local_numel']) == total and max(two['local_numel']) < 0.6 * total
    for k in one['model']: torch.testing.assert_close(two['model'][k], one['model'][k], rtol=1e-5, atol=1e-6)
    for r2, r1 in zip(two['history'], one['history'], strict=True):
        assert r2['accuracy'] == r1['accuracy'] and r2['valid_loss'] == pytest.approx(r1['valid_loss'], rel=1e-5)


def test_accumulation_and_clipping_under_fsdp_match_one_process(tmp_path):
    """GradientAccumulation(2) (no reduce-scatter until the group's last batch) and GradientClip (the norm over all
    shards), 2 processes with batches of 4 = 1 plain process with batches of 8, both with the same groups."""
    args = ('--plain', '--accum', '2', '--clip', '0.05')
    ok(torchrun(tmp_path / 'a', *FSDP, *args, '--bs', '4', '--out', tmp_path / 'two.pt'))
    ok(single(tmp_path / 'b', *args, '--bs', '8', '--out', tmp_path / 'one.pt'))
    two, one = result(tmp_path / 'two.pt'), result(tmp_path / 'one.pt')
    for k in one['model']: torch.testing.assert_close(two['model'][k], one['model'][k], rtol=1e-5, atol=1e-6)
    # clipping mattered: without it the weights differ
    ok(single(tmp_path / 'c', '--plain', '--accum', '2', '--bs', '8', '--out', tmp_path / 'free.pt'))
    free = result(tmp_path / 'free.pt')
    assert not all(torch.allclose(free['model'][k], one['model'][k], atol=1e-4) for k in one['model'])


def test_every_rank_writes_its_own_shards_and_the_manifest_holds_none(reference):
    """The audit hook: rank 1 writes only its shard files (and no manifest); rank 0 writes its shard files, the
    manifests, best, the logs. No manifest holds a parameter's values; export_weights of one equals the run's
    weights at that point, and save_weights at the end equals the final weights."""
    d = reference['dir']
    writes = {p.name.split('-')[1]: [Path(x) for x in p.read_text().split()] for p in d.glob('writes-rank*')}
    assert set(writes) == {'rank0', 'rank1'}
    # rank 1: only in the folders of shard files being written (a temporary name, renamed to its own file's)
    assert writes['rank1'] and all(re.fullmatch(r'\.nbl-\d+-[0-9a-f]{8}\.tmp', p.parent.name) for p in writes['rank1'])
    assert {p.name for p in writes['rank1'] if not p.name.startswith('.nbl-')} == {'rank00001.safetensors'}
    assert {p.name for p in writes['rank0'] if p.suffix == '.safetensors' and p.parent.suffix != '.shards'} >= {
        'best.safetensors', 'weights.safetensors'}
    folder = d / 'run' / 'checkpoints'
    ckpts = list_checkpoints(folder)
    assert len(ckpts) == 7 and all(sorted(q.name for q in shards_folder(c).iterdir()) ==
                                   ['rank00000.safetensors', 'rank00001.safetensors'] for c in ckpts)
    state = load_state(ckpts[-1])
    assert state['training']['world_size'] == 2 and len(state['ranks']) == 2
    assert all(v.numel() == 0 for v in state['model'].values())               # the values are in the shards only
    assert [t['rows'] for t in state['shards']['tensors'][:1]] == [[[0, 16], [16, 32]]]
    exported = load_file(export_weights(ckpts[-1], d / 'exported.safetensors'))
    assert all(torch.equal(exported[k], reference['model'][k]) for k in reference['model'])   # the last one: the end
    plain = load_file(d / 'run' / 'weights.safetensors')
    assert plain.keys() == reference['model'].keys() and all(torch.equal(plain[k], reference['model'][k]) for k in plain)


def test_sigkill_of_one_rank_then_resume_is_bit_exact_without_unpickling(reference, tmp_path):
    "Rank 1 is SIGKILLed mid-epoch 1; resumed with pickle and torch.load raising, it ends exactly as the uninterrupted run."
    p = torchrun(tmp_path / 'run', *FSDP, '--die', '1:10:kill')
    assert p.returncode != 0
    newest = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1]
    assert '-epoch0001-batch2' in newest.name, newest           # step 8: mid-epoch 1
    ok(torchrun(tmp_path / 'run', *FSDP, '--no-pickle', '--resume', 'last', '--out', tmp_path / 'out.pt'))
    resumed = result(tmp_path / 'out.pt')
    assert resumed['resumed_from'].endswith(newest.name)
    assert_same_run(resumed, reference)


def test_sigterm_to_one_rank_stops_both_and_resumes_bit_exactly(reference, tmp_path):
    "SIGTERM reaches rank 1 only: both stop after the same batch, the sharded checkpoint is written, both exit 143."
    p = torchrun(tmp_path / 'run', *FSDP, '--die', '1:7:term', '--vote-every-batch')
    assert p.returncode != 0
    steps = re.findall(r'stopped by SIGTERM at epoch 1, training step (\d+);', p.stderr)
    assert steps == ['9', '9'], p.stderr[-3000:]
    assert set(re.findall(r'exitcode\s*: (-?\d+) \(pid', p.stderr)) == {'143'}, p.stderr[-3000:]
    newest = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1]
    assert newest.name.startswith('ckpt-step000000009-') and shards_folder(newest).is_dir()
    ok(torchrun(tmp_path / 'run', *FSDP, '--die', '1:7:term', '--resume', 'last', '--out', tmp_path / 'out.pt'))
    assert_same_run(result(tmp_path / 'out.pt'), reference)


def test_a_damaged_shard_is_named_and_skipped(reference, tmp_path):
    """One byte of rank 1's shard of the newest checkpoint is changed: resume='last' names that file and resumes
    from the checkpoint before it, and the run still ends as the uninterrupted one."""
    p = torchrun(tmp_path / 'run', *FSDP, '--die', '1:10:kill')
    assert p.returncode != 0
    older, newest = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-2:]
    shard = shards_folder(newest) / 'rank00001.safetensors'
    data = bytearray(shard.read_bytes()); data[-1] ^= 0xFF; shard.write_bytes(bytes(data))
    r = ok(torchrun(tmp_path / 'run', *FSDP, '--resume', 'last', '--out', tmp_path / 'out.pt'))
    assert f'skipping checkpoint {newest}' in r.stderr and 'rank00001.safetensors fails its checksum' in r.stderr
    resumed = result(tmp_path / 'out.pt')
    assert resumed['resumed_from'].endswith(older.name)
    assert_same_run(resumed, reference)


def test_resharding_two_to_one_and_one_to_two(tmp_path):
    """A 2-process sharded run killed mid-epoch 1 is continued by 1 process, and a 1-process one by 2: each
    process reads the rows it holds now, a warning says the result is not bit-exact, and every sample of the
    interrupted epoch is trained on exactly once."""
    p = torchrun(tmp_path / 'two', *FSDP, '--die', '1:10:kill', '--trace', tmp_path / 't2')
    assert p.returncode != 0
    r = ok(single(tmp_path / 'two', *FSDP, '--resume', 'last', '--trace', tmp_path / 't21', '--out', tmp_path / 'o21.pt'))
    assert 'was written by 2 processes and is resumed by 1' in r.stderr and 'not bit-exact' in r.stderr
    before = [i for rank in (0, 1) for e, step, idx in traces(tmp_path / 't2')[rank] if e == 1 and step < 8 for i in idx]
    after = [i for e, _, idx in traces(tmp_path / 't21')[0] if e == 1 for i in idx]
    assert len(before) == 32 and Counter(before + after) == Counter(range(96))
    assert result(tmp_path / 'o21.pt')['world_size'] == 1 and len(result(tmp_path / 'o21.pt')['history']) == 3

    p = single(tmp_path / 'one', *FSDP, '--die', '0:18:kill', '--trace', tmp_path / 't1')
    assert p.returncode != 0
    r = ok(torchrun(tmp_path / 'one', *FSDP, '--resume', 'last', '--trace', tmp_path / 't12', '--out', tmp_path / 'o12.pt'))
    assert 'was written by 1 process and is resumed by 2' in r.stderr
    newest_step = 16                                                  # every 4 steps: 16 is the last before 18
    before = [i for e, step, idx in traces(tmp_path / 't1')[0] if e == 1 and step < newest_step for i in idx]
    after = [i for rank in (0, 1) for e, _, idx in traces(tmp_path / 't12')[rank] if e == 1 for i in idx]
    assert len(before) == 32 and Counter(before + after) == Counter(range(96))
    out = result(tmp_path / 'o12.pt')
    assert out['world_size'] == 2 and len(out['history']) == 3
    assert all(torch.equal(w, out['weights_by_rank'][0]) for w in out['weights_by_rank'])


def test_lr_find_early_stopping_and_bf16_under_fsdp(tmp_path):
    """lr_find leaves the sharded model as it was (the job checks) and suggests a rate; EarlyStopping restores its
    best epoch's weights; bfloat16 (FSDP's precision policy, set when the model is sharded) trains."""
    p = ok(torchrun(tmp_path / 'a', *FSDP, '--lr-find', '--early-stop', '--epochs', '4', '--out', tmp_path / 'a.pt'))
    a = result(tmp_path / 'a.pt')
    assert a['suggestion'] is not None and a['suggestion'] > 0
    best = min(range(len(a['history'])), key=lambda e: a['history'][e]['valid_loss'])
    assert f'EarlyStopping: restored the weights of epoch {best} ' in p.stdout + p.stderr
    ok(torchrun(tmp_path / 'b', *FSDP, '--precision', 'bf16', '--out', tmp_path / 'b.pt'))
    b = result(tmp_path / 'b.pt')
    assert all(torch.isfinite(v).all() for v in b['model'].values()) and b['model']['0.weight'].dtype == torch.float32
    assert b['history'][-1]['valid_loss'] < b['history'][0]['valid_loss'] * 1.5


def _full(path: Path) -> dict:
    "A sharded checkpoint's state with every tensor whole (its shards read back)."
    from nbloop.ckpt_sharded import fill_shards
    return fill_shards(load_state(path), path)


def test_async_sharded_saves_write_what_synchronous_saves_write(reference, tmp_path):
    """CheckpointCallback(async_save=True) under fsdp: each process writes its shard file in the background (each
    write slowed by 0.3 s, so that training steps go on during it) and the checkpoint is completed at the next save;
    the same checkpoints hold the same states, bit for bit (weights, optimizer state, every process's random
    states), as the synchronous reference's, and the run is the same."""
    p = ok(torchrun(tmp_path / 'run', *FSDP, '--async-save', '--slow-writer', '0.3', '--out', tmp_path / 'out.pt'))
    assert re.search(r'nbloop: 7 checkpoint\(s\) written in the background; training waited', p.stdout + p.stderr)
    assert_same_run(result(tmp_path / 'out.pt'), reference)
    mine, theirs = list_checkpoints(tmp_path / 'run' / 'checkpoints'), list_checkpoints(reference['dir'] / 'run' / 'checkpoints')
    assert [re.sub(r'-run[0-9a-f]{8}', '', p.name) for p in mine] == [re.sub(r'-run[0-9a-f]{8}', '', p.name) for p in theirs]
    for a, b in zip(mine, theirs):
        sa, sb = _full(a), _full(b)
        assert all(torch.equal(sa['model'][k], sb['model'][k]) for k in sb['model']), a.name
        assert all(torch.equal(sa['opt']['state'][i][k], v) for i, s in sb['opt']['state'].items() for k, v in s.items()), a.name
        assert all(torch.equal(x['rng']['torch'], y['rng']['torch']) for x, y in zip(sa['ranks'], sb['ranks'])), a.name


def test_sigkill_while_an_async_write_is_pending_resumes_from_the_complete_one(reference, tmp_path):
    """Rank 1 is SIGKILLed at step 10: the step-8 checkpoint's shard files may be written, but it was never completed
    (that happens at the next save), so it is invisible, and the run resumes from step 6 and ends bit-exactly."""
    p = torchrun(tmp_path / 'run', *FSDP, '--async-save', '--die', '1:10:kill')
    assert p.returncode != 0
    folder = tmp_path / 'run' / 'checkpoints'
    newest = list_checkpoints(folder)[-1]
    assert newest.name.endswith('-epoch0000-end.safetensors') and '-step000000006-' in newest.name, newest
    assert not any('-step000000008-' in q.name for q in folder.iterdir() if not q.name.startswith('.nbl-'))
    ok(torchrun(tmp_path / 'run', *FSDP, '--async-save', '--resume', 'last', '--out', tmp_path / 'out.pt'))
    assert_same_run(result(tmp_path / 'out.pt'), reference)


def test_elastic_restart_after_a_worker_dies_under_fsdp(reference, tmp_path):
    "torchrun --max-restarts=1: rank 1 exits with os._exit(1) at step 10; the group restarts from the newest sharded checkpoint."
    ok(torchrun(tmp_path / 'run', *FSDP, '--die', '1:10:exit', '--resume', 'last', '--out', tmp_path / 'out.pt',
                extra=['--max-restarts=1']))
    resumed = result(tmp_path / 'out.pt')
    assert resumed['resumed_from'].endswith('-epoch0001-batch2.safetensors')
    assert_same_run(resumed, reference)


def test_resharding_two_to_three(tmp_path):
    """A 2-process sharded run killed mid-epoch 1, continued by 3 processes: each reads its rows (a third of each
    tensor, from one or both shard files), and every sample of the interrupted epoch is trained on exactly once."""
    p = torchrun(tmp_path / 'run', *FSDP, '--die', '1:10:kill', '--trace', tmp_path / 't2')
    assert p.returncode != 0
    r = ok(torchrun(tmp_path / 'run', *FSDP, '--resume', 'last', '--trace', tmp_path / 't3', '--out', tmp_path / 'o.pt',
                    nproc=3))
    assert 'was written by 2 processes and is resumed by 3' in r.stderr
    before = [i for rank in (0, 1) for e, step, idx in traces(tmp_path / 't2')[rank] if e == 1 and step < 8 for i in idx]
    after = [i for rank in (0, 1, 2) for e, _, idx in traces(tmp_path / 't3')[rank] if e == 1 for i in idx]
    extra = Counter(before + after) - Counter(range(96))              # 64 left for 3: padded to 66, 2 repeated
    assert len(before) == 32 and set(before + after) == set(range(96)) and sum(extra.values()) <= 2
    assert not set(extra) & set(before)                               # what was trained before is not trained again
    out = result(tmp_path / 'o.pt')
    assert out['world_size'] == 3 and len(out['local_numel']) == 3 and len(out['history']) == 3
    assert all(torch.equal(w, out['weights_by_rank'][0]) for w in out['weights_by_rank'])


def test_ctrl_c_on_launch_stops_both_and_writes_a_sharded_interrupt_checkpoint(tmp_path):
    """SIGINT to the script that called launch: both sharded processes stop after the same batch, rank 0 says it
    saved once, and the interrupt checkpoint is complete: a manifest with both processes' parts and both shard files."""
    p, out, err = interrupted_launch(tmp_path, signal.SIGINT, *FSDP)
    assert p.returncode != 0 and 'KeyboardInterrupt' in err, err[-3000:]
    assert len([line for line in err.splitlines() if 'SIGINT received; saved checkpoint' in line]) == 1, err[-3000:]
    newest = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1]
    state = load_state(newest)
    assert len(state['ranks']) == 2 and len(state['shards']['files']) == 2
    verify_shards(state, newest)
    t = traces(tmp_path / 't')
    assert len(t[0]) == len(t[1]) and state['training']['train_iter'] == len(t[0])
