"""``gpuserial demo``: a model saved and loaded in NPZ and HDF5, checked, and timed.

It builds a model of float32 arrays of several shapes (an embedding, a convolution with its
batch normalization, a fully connected layer, biases, and an odd-sized head) on the GPU when
one is usable and on the CPU otherwise, saves it as NPZ and as HDF5, loads each file back into
a fresh zeroed model on the same device, checks every value bit for bit, and prints per format
the file size, the save and load times and their throughput.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TextIO

import numpy

from gpuserial.engine import devices
from gpuserial.formats import hdf5, npz

__all__ = ['DEFAULT_SIZE', 'MIN_SIZE', 'FormatResult', 'make_model', 'run']

MiB = 1 << 20
DEFAULT_SIZE = 256 * MiB
MIN_SIZE = 64 << 10  # below this the layers' fixed widths no longer fit
EMBED_WIDTH = 512


def _shapes(size: int) -> dict[str, tuple[int, ...]]:
    """The demo model's shapes, with ``size // 4`` float32 elements in all.

    An embedding (30%), a square 3x3 convolution (15%) with its bias and batch normalization,
    a square fully connected layer (35%) with its bias, and a head of whatever is left (an odd
    length, so that it ends inside a chunk).
    """
    elements = size // 4
    channels = max(1, math.isqrt(int(elements * 0.15) // 9))
    units = max(1, math.isqrt(int(elements * 0.35)))
    shapes = {'embed/W': (max(1, int(elements * 0.30) // EMBED_WIDTH), EMBED_WIDTH),
              'conv1/W': (channels, channels, 3, 3), 'conv1/b': (channels,)}
    for name in ('gamma', 'beta', 'avg_mean', 'avg_var'):
        shapes[f'bn1/{name}'] = (channels,)
    shapes['fc1/W'] = (units, units)
    shapes['fc1/b'] = (units,)
    used = sum(math.prod(shape) for shape in shapes.values())
    shapes['head/W'] = (elements - used,)
    return shapes


def make_model(size: int, device: devices.Device, *, seed: int = 0, zeros: bool = False
               ) -> dict[str, dict]:
    """A nested dict (``layer -> name -> array``) of float32 arrays of ``size`` bytes in all.

    Args:
        size: total bytes (rounded down to whole float32 values); at least :data:`MIN_SIZE`.
        device: where the arrays live.
        seed: the seed of the normal random values.
        zeros: make zeroed arrays instead (a fresh model to load into).

    Raises:
        ValueError: ``size`` is below :data:`MIN_SIZE`.
    """
    if size < MIN_SIZE:
        raise ValueError(f'a demo model needs at least {MIN_SIZE // 1024} KiB, got {size} bytes')
    rng = numpy.random.default_rng(seed)
    model: dict[str, dict] = {}
    for key, shape in _shapes(size).items():
        layer, name = key.split('/')
        if zeros:
            with device.use():
                array = device.xp.full(shape, 0, numpy.float32)  # touched, as a live model's
        else:
            array = device.send(rng.standard_normal(shape, dtype=numpy.float32))
        model.setdefault(layer, {})[name] = array
    return model


def _arrays(model: dict) -> dict:
    return {f'{layer}/{name}': a for layer, arrays in model.items() for name, a in arrays.items()}


def _synchronize(device: devices.Device) -> None:
    if not device.backend.is_host:
        device.backend.synchronize_device(device)


def _timed(function: Callable[[], object], device: devices.Device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    function()
    _synchronize(device)
    return time.perf_counter() - start


def _mismatches(original: dict, loaded: dict) -> list[str]:
    """Keys whose loaded values differ from the original bits."""
    bad = []
    loaded = _arrays(loaded)
    for key, array in _arrays(original).items():
        other = loaded[key]
        xp = devices.get_array_module(array)
        if not bool(xp.array_equal(array.view(numpy.uint32), other.view(numpy.uint32))):
            bad.append(key)
    return bad


@dataclasses.dataclass(frozen=True)
class FormatResult:
    """One format's round trip."""

    name: str
    call: str
    path: str
    file_size: int
    nbytes: int
    save_s: float
    load_s: float
    mismatches: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _round_trip(name, call, path, save, load, model, size, device) -> FormatResult:
    save_s = _timed(lambda: save(path, model), device)
    fresh = make_model(size, device, zeros=True)
    load_s = _timed(lambda: load(path, fresh), device)
    nbytes = sum(int(a.nbytes) for a in _arrays(model).values())
    return FormatResult(name, call, path, os.path.getsize(path), nbytes, save_s, load_s,
                        tuple(_mismatches(model, fresh)))


