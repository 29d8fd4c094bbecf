"""The overhead of the Learner over a hand-written loop, counted in CPU instructions instead of seconds.

Timings on a shared machine swing by tens of percent from run to run; instruction counts (valgrind's callgrind)
are the same every time for the same program and inputs, whatever else the machine is doing, once Python's string
hashing is fixed (PYTHONHASHSEED). They still move with the memory layout: a hash seed, or a small change in the
code, moves an epoch's count by up to about 0.3%, so each count here is the mean over three hash seeds. This runs
overhead.py's job (an MLP 32→64→10 on 16,000 samples, batch 64, SGD, validation with accuracy) under callgrind for
1 and for 3 epochs, for the plain loop and for the Learner (default callbacks, no TTY so the progress line does
not animate), and prints the instructions per epoch (the difference of the two runs, halved: imports and set-up
cancel out) and their ratio. Time-throttled displays (live plot, animated bars) are left out: under valgrind's
~50× slowdown their timers would fire far more often than in a real run.

Usage: python benchmarks/instructions.py [--seeds N]    (needs valgrind; about 15 minutes on 2 cores)
Goal: learner/plain <= 1.05 per epoch.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
JOB = '''
import io, sys
from contextlib import redirect_stdout
sys.path.insert(0, {here!r})
import torch
from overhead import data, plain_loop, learner_loop
torch.set_num_threads(1)
which, epochs = sys.argv[1], int(sys.argv[2])
train, valid = data()
with redirect_stdout(io.StringIO()):
    (plain_loop if which == 'plain' else learner_loop)(epochs, train, valid)
'''


def instructions(script: Path, which: str, epochs: int, seed: int, out: Path) -> int:
    proc = subprocess.run(['valgrind', '--tool=callgrind', f'--callgrind-out-file={out}', sys.executable, str(script),
                           which, str(epochs)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONHASHSEED=str(seed)))
    m = re.search(r'Collected : (\d+)', proc.stderr)
    if proc.returncode or not m: raise RuntimeError(f'valgrind failed for {which} {epochs}:\n{proc.stderr[-2000:]}')
    return int(m[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, default=3, help='hash seeds to average over (each: 4 runs under valgrind)')
    seeds = range(parser.parse_args().seeds)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / 'job.py'
        script.write_text(JOB.format(here=str(HERE)))
        runs = [(w, e, s) for s in seeds for w in ('plain', 'learner') for e in (1, 3)]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            counts = dict(zip(runs, pool.map(lambda r: instructions(script, *r, Path(tmp) / f'cg.{r[0]}{r[1]}.{r[2]}'),
                                             runs)))
    per_epoch = {w: [(counts[(w, 3, s)] - counts[(w, 1, s)]) / 2 for s in seeds] for w in ('plain', 'learner')}
    for w, ns in per_epoch.items():
        print(f'{w:>8}: {statistics.mean(ns) / 1e6:8.1f} M instructions per epoch   '
              f'(per seed: {", ".join(f"{n / 1e6:.1f}" for n in ns)})')
    ratios = [l / p for l, p in zip(per_epoch['learner'], per_epoch['plain'])]
    print(f'ratio learner/plain: {statistics.mean(per_epoch["learner"]) / statistics.mean(per_epoch["plain"]):.3f} '
          f'per epoch   (per seed: {", ".join(f"{r:.3f}" for r in ratios)}; goal <= 1.05)')


if __name__ == '__main__':
    main()
