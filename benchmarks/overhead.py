"""Overhead of nbloop's Learner against a hand-written PyTorch loop, measured side by side.

The job (issue 2): an MLP 32→64→10 on 16,000 random samples, batch 64, SGD, CPU, one thread, validation on
4,000 samples with accuracy. Rounds interleave the contenders so that machine noise hits them alike; each
reports its median ms/epoch (each run timed whole, set-up and end of fit included, divided by its epochs),
by the wall clock and by CPU time (the process's own time: less disturbed by other work on a shared machine),
and the script prints the ratios.

Contenders:
  plain      the hand-written loop (forward, loss, backward, step, zero_grad; validation with loss and accuracy)
  learner    Learner with its default callbacks (Recorder, ProgressCallback) and the accuracy metric
  liveplot   the same plus LivePlotCallback rendering to an off-screen canvas (issue 4: ≤ 2 % more than learner)

Usage: python benchmarks/overhead.py [--rounds 21] [--epochs 3]
The ratios are medians of per-round ratios (each round's runs ran back to back), which cancels the slow
drifts of a shared machine better than a ratio of medians.
Goal: learner/plain ≤ 1.05; liveplot/learner ≤ 1.02. Measured the same way, with their progress bars on:
fastai 2.6×, Lightning 2.9×, ignite 1.3×.
"""
import argparse
import io
from contextlib import redirect_stdout

import torch
import torch.nn.functional as F

from nbloop.learner import Learner
from nbloop.metrics import accuracy
from nbloop.plots import LivePlotCallback
from common import Clock, data, interleaved, mlp, report


def plain_loop(epochs, train, valid):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs):
        model.train()
        for xb, yb in train:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        total, correct, n = 0., 0, 0
        with torch.no_grad():
            for xb, yb in valid:
                pred = model(xb)
                total += F.cross_entropy(pred, yb, reduction='sum')
                correct += (pred.argmax(1) == yb).sum()
                n += len(yb)
        print(f'{float(total / n):.4f} {float(correct / n):.4f}')   # the epoch's results, as a loop reports them


def learner_loop(epochs, train, valid, cbs=()):
    learn = Learner(mlp(), train, valid, opt_func=torch.optim.SGD, lr=0.1, metrics=[accuracy], device='cpu', cbs=cbs)
    learn.fit(epochs)


def timed(fn, epochs):
    "Wall-clock and CPU seconds per epoch of one whole run (set-up, every epoch, and the end of fit)."
    with redirect_stdout(io.StringIO()):
        clock = Clock()
        fn()
        w, c = clock.elapsed()
        return w / epochs, c / epochs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=21)
    ap.add_argument('--epochs', type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, valid = data()
    e = args.epochs
    wall, cpu = interleaved({'plain': lambda: timed(lambda: plain_loop(e, train, valid), e),
                             'learner': lambda: timed(lambda: learner_loop(e, train, valid), e),
                             'liveplot': lambda: timed(lambda: learner_loop(e, train, valid, [LivePlotCallback(mode='offscreen')]), e)},
                            args.rounds)
    print(f'{args.rounds} interleaved rounds, each contender a whole run of {e} epochs per round '
          f'(set-up and end of fit included), ms per epoch:')
    report(wall, cpu, [('learner', 'plain', '<= 1.05'), ('liveplot', 'learner', '<= 1.02')])


if __name__ == '__main__':
    main()
