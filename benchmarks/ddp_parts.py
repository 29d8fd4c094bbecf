"""DistributedDataParallel on the CPU (gloo), measured side by side in one run; every figure is a ratio.

1. Scaling: the same global batch of 128 samples and the same epoch (a small MLP, and a wider one), in 1 process
   (batches of 128) and in 2 processes (batches of 64 each), started with nbloop's `launch`. Reported, not a goal:
   with 2 cores and a tiny model the all-reduce and the second process's share of the cores decide. Beside it,
   nbloop's 2 processes against a hand-written DDP loop (DistributedSampler, DDP, AdamW) in 2 processes.
2. The stop agreement: 2 processes with the per-batch stop vote (an asynchronous all-reduce of one int on the
   gloo group, read one batch later) against the same run with the vote switched off. Goal: within noise.
3. Checkpoint writes: CheckpointCallback.save of a ~25 MB model (with AdamW state) in 2 processes (which gathers
   every process's RNG states and gradients to rank 0, which writes) against 1 process.

Rounds alternate the contenders; medians of per-round ratios with quartiles are printed.
Usage: python benchmarks/ddp_parts.py [--rounds 5]    (the loop-cost job against a hand-written DDP loop: ddp.py)
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nbloop.checkpoint import CheckpointCallback
from nbloop.learner import Learner
from nbloop.launch import launch
import nbloop.distributed


def _data(batch_size: int, n: int = 16_384):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def _model(width: int):
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def epoch_time(global_batch: int, width: int, vote: bool = True) -> float:
    "Seconds for one training epoch in this process (rank 0's figure is returned by launch)."
    torch.set_num_threads(1)
    if not vote: nbloop.distributed.DistributedRuntime._vote_due = lambda self, training: False   # no batch votes
    world = int(__import__('os').environ.get('WORLD_SIZE', 1))
    torch.manual_seed(0)
    learn = Learner(_model(width), _data(global_batch // world), device='cpu')
    with learn.no_bar():
        learn.fit(1)                      # warm-up
        t = time.perf_counter()
        learn.fit(1)
        return time.perf_counter() - t


def plain_ddp_epoch_time(global_batch: int, width: int) -> float:
    "The same epoch in a hand-written DDP loop (DistributedSampler, DDP, AdamW, no callbacks): the floor."
    import os
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler
    torch.set_num_threads(1)
    world, rank = int(os.environ['WORLD_SIZE']), int(os.environ['RANK'])
    dist.init_process_group('gloo')
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(_model(width))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ds = _data(global_batch // world).dataset
        sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=0)
        dl = DataLoader(ds, batch_size=global_batch // world, sampler=sampler)
        def epoch(e):
            sampler.set_epoch(e)
            for x, y in dl:
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        epoch(0)
        t = time.perf_counter()
        epoch(1)
        return time.perf_counter() - t
    finally: dist.destroy_process_group()


def save_time(folder: str, rounds: int = 3) -> float:
    "Median seconds of CheckpointCallback.save for a ~25 MB model with AdamW state (rank 0's figure)."
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(6)])
    x = torch.randn(64, 1024)
    dl = [(x, torch.randn(64, 1024))] * 2
    cb = CheckpointCallback(dir=folder, every_n_epochs=None, keep_last=2, save_best=False)
    learn = Learner(model, dl, loss_func=nn.functional.mse_loss, cbs=[cb], device='cpu')
    with learn.no_bar(): learn.fit(1)
    times = []
    for _ in range(rounds):
        learn.runtime.barrier()
        t = time.perf_counter()
        cb.save(learn)
        learn.runtime.barrier()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ratios(pairs):
    r = [a / b for a, b in pairs]
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return f'{statistics.median(r):.3f}  (quartiles {q[0]:.3f} .. {q[2]:.3f})'


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--rounds', type=int, default=5)
    args = ap.parse_args()
    print(f'torch {torch.__version__}, {args.rounds} rounds, CPU, gloo')
    for width in (64, 512):
        pairs = []
        for r in range(args.rounds):
            order = [1, 2] if r % 2 == 0 else [2, 1]
            t = {n: launch(epoch_time, n, 128, width, timeout=600) for n in order}
            pairs.append((t[1], t[2]))
        print(f'1. epoch time, 1 process / 2 processes, global batch 128, MLP width {width}: {ratios(pairs)}'
              f'   (> 1: 2 processes are faster)')
        pairs = []
        for r in range(args.rounds):
            order = ['nbloop', 'plain'] if r % 2 == 0 else ['plain', 'nbloop']
            t = {k: launch(epoch_time if k == 'nbloop' else plain_ddp_epoch_time, 2, 128, width, timeout=600)
                 for k in order}
            pairs.append((t['nbloop'], t['plain']))
        print(f'   2 processes, nbloop / a hand-written DDP loop, MLP width {width}: {ratios(pairs)}')
    pairs = []
    for r in range(args.rounds):
        order = [True, False] if r % 2 == 0 else [False, True]
        t = {v: launch(epoch_time, 2, 128, 64, v, timeout=600) for v in order}
        pairs.append((t[True], t[False]))
    print(f'2. epoch time with the stop vote / without, 2 processes, 128 batches of 64 each: {ratios(pairs)}'
          f'   (goal: within noise of 1)')
    pairs = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            order = [1, 2] if r % 2 == 0 else [2, 1]
            t = {n: launch(save_time, n, str(Path(d) / f'{n}-{r}'), timeout=600) for n in order}
            pairs.append((t[2], t[1]))
    print(f'3. checkpoint write, 2 processes / 1 process, 25 MB model + AdamW state: {ratios(pairs)}')


if __name__ == '__main__':
    main()
