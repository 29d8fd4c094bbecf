"""A small training job for tests/test_ddp.py, run under torchrun (or `launch`, or as one plain process).

It trains a tiny MLP on data with everything that makes an exact distributed resume hard: a shuffled DataLoader,
dropout, and a random augmentation drawn from torch's global RNG in the Dataset's __getitem__, with every rank
seeded differently (--seed-per-rank). A CheckpointCallback writes every few steps and a CSVLogger logs.

  --die RANK:STEP:HOW   on RANK, before the training batch after STEP finished steps: HOW is 'kill' (SIGKILL
                        itself), 'term' (SIGTERM itself: only that rank is signalled) or 'exit' (os._exit(1), only
                        on the first attempt of an elastic run, TORCHELASTIC_RESTART_COUNT=0)
  --out FILE            rank 0 saves (torch.save) the plain model state, the history (without 'time'), the
                        predictions and targets of get_preds, validate()'s values and what the run observed
  --trace DIR           every rank appends the dataset indices of each training batch it ran to DIR/trace-rank<r>
  --mlflow URI          an MLflowLogger to that tracking server or store (experiment --experiment)
  --wandb DIR           a WandbLogger, offline, writing under DIR
  --audit DIR           every rank lists the files it opened for writing, renamed or linked under --root in
                        DIR/writes-rank<r>-<pid> at exit
"""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from nbloop.checkpoint import CheckpointCallback
from nbloop.core import Callback, unwrap_model
from nbloop.learner import Learner
from nbloop.loggers import CSVLogger
from nbloop.metrics import accuracy
from nbloop.training import EarlyStopping, GradientAccumulation, GradientClip, MixedPrecision, TerminateOnNaN

sys.path.insert(0, str(Path(__file__).parent))
from resume_job import N_CLASSES, N_FEATURES, NoisyData  # noqa: E402  (the data of the one-process resume tests)


class Die(Callback):
    "Die (or be signalled) on one rank before the batch after `step` finished training steps."
    order = 1
    def __init__(self, rank: int, step: int, how: str): self.rank, self.step, self.how = rank, step, how
    def before_batch(self, learn):
        if not learn.training or learn.train_iter != self.step or learn.runtime.rank != self.rank: return
        if self.how == 'kill': os.kill(os.getpid(), signal.SIGKILL)
        elif self.how == 'term' and learn.resumed_from is None: os.kill(os.getpid(), signal.SIGTERM)
        elif self.how == 'exit' and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0': os._exit(1)


class Trace(Callback):
    "Append the dataset indices of each training batch this rank runs (epoch, step, indices) to a file."
    order = 2
    def __init__(self, folder: Path): self.folder = folder
    def before_batch(self, learn):
        if not learn.training: return
        idx = learn.train_plan.batches[learn.iter]
        with open(self.folder / f'trace-rank{learn.runtime.rank}', 'a') as f:
            f.write(json.dumps([learn.epoch, learn.train_iter, [int(i) for i in idx]]) + '\n')


class Overflow(Callback):
    "Make the gradients of the batch after `step` finished steps infinite (a float16 overflow)."
    order = 6
    def __init__(self, step: int): self.step = step
    def after_loss(self, learn):
        if learn.training and learn.train_iter == self.step: learn.loss_grad = learn.loss_grad * float('inf')


class NaNLoss(Callback):
    "On one rank only, report a NaN loss for the batch after `step` finished steps (training goes on unharmed)."
    order = 6
    def __init__(self, rank: int, step: int): self.rank, self.step = rank, step
    def after_loss(self, learn):
        if learn.training and learn.train_iter == self.step and learn.runtime.rank == self.rank:
            learn.loss = torch.tensor(float('nan'))


def audit(root: Path, folder: Path) -> None:
    "Record the paths under `root` this process opens for writing, renames or links (an audit hook), at exit."
    root, seen = str(root.resolve()), set()
    def hook(event, args):
        if event == 'open' and args and isinstance(args[0], (str, Path)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in 'wax+')) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing: seen.add(os.path.abspath(str(args[0])))
        elif event in ('os.rename', 'os.replace', 'os.link') and len(args) >= 2:
            seen.add(os.path.abspath(str(args[1])))
    sys.addaudithook(hook)
    import atexit
    def dump():
        mine = sorted(p for p in seen if p.startswith(root) and '/trace-rank' not in p and '/writes-rank' not in p)
        rank = os.environ.get('RANK', '0')
        (folder / f'writes-rank{rank}-{os.getpid()}').write_text('\n'.join(mine))
    atexit.register(dump)


