"""What each part of the loop costs per batch, in CPU instructions: the hand-written loop, then the Learner without
callbacks (the loop itself), with its default callbacks (the Recorder and progress), and with the accuracy metric;
for training batches and for validation batches.

Timings of a few microseconds per batch drown in a shared machine's noise, and `instructions.py` counts whole
epochs, where a hash seed moves the count by about 0.3% (some 2.4M instructions of an epoch: as much as a change to
the loop saves). This counts the batches alone: one Python process runs under valgrind's callgrind, and between
its fits it asks callgrind for the count so far (`callgrind_control --dump`). Each variant fits once on 100 and once
on 400 batches; the difference over 300 batches is its cost per batch, with set-up, imports and the memory layout
left out. Batches are overhead.py's (the MLP 32→64→10, batches of 64, SGD, one thread), collated once into a list, so
that the data pipeline is the same object for every variant. The extra over the hand-written loop moves by 2k to
4k instructions from one run to the next; a hand-written training batch costs some 940k.

Usage: python benchmarks/perbatch.py    (needs valgrind; about 4 minutes)
"""
import glob
import io
import os
import re
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout

SIZES = (100, 400)                       # batches per fit: the difference is counted
PHASES = {'train': ('plain', 'loop', 'callbacks'), 'valid': ('plain', 'loop', 'callbacks', 'metric')}


def fit(variant, train, valid):
    "One fit of `variant` ('plain', or the Learner's 'loop', 'callbacks', 'metric') on these batches."
    import torch
    from common import mlp
    from overhead import plain_loop
    from nbloop.learner import Learner
    from nbloop.metrics import accuracy
    from nbloop.progress import ProgressCallback
    from nbloop.recorder import Recorder
    if variant == 'plain':     # (its validation needs batches: one, the same in both fits, when training is counted)
        with redirect_stdout(io.StringIO()): return plain_loop(1, train, valid or train[:1])
    learn = Learner(mlp(), train, valid, opt_func=torch.optim.SGD, lr=0.1, device='cpu',
                    metrics=[accuracy] if variant == 'metric' else [])
    with redirect_stdout(io.StringIO()), learn.removed_cbs([Recorder, ProgressCallback] if variant == 'loop' else []):
        learn.fit(1)


def child():
    "Under callgrind: every variant's fits, with a dump of the count after each."
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import data
    torch.set_num_threads(1)
    train = data()[0]
    batches = [b for _ in range(2) for b in train][:max(SIZES)]     # collated once: two epochs' batches of 64
    def dump(tag): subprocess.run(['callgrind_control', '--dump=' + tag, str(os.getpid())], capture_output=True)
    for phase, variants in PHASES.items():
        for v in variants: fit(v, batches[:20], batches[:20] if phase == 'valid' else None)   # warm-up
    dump('start')
    for phase, variants in PHASES.items():
        for v in variants:
            for n in SIZES:
                train, valid = (batches[:n], None) if phase == 'train' else (batches[:5], batches[:n])
                fit(v, train, valid)
                dump(f'{phase}.{v}.{n}')


def main():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'cg.out')
        env = dict(os.environ, NBLOOP_PERBATCH='child', PYTHONHASHSEED='0', OMP_NUM_THREADS='1',
                   OPENBLAS_NUM_THREADS='1')    # (numpy's BLAS threads would spin and count)
        proc = subprocess.run(['valgrind', '--tool=callgrind', f'--callgrind-out-file={out}', sys.executable,
                               os.path.abspath(__file__)], env=env, capture_output=True, text=True)
        if proc.returncode: raise RuntimeError(f'valgrind failed:\n{proc.stderr[-2000:]}')
        counts, order = {}, []
        for f in glob.glob(out + '.*'):
            text = open(f).read()
            tag = re.search(r'^desc: Trigger: dump (\S+)', text, re.M)
            if tag: counts[tag[1]] = int(re.search(r'^summary: (\d+)', text, re.M)[1])
    n = SIZES[1] - SIZES[0]
    print(f'instructions per batch (callgrind; a fit of {SIZES[1]} batches minus one of {SIZES[0]}; overhead.py\'s MLP, '
          f'batches of 64):')
    for phase, variants in PHASES.items():
        per = {v: (counts[f'{phase}.{v}.{SIZES[1]}'] - counts[f'{phase}.{v}.{SIZES[0]}']) / n for v in variants}
        base, parts = per['plain'], []
        for before, v in zip(variants, variants[1:]): parts.append(f'{v} {per[v] - per[before]:+,.0f}')
        print(f'  {phase:5}  plain {base:,.0f}, Learner {per[variants[-1]]:,.0f} ({per[variants[-1]] / base:.4f}); '
              f'the Learner\'s extra by part: {", ".join(parts)} (in all {per[variants[-1]] - base:+,.0f})')


if __name__ == '__main__':
    child() if os.environ.get('NBLOOP_PERBATCH') == 'child' else main()
