"""gpuserial's saves and loads and their peers' on the same arrays, as named operations.

Shared by the pytest-benchmark suites and by ``compare.py`` (interleaved rounds), so that both
time exactly the same code. Every operation works on a :class:`Context`: the model (host or
device arrays), a host copy of it for checks, a target of the same arrays to load into, and a
directory. Saves are timed into a fresh file (the old one removed first, untimed); loads read a
file that ``prepare`` wrote (untimed) into the existing target arrays, as Chainer does.

Like with like: gpuserial saves run with ``durable=False`` against peers that do not fsync;
the ``+fsync`` operations are the durable pair.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import h5py
import numpy

import gpuserial
from gpuserial.engine import devices


@dataclasses.dataclass
class Context:
    """What the operations share: the arrays, their host copy, a load target, a directory."""

    model: dict  # name -> array (NumPy or a device's)
    directory: str
    host: dict = dataclasses.field(default=None)  # NumPy copies, for checks
    target: dict = dataclasses.field(default=None)  # arrays like the model's, loaded into

    def __post_init__(self):
        if self.host is None:
            self.host = {k: numpy.asarray(devices.to_host(v)) for k, v in self.model.items()}
        if self.target is None:
            self.target = {k: devices.device_of(v).send(numpy.zeros_like(self.host[k]))
                           for k, v in self.model.items()}

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.host.values())

    @property
    def on_host(self) -> bool:
        return all(isinstance(a, numpy.ndarray) for a in self.model.values())

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def clear_target(self) -> None:
        """Zeroes the load target (untimed), so that a check sees what the load wrote."""
        for key, array in self.target.items():
            if hasattr(array, 'fill'):
                array.fill(0)
            else:  # the tests' stand-in device
                backend = devices.backend_of(array)
                backend.assign(array, backend.send(numpy.zeros_like(self.host[key]),
                                                   devices.device_of(array)))

    def check_target(self) -> None:
        for key, expected in self.host.items():
            loaded = numpy.asarray(devices.to_host(self.target[key]))
            if not numpy.array_equal(loaded, expected):
                raise AssertionError(f'{key}: the loaded values differ from the saved ones')

    def check_arrays(self, loaded: dict) -> None:
        """Checks a mapping read back from a saved file (arrays of any library) against the
        model."""
        if set(loaded) != set(self.host):
            raise AssertionError(f'keys differ: {sorted(loaded)} vs {sorted(self.host)}')
        for key, expected in self.host.items():
            value = devices.to_host(devices.engine_array(loaded[key]))
            if not numpy.array_equal(numpy.asarray(value), expected):
                raise AssertionError(f'{key}: the saved values differ')


@dataclasses.dataclass(frozen=True)
class Op:
    """A timed operation: ``run(ctx, path)``; saves are checked, loads prepared, untimed."""

    name: str
    kind: str  # 'save' or 'load'
    suffix: str
    run: Callable[[Context, str], object]
    check: Callable[[Context, str], None] | None = None  # saves: the file holds the model
    prepare: Callable[[Context, str], None] | None = None  # loads: writes the file to load
    needs: str | None = None  # a module that must import (torch, safetensors)
    host_only: bool = False  # makes sense only for a model in host memory
    new_arrays: bool = False  # a load that returns new arrays (checked) instead of filling

    def available(self, ctx: Context | None = None) -> bool:
        if ctx is not None and self.host_only and not ctx.on_host:
            return False
        if self.needs is None:
            return True
        try:
            __import__(self.needs)
        except ImportError:
            return False
        return True


# ---------------------------------------------------------------------------------------------
# Checks and helpers


def _check_npz(ctx: Context, path: str) -> None:
    with numpy.load(path) as loaded:
        ctx.check_arrays({k: loaded[k] for k in loaded.files})


def _check_h5(ctx: Context, path: str) -> None:
    with h5py.File(path, 'r') as f:
        ctx.check_arrays({k: f[k][()] for k in ctx.host})


def _check_raw(ctx: Context, path: str) -> None:
    flat = numpy.fromfile(path, numpy.uint8)
    position = 0
    for key, expected in ctx.host.items():
        piece = flat[position:position + expected.nbytes]
        if not numpy.array_equal(piece.view(expected.dtype).reshape(expected.shape), expected):
            raise AssertionError(f'{key}: the raw bytes differ')
        position += expected.nbytes
    if position != flat.size:
        raise AssertionError(f'the raw file holds {flat.size} bytes, expected {position}')


def _write_all(f, array) -> None:
    f.write(memoryview(numpy.ascontiguousarray(array)).cast('B'))


def _raw_write(ctx: Context, path: str, *, fsync: bool = False) -> None:
    with open(path, 'wb') as f:
        for array in ctx.model.values():
            _write_all(f, array)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    if fsync:
        fd = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _readinto_all(f, array) -> None:
    view = memoryview(array.reshape(-1).view(numpy.uint8))
    done = 0
    while done < len(view):
        count = f.readinto(view[done:])
        if not count:
            raise EOFError('the raw file ends early')
        done += count


def _raw_readinto(ctx: Context, path: str) -> None:
    with open(path, 'rb', buffering=0) as f:
        for array in ctx.target.values():
            _readinto_all(f, array)


def _chainer_save(ctx: Context, path: str, *, compressed: bool = False) -> None:
    """Chainer's path: a whole host copy of every array (cupy.asnumpy), then numpy.savez."""
    host = {k: devices.to_host(v) for k, v in ctx.model.items()}
    (numpy.savez_compressed if compressed else numpy.savez)(path, **host)


