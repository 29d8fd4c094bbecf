"""CUDA checks: bit-exact resume on the GPU in fp32, bf16 and fp16; no host sync in steady-state batches;
checkpoints that move between GPU and CPU.

Run them on a machine with a CUDA GPU: `make gpu-check` (in the project's .venv), or `bash tools/gpu_check.sh`
where nothing can be installed. Without CUDA every test here is skipped. Only nbloop's public API is used.
"""
import os

# deterministic cuBLAS needs this before CUDA initialises (tools/gpu_check.sh and `make gpu-check` export it too)
os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')

import contextlib
import functools
import inspect
import random
import signal
import traceback
import warnings

import numpy as np
import pytest
import torch

from nbloop.all import *

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason='needs a CUDA GPU: run `make gpu-check` or `bash tools/gpu_check.sh` on one')]

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
DEVICE = 'cuda'


def seed_all(seed: int) -> None:
    random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)   # torch.manual_seed seeds every GPU too


def cnn() -> nn.Module:
    "A small CNN for the 8x8 digits; dropout makes the CUDA generator part of what a resume must restore."
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 4 * 4, 10))


def digits_learner(path, precision='fp32', cbs=(), seed=0, device=None, batch_size=64, **kwargs) -> Learner:
    "A Learner on the bundled digits with `cnn()`, its weights drawn from `seed`, in `precision`, on `device` (DEVICE)."
    seed_all(seed)
    train, valid = load_digits(batch_size=batch_size)
    mp = [MixedPrecision(PRECISIONS[precision])] if PRECISIONS[precision] is not None else []
    kwargs.setdefault('metrics', [accuracy])
    return Learner(cnn(), train, valid, cbs=[*mp, *cbs], device=device or DEVICE, path=path, **kwargs)


def on_cpu(obj):
    "A copy of a nested state with every tensor detached, cloned and on the CPU."
    if isinstance(obj, torch.Tensor): return obj.detach().cpu().clone()
    if isinstance(obj, dict): return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)): return type(obj)(on_cpu(v) for v in obj)
    return obj


def assert_same(got, ref, where: str = 'state') -> None:
    "Bit-exact equality of nested states (tensors compared with torch.equal after moving to the CPU)."
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor), f'{where}: expected a tensor, got {type(got).__name__}'
        got, ref = got.detach().cpu(), ref.detach().cpu()
        assert got.dtype == ref.dtype and got.shape == ref.shape, \
            f'{where}: {got.dtype} {tuple(got.shape)} vs {ref.dtype} {tuple(ref.shape)}'
        assert torch.equal(got, ref), f'{where} differs (max abs difference {(got.double() - ref.double()).abs().max()})'
    elif isinstance(ref, dict):
        assert set(got) == set(ref), f'{where}: keys {sorted(map(str, got))} vs {sorted(map(str, ref))}'
        for k in ref: assert_same(got[k], ref[k], f'{where}/{k}')
    elif isinstance(ref, (list, tuple)):
        assert len(got) == len(ref), f'{where}: {len(got)} items vs {len(ref)}'
        for i, (g, r) in enumerate(zip(got, ref)): assert_same(g, r, f'{where}/{i}')
    else: assert got == ref, f'{where}: {got!r} vs {ref!r}'


def outcome(learn: Learner) -> dict:
    "What an exact resume must reproduce: weights, optimizer state, grad scaler, history (without time), losses."
    mp = learn.get_cb(MixedPrecision)
    scaler = getattr(mp, 'scaler', None)
    return {'model': on_cpu(learn.model.state_dict()), 'opt': on_cpu(learn.opt.state_dict()['state']),
            'scaler': None if scaler is None else dict(scaler.state_dict()),
            'history': [{k: v for k, v in row.items() if k != 'time'} for row in learn.recorder.history],
            'losses': list(learn.recorder.losses), 'lrs': list(learn.recorder.lrs)}


@pytest.fixture
def deterministic():
    "torch.use_deterministic_algorithms(True) (and deterministic cuDNN) for one test, then as before."
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try: yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


