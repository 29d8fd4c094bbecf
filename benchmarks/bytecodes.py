"""Where the loop's own cost goes, per training batch: the Python bytecodes and calls the Learner runs beyond a
hand-written loop, function by function.

Timings of a few microseconds per batch drown in a shared machine's noise; counts of executed bytecodes do not:
they are the same on every run. On overhead.py's kind of job (the MLP 32→64→10, batches of 64, SGD, one thread),
the Learner's extra work per batch is almost all Python (the same tensor operations run in both loops, plus one
`detach` of the loss), and it costs about as much time as its bytecodes and calls suggest, at roughly 0.02 µs a
bytecode and a few tenths of a µs a call. This traces one 1-epoch and one 3-epoch training-only fit of each loop
(pre-collated batches in a list, so that the data pipeline is the same object for both) with `sys.settrace`
opcode events, and prints, for each function, the bytecodes and calls per training batch of the difference
(3 epochs minus 1: set-up and the first epoch cancel out), learner minus plain.

Usage: python benchmarks/bytecodes.py [--top 30]
"""
import argparse
import collections
import io
import sys
from contextlib import redirect_stdout

import torch

from common import data, mlp, train_epoch


def plain(epochs, batches):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs): train_epoch(model, opt, batches)


def learner(epochs, batches):
    from nbloop.learner import Learner
    Learner(mlp(), batches, None, opt_func=torch.optim.SGD, lr=0.1, device='cpu').fit(epochs)


def counts(run, epochs, batches) -> tuple[collections.Counter, collections.Counter]:
    "Bytecodes and calls by function ('file:qualname') while `run(epochs, batches)` runs."
    ops, calls = collections.Counter(), collections.Counter()
    def tracer(frame, event, arg):
        key = f'{frame.f_code.co_filename.rsplit("/", 1)[-1]}:{frame.f_code.co_qualname}'
        if event == 'call':
            calls[key] += 1
            frame.f_trace_opcodes = True
        elif event == 'opcode': ops[key] += 1
        return tracer
    with redirect_stdout(io.StringIO()):
        sys.settrace(tracer)
        try: run(epochs, batches)
        finally: sys.settrace(None)
    return ops, calls


def per_batch(run, batches) -> tuple[dict, dict]:
    "Bytecodes and calls per training batch by function: a 3-epoch fit minus a 1-epoch fit, over 2 epochs of batches."
    with redirect_stdout(io.StringIO()): run(1, batches)                 # imports and first-time work, untraced
    (o1, c1), (o3, c3) = counts(run, 1, batches), counts(run, 3, batches)
    n = 2 * len(batches)
    return ({k: (o3[k] - o1[k]) / n for k in o3 | o1}, {k: (c3[k] - c1[k]) / n for k in c3 | c1})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--top', type=int, default=30, help='how many functions to list')
    args = ap.parse_args()
    torch.set_num_threads(1)
    batches = list(data()[0])
    (po, pc), (lo, lc) = per_batch(plain, batches), per_batch(learner, batches)
    ops = {k: lo.get(k, 0) - po.get(k, 0) for k in po.keys() | lo.keys()}
    calls = {k: lc.get(k, 0) - pc.get(k, 0) for k in pc.keys() | lc.keys()}
    print(f'per training batch: plain {sum(po.values()):.0f} bytecodes, {sum(pc.values()):.1f} calls; learner '
          f'{sum(lo.values()):.0f} bytecodes, {sum(lc.values()):.1f} calls; the learner\'s own: '
          f'{sum(ops.values()):+.0f} bytecodes, {sum(calls.values()):+.1f} calls')
    for k, v in sorted(ops.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        if abs(v) >= 0.5 or abs(calls[k]) >= 0.5: print(f'{v:+8.1f} bytecodes {calls[k]:+6.2f} calls  {k}')


if __name__ == '__main__':
    main()
