"""The GPU path on a real GPU: ordering against the caller's streams, non-contiguous arrays,
loads onto a named device, long arrays, failures, device memory. Skipped where no GPU is usable;
``ci/gpu.sh quick`` runs them on a lent one.

A slow kernel (one that spins for a while before it writes or reads) makes ordering bugs show:
a save that does not wait for it reads the old values; a load that does not wait for it
overwrites what it has yet to read.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import numpy
import pytest

from gpuserial import serializers
from gpuserial.engine import devices, transfer
from tests.conftest import ROOT

pytestmark = pytest.mark.gpu

SPIN = 200_000_000  # clock cycles a slow kernel waits before it works: about 0.1 s
KERNELS = r'''
extern "C" __global__ void slow_fill(float* out, float value, long long n, long long spin) {
    long long start = clock64();
    while (clock64() - start < spin) { }
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = value;
}
extern "C" __global__ void slow_copy(const float* src, float* dst, long long n, long long spin) {
    long long start = clock64();
    while (clock64() - start < spin) { }
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
'''


@pytest.fixture(scope='module')
def cupy():
    return devices.get_device('cuda:0').xp


def build_kernels(cupy):
    module = cupy.RawModule(code=KERNELS)
    return module.get_function('slow_fill'), module.get_function('slow_copy')


@pytest.fixture(scope='module')
def kernels(cupy):
    return build_kernels(cupy)


def _slow_fill(kernels, array, value):
    kernels[0]((256,), (256,), (array, numpy.float32(value), numpy.int64(array.size),
                                numpy.int64(SPIN)))


def _slow_copy(kernels, src, dst):
    kernels[1]((256,), (256,), (src, dst, numpy.int64(src.size), numpy.int64(SPIN)))


FORMATS = {'npz': (serializers.save_npz, serializers.load_npz),
           'hdf5': (serializers.save_hdf5, serializers.load_hdf5)}


def _in_thread(function):
    errors = []
    thread = threading.Thread(target=lambda: _catch(function, errors))
    thread.start()
    thread.join(60)
    if errors:
        raise errors[0]


def _catch(function, errors):
    try:
        function()
    except BaseException as error:  # noqa: B036 - raised again in the test's thread
        errors.append(error)


def save_after_a_slow_fill(path, cupy, kernels, fmt: str) -> None:
    """Queues a slow kernel that fills an array with 7 on the current stream, saves the array
    at once, and checks that the file holds the sevens."""
    save, load = FORMATS[fmt]
    array = cupy.zeros(1 << 20, numpy.float32)
    cupy.cuda.get_current_stream().synchronize()
    _slow_fill(kernels, array, 7.0)  # queued on the current stream, not yet run
    save(path, {'w': array})
    target = {'w': numpy.zeros(1 << 20, numpy.float32)}
    load(path, target)
    assert (target['w'] == 7.0).all()


@pytest.mark.parametrize('where', ['default stream', 'non-blocking stream', 'second thread'])
@pytest.mark.parametrize('fmt', list(FORMATS))
def test_a_save_waits_for_a_slow_kernel_that_writes_the_array(tmp_path, cupy, kernels, fmt,
                                                              where):
    def work():
        save_after_a_slow_fill(tmp_path / f'm.{fmt}', cupy, kernels, fmt)

    if where == 'second thread':
        _in_thread(work)
    elif where == 'non-blocking stream':
        with cupy.cuda.Stream(non_blocking=True):
            work()
    else:
        work()


@pytest.mark.parametrize('where', ['default stream', 'non-blocking stream'])
@pytest.mark.parametrize('fmt', list(FORMATS))
def test_a_load_waits_for_a_slow_kernel_that_reads_the_target(tmp_path, cupy, kernels, fmt,
                                                             where):
    save, load = FORMATS[fmt]
    path = tmp_path / f'm.{fmt}'
    save(path, {'w': numpy.full(1 << 20, 3.0, numpy.float32)})
    with cupy.cuda.Stream(non_blocking=True) if where != 'default stream' else _nothing():
        target = cupy.ones(1 << 20, numpy.float32)
        seen = cupy.zeros(1 << 20, numpy.float32)
        cupy.cuda.get_current_stream().synchronize()
        _slow_copy(kernels, target, seen)  # reads the old values, later
        load(path, {'w': target})
        cupy.cuda.get_current_stream().synchronize()
    assert (seen.get() == 1.0).all() and (target.get() == 3.0).all()


@pytest.mark.parametrize('where', ['default stream', 'non-blocking stream'])
def test_many_small_arrays_packed_wait_for_slow_kernels_both_ways(tmp_path, cupy, kernels,
                                                                  where):
    """Small arrays go through shared pinned buffers (one event per buffer): a save still sees
    what slow kernels wrote, a load still lets slow kernels read the old values first."""
    path = tmp_path / 'm.npz'
    with cupy.cuda.Stream(non_blocking=True) if where != 'default stream' else _nothing():
        arrays = {f'p{i:04d}': cupy.zeros(1000, numpy.float32) for i in range(300)}
        cupy.cuda.get_current_stream().synchronize()
        for i, array in enumerate(arrays.values()):
            if i % 50 == 0:
                _slow_fill(kernels, array, float(i))
            else:
                array.fill(float(i))
        with transfer.configure(chunk_bytes=64 << 10):  # 16 arrays a buffer
            serializers.save_npz(path, arrays, compression=False)
        with numpy.load(path) as stored:
            assert all((stored[key] == i).all() for i, key in enumerate(arrays))
        targets = {key: cupy.full(1000, -1.0, numpy.float32) for key in arrays}
        seen = {key: cupy.zeros(1000, numpy.float32) for key in arrays}
        cupy.cuda.get_current_stream().synchronize()
        for key in list(arrays)[::50]:
            _slow_copy(kernels, targets[key], seen[key])
        with transfer.configure(chunk_bytes=64 << 10):
            serializers.load_npz(path, targets)
        cupy.cuda.get_current_stream().synchronize()
    assert all((seen[key].get() == -1.0).all() for key in list(arrays)[::50])
    assert all((targets[key].get() == i).all() for i, key in enumerate(arrays))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc_info):
        return False


def test_per_thread_default_streams_in_a_subprocess(tmp_path):
    script = ('import pathlib, sys\n'
              'from gpuserial.engine import devices\n'
              'from tests import test_gpu\n'
              'cupy = devices.get_device(0).xp\n'
              'test_gpu.save_after_a_slow_fill(pathlib.Path(sys.argv[1]) / "m.npz", cupy,\n'
              '                                test_gpu.build_kernels(cupy), "npz")\n'
              'print("ok")\n')
    env = dict(os.environ, CUPY_CUDA_PER_THREAD_DEFAULT_STREAM='1', PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, '-c', script, str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == 'ok', result.stderr


@pytest.mark.parametrize('layout', ['transposed', 'every other column'])
@pytest.mark.parametrize('fmt', list(FORMATS))
def test_non_contiguous_sources_and_targets(tmp_path, cupy, fmt, layout):
    save, load = FORMATS[fmt]
    values = numpy.arange(300 * 400, dtype=numpy.float32).reshape(300, 400)
    if layout == 'transposed':
        source = cupy.asarray(numpy.ascontiguousarray(values.T)).T
        base = cupy.zeros((400, 300), numpy.float32)
        target = base.T
    else:
        wide = numpy.zeros((300, 800), numpy.float32)
        wide[:, ::2] = values
        source = cupy.asarray(wide)[:, ::2]
        base = cupy.full((300, 800), -1.0, numpy.float32)
        target = base[:, ::2]
    with transfer.configure(chunk_bytes=64 << 10):  # many blocks
        save(tmp_path / f'm.{fmt}', {'w': source})
        load(tmp_path / f'm.{fmt}', {'w': target})
    assert (target.get() == values).all()
    if layout != 'transposed':
        assert (base[:, 1::2].get() == -1.0).all()  # the rest of the base array untouched


def test_device_loads_into_none_targets(tmp_path, cupy):
    serializers.save_npz(tmp_path / 'm.npz', {'w': numpy.arange(10.0), 'zero_d': 2.5,
                                              'big': numpy.arange(5, dtype='>f4')})
    loaded = {'w': None, 'big': None, 'zero_d': None}
    serializers.load_npz(tmp_path / 'm.npz', loaded, device='cuda:0')
    assert isinstance(loaded['w'], cupy.ndarray) and loaded['w'].get().tolist() == list(range(10))
    assert loaded['big'].dtype == numpy.float32 and loaded['big'].get().tolist() == [0, 1, 2, 3, 4]
    assert loaded['zero_d'].shape == () and float(loaded['zero_d']) == 2.5


def test_zero_d_and_big_endian_arrays_go_to_the_gpu(cupy):
    device = devices.get_device('cuda:0')
    assert float(device.send(numpy.float32(1.5))) == 1.5
    swapped = device.send(numpy.arange(4, dtype='>i4'))
    assert swapped.dtype == numpy.int32 and swapped.get().tolist() == [0, 1, 2, 3]


def test_arrays_many_chunks_long_at_the_default_chunk_size(tmp_path, cupy):
    values = numpy.random.default_rng(0).standard_normal(25 << 20, numpy.float32)  # 100 MiB
    array = cupy.asarray(values)
    serializers.save_npz(tmp_path / 'big.npz', {'w': array}, compression=False)
    target = {'w': cupy.zeros_like(array)}
    serializers.load_npz(tmp_path / 'big.npz', target)
    assert bool((target['w'] == array).all())


class _FailsAfter(io.RawIOBase):
    def __init__(self, data: bytes, limit: int):
        self.data, self.limit, self.position = data, limit, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        self.position = {0: offset, 1: self.position + offset, 2: len(self.data) + offset}[whence]
        return self.position

    def tell(self):
        return self.position

    def readinto(self, buffer):
        if self.position > self.limit:
            raise OSError('the disk went away')
        count = min(len(buffer), len(self.data) - self.position)
        buffer[:count] = self.data[self.position:self.position + count]
        self.position += count
        return count


def test_a_failed_read_mid_array_then_a_load_that_reuses_the_pool(cupy):
    values = numpy.arange(8 << 20, dtype=numpy.float32)  # 32 MiB: chunks in flight
    out = io.BytesIO()
    serializers.save_npz(out, {'w': values}, compression=False)
    data = out.getvalue()
    target = {'w': cupy.zeros(values.size, numpy.float32)}
    with pytest.raises(Exception, match='the disk went away'):
        serializers.load_npz(_FailsAfter(data, len(data) // 2), target)
    serializers.load_npz(io.BytesIO(data), target)
    assert (target['w'].get() == values).all()


def test_a_load_in_place_takes_no_device_memory(tmp_path, cupy):
    values = numpy.arange(4 << 20, dtype=numpy.float32)
    serializers.save_npz(tmp_path / 'm.npz', {'w': values}, compression=False)
    target = {'w': cupy.zeros(values.size, numpy.float32)}
    pool = cupy.get_default_memory_pool()
    before = pool.used_bytes()
    serializers.load_npz(tmp_path / 'm.npz', target)
    assert pool.used_bytes() == before
    assert (target['w'].get() == values).all()