# -- bit-exact resume ---------------------------------------------------------------------------------------------
class StopAt(Callback):
    "After training step `step`: raise an error (a crash: no interrupt checkpoint) or send this process SIGINT."
    order = 100                     # after CheckpointCallback, so a checkpoint due at this step is written first

    def __init__(self, step: int, how: str): self.step, self.how, self.fired = step, how, False

    def after_batch(self, learn):
        if not learn.training or learn.train_iter != self.step or self.fired: return
        self.fired = True
        if self.how == 'crash': raise RuntimeError(f'simulated crash after training step {self.step}')
        os.kill(os.getpid(), signal.SIGINT)          # as Ctrl-C: the learner stops at the batch boundary


class CountTrainBatches(Callback):
    "How many training batches this fit ran."
    order = 0
    def before_fit(self, learn): self.n = 0
    def after_batch(self, learn):
        if learn.training: self.n += 1


@pytest.mark.timeout(180)
@pytest.mark.parametrize('how', ['crash', 'sigint'])
@pytest.mark.parametrize('precision', list(PRECISIONS))
def test_resume_on_cuda_is_bit_exact(tmp_path, deterministic, precision, how):
    "Two epochs uninterrupted vs interrupted mid-epoch and resumed with resume='last' in a fresh Learner."
    every = 4
    ref_learn = digits_learner(tmp_path / 'ref', precision)
    ref_learn.fit(2)
    ref = outcome(ref_learn)
    n = len(ref_learn.train_dl)
    assert len(ref['losses']) == 2 * n and len(ref['history']) == 2

    # a crash in epoch 1 resumes from the newest every-4-steps checkpoint; SIGINT in epoch 0 writes its own at step 13
    step = n + 10 if how == 'crash' else 13
    resume_step = step - step % every if how == 'crash' else step
    assert 0 < resume_step < 2 * n and (how != 'crash' or resume_step > n), 'the scenario must stop mid-epoch'
    stopper = StopAt(step, how)
    first = digits_learner(tmp_path / 'run', precision, cbs=[CheckpointCallback(every_n_steps=every), stopper])
    with pytest.raises(BaseException) as info: first.fit(2)
    assert stopper.fired, f'fit ended before training step {step}: {info.value!r}'
    if how == 'crash': assert 'simulated crash' in repr(info.value) + repr(info.value.__cause__), repr(info.value)
    else: assert isinstance(info.value, KeyboardInterrupt), f'SIGINT should end fit with KeyboardInterrupt: {info.value!r}'
    del first

    counter = CountTrainBatches()
    second = digits_learner(tmp_path / 'run', precision, cbs=[CheckpointCallback(every_n_steps=every), counter], seed=1)
    second.fit(2, resume='last')
    assert counter.n == 2 * n - resume_step, \
        f'the resumed fit ran {counter.n} training batches; resuming after step {resume_step} of {2 * n} should run ' \
        f'{2 * n - resume_step} (it resumed from {second.resumed_from})'
    got = outcome(second)
    assert_same(got['model'], ref['model'], 'weights')
    assert_same(got['opt'], ref['opt'], 'optimizer state')
    assert got['history'] == ref['history']
    assert got['losses'] == ref['losses'] and got['lrs'] == ref['lrs']
    assert got['scaler'] == ref['scaler'], f"the grad scaler's state differs from the uninterrupted run's: " \
                                           f"{got['scaler']} vs {ref['scaler']}"


# -- no host syncs in steady-state batches --------------------------------------------------------------------------
class SyncWatch(Callback):
    """Turn on `torch.cuda.set_sync_debug_mode('warn')` from the start of batch `first` of `phase` ('train' or
    'valid') until the start of its last-but-`gap` batch: everything the loop and the callbacks do in between (the
    batches themselves and the steps between them) is watched. Progress bars refresh on the last batch, outside."""
    order = -10_000                 # its before_batch runs before every other handler

    def __init__(self, phase: str, first: int = 3, gap: int = 2):
        self.phase, self.first, self.gap = phase, first, gap
        self.on = False
        self.watched = 0            # batches watched from start to end

    def before_batch(self, learn):
        if learn.training != (self.phase == 'train'): return
        if learn.iter == self.first: self._set(True)
        elif self.on and learn.iter >= learn.n_iter - self.gap + 1: self._set(False)
        if self.on: self.watched += 1

    def _set(self, on: bool) -> None:
        torch.cuda.set_sync_debug_mode('warn' if on else 'default')
        self.on = on

    def after_train(self, learn):
        if self.on: self._set(False)
    def after_validate(self, learn):
        if self.on: self._set(False)
    def after_fit(self, learn):
        if self.on: self._set(False)


