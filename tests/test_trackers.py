"""Trackers against the real thing: an MLflow tracking server with a SQLite store, started here on 127.0.0.1 and
stopped by its PID, and W&B in offline mode, whose run files are read back record by record.

The job is tests/ddp_job.py (one process, or 2 under torchrun): checkpoints every 4 steps, 12 training steps per
epoch in one process, 3 epochs. A run is killed (SIGKILL) or stopped (SIGTERM) at step 10, two steps after its
last checkpoint, and resumed; the tracker must then hold exactly one value per step, equal to an uninterrupted
run's, in one tracker run.
"""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import env_for_subprocess, run
from test_ddp import ok, result, single, torchrun

mlflow = pytest.importorskip('mlflow', reason='the mlflow extra (make test installs it)')
from mlflow.tracking import MlflowClient  # noqa: E402

STEPS = 3 * 96 // 8          # one process: 12 training steps per epoch, 3 epochs


@pytest.fixture(scope='module')
def server(tmp_path_factory) -> str:
    "`mlflow server` on a free port of 127.0.0.1 with a SQLite backend store; its URI. Stopped by its PID."
    folder = tmp_path_factory.mktemp('mlflow')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    log = open(folder / 'server.log', 'w')
    p = subprocess.Popen([sys.executable, '-m', 'mlflow', 'server', '--backend-store-uri', f'sqlite:///{folder}/store.db',
                          '--artifacts-destination', str(folder / 'artifacts'), '--host', '127.0.0.1',
                          '--port', str(port), '--workers', '1'],
                         stdout=log, stderr=subprocess.STDOUT, env=env_for_subprocess(), start_new_session=True)
    uri = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 120
        while True:
            assert p.poll() is None, f'mlflow server exited:\n{(folder / "server.log").read_text()[-3000:]}'
            assert time.monotonic() < deadline, f'mlflow server did not answer:\n{(folder / "server.log").read_text()[-3000:]}'
            try:
                urllib.request.urlopen(f'{uri}/health', timeout=2)
                break
            except OSError: time.sleep(0.3)
        yield uri
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try: os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError: pass
            p.wait(15)
        log.close()


def runs_of(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    "Every metric's full history, as the server holds it: name -> [(step, value)] by step."
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}


def test_mlflow_server_after_sigkill_and_resume_holds_the_uninterrupted_run(server, tmp_path):
    client = MlflowClient(server)
    ok(single(tmp_path / 'ref', '--mlflow', server, '--experiment', 'ref', '--out', tmp_path / 'ref.pt'))
    ref = result(tmp_path / 'ref.pt')
    killed = single(tmp_path / 'run', '--mlflow', server, '--experiment', 'crash', '--die', '0:10:kill')
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (at_kill,) = runs_of(client, 'crash')
    # the server has what the newest checkpoint (step 8) covers: nothing of steps 9 and 10, which the resumed fit redoes
    assert [s for s, _ in histories(client, at_kill)['train_loss']] == list(range(1, 9))
    assert at_kill.info.status == 'RUNNING'                 # a SIGKILL ends nothing
    ok(single(tmp_path / 'run', '--mlflow', server, '--experiment', 'crash', '--resume', 'last', '--out', tmp_path / 'res.pt'))
    (resumed,) = runs_of(client, 'crash')                   # the same run, continued
    assert resumed.info.run_id == at_kill.info.run_id == result(tmp_path / 'res.pt')['tracker_run']
    (uninterrupted,) = runs_of(client, 'ref')
    got, want = histories(client, resumed), histories(client, uninterrupted)
    assert sorted(got) == ['accuracy', 'lr', 'train_loss', 'valid_loss']
    assert got == want                                      # every metric's full history, value for value
    for name, points in got.items(): assert len({s for s, _ in points}) == len(points), name   # one value per step
    assert [s for s, _ in got['train_loss']] == list(range(1, STEPS + 1))
    assert [v for _, v in got['valid_loss']] == [row['valid_loss'] for row in ref['history']]
    assert resumed.data.params == uninterrupted.data.params and resumed.data.params['job'] == 'ddp_job'
    assert resumed.data.params['n_epochs'] == '3' and resumed.info.status == 'FINISHED'
    assert len(resumed.data.tags['nbloop.run']) == 8


