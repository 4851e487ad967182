"""Array modules and devices: the one module that imports cupy.

Everything that asks "which array library is this?" or "which device?" asks here. CuPy arrays
are recognised through ``sys.modules``, so NumPy-only use never imports cupy, and a GPU counts
as usable only when ``cupy.is_available()`` says so.

The transfer engine and the formats are handed a :class:`Backend` (the NumPy one, the CuPy one,
or a stand-in a test registers) and never test array types themselves.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import re
import sys
from collections.abc import Iterable, Iterator
from types import ModuleType

import numpy

from gpuserial.errors import DeviceError

OWN_MAPPING_BYTES = 4 << 20  # new host arrays this large get their own mapping (see empty)
HOST_ONLY_KINDS = 'USMm'  # text, bytes, dates, durations: no device array holds them (CuPy 14
# refuses to make one: 'Unsupported dtype <U2'), so loads keep them on the host
_POPULATE = getattr(mmap, 'MAP_POPULATE', 0)  # Linux only

__all__ = ['Backend', 'CpuDevice', 'CudaDevice', 'Device', 'backend_of', 'get_array_module',
           'get_device', 'gpu_available', 'is_array', 'register_backend']


@functools.cache
def _usable_cupy() -> ModuleType | None:
    """The cupy module when it imports and a GPU is usable, else None (asked once).

    Asking starts the CUDA driver: as with any CUDA program, a process forked after that
    cannot use the GPU.
    """
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.is_available() else None
    except Exception:  # a broken driver or runtime: no usable GPU
        return None


def gpu_available() -> bool:
    """Whether cupy is installed and at least one GPU is usable."""
    return _usable_cupy() is not None


def _cupy() -> ModuleType:
    """The cupy module, where a GPU has been found usable (a CudaDevice or CuPy array exists).

    Raises:
        DeviceError: no GPU is usable (a forked child of a CUDA process, for one).
    """
    cupy = _usable_cupy()
    if cupy is None:
        raise DeviceError('no GPU is usable here (cupy missing, cupy.is_available() False, '
                          'or a process forked after CUDA started)')
    return cupy


def _is_cupy_array(x) -> bool:
    cupy = sys.modules.get('cupy')
    return cupy is not None and isinstance(x, cupy.ndarray)


# ---------------------------------------------------------------------------------------------
# Devices


class Device:
    """A place where arrays live: knows its array module, sends arrays to itself."""

    name: str

    @property
    def backend(self) -> Backend:
        """The backend of this device's arrays."""
        raise NotImplementedError

    @property
    def xp(self) -> ModuleType:
        """The array module of this device (numpy or cupy)."""
        return self.backend.xp

    def send(self, array):
        """Returns ``array`` on this device: itself if it is there already, else a copy."""
        return self.backend.send(array, self)

    def use(self) -> contextlib.AbstractContextManager:
        """A context manager making this device current."""
        return contextlib.nullcontext()

    def __eq__(self, other) -> bool:
        return isinstance(other, Device) and self.name == other.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f'<Device {self.name}>'


class CpuDevice(Device):
    """The host, with NumPy arrays."""

    name = '@numpy'

    @property
    def backend(self) -> Backend:
        return NUMPY


class CudaDevice(Device):
    """GPU ``id``, with CuPy arrays."""

    def __init__(self, id: int):
        self.id = id
        self.name = f'@cupy:{id}'

    @property
    def backend(self) -> Backend:
        return CUPY

    def use(self) -> contextlib.AbstractContextManager:
        return _cupy().cuda.Device(self.id)


_SPEC = re.compile(r'(?:cuda|@cupy)(?::(\d+))?')
# 'gpu' and 'gpu:N' are no spec (neither torch nor Chainer takes them): refused with the
# spellings that are
_NOT_A_SPEC = re.compile(r'gpu(?::\d+)?', re.IGNORECASE)


