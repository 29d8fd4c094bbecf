"""The attack suite, part 4: several processes (issue 16), each case run through `launch` in a process of its own.

Every case is a short script run with a time limit (a hang fails the test; it never waits on luck), its whole
process group killed on the way out. The cases are those of the second reliability review that concern `launch`
and the data of several processes: what rank 0 returns comes back whatever it holds, a DataLoader that already
has a DistributedSampler is refused, processes given different data fail at the fit's start, all of them,
with a message that names the lengths, and a cancel that a callback raises in one process alone stops every process
in seconds with an error that names the process, the exception and `cancel_fit_everywhere` (it hung for ten minutes).
"""
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from conftest import run
from nbloop.all import Learner


def run_script(code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    "Run `code` (dedented) with this repo's nbloop, in a session of its own that is killed when done or too slow."
    return run([sys.executable, '-c', textwrap.dedent(code)], timeout)


def test_launch_returns_tensors_every_time():
    "A tensor, a state_dict and predictions come back from rank 0 by value, five times in a row (not by timing)."
    p = run_script('''
        import torch
        from nbloop.launch import launch
        def results():
            torch.manual_seed(0)
            model = torch.nn.Linear(3, 2)
            return torch.arange(6.), model.state_dict(), model(torch.ones(4, 3)).detach()
        torch.manual_seed(0); ref = torch.nn.Linear(3, 2)
        for _ in range(5):
            t, sd, preds = launch(results, 2, timeout=60)
            assert torch.equal(t, torch.arange(6.)), t
            assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
            assert torch.equal(preds, ref(torch.ones(4, 3)).detach())
        assert torch.equal(launch(torch.zeros, 2, 3, timeout=60), torch.zeros(3))
        print('ALL OK')
    ''')
    assert p.returncode == 0 and 'ALL OK' in p.stdout, p.stderr[-3000:]


@pytest.mark.parametrize('where', ['sampler', 'batch_sampler'])
def test_a_dataloader_with_a_distributed_sampler_is_refused(where):
    "nbloop splits the data itself: a DistributedSampler too would train each process on a share of a share."
    ds = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    sampler = DistributedSampler(ds, num_replicas=2, rank=0)
    dl = (DataLoader(ds, batch_size=8, sampler=sampler) if where == 'sampler'
          else DataLoader(ds, batch_sampler=BatchSampler(sampler, 8, False)))
    with pytest.raises(ValueError, match='train_dl has a DistributedSampler.*Pass the DataLoader without it'):
        Learner(torch.nn.Linear(4, 2), dl, device='cpu')


DIFFERENT_DATA = '''
    import os, torch
    from torch.utils.data import DataLoader, TensorDataset
    from nbloop.all import Learner
    from nbloop.launch import launch, LaunchError
    def fit(n0, n1, lists):
        import torch.nn.functional as F
        torch.manual_seed(0)
        n = n0 if os.environ['RANK'] == '0' else n1
        x, y = torch.randn(n, 4), torch.randint(0, 2, (n,))
        train = ([(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)] if lists
                 else DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
        Learner(torch.nn.Linear(4, 2), train, device='cpu', cbs=[], path=os.environ['OUT']).fit(1)
    try: launch(fit, 2, *ARGS, timeout=120)
    except LaunchError as e: print('REFUSED', str(e).splitlines()[-1])
    else: print('TRAINED')
'''


@pytest.mark.parametrize('n0, n1, lists, message', [
    (64, 40, False, "train_dl's dataset has a different length in each process (64 samples in process 0, 40 in process 1)"),
    (40, 64, False, "train_dl's dataset has a different length in each process (40 samples in process 0, 64 in process 1)"),
    (48, 32, True, 'train_dl yields a different number of batches per epoch in each process (6 batches in process 0, 4 in process 1)'),
])
def test_processes_with_different_data_fail_at_the_start(tmp_path, n0, n1, lists, message):
    """A shard per process of a map-style dataset (rank 1's smaller: an IndexError before; larger: 12 of its 40
    samples trained, silently), or lists of 6 and 4 batches (a hang before): every process stops at the fit's
    start with the lengths named."""
    code = textwrap.dedent(DIFFERENT_DATA).replace('ARGS', repr((n0, n1, lists)))
    p = run_script(f"import os; os.environ['OUT'] = {str(tmp_path)!r}\n" + code, timeout=150)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'REFUSED' in p.stdout and message in p.stdout, p.stdout + p.stderr[-3000:]


def test_a_model_already_in_ddp_is_used_as_it_is(tmp_path):
    "A model the user wrapped in DistributedDataParallel is not wrapped again, and trains as the plain model does."
    p = run_script(f'''
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP
        from torch.utils.data import DataLoader, TensorDataset
        from nbloop.all import Learner
        from nbloop.launch import init_distributed, launch
        def fit(wrap):
            init_distributed('gloo')
            torch.manual_seed(0)
            x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
            model = torch.nn.Linear(4, 2)
            learn = Learner(DDP(model) if wrap else model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
                            device='cpu', cbs=[], path={str(tmp_path)!r})
            learn.fit(2)
            return type(learn.model.module).__name__, model.state_dict()
        inner, wrapped = launch(fit, 2, True, timeout=120)
        _, plain = launch(fit, 2, False, timeout=120)
        assert inner == 'Linear', inner
        assert all(torch.equal(wrapped[k], plain[k]) for k in plain), (wrapped, plain)
        print('ALL OK')
    ''')
    assert p.returncode == 0 and 'ALL OK' in p.stdout, p.stdout + p.stderr[-3000:]


def test_more_threads_in_a_launched_process_is_an_error_not_a_hang():
    "After a parallel op in the caller, torch.set_num_threads(2) in a launched process raised nothing and hung."
    p = run_script('''
        import torch
        from nbloop.launch import launch, LaunchError
        torch.set_num_threads(2); torch.randn(512, 512) @ torch.randn(512, 512)      # the caller's OpenMP pool is live
        def more_threads():
            torch.set_num_threads(2)
            return (torch.randn(256, 256) @ torch.randn(256, 256)).sum()
        try: launch(more_threads, 2, timeout=60)
        except LaunchError as e: print('REFUSED', str(e).splitlines()[-1])
        else: print('RAN')
    ''', timeout=120)
    assert 'REFUSED RuntimeError: torch.set_num_threads(2) in a process that launch started' in p.stdout, p.stdout + p.stderr[-2000:]


CANCELS = '''
    import os, torch
    from torch.utils.data import DataLoader, TensorDataset
    from nbloop.all import Learner, Callback, GradientAccumulation
    from nbloop.core import (CancelBatchException, CancelTrainException, CancelValidateException, CancelEpochException,
                             CancelFitException)
    from nbloop.distributed import DistributedRuntime
    from nbloop.launch import launch, LaunchError
    DistributedRuntime.cancel_timeout = 3.
    def cancels(exc, event, at, ranks, train, every):
        "A callback that raises `exc` at `event` of batch `at` (epoch 0, or `every` epoch) in the processes of `ranks`."
        def maybe(self, learn):
            if ((learn.epoch == 0 or every) and learn.iter == at and learn.training == train
                    and int(os.environ['RANK']) in ranks): raise exc()
        return type('Cancels', (Callback,), {event: maybe})()
    def fit(exc, event, at, ranks, train, every_epoch, accumulate):
        import nbloop.core as C
        torch.manual_seed(0)
        x, y = torch.randn(96, 4), torch.randint(0, 2, (96,))
        cbs = [cancels(getattr(C, exc), event, at, ranks, train, every_epoch)] + ([GradientAccumulation(2)] if accumulate else [])
        learn = Learner(torch.nn.Linear(4, 2), DataLoader(TensorDataset(x[:64], y[:64]), batch_size=8, shuffle=True),
                        DataLoader(TensorDataset(x[64:], y[64:]), batch_size=8), device='cpu', cbs=cbs,
                        path=os.environ['OUT'])
        with learn.no_bar(): learn.fit(2)
        return learn.runtime.gather((learn.train_iter, len(learn.recorder.history)))
    try: got = launch(fit, 2, *ARGS, timeout=150)     # (the test's time limit is far below gloo's ten minutes)
    except LaunchError as e: print('FAILED'); print(str(e))
    else: print('FITTED', got)
'''


def cancels(tmp_path, *args) -> subprocess.CompletedProcess:
    return run_script(CANCELS.replace('ARGS', repr(args)).replace("os.environ['OUT']", repr(str(tmp_path))), timeout=240)


@pytest.mark.parametrize('exc, event, at, ranks, train', [
    ('CancelEpochException', 'after_batch', 2, [1], True),      # the attack: hung until gloo's 10-minute timeout
    ('CancelFitException', 'after_batch', 3, [1], True),        # the attack: "remote worker crashing", nothing else
    ('CancelTrainException', 'before_batch', 1, [0], True),
    ('CancelValidateException', 'after_batch', 1, [1], False),
    ('CancelEpochException', 'after_loss', 0, [0], False),
])
def test_a_cancel_in_one_process_fails_fast_everywhere_and_says_why(tmp_path, exc, event, at, ranks, train):
    p = cancels(tmp_path, exc, event, at, ranks, train, False, False)
    assert 'FAILED' in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    for part in ('CancelMismatchError: the processes disagree on a cancel', exc, 'learn.cancel_fit_everywhere()'):
        assert part in p.stdout, (part, p.stdout[-3000:])
    assert re.search(f"process {ranks[0]}'s (callbacks raised )?1", p.stdout), p.stdout[-3000:]   # which one cancelled


def test_a_lone_cancel_before_backward_fails_after_the_timeout(tmp_path):
    "The others wait in the skipped backward's all-reduce and never vote: the process that cancelled says so."
    p = cancels(tmp_path, 'CancelBatchException', 'after_pred', 2, [1], True, False, False)
    assert 'FAILED' in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert "process 1's callbacks raised 1 cancel(s)" in p.stdout and 'did not vote on it within 3 s' in p.stdout, p.stdout[-3000:]


@pytest.mark.parametrize('exc, event, at, ranks, train, every, accumulate, expected', [
    ('CancelTrainException', 'before_batch', 3, [0, 1], True, True, False, [(6, 2), (6, 2)]),   # both, every epoch
    ('CancelBatchException', 'after_pred', 2, [0, 1], True, True, True, [(8, 2), (8, 2)]),    # both, accumulating
    ('CancelBatchException', 'after_pred', 1, [1], False, False, False, [(8, 2), (8, 2)]),   # one, in validation
    ('CancelFitException', 'after_batch', 1, [0, 1], True, False, False, [(2, 0), (2, 0)]),     # both: the fit ends
])
def test_cancels_that_every_process_agrees_on_still_work(tmp_path, exc, event, at, ranks, train, every, accumulate,
                                                        expected):
    p = cancels(tmp_path, exc, event, at, ranks, train, every, accumulate)
    assert f'FITTED {expected}' in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
