"""The attack suite, part 1: the loop, resume and bad input, tried as a hostile user would (issue 8).

Each test is one attack from the reliability review and asserts the behaviour nbloop promises: a resume that is
bit-exact (`torch.equal` against an uninterrupted run), a checkpoint that holds every callback's state as of the end
of its event, cleanup that always runs, and errors that name what was wrong. The other parts are
tests/test_attacks_checkpoint.py (crafted files, rotation, selection), tests/test_attacks_metrics.py and
tests/test_attacks_ddp.py (several processes, through `launch`).
Everything runs in-process on tiny CPU fixtures, except the kills, which need a process of their own.
"""
import io
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from conftest import env_for_subprocess
from nbloop.all import *
from nbloop.core import CallbackError
from nbloop.learner import FitError, LossError, ModelError, EmptyDataError, synth_data, synth_learner


def crash_at(event: str, step: int):
    "A callback whose `event` method dies like a killed process once train_iter == step: an error, so no interrupt checkpoint is written."
    def die(self, learn):
        if learn.train_iter == step: raise RuntimeError('simulated crash')
    return type('CrashAt', (Callback,), {'order': 200, event: die})()


def weights(learn):
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


def assert_same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa: assert torch.equal(wa[k], wb[k]), f'weights differ at {k}'
    strip = lambda h: [{k: v for k, v in r.items() if k != 'time'} for r in h]
    assert strip(a.recorder.history) == strip(b.recorder.history)


def quiet_fit(learn, *args, **kwargs):
    with redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return learn.fit(*args, **kwargs)


# -- 1. the data pipeline's own generators -------------------------------------------------------------------------
def generator_learner(tmp_path, kind: str, extra=()):
    torch.manual_seed(0)
    x, y = torch.randn(96, 4), torch.randint(0, 3, (96,))
    ds = TensorDataset(x, y)
    g = torch.Generator().manual_seed(1234)
    if kind == 'loader': train = DataLoader(ds, batch_size=16, shuffle=True, generator=g)
    else: train = DataLoader(ds, batch_size=16, sampler=RandomSampler(ds, generator=g))
    valid = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=16)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    return Learner(model, train, valid, lr=1e-2, device='cpu', path=tmp_path,
                   cbs=[CheckpointCallback(every_n_steps=4), *extra])


@pytest.mark.parametrize('kind', ['loader', 'sampler'])
@pytest.mark.parametrize('crash_step', [8, 12])     # mid-epoch 1, and just after epoch 1's end checkpoint
def test_resume_with_own_generator_is_exact(tmp_path, kind, crash_step):
    ref = generator_learner(tmp_path / 'ref', kind)
    quiet_fit(ref, 4)
    run = generator_learner(tmp_path / 'run', kind)
    with pytest.raises(RuntimeError, match='simulated crash'): quiet_fit(run, 4, cbs=[crash_at('after_batch', crash_step + 1)])
    resumed = generator_learner(tmp_path / 'run', kind)
    quiet_fit(resumed, 4, resume='last')
    assert_same_run(ref, resumed)


# -- 2. checkpoint state as of the end of its event ----------------------------------------------------------------
class Plateau(Callback):
    "Overwrites valid_loss with a fixed curve, so EarlyStopping's decisions are known in advance."
    order = 51
    curve = [1.0, 0.9, 0.95, 0.92, 0.97, 0.99, 0.5, 0.4]
    def after_epoch(self, learn): learn.recorder.history[-1]['valid_loss'] = self.curve[learn.epoch]


def test_epoch_end_checkpoint_holds_early_stopping_state_of_that_epoch(tmp_path):
    make = lambda p: synth_learner(n_classes=3, path=p, cbs=[Plateau(), EarlyStopping(patience=3),
                                                             CheckpointCallback(keep_last=None)])
    ref = make(tmp_path / 'ref')
    quiet_fit(ref, 8)
    assert ref.get_cb(EarlyStopping).stopped_epoch == 4
    run = make(tmp_path / 'run')
    with pytest.raises(RuntimeError, match='simulated crash'):    # dies at the start of epoch 4, after epoch 3's checkpoint
        quiet_fit(run, 8, cbs=[crash_at('before_epoch', 4 * 6)])
    state = load_state(sorted((tmp_path / 'run' / 'checkpoints').glob('*epoch0003-end*'))[0])
    assert state['callbacks']['early_stopping']['wait'] == 2      # epochs 2 and 3 did not improve
    resumed = make(tmp_path / 'run')
    quiet_fit(resumed, 8, resume='last')
    assert resumed.get_cb(EarlyStopping).stopped_epoch == 4
    assert_same_run(ref, resumed)


