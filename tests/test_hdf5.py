"""HDF5 specifics: Chainer's layout (groups, gzip, Empty for None), chunked device writes."""

import contextlib
import ctypes
import io
import math
import os
import re
import resource
import subprocess
import sys
import threading
import zlib

import h5py
import numpy
import pytest

import gpuserial
from gpuserial import serializers
from gpuserial.engine import transfer
from gpuserial.errors import (
    CorruptFileError,
    InvalidKeyError,
    KeyCollisionError,
    MismatchError,
    ReadFailedError,
)
from gpuserial.formats import hdf5
from gpuserial.tools import inspection
from tests.conftest import host, make_device
from tests.standin import StandInDevice


def test_layout_is_chainers(tmp_path):
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, {'l1': {'W': numpy.ones((3, 4), numpy.float32), 'b': None},
                                 't': 3, 'one': numpy.ones(1)})
    with h5py.File(path, 'r') as f:
        assert isinstance(f['l1'], h5py.Group)
        assert f['l1/W'].compression == 'gzip' and f['l1/W'].compression_opts == 4
        assert f['l1/b'].shape is None and f['l1/b'].dtype == numpy.float32  # h5py.Empty('f')
        assert f['t'].compression is None and f['t'][()] == 3
        assert f['one'].compression is None


@pytest.mark.parametrize('save', [serializers.save_hdf5, gpuserial.save],
                         ids=['save_hdf5', 'save'])
def test_a_none_array_is_stored_as_none(tmp_path, save):
    """A 0-d object array holding None is Chainer's None as ``npz.serialize`` gives it (the dict
    its snapshot writers hand to ``savefun``): stored as Empty, as in NPZ. It was refused as
    'object arrays other than None cannot be saved'."""
    path = tmp_path / 'm.h5'
    save(path, {'W': numpy.array(None), 'b': numpy.ones(2, numpy.float32)})
    with h5py.File(path, 'r') as f:
        assert f['W'].shape is None and f['W'].dtype == numpy.float32  # h5py.Empty('f')
    target = {'W': numpy.zeros(3), 'b': numpy.zeros(2, numpy.float32)}
    serializers.load_hdf5(path, target)
    assert (target['W'] == 0).all() and (target['b'] == 1).all()
    assert gpuserial.load(path)['W'] is None


@pytest.mark.parametrize('level', [0, 1, 9])
def test_compression_level(tmp_path, level):
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, {'w': numpy.zeros(1000), 'one': numpy.ones(1)},
                          compression=level)
    with h5py.File(path, 'r') as f:
        assert f['w'].compression == ('gzip' if level else None)
        assert f['w'].compression_opts == (level or None)
        assert f['one'].compression is None  # a single element is never compressed


@pytest.mark.parametrize('compression, level', [
    (True, 4), ('gzip', 4), (numpy.int64(2), 2), (None, None), (False, None)])
def test_compression_as_h5py_takes_it(tmp_path, compression, level):
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, {'w': numpy.zeros(1000)}, compression=compression)
    with h5py.File(path, 'r') as f:  # True was level 1; 'gzip' was refused
        assert (f['w'].compression, f['w'].compression_opts) == (level and 'gzip', level)


@pytest.mark.parametrize('compression', ['lzf', 10, -1, 2.0])
def test_other_compression_is_refused_before_writing(tmp_path, compression):
    path = tmp_path / 'm.h5'
    with pytest.raises(ValueError, match=re.escape(f"'{path}': compression {compression!r}: "
                                                   f"expected a gzip level 0-9")):
        serializers.save_hdf5(path, {'w': numpy.zeros(1000)}, compression=compression)
    assert os.listdir(tmp_path) == []


def test_serializer_on_an_open_group(tmp_path):
    with h5py.File(tmp_path / 'm.h5', 'w') as f:
        serializer = serializers.HDF5Serializer(f.create_group('model'), compression=1)
        serializer['/sub/']('/w', numpy.arange(3.0))
    with h5py.File(tmp_path / 'm.h5', 'r') as f:
        target = numpy.zeros(3)
        serializers.HDF5Deserializer(f['model'])['sub']('w', target)
    numpy.testing.assert_array_equal(target, numpy.arange(3.0))


@pytest.mark.parametrize('shape', [(7,), (5, 9), (3, 4, 50), ()])
@pytest.mark.parametrize('compression', [0, 4])
def test_device_arrays_go_in_hyperslabs(tmp_path, small_chunks, shape, compression):
    values = numpy.arange(int(numpy.prod(shape)), dtype=numpy.float64).reshape(shape)
    device = StandInDevice(1)
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, {'w': device.send(values)}, compression=compression)
    with h5py.File(path, 'r') as f:
        numpy.testing.assert_array_equal(f['w'][()], values)
    target = {'w': device.send(numpy.zeros(shape))}
    serializers.load_hdf5(path, target)
    numpy.testing.assert_array_equal(host(target['w']), values)


def test_a_group_where_a_dataset_is_expected(tmp_path):
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, {'w': {'x': numpy.ones(2)}})
    with pytest.raises(ValueError, match=r"m\.h5', key 'w': is an HDF5 group, not a dataset"):
        serializers.load_hdf5(path, {'w': numpy.zeros(2)})


def test_libhdf5_creates_the_temporary_file_rather_than_truncating_it(tmp_path, monkeypatch):
    """ext4 flushes a file truncated and rewritten when it is closed (auto_da_alloc): opened
    with mode 'w' over an existing file, a 1 GiB save took 2.5 times as long."""
    modes = []
    real_file = h5py.File

    def spy(name, mode='r', *args, **kwargs):
        if isinstance(name, str):
            modes.append((mode, (tmp_path / name).exists()))
        return real_file(name, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, 'File', spy)
    serializers.save_hdf5(tmp_path / 'model.h5', {'W': numpy.ones(3)})
    assert modes == [('x', False)]
    with real_file(tmp_path / 'model.h5') as f:
        assert f['W'][()].tolist() == [1, 1, 1]


def test_reads_of_a_chunked_dataset_take_whole_bands_of_its_chunks(tmp_path):
    """Each block a whole number of HDF5 chunk rows, so that no chunk is read twice."""
    with h5py.File(tmp_path / 'm.h5', 'w') as f:
        dataset = f.create_dataset('x', data=numpy.zeros((100, 10)), chunks=(3, 10)).id
        with transfer.configure(chunk_bytes=1100):  # 13 rows of 80 bytes; 12 in whole bands
            blocks = hdf5._read_blocks(dataset, (100, 10), 8, host=False)
        assert [index[0].start for index, _, _ in blocks] == list(range(0, 100, 12))
        with transfer.configure(chunk_bytes=800):  # the whole dataset fits: one read
            assert len(hdf5._read_blocks(dataset, (10, 10), 8, host=False)) == 1


def test_text_arrays_are_saved_as_utf8_strings(tmp_path):
    serializers.save_hdf5(tmp_path / 'm.h5', {'words': numpy.array(['ab', 'ç']),
                                               'word': numpy.array('xyz')})
    with h5py.File(tmp_path / 'm.h5') as f:
        assert f['words'].asstr()[()].tolist() == ['ab', 'ç']
        assert f['word'].asstr()[()] == 'xyz'
    target = {'word': ''}
    serializers.load_hdf5(tmp_path / 'm.h5', target, strict=False)
    assert target == {'word': 'xyz'}


def test_text_loads_into_str_arrays_on_the_host_when_the_load_has_a_device(tmp_path):
    serializers.save_hdf5(tmp_path / 'm.h5', {'w': numpy.array(['ab', 'çé']), 'x': numpy.ones(2),
                                               'none': numpy.array([], 'U1')})
    target = {'w': numpy.zeros(2, 'U4'), 'x': numpy.zeros(2), 'none': None}
    serializers.load_hdf5(tmp_path / 'm.h5', target, device=StandInDevice(1))
    assert type(target['w']) is numpy.ndarray and target['w'].tolist() == ['ab', 'çé']
    assert target['x'].device == StandInDevice(1)  # the numbers moved
    assert target['none'].dtype.kind == 'U' and target['none'].shape == (0,)  # empty text