def test_mlflow_under_torchrun_logs_once(server, tmp_path):
    "2 processes: rank 0 alone talks to the server; one run, one value per step, the run's own history."
    ok(torchrun(tmp_path / 'ddp', '--mlflow', server, '--experiment', 'ddp', '--out', tmp_path / 'ddp.pt'))
    client = MlflowClient(server)
    (run,) = runs_of(client, 'ddp')
    got, ref = histories(client, run), result(tmp_path / 'ddp.pt')
    assert [s for s, _ in got['train_loss']] == list(range(1, 3 * 96 // 2 // 8 + 1))
    assert [v for _, v in got['valid_loss']] == [row['valid_loss'] for row in ref['history']]
    assert [v for _, v in got['accuracy']] == [row['accuracy'] for row in ref['history']]
    assert run.info.run_id == ref['tracker_run'] and run.info.status == 'FINISHED'


def wandb_records(path: Path):
    "The records of a W&B run file (`run-<id>.wandb`): a LevelDB-style log of 32 KiB blocks after a 7-byte header."
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, parts = path.read_bytes(), 7, b''
    assert data[:4] == b':W&B', path
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if kind == 0 and n == 0:            # the rest of the block is padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):                  # a whole record, or the last part of one
            record = pb.Record()
            record.ParseFromString(parts + chunk if kind == 4 else chunk)
            parts = b''
            yield record
        else: parts = chunk if kind == 2 else parts + chunk


def wandb_run(folder: Path) -> tuple[str, list[dict], list[dict]]:
    """The one run id of the offline runs under `folder`, each offline folder's history rows (in the order the
    folders were written) and its config."""
    files = sorted(folder.glob('wandb/offline-run-*/run-*.wandb'), key=lambda p: p.parent.name)
    ids = {p.name[len('run-'):-len('.wandb')] for p in files}
    assert len(ids) == 1, files
    rows, configs = [], []
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof('record_type')
            if kind == 'history':
                items = {i.key or '.'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                rows.append({k: v for k, v in items.items() if k == '_step' or not k.startswith('_')})
            elif kind == 'run':
                configs.append({i.key or '.'.join(i.nested_key): json.loads(i.value_json) for i in r.run.config.update})
    return ids.pop(), rows, configs


def test_wandb_offline_after_sigterm_and_resume_holds_the_uninterrupted_run(tmp_path):
    pytest.importorskip('wandb', reason='the wandb extra (make test installs it)')
    ok(single(tmp_path / 'ref', '--wandb', tmp_path / 'ref_wb', '--out', tmp_path / 'ref.pt'))
    stopped = single(tmp_path / 'run', '--wandb', tmp_path / 'run_wb', '--die', '0:10:term')
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    run_id, at_stop, _ = wandb_run(tmp_path / 'run_wb')
    # the batch under way when the signal came finishes (step 11); the interrupt checkpoint covers every step
    assert [r['_step'] for r in at_stop] == list(range(1, 12))
    ok(single(tmp_path / 'run', '--wandb', tmp_path / 'run_wb', '--resume', 'last', '--out', tmp_path / 'res.pt'))
    again, rows, configs = wandb_run(tmp_path / 'run_wb')
    _, ref_rows, ref_configs = wandb_run(tmp_path / 'ref_wb')
    assert again == run_id == result(tmp_path / 'res.pt')['tracker_run']     # one run, continued
    assert [r['_step'] for r in rows] == list(range(1, STEPS + 1))            # one row per step, in order
    assert rows == ref_rows                                                   # the uninterrupted run's values
    ref = result(tmp_path / 'ref.pt')
    assert [r['valid_loss'] for r in rows if 'valid_loss' in r] == [row['valid_loss'] for row in ref['history']]
    assert configs[0]['job'] == 'ddp_job' and configs[0] == ref_configs[0]    # the params, logged once, at the start


def test_wandb_offline_stores_the_best_checkpoint(tmp_path):
    "log_checkpoint=True: the run file holds a model artifact of best.safetensors, of the file's size."
    pytest.importorskip('wandb', reason='the wandb extra (make test installs it)')
    code = ('from nbloop.learner import synth_learner\nfrom nbloop.checkpoint import CheckpointCallback\n'
            'from nbloop.trackers import WandbLogger\n'
            f'learn = synth_learner(n_classes=3, path={str(tmp_path)!r}, cbs=[CheckpointCallback(), WandbLogger(mode="offline", '
            'log_checkpoint=True, init_kwargs={"settings": {"console": "off", "silent": True}})])\n'
            'with learn.no_bar(): learn.fit(2)\n')
    ok(run([sys.executable, '-c', code], timeout=120))
    (file,) = tmp_path.glob('wandb/offline-run-*/run-*.wandb')
    artifacts = [r.artifact for r in wandb_records(file) if r.WhichOneof('record_type') == 'artifact']
    assert [(a.type, [(m.path, m.size) for m in a.manifest.contents]) for a in artifacts] == [
        ('model', [('best.safetensors', (tmp_path / 'checkpoints' / 'best.safetensors').stat().st_size)])]
