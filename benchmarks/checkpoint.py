"""What checkpoints cost, measured side by side in one run.

1. Writing. A model of about 25 MB (an MLP of six 1024×1024 layers) trained a few AdamW steps, so that the
   optimizer state doubles it; interleaved rounds time, writing to the same folder:
     torch.save      torch.save({'model': ..., 'opt': ...}) to a file, then flush and fsync: what a careful
                     hand-written loop does (it is neither atomic nor checksummed)
     save_state      nbloop.ckpt_format.save_state of the same two state dicts: safetensors with a checksum,
                     written to a temporary file, fsynced, renamed over the old one, folder fsynced
     callback        CheckpointCallback.save on the Learner: the realistic case, which adds the gradients, the
                     RNG states, the epoch's planned batch order and the callbacks' states (the Recorder's losses)
   Goal: callback/torch.save <= 1.2.

2. Resuming mid-epoch costs the same whatever the position: checkpoints after k=5 and k=195 batches of a
   200-batch epoch, whose dataset is made slow (2 ms per sample while timing), so a resume that loaded the
   skipped batches would take seconds longer at k=195. Each resume is timed from fit(1, resume=path) to the
   first resumed batch (a callback then cancels the fit): loading the file, restoring model, optimizer, RNGs
   and callbacks, and loading that one batch. Goal: ratio k=195 / k=5 about 1.

3. A long run's checkpoints cost what a short run's do: CheckpointCallback.save of a learner with 5 parameters
   whose Recorder holds the history of 20, 2,000 and 20,000 epochs of 3 batches (loaded into it with
   `load_state_dict`, as a resumed run would have it). The history travels in every checkpoint, as tensors:
   it used to go as JSON, and a save took 3, 32 and 340 ms. Goal: ratio 20000/20 small (the bytes still grow,
   by 8 per number, at the speed of a copy).

4. Saving in the background: CheckpointCallback(async_save=True).save stalls training only while it takes a
   snapshot (the state's tensors copied); the write happens in a thread. A model of six 2048x2048 layers (100 MB)
   with AdamW's state (300 MB in all), one save per round in each mode: the training thread's wait in the
   background mode against a synchronous save of the same state. Goal: async stall / sync save <= 0.1.

Usage: python benchmarks/checkpoint.py [--rounds 21] [--dir FOLDER]   (FOLDER: where files are written;
default a temporary folder on the disk that holds /tmp)
"""
import argparse
import contextlib
import copy
import io
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nbloop.checkpoint import CheckpointCallback
from nbloop.ckpt_format import save_state
from nbloop.state_tree import flatten_state
from nbloop.core import CancelFitException, Callback
from nbloop.learner import Learner
from common import Clock, interleaved, report


def big_learner(folder: Path) -> tuple[Learner, CheckpointCallback]:
    "A Learner on a ~25 MB MLP after a short fit: weights, AdamW moments, a planned epoch and recorded losses."
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(1024, 1024), nn.ReLU())], nn.Linear(1024, 10))
    x, y = torch.randn(512, 1024), torch.randint(0, 10, (512,))
    cb = CheckpointCallback(every_n_epochs=None, save_best=False)
    learn = Learner(model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True), path=folder, cbs=[cb],
                    device='cpu')
    with learn.no_bar(): learn.fit(1)
    return learn, cb