@pytest.mark.parametrize('words', [numpy.array(['ab', 'çé']), numpy.array('héllo')])
def test_text_arrays_load_as_str_arrays_new_or_in_place(tmp_path, words):
    serializers.save_hdf5(tmp_path / 'm.h5', {'w': words})
    target = {'w': None}  # a new array, as a NPZ load gives
    serializers.load_hdf5(tmp_path / 'm.h5', target)
    assert target['w'].dtype.kind == 'U' and target['w'].tolist() == words.tolist()
    in_place = numpy.zeros(words.shape, 'U5')
    serializers.load_hdf5(tmp_path / 'm.h5', {'w': in_place})
    assert in_place.tolist() == words.tolist()
    narrow = numpy.zeros(words.shape, 'U2')  # 'héllo' would be cut short
    if words.dtype.itemsize > narrow.dtype.itemsize:
        with pytest.raises(MismatchError, match=r"key 'w': stored text \(<U5\) does not cast"):
            serializers.load_hdf5(tmp_path / 'm.h5', {'w': narrow})
        assert narrow.tolist() == numpy.zeros(words.shape, 'U2').tolist()


@pytest.mark.parametrize('keys', [('a//b', 'a/b'), ('./a', 'a'), ('x/./y', 'x/y')])
def test_keys_that_name_one_hdf5_path_collide_before_anything_is_written(tmp_path, keys):
    with pytest.raises(KeyCollisionError, match=r"key 'a/b': stored twice|key 'a': stored "
                                                 r"twice|key 'x/y': stored twice"):
        serializers.save_hdf5(tmp_path / 'm.h5', {key: numpy.ones(1) for key in keys})
    assert not (tmp_path / 'm.h5').exists()
    serializers.save_hdf5(tmp_path / 'm.h5', {'a/../b': numpy.ones(1)})  # '..': just a name
    with h5py.File(tmp_path / 'm.h5') as f:
        assert list(f['a']) == ['..'] and list(f['a/..']) == ['b']


@pytest.mark.parametrize('key', ['a/b/', 'a/.', '.'])
def test_a_key_that_names_its_group_is_refused_by_hdf5(tmp_path, key):
    with pytest.raises(InvalidKeyError, match=re.escape(f"m.h5', key {key!r} of group '/': the "
                                                        f"name of an HDF5 dataset cannot end")):
        serializers.save_hdf5(tmp_path / 'm.h5', {key: numpy.ones(1)})
    assert not (tmp_path / 'm.h5').exists()


def test_key_errors_name_the_file_and_the_group_path_however_the_serializer_was_made(
        tmp_path):
    path = tmp_path / 'm.h5'
    with pytest.raises(InvalidKeyError, match=re.escape(f"{str(path)!r}, key '' under path "
                                                        f"'a/' is empty")):
        serializers.save_hdf5(path, {'a': {'': numpy.ones(1)}})
    with h5py.File(path, 'w') as f:  # made directly on an open file: no save to name it
        child = serializers.HDF5Serializer(f)['a']
        with pytest.raises(InvalidKeyError, match=re.escape(f"{str(path)!r}, key 'x\\x00' "
                                                            f"under path 'a/' holds a NUL")):
            child('x\x00', numpy.ones(1))
        with pytest.raises(InvalidKeyError, match=re.escape(f"{str(path)!r}, key '/' under "
                                                            f"path 'a/' is empty")):
            child['/']
        with pytest.raises(InvalidKeyError, match=re.escape(f"{str(path)!r}, key 'b/' of group "
                                                            f"'/a': the name of an HDF5")):
            child('b/', numpy.ones(1))


@pytest.mark.parametrize('group', ['a//b', './a/b', 'a/./b'])
def test_a_group_asked_for_by_another_spelling_of_a_dataset_path_collides_first(tmp_path,
                                                                               group):
    class Model:
        def serialize(self, serializer):
            serializer[group]  # an empty group, made where the dataset would go
            serializer('a/b', numpy.ones(1))

    with pytest.raises(KeyCollisionError, match="key 'a/b': a group of that name"):
        serializers.save_hdf5(tmp_path / 'm.h5', Model())
    assert not (tmp_path / 'm.h5').exists()


def test_a_group_where_a_dataset_is_stored_already(tmp_path):
    with h5py.File(tmp_path / 'm.h5', 'w') as f:
        f.create_dataset('a', data=1)
        with pytest.raises(KeyCollisionError, match="key 'a': cannot make a group here"):
            serializers.HDF5Serializer(f)['a']


