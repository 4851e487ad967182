"""Benchmark fixtures: sizes (tiny when timing is disabled), devices, machine records.

The ``gpu`` marker's skip and the stand-in backend come from the tests' conftest, so that the
benchmarks run where the tests run: with ``--benchmark-disable`` (the default in pyproject),
each benchmark runs once on 1 MiB as an ordinary test, and cannot rot.
"""

from __future__ import annotations

import os

import pytest

from gpuserial.engine import devices
from gpuserial.tools import bench
from tests.conftest import (  # noqa: F401 (a fixture, used)
    _standin_backend,
    make_device,
    pytest_collection_modifyitems,  # noqa: F401 (the gpu marker's skip)
)

TINY_BYTES = 1 << 20
DEFAULT_ROUNDS = 5

DEVICE_PARAMS = [
    pytest.param('cpu', id='cpu'),
    pytest.param('standin:0', id='standin'),  # the GPU path's code, on the CPU
    pytest.param('cuda:0', id='cuda0', marks=pytest.mark.gpu),
]


def timing_enabled(config) -> bool:
    return bool((config.getoption('benchmark_enable') or not config.getoption('benchmark_disable'))
                and not config.getoption('benchmark_skip'))


def bench_bytes(config, device: devices.Device, env: str = 'GPUSERIAL_BENCH_BYTES',
                default_cpu: int = bench.GiB, default_gpu: int = 4 * bench.GiB) -> int:
    """The size to benchmark: tiny without timing, else ``$env`` or the default for the device."""
    if not timing_enabled(config):
        return TINY_BYTES
    if os.environ.get(env):
        return bench.parse_size(os.environ[env])
    return default_cpu if device.backend.is_host else default_gpu


@pytest.fixture(scope='session')
def rounds(request) -> int:
    if not timing_enabled(request.config):
        return 1
    return int(os.environ.get('GPUSERIAL_BENCH_ROUNDS', DEFAULT_ROUNDS))


@pytest.fixture(scope='session')
def machine() -> dict:
    return bench.machine_info()


def device_for(request) -> devices.Device:
    """The device a ``DEVICE_PARAMS`` parameter names; the stand-in only with timing disabled
    (it checks the GPU path's code and has nothing real to time)."""
    if request.param.startswith('standin') and timing_enabled(request.config):
        pytest.skip('the stand-in device only checks the code; it has nothing to time')
    return make_device(request.param)


def record(benchmark, machine: dict, device: devices.Device, nbytes: int, **extra) -> None:
    """What every benchmark records: bytes moved (for throughput), the device and machine."""
    benchmark.extra_info.update(bytes=nbytes, device=device.name, machine=machine, **extra)


def sync_around(function, device: devices.Device):
    """``function`` followed by a device synchronize, so the clock stops after the copies."""
    sync = bench.device_sync(device)
    if sync is None:
        return function

    def synced(*args, **kwargs):
        result = function(*args, **kwargs)
        sync()
        return result
    return synced