def get_device(spec) -> Device:
    """The Device a spec names.

    Args:
        spec: ``'cpu'``, ``'@numpy'``, ``'cuda'`` (the calling thread's current GPU, as torch
            takes it), ``'cuda:N'``, ``'@cupy:N'``, an int (``-1`` is the CPU, ``N >= 0`` is
            GPU N), a ``cupy.cuda.Device``, a ``torch.device``, a JAX device, or a Device.

    Raises:
        DeviceError: the spec is unknown, or names a GPU that is not usable here. ``'gpu'``
            and ``'gpu:N'`` are unknown (neither torch nor Chainer takes them): the error
            gives ``'cuda:N'``.
    """
    if isinstance(spec, Device):
        return spec
    cupy = sys.modules.get('cupy')
    if cupy is not None and isinstance(spec, cupy.cuda.Device):
        spec = spec.id
    if isinstance(spec, (int, numpy.integer)) and not isinstance(spec, bool):
        if spec == -1:
            return CPU
        if spec < 0:
            raise DeviceError(f'unknown device {spec!r}: use -1 for the CPU or N >= 0 for GPU N')
        return _cuda_device(int(spec), spec)
    if isinstance(spec, str):
        if spec in ('cpu', '@numpy', 'numpy'):
            return CPU
        match = _SPEC.fullmatch(spec)
        if match:
            return _cuda_device(None if match.group(1) is None else int(match.group(1)), spec)
    for framework in FRAMEWORKS.values():
        device = framework.device(spec)
        if device is not None:
            return device
    if isinstance(spec, str) and _NOT_A_SPEC.fullmatch(spec):
        number = spec.partition(':')[2] or 'N'
        raise DeviceError(f"unknown device {spec!r}: name GPU {number} as 'cuda:{number}' (or "
                          f"'@cupy:{number}', or the int {number}); 'cuda' is the current GPU")
    raise DeviceError(f"unknown device {spec!r}: expected 'cpu', '@numpy', 'cuda', 'cuda:N', "
                      f"'@cupy:N', an int, a cupy.cuda.Device, a torch.device, a JAX device or "
                      f"a Device")


def _cuda_device(id: int | None, spec) -> CudaDevice:
    """GPU ``id`` (None: the calling thread's current GPU), where it is usable."""
    cupy = _usable_cupy()
    if cupy is None:
        raise DeviceError(f'device {spec!r} is not usable: no GPU is available '
                          f'(cupy missing, or cupy.is_available() is False)')
    if id is None:
        return CudaDevice(cupy.cuda.runtime.getDevice())
    count = cupy.cuda.runtime.getDeviceCount()
    if id >= count:
        raise DeviceError(f'device {spec!r} is not usable: this machine has {count} GPU(s)')
    return CudaDevice(id)


def device_spec_for(obj, device: Device):
    """``device`` as ``obj.to_device`` takes it: Chainer's objects get Chainer's spec string
    (``'@numpy'``, ``'@cupy:N'``, which is also the Device's name), all others the Device."""
    resident = getattr(sys.modules.get('chainer.device_resident'), 'DeviceResident', None)
    if resident is not None and isinstance(obj, resident):
        return device.name
    return device


def default_device() -> Device:
    """The current GPU when one is usable, else the CPU."""
    cupy = _usable_cupy()
    return CudaDevice(cupy.cuda.Device().id) if cupy is not None else CPU


# ---------------------------------------------------------------------------------------------
# Backends