def test_libhdf5_writes_the_file_itself_only_with_twice_its_size_to_spare(tmp_path,
                                                                          monkeypatch):
    plan = hdf5._Plan()
    plan.entries = [('/', 'W', 'W', numpy.zeros(1000))]
    needed = 8000 + hdf5.HDF5_ENTRY_BYTES + hdf5.HDF5_FILE_BYTES
    real_statvfs = os.statvfs

    def free(nbytes):
        info = real_statvfs(tmp_path)
        return lambda path: os.statvfs_result(
            (*info[:3], info.f_bfree, nbytes // info.f_frsize, *info[5:]))

    frsize = real_statvfs(tmp_path).f_frsize
    enough = -(-(2 * needed + hdf5.HDF5_SPARE_BYTES) // frsize) * frsize  # whole blocks
    monkeypatch.setattr(os, 'statvfs', free(enough))
    assert hdf5._roomy(str(tmp_path), plan)
    monkeypatch.setattr(os, 'statvfs', free(enough - frsize))
    assert not hdf5._roomy(str(tmp_path), plan)
    monkeypatch.setattr(os, 'statvfs', free(enough))
    for limit, roomy in ((2 * needed, True), (2 * needed - 1, False)):  # a file size limit
        monkeypatch.setattr(resource, 'getrlimit', lambda which, limit=limit: (limit, limit))
        assert hdf5._roomy(str(tmp_path), plan) is roomy


def test_a_save_through_python_raises_what_failed_when_no_write_did(monkeypatch):
    def fail(self, plan, f, entries=None):
        raise RuntimeError('not a write error')

    monkeypatch.setattr(hdf5.HDF5Serializer, 'write', fail)
    with pytest.raises(RuntimeError, match='not a write error'):
        serializers.save_hdf5(io.BytesIO(), {'W': numpy.zeros(3)})


def test_compressed_rows_larger_than_a_chunk_are_chunked_a_block_each(tmp_path, monkeypatch):
    """Rows of 256 bytes with 64-byte HDF5 chunks: each HDF5 chunk is one block, a part of one
    row, so that no chunk is written twice."""
    monkeypatch.setattr(hdf5, 'GZIP_CHUNK_BYTES', 64)
    array = numpy.arange(4 * 4 * 8, dtype=numpy.float64).reshape(4, 4, 8)
    serializers.save_hdf5(tmp_path / 'm.h5', {'x': array}, compression=4)
    with h5py.File(tmp_path / 'm.h5') as f:
        assert f['x'].chunks == (1, 1, 8)
        numpy.testing.assert_array_equal(f['x'][()], array)


RNG = numpy.random.default_rng(0)
GZIPPED = {  # edge chunks, rows wider than a chunk, byte orders, every kind h5py stores as is
    'rows': RNG.standard_normal((3001, 257)).astype(numpy.float32),
    'flat': RNG.standard_normal(300_003),
    'wide': RNG.standard_normal((2, 3, 300_001)).astype(numpy.float32),
    'big_endian': RNG.standard_normal((700, 1000)).astype('>f8'),
    'bool': RNG.integers(0, 2, (3000, 1000)).astype(bool),
    'complex': (RNG.standard_normal((400, 500)) + 1j).astype(numpy.complex128),
    'half': RNG.standard_normal(1_000_001).astype(numpy.float16),
    'int8': RNG.integers(-100, 100, 2_500_000).astype(numpy.int8),
    'transposed': RNG.standard_normal((1000, 700)).astype(numpy.float32).T,
}


@pytest.mark.parametrize('threads', [1, 3])
def test_gzipped_chunks_are_libhdf5s_own_whatever_the_threads_device_and_staging(
        tmp_path, monkeypatch, threads):
    """Chunks of at most GZIP_CHUNK_BYTES, gzipped on the worker threads: the same chunk
    shapes and bytes as h5py (libhdf5's filter) writes, whatever the staging chunks and the
    array's device."""
    from gpuserial.engine import workers
    monkeypatch.setattr(workers, 'count', lambda: threads)
    device = StandInDevice(0)
    with transfer.configure(chunk_bytes=100_000):
        serializers.save_hdf5(tmp_path / 'host.h5', GZIPPED)
        serializers.save_hdf5(tmp_path / 'device.h5', {  # devices hold native byte order
            key: device.send(value) for key, value in GZIPPED.items() if value.dtype.isnative})
    with h5py.File(tmp_path / 'host.h5') as ours, h5py.File(tmp_path / 'device.h5') as sent, \
            h5py.File(tmp_path / 'h5py.h5', 'w') as theirs:
        for key, value in GZIPPED.items():
            dataset = ours[key]
            assert (dataset.compression, dataset.compression_opts) == ('gzip', 4)
            assert dataset.dtype == value.dtype
            chunk_bytes = value.itemsize * numpy.prod(dataset.chunks)
            assert hdf5.GZIP_CHUNK_BYTES // 2 < chunk_bytes <= hdf5.GZIP_CHUNK_BYTES, key
            numpy.testing.assert_array_equal(dataset[()], value)
            reference = theirs.create_dataset(key, data=value, chunks=dataset.chunks,
                                              compression=4)
            copies = [dataset, reference] + ([sent[key]] if value.dtype.isnative else [])
            assert {copy.chunks for copy in copies} == {dataset.chunks}
            count = dataset.id.get_num_chunks()
            assert {copy.id.get_num_chunks() for copy in copies} == {count} and count > 1
            for index in range(count):
                offset = dataset.id.get_chunk_info(index).chunk_offset
                chunks = {copy.id.read_direct_chunk(offset) for copy in copies}
                assert len(chunks) == 1, (key, offset)


def test_gzipped_chunks_deflate_on_the_worker_threads(tmp_path, monkeypatch):
    from gpuserial.engine import workers
    monkeypatch.setattr(workers, 'count', lambda: 3)
    where = []
    compress = hdf5.zlib.compress

    class Zlib:
        @staticmethod
        def compress(data, level):
            where.append(threading.current_thread().name)
            return compress(data, level)

    monkeypatch.setattr(hdf5, 'zlib', Zlib)
    serializers.save_hdf5(tmp_path / 'm.h5', {'x': GZIPPED['flat']})
    chunks = -(-GZIPPED['flat'].nbytes // hdf5.GZIP_CHUNK_BYTES)  # rounded up
    assert len(where) == chunks > 1
    assert all(name.startswith('gpuserial-worker') for name in where)
    target = {'x': numpy.zeros_like(GZIPPED['flat'])}
    serializers.load_hdf5(tmp_path / 'm.h5', target)
    numpy.testing.assert_array_equal(target['x'], GZIPPED['flat'])


def test_a_file_object_that_takes_no_bytes_fails_the_save():
    class Stuck(io.RawIOBase):
        def writable(self):
            return True

        def seekable(self):
            return True

        def seek(self, offset, whence=0):
            return 0

        def tell(self):
            return 0

        def write(self, data):
            return 0

    with pytest.raises(OSError, match='made no progress'):
        serializers.save_hdf5(Stuck(), {'x': numpy.arange(3)})


REFUSING_WRITER = """
import io, numpy
import gpuserial
from gpuserial import serializers
class Refusing(io.RawIOBase):
    def writable(self): return True
    def seekable(self): return True
    def seek(self, offset, whence=0): return 0
    def tell(self): return 0
    def write(self, data): raise ValueError('this store takes no bytes')
try:
    serializers.save_hdf5(Refusing(), {'x': numpy.arange(3)})
except ValueError as error:
    print('raised:', error)
"""


def test_a_file_objects_write_error_of_any_type_fails_the_save_not_the_process():
    """Only an OSError was kept from libhdf5, and anything else crashed the process."""
    run = subprocess.run([sys.executable, '-c', REFUSING_WRITER], capture_output=True, text=True,
                         timeout=120)
    assert (run.returncode, run.stdout) == (0, 'raised: this store takes no bytes\n'), run.stderr


def test_a_dataset_where_a_group_of_that_name_already_holds_entries_is_refused(tmp_path):
    class GroupThenDataset:
        def serialize(self, serializer):
            serializer['a']  # a child link with nothing to store: its group is made anyway
            serializer('a', numpy.ones(2))

    path = tmp_path / 'm.h5'
    with pytest.raises(KeyCollisionError, match=r"key 'a': a group of that name holds other "
                                                r"entries"):
        serializers.save_hdf5(path, GroupThenDataset())
    assert not path.exists()


def test_a_load_of_blocks_counts_every_byte(tmp_path, monkeypatch):
    from gpuserial.engine import progress
    counted = []

    class Bar:
        def update(self, nbytes):
            counted.append(nbytes)

    class Recorder:
        def __call__(self, total, desc, enabled=None, *, stream=None):
            import contextlib
            counted.append(('total', total() if callable(total) else total))
            return contextlib.nullcontext(Bar())

    array = numpy.arange(3 << 17, dtype=numpy.float64)  # 3 MiB: three blocks of 1 MiB
    serializers.save_hdf5(tmp_path / 'm.h5', {'x': array}, compression=0)
    monkeypatch.setattr(progress, 'bar', Recorder())
    target = {'x': numpy.zeros_like(array)}
    with transfer.configure(chunk_bytes=1 << 20):
        serializers.load_hdf5(tmp_path / 'm.h5', target)
    assert counted[0] == ('total', array.nbytes)
    assert [n for n in counted[1:] if n] == [1 << 20] * 3  # block by block
    numpy.testing.assert_array_equal(target['x'], array)


def test_a_deserializer_made_directly_is_strict_by_default(tmp_path):
    from gpuserial.errors import KeyNotFoundError
    serializers.save_hdf5(tmp_path / 'm.h5', {'x': numpy.zeros(2)})
    with h5py.File(tmp_path / 'm.h5', 'r') as f:
        with pytest.raises(KeyNotFoundError):
            hdf5.HDF5Deserializer(f).load({'y': numpy.zeros(2)})


def test_a_save_is_durable_by_default(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: synced.append(fd) or real(fd))
    serializers.save_hdf5(tmp_path / 'm.h5', {'x': numpy.zeros(2)})
    assert synced


def test_a_save_to_a_bare_file_name_lands_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    serializers.save_hdf5('m.h5', {'x': numpy.arange(3)})
    target = {'x': numpy.zeros(3, numpy.int64)}
    serializers.load_hdf5(tmp_path / 'm.h5', target)
    assert target['x'].tolist() == [0, 1, 2]


PLAIN_AND_NOT = {
    'a': {'b': numpy.arange(12, dtype=numpy.float32).reshape(3, 4), 'c/d': numpy.arange(5)},
    'e/f/g': numpy.float32(3), 'bools': numpy.array([True, False]),
    'big_endian': numpy.arange(3, dtype='>f8'), 'complex': numpy.ones(4, 'c8'),
    'half': numpy.ones(7, 'f2'), 'empty': numpy.zeros((2, 0)), 'scalar': numpy.ones((), 'u2'),
    'strided': numpy.arange(12).reshape(3, 4)[:, ::2], 'fortran': numpy.arange(10.).reshape(2, 5).T,
    'bytes': numpy.array([b'ab', b'cd']), 'n': 5, 'text': 'text', 'none': None,
}


@pytest.mark.parametrize('compression', [0, 4])
def test_plain_arrays_made_without_h5py_objects_make_the_same_file(tmp_path, monkeypatch,
                                                                    compression):
    """Small arrays of numbers are created with h5py's low-level calls: the file is the one
    that create_dataset makes, byte for byte, and h5py reads it back."""
    fast = tmp_path / 'fast.h5'
    serializers.save_hdf5(fast, PLAIN_AND_NOT, compression=compression)
    monkeypatch.setattr(hdf5, 'PLAIN_KINDS', frozenset())  # every array through create_dataset
    general = tmp_path / 'general.h5'
    serializers.save_hdf5(general, PLAIN_AND_NOT, compression=compression)
    assert fast.read_bytes() == general.read_bytes()
    with h5py.File(fast, 'r') as f:
        numpy.testing.assert_array_equal(f['a/c/d'][()], numpy.arange(5))
        assert f['big_endian'].dtype == numpy.dtype('>f8') and f['e/f/g'][()] == 3
        assert (f['a/b'].compression, f['a/b'].chunks) == (('gzip', (3, 4)) if compression
                                                           else (None, None))


@pytest.mark.parametrize('allocation', [True, False], ids=['h5py before 3.12', 'since'])
def test_plain_compressed_datasets_are_filled_when_h5py_fills_its_own(tmp_path, monkeypatch,
                                                                     allocation):
    """h5py's create_dataset set FILL_TIME_ALLOC on every chunked dataset before 3.12: the plain
    path does the same there, so that the file stays h5py's, byte for byte (ci/test-oldest.sh
    runs the byte-for-byte test above under h5py 3.6)."""
    monkeypatch.setattr(hdf5, 'H5PY_FILLS_CHUNKS_AT_ALLOCATION', allocation)
    serializers.save_hdf5(tmp_path / 'm.h5', {'w': numpy.ones((3, 4))}, compression=4)
    with h5py.File(tmp_path / 'm.h5', 'r') as f:
        assert (f['w'].id.get_create_plist().get_fill_time() == h5py.h5d.FILL_TIME_ALLOC) is (
            allocation)


def test_a_plain_dataset_where_one_is_already_names_the_key(tmp_path):
    with h5py.File(tmp_path / 'model.h5', 'w') as f:
        f.create_dataset('w', data=numpy.zeros(3))
        with pytest.raises(ValueError, match=r"key 'w': .*name already exists"):
            hdf5.HDF5Serializer(f)('w', numpy.ones(3))


def test_files_are_read_with_no_chunk_cache(tmp_path):
    """Reads take whole chunks, each once; a cache only kept memory (an open dataset's stayed
    allocated through the load: 81 MiB for eight gzipped datasets of 32 MiB)."""
    serializers.save_hdf5(tmp_path / 'm.h5', {'w': numpy.arange(1 << 16, dtype=numpy.float32)})
    with hdf5.open_hdf5(tmp_path / 'm.h5') as f:
        assert f.id.get_access_plist().get_cache()[2] == 0  # rdcc_nbytes
        numpy.testing.assert_array_equal(f['w'][1000:1010], numpy.arange(1000, 1010))


def test_at_most_one_chunk_more_than_the_threads_is_gzipped_ahead_and_each_is_counted(
        tmp_path, monkeypatch):
    """Memory stays bound: a chunk is handed to the threads only once all but ``count`` of
    those before it are written; the progress counts each chunk's bytes once written."""
    from gpuserial.engine import progress, workers
    monkeypatch.setattr(workers, 'count', lambda: 2)
    submitted, written, ahead = [], [], []
    compress = hdf5.zlib.compress

    class Zlib:
        @staticmethod
        def compress(data, level):
            return compress(data, level)

    real_submit = workers.submit

    def submit(function, *args):
        submitted.append(1)
        ahead.append(len(submitted) - len(written))
        return real_submit(function, *args)

    monkeypatch.setattr(hdf5, 'zlib', Zlib)
    monkeypatch.setattr(workers, 'submit', submit)

    class Bar:
        def update(self, nbytes):
            written.append(nbytes)

    class Recorder:
        def __call__(self, total, desc, enabled=None, *, stream=None):
            import contextlib
            return contextlib.nullcontext(Bar())

    monkeypatch.setattr(progress, 'bar', Recorder())
    array = GZIPPED['flat']
    serializers.save_hdf5(tmp_path / 'm.h5', {'x': array}, progress=True)
    chunks = -(-array.nbytes // hdf5.GZIP_CHUNK_BYTES)
    assert len(submitted) == chunks and max(ahead) == 3
    assert sum(written) == array.nbytes and len([n for n in written if n]) == chunks


# Gzipped datasets as h5py writes them (Chainer's save_hdf5): guessed chunks, edge chunks in
# every axis, chunks one deep in the leading axes, every kind stored as it is
INFLATED_HERE = pytest.mark.skipif(  # only where gpuserial inflates (else libhdf5 does)
    not hdf5.CAN_LIST_CHUNKS, reason='this h5py cannot list chunks (built with HDF5 before '
    '1.12.3, as its wheels before 3.10): libhdf5 inflates every chunk')

INFLATED = {
    'guessed': (RNG.standard_normal((300, 500)).astype(numpy.float32), True),
    'edges': (RNG.standard_normal((10, 11, 13)), (3, 5, 7)),
    'leading_ones': (RNG.standard_normal((5, 40, 13)).astype(numpy.float32), (1, 4, 13)),
    'flat': (RNG.standard_normal(100_003), (1000,)),
    'complex': ((RNG.standard_normal((60, 70)) + 1j).astype(numpy.complex64), (7, 9)),
    'bool': (RNG.integers(0, 2, (300, 77)).astype(bool), True),
    'int8': (RNG.integers(-100, 100, (2, 50_001)).astype(numpy.int8), (1, 4096)),
    'half': (RNG.standard_normal(30_001).astype(numpy.float16), True),
}


VALUES = RNG.standard_normal((100, 100)).astype(numpy.float32)  # 10 x 10 chunks of 400 bytes
RAW = VALUES[10:20, 30:40].tobytes()  # the chunk at (10, 30)


def _h5py_gzipped(path, arrays: dict) -> None:
    """``arrays`` ({key: (values, chunks)}) written by h5py, gzip at level 4, as Chainer does."""
    with h5py.File(path, 'w') as f:
        for key, (values, chunks) in arrays.items():
            f.create_dataset(key, data=values, chunks=chunks, compression=4)


def _loads(path, expected: numpy.ndarray) -> None:
    """``load_hdf5`` of dataset ``x`` into host zeros gives ``expected``."""
    target = {'x': numpy.zeros_like(expected)}
    serializers.load_hdf5(path, target)
    numpy.testing.assert_array_equal(target['x'], expected)


def _inflated_here(monkeypatch) -> list:
    """Records each chunk gpuserial inflates itself (not libhdf5's filter); every dataset of
    any size is inflated so."""
    inflated = []
    inflate = hdf5.inflate_chunk

    def spy(data, filter_mask, nbytes):
        inflated.append(threading.current_thread().name)
        return inflate(data, filter_mask, nbytes)

    monkeypatch.setattr(hdf5, 'inflate_chunk', spy)
    monkeypatch.setattr(hdf5, 'INFLATE_MIN_BYTES', 0)
    return inflated


def _target(values, where: str):
    """Zeros shaped as ``values``: contiguous on the host, strided on the host, or on a
    device (a spec)."""
    if where == 'strided':
        return numpy.zeros(values.shape[::-1], values.dtype).T
    if where == 'host':
        return numpy.zeros_like(values)
    return make_device(where).send(numpy.zeros_like(values))


TARGETS = ['host', 'standin:0', pytest.param('cuda:0', marks=pytest.mark.gpu)]


@pytest.mark.parametrize('threads', [1, 3])
@pytest.mark.parametrize('where', ['strided', *TARGETS])
@INFLATED_HERE
def test_gzipped_chunks_inflate_on_the_worker_threads_into_any_target(tmp_path, monkeypatch,
                                                                      threads, where):
    """Each chunk read as stored and inflated by gpuserial, on the worker threads where there
    are several, then put in its place: the values are h5py's, whatever the chunk shapes, the
    target's layout and device and the staging blocks."""
    from gpuserial.engine import workers
    monkeypatch.setattr(workers, 'count', lambda: threads)
    inflated = _inflated_here(monkeypatch)
    _h5py_gzipped(tmp_path / 'm.h5', INFLATED)
    target = {key: _target(values, where) for key, (values, _) in INFLATED.items()}
    with transfer.configure(chunk_bytes=100_000), h5py.File(tmp_path / 'm.h5') as f:
        chunks = sum(f[key].id.get_num_chunks() for key in INFLATED)
        serializers.load_hdf5(tmp_path / 'm.h5', target)
    for key, (values, _) in INFLATED.items():
        numpy.testing.assert_array_equal(host(target[key]), values, err_msg=key)
    assert len(inflated) == chunks
    on_workers = [name.startswith('gpuserial-worker') for name in inflated]
    assert all(on_workers) if threads > 1 else not any(on_workers)


@INFLATED_HERE
def test_gpuserials_own_gzipped_files_inflate_here(tmp_path, monkeypatch):
    inflated = _inflated_here(monkeypatch)
    native = {key: value for key, value in GZIPPED.items() if value.dtype.isnative}
    serializers.save_hdf5(tmp_path / 'm.h5', native)
    target = {key: numpy.zeros_like(value) for key, value in native.items()}
    serializers.load_hdf5(tmp_path / 'm.h5', target)
    for key, value in native.items():
        numpy.testing.assert_array_equal(target[key], value, err_msg=key)
    with h5py.File(tmp_path / 'm.h5') as f:
        assert len(inflated) == sum(f[key].id.get_num_chunks() for key in native)


def _shuffled(f, values):
    f.create_dataset('x', data=values, chunks=(10, 10), compression=4, shuffle=True)


def _unwritten(f, values):
    f.create_dataset('x', shape=values.shape, dtype=values.dtype, chunks=(10, 10),
                     compression=4, fillvalue=7)
    f['x'][:50] = values[:50]


def _unwritten_one_past_the_end(f, values):
    """As many chunks as the grid holds, one unwritten inside it and one past its end (libhdf5
    writes a chunk at an offset equal to the extent)."""
    f.create_dataset('x', shape=values.shape, dtype=values.dtype, chunks=(10, 10),
                     compression=4, fillvalue=7)
    f['x'][:90] = values[:90]
    f['x'][90:, :90] = values[90:, :90]  # the chunk at (90, 90) left unwritten
    f['x'].id.write_direct_chunk((100, 0), zlib.compress(values[:10, :10].tobytes()))
    assert f['x'].id.get_num_chunks() == 100


def _unfiltered_edges(f, values):
    """Partial edge chunks stored as they are, their filter mask clear: H5Pset_chunk_opts'
    H5D_CHUNK_DONT_FILTER_PARTIAL_CHUNKS, which h5py neither sets nor shows."""
    set_chunk_opts = ctypes.CDLL(h5py.h5p.__file__).H5Pset_chunk_opts  # h5py's libhdf5
    set_chunk_opts.argtypes = [ctypes.c_int64, ctypes.c_uint]
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_chunk((10, 15))
    plist.set_deflate(4)
    assert set_chunk_opts(plist.id, 2) >= 0  # H5D_CHUNK_DONT_FILTER_PARTIAL_CHUNKS
    dataset = h5py.h5d.create(f.id, b'x', h5py.h5t.py_create(values.dtype),
                              h5py.h5s.create_simple(values.shape), dcpl=plist)
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, values)
    edge = numpy.zeros((10, 15), values.dtype)
    edge[:, :10] = values[:10, 90:]
    assert dataset.read_direct_chunk((0, 90)) == (0, edge.tobytes())  # as it is, mask clear


@pytest.mark.parametrize('write, stored, target_dtype', [
    (_shuffled, 'f4', 'f4'),  # another filter before gzip
    (_unwritten, 'f4', 'f4'),  # unwritten chunks: the fill value
    (_unwritten_one_past_the_end, 'f4', 'f4'),  # the same, with as many chunks as the grid
    (_unfiltered_edges, 'f4', 'f4'),  # partial edge chunks not gzipped
    (lambda f, values: f.create_dataset('x', data=values, chunks=(10, 10), compression=4),
     '>f4', 'f4'),  # stored in the other byte order: libhdf5 converts
    (lambda f, values: f.create_dataset('x', data=values, chunks=(10, 10), compression=4),
     'f4', 'f8'),  # into another dtype: libhdf5 converts
    (lambda f, values: f.create_dataset('x', data=values, chunks=(100, 100), compression=4),
     'f4', 'f4'),  # chunks larger than MAX_INFLATE_CHUNK_BYTES (patched to 1000 bytes)
    (lambda f, values: f.create_dataset('x', data=values, chunks=(10, 10), compression='lzf'),
     'f4', 'f4'),  # one filter, not gzip
], ids=['shuffle', 'unwritten', 'unwritten-one-past-the-end', 'unfiltered-edges', 'big-endian',
        'cast', 'large-chunks', 'lzf'])
@pytest.mark.parametrize('where', TARGETS)
def test_datasets_gpuserial_does_not_inflate_are_libhdf5s(tmp_path, monkeypatch, write, stored,
                                                          target_dtype, where):
    inflated = _inflated_here(monkeypatch)
    monkeypatch.setattr(hdf5, 'MAX_INFLATE_CHUNK_BYTES', 1000)
    values = RNG.standard_normal((100, 100)).astype(stored)
    with h5py.File(tmp_path / 'm.h5', 'w') as f:
        write(f, values)
    with h5py.File(tmp_path / 'm.h5') as f:
        expected = f['x'][()].astype(target_dtype)
    target = {'x': _target(expected, where)}
    serializers.load_hdf5(tmp_path / 'm.h5', target)
    numpy.testing.assert_array_equal(host(target['x']), expected)
    assert inflated == []


@pytest.mark.parametrize('least, inflated_here', [(40_000, True), (40_001, False)])
@INFLATED_HERE
def test_small_gzipped_datasets_are_read_by_libhdf5_in_one_call(tmp_path, monkeypatch, least,
                                                                inflated_here):
    """Below INFLATE_MIN_BYTES a dataset is one read: handing its chunks to the threads costs
    more than it gains."""
    inflated = _inflated_here(monkeypatch)
    monkeypatch.setattr(hdf5, 'INFLATE_MIN_BYTES', least)  # the dataset's 40,000 bytes
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 10))})
    _loads(tmp_path / 'm.h5', VALUES)
    assert len(inflated) == (100 if inflated_here else 0)


