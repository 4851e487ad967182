"""A stand-in device for tests: NumPy-backed, but a distinct array type on a pretend GPU that
keeps CUDA's rules strictly enough that an engine breaking them gets wrong data or an error.

- Work is queued on streams and runs only when someone waits for it: an async copy completes
  when its event (or a later one of its stream) is waited on, a kernel when its stream is
  synchronized. So an engine that reuses a buffer before waiting, or reads it too early, sees
  garbage, and one that does not order its stream after the caller's sees stale data.
- Each thread has a current stream per device (the default stream unless a test makes another
  current with :meth:`StandInBackend.using`). Kernels (:meth:`StandInBackend.launch`, and every
  ``assign``) go there. ``wait_event`` between streams is modelled: a stream that waits runs
  the other stream's work up to the event first.
- CuPy's own checks: async copies only to or from pinned buffers (from ``pinned()``; a test
  that makes pinning fail allows pageable ones, which CUDA copies at once), of the right size;
  arrays, streams and copies on one device; no arrays of non-native byte order, nor of text
  or dates (CuPy 14's cupy.empty refuses them).
- ``get()`` (the tests' view of an array) waits for everything on its device.
"""

from __future__ import annotations

import collections
import contextlib
import threading

import numpy

from gpuserial.engine import devices


class StandInError(AssertionError):
    """An engine broke one of CUDA's (or CuPy's) rules."""


class StandInArray:
    """An array on a stand-in device; its data is not reachable as a host array."""

    def __init__(self, data: numpy.ndarray, device: StandInDevice):
        if not data.dtype.isnative:
            raise StandInError(f'a device array of non-native byte order {data.dtype}')
        self._data = data
        self.device = device

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    size = property(lambda self: self._data.size)
    ndim = property(lambda self: self._data.ndim)
    nbytes = property(lambda self: self._data.nbytes)
    flags = property(lambda self: self._data.flags)
    strides = property(lambda self: self._data.strides)  # as CuPy's: bytes
    itemsize = property(lambda self: self._data.itemsize)
    T = property(lambda self: StandInArray(self._data.T, self.device))

    def reshape(self, *shape) -> StandInArray:
        return StandInArray(self._data.reshape(*shape), self.device)

    def view(self, dtype) -> StandInArray:
        return StandInArray(self._data.view(dtype), self.device)

    def __getitem__(self, index) -> StandInArray:
        return StandInArray(self._data[index], self.device)

    def __array__(self, *args, **kwargs):
        raise TypeError('a stand-in device array cannot be used as a host array')

    def get(self) -> numpy.ndarray:
        """A host copy once all work on the device is done (``cupy.ndarray.get`` does the same
        for its stream; for a non-contiguous array it first runs a copy kernel, which takes no
        structured dtype)."""
        if self._data.dtype.names is not None and not self._data.flags.c_contiguous:
            raise StandInError('a kernel on a structured dtype (get of a non-contiguous array)')
        BACKEND.synchronize_device(self.device.id)
        return self._data.copy()

    def __repr__(self) -> str:
        return f'StandInArray({self._data!r}, {self.device.name})'


class StandInDevice(devices.Device):
    def __init__(self, id: int):
        self.id = id
        self.name = f'@standin:{id}'

    @property
    def backend(self) -> StandInBackend:
        return BACKEND


class _Event:
    def __init__(self, stream: _Stream):
        self.stream = stream
        self.done = False


class _Stream:
    def __init__(self, device_id: int, name: str):
        self.device_id = device_id
        self.name = name
        self.pending: collections.deque = collections.deque()  # (event or None, operation)

    def __repr__(self) -> str:
        return f'<stream {self.name} of device {self.device_id}>'