class Backend:
    """What the transfer engine needs from an array library.

    Arrays are handled as flat byte views (``as_bytes``) so that chunks are byte ranges.
    ``is_host`` backends hand out their arrays' own memory; the others are copied through
    pinned host buffers on streams: the engine queues copies (``to_host_async``,
    ``from_host_async``) and kernels (``assign``) on its stream, then ``record`` s one event for
    all the work of a buffer and ``wait`` s for it.
    """

    is_host: bool = False

    @property
    def xp(self) -> ModuleType:
        """The array module (numpy, cupy, ...)."""
        raise NotImplementedError

    def owns(self, array) -> bool:
        """Whether ``array`` is one of this backend's arrays."""
        raise NotImplementedError

    def device_of(self, array) -> Device:
        raise NotImplementedError

    def empty(self, shape: tuple, dtype, device: Device):
        raise NotImplementedError

    def send(self, array, device: Device):
        """``array`` (host or any backend) on ``device``; itself when it is there already."""
        raise NotImplementedError

    def is_contiguous(self, array) -> bool:
        return bool(array.flags.c_contiguous)

    def as_bytes(self, array):
        """A flat uint8 view of a C-contiguous array."""
        return array.reshape(-1).view(numpy.uint8)

    def holds_extension(self, name: str, device: Device) -> bool:
        """Whether arrays made on ``device`` can hold the extension dtype ``name`` (else such
        values load onto the host, or into a framework's arrays)."""
        return False

    def assign(self, dst, src, stream=None) -> None:
        """``dst[...] = src`` for two arrays of this backend on one device, queued on ``stream``
        (None: the current stream)."""
        dst[...] = src

    def stream(self, device: Device):
        """A stream on ``device`` for the engine's copies (one per device, reused)."""
        return None

    def pinned(self, nbytes: int) -> numpy.ndarray:
        """A page-locked host buffer of ``nbytes`` (uint8)."""
        return numpy.empty(nbytes, numpy.uint8)

    def to_host_async(self, src_bytes, start: int, host: numpy.ndarray, stream) -> None:
        """Queues a copy of ``src_bytes[start:start+len(host)]`` into ``host`` on ``stream``
        (:meth:`record` an event to wait for it: one event can cover many copies)."""
        raise NotImplementedError

    def from_host_async(self, host: numpy.ndarray, dst_bytes, start: int, stream) -> None:
        """Queues a copy of ``host`` into ``dst_bytes[start:start+len(host)]`` on ``stream``."""
        raise NotImplementedError

    def record(self, stream):
        """An event that completes once the work queued on ``stream`` so far has."""
        raise NotImplementedError

    def wait(self, event) -> None:
        """Blocks until the work before ``event`` has completed."""

    def synchronize(self, stream) -> None:
        """Blocks until the work queued on ``stream`` has completed."""

    def synchronize_device(self, device: Device) -> None:
        """Blocks until all work queued on ``device``, on any stream, has completed."""

    def order_after_current(self, stream, device: Device) -> None:
        """Makes ``stream`` wait for the work queued so far on ``device``'s current stream."""

    def order_current_after(self, event, device: Device) -> None:
        """Makes ``device``'s current stream wait for ``event`` (work queued there later runs
        after the work before it)."""

    def to_numpy(self, array) -> numpy.ndarray:
        """A whole host copy of ``array``."""
        raise NotImplementedError


class _NumpyBackend(Backend):
    xp = numpy
    is_host = True

    def owns(self, array) -> bool:
        return isinstance(array, numpy.ndarray)

    def device_of(self, array) -> Device:
        return CPU

    def empty(self, shape, dtype, device):
        """A new array; a large one in its own anonymous mapping of small pages, which a load
        fills at once: NumPy asks for huge pages, whose first touch can stall for seconds on
        a machine whose memory the page cache has fragmented. On Linux the mapping's pages
        are made when it is (MAP_POPULATE), in one call rather than a fault per page: a
        fifth faster to fill."""
        dtype = numpy.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < OWN_MAPPING_BYTES:
            return numpy.empty(shape, dtype)
        if _POPULATE:
            mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
        else:
            mapping = mmap.mmap(-1, nbytes)
        return numpy.frombuffer(mapping, dtype).reshape(shape)

    def send(self, array, device):
        source = backend_of(array)
        if source is None or source is self:
            return numpy.asarray(array)
        plain = kernel_view(array)  # a non-contiguous array is made contiguous by a kernel
        host = source.to_numpy(plain)
        return host if plain is array else host.view(array.dtype)