def _describe_device(device: devices.Device, asked: bool) -> str:
    if device.backend.is_host:
        why = 'as asked' if asked else 'no usable GPU: cupy missing or cupy.is_available() False'
        return f'the CPU (NumPy; {why})'
    assert isinstance(device, devices.CudaDevice)  # the demo's devices: the CPU or a GPU
    try:
        name = device.xp.cuda.runtime.getDeviceProperties(device.id)['name']
        name = name.decode() if isinstance(name, bytes) else name
    except Exception:  # the name is decoration only
        name = 'GPU'
    return f'cuda:{device.id} ({name}, CuPy)'


def _gbps(nbytes: int, seconds: float) -> str:
    return f'{nbytes / seconds / 1e9:.2f}' if seconds > 0 else 'inf'


def _table(results: list[FormatResult]) -> str:
    lines = [f'{"format":<7} {"saved with":<31} {"file size":>10} {"save s":>8} {"load s":>8} '
             f'{"save GB/s":>10} {"load GB/s":>10}  check']
    for r in results:
        check = 'ok, bit-exact' if r.ok else f'FAILED: {", ".join(r.mismatches)}'
        lines.append(f'{r.name:<7} {r.call:<31} {r.file_size / MiB:>6.1f} MiB {r.save_s:>8.3f} '
                     f'{r.load_s:>8.3f} {_gbps(r.nbytes, r.save_s):>10} '
                     f'{_gbps(r.nbytes, r.load_s):>10}  {check}')
    return '\n'.join(lines)


def run(size: int = DEFAULT_SIZE, device=None, directory: str | None = None, *,
        compress: bool = False, out: TextIO | None = None) -> int:
    """Runs the demo and prints its table.

    Args:
        size: the model's size in bytes.
        device: where the model lives (default: GPU 0's current device when a GPU is usable,
            else the CPU).
        directory: keep the files there (``demo.npz``, ``demo.h5``); by default they go to a
            temporary directory that is removed afterwards.
        compress: save with Chainer's defaults (NPZ deflate, HDF5 gzip 4) instead of the
            uncompressed fast path.
        out: where to print (default: ``sys.stdout`` at the time of the call).

    Returns:
        0 when every value came back bit-exactly in both formats, else 1.

    Raises:
        gpuserial.errors.DeviceError: ``device`` is unknown or not usable.
        ValueError: ``size`` is too small.
    """
    out = sys.stdout if out is None else out
    target = devices.default_device() if device is None else devices.get_device(device)
    model = make_model(size, target)
    count = len(_arrays(model))
    level = 4 if compress else 0
    formats = [('NPZ', f'save_npz(compression={compress})', 'demo.npz',
                lambda p, m: npz.save_npz(p, m, compression=compress, progress=False),
                lambda p, m: npz.load_npz(p, m, progress=False)),
               ('HDF5', f'save_hdf5(compression={level})', 'demo.h5',
                lambda p, m: hdf5.save_hdf5(p, m, compression=level, progress=False),
                lambda p, m: hdf5.load_hdf5(p, m, progress=False))]
    print(f'gpuserial demo: a {size / MiB:g} MiB model of {count} float32 arrays on '
          f'{_describe_device(target, device is not None)}', file=out)
    with tempfile.TemporaryDirectory(prefix='gpuserial-demo-') as temp:
        where = temp if directory is None else os.fsdecode(directory)
        if not os.path.isdir(where):
            if os.path.exists(where):
                raise NotADirectoryError(f'{where!r}: not a directory')
            os.mkdir(where)  # not its parents: a misspelt path fails here, naming itself
        print(f'files in {where}' + (' (removed afterwards)' if directory is None else ''),
              file=out)
        results = [_round_trip(name, call, os.path.join(where, file), save, load, model, size,
                               target) for name, call, file, save, load in formats]
    print(file=out)
    print(_table(results), file=out)
    print(file=out)
    print('Times are wall-clock, including the fsync of each save; loads read from the page '
          'cache.', file=out)
    if not compress:
        print('Uncompressed is the fast path; --compress saves with Chainer\'s defaults '
              '(NPZ deflate, HDF5 gzip 4).', file=out)
    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f'FAILED: values differ after the {" and ".join(failed)} round trip', file=out)
        return 1
    print(f'All {count} arrays came back bit-exactly from both formats.', file=out)
    return 0