def test_defer_runs_after_every_handler_even_when_one_cancels():
    seen = []
    class Early(Callback):
        order = 0
        def after_epoch(self, learn): learn.defer(lambda: seen.append(('deferred', learn.late_value)))
    class Late(Callback):
        order = 500
        def after_epoch(self, learn):
            learn.late_value = learn.epoch
            if learn.epoch == 1: raise CancelFitException()
    learn = synth_learner(cbs=[Early(), Late()])
    quiet_fit(learn, 5)
    assert seen == [('deferred', 0), ('deferred', 1)]


# -- 4. every after_fit runs; an interrupt stays an interrupt -------------------------------------------------------
class BadCleanup(Callback):
    order = 0          # runs before the CSV logger and the checkpoint callback
    def after_fit(self, learn): raise ValueError('cleanup failed')


class CtrlC(Callback):
    def __init__(self, step): self.step = step
    def after_batch(self, learn):
        if learn.train_iter == self.step: os.kill(os.getpid(), signal.SIGINT)


class SpyCSV(CSVLogger):
    "Keeps the file object it opened, to check afterwards that it was closed."
    def before_fit(self, learn):
        super().before_fit(learn)
        self.opened = self.file


def test_failing_after_fit_does_not_skip_the_interrupt_checkpoint_or_the_csv(tmp_path):
    csv_logger = SpyCSV('log.csv')
    learn = synth_learner(path=tmp_path, cbs=[BadCleanup(), csv_logger, CheckpointCallback()])
    with warnings.catch_warnings(record=True) as caught, redirect_stdout(io.StringIO()):
        warnings.simplefilter('always')
        with pytest.raises(KeyboardInterrupt):
            learn.fit(3, cbs=[CtrlC(8)])
    assert csv_logger.opened.closed
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 8 + 1   # the header, every batch trained, epoch 0
    assert list((tmp_path / 'checkpoints').glob('*batch2*')), 'the interrupt checkpoint was not written'
    assert any('BadCleanup.after_fit failed' in str(w.message) and 'cleanup failed' in str(w.message) for w in caught)
    learn.remove_cb(BadCleanup)
    quiet_fit(learn, 3, resume='last')   # the learner can fit again
    assert learn.train_iter == 18


def test_failing_after_fit_on_a_normal_end_is_raised_after_the_others_ran(tmp_path):
    csv_logger = SpyCSV('log.csv')
    learn = synth_learner(path=tmp_path, cbs=[BadCleanup(), csv_logger])
    with pytest.raises(ValueError, match='cleanup failed'): quiet_fit(learn, 1)
    assert csv_logger.opened.closed
    assert len((tmp_path / 'log.csv').read_text().splitlines()) == 1 + 6 + 1


# -- 7. a batch cancelled early contributes nothing -----------------------------------------------------------------
def test_cancelled_batches_contribute_nothing():
    class SkipSome(Callback):
        def __init__(self, at): self.at, self.skipped = at, []
        def before_batch(self, learn):
            if self.at == 'before_batch' and learn.iter in (0, 2): self.skipped.append((learn.training, learn.iter)); raise CancelBatchException()
        def after_pred(self, learn):
            if self.at == 'after_pred' and learn.iter in (0, 2): self.skipped.append((learn.training, learn.iter)); raise CancelBatchException()
    for at in ('before_batch', 'after_pred'):
        learn = synth_learner(n=512, n_classes=3, metrics=[accuracy])     # 24 training and 4 validation batches
        skip = SkipSome(at)
        quiet_fit(learn, 1, cbs=[skip])
        assert skip.skipped == [(True, 0), (True, 2), (False, 0), (False, 2)]
        assert len(learn.recorder.losses) == 24 - 2 and len(learn.recorder.lrs) == 22
        # validation over the batches that were not cancelled, computed independently
        kept = [b for i, b in enumerate(learn.valid_dl) if i not in (0, 2)]
        with torch.no_grad():
            preds = [(learn.model(x), y) for x, y in kept]
        n = sum(len(y) for _, y in kept)
        expected_loss = sum(F.cross_entropy(p, y, reduction='sum').item() for p, y in preds) / n
        expected_acc = sum((p.argmax(1) == y).sum().item() for p, y in preds) / n
        row = learn.recorder.history[-1]
        assert row['valid_loss'] == pytest.approx(expected_loss, rel=1e-6)
        assert row['accuracy'] == pytest.approx(expected_acc, abs=1e-12)


