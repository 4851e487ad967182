"""The staging engine keeps CUDA's rules, on the strict stand-in device (see tests/standin.py):
it orders its copies after the caller's stream, finishes every load for every stream, stages
non-contiguous arrays block by block, survives failed reads and waits, pins nothing for empty
arrays, falls back to pageable memory, and forgets its buffers and streams in a forked child."""

import os
import struct
import warnings
import zipfile

import numpy
import pytest

import gpuserial
from gpuserial import serializers
from gpuserial.engine import devices, transfer
from gpuserial.errors import CorruptFileError
from tests.standin import BACKEND, StandInDevice, StandInError

CHUNK = 64


@pytest.fixture(autouse=True)
def fresh():
    BACKEND.reset()
    transfer.release_pool()
    with transfer.configure(chunk_bytes=CHUNK, buffers=2):
        yield
    BACKEND.reset()
    transfer.release_pool()


def _reader(data: bytes):
    position = 0

    def read_into(buffer):
        nonlocal position
        buffer[:] = data[position:position + len(buffer)]
        position += len(buffer)
    return read_into


@pytest.mark.parametrize('side_stream', [False, True], ids=['default stream', 'side stream'])
@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
def test_a_save_sees_what_a_kernel_queued_before_it_wrote(tmp_path, fmt, side_stream):
    device = StandInDevice(0)
    array = device.send(numpy.zeros(100, numpy.float32))
    save, load = {'npz': (serializers.save_npz, serializers.load_npz),
                  'hdf5': (serializers.save_hdf5, serializers.load_hdf5)}[fmt]
    with BACKEND.using(device) if side_stream else _nothing():
        BACKEND.launch(device, lambda: array._data.__setitem__(Ellipsis, 7.0))  # still queued
        save(tmp_path / f'm.{fmt}', {'w': array})
    target = {'w': numpy.zeros(100, numpy.float32)}
    load(tmp_path / f'm.{fmt}', target)
    assert (target['w'] == 7.0).all()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc_info):
        return False


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
def test_a_load_does_not_overwrite_what_a_kernel_queued_before_it_reads(tmp_path, fmt):
    device = StandInDevice(0)
    save, load = {'npz': (serializers.save_npz, serializers.load_npz),
                  'hdf5': (serializers.save_hdf5, serializers.load_hdf5)}[fmt]
    save(tmp_path / f'm.{fmt}', {'w': numpy.full(100, 3.0)})
    target = device.send(numpy.full(100, 1.0))
    seen = []
    BACKEND.launch(device, lambda: seen.append(target._data.copy()))  # reads the old values
    load(tmp_path / f'm.{fmt}', {'w': target})
    BACKEND.synchronize_device(device.id)
    assert seen[0].tolist() == [1.0] * 100 and target.get().tolist() == [3.0] * 100


@pytest.mark.parametrize('layout', ['transposed', 'every other column'])
def test_a_load_into_a_non_contiguous_target_is_done_for_every_stream(layout):
    device = StandInDevice(1)
    values = numpy.arange(60, dtype=numpy.float64)
    if layout == 'transposed':
        base = device.send(numpy.zeros((6, 10)))
        target, shape = base.T, (10, 6)
    else:
        base = device.send(numpy.zeros((6, 20)))
        target, shape = base[:, ::2], (6, 10)
    transfer.fill(target, _reader(values.tobytes()), values.dtype)
    seen = []
    with BACKEND.using(device) as side:  # another stream, after the load has returned
        BACKEND.launch(device, lambda: seen.append(target._data.copy()))
        BACKEND.synchronize_stream(side)
    assert seen[0].tolist() == values.reshape(shape).tolist()
    if layout != 'transposed':
        assert (base.get()[:, 1::2] == 0).all()  # the rest of the base array untouched


@pytest.mark.parametrize('direction', ['save', 'load'])
def test_non_contiguous_device_arrays_need_no_whole_copy(direction):
    device = StandInDevice(0)
    base = device.send(numpy.arange(2000, dtype=numpy.float64).reshape(40, 50))
    view = base.T  # 16000 bytes, staged through chunk-sized device buffers
    if direction == 'save':
        data = b''.join(bytes(chunk) for chunk in transfer.host_chunks(view))
        assert data == numpy.ascontiguousarray(base.get().T).tobytes()
    else:
        values = numpy.arange(2000, dtype=numpy.float64)[::-1].copy()
        transfer.fill(view, _reader(values.tobytes()), values.dtype)
        assert view.get().reshape(-1).tolist() == values.tolist()
    assert BACKEND.allocations and max(BACKEND.allocations) <= CHUNK