class _CupyBackend(Backend):
    """CuPy arrays: copies with cudaMemcpyAsync through pinned buffers, one stream per GPU."""

    def __init__(self):
        self._streams: dict[int, object] = {}

    @property
    def xp(self) -> ModuleType:
        return _cupy()

    def owns(self, array) -> bool:
        return _is_cupy_array(array)

    def device_of(self, array) -> Device:
        return CudaDevice(array.device.id)

    def empty(self, shape, dtype, device):
        cupy = _cupy()
        with cupy.cuda.Device(device.id):
            return cupy.empty(shape, dtype)

    def send(self, array, device):
        cupy = _cupy()
        if self.owns(array) and array.device.id == device.id:
            return array
        with cupy.cuda.Device(device.id):
            if self.owns(array):
                return array.copy()  # peer copy between GPUs
            host = NUMPY.send(array, CPU)
            if not host.dtype.isnative:  # CuPy holds native byte order only
                host = host.astype(host.dtype.newbyteorder('='))
            out = cupy.empty(host.shape, host.dtype)
            out.set(host if host.flags.c_contiguous else host.copy(order='C'))  # 0-d too
            return out

    def to_numpy(self, array):
        with _cupy().cuda.Device(array.device.id):
            return array.get()

    def holds_extension(self, name, device):
        return _cupy_holds(name)

    def assign(self, dst, src, stream=None) -> None:
        cupy = _cupy()
        with cupy.cuda.Device(dst.device.id), stream or contextlib.nullcontext():
            dst[...] = src

    def stream(self, device):
        if device.id not in self._streams:
            cupy = _cupy()
            with cupy.cuda.Device(device.id):
                self._streams.setdefault(device.id, cupy.cuda.Stream(non_blocking=True))
        return self._streams[device.id]

    def pinned(self, nbytes):
        cupy = _cupy()
        memory = cupy.cuda.PinnedMemory(max(nbytes, 1), cupy.cuda.runtime.hostAllocPortable)
        pointer = cupy.cuda.PinnedMemoryPointer(memory, 0)  # exports the buffer protocol
        return numpy.frombuffer(pointer, numpy.uint8, nbytes)  # keeps `memory` alive

    def _copy(self, dst_ptr, src_ptr, nbytes, kind, stream, device_id):
        cupy = _cupy()
        with cupy.cuda.Device(device_id):
            cupy.cuda.runtime.memcpyAsync(dst_ptr, src_ptr, nbytes, kind, stream.ptr)

    def to_host_async(self, src_bytes, start, host, stream):
        self._copy(host.ctypes.data, src_bytes.data.ptr + start, host.nbytes,
                   _cupy().cuda.runtime.memcpyDeviceToHost, stream, src_bytes.device.id)

    def from_host_async(self, host, dst_bytes, start, stream):
        # The caller orders this stream after the device's current stream (see `transfer`).
        self._copy(dst_bytes.data.ptr + start, host.ctypes.data, host.nbytes,
                   _cupy().cuda.runtime.memcpyHostToDevice, stream, dst_bytes.device.id)

    def record(self, stream):
        cupy = _cupy()
        with cupy.cuda.Device(stream.device_id):  # an event of the stream's device
            return stream.record(cupy.cuda.Event(block=False, disable_timing=True))

    def wait(self, event):
        event.synchronize()

    def synchronize(self, stream):
        stream.synchronize()

    def synchronize_device(self, device):
        cupy = _cupy()
        with cupy.cuda.Device(device.id):
            cupy.cuda.runtime.deviceSynchronize()

    def order_after_current(self, stream, device):
        cupy = _cupy()
        with cupy.cuda.Device(device.id):
            stream.wait_event(cupy.cuda.get_current_stream().record(_marker(cupy)))

    def order_current_after(self, event, device):
        cupy = _cupy()
        with cupy.cuda.Device(device.id):
            cupy.cuda.get_current_stream().wait_event(event)

    def forget_in_child(self) -> None:
        """After a fork: the parent's streams are not the child's."""
        self._streams = {}


@functools.cache
def _cupy_holds(name: str) -> bool:
    """Whether CuPy's arrays hold ml_dtypes' ``name`` as a type its kernels compute with
    (bfloat16 from CuPy 14 on; any CuPy would allocate one, but before 14 no kernel takes it):
    asked of the C type names CuPy writes its kernels with."""
    try:
        import ml_dtypes
        from cupy._core import _scalar
        _scalar.get_typename(numpy.dtype(getattr(ml_dtypes, name)))
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return False
    return True


def _marker(cupy):
    """An event that only orders streams (no timing)."""
    return cupy.cuda.Event(disable_timing=True)


NUMPY = _NumpyBackend()
CUPY = _CupyBackend()
CPU = CpuDevice()


def _forget_the_gpu_in_a_child() -> None:
    """A forked child of a CUDA process cannot use the GPU: ask afresh, with no old streams."""
    _usable_cupy.cache_clear()
    CUPY.forget_in_child()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_forget_the_gpu_in_a_child)
_backends: list[Backend] = [NUMPY, CUPY]


def register_backend(backend: Backend) -> contextlib.AbstractContextManager:
    """Adds ``backend`` (asked before the built-in ones); the returned context removes it."""
    _backends.insert(0, backend)
    return _unregister_on_exit(backend)


@contextlib.contextmanager
def _unregister_on_exit(backend: Backend) -> Iterator[Backend]:
    try:
        yield backend
    finally:
        _backends.remove(backend)


def backend_of(array) -> Backend | None:
    """The backend owning ``array``, or None when it is not an array (a scalar, None, ...)."""
    for backend in _backends:
        if backend.owns(array):
            return backend
    return None


def is_array(value) -> bool:
    """Whether ``value`` is an array of some backend (NumPy, CuPy, a registered stand-in)."""
    return type(value) is numpy.ndarray or backend_of(value) is not None


