"""``gpuserial bench``: transfer and save/load throughput on this machine, as a table.

At each array size it times, best of ``repeat``:

- the staging engine: device-to-host (:func:`gpuserial.engine.transfer.host_chunks` into a pageable
  host array) and host-to-device (:func:`gpuserial.engine.transfer.fill` from one); on a GPU beside
  ``cupy.asnumpy`` / ``ndarray.set`` and a single pinned ``cudaMemcpy`` of the whole array (the
  bus limit), on the CPU beside a plain ``numpy.copyto`` (the engine's overhead);
- ``save_npz`` / ``load_npz`` / ``save_hdf5`` / ``load_hdf5`` of one array of that size,
  uncompressed, ``durable=False``, in a temporary directory (the page cache, not the disk).

The side-by-side comparisons with numpy, h5py, torch and safetensors live in ``benchmarks/``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json as jsonlib
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import TextIO

import numpy

from gpuserial.engine import devices, transfer
from gpuserial.formats import hdf5, npz

__all__ = ['DEFAULT_SIZES', 'Row', 'machine_info', 'make_array', 'make_model', 'parse_size', 'run']

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_SIZES = (1 * MiB, 16 * MiB, 256 * MiB)
DEFAULT_REPEAT = 3
_BLOCK_ELEMENTS = 1 << 20  # make_model fills layers from one block of this many random floats
_UNITS = {'': 1, 'b': 1, 'k': KiB, 'kb': 1000, 'kib': KiB, 'm': MiB, 'mb': 1000 ** 2,
          'mib': MiB, 'g': GiB, 'gb': 1000 ** 3, 'gib': GiB}
_VERSIONED = ('numpy', 'h5py', 'isal', 'cupy', 'cupy-cuda12x', 'cupy-cuda13x', 'torch',
              'safetensors', 'pytest-benchmark')


def parse_size(text: str) -> int:
    """Bytes from ``'4096'``, ``'16MiB'``, ``'1GiB'``, ``'1.5G'`` (K/M/G are binary).

    Raises:
        ValueError: the text is not a size.
    """
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*', str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(f'not a size: {text!r} (try 4096, 16MiB, 1GiB)')
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: int) -> str:
    for unit, size in (('GiB', GiB), ('MiB', MiB), ('KiB', KiB)):
        if nbytes >= size:
            return f'{nbytes / size:g} {unit}'
    return f'{nbytes} B'


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemTotal:'):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict:
    """The machine and library versions, for benchmark records (imports nothing heavy)."""
    versions = {'python': platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    import h5py
    versions['hdf5'] = h5py.version.hdf5_version
    info = {'cpu': _cpu_model(), 'cores': os.cpu_count(), 'memory_bytes': _memory_bytes(),
            'platform': platform.platform(), 'versions': versions, 'gpu': None}
    if devices.gpu_available():
        cupy = devices.get_device(0).xp
        runtime = cupy.cuda.runtime
        properties = runtime.getDeviceProperties(0)
        name = properties['name']
        info['gpu'] = {'name': name.decode() if isinstance(name, bytes) else name,
                       'count': runtime.getDeviceCount(),
                       'memory_bytes': properties['totalGlobalMem'],
                       'driver': runtime.driverGetVersion(),
                       'runtime': runtime.runtimeGetVersion()}
    return info


def make_model(nbytes: int, *, device=None, layers: int = 8, seed: int = 0) -> dict:
    """A model-like dict of float32 arrays of about ``nbytes`` in all, on ``device``.

    ``layers`` weight matrices (1024 columns where they are large enough) and their small
    biases, keys ``l<i>/W`` and ``l<i>/b``. The values are normal (like trained weights, so
    deflate gains about 7%), tiled from one random block so that making a large model costs
    about a memcpy; the tiling period (4 MiB) is far beyond deflate's 32 KiB window.
    """
    device = devices.get_device('cpu' if device is None else device)
    rng = numpy.random.default_rng(seed)
    block = rng.standard_normal(_BLOCK_ELEMENTS + layers * 997, dtype=numpy.float32)
    elements = max(nbytes // 4, layers)
    bias_size = min(1024, max(1, elements // layers // 64))
    weight_size = max(1, (elements - layers * bias_size) // layers)
    columns = 1024 if weight_size >= 1024 * 16 else 1
    model = {}
    for i in range(layers):
        weight = numpy.empty((weight_size // columns, columns), numpy.float32)
        _tile(weight.reshape(-1), block[i * 997:])
        model[f'l{i}/W'] = device.send(weight)
        model[f'l{i}/b'] = device.send(block[-bias_size - i:][:bias_size].copy())
        del weight
    return model


def make_array(nbytes: int, *, device=None, seed: int = 0):
    """One float32 array of ``nbytes // 4`` normal values (at least one) on ``device``."""
    device = devices.get_device('cpu' if device is None else device)
    block = numpy.random.default_rng(seed).standard_normal(_BLOCK_ELEMENTS, dtype=numpy.float32)
    array = numpy.empty(max(nbytes // 4, 1), numpy.float32)
    _tile(array, block)
    return device.send(array)


def _tile(out: numpy.ndarray, block: numpy.ndarray) -> None:
    block = block[:_BLOCK_ELEMENTS]
    for start in range(0, out.size, block.size):
        piece = out[start:start + block.size]
        numpy.copyto(piece, block[:piece.size])


def model_nbytes(model: dict) -> int:
    return sum(int(a.nbytes) for a in model.values())


# ---------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Row:
    """One timed operation: ``nbytes`` moved in ``seconds`` (the best of the repeats)."""

    group: str  # 'transfer' or 'save/load'
    device: str
    name: str
    nbytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float('inf')


def best_time(function: Callable[[], object], repeat: int,
              setup: Callable[[], object] | None = None,
              sync: Callable[[], object] | None = None) -> float:
    """The shortest of ``repeat`` timings of ``function()``; ``setup`` runs before, untimed."""
    best = float('inf')
    for _ in range(repeat):
        if setup is not None:
            setup()
        if sync is not None:
            sync()
        start = time.perf_counter()
        function()
        if sync is not None:
            sync()
        best = min(best, time.perf_counter() - start)
    return best


def device_sync(device) -> Callable[[], object] | None:
    """Waits for all work on a device, on any stream (None on the host: nothing to wait for)."""
    if device.backend.is_host:
        return None
    return lambda: device.backend.synchronize_device(device)


def engine_to_host(source, destination: numpy.ndarray) -> None:
    """Copies ``source`` (any device) into the pageable host array through the engine."""
    flat = destination.reshape(-1).view(numpy.uint8)
    position = 0
    for chunk in transfer.host_chunks(source):
        flat[position:position + len(chunk)] = numpy.frombuffer(chunk, numpy.uint8)
        position += len(chunk)


def engine_from_host(source: numpy.ndarray, destination) -> None:
    """Fills ``destination`` (any device) from the pageable host array through the engine."""
    flat = source.reshape(-1).view(numpy.uint8)
    position = 0

    def read_into(buffer: memoryview) -> None:
        nonlocal position
        numpy.frombuffer(buffer, numpy.uint8)[...] = flat[position:position + len(buffer)]
        position += len(buffer)

    transfer.fill(destination, read_into, source.dtype)


def transfer_rows(nbytes: int, device, repeat: int = DEFAULT_REPEAT) -> list[Row]:
    """The engine's copies of one float32 array of ``nbytes`` between ``device`` and the host."""
    device = devices.get_device(device)
    host = make_array(nbytes)
    back = numpy.zeros_like(host)
    array = device.send(host)
    rows = []
    name = device.name
    if device.backend.is_host:
        rows.append(Row('transfer', name, 'memcpy (numpy.copyto)', host.nbytes,
                        best_time(lambda: numpy.copyto(back, host), repeat)))
        rows.append(Row('transfer', name, 'engine d2h (host_chunks)', host.nbytes,
                        best_time(lambda: engine_to_host(array, back), repeat)))
        rows.append(Row('transfer', name, 'engine h2d (fill)', host.nbytes,
                        best_time(lambda: engine_from_host(host, back), repeat)))
        numpy.testing.assert_array_equal(back, host)
        return rows
    backend = device.backend
    sync = device_sync(device)
    with device.use():
        whole = backend.pinned(host.nbytes)
        stream = backend.stream(device)
        flat = backend.as_bytes(array)
        to_host = lambda: backend.to_host_async(flat, 0, whole, stream)
        from_host = lambda: backend.from_host_async(whole, flat, 0, stream)
        rows += [
            Row('transfer', name, 'pinned single copy d2h (bus)', host.nbytes,
                best_time(lambda: waited(backend, stream, to_host), repeat, sync=sync)),
            Row('transfer', name, 'pageable d2h (cupy.asnumpy)', host.nbytes,
                best_time(lambda: backend.to_numpy(array), repeat, sync=sync)),
            Row('transfer', name, 'engine d2h (host_chunks)', host.nbytes,
                best_time(lambda: engine_to_host(array, back), repeat, sync=sync)),
            Row('transfer', name, 'pinned single copy h2d (bus)', host.nbytes,
                best_time(lambda: waited(backend, stream, from_host), repeat, sync=sync)),
        ]
        if hasattr(array, 'set'):
            rows.append(Row('transfer', name, 'pageable h2d (ndarray.set)', host.nbytes,
                            best_time(lambda: array.set(host), repeat, sync=sync)))
        rows.append(Row('transfer', name, 'engine h2d (fill)', host.nbytes,
                        best_time(lambda: engine_from_host(host, array), repeat, sync=sync)))
        numpy.testing.assert_array_equal(back, host)
        numpy.testing.assert_array_equal(backend.to_numpy(array), host)
    return rows


def waited(backend: devices.Backend, stream, queue) -> None:
    """Queues work on ``stream`` (``queue()``) and waits for it: one timed copy."""
    queue()
    backend.wait(backend.record(stream))


def save_load_rows(nbytes: int, device, directory: str,
                   repeat: int = DEFAULT_REPEAT) -> list[Row]:
    """save/load of one float32 array of ``nbytes`` on ``device``, uncompressed, no fsync."""
    device = devices.get_device(device)
    model = {'W': make_array(nbytes, device=device)}
    size = model_nbytes(model)
    sync = device_sync(device)
    npz_path = os.path.join(directory, 'bench.npz')
    h5_path = os.path.join(directory, 'bench.h5')

    def remove(path) -> Callable[[], None]:
        def run() -> None:
            if os.path.exists(path):
                os.unlink(path)
        return run

    name = device.name
    with device.use():
        rows = [
            Row('save/load', name, 'save_npz', size, best_time(
                lambda: npz.save_npz(npz_path, model, compression=False, durable=False),
                repeat, setup=remove(npz_path), sync=sync)),
            Row('save/load', name, 'load_npz', size, best_time(
                lambda: npz.load_npz(npz_path, model), repeat, sync=sync)),
            Row('save/load', name, 'save_hdf5', size, best_time(
                lambda: hdf5.save_hdf5(h5_path, model, compression=0, durable=False),
                repeat, setup=remove(h5_path), sync=sync)),
            Row('save/load', name, 'load_hdf5', size, best_time(
                lambda: hdf5.load_hdf5(h5_path, model), repeat, sync=sync)),
        ]
    for path in (npz_path, h5_path):
        remove(path)()
    return rows


# ---------------------------------------------------------------------------------------------
# Output


def format_table(rows: Iterable[Row]) -> str:
    lines = [f'{"group":<10} {"device":<10} {"operation":<32} {"size":>10} {"time":>10} '
             f'{"GB/s":>8}']
    for row in rows:
        lines.append(f'{row.group:<10} {row.device:<10} {row.name:<32} '
                     f'{format_size(row.nbytes):>10} {row.seconds * 1e3:>8.2f}ms '
                     f'{row.gbps:>8.2f}')
    return '\n'.join(lines)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as pyplot
    except ImportError:
        raise ImportError("--plot needs matplotlib, which is not installed "
                          "(pip install matplotlib)") from None
    return pyplot


def _check_plot_path(path: str) -> None:
    """Raises unless matplotlib is installed, writes ``path``'s format and its directory
    exists (else the error came after the whole benchmark, without the file's name)."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = os.path.splitext(path)[1][1:].lower()
    if suffix and suffix not in formats:  # no suffix: matplotlib's default format (png)
        raise ValueError(f'{path!r}: --plot writes an image named for its format '
                         f'({", ".join(sorted(formats))}), not {suffix!r}')
    directory = os.path.dirname(path) or '.'
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'{path!r}: directory {directory!r} does not exist')


def plot_rows(rows: list[Row], path: str) -> None:
    """Draws throughput against array size, one line per operation and device, into ``path``."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(8, 5))
    lines: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        lines.setdefault((row.device, row.name), []).append(row)
    for (device, name), points in lines.items():
        points.sort(key=lambda r: r.nbytes)
        axes.plot([r.nbytes / MiB for r in points], [r.gbps for r in points], marker='o',
                  label=f'{name} ({device})')
    axes.set_xscale('log', base=2)
    axes.set_xlabel('array size (MiB)')
    axes.set_ylabel('throughput (GB/s)')
    axes.set_title('gpuserial bench')
    axes.grid(True, which='both', alpha=0.3)
    axes.legend(fontsize='small')
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def run(*, json: bool = False, plot: str | None = None, sizes: Iterable[int] | None = None,
        repeat: int = DEFAULT_REPEAT, directory: str | None = None,
        targets: Iterable | None = None, out: TextIO | None = None) -> int:
    """Times the transfer engine and the save/load paths here and prints a table.

    GPU rows appear when a GPU is usable (:func:`gpuserial.engine.devices.gpu_available`); CPU rows
    always do.

    Args:
        json: print one JSON document (machine, rows) instead of the table.
        plot: also draw throughput against array size into this image file (needs matplotlib).
        sizes: array sizes in bytes (default 1, 16 and 256 MiB).
        repeat: timings per operation; the best is reported.
        directory: where the save/load files go (a temporary directory inside it).
        targets: the devices to time (default the CPU, and GPU 0 when one is usable).
        out: where to print (default ``sys.stdout``, as it is at the call).

    Returns:
        0 (the exit status for the CLI).

    Raises:
        ImportError: ``plot`` was given and matplotlib is not installed (checked first).
    """
    out = sys.stdout if out is None else out
    if plot is not None:
        _check_plot_path(plot)  # fail before spending time
    sizes = [int(s) for s in (sizes if sizes is not None else DEFAULT_SIZES)]
    if not sizes or min(sizes) < 4:
        raise ValueError(f'sizes must be at least 4 bytes (one float32), got {sizes!r}')
    if repeat < 1:
        raise ValueError(f'repeat must be at least 1, got {repeat!r}')
    if targets is None:
        targets = ['cpu'] + (['cuda:0'] if devices.gpu_available() else [])
    targets = [devices.get_device(t) for t in targets]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix='gpuserial-bench-', dir=directory) as temp:
        for target in targets:
            for size in sizes:
                rows += transfer_rows(size, target, repeat)
        for target in targets:
            for size in sizes:
                rows += save_load_rows(size, target, temp, repeat)
    if json:
        document = {'machine': machine_info(), 'date': time.strftime('%Y-%m-%d'),
                    'rows': [dict(dataclasses.asdict(r), gbps=r.gbps) for r in rows]}
        print(jsonlib.dumps(document, indent=2), file=out)
    else:
        info = machine_info()
        gpu = info['gpu']['name'] if info['gpu'] else 'no usable GPU'
        print(f'# {info["cpu"]} ({info["cores"]} cores), {gpu}; numpy '
              f'{info["versions"].get("numpy")}, h5py {info["versions"].get("h5py")}', file=out)
        print(format_table(rows), file=out)
    if plot is not None:
        plot_rows(rows, plot)
    return 0
