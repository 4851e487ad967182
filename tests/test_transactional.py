"""Transactional loads: a load that fails fills no array in place, and changes no dict.

``serialize`` runs once, so an object that sets what it is handed at once (Chainer's way) may
already have kept the values handed to it before the failing entry (scalars, a stored None, a
new array for a None target): exactly those, and nothing else. One that hands its assignments
to ``gpuserial.after_load`` (as gpuserial's own objects do) keeps nothing, as a dict. The
broken entry is late in the target's order, after arrays, scalars, a stored None, a None
target and a child.
"""

import re
import struct
import zipfile

import h5py
import numpy
import pytest

import gpuserial
from gpuserial import serializers
from gpuserial.errors import (
    CorruptFileError,
    KeyNotFoundError,
    MismatchError,
    UnsafeCastError,
    UnsafeFileError,
)
from tests import crafting
from tests.conftest import flatten, host, make_device


class Child:
    def __init__(self, device):
        self.b = device.send(numpy.full(5, 7.0))
        self.steps = 7

    def serialize(self, serializer):
        serializer('b', self.b)
        self.steps = serializer('steps', self.steps)


class Model:
    """A tiny serializable object: arrays, scalars of each kind, a stored None (``gone``), a None
    target (``fresh``), a child; ``z`` and ``k`` last."""

    def __init__(self, device):
        self.w = device.send(numpy.full((3, 4), 7, numpy.float32))
        self.count, self.lr, self.name, self.flag = 7, 7.5, 'seven', True
        self.gone = device.send(numpy.full(2, 7.0))
        self.fresh = None
        self.child = Child(device)
        self.z = device.send(numpy.full(6, 7, numpy.float32))
        self.k = 7

    def serialize(self, serializer):
        serializer('w', self.w)
        self.count = serializer('count', self.count)
        self.lr = serializer('lr', self.lr)
        self.name = serializer('name', self.name)
        self.flag = serializer('flag', self.flag)
        self.gone = serializer('gone', self.gone)
        self.fresh = serializer('fresh', self.fresh)
        self.child.serialize(serializer['child'])
        serializer('z', self.z)
        self.k = serializer('k', self.k)

    def state(self):
        return {'w': self.w, 'count': self.count, 'lr': self.lr, 'name': self.name,
                'flag': self.flag, 'gone': self.gone, 'fresh': self.fresh,
                'child': {'b': self.child.b, 'steps': self.child.steps}, 'z': self.z,
                'k': self.k}


class DeferringModel(Model):
    """The same object, setting what a load returns through :func:`gpuserial.after_load`, as
    gpuserial's own objects do: a failed load leaves it as it was, as a dict."""

    def serialize(self, serializer):
        serializer('w', self.w)
        loaded = {name: serializer(name, getattr(self, name))
                  for name in ('count', 'lr', 'name', 'flag', 'gone', 'fresh')}
        child = serializer['child']
        child('b', self.child.b)
        steps = child('steps', self.child.steps)
        serializer('z', self.z)
        loaded['k'] = serializer('k', self.k)

        def apply():
            for name, value in loaded.items():
                setattr(self, name, value)
            self.child.steps = steps

        gpuserial.after_load(serializer, apply)


def _dict_target(device):
    return Model(device).state()


def _source():
    """What the file holds when nothing is broken: values other than the target's."""
    rng = numpy.random.default_rng(1)
    return {'w': rng.standard_normal((3, 4)).astype(numpy.float32), 'count': 1, 'lr': 0.5,
            'name': 'one', 'flag': False, 'gone': None, 'fresh': numpy.arange(3.0),
            'child': {'b': rng.standard_normal(5), 'steps': 1},
            'z': rng.standard_normal(6).astype(numpy.float32), 'k': 1}