def get_array_module(*arrays) -> ModuleType:
    """The array module of the first non-NumPy array among ``arrays``, else numpy."""
    for array in arrays:
        backend = backend_of(array)
        if backend is not None and backend is not NUMPY:
            return backend.xp
    return numpy


def device_of(array) -> Device:
    """The device ``array`` lives on (the CPU for anything that is not a device array)."""
    backend = backend_of(array)
    return CPU if backend is None else backend.device_of(array)


def to_host(value):
    """A NumPy copy of a device array; host arrays and non-arrays come back as they are."""
    backend = backend_of(value)
    if backend is None or backend.is_host:
        return value
    return NUMPY.send(value, CPU)


def why_not_fillable(array) -> str | None:
    """Why ``array`` cannot be filled in place (it is read-only, or its elements share memory,
    as a broadcast or an expanded tensor's do), else None."""
    if array.size == 0:  # nothing to fill
        return None
    flags = array.flags
    if not getattr(flags, 'writeable', True):  # CuPy's arrays have no such flag: writable
        return 'it is read-only'
    if flags.c_contiguous or flags.f_contiguous:
        return None
    overlaps = _overlaps(array.shape, array.strides, array.itemsize)
    if overlaps is None:
        return (f'its strides {array.strides} interleave its elements, which may share memory '
                f'(too many to compare)')
    return 'its elements share memory (a broadcast or expanded view)' if overlaps else None


OVERLAP_CHECK_MAX = 1 << 22  # elements whose offsets are compared one by one, at most


