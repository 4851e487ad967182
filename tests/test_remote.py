"""Object storage through fsspec, against a real S3 API on loopback (moto's server) and
fsspec's memory filesystem: round trips bit for bit, ranged reads of only the keys asked for,
uploads committed last (a failed save leaves no object and the previous one intact), no copy
of data, and fsspec imported only for URLs."""

from __future__ import annotations

import concurrent.futures
import errno
import importlib.util
import io
import json
import subprocess
import sys
import threading
import time
import zipfile

import fsspec
import fsspec.core
import numpy
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

import gpuserial
from gpuserial import serializers
from gpuserial.engine import asyncsave
from gpuserial.formats import _zipread, npz
from gpuserial.storage import remote

MiB = 1 << 20


def _model(seed: int = 0) -> dict:
    rng = numpy.random.default_rng(seed)
    return {
        'l1/W': rng.standard_normal((300, 200)).astype(numpy.float32),
        'l1/b': numpy.frombuffer(rng.bytes(64 * 4), numpy.float32).copy(),  # NaN bits too
        'l2/W': rng.standard_normal((3, 5, 7)).astype(numpy.float16),
        'step': numpy.array(12345678901, numpy.int64),
        'mask': rng.random(33) > 0.5,
        'empty': numpy.zeros((0, 4), numpy.float64),
    }


def _assert_bits(loaded: dict, expected: dict) -> None:
    assert sorted(loaded) == sorted(expected)  # HDF5 lists its keys sorted
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert loaded[key].tobytes() == value.tobytes(), key


CASES = [('x.npz', False), ('x.npz', True), ('x.h5', 0), ('x.h5', 4)]


@pytest.mark.parametrize('name, compression', CASES,
                         ids=['npz-stored', 'npz-deflate', 'hdf5', 'hdf5-gzip'])
def test_round_trip_to_s3_is_bit_for_bit(bucket, name, compression):
    model = _model()
    url = bucket.url(f'run/{name}')
    gpuserial.save(url, model, compression=compression, storage_options=bucket.options)
    _assert_bits(gpuserial.load(url, storage_options=bucket.options), model)
    assert bucket.keys() == [f'run/{name}']  # no temporary or spool object left


@pytest.mark.parametrize('name, compression', CASES,
                         ids=['npz-stored', 'npz-deflate', 'hdf5', 'hdf5-gzip'])
def test_round_trip_to_memory_is_bit_for_bit(memory, name, compression):
    model = _model(1)
    gpuserial.save(f'memory://ckpt/{name}', model, compression=compression)
    _assert_bits(gpuserial.load(f'memory://ckpt/{name}'), model)
    assert sorted(memory.store) == [f'/ckpt/{name}']


def test_chainer_calls_and_load_into_take_urls(bucket):
    model = _model(2)
    for url in (bucket.url('a.npz'), bucket.url('a.h5')):
        save, load = ((gpuserial.save_npz, gpuserial.load_npz) if url.endswith('.npz')
                      else (gpuserial.save_hdf5, gpuserial.load_hdf5))
        save(url, model, storage_options=bucket.options)
        target = {key: numpy.zeros_like(value) for key, value in model.items()}
        load(url, target, storage_options=bucket.options)
        _assert_bits(target, model)
        target = {key: numpy.zeros_like(value) for key, value in model.items()}
        report = gpuserial.load_into(url, target, storage_options=bucket.options)
        assert report.missing_keys == [] and report.unexpected_keys == []
        _assert_bits(target, model)


@pytest.mark.parametrize('name', ['x.npz', 'x.h5'])
def test_open_and_get_slice_over_s3(bucket, name):
    model = _model(3)
    url = bucket.url(name)
    gpuserial.save(url, model, storage_options=bucket.options)
    with gpuserial.open(url, storage_options=bucket.options) as f:
        assert sorted(f.keys()) == sorted(model)
        assert f.get_slice('l1/W')[10:20, 5:7].tobytes() == model['l1/W'][10:20, 5:7].tobytes()
        assert f.get('l2/W').tobytes() == model['l2/W'].tobytes()
        assert f.metadata('l1/W').shape == (300, 200)