@INFLATED_HERE
def test_a_chunk_past_the_extent_beside_every_chunk_inside_it_is_no_obstacle(tmp_path,
                                                                            monkeypatch):
    """Every chunk inside the extent written, and one past it (libhdf5 writes one at an offset
    equal to the extent): more chunks than the grid, each of the grid's inflated here."""
    inflated = _inflated_here(monkeypatch)
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 10))})
    _rewrite_chunk(tmp_path / 'm.h5', (100, 0), zlib.compress(RAW))
    _loads(tmp_path / 'm.h5', VALUES)
    assert len(inflated) == 100


@pytest.mark.parametrize('most, inflated_here', [(400, True), (399, False)])
@INFLATED_HERE
def test_chunks_of_at_most_max_inflate_chunk_bytes_are_inflated_here(tmp_path, monkeypatch,
                                                                     most, inflated_here):
    inflated = _inflated_here(monkeypatch)
    monkeypatch.setattr(hdf5, 'MAX_INFLATE_CHUNK_BYTES', most)  # chunks of 10 x 10 float32
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 10))})
    _loads(tmp_path / 'm.h5', VALUES)
    assert len(inflated) == (100 if inflated_here else 0)


def test_a_band_of_chunks_larger_than_a_staging_chunk_is_read_by_libhdf5(tmp_path,
                                                                         monkeypatch):
    """Chunks 10 deep in the first axis take 4000-byte bands: with 1000-byte staging chunks
    the device's blocks cannot hold whole chunks, and libhdf5 reads them."""
    inflated = _inflated_here(monkeypatch)
    values = RNG.standard_normal((100, 100)).astype(numpy.float32)
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (values, (10, 10))})
    target = {'x': StandInDevice(0).send(numpy.zeros_like(values))}
    with transfer.configure(chunk_bytes=1000):
        serializers.load_hdf5(tmp_path / 'm.h5', target)
    numpy.testing.assert_array_equal(host(target['x']), values)
    assert inflated == []


