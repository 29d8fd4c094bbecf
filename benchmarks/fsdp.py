"""Sharded training (strategy='fsdp'): its loop against a hand-written FSDP2 loop, and sharded saves at 2 processes
against 1. Starts torchrun itself.

Part 1, the loop (issue 18, goal <= 1.05): 2 processes, gloo, CPU, one thread each; an MLP 32->W->W->10 (W=256 by
default) on 12,800 random training samples and 3,200 validation samples, batches of 32 per process, SGD lr 0.1,
validation with its loss and accuracy summed over both processes. Contenders, in the same two processes, in
alternating order each round:
  plain      fully_shard on each Linear and on the root (as the learner's default policy does), DistributedSampler
             (set_epoch every epoch), the validation sums all-reduced at the end of each epoch
  learner    Learner(..., strategy='fsdp', metrics=[accuracy]) with its default callbacks, given plain DataLoaders
Each figure is the time per epoch from the end of the first epoch to the end of the last; rank 0 prints medians,
quartiles and the median of the per-round ratios.

Part 2, saving: the time `ShardedRuntime.save` takes to write a sharded checkpoint of a model of `--save-mb` MB of
float32 weights, with 2 processes (each writes its half, in parallel) and with 1 (it writes all); launches of 1 and
2 processes alternate, each timing `--saves` saves after one to warm up; the ratio is the median over the pairs.

Usage: python benchmarks/fsdp.py [--rounds 7] [--epochs 3] [--width 256] [--save-mb 200] [--pairs 3] [--saves 3]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent


def mlp(width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def plain_fsdp(epochs, train_ds, valid_ds, width, ends):
    "The hand-written FSDP2 loop; `ends` gets (wall, CPU) times at the end of every epoch."
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from common import distributed_epochs
    model, mesh = mlp(width), init_device_mesh('cpu', (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear): fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    distributed_epochs(model, train_ds, valid_ds, epochs, ends)


def learner(epochs, train_ds, valid_ds, width, ends):
    "The same job with a sharded Learner; `ends` gets (wall, CPU) times at the end of every epoch."
    from nbloop.learner import Learner
    from nbloop.metrics import accuracy
    from overhead import EpochEnds
    model = mlp(width)
    train = DataLoader(train_ds, batch_size=32, shuffle=True)
    valid = DataLoader(valid_ds, batch_size=32)
    learn = Learner(model, train, valid, opt_func=torch.optim.SGD, lr=0.1, metrics=[accuracy], device='cpu',
                    cbs=[EpochEnds(ends)], strategy='fsdp')
    learn.fit(epochs)


def loop_worker(args):
    "In each torchrun process: the rounds of part 1; rank 0 reports."
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist
    from common import distributed_rounds, report
    wall, cpu = distributed_rounds({'plain': plain_fsdp, 'learner': learner}, args.rounds, args.epochs, args.width)
    if dist.get_rank() == 0:
        print(f'part 1: torch {torch.__version__}, torchrun, 2 processes, gloo, one thread each; MLP 32->{args.width}->'
              f'{args.width}->10 sharded, 12.8k + 3.2k samples, batch 32 per process; {args.rounds} interleaved rounds, '
              f'rank 0, ms per epoch (epochs 2..{args.epochs} of each fit):')
        report(wall, cpu, [('learner', 'plain', '<= 1.05')], indent='  ')
    from nbloop.launch import destroy_distributed
    destroy_distributed()


def save_worker(args):
    "In each process of one launch: time `--saves` sharded saves (after one to warm up); rank 0 prints the median ms."
    import torch.distributed as dist
    from nbloop.sharded import ShardedRuntime
    torch.set_num_threads(1)
    side = int((args.save_mb * 2**20 / 4 / 8) ** 0.5)          # 8 square layers of float32
    torch.manual_seed(0)
    rt = ShardedRuntime('cpu')
    model = rt.prepare_model(nn.Sequential(*[nn.Linear(side, side, bias=False) for _ in range(8)]))
    folder = Path(args.folder)
    times = []
    for i in range(args.saves + 1):
        rt.barrier()
        start = time.perf_counter()
        rt.save(folder / f'ckpt-{i}.safetensors', {'kind': 'weights', 'model': model.state_dict()})
        rt.barrier()                                             # the checkpoint is complete on rank 0: all wait
        if i: times.append(time.perf_counter() - start)
    if rt.is_main: print(f'SAVE_MS {statistics.median(times) * 1000:.1f}')
    from nbloop.launch import destroy_distributed
    destroy_distributed()


def torchrun(nproc: int, *args, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           str(Path(__file__).resolve()), *map(str, args)]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=capture, text=True)


def saves(args) -> None:
    "Part 2: alternate launches of 1 and 2 processes; each prints its median save time."
    ms = {1: [], 2: []}
    for pair in range(args.pairs):
        for n in ((1, 2) if pair % 2 == 0 else (2, 1)):
            with tempfile.TemporaryDirectory() as d:
                p = torchrun(n, '--save', '--folder', d, '--save-mb', args.save_mb, '--saves', args.saves, capture=True)
                if p.returncode: sys.exit(f'the save benchmark failed with {n} process(es):\n{p.stderr[-3000:]}')
                ms[n].append(float(p.stdout.split('SAVE_MS ')[1].split()[0]))
    ratios = [b / a for a, b in zip(ms[1], ms[2])]
    print(f'part 2: a sharded checkpoint of {args.save_mb} MB of weights, median of {args.saves} saves per launch, '
          f'{args.pairs} launches each:')
    for n in (1, 2): print(f'  {n} process{"es" if n > 1 else ""}: ' + ', '.join(f'{x:.0f}' for x in ms[n]) + ' ms')
    print(f'  ratio 2 processes / 1: {statistics.median(ratios):.2f} (per pair: {", ".join(f"{r:.2f}" for r in ratios)})')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=7)
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--width', type=int, default=256)
    ap.add_argument('--save-mb', type=int, default=200)
    ap.add_argument('--pairs', type=int, default=3)
    ap.add_argument('--saves', type=int, default=3)
    ap.add_argument('--skip-loop', action='store_true', help='part 2 only')
    ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--save', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--folder', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker: return loop_worker(args)
    if args.save: return save_worker(args)
    if args.epochs < 2: ap.error('--epochs must be at least 2 (the first epoch is the warm-up)')
    if args.rounds < 2: ap.error('--rounds must be at least 2 (quartiles need two)')
    if not args.skip_loop:
        p = torchrun(2, '--worker', '--rounds', args.rounds, '--epochs', args.epochs, '--width', args.width)
        if p.returncode: sys.exit(p.returncode)
    saves(args)


if __name__ == '__main__':
    main()
