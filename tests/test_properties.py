"""Property-based tests: random trees round-trip bit-exactly; damaged files fail cleanly.

Trees are nested dicts of arrays (every dtype, bfloat16 and float8 too, shapes with 0-d and
empty axes, non-contiguous views) and scalars (int, float, bool, str). Damaged files are random
truncations and byte flips of valid ones: each either loads the right values or raises a clean
error, in bounded time and memory.
"""

from __future__ import annotations

import io
import struct
import tempfile
import tracemalloc
from datetime import timedelta
from pathlib import Path
from unittest import mock

import numpy
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpuserial import serializers
from gpuserial.engine import devices, transfer
from gpuserial.errors import GpuserialError
from gpuserial.formats import hdf5
from tests.conftest import host, make_device

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - a test dependency (through jax)
    ml_dtypes = None

DTYPES = ['?', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8', 'c8', 'c16']
EXTENSIONS = list(devices.EXTENSION_DTYPES) if ml_dtypes is not None else []
CLEAN_ERRORS = (GpuserialError, FileNotFoundError, IsADirectoryError)
MEMORY_BOUND = 64 << 20  # what one load may allocate at most, for files of a few KB

FAST = settings(max_examples=50, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _directory() -> Path:
    if not hasattr(_directory, 'path'):
        _directory.path = Path(tempfile.mkdtemp(prefix='gpuserial-properties-'))
    return _directory.path


# ---------------------------------------------------------------------------------------------
# Strategies

VIEWS = ['contiguous', 'transposed', 'strided', 'reversed', 'fortran']


@st.composite
def array_leaves(draw):
    """(values, view): values a contiguous NumPy array; view how to present it when saving.
    ml_dtypes' types (bfloat16, float8) are drawn as their bits."""
    name = draw(st.sampled_from(DTYPES + EXTENSIONS))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    if name in devices.EXTENSION_DTYPES:
        bits = draw(hnp.arrays(devices.bits_dtype(name), shape))
        values = bits.view(numpy.dtype(getattr(ml_dtypes, name)))
    else:
        values = draw(hnp.arrays(numpy.dtype(name), shape))
    view = draw(st.sampled_from(VIEWS)) if values.ndim else 'contiguous'
    return Leaf(values, view)


class Leaf:
    """An array entry: its values, and the (maybe non-contiguous) view that is saved."""

    def __init__(self, values: numpy.ndarray, view: str):
        self.values = values
        self.view = view

    def expected(self) -> numpy.ndarray:
        """The values the saved view holds, C-contiguous."""
        return numpy.array(_present(self.values, self.view, numpy.asarray), order='C')

    def source(self, device):
        """The view, on ``device``, as it is handed to the save."""
        return _present(self.values, self.view, device.send)

    def __repr__(self) -> str:
        return f'Leaf({self.values!r}, {self.view!r})'


def _present(values, view, send):
    if view == 'transposed':
        return send(values).T
    if view == 'strided':  # every other row of a twice-as-long array
        doubled = numpy.repeat(values, 2, axis=0)
        return send(doubled)[::2]
    if view == 'reversed':
        return send(values[::-1].copy())[::-1]
    if view == 'fortran':  # the transpose of a C-ordered transpose: Fortran-ordered on any device
        return send(numpy.ascontiguousarray(values.T)).T
    return send(values)


SCALARS = st.one_of(
    st.integers(-2 ** 63, 2 ** 64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(st.characters(exclude_characters='\x00', exclude_categories=('Cs',)), max_size=8),
)
KEYS = st.one_of(st.from_regex(r'[A-Za-z_][A-Za-z0-9_.-]{0,7}', fullmatch=True),
                 st.sampled_from(['é', 'ключ', '鍵', 'a b']))

NUMERIC_SCALARS = st.one_of(st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(), st.booleans())
ALL_LEAVES = st.one_of(array_leaves(), SCALARS)
# HDF5 files carry no checksums: a flipped data byte loads as a wrong value, silently; and a
# damaged variable-length string can send libhdf5 into an endless loop or a huge allocation
# inside H5Dread (HDF5 2.0), out of gpuserial's reach. So damaged HDF5 trees hold no strings,
# and a damaged HDF5 file that loads need only give values of the right shapes and types.
HDF5_LEAVES = st.one_of(array_leaves(), NUMERIC_SCALARS)


def trees(leaves=ALL_LEAVES):
    return st.dictionaries(KEYS, st.recursive(
        leaves, lambda children: st.dictionaries(KEYS, children, max_size=3), max_leaves=6),
        min_size=1, max_size=5)


# ---------------------------------------------------------------------------------------------
# Trees: saving, fresh targets, comparison


def _source(tree, device):
    return {key: _source(value, device) if isinstance(value, dict)
            else value.source(device) if isinstance(value, Leaf) else value
            for key, value in tree.items()}


def _zeros(tree, device):
    """A fresh target of the tree's structure: zeroed arrays (on ``device``), zero scalars."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _zeros(value, device)
        elif isinstance(value, Leaf):
            expected = value.expected()
            out[key] = device.send(numpy.zeros(expected.shape, expected.dtype))
        else:
            out[key] = type(value)()
    return out


def _nones(tree):
    """A target whose arrays are None: the file's headers decide what is allocated."""
    return {key: _nones(value) if isinstance(value, dict)
            else None if isinstance(value, Leaf) else type(value)()
            for key, value in tree.items()}


def _assert_tree_equal(got: dict, tree: dict):
    assert got.keys() == tree.keys()
    for key, value in tree.items():
        if isinstance(value, dict):
            _assert_tree_equal(got[key], value)
        elif isinstance(value, Leaf):
            expected = value.expected()
            array = host(got[key])
            assert array.dtype == expected.dtype and array.shape == expected.shape, key
            assert array.tobytes() == expected.tobytes(), key
        else:
            assert type(got[key]) is type(value), key
            if isinstance(value, float):
                assert struct.pack('<d', got[key]) == struct.pack('<d', value), key
            else:
                assert got[key] == value, key


def _assert_tree_shaped(got: dict, tree: dict):
    """Structure only: arrays of the right shape and dtype, scalars of the right type."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _assert_tree_shaped(got[key], value)
        elif isinstance(value, Leaf):
            expected = value.expected()
            assert host(got[key]).shape == expected.shape, key
        else:
            assert type(got[key]) is type(value), key


FORMATS = {
    'npz': (lambda f, o: serializers.save_npz(f, o, durable=False), serializers.load_npz),
    'npz-stored': (lambda f, o: serializers.save_npz(f, o, compression=False, durable=False),
                   serializers.load_npz),
    'hdf5': (lambda f, o: serializers.save_hdf5(f, o, durable=False), serializers.load_hdf5),
    'hdf5-inflated': (lambda f, o: serializers.save_hdf5(f, o, durable=False),
                      lambda f, o: _load_hdf5_inflating(f, o)),
}


def _load_hdf5_inflating(file, obj) -> None:
    """``load_hdf5``, every gzip dataset's chunks inflated by gpuserial, however small (not
    by libhdf5's filter)."""
    with mock.patch.object(hdf5, 'INFLATE_MIN_BYTES', 0):
        serializers.load_hdf5(file, obj)


def _to_bytes(fmt: str, obj) -> bytes:
    path = _directory() / f'source.{fmt}'
    FORMATS[fmt][0](path, obj)
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize('device_spec', ['cpu', 'standin:0', pytest.param(
    'cuda:0', marks=pytest.mark.gpu)], ids=['cpu', 'standin', 'cuda0'])
@pytest.mark.parametrize('fmt', list(FORMATS))
@FAST
@given(tree=trees())
def test_random_trees_round_trip_bit_exactly(fmt, device_spec, tree):
    device = make_device(device_spec)
    save, load = FORMATS[fmt]
    path = _directory() / f'round-trip.{fmt}'
    with transfer.configure(chunk_bytes=64, buffers=2):
        save(path, _source(tree, device))
        target = _zeros(tree, device)
        load(path, target)
    _assert_tree_equal(target, tree)
    if device_spec != 'cpu':  # in place, on the device
        _assert_on(target, device)


def _assert_on(tree, device):
    for value in tree.values():
        if isinstance(value, dict):
            _assert_on(value, device)
        elif devices.is_array(value):
            assert devices.device_of(value) == device


@pytest.mark.parametrize('fmt', list(FORMATS))
@FAST
@given(tree=trees())
def test_random_trees_load_into_none(fmt, tree):
    """Arrays given as None come back as new arrays of the stored shape and dtype."""
    save, load = FORMATS[fmt]
    path = _directory() / f'nones.{fmt}'
    save(path, _source(tree, devices.CPU))
    target = _nones(tree)
    load(path, target)
    _assert_tree_equal(target, tree)


@FAST
@given(tree=trees())
def test_random_trees_through_file_objects(tree):
    out = io.BytesIO()
    serializers.save_npz(out, _source(tree, devices.CPU))
    target = _zeros(tree, devices.CPU)
    serializers.load_npz(io.BytesIO(out.getvalue()), target)
    _assert_tree_equal(target, tree)


# ---------------------------------------------------------------------------------------------
# Damaged files

DAMAGE = settings(max_examples=120, deadline=timedelta(seconds=5), database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def damage(draw, size: int):
    """A truncation at a random point, or one to four random byte flips."""
    if draw(st.booleans()):
        return ('truncate', draw(st.integers(0, size - 1)))
    flips = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)),
                          min_size=1, max_size=4))
    return ('flip', flips)


