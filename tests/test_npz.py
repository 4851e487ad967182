"""NPZ specifics: the zip container (ZIP64, descriptors, deflate), numpy's reader, our checks."""

import ast
import dataclasses
import io
import multiprocessing
import os
import re
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
import zlib

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpuserial
from gpuserial import serializers
from gpuserial.engine import transfer
from gpuserial.errors import CorruptFileError, InvalidKeyError
from gpuserial.formats import _npy, _zipread, _zipstream, npz
from gpuserial.tools import inspection
from tests import crafting, standin
from tests.conftest import host, make_device

ARRAYS = {'a': numpy.arange(100, dtype=numpy.float32), 'b/c': numpy.ones((3, 4), numpy.int16),
          'd': numpy.float64(2.5), 'empty': numpy.zeros((0, 3))}


def _check_with_numpy(data: bytes, expected: dict) -> None:
    with numpy.load(io.BytesIO(data)) as npz:
        assert sorted(npz.files) == sorted(expected)
        for key, value in expected.items():
            numpy.testing.assert_array_equal(npz[key], value)
            assert npz[key].dtype == numpy.asarray(value).dtype


@pytest.mark.parametrize('compression', [True, False])
def test_members_are_what_numpy_reads(compression):
    out = io.BytesIO()
    serializers.save_npz(out, ARRAYS, compression=compression)
    _check_with_numpy(out.getvalue(), ARRAYS)
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None
        methods = {info.compress_type for info in archive.infolist()}
        assert methods == {zipfile.ZIP_DEFLATED if compression else zipfile.ZIP_STORED}
        assert [info.filename for info in archive.infolist()] == [k + '.npy' for k in ARRAYS]


@pytest.mark.parametrize('compression', [True, False])
def test_zip64_fields_when_sizes_pass_the_limit(monkeypatch, compression):
    monkeypatch.setattr(_zipstream, 'ZIP64_LIMIT', 200)  # members and offsets past 200 bytes
    out = io.BytesIO()
    serializers.save_npz(out, ARRAYS, compression=compression)
    data = out.getvalue()
    assert b'PK\x06\x06' in data and b'PK\x06\x07' in data  # ZIP64 end record and locator
    _check_with_numpy(data, ARRAYS)
    target = {key: numpy.zeros_like(value) for key, value in ARRAYS.items()}
    target['d'] = 0.0
    serializers.load_npz(io.BytesIO(data), target)
    numpy.testing.assert_array_equal(target['a'], ARRAYS['a'])


def _written(arrays: dict, compression: bool, seekable: bool) -> bytes:
    out = io.BytesIO() if seekable else crafting.Unseekable()
    serializers.save_npz(out, arrays, compression=compression)
    return out.getvalue() if seekable else bytes(out.data)


BOUNDARY_ARRAYS = {'a': numpy.arange(100, dtype=numpy.float32), 'b': numpy.zeros(7, numpy.uint8),
                   'c': numpy.float64(2.5)}


def _boundaries(compression: bool, seekable: bool) -> list[int]:
    """Every size and offset of the zip written with no ZIP64 at all (the members', and the
    directory's): where limits matter."""
    data = _written(BOUNDARY_ARRAYS, compression, seekable)
    members = crafting.check_zip_records(data)
    values = {value for m in members for value in (m['size'], m['compressed'], m['offset'])}
    _, (*_, directory_size, directory_offset, _) = crafting.end_record(data)
    return sorted(values - {0} | {directory_size, directory_offset})


@pytest.mark.parametrize('seekable', [True, False], ids=['seekable', 'stream'])
@pytest.mark.parametrize('compression', [True, False], ids=['deflated', 'stored'])
def test_zip64_exactly_at_the_boundaries(monkeypatch, compression, seekable):
    """With the ZIP64 limit lowered to each size and offset of the file (and one either side),
    every field at or past it goes into ZIP64, every record agrees, and every reader reads it."""
    for value in _boundaries(compression, seekable):
        for limit in (value - 1, value, value + 1):
            monkeypatch.setattr(_zipstream, 'ZIP64_LIMIT', limit)
            data = _written(BOUNDARY_ARRAYS, compression, seekable)
            crafting.check_zip_records(data, limit)
            _check_with_numpy(data, BOUNDARY_ARRAYS)
            target = {'a': numpy.zeros(100, numpy.float32), 'b': None, 'c': 0.0}
            serializers.load_npz(io.BytesIO(data), target)
            assert target['a'].tolist() == list(range(100)) and target['c'] == 2.5


