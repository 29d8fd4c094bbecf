"""Throughput on one GPU in fp32 and bf16, and the Learner's overhead against a hand-written loop, side by side.

Workloads (synthetic data already on the GPU, reshuffled on the GPU every epoch; AdamW, lr 1e-3):
  cnn32        three conv layers with batch norm on 32x32 RGB images, 10 classes, batch 512
  transformer  a 4-layer pre-norm causal transformer (d=256, 4 heads) on 128-token sequences, vocab 4096, batch 64
each in fp32 and in bf16 (torch.autocast; in nbloop, MixedPrecision(torch.bfloat16)).

Contenders, for each workload and precision, in interleaved rounds (alternating order, so that drifts hit both
alike); each run is timed whole, from creating the model to the last result on the host:
  plain    a hand-written loop: forward, loss, backward, step, zero_grad; the epoch's mean loss read once per epoch
  learner  Learner(model, data, opt_func=AdamW) with its default callbacks (Recorder, ProgressCallback); stdout is
           captured, so the progress callback prints its table rows and draws no bar, as in a log file
The overhead is the median over rounds of learner/plain (each round's two runs ran back to back). Goal: <= 1.03.
The number of batches per run is set so that one plain run takes about --seconds. Without CUDA the script runs
tiny sizes on the CPU, only to show that it works.

Usage: python benchmarks/gpu.py [--rounds 9] [--seconds 0.4]
"""
import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout

import torch
import torch.nn.functional as F
from torch import nn

from nbloop.learner import Learner
from nbloop.training import MixedPrecision
from common import interleaved, quartiles

GOAL = 1.03


class DeviceBatches:
    "`n_batches` batches of `batch_size` from `x`, `y` (on the device), in a fresh order each pass, drawn on the device."
    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, n_batches: int):
        self.x, self.y, self.batch_size, self.n_batches = x, y, batch_size, n_batches

    def __len__(self): return self.n_batches

    def __iter__(self):
        bs, pool = self.batch_size, len(self.x) // self.batch_size
        perm = torch.randperm(pool * bs, device=self.x.device)
        for i in range(self.n_batches):
            idx = perm[(i % pool) * bs:(i % pool + 1) * bs]
            yield self.x[idx], self.y[idx]


class Block(nn.Module):
    "A pre-norm transformer block: causal self-attention (scaled_dot_product_attention), then a GELU MLP."
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq: int):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, x): return self.head(self.ln(self.blocks(self.emb(x) + self.pos[:x.shape[1]])))


def lm_loss(pred: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(pred.flatten(0, 1), targ.flatten())


def cnn(width: int) -> nn.Module:
    w = width
    return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                         nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                         nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))


def workloads(device: torch.device, tiny: bool) -> dict:
    "{name: (make_model, loss_func, x, y, batch_size, what an example is)}; data on `device`."
    g = torch.Generator(device=device).manual_seed(0)
    bs_img, width = (32, 8) if tiny else (512, 64)
    bs_seq, vocab, d, heads, layers, seq = (8, 256, 64, 2, 2, 32) if tiny else (64, 4096, 256, 4, 4, 128)
    pool = 8 if tiny else 32        # batches of distinct data; longer runs cycle through them
    imgs = torch.randn(pool * bs_img, 3, 32, 32, device=device, generator=g)
    labels = torch.randint(0, 10, (pool * bs_img,), device=device, generator=g)
    toks = torch.randint(0, vocab, (pool * bs_seq, seq + 1), device=device, generator=g)
    return {'cnn32': (lambda: cnn(width), F.cross_entropy, imgs, labels, bs_img, 'image'),
            'transformer': (lambda: TinyLM(vocab, d, heads, layers, seq), lm_loss, toks[:, :-1].contiguous(),
                            toks[:, 1:].contiguous(), bs_seq, f'sequence of {seq} tokens')}


def autocast_for(device: torch.device, dtype):
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext


def plain_run(make_model, loss_func, data, epochs: int, device: torch.device, dtype) -> None:
    "The hand-written loop."
    torch.manual_seed(0)
    with device: model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = autocast_for(device, dtype)
    for epoch in range(epochs):
        model.train()
        losses = []
        for xb, yb in data:
            with autocast():
                loss = loss_func(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        print(f'epoch {epoch}: loss {torch.stack(losses).float().mean().item():.4f}')   # sync point: once per epoch


def learner_run(make_model, loss_func, data, epochs: int, device: torch.device, dtype, path: str) -> None:
    "The same job with nbloop's Learner and its default callbacks."
    torch.manual_seed(0)
    with device: model = make_model()
    cbs = [MixedPrecision(dtype)] if dtype is not None else []
    Learner(model, data, None, loss_func=loss_func, opt_func=torch.optim.AdamW, lr=1e-3, cbs=cbs, device=device,
            path=path).fit(epochs)


def timed(fn, device: torch.device):
    "Wall-clock and CPU seconds of `fn()`, its printing captured, the device drained before and after."
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with redirect_stdout(io.StringIO()):
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=9)
    ap.add_argument('--seconds', type=float, default=0.4, help='about how long one plain run takes')
    ap.add_argument('--epochs', type=int, default=2)
    ap.add_argument('--budget', type=float, default=90, help='seconds; past it, the remaining rows run 3 rounds')
    args = ap.parse_args()
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device('cuda', torch.cuda.current_device()) if cuda else torch.device('cpu')
    if cuda:
        name = torch.cuda.get_device_name(device)
        print(f'nbloop GPU benchmark on {name}: torch {torch.__version__}, CUDA {torch.version.cuda}; '
              f'{args.rounds} interleaved rounds per row')
    else:
        args.rounds, args.seconds = min(args.rounds, 3), min(args.seconds, 0.15)
        torch.set_num_threads(1)
        print(f'nbloop GPU benchmark: NO CUDA here (torch {torch.__version__}), so it runs tiny sizes on the CPU, '
              f'one thread, {args.rounds} rounds, only to show that it works; these numbers say nothing about a GPU')
    bf16 = torch.bfloat16
    rows = []
    with tempfile.TemporaryDirectory() as path:
        for wname, (make_model, loss_func, x, y, bs, example) in workloads(device, tiny=not cuda).items():
            for dname, dtype in (('fp32', None), ('bf16', bf16)):
                def run(kind: str, n_batches: int):
                    data = DeviceBatches(x, y, bs, n_batches)
                    if kind == 'plain': return lambda: timed(lambda: plain_run(make_model, loss_func, data, args.epochs, device, dtype), device)
                    return lambda: timed(lambda: learner_run(make_model, loss_func, data, args.epochs, device, dtype, path), device)
                # calibrate: how many batches make a plain run last about --seconds
                run('plain', 4)()
                w4, _ = run('plain', 4)()
                w12, _ = run('plain', 12)()
                per_step = max((w12 - w4) / (8 * args.epochs), 1e-6)
                fixed = max(w4 - 4 * args.epochs * per_step, 0.)
                n = int(min(max((args.seconds - fixed) / (args.epochs * per_step), 8), 400))
                rounds = args.rounds if time.perf_counter() - t_start < args.budget else min(args.rounds, 3)
                wall, cpu = interleaved({'plain': run('plain', n), 'learner': run('learner', n)}, rounds)
                steps = n * args.epochs
                ratios = [a / b for a, b in zip(wall['learner'], wall['plain'])]
                lo, med, hi = quartiles(ratios)
                rows.append({'workload': wname, 'dtype': dname, 'batch': bs, 'steps': steps, 'example': example, 'rounds': rounds,
                             'plain': steps * bs / statistics.median(wall['plain']),
                             'learner': steps * bs / statistics.median(wall['learner']),
                             'ratio': (lo, med, hi),
                             'extra_us': (statistics.median(wall['learner']) - statistics.median(wall['plain'])) / steps * 1e6,
                             'step_ms': statistics.median(wall['plain']) / steps * 1e3})
                r = rows[-1]
                print(f'  {wname} {dname}: done ({r["step_ms"]:.2f} ms per plain step)', file=sys.stderr, flush=True)

    print(f'each run: create the model and AdamW, then {args.epochs} epochs of `steps/run` / {args.epochs} batches; '
          f'examples/s from the median run')
    head = (f'{"workload":<12} {"dtype":<5} {"batch":>5} {"steps/run":>9} {"plain ex/s":>12} {"learner ex/s":>13} '
            f'{"ms/step":>8} {"learner/plain (quartiles)":>27} {"extra us/step":>13}')
    print(head)
    print('-' * len(head))
    for r in rows:
        lo, med, hi = r['ratio']
        print(f'{r["workload"]:<12} {r["dtype"]:<5} {r["batch"]:>5} {r["steps"]:>9} {r["plain"]:>12,.0f} '
              f'{r["learner"]:>13,.0f} {r["step_ms"]:>8.2f} {f"{med:.3f} ({lo:.3f} .. {hi:.3f})":>27} '
              f'{r["extra_us"]:>13.0f}')
    for wname in dict.fromkeys(r['workload'] for r in rows):
        by = {r['dtype']: r for r in rows if r['workload'] == wname}
        print(f'{wname}: one example is one {by["fp32"]["example"]}; bf16 speed-up (plain loop) '
              f'{by["bf16"]["plain"] / by["fp32"]["plain"]:.2f}x, (learner) {by["bf16"]["learner"] / by["fp32"]["learner"]:.2f}x')
    over = [f'{r["workload"]} {r["dtype"]} ({r["ratio"][1]:.3f})' for r in rows if r['ratio'][1] > GOAL]
    verdict = 'met by every row' if not over else 'NOT met by: ' + ', '.join(over)
    if any(r['rounds'] != args.rounds for r in rows):
        print(f'note: past the {args.budget:.0f} s budget, some rows ran 3 rounds only: '
              + ', '.join(f'{r["workload"]} {r["dtype"]}' for r in rows if r['rounds'] != args.rounds))
    print(f'goal: learner/plain <= {GOAL} (median of per-round ratios): {verdict}'
          + ('' if cuda else ' [CPU run: not meaningful]'))
    print(f'total {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
    main()