@pytest.mark.parametrize('shape, chunks, block_bytes, expected', [
    ((10,), (4,), 8 * 8, [(0, 8), (8, 10)]),  # whole chunks: 8 of the 9 elements that fit
    ((10,), (4,), 3 * 8, None),  # not one chunk fits
    ((6, 5), (4, 2), 39 * 8, [(0, 4), (4, 6)]),  # bands of 4 rows (20 elements), one a block
    ((6, 5), (4, 2), 40 * 8, [(0, 6)]),  # two bands a block: the whole
    ((6, 5), (4, 2), 19 * 8, None),  # a band is 20 elements
    ((2, 6, 5), (1, 4, 5), 20 * 8, [(0, 0, 4), (0, 4, 6), (1, 0, 4), (1, 4, 6)]),
    ((2, 6, 5), (2, 4, 5), 20 * 8, None),  # two deep in the first axis: not rows of it
])
def test_chunk_bands(shape, chunks, block_bytes, expected):
    bands = hdf5.chunk_bands(shape, chunks, 8, block_bytes)
    if expected is None:
        assert bands is None
        return
    assert [(*index[:-1], index[-1].start, index[-1].stop) for index, _, _ in bands] == [
        (*lead, start, stop) for *lead, start, stop in expected]
    flat = numpy.arange(numpy.prod(shape)).reshape(shape)
    for index, start, stop in bands:  # the elements each block holds, in C order
        numpy.testing.assert_array_equal(flat[index].ravel(), numpy.arange(start, stop))
    assert [start for _, start, _ in bands[1:]] == [stop for _, _, stop in bands[:-1]]


