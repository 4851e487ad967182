"""Transfer: the staging engine against pageable copies and a single pinned copy (the bus).

Device-to-host ends in a pageable host array and host-to-device starts from one, so that the
engine (through pinned chunks, overlapped) and ``cupy.asnumpy`` / ``ndarray.set`` do the same
work; the pinned single ``cudaMemcpy`` of the whole array is the bus limit. On the CPU, the
engine over a NumPy array is set against a plain ``numpy.copyto`` (its overhead).
"""

from __future__ import annotations

import numpy
import pytest

from benchmarks.conftest import DEVICE_PARAMS, bench_bytes, device_for, record, sync_around
from gpuserial.tools import bench


@pytest.fixture(scope='module', params=DEVICE_PARAMS)
def arrays(request):
    """(device, its array, the host original, a pageable host array to copy back into)."""
    device = device_for(request)
    nbytes = bench_bytes(request.config, device)
    host = bench.make_array(nbytes)
    with device.use():
        yield device, device.send(host.copy()), host, numpy.zeros_like(host)


def _run(benchmark, rounds, machine, arrays, group, function, setup, arrived=None):
    """Times ``function`` (each round after ``setup`` cleared its destination), then checks that
    the destination holds what the last round carried: ``arrived()``, by default ``back``
    after a device-to-host copy and the device ``array`` after a host-to-device one."""
    device, array, host, back = arrays
    benchmark.group = f'{group} {device.name} {bench.format_size(host.nbytes)}'
    record(benchmark, machine, device, host.nbytes)
    benchmark.pedantic(sync_around(function, device), setup=setup, rounds=rounds,
                       warmup_rounds=1 if rounds > 1 else 0)
    if arrived is None:
        arrived = (lambda: back) if group == 'device-to-host' else (
            lambda: array if device.backend.is_host else device.backend.to_numpy(array))
    numpy.testing.assert_array_equal(numpy.asarray(arrived()).reshape(host.shape), host)


def test_to_host_engine(benchmark, rounds, machine, arrays):
    device, array, host, back = arrays
    _run(benchmark, rounds, machine, arrays, 'device-to-host',
         lambda: bench.engine_to_host(array, back), setup=lambda: back.fill(0))


def test_to_host_pageable(benchmark, rounds, machine, arrays):
    device, array, host, back = arrays
    if device.backend.is_host:
        pytest.skip('no pageable device copy on the CPU (see the memcpy row)')

    def copy():
        back[...] = device.backend.to_numpy(array)  # cupy.asnumpy
    _run(benchmark, rounds, machine, arrays, 'device-to-host', copy, setup=lambda: back.fill(0))


def test_to_host_pinned_single_copy(benchmark, rounds, machine, arrays):
    device, array, host, back = arrays
    if device.backend.is_host:
        pytest.skip('no pinned copy on the CPU')
    backend = device.backend
    pinned = backend.pinned(host.nbytes)
    stream = backend.stream(device)
    flat = backend.as_bytes(array)
    _run(benchmark, rounds, machine, arrays, 'device-to-host',
         lambda: bench.waited(backend, stream,
                              lambda: backend.to_host_async(flat, 0, pinned, stream)),
         setup=lambda: pinned.fill(0), arrived=lambda: pinned.view(host.dtype))


def test_to_host_memcpy(benchmark, rounds, machine, arrays):
    device, array, host, back = arrays
    if not device.backend.is_host:
        pytest.skip('the CPU baseline')
    _run(benchmark, rounds, machine, arrays, 'device-to-host',
         lambda: numpy.copyto(back, array), setup=lambda: back.fill(0))


def _clear(device, array):
    def clear():  # and wait for it: the timed copy runs on another stream
        if device.backend.is_host:
            array.fill(0)
        else:
            device.backend.assign(array, device.send(numpy.zeros(array.shape, array.dtype)))
            device.backend.synchronize_device(device)
    return clear


def test_from_host_engine(benchmark, rounds, machine, arrays):
    device, array, host, back = arrays
    _run(benchmark, rounds, machine, arrays, 'host-to-device',
         lambda: bench.engine_from_host(host, array), setup=_clear(device, array))


def test_from_host_pageable(benchmark, rounds, machine, arrays):
    device, array, host, back = arrays
    if not hasattr(array, 'set'):
        pytest.skip('ndarray.set is CuPy\'s')
    _run(benchmark, rounds, machine, arrays, 'host-to-device', lambda: array.set(host),
         setup=_clear(device, array))


def test_from_host_pinned_single_copy(benchmark, rounds, machine, arrays):
    device, array, host, back = arrays
    if device.backend.is_host:
        pytest.skip('no pinned copy on the CPU')
    backend = device.backend
    pinned = backend.pinned(host.nbytes)
    pinned.view(host.dtype)[...] = host
    stream = backend.stream(device)
    flat = backend.as_bytes(array)
    _run(benchmark, rounds, machine, arrays, 'host-to-device',
         lambda: bench.waited(backend, stream,
                              lambda: backend.from_host_async(pinned, flat, 0, stream)),
         setup=_clear(device, array))


def test_from_host_memcpy(benchmark, rounds, machine, arrays):
    device, array, host, back = arrays
    if not device.backend.is_host:
        pytest.skip('the CPU baseline')
    _run(benchmark, rounds, machine, arrays, 'host-to-device',
         lambda: numpy.copyto(array, host), setup=_clear(device, array))