@contextlib.contextmanager
def recorded_syncs():
    "Collect the syncs that torch's sync debug mode reports, each as its message and the Python stack that made it."
    found = []
    def show(message, category, filename, lineno, file=None, line=None):
        # the first time the mode is switched on, torch warns that it is a prototype: that notice is no sync
        if 'synchroniz' in str(message) and 'is a prototype feature' not in str(message):
            stack = [f for f in traceback.extract_stack()[:-1] if 'warnings.py' not in f.filename]
            found.append((str(message), ''.join(traceback.format_list(stack[-8:]))))
    with warnings.catch_warnings():
        warnings.simplefilter('always')
        warnings.showwarning = show          # catch_warnings puts the original back
        try: yield found
        finally: torch.cuda.set_sync_debug_mode('default')


def describe_syncs(found) -> str:
    return '\n'.join(f'--- {msg}\n{stack}' for msg, stack in found[:5]) + (f'\n... {len(found) - 5} more' if len(found) > 5 else '')


def watched_fit(tmp_path, precision: str, animated: bool, monkeypatch, opt_func=torch.optim.AdamW):
    "One epoch on the digits (batch 16: 90 training and 12 validation batches) with the default callbacks."
    if animated:   # draw fastprogress bars as in a terminal (pytest's captured stdout is no TTY)
        monkeypatch.setattr(ProgressCallback, 'animated', staticmethod(lambda: True))
    watch_train, watch_valid = SyncWatch('train'), SyncWatch('valid')
    learn = digits_learner(tmp_path, precision, batch_size=16, opt_func=opt_func,
                           metrics=[accuracy, top5_accuracy, MatthewsCorrCoef(), Perplexity()],
                           cbs=[watch_train, watch_valid])
    bar = learn.get_cb(ProgressCallback)
    assert bar is not None, 'the default callbacks should include ProgressCallback'
    bar.refresh_every = 1e9       # refresh only on each phase's last batch (the default refreshes every 0.2 s)
    with recorded_syncs() as found: learn.fit(1)
    assert watch_train.watched >= 80 and watch_valid.watched >= 8, (watch_train.watched, watch_valid.watched)
    assert len(learn.recorder.history) == 1
    return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize('precision,animated', [('fp32', False), ('fp32', True), ('bf16', True)])
def test_no_host_sync_in_steady_state_batches(tmp_path, monkeypatch, precision, animated):
    found = watched_fit(tmp_path, precision, animated, monkeypatch)
    assert not found, f'{len(found)} host sync(s) in steady-state batches ({precision}, bar animated={animated}):\n' \
                      + describe_syncs(found)


@pytest.mark.timeout(120)
def test_no_host_sync_with_fp16_and_a_fused_optimizer(tmp_path, monkeypatch):
    "fp16's grad scaler needs no sync when the optimizer takes the scale itself (fused AdamW)."
    found = watched_fit(tmp_path, 'fp16', True, monkeypatch, functools.partial(torch.optim.AdamW, fused=True))
    assert not found, f'{len(found)} host sync(s) in steady-state fp16 batches with fused AdamW:\n' + describe_syncs(found)


@pytest.mark.timeout(120)
def test_fp16_with_the_default_optimizer_syncs_only_in_the_grad_scaler(tmp_path, monkeypatch):
    """With a foreach AdamW (the default), GradScaler.step reads `found_inf` with .item() every step: PyTorch's
    sync, not nbloop's. Every sync seen must come from there."""
    found = watched_fit(tmp_path, 'fp16', True, monkeypatch)
    elsewhere = [(m, s) for m, s in found if 'grad_scaler.py' not in s]
    assert not elsewhere, f'{len(elsewhere)} host sync(s) outside torch.amp.GradScaler:\n' + describe_syncs(elsewhere)
    print(f'fp16 + foreach AdamW: {len(found)} sync(s) in GradScaler over the watched batches')


