"""The loop's own cost under torchrun: nbloop's Learner against a hand-written DDP loop, side by side.

The job (issue 20): 2 processes started by torchrun, gloo, CPU, one thread each; the MLP 32→64→10 on 12,800
random training samples and 3,200 validation samples, batches of 32 per process, SGD lr 0.1, validation with its
loss and accuracy summed over both processes.

Contenders, run in the same two processes (one process group), in alternating order each round:
  plain      DistributedDataParallel + DistributedSampler (set_epoch every epoch) + the validation sums
             (loss, hits, count) all-reduced at the end of each epoch; rank 0 prints them
  learner    Learner(..., metrics=[accuracy]) with its default callbacks, given the plain DataLoaders (it shards
             them itself)

Each contender fits `--epochs` epochs and notes the time at the end of every epoch; its figure is the time per
epoch from the end of the first epoch to the end of the last (the fit's start and end, and the first epoch's
warm-up, left out). Rank 0's figures are printed: medians and quartiles of ms per epoch, and the median of the
per-round ratios.

The defaults (30 rounds of 6 epochs, about 6 minutes here) are sized to the noise: on this 2-core host an epoch
varies by about 10% from the one before (two processes, their gloo threads and a blocking round per batch on two
cores), and with 15 rounds of 4 epochs the median ratio moved from 1.01 to 1.10 between runs of the same code.

  --parts    also times the Learner without metrics, and without callbacks or metrics (bare), and prints the
             Learner's extra time split into the loop itself, its callbacks and its metric; then, in one more fit of
             each, where an epoch goes: the hand-written loop's data, forward and loss, backward (DDP's all-reduce
             included), step and validation, and the time the Learner spends in its CPU group's collectives (the
             stop votes, the final votes at each phase's end, the gathers of sums and metric states, the
             broadcasts of the epoch's order), what one blocking round on that group costs here, and the CPU time
             of each thread (the main one, gloo's) in one fit of each

  --aa       also runs the hand-written loop a second time, as a contender of its own (plain2), and prints
             plain2/plain: the same code against itself, so the spread that this machine's noise alone gives a ratio

  --pin      each process and its gloo threads on a core of their own (both contenders alike): slower epochs,
             but far less noise from where the scheduler puts the threads (the hand-written loop against itself:
             1.00 and 1.01 pinned, 1.05 and 1.13 not)

Usage: python benchmarks/ddp.py [--rounds 30] [--epochs 6] [--width 64] [--parts] [--aa] [--pin]   (starts torchrun itself)
Goal: learner/plain <= 1.05.
"""
import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent


def plain_ddp(epochs, train_ds, valid_ds, width, ends):
    "The hand-written DDP loop; `ends` gets (wall, CPU) times at the end of every epoch."
    from torch.nn.parallel import DistributedDataParallel
    from common import distributed_epochs, mlp
    torch.manual_seed(0)
    distributed_epochs(DistributedDataParallel(mlp(width)), train_ds, valid_ds, epochs, ends)


def learner(epochs, train_ds, valid_ds, width, ends, metrics=True, bare=False, cbs=()):
    """The same job with a Learner; `ends` gets (wall, CPU) times at the end of every epoch. `bare`: without its
    default callbacks (the Recorder and progress), so that only the loop itself runs; `cbs`: more callbacks."""
    from nbloop.learner import Learner
    from nbloop.metrics import accuracy
    from nbloop.progress import ProgressCallback
    from nbloop.recorder import Recorder
    from common import mlp
    from overhead import EpochEnds
    torch.manual_seed(0)
    train = DataLoader(train_ds, batch_size=32, shuffle=True)
    valid = DataLoader(valid_ds, batch_size=32)
    learn = Learner(mlp(width), train, valid, opt_func=torch.optim.SGD, lr=0.1, metrics=[accuracy] if metrics else [],
                    device='cpu', cbs=[EpochEnds(ends), *cbs])
    with learn.removed_cbs([Recorder, ProgressCallback] if bare else []): learn.fit(epochs)