def _snapshot(state):
    """Copies of every value, and the identity of every array (loads are in place)."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = _snapshot(value)
        elif hasattr(value, 'dtype'):
            out[key] = (id(value), host(value).copy())
        else:
            out[key] = value
    return out


def _assert_untouched(state, snapshot):
    for key, value in state.items():
        if isinstance(value, dict):
            _assert_untouched(value, snapshot[key])
        elif hasattr(value, 'dtype'):
            identity, copy = snapshot[key]
            assert id(value) == identity, key
            assert host(value).tobytes() == copy.tobytes(), key
        else:
            assert type(value) is type(snapshot[key]) and value == snapshot[key], key


# What an object keeps of a load that fails at ``z`` or ``k``: the scalars handed to it before.
SCALARS_KEPT = {'count': 1, 'lr': 0.5, 'name': 'one', 'flag': False}


def _assert_only_handed_values_kept(state, snapshot):
    assert host(state['fresh']).tolist() == [0.0, 1.0, 2.0]  # a new array, read at once
    assert state['gone'] is None  # a stored None, handed back
    expected = dict(snapshot, **SCALARS_KEPT, child=dict(snapshot['child'], steps=1))
    _assert_untouched({k: v for k, v in state.items() if k not in ('fresh', 'gone')}, expected)


def _npz_members(source) -> dict[str, bytes]:
    return {key: crafting.npy_of(numpy.asarray(value))
            for key, value in serializers.serialize(source).items()}


def _npz_file(path, source, edit=None):
    """Writes ``source`` as an NPZ (stored members), then ``edit`` on its bytes."""
    data = crafting.npz_of(_npz_members(source))
    path.write_bytes(edit(data) if edit else data)


def _without(source, key):
    source = dict(source)
    del source[key]
    return source


# Each case: the source dict with the late entry broken, how to edit the file, and the error.
COMMON_CASES = {
    'missing z': (lambda s: _without(s, 'z'), KeyNotFoundError, 'z', 'not in the file'),
    'shape of z': (lambda s: dict(s, z=numpy.zeros(7, numpy.float32)), MismatchError, 'z',
                   r'stored shape \(7,\) does not match the target shape \(6,\)'),
    'dtype of z': (lambda s: dict(s, z=numpy.zeros(6, numpy.complex128)), MismatchError, 'z',
                   r'stored dtype complex128 does not cast to the target dtype float32 '
                   r'\(same_kind'),
    'int into float32 in z is fine, but k is a float': (
        lambda s: dict(s, z=numpy.arange(6), k=2.5), UnsafeCastError, 'k',
        'stored dtype float64 does not cast safely to int'),
    'k is text': (lambda s: dict(s, k='seven'), UnsafeCastError, 'k',
                  r'the file stores text \(dtype <U5, shape \(\)\), which does not load into a '
                  r'int'),
    'k is a big array': (lambda s: dict(s, k=numpy.zeros(300000)), MismatchError, 'k',
                         r'a stored array of shape \(300000,\) cannot load into a int'),
    'missing k': (lambda s: _without(s, 'k'), KeyNotFoundError, 'k', 'not in the file'),
}


def _truncate_z(data):
    members = _npz_members(_source())
    members['z'] = members['z'][:-12]  # the header still claims 6 float32
    return crafting.npz_of(members)


def _z_past_the_end(data):
    size = 10 ** 6
    data = crafting.patch_central(data, 'z.npy', 'compress_size', size)
    return crafting.patch_central(data, 'z.npy', 'file_size', size)


def _k_crc(data):
    return crafting.flip(data, crafting.data_offset(data, 'k.npy')
                         + crafting.central_field(data, 'k.npy', 'file_size') - 1)


NPZ_CASES = {
    'truncated member z': (_truncate_z, CorruptFileError, 'z',
                           r'the member holds 140 bytes but its header claims 152 \(dtype '
                           r'float32, shape \(6,\)\): truncated or corrupt'),
    'z runs past the end of the file': (_z_past_the_end, CorruptFileError, 'z',
                                        'the member runs past the end of the file'),
    'z is a pickle': (lambda data: crafting.npz_of(dict(_npz_members(_source()), z=crafting.npy_of(
        numpy.array([1, 'x'], object)))), UnsafeFileError, 'z', 'holds a pickled object array'),
    'k fails its CRC': (_k_crc, CorruptFileError, 'k', 'CRC mismatch'),
}


def _h5_group_z(f):
    del f['z']
    f.create_group('z')


def _h5_vlen_z(f):
    del f['z']
    f.create_dataset('z', shape=(6,), dtype=h5py.vlen_dtype(numpy.int32))


HDF5_CASES = {
    'z is a group': (_h5_group_z, MismatchError, 'z', 'is an HDF5 group, not a dataset'),
    'z is variable-length': (_h5_vlen_z, UnsafeFileError, 'z',
                             r'datasets of type object \(object references, variable-length '
                             r'arrays\) are refused'),
}


@pytest.fixture(params=['dict', 'object', 'deferring'])
def kind(request):
    return request.param


@pytest.fixture(params=['cpu', 'standin:0', pytest.param('cuda:0', marks=pytest.mark.gpu)],
                ids=['cpu', 'standin', 'cuda0'])
def target_device(request):
    return make_device(request.param)


def _target(kind, device):
    if kind == 'dict':
        state = _dict_target(device)
        return state, lambda: state
    model = Model(device) if kind == 'object' else DeferringModel(device)
    return model, model.state


def _check(load, path, kind, device, error, key, message, edit=None):
    """A load of ``path`` into a target of ``kind`` (changed first by ``edit``) that fails on
    ``key``, leaving the target as it was."""
    target, state = _target(kind, device)
    if edit is not None:
        edit(target)
    before = _snapshot(state())
    where = re.escape(f'{str(path)!r}, key {key!r}: ')
    with pytest.raises(error, match=where + message):
        load(path, target)
    if kind == 'object':  # Chainer's way: what it was handed, it keeps
        _assert_only_handed_values_kept(state(), before)
    else:
        _assert_untouched(state(), before)


@pytest.mark.parametrize('case', list(COMMON_CASES) + list(NPZ_CASES))
def test_npz_failed_load_leaves_target_untouched(tmp_path, small_chunks, kind, target_device,
                                                 case):
    path = tmp_path / 'm.npz'
    if case in COMMON_CASES:
        broken, error, key, message = COMMON_CASES[case]
        _npz_file(path, broken(_source()))
    else:
        edit, error, key, message = NPZ_CASES[case]
        _npz_file(path, _source(), edit)
    _check(serializers.load_npz, path, kind, target_device, error, key, message)


@pytest.mark.parametrize('case', list(COMMON_CASES) + list(HDF5_CASES))
def test_hdf5_failed_load_leaves_target_untouched(tmp_path, small_chunks, kind, target_device,
                                                  case):
    path = tmp_path / 'm.h5'
    if case in COMMON_CASES:
        broken, error, key, message = COMMON_CASES[case]
        serializers.save_hdf5(path, broken(_source()))
    else:
        edit, error, key, message = HDF5_CASES[case]
        serializers.save_hdf5(path, _source())
        with h5py.File(path, 'r+') as f:
            edit(f)
    _check(serializers.load_hdf5, path, kind, target_device, error, key, message)


@pytest.mark.parametrize('where', [0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
def test_a_lost_stretch_of_data_fills_only_what_the_error_names(tmp_path, kind, where):
    """A stretch of member data is lost, the zip directory kept: each member after it moved.
    Whatever the load finds first (a header that is not where the directory says, a short
    member, a checksum), the arrays it did not name as filled are as they were."""
    data = crafting.npz_of(_npz_members(_source()))
    end, fields = crafting.end_record(data)
    start = int(fields[6] * where)
    lost = bytearray(data[:start] + data[start + 16:])  # 16 bytes gone, members' offsets kept
    struct.pack_into('<L', lost, end - 16 + 16, fields[6] - 16)  # where the directory now is
    path = tmp_path / 'm.npz'
    path.write_bytes(lost)
    target, state = _target(kind, make_device('cpu'))
    before = _snapshot(state())
    with pytest.raises(CorruptFileError, match=re.escape(repr(str(path)))) as raised:
        serializers.load_npz(path, target)
    touched = set(getattr(raised.value, 'filled', [])) | {getattr(raised.value, 'partly_filled',
                                                                  None)}
    now = flatten(state())
    arrays = {key: value for key, value in flatten(before).items() if isinstance(value, tuple)}
    handed = {'gone'} if kind == 'object' else set()  # a stored None the object may keep
    for key, (identity, copy) in arrays.items():
        if key not in touched | handed:
            assert id(now[key]) == identity and host(now[key]).tobytes() == copy.tobytes(), key
    assert touched - {None} <= arrays.keys()


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
def test_the_same_target_loads_once_the_file_is_good(tmp_path, kind, target_device, fmt):
    """The control: with nothing broken, every value of the target changes."""
    save, load = {'npz': (serializers.save_npz, serializers.load_npz),
                  'hdf5': (serializers.save_hdf5, serializers.load_hdf5)}[fmt]
    path = tmp_path / f'm.{fmt}'
    save(path, _source())
    target, state = _target(kind, target_device)
    load(path, target)
    got, expected = state(), _source()
    assert host(got['w']).tobytes() == expected['w'].tobytes()
    assert host(got['z']).tobytes() == expected['z'].tobytes()
    assert host(got['child']['b']).tobytes() == expected['child']['b'].tobytes()
    assert (got['count'], got['lr'], got['name'], got['flag'], got['child']['steps'],
            got['k']) == (1, 0.5, 'one', False, 1, 1)
    assert host(got['fresh']).tolist() == [0.0, 1.0, 2.0]
    assert got['gone'] is None if kind != 'dict' else host(got['gone']).tolist() == [7.0, 7.0]


@pytest.mark.parametrize('compression', [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED],
                         ids=['stored', 'deflated'])
def test_crc_mismatch_in_array_data_names_the_member(tmp_path, compression):
    """Corrupt array data is found while reading: the error names the member."""
    data = crafting.npz_of(_npz_members(_source()), compression)
    end = crafting.data_offset(data, 'z.npy') + crafting.central_field(
        data, 'z.npy', 'compress_size')
    path = tmp_path / 'm.npz'
    path.write_bytes(crafting.flip(data, end - 3, 0x01))
    target = _dict_target(make_device('cpu'))
    with pytest.raises(CorruptFileError, match=re.escape(f"{str(path)!r}, key 'z': ")
                       + '(CRC mismatch|corrupt deflate data|the deflate stream)'):
        serializers.load_npz(path, target)


def _read_only(array):
    array.setflags(write=False)
    return array


# Arrays a load cannot fill in place, as ``z``: the error says why, before any array is filled.
UNFILLABLE = {
    'read-only': (lambda: _read_only(numpy.full(6, 7, numpy.float32)), 'it is read-only'),
    'a broadcast': (lambda: numpy.broadcast_to(numpy.float32(7), (6,)), 'it is read-only'),
    'writable, one element six times': (  # as_strided keeps it writable
        lambda: numpy.lib.stride_tricks.as_strided(numpy.full(1, 7, numpy.float32), (6,), (0,)),
        r'its elements share memory \(a broadcast or expanded view\)'),
}


@pytest.mark.parametrize('case', list(UNFILLABLE))
@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
def test_a_target_that_cannot_be_filled_in_place_fails_the_load_before_any_fill(
        tmp_path, kind, fmt, case):
    save, load = {'npz': (serializers.save_npz, serializers.load_npz),
                  'hdf5': (serializers.save_hdf5, serializers.load_hdf5)}[fmt]
    path = tmp_path / f'm.{fmt}'
    save(path, _source())
    make, why = UNFILLABLE[case]

    def unfillable_z(target):
        if kind == 'dict':
            target['z'] = make()
        else:
            target.z = make()

    _check(load, path, kind, make_device('cpu'), MismatchError, 'z',
           'the target array cannot be loaded in place: ' + why, unfillable_z)