def _chainer_load(ctx: Context, path: str) -> None:
    """Chainer's path: numpy.load, then numpy.copyto (host) or ndarray.set (device)."""
    with numpy.load(path) as npz:
        for key, array in ctx.target.items():
            stored = npz[key]
            if isinstance(array, numpy.ndarray):
                numpy.copyto(array, stored)
            elif hasattr(array, 'set'):  # cupy
                array.set(numpy.asarray(stored, dtype=array.dtype))
            else:  # the tests' stand-in device
                backend = devices.backend_of(array)
                backend.assign(array, backend.send(stored, devices.device_of(array)))


def _h5py_write(ctx: Context, path: str) -> None:
    with h5py.File(path, 'w') as f:
        for key, array in ctx.model.items():
            f.create_dataset(key, data=array)


def _h5py_write_gzip(ctx: Context, path: str) -> None:
    """Chainer's HDF5Serializer: h5py's own chunks, gzip level 4 (its default)."""
    _chainer_hdf5(ctx.model, path)


def _chainer_hdf5(arrays: dict, path: str) -> None:
    with h5py.File(path, 'w') as f:
        for key, array in arrays.items():
            f.create_dataset(key, data=array, compression=4)


def _chainer_load_hdf5(ctx: Context, path: str) -> None:
    """Chainer's HDF5Deserializer: read_direct into a host array, or for a device array
    ``value.set(numpy.asarray(dataset, dtype=value.dtype))``: a whole host copy, then the bus."""
    with h5py.File(path, 'r') as f:
        for key, array in ctx.target.items():
            if isinstance(array, numpy.ndarray):
                f[key].read_direct(array)
            elif hasattr(array, 'set'):  # cupy
                array.set(numpy.asarray(f[key], dtype=array.dtype))
            else:  # the tests' stand-in device
                backend = devices.backend_of(array)
                backend.assign(array, backend.send(numpy.asarray(f[key]),
                                                   devices.device_of(array)))


def _h5py_read(ctx: Context, path: str) -> None:
    with h5py.File(path, 'r') as f:
        for key, array in ctx.target.items():
            f[key].read_direct(array)


def _tensors(arrays: dict) -> dict:
    """The same memory as torch tensors (no copy): from_numpy, or DLPack from a device."""
    import torch
    out = {}
    for key, array in arrays.items():
        if isinstance(array, numpy.ndarray):
            out[key] = torch.from_numpy(array)
        else:
            out[key] = torch.utils.dlpack.from_dlpack(array)
    return out


def _torch_device(ctx: Context) -> str:
    first = next(iter(ctx.model.values()))
    return 'cpu' if isinstance(first, numpy.ndarray) else f'cuda:{first.device.id}'


def _torch_save(ctx: Context, path: str) -> None:
    import torch
    torch.save(_tensors(ctx.model), path)


def _torch_load(ctx: Context, path: str) -> None:
    import torch
    loaded = torch.load(path, map_location=_torch_device(ctx), weights_only=True)
    targets = _tensors(ctx.target)
    for key, tensor in targets.items():
        tensor.copy_(loaded[key])