class SpinAt(Callback):
    "At training batch `first`, queue a long GPU spin; at batch `first + k`, note whether the GPU is still spinning."
    order = -10_000

    def __init__(self, first: int = 3, k: int = 5, cycles: int = 2_000_000_000):
        self.first, self.k, self.cycles = first, k, cycles
        self.busy = None

    def before_batch(self, learn):
        if not learn.training or learn.epoch: return
        if learn.iter == self.first:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
            torch.cuda._sleep(self.cycles)
            self.end.record()
        elif learn.iter == self.first + self.k:
            self.busy = not self.end.query()       # a query, not a sync


@pytest.mark.timeout(120)
def test_host_runs_ahead_of_the_gpu(tmp_path):
    """The loop queues work and moves on: with a ~1 s kernel queued at one training batch, the host gets 5 batches
    further (data on the GPU, default callbacks) before that kernel ends. Any wait for the GPU, including ones the
    sync debug mode does not report, would make the host wait for the spin."""
    g = torch.Generator(device='cuda').manual_seed(0)
    x = torch.randn(2048, 32, device='cuda', generator=g)
    y = torch.randint(0, 10, (2048,), device='cuda', generator=g)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 2048, 64)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    spin = SpinAt()
    learn = Learner(model, batches, batches[:4], metrics=[accuracy], cbs=[spin], device='cuda', path=tmp_path)
    learn.get_cb(ProgressCallback).refresh_every = 1e9
    learn.fit(1)
    spin.end.synchronize()
    ms = spin.start.elapsed_time(spin.end)
    assert spin.busy is not None, 'the spin callback never reached its second batch'
    assert spin.busy, f'the host waited for the GPU between training batches {spin.first} and {spin.first + spin.k} ' \
                      f'(the queued kernel ran {ms:.0f} ms and had finished when the host got there)'


# -- checkpoints move between GPU and CPU ------------------------------------------------------------------------------
class StopAfterEpoch(Callback):
    "End the fit after epoch `epoch` (once its checkpoint is written), as a run that stopped there."
    order = 100
    def __init__(self, epoch: int): self.epoch = epoch
    def after_epoch(self, learn):
        if learn.epoch == self.epoch: raise CancelFitException()


@pytest.mark.timeout(120)
def test_checkpoints_move_between_gpu_and_cpu(tmp_path):
    "learn.save on the GPU, learn.load on the CPU (and back), equal values; a GPU run resumes on the CPU and back."
    gpu = digits_learner(tmp_path, cbs=[CheckpointCallback(), StopAfterEpoch(0)])
    gpu.fit(3)
    assert next(gpu.model.parameters()).is_cuda and len(gpu.recorder.history) == 1
    saved = gpu.save('from_gpu')

    cpu = digits_learner(tmp_path, seed=1, device='cpu')
    cpu.load(saved)
    assert not next(cpu.model.parameters()).is_cuda
    assert_same(cpu.model.state_dict(), gpu.model.state_dict(), 'weights loaded on the CPU')
    assert_same(cpu.opt.state_dict()['state'], gpu.opt.state_dict()['state'], 'optimizer state loaded on the CPU')

    back = digits_learner(tmp_path, seed=2)
    back.load(cpu.save('from_cpu'))
    assert next(back.model.parameters()).is_cuda
    assert_same(back.model.state_dict(), gpu.model.state_dict(), 'weights back on the GPU')
    assert_same(back.opt.state_dict()['state'], gpu.opt.state_dict()['state'], 'optimizer state back on the GPU')
    for p in back.opt.state.values():
        for k, v in p.items():
            if isinstance(v, torch.Tensor) and v.ndim: assert v.is_cuda, f'optimizer state {k} stayed on {v.device}'

    # the GPU's epoch-0 checkpoint resumes on the CPU for epoch 1; the CPU's resumes on the GPU for epoch 2
    on_cpu_run = digits_learner(tmp_path, cbs=[CheckpointCallback(), StopAfterEpoch(1)], seed=3, device='cpu')
    on_cpu_run.fit(3, resume='last')
    assert on_cpu_run.resumed_from is not None, 'the CPU learner started fresh instead of resuming the GPU checkpoint'
    assert [r['epoch'] for r in on_cpu_run.recorder.history] == [0, 1]
    assert on_cpu_run.recorder.history[0] == gpu.recorder.history[0]
    on_gpu_run = digits_learner(tmp_path, cbs=[CheckpointCallback()], seed=4)
    on_gpu_run.fit(3, resume='last')
    assert on_gpu_run.resumed_from is not None, 'the GPU learner started fresh instead of resuming the CPU checkpoint'
    assert on_gpu_run.recorder.history[:2] == on_cpu_run.recorder.history
    assert len(on_gpu_run.recorder.history) == 3 and next(on_gpu_run.model.parameters()).is_cuda