def test_a_failed_read_then_a_transfer_that_reuses_the_pool():
    device = StandInDevice(0)
    values = numpy.arange(100, dtype=numpy.uint8)
    calls = []

    def fails_on_the_third(buffer):
        calls.append(len(buffer))
        if len(calls) == 3:
            raise OSError('the disk went away')
        buffer[:] = values[:len(buffer)]

    target = device.send(numpy.zeros(1000, numpy.uint8))
    with pytest.raises(OSError, match='the disk went away'):
        transfer.fill(target, fails_on_the_third, values.dtype)
    assert BACKEND.pending() == 0  # the copies it had started have landed
    again = device.send(numpy.zeros(1000, numpy.uint8))
    data = numpy.arange(1000, dtype=numpy.uint8)
    transfer.fill(again, _reader(data.tobytes()), data.dtype)
    assert again.get().tolist() == data.tolist() and BACKEND.pinned_allocations == 2


@pytest.mark.parametrize(('failures', 'pinned'), [(1, 2), (2, 4)])
def test_a_failed_wait_keeps_its_error_and_never_reuses_a_buffer_in_doubt(failures, pinned):
    """After a failed wait the copies in flight are waited for again: buffers whose copies
    then land go back to the pool; if that fails too, the stream is synchronized and the
    buffers are dropped. Either way the first error is the one raised."""
    device = StandInDevice(0)
    data = numpy.arange(1000, dtype=numpy.uint8)
    BACKEND.failing_waits = failures
    with pytest.raises(StandInError, match='a wait made to fail'):
        b''.join(bytes(chunk) for chunk in transfer.host_chunks(device.send(data)))
    assert BACKEND.pending() == 0
    assert b''.join(bytes(c) for c in transfer.host_chunks(device.send(data))) == data.tobytes()
    assert BACKEND.pinned_allocations == pinned


def test_empty_arrays_pin_nothing(tmp_path):
    device = StandInDevice(0)
    for fmt, save, load in (('npz', serializers.save_npz, serializers.load_npz),
                            ('h5', serializers.save_hdf5, serializers.load_hdf5)):
        save(tmp_path / f'e.{fmt}', {'w': device.send(numpy.zeros((3, 0, 2)))})
        target = {'w': device.send(numpy.zeros((3, 0, 2)))}
        load(tmp_path / f'e.{fmt}', target)
        assert target['w'].shape == (3, 0, 2)
    assert BACKEND.pinned_allocations == 0 and BACKEND.allocations == []


def test_pageable_buffers_stand_in_when_pinning_fails(tmp_path):
    device = StandInDevice(0)
    BACKEND.pinning_fails = BACKEND.pageable_copies_allowed = True
    transfer._pool._warned = False
    values = numpy.arange(300, dtype=numpy.float32)
    with pytest.warns(RuntimeWarning, match='pinning .* failed .* staging through pageable'):
        serializers.save_npz(tmp_path / 'm.npz', {'w': device.send(values)})
    target = {'w': device.send(numpy.zeros(300, numpy.float32))}
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # one warning, not one per transfer
        serializers.load_npz(tmp_path / 'm.npz', target)
    assert target['w'].get().tolist() == values.tolist()


def test_the_strict_stand_in_refuses_what_cuda_would():
    device = StandInDevice(0)
    array = device.send(numpy.zeros(10, numpy.uint8))
    stream = BACKEND.stream(device)
    with pytest.raises(StandInError, match='not pinned'):
        BACKEND.to_host_async(BACKEND.as_bytes(array), 0, numpy.zeros(10, numpy.uint8), stream)
    with pytest.raises(StandInError, match='used for device 1'):
        BACKEND.order_after_current(stream, StandInDevice(1))
    with pytest.raises(StandInError, match='non-native byte order'):
        device.send(numpy.zeros(3, '>f4'))