def _overlaps(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool | None:
    """Whether two elements of a strided array share a byte: at once when each dimension's
    stride clears the bytes the smaller ones reach or one is 0, else by comparing every
    element's offset; None (not known) where there are too many."""
    dimensions = sorted((abs(stride), extent) for extent, stride
                        in zip(shape, strides, strict=True) if extent > 1)
    span = itemsize  # the bytes the dimensions taken so far reach, from the first
    for stride, extent in dimensions:
        if stride < span:
            break
        span += stride * (extent - 1)
    else:
        return False
    if any(stride == 0 for stride, _ in dimensions):
        return True
    if math.prod(shape) > OVERLAP_CHECK_MAX:
        return None
    offsets = numpy.zeros(1, numpy.int64)
    for stride, extent in dimensions:
        offsets = (offsets[:, None] + numpy.arange(extent, dtype=numpy.int64) * stride).ravel()
    return bool((numpy.diff(numpy.sort(offsets)) < itemsize).any())


def synchronize_devices_of(arrays: Iterable) -> None:
    """Waits for all work queued on the devices that hold any of ``arrays``, on every stream."""
    seen = set()
    for array in arrays:
        backend = backend_of(array)
        if backend is not None and not backend.is_host:
            device = backend.device_of(array)
            if device not in seen:
                seen.add(device)
                backend.synchronize_device(device)


# ---------------------------------------------------------------------------------------------
# Frameworks: torch tensors and JAX arrays, through the engine as NumPy or CuPy views (DLPack)

# Dtypes NumPy lacks, stored as a one-field structured dtype named for the type over unsigned
# integers of its size: ``[('bfloat16', '<u2')]``. numpy.load reads it as raw bits, Chainer
# refuses to cast it into a float array, and gpuserial gives it back as the named type.
EXTENSION_DTYPES = {'bfloat16': 2, 'float8_e4m3fn': 1, 'float8_e5m2': 1}


def why_not_storable(dtype: numpy.dtype) -> str | None:
    """Why arrays of ``dtype`` (as :func:`engine_array` gives it) cannot be stored: a type
    defined outside NumPy that has no encoding here (ml_dtypes' int4), which NumPy would write
    as raw bytes (``'|V1'``), its type lost. Else None."""
    if dtype.isbuiltin != 2:
        return None
    return (f'an array of dtype {dtype.name} cannot be saved: gpuserial stores NumPy\'s dtypes '
            f'and {", ".join(EXTENSION_DTYPES)}; convert it (or save its bits with '
            f'.view(numpy.uint{dtype.itemsize * 8}))')


@functools.cache
def encoded_dtype(name: str) -> numpy.dtype:
    """The stored encoding of the extension dtype ``name`` (see :data:`EXTENSION_DTYPES`)."""
    return numpy.dtype([(name, f'<u{EXTENSION_DTYPES[name]}')])


def bits_dtype(name: str) -> numpy.dtype:
    """The integers whose bits hold values of the extension dtype ``name``, as engines view
    them (see :func:`holds_bits_of`)."""
    return numpy.dtype(f'<u{EXTENSION_DTYPES[name]}')


def extension_of(dtype: numpy.dtype) -> str | None:
    """The extension dtype's name for ml_dtypes' dtype or for its stored encoding, else None.
    ml_dtypes' types are NumPy types defined outside it (``isbuiltin`` 2), of kind ``'V'`` or
    ``'f'`` (float8_e5m2 with ml_dtypes 0.7); their encodings are structured."""
    if dtype.isbuiltin == 1:  # one of NumPy's own types, the common case
        return None
    if dtype.names is None:
        return dtype.name if dtype.isbuiltin == 2 and dtype.name in EXTENSION_DTYPES else None
    name = dtype.names[0]
    if len(dtype.names) == 1 and name in EXTENSION_DTYPES and dtype == encoded_dtype(name):
        return name
    return None


def kernel_view(array):
    """``array`` as a device kernel can copy it: in the stored encoding of an extension dtype
    (a structured dtype, which CuPy's kernels take only from 14 on), as the integers of its
    bits; any other array as it is."""
    name = extension_of(array.dtype) if array.dtype.names else None
    return array if name is None else array.view(bits_dtype(name))


def holds_bits_of(dtype: numpy.dtype, stored: numpy.dtype) -> bool:
    """Whether arrays of ``dtype`` hold values ``stored`` as an extension dtype's encoding bit
    for bit: little-endian integers of its size, as the engine views a bfloat16 array on a GPU
    to fill it. The loader decides which targets may; the engine and readers then move the bits
    as they are."""
    return (extension_of(stored) is not None and dtype.kind in 'iu'
            and dtype.itemsize == stored.itemsize and dtype.str[0] in '<|')


def decoded(array):
    """A host array in an extension encoding as ml_dtypes' type when ml_dtypes is installed
    (a view); any other array as it is."""
    name = extension_of(array.dtype) if isinstance(array, numpy.ndarray) else None
    if name is None or array.dtype.names is None:
        return array
    try:
        import ml_dtypes
    except ImportError:
        return array
    return array.view(numpy.dtype(getattr(ml_dtypes, name)))


class Framework:
    """An array library whose arrays the engine handles as NumPy or CuPy views (DLPack).

    ``mutable`` frameworks are loaded in place through those views; the others get new arrays.
    A framework's module is imported only by whoever made its arrays: ``owns`` looks in
    ``sys.modules``.
    """

    name: str
    mutable: bool

    def owns(self, value) -> bool:
        raise NotImplementedError

    def engine_array(self, value, writable: bool = False):
        """A zero-copy NumPy or CuPy view of ``value`` (extension dtypes in their encoding)."""
        raise NotImplementedError

    def device_of(self, value) -> Device:
        raise NotImplementedError

    def from_engine(self, array, device: Device):
        """A new array of this framework on ``device`` from a NumPy or CuPy array (a view of its
        memory where the two can share it)."""
        raise NotImplementedError

    def device(self, spec) -> Device | None:
        """The Device that ``spec``, a device object of this framework, names; else None."""
        return None

    def why_not_fillable(self, value) -> str | None:
        """Why ``value`` cannot be filled through :meth:`engine_array`'s view (that view would
        be a copy), else None."""
        return None

    def stored_dtype(self, value) -> numpy.dtype:
        """The dtype ``value`` is stored as (extension dtypes in their encoding)."""
        return self.engine_array(value).dtype

    def extension(self, value) -> str | None:
        """The extension dtype of ``value`` (``'bfloat16'``, ...; see :data:`EXTENSION_DTYPES`),
        else None."""
        return None

    def new_like(self, value, array):
        """A new array of this framework with the values of ``array`` (NumPy or CuPy, read
        where :meth:`device_of` says), placed where ``value`` is."""
        return self.from_engine(array, self.device_of(value))


def _gpu_view(value, spec):
    cupy = _usable_cupy()
    if cupy is None:
        raise DeviceError(f'a {spec} array needs CuPy with a usable GPU to be staged')
    return cupy.from_dlpack(value)


def _native(array: numpy.ndarray) -> numpy.ndarray:
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder('='))