def plain_parts(epochs, train_ds, valid_ds, width) -> dict:
    """The hand-written DDP loop once more, its parts timed: ms per epoch of data, forward and loss, backward (with
    DDP's all-reduce), step (with zero_grad) and validation (with its all-reduce), over epochs 2 to `epochs`."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler
    from common import distributed_validation, mlp
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp(width))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = DistributedSampler(train_ds, shuffle=True, seed=0)
    train = DataLoader(train_ds, batch_size=32, sampler=sampler)
    valid = DataLoader(valid_ds, batch_size=32, sampler=DistributedSampler(valid_ds, shuffle=False))
    spent = collections.Counter()
    for epoch in range(epochs):
        if epoch == 1: spent.clear()                    # the first epoch warms up
        sampler.set_epoch(epoch)
        model.train()
        batches, t = iter(train), time.perf_counter()
        for xb, yb in batches:
            t1 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            spent['data'] += t1 - t; spent['forward+loss'] += t2 - t1; spent['backward'] += t3 - t2; spent['step'] += t4 - t3
            t = time.perf_counter()
        spent['data'] += time.perf_counter() - t        # the end of the epoch's batches
        t = time.perf_counter()
        distributed_validation(model, valid)
        spent['validation'] += time.perf_counter() - t
    dist.barrier()
    return {k: v / (epochs - 1) * 1000 for k, v in spent.items()}


def learner_collectives(epochs, train_ds, valid_ds, width) -> dict:
    """A Learner fit once more, with the time it spends in its CPU group's collectives: `{kind: (ms, calls)}` per
    epoch over epochs 2 to `epochs`. `_send_vote` sends a training vote about every 0.25 s (the batches between count
    towards it and send nothing)."""
    from nbloop.core import Callback
    from nbloop.distributed import DistributedRuntime
    spent = collections.defaultdict(lambda: [0., 0])
    class Warm(Callback):
        def before_epoch(self, learn):
            if learn.epoch == 1: spent.clear()          # the first epoch (and its end's vote) warms up
    originals = {n: getattr(DistributedRuntime, n) for n in ('_send_vote', 'final_vote', 'gather', 'broadcast')}
    def timed(f, name):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try: return f(*args, **kwargs)
            finally: spent[name][0] += time.perf_counter() - t; spent[name][1] += 1
        return run
    for name, f in originals.items(): setattr(DistributedRuntime, name, timed(f, name))
    try: learner(epochs, train_ds, valid_ds, width, [], cbs=[Warm()])
    finally:
        for name, f in originals.items(): setattr(DistributedRuntime, name, f)
    return {k: (ms * 1000 / (epochs - 1), n / (epochs - 1)) for k, (ms, n) in spent.items()}


def thread_cpu(f, epochs, train_ds, valid_ds, width) -> dict:
    """One more fit of contender `f`: the CPU time of this process's threads, by name, in ms per epoch (the main
    thread, gloo's loop and worker threads of both groups), read from /proc/self/task/*/schedstat (Linux)."""
    def cpu_by_thread():
        out = {}
        for tid in os.listdir('/proc/self/task'):
            try: out[tid] = (open(f'/proc/self/task/{tid}/comm').read().strip(),
                             int(open(f'/proc/self/task/{tid}/schedstat').read().split()[0]))
            except OSError: pass                              # a thread that ended meanwhile
        return out
    before = cpu_by_thread()
    f(epochs, train_ds, valid_ds, width, [])
    spent = collections.Counter()
    for tid, (name, ns) in cpu_by_thread().items():
        spent['main' if tid == str(os.getpid()) else name] += (ns - before.get(tid, (name, 0))[1]) / 1e6 / epochs
    return dict(spent)