# -- compile=True ---------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_compiled_model_checkpoints_keep_plain_keys(tmp_path):
    "DESIGN.md: `Learner(..., compile=True)` trains a torch.compile'd model; its checkpoints load into a plain one."
    if 'compile' not in inspect.signature(Learner).parameters:
        pytest.skip('Learner has no compile= argument yet (DESIGN.md lists compile=True): nothing to check')
    learn = digits_learner(tmp_path, compile=True)
    learn.fit(1)
    plain = digits_learner(tmp_path, seed=1)
    plain.load(learn.save('compiled'))         # strict: a key like `_orig_mod.0.weight` would not load
    assert_same(plain.model.state_dict(), {k.replace('_orig_mod.', ''): v for k, v in learn.model.state_dict().items()},
                'weights of the compiled model')


# -- saves in the background (issue 18) -----------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_async_saves_on_the_gpu_equal_synchronous_ones_and_stall_less(tmp_path, deterministic):
    """CheckpointCallback(async_save=True) on the GPU: the snapshot goes through pinned host memory; every file holds
    what the synchronous run's file of the same name holds, bit for bit, and the weights exported from the last one
    load into a plain model. Prints the median stall of each mode (the figure the issue asks for)."""
    runs = {}
    for mode in (False, True):
        cb = CheckpointCallback(every_n_steps=5, keep_last=None, async_save=mode)
        learn = digits_learner(tmp_path / str(mode), cbs=[cb])
        with learn.no_bar(): learn.fit(2)
        runs[mode] = (learn, cb, list_checkpoints(tmp_path / str(mode) / 'checkpoints'))
    (_, sync_cb, sync_files), (_, async_cb, async_files) = runs[False], runs[True]
    strip = lambda p: p.name.split('-run')[0] + p.name.split('-run')[1][8:]
    assert [strip(p) for p in async_files] == [strip(p) for p in sync_files] and async_files
    for a, b in zip(async_files, sync_files):
        sa, sb = load_state(a), load_state(b)
        assert_same(sa['model'], sb['model'], f'weights in {a.name}')
        assert_same(sa['opt']['state'], sb['opt']['state'], f'optimizer state in {a.name}')
    from safetensors.torch import load_file
    cnn().load_state_dict(load_file(export_weights(async_files[-1], tmp_path / 'w.safetensors')), strict=True)
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1000
    print(f'GPU save stall: synchronous {med(sync_cb.blocked):.1f} ms, async {med(async_cb.blocked):.1f} ms (median)')


# -- sharded (strategy='fsdp') on one GPU ---------------------------------------------------------------------------
def full_state(obj):
    "A copy of a nested state on the CPU, every sharded tensor (DTensor) whole."
    if hasattr(obj, 'full_tensor'): obj = obj.full_tensor()
    if isinstance(obj, torch.Tensor): return obj.detach().cpu().clone()
    if isinstance(obj, dict): return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)): return type(obj)(full_state(v) for v in obj)
    return obj


@pytest.fixture
def group_left():
    "The process group of one that a one-process sharded learner makes is left after the test."
    yield
    from nbloop.launch import destroy_distributed
    destroy_distributed()


