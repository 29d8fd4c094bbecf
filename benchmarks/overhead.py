"""The loop's own cost in one process: nbloop's Learner against a hand-written PyTorch loop, side by side.

The job (issue 20): an MLP 32→64→10 on 16,000 random training samples and 4,000 validation samples, batch 64,
SGD lr 0.1, CPU, one thread, validation with its loss and accuracy. Each contender runs a fit of `--epochs`
epochs and notes the time at the end of every epoch; its figure is the time per epoch from the end of the first
epoch to the end of the last (the fit's start and end, and the first epoch's warm-up, are left out). Rounds
interleave the contenders (alternating their order) so that machine noise hits them alike; the script prints
medians and quartiles of ms per epoch, and the median of the per-round ratios.

Contenders:
  plain      the hand-written loop (forward, loss, backward, step, zero_grad; validation sums of loss and hits)
  floor      (--floor) the hand-written loop that also keeps what the Learner gives back, written inline with no
             function of its own: each training batch's loss (detached, on the device), learning rate and size;
             validation losses and hits per batch on the device, reduced once at the epoch's end; a throttled
             clock check for progress. No loop that records this can cost less, so it is the floor of the ratio.
  learner    Learner with its default callbacks (Recorder, ProgressCallback: a plain table, stdout is no TTY)
             and the accuracy metric
  liveplot   (--liveplot) the same plus LivePlotCallback rendering to an off-screen canvas

  --aa       also runs the hand-written loop a second time, as a contender of its own (plain2), and prints
             plain2/plain: the same code against itself, so the spread that this machine's noise alone gives a ratio

  --parts    also times the hand-written loop without its accuracy line, the Learner without metrics, and the Learner
             without callbacks or metrics (bare), and prints the Learner's extra time split into the loop itself,
             its callbacks and its metric

Usage: python benchmarks/overhead.py [--rounds 15] [--epochs 4] [--width 64] [--liveplot] [--floor] [--aa] [--parts]
Goal: learner/plain <= 1.03. Peers on the same job (issue 20): ignite 1.12, fastai 2.06, Lightning 2.63.
"""
import argparse
import io
import statistics
import time
from contextlib import redirect_stdout

import torch
import torch.nn.functional as F

from nbloop.core import Callback
from nbloop.learner import Learner
from nbloop.metrics import accuracy
from nbloop.plots import LivePlotCallback
from nbloop.progress import ProgressCallback
from nbloop.recorder import Recorder
from common import data, interleaved, mlp, report, train_epoch


def plain_loop(epochs, train, valid, width=64, ends=None, hits=True):
    "The hand-written loop (`hits`: with its accuracy); `ends` (a list) gets (wall, CPU) times at the end of every epoch."
    model = mlp(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs):
        train_epoch(model, opt, train)
        model.eval()
        total, correct, n = 0., 0, 0
        with torch.no_grad():
            for xb, yb in valid:
                pred = model(xb)
                total += F.cross_entropy(pred, yb, reduction='sum')
                if hits: correct += (pred.argmax(1) == yb).sum()
                n += len(yb)
        print(f'{float(total / n):.4f} {float(correct / n):.4f}')   # the epoch's results, as a loop reports them
        if ends is not None: ends.append((time.perf_counter(), time.process_time()))


def floor_loop(epochs, train, valid, width=64, ends=None):
    "The hand-written loop plus the Learner's records, inline; `ends` (a list) gets (wall, CPU) times per epoch."
    model = mlp(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    group, losses, lrs, sizes, shown = opt.param_groups[0], [], [], [], time.monotonic()
    for _ in range(epochs):
        model.train()
        for xb, yb in train:
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach()); lrs.append(group['lr']); sizes.append(yb.shape[0])
            if (now := time.monotonic()) > shown: shown = now + 0.2                # where progress would redraw
        epoch_losses, losses = torch.stack(losses).tolist(), []                  # one host copy per epoch
        model.eval()
        vlosses, hits, n = [], [], []
        with torch.no_grad():
            for xb, yb in valid:
                pred = model(xb)
                vlosses.append(F.cross_entropy(pred, yb)); hits.append((pred.argmax(1) == yb).sum()); n.append(len(yb))
        w = torch.tensor(n, dtype=torch.float32)
        print(f'{float((torch.stack(vlosses) * w).sum() / w.sum()):.4f} {float(torch.stack(hits).sum() / w.sum()):.4f}')
        if ends is not None: ends.append((time.perf_counter(), time.process_time()))


class EpochEnds(Callback):
    "Note the time at the end of every epoch, after every other callback's after_epoch."
    order = 10_000
    def __init__(self, ends: list): self.ends = ends
    def after_epoch(self, learn): self.ends.append((time.perf_counter(), time.process_time()))