# -- 9. resuming after the data shrank -------------------------------------------------------------------------------
def test_resume_after_the_data_shrank_says_so(tmp_path):
    learn = synth_learner(n=128, path=tmp_path, cbs=[CheckpointCallback(every_n_steps=3)])
    with pytest.raises(RuntimeError, match='simulated crash'): quiet_fit(learn, 2, cbs=[crash_at('after_batch', 4)])
    small = synth_learner(n=40, path=tmp_path, cbs=[CheckpointCallback(every_n_steps=3)])
    with pytest.raises(ValueError, match=r'its dataset now has 30 samples'): quiet_fit(small, 2, resume='last')


# -- 11. every after_epoch sees the epoch that just ended -------------------------------------------------------------
def test_after_epoch_sees_this_epochs_row_whatever_its_order():
    rows = []
    class Reader(Callback):
        order = -10
        def after_epoch(self, learn): rows.append(dict(learn.recorder.history[-1]))
    learn = synth_learner()
    quiet_fit(learn, 3, cbs=[Reader()])
    assert [r['epoch'] for r in rows] == [0, 1, 2]
    assert rows[-1]['valid_loss'] == learn.recorder.history[-1]['valid_loss']


# -- 12. TerminateOnNaN stops at once -------------------------------------------------------------------------------
def test_terminate_on_nan_stops_within_two_batches():
    class Poison(Callback):
        def after_loss(self, learn):
            if learn.train_iter >= 7: learn.loss = learn.loss * float('nan')
    stopper = TerminateOnNaN()
    learn = synth_learner(n=512)
    with warnings.catch_warnings(): warnings.simplefilter('ignore'); quiet_fit(learn, 3, cbs=[Poison(), stopper])
    assert stopper.stopped_at is not None and stopper.stopped_at - 8 <= 1


# -- weak points: each one clear ---------------------------------------------------------------------------------
def test_lr_with_resume_says_the_checkpoint_rate_wins(tmp_path):
    learn = synth_learner(path=tmp_path, cbs=[CheckpointCallback()])
    quiet_fit(learn, 1)
    with pytest.warns(UserWarning, match='lr=0.5 is not used'):
        with redirect_stdout(io.StringIO()): learn.fit(2, lr=0.5, resume='last')


def test_resuming_with_fewer_epochs_says_nothing_is_left(tmp_path):
    learn = synth_learner(path=tmp_path, cbs=[CheckpointCallback()])
    quiet_fit(learn, 3)
    w = weights(learn)
    with pytest.warns(UserWarning, match='nothing left to train'):
        with redirect_stdout(io.StringIO()): learn.fit(2, resume='last')
    assert all(torch.equal(v, weights(learn)[k]) for k, v in w.items())


@pytest.mark.parametrize('bad', [True, 1, ['last']])
def test_resume_argument_lists_accepted_values(bad):
    with pytest.raises(TypeError, match=r"resume must be None .*'last'.*path"): synth_learner().fit(1, resume=bad)


def test_too_many_inputs_for_the_model():
    x = torch.randn(32, 4)
    batches = [(x[i:i + 8], x[i:i + 8], torch.randn(8)) for i in range(0, 32, 8)]
    learn = Learner(nn.Linear(4, 1), batches, loss_func=F.mse_loss, device='cpu')
    with pytest.raises(ModelError, match=r'2 input\(s\).*\(x1, x2, y\) feeds model\(x1, x2\)'): quiet_fit(learn, 1)


def test_frozen_model_is_refused():
    learn = synth_learner()
    for p in learn.model.parameters(): p.requires_grad_(False)
    with pytest.raises(FitError, match='every parameter of the model .* is frozen'): learn.fit(1)


def test_loss_without_gradient_is_explained():
    train, valid = synth_data()
    learn = Learner(nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), train, valid, device='cpu',
                    loss_func=lambda p, y: F.mse_loss(p.detach(), y))
    with pytest.raises(LossError, match=r'the loss has no gradient'): quiet_fit(learn, 1)


def test_one_shot_iterators_are_refused_early():
    train, valid = synth_data()
    with pytest.raises(TypeError, match='train_dl is a one-shot iterator'): Learner(nn.Linear(4, 1), iter(list(train)))
    gen = (b for b in valid)
    with pytest.raises(TypeError, match='valid_dl is a one-shot iterator'): Learner(nn.Linear(4, 1), train, gen)