def full(t: torch.Tensor) -> torch.Tensor:
    "A tensor's full value, detached (a sharded DTensor gathered from every process)."
    return (t.full_tensor() if hasattr(t, 'full_tensor') else t).detach()


def local(t: torch.Tensor) -> torch.Tensor:
    "What this process holds of a tensor (a DTensor's own rows)."
    return t.to_local() if hasattr(t, 'to_local') else t


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--root', type=Path, required=True)
    ap.add_argument('--n-train', type=int, default=96)
    ap.add_argument('--n-valid', type=int, default=32)
    ap.add_argument('--bs', type=int, default=8)
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--every', type=int, default=4)
    ap.add_argument('--plain', action='store_true', help='no dropout, no augmentation, every rank seeded alike')
    ap.add_argument('--accum', type=int, default=0)
    ap.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default='fp32')
    ap.add_argument('--overflow-at', type=int, default=None)
    ap.add_argument('--compile', action='store_true')
    ap.add_argument('--count-allreduce', action='store_true')
    ap.add_argument('--die', default=None)
    ap.add_argument('--nan-at', default=None, help='RANK:STEP, with TerminateOnNaN')
    ap.add_argument('--lr-find', action='store_true')
    ap.add_argument('--vote-every-batch', action='store_true', help='the stop vote after every batch, not adaptive')
    ap.add_argument('--one-cycle', type=float, default=None, help='fit_one_cycle with this lr_max instead of fit')
    ap.add_argument('--resume', default=None)
    ap.add_argument('--out', type=Path, default=None)
    ap.add_argument('--trace', type=Path, default=None)
    ap.add_argument('--audit', type=Path, default=None)
    ap.add_argument('--async-save', action='store_true', help='CheckpointCallback(async_save=True)')
    ap.add_argument('--strategy', default=None, help="Learner(strategy=...): None, 'ddp' or 'fsdp'")
    ap.add_argument('--clip', type=float, default=None, help='GradientClip(max_norm)')
    ap.add_argument('--early-stop', action='store_true', help='EarlyStopping(patience=1, restore_best=True)')
    ap.add_argument('--no-pickle', action='store_true', help='pickle.load(s) and torch.load raise (a checkpoint never needs them)')
    ap.add_argument('--mlflow', default=None, help='MLflowLogger(tracking_uri=...)')
    ap.add_argument('--wandb', type=Path, default=None, help="WandbLogger(mode='offline', dir=...)")
    ap.add_argument('--experiment', default='nbloop', help='the MLflow experiment or W&B project')
    ap.add_argument('--slow-writer', type=float, default=0., help='each shard file write sleeps this long first (fsdp)')
    args = ap.parse_args(argv)
    if args.audit: audit(args.root, args.audit)
    if args.no_pickle:              # unpickling is refused, but for the messages between processes (c10d's objects,
        import pickle               # and what DistributedRuntime's gather and broadcast carry)
        def message(code) -> bool:
            return code.co_filename.endswith('distributed_c10d.py') or \
                (code.co_name == '_unboxed' and code.co_filename.endswith(os.path.join('nbloop', 'distributed.py')))
        def refusing(original):
            def refuse(*a, **k):
                frame = sys._getframe(1)
                while frame is not None and not message(frame.f_code): frame = frame.f_back
                if frame is None: raise AssertionError('something was unpickled that is no message between processes')
                return original(*a, **k)
            return refuse
        pickle.load, pickle.loads, torch.load = refusing(pickle.load), refusing(pickle.loads), refusing(torch.load)
    if args.vote_every_batch:
        from nbloop.distributed import DistributedRuntime
        DistributedRuntime.vote_interval = 0.
    if args.slow_writer:            # several training steps happen while one background write is in progress
        import time
        import nbloop.sharded
        fast = nbloop.sharded.write_checkpoint
        def slow(*a, **k):
            time.sleep(args.slow_writer)
            return fast(*a, **k)
        nbloop.sharded.write_checkpoint = slow
    rank = int(os.environ.get('RANK', 0))
    torch.manual_seed(0)                            # the same model everywhere
    noise = not args.plain
    model = nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Dropout(0.3 if noise else 0.), nn.Linear(32, N_CLASSES))
    torch.manual_seed(100 + (rank if noise else 0))   # the ranks' RNGs differ: they must still agree on the order
    train = DataLoader(NoisyData(args.n_train, 1, noise), batch_size=args.bs, shuffle=True)
    valid = DataLoader(NoisyData(args.n_valid, 2, False), batch_size=args.bs * 2)
    cbs = [CheckpointCallback(every_n_steps=args.every, keep_last=None, async_save=args.async_save), CSVLogger()]
    if args.accum: cbs.append(GradientAccumulation(args.accum))
    if args.clip: cbs.append(GradientClip(args.clip))
    if args.early_stop: cbs.append(EarlyStopping(patience=1, restore_best=True))
    if args.precision != 'fp32': cbs.append(MixedPrecision(torch.bfloat16 if args.precision == 'bf16' else torch.float16))
    if args.overflow_at is not None: cbs.append(Overflow(args.overflow_at))
    if args.die:
        r, step, how = args.die.split(':')
        cbs.append(Die(int(r), int(step), how))
    if args.nan_at:
        r, step = args.nan_at.split(':')
        cbs += [NaNLoss(int(r), int(step)), TerminateOnNaN()]
    if args.mlflow:
        from nbloop.trackers import MLflowLogger
        cbs.append(MLflowLogger(args.mlflow, experiment=args.experiment, params={'job': 'ddp_job'}))
    if args.wandb:
        from nbloop.trackers import WandbLogger
        cbs.append(WandbLogger(args.experiment, mode='offline', dir=args.wandb, params={'job': 'ddp_job'},
                               init_kwargs={'settings': {'console': 'off', 'silent': True}}))
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        cbs.append(Trace(args.trace))
    learn = Learner(model, train, valid, loss_func=F.cross_entropy, lr=1e-2, metrics=[accuracy], cbs=cbs,
                    device='cpu', path=args.root, compile=args.compile, strategy=args.strategy)
    allreduces = [0]
    if args.count_allreduce:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        def counting(state, bucket):
            allreduces[0] += 1
            return allreduce_hook(state, bucket)
        learn.model.register_comm_hook(None, counting)
    suggestion = None
    if args.lr_find:
        before = [full(p).clone() for p in learn.model.parameters()]
        with learn.no_bar(): suggestion = learn.lr_find(num_it=30).suggestion
        assert all(torch.equal(a, full(p)) for a, p in zip(before, learn.model.parameters())), 'lr_find changed the model'
    with learn.no_bar():
        if args.one_cycle: learn.fit_one_cycle(args.epochs, args.one_cycle, resume=args.resume)
        else: learn.fit(args.epochs, resume=args.resume)
    learn.save_weights(Path(args.root) / 'weights.safetensors')       # every rank calls it; rank 0 writes
    preds, targs = learn.get_preds()
    values = learn.validate()
    scaler = learn.get_cb(MixedPrecision).scaler if args.precision == 'fp16' else None
    result = {'model': {k: full(v).clone() for k, v in unwrap_model(learn.model).state_dict().items()},
              'history': [{k: v for k, v in row.items() if k != 'time'} for row in learn.recorder.history],
              'preds': preds, 'targs': targs, 'validate': values, 'world_size': learn.runtime.world_size,
              'ddp': type(learn.model).__name__, 'allreduces': allreduces[0], 'train_iter': learn.train_iter,
              'scale': None if scaler is None else scaler.get_scale(), 'resumed_from': str(learn.resumed_from),
              'suggestion': suggestion, 'tracker_run': next((cb.run_id for cb in learn.cbs if hasattr(cb, 'run_id')), None)}
    # every rank's weights, to check that they stay identical
    result['weights_by_rank'] = learn.runtime.gather(torch.cat([full(p).flatten() for p in learn.model.parameters()]))
    result['local_numel'] = learn.runtime.gather(sum(local(p).numel() for p in learn.model.parameters()))
    result['stopped_epoch'] = learn.get_cb(EarlyStopping).stopped_epoch if args.early_stop else None
    if rank == 0 and args.out: torch.save(result, args.out)
    globals()["LEARN"] = learn
    return {k: result[k] for k in ('history', 'world_size', 'train_iter')}


if __name__ == '__main__':
    main()