def _damaged(data: bytes, how) -> bytes:
    kind, detail = how
    if kind == 'truncate':
        return data[:detail]
    out = bytearray(data)
    for offset, mask in detail:
        out[offset] ^= mask
    return bytes(out)


def _load_damaged(fmt, data, target, device_spec):
    """Loads ``data``: None when it loaded, else the clean error; bounded in memory."""
    load = FORMATS[fmt][1]
    path = _directory() / f'damaged.{fmt}'
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with transfer.configure(chunk_bytes=64, buffers=2):
            by_path = fmt.startswith('hdf5') or device_spec == 'cpu'
            load(path if by_path else io.BytesIO(data), target)
        event('loaded')
        return None
    except CLEAN_ERRORS as error:
        event(type(error).__name__)
        return error
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_BOUND, peak


# A flipped byte can put an invalid escape into a header's text, which Python's parser warns
# about before refusing it; the refusal is what the test checks.
@pytest.mark.filterwarnings('ignore:invalid escape sequence')
@pytest.mark.parametrize('device_spec', ['cpu', 'standin:0'], ids=['cpu', 'standin'])
@pytest.mark.parametrize('fmt', list(FORMATS))
@pytest.mark.parametrize('targets', ['zeros', 'nones'])
@DAMAGE
@given(data=st.data())
def test_damaged_files_load_correctly_or_fail_cleanly(fmt, device_spec, targets, data):
    device = make_device(device_spec)
    tree = data.draw(trees(HDF5_LEAVES if fmt.startswith('hdf5') else ALL_LEAVES))
    good = _to_bytes(fmt, _source(tree, devices.CPU))
    how = data.draw(damage(len(good)))
    target = _zeros(tree, device) if targets == 'zeros' else _nones(tree)
    before = _snapshot(target)
    error = _load_damaged(fmt, _damaged(good, how), target, device_spec)
    if error is not None:  # nothing changed but the arrays the error says it filled
        touched = getattr(error, 'filled', []) + [getattr(error, 'partly_filled', None)]
        _assert_untouched(target, before, touched)
    elif fmt.startswith('hdf5') and how[0] == 'flip':  # no checksums: a flipped data byte loads
        _assert_tree_shaped(target, tree)
    else:  # a zip checks every member's CRC, and a cut HDF5 file cannot give wrong bytes
        _assert_tree_equal(target, tree)