def test_an_iterable_that_runs_dry_after_one_epoch_is_named():
    train, _ = synth_data()
    class Once:
        def __init__(self): self.it = iter(list(train))
        def __iter__(self): return self.it
    learn = Learner(nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), Once(), loss_func=F.mse_loss, device='cpu')
    with pytest.raises(EmptyDataError, match='not re-iterable'): quiet_fit(learn, 2)


def test_foreign_and_misspelt_hooks_are_reported():
    class Keras(Callback):
        def on_epoch_end(self, learn): pass
    with pytest.warns(UserWarning, match="on_epoch_end looks like another library's hook.*'after_epoch'"):
        synth_learner(cbs=[Keras()])
    class Typo(Callback):
        def afer_batch(self, learn): pass
    with pytest.raises(CallbackError, match="did you mean 'after_batch'"): synth_learner(cbs=[Typo()])


def test_fit_inside_a_callback_is_refused():
    class Nested(Callback):
        def after_epoch(self, learn): learn.fit(1)
    learn = synth_learner()
    with pytest.raises(FitError, match='already fitting'): quiet_fit(learn, 2, cbs=[Nested()])
    assert len(learn.recorder.history) == 1


def test_predict_unpacks_a_tuple_into_inputs():
    class Two(nn.Module):
        def __init__(self): super().__init__(); self.a = nn.Linear(3, 2)
        def forward(self, x1, x2): return self.a(x1) + x2
    learn = Learner(Two(), [(torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 2))], loss_func=F.mse_loss, device='cpu')
    x1, x2 = torch.randn(5, 3), torch.randn(5, 2)
    assert torch.equal(learn.predict((x1, x2)), learn.model.eval()(x1, x2).detach())


def test_get_preds_with_batches_of_different_lengths_returns_lists():
    class Seq(nn.Module):
        def __init__(self): super().__init__(); self.e = nn.Embedding(10, 5)
        def forward(self, x): return self.e(x)
    lm_loss = lambda p, y: F.cross_entropy(p.flatten(0, 1), y.flatten())
    batches = [(torch.randint(0, 10, (2, t)), torch.randint(0, 5, (2, t))) for t in (3, 5, 4)]
    learn = Learner(Seq(), batches, batches, loss_func=lm_loss, device='cpu')
    with pytest.warns(UserWarning, match='returning a list with one tensor per batch'):
        preds, targs = learn.get_preds()
    assert [p.shape for p in preds] == [(2, 3, 5), (2, 5, 5), (2, 4, 5)] and torch.equal(targs[1], batches[1][1])


def test_assigning_metrics_after_construction_takes_effect():
    learn = synth_learner(n_classes=3)
    learn.metrics = [accuracy]
    quiet_fit(learn, 1)
    assert 'accuracy' in learn.recorder.history[-1]


def test_early_stopping_says_when_and_why():
    out = io.StringIO()
    learn = synth_learner(cbs=[Plateau(), EarlyStopping(patience=2)])
    with redirect_stdout(out): learn.fit(8)
    assert 'EarlyStopping: stopped after epoch 3: valid_loss did not improve' in out.getvalue()


def test_ctrl_c_message_names_the_method_that_ran(tmp_path, capsys):
    learn = synth_learner(path=tmp_path, cbs=[CheckpointCallback()])
    with pytest.raises(KeyboardInterrupt, match=r'fit_one_cycle stopped by Ctrl-C'):
        learn.fit_one_cycle(3, 1e-2, cbs=[CtrlC(4)])
    assert "Continue with learn.fit_one_cycle(..., resume='last')" in capsys.readouterr().err
    with redirect_stdout(io.StringIO()): learn.fit_one_cycle(3, 1e-2, resume='last')   # and that call works
    assert learn.train_iter == 18 and learn.resumed_from is not None


def test_pct_train_is_the_fraction_done_before_the_batch():
    seen = []
    def spy(learn, event):
        if learn.training and event in ('before_batch', 'after_batch'): seen.append((event, learn.train_iter, learn.pct_train))
    quiet_fit(synth_learner(), 2, cbs=[spy])
    total = 12
    for event, step, pct in seen: assert pct == pytest.approx(step / total), (event, step, pct)
    assert seen[0] == ('before_batch', 0, 0.) and seen[-1][2] == pytest.approx(1.)


