"""The attack suite, part 2: checkpoint files, rotation and resume selection (issue 8, "Never lose a run").

Every test is an attack a hostile or unlucky user can make on nbloop's checkpoints, with the behaviour nbloop
promises asserted, never just "it did not crash":

- crafted or inconsistent files (deep nesting, shapes that disagree with byte offsets, overlapping offsets,
  unknown dtypes, metadata of the wrong type, damaged format markers, newer formats, pickles of every protocol,
  folders, links and FIFOs named like checkpoints): each raises the documented exception class, its message
  names the file, no pickle is ever run, and `resume='last'` skips the file with a warning naming it and resumes
  from the next good checkpoint;
- training states of the wrong structure (a schema check before anything is loaded), the same way;
- run collisions: runs never rotate each other's files away; `resume='last'` takes the learner's own run first,
  else the run written last (by the time stored in the headers, not by file time), and within a run the furthest
  checkpoint (by its progress, so a clock set back never makes a run go backwards); it says which run it took
  when the folder holds several;
- optimizer mismatches, temporary file names, the checkpoint folder, the `resume` argument, and memory use.

It tries 324 attacks: 86 crafted files read directly and 85 of them again through `resume='last'`, 52 training
states of the wrong structure both ways, and 49 more on runs (a clock set back, two runs in one folder, a folder
of other runs' files, compare_checkpoints over several runs and from the working directory), optimizers, temporary files, the folder, the `resume` argument, memory and state at the
end of an event. Every shipped stateful callback has
`check_state_dict`, so a callback state of the wrong structure is found before anything loads.

Part 1 of the suite is tests/test_attacks.py (the loop), part 3 tests/test_attacks_metrics.py. Everything runs
in-process on tiny CPU fixtures (`synth_learner`); the whole file takes about ten seconds.
"""
import io
import json
import os
import pickle
import shutil
import re
import time
import tracemalloc
import warnings
import zlib
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nbloop.all import *
from nbloop.ckpt_format import _checksum
from nbloop.learner import synth_learner


def quiet_fit(learn, *args, **kwargs) -> list[str]:
    "Fit without output; returns the warnings' messages."
    with redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.fit(*args, **kwargs)
    return [str(x.message) for x in w]


def weights(learn) -> dict:
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make(path, **kwargs):
    "A tiny classifier: 96 training samples in 6 batches, a checkpoint every 2 steps and at each epoch's end."
    cb = CheckpointCallback(every_n_steps=2, keep_last=kwargs.pop('keep_last', 3))
    return synth_learner(n_classes=3, path=path, cbs=[cb, *kwargs.pop('cbs', ())], **kwargs)


def base_name(path) -> str:
    "A checkpoint's name without its run id."
    return re.sub(r'-run[0-9a-f]{8}(?=-epoch)', '', Path(path).name)


def write_raw(path: Path, header, body: bytes = b'', length: int | None = None) -> Path:
    "A file shaped like safetensors with any header (a dict is dumped as JSON; bytes are used as they are)."
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, 'little', signed=True) + raw + body)
    return path


def ours(entries: dict, state, body: bytes = b'', **meta) -> dict:
    "An nbloop header, written now, with a valid checksum over `entries`, `state` (JSON text or an object) and `body`."
    m = {'format': 'nbloop', 'version': '2', 'written': str(time.time_ns()), 'state': state if isinstance(state, str) else json.dumps(state),
         **meta}
    if 'checksum' not in meta: m['checksum'] = _checksum(entries, m, (body,))
    return {**entries, '__metadata__': m}


