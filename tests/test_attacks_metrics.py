"""Attack suite, part "metrics and the Recorder": inputs that made metrics report wrong numbers or lose a run.

Each test compares nbloop's value with an independent computation over the whole data (scikit-learn,
torchmetrics or plain Python): padding targets (-100) in classification and language-model batches, exact
counting, metrics that need the whole epoch (R^2, AUC, F1), errors that must name the metric, batches cancelled
before their loss existed, the finished history row seen by every after_epoch handler, metrics replaced after
the learner was made, and predictions read as the loss reads them (a Sigmoid before BCELoss, one-hot, smoothed
or mixup targets with a cross-entropy, NaN predictions). Fixtures are tiny and CPU-only; the one CUDA test checks that no metric syncs per batch.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from sklearn.metrics import f1_score, matthews_corrcoef, r2_score, roc_auc_score, top_k_accuracy_score
from torch import nn
from torch.overrides import TorchFunctionMode

from nbloop.core import Callback, CancelBatchException
from nbloop.learner import Learner, synth_learner
from nbloop.metrics import (AvgMetric, EpochMetric, MatthewsCorrCoef, MetricError, Perplexity, accuracy, as_metric,
                            top5_accuracy, top_k_accuracy)
from nbloop.recorder import Recorder
from nbloop.state import RunState, RunStateView


class FakeLearn(RunStateView):
    "What the Recorder and metrics read from a learner, set by hand (the batch in a `RunState`, as the Learner's)."
    def __init__(self, pred=None, targ=None, loss=None, training=False):
        self.state = RunState()
        self.pred, self.yb, self.loss, self.training = pred, (targ,), loss, training
        self.epoch, self.device, self.valid_dl = 0, torch.device('cpu'), [None]
        self.opt = type('Opt', (), {'param_groups': [{'lr': 0.1}]})()


def feed(metric, pairs):
    "Reset `metric`, update it with every (pred, targ) pair, return its value."
    m = as_metric(metric)
    m.reset()
    for p, t in pairs: m.update(p, t)
    return m.compute()


def padded_sequences(n_batches=4, n=3, t=11, c=5, seed=0, p_right=0.6):
    "Character-level batches (N, T, C) / (N, T) with a different amount of -100 padding at the end of each row."
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        targ = torch.randint(0, c, (n, t), generator=g)
        logits = torch.randn(n, t, c, generator=g)
        right = torch.rand(n, t, generator=g) < p_right
        logits[right] += F.one_hot(targ, c)[right] * 5.
        lengths = torch.randint(1, t + 1, (n,), generator=g)
        targ[torch.arange(t)[None] >= lengths[:, None]] = -100
        out.append((logits, targ))
    return out


# -- 1. perplexity over the targets the loss counts ----------------------------------------------------------------
@pytest.mark.parametrize('pads', [(0, 9, 3), (10, 0), (5, 5, 5, 1)])
def test_perplexity_matches_torchmetrics_on_padded_batches(pads):
    g = torch.Generator().manual_seed(sum(pads))
    ours, ref = Perplexity(), torchmetrics.text.Perplexity(ignore_index=-100)
    for n_pad in pads:
        logits, targ = torch.randn(2, 12, 6, generator=g) * 2, torch.randint(0, 6, (2, 12), generator=g)
        if n_pad: targ[:, -n_pad:] = -100
        ours.accumulate(FakeLearn(logits, targ, F.cross_entropy(logits.transpose(1, 2), targ)))
        ref.update(logits, targ)
    assert ours.compute() == pytest.approx(float(ref.compute()), rel=1e-5)


def test_perplexity_all_padding_batch_weighs_nothing():
    logits, targ = torch.randn(2, 4, 3), torch.randint(0, 3, (2, 4))
    pad = torch.full((2, 4), -100)
    ours = Perplexity()
    for t in (targ, pad):
        ours.accumulate(FakeLearn(logits, t, F.cross_entropy(logits.transpose(1, 2), t)))   # the all-padding loss is nan
    assert ours.compute() == pytest.approx(math.exp(float(F.cross_entropy(logits.transpose(1, 2), targ))), rel=1e-6)


def test_perplexity_in_a_fit_equals_exp_of_the_loss_over_real_tokens():
    "A tiny language model on padded sequences: the history's perplexity is exp(mean loss over the real tokens)."
    batches = [(logits.argmax(-1).clamp(max=4), targ) for logits, targ in padded_sequences(n_batches=3, seed=3)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 8), nn.Linear(8, 5))
    def loss_func(pred, targ): return F.cross_entropy(pred.transpose(1, 2), targ)
    learn = Learner(model, batches, batches, loss_func=loss_func, metrics=[Perplexity(), accuracy], device='cpu')
    with learn.no_bar(): learn.fit(1)
    with torch.no_grad():
        preds = [model(x) for x, _ in batches]
    logits, targs = torch.cat([p.reshape(-1, 5) for p in preds]), torch.cat([t.reshape(-1) for _, t in batches])
    row = learn.recorder.history[-1]
    assert row['perplexity'] == pytest.approx(math.exp(float(F.cross_entropy(logits, targs))), rel=1e-5)
    keep = targs != -100
    assert row['accuracy'] == float(Fraction(int((logits.argmax(1) == targs)[keep].sum()), int(keep.sum())))


# -- 2. classification metrics ignore -100 ---------------------------------------------------------------------------
def test_character_accuracy_ignores_padding():
    "The real case: padding counted as wrong gave 0.379 where the character accuracy was 0.622."
    batches = padded_sequences()
    logits = torch.cat([p.reshape(-1, 5) for p, _ in batches]); targs = torch.cat([t.reshape(-1) for _, t in batches])
    keep = (targs != -100).numpy()
    expected = float(np.mean(logits.argmax(1).numpy()[keep] == targs.numpy()[keep]))
    naive = float(np.mean(logits.argmax(1).numpy() == targs.numpy()))
    assert naive < expected - 0.05                                            # the fixture really has padding
    assert feed(accuracy, batches) == pytest.approx(expected, abs=1e-12)
    assert float(accuracy(logits, targs)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize('k', [1, 2, 3])
def test_top_k_ignores_padding_sequences_and_flat(k):
    batches = padded_sequences(seed=k)
    logits = torch.cat([p.reshape(-1, 5) for p, _ in batches]); targs = torch.cat([t.reshape(-1) for _, t in batches])
    keep = targs != -100
    expected = top_k_accuracy_score(targs[keep].numpy(), logits[keep].numpy(), k=k, labels=range(5))
    assert feed(top_k_accuracy(k), batches) == pytest.approx(expected, abs=1e-12)                # (N, T, C)
    flat = [(p.reshape(-1, 5), t.reshape(-1)) for p, t in batches]
    assert feed(top_k_accuracy(k), flat) == pytest.approx(expected, abs=1e-12)                    # (N, C)
    assert as_metric(top_k_accuracy(k)).name == f'top{k}_accuracy'


def test_mcc_ignores_padding_multiclass_and_binary():
    batches = padded_sequences(seed=7)
    logits = torch.cat([p.reshape(-1, 5) for p, _ in batches]); targs = torch.cat([t.reshape(-1) for _, t in batches])
    keep = targs != -100
    expected = matthews_corrcoef(targs[keep].numpy(), logits.argmax(1)[keep].numpy())
    assert feed(MatthewsCorrCoef(), batches) == pytest.approx(expected, abs=1e-12)
    # binary, one logit per target, float targets with padding
    g = torch.Generator().manual_seed(1)
    logit, t = torch.randn(40, generator=g), (torch.rand(40, generator=g) > 0.5).float()
    t[::7] = -100
    k = t != -100
    expected = matthews_corrcoef(t[k].long().numpy(), (logit[k] > 0).long().numpy())
    assert feed(MatthewsCorrCoef(), [(logit[:20], t[:20]), (logit[20:], t[20:])]) == pytest.approx(expected, abs=1e-12)
    assert feed(accuracy, [(logit, t)]) == pytest.approx(float(np.mean((logit[k] > 0).numpy() == t[k].numpy().astype(bool))))


def test_only_padding_gives_nan_not_a_crash():
    logits, pad = torch.randn(3, 4, 2), torch.full((3, 4), -100)
    assert math.isnan(feed(accuracy, [(logits, pad)]))
    assert math.isnan(feed(top5_accuracy, [(logits, pad)]))


# -- 3. exact counting ------------------------------------------------------------------------------------------------
def test_accuracy_37_of_38_is_exact():
    pred = torch.eye(2)[torch.tensor([0, 1] * 19)]
    targ = pred.argmax(1).clone(); targ[3] = 1 - targ[3]
    batches = [(pred[i:i + 5], targ[i:i + 5]) for i in range(0, 38, 5)]
    assert feed(accuracy, batches) == 37 / 38                           # 0.9736842105263158, not 0.97368419...


def test_accuracy_and_top_k_exact_over_many_uneven_batches():
    g = torch.Generator().manual_seed(0)
    batches, right, counted, right5 = [], 0, 0, 0
    for i in range(60):
        n = int(torch.randint(1, 50, (1,), generator=g))
        p, t = torch.randn(n, 7, generator=g), torch.randint(0, 7, (n,), generator=g)
        t[torch.rand(n, generator=g) < 0.2] = -100
        batches.append((p, t))
        for row, target in zip(p.tolist(), t.tolist()):                # plain python over every sample
            if target == -100: continue
            counted += 1
            right += max(range(7), key=lambda c: row[c]) == target
            right5 += target in sorted(range(7), key=lambda c: -row[c])[:5]
    assert feed(accuracy, batches) == right / counted                  # exactly the float64 of the fraction
    assert feed(top5_accuracy, batches) == right5 / counted


def test_accuracy_is_still_a_plain_function():
    p, t = torch.tensor([[1., 0], [0, 1], [1, 0]]), torch.tensor([0, 0, -100])
    out = accuracy(p, t)
    assert isinstance(out, torch.Tensor) and out.ndim == 0 and float(out) == 0.5
    assert type(as_metric(accuracy)).__name__ == 'CountMetric' and as_metric(accuracy).name == 'accuracy'
    assert isinstance(AvgMetric(accuracy), AvgMetric)                  # still usable as an averaged function


# -- 4. EpochMetric: exact for anything -------------------------------------------------------------------------------
def r2(pred, targ): return 1 - ((targ - pred) ** 2).sum() / ((targ - targ.mean()) ** 2).sum()


def test_epoch_metric_r2_matches_sklearn_where_the_batch_average_does_not():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g); y = x + torch.randn(200, generator=g); pred = 0.8 * x
    batches = [(pred[i:i + 32], y[i:i + 32]) for i in range(0, 200, 32)]
    expected = r2_score(y.numpy(), pred.numpy())
    assert feed(EpochMetric(r2), batches) == pytest.approx(expected, abs=1e-6)
    assert abs(feed(r2, batches) - expected) > 0.02                     # the per-batch average is off


def test_epoch_metric_auc_and_f1_in_a_fit():
    def auc(pred, targ): return roc_auc_score(targ.cpu().numpy(), pred.softmax(-1)[:, 1].cpu().numpy())
    def macro_f1(pred, targ): return f1_score(targ.cpu().numpy(), pred.argmax(-1).cpu().numpy(), average='macro')
    learn = synth_learner(n=200, n_classes=2, batch_size=8, metrics=[EpochMetric(auc), EpochMetric(macro_f1)])
    with learn.no_bar(): learn.fit(1)
    preds, targs = learn.get_preds()
    row = learn.recorder.history[-1]
    assert row['auc'] == pytest.approx(roc_auc_score(targs.numpy(), preds.softmax(-1)[:, 1].numpy()), abs=1e-9)
    assert row['macro_f1'] == pytest.approx(f1_score(targs.numpy(), preds.argmax(1).numpy(), average='macro'), abs=1e-9)


def test_epoch_metric_is_exported_by_all():
    import nbloop.all as nball
    assert 'EpochMetric' in nball.__all__ and nball.EpochMetric is EpochMetric


# -- 6. errors name the metric ----------------------------------------------------------------------------------------
def test_per_sample_function_is_named_at_the_first_batch():
    def squared_error(pred, targ): return (pred - targ) ** 2
    learn = synth_learner(metrics=[squared_error])
    with pytest.raises(MetricError, match=r"metric 'squared_error' returned a tensor of shape \(32,\).*must return a "
                                          r"scalar.*\.mean\(\).*EpochMetric\(squared_error\)"):
        with learn.no_bar(): learn.fit(1)


def test_compute_that_raises_is_named_at_the_end_of_validation():
    class Brittle:
        "A metric object (torchmetrics-like) whose compute fails."
        def reset(self): self.n = 0
        def update(self, pred, targ): self.n += 1
        def compute(self): raise RuntimeError('cannot compute')
    learn = synth_learner(n_classes=3, metrics=[accuracy, Brittle()])
    with pytest.raises(MetricError, match=r"metric 'brittle' raised RuntimeError when computing its value at the end "
                                          r"of validation \(after_validate\): cannot compute"):
        with learn.no_bar(): learn.fit(1)
    rec = Recorder([Brittle()]); fl = FakeLearn(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.tensor(1.))
    rec.before_fit(fl); rec.before_validate(fl); rec.after_batch(fl)
    assert math.isnan(rec.running_values(False)['brittle'])             # the progress line may show nan meanwhile


def test_epoch_metric_returning_a_vector_is_named():
    def errors(pred, targ): return pred - targ
    learn = synth_learner(metrics=[EpochMetric(errors)])
    with pytest.raises(MetricError, match=r"metric 'errors' returned tensor of shape \(32,\)"):
        with learn.no_bar(): learn.fit(1)


# -- 7. batches cancelled before their loss existed -------------------------------------------------------------------
def CancelAt(event, train=(), valid=()):
    "A callback that cancels the batches listed per phase (by `learn.iter`) at `event`."
    def cancel(self, learn):
        if learn.iter in (train if learn.training else valid): raise CancelBatchException()
    return type(f'Cancel_{event}', (Callback,), {'order': 0, event: cancel})()


@pytest.mark.parametrize('event', ['before_batch', 'after_pred', 'after_loss'])
def test_cancelled_batches_record_nothing(event):
    learn = synth_learner(n=160, n_classes=3, batch_size=8, metrics=[accuracy, Perplexity(), MatthewsCorrCoef()])
    learn.add_cb(CancelAt(event, train={0, 3}, valid={1}))      # train batch 0: no loss was ever set before it
    with learn.no_bar(): learn.fit(1)
    rec = learn.recorder
    assert len(rec.losses) == 15 - 2 and len(rec.lrs) == 13
    batches = list(learn.valid_dl)
    kept = [b for i, b in enumerate(batches) if i != 1]
    with torch.no_grad():
        preds = [learn.model(x) for x, _ in kept]
    logits, targs = torch.cat(preds), torch.cat([y for _, y in kept])
    row = rec.history[-1]
    assert row['valid_loss'] == pytest.approx(float(F.cross_entropy(logits, targs)), rel=1e-5)
    assert row['accuracy'] == float(np.mean(logits.argmax(1).numpy() == targs.numpy()))
    assert row['matthews_corrcoef'] == pytest.approx(matthews_corrcoef(targs.numpy(), logits.argmax(1).numpy()), abs=1e-12)
    assert row['perplexity'] == pytest.approx(math.exp(float(F.cross_entropy(logits, targs))), rel=1e-5)


def test_batch_cancelled_after_backward_still_counts():
    learn = synth_learner(n=160, n_classes=3, batch_size=8)
    learn.add_cb(CancelAt('after_backward', train={0, 1, 2}))
    with learn.no_bar(): learn.fit(1)
    assert len(learn.recorder.losses) == 15 and len(learn.recorder.lrs) == 15


def test_recorder_skips_a_batch_without_loss_by_hand():
    rec = Recorder([accuracy]); fl = FakeLearn(training=True)
    rec.before_fit(fl); rec.before_epoch(fl)
    fl.loss = None                               # the very first batch, before any loss was ever set
    rec.after_batch(fl)
    assert rec.losses == [] and rec.lrs == []


# -- 8. every after_epoch handler sees the finished row ---------------------------------------------------------------
def test_after_epoch_handlers_of_any_order_see_the_finished_row():
    seen = []
    class Early(Callback):
        order = -10
        def after_epoch(self, learn): seen.append(('early', learn.epoch, dict(learn.recorder.history[-1])))
    class Late(Callback):
        order = 99
        def after_epoch(self, learn): seen.append(('late', learn.epoch, dict(learn.recorder.history[-1])))
    learn = synth_learner(n_classes=3, metrics=[accuracy], cbs=[Early(), Late()])
    with learn.no_bar(): learn.fit(2)
    assert [(who, e) for who, e, _ in seen] == [('early', 0), ('late', 0), ('early', 1), ('late', 1)]
    for (_, epoch, row), final in zip(seen[::2], learn.recorder.history):
        assert row['epoch'] == epoch and row == final
        assert list(row) == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']


# -- 9. metrics replaced after the learner was made -------------------------------------------------------------------
def test_metrics_assigned_after_construction_are_used():
    learn = synth_learner(n_classes=3)
    learn.metrics = [accuracy, top_k_accuracy(2)]
    with learn.no_bar(): learn.fit(1)
    preds, targs = learn.get_preds()
    row = learn.recorder.history[-1]
    assert row['accuracy'] == float(np.mean(preds.argmax(1).numpy() == targs.numpy()))
    assert row['top2_accuracy'] == pytest.approx(top_k_accuracy_score(targs.numpy(), preds.numpy(), k=2, labels=range(3)))
    rec = Recorder()
    rec.metrics = [accuracy]
    assert rec.metric_names == ['accuracy']
    with pytest.raises(ValueError, match="named 'accuracy'"): rec.metrics = [accuracy, accuracy]



# -- 10. predictions and targets read as the loss reads them --------------------------------------------------------
def fitted(model, loss_func, train, valid, metrics, epochs=3, lr=0.5):
    "A Learner fitted on lists of batches; its last history row and the model's validation outputs."
    torch.manual_seed(0)
    learn = Learner(model, train, valid, loss_func=loss_func, lr=lr, metrics=metrics, opt_func=torch.optim.SGD)
    with learn.no_bar(): learn.fit(epochs)
    with torch.no_grad(): out = torch.cat([learn.model(x) for x, _ in valid])
    return learn.recorder.history[-1], out


def binary_data(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x @ torch.randn(5, generator=g) > 0).float()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 128, 16)], [(x[i:i + 16], y[i:i + 16]) for i in range(128, n, 16)]


@pytest.mark.parametrize('loss', ['module', 'function', 'partial'])
def test_sigmoid_then_bce_is_read_as_probabilities(loss):
    "The attack: a Sigmoid output with BCE gave accuracy 0.225 where scikit-learn gives 1.000 (read as logits)."
    import functools
    loss_func = {'module': nn.BCELoss(), 'function': F.binary_cross_entropy,
                 'partial': functools.partial(F.binary_cross_entropy, reduction='mean')}[loss]
    train, valid = binary_data()
    model = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0), nn.Sigmoid())
    row, probs = fitted(model, loss_func, train, valid, [accuracy, MatthewsCorrCoef()], lr=2.)
    y = torch.cat([t for _, t in valid]).numpy()
    pred = (probs > 0.5).numpy()
    assert row['accuracy'] == pytest.approx((pred == y).mean(), abs=1e-12) and row['accuracy'] > 0.85
    assert row['matthews_corrcoef'] == pytest.approx(matthews_corrcoef(y, pred), abs=1e-9)


def test_logits_with_bce_with_logits_are_still_thresholded_at_zero():
    train, valid = binary_data(seed=1)
    row, logits = fitted(nn.Sequential(nn.Linear(5, 1), nn.Flatten(0)), nn.BCEWithLogitsLoss(), train, valid, [accuracy])
    y = torch.cat([t for _, t in valid])
    assert row['accuracy'] == pytest.approx(((logits > 0).float() == y).double().mean().item(), abs=1e-12)


def test_probabilities_under_a_loss_of_your_own_get_a_warning():
    train, valid = binary_data(seed=2)
    model = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0), nn.Sigmoid())
    with pytest.warns(UserWarning, match=r'lies in \[0, 1\].*nn.BCELoss'):
        fitted(model, lambda p, t: F.binary_cross_entropy(p, t), train, valid, [accuracy], epochs=1)


def soft_data(kind, n=150, c=4, seed=0):
    "Class-probability targets: one-hot, label-smoothed, or mixup-like mixtures of two classes."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x @ torch.randn(6, c, generator=g)).argmax(1)
    onehot = F.one_hot(y, c).float()
    if kind == 'smoothed': targ = onehot * 0.8 + 0.2 / c
    elif kind == 'mixup':
        lam = 0.6 + 0.4 * torch.rand(n, 1, generator=g)          # the true class always weighs most
        targ = lam * onehot + (1 - lam) * F.one_hot((y + 1) % c, c).float()
    else: targ = onehot
    batches = [(x[i:i + 15], targ[i:i + 15]) for i in range(0, n, 15)]
    return batches[:7], batches[7:], y[105:]


@pytest.mark.parametrize('kind', ['onehot', 'smoothed', 'mixup'])
@pytest.mark.parametrize('loss', ['function', 'module'])
def test_class_probability_targets_are_read_by_their_argmax(kind, loss):
    "The attack: soft or one-hot targets with cross_entropy gave accuracy 0.500 where the true value was 0.275."
    train, valid, y = soft_data(kind)
    loss_func = F.cross_entropy if loss == 'function' else nn.CrossEntropyLoss()
    row, out = fitted(nn.Linear(6, 4), loss_func, train, valid, [accuracy, top_k_accuracy(2), MatthewsCorrCoef()])
    assert row['accuracy'] == pytest.approx((out.argmax(1) == y).double().mean().item(), abs=1e-12)
    assert row['top2_accuracy'] == pytest.approx(top_k_accuracy_score(y.numpy(), out.numpy(), k=2, labels=range(4)), abs=1e-12)
    assert row['matthews_corrcoef'] == pytest.approx(matthews_corrcoef(y.numpy(), out.argmax(1).numpy()), abs=1e-9)


def test_multilabel_float_targets_under_bce_stay_elementwise():
    "Float targets of the predictions' shape under a BCE are labels, one per column: never an argmax."
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g) > 0).float()
    train, valid = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], [(x[i:i + 16], y[i:i + 16]) for i in range(64, 96, 16)]
    row, logits = fitted(nn.Linear(6, 3), nn.BCEWithLogitsLoss(), train, valid, [accuracy])
    assert row['accuracy'] == pytest.approx(((logits > 0).float() == y[64:]).double().mean().item(), abs=1e-12)


def test_nan_predictions_give_nan_metrics_not_numbers():
    "The attack: all-NaN predictions reported accuracy 0.775 and MCC 0.0 as real numbers."
    train, valid, _ = soft_data('onehot')
    train = [(x, t.argmax(1)) for x, t in train]; valid = [(x, t.argmax(1)) for x, t in valid]
    model = nn.Linear(6, 4)
    model.register_forward_hook(lambda m, i, o: o if m.training else o * math.nan)
    row, _ = fitted(model, F.cross_entropy, train, valid, [accuracy, top_k_accuracy(2), MatthewsCorrCoef()], epochs=1)
    for name in ('accuracy', 'top2_accuracy', 'matthews_corrcoef'): assert math.isnan(row[name]), name
    binary = [(torch.full((4,), math.nan), torch.tensor([0., 1, 0, 1]))]
    assert math.isnan(feed(accuracy, binary)) and math.isnan(feed(MatthewsCorrCoef(), binary))
    assert feed(accuracy, [(torch.tensor([-1., 1, -1, 1]), torch.tensor([0., 1, 0, 1]))]) == 1.0

# -- no sync per batch ------------------------------------------------------------------------------------------------
class NoSync(TorchFunctionMode):
    "Record tensor calls that would make a GPU wait: .item(), float(t), bool(t), .tolist(), .cpu(), f-strings, masks."
    names = {'item', 'tolist', '__float__', '__int__', '__bool__', '__index__', 'cpu', 'numpy', '__format__', 'nonzero'}
    def __init__(self):
        super().__init__(); self.calls = []
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', str(func))
        if name in self.names: self.calls.append(name)
        if name == '__getitem__' and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:]):
            self.calls.append('boolean mask')
        return func(*args, **(kwargs or {}))


def test_no_metric_syncs_per_batch():
    metrics = [as_metric(m) for m in (accuracy, top5_accuracy, MatthewsCorrCoef(), Perplexity(), EpochMetric(r2),
                                      lambda p, t: (p.argmax(-1) == t).float().mean())]
    batches = padded_sequences(n_batches=3, c=6)
    for m in metrics: m.reset()
    with NoSync() as spy:
        for logits, targ in batches:
            fl = FakeLearn(logits, targ, F.cross_entropy(logits.transpose(1, 2), targ))
            for m in metrics: m.accumulate(fl)
    assert spy.calls == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU: run `make gpu-check` on one')
def test_no_metric_syncs_per_batch_on_cuda():
    "The definitive check: CUDA's sync debug mode raises on any synchronizing call during the updates."
    dev = torch.device('cuda')
    metrics = [as_metric(m) for m in (accuracy, top5_accuracy, MatthewsCorrCoef(), Perplexity(), EpochMetric(r2),
                                      lambda p, t: (p.argmax(-1) == t).float().mean())]
    batches = [(p.to(dev), t.to(dev)) for p, t in padded_sequences(n_batches=3, c=6)]
    for m in metrics: m.reset()
    fls = [FakeLearn(p, t, F.cross_entropy(p.transpose(1, 2), t)) for p, t in batches]
    for m in metrics: m.accumulate(fls[0])                     # first update allocates
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for fl in fls[1:]:
            for m in metrics: m.accumulate(fl)
    finally: torch.cuda.set_sync_debug_mode('default')
    assert feed(accuracy, [(p.cpu(), t.cpu()) for p, t in batches]) == metrics[0].compute()