def test_a_device_mapping_loads_without_host_conversion():
    device = StandInDevice(0)
    source = {'w': device.send(numpy.arange(200, dtype=numpy.float32))}
    target = numpy.zeros(200, numpy.float32)
    serializers.NpzDeserializer(source)('w', target)
    assert target.tolist() == list(range(200))


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs fork')
def test_a_forked_child_starts_without_its_parents_buffers_and_streams():
    device = StandInDevice(0)
    b''.join(bytes(c) for c in transfer.host_chunks(device.send(numpy.zeros(100, numpy.uint8))))
    assert transfer._pool._free
    read, write = os.pipe()
    streams, devices.CUPY._streams = devices.CUPY._streams, {0: 'a stream of the parent'}
    devices.gpu_available()  # the parent's answer, cached
    try:
        pid = os.fork()
    finally:
        if pid:
            devices.CUPY._streams = streams
    if pid == 0:
        try:
            fine = (not transfer._pool._free and transfer._ABANDONED
                    and devices.CUPY._streams == {}
                    and devices._usable_cupy.cache_info().currsize == 0)  # asked afresh
            os.write(write, b'ok' if fine else b'kept')
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, 'rb') as f:
        answer = f.read()
    os.waitpid(pid, 0)
    assert answer == b'ok'
    assert transfer._pool._free  # the parent keeps its own


# ---------------------------------------------------------------------------------------------
# Many small arrays: packed into shared buffers, one event per buffer, one ordering per device


def _small_model(device, count: int, elements: int = 10) -> dict:
    return {f'p{i:03d}': device.send(numpy.arange(elements, dtype=numpy.float32) + i)
            for i in range(count)}


def test_small_device_arrays_share_buffers_and_events(tmp_path):
    device = StandInDevice(0)
    model = _small_model(device, 100)  # 40 bytes each, 100 in all: a buffer (64 B) holds one
    with transfer.configure(chunk_bytes=400):  # a buffer holds ten
        serializers.save_npz(tmp_path / 'm.npz', model)
    assert BACKEND.waits == 10 and BACKEND.orderings == [0]
    assert BACKEND.pinned_allocations == 2  # double buffering, reused throughout
    with numpy.load(tmp_path / 'm.npz') as stored:
        for key, array in model.items():
            assert stored[key].tolist() == array.get().tolist(), key


def test_packed_copies_see_what_a_kernel_queued_before_them(tmp_path):
    device = StandInDevice(0)
    model = _small_model(device, 30)
    with BACKEND.using(device):
        for array in model.values():
            BACKEND.launch(device, lambda a=array: a._data.__setitem__(Ellipsis, -1.0))
        with transfer.configure(chunk_bytes=400):
            serializers.save_npz(tmp_path / 'm.npz', model)
    with numpy.load(tmp_path / 'm.npz') as stored:
        assert all((stored[key] == -1.0).all() for key in model)


def test_runs_across_devices_and_the_host_keep_their_order(tmp_path):
    first, second = StandInDevice(0), StandInDevice(1)
    model = {}
    for i in range(24):  # device 0, device 0, host, device 1, ... in runs of two
        place = (first, first, None, second)[i % 4]
        values = numpy.full(5, i, numpy.int64)
        model[f'k{i:02d}'] = values if place is None else place.send(values)
    chunks = list(transfer.host_copies(list(model.values())))  # views valid one at a time
    assert len(chunks) == 24
    serializers.save_npz(tmp_path / 'm.npz', model)
    assert sorted(BACKEND.orderings) == [0, 0, 1, 1]  # once per device per save
    with numpy.load(tmp_path / 'm.npz') as stored:
        assert list(stored.keys()) == list(model)
        assert [int(stored[key][0]) for key in model] == list(range(24))


def test_host_copies_hands_each_view_over_before_reusing_its_buffer():
    device = StandInDevice(0)
    arrays = [device.send(numpy.full(7, i, numpy.int16)) for i in range(50)]
    arrays.append(device.send(numpy.arange(32, dtype=numpy.int16)))  # a whole chunk
    seen = [numpy.frombuffer(view, numpy.int16).tolist()
            for view in transfer.host_copies(arrays)]
    assert seen == [a.get().tolist() for a in arrays]
    assert BACKEND.pending() == 0


def test_only_arrays_that_fit_a_pooled_buffer_are_packed():
    device = StandInDevice(0)
    big = device.send(numpy.zeros(CHUNK + 1, numpy.uint8))
    with pytest.raises(ValueError, match='at most a chunk'):
        list(transfer.host_copies([big]))
    with pytest.raises(ValueError, match='at most a chunk'):
        transfer.fill_many([(big, lambda buffer: None)])
    assert BACKEND.pinned_allocations == 0


def test_host_copies_takes_only_contiguous_arrays():
    device = StandInDevice(0)
    transposed = device.send(numpy.zeros((3, 4))).T
    with pytest.raises(ValueError, match='C-contiguous'):
        list(transfer.host_copies([transposed[:2]]))
    with pytest.raises(ValueError, match='C-contiguous'):
        list(transfer.host_copies([numpy.zeros((3, 4)).T]))