F32 = lambda a, b: {'dtype': 'F32', 'shape': [(b - a) // 4], 'data_offsets': [a, b]}


# -- 1. crafted and inconsistent files: exception class, the file named, never unpickled ---------------------------
class Evil:
    "A pickle payload that would create a file if it ever ran."
    marker: Path = None
    def __reduce__(self): return (os.system, (f'touch {Evil.marker}',))


def _valid(tmp: Path) -> Path:
    return save_state(tmp / 'valid.safetensors', {'kind': 'training', 'w': torch.arange(6.), 'history': ['abc']})


def _flip(tmp: Path, find: bytes, offset: int = 0, mask: int = 0x01) -> Path:
    raw = bytearray(_valid(tmp).read_bytes())
    raw[raw.index(find) + offset] ^= mask
    out = tmp / 'flipped.safetensors'
    out.write_bytes(bytes(raw))
    return out


def _torch_save(tmp: Path, **kwargs) -> Path:
    torch.save({'model': Evil()}, tmp / 'saved.pt', **kwargs)
    return tmp / 'saved.pt'


def _pickle(tmp: Path, protocol: int) -> Path:
    (tmp / 'obj.pkl').write_bytes(pickle.dumps({'model': Evil()}, protocol=protocol))
    return tmp / 'obj.pkl'


def _symlink(tmp: Path, target: Path) -> Path:
    (tmp / 'link.safetensors').symlink_to(target)
    return tmp / 'link.safetensors'


def _loop(tmp: Path) -> Path:
    (tmp / 'a.safetensors').symlink_to(tmp / 'b.safetensors')
    (tmp / 'b.safetensors').symlink_to(tmp / 'a.safetensors')
    return tmp / 'a.safetensors'


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / 'fifo.safetensors')
    return tmp / 'fifo.safetensors'


def _folder(tmp: Path) -> Path:
    (tmp / 'dir.safetensors').mkdir()
    return tmp / 'dir.safetensors'


def _bytes(tmp: Path, data: bytes) -> Path:
    (tmp / 'x').write_bytes(data)
    return tmp / 'x'


def _state_file(tmp: Path, state: str, entries=None, body=b'') -> Path:
    return write_raw(tmp / 'state.safetensors', ours(entries or {}, state, body), body)


C, U, V, E = CorruptCheckpointError, UnsafeCheckpointError, CheckpointVersionError, CheckpointError
CRAFTED = {   # name: (make the file in tmp, exception class, a fragment of the message)
    'header nested 5000 deep': (lambda t: write_raw(t / 'x', b'{"a":' + b'[' * 5000 + b']' * 5000 + b'}'), C, 'nests 5001 levels'),
    'header nested 101 deep': (lambda t: write_raw(t / 'x', b'{"a":' + b'[' * 100 + b']' * 100 + b'}'), C, 'nests 101 levels'),
    'state nested 5000 deep': (lambda t: _state_file(t, '[' * 5000 + ']' * 5000), C, 'damaged state (it nests 5000'),
    'state nested in dicts': (lambda t: _state_file(t, '{"a":' * 3000 + '1' + '}' * 3000), C, 'nests 3000 levels'),
    'shape larger than its bytes': (lambda t: write_raw(t / 'x', {'w': {'dtype': 'F32', 'shape': [3], 'data_offsets': [0, 8]}}, bytes(8)), C, 'but data_offsets [0, 8] (8 bytes)'),
    'shape smaller than its bytes': (lambda t: write_raw(t / 'x', {'w': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 8]}}, bytes(8)), C, 'but data_offsets'),
    'astronomic shape': (lambda t: write_raw(t / 'x', {'w': {'dtype': 'F32', 'shape': [2**40, 2**40], 'data_offsets': [0, 8]}}, bytes(8)), C, 'but data_offsets'),
    'negative dimension': (lambda t: write_raw(t / 'x', {'w': {'dtype': 'F32', 'shape': [-2], 'data_offsets': [0, 8]}}, bytes(8)), C, 'a shape is a list of whole numbers'),
    'shape is a string': (lambda t: write_raw(t / 'x', {'w': {'dtype': 'F32', 'shape': '2', 'data_offsets': [0, 8]}}, bytes(8)), C, 'a shape is a list'),
    'shape of booleans': (lambda t: write_raw(t / 'x', {'w': {'dtype': 'F32', 'shape': [True], 'data_offsets': [0, 4]}}, bytes(4)), C, 'a shape is a list'),
    'shape of floats': (lambda t: write_raw(t / 'x', {'w': {'dtype': 'F32', 'shape': [2.0], 'data_offsets': [0, 8]}}, bytes(8)), C, 'a shape is a list'),
    'overlapping offsets': (lambda t: write_raw(t / 'x', {'a': F32(0, 8), 'b': F32(4, 12)}, bytes(12)), C, "tensor 'b' starts at byte 4 of the data, expected 8"),
    'same offsets twice': (lambda t: write_raw(t / 'x', {'a': F32(0, 8), 'b': F32(0, 8)}, bytes(8)), C, 'no gap or overlap'),
    'gap between tensors': (lambda t: write_raw(t / 'x', {'a': F32(0, 4), 'b': F32(8, 12)}, bytes(12)), C, 'no gap or overlap'),
    'first tensor not at 0': (lambda t: write_raw(t / 'x', {'a': F32(4, 8)}, bytes(8)), C, 'starts at byte 4'),
    'offsets backwards': (lambda t: write_raw(t / 'x', {'a': {'dtype': 'F32', 'shape': [0], 'data_offsets': [8, 4]}}, bytes(8)), C, '0 <= start <= end'),
    'negative offsets': (lambda t: write_raw(t / 'x', {'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [-4, 0]}}, bytes(4)), C, '0 <= start <= end'),
    'one offset': (lambda t: write_raw(t / 'x', {'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4]}}, bytes(4)), C, 'expected [start, end]'),
    'offsets as floats': (lambda t: write_raw(t / 'x', {'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0.0, 4.0]}}, bytes(4)), C, 'expected [start, end]'),
    'offsets as a dict': (lambda t: write_raw(t / 'x', {'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': {'0': 4}}}, bytes(4)), C, 'expected [start, end]'),
    'trailing bytes': (lambda t: write_raw(t / 'x', {'a': F32(0, 4)}, bytes(12)), C, 'describes 4 bytes of tensor data, the file holds 12'),
    'data cut short': (lambda t: write_raw(t / 'x', {'a': F32(0, 16)}, bytes(12)), C, 'describes 16 bytes of tensor data, the file holds 12'),
    'unknown dtype code': (lambda t: write_raw(t / 'x', {'a': {'dtype': 'F128', 'shape': [1], 'data_offsets': [0, 16]}}, bytes(16)), C, "unknown dtype str 'F128'"),
    'dtype of another case': (lambda t: write_raw(t / 'x', {'a': {'dtype': 'f32', 'shape': [1], 'data_offsets': [0, 4]}}, bytes(4)), C, 'unknown dtype'),
    'dtype not a string': (lambda t: write_raw(t / 'x', {'a': {'dtype': ['F32'], 'shape': [1], 'data_offsets': [0, 4]}}, bytes(4)), C, 'unknown dtype list'),
    'bool tensor holding a 2': (lambda t: write_raw(t / 'x', {'b': {'dtype': 'BOOL', 'shape': [2], 'data_offsets': [0, 2]}}, b'\x01\x02'), C, 'a bool tensor may hold only the bytes 0 and 1'),
    'tensor entry is a list': (lambda t: write_raw(t / 'x', {'a': [1, 2]}), C, 'exactly dtype, shape and data_offsets'),
    'tensor entry with an extra key': (lambda t: write_raw(t / 'x', {'a': {**F32(0, 4), 'x': 1}}, bytes(4)), C, 'exactly dtype, shape and data_offsets'),
    'tensor entry missing its dtype': (lambda t: write_raw(t / 'x', {'a': {'shape': [1], 'data_offsets': [0, 4]}}, bytes(4)), C, 'exactly dtype, shape'),
    'header is a list': (lambda t: write_raw(t / 'x', [1, 2, 3]), C, 'not a checkpoint'),
    'header is a string': (lambda t: write_raw(t / 'x', b'"abc"'), C, 'not a checkpoint'),
    'metadata is a list': (lambda t: write_raw(t / 'x', {'__metadata__': ['format', 'nbloop']}), C, '__metadata__ must map names to strings'),
    'metadata value is a number': (lambda t: write_raw(t / 'x', {'__metadata__': {'format': 'nbloop', 'version': 2}}), C, '__metadata__ must map'),
    'metadata value is a dict': (lambda t: write_raw(t / 'x', {'__metadata__': {'state': {'kind': 'training'}}}), C, '__metadata__ must map'),
    'negative header length': (lambda t: write_raw(t / 'x', {}, length=-16), C, 'truncated or damaged: its first 8 bytes give a header of 18446744073709551600'),
    'header length past the end': (lambda t: write_raw(t / 'x', {}, length=10**6), C, 'header of 1000000 bytes, but 2 bytes follow'),
    'header length zero': (lambda t: write_raw(t / 'x', {}, length=0), C, 'truncated or damaged'),
    'five bytes': (lambda t: _bytes(t, b'\x10\x00\x00\x00\x00'), C, 'truncated: 5 bytes, not even a header'),
    'empty file': (lambda t: _bytes(t, b''), C, 'truncated: 0 bytes'),
    'header not UTF-8': (lambda t: write_raw(t / 'x', b'{"\xff\xfe": 1}'), C, 'damaged header'),
    'header not JSON': (lambda t: write_raw(t / 'x', b'{"a": [1, 2}'), C, 'damaged header'),
    'header with a 10000-digit number': (lambda t: write_raw(t / 'x', b'{"a": ' + b'9' * 10000 + b'}'), C, 'damaged header'),
    'random bytes': (lambda t: _bytes(t, bytes(range(256)) * 64), C, 'not a checkpoint'),
    'a JSON text file': (lambda t: _bytes(t, b'{"model": {"w": [1, 2, 3]}}'), C, 'not a checkpoint'),
    'a zip that is no pickle': (lambda t: _bytes(t, b'PK\x03\x04' + bytes(60)), U, 'is a pickle file'),
    'truncated nbloop file': (lambda t: _bytes(t, _valid(t).read_bytes()[:-5]), C, 'truncated'),
    'flipped data byte': (lambda t: _flip(t, b'\x00\x00\x80\x3f'), C, 'fails its checksum'),
    'flipped state byte': (lambda t: _flip(t, b'abc'), C, 'fails its checksum'),
    'flipped bit in the format marker': (lambda t: _flip(t, b'"nbloop"', 1, 0x04), C, "its format marker is 'jbloop'"),
    'format marker in capitals': (lambda t: _flip(t, b'"nbloop"', 1, 0x20), C, "its format marker is 'Nbloop'"),
    'format marker key flipped': (lambda t: _flip(t, b'"format"', 1, 0x01), C, 'its format marker is None'),
    'checksum key flipped': (lambda t: _flip(t, b'"checksum"', 1, 0x01), C, "its header has no 'checksum'"),
    'state key flipped': (lambda t: _flip(t, b'"state"', 1, 0x01), C, "its header has no 'state'"),
    'version not a number': (lambda t: _flip(t, b'"version":"2"', 11, 0x40), C, "its format version is 'r'"),
    'version zero': (lambda t: write_raw(t / 'x', ours({}, {}, version='0')), C, "its format version is '0'"),
    'version with a sign': (lambda t: write_raw(t / 'x', ours({}, {}, version='-1')), C, 'its format version'),
    'checksum not hex': (lambda t: write_raw(t / 'x', ours({}, {}, checksum='zzzzzzzz')), C, "its 'checksum' is"),
    'write time not a number': (lambda t: write_raw(t / 'x', ours({}, {}, written='yesterday')), C, "its 'written' is"),
    'run id malformed': (lambda t: write_raw(t / 'x', ours({}, {}, run='../../etc')), C, "its 'run' is"),
    'newer format': (lambda t: write_raw(t / 'x', ours({}, {}, version='3')), V, 'written by a newer nbloop (format 3; this version reads up to 2)'),
    'much newer format': (lambda t: write_raw(t / 'x', ours({}, {}, version='999999')), V, 'format 999999'),
    'state not JSON': (lambda t: _state_file(t, '{"kind": '), C, 'damaged state'),
    'state refers to a missing tensor': (lambda t: _state_file(t, json.dumps({'w': {'__tensor__': 'nope'}})), C, '/w refers to a tensor the file does not hold'),
    'tensor reference not a string': (lambda t: _state_file(t, json.dumps({'w': {'__tensor__': ['a']}})), C, 'refers to a tensor'),
    'tensor reference with extra keys': (lambda t: _state_file(t, json.dumps({'w': {'__tensor__': 'a', 'x': 1}}), {'a': F32(0, 4)}, bytes(4)), C, 'refers to a tensor'),
    'array of object dtype': (lambda t: _state_file(t, json.dumps({'a': {'__ndarray__': 'a', 'dtype': '|O'}}), {'a': F32(0, 4)}, bytes(4)), C, 'not a numeric array dtype'),
    'array of unknown dtype': (lambda t: _state_file(t, json.dumps({'a': {'__ndarray__': 'a', 'dtype': 'nonsense'}}), {'a': F32(0, 4)}, bytes(4)), C, 'not a numeric array dtype'),
    'array from a bfloat16 tensor': (lambda t: _state_file(t, json.dumps({'a': {'__ndarray__': 'a', 'dtype': '<f4'}}), {'a': {'dtype': 'BF16', 'shape': [2], 'data_offsets': [0, 4]}}, bytes(4)), C, 'cannot be restored'),
    'tuple of a string': (lambda t: _state_file(t, json.dumps({'t': {'__tuple__': 'abc'}})), C, 'malformed __tuple__'),
    'items not pairs': (lambda t: _state_file(t, json.dumps({'d': {'__items__': [[1, 2, 3]]}})), C, 'is not a [key, value] pair'),
    'items with a dict key': (lambda t: _state_file(t, json.dumps({'d': {'__items__': [[{'a': 1}, 2]]}})), C, 'cannot be a key'),
    'items not a list': (lambda t: _state_file(t, json.dumps({'d': {'__items__': {'a': 1}}})), C, 'malformed __items__'),
    'state is a list': (lambda t: _state_file(t, '[1, 2]'), C, 'holds list [1, 2], not a dict of state'),
    'state is null': (lambda t: _state_file(t, 'null'), C, 'not a dict of state'),
    'pickle protocol 0': (lambda t: _pickle(t, 0), U, 'is a pickle file'),
    'pickle protocol 1': (lambda t: _pickle(t, 1), U, 'is a pickle file'),
    'pickle protocol 2': (lambda t: _pickle(t, 2), U, 'is a pickle file'),
    'pickle protocol 5': (lambda t: _pickle(t, 5), U, 'is a pickle file'),
    'torch.save (zip)': (lambda t: _torch_save(t), U, 'is a pickle file (torch.save writes those in a zip archive)'),
    'torch.save legacy': (lambda t: _torch_save(t, _use_new_zipfile_serialization=False), U, 'is a pickle file'),
    'torch.save legacy protocol 0': (lambda t: _torch_save(t, _use_new_zipfile_serialization=False, pickle_protocol=0), U, 'is a pickle file'),
    'a folder': (_folder, C, 'is a folder, not a checkpoint file'),
    'a dangling symbolic link': (lambda t: _symlink(t, t / 'gone.safetensors'), C, 'is a dangling symbolic link (to '),
    'a link to a folder': (lambda t: _symlink(t, t), C, 'is a folder'),
    'a symbolic link loop': (_loop, E, 'cannot be opened'),
    'a FIFO': (_fifo, C, 'not a regular file (a FIFO, socket or device)'),
}


@pytest.mark.parametrize('attack', list(CRAFTED))
def test_crafted_file_is_refused_naming_it(attack, tmp_path):
    build, exc, fragment = CRAFTED[attack]
    Evil.marker = tmp_path / 'pwned'
    path = build(tmp_path)
    with pytest.raises(exc) as info:
        load_state(path)
    message = str(info.value)
    assert str(path) in message, message
    assert fragment in message, message
    assert not Evil.marker.exists(), 'a pickle was run'


# -- 2. a training state of the wrong structure (checked before anything is loaded) -------------------------------
@pytest.fixture(scope='module')
def template(tmp_path_factory) -> Path:
    "A finished one-epoch run: checkpoints after steps 2, 4, 6 and at the end of the epoch (keep_last=None)."
    path = tmp_path_factory.mktemp('template')
    quiet_fit(make(path, keep_last=None), 1)
    return path


def mid_epoch_state(template: Path) -> dict:
    "The state of the template's checkpoint after step 4 (mid-epoch: it holds the planned batches)."
    (path,) = [p for p in list_checkpoints(template / 'checkpoints') if base_name(p) == 'ckpt-step000000004-epoch0000-batch4.safetensors']
    return load_state(path)


def _set(keys: str, value):
    "A mutation that sets state[k1][k2]... = value (`value` may be a function of the old value)."
    def mutate(state):
        *head, last = keys.split('.')
        d = state
        for k in head: d = d[k]
        d[last] = value(d[last]) if callable(value) else value
    return mutate


def _delete(keys: str):
    def mutate(state):
        *head, last = keys.split('.')
        d = state
        for k in head: d = d[k]
        del d[last]
    return mutate


SCHEMA = {   # name: (mutation of a real mid-epoch training state, a fragment of the message)
    'no training': (_delete('training'), 'training should be a dict'),
    'training is a string': (_set('training', 'x'), 'training should be a dict'),
    'no position': (_delete('training.position'), 'training.position should be'),
    'unknown phase': (_set('training.position.phase', 'bogus'), 'training.position should be'),
    'negative epoch': (_set('training.position.epoch', -1), 'training.position should be'),
    'epoch a string': (_set('training.position.epoch', '1'), 'training.position should be'),
    'iter a boolean': (_set('training.position.iter', True), 'training.position should be'),
    'iter a float': (_set('training.position.iter', 2.0), 'training.position should be'),
    'version 1, end of epoch 0': (lambda s: (_delete('training.version')(s),    # version 1 numbered an end by the next epoch
                                             _set('training.position', {'epoch': 0, 'iter': 0, 'phase': 'end'})(s)),
                                  'training.position should be'),
    'unknown version': (_set('training.version', 3), 'training.version should be 1 or 2'),
    'end mid-epoch': (_set('training.position', {'epoch': 1, 'iter': 3, 'phase': 'end'}), 'training.position should be'),
    'iter past the planned batches': (_set('training.position.iter', 7), 'a batch within the 6 planned batches'),
    'negative train_iter': (_set('training.train_iter', -4), 'training.train_iter should be a whole number'),
    'n_epochs a float': (_set('training.n_epochs', 1.5), 'training.n_epochs should be'),
    'total_steps a string': (_set('training.total_steps', 'many'), 'training.total_steps should be'),
    'no format_version': (_delete('format_version'), 'format_version should be a whole number'),
    'no rng': (_delete('rng'), "rng should be a dict with the 'python', 'numpy' and 'torch'"),
    'rng without numpy': (_delete('rng.numpy'), 'rng should be a dict'),
    'python rng garbage': (_set('rng.python', (1, 2)), 'rng.python should be a state of the python random generator'),
    'python rng wrong version': (_set('rng.python', lambda s: (99, *s[1:])), 'rng.python should be'),
    'numpy rng garbage': (_set('rng.numpy', ('MT19937', np.zeros(3, np.uint32), 0, 0, 0.0)), 'rng.numpy should be'),
    'torch rng too short': (_set('rng.torch', torch.zeros(10, dtype=torch.uint8)), 'rng.torch should be'),
    'torch rng of floats': (_set('rng.torch', lambda t: t.float()), 'rng.torch should be'),
    'data generator states not tensors': (_set('rng.generators', [1, 2]), 'rng.generators should be a list of generator states'),
    'data generator state too short': (_set('rng.generators', [torch.zeros(100, dtype=torch.uint8)]), 'rng.generators should be'),
    'cuda states not a list': (_set('rng.cuda', 'x'), 'rng.cuda should be'),
    'no model': (_delete('model'), 'model should be a dict of named tensors'),
    'model is a list': (_set('model', [1, 2]), 'model should be a dict of named tensors'),
    'model value not a tensor': (_set('model', lambda m: {**m, 'weight': [1.0]}), 'model should be a dict of named tensors'),
    'no opt': (_delete('opt'), "opt should be an optimizer state_dict"),
    'opt without param_groups': (_delete('opt.param_groups'), 'opt should be an optimizer state_dict'),
    'no parameter groups': (_set('opt.param_groups', []), 'opt.param_groups should be a non-empty list'),
    'params not ids': (_set('opt.param_groups', lambda g: [{**g[0], 'params': ['a']}]), 'opt.param_groups should be'),
    'a parameter in two groups': (_set('opt.param_groups', lambda g: [g[0], dict(g[0])]), 'groups whose parameter ids appear once'),
    'state for an unknown parameter': (_set('opt.state', lambda s: {**s, 99: {}}), 'opt.state should be a dict from parameter ids'),
    'parameter state not a dict': (_set('opt.state', lambda s: {k: 1 for k in s}), 'opt.state should be'),
    'opt_class a number': (_set('opt_class', 3), 'opt_class should be a class name'),
    'grads a string': (_set('grads', 'x'), 'grads should be a dict of named tensors'),
    'scaler a number': (_set('scaler', 5), 'scaler should be None or a dict'),
    'no data': (_delete('data'), "data should be a dict with 'replayable'"),
    'replayable a string': (_set('data.replayable', 'yes'), "data should be a dict with 'replayable'"),
    'indices of floats': (_set('data.indices', lambda t: t.float()), 'data should be'),
    'indices 2-D': (_set('data.indices', lambda t: t[None]), 'data should be'),
    'lengths that do not add up': (_set('data.lengths', lambda t: t + 1), 'data.lengths should be batch sizes >= 0 that add up'),
    'negative batch size': (_set('data.lengths', torch.tensor([-16, 48, 16, 16, 16, 16])), 'data.lengths should be batch sizes >= 0'),
    'negative index': (_set('data.indices', lambda t: t - 1000), 'data.indices should be sample indices >= 0'),
    'no callbacks': (_delete('callbacks'), 'callbacks should be a dict'),
    'callbacks a list': (_set('callbacks', []), 'callbacks should be a dict'),
    'checkpoint callback best a string': (_set('callbacks.checkpoint', lambda s: {**s, 'best': 'low'}), "the state of callback 'checkpoint'"),
    'checkpoint callback run id malformed': (_set('callbacks.checkpoint', lambda s: {**s, 'run': '../x'}), "callback 'checkpoint'"),
    'checkpoint callback state a list': (_set('callbacks.checkpoint', [1]), "callback 'checkpoint'"),
    'recorder history not a list of rows': (_set('callbacks.recorder', lambda s: {**s, 'history': 5}), "callback 'recorder'"),
    'kind weights': (_set('kind', 'weights'), 'holds weights only'),
}


def crafted_state_file(template: Path, attack: str, folder: Path, name: str) -> Path:
    state = mid_epoch_state(template)
    SCHEMA[attack][0](state)
    return save_state(folder / name, state)


@pytest.mark.parametrize('attack', list(SCHEMA))
def test_training_state_of_the_wrong_structure_is_refused_naming_it(attack, template, tmp_path):
    path = crafted_state_file(template, attack, tmp_path, 'bad.safetensors')
    learn = make(tmp_path)
    before = weights(learn)
    with pytest.raises(CheckpointError) as info:
        quiet_fit(learn, 1, resume=path)
    message = str(info.value)
    assert str(path) in message and SCHEMA[attack][1] in message, message
    if 'recorder' not in attack:            # the recorder's state is loaded after before_fit; the rest before anything
        assert same_weights(weights(learn), before), 'a refused checkpoint changed the model'
    assert type(info.value) is (CheckpointError if attack == 'kind weights' else CorruptCheckpointError)


# -- 3. resume='last' skips every kind of bad file for the next good one --------------------------------------------
BAD_NAME = 'ckpt-step000000999-run0000000a-epoch0099-end.safetensors'   # ranks after every good one by its step too


def _resume_last_past(bad: Path, folder: Path, good: Path) -> None:
    learn = make(folder.parent)
    messages = quiet_fit(learn, 1, resume='last')
    assert any(m.startswith(f'skipping checkpoint {bad}') for m in messages), messages
    assert learn.resumed_from == good


def _copy_template(template: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / 'checkpoints'
    shutil.copytree(template / 'checkpoints', folder)       # copies keep the write time in their headers
    good = list_checkpoints(folder)[-1]
    assert base_name(good) == 'ckpt-step000000006-epoch0000-end.safetensors'
    return folder, good


@pytest.mark.parametrize('attack', [a for a in CRAFTED if a not in ('a symbolic link loop',)])
def test_resume_last_skips_a_crafted_file(attack, template, tmp_path):
    folder, good = _copy_template(template, tmp_path)
    Evil.marker = tmp_path / 'pwned'
    made = CRAFTED[attack][0](tmp_path)
    bad = folder / BAD_NAME
    if made.is_symlink(): bad.symlink_to(os.readlink(made))
    elif made.is_dir(): bad.mkdir()
    elif made.is_fifo(): os.mkfifo(bad)
    else: shutil.copyfile(made, bad)
    _resume_last_past(bad, folder, good)
    assert not Evil.marker.exists()


def test_resume_last_skips_a_symbolic_link_loop(template, tmp_path):
    folder, good = _copy_template(template, tmp_path)
    bad = folder / BAD_NAME
    bad.symlink_to(folder / 'loop.safetensors')
    (folder / 'loop.safetensors').symlink_to(bad)
    _resume_last_past(bad, folder, good)


@pytest.mark.parametrize('attack', list(SCHEMA))
def test_resume_last_skips_a_training_state_of_the_wrong_structure(attack, template, tmp_path):
    folder, good = _copy_template(template, tmp_path)
    _resume_last_past(crafted_state_file(template, attack, folder, BAD_NAME), folder, good)


@pytest.mark.parametrize('kind', ['weights from learn.save', 'plain safetensors weights', 'a name nbloop does not give'])
def test_resume_last_skips_files_that_are_no_training_checkpoint(kind, template, tmp_path):
    folder, good = _copy_template(template, tmp_path)
    learn = make(tmp_path)
    bad = folder / BAD_NAME
    if kind == 'weights from learn.save': learn.save(bad)
    elif kind == 'plain safetensors weights':
        from safetensors.torch import save_file
        save_file(learn.model.state_dict(), str(bad))
    else:
        bad = folder / 'ckpt-latest.safetensors'
        shutil.copyfile(good, bad)
    _resume_last_past(bad, folder, good)


def test_resume_last_with_only_bad_files_starts_fresh_and_says_why(template, tmp_path):
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    (folder / BAD_NAME).mkdir()
    (folder / 'ckpt-step000000001-epoch0000-batch1.safetensors').write_bytes(b'garbage')
    learn = make(tmp_path)
    messages = quiet_fit(learn, 1, resume='last')
    assert learn.resumed_from is None
    assert any(f'skipping checkpoint {folder / BAD_NAME}' in m for m in messages)
    assert any('no checkpoint to resume' in m and 'starting a fresh fit' in m for m in messages)


# -- 4. runs never disturb each other -------------------------------------------------------------------------------
def crash_at(step: int):
    def after_batch(self, learn):
        if learn.training and learn.train_iter == step: raise RuntimeError('simulated crash')
    return type('Crash', (Callback,), {'after_batch': after_batch})()


def test_a_new_run_beside_an_older_longer_one_keeps_its_checkpoints_and_resumes_exactly(tmp_path):
    folder = tmp_path / 'checkpoints'
    old = make(tmp_path); quiet_fit(old, 4)                                  # 24 steps, files up to step 24
    old_run, old_files = old.get_cb(CheckpointCallback).run, list_checkpoints(folder)
    new = make(tmp_path)
    with pytest.raises(RuntimeError, match='simulated crash'): quiet_fit(new, 2, cbs=[crash_at(9)])
    new_run = new.get_cb(CheckpointCallback).run
    assert [base_name(p) for p in list_checkpoints(folder, run=new_run)] == [   # the new run's newest three
        'ckpt-step000000006-epoch0000-batch6.safetensors', 'ckpt-step000000006-epoch0000-end.safetensors',
        'ckpt-step000000008-epoch0001-batch2.safetensors']
    assert list_checkpoints(folder, run=old_run) == old_files                # nor of the old one
    resumed = make(tmp_path)
    quiet_fit(resumed, 2, resume='last')
    assert base_name(resumed.resumed_from) == 'ckpt-step000000008-epoch0001-batch2.safetensors'
    assert resumed.get_cb(CheckpointCallback).run == new_run
    ref = make(tmp_path / 'ref'); quiet_fit(ref, 2)
    assert same_weights(weights(resumed), weights(ref))


def test_calling_fit_twice_starts_a_second_run_beside_the_first(tmp_path):
    learn = make(tmp_path)
    quiet_fit(learn, 3); first = learn.get_cb(CheckpointCallback).run
    quiet_fit(learn, 1); second = learn.get_cb(CheckpointCallback).run
    assert first != second
    folder = tmp_path / 'checkpoints'
    assert len(list_checkpoints(folder, run=first)) == 3 and len(list_checkpoints(folder, run=second)) == 3
    last = learn.get_cb(CheckpointCallback).last_path
    quiet_fit(learn, 1, resume='last')
    assert learn.resumed_from == last


def test_a_resumed_run_rotates_its_own_files_only(tmp_path):
    folder = tmp_path / 'checkpoints'
    other = make(tmp_path); quiet_fit(other, 1)
    other_files = list_checkpoints(folder)
    run = make(tmp_path)
    with pytest.raises(RuntimeError): quiet_fit(run, 3, cbs=[crash_at(8)])
    resumed = make(tmp_path); quiet_fit(resumed, 3, resume='last')
    mine = list_checkpoints(folder, run=resumed.get_cb(CheckpointCallback).run)
    assert len(mine) == 3 and base_name(mine[-1]) == 'ckpt-step000000018-epoch0002-end.safetensors'
    assert [p for p in list_checkpoints(folder) if p not in mine] == other_files


def test_resume_last_orders_by_the_write_time_in_the_header_not_the_file_time(tmp_path):
    "Files copied without their times (cp, a restore) keep their order: the header says when each was written."
    a, b = tmp_path / 'a', tmp_path / 'b'
    first = make(a); quiet_fit(first, 2)                 # written first, ends at step 12
    second = make(b); quiet_fit(second, 1)               # written later, ends at step 6
    folder = tmp_path / 'c' / 'checkpoints'
    folder.mkdir(parents=True)
    for p in list_checkpoints(b / 'checkpoints'): shutil.copyfile(p, folder / p.name)
    for p in list_checkpoints(a / 'checkpoints'): shutil.copyfile(p, folder / p.name)   # newer file times
    learn = make(tmp_path / 'c')
    quiet_fit(learn, 1, resume='last')
    assert learn.resumed_from == folder / second.get_cb(CheckpointCallback).last_path.name


def test_a_clock_set_back_between_two_parts_of_a_run_never_makes_it_go_backwards(tmp_path, monkeypatch):
    """The first part of a run writes with a clock an hour ahead, the resumed part with the right time: rotation keeps
    the run's furthest checkpoints (not the future-dated old ones), and 'last' takes its final one."""
    real, hour = time.time_ns, 3600 * 10**9
    monkeypatch.setattr(time, 'time_ns', lambda: real() + hour)
    with pytest.raises(RuntimeError, match='simulated crash'): quiet_fit(make(tmp_path), 4, cbs=[crash_at(11)])
    monkeypatch.setattr(time, 'time_ns', real)                             # set back an hour
    second = make(tmp_path); quiet_fit(second, 4, resume='last')
    assert base_name(second.resumed_from) == 'ckpt-step000000010-epoch0001-batch4.safetensors'
    files = list_checkpoints(tmp_path / 'checkpoints', run=second.get_cb(CheckpointCallback).run)
    assert [base_name(p) for p in files] == ['ckpt-step000000022-epoch0003-batch4.safetensors',
        'ckpt-step000000024-epoch0003-batch6.safetensors', 'ckpt-step000000024-epoch0003-end.safetensors']
    third = make(tmp_path); quiet_fit(third, 4, resume='last')
    assert base_name(third.resumed_from) == 'ckpt-step000000024-epoch0003-end.safetensors'
    ref = make(tmp_path / 'ref'); quiet_fit(ref, 4)
    assert same_weights(weights(second), weights(ref))


def test_two_runs_in_one_folder_each_resume_their_own(tmp_path):
    """Two fits side by side with the same path (a sweep), both crash, both resume: each learner continues its own
    run (before, the one resumed second took the other's final checkpoint and trained nothing), and a new learner
    is told which run 'last' took and why."""
    slow = make(tmp_path, lr=0.01)
    with pytest.raises(RuntimeError): quiet_fit(slow, 2, cbs=[crash_at(5)])
    fast = make(tmp_path, lr=0.1)
    with pytest.raises(RuntimeError): quiet_fit(fast, 2, cbs=[crash_at(9)])     # written last
    messages = quiet_fit(slow, 2, resume='last')
    assert base_name(slow.resumed_from) == 'ckpt-step000000004-epoch0000-batch4.safetensors'
    assert any("holds checkpoints of 2 runs" in m and "this learner's own run" in m for m in messages), messages
    quiet_fit(fast, 2, resume='last')                                           # the slow run's final file is newer
    assert base_name(fast.resumed_from) == 'ckpt-step000000008-epoch0001-batch2.safetensors'
    for learn, lr in ((slow, 0.01), (fast, 0.1)):
        ref = make(tmp_path / f'ref{lr}', lr=lr); quiet_fit(ref, 2)
        assert same_weights(weights(learn), weights(ref)), lr
    stranger = make(tmp_path)
    messages = quiet_fit(stranger, 2, resume='last')
    assert stranger.resumed_from == fast.get_cb(CheckpointCallback).last_path
    assert any('of the run written last. To continue another run, pass its' in m for m in messages), messages


def test_files_without_a_write_time_are_ordered_by_file_time(tmp_path):
    "Format 1 files (before write times and run ids) still load, and order by their modification time."
    learn = make(tmp_path); quiet_fit(learn, 1)
    folder = tmp_path / 'checkpoints'
    for i, p in enumerate(list_checkpoints(folder)):
        v1 = p.with_name(base_name(p))
        _rewrite_as_format_1(p, v1)
        os.utime(v1, ns=(10**18 + i, 10**18 + i))
        p.unlink()
    (folder / 'best.safetensors').unlink()
    files = list_checkpoints(folder)
    assert [checkpoint_info(p)['format_version'] for p in files] == [1] * 3
    assert [f.run for f in scan_checkpoints(folder)] == [None] * 3
    resumed = make(tmp_path)
    quiet_fit(resumed, 1, resume='last')
    assert resumed.resumed_from == files[-1]


def _rewrite_as_format_1(src: Path, dst: Path) -> None:
    "Write `src`'s content as nbloop's format 1 wrote it: no write time, no run id, checksum over the state only."
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    header = json.loads(raw[8:8 + n])
    meta = header.pop('__metadata__')
    body = raw[8 + n:]
    state = json.loads(meta['state'])
    state['callbacks']['checkpoint'].pop('run', None)
    state.pop('opt_class', None)
    state['format_version'] = 1
    meta = {'format': 'nbloop', 'version': '1', 'state': json.dumps(state)}
    crc = zlib.crc32(meta['state'].encode(), zlib.crc32(json.dumps(header, sort_keys=True, separators=(',', ':')).encode()))
    meta['checksum'] = f'{zlib.crc32(body, crc):08x}'
    write_raw(dst, {**header, '__metadata__': meta}, body)


def test_run_ids_do_not_come_from_the_seeded_generators(tmp_path):
    ids = []
    for _ in range(2):
        torch.manual_seed(0)
        import random; random.seed(0); np.random.seed(0)
        before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
        ids.append(new_run_id())
        assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
        assert (np.random.get_state()[1] == before[2]).all()
    assert ids[0] != ids[1]


def test_best_follows_the_newest_run_and_compare_shows_every_run(tmp_path):
    "compare_checkpoints showed only the newest fit's checkpoints, silently: now every run's, grouped, the newest last."
    folder = tmp_path / 'checkpoints'
    old = make(tmp_path); quiet_fit(old, 2)
    new = make(tmp_path); quiet_fit(new, 1)
    new_run, old_run = new.get_cb(CheckpointCallback).run, old.get_cb(CheckpointCallback).run
    assert checkpoint_info(folder / 'best.safetensors')['run'] == new_run
    with redirect_stdout(io.StringIO()):
        table, _ = compare_checkpoints(new)
        old_table, _ = compare_checkpoints(new, run=old_run)
        new_table, _ = compare_checkpoints(new, run=new_run)
    assert [(r['run'], r['file']) for r in table] == (
        [(old_run, p.name) for p in list_checkpoints(folder, run=old_run)]
        + [(new_run, p.name) for p in list_checkpoints(folder, run=new_run)] + [(new_run, 'best.safetensors')])
    assert [r['file'] for r in old_table] == [p.name for p in list_checkpoints(folder, run=old_run)]
    assert [r['file'] for r in new_table] == [p.name for p in list_checkpoints(folder, run=new_run)] + ['best.safetensors']


def test_compare_checkpoints_takes_a_path_from_the_working_directory(tmp_path, monkeypatch):
    "compare_checkpoints(learn, 'runs/ddp/checkpoints') looked in runs/single/runs/ddp/checkpoints."
    monkeypatch.chdir(tmp_path)
    ddp = make(tmp_path / 'runs' / 'ddp'); quiet_fit(ddp, 1)
    single = make(Path('runs') / 'single')
    with redirect_stdout(io.StringIO()):
        table, _ = compare_checkpoints(single, 'runs/ddp/checkpoints')
    assert [r['file'] for r in table] == [p.name for p in list_checkpoints(tmp_path / 'runs' / 'ddp' / 'checkpoints')] + ['best.safetensors']


# -- 5. another optimizer --------------------------------------------------------------------------------------------
def opt_learner(path, opt_func, **kwargs):
    return synth_learner(n_classes=3, path=path, opt_func=opt_func, **kwargs)


def two_groups(params, lr):
    params = list(params)
    return torch.optim.AdamW([{'params': params[:1]}, {'params': params[1:]}], lr=lr)


@pytest.mark.parametrize('opt_func, fragment', [
    (torch.optim.SGD, 'holds the state of a torch.optim.adamw.AdamW optimizer, but this learner has a torch.optim.sgd.SGD'),
    (torch.optim.Adam, 'holds the state of a torch.optim.adamw.AdamW optimizer, but this learner has a torch.optim.adam.Adam'),
    (torch.optim.RMSprop, 'but this learner has a torch.optim.rmsprop.RMSprop'),
    (two_groups, "holds 1 optimizer parameter group(s), this learner's torch.optim.adamw.AdamW has 2"),
])
def test_learn_load_refuses_another_optimizer_naming_both(opt_func, fragment, tmp_path):
    src = opt_learner(tmp_path, torch.optim.AdamW); quiet_fit(src, 1)
    path = src.save('w')
    dst = opt_learner(tmp_path, opt_func, seed=5)
    before = weights(dst)
    with pytest.raises(CheckpointMismatchError) as info: dst.load('w')
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert same_weights(weights(dst), before), 'a refused load changed the model'
    dst.load('w', with_opt=False)                                  # the weights alone are fine
    assert same_weights(weights(dst), weights(src))


@pytest.mark.parametrize('opt_func, fragment', [
    (torch.optim.SGD, 'holds the state of a torch.optim.adamw.AdamW optimizer, but this learner has a torch.optim.sgd.SGD'),
    (two_groups, 'optimizer parameter group(s)'),
])
def test_resume_refuses_another_optimizer_before_anything_changes(opt_func, fragment, tmp_path):
    src = opt_learner(tmp_path, torch.optim.AdamW, cbs=[CheckpointCallback()]); quiet_fit(src, 1)
    dst = opt_learner(tmp_path, opt_func, seed=5, cbs=[CheckpointCallback()])
    before = weights(dst)
    with pytest.raises(CheckpointMismatchError) as info: quiet_fit(dst, 2, resume='last')
    assert fragment in str(info.value) and 'checkpoints' in str(info.value)
    assert same_weights(weights(dst), before)


def test_parameter_groups_of_other_sizes_or_order_are_refused(tmp_path):
    src = opt_learner(tmp_path, two_groups); quiet_fit(src, 1); src.save('w')      # groups [weight], [bias]
    swapped = lambda params, lr: (lambda p: torch.optim.AdamW([{'params': p[1:]}, {'params': p[:1]}], lr=lr))(list(params))
    with pytest.raises(CheckpointMismatchError, match=r"the optimizer's exp_avg of parameter 0 in group 0 has shape \(3, 4\), "
                                                      r"but that parameter has shape \(3,\)"):
        opt_learner(tmp_path, swapped).load('w')
    def one_and_two(params, lr):
        params = list(params)
        return torch.optim.AdamW([{'params': params[:1]}, {'params': [*params[1:], nn.Parameter(torch.zeros(1))]}], lr=lr)
    with pytest.raises(CheckpointMismatchError, match="optimizer parameter group 1 has 1 parameters, this learner's has 2"):
        opt_learner(tmp_path, one_and_two).load('w')
    opt_learner(tmp_path, two_groups, seed=4).load('w')                              # the same layout loads


@pytest.mark.parametrize('saved, loaded, fragment', [
    (torch.optim.Adam, torch.optim.SGD, 'its parameter group 0 lacks dampening, momentum, nesterov'),
    (torch.optim.SGD, torch.optim.Adam, 'its parameter group 0 lacks amsgrad, betas'),
    (torch.optim.AdamW, torch.optim.Adam, 'has decoupled_weight_decay=True'),
])
def test_files_without_the_optimizer_class_compare_hyper_parameters(saved, loaded, fragment, tmp_path):
    src = opt_learner(tmp_path, saved); quiet_fit(src, 1)
    state = load_state(src.save('w')); del state['opt_class']
    old = save_state(tmp_path / 'old.safetensors', state)
    with pytest.raises(CheckpointMismatchError) as info: opt_learner(tmp_path, loaded).load(old)
    assert fragment in str(info.value) and 'another kind of optimizer' in str(info.value) and str(old) in str(info.value)
    opt_learner(tmp_path, saved, seed=3).load(old)                 # the same kind still loads


def test_old_files_whose_optimizer_state_shares_nothing_are_refused(tmp_path):
    src = opt_learner(tmp_path, torch.optim.Adam); quiet_fit(src, 1)
    state = load_state(src.save('w')); del state['opt_class']
    state['opt']['state'] = {i: {'step': s['step'], 'velocity': s['exp_avg']} for i, s in state['opt']['state'].items()}
    old = save_state(tmp_path / 'old.safetensors', state)
    dst = opt_learner(tmp_path, torch.optim.Adam); quiet_fit(dst, 1)
    with pytest.raises(CheckpointMismatchError, match="its per-parameter state holds velocity, this learner's "
                                                      "torch.optim.adam.Adam holds exp_avg, exp_avg_sq"):
        dst.load(old)
    amsgrad = opt_learner(tmp_path, lambda p, lr: torch.optim.Adam(p, lr=lr, amsgrad=True)); quiet_fit(amsgrad, 1)
    amsgrad.load(save_state(tmp_path / 'plain.safetensors', {**state, 'opt': load_state(src.save('w'))['opt']}))
    quiet_fit(amsgrad, 1)                        # a variant of the same algorithm: its hyper-parameters come along


# -- 6. temporary files ------------------------------------------------------------------------------------------------
def test_save_with_a_250_byte_name(tmp_path):
    learn = synth_learner(path=tmp_path)
    name = 'n' * 238                                               # + '.safetensors' = 250 bytes, legal on every fs
    path = learn.save(name)
    assert path.name == name + '.safetensors' and path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    learn.load(name)


def test_stale_temporaries_only_nbloops_own(tmp_path):
    half = save_state(tmp_path / 'c.safetensors', {'w': torch.ones(3)}).read_bytes()[:40]
    dead = 999_999_999
    names = {
        f'.nbl-{dead}-0123abcd.tmp': half,                         # removed: ours, its process is gone
        f'.nbl-{dead}-89abcdef.tmp': b'',                          # removed: ours, killed before writing
        f'.nbl-{os.getppid()}-0123abcd.tmp': half,                 # kept: its process is alive
        f'.c.safetensors.{dead}.tmp': half,                        # kept: the old naming, could be anyone's
        f'.notes.{dead}.tmp': b'my notes',                         # kept: a user's file
        f'.nbl-{dead}-deadbeef.tmp': b'plain text, not a checkpoint',  # kept: named like ours, content is not
        f'.nbl-{dead}-0123ABCD.tmp': half,                         # kept: not a name nbloop makes
        f'.nbl-{dead}-0123abcd.tmp.bak': half,                     # kept
    }
    for n, data in names.items(): (tmp_path / n).write_bytes(data)
    (tmp_path / f'.nbl-{dead}-aaaaaaaa.tmp').mkdir()               # kept: a folder
    (tmp_path / f'.nbl-{dead}-bbbbbbbb.tmp').symlink_to(tmp_path / 'c.safetensors')   # kept: a link
    removed = sorted(p.name for p in remove_stale_temporaries(tmp_path))
    assert removed == sorted([f'.nbl-{dead}-0123abcd.tmp', f'.nbl-{dead}-89abcdef.tmp'])
    assert (tmp_path / 'c.safetensors').exists()


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno
    def full(fd): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full)
    with pytest.raises(CheckpointWriteError, match='No space left on device'):
        save_state(tmp_path / 'x.safetensors', {'w': torch.ones(2)})
    assert list(tmp_path.iterdir()) == []


# -- 7. the checkpoint folder and the resume argument ----------------------------------------------------------------
def test_checkpoint_folder_that_is_a_file_fails_at_fit_start(tmp_path):
    (tmp_path / 'ckpts').write_text('a file')
    learn = synth_learner(path=tmp_path, cbs=[CheckpointCallback(dir='ckpts')])
    with pytest.raises(NotADirectoryError, match=re.escape(f"folder {tmp_path / 'ckpts'} is a file; it must be a folder")):
        quiet_fit(learn, 1)
    assert learn.recorder.losses == []                             # before the first batch


@pytest.mark.parametrize('where', ['under a file', 'in /proc'])
def test_checkpoint_folder_that_cannot_be_created_fails_at_fit_start(where, tmp_path):
    (tmp_path / 'f').write_text('a file')
    folder = tmp_path / 'f' / 'sub' if where == 'under a file' else Path('/proc/nbloop-checkpoints')
    learn = synth_learner(path=tmp_path, cbs=[CheckpointCallback(dir=folder)])
    with pytest.raises(CheckpointWriteError, match=re.escape(f'cannot write checkpoints to its folder {folder}')):
        quiet_fit(learn, 1)
    assert learn.recorder.losses == []


class PathLike:
    def __init__(self, p): self.p = p
    def __fspath__(self): return str(self.p)


@pytest.mark.parametrize('bad', [True, False, 1, 0, 1.5, b'last', ['last'], {'path': 'x'}, object()])
def test_resume_of_the_wrong_type_lists_the_accepted_values(bad, tmp_path):
    learn = make(tmp_path)
    for call in (lambda: quiet_fit(learn, 1, resume=bad), lambda: resume_state(learn, bad)):
        with pytest.raises(TypeError, match=r"resume must be None \(start fresh\), 'last' .*path of a checkpoint file"):
            call()


def test_resume_paths(template, tmp_path):
    learn = make(tmp_path)
    missing = tmp_path / 'missing.safetensors'
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))): quiet_fit(learn, 1, resume=missing)
    with pytest.raises(CorruptCheckpointError, match='is a folder'): quiet_fit(learn, 1, resume=tmp_path)
    good = list_checkpoints(template / 'checkpoints')[-1]
    quiet_fit(learn, 1, resume=PathLike(good))                     # any os.PathLike
    assert learn.resumed_from == good
    quiet_fit(learn, 1, resume=str(good))
    assert learn.resumed_from == good


# -- 8. memory -----------------------------------------------------------------------------------------------------
def peak(fn) -> int:
    tracemalloc.start()
    try: fn()
    except CheckpointError: pass
    finally:
        result = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result


@pytest.mark.parametrize('start', [
    (2**62).to_bytes(8, 'little') + b'{',                          # a header longer than the file
    (3_000_000).to_bytes(8, 'little') + b'x',                      # a header that fits, but is no JSON object
    b'\x80\x04\x95' + bytes(6),                                    # a pickle's start
])
def test_a_large_garbage_file_is_rejected_reading_little(start, tmp_path):
    path = tmp_path / 'garbage.safetensors'
    path.write_bytes(start + os.urandom(4_000_000))
    assert peak(lambda: load_state(path)) < 100_000
    with pytest.raises(CheckpointError, match=re.escape(str(path))): load_state(path)


def test_a_valid_load_reads_the_data_once_into_one_buffer(tmp_path):
    tensors = {'w': torch.randn(500_000), 'i': torch.arange(70_000), 'h': torch.randn(30_001).half(), 'b': torch.ones(3, dtype=torch.bool)}
    path = save_state(tmp_path / 'big.safetensors', {'kind': 'weights', 'model': tensors})
    size = path.stat().st_size
    out = {}
    assert peak(lambda: out.update(load_state(path)['model'])) <= 1.3 * size
    views = sorted(out.values(), key=lambda t: t.data_ptr())
    for a, b in zip(views, views[1:]): assert b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
    for t in views: assert t.data_ptr() % t.element_size() == 0, 'tensors are aligned'
    for k, t in tensors.items(): assert torch.equal(out[k], t)
    assert peak(lambda: checkpoint_info(path)) < 50_000           # the header alone


# -- 9. state as of the end of the event ----------------------------------------------------------------------------
class Counter(Callback):
    "A stateful callback that runs after the checkpoint callback (order 100) and counts training batches and epochs."
    order = 100
    def before_fit(self, learn): self.batches = self.epochs = 0
    def after_batch(self, learn):
        if learn.training: self.batches += 1
    def after_epoch(self, learn): self.epochs += 1
    def state_dict(self): return {'batches': self.batches, 'epochs': self.epochs}
    def load_state_dict(self, state): self.batches, self.epochs = state['batches'], state['epochs']


def test_step_epoch_and_best_checkpoints_hold_state_as_of_the_end_of_their_event(tmp_path):
    learn = make(tmp_path, cbs=[Counter()], keep_last=None)
    quiet_fit(learn, 2)
    for p in list_checkpoints(tmp_path / 'checkpoints'):
        state = load_state(p)
        counted = state['callbacks']['counter']
        assert counted['batches'] == state['training']['train_iter'], (p.name, counted)
        assert counted['epochs'] == (state['training']['position']['epoch'] + 1 if 'end' in p.name else (counted['batches'] - 1) // 6)
    best = load_state(tmp_path / 'checkpoints' / 'best.safetensors')
    assert best['callbacks']['counter']['epochs'] == best['training']['position']['epoch'] + 1   # epochs 0..e ended


def test_a_group_added_during_the_run_is_named_as_the_fix(tmp_path):
    "The run added a parameter group mid-fit; a new learner without it resumes: the message says to add it first."
    def one_group(params, lr):
        params = list(params)
        opt = torch.optim.AdamW(params[:1], lr=lr)
        opt.later = params[1:]                                      # what the callback adds after the first epoch
        return opt
    class AddGroup(Callback):
        def after_epoch(self, learn):
            if learn.epoch == 0: learn.opt.add_param_group({'params': learn.opt.later})
    src = opt_learner(tmp_path, one_group, cbs=[CheckpointCallback(), AddGroup()]); quiet_fit(src, 2)
    dst = opt_learner(tmp_path, one_group, cbs=[CheckpointCallback()])
    with pytest.raises(CheckpointMismatchError, match='holds 2 optimizer parameter group.*has 1: give it the run.s '
                       'groups before resuming .a group added during the run: add it first.'):
        quiet_fit(dst, 3, resume='last')


def test_rotation_reads_the_headers_of_its_own_run_only(tmp_path, monkeypatch):
    """A folder with hundreds of other runs' checkpoints: each save's rotation picks its run's files by name and
    reads only their headers (it read every file's, 3.7 s per save with 10,000 files)."""
    import nbloop.ckpt_format as ckpt_format
    folder = tmp_path / 'checkpoints'
    quiet_fit(make(tmp_path), 1)
    src = list_checkpoints(folder)[0]
    for i in range(300): shutil.copyfile(src, folder / f'ckpt-step{i:09d}-run{i:08x}-epoch0000-end.safetensors')
    read, real = [], ckpt_format.checkpoint_info
    monkeypatch.setattr(ckpt_format, 'checkpoint_info', lambda p: read.append(Path(p).name) or real(p))
    learn = make(tmp_path); quiet_fit(learn, 2)
    own = learn.get_cb(CheckpointCallback).run
    assert len(list_checkpoints(folder, run=own)) == 3 and read
    assert all(f'-run{own}-' in name for name in read), sorted(set(read) - {n for n in read if own in n})[:5]


def test_the_json_of_a_checkpoint_does_not_grow_with_the_run(tmp_path):
    """Every checkpoint holds the whole history, but its long lists as tensors (`state_tree` tables): the JSON part,
    which Python walks value by value to write, check and read, is as long at epoch 60 as at epoch 2 (it grew by
    about 130 bytes an epoch: 322 ms per save at epoch 20,000, 28 ms now). A run resumed from such a file goes on
    exactly, and its history comes back as the same rows."""
    def header_state(path) -> str:
        raw = Path(path).read_bytes()
        return json.loads(raw[8:8 + int.from_bytes(raw[:8], 'little')])['__metadata__']['state']
    def run(epochs, folder, **kw):
        learn = synth_learner(n=32, batch_size=16, path=tmp_path / folder, cbs=[CheckpointCallback()])
        quiet_fit(learn, epochs, **kw)
        return learn, max(list_checkpoints(tmp_path / folder / 'checkpoints'), key=lambda p: p.name)
    _, early = run(2, 'short')
    whole, late = run(60, 'long')
    assert len(header_state(late)) <= len(header_state(early)) + 16, (len(header_state(early)), len(header_state(late)))
    saved = load_state(late)['callbacks']['recorder']
    assert saved['history'] == whole.recorder.history and len(saved['history']) == 60
    assert saved['epoch_ends'] == list(range(2, 121, 2)) and all(type(v) is int for v in saved['epoch_ends'])
    part, _ = run(45, 'resumed')
    resumed, _ = run(60, 'resumed', resume='last')
    assert same_weights(weights(resumed), weights(whole))
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != 'time'} for r in rows]
    assert drop_time(resumed.recorder.history) == drop_time(whole.recorder.history)
    assert resumed.recorder.losses == whole.recorder.losses


def test_cleanup_never_removes_a_background_write_in_flight(tmp_path, monkeypatch):
    """A checkpoint write in flight in the background (held in its fsync, its temporary file on disk): a fit that
    starts in the same folder, which removes what dead writers left, leaves it alone, and the write completes."""
    import threading
    from nbloop.runtime import BackgroundWriter
    entered, release, real_fsync = threading.Event(), threading.Event(), os.fsync
    def held_fsync(fd):
        if threading.current_thread().name == 'nbloop-checkpoint-writer':
            entered.set(); release.wait(10)
        real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', held_fsync)
    folder, writer = tmp_path / 'checkpoints', BackgroundWriter()
    writer.submit(folder / 'background.safetensors', {'w': torch.ones(3)})
    try:
        assert entered.wait(10)
        in_flight = list(folder.glob('.nbl-*.tmp'))
        assert len(in_flight) == 1
        quiet_fit(make(tmp_path), 1)                   # its before_fit cleans the folder of stale temporaries
        assert in_flight[0].exists()
    finally: release.set()
    writer.wait()
    assert load_state(folder / 'background.safetensors')['w'].tolist() == [1., 1., 1.] and not in_flight[0].exists()
