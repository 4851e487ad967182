"""A stand-in device for tests: NumPy-backed, but a distinct array type on a pretend GPU.

Its copies are asynchronous in earnest: a copy only happens when someone waits on its event
(or on a later one of the same stream), so an engine that reuses a buffer before waiting, or
reads one too early, gets wrong data and the tests see it.
"""

from __future__ import annotations

import numpy

from gpuserial import devices


class StandInArray:
    """An array on a stand-in device; its data is not reachable as a host array."""

    def __init__(self, data: numpy.ndarray, device: StandInDevice):
        self._data = data
        self.device = device

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    size = property(lambda self: self._data.size)
    ndim = property(lambda self: self._data.ndim)
    nbytes = property(lambda self: self._data.nbytes)
    flags = property(lambda self: self._data.flags)
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
        """A host copy (what ``cupy.ndarray.get`` does), for the tests' checks."""
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


class _Stream:
    def __init__(self):
        self.pending: list = []  # (event, operation), in stream order


class _Event:
    done = False


class StandInBackend(devices.Backend):
    xp = numpy

    def __init__(self):
        self.streams: dict[int, _Stream] = {}
        self.log: list[tuple] = []  # ('d2h'|'h2d', device id, start, nbytes), in issue order
        self.pinned_allocations = 0

    def owns(self, array) -> bool:
        return isinstance(array, StandInArray)

    def device_of(self, array) -> devices.Device:
        return array.device

    def empty(self, shape, dtype, device):
        return StandInArray(numpy.empty(shape, dtype), device)

    def send(self, array, device):
        if isinstance(array, StandInArray):
            return array if array.device == device else StandInArray(array._data.copy(), device)
        return StandInArray(numpy.array(devices.to_host(array), copy=True), device)

    def to_numpy(self, array):
        return array._data.copy()

    def contiguous(self, array):
        return StandInArray(numpy.ascontiguousarray(array._data), array.device)

    def assign(self, dst, src) -> None:
        dst._data[...] = src._data

    def stream(self, device):
        return self.streams.setdefault(device.id, _Stream())

    def pinned(self, nbytes):
        self.pinned_allocations += 1
        return numpy.full(nbytes, 0xAB, numpy.uint8)  # garbage until a copy fills it

    def _enqueue(self, stream: _Stream, operation) -> _Event:
        event = _Event()
        stream.pending.append((event, operation))
        return event

    def to_host_async(self, src_bytes, start, host, stream):
        self.log.append(('d2h', src_bytes.device.id, start, host.nbytes))

        def copy():
            host[:] = src_bytes._data[start:start + host.nbytes]
        return self._enqueue(stream, copy)

    def from_host_async(self, host, dst_bytes, start, stream):
        self.log.append(('h2d', dst_bytes.device.id, start, host.nbytes))

        def copy():
            dst_bytes._data[start:start + host.nbytes] = host
        return self._enqueue(stream, copy)

    def wait(self, event):
        for stream in self.streams.values():
            if any(e is event for e, _ in stream.pending):
                while not event.done:
                    done, operation = stream.pending.pop(0)
                    operation()
                    done.done = True

    def reset(self) -> None:
        self.log.clear()
        self.pinned_allocations = 0


BACKEND = StandInBackend()