def _cuda_id(device: Device) -> int:
    if not isinstance(device, CudaDevice):
        raise DeviceError(f'torch and JAX arrays live on the CPU or on CUDA GPUs, not on '
                          f'{device.name}')
    return device.id


class _Torch(Framework):
    name = 'torch'
    mutable = True

    def owns(self, value) -> bool:
        torch = sys.modules.get('torch')
        return torch is not None and isinstance(value, torch.Tensor)

    def _extensions(self, torch) -> dict:
        return {getattr(torch, name): name for name in EXTENSION_DTYPES if hasattr(torch, name)}

    def engine_array(self, tensor, writable=False):
        torch = sys.modules['torch']
        tensor = tensor.detach().resolve_conj().resolve_neg()
        extension = self._extensions(torch).get(tensor.dtype)
        as_ints = tensor
        if extension is not None:
            as_ints = tensor.view({1: torch.uint8, 2: torch.int16}[EXTENSION_DTYPES[extension]])
        if tensor.device.type == 'cpu':
            try:
                array = as_ints.numpy()  # writable: numpy.from_dlpack's are not before NumPy 2.3
            except TypeError as error:  # float8_e4m3fnuz, complex32, quantized: NumPy has none
                raise TypeError(f'a torch tensor of dtype {tensor.dtype} has no NumPy view '
                                f'({error}): gpuserial stores NumPy\'s dtypes and '
                                f'{", ".join(EXTENSION_DTYPES)}') from None
        elif tensor.device.type != 'cuda':
            raise DeviceError(f'torch tensors on {tensor.device} are not supported: move them to '
                              f'the CPU or a CUDA device')
        elif extension is None:
            return _gpu_view(tensor, 'torch CUDA')
        elif writable:  # its bits as integers (CuPy before 14 has no such dtype), filled so
            return _gpu_view(as_ints, 'torch CUDA')
        elif _usable_cupy() is None:  # no GPU view without CuPy: a host copy, to be written
            array = as_ints.cpu().numpy()
        else:
            array = _gpu_view(as_ints, 'torch CUDA')
        return array if extension is None else array.view(encoded_dtype(extension))

    def extension(self, tensor) -> str | None:
        return self._extensions(sys.modules['torch']).get(tensor.dtype)

    def why_not_fillable(self, tensor) -> str | None:
        if tensor.is_conj() or tensor.is_neg():  # its view is of a resolved copy
            return ('it is a lazy conjugate or negative view (torch resolves it into a copy); '
                    'load into a tensor that owns its values, then conj() it')
        return None

    def device_of(self, tensor) -> Device:
        return self.device(tensor.device)

    def from_engine(self, array, device):
        torch = sys.modules.get('torch') or __import__('torch')
        extension = extension_of(array.dtype)
        if isinstance(array, numpy.ndarray):
            if extension is not None:
                ints = array.view({1: numpy.uint8, 2: numpy.int16}[EXTENSION_DTYPES[extension]])
                tensor = torch.from_numpy(_native(ints)).view(getattr(torch, extension))
            else:
                tensor = torch.from_numpy(_native(array))
            return tensor if device.backend.is_host else tensor.to(f'cuda:{_cuda_id(device)}')
        return torch.from_dlpack(array)

    def device(self, spec):
        torch = sys.modules.get('torch')
        if torch is None or not isinstance(spec, torch.device):
            return None
        if spec.type == 'cpu':
            return CPU
        if spec.type == 'cuda':
            return _cuda_device(torch.cuda.current_device() if spec.index is None else spec.index,
                                spec)
        raise DeviceError(f'unknown device {spec!r}: gpuserial stages torch tensors on the CPU '
                          f'and on CUDA devices')