def _check_torch(ctx: Context, path: str) -> None:
    import torch
    loaded = torch.load(path, map_location='cpu', weights_only=True)
    ctx.check_arrays({k: v.numpy() for k, v in loaded.items()})


def _safetensors_save(ctx: Context, path: str) -> None:
    if ctx.on_host:
        from safetensors.numpy import save_file
        save_file(ctx.model, path)
    else:
        from safetensors.torch import save_file
        save_file(_tensors(ctx.model), path)


def _safetensors_load(ctx: Context, path: str) -> None:
    if ctx.on_host:
        from safetensors.numpy import load_file
        loaded = load_file(path)
        for key, array in ctx.target.items():
            numpy.copyto(array, loaded[key])
    else:
        from safetensors.torch import load_file
        loaded = load_file(path, device=_torch_device(ctx))
        for key, tensor in _tensors(ctx.target).items():
            tensor.copy_(loaded[key])


def _check_safetensors(ctx: Context, path: str) -> None:
    from safetensors.numpy import load_file
    ctx.check_arrays(load_file(path))


def _fsynced(save: Callable[[Context, str], None]) -> Callable[[Context, str], None]:
    """``save``, then an fsync of the file and its directory, as gpuserial's durable saves."""
    def run(ctx: Context, path: str) -> None:
        save(ctx, path)
        for name, flags in ((path, os.O_RDONLY), (os.path.dirname(path) or '.', os.O_RDONLY)):
            descriptor = os.open(name, flags)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    return run


def _device_spec(ctx: Context) -> devices.Device:
    return devices.device_of(next(iter(ctx.model.values())))


def _safetensors_new(ctx: Context, path: str) -> dict:
    if ctx.on_host:
        from safetensors.numpy import load_file
        return load_file(path)
    from safetensors.torch import load_file
    return load_file(path, device=_torch_device(ctx))


def _torch_new(ctx: Context, path: str) -> dict:
    """torch.load into new tensors. Not with ``mmap=True``: that returns before reading the
    data, so timing it would time the index alone."""
    import torch
    return torch.load(path, map_location=_torch_device(ctx), weights_only=True)


def _host_model_save(ctx: Context, path: str) -> None:
    gpuserial.save_npz(path, ctx.host, compression=False, durable=False)


# ---------------------------------------------------------------------------------------------
# The operations


def _save_npz(compression: bool, durable: bool = False):
    return lambda ctx, path: gpuserial.save_npz(path, ctx.model, compression=compression,
                                                durable=durable)


def _load_npz(ctx: Context, path: str) -> None:
    gpuserial.load_npz(path, ctx.target)


SAVES = [
    Op('gpuserial.save_npz', 'save', '.npz', _save_npz(False), _check_npz),
    Op('gpuserial.save_npz compressed', 'save', '.npz', _save_npz(True), _check_npz),
    Op('gpuserial.save_npz +fsync', 'save', '.npz', _save_npz(False, durable=True), _check_npz),
    Op('gpuserial.save_hdf5', 'save', '.h5',
       lambda ctx, path: gpuserial.save_hdf5(path, ctx.model, compression=0, durable=False),
       _check_h5),
    Op('gpuserial.save_hdf5 gzip', 'save', '.h5',
       lambda ctx, path: gpuserial.save_hdf5(path, ctx.model, durable=False), _check_h5),
    Op('gpuserial.save_hdf5 +fsync', 'save', '.h5',
       lambda ctx, path: gpuserial.save_hdf5(path, ctx.model, compression=0), _check_h5),
    Op('gpuserial.save_npz of a host copy', 'save', '.npz', _host_model_save, _check_npz),
    Op('numpy.savez (Chainer)', 'save', '.npz', _chainer_save, _check_npz),
    Op('numpy.savez_compressed (Chainer)', 'save', '.npz',
       lambda ctx, path: _chainer_save(ctx, path, compressed=True), _check_npz),
    Op('raw write', 'save', '.bin', _raw_write, _check_raw, host_only=True),
    Op('raw write +fsync', 'save', '.bin', lambda ctx, path: _raw_write(ctx, path, fsync=True),
       _check_raw, host_only=True),
    Op('h5py create_dataset', 'save', '.h5', _h5py_write, _check_h5, host_only=True),
    Op('h5py create_dataset gzip (Chainer)', 'save', '.h5', _h5py_write_gzip, _check_h5,
       host_only=True),
    Op('h5py create_dataset +fsync', 'save', '.h5', _fsynced(_h5py_write), _check_h5,
       host_only=True),
    Op('torch.save', 'save', '.pt', _torch_save, _check_torch, needs='torch'),
    Op('gpuserial.save', 'save', '.npz', lambda ctx, path: gpuserial.save(path, ctx.model),
       _check_npz),
    Op('torch.save +fsync', 'save', '.pt', _fsynced(_torch_save), _check_torch, needs='torch'),
    Op('safetensors save_file +fsync', 'save', '.safetensors', _fsynced(_safetensors_save),
       _check_safetensors, needs='safetensors'),
    Op('safetensors save_file', 'save', '.safetensors', _safetensors_save, _check_safetensors,
       needs='safetensors'),
]