def _rewrite_chunk(path, offset: tuple, data: bytes, filter_mask: int = 0) -> None:
    with h5py.File(path, 'r+') as f:
        f['x'].id.write_direct_chunk(offset, data, filter_mask)


@pytest.mark.parametrize('data, message', [
    (zlib.compress(RAW)[:-1] + bytes([zlib.compress(RAW)[-1] ^ 1]), ''),  # its Adler-32
    (zlib.compress(RAW)[:-4], 'its gzip stream ends early'),
    (b'\xff' * 20, ''),  # not a zlib stream
    (zlib.compress(RAW[:396]), 'it holds 396 bytes where its chunk shape holds 400'),
    (zlib.compress(RAW + b'\0'), 'it holds more than the 400 bytes of its chunk shape'),
], ids=['checksum', 'truncated', 'garbage', 'short', 'long'])
@pytest.mark.parametrize('where', TARGETS)
@INFLATED_HERE
def test_a_corrupt_gzipped_chunk_names_the_file_the_key_and_the_chunk(tmp_path, monkeypatch,
                                                                      data, message, where):
    _inflated_here(monkeypatch)
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 10))})
    _rewrite_chunk(tmp_path / 'm.h5', (10, 30), data)
    target = {'x': _target(VALUES, where)}
    expected = re.escape(f"{str(tmp_path / 'm.h5')!r}, key 'x': the HDF5 chunk at (10, 30): "
                         f"{message}")
    with pytest.raises(CorruptFileError, match=expected) as caught:
        serializers.load_hdf5(tmp_path / 'm.h5', target)
    assert caught.value.partly_filled == 'x'


@INFLATED_HERE
def test_a_chunk_stored_without_its_filter_is_taken_as_it_is(tmp_path, monkeypatch):
    """libhdf5 skips an optional filter that fails on a chunk and marks the chunk so (bit 0 of
    its filter mask): its bytes are the values."""
    inflated = _inflated_here(monkeypatch)
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 10))})
    raw = numpy.full((10, 10), 5, numpy.float32)
    _rewrite_chunk(tmp_path / 'm.h5', (10, 30), raw.tobytes(), filter_mask=1)
    expected = VALUES.copy()
    expected[10:20, 30:40] = raw
    with h5py.File(tmp_path / 'm.h5') as f:
        numpy.testing.assert_array_equal(f['x'][()], expected)  # as libhdf5 reads it
    _loads(tmp_path / 'm.h5', expected)
    assert len(inflated) == 100


@INFLATED_HERE
def test_a_partial_edge_chunk_stored_without_its_filter_is_taken_as_it_is(tmp_path,
                                                                          monkeypatch):
    """A partial edge chunk of its full size with bit 0 of its filter mask set (libhdf5 skipped
    gzip on it) is no sign of edge chunks left unfiltered: the dataset is inflated here."""
    inflated = _inflated_here(monkeypatch)
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 15))})
    raw = numpy.full((10, 15), 5, numpy.float32)
    _rewrite_chunk(tmp_path / 'm.h5', (0, 90), raw.tobytes(), filter_mask=1)
    expected = VALUES.copy()
    expected[:10, 90:] = raw[:, :10]
    with h5py.File(tmp_path / 'm.h5') as f:
        numpy.testing.assert_array_equal(f['x'][()], expected)  # as libhdf5 reads it
    _loads(tmp_path / 'm.h5', expected)
    assert len(inflated) == 70


@INFLATED_HERE
def test_a_whole_chunk_stored_at_its_full_size_is_inflated_here(tmp_path, monkeypatch):
    """Only partial edge chunks may be left unfiltered: a whole chunk (here the last of its
    axis) whose gzip stream, with what follows it, is the chunk's size is inflated."""
    inflated = _inflated_here(monkeypatch)
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 15))})
    stream = zlib.compress(bytes(600))
    _rewrite_chunk(tmp_path / 'm.h5', (90, 0), stream + bytes(600 - len(stream)))
    expected = VALUES.copy()
    expected[90:, :15] = 0
    with h5py.File(tmp_path / 'm.h5') as f:
        numpy.testing.assert_array_equal(f['x'][()], expected)  # as libhdf5 reads it
    _loads(tmp_path / 'm.h5', expected)
    assert len(inflated) == 70


@INFLATED_HERE
def test_at_most_one_chunk_more_than_the_threads_is_inflated_ahead_and_each_is_counted(
        tmp_path, monkeypatch):
    """Memory stays bound: a chunk is read and handed to the threads only once all but
    ``count`` of those before it are in the target; the progress counts every byte once."""
    from gpuserial.engine import progress, workers
    monkeypatch.setattr(workers, 'count', lambda: 2)
    _inflated_here(monkeypatch)
    submitted, placed, ahead = [], [], []
    real_submit = workers.submit

    def submit(function, *args):
        submitted.append(1)
        return real_submit(function, *args)

    real_frombuffer = numpy.frombuffer

    class Numpy:  # the chunks handed out: numpy.frombuffer of each inflated one, as placed
        def __getattr__(self, name):
            return getattr(numpy, name)

        @staticmethod
        def frombuffer(data, dtype):
            if len(data) == 400:
                placed.append(1)
                ahead.append(len(submitted) - len(placed))
            return real_frombuffer(data, dtype)

    monkeypatch.setattr(workers, 'submit', submit)
    monkeypatch.setattr(hdf5, 'numpy', Numpy())
    counted = []

    class Bar:
        def update(self, nbytes):
            counted.append(nbytes)

    monkeypatch.setattr(progress, 'bar', lambda *args, **kwargs: contextlib.nullcontext(Bar()))
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 10))})
    target = {'x': numpy.zeros_like(VALUES)}
    serializers.load_hdf5(tmp_path / 'm.h5', target, progress=True)
    numpy.testing.assert_array_equal(target['x'], VALUES)
    assert len(submitted) == len(placed) == 100 and max(ahead) == 2
    assert sum(counted) == VALUES.nbytes