def test_a_small_non_contiguous_device_array_still_saves(tmp_path):
    device = StandInDevice(0)
    values = numpy.arange(12, dtype=numpy.float32).reshape(3, 4)
    model = {'a': device.send(values).T, 'b': device.send(values)}
    serializers.save_npz(tmp_path / 'm.npz', model)
    with numpy.load(tmp_path / 'm.npz') as stored:
        assert stored['a'].tolist() == values.T.tolist()
        assert stored['b'].tolist() == values.tolist()


def test_a_failed_wait_in_a_packed_save_leaves_nothing_behind(tmp_path):
    device = StandInDevice(0)
    (tmp_path / 'm.npz').write_bytes(b'the old file')
    BACKEND.failing_waits = 1
    with pytest.raises(StandInError, match='made to fail'):
        serializers.save_npz(tmp_path / 'm.npz', _small_model(device, 40))
    assert (tmp_path / 'm.npz').read_bytes() == b'the old file'
    assert [p.name for p in tmp_path.iterdir()] == ['m.npz']
    assert BACKEND.pending() == 0  # every copy queued was waited for
    model = _small_model(device, 40)  # and the pool's buffers are fit to reuse
    serializers.save_npz(tmp_path / 'm.npz', model)
    with numpy.load(tmp_path / 'm.npz') as stored:
        assert all(stored[k].tolist() == a.get().tolist() for k, a in model.items())


def test_small_device_arrays_load_through_shared_buffers(tmp_path):
    device = StandInDevice(0)
    model = _small_model(device, 100)
    serializers.save_npz(tmp_path / 'm.npz', {k: a.get() for k, a in model.items()})
    target = {key: device.send(numpy.zeros(10, numpy.float32)) for key in model}
    BACKEND.reset()
    with transfer.configure(chunk_bytes=400):  # a buffer holds ten
        serializers.load_npz(tmp_path / 'm.npz', target)
    assert BACKEND.waits == 10 and BACKEND.orderings == [0]
    assert BACKEND.pending() == 0  # done for every stream on return
    for key, array in model.items():
        assert target[key].get().tolist() == array.get().tolist(), key


def test_a_load_across_devices_and_the_host(tmp_path):
    first, second = StandInDevice(0), StandInDevice(1)
    stored = {f'k{i:02d}': numpy.full(5, i, numpy.int64) for i in range(24)}
    serializers.save_npz(tmp_path / 'm.npz', stored)
    places = [(first, first, None, second)[i % 4] for i in range(24)]
    target = {key: numpy.zeros(5, numpy.int64) if place is None else
              place.send(numpy.zeros(5, numpy.int64))
              for key, place in zip(stored, places, strict=True)}
    serializers.load_npz(tmp_path / 'm.npz', target)
    assert sorted(BACKEND.orderings) == [0, 1]
    for key, array in target.items():
        values = array if isinstance(array, numpy.ndarray) else array.get()
        assert values.tolist() == stored[key].tolist(), key


@pytest.mark.parametrize('compression', [False, True], ids=['stored', 'deflated'])
def test_a_bad_member_in_a_packed_load_fills_only_whole_buffers_before_it(tmp_path,
                                                                          compression):
    device = StandInDevice(0)
    stored = {f'k{i:02d}': numpy.full(10, i + 1, numpy.float32) for i in range(30)}
    serializers.save_npz(tmp_path / 'm.npz', stored, compression=compression)
    with zipfile.ZipFile(tmp_path / 'm.npz') as archive:
        info = archive.getinfo('k15.npy')
    data = bytearray((tmp_path / 'm.npz').read_bytes())
    name_length, extra_length = struct.unpack_from('<HH', data, info.header_offset + 26)
    data_start = info.header_offset + 30 + name_length + extra_length
    data[data_start + info.compress_size - 5] ^= 0xFF  # in member 15's data
    (tmp_path / 'm.npz').write_bytes(bytes(data))
    target = {key: device.send(numpy.zeros(10, numpy.float32)) for key in stored}
    with transfer.configure(chunk_bytes=400), \
            pytest.raises(CorruptFileError, match="'k15'") as caught:
        serializers.load_npz(tmp_path / 'm.npz', target)
    assert caught.value.filled == [f'k{i:02d}' for i in range(10)]  # the first buffer's
    assert caught.value.partly_filled == 'k15'
    for i, (key, array) in enumerate(target.items()):
        assert (array.get() == (i + 1 if i < 10 else 0)).all(), key
    assert BACKEND.pending() == 0


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
@pytest.mark.parametrize('saving', ['sync', 'async'])
def test_sync_waits_for_other_streams_before_a_save(tmp_path, fmt, saving):
    """The contract: a save orders after the current stream only; ``sync=True`` waits for every
    stream of the arrays' devices. The same for asynchronous saves."""
    device = StandInDevice(0)
    save, load = {'npz': (serializers.save_npz, serializers.load_npz),
                  'hdf5': (serializers.save_hdf5, serializers.load_hdf5)}[fmt]
    if saving == 'async':
        def save(path, obj, sync):
            gpuserial.save_async(path, obj, fmt, sync=sync).result(timeout=30)
    for sync in (False, True):
        array = device.send(numpy.zeros(100, numpy.float32))
        with BACKEND.using(device, 'writer'):  # written on a stream not current at the save
            BACKEND.launch(device, lambda a=array: a._data.__setitem__(Ellipsis, 5.0))
        save(tmp_path / f'm.{fmt}', {'w': array}, sync=sync)
        target = {'w': numpy.zeros(100, numpy.float32)}
        load(tmp_path / f'm.{fmt}', target)
        assert (target['w'] == (5.0 if sync else 0.0)).all(), sync
        BACKEND.synchronize_device(device)


