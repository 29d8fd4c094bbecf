"""What the benchmarks share: the job of overhead.py (data and model), a clock, interleaved rounds, and a report
of medians and per-round ratios."""
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(20_000, 32, generator=g), torch.randint(0, 10, (20_000,), generator=g)
    train = DataLoader(TensorDataset(x[:16_000], y[:16_000]), batch_size=64, shuffle=True)
    valid = DataLoader(TensorDataset(x[16_000:], y[16_000:]), batch_size=64)
    return train, valid


def mlp(width: int = 64):
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 10))


def train_epoch(model, opt, batches):
    "A hand-written training epoch: forward, loss, backward, step, zero_grad for each `(x, y)` batch."
    model.train()
    for xb, yb in batches:
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


class Clock:
    "Wall-clock and CPU time since it was made (or last `reset`): `Clock().elapsed()` is `(wall s, CPU s)`."
    def __init__(self): self.reset()
    def reset(self): self.wall, self.cpu = time.perf_counter(), time.process_time()
    def elapsed(self): return time.perf_counter() - self.wall, time.process_time() - self.cpu


def interleaved(contenders: dict, rounds: int) -> tuple[dict, dict]:
    """Run each contender (a function returning the `(wall, CPU)` seconds it took) once to warm up, then once per
    round, in alternating order so that machine noise hits all alike; `({name: [wall s]}, {name: [CPU s]})`."""
    for f in contenders.values(): f()
    wall, cpu = {k: [] for k in contenders}, {k: [] for k in contenders}
    for r in range(rounds):
        for k in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
            w, c = contenders[k]()
            wall[k].append(w); cpu[k].append(c)
    return wall, cpu


def report(wall: dict, cpu: dict, ratios=(), indent: str = '', notes: dict | None = None) -> None:
    """Print each contender's median ms (quartiles, median CPU ms), then for each `(a, b, goal)` in `ratios` the
    median of the per-round ratios a/b (those cancel slow drifts of a shared machine better than a ratio of medians)
    and the ratio of the fastest runs (interference from other work only ever slows a run down, so the fastest
    run of each is the closest to its undisturbed cost)."""
    for k in wall:
        lo, med, hi = quartiles([v * 1000 for v in wall[k]])
        print(f'{indent}{k:>10}: median {med:7.1f}  (quartiles {lo:.1f} .. {hi:.1f})  '
              f'CPU {statistics.median(cpu[k]) * 1000:.1f}{(notes or {}).get(k, "")}')
    for a, b, goal in ratios:
        lo, med, hi = quartiles([x / y for x, y in zip(wall[a], wall[b])])
        cmed = statistics.median([x / y for x, y in zip(cpu[a], cpu[b])])
        best = min(wall[a]) / min(wall[b])
        print(f'{indent}ratio {a}/{b}: {med:.3f} wall (quartiles {lo:.3f} .. {hi:.3f}), {cmed:.3f} CPU, '
              f'{best:.3f} best-of-rounds' + (f'   goal {goal}' if goal else ''))


def distributed_datasets(seed=0):
    "The torchrun jobs' data: 12,800 training and 3,200 validation samples of 32 features, 10 classes."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16_000, 32, generator=g), torch.randint(0, 10, (16_000,), generator=g)
    return TensorDataset(x[:12_800], y[:12_800]), TensorDataset(x[12_800:], y[12_800:])


def distributed_validation(model, valid) -> None:
    "A hand-written loop's validation under torchrun: loss, hits and count summed over all processes; rank 0 prints."
    import torch.distributed as dist
    model.eval()
    sums = torch.zeros(3)
    with torch.no_grad():
        for xb, yb in valid:
            pred = model(xb)
            sums += torch.stack([torch.nn.functional.cross_entropy(pred, yb, reduction='sum'), (pred.argmax(1) == yb).sum(),
                                 torch.tensor(float(len(yb)))])
    dist.all_reduce(sums)
    if dist.get_rank() == 0: print(f'{float(sums[0] / sums[2]):.4f} {float(sums[1] / sums[2]):.4f}')


def distributed_epochs(model, train_ds, valid_ds, epochs: int, ends: list) -> None:
    """A hand-written loop's fit under torchrun (`model` already wrapped: DDP or FSDP2): SGD lr 0.1, batches of 32
    from a `DistributedSampler` reshuffled each epoch, `distributed_validation`; `ends` gets (wall, CPU) per epoch."""
    from torch.utils.data.distributed import DistributedSampler
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_sampler = DistributedSampler(train_ds, shuffle=True, seed=0)
    train = DataLoader(train_ds, batch_size=32, sampler=train_sampler)
    valid = DataLoader(valid_ds, batch_size=32, sampler=DistributedSampler(valid_ds, shuffle=False))
    for epoch in range(epochs):
        train_sampler.set_epoch(epoch)
        train_epoch(model, opt, train)
        distributed_validation(model, valid)
        ends.append((time.perf_counter(), time.process_time()))


def distributed_rounds(contenders: dict, rounds: int, epochs: int, width: int, pin: bool = False) -> tuple[dict, dict]:
    """In each torchrun process (gloo, one thread): a warm-up round, then `rounds` rounds of every contender
    `f(epochs, train_ds, valid_ds, width, ends)` in alternating order; per-epoch (wall, CPU) seconds from the end
    of the first epoch to the end of the last, as `({name: [wall s]}, {name: [CPU s]})`. `pin`: each process and
    its gloo threads on one core of their own (rank `r` on core `r`), for both contenders alike: every epoch is
    slower, but where the scheduler puts the threads stops deciding the ratio."""
    import io
    import os
    from contextlib import redirect_stdout
    import torch.distributed as dist
    torch.set_num_threads(1)
    if pin: os.sched_setaffinity(0, {int(os.environ['RANK']) % os.cpu_count()})   # (threads made later inherit it)
    dist.init_process_group('gloo')
    train_ds, valid_ds = distributed_datasets()
    wall, cpu = {k: [] for k in contenders}, {k: [] for k in contenders}
    for r in range(rounds + 1):                            # round 0 warms up
        for k in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
            ends = []
            dist.barrier()
            with redirect_stdout(io.StringIO()): contenders[k](epochs, train_ds, valid_ds, width, ends)
            if r:
                w, c = ((last - first) / (len(ends) - 1) for first, last in zip(ends[0], ends[-1]))
                wall[k].append(w); cpu[k].append(c)
    return wall, cpu