def round_latency(n: int = 100) -> tuple[float, float]:
    """What one blocking round on nbloop's CPU group costs here when both processes are already waiting for it: the
    median and 90th percentile, in ms, of `n` all-reduces of five integers (a stop vote's size)."""
    import torch.distributed as dist
    from nbloop.launch import side_group
    group, flag, times = side_group(), torch.zeros(5, dtype=torch.int64), []
    for _ in range(n):
        t = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[n // 2] * 1000, times[n * 9 // 10] * 1000


def worker(args):
    "In each torchrun process: the rounds; rank 0 reports."
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist
    import io
    from contextlib import redirect_stdout
    from common import distributed_datasets, distributed_rounds, report
    from overhead import report_parts
    contenders = {'plain': plain_ddp, 'learner': learner}
    if args.aa: contenders['plain2'] = plain_ddp
    if args.parts:
        contenders['nometrics'] = lambda *a: learner(*a, metrics=False)
        contenders['bare'] = lambda *a: learner(*a, metrics=False, bare=True)
    wall, cpu = distributed_rounds(contenders, args.rounds, args.epochs, args.width, args.pin)
    if args.parts:
        with redirect_stdout(io.StringIO()):
            plain = plain_parts(args.epochs, *distributed_datasets(), args.width)
            side = learner_collectives(args.epochs, *distributed_datasets(), args.width)
            latency = round_latency()
            threads = {k: thread_cpu(contenders[k], args.epochs, *distributed_datasets(), args.width)
                       for k in ('plain', 'learner')} if os.path.isdir('/proc/self/task') else {}
    if dist.get_rank() == 0:
        print(f'torch {torch.__version__}, torchrun, 2 processes, gloo, one thread each{", pinned" if args.pin else ""}; MLP 32->{args.width}->10, '
              f'12.8k + 3.2k samples, batch 32 per process; {args.rounds} interleaved rounds, rank 0, ms per epoch '
              f'(epochs 2..{args.epochs} of each fit):')
        report(wall, cpu, [('learner', 'plain', '<= 1.05')] +
               ([('plain2', 'plain', None)] if args.aa else []))
        if args.parts:
            report_parts(wall, 'plain')
            print('where an epoch goes, in one more fit of each (rank 0, ms per epoch):')
            print('  the hand-written loop: ' + ', '.join(f'{k} {v:.1f}' for k, v in plain.items()))
            print('  the Learner, in its CPU group\'s collectives: ' + ', '.join(
                f'{k} {ms:.1f} ({n:.0f} calls)' for k, (ms, n) in side.items()) + f'; in all {sum(ms for ms, _ in side.values()):.1f}')
            print(f'  one blocking round on the CPU group, both processes waiting for it: median {latency[0]:.2f} ms, '
                  f'90th percentile {latency[1]:.2f} ms')
            for k, spent in threads.items():   # wall time not spent on a CPU by any thread is waiting, for the other process
                print(f'  CPU by thread, {k} (ms per epoch, one fit): ' + ', '.join(
                    f'{name} {ms:.1f}' for name, ms in sorted(spent.items(), key=lambda kv: -kv[1]) if ms >= 0.05))
    from nbloop.launch import destroy_distributed
    destroy_distributed()     # nbloop's way out: its CPU group forgotten, gloo's threads given time to finish


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=30)
    ap.add_argument('--epochs', type=int, default=6)
    ap.add_argument('--width', type=int, default=64, help='hidden width of the MLP (64: the job; 512: real work dominates)')
    ap.add_argument('--parts', action='store_true', help='also time the parts of the difference (see above)')
    ap.add_argument('--aa', action='store_true', help='also run the hand-written loop against itself (the noise)')
    ap.add_argument('--pin', action='store_true', help='each process on a core of its own (less noise, slower epochs)')
    ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.epochs < 2: ap.error('--epochs must be at least 2 (the first epoch is the warm-up)')
    if args.rounds < 2: ap.error('--rounds must be at least 2 (quartiles need two)')
    if args.worker: return worker(args)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(Path(__file__).resolve()),
           '--worker', '--rounds', str(args.rounds), '--epochs', str(args.epochs), '--width', str(args.width)] + (['--parts'] if args.parts else []) + (['--aa'] if args.aa else []) + (['--pin'] if args.pin else [])
    sys.exit(subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS='1')).returncode)


if __name__ == '__main__':
    main()
