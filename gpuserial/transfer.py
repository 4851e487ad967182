"""The staging engine: device<->host copies in chunks, through pinned buffers, overlapped.

Saving reads an array as a stream of C-order byte chunks (:func:`host_chunks`); loading fills
an array in place from a stream of its bytes (:func:`fill`). Host (NumPy) arrays are handed out
as their own memory, no copy. Device arrays go through a pool of page-locked buffers,
double-buffered on a stream: while the caller writes (or reads) chunk k, the copy of chunk k+1
is under way. Host memory beyond the arrays themselves stays bounded by the pool.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy

from gpuserial import _signals
from gpuserial.devices import Backend, Device, backend_of

__all__ = ['configure', 'fill', 'host_chunks', 'hyperslabs', 'release_pool', 'settings']

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Settings:
    """Staging settings.

    Attributes:
        chunk_bytes: the size of one chunk (and of each pinned buffer).
        buffers: pinned buffers per transfer (2 is double buffering).
    """

    chunk_bytes: int = 16 * MiB
    buffers: int = 3

    def __post_init__(self):
        if self.chunk_bytes < 1:
            raise ValueError(f'chunk_bytes must be positive, got {self.chunk_bytes!r}')
        if self.buffers < 2:
            raise ValueError(f'buffers must be at least 2 (double buffering), got {self.buffers!r}')


_settings = Settings()


def settings() -> Settings:
    """The staging settings in force."""
    return _settings


class configure(contextlib.AbstractContextManager):
    """Sets the staging settings globally; used in a ``with`` block, only inside it.

    Args:
        chunk_bytes: the chunk (and pinned buffer) size in bytes.
        buffers: how many pinned buffers one transfer cycles through (at least 2).
    """

    def __init__(self, chunk_bytes: int | None = None, buffers: int | None = None):
        global _settings
        self._previous = _settings
        changes = {k: v for k, v in (('chunk_bytes', chunk_bytes), ('buffers', buffers))
                   if v is not None}
        _settings = dataclasses.replace(_settings, **changes)

    def __enter__(self) -> Settings:
        return _settings

    def __exit__(self, *exc_info) -> None:
        global _settings
        _settings = self._previous


class _PinnedPool:
    """Pinned buffers, created on demand and reused across transfers.

    A buffer is at least a chunk long, so that transfers of arrays of every size share the same
    few buffers rather than each size pinning its own.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._free: dict[tuple[int, int], list[numpy.ndarray]] = collections.defaultdict(list)

    @contextlib.contextmanager
    def lease(self, backend: Backend, count: int, nbytes: int) -> Iterator[list[numpy.ndarray]]:
        nbytes = max(nbytes, _settings.chunk_bytes)
        key = (id(backend), nbytes)
        with self._lock:
            free = self._free[key]
            taken = [free.pop() for _ in range(min(count, len(free)))]
        taken += [backend.pinned(nbytes) for _ in range(count - len(taken))]
        try:
            yield taken
        finally:
            with self._lock:
                self._free[key].extend(taken)

    def release(self) -> None:
        with self._lock:
            self._free.clear()


_pool = _PinnedPool()


def release_pool() -> None:
    """Frees the pinned buffers kept for reuse (the next transfer makes new ones)."""
    _pool.release()