def test_an_object_replaced_while_open_fails_the_read_rather_than_mixing(bucket, monkeypatch):
    monkeypatch.setattr(remote, 'FETCH_PIECE', MiB)
    url = bucket.url('m.npz')
    size = 3 * MiB  # data fetched ahead in pieces
    gpuserial.save(url, {'a': numpy.zeros(size // 4, numpy.float32)},
                   storage_options=bucket.options)
    with gpuserial.open(url, storage_options=bucket.options) as f:
        assert f.metadata('a').nbytes == size  # its headers read: what is left is data
        gpuserial.save(url, {'a': numpy.ones(size // 4, numpy.float32)},
                       storage_options=bucket.options)
        with pytest.raises(gpuserial.GpuserialError,
                           match=r"m\.npz', key 'a': .*Etag .* no longer exists"):
            f.get_slice('a')[:]  # a slice checks no CRC: the ETag alone keeps it whole


def test_a_subset_load_reads_only_its_byte_ranges(bucket):
    model = {f'layer{i}': numpy.full(MiB // 4, i, numpy.float32) for i in range(8)}
    url = bucket.url('big.npz')
    gpuserial.save(url, model, storage_options=bucket.options)
    size = bucket.fs.size(bucket.url('big.npz'))
    bucket.calls.clear()
    loaded = gpuserial.load(url, keys=['layer5'], storage_options=bucket.options)
    assert loaded['layer5'].tobytes() == model['layer5'].tobytes()
    ranges = bucket.ranges()
    fetched = sum(last - first + 1 for first, last in ranges)
    # the member's bytes, the zip directory, and a read-ahead window for its headers at most
    assert MiB <= fetched <= MiB + 512 * 1024, ranges
    assert fetched < size / 6
    with gpuserial.open(url, storage_options=bucket.options) as f:
        bucket.calls.clear()
        assert f.get_slice('layer2')[:256].tolist() == [2.0] * 256
        assert sum(last - first + 1 for first, last in bucket.ranges()) < 300 * 1024


@pytest.mark.parametrize('compression', [False, True], ids=['stored', 'deflated'])
def test_a_load_into_an_object_asking_for_one_member_reads_little_else(bucket, compression):
    """Every member's headers are read ahead (4 KiB each, a deflated one's first deflated
    bytes with them), whether asked for or not; the data of members not asked for, never."""
    rng = numpy.random.default_rng(0)
    model = {f'layer{i}': rng.integers(0, 256, MiB, dtype=numpy.uint8) for i in range(10)}
    url = bucket.url('big.npz')
    gpuserial.save(url, model, compression=compression, storage_options=bucket.options)
    bucket.calls.clear()
    target = {'layer5': numpy.zeros(MiB, numpy.uint8)}
    gpuserial.load_npz(url, target, storage_options=bucket.options)
    assert target['layer5'].tobytes() == model['layer5'].tobytes()
    ranges = bucket.ranges()
    fetched = sum(last - first + 1 for first, last in ranges)
    headers = len(model) * npz.REMOTE_WINDOW
    # the member, the zip directory, read-ahead windows (256 KiB) before and after its data
    assert MiB <= fetched <= MiB + 3 * 256 * 1024 + headers, ranges
    assert len(ranges) <= 6 + len(model), ranges


def test_lazy_access_to_a_large_deflated_member_fetches_it_in_pieces(bucket, monkeypatch):
    monkeypatch.setattr(remote, 'FETCH_PIECE', MiB)
    array = numpy.random.default_rng(0).integers(0, 256, 3 * MiB, dtype=numpy.uint8)
    url = bucket.url('deflated.npz')
    gpuserial.save(url, {'a': array}, compression=True, storage_options=bucket.options)
    with gpuserial.open(url, storage_options=bucket.options) as f:
        bucket.calls.clear()
        assert f.get('a').tobytes() == array.tobytes()
        ranges = bucket.ranges()
    assert len(ranges) <= 3 + 4, ranges  # its pieces, its headers, a window after it


def test_lazy_access_to_many_small_members_reads_a_window_of_them_at_a_time(bucket):
    model = {f'm{i:03d}': numpy.full(1024, i, numpy.float32) for i in range(200)}  # 4 KiB each
    url = bucket.url('small.npz')
    gpuserial.save(url, model, storage_options=bucket.options)
    with gpuserial.open(url, storage_options=bucket.options) as f:
        bucket.calls.clear()
        assert all(f.metadata(key).shape == (1024,) for key in f.keys())
        assert len(bucket.ranges()) <= 6  # 256 KiB windows: some 60 members each
        assert f.get('m123').tolist() == [123.0] * 1024


def test_a_large_member_is_read_in_bounded_pieces(bucket, monkeypatch):
    monkeypatch.setattr(remote, 'FETCH_PIECE', MiB)
    array = numpy.arange(3 * MiB // 8 + 5, dtype=numpy.float64)
    url = bucket.url('piece.npz')
    gpuserial.save(url, {'a': array}, storage_options=bucket.options)
    bucket.calls.clear()
    assert gpuserial.load(url, storage_options=bucket.options)['a'].tobytes() == array.tobytes()
    ranges = bucket.ranges()
    assert max(last - first + 1 for first, last in ranges) <= MiB
    # fetched ahead within the member, never past it: 4 pieces of data; and the first bytes,
    # the end of the file, the member's headers and the window after its data
    assert len(ranges) <= 4 + 6, ranges


@pytest.mark.parametrize('sizes', [[4 * MiB], [MiB // 2 + 8] * 7 + [3000]])
def test_a_load_fetches_its_members_ahead_several_gets_at_once(memory, monkeypatch, sizes):
    """First each member's headers (a window's bytes at its local header; a small member's
    whole bytes too), then the data of the others: pieces across the members, each byte
    once, several GETs in flight."""
    piece = 512 * 1024  # more than the zip reader's window
    monkeypatch.setattr(remote, 'FETCH_PIECE', piece)
    model = {f'm{index}': numpy.full(size // 8, index, numpy.float64)
             for index, size in enumerate(sizes)}
    gpuserial.save('memory://a/big.npz', model)
    with zipfile.ZipFile(io.BytesIO(memory.cat_file('/a/big.npz'))) as archive:
        members = sorted((info.header_offset, info.compress_size) for info in archive.infolist())
        directory = archive.start_dir  # no window runs into it: it was read first
    offsets = [offset for offset, _ in members]
    announced = _announcements(monkeypatch)
    both_in_flight = threading.Barrier(2, timeout=10)  # broken unless 2 GETs overlap
    fetched, in_flight, most = [], [0], [0]
    lock = threading.Lock()
    cat_file = MemoryFileSystem.cat_file

    def counting(self, path, start=None, end=None, **kwargs):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            fetched.append((start, end))
            first = len(fetched) - len(offsets) in (1, 2)  # the first two pieces of data
        try:
            if first:
                both_in_flight.wait()
            return cat_file(self, path, start, end, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(MemoryFileSystem, 'cat_file', counting)
    _assert_bits(gpuserial.load('memory://a/big.npz'), model)
    headers = [(offset, min(directory, offset + npz.REMOTE_WINDOW
                            + (stored if stored < _zipread.DIRECT else 0)))
               for offset, stored in members]
    assert announced[0] == headers  # asked for first, in the file's order
    # the GETs that start first: in any order, as the pool's threads race to them
    assert sorted(fetched[:len(offsets)]) == headers
    data = sorted(fetched[len(offsets):])
    assert 2 <= most[0] <= remote.FETCHES_IN_FLIGHT
    # the large members' data and the headers between them, each byte once
    assert all(end == next_start for (_, end), (next_start, _) in zip(data, data[1:],
                                                                       strict=False))
    span = data[-1][1] - data[0][0]
    payload = sum(value.nbytes for value in model.values() if value.nbytes >= _zipread.DIRECT)
    assert payload <= span < payload + 256 * len(model)
    assert len(data) == -(-span // piece)  # whole pieces across the members' boundaries


def _announcements(monkeypatch) -> list:
    """Records the byte ranges each :meth:`remote.Ranged.expect` announces, as it asks for
    them (the order its GETs are submitted in; they start in whatever order the pool's
    threads get to them)."""
    announced: list = []
    expect = remote.Ranged.expect
    monkeypatch.setattr(remote.Ranged, 'expect',
                        lambda self, ranges: announced.append(ranges) or expect(self, ranges))
    return announced


class _Gets:
    """Records the ranged GETs of memory:// objects, how many were in flight at most, and
    holds the first ``gate`` of them until that many are in flight at once."""

    def __init__(self, monkeypatch, gate: int = 0):
        self.ranges: list[tuple[int, int]] = []
        self.in_flight = self.most = 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(gate, timeout=10) if gate else None  # broken unless
        cat_file = MemoryFileSystem.cat_file  # `gate` GETs overlap

        def counting(fs, path, start=None, end=None, **kwargs):
            with self.lock:
                self.in_flight += 1
                self.most = max(self.most, self.in_flight)
                self.ranges.append((start, end))
                held = self.barrier is not None and len(self.ranges) <= gate
            try:
                if held:
                    self.barrier.wait()
                return cat_file(fs, path, start, end, **kwargs)
            finally:
                with self.lock:
                    self.in_flight -= 1

        monkeypatch.setattr(MemoryFileSystem, 'cat_file', counting)


@pytest.mark.parametrize('compression', [False, True], ids=['stored', 'deflated'])
@pytest.mark.parametrize('how', ['load_npz', 'load', 'load keys reversed'])
def test_a_load_fetches_the_members_headers_ahead_many_at_once(memory, monkeypatch, how,
                                                                compression):
    """Members far apart: each one's headers a GET of their own, more in flight at once than
    pieces of data are (a round trip each otherwise); then the data, each byte once."""
    rng = numpy.random.default_rng(0)  # incompressible
    model = {f'm{index:02d}': rng.random(32 * 1024) for index in range(12)}
    gpuserial.save('memory://a/m.npz', model, compression=compression)  # 256 KiB members
    size = memory.size('/a/m.npz')
    with zipfile.ZipFile(io.BytesIO(memory.cat_file('/a/m.npz'))) as archive:
        offsets = sorted(info.header_offset for info in archive.infolist())
    gate = remote.FETCHES_IN_FLIGHT + 4
    gets = _Gets(monkeypatch, gate)
    announced = _announcements(monkeypatch)
    if how == 'load_npz':
        loaded = {key: numpy.zeros_like(value) for key, value in model.items()}
        gpuserial.load_npz('memory://a/m.npz', loaded)
    else:
        keys = list(model)[::-1] if how == 'load keys reversed' else None
        loaded = gpuserial.load('memory://a/m.npz', keys=keys)
    _assert_bits(loaded, model)
    headers = [(offset, min(size, offset + npz.REMOTE_WINDOW)) for offset in offsets]
    assert announced[0] == headers  # whatever the order asked: the file's
    assert sorted(gets.ranges[:len(headers)]) == headers  # the GETs that start first
    assert gate <= gets.most <= remote.SMALL_FETCHES_IN_FLIGHT
    data = sorted(gets.ranges[len(headers):])
    assert all(end == start for (_, end), (start, _) in zip(data, data[1:], strict=False))
    assert data[0][0] < offsets[0] + npz.REMOTE_WINDOW and data[-1][1] > offsets[-1]


def _many_small(compression: bool, count: int = 300) -> dict:
    rng = numpy.random.default_rng(1)  # incompressible: about 4 KiB a member either way
    return {f'layer{index:03d}/W': rng.random(500 + index % 7) for index in range(count)}


def _no_byte_twice(ranges: list[tuple[int, int]]) -> bool:
    ordered = sorted(ranges)
    return all(end <= start for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False))


@pytest.mark.parametrize('compression', [False, True], ids=['stored', 'deflated'])
@pytest.mark.parametrize('how', ['load', 'load_npz', 'load_npz cast', 'load strided',
                                 'load onto a device', 'load_npz onto a device'])
def test_small_members_are_fetched_once_with_their_headers(memory, monkeypatch, how,
                                                           compression):
    """A load of many small members fetches each byte of the object once: their whole bytes
    come with their headers and are kept for the fills (every path a fill takes: whole into
    host arrays, streamed into casts and strided arrays, whole into device arrays)."""
    from tests.standin import StandInDevice
    monkeypatch.setattr(remote, 'FETCH_PIECE', 256 << 10)  # pieces read past are let go
    model = _many_small(compression)
    gpuserial.save('memory://a/small.npz', model, compression=compression)
    with zipfile.ZipFile(io.BytesIO(memory.cat_file('/a/small.npz'))) as archive:
        stored = sum(info.compress_size for info in archive.infolist())
    gets = _Gets(monkeypatch)
    device = StandInDevice(0)
    if how == 'load':
        loaded = gpuserial.load('memory://a/small.npz')
    elif how == 'load onto a device':
        loaded = {key: value.get()
                  for key, value in gpuserial.load('memory://a/small.npz', device=device).items()}
    elif how == 'load_npz onto a device':
        target = {key: device.send(numpy.zeros_like(value)) for key, value in model.items()}
        serializers.load_npz('memory://a/small.npz', target)
        loaded = {key: value.get() for key, value in target.items()}
    else:
        dtype = numpy.float32 if how == 'load_npz cast' else numpy.float64
        loaded = {key: numpy.zeros(value.shape + (2,), dtype)[..., 0]
                  if how == 'load strided' else numpy.zeros(value.shape, dtype)
                  for key, value in model.items()}
        serializers.load_npz('memory://a/small.npz', loaded)
        loaded = {key: value.astype(numpy.float64) for key, value in loaded.items()}
    if how == 'load_npz cast':
        assert all(numpy.array_equal(loaded[key], model[key].astype(numpy.float32))
                   for key in model)
    else:
        _assert_bits(loaded, model)
    assert _no_byte_twice(gets.ranges)
    assert stored < sum(end - start for start, end in gets.ranges) < memory.size(
        '/a/small.npz')


@pytest.mark.parametrize('compression', [False, True], ids=['stored', 'deflated'])
def test_tiny_members_are_fetched_once(memory, monkeypatch, compression):
    """Members smaller than the zip reader's guess at their headers (biases, step counts):
    the window read for a member's headers runs into the next member's bytes, and the next
    read starts within that window. What the window holds is never read again: going back
    over the start of a piece would start the fetches ahead afresh, fetching pieces again."""
    monkeypatch.setattr(remote, 'FETCH_PIECE', 256 << 10)
    rng = numpy.random.default_rng(2)
    model = {f'p{index:04d}': rng.random(1 + index % 50) for index in range(3000)}
    gpuserial.save('memory://a/tiny.npz', model, compression=compression)
    size = memory.size('/a/tiny.npz')
    gets = _Gets(monkeypatch)
    _assert_bits(gpuserial.load('memory://a/tiny.npz'), model)
    assert _no_byte_twice(gets.ranges)
    assert sum(end - start for start, end in gets.ranges) < size


@pytest.mark.parametrize('compression', [False, True], ids=['stored', 'deflated'])
def test_keys_longer_than_the_window_at_each_header_load(memory, compression):
    """A member's name longer than :data:`npz.REMOTE_WINDOW` (and the zip reader's guess at
    a header) runs past the bytes fetched with its header: they are read again, whole."""
    long = 'k' * (npz.REMOTE_WINDOW + 1000)
    model = {'a': numpy.arange(5.0), long: numpy.arange(7), 'b': numpy.arange(3.0)}
    gpuserial.save('memory://a/long.npz', model, compression=compression)
    _assert_bits(gpuserial.load('memory://a/long.npz'), model)
    _assert_bits(gpuserial.load('memory://a/long.npz', keys=[long]), {long: model[long]})


def test_small_members_kept_past_their_budget_are_fetched_again(memory, monkeypatch):
    """The kept bytes are bounded (:data:`npz.REMOTE_KEPT_BYTES`): the members past it are
    fetched again for their fills, and load as well."""
    model = _many_small(False)
    gpuserial.save('memory://a/small.npz', model)
    monkeypatch.setattr(npz, 'REMOTE_KEPT_BYTES', 100 << 10)  # about 24 of the 300 members
    gets = _Gets(monkeypatch)
    _assert_bits(gpuserial.load('memory://a/small.npz'), model)
    assert not _no_byte_twice(gets.ranges)
    fetched = sum(end - start for start, end in gets.ranges)
    size = memory.size('/a/small.npz')
    assert size + 0.8 * size < fetched < 2 * size  # nearly all of it twice, but not all


def test_a_member_is_kept_below_the_limit_and_its_range_ends_at_the_next_header(memory,
                                                                                monkeypatch):
    """The header pass fetches a member whole where a window and its stored bytes are below
    ``_zipread.DIRECT`` (its range ends at the next member's header, the last's at the zip
    directory, read already), else only the window; the fills announce only the others'
    data."""
    limit = _zipread.DIRECT - npz.REMOTE_WINDOW
    header = 128  # numpy's .npy header of a 1-d array
    model = {'a': numpy.zeros(limit - 1 - header, numpy.uint8),
             'b': numpy.zeros(limit - header, numpy.uint8), 'c': numpy.arange(10.0)}
    gpuserial.save('memory://a/limit.npz', model)
    data = memory.cat_file('/a/limit.npz')
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        a, b, c = archive.infolist()
        directory = archive.start_dir
    assert (a.compress_size, b.compress_size) == (limit - 1, limit)
    announced = _announcements(monkeypatch)
    _assert_bits(gpuserial.load('memory://a/limit.npz'), model)
    b_data = b.header_offset + 30 + len(b.filename) + len(b.extra)
    assert announced == [[(0, b.header_offset), (b.header_offset,
                                                  b.header_offset + npz.REMOTE_WINDOW),
                          (c.header_offset, directory)],
                         [(b_data, b_data + b.compress_size)]]


@pytest.mark.parametrize('compression', [False, True], ids=['stored', 'deflated'])
def test_each_small_member_is_one_read_of_the_object(memory, monkeypatch, compression):
    """The header pass reads a small member's headers and bytes in one read of the object's
    file (a read each for its headers, its .npy header, its deflated pieces and its bytes,
    else): a few more for the zip directory."""
    model = _many_small(compression)
    gpuserial.save('memory://a/small.npz', model, compression=compression)
    reads = []
    readinto = remote.Ranged.readinto
    monkeypatch.setattr(remote.Ranged, 'readinto',
                        lambda self, buffer: reads.append(1) or readinto(self, buffer))
    _assert_bits(gpuserial.load('memory://a/small.npz'), model)
    assert len(model) <= len(reads) <= len(model) + 8


@pytest.mark.parametrize('short', [0, 1])
def test_a_budget_of_exactly_the_members_bytes_keeps_them_all(memory, monkeypatch, short):
    """:data:`npz.REMOTE_KEPT_BYTES` counts the members' stored bytes: a budget of exactly
    theirs keeps every member (each byte fetched once); one byte less, the last is fetched
    again for its fill."""
    monkeypatch.setattr(remote, 'FETCH_PIECE', 256 << 10)
    model = _many_small(False, count=20)
    gpuserial.save('memory://a/small.npz', model)
    with zipfile.ZipFile(io.BytesIO(memory.cat_file('/a/small.npz'))) as archive:
        stored = sum(info.compress_size for info in archive.infolist())
    monkeypatch.setattr(npz, 'REMOTE_KEPT_BYTES', stored - short)
    gets = _Gets(monkeypatch)
    _assert_bits(gpuserial.load('memory://a/small.npz'), model)
    assert _no_byte_twice(gets.ranges) == (not short)


@pytest.mark.parametrize('compression', [False, True], ids=['stored', 'deflated'])
def test_a_kept_member_is_checked_before_its_array_changes(memory, compression):
    """Kept bytes are checked as the file's are: a flipped byte fails the load, naming the
    object and key, before that member's array changes (those before it are filled, as the
    error says)."""
    model = _many_small(compression, count=20)
    gpuserial.save('memory://a/small.npz', model, compression=compression)
    data = bytearray(memory.cat_file('/a/small.npz'))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo('layer007/W.npy')
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size
         - 20] ^= 0xFF  # in the member's last bytes
    memory.pipe_file('/a/small.npz', bytes(data))
    target = {key: numpy.zeros_like(value) for key, value in model.items()}
    with pytest.raises(gpuserial.CorruptFileError,
                       match=r"'memory://a/small.npz', key 'layer007/W'"):
        serializers.load_npz('memory://a/small.npz', target)
    assert [key for key, value in target.items() if value.any()] == list(model)[:7]


def test_small_members_between_large_ones_are_fetched_once(memory, monkeypatch):
    """Where the store fetches ahead, the zip reader reads no window ahead of its own: a window
    run past the start of the next large member would make that member's read go back, and
    the fetches start afresh."""
    monkeypatch.setattr(remote, 'FETCH_PIECE', 256 * 1024)
    rng = numpy.random.default_rng(0)
    model = {}
    for index in range(12):
        model[f'w{index:02d}'] = rng.random(600 * 1024 // 8)  # read straight into the array
        model[f'b{index:02d}'] = rng.random(1024 // 8)  # through the window
    gpuserial.save('memory://a/m.npz', model)
    size = memory.size('/a/m.npz')
    gets = _Gets(monkeypatch)
    _assert_bits(gpuserial.load('memory://a/m.npz'), model)
    fetched = sum(end - start for start, end in gets.ranges)
    headers = len(model) * npz.REMOTE_WINDOW
    assert fetched <= size + headers, (fetched, size)


def test_a_bad_member_fetched_ahead_fails_only_the_load_that_asks_for_it(memory):
    model = {f'm{index}': numpy.full(1000, index, numpy.float32) for index in range(4)}
    gpuserial.save('memory://a/m.npz', model)
    data = bytearray(memory.cat_file('/a/m.npz'))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        offset = archive.getinfo('m2.npy').header_offset
    data[offset:offset + 4] = b'PK\x05\x06'  # not a local header's signature
    memory.pipe('/a/m.npz', bytes(data))
    others = [key for key in model if key != 'm2']
    _assert_bits(gpuserial.load('memory://a/m.npz', keys=others), {k: model[k] for k in others})
    target = {key: numpy.zeros(1000, numpy.float32) for key in others}
    gpuserial.load_npz('memory://a/m.npz', target)
    _assert_bits(target, {key: model[key] for key in others})
    with pytest.raises(gpuserial.KeyNotFoundError, match=r"m\.npz', key 'm9': not in the"):
        gpuserial.load('memory://a/m.npz', keys=['m0', 'm9'])
    assert list(gpuserial.load('memory://a/m.npz', keys=['m9', 'm1'], strict=False)) == ['m1']
    for load in (lambda: gpuserial.load('memory://a/m.npz'),
                 lambda: gpuserial.load_npz('memory://a/m.npz', {'m2': numpy.zeros(1000)})):
        with pytest.raises(gpuserial.CorruptFileError,
                           match=r"m\.npz', key 'm2': bad local file header"):
            load()


def test_small_announced_ranges_are_fetched_many_at_once_within_the_bytes_of_a_few_pieces(
        memory, monkeypatch):
    piece = 64 * 1024
    monkeypatch.setattr(remote, 'FETCH_PIECE', piece)
    data = bytes(range(256)) * 4096 * 4  # 4 MiB
    memory.pipe('/a/obj', data)
    with remote.remote_input(remote.location_of('memory://a/obj')) as f:
        for length, most in ((40 * 1024, 6), (1000, remote.SMALL_FETCHES_IN_FLIGHT),
                             (3 * piece, remote.FETCHES_IN_FLIGHT)):
            apart = length + remote.FETCH_GAP + 1  # not merged
            ranges = [(start, start + length) for start in range(0, len(data) - length, apart)]
            f.expect(ranges)
            f.seek(ranges[0][0])
            assert f.read(100) == data[ranges[0][0]:ranges[0][0] + 100]
            # in flight: as many as fit in FETCHES_IN_FLIGHT pieces' bytes, 16 at most
            assert len(f.fetches) == most, length
            assert sum(stop - start for start, stop, _ in f.fetches) <= (
                remote.FETCHES_IN_FLIGHT * piece)
            f.seek(ranges[1][0])  # the first read past: topped up to as many again
            assert f.read(100) == data[ranges[1][0]:ranges[1][0] + 100]
            assert len(f.fetches) == most, length
            for start, stop in ranges:  # and every range reads right
                f.seek(start)
                assert f.read(stop - start) == data[start:stop]


def test_fetches_dropped_while_running_still_count_against_the_bytes_in_flight(
        memory, monkeypatch):
    """A read past them or a seek back drops the fetches ahead, but those already running hold
    their memory and their connection until they end: new ones wait for room."""
    piece = 64 * 1024
    monkeypatch.setattr(remote, 'FETCH_PIECE', piece)
    data = bytes(range(256)) * 4096  # 1 MiB
    memory.pipe('/a/obj', data)
    gates = {range(1, 4): threading.Event(), range(9, 12): threading.Event()}  # pieces held
    running, most = [0], [0]
    lock = threading.Lock()
    cat_file = MemoryFileSystem.cat_file

    def held(fs, path, start=None, end=None, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            for pieces, gate in gates.items():
                if start // piece in pieces:
                    assert gate.wait(10)
            return cat_file(fs, path, start, end, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    def running_ahead(f) -> None:  # the fetches after the first have started (none queued)
        deadline = time.monotonic() + 10
        while not all(fetch.running() for _, _, fetch in list(f.fetches)[1:]):
            assert time.monotonic() < deadline
            time.sleep(0.001)

    def held_bytes(f) -> int:
        return sum(stop - start for start, stop, _ in (*f.fetches, *f.dropped))

    monkeypatch.setattr(MemoryFileSystem, 'cat_file', held)
    with remote.remote_input(remote.location_of('memory://a/obj')) as f:
        f.expect([(0, len(data))])
        assert f.read(100) == data[:100]  # pieces 1-3 now run, held
        running_ahead(f)
        f.seek(8 * piece)  # read past them: dropped, but they still run
        assert f.read(100) == data[8 * piece:8 * piece + 100]
        assert len(f.dropped) == 3 and len(f.fetches) == 1  # room for one piece only
        assert held_bytes(f) <= remote.FETCHES_IN_FLIGHT * piece
        gates[range(1, 4)].set()
        concurrent.futures.wait([fetch for _, _, fetch in f.dropped], timeout=10)
        assert f.read(piece - 100) == data[8 * piece + 100:9 * piece]  # 9-11 now run, held
        running_ahead(f)
        f.seek(0)  # back: a fresh start, 9-11 dropped while running
        assert f.read(100) == data[:100]
        assert len(f.dropped) == 3 and held_bytes(f) <= remote.FETCHES_IN_FLIGHT * piece
        assert most[0] <= remote.FETCHES_IN_FLIGHT
        gates[range(9, 12)].set()
        assert f.read(len(data)) == data[100:]


def test_announced_ranges_merge_and_ranges_within_them_change_nothing(memory, monkeypatch):
    monkeypatch.setattr(remote, 'FETCH_PIECE', 64 * 1024)
    data = bytes(range(256)) * 4096  # 1 MiB
    memory.pipe('/a/obj', data)
    closed: list = []
    monkeypatch.setattr(MemoryFile, 'close', lambda self: closed.append(self))  # its own: a no-op
    with remote.remote_input(remote.location_of('memory://a/obj')) as f:
        gap = remote.FETCH_GAP
        f.expect([(0, 100), (100 + gap, 200_000), (200_001 + gap, 300_000)])
        announced = [(0, 200_000), (200_001 + gap, 300_000)]
        assert f.ranges == announced  # a gap of FETCH_GAP joins, one byte more does not
        f.expect([(100_000, 200_000)])  # a member within them
        f.expect([(280_000, 300_000)])
        assert f.ranges == announced
        f.seek(400_000)  # a large read outside them: in pieces, then they are back
        assert f.read(200_000) == data[400_000:600_000]
        assert f.ranges == announced
        f.expect([(280_000, 300_001)])  # past their end: a new announcement
        assert f.ranges == [(280_000, 300_001)]
        f.seek(290_000)
        assert f.read(100_000) == data[290_000:390_000]
    assert closed == [f.f]  # the fsspec file too


def test_an_hdf5_download_fetches_ahead_several_gets_at_once(memory, monkeypatch):
    monkeypatch.setattr(remote, 'FETCH_PIECE', 256 * 1024)
    monkeypatch.setattr(remote, 'COPY_PIECE', 256 * 1024)  # each copy no larger than a piece
    model = {'a': numpy.arange(MiB // 4, dtype=numpy.float64)}
    gpuserial.save('memory://a/m.h5', model)
    both_in_flight = threading.Barrier(2, timeout=10)  # broken unless 2 GETs overlap
    cat_file, calls = MemoryFileSystem.cat_file, []

    def waiting(self, path, start=None, end=None, **kwargs):
        calls.append(start)
        if len(calls) <= 2:
            both_in_flight.wait()
        return cat_file(self, path, start, end, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, 'cat_file', waiting)
    _assert_bits(gpuserial.load('memory://a/m.h5'), model)
    assert len(calls) >= 2  # through ranged GETs ahead, not plain reads


def test_a_failed_fetch_ahead_fails_the_load_and_names_the_url(memory, monkeypatch):
    monkeypatch.setattr(remote, 'FETCH_PIECE', 64 * 1024)
    gpuserial.save('memory://a/big.npz', {'a': numpy.ones(MiB // 8)})
    cat_file = MemoryFileSystem.cat_file

    def failing(self, path, start=None, end=None, **kwargs):
        if MiB // 2 <= start < 900 * 1024:  # data, after its headers, before the directory
            raise ConnectionError('connection reset')
        return cat_file(self, path, start, end, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, 'cat_file', failing)
    target = {'a': numpy.zeros(MiB // 8)}
    with pytest.raises(gpuserial.ReadFailedError,  # not a corrupt file: the network failed
                       match=r"memory://a/big\.npz', key 'a': reading failed: connection "
                             r"reset \(the load stopped while filling 'a'") as raised:
        gpuserial.load_into('memory://a/big.npz', target)
    assert isinstance(raised.value, OSError) and raised.value.partly_filled == 'a'


def test_a_save_uploads_the_payload_once_and_never_copies(bucket):
    model = {'w': numpy.random.default_rng(0).standard_normal(40 * MiB // 8)}  # 3 parts
    payload = 40 * MiB
    gpuserial.save(bucket.url('m.npz'), model, storage_options=bucket.options)
    operations = bucket.operations()
    assert 'CopyObject' not in operations and 'UploadPartCopy' not in operations
    assert 'DeleteObject' not in operations
    assert operations.count('UploadPart') == 3 and 'CompleteMultipartUpload' in operations
    assert payload <= bucket.uploaded_bytes() <= 1.02 * payload


class _Failing(Exception):
    pass


@pytest.mark.parametrize('error', [_Failing, KeyboardInterrupt])
def test_a_failed_upload_leaves_no_object_and_the_previous_one_intact(bucket, monkeypatch,
                                                                      error):
    old = {'w': numpy.ones(1000, numpy.float32)}
    url = bucket.url('ckpt.npz')
    gpuserial.save(url, old, storage_options=bucket.options)
    write = remote.Upload.write

    def failing(self, data):
        if self.position > 20 * MiB:  # after a part was uploaded
            raise error('the network went away')
        return write(self, data)

    monkeypatch.setattr(remote.Upload, 'write', failing)
    new = {'w': numpy.zeros(40 * MiB // 4, numpy.float32)}
    for target in (url, bucket.url('fresh.npz')):
        bucket.calls.clear()
        with pytest.raises(error, match='network'):
            gpuserial.save(target, new, storage_options=bucket.options)
        assert 'UploadPart' in bucket.operations()
        assert 'AbortMultipartUpload' in bucket.operations()
        assert 'CompleteMultipartUpload' not in bucket.operations()
    assert bucket.keys() == ['ckpt.npz']
    _assert_bits(gpuserial.load(url, storage_options=bucket.options), old)
    uploads = bucket.fs.s3  # no multipart upload left open either
    assert bucket.fs.call_s3('list_multipart_uploads', Bucket=bucket.name).get('Uploads', []) \
        == [], uploads


def test_a_failed_save_to_memory_leaves_the_previous_object_and_hides_the_new_one(memory,
                                                                                 monkeypatch):
    old = {'w': numpy.arange(1000, dtype=numpy.float32)}
    gpuserial.save('memory://run/step-1.npz', old)
    seen = []

    def failing(self, data):  # mid-save: what can a reader see now?
        seen.append((sorted(memory.find('/run')), gpuserial.latest('memory://run')))
        raise _Failing('out of memory')

    monkeypatch.setattr(remote.Upload, 'write', failing)
    for url in ('memory://run/step-1.npz', 'memory://run/step-2.npz'):
        with pytest.raises(_Failing):
            gpuserial.save(url, {'w': numpy.zeros(1000, numpy.float32)})
    assert [latest for _, latest in seen] == ['memory://run/step-1.npz'] * 2
    assert all('/run/step-2.npz' not in keys for keys, _ in seen)
    assert memory.find('/run') == ['/run/step-1.npz']
    _assert_bits(gpuserial.load('memory://run/step-1.npz'), old)

    def full(self, data):  # an OSError of the store's, which names no object
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(remote.Upload, 'write', full)
    with pytest.raises(OSError, match=r'No space left on device \(writing the object\)') as raised:
        gpuserial.save('memory://run/step-3.npz', old)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == 'memory:///run/step-3.npz'


def test_a_failed_upload_names_the_object(bucket, monkeypatch):
    def failing(self, data):  # an OSError of the store's, which names no object
        raise OSError(errno.EIO, 'Input/output error')

    monkeypatch.setattr(remote.Upload, 'write', failing)
    with pytest.raises(OSError, match=r'Input/output error \(writing the object\)') as raised:
        gpuserial.save(bucket.url('m.npz'), {'w': numpy.ones(3)},
                       storage_options=bucket.options)
    assert raised.value.filename == bucket.url('m.npz')
    assert bucket.keys() == []


def test_a_failed_hdf5_save_leaves_no_object_and_no_spool_file(bucket, monkeypatch, tmp_path):
    monkeypatch.setenv(remote.SPOOL_DIR_VARIABLE, str(tmp_path))
    url = bucket.url('ckpt.h5')
    gpuserial.save(url, {'a': numpy.arange(5)}, storage_options=bucket.options)

    def failing(local, location):
        raise _Failing('upload refused')

    monkeypatch.setattr(remote, 'upload_file', failing)
    with pytest.raises(_Failing):
        gpuserial.save(url, {'a': numpy.zeros(5)}, storage_options=bucket.options)
    assert gpuserial.load(url, storage_options=bucket.options)['a'].tolist() == [0, 1, 2, 3, 4]
    assert list(tmp_path.iterdir()) == []


def test_a_failed_serialize_writes_nothing(bucket):
    class Exploding:
        def serialize(self, serializer):
            serializer('a', numpy.ones(3))
            raise _Failing('serialize failed')

    with pytest.raises(_Failing):
        gpuserial.save_npz(bucket.url('x.npz'), Exploding(), storage_options=bucket.options)
    assert bucket.keys() == []


def test_hdf5_loads_spool_into_the_chosen_directory_and_leave_nothing(memory, monkeypatch,
                                                                      tmp_path):
    monkeypatch.setenv(remote.SPOOL_DIR_VARIABLE, str(tmp_path))
    gpuserial.save('memory://a/x.h5', {'a': numpy.arange(4)})
    with gpuserial.open('memory://a/x.h5') as f:
        assert f.get('a').tolist() == [0, 1, 2, 3]
        assert list(tmp_path.iterdir()) == []  # the name is gone once h5py holds the file
    assert list(tmp_path.iterdir()) == []


class _CopyingMemory(MemoryFileSystem):
    """A store outside remote.TRANSACTIONAL (as an unknown one would be)."""

    protocol = ('copymem',)


def test_a_store_without_transactions_goes_through_a_temporary_key(memory, monkeypatch):
    fsspec.register_implementation('copymem', _CopyingMemory, clobber=True)
    fs = _CopyingMemory()
    url = 'copymem://b/x.npz'
    gpuserial.save(url, {'a': numpy.arange(3)})
    moved = []
    monkeypatch.setattr(_CopyingMemory, 'mv', lambda self, a, b: moved.append((a, b))
                        or MemoryFileSystem.mv(self, a, b))
    gpuserial.save(url, {'a': numpy.arange(4)})
    assert len(moved) == 1 and remote.TEMP_MARK in moved[0][0]
    assert gpuserial.load(url)['a'].tolist() == [0, 1, 2, 3]

    def failing(self, data):
        raise _Failing('refused')

    monkeypatch.setattr(remote.Upload, 'write', failing)
    with pytest.raises(_Failing):
        gpuserial.save(url, {'a': numpy.arange(9)})
    monkeypatch.undo()
    assert gpuserial.load(url)['a'].tolist() == [0, 1, 2, 3]
    assert [path for path in fs.store if 'x.npz' in path] == [fs._strip_protocol(url)]


def test_an_fsspec_open_file_carries_its_filesystem(bucket):
    target = fsspec.core.OpenFile(bucket.fs, f'{bucket.name}/o.npz')
    gpuserial.save(target, {'a': numpy.arange(3)})
    assert gpuserial.load(target)['a'].tolist() == [0, 1, 2]
    assert gpuserial.load(bucket.url('o.npz'), storage_options=bucket.options)['a'].tolist() \
        == [0, 1, 2]
    with pytest.raises(TypeError, match='storage_options= goes with a URL'):
        gpuserial.load(target, storage_options=bucket.options)


def test_async_saves_to_s3(bucket):
    model = _model(4)
    for name in ('async.npz', 'async.h5'):
        handle = gpuserial.save_async(bucket.url(name), model, format=name[-3:].replace(
            '.h5', 'hdf5').lstrip('.'), storage_options=bucket.options)
        handle.committed.result(timeout=60)
        _assert_bits(gpuserial.load(bucket.url(name), storage_options=bucket.options), model)
    asyncsave.wait_all()


def test_errors_name_the_url(bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'s3://.*/missing.npz': no such object"):
        gpuserial.load(bucket.url('missing.npz'), storage_options=bucket.options)
    with pytest.raises(FileNotFoundError, match='no such object'):
        gpuserial.load_npz(bucket.url('missing.npz'), {}, storage_options=bucket.options)
    bucket.fs.pipe(bucket.url('junk.npz'), b'not a zip at all')
    with pytest.raises(gpuserial.errors.CorruptFileError, match=r"junk.npz.*not an NPZ or HDF5"):
        gpuserial.load(bucket.url('junk.npz'), storage_options=bucket.options)
    with pytest.raises(gpuserial.errors.CorruptFileError, match=r"junk.npz.*not an NPZ \(zip\)"):
        gpuserial.load_npz(bucket.url('junk.npz'), {}, storage_options=bucket.options)
    with pytest.raises(TypeError, match=r"storage_options= goes with a URL, not with '.*x.npz'"):
        gpuserial.save(str(tmp_path / 'x.npz'), {}, storage_options={'anon': True})



def test_storage_options_with_a_local_file_are_refused_by_the_tools(tmp_path, capsys):
    from gpuserial.tools import cli, inspection

    path = tmp_path / 'x.npz'
    gpuserial.save(path, {'a': numpy.arange(3)})
    message = r"storage_options= goes with a URL, not with '.*x\.npz'"
    for read in (lambda: inspection.inspect_file(path, storage_options={'anon': True}),
                 lambda: inspection.open_source(path, {'anon': True}).__enter__(),
                 lambda: inspection.open_reader(path, None, {'anon': True}).__enter__()):
        with pytest.raises(TypeError, match=message):
            read()
    assert cli.main(['inspect', str(path), '--storage-options', '{"anon": true}']) == 2
    err = capsys.readouterr().err
    assert err.startswith('gpuserial: error: ') and err.count('\n') == 1
    assert err.endswith(f"storage_options= goes with a URL, not with '{path}'\n")

@pytest.mark.parametrize('command', ['diff', 'convert', 'consolidate'])
def test_storage_options_with_no_url_among_two_files_are_refused(tmp_path, capsys, memory,
                                                                 command):
    """diff, convert and consolidate pass the options to the URLs among their two files;
    where neither was one, the options went nowhere and the command ran as if they had been
    used (inspect and clean refuse them for their local file)."""
    from gpuserial.distributed import reading, save_sharded
    from gpuserial.tools import cli, inspection

    class OneRank:
        rank, size = 0, 1

        def allgather(self, value):
            return [value]

        def bcast(self, value, root=0):
            return value

    a, out = tmp_path / 'a.npz', tmp_path / 'out.h5'
    gpuserial.save(a, {'x': numpy.arange(3)})
    save_sharded(str(tmp_path / 'ck'), {'x': numpy.arange(3)}, OneRank())
    first = tmp_path / 'ck' if command == 'consolidate' else a
    second = a if command == 'diff' else out
    assert cli.main([command, str(first), str(second), '--storage-options', '{}']) == 2
    err = capsys.readouterr().err
    assert err.startswith('gpuserial: error: ') and err.count('\n') == 1
    assert err.endswith(f"storage_options= goes with a URL, not with '{first}' nor '{second}'\n")
    assert not out.exists()
    call = {'diff': inspection.diff_files, 'convert': inspection.convert,
            'consolidate': reading.consolidate}[command]
    with pytest.raises(TypeError, match=r"^storage_options= goes with a URL, not with '.*' "
                                        r"nor '.*'$"):
        call(first, second, storage_options={})
    gpuserial.save('memory://tools/a.npz', {'x': numpy.arange(3)})  # with a URL: as before
    second = 'memory://tools/a.npz' if command == 'diff' else 'memory://tools/out.npz'
    assert cli.main([command, str(first), second, '--storage-options', '{}']) == 0
    assert gpuserial.load(second)['x'].tolist() == [0, 1, 2]


def test_errors_name_the_url_as_it_was_written(memory):
    """memory:// keeps its paths as /a/x: the messages show the URL the caller wrote."""
    with pytest.raises(FileNotFoundError, match=r"^'memory://a/missing\.npz': no such object"):
        gpuserial.load('memory://a/missing.npz')
    memory.pipe('/a/junk.npz', b'not a zip at all')
    with pytest.raises(gpuserial.CorruptFileError, match=r"^'memory://a/junk\.npz': not an NPZ"):
        gpuserial.load_npz('memory://a/junk.npz', {})


@pytest.mark.parametrize('text, expected', [
    ('s3://bucket/key.npz', True), ('memory://x', True), ('simplecache::s3://b/k', True),
    ('gs://b/k', True), ('x.npz', False), ('/tmp/x.npz', False), ('C:\\x.npz', False),
    ('c://x', False), (b's3://b/k', False)])
def test_what_is_a_url(text, expected):
    assert remote.is_url(text) is expected


def test_upload_blocks_grow_for_huge_objects():
    assert remote.upload_block(None) == remote.UPLOAD_BLOCK
    assert remote.upload_block(MiB) == remote.UPLOAD_BLOCK
    huge = 10 * remote.UPLOAD_BLOCK * remote.MAX_PARTS
    assert remote.upload_block(huge) * remote.MAX_PARTS >= huge


def test_local_use_never_imports_fsspec(tmp_path):
    code = ('import io, sys, numpy, gpuserial, gpuserial.serializers;'
            'f = io.BytesIO(); gpuserial.save_npz(f, {"a": numpy.ones(2)});'
            'f.seek(0); gpuserial.load(f); gpuserial.load_npz(f, {"a": numpy.ones(2)});'
            f'gpuserial.save({str(tmp_path / "x.npz")!r}, {{"a": numpy.ones(2)}});'
            f'gpuserial.load({str(tmp_path / "x.npz")!r});'
            f'gpuserial.save({str(tmp_path / "x.h5")!r}, {{"a": numpy.ones(2)}});'
            f'gpuserial.load({str(tmp_path / "x.h5")!r});'
            'print([m for m in ("fsspec", "s3fs", "botocore") if m in sys.modules])')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]'


def test_a_url_without_fsspec_says_what_to_install(monkeypatch):
    """It said pip install gpuserial[remote], which PyPI has not: gpuserial installs from a
    checkout."""
    monkeypatch.setitem(sys.modules, 'fsspec', None)  # import fsspec fails
    with pytest.raises(ImportError, match=r"^'s3://bucket/step-1\.npz': URLs need fsspec: pip "
                                          r"install fsspec \(gpuserial's "
                                          r"extra: pip install -e '\.\[remote\]' in its "
                                          r"checkout\), and the store's package, such as s3fs"):
        gpuserial.load('s3://bucket/step-1.npz')


@pytest.mark.skipif(importlib.util.find_spec('gcsfs') is not None, reason='gcsfs installed')
def test_a_url_whose_store_package_is_missing_names_the_url():
    """fsspec's own message named neither the URL nor the call."""
    for call in (lambda: gpuserial.save('gs://bucket/run/x.npz', {'a': numpy.arange(3)}),
                 lambda: gpuserial.load('gs://bucket/run/x.npz'),
                 lambda: gpuserial.latest('gs://bucket/run')):
        with pytest.raises(ImportError, match=r"^'gs://bucket/run(/x\.npz)?': .*gcsfs"):
            call()


def test_an_unknown_protocol_and_options_that_are_no_dict_name_the_url(memory):
    with pytest.raises(ValueError, match=r"^'foo://x/y\.npz': Protocol not known: foo$"):
        gpuserial.save('foo://x/y.npz', {'a': numpy.arange(3)})
    with pytest.raises(TypeError, match=r"^'memory://x/y\.npz': storage_options= takes a dict "
                                        r"of the filesystem's options, not a str$"):
        gpuserial.save('memory://x/y.npz', {'a': numpy.arange(3)}, storage_options='anon')
    assert memory.store == {}


@pytest.mark.parametrize('how', ['save', 'save_async'])
def test_a_missing_bucket_names_the_object(bucket, how):
    """s3fs's FileNotFoundError('The specified bucket does not exist') has no errno, and it
    reached the caller naming nothing."""
    url = f's3://no-{bucket.name}/run/x.npz'
    save = getattr(gpuserial, how)
    with pytest.raises(FileNotFoundError, match=rf"^'{url}': The specified bucket does not "
                                                r"exist \(writing the object\)$"):
        result = save(url, {'a': numpy.arange(3)}, storage_options=bucket.options)
        if how == 'save_async':
            try:
                result.result()
            finally:
                asyncsave.wait_all()  # handed over by result(): not raised again (8736d82)
                assert asyncsave._unreported == []


@pytest.mark.parametrize('name', ['run', 'run/'])
def test_loading_a_prefix_on_s3_says_it_is_a_directory(bucket, name, capsys):
    """s3fs opens a prefix as an empty file: 'not an NPZ or HDF5 file (it starts with b'')'."""
    from gpuserial.tools import cli

    gpuserial.save(bucket.url('run/x.npz'), {'a': numpy.arange(3)},
                   storage_options=bucket.options)
    message = rf"^'{bucket.url(name)}': is a directory \(a prefix of objects\), not a file$"
    with pytest.raises(IsADirectoryError, match=message):
        gpuserial.load(bucket.url(name), storage_options=bucket.options)
    with pytest.raises(IsADirectoryError, match=message):
        gpuserial.load_npz(bucket.url(name), {}, storage_options=bucket.options)
    assert cli.main(['inspect', bucket.url(name), '--storage-options',
                     json.dumps(bucket.options)]) == 2
    assert 'is a directory' in capsys.readouterr().err
    with pytest.raises(ValueError, match=rf"^'s3://{bucket.name}': "):  # a bucket: no key
        gpuserial.load(f's3://{bucket.name}', storage_options=bucket.options)


def test_the_cli_inspects_converts_and_diffs_urls(bucket, tmp_path, capsys):
    from gpuserial.tools import cli
    options = ['--storage-options', json.dumps(bucket.options)]
    model = _model(5)
    gpuserial.save(bucket.url('a.npz'), model, storage_options=bucket.options)
    assert cli.main(['inspect', bucket.url('a.npz'), '--json', *options]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['format'] == 'npz' and len(info['entries']) == len(model)
    assert cli.main(['convert', bucket.url('a.npz'), bucket.url('b.h5'), '--no-progress',
                     *options]) == 0
    assert cli.main(['convert', bucket.url('b.h5'), str(tmp_path / 'c.npz'), '--no-progress',
                     *options]) == 0
    capsys.readouterr()
    assert cli.main(['diff', bucket.url('a.npz'), bucket.url('b.h5'), *options]) == 0
    assert cli.main(['diff', bucket.url('a.npz'), str(tmp_path / 'c.npz'), *options]) == 0
    assert cli.main(['inspect', bucket.url('b.h5'), *options]) == 0
    assert 'total: 6 entries' in capsys.readouterr().out
    assert bucket.keys() == ['a.npz', 'b.h5']
    with pytest.raises(SystemExit):
        cli.main(['inspect', bucket.url('a.npz'), '--storage-options', '[1]'])
    assert 'not a JSON object' in capsys.readouterr().err
