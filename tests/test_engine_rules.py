"""The staging engine keeps CUDA's rules, on the strict stand-in device (see tests/standin.py):
it orders its copies after the caller's stream, finishes every load for every stream, stages
non-contiguous arrays block by block, survives failed reads and waits, pins nothing for empty
arrays, falls back to pageable memory, and forgets its buffers and streams in a forked child."""

import os
import warnings

import numpy
import pytest

from gpuserial import devices, serializers, transfer
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
    pid = os.fork()
    if pid == 0:
        try:
            fine = (not transfer._pool._free and transfer._ABANDONED
                    and devices.CUPY._streams == {})
            os.write(write, b'ok' if fine else b'kept')
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, 'rb') as f:
        answer = f.read()
    os.waitpid(pid, 0)
    assert answer == b'ok'
    assert transfer._pool._free  # the parent keeps its own