LOADS = [
    Op('gpuserial.load_npz', 'load', '.npz', _load_npz,
       prepare=lambda ctx, path: gpuserial.save_npz(path, ctx.host, compression=False,
                                                    durable=False)),
    Op('gpuserial.load_npz compressed', 'load', '.npz', _load_npz,
       prepare=lambda ctx, path: gpuserial.save_npz(path, ctx.host, compression=True,
                                                    durable=False)),
    Op('gpuserial.load_hdf5', 'load', '.h5',
       lambda ctx, path: gpuserial.load_hdf5(path, ctx.target),
       prepare=lambda ctx, path: gpuserial.save_hdf5(path, ctx.host, compression=0,
                                                     durable=False)),
    Op('gpuserial.load_hdf5 gzip', 'load', '.h5',
       lambda ctx, path: gpuserial.load_hdf5(path, ctx.target),
       prepare=lambda ctx, path: gpuserial.save_hdf5(path, ctx.host, durable=False)),
    Op('gpuserial.load_hdf5 gzip (Chainer file)', 'load', '.h5',
       lambda ctx, path: gpuserial.load_hdf5(path, ctx.target),
       prepare=lambda ctx, path: _chainer_hdf5(ctx.host, path)),
    Op('h5py read_direct gzip (Chainer)', 'load', '.h5', _h5py_read, prepare=_h5py_write_gzip,
       host_only=True),
    Op('Chainer load_hdf5 gzip', 'load', '.h5', _chainer_load_hdf5,
       prepare=lambda ctx, path: _chainer_hdf5(ctx.host, path)),
    Op('numpy.load + copyto (Chainer)', 'load', '.npz', _chainer_load,
       prepare=lambda ctx, path: numpy.savez(path, **ctx.host)),
    Op('numpy.load compressed (Chainer)', 'load', '.npz', _chainer_load,
       prepare=lambda ctx, path: numpy.savez_compressed(path, **ctx.host)),
    Op('raw readinto', 'load', '.bin', _raw_readinto, prepare=_raw_write, host_only=True),
    Op('h5py read_direct', 'load', '.h5', _h5py_read, prepare=_h5py_write, host_only=True),
    Op('torch.load', 'load', '.pt', _torch_load, prepare=_torch_save, needs='torch'),
    Op('safetensors load_file', 'load', '.safetensors', _safetensors_load,
       prepare=_safetensors_save, needs='safetensors'),
    Op('gpuserial.load', 'load', '.npz',
       lambda ctx, path: gpuserial.load(path, device=_device_spec(ctx)),
       prepare=lambda ctx, path: gpuserial.save(path, ctx.host, durable=False),
       new_arrays=True),
    Op('safetensors load_file (new arrays)', 'load', '.safetensors', _safetensors_new,
       prepare=_safetensors_save, needs='safetensors', new_arrays=True),
    Op('torch.load (new tensors)', 'load', '.pt', _torch_new, prepare=_torch_save,
       needs='torch', new_arrays=True),
]

OPS = {op.name: op for op in SAVES + LOADS}


def file_name(op: Op) -> str:
    """A file name of its own for each operation (so that interleaved runs never share one)."""
    safe = ''.join(c if c.isalnum() else '_' for c in op.name)
    return f'{safe}{op.suffix}'


def remove(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