@pytest.mark.parametrize('seekable', [True, False], ids=['seekable', 'stream'])
@pytest.mark.parametrize('compression', [True, False], ids=['deflated', 'stored'])
def test_every_local_header_agrees_with_the_directory(compression, seekable):
    members = crafting.check_zip_records(_written(ARRAYS, compression, seekable))
    assert [m['name'] for m in members] == [key + '.npy' for key in ARRAYS]


@pytest.mark.parametrize('compression', [True, False])
def test_unseekable_output_gets_data_descriptors_for_streamed_members(compression):
    """A member streamed in chunks cannot have its sizes written back: a data descriptor
    follows it. A small member is held whole, its sizes known before it is written."""
    arrays = dict(ARRAYS, big=numpy.arange(100000, dtype=numpy.float32))
    out = crafting.Unseekable()
    serializers.save_npz(out, arrays, compression=compression)
    members = crafting.check_zip_records(bytes(out.data))
    assert [bool(m['flags'] & 0x08) for m in members] == [key == 'big' for key in arrays]
    _check_with_numpy(bytes(out.data), arrays)


def test_compressed_files_are_smaller_and_plain_deflate():
    arrays = {'zeros': numpy.zeros(100000, numpy.float32)}
    compressed, stored = io.BytesIO(), io.BytesIO()
    serializers.save_npz(compressed, arrays)
    serializers.save_npz(stored, arrays, compression=False)
    assert len(compressed.getvalue()) * 50 < len(stored.getvalue())
    with zipfile.ZipFile(compressed) as archive:  # zipfile inflates it with zlib
        assert archive.read('zeros.npy')[-10:] == b'\0' * 10


def test_stored_none_is_chainers_pickle_and_loads_with_numpy():
    out = io.BytesIO()
    serializers.save_npz(out, {'n': None})
    with numpy.load(io.BytesIO(out.getvalue()), allow_pickle=True) as npz:
        assert npz['n'].dtype == object and npz['n'][()] is None
    with zipfile.ZipFile(out) as archive:
        assert b'numpy.core.multiarray' in archive.read('n.npy')


def test_numpy_load_result_is_accepted_by_the_deserializer(tmp_path):
    numpy.savez(tmp_path / 'n.npz', w=numpy.arange(5.0))
    target = numpy.zeros(5)
    with numpy.load(tmp_path / 'n.npz') as npz:
        serializers.NpzDeserializer(npz)('w', target)
    numpy.testing.assert_array_equal(target, numpy.arange(5.0))


@pytest.mark.parametrize('count', [1000, 20000], ids=['from-the-window', 'over-DIRECT'])
@pytest.mark.parametrize('compression', [True, False])
def test_a_flipped_data_byte_is_a_crc_error_naming_the_member(tmp_path, compression, count):
    """Small stored members are checked in the read-ahead window, larger ones (DIRECT bytes and
    more) as they are read straight into the array."""
    assert (count * 8 < _zipread.DIRECT) == (count == 1000)
    path = tmp_path / 'm.npz'
    values = numpy.arange(count, dtype=numpy.int64)
    serializers.save_npz(path, {'w': values}, compression=compression)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo('w.npy')
    position = info.header_offset + 30 + len('w.npy') + 20 + info.compress_size // 2
    data[position] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"m\.npz', key 'w': .*(CRC|deflate)"):
        serializers.load_npz(path, {'w': numpy.zeros(count, numpy.int64)})


@pytest.mark.slow
def test_an_array_over_4_gib(tmp_path):
    size = (1 << 32) + 3
    array = numpy.zeros(size, numpy.uint8)
    array[[0, 1 << 31, size - 1]] = [1, 2, 3]
    path = tmp_path / 'big.npz'
    serializers.save_npz(path, {'big': array, 'after': numpy.arange(3)}, compression=False,
                         durable=False)
    del array
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo('big.npy').file_size == size + 128
        assert archive.getinfo('after.npy').header_offset > 1 << 32
    target = {'big': numpy.zeros(size, numpy.uint8), 'after': numpy.zeros(3, int)}
    serializers.load_npz(path, target)
    assert target['big'][[0, 1 << 31, size - 1]].tolist() == [1, 2, 3]
    assert int(target['big'].sum(dtype=numpy.uint64)) == 6
    numpy.testing.assert_array_equal(target['after'], numpy.arange(3))


MiB = 1 << 20


THREADED = _zipstream.THREAD_MIN  # stored chunks this large are checksummed on a thread