class StandInBackend(devices.Backend):
    xp = numpy

    def __init__(self):
        self._lock = threading.RLock()  # one lock for all queues: streams wait on each other
        self._engine_streams: dict[int, _Stream] = {}
        self._defaults: dict[int, _Stream] = {}
        self._side_streams: list[_Stream] = []  # made current by tests (``using``)
        self._current = threading.local()
        self._pinned: dict[int, int] = {}  # address of each pinned buffer: its size
        self.log: list[tuple] = []  # ('d2h'|'h2d', device id, start, nbytes), in issue order
        self.pinned_allocations = 0
        self.allocations: list[int] = []  # the bytes of each device array the engine made
        self.pinning_fails = False  # a test's locked-memory limit
        self.failing_waits = 0  # the next this many waits raise, as after a CUDA error
        self.pageable_copies_allowed = False  # only where a test expects the engine's fallback
        self.waits = 0  # events waited for by the engine
        self.orderings: list[int] = []  # the device of each order_after_current, in order
        self.extension_dtypes = True  # holds ml_dtypes' bfloat16, ..., as CuPy does from 14 on

    # -- arrays -------------------------------------------------------------------------------

    def owns(self, array) -> bool:
        return isinstance(array, StandInArray)

    def device_of(self, array) -> devices.Device:
        return array.device

    def _check_holds(self, dtype) -> None:
        """Device arrays are made of plain dtypes only: no structured ones (the stored encoding
        of bfloat16 is one: CuPy's kernels cannot take it, and before 14 it cannot make it),
        and ml_dtypes' types only where the device holds them (CuPy from 14 on)."""
        dtype = numpy.dtype(dtype)
        if dtype.names is not None:
            raise StandInError(f'a device array of the structured dtype {dtype}')
        if dtype.kind in 'USMmO':  # CuPy 14: 'Unsupported dtype <U3' (no C type for its kernels)
            raise StandInError(f'a device array of {dtype}, which CuPy cannot make')
        if devices.extension_of(dtype) and not self.extension_dtypes:
            raise StandInError(f'a device array of {dtype}, which this device does not hold')

    def empty(self, shape, dtype, device):
        self._check_holds(dtype)
        array = StandInArray(numpy.empty(shape, dtype), device)
        self.allocations.append(array.nbytes)
        return array

    def send(self, array, device):
        if isinstance(array, StandInArray):
            if array.device == device:
                return array
            self._check_holds(array.dtype)
            array.device.backend.synchronize_device(array.device.id)  # a peer copy
            return StandInArray(array._data.copy(), device)
        host = numpy.array(devices.to_host(array), copy=True)
        self._check_holds(host.dtype)
        return StandInArray(host, device)

    def to_numpy(self, array):
        return array.get()

    def holds_extension(self, name, device) -> bool:
        return self.extension_dtypes

    def assign(self, dst, src, stream=None) -> None:
        """``dst[...] = src``: a kernel on ``stream`` (None: the current stream), as CuPy
        launches it."""
        if dst.device != src.device:
            raise StandInError('assign between devices')
        if dst.dtype.names is not None or src.dtype.names is not None:
            raise StandInError('a kernel on a structured dtype')
        if stream is None:
            stream = self.current_stream(dst.device.id)
        self._check_device(stream, dst.device.id)
        self._enqueue(stream, lambda: dst._data.__setitem__(Ellipsis, src._data))

    # -- streams, events and kernels ----------------------------------------------------------

    def stream(self, device):
        with self._lock:
            if device.id not in self._engine_streams:
                self._engine_streams[device.id] = _Stream(device.id, 'engine')
            return self._engine_streams[device.id]

    def current_stream(self, device_id: int) -> _Stream:
        """This thread's current stream on the device (its default stream unless ``using``)."""
        current = getattr(self._current, 'streams', {})
        if device_id in current:
            return current[device_id]
        with self._lock:
            return self._defaults.setdefault(device_id, _Stream(device_id, 'default'))

    @contextlib.contextmanager
    def using(self, device, name: str = 'side'):
        """Makes a new stream current on ``device`` for this thread (as ``with stream:``)."""
        streams = getattr(self._current, 'streams', None)
        if streams is None:
            streams = self._current.streams = {}
        stream = _Stream(device.id, name)
        with self._lock:
            self._side_streams.append(stream)
        previous = streams.get(device.id)
        streams[device.id] = stream
        try:
            yield stream
        finally:
            if previous is None:
                del streams[device.id]
            else:
                streams[device.id] = previous

    def launch(self, device, kernel) -> None:
        """Queues ``kernel()`` on the current stream of ``device``."""
        self._enqueue(self.current_stream(device.id), kernel)

    def _enqueue(self, stream: _Stream, operation) -> _Event:
        with self._lock:
            event = _Event(stream)
            stream.pending.append((event, operation))
            return event

    def _run_until(self, event: _Event) -> None:
        with self._lock:
            stream = event.stream
            while not event.done:
                if not stream.pending:
                    raise StandInError(f'{event} of {stream} never comes')
                done, operation = stream.pending[0]
                operation()  # may run other streams first (a wait_event)
                stream.pending.popleft()
                done.done = True

    def synchronize_stream(self, stream: _Stream) -> None:
        with self._lock:
            if stream.pending:
                self._run_until(stream.pending[-1][0])

    def synchronize_device(self, device) -> None:
        device_id = getattr(device, 'id', device)
        with self._lock:
            streams = [s for s in [*self._engine_streams.values(), *self._defaults.values(),
                                   *self._side_streams] if s.device_id == device_id]
        for stream in streams:
            self.synchronize_stream(stream)

    def _record(self, stream: _Stream) -> _Event:
        return self._enqueue(stream, lambda: None)

    def _wait_for(self, stream: _Stream, event: _Event) -> None:
        """``stream.wait_event(event)``: work queued on ``stream`` after this runs after it."""
        if stream.device_id != event.stream.device_id:
            raise StandInError('a stream waits for an event of another device')
        self._enqueue(stream, lambda: self._run_until(event))

    def order_after_current(self, stream, device):
        self._check_device(stream, device.id)
        self.orderings.append(device.id)
        self._wait_for(stream, self._record(self.current_stream(device.id)))

    def order_current_after(self, event, device):
        self._wait_for(self.current_stream(device.id), event)

    def record(self, stream):
        return self._record(stream)

    def wait(self, event):
        with self._lock:
            self.waits += 1
            if self.failing_waits:
                self.failing_waits -= 1
                raise StandInError('cudaErrorLaunchFailure (a wait made to fail)')
        self._run_until(event)

    def synchronize(self, stream):
        self.synchronize_stream(stream)

    @staticmethod
    def _check_device(stream: _Stream, device_id: int) -> None:
        if stream.device_id != device_id:
            raise StandInError(f'{stream} used for device {device_id}')

    # -- pinned memory and async copies -------------------------------------------------------

    def pinned(self, nbytes):
        with self._lock:
            if self.pinning_fails:
                raise StandInError('cudaErrorMemoryAllocation: out of memory (pinning)')
            self.pinned_allocations += 1
            buffer = numpy.full(max(nbytes, 1), 0xAB, numpy.uint8)[:nbytes]  # garbage at first
            self._pinned[buffer.ctypes.data] = nbytes
            return buffer

    def _is_pinned(self, host: numpy.ndarray) -> bool:
        address = host.ctypes.data
        with self._lock:
            return any(start <= address and address + host.nbytes <= start + size
                       for start, size in self._pinned.items())

    def _copy(self, kind: str, device_bytes, start: int, host, stream: _Stream, copy) -> None:
        self._check_device(stream, device_bytes.device.id)
        if start < 0 or start + host.nbytes > device_bytes.nbytes:
            raise StandInError(f'a copy of {host.nbytes} bytes at {start} of '
                               f'{device_bytes.nbytes}')
        self.log.append((kind, device_bytes.device.id, start, host.nbytes))
        event = self._enqueue(stream, copy)
        if not self._is_pinned(host):  # CUDA copies pageable memory before returning
            if not self.pageable_copies_allowed:
                raise StandInError('an async copy to or from memory that is not pinned')
            self._run_until(event)

    def to_host_async(self, src_bytes, start, host, stream):
        def copy():
            host[:] = src_bytes._data[start:start + host.nbytes]
        self._copy('d2h', src_bytes, start, host, stream, copy)

    def from_host_async(self, host, dst_bytes, start, stream):
        def copy():  # reads the host buffer when the copy runs, as the DMA engine does
            dst_bytes._data[start:start + host.nbytes] = host
        self._copy('h2d', dst_bytes, start, host, stream, copy)

    def pending(self) -> int:
        """How much work is queued, not yet run, on the engine's and the default streams."""
        with self._lock:
            return sum(len(stream.pending) for stream in
                       [*self._engine_streams.values(), *self._defaults.values()])

    def reset(self) -> None:
        self.log.clear()
        self.allocations.clear()
        self.pinned_allocations = 0
        self.pinning_fails = self.pageable_copies_allowed = False
        self.failing_waits = self.waits = 0
        self.orderings.clear()
        with self._lock:
            self._side_streams = [stream for stream in self._side_streams if stream.pending]


BACKEND = StandInBackend()