@pytest.mark.timeout(240)
def test_fsdp_bf16_on_one_gpu_resumes_bit_exactly(tmp_path, deterministic, group_left):
    """strategy='fsdp' with MixedPrecision(bfloat16) (FSDP's precision policy) on one GPU (a mesh of one): the
    parameters are DTensors in float32, checkpoints are sharded (a manifest and its .shards folder), and a crash
    mid-epoch 1 resumed with resume='last' ends bit for bit as the uninterrupted run."""
    every, kw = 4, dict(strategy='fsdp')
    ref_learn = digits_learner(tmp_path / 'ref', 'bf16', **kw)
    with ref_learn.no_bar(): ref_learn.fit(2)
    weight = ref_learn.model[0].weight
    assert type(weight).__name__ == 'DTensor' and weight.dtype == torch.float32 and weight.device.type == 'cuda'
    n = len(ref_learn.train_dl)
    step = n + 10
    first = digits_learner(tmp_path / 'run', 'bf16', cbs=[CheckpointCallback(every_n_steps=every), StopAt(step, 'crash')], **kw)
    with pytest.raises(BaseException), first.no_bar(): first.fit(2)       # the simulated crash
    newest = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1]
    assert shards_folder(newest).is_dir()
    second = digits_learner(tmp_path / 'run', 'bf16', cbs=[CheckpointCallback(every_n_steps=every)], seed=1, **kw)
    with second.no_bar(): second.fit(2, resume='last')
    assert_same(full_state(second.model.state_dict()), full_state(ref_learn.model.state_dict()), 'weights')
    assert_same(full_state(second.opt.state_dict()['state']), full_state(ref_learn.opt.state_dict()['state']), 'optimizer state')
    assert second.recorder.losses == ref_learn.recorder.losses
    from safetensors.torch import load_file
    cnn().load_state_dict(load_file(export_weights(newest, tmp_path / 'w.safetensors')), strict=True)


@pytest.mark.timeout(180)
def test_fsdp_has_no_host_sync_in_steady_state_batches(tmp_path, monkeypatch, group_left):
    "Under strategy='fsdp' (bf16) as without it: no host sync in the watched training and validation batches."
    watch_train, watch_valid = SyncWatch('train'), SyncWatch('valid')
    learn = digits_learner(tmp_path, 'bf16', batch_size=16, strategy='fsdp', cbs=[watch_train, watch_valid])
    learn.get_cb(ProgressCallback).refresh_every = 1e9
    with recorded_syncs() as found: learn.fit(1)
    assert watch_train.watched >= 80 and watch_valid.watched >= 8, (watch_train.watched, watch_valid.watched)
    assert not found, f'{len(found)} host sync(s) in steady-state fsdp batches:\n' + describe_syncs(found)


@pytest.mark.timeout(240)
def test_fsdp_async_saves_stall_less_measured_with_cuda_events(tmp_path, deterministic, group_left):
    """CheckpointCallback(async_save=True) under fsdp on the GPU: the same checkpoints as synchronous saves, bit for
    bit; the time each save holds up the GPU's stream (CUDA events around each save) is printed for both modes."""
    class Timed(CheckpointCallback):
        def save(self, learn, best=False):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); path = super().save(learn, best); end.record()
            self.events.append((start, end))
            return path
    runs = {}
    for mode in (False, True):
        cb = Timed(every_n_steps=5, keep_last=None, async_save=mode)
        cb.events = []
        learn = digits_learner(tmp_path / str(mode), strategy='fsdp', cbs=[cb])
        with learn.no_bar(): learn.fit(2)
        torch.cuda.synchronize()
        runs[mode] = (cb, list_checkpoints(tmp_path / str(mode) / 'checkpoints'))
    strip = lambda p: p.name.split('-run')[0] + p.name.split('-run')[1][8:]
    assert [strip(p) for p in runs[True][1]] == [strip(p) for p in runs[False][1]] and runs[True][1]
    from nbloop.ckpt_sharded import fill_shards
    for a, b in zip(runs[True][1], runs[False][1]):
        assert_same(fill_shards(load_state(a), a)['model'], fill_shards(load_state(b), b)['model'], f'weights in {a.name}')
    med = lambda xs: sorted(xs)[len(xs) // 2]
    gpu = {m: med([s.elapsed_time(e) for s, e in runs[m][0].events]) for m in runs}
    print(f'fsdp GPU save stall (CUDA events): synchronous {gpu[False]:.1f} ms, async {gpu[True]:.1f} ms (median); '
          f'host: {med(runs[False][0].blocked) * 1000:.1f} ms, {med(runs[True][0].blocked) * 1000:.1f} ms')
