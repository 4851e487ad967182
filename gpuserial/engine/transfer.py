"""The staging engine: device<->host copies in chunks, through pinned buffers, overlapped.

Saving reads an array as a stream of C-order byte chunks (:func:`host_chunks`), or many small
arrays at once, packed into shared buffers (:func:`host_copies`); loading fills an array in place
from a stream of its bytes (:func:`fill`), or many small arrays from shared buffers
(:func:`fill_many`). Host (NumPy) arrays are handed out
as their own memory, no copy. Device arrays go through a pool of page-locked buffers,
double-buffered on the engine's own stream of their device: while the caller writes (or reads)
chunk k, the copy of chunk k+1 is under way. Host memory beyond the arrays themselves stays
bounded by the pool; a non-contiguous device array goes block by block through a chunk-sized
device buffer per pinned buffer, never through a whole contiguous copy.

The ordering contract. A save orders its copies after the work queued so far on the calling
thread's current stream of each device (what wrote the arrays there); arrays written on other
streams must be synchronized by the caller first. A load returns only once every copy and
kernel it queued has completed, so its results are visible to any stream.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import operator
import os
import threading
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence

import numpy

from gpuserial.engine import devices
from gpuserial.engine.devices import NUMPY, Backend, Device, backend_of
from gpuserial.storage import _signals

# memoryview(array) of a NumPy array carries "type: ignore[arg-type]": NumPy's stubs give
# ndarray the buffer protocol (__buffer__) only from Python 3.12 on (numpy/numpy#26783).

__all__ = ['block_shape', 'configure', 'device_copies', 'fill', 'fill_many', 'host_chunks',
           'host_copies', 'hyperslabs', 'release_pool', 'settings']

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
        for name, such in (('chunk_bytes', 'bytes, such as 16 << 20'), ('buffers', 'such as 3')):
            value = getattr(self, name)
            try:
                operator.index(value)
            except TypeError:  # a float or '16MiB' failed later, deep in a save or load
                raise TypeError(f'{name} must be an int ({such}), got {value!r}') from None
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


# ---------------------------------------------------------------------------------------------
# The pinned pool


class _Lease:
    """Buffers taken from the pool for one transfer; :meth:`discard` keeps them out of it."""

    def __init__(self, buffers: list[numpy.ndarray]):
        self.buffers = buffers
        self.discarded = False

    def discard(self) -> None:
        """Buffers a copy may still be writing into: never handed out again."""
        self.discarded = True


class _PinnedPool:
    """Pinned buffers, created on demand and reused across transfers.

    A buffer is at least a chunk long, so that transfers of arrays of every size share the same
    few buffers rather than each size pinning its own. Where pinning fails (a locked-memory
    limit), pageable buffers stand in, after one warning: copies from them are synchronous.
    """

    def __init__(self):
        self._lock = threading.RLock()  # a finally run by the garbage collector may re-enter
        self._free: dict[tuple[int, int], list[numpy.ndarray]] = collections.defaultdict(list)
        self._warned = False

    @contextlib.contextmanager
    def lease(self, backend: Backend, count: int, nbytes: int) -> Iterator[_Lease]:
        nbytes = max(nbytes, _settings.chunk_bytes)
        key = (id(backend), nbytes)
        with self._lock:
            free = self._free[key]
            taken = [free.pop() for _ in range(min(count, len(free)))]
        taken += [self._new(backend, nbytes) for _ in range(count - len(taken))]
        lease = _Lease(taken)
        try:
            yield lease
        finally:
            if not lease.discarded:
                with self._lock:
                    self._free[key].extend(taken)

    def _new(self, backend: Backend, nbytes: int) -> numpy.ndarray:
        try:
            return backend.pinned(nbytes)
        except Exception as error:  # CUDA's out of memory, or the OS's locked-memory limit
            with self._lock:
                if not self._warned:
                    self._warned = True
                    warnings.warn(f'gpuserial: pinning {nbytes} bytes of host memory failed '
                                  f'({error}); staging through pageable memory, more slowly',
                                  RuntimeWarning, stacklevel=4)
            return numpy.empty(nbytes, numpy.uint8)

    def release(self) -> None:
        with self._lock:
            self._free.clear()

    def forget_in_child(self) -> None:
        """After a fork: the parent's buffers are not the child's to reuse or to free."""
        _ABANDONED.append(self._free)
        self._free = collections.defaultdict(list)
        self._lock = threading.RLock()


_pool = _PinnedPool()
_ABANDONED: list = []  # a forked child's copies of its parent's buffers: never freed there
if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_pool.forget_in_child)


class _Arena:
    """Host memory for the staged copies of asynchronous saves, kept from one save to the next:
    a first touch of fresh pages costs about as much as the copy into them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buffer: numpy.ndarray | None = None
        self._busy = False

    def take(self, nbytes: int) -> numpy.ndarray | None:
        """``nbytes`` of it, for one save at a time (None while another has it)."""
        with self._lock:
            if self._busy:
                return None
            if self._buffer is None or self._buffer.nbytes < nbytes:
                self._buffer = None  # the old one goes first: never two at once
                self._buffer = numpy.empty(nbytes, numpy.uint8)
            self._busy = True
            return self._buffer[:nbytes]

    def give_back(self) -> None:
        with self._lock:
            self._busy = False

    def release(self) -> None:
        with self._lock:
            if not self._busy:
                self._buffer = None

    def forget_in_child(self) -> None:
        """After a fork: the parent's saves are not the child's; its copy of the memory is."""
        self._lock = threading.Lock()
        self._busy = False