def test_a_deserializer_called_directly_with_device_returns_an_array_there(tmp_path):
    device = StandInDevice(0)
    serializers.save_npz(tmp_path / 'm.npz', {'w': numpy.arange(4.0)})
    on_device = device.send(numpy.zeros(4))
    with numpy.load(tmp_path / 'm.npz') as npz:
        loaded = serializers.NpzDeserializer(npz, device='cpu')('w', on_device)
    assert isinstance(loaded, numpy.ndarray) and loaded.tolist() == [0, 1, 2, 3]
    assert on_device.get().tolist() == [0, 0, 0, 0]  # its own array is left alone


def test_a_new_pool_warns_once_when_pinning_fails():
    BACKEND.pinning_fails = True
    try:
        pool = transfer._PinnedPool()
        with pytest.warns(RuntimeWarning, match='pinning'):
            pool._new(BACKEND, 64)
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            pool._new(BACKEND, 64)
    finally:
        BACKEND.pinning_fails = False


def test_wide_elements_go_one_per_chunk_when_a_chunk_holds_less_than_one(small_chunks):
    array = numpy.array([bytes([i]) * 100 for i in range(5)], dtype='S100')
    chunks = [bytes(c) for c in transfer.host_chunks(array)]
    assert [len(c) for c in chunks] == [100] * 5 and b''.join(chunks) == array.tobytes()


@pytest.mark.parametrize('layout', ['contiguous', 'strided'])
def test_a_pending_ctrl_c_stops_host_transfers_between_blocks(layout, small_chunks):
    from gpuserial.storage import _signals
    source = numpy.arange(64, dtype=numpy.float64)
    array = source if layout == 'contiguous' else numpy.arange(128.0)[::2]
    _signals._pending.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            list(transfer.host_chunks(array))
        _signals._pending.set()
        target = numpy.zeros(64) if layout == 'contiguous' else numpy.zeros(128)[::2]
        with pytest.raises(KeyboardInterrupt):
            transfer.fill(target, lambda view: None, numpy.dtype(numpy.float64))
        _signals._pending.set()
        with pytest.raises(KeyboardInterrupt):  # a cast through the scratch buffer
            transfer.fill(numpy.zeros(64), lambda view: None, numpy.dtype(numpy.float32))
    finally:
        _signals._pending.clear()


def test_devices_are_synchronized_once_each_for_a_synchronous_save(tmp_path, monkeypatch):
    device = StandInDevice(0)
    calls = []
    real = BACKEND.synchronize_device
    monkeypatch.setattr(BACKEND, 'synchronize_device',
                        lambda device: calls.append(device) or real(device))
    model = {f'a{i}': device.send(numpy.arange(3.0)) for i in range(4)}
    serializers.save_npz(tmp_path / 'm.npz', model, sync=True)
    assert len(calls) == 1


@pytest.mark.parametrize('where', ['host', 'device'])
def test_a_pending_ctrl_c_stops_a_fill_of_many_small_arrays(where):
    from gpuserial.storage import _signals
    device = StandInDevice(0)
    arrays = [numpy.zeros(4) for _ in range(3)]
    if where == 'device':
        arrays = [device.send(a) for a in arrays]
    read = []
    _signals._pending.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            transfer.fill_many([(a, read.append) for a in arrays])
    finally:
        _signals._pending.clear()
    assert read == []  # stopped before the first read
