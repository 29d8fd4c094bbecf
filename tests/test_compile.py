"""`Learner(..., compile=True)`: the model is compiled with torch.compile, and checkpoints keep plain keys, so they
load into an uncompiled learner and the other way round (issue 9). Compiling takes ~20 s on these CPUs, so the
compiled learner is built once per module.
"""
import io
import warnings
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

from nbloop.all import *
from nbloop.ckpt_format import list_checkpoints, load_state
from nbloop.learner import synth_data


def make(path, compile: bool):
    torch.manual_seed(0)
    train, valid = synth_data(n_classes=3)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    return Learner(model, train, valid, lr=1e-2, device='cpu', path=path, compile=compile,
                   cbs=[CheckpointCallback(every_n_steps=4)])


def quiet(fn, *args, **kwargs):
    with redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return fn(*args, **kwargs)


@pytest.mark.timeout(300)
def test_compiled_learner_trains_and_checkpoints_with_plain_keys(tmp_path):
    compiled = make(tmp_path / 'c', compile=True)
    assert hasattr(compiled.model, '_orig_mod'), 'compile=True did not compile the model'
    quiet(compiled.fit, 2)
    assert compiled.recorder.history[-1]['valid_loss'] < compiled.recorder.history[0]['valid_loss'] * 1.5
    plain_keys = set(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).state_dict())
    newest = list_checkpoints(tmp_path / 'c' / 'checkpoints')[-1]
    assert set(load_state(newest)['model']) == plain_keys
    saved = compiled.save('weights')
    assert set(load_state(saved)['model']) == plain_keys

    # a compiled checkpoint loads into an uncompiled learner, with the same predictions
    plain = make(tmp_path / 'p', compile=False)
    plain.load(saved)
    x = torch.randn(5, 4)
    assert torch.allclose(plain.predict(x), compiled.predict(x), atol=1e-6)

    # and an uncompiled run's checkpoint resumes in the compiled learner
    quiet(plain.fit, 1)
    compiled.load(plain.save('back'))
    assert torch.allclose(plain.predict(x), compiled.predict(x), atol=1e-6)
    quiet(compiled.fit, 2, resume=list_checkpoints(tmp_path / 'p' / 'checkpoints')[-1])
    assert compiled.resumed_from is not None and compiled.train_iter == 12
