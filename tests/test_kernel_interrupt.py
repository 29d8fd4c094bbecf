"""Interrupting `fit` from Jupyter: the kernel's interrupt (what the stop button sends) stops the fit at a batch
boundary, writes a checkpoint, shows KeyboardInterrupt, and `fit(..., resume='last')` in the same kernel then
ends exactly where an uninterrupted run ends."""
import time

import pytest
from jupyter_client.manager import start_new_kernel

from conftest import ROOT

SETUP = r'''
import os, time, torch
from pathlib import Path
from nbloop.all import *
from torch.utils.data import DataLoader, TensorDataset
g = torch.Generator().manual_seed(0)
x, y = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)
def make(path, cbs=()):
    torch.manual_seed(0)
    dl = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    return Learner(model, dl, DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32), path=path,
                   cbs=[CheckpointCallback(), *cbs], device='cpu')
class Slow(Callback):
    def after_batch(self, learn):
        if learn.train_iter == 5: print('TRAINING', flush=True)
        time.sleep(0.05)
root = Path({root!r})
ref = make(root / 'ref'); ref.fit(3)
learn = make(root / 'run', [Slow()])
'''


def run(kc, code, timeout=120):
    "Execute `code`; return (stdout text, error name or None)."
    msg_id = kc.execute(code)
    out, err, deadline = [], None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=max(1, deadline - time.monotonic()))
        if msg['parent_header'].get('msg_id') != msg_id: continue
        t, c = msg['msg_type'], msg['content']
        if t == 'stream': out.append(c['text'])
        elif t == 'error': err = c['ename']
        elif t == 'status' and c['execution_state'] == 'idle': return ''.join(out), err
    raise TimeoutError(f'cell did not finish in {timeout} s')


def test_interrupt_in_a_kernel_checkpoints_and_resumes_exactly(tmp_path):
    km, kc = start_new_kernel(kernel_name='python3', cwd=str(ROOT))
    try:
        out, err = run(kc, SETUP.replace('{root!r}', repr(str(tmp_path))))
        assert err is None, out
        msg_id = kc.execute('learn.fit(3)')
        deadline, started = time.monotonic() + 60, False
        while time.monotonic() < deadline and not started:
            msg = kc.get_iopub_msg(timeout=60)
            started = msg['msg_type'] == 'stream' and 'TRAINING' in msg['content'].get('text', '')
        assert started, 'the fit never reached step 5'
        km.interrupt_kernel()                                   # what Jupyter's stop button does
        ename, texts = None, []
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=60)
            if msg['parent_header'].get('msg_id') != msg_id: continue
            if msg['msg_type'] == 'stream': texts.append(msg['content']['text'])
            if msg['msg_type'] == 'error': ename = msg['content']['ename']
            if msg['msg_type'] == 'status' and msg['content']['execution_state'] == 'idle': break
        assert ename == 'KeyboardInterrupt', (ename, texts)
        assert 'saved checkpoint' in ''.join(texts)
        out, err = run(kc, "print(learn.interrupted, list_checkpoints(root / 'run' / 'checkpoints')[-1].name)")
        assert err is None and out.startswith('SIGINT ckpt-step'), out
        out, err = run(kc, "learn.remove_cb(Slow); learn.fit(3, resume='last'); "
                           "print(all(torch.equal(v, ref.model.state_dict()[k]) for k, v in learn.model.state_dict().items()), "
                           "learn.recorder.losses == ref.recorder.losses)")
        assert err is None, out
        assert out.strip().endswith('True True'), out
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