host_arena = _Arena()
if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=host_arena.forget_in_child)


def release_pool() -> None:
    """Frees the pinned buffers and the staging memory of asynchronous saves kept for reuse
    (the next transfer or save makes new ones)."""
    _pool.release()
    host_arena.release()


# ---------------------------------------------------------------------------------------------
# Blocks


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


def _flat_blocks(size: int, itemsize: int, chunk_bytes: int) -> list[tuple[None, int, int]]:
    """Element ranges of at most a chunk (at least one element) of a contiguous array."""
    step = max(1, chunk_bytes // max(itemsize, 1))
    return [(None, start, min(start + step, size)) for start in range(0, size, step)]


def _blocks(array, contiguous: bool, blocks, chunk_bytes: int | None, itemsize: int) -> list:
    """The transfer's blocks: the caller's, else flat ranges of a contiguous array or
    hyperslabs of another."""
    if blocks is not None:
        return list(blocks)
    chunk_bytes = chunk_bytes or _settings.chunk_bytes
    if contiguous:
        return _flat_blocks(array.size, itemsize, chunk_bytes)
    return list(hyperslabs(array.shape, array.dtype.itemsize, chunk_bytes))


def block_shape(shape: tuple, index: tuple | None) -> tuple:
    """The shape of ``array[index]`` for an index from :func:`hyperslabs` (None: the whole)."""
    if not index:
        return shape if index is None else ()
    last = index[-1]
    return (last.stop - last.start, *shape[len(index):])


# ---------------------------------------------------------------------------------------------
# Device to host


def host_chunks(array, *, blocks: Sequence[tuple] | None = None,
                chunk_bytes: int | None = None) -> Generator[memoryview, None, None]:
    """Yields the bytes of ``array`` in C order, chunk by chunk.

    Each chunk is valid until the next one is asked for; close the generator (or exhaust it)
    to release the buffers and wait for the copies in flight. A contiguous host array is handed
    out as its own memory; a device array is copied through pinned buffers, the copy of the next
    chunk overlapping with whatever the caller does with this one.

    Args:
        array: a host or device array.
        blocks: ``(index, start, stop)`` triples from :func:`hyperslabs` covering the array in
            order, one chunk each (by default chunks of ``chunk_bytes``).
    """
    backend = backend_of(array)
    assert backend is not None  # an array of some backend
    if array.size == 0:
        return
    contiguous = backend.is_contiguous(array)
    blocks = _blocks(array, contiguous, blocks, chunk_bytes, array.dtype.itemsize)
    if backend.is_host:
        yield from _host_to_host(array, contiguous, blocks)
    else:
        yield from _device_to_host(backend, backend.device_of(array), array, contiguous, blocks)


def _host_to_host(array: numpy.ndarray, contiguous: bool, blocks) -> Iterator[memoryview]:
    itemsize = array.dtype.itemsize
    data = array.reshape(-1).view(numpy.uint8) if contiguous else None
    for index, start, stop in blocks:
        _signals.check()
        if data is not None:
            yield memoryview(data[start * itemsize:stop * itemsize])  # type: ignore[arg-type]
        else:
            block = array[index] if index is not None else array.reshape(-1)[start:stop]
            block = numpy.ascontiguousarray(block).reshape(-1).view(numpy.uint8)
            yield memoryview(block)  # type: ignore[arg-type]


def _device_to_host(backend: Backend, device: Device, array, contiguous: bool,
                    blocks) -> Iterator[memoryview]:
    array = devices.kernel_view(array)
    itemsize = array.dtype.itemsize
    largest = max(stop - start for _, start, stop in blocks) * itemsize
    stream = backend.stream(device)
    backend.order_after_current(stream, device)
    source = backend.as_bytes(array) if contiguous else None
    with _pool.lease(backend, _settings.buffers, largest) as lease, \
            _Flight(backend, stream, lease) as flight:
        for index, start, stop in blocks:
            _signals.check()
            landed = flight.make_room()
            if landed is not None:
                yield memoryview(lease.buffers[landed[0]][:landed[1]])
            slot = flight.take()
            count = (stop - start) * itemsize
            host = lease.buffers[slot][:count]
            if source is not None:
                backend.to_host_async(source, start * itemsize, host, stream)
            else:  # the block into a contiguous device buffer first, on the same stream
                packed = flight.scratch(slot, largest // itemsize, array.dtype, device)
                packed = packed[:stop - start]
                backend.assign(packed.reshape(block_shape(array.shape, index)), array[index],
                               stream)
                backend.to_host_async(backend.as_bytes(packed), 0, host, stream)
            flight.launch(slot, count)
        while flight:
            slot, count = flight.land()
            yield memoryview(lease.buffers[slot][:count])


def host_copies(arrays: Sequence, *, ordered: set[Device] | None = None
                ) -> Generator[memoryview, None, None]:
    """Yields the C-order bytes of each array in turn: the many small arrays of a model.

    Each view is valid until the next one is asked for; close the generator (or exhaust it)
    to release the buffers and wait for the copies in flight. Host arrays are handed out as
    their own memory. The device arrays of a run on one device are packed into shared pinned
    buffers: a buffer's copies are queued together and waited for with one event, while the
    caller takes the arrays of the buffer before; the engine's stream of a device is ordered
    after the caller's current stream once, not once per array.

    Args:
        arrays: C-contiguous arrays of any backend (device arrays of at most a chunk each).
        ordered: the devices whose engine stream this save has ordered already (updated).
    """
    ordered = set() if ordered is None else ordered
    for (backend, device), run in itertools.groupby(arrays, key=_backend_and_device):
        if backend.is_host:
            for array in run:
                yield memoryview(_contiguous(array, backend).reshape(-1).view(numpy.uint8))
            continue
        assert device is not None  # not a host backend
        if device not in ordered:
            backend.order_after_current(backend.stream(device), device)
            ordered.add(device)
        yield from _packed_to_host(backend, device, [_packable(a, backend) for a in run])


def device_copies(arrays: Sequence) -> tuple[list, Callable[[], None]]:
    """C-contiguous copies of device arrays, made on their own devices.

    The copies are queued on each device's engine stream after the caller's current stream,
    and the caller's current stream then waits for them: work queued there later cannot change
    what is copied. Returns the copies and a function that blocks until they are complete."""
    copies, streams = [], {}
    for array in arrays:
        backend, device = _backend_and_device(array)
        if device is None:
            raise ValueError(f'not a device array: {type(array).__name__}')
        if (backend, device) not in streams:
            streams[backend, device] = backend.stream(device)
            backend.order_after_current(streams[backend, device], device)
        plain = devices.kernel_view(array)
        copy = backend.empty(plain.shape, plain.dtype, device)
        backend.assign(copy, plain, streams[backend, device])
        copies.append(copy if plain is array else copy.view(array.dtype))
    events = []
    for (backend, device), stream in streams.items():
        events.append((backend, backend.record(stream)))
        backend.order_current_after(events[-1][1], device)

    def wait() -> None:
        for backend, event in events:
            backend.wait(event)
    return copies, wait


def _backend_and_device(array) -> tuple[Backend, Device | None]:
    if type(array) is numpy.ndarray:  # the common case, without the lookup
        return NUMPY, None
    backend = backend_of(array)
    assert backend is not None  # an array of some backend
    return backend, None if backend.is_host else backend.device_of(array)


def _contiguous(array, backend: Backend):
    if not backend.is_contiguous(array):
        raise ValueError(f'only C-contiguous arrays are packed; got a non-contiguous one of '
                         f'shape {array.shape}')
    return array


def _packable(array, backend: Backend):
    """A device array that fits a buffer of the pool (a chunk), and is C-contiguous."""
    if array.nbytes > _settings.chunk_bytes:
        raise ValueError(f'only arrays of at most a chunk ({_settings.chunk_bytes} bytes) are '
                         f'packed; got one of {array.nbytes} bytes')
    return _contiguous(array, backend)


def _packed_to_host(backend: Backend, device: Device, arrays: list) -> Iterator[memoryview]:
    """The bytes of ``arrays`` of ``device``, a buffer of them at a time (see host_copies)."""
    if not any(array.nbytes for array in arrays):  # empty arrays pin nothing
        yield from (memoryview(b'') for _ in arrays)
        return
    stream = backend.stream(device)
    with _pool.lease(backend, _settings.buffers, _settings.chunk_bytes) as lease, \
            _Flight(backend, stream, lease) as flight:
        for batch in _batches([array.nbytes for array in arrays]):
            _signals.check()
            landed = flight.make_room()
            if landed is not None:
                yield from _views(lease.buffers[landed[0]], landed[1])
            slot = flight.take()
            for index, start, count in batch:
                if count:
                    backend.to_host_async(backend.as_bytes(arrays[index]), 0,
                                          lease.buffers[slot][start:start + count], stream)
            flight.launch(slot, batch)
        while flight:
            slot, batch = flight.land()
            yield from _views(lease.buffers[slot], batch)


def _batches(sizes: list[int]) -> list[list[tuple[int, int, int]]]:
    """Consecutive arrays of these sizes packed into buffers of a chunk: for each buffer, the
    ``(index, start, count)`` of its arrays."""
    batches: list[list[tuple[int, int, int]]] = []
    used = _settings.chunk_bytes
    for index, count in enumerate(sizes):
        if used + count > _settings.chunk_bytes or not batches:
            batches.append([])
            used = 0
        batches[-1].append((index, used, count))
        used += count
    return batches


def _views(buffer: numpy.ndarray, batch: list[tuple[int, int, int]]) -> Iterator[memoryview]:
    for _, start, count in batch:
        yield memoryview(buffer[start:start + count])  # type: ignore[arg-type]


class _Flight:
    """The copies of one transfer in flight, one per leased buffer: each lands (is waited for)
    in order, freeing its buffer (and the device buffer paired with it) for the next. On
    leaving, what is still in flight is waited for, or, when that fails, the stream is
    synchronized and the buffers are discarded rather than handed out while a copy may still
    write into them. The first error is the one raised."""

    def __init__(self, backend: Backend, stream, lease: _Lease):
        self.backend = backend
        self.stream = stream
        self.lease = lease
        self.queue: collections.deque = collections.deque()
        self.free = collections.deque(range(len(lease.buffers)))
        self.device_buffers: list = [None] * len(lease.buffers)

    def __enter__(self) -> _Flight:
        return self

    def __bool__(self) -> bool:
        return bool(self.queue)

    def make_room(self) -> tuple | None:
        """Lands the oldest buffer's work when every buffer is in flight; returns its (slot,
        landing)."""
        if self.free:
            return None
        landed = self.land()
        self.free.append(landed[0])
        return landed

    def take(self) -> int:
        return self.free.popleft()

    def scratch(self, slot: int, size: int, dtype, device: Device):
        """The device buffer of ``size`` elements paired with buffer ``slot``, made once."""
        if self.device_buffers[slot] is None:
            self.device_buffers[slot] = self.backend.empty((size,), dtype, device)
        return self.device_buffers[slot]

    def launch(self, slot: int, landing) -> None:
        """Marks the work queued so far for buffer ``slot`` as in flight (one event for it
        all); ``landing`` is handed back when it lands."""
        self.queue.append((slot, landing, self.backend.record(self.stream)))

    def land(self) -> tuple:
        """Waits for the oldest buffer's work; returns its (slot, landing)."""
        slot, landing, event = self.queue[0]
        self.backend.wait(event)
        self.queue.popleft()
        return slot, landing

    def __exit__(self, kind, error, traceback) -> None:
        try:
            while self.queue:
                self.land()
            if kind is not None:  # copies may have been queued for a buffer not yet launched
                self.backend.synchronize(self.stream)
        except BaseException:
            self.lease.discard()
            with contextlib.suppress(BaseException):
                self.backend.synchronize(self.stream)
            if kind is None:
                raise


# ---------------------------------------------------------------------------------------------
# Host to device


def fill(dst, read_into: Callable[[memoryview], None], src_dtype: numpy.dtype, *,
         blocks: Sequence[tuple] | None = None, chunk_bytes: int | None = None) -> None:
    """Fills ``dst`` in place from a stream of C-order ``src_dtype`` values.

    Returns once the data is in ``dst`` for every stream and thread.

    Args:
        dst: the array to fill (any backend), of the stored shape; values are cast to its dtype
            (an extension dtype's encoding fills integers of its size bit for bit: see
            :func:`gpuserial.engine.devices.holds_bits_of`).
        read_into: fills a whole writable byte buffer with the next bytes of the stream.
        src_dtype: the dtype of the stored values.
        blocks: ``(index, start, stop)`` triples from :func:`hyperslabs` in which to ask
            ``read_into`` for the data, in order (by default chunks of ``chunk_bytes``).
    """
    backend = backend_of(dst)
    assert backend is not None  # an array of some backend
    if dst.size == 0:
        return
    src_dtype = numpy.dtype(src_dtype)
    if src_dtype != dst.dtype and devices.holds_bits_of(dst.dtype, src_dtype):
        src_dtype = dst.dtype  # an extension dtype's encoding into integers: bit for bit
    contiguous = backend.is_contiguous(dst)
    itemsize = max(src_dtype.itemsize, dst.dtype.itemsize)
    blocks = _blocks(dst, contiguous, blocks, chunk_bytes, itemsize)
    if backend.is_host:
        _fill_host(dst, contiguous, read_into, src_dtype, blocks)
    else:
        _host_to_device(backend, backend.device_of(dst), dst, contiguous, read_into, src_dtype,
                        blocks)


def fill_many(fills: Sequence[tuple[object, Callable[[memoryview], None]]],
              filled: Callable[[int], None] = lambda index: None, *,
              ordered: set[Device] | None = None) -> None:
    """Fills many small arrays in place, each from its reader: the mirror image of
    :func:`host_copies`.

    Returns once the data is in every array for every stream and thread.

    Args:
        fills: ``(dst, read_into)`` pairs: ``dst`` a C-contiguous array of any backend (a
            device array of at most a chunk),
            ``read_into`` fills a writable byte buffer of ``dst.nbytes`` with its stored bytes
            (of ``dst``'s dtype). Host arrays are read straight into. The device arrays of a
            run on one device are read into a shared pinned buffer, which is copied to them
            (a copy per array, one event per buffer) while the next buffer is read; the
            engine's stream of a device is ordered after the caller's current stream once.
        filled: called with the index of each array once its data is read and the copies of
            its buffer are queued: the array will hold the new data, even if a later read
            fails.
        ordered: the devices whose engine stream this load has ordered already (updated).
    """
    ordered = set() if ordered is None else ordered
    indexed = list(enumerate(fills))
    for (backend, device), run in itertools.groupby(
            indexed, key=lambda item: _backend_and_device(item[1][0])):
        if backend.is_host:
            for index, (dst, read_into) in run:
                _signals.check()
                read_into(memoryview(_contiguous(dst, backend).reshape(-1).view(numpy.uint8)))
                filled(index)
            continue
        assert device is not None  # not a host backend
        if device not in ordered:  # nothing the caller queued reads an array after our copy
            backend.order_after_current(backend.stream(device), device)
            ordered.add(device)
        _packed_from_host(backend, device, [(index, _packable(dst, backend), read_into)
                                            for index, (dst, read_into) in run], filled)


def _packed_from_host(backend: Backend, device: Device, run: list, filled) -> None:
    """Fills the arrays of ``run`` (index, dst, read_into) on ``device`` (see fill_many)."""
    if not any(dst.nbytes for _, dst, _ in run):  # empty arrays pin nothing
        for index, _, read_into in run:
            read_into(memoryview(bytearray()))
            filled(index)
        return
    stream = backend.stream(device)
    with _pool.lease(backend, _settings.buffers, _settings.chunk_bytes) as lease, \
            _Flight(backend, stream, lease) as flight:
        for batch in _batches([dst.nbytes for _, dst, _ in run]):
            flight.make_room()
            slot = flight.take()
            buffer = lease.buffers[slot]
            for position, start, count in batch:  # the file read overlaps the copies in flight
                _signals.check()
                run[position][2](memoryview(buffer[start:start + count]))  # type: ignore[arg-type]
            for position, start, count in batch:
                if count:
                    backend.from_host_async(buffer[start:start + count],
                                            backend.as_bytes(run[position][1]), 0, stream)
            flight.launch(slot, None)
            for position, _, _ in batch:
                filled(run[position][0])


def _fill_host(dst: numpy.ndarray, contiguous: bool, read_into, src_dtype: numpy.dtype,
               blocks) -> None:
    if contiguous and dst.dtype == src_dtype:
        data = dst.reshape(-1).view(numpy.uint8)
        size = src_dtype.itemsize
        for _, start, stop in blocks:
            _signals.check()
            read_into(memoryview(data[start * size:stop * size]))  # type: ignore[arg-type]
        return
    largest = max(stop - start for _, start, stop in blocks)
    scratch = numpy.empty(largest, src_dtype)
    flat = dst.reshape(-1) if contiguous else None
    for index, start, stop in blocks:
        _signals.check()
        values = scratch[:stop - start]
        read_into(memoryview(values.view(numpy.uint8)))  # type: ignore[arg-type]
        if flat is not None:
            numpy.copyto(flat[start:stop], values, casting='same_kind')
        else:
            numpy.copyto(dst[index], values.reshape(block_shape(dst.shape, index)),
                         casting='same_kind')


def _host_to_device(backend: Backend, device: Device, dst, contiguous: bool, read_into,
                    src_dtype: numpy.dtype, blocks) -> None:
    dst_dtype = dst.dtype
    largest = max(stop - start for _, start, stop in blocks)
    scratch_host = None if src_dtype == dst_dtype else numpy.empty(largest, src_dtype)
    stream = backend.stream(device)
    backend.order_after_current(stream, device)  # nothing the caller queued reads dst early
    target = backend.as_bytes(dst) if contiguous else None
    with _pool.lease(backend, _settings.buffers, largest * dst_dtype.itemsize) as lease, \
            _Flight(backend, stream, lease) as flight:
        for index, start, stop in blocks:
            _signals.check()
            flight.make_room()
            slot = flight.take()
            host = lease.buffers[slot][:(stop - start) * dst_dtype.itemsize]
            if scratch_host is None:
                # the file read overlaps the copies in flight
                read_into(memoryview(host))  # type: ignore[arg-type]
            else:
                values = scratch_host[:stop - start]
                read_into(memoryview(values.view(numpy.uint8)))  # type: ignore[arg-type]
                numpy.copyto(host.view(dst_dtype), values, casting='same_kind')
            if target is not None:
                backend.from_host_async(host, target, start * dst_dtype.itemsize, stream)
            else:  # into a contiguous device buffer, then into the block, on the same stream
                packed = flight.scratch(slot, largest, dst_dtype, device)[:stop - start]
                backend.from_host_async(host, backend.as_bytes(packed), 0, stream)
                backend.assign(dst[index], packed.reshape(block_shape(dst.shape, index)),
                               stream)
            flight.launch(slot, None)
