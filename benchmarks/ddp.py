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

Usage: python benchmarks/ddp.py [--rounds 9] [--epochs 4] [--width 64]   (starts torchrun itself)
Goal: learner/plain <= 1.05.
"""
import argparse
import os
import subprocess
import sys
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


def learner(epochs, train_ds, valid_ds, width, ends):
    "The same job with a Learner; `ends` gets (wall, CPU) times at the end of every epoch."
    from nbloop.learner import Learner
    from nbloop.metrics import accuracy
    from common import mlp
    from overhead import EpochEnds
    torch.manual_seed(0)
    train = DataLoader(train_ds, batch_size=32, shuffle=True)
    valid = DataLoader(valid_ds, batch_size=32)
    learn = Learner(mlp(width), train, valid, opt_func=torch.optim.SGD, lr=0.1, metrics=[accuracy], device='cpu',
                    cbs=[EpochEnds(ends)])
    learn.fit(epochs)


def worker(args):
    "In each torchrun process: the rounds; rank 0 reports."
    sys.path.insert(0, str(HERE))
    import torch.distributed as dist
    from common import distributed_rounds, report
    wall, cpu = distributed_rounds({'plain': plain_ddp, 'learner': learner}, args.rounds, args.epochs, args.width)
    if dist.get_rank() == 0:
        print(f'torch {torch.__version__}, torchrun, 2 processes, gloo, one thread each; MLP 32->{args.width}->10, '
              f'12.8k + 3.2k samples, batch 32 per process; {args.rounds} interleaved rounds, rank 0, ms per epoch '
              f'(epochs 2..{args.epochs} of each fit):')
        report(wall, cpu, [('learner', 'plain', '<= 1.05')])
    from nbloop.launch import destroy_distributed
    destroy_distributed()     # nbloop's way out: its CPU group forgotten, gloo's threads given time to finish


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=9)
    ap.add_argument('--epochs', type=int, default=4)
    ap.add_argument('--width', type=int, default=64, help='hidden width of the MLP (64: the job; 512: real work dominates)')
    ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.epochs < 2: ap.error('--epochs must be at least 2 (the first epoch is the warm-up)')
    if args.rounds < 2: ap.error('--rounds must be at least 2 (quartiles need two)')
    if args.worker: return worker(args)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(Path(__file__).resolve()),
           '--worker', '--rounds', str(args.rounds), '--epochs', str(args.epochs), '--width', str(args.width)]
    sys.exit(subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS='1')).returncode)


if __name__ == '__main__':
    main()