def torch_save(path: Path, state: dict) -> None:
    with open(path, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def bench_writes(folder: Path, rounds: int) -> None:
    folder.mkdir(parents=True)
    learn, cb = big_learner(folder)
    state = {'model': learn.model.state_dict(), 'opt': learn.opt.state_dict()}
    mb = sum(t.numel() * t.element_size() for t in learn.model.state_dict().values()) / 2**20
    contenders = {'torch.save': lambda: torch_save(folder / 'plain.pt', state),
                  'save_state': lambda: save_state(folder / 'state.safetensors', state),
                  'callback': lambda: cb.save(learn)}
    wall, cpu = interleaved({k: clocked(f) for k, f in contenders.items()}, rounds)   # the warm-up makes the files
    files = {'torch.save': folder / 'plain.pt', 'save_state': folder / 'state.safetensors', 'callback': cb.last_path}
    print(f'1. Writing a checkpoint of a {mb:.0f} MB model with its AdamW state; {rounds} interleaved rounds, '
          f'ms per write:')
    report(wall, cpu, [('save_state', 'torch.save', None), ('callback', 'torch.save', '<= 1.2')], indent='   ',
           notes={k: f'   file {p.stat().st_size / 2**20:.1f} MB' for k, p in files.items()})


def clocked(fn):
    "fn, made to return the (wall, CPU) seconds it took."
    def run():
        clock = Clock()
        fn()
        return clock.elapsed()
    return run


class SlowData(Dataset):
    "Random points whose loading takes `delay` seconds each (0 while the checkpoints are made)."
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
        self.delay = 0.

    def __len__(self): return len(self.x)

    def __getitem__(self, i):
        if self.delay: time.sleep(self.delay)
        return self.x[i], self.y[i]


class StopAtFirstBatch(Callback):
    "Cancel the fit at its first batch, noting the time on `clock` (set before the fit) when that batch arrived."
    def before_batch(self, learn):
        self.took = self.clock.elapsed()
        raise CancelFitException()


def small_learner(dl: DataLoader, folder: Path, cbs=()) -> Learner:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
    return Learner(model, dl, loss_func=F.cross_entropy, path=folder, device='cpu',
                   cbs=[CheckpointCallback(every_n_epochs=None, every_n_steps=5, keep_last=None, save_best=False), *cbs])


def bench_resume(folder: Path, rounds: int, ks=(5, 195), batch_size: int = 16, n_batches: int = 200,
                 delay: float = 0.002) -> None:
    data = SlowData(batch_size * n_batches)
    dl = DataLoader(data, batch_size=batch_size, shuffle=True)
    with contextlib.redirect_stdout(io.StringIO()): small_learner(dl, folder).fit(1)
    paths = {k: next((folder / 'checkpoints').glob(f'ckpt-step{k:09d}-*')) for k in ks}
    data.delay = delay

    def resume(k):
        stop = StopAtFirstBatch()
        learn = small_learner(dl, folder, [stop])
        with learn.no_bar():
            stop.clock = Clock()
            learn.fit(1, resume=paths[k])
        assert learn.train_iter == k, (learn.train_iter, k)
        return stop.took

    wall, cpu = interleaved({f'k={k}': lambda k=k: resume(k) for k in ks}, rounds)
    clock = Clock()
    for _ in zip(range(ks[-1] - ks[0]), dl): pass
    skip = clock.elapsed()[0]
    print(f'2. Resuming mid-epoch ({n_batches} batches of {batch_size}, {delay * 1000:g} ms to load a sample); '
          f'{rounds} interleaved rounds, ms from fit(resume=...) to the first resumed batch:')
    report(wall, cpu, [(f'k={ks[-1]}', f'k={ks[0]}', 'about 1')], indent='   ')
    print(f'   (loading the {ks[-1] - ks[0]} batches in between would add {skip * 1000:.0f} ms)')


def long_run(folder: Path, epochs: int) -> tuple[Learner, CheckpointCallback]:
    "A 5-parameter learner whose Recorder holds `epochs` epochs of 3 batches each, as a run that long would."
    from nbloop.learner import synth_learner
    cb = CheckpointCallback(every_n_epochs=None, keep_last=1, save_best=False)
    learn = synth_learner(n=64, n_features=4, batch_size=16, path=folder, cbs=[cb])
    with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(): learn.fit(1)
    rec = learn.recorder.state_dict()
    grown = {**rec, 'history': [dict(rec['history'][-1], epoch=i) for i in range(epochs)],
             'epoch_ends': list(range(3, 3 * epochs + 1, 3)), 'epoch_start': 3 * epochs - 3}
    for k in ('losses', 'smoothed', 'lrs'): grown[k] = rec[k][-1:].repeat(3 * epochs)
    learn.recorder.load_state_dict(grown)
    return learn, cb


def bench_long_runs(folder: Path, rounds: int, lengths=(20, 2_000, 20_000)) -> None:
    runs = {n: long_run(folder / str(n), n) for n in lengths}
    def save(n):
        learn, cb = runs[n]
        clock = Clock(); cb.save(learn)
        return clock.elapsed()
    wall, cpu = interleaved({f'{n} epochs': lambda n=n: save(n) for n in lengths}, rounds)
    print(f'3. One checkpoint of a long run (a 5-parameter model; the history of {", ".join(map(str, lengths))} '
          f'epochs of 3 batches); {rounds} interleaved rounds, ms per save:')
    report(wall, cpu, [(f'{lengths[-1]} epochs', f'{lengths[0]} epochs', 'small')], indent='   ')


def bench_async(folder: Path, rounds: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)])
    data = [(torch.randn(8, 2048), torch.randn(8, 2048))]
    def learner(async_save: bool):
        cb = CheckpointCallback(every_n_epochs=None, keep_last=1, save_best=False, async_save=async_save)
        learn = Learner(copy.deepcopy(model), data, loss_func=F.mse_loss, path=folder / str(async_save), device='cpu', cbs=[cb])
        with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(): learn.fit(1)   # AdamW's state exists now
        return learn, cb
    runs = {'sync save': learner(False), 'async stall': learner(True)}
    def save(kind):
        learn, cb = runs[kind]
        clock = Clock(); cb.save(learn); took = clock.elapsed()
        if cb.writer is not None: cb.writer.wait()          # the write itself happens outside the stall
        return took
    size = sum(t.numel() * t.element_size() for k, t in flatten_state(runs['sync save'][0].state_dict())[1].items())
    wall, cpu = interleaved({k: lambda k=k: save(k) for k in runs}, rounds)
    print(f'4. Saving in the background: a state of {size / 1e6:.0f} MB; {rounds} interleaved rounds, ms per save '
          f'(async: the time the training thread waits):')
    report(wall, cpu, [('async stall', 'sync save', '<= 0.1')], indent='   ')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=21)
    ap.add_argument('--dir', type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        bench_writes(Path(d) / 'writes', args.rounds)
        bench_resume(Path(d) / 'resume', args.rounds)
        bench_long_runs(Path(d) / 'long', args.rounds)
        bench_async(Path(d) / 'async', min(args.rounds, 9))


if __name__ == '__main__':
    main()