def learner_loop(epochs, train, valid, cbs=(), width=64, ends=None, metrics=(accuracy,), bare=False):
    """The same job with a Learner; `ends` (a list) gets (wall, CPU) times at the end of every epoch. `bare`: without
    its default callbacks (the Recorder and progress), so that only the loop itself runs."""
    cbs = [*cbs, EpochEnds(ends)] if ends is not None else list(cbs)
    learn = Learner(mlp(width), train, valid, opt_func=torch.optim.SGD, lr=0.1, metrics=list(metrics), device='cpu',
                    cbs=cbs)
    with learn.removed_cbs([Recorder, ProgressCallback] if bare else []): learn.fit(epochs)


def per_epoch(run) -> tuple[float, float]:
    "Wall-clock and CPU seconds per epoch, from the end of the first epoch to the end of the last."
    ends = []
    with redirect_stdout(io.StringIO()): run(ends)
    return tuple((last - first) / (len(ends) - 1) for first, last in zip(ends[0], ends[-1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=15)
    ap.add_argument('--epochs', type=int, default=4)
    ap.add_argument('--width', type=int, default=64, help='hidden width of the MLP (64: the job; 512: real work dominates)')
    ap.add_argument('--liveplot', action='store_true', help='also time the Learner with LivePlotCallback')
    ap.add_argument('--floor', action='store_true', help="also time the hand-written loop that keeps the Learner's records")
    ap.add_argument('--aa', action='store_true', help='also run the hand-written loop against itself (the noise)')
    ap.add_argument('--parts', action='store_true', help='also time the parts of the difference (see below)')
    args = ap.parse_args()
    if args.epochs < 2: ap.error('--epochs must be at least 2 (the first epoch is the warm-up)')
    if args.rounds < 2: ap.error('--rounds must be at least 2 (quartiles need two)')
    torch.set_num_threads(1)
    train, valid = data()
    e, w = args.epochs, args.width
    contenders = {'plain': lambda: per_epoch(lambda ends: plain_loop(e, train, valid, w, ends)),
                  'learner': lambda: per_epoch(lambda ends: learner_loop(e, train, valid, (), w, ends))}
    if args.aa: contenders['plain2'] = contenders['plain']
    if args.floor: contenders['floor'] = lambda: per_epoch(lambda ends: floor_loop(e, train, valid, w, ends))
    if args.liveplot:
        contenders['liveplot'] = lambda: per_epoch(
            lambda ends: learner_loop(e, train, valid, [LivePlotCallback(mode='offscreen')], w, ends))
    if args.parts:
        contenders['plain_nohits'] = lambda: per_epoch(lambda ends: plain_loop(e, train, valid, w, ends, hits=False))
        contenders['bare'] = lambda: per_epoch(lambda ends: learner_loop(e, train, valid, (), w, ends, (), bare=True))
        contenders['nometrics'] = lambda: per_epoch(lambda ends: learner_loop(e, train, valid, (), w, ends, ()))
    wall, cpu = interleaved(contenders, args.rounds)
    print(f'torch {torch.__version__}, one process, one thread; MLP 32->{w}->10, 16k + 4k samples, batch 64; '
          f'{args.rounds} interleaved rounds, ms per epoch (epochs 2..{e} of each fit):')
    report(wall, cpu, [('learner', 'plain', '<= 1.03')] + ([('floor', 'plain', None), ('learner', 'floor', None)]
                       if args.floor else []) + ([('liveplot', 'learner', '<= 1.02')] if args.liveplot else [])
           + ([('plain2', 'plain', None)] if args.aa else []))
    if args.parts: report_parts(wall)


def report_parts(wall: dict, base: str = 'plain_nohits') -> None:
    """The Learner's extra time per epoch, part by part: medians over the rounds of differences measured in the same
    round. Forward, loss, backward, step and data are the same calls in both loops, so what differs is:
    the loop itself (the bare Learner, without callbacks or metrics, against the hand-written loop `base`: without
    its hits line here; ddp.py's, whose validation sums its hits with its loss, has no such line), the callbacks
    (the Recorder and progress: the Learner without metrics against the bare one), and the metric (accuracy in
    the Learner against the hits line of the hand-written loop)."""
    med = lambda f: statistics.median(f(r) for r in range(len(wall['plain']))) * 1000
    plain = med(lambda r: wall['plain'][r])
    hits = lambda r: wall['plain'][r] - wall[base][r]
    parts = [('loop', lambda r: wall['bare'][r] - wall[base][r]),
             ('callbacks', lambda r: wall['nometrics'][r] - wall['bare'][r]),
             ('metrics', lambda r: wall['learner'][r] - wall['nometrics'][r] - hits(r)),
             ('total', lambda r: wall['learner'][r] - wall['plain'][r])]
    print(f'the Learner\'s extra time per epoch, by part (medians of per-round differences; plain: {plain:.1f} ms):')
    for name, f in parts: print(f'{name:>10}: {med(f):+6.2f} ms  ({med(f) / plain * 100:+.1f}% of plain)')


if __name__ == '__main__':
    main()