# -- kills in a process of their own -------------------------------------------------------------------------------
KILL_JOB = textwrap.dedent('''
    import os, signal, sys, time, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from nbloop.all import *
    folder, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    x, y = torch.randn(96, 4), torch.randint(0, 3, (96,))
    g = torch.Generator().manual_seed(99)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)
    valid = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=16)
    class Plateau(Callback):
        order = 51
        def after_epoch(self, learn): learn.recorder.history[-1]['valid_loss'] = [1.0, .9, .95, .92, .97, .99, .5][learn.epoch]
    class Pause(Callback):
        order = 300
        def before_epoch(self, learn):
            if mode == 'kill' and learn.epoch == 3 and learn.resumed_from is None:
                open(out + '.paused', 'w').close(); time.sleep(60)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    learn = Learner(model, train, valid, lr=1e-2, device='cpu', path=folder,
                    cbs=[Plateau(), EarlyStopping(patience=3), CheckpointCallback(every_n_steps=5), Pause()])
    learn.fit(7, resume='last' if mode == 'resume' else None)
    torch.save({k: v for k, v in learn.model.state_dict().items()}, out)
''')


def _job(tmp_path, folder, mode, out):
    script = tmp_path / 'kill_job.py'
    script.write_text(KILL_JOB)
    return subprocess.Popen([sys.executable, str(script), str(folder), mode, str(out)], env=env_for_subprocess(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def test_sigkill_after_an_epoch_end_checkpoint_resumes_exactly(tmp_path):
    "SIGKILL right after epoch 2's checkpoint, with a DataLoader generator and EarlyStopping: the resumed run ends bit-exactly."
    ref = _job(tmp_path, tmp_path / 'ref', 'plain', tmp_path / 'ref.pt')
    killed = _job(tmp_path, tmp_path / 'run', 'kill', tmp_path / 'run.pt')
    try:
        assert ref.wait(120) == 0, ref.stderr.read().decode()[-3000:]
        marker = Path(str(tmp_path / 'run.pt') + '.paused')
        for _ in range(1200):
            if marker.exists() or killed.poll() is not None: break
            import time; time.sleep(0.05)
        assert marker.exists(), killed.stderr.read().decode()[-3000:]
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(30)
        resumed = _job(tmp_path, tmp_path / 'run', 'resume', tmp_path / 'run.pt')
        assert resumed.wait(120) == 0, resumed.stderr.read().decode()[-3000:]
    finally:
        for p in (ref, killed):
            if p.poll() is None: os.killpg(p.pid, signal.SIGKILL); p.wait()
    a, b = torch.load(tmp_path / 'ref.pt'), torch.load(tmp_path / 'run.pt')
    for k in a: assert torch.equal(a[k], b[k]), k


# -- issue 16: numeric arguments are checked where they are given ----------------------------------------------------
@pytest.mark.parametrize('make, name', [
    (lambda: synth_learner(lr=float('inf')), 'lr'),
    (lambda: synth_learner().fit(1, lr=float('nan')), 'lr'),
    (lambda: synth_learner().fit_one_cycle(1, float('nan')), 'lr_max'),
    (lambda: synth_learner().fit_one_cycle(1, float('inf')), 'lr_max'),
    (lambda: synth_learner().fit_one_cycle(1, -1e-3), 'lr_max'),
    (lambda: synth_learner().fit_one_cycle(1, 1e-2, div=0), 'div'),
    (lambda: GradientClip(float('nan')), 'max_norm'),
    (lambda: EarlyStopping(min_delta=float('nan')), 'min_delta'),
    (lambda: GradientAccumulation(True), 'n_batches'),
])
def test_bad_numbers_are_refused_where_given(make, name):
    "inf, nan, negatives, zero divisors and bools: a ValueError that names the argument, before anything trains."
    with pytest.raises(ValueError, match=f'^{name} must be'): make()


# -- issue 16: a fit on another thread says once that signals will not stop it ----------------------------------------
def test_a_fit_on_a_background_thread_says_once_that_signals_cannot_stop_it():
    import threading
    import nbloop.runtime
    nbloop.runtime._warned_thread.clear()               # (another test of this process may have been told already)
    said = []
    def job():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            with redirect_stdout(io.StringIO()):
                for _ in range(2): synth_learner().fit(1)
        said.extend(str(x.message) for x in w if 'not the main thread' in str(x.message))
    t = threading.Thread(target=job, name='sweep-worker'); t.start(); t.join(120)
    assert not t.is_alive()
    assert len(said) == 1 and "fit runs on the thread 'sweep-worker'" in said[0], said


# -- issue 16: fits with a live plot do not pile up widgets --------------------------------------------------------
def test_many_fits_with_a_live_plot_keep_one_widget():
    "41 fits in widget mode left 82 widgets alive; now the last fit's Image and Layout remain, the others are closed."
    from ipywidgets.widgets.widget import _instances
    before = len(_instances)
    for _ in range(12):
        with redirect_stdout(io.StringIO()): synth_learner(cbs=[LivePlotCallback(mode='widget', min_interval=3600)]).fit(1)
    assert len(_instances) - before <= 2, len(_instances) - before
    assert LivePlotCallback._kept and all(w.comm is not None for w in LivePlotCallback._kept)


# -- issue 16: a torch scheduler made in before_fit resumes bit for bit ---------------------------------------------
class TorchOneCycle(Callback):
    "A torch scheduler made in before_fit (its constructor sets the rates), stepped after each step, saved in checkpoints."
    def before_fit(self, learn):
        self.sched = torch.optim.lr_scheduler.OneCycleLR(learn.opt, max_lr=0.05, total_steps=learn.total_steps)
    def after_step(self, learn): self.sched.step()
    def state_dict(self): return {'sched': self.sched.state_dict()}
    def load_state_dict(self, state): self.sched.load_state_dict(state['sched'])


def test_a_torch_scheduler_made_in_before_fit_resumes_exactly(tmp_path):
    """On resume the optimizer's state is loaded again after before_fit: the scheduler's constructor no longer
    overwrites the restored rates, so the resumed run ends as the uninterrupted one (it silently did not)."""
    make = lambda path: synth_learner(n_classes=3, path=path, cbs=[CheckpointCallback(every_n_steps=2), TorchOneCycle()])
    ref = make(tmp_path / 'ref'); quiet_fit(ref, 3)
    with pytest.raises(RuntimeError, match='simulated crash'): quiet_fit(make(tmp_path / 'run'), 3, cbs=[crash_at('after_batch', 9)])
    resumed = make(tmp_path / 'run'); quiet_fit(resumed, 3, resume='last')
    assert resumed.resumed_from is not None
    assert resumed.opt.param_groups[0]['lr'] == ref.opt.param_groups[0]['lr']
    assert_same_run(resumed, ref)


# -- issue 17: fit_one_cycle gives every parameter group the peak it was given --------------------------------------
class GroupRates(Callback):
    "Every param group's learning rate at each optimizer step."
    def before_fit(self, learn): self.seen = []
    def before_step(self, learn): self.seen.append([g['lr'] for g in learn.opt.param_groups])


def body_and_head():
    "A pretrained body at 1e-4 and a new head at 1e-3, as a fine-tuner sets them."
    train, valid = synth_data(96, 4, 3, 16, 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = lambda params, lr: torch.optim.AdamW([{'params': model[0].parameters(), 'lr': 1e-4},
                                               {'params': model[2].parameters(), 'lr': 1e-3}], lr=lr)
    return Learner(model, train, valid, loss_func=F.cross_entropy, opt_func=opt, device='cpu')


@pytest.mark.parametrize('lr_max, peaks', [([1e-4, 1e-3], [1e-4, 1e-3]), (slice(1e-4, 1e-3), [1e-4, 1e-3]),
                                           (None, [1e-4, 1e-3]), (1e-3, [1e-3, 1e-3]), (slice(1e-3), [1e-4, 1e-3])])
def test_fit_one_cycle_peaks_each_param_group_where_it_was_told(lr_max, peaks):
    "The attack: with lr_max=1e-3 the head (set at 1e-3) peaked at 1e-2, the first group's peak times its ratio."
    learn, out = body_and_head(), io.StringIO()
    with learn.no_bar(), redirect_stdout(out): learn.fit_one_cycle(2, lr_max, cbs=[rates := GroupRates()])
    got = [max(r[i] for r in rates.seen) for i in range(2)]
    assert got == pytest.approx(peaks, rel=1e-9), got
    if lr_max is None or lr_max == 1e-3: assert 'note: the 2 parameter groups peak at' in out.getvalue()   # said
    else: assert 'note:' not in out.getvalue()


def test_fit_one_cycle_refuses_rates_that_do_not_fit_the_groups():
    learn = body_and_head()
    with pytest.raises(ValueError, match='lr_max has 3 rates for the 2 parameter groups'): learn.fit_one_cycle(1, [1e-4, 1e-3, 1e-2])
    with pytest.raises(ValueError, match='must be a positive number'): learn.fit_one_cycle(1, slice(0, 1e-3))