class _Jax(Framework):
    name = 'jax'
    mutable = False  # JAX arrays are immutable: loads make new ones

    def owns(self, value) -> bool:
        jax = sys.modules.get('jax')
        return jax is not None and isinstance(value, jax.Array)

    def _placed(self, array):
        """The one device ``array`` lives on, or None when it is spread over several."""
        placed = array.devices()
        return next(iter(placed)) if len(placed) == 1 else None

    def engine_array(self, array, writable=False):
        on = self._placed(array)
        if on is None:
            return self._spread_array(array)
        if on.platform == 'cpu':
            host = numpy.asarray(array)  # a view of its memory (ml_dtypes' bfloat16 too)
        elif extension_of(array.dtype) is None:
            return _gpu_view(array, 'JAX GPU')
        else:
            host = numpy.asarray(array)  # a host copy: CuPy before 14 holds no such dtype
        name = extension_of(host.dtype)
        return host if name is None else host.view(encoded_dtype(name))

    def _spread_array(self, array):
        """An array spread over several devices: one replica when every device holds all of it,
        else gathered on the host (one host copy of the array while it is written)."""
        if not array.is_fully_addressable:
            raise DeviceError(f'a JAX array of shape {array.shape} spread over several processes '
                              f'cannot be saved by one of them: save each process\'s blocks with '
                              f'gpuserial.distributed.save_sharded')
        if array.is_fully_replicated:
            return self.engine_array(array.addressable_shards[0].data)
        host = numpy.asarray(array)
        name = extension_of(host.dtype)
        return host if name is None else host.view(encoded_dtype(name))

    def stored_dtype(self, array) -> numpy.dtype:
        name = extension_of(numpy.dtype(array.dtype))
        return numpy.dtype(array.dtype) if name is None else encoded_dtype(name)

    def device_of(self, array) -> Device:
        on = self._placed(array)
        return CPU if on is None else self.device(on)  # a spread array is read on the host

    def new_like(self, value, array):
        if self._placed(value) is not None:
            return super().new_like(value, array)
        return sys.modules['jax'].device_put(_native(decoded(array)), value.sharding)

    def from_engine(self, array, device):
        jax = sys.modules.get('jax') or __import__('jax')
        if not isinstance(array, numpy.ndarray):
            return jax.dlpack.from_dlpack(array)
        return jax.device_put(_native(decoded(array)), self._jax_device(jax, device))

    def _jax_device(self, jax, device: Device):
        if device.backend.is_host:
            return jax.devices('cpu')[0]
        wanted = _cuda_id(device)
        for candidate in jax.devices('gpu'):
            if getattr(candidate, 'local_hardware_id', candidate.id) == wanted:
                return candidate
        raise DeviceError(f'JAX has no GPU {wanted} (its GPUs: {jax.devices("gpu")})')

    def device(self, spec):
        jax = sys.modules.get('jax')
        if jax is None or not isinstance(spec, jax.Device):
            return None
        if spec.platform == 'cpu':
            return CPU
        if spec.platform in ('gpu', 'cuda'):
            return _cuda_device(getattr(spec, 'local_hardware_id', spec.id), spec)
        raise DeviceError(f'unknown device {spec!r}: gpuserial stages JAX arrays on the CPU and '
                          f'on CUDA GPUs')


TORCH = _Torch()
JAX = _Jax()
FRAMEWORKS = {'torch': TORCH, 'jax': JAX}


def framework_of(value) -> Framework | None:
    """The framework of a torch tensor or a JAX array, else None (imports nothing)."""
    for framework in FRAMEWORKS.values():
        if framework.owns(value):
            return framework
    return None


def engine_array(value, writable: bool = False):
    """What the engine and the formats handle for ``value``: NumPy, CuPy and stand-in arrays as
    they are; torch tensors and JAX arrays as zero-copy NumPy or CuPy views of their memory;
    dtypes NumPy lacks in their stored encoding, or on a device as their bits in integers of
    their size, to be filled (``writable``; see :func:`holds_bits_of`); anything else as it
    is."""
    if type(value) is numpy.ndarray:
        if value.dtype.kind == 'T' and not writable:  # NumPy 2's StringDType: as str
            try:
                width = int(numpy.strings.str_len(value).max(initial=1))
            except ValueError as error:  # a missing value (its na_object)
                raise TypeError(f'a StringDType array with missing values cannot be saved '
                                f'({error}): fill them first') from None
            return value.astype(f'<U{width}')
        name = extension_of(value.dtype)
        return value if name is None else value.view(encoded_dtype(name))
    masked = sys.modules.get('numpy.ma')  # imported where a masked array exists
    if not writable and masked is not None and isinstance(value, masked.MaskedArray):
        raise TypeError('a masked array cannot be saved: its mask would be lost (numpy.savez and '
                        'h5py drop it); save its .data and numpy.ma.getmaskarray() of it as two '
                        'entries, or its .filled() values')
    framework = framework_of(value)
    if framework is not None:
        return framework.engine_array(value, writable)
    if backend_of(value) is None:
        return value
    name = extension_of(numpy.dtype(value.dtype))
    if name is None:
        return value
    return value.view(bits_dtype(name) if writable else encoded_dtype(name))