def _snapshot(target: dict, prefix: str = '') -> dict:
    """{full key: (identity, host copy) for arrays, the value itself for others}."""
    out = {}
    for key, value in target.items():
        if isinstance(value, dict):
            out.update(_snapshot(value, f'{prefix}{key}/'))
        elif devices.is_array(value):
            out[prefix + key] = (id(value), host(value).copy())
        else:
            out[prefix + key] = value
    return out


def _assert_untouched(target: dict, before: dict, filled: list) -> None:
    now = _snapshot(target)
    assert now.keys() == before.keys()
    for key, value in now.items():
        if isinstance(value, tuple):
            assert value[0] == before[key][0], key  # the same array, in place
            if key not in filled:
                assert value[1].tobytes() == before[key][1].tobytes(), key
        else:
            assert type(value) is type(before[key]) and (value == before[key] or (
                value != value and before[key] != before[key])), key  # NaN is NaN


@st.composite
def gzipped_datasets(draw):
    """(values, chunks): a numeric array of up to 2 KB and a chunk shape for it."""
    dtype = draw(st.sampled_from(['i1', 'u2', 'f4', 'f8', 'c8']))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12))
    values = draw(hnp.arrays(dtype, shape, elements={'allow_nan': False}
                             if dtype[0] in 'fc' else None))
    chunks = tuple(draw(st.integers(1, side)) for side in shape)
    return values, chunks


