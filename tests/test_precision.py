"""Mixed precision on the CPU (issue 9): bf16 and fp16 train; fp16's gradient scaler skips a step whose gradients
overflow, halves its scale, and a run resumed across such a step ends bit for bit like an uninterrupted one
(the scaler's state is in every checkpoint). The same checks on CUDA are in tests/test_cuda.py.
"""
import io
import warnings
from contextlib import redirect_stdout

import pytest
import torch

from nbloop.all import *
from nbloop.learner import synth_learner


class Overflow(Callback):
    "Makes the gradients of training step `at` infinite, as a float16 overflow would."
    order = 1
    def __init__(self, at: int): self.at = at
    def after_backward(self, learn):
        if learn.train_iter == self.at:
            for p in learn.model.parameters(): p.grad.fill_(float('inf'))


class Watch(Callback):
    "Records, per training step, the weights before and after it and the scaler's scale after it."
    order = 99
    def __init__(self): self.steps = {}
    def before_step(self, learn): self._w = [p.detach().clone() for p in learn.model.parameters()]
    def after_step(self, learn):
        self.steps[learn.train_iter] = (self._w, [p.detach().clone() for p in learn.model.parameters()],
                                        learn.scaler.get_scale())


def crash_at(step: int):
    class Crash(Callback):
        order = 200
        def after_batch(self, learn):
            if learn.train_iter == step: raise RuntimeError('simulated crash')
    return Crash()


def quiet(fn, *args, **kwargs):
    with redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return fn(*args, **kwargs)


def make(path, *cbs):
    return synth_learner(n_classes=3, path=path, cbs=[MixedPrecision(torch.float16), CheckpointCallback(every_n_steps=4), *cbs])


def test_bf16_trains_on_cpu():
    learn = synth_learner(n_classes=3, lr=0.05, cbs=[MixedPrecision(torch.bfloat16)])
    quiet(learn.fit, 3)
    h = learn.recorder.history
    assert h[-1]['valid_loss'] < h[0]['valid_loss']


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    watch = Watch()
    learn = make(tmp_path, Overflow(at=5), watch)
    quiet(learn.fit, 2)
    before, after, scale = watch.steps[5]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), 'the overflowing step changed the weights'
    assert scale == watch.steps[4][2] / 2
    b6, a6, _ = watch.steps[6]
    assert any(not torch.equal(a, b) for a, b in zip(b6, a6)), 'the next step did not train'


def test_fp16_resume_across_an_overflow_is_exact(tmp_path):
    ref = make(tmp_path / 'ref', Overflow(at=5))
    quiet(ref.fit, 3)
    run = make(tmp_path / 'run', Overflow(at=5))
    with pytest.raises(RuntimeError, match='simulated crash'): quiet(run.fit, 3, cbs=[crash_at(11)])
    resumed = make(tmp_path / 'run', Overflow(at=5))
    quiet(resumed.fit, 3, resume='last')
    assert resumed.resumed_from is not None
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.scaler is None and ref.get_cb(MixedPrecision).scaler.state_dict() == \
        resumed.get_cb(MixedPrecision).scaler.state_dict()
    strip = lambda h: [{k: v for k, v in r.items() if k != 'time'} for r in h]
    assert strip(ref.recorder.history) == strip(resumed.recorder.history)
