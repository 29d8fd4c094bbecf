"""Cost of `learn.lr_find(num_it=100)` against 100 plain training steps of the same model, side by side.

The job is overhead.py's: an MLP 32→64→10 on 16,000 random samples, batch 64, AdamW, CPU, one thread. Each
round times, in alternating order:
  plain     a hand-written loop: 100 training steps (forward, loss, backward, step, zero_grad) over the same
            DataLoader, on a fresh model and optimizer
  lr_find   learn.lr_find(num_it=100, stop_div=False) on a fresh Learner: the whole call, so its snapshot of the
            model, optimizer and RNGs before the sweep and its restore after it are included. stop_div=False makes
            it run all 100 steps (this sweep diverges before lr=10 and would stop early, doing fewer steps than
            the plain loop)
Small steps (about a millisecond) are the hard case: per-step and fixed costs show most there.

Usage: python benchmarks/lr_find.py [--rounds 21] [--num-it 100]
Prints each contender's median and the median of the per-round ratios lr_find/plain (wall clock and CPU time).
Goal: lr_find/plain <= 1.15.
"""
import argparse
import torch
import torch.nn.functional as F

from nbloop.learner import Learner
from common import Clock, data, interleaved, mlp, report


def plain_steps(train, n):
    "n training steps of a hand-written loop (starting over at the end of an epoch, as lr_find does)."
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    clock, done = Clock(), 0
    while done < n:
        for xb, yb in train:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == n: break
    float(loss.detach())                        # a loop reads its last loss (a sync point on a GPU)
    return clock.elapsed()


def lr_find(train, valid, n):
    "The whole lr_find call on a fresh Learner (its creation left out)."
    learn = Learner(mlp(), train, valid, device='cpu')
    clock = Clock()
    res = learn.lr_find(num_it=n, stop_div=False)
    took = clock.elapsed()
    assert len(res.lrs) == n, f'lr_find did {len(res.lrs)} steps, not {n}'
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=21)
    ap.add_argument('--num-it', type=int, default=100)
    args = ap.parse_args()
    n = args.num_it
    torch.set_num_threads(1)
    train, valid = data()
    wall, cpu = interleaved({'plain': lambda: plain_steps(train, n), 'lr_find': lambda: lr_find(train, valid, n)},
                            args.rounds)
    print(f'{args.rounds} interleaved rounds of {n} training steps each, ms per run:')
    report(wall, cpu, [('lr_find', 'plain', '<= 1.15')])


if __name__ == '__main__':
    main()