def _large_arrays(device) -> dict:
    """Arrays that cross several chunks of THREADED bytes, one ending mid-chunk."""
    rng = numpy.random.default_rng(0)
    return {'w': device.send(rng.standard_normal((3, THREADED // 4 + 7)).astype(numpy.float32)),
            'b': device.send(rng.integers(0, 255, 2 * THREADED + 1, dtype=numpy.uint8))}


@pytest.mark.parametrize('seekable', [True, False])
def test_large_stored_chunks_are_checksummed_on_another_thread(monkeypatch, device, seekable):
    checksummed_on = set()

    def recording_crc32(data, value=0):
        if len(data) >= THREADED:
            checksummed_on.add(threading.current_thread().name.split('_')[0])
        return zlib.crc32(data, value)

    monkeypatch.setattr(_zipstream, 'crc32', recording_crc32)
    arrays = _large_arrays(device)
    out = io.BytesIO() if seekable else crafting.Unseekable()
    with transfer.configure(chunk_bytes=THREADED):
        serializers.save_npz(out, arrays, compression=False)
    assert checksummed_on == {'gpuserial-crc'}
    data = out.getvalue() if seekable else bytes(out.data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None  # zipfile's own CRC check of every member
    _check_with_numpy(data, {key: host(value) for key, value in arrays.items()})


def _slow_crc32(monkeypatch, finished: threading.Event | None = None) -> None:
    """Checksums read their data only after a pause, as a busy core would."""
    def slow_crc32(data, value=0):
        time.sleep(0.05)
        result = zlib.crc32(data, value)
        if finished is not None:
            finished.set()
        return result

    monkeypatch.setattr(_zipstream, 'crc32', slow_crc32)


def test_a_chunk_is_not_reused_before_its_checksum_is_done(monkeypatch):
    _slow_crc32(monkeypatch)
    buffer = bytearray(THREADED)

    def refilled_chunks():  # one buffer, refilled on every resume, as the staging engine does
        for value in range(4):
            buffer[:] = bytes([value]) * THREADED
            yield buffer

    out = io.BytesIO()
    with _zipstream.ZipWriter(out, compression=False) as archive:
        archive.write_member('m', refilled_chunks())
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None
        assert archive.read('m') == b''.join(bytes([v]) * THREADED for v in range(4))


def test_a_failed_write_waits_for_the_checksum_before_raising(monkeypatch):
    finished = threading.Event()
    _slow_crc32(monkeypatch, finished)

    class FullDisk(io.BytesIO):
        def write(self, data):
            if len(data) >= MiB:
                raise OSError(28, 'No space left on device')
            return super().write(data)

    with pytest.raises(OSError, match='No space left'):
        serializers.save_npz(FullDisk(), {'w': numpy.ones(THREADED // 4, numpy.float32)},
                             compression=False)
    assert finished.is_set()  # the chunk's memory was still the writer's when the error left


class _Trickle(io.RawIOBase):
    """A raw output that takes at most 100 KiB per write, like a pipe or a socket."""

    def __init__(self, seekable: bool):
        self.file = io.BytesIO()
        self._seekable = seekable

    def writable(self):
        return True

    def seekable(self):
        return self._seekable

    def tell(self):
        return self.file.tell()

    def seek(self, offset, whence=0):
        return self.file.seek(offset, whence)

    def write(self, data):
        return self.file.write(bytes(data[:100 << 10]))


class _Uncounting:
    """A file-like object whose write returns None, as many simple wrappers do."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data

    def flush(self):
        pass


@pytest.mark.parametrize('seekable', [True, False])
def test_short_writes_are_completed(seekable):
    arrays = {'w': numpy.arange(THREADED // 4, dtype=numpy.float32), 'b': numpy.arange(10)}
    out = _Trickle(seekable)
    serializers.save_npz(out, arrays, compression=False)
    _check_with_numpy(out.file.getvalue(), arrays)


def test_a_write_that_returns_none_took_everything_unless_raw():
    arrays = {'w': numpy.arange(THREADED // 4, dtype=numpy.float32)}
    out = _Uncounting()
    serializers.save_npz(out, arrays, compression=False)
    _check_with_numpy(bytes(out.data), arrays)

    class WouldBlock(_Trickle):
        def write(self, data):
            return None

    with pytest.raises(BlockingIOError):
        serializers.save_npz(WouldBlock(False), arrays, compression=False)


def test_the_checksum_thread_ends_with_the_save():
    serializers.save_npz(io.BytesIO(), {'w': numpy.ones(THREADED // 4, numpy.float32)},
                         compression=False)
    assert not [t for t in threading.enumerate() if t.name.startswith('gpuserial-crc')]


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs fork')
@pytest.mark.filterwarnings('ignore:.*fork.*:DeprecationWarning')  # Python 3.12+ on threads
def test_a_forked_child_saves_after_its_parent_did(tmp_path):
    arrays = {'w': numpy.arange(THREADED // 4, dtype=numpy.float32)}
    serializers.save_npz(tmp_path / 'parent.npz', arrays, compression=False)  # starts threads
    child = multiprocessing.get_context('fork').Process(
        target=serializers.save_npz, args=(tmp_path / 'child.npz', arrays, False))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail('the forked child hung in save_npz')
    assert child.exitcode == 0
    with numpy.load(tmp_path / 'child.npz') as npz:
        numpy.testing.assert_array_equal(npz['w'], arrays['w'])


def test_a_save_from_an_atexit_handler_checksums_without_threads(tmp_path):
    script = ('import atexit, sys, numpy\n'
              'from gpuserial import serializers\n'
              'arrays = {"w": numpy.arange(1 << 20, dtype=numpy.float32)}\n'
              'serializers.save_npz(sys.argv[1] + ".before", arrays, compression=False)\n'
              'atexit.register(serializers.save_npz, sys.argv[1], arrays, False)\n')
    path = tmp_path / 'at_exit.npz'
    done = subprocess.run([sys.executable, '-c', script, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and 'Traceback' not in done.stderr, done.stderr
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    with numpy.load(path) as npz:
        numpy.testing.assert_array_equal(npz['w'], numpy.arange(1 << 20, dtype=numpy.float32))


def test_a_save_from_a_signal_handler_inside_a_submit_checksums_inline(monkeypatch):
    """A handler that saves while the interrupted save is inside ``submit`` (whose locks are
    not reentrant) must not submit again: its chunks are checksummed inline."""
    arrays = {'w': numpy.arange(THREADED // 4, dtype=numpy.float32)}
    nested = io.BytesIO()
    submits = []

    class Interrupted(_zipstream.ThreadPoolExecutor):
        def submit(self, *args):
            submits.append(len(submits))
            if len(submits) == 1:  # the "signal" arrives during the first submit
                serializers.save_npz(nested, arrays, compression=False)
            return super().submit(*args)

    monkeypatch.setattr(_zipstream, 'ThreadPoolExecutor', Interrupted)
    outer = io.BytesIO()
    serializers.save_npz(outer, arrays, compression=False)
    assert submits == [0]  # only the outer save used the thread
    _check_with_numpy(nested.getvalue(), arrays)
    _check_with_numpy(outer.getvalue(), arrays)


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(['<f4', '>f8', '|u1', '<i8', '|b1', '<c16', '<U5', '|S3', '|V7',
                              '<m8[s]', '>M8[D]', '<f2']),
       shape=st.lists(st.integers(0, 10 ** 12), max_size=6).map(tuple),
       fortran=st.booleans(), version=st.sampled_from([(1, 0), (2, 0), (3, 0)]))
def test_the_fast_header_reader_agrees_with_pythons_literal_parser(dtype, shape, fortran,
                                                                   version):
    text = (f"{{'descr': {dtype!r}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
            .encode().ljust(118) + b'\n')
    member = _npy.MAGIC + bytes(version) + struct.pack('<H' if version[0] == 1 else '<I',
                                                       len(text)) + text
    fast = _npy._canonical_fields(text)
    assert fast == ast.literal_eval(text.decode()) or ('[' in dtype and fast is None)
    try:
        header = _npy.decode_header(member)
    except _npy.HeaderError as error:
        assert 'overflows' in str(error)
    else:
        assert (header.dtype, header.shape, header.fortran_order) == (
            numpy.dtype(dtype), shape, fortran)


@pytest.mark.parametrize('text', [b"{'descr': '<f4', 'fortran_order': False, 'shape': (3), }",
                                  b"{'descr': '<f4', 'fortran_order': False, 'shape': (03,), }",
                                  b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,),}",
                                  b"{'descr': '<f4', 'shape': (3,), 'fortran_order': False, }"])
def test_other_header_texts_go_to_the_literal_parser(text):
    assert _npy._canonical_fields(text) is None


def test_decoded_headers_are_shared_and_cannot_change():
    header = _npy.encode_header(numpy.dtype('<f4'), (3,))
    decoded = _npy.decode_header(header)
    assert _npy.decode_header(bytes(header)) is decoded  # one per distinct header
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.shape = (4,)


@pytest.mark.parametrize('compression', [False, True], ids=['stored', 'deflated'])
def test_members_either_side_of_the_read_thresholds_load_exactly(tmp_path, compression):
    """Through the window, straight into the array, and streamed: each path, at its edges."""
    sizes = sorted({n for edge in (_zipread.DIRECT, npz.SMALL_BYTES)
                    for n in (edge - 200, edge - 128, edge, edge + 8)})
    stored = {f'a{n}': numpy.random.default_rng(n).integers(0, 255, n, numpy.uint8)
              for n in sizes}
    serializers.save_npz(tmp_path / 'm.npz', stored, compression=compression)
    target = {key: numpy.zeros_like(value) for key, value in stored.items()}
    serializers.load_npz(tmp_path / 'm.npz', target)
    for key, value in stored.items():
        assert (target[key] == value).all(), key


# ---------------------------------------------------------------------------------------------
# Found alive by mutation testing: the files an archive owns, errors of whole-member reads,
# readers of other sources, and how a device array reaches the file


def test_an_archive_closes_the_file_it_opened_and_leaves_the_callers_open(tmp_path):
    path = tmp_path / 'm.npz'
    serializers.save_npz(path, {'x': numpy.arange(3)})
    with npz.open_npz(path) as archive:
        raw = archive.raw
        assert not raw.closed
    assert raw.closed
    with open(path, 'rb') as mine:
        with npz.open_npz(mine):
            pass
        assert not mine.closed


@pytest.mark.parametrize('compression', [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_corrupt_small_member_is_refused_naming_the_file_and_key(tmp_path, compression):
    """Small members are read whole, in one call: their checks still name the file and key."""
    data = crafting.npz_of({'x': crafting.npy_of(numpy.arange(500.0))}, compression)
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo('x.npy')
    start = _zipread.data_start_of(io.BytesIO(data), info)
    broken = bytearray(data)
    broken[start + info.compress_size - 20] ^= 0xFF  # within the array's data
    path = tmp_path / 'bad.npz'
    path.write_bytes(bytes(broken))
    target = {'x': numpy.zeros(500)}
    with pytest.raises(CorruptFileError,
                       match=rf"{str(path)!r}, key 'x': (CRC|the deflate)") as raised:
        serializers.load_npz(path, target)
    assert raised.value.partly_filled == 'x'
    if compression == zipfile.ZIP_STORED:  # checked before it is copied: the array as it was
        assert not target['x'].any()


def test_a_mapping_holding_objects_is_refused():
    from gpuserial.errors import UnsafeFileError
    deserializer = npz.NpzDeserializer({'x': numpy.array([object(), 1], dtype=object)})
    with pytest.raises(UnsafeFileError, match="'x'.*object arrays"):
        deserializer.load({'x': numpy.zeros(2)})


def test_a_deserializer_of_something_else_is_refused():
    with pytest.raises(TypeError, match='NpzDeserializer needs an NPZ file.*got int'):
        npz.NpzDeserializer(42)


def test_a_zipfile_handed_over_is_named_by_its_path(tmp_path):
    path = tmp_path / 'm.npz'
    serializers.save_npz(path, {'x': numpy.arange(3)})
    with zipfile.ZipFile(path) as archive:
        deserializer = npz.NpzDeserializer(archive)
        with pytest.raises(Exception, match=str(path)):
            deserializer.load({'y': numpy.zeros(3)})


@pytest.mark.parametrize('compression', [False, True], ids=['stored', 'deflated'])
def test_a_zipfile_handed_over_loads_keys_longer_than_the_header_guess(tmp_path, compression):
    """A member's local header is read with a guess of its name's length: a longer name is
    read again, whole (zipfile's members carry no name bytes to take the quick way)."""
    path = tmp_path / 'm.npz'
    model = {'x' * 600: numpy.arange(3.0), 'y': numpy.arange(2)}
    serializers.save_npz(path, model, compression=compression)
    target = {key: numpy.zeros_like(value) for key, value in model.items()}
    with zipfile.ZipFile(path) as archive:
        npz.NpzDeserializer(archive).load(target)
    assert all(numpy.array_equal(target[key], value) for key, value in model.items())


def test_a_directory_is_not_an_npz_file(tmp_path):
    with pytest.raises(IsADirectoryError, match='is a directory, not an NPZ file'):
        npz.open_npz(tmp_path)


@pytest.mark.parametrize('name', ['missing.npz', '~/missing.npz'])
def test_a_missing_file_is_a_file_not_found_error_naming_it(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    hint = f' (~ is not expanded: pass os.path.expanduser({name!r}))' if name[0] == '~' else ''
    with pytest.raises(FileNotFoundError, match=re.escape(f'{name!r}: no such file{hint}') + '$'):
        npz.open_npz(name)


@pytest.mark.parametrize('error', [RuntimeError('a bug of the file object'),
                                   PermissionError(13, 'Permission denied')])
def test_errors_of_a_file_object_that_are_not_about_the_zip_raise_as_they_are(error):
    class Failing(io.BytesIO):
        def seek(self, *args):
            raise error

    with pytest.raises(type(error)) as raised:
        serializers.load_npz(Failing(b'PK'), {'x': numpy.zeros(3)})
    assert raised.value is error


def test_a_device_array_reaches_the_file_through_the_engine_in_chunks(tmp_path, small_chunks):
    device = make_device('standin:0')
    array = device.send(numpy.arange(100.0))  # 800 bytes: 13 chunks of 64
    standin.BACKEND.reset()
    serializers.save_npz(tmp_path / 'm.npz', {'x': array})
    copies = [entry for entry in standin.BACKEND.log if entry[0] == 'd2h']
    assert len(copies) == 13 and all(nbytes <= small_chunks for *_, nbytes in copies)
    numpy.testing.assert_array_equal(numpy.load(tmp_path / 'm.npz')['x'], numpy.arange(100.0))


@pytest.mark.parametrize('corrupt', [False, True])
def test_small_device_arrays_whose_deflated_members_outgrow_them_load_whole_and_checked(
        tmp_path, corrupt):
    """Random bytes do not deflate: a small device array's member is then stored in more bytes
    than the array's (streamed from the file, not inflated from the window, as the others)."""
    device = make_device('standin:0')
    values = numpy.random.default_rng(3).integers(0, 256, (2, 65_408), dtype=numpy.uint8)
    path = tmp_path / 'm.npz'
    serializers.save_npz(path, {'a': values[0], 'b': values[1]})
    (info, _) = _zipread.read_directory(io.BytesIO(path.read_bytes())).members
    assert info.compress_size >= _zipread.DIRECT > info.file_size - 128
    if corrupt:
        path.write_bytes(crafting.flip(path.read_bytes(), crafting.data_offset(
            path.read_bytes(), 'a.npy') + info.compress_size - 100))
    target = {key: device.send(numpy.zeros(65_408, numpy.uint8)) for key in 'ab'}
    if corrupt:
        with pytest.raises(CorruptFileError, match="key 'a': (CRC|corrupt deflate)"):
            serializers.load_npz(path, target)
        return
    serializers.load_npz(path, target)
    assert host(target['a']).tobytes() + host(target['b']).tobytes() == values.tobytes()


@pytest.mark.parametrize('prefix', [b'\x93NUMPY\x01\x00', b'\x93NUMPY\x01\x00\x05',
                                    b'\x93NUMPY\x02\x00\x05\x00\x00'])
def test_a_header_prefix_cut_short_is_not_a_npy_member(prefix):
    with pytest.raises(_npy.HeaderError):
        _npy.header_length(prefix)


def test_a_deflated_header_longer_than_its_member_is_refused(tmp_path):
    npy = bytearray(crafting.npy_of(numpy.arange(4.0)))
    struct.pack_into('<H', npy, 8, 4000)  # the header says 4000 bytes; the member has ~160
    path = tmp_path / 'm.npz'
    path.write_bytes(crafting.npz_of({'x': bytes(npy)}, zipfile.ZIP_DEFLATED))
    with pytest.raises(CorruptFileError, match=r"key 'x'.*a header of 4010 bytes in a member"):
        serializers.load_npz(path, {'x': numpy.zeros(4)})


def test_the_bytes_of_a_member_do_not_depend_on_the_arrays_layout(tmp_path, monkeypatch):
    """A strided array is written as its contiguous copy is, up to and just past the size of a
    small member (written whole) and beyond."""
    moment = time.localtime()
    monkeypatch.setattr(_zipstream.time, 'localtime', lambda *args: moment)
    for elements in (npz.SMALL_MEMBER_BYTES // 8, npz.SMALL_MEMBER_BYTES // 8 + 1, 20_000):
        strided = numpy.arange(2 * elements, dtype=numpy.float64)[::2]
        for compression in (False, True):
            serializers.save_npz(tmp_path / 'a.npz', {'x': strided}, compression)
            serializers.save_npz(tmp_path / 'b.npz', {'x': strided.copy()}, compression)
            assert (tmp_path / 'a.npz').read_bytes() == (tmp_path / 'b.npz').read_bytes()


def test_a_closed_npz_file_is_refused_by_name(tmp_path):
    path = tmp_path / 'a.npz'
    numpy.savez(path, w=numpy.ones(3))
    archive = zipfile.ZipFile(path)
    archive.close()
    with pytest.raises(ValueError, match=r"a\.npz'?: the NPZ file is closed"):
        serializers.NpzDeserializer(archive)
    loaded = numpy.load(path)
    loaded.close()
    with pytest.raises(ValueError, match=r'numpy\.load\(\) result\) is closed'):
        serializers.NpzDeserializer(loaded)


def _npz_with_every_kind_of_member() -> bytes:
    """Members as numpy writes them (numbers of every layout, text), a stored None, a version
    2.0 header, and a member whose local header carries a ZIP64 extra field."""
    arrays = {'f': numpy.arange(6.0).reshape(2, 3), 'scalar': numpy.float32(2.5),
              'fortran': numpy.asfortranarray(numpy.arange(12, dtype=numpy.int16).reshape(3, 4)),
              'empty': numpy.zeros((0, 3)), 'big-endian': numpy.arange(4, dtype='>u4'),
              'text': numpy.array(['ab', 'c'])}
    members = {key + '.npy': crafting.npy_of(numpy.asarray(value)) for key, value in arrays.items()}
    members['none.npy'] = _npy.none_member()
    members['v2.npy'] = crafting.npy_member(crafting.header_text('<i4', (2,)) + ' ' * 50 + '\n',
                                            numpy.arange(2, dtype='<i4').tobytes(), (2, 0))
    out = io.BytesIO()
    with zipfile.ZipFile(out, 'w') as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        with archive.open('extra.npy', 'w', force_zip64=True) as member:
            member.write(crafting.npy_of(numpy.arange(3.0)))
    return out.getvalue()


def test_members_as_numpy_writes_them_take_the_short_path_and_parse_as_the_full_one(monkeypatch):
    data = _npz_with_every_kind_of_member()
    general = []  # keys parsed by the general path (it checks the member first)
    check_member = _zipread.check_member
    monkeypatch.setattr(_zipread, 'check_member', lambda info: (general.append(info.filename),
                                                                check_member(info))[1])
    with npz.open_npz(io.BytesIO(data)) as archive:
        reader = npz._ZipReader(archive, 'mixed.npz')
        short = {key: reader.entry(key) for key in reader.keys()}
    assert sorted(general) == ['none.npy', 'v2.npy']
    monkeypatch.setattr(_zipread, 'regular_stored', lambda *args: None)
    with npz.open_npz(io.BytesIO(data)) as archive:
        reader = npz._ZipReader(archive, 'mixed.npz')
        full = {key: reader.entry(key) for key in reader.keys()}
    assert short == full
    assert len(general) == 2 + len(full)
    loaded = gpuserial.load(io.BytesIO(data))
    with numpy.load(io.BytesIO(data), allow_pickle=True) as expected:
        for key in expected.files:
            if key == 'none':
                assert loaded[key] is None
            else:
                assert loaded[key].dtype == expected[key].dtype
                numpy.testing.assert_array_equal(loaded[key], expected[key])


def test_a_member_whose_local_header_would_lie_past_the_end_is_truncated(tmp_path):
    data = crafting.npz_of({'x': crafting.npy_of(numpy.arange(3.0))})
    for field, value in (('compress_size', 0), ('file_size', 0), ('header_offset', len(data) - 10)):
        data = crafting.patch_central(data, 'x.npy', field, value)
    path = tmp_path / 'lying.npz'
    path.write_bytes(data)
    with pytest.raises(CorruptFileError, match=f"'{path}', key 'x': truncated: 10 of 30 header "
                                               f"bytes"):
        serializers.load_npz(path, {'x': numpy.zeros(3)})


@pytest.mark.parametrize('shape', [(3,), (1,) * (_npy.MAX_NDIM - 1) + (100000,)])
def test_a_version_1_header_whole_in_the_window_is_decoded_there(shape):
    header = _npy.encode_header(numpy.dtype('<f4'), shape)
    assert len(header) == 128 if shape == (3,) else len(header) >= 192  # 320 in NumPy 2
    for data, at in ((header, 0), (b'xyz' + header + b'payload', 3)):
        decoded = _npy.regular_header(data, at)
        assert decoded == _npy.decode_header(header)
        assert decoded.length == len(header)
    assert _npy.regular_header(header[:-1], 0) is None  # not whole there
    assert _npy.regular_header(header[:_npy.V1_FIXED - 1], 0) is None
    with pytest.raises(_npy.HeaderError):  # whole, but it claims no text at all
        _npy.regular_header(_npy.V1_PREFIX + b'\x00\x00', 0)
    version_2 = crafting.npy_member(crafting.header_text('<f4', shape), version=(2, 0))
    assert _npy.regular_header(version_2, 0) is None


def test_a_dtypes_metadata_is_not_stored_nor_warned_about():
    h5py = pytest.importorskip('h5py')
    _npy.encode_header.cache_clear()  # dtypes equal but for their metadata share an entry
    text = h5py.string_dtype('ascii', 2)
    padded = numpy.dtype({'names': ['a', 'b'], 'formats': ['<u2', ('<f4', (2,))],
                          'offsets': [0, 4], 'itemsize': 16})
    marked = numpy.dtype({'names': ['a', 'b'], 'offsets': [0, 4], 'itemsize': 16,
                          'formats': [numpy.dtype('<u2', metadata={'m': 1}),
                                      (numpy.dtype('<f4', metadata={'m': 2}), (2,))]},
                         metadata={'m': 3})
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # numpy warns of metadata it cannot store
        assert _npy.decode_header(_npy.encode_header(text, (3,))).dtype == numpy.dtype('S2')
        decoded = _npy.decode_header(_npy.encode_header(marked, (3,))).dtype
        assert decoded == padded and decoded.metadata is None
        assert decoded.fields['b'][0].subdtype[0].metadata is None
        assert _npy.decode_header(_npy.encode_header(padded, (3,))).dtype == padded
        titled = numpy.dtype([(('the count', 'n'), numpy.dtype('<i4', metadata={'m': 1}))])
        decoded = _npy.decode_header(_npy.encode_header(titled, (3,))).dtype
        assert decoded == titled and decoded.fields['n'][2] == 'the count'


def test_structured_dtypes_keep_their_titles_and_padding():
    titled = numpy.dtype([(('the count', 'n'), '<i4'), ('x', '<f8')])
    padded = numpy.dtype({'names': ['a', 'b'], 'formats': ['i1', '<i4'], 'offsets': [0, 4],
                          'itemsize': 12})
    for dtype in (titled, padded):
        values = numpy.zeros(3, dtype)
        values[dtype.names[0]] = [1, 2, 3]
        out = io.BytesIO()
        serializers.save_npz(out, {'v': values}, compression=False)
        assert numpy.load(io.BytesIO(out.getvalue()))['v'].dtype == dtype
        target = {'v': numpy.zeros(3, dtype)}
        serializers.load_npz(io.BytesIO(out.getvalue()), target)
        assert target['v'].tobytes() == values.tobytes()


@pytest.mark.parametrize('key', ['k' * (0xFFFF - 3), 'é' * 32766, 'a/' + 'k' * 65530,
                                 '\U0001F600' * 16383],  # 4 bytes a character: 65536
                         ids=['ascii', 'two-byte', 'nested', 'four-byte'])
def test_a_key_too_long_for_a_zip_name_is_refused_naming_the_file_and_key(tmp_path, key):
    """A zip member's name has at most 65535 bytes: beyond, the save was a bare struct.error
    halfway through the file; now it is refused before anything is written, and so is a
    conversion of an HDF5 file holding such a key."""
    path = tmp_path / 'long.npz'
    size = len((key + '.npy').encode())
    message = re.escape(f"{str(path)!r}, key {key[:40]!r}... ({len(key)} characters): too long "
                        f"for NPZ: its member name would have {size} bytes, and a zip takes at "
                        f"most 65535")
    for save in (serializers.save_npz, gpuserial.save_async, gpuserial.save):
        with pytest.raises(InvalidKeyError, match=message):
            save(path, {key: numpy.ones(2)})
    serializers.save_hdf5(tmp_path / 'long.h5', {key: numpy.ones(2)})
    with pytest.raises(InvalidKeyError, match=message):
        inspection.convert(tmp_path / 'long.h5', path)
    assert sorted(os.listdir(tmp_path)) == ['long.h5']


def test_a_key_as_long_as_a_zip_name_may_be_saves_and_loads(tmp_path):
    key = 'é' * 32765 + 'k'  # 65535 bytes with '.npy'
    serializers.save_npz(tmp_path / 'long.npz', {key: numpy.arange(2)})
    with numpy.load(tmp_path / 'long.npz') as npz:
        assert npz.files == [key]
    assert list(gpuserial.load(tmp_path / 'long.npz')) == [key]