@INFLATED_HERE
def test_a_ctrl_c_during_an_inflating_read_stops_it_at_the_next_chunk(tmp_path, monkeypatch):
    """SIGINT while HDF5 works only sets a flag (see ``_signals``): the chunk reader raises it
    before it reads the next chunk, not at the end of the load."""
    from gpuserial.engine import workers
    from gpuserial.storage import _signals
    monkeypatch.setattr(workers, 'count', lambda: 1)
    inflated = _inflated_here(monkeypatch)
    real = hdf5.inflate_chunk

    def interrupted(data, filter_mask, nbytes):
        if len(inflated) == 2:  # on the third chunk
            _signals._remember(None, None)  # what the SIGINT handler does
        return real(data, filter_mask, nbytes)

    monkeypatch.setattr(hdf5, 'inflate_chunk', interrupted)
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 10))})
    target = {'x': numpy.zeros_like(VALUES)}
    with pytest.raises(KeyboardInterrupt):
        serializers.load_hdf5(tmp_path / 'm.h5', target)
    assert len(inflated) == 3


@INFLATED_HERE
def test_a_failed_inflating_read_cancels_the_chunks_it_handed_out(tmp_path, monkeypatch):
    """A corrupt chunk stops the read: the chunks handed to the threads after it and not
    started are cancelled, not left to run for nothing."""
    from concurrent.futures import Future

    from gpuserial.engine import workers

    class Deferred(Future):  # runs when its result is asked for: cancellable until then
        def __init__(self, function, *args):
            super().__init__()
            self.call = function, args

        def result(self, timeout=None):
            if not self.done():
                function, args = self.call
                try:
                    self.set_result(function(*args))
                except Exception as error:  # noqa: BLE001 - handed to the reader, as a pool does
                    self.set_exception(error)
            return super().result(timeout)

    handed_out = []

    def submit(function, *args):
        handed_out.append(Deferred(function, *args))
        return handed_out[-1]

    monkeypatch.setattr(workers, 'count', lambda: 2)
    monkeypatch.setattr(workers, 'submit', submit)
    _inflated_here(monkeypatch)
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 10))})
    _rewrite_chunk(tmp_path / 'm.h5', (10, 30), b'\xff' * 20)  # the 14th chunk in C order
    with pytest.raises(CorruptFileError, match=r'the HDF5 chunk at \(10, 30\)'):
        serializers.load_hdf5(tmp_path / 'm.h5', {'x': numpy.zeros_like(VALUES)})
    assert len(handed_out) == 16  # up to the 14th, and two ahead of it
    assert [future.cancelled() for future in handed_out] == [False] * 14 + [True] * 2


def _reads_here(monkeypatch) -> list:
    """Records each chunk read from the file's descriptor by gpuserial (not by libhdf5)."""
    reads = []
    real = hdf5.read_chunk

    def spy(*args):
        reads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(hdf5, 'read_chunk', spy)
    return reads


@pytest.mark.parametrize('threads', [1, 3])
@INFLATED_HERE
def test_a_files_chunks_are_read_from_its_descriptor_on_the_worker_threads(
        tmp_path, monkeypatch, threads):
    """A path libhdf5 opened read-only: each chunk is read at its offset (os.pread) and
    inflated on the threads; libhdf5 reads none."""
    from gpuserial.engine import workers
    monkeypatch.setattr(workers, 'count', lambda: threads)
    _inflated_here(monkeypatch)
    reads = _reads_here(monkeypatch)
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 10))})
    _loads(tmp_path / 'm.h5', VALUES)
    assert len(reads) == 100
    on_workers = [name.startswith('gpuserial-worker') for name in reads]
    assert all(on_workers) if threads > 1 else not any(on_workers)


@INFLATED_HERE
def test_a_userblock_moves_no_chunk(tmp_path, monkeypatch):
    _inflated_here(monkeypatch)
    reads = _reads_here(monkeypatch)
    with h5py.File(tmp_path / 'm.h5', 'w', userblock_size=4096) as f:
        f.create_dataset('x', data=VALUES, chunks=(10, 10), compression=4)
    _loads(tmp_path / 'm.h5', VALUES)
    assert len(reads) == 100


@INFLATED_HERE
def test_files_libhdf5_may_hold_chunks_of_in_memory_are_read_through_it(tmp_path,
                                                                        monkeypatch):
    """A file object, and a file the caller opened for writing (chunks it wrote may still be
    in libhdf5's cache, not in the file): libhdf5 reads each chunk as it is stored."""
    inflated = _inflated_here(monkeypatch)
    reads = _reads_here(monkeypatch)
    data = io.BytesIO()
    _h5py_gzipped(data, {'x': (VALUES, (10, 10))})
    target = {'x': numpy.zeros_like(VALUES)}
    serializers.load_hdf5(io.BytesIO(data.getvalue()), target)
    numpy.testing.assert_array_equal(target['x'], VALUES)
    with h5py.File(tmp_path / 'm.h5', 'w') as f:  # written, not flushed, then read
        f.create_dataset('x', data=VALUES, chunks=(10, 10), compression=4)
        target = {'x': numpy.zeros_like(VALUES)}
        serializers.HDF5Deserializer(f).load(target)
    numpy.testing.assert_array_equal(target['x'], VALUES)
    assert len(inflated) == 200 and reads == []


def test_a_chunk_read_from_a_descriptor_is_read_whole(tmp_path, monkeypatch):
    """Reads that return fewer bytes are continued; a file that ends first is corrupt."""
    path = tmp_path / 'chunk'
    path.write_bytes(b'..' + zlib.compress(RAW))
    stored = path.stat().st_size - 2
    real = os.pread
    monkeypatch.setattr(os, 'pread', lambda fd, count, offset: real(fd, min(count, 7), offset))
    with open(path, 'rb') as f:
        assert hdf5.read_chunk(f.fileno(), 2, stored, 0, len(RAW)) == RAW
        with pytest.raises(ValueError, match=rf"^the file ends 5 bytes into the chunk's "
                                             rf"{stored + 5} stored bytes$"):
            hdf5.read_chunk(f.fileno(), 2, stored + 5, 0, len(RAW))


@INFLATED_HERE
def test_a_failed_chunk_read_keeps_its_errno_and_names_the_chunk(tmp_path, monkeypatch):
    _inflated_here(monkeypatch)
    _h5py_gzipped(tmp_path / 'm.h5', {'x': (VALUES, (10, 10))})
    real, calls = os.pread, []

    def failing(fd, count, offset):
        calls.append(offset)
        if len(calls) == 5:  # after the check of the first chunk, the fourth chunk
            raise OSError(5, 'Input/output error')
        return real(fd, count, offset)

    monkeypatch.setattr(os, 'pread', failing)
    with pytest.raises(ReadFailedError, match=re.escape(
            f"{str(tmp_path / 'm.h5')!r}, key 'x': reading failed: the HDF5 chunk at (0, 30): "
            f"[Errno 5] Input/output error")) as caught:
        serializers.load_hdf5(tmp_path / 'm.h5', {'x': numpy.zeros_like(VALUES)})
    assert caught.value.errno == 5


@pytest.mark.parametrize('shape', [(), (5, 3), (300, 300)])  # the last one inflated here
@pytest.mark.parametrize('compression', [0, 4])
@pytest.mark.parametrize('where', ['strided', *TARGETS])
@pytest.mark.parametrize('stored, target_dtype', [('float32', 'complex64'), ('int64', 'complex128'),
                                                  ('bool', '>c8')])
def test_real_numbers_load_into_complex_arrays_as_in_npz(tmp_path, shape, compression, where,
                                                         stored, target_dtype):
    """A same_kind cast libhdf5 has no conversion for (h5py's complex type is a compound of two
    floats): the engine casts, so the load fills the target as NPZ's does, rather than failing
    as a corrupt file."""
    if target_dtype.startswith('>') and where not in ('host', 'strided'):
        pytest.skip('device arrays are of native byte order')
    values = (numpy.arange(math.prod(shape)) % 7).astype(stored).reshape(shape)
    path = str(tmp_path / 'real.h5')
    serializers.save_hdf5(path, {'x': values}, compression=compression)
    target = _target(values.astype(target_dtype), where)
    serializers.load_hdf5(path, {'x': target})
    assert host(target).dtype == numpy.dtype(target_dtype)
    numpy.testing.assert_array_equal(host(target), values.astype(target_dtype))