def _spans(count: int, itemsize: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Element ranges ``[start, stop)`` of at most ``chunk_bytes`` (at least one element)."""
    step = max(1, chunk_bytes // max(itemsize, 1))
    for start in range(0, count, step):
        yield start, min(start + step, count)


def hyperslabs(shape: tuple[int, ...], itemsize: int, chunk_bytes: int | None = None
               ) -> Iterator[tuple[tuple, int, int]]:
    """Splits an array into C-contiguous blocks of at most a chunk (or one element).

    Yields ``(index, start, stop)``: the block is ``array[index]``, elements ``start:stop`` of
    the flattened array. Blocks run along the first axis whose rows fit in a chunk.
    """
    chunk_bytes = chunk_bytes or _settings.chunk_bytes
    if not shape:
        yield (), 0, 1
        return
    row = itemsize
    for dim in shape[1:]:
        row *= dim
    row_size = row // max(itemsize, 1)
    if row <= chunk_bytes or len(shape) == 1:
        per_block = max(1, chunk_bytes // max(row, 1))
        for i in range(0, shape[0], per_block):
            j = min(i + per_block, shape[0])
            yield (slice(i, j),), i * row_size, j * row_size
        return
    for i in range(shape[0]):
        for index, start, stop in hyperslabs(shape[1:], itemsize, chunk_bytes):
            yield (i, *index), i * row_size + start, i * row_size + stop


def host_chunks(array, *, spans: Iterable[tuple[int, int]] | None = None,
                chunk_bytes: int | None = None) -> Iterator[memoryview]:
    """Yields the bytes of ``array`` in C order, chunk by chunk.

    Each chunk is valid until the next one is asked for. A contiguous host array is handed out
    as its own memory; a device array is copied through pinned buffers, the copy of the next
    chunk overlapping with whatever the caller does with this one.

    Args:
        array: a host or device array.
        spans: element ranges ``(start, stop)`` covering the array in order (by default chunks
            of ``chunk_bytes``).
    """
    backend = backend_of(array)
    chunk_bytes = chunk_bytes or _settings.chunk_bytes
    itemsize = array.dtype.itemsize
    spans = list(spans) if spans is not None else list(_spans(array.size, itemsize, chunk_bytes))
    if backend.is_host:
        if array.flags.c_contiguous:
            data = backend.as_bytes(array)
            for start, stop in spans:
                _signals.check()
                yield memoryview(data[start * itemsize:stop * itemsize])
        else:
            for start, stop in spans:
                _signals.check()
                yield memoryview(array.flat[start:stop].view(numpy.uint8))
        return
    source = array if backend.is_contiguous(array) else backend.contiguous(array)
    yield from _device_to_host(backend, backend.device_of(array), backend.as_bytes(source),
                               itemsize, spans)


def _device_to_host(backend: Backend, device: Device, src_bytes, itemsize: int,
                    spans: list[tuple[int, int]]) -> Iterator[memoryview]:
    if not spans:  # an empty array: nothing to copy, no buffers to pin
        return
    largest = max(stop - start for start, stop in spans) * itemsize
    stream = backend.stream(device)
    backend.order_after_current(stream, device)
    with _pool.lease(backend, _settings.buffers, largest) as buffers:
        free = collections.deque(buffers)
        in_flight: collections.deque = collections.deque()
        try:
            for start, stop in spans:
                _signals.check()
                if not free:
                    buffer, count, event = in_flight.popleft()
                    backend.wait(event)
                    yield memoryview(buffer[:count])
                    free.append(buffer)
                buffer = free.popleft()
                count = (stop - start) * itemsize
                in_flight.append((buffer, count, backend.to_host_async(
                    src_bytes, start * itemsize, buffer[:count], stream)))
            while in_flight:
                buffer, count, event = in_flight.popleft()
                backend.wait(event)
                yield memoryview(buffer[:count])
        finally:  # a buffer goes back to the pool only once its copy has completed
            for _, _, event in in_flight:
                backend.wait(event)


def fill(dst, read_into: Callable[[memoryview], None], src_dtype: numpy.dtype, *,
         spans: Iterable[tuple[int, int]] | None = None, chunk_bytes: int | None = None) -> None:
    """Fills ``dst`` in place from a stream of C-order ``src_dtype`` values.

    Args:
        dst: the array to fill (any backend), of the stored shape; values are cast to its dtype.
        read_into: fills a whole writable byte buffer with the next bytes of the stream.
        src_dtype: the dtype of the stored values.
        spans: element ranges ``(start, stop)`` in which to ask ``read_into`` for the data, in
            order (by default chunks of ``chunk_bytes``).
    """
    backend = backend_of(dst)
    chunk_bytes = chunk_bytes or _settings.chunk_bytes
    src_dtype = numpy.dtype(src_dtype)
    itemsize = max(src_dtype.itemsize, dst.dtype.itemsize)
    spans = list(spans) if spans is not None else list(_spans(dst.size, itemsize, chunk_bytes))
    if backend.is_host:
        _fill_host(dst, read_into, src_dtype, spans)
        return
    device = backend.device_of(dst)
    target = dst if backend.is_contiguous(dst) else backend.empty(dst.shape, dst.dtype, device)
    _host_to_device(backend, device, backend.as_bytes(target), target.dtype, read_into,
                    src_dtype, spans)
    if target is not dst:
        backend.assign(dst, target)


def _fill_host(dst: numpy.ndarray, read_into, src_dtype: numpy.dtype, spans) -> None:
    if dst.flags.c_contiguous and dst.dtype == src_dtype:
        data = dst.reshape(-1).view(numpy.uint8)
        size = src_dtype.itemsize
        for start, stop in spans:
            _signals.check()
            read_into(memoryview(data[start * size:stop * size]))
        return
    largest = max((stop - start for start, stop in spans), default=0)
    scratch = numpy.empty(largest, src_dtype)
    flat = dst.reshape(-1) if dst.flags.c_contiguous else None
    for start, stop in spans:
        _signals.check()
        values = scratch[:stop - start]
        read_into(memoryview(values.view(numpy.uint8)))
        if flat is not None:
            numpy.copyto(flat[start:stop], values, casting='same_kind')
        else:
            dst.flat[start:stop] = values


def _host_to_device(backend: Backend, device: Device, dst_bytes, dst_dtype: numpy.dtype,
                    read_into, src_dtype: numpy.dtype, spans) -> None:
    if not spans:
        return
    largest = max(stop - start for start, stop in spans)
    scratch = None if src_dtype == dst_dtype else numpy.empty(largest, src_dtype)
    stream = backend.stream(device)
    backend.order_after_current(stream, device)
    with _pool.lease(backend, _settings.buffers, largest * dst_dtype.itemsize) as buffers:
        free = collections.deque(buffers)
        in_flight: collections.deque = collections.deque()
        try:
            for start, stop in spans:
                _signals.check()
                if not free:
                    buffer, event = in_flight.popleft()
                    backend.wait(event)
                    free.append(buffer)
                buffer = free.popleft()
                host = buffer[:(stop - start) * dst_dtype.itemsize]
                if scratch is None:
                    read_into(memoryview(host))  # the file read overlaps the copies in flight
                else:
                    values = scratch[:stop - start]
                    read_into(memoryview(values.view(numpy.uint8)))
                    numpy.copyto(host.view(dst_dtype), values, casting='same_kind')
                event = backend.from_host_async(host, dst_bytes, start * dst_dtype.itemsize,
                                                stream)
                in_flight.append((buffer, event))
        finally:
            for _, event in in_flight:
                backend.wait(event)
            backend.order_current_after(stream, device)