@pytest.mark.parametrize('device_spec', ['cpu', 'standin:0'], ids=['cpu', 'standin'])
@DAMAGE
@given(dataset=gzipped_datasets(), data=st.data())
def test_damaged_gzipped_chunks_fail_where_libhdf5_fails(device_spec, dataset, data):
    """A gzip dataset whose chunks gpuserial inflates itself, with bytes of its stored chunks
    flipped: where libhdf5 (h5py) reads it, the values are the same or the error is clean;
    where libhdf5 fails, so does the load, cleanly, saying which chunk."""
    import h5py
    values, chunks = dataset
    path = _directory() / 'chunks.h5'
    with h5py.File(path, 'w') as f:
        f.create_dataset('x', data=values, chunks=chunks, compression=4)
        stored = [f['x'].id.get_chunk_info(i) for i in range(f['x'].id.get_num_chunks())]
    chunk = data.draw(st.sampled_from(stored))
    flips = data.draw(st.lists(st.tuples(st.integers(0, chunk.size - 1), st.integers(1, 255)),
                               min_size=1, max_size=3))
    damaged = bytearray(path.read_bytes())
    for offset, mask in flips:
        damaged[chunk.byte_offset + offset] ^= mask
    path.write_bytes(damaged)
    try:
        with h5py.File(path) as f:
            theirs = f['x'][()]
    except OSError:  # libhdf5's filter failed
        theirs = None
    target = {'x': make_device(device_spec).send(numpy.zeros_like(values))}
    staging = data.draw(st.integers(64, 1 << 14))  # bands of chunks a block: else libhdf5's
    if hdf5.chunk_bands(values.shape, chunks, values.itemsize, staging) is None:
        staging = 1 << 14  # the whole array
    inflated = []
    inflate = hdf5.inflate_chunk
    try:
        with transfer.configure(chunk_bytes=staging), mock.patch.object(
                hdf5, 'inflate_chunk', lambda *args: inflated.append(1) or inflate(*args)):
            _load_hdf5_inflating(path, target)
    except GpuserialError as error:
        event('refused' if theirs is None else 'refused where libhdf5 read it')
        if inflated:  # (a gzipped edge chunk as long as its values leaves it to libhdf5)
            assert f'the HDF5 chunk at {chunk.chunk_offset}: ' in str(error)
        return
    event('loaded')
    assert theirs is not None  # loaded where libhdf5 failed
    numpy.testing.assert_array_equal(host(target['x']), theirs)