@pytest.mark.parametrize('value', ['a\udcff', numpy.array(['ok', 'x\ud800y'])])
def test_text_that_is_not_utf8_is_refused_naming_the_file_and_key(tmp_path, value):
    """h5py's UnicodeEncodeError became a bare TypeError ('function takes exactly 5
    arguments'); the old file stays."""
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, {'w': numpy.ones(2)})
    old = path.read_bytes()
    with pytest.raises(ValueError, match=re.escape(
            f"{str(path)!r}, key 's': text that is not UTF-8 (it holds ") + r"'\\ud[8c][0f]"
            r"[0f]': surrogates not allowed\) cannot be saved to HDF5, which stores text as "
            r"UTF-8 \(NPZ stores it\)"):
        serializers.save_hdf5(path, {'w': numpy.ones(2), 's': value})
    assert path.read_bytes() == old and os.listdir(tmp_path) == ['m.h5']


@pytest.mark.parametrize('key', ['a//b', './a/b', 'a/./b', '/a/b'])
def test_a_key_spelt_as_libhdf5_reads_it_is_no_unexpected_key_once_loaded(tmp_path, key):
    """libhdf5 finds 'a/b' under each spelling: the report listed the entry it had just
    loaded as never asked for."""
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, {'a': {'b': numpy.arange(3.0)}, 'c': numpy.ones(1)})
    target = {key: numpy.zeros(3)}
    report = gpuserial.load_into(path, target)
    assert report == gpuserial.LoadReport(missing_keys=[], unexpected_keys=['c'])
    numpy.testing.assert_array_equal(target[key], numpy.arange(3.0))


@pytest.mark.parametrize('key', ['a/./b', 'a/././b', './a/./b'])
def test_a_key_with_dot_parts_saves_as_libhdf5_reads_it(tmp_path, key):
    """HDF5 reads past '.' parts, which h5py cannot make groups of: 'a/./b' failed to save
    with libhdf5's "name already exists". It saves as 'a/b', as 'a//b' does, from a dict,
    from a serializer on an open file and from convert."""
    path = tmp_path / 'm.h5'
    gpuserial.save(path, {key: numpy.arange(3.0), 'c': numpy.ones(1)})
    assert list(gpuserial.load(path)) == ['a/b', 'c']
    with h5py.File(tmp_path / 'open.h5', 'w') as f:
        serializers.HDF5Serializer(f)['g/./h'](key, numpy.arange(2))
        serializers.HDF5Serializer(f)['.']('w', numpy.arange(2))
    assert gpuserial.open(tmp_path / 'open.h5').keys() == ['g/h/a/b', 'w']
    gpuserial.save(tmp_path / 'm.npz', {key: numpy.arange(3.0)})
    inspection.convert(tmp_path / 'm.npz', tmp_path / 'converted.h5')
    numpy.testing.assert_array_equal(gpuserial.load(tmp_path / 'converted.h5')['a/b'],
                                     numpy.arange(3.0))


MAX_DEPTH = 1000  # README: "A key nested more than 1,000 groups deep is refused"


def _nested(depth: int) -> str:
    return '/'.join(['a'] * depth)


@pytest.mark.parametrize('how', ['save', 'save_async', 'serializer', 'serializer group',
                                 'convert'])
def test_a_key_nested_deeper_than_hdf5_reads_is_refused_before_the_file_changes(tmp_path,
                                                                                 how):
    """libhdf5 writes paths of any depth, then crashes every process that reads one nested
    some 16,000 groups deep. More than MAX_DEPTH groups are refused, naming the file and key;
    MAX_DEPTH itself saves and loads."""
    path = tmp_path / 'm.h5'
    fits = {_nested(MAX_DEPTH + 1): numpy.arange(3)}  # the dataset in MAX_DEPTH groups
    deep = {_nested(MAX_DEPTH + 2): numpy.arange(3)}
    message = (re.escape(f"{str(path)!r}, key 'a/a/a") + '.*' + re.escape(
        f'nested {MAX_DEPTH + 1} groups deep; HDF5 takes at most {MAX_DEPTH} here'))
    if how == 'save':
        gpuserial.save(path, fits)
        numpy.testing.assert_array_equal(gpuserial.load(path)[_nested(MAX_DEPTH + 1)],
                                         numpy.arange(3))
        old = path.read_bytes()
        with pytest.raises(InvalidKeyError, match=message):
            gpuserial.save(path, deep)
        assert path.read_bytes() == old and sorted(os.listdir(tmp_path)) == ['m.h5']
    elif how == 'save_async':
        with pytest.raises(InvalidKeyError, match=message):  # at the call, not from the handle
            gpuserial.save_async(path, deep)
        gpuserial.wait_all()
        assert os.listdir(tmp_path) == []
    elif how == 'serializer':
        with h5py.File(path, 'w') as f:
            with pytest.raises(InvalidKeyError, match=message):
                serializers.HDF5Serializer(f)(_nested(MAX_DEPTH + 2), numpy.arange(3))
            assert list(f) == []
    elif how == 'serializer group':  # a group its entries could not be in was made empty
        with h5py.File(path, 'w') as f:
            deepest = serializers.HDF5Serializer(f)[_nested(MAX_DEPTH)]
            deepest['.']('a', numpy.arange(3))  # '.': the same group, no deeper
            with pytest.raises(InvalidKeyError, match=re.escape(f"{str(path)!r}, key 'b/a/a")
                               + '.*' + re.escape(f'nested {MAX_DEPTH + 1} groups deep')):
                serializers.HDF5Serializer(f)['b'][_nested(MAX_DEPTH)]
            assert list(f) == ['a', 'b'] and list(f['b']) == []
        numpy.testing.assert_array_equal(gpuserial.load(path)[_nested(MAX_DEPTH + 1)],
                                         numpy.arange(3))
    else:
        gpuserial.save(tmp_path / 'deep.npz', deep)
        with pytest.raises(InvalidKeyError, match=message):
            inspection.convert(tmp_path / 'deep.npz', path)
        assert sorted(os.listdir(tmp_path)) == ['deep.npz']


@pytest.mark.parametrize('how', ['save_hdf5', 'serializer on an open file', 'convert'])
def test_an_entrys_checks_ask_libhdf5_for_no_path(tmp_path, monkeypatch, how):
    """A dataset's path from h5py (``group.name``) is a libhdf5 call of about 2 us: the
    checks of each entry asked for it three times more (a message made whether or not it was
    raised, the depth counted again as it was written), some 8 us an entry, about a tenth of
    a save of 10,000 small entries. Only the plan's path is made, once an entry."""
    model = {f'l{index}/w': numpy.arange(3.0) for index in range(20)}
    gpuserial.save(tmp_path / 'm.npz', model)
    paths = []
    original = hdf5._dataset_path

    def counted(group, key):
        paths.append(key)
        return original(group, key)

    monkeypatch.setattr(hdf5, '_dataset_path', counted)
    monkeypatch.setattr(hdf5, '_where', lambda *args: pytest.fail(f'a message made: {args}'))
    if how == 'save_hdf5':
        serializers.save_hdf5(tmp_path / 'm.h5', model)
        assert len(paths) == len(model)  # each entry's, for the plan
    elif how == 'convert':
        inspection.convert(tmp_path / 'm.npz', tmp_path / 'm.h5')
        assert paths == []
    else:
        with h5py.File(tmp_path / 'm.h5', 'w') as f:
            serializer = serializers.HDF5Serializer(f)
            for key, value in model.items():
                serializer(key, value)
        assert paths == []
    monkeypatch.undo()
    loaded = gpuserial.load(tmp_path / 'm.h5')
    assert sorted(loaded) == sorted(model)
