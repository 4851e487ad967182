"""End to end: gpuserial's saves and loads beside numpy, raw file I/O, h5py, torch and
safetensors, on the same model (``$GPUSERIAL_BENCH_BYTES``: 1 GiB on the CPU, 4 GiB on a GPU;
1 MiB when timing is disabled).

Compare like with like: gpuserial saves here are ``durable=False`` (no fsync), as their peers
are; the ``+fsync`` pair is the durable one. Compressed saves use a smaller model
(``$GPUSERIAL_BENCH_COMPRESSED_BYTES``, 64 MiB by default), because ``numpy.savez_compressed``
runs at a few tens of MB/s. Quote ``compare.py`` (interleaved rounds) rather than these tables
for ratios: writes are noisy.
"""

from __future__ import annotations

import os

import pytest

from benchmarks import _peers
from benchmarks.conftest import (
    DEVICE_PARAMS,
    bench_bytes,
    device_for,
    record,
    sync_around,
    timing_enabled,
)
from gpuserial.engine import devices
from gpuserial.tools import bench


@pytest.fixture(scope='module', params=DEVICE_PARAMS)
def device(request):
    return device_for(request)


def _context(request, device, tmp_path_factory, env, default_cpu, default_gpu):
    nbytes = bench_bytes(request.config, device, env, default_cpu, default_gpu)
    directory = tmp_path_factory.mktemp('end_to_end')
    with device.use():
        ctx = _peers.Context(bench.make_model(nbytes, device=device), str(directory))
        ctx.device = device
        yield ctx
    for name in os.listdir(directory):
        os.unlink(directory / name)


@pytest.fixture(scope='module')
def ctx(request, device, tmp_path_factory):
    yield from _context(request, device, tmp_path_factory, 'GPUSERIAL_BENCH_BYTES', bench.GiB,
                        4 * bench.GiB)


@pytest.fixture(scope='module')
def small_ctx(request, device, tmp_path_factory):
    yield from _context(request, device, tmp_path_factory, 'GPUSERIAL_BENCH_COMPRESSED_BYTES',
                        64 * bench.MiB, 64 * bench.MiB)


def _compressed(op: _peers.Op) -> bool:
    return 'compress' in op.name


def _usable(op: _peers.Op, ctx: _peers.Context) -> None:
    if op.needs is not None:
        pytest.importorskip(op.needs)
    if op.needs is not None and not ctx.on_host and not isinstance(ctx.device,
                                                                   devices.CudaDevice):
        pytest.skip(f'{op.name} takes NumPy or CUDA arrays only')
    if not op.available(ctx):
        pytest.skip(f'{op.name} reads and writes host memory only')
    if op.name.endswith('of a host copy') and ctx.on_host:
        pytest.skip('the model is in host memory already')


def _sync_writes(request) -> None:
    if timing_enabled(request.config):
        os.sync()  # no save pays for the previous one's writeback


@pytest.mark.parametrize('op', [pytest.param(op, id=op.name) for op in _peers.SAVES])
def test_save(benchmark, request, rounds, machine, op, ctx, small_ctx):
    ctx = small_ctx if _compressed(op) else ctx
    _usable(op, ctx)
    path = ctx.path(_peers.file_name(op))

    def setup():
        _peers.remove(path)
        _sync_writes(request)
        return (ctx, path), {}

    benchmark.group = f'save {ctx.device.name} {bench.format_size(ctx.nbytes)}'
    benchmark.pedantic(sync_around(op.run, ctx.device), setup=setup, rounds=rounds)
    op.check(ctx, path)
    record(benchmark, machine, ctx.device, ctx.nbytes, file_bytes=os.path.getsize(path))
    _peers.remove(path)


@pytest.mark.parametrize('op', [pytest.param(op, id=op.name) for op in _peers.LOADS])
def test_load(benchmark, rounds, machine, op, ctx, small_ctx):
    ctx = small_ctx if _compressed(op) else ctx
    _usable(op, ctx)
    path = ctx.path(_peers.file_name(op))
    op.prepare(ctx, path)

    def setup():
        ctx.clear_target()
        return (ctx, path), {}

    benchmark.group = f'load {ctx.device.name} {bench.format_size(ctx.nbytes)}'
    result = benchmark.pedantic(sync_around(op.run, ctx.device), setup=setup, rounds=rounds,
                                warmup_rounds=1 if rounds > 1 else 0)
    if op.new_arrays:
        ctx.check_arrays(result)
    else:
        ctx.check_target()
    record(benchmark, machine, ctx.device, ctx.nbytes, file_bytes=os.path.getsize(path))
    _peers.remove(path)
