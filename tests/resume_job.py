"""A small, deterministically seeded training job that tests/test_resume.py kills and resumes in separate processes.

It trains a tiny MLP with everything that makes exact resume hard: a shuffled DataLoader, dropout, and a random
augmentation drawn from torch's global RNG inside the Dataset's __getitem__ (so with --num-workers it is drawn in
the workers). A CheckpointCallback writes every few steps (and at each epoch's end) to the folder given.

The parent test decides where the job dies; the job only stops there and waits:
  --pause train:S        before the training batch that follows S finished steps (S = 0 .. total-1)
  --pause valid:S:I      before validation batch I of the validation that follows S finished steps
  --pause write:N        inside the N-th checkpoint write: the first half of the temporary file is on disk
While paused it writes the marker file (--marker) and sleeps (up to 60 s, then exits with status 3); the parent
SIGKILLs or SIGTERMs it. A SIGTERM ends the pause at once, so the learner stops at the next batch boundary.
  --fail-writes-after N  after the N-th checkpoint write, lower RLIMIT_FSIZE below a checkpoint's size (SIGXFSZ
                         ignored), so the next write fails like on a full disk

At the end of a fit that completes, --out gets (torch.save) the model and optimizer state, the recorder history
(without 'time') and the final torch RNG state.
"""
import argparse
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import nbloop.ckpt_format as ckpt
from nbloop.checkpoint import CheckpointCallback
from nbloop.core import Callback
from nbloop.learner import Learner

N_TRAIN, N_VALID, BATCH, N_FEATURES, N_CLASSES = 96, 32, 16, 8, 3   # 6 training and 2 validation batches per epoch
EPOCHS, EVERY_N_STEPS = 3, 4
STEPS_PER_EPOCH = N_TRAIN // BATCH
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


class NoisyData(Dataset):
    "Fixed points whose features get fresh noise from torch's global RNG at every access (a random augmentation)."
    def __init__(self, n: int, seed: int, augment: bool):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, N_FEATURES, generator=g)
        self.y = (self.x @ torch.randn(N_FEATURES, N_CLASSES, generator=g)).argmax(1)
        self.augment = augment

    def __len__(self): return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment: x = x + 0.1 * torch.randn(N_FEATURES)
        return x, self.y[i]


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, N_CLASSES))


def pause(marker: Path, what: str) -> None:
    "Write `marker` and wait for the parent to kill us; a SIGTERM (handled by the learner) ends the wait early."
    got, main = [], threading.current_thread() is threading.main_thread()   # (a background write pauses in its thread:
    previous = signal.getsignal(signal.SIGTERM)                              # only SIGKILL ends that pause)
    def on_term(signum, frame):
        got.append(signum)
        if callable(previous): previous(signum, frame)
    if main: signal.signal(signal.SIGTERM, on_term)
    try:
        tmp = marker.with_name(marker.name + '.tmp')
        tmp.write_text(what)
        os.replace(tmp, marker)              # the parent never sees a half-written marker
        deadline = time.monotonic() + 60
        while not got:
            if time.monotonic() > deadline:
                print(f'resume_job: nobody killed me while paused at {what}', file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.01)
    finally:
        if main: signal.signal(signal.SIGTERM, previous)


class PauseAt(Callback):
    "Pause before a given training or validation batch (stateless, so checkpoints don't depend on it)."
    order = -10

    def __init__(self, phase: str, step: int, valid_iter: int, marker: Path):
        self.phase, self.step, self.valid_iter, self.marker = phase, step, valid_iter, marker

    def before_batch(self, learn):
        if learn.train_iter != self.step: return
        if self.phase == 'train' and learn.training:
            pause(self.marker, f'train:{self.step}')
        elif self.phase == 'valid' and not learn.training and learn.iter == self.valid_iter:
            pause(self.marker, f'valid:{self.step}:{self.valid_iter}')


def hook_writes(pause_at: int | None, fail_after: int | None, marker: Path | None) -> None:
    "Wrap nbloop.ckpt_format.write_checkpoint (which every checkpoint write goes through) to pause in or fail a write."
    real, count = ckpt.write_checkpoint, [0]

    def write_checkpoint(path, tensors, state=None, metadata=None):
        count[0] += 1
        path = Path(path)
        if count[0] == pause_at:
            # Produce the real bytes elsewhere, then put the first half of them where nbloop puts its temporary
            # file, as if the process died while writing it.
            scratch = real(path.parent.parent / f'scratch-{os.getpid()}.safetensors', tensors, state, metadata)
            data = scratch.read_bytes()
            scratch.unlink()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(ckpt.temporary_path(path), 'wb') as f:
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            pause(marker, f'write:{pause_at}:{path.name}')
        out = real(path, tensors, state, metadata)
        if count[0] == fail_after:
            limit = out.stat().st_size // 2
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            print(f'resume_job: RLIMIT_FSIZE lowered to {limit} bytes after writing {out}', file=sys.stderr, flush=True)
        return out

    if fail_after is not None: signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # (here: a write may run in a thread)
    ckpt.write_checkpoint = write_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('folder', type=Path, help='the learner path; checkpoints go to <folder>/checkpoints')
    ap.add_argument('--out', type=Path, help='where to torch.save the final state')
    ap.add_argument('--resume', nargs='?', const='last', default=None, help="resume: 'last' (default) or a path")
    ap.add_argument('--num-workers', type=int, default=0)
    ap.add_argument('--pause', default=None, help='train:S, valid:S:I or write:N')
    ap.add_argument('--marker', type=Path, default=None, help='the file written when the job pauses')
    ap.add_argument('--fail-writes-after', type=int, default=None)
    ap.add_argument('--async-save', action='store_true', help='CheckpointCallback(async_save=True)')
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_dl = DataLoader(NoisyData(N_TRAIN, 1, augment=True), batch_size=BATCH, shuffle=True,
                          num_workers=args.num_workers)
    valid_dl = DataLoader(NoisyData(N_VALID, 2, augment=False), batch_size=BATCH, num_workers=args.num_workers)
    cbs = [CheckpointCallback(every_n_steps=EVERY_N_STEPS, keep_last=3, async_save=args.async_save)]
    pause_write = None
    if args.pause:
        kind, *nums = args.pause.split(':')
        if kind == 'write': pause_write = int(nums[0])
        else: cbs.append(PauseAt(kind, int(nums[0]), int(nums[1]) if len(nums) > 1 else 0, args.marker))
    if pause_write is not None or args.fail_writes_after is not None:
        hook_writes(pause_write, args.fail_writes_after, args.marker)
    learn = Learner(model(), train_dl, valid_dl, lr=1e-2, cbs=cbs, device='cpu', path=args.folder)
    learn.fit(EPOCHS, resume=args.resume)

    if args.out is not None:
        torch.save({'model': learn.model.state_dict(), 'opt': learn.opt.state_dict(),
                    'history': [{k: v for k, v in r.items() if k != 'time'} for r in learn.recorder.history],
                    'rng': torch.get_rng_state(),
                    'resumed_from': None if learn.resumed_from is None else str(learn.resumed_from)}, args.out)


if __name__ == '__main__':
    main()
