"""Asynchronous saves: the state captured at the call, the file written on a thread.

:func:`save_async` runs the object's ``serialize`` in the caller, stages what it stored (copies
that the caller's later changes cannot reach) and hands them to a writer thread, which writes
the file a synchronous save would write: to a temporary file beside the target, renamed into
place once complete and (``durable``) fsynced. Staging:

- ``'host'``: copies in host memory, at most ``max_host_bytes`` held at once. A larger state
  stages in waves, the caller waiting while the writer drains the earlier ones; an array larger
  than the budget is written from the original while the caller waits. Host arrays always
  stage so.
- ``'device'`` (device arrays, by default): each copied on its own device, on the engine's
  stream after the caller's current stream, which then waits for the copies, so that work
  queued there later cannot change them. The copies (the arrays' size in device memory) are
  freed as the save commits.

At most one save per file is in flight: a second save of it, or a load from it, waits for the
first. A writer's error raises from the handle's futures, and once more from the next
:func:`save_async` or :func:`wait_all`. A process that exits normally waits for its saves.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import copy
import numbers
import os
import sys
import threading
from collections.abc import Callable, Iterator

import numpy

from gpuserial.engine import devices, transfer
from gpuserial.formats import hdf5, npz
from gpuserial.storage import _fileio, remote
from gpuserial.storage._fileio import atomic_output, display_name

__all__ = ['SaveHandle', 'save_async', 'wait_all']

FORMATS = ('npz', 'hdf5')
HDF5_EXTENSIONS = ('.h5', '.hdf5', '.hdf')  # with no format given, these save HDF5
STAGINGS = ('host', 'device')
DEFAULT_MAX_HOST_BYTES = 1 << 30


class _Outcome(concurrent.futures.Future):
    """A handle's future. Its error, once handed to the caller (by ``result`` or
    ``exception``), has been raised: no later :func:`save_async` or :func:`wait_all` raises it
    again. It cannot be cancelled: the save goes on whatever the caller does."""

    def cancel(self) -> bool:
        return False

    def result(self, timeout: float | None = None):
        try:
            return super().result(timeout)
        except BaseException as error:
            _handed_over(error)
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error = super().exception(timeout)
        if error is not None:
            _handed_over(error)
        return error


class SaveHandle:
    """An asynchronous save. ``staged``: the state is captured, the caller may change any array
    or value. ``committed``: the file is complete and in place. Both are
    :class:`concurrent.futures.Future`; a failed save raises its error from both (and from the
    next :func:`save_async` or :func:`wait_all` where neither has handed it to the caller)."""

    def __init__(self, name: str):
        self.name = name
        self.staged: concurrent.futures.Future = _Outcome()
        self.committed: concurrent.futures.Future = _Outcome()

    def result(self, timeout: float | None = None) -> None:
        """Waits until the file is committed; raises the save's error."""
        self.committed.result(timeout)

    def done(self) -> bool:
        return self.committed.done()

    def __repr__(self) -> str:
        failed = self.committed.done() and concurrent.futures.Future.exception(self.committed)
        state = ('failed' if failed else 'committed' if self.committed.done()
                 else 'writing' if self.staged.done() else 'staging')
        return f'<SaveHandle {self.name!r}: {state}>'


def save_async(file, obj, format: str | None = None, *, compression: bool | int | None = None,
               durable: bool = True, staging: str | None = None,
               max_host_bytes: int = DEFAULT_MAX_HOST_BYTES, sync: bool = False,
               storage_options: dict | None = None) -> SaveHandle:
    """Saves ``obj`` as :func:`~gpuserial.save_npz` or :func:`~gpuserial.save_hdf5` would (the
    same bytes), writing in the background.

    Args:
        file: a path, a URL (``s3://bucket/key``, ...: streamed to the object, committed
            last), or a binary file object the caller leaves alone until committed.
        obj: a serializable object, or a dict of arrays.
        format: ``'npz'`` or ``'hdf5'`` (None: HDF5 for a name ending in ``.h5``, ``.hdf5``
            or ``.hdf``, else NPZ, as for Chainer's snapshots, whose names have no extension).
        compression: as the format's save takes it (None: its default).
        durable: fsync the file and its directory before ``committed`` is done.
        staging: ``'device'`` or ``'host'`` for device arrays (None: ``'device'``).
        max_host_bytes: the most host memory the staged copies take at once.
        sync: first wait for all work on the arrays' devices, on every stream.
        storage_options: for a URL, the options of its fsspec filesystem.

    Raises:
        ValueError: a bad argument. Errors of ``serialize`` and of staging raise here, and
            nothing is written; so does the error of an earlier save that nothing has raised
            yet (its handle's futures included).
        FileNotFoundError, IsADirectoryError: a path in no directory, or a directory.
    """
    if format is None:  # 'ckpt.h5' saved an NPZ there, which load_hdf5 then refused
        format = 'hdf5' if display_name(file).lower().endswith(HDF5_EXTENSIONS) else 'npz'
    if format not in FORMATS:
        raise ValueError(f'format must be one of {FORMATS}, not {format!r}')
    if staging is not None and staging not in STAGINGS:
        raise ValueError(f'staging must be one of {STAGINGS} or None, not {staging!r}')
    if not isinstance(max_host_bytes, numbers.Real):  # '1GiB' failed with "'<' not supported"
        raise TypeError(f'max_host_bytes must be a number of bytes (such as 1 << 30), not '
                        f'{max_host_bytes!r}')
    if max_host_bytes < 1:
        raise ValueError(f'max_host_bytes must be positive, not {max_host_bytes!r}')
    location = remote.location_of(file, storage_options)  # checked before anything starts
    _fileio.check_file_object(file, writing=True)
    target = file
    if _fileio.is_path(file):  # a missing directory raised from the handle, at best
        # and the file named now: the writer runs later, maybe in another working directory
        target = _fileio.absolute(_fileio.save_target(file))
    _fileio.wait_for_save(file)
    _raise_unreported()
    if format == 'npz':
        items = list(npz.collect(file, obj).items())
        npz.check_storable(items, display_name(file))
        compressed = True if compression is None else bool(compression)
        nbytes = sum(value.nbytes for _, value in items) + len(items) * npz.MEMBER_OVERHEAD_BYTES

        def write(entries: Iterator[tuple]) -> None:
            with atomic_output(target, durable=durable, storage_options=storage_options,
                               size_hint=nbytes) as out:
                npz.write_npz(out, entries, compressed, name=display_name(file))
    else:
        level = hdf5.GZIP_DEFAULT if compression is None else compression
        serializer, plan = hdf5.collect(file, obj, level, progress=False)
        items = plan.entries

        def write(entries: Iterator[tuple]) -> None:
            hdf5.write_planned(target if location is None else location, serializer, plan,
                               durable=durable, entries=entries)
    if sync:
        devices.synchronize_devices_of(item[-1] for item in items)
    return _start(display_name(file), file, items, write, staging or 'device', max_host_bytes)


def wait_all() -> None:
    """Waits for every save in flight; raises the first writer's error that nothing has raised
    yet: no :func:`save_async` or :func:`wait_all`, nor a handle's future that handed it to the
    caller (one a call: the next call raises the next)."""
    concurrent.futures.wait(_fileio.saves_in_flight())
    _raise_unreported()


# ---------------------------------------------------------------------------------------------
# The caller's side: staging


def _start(name: str, file, items: list[tuple], write: Callable, staging: str,
           max_host_bytes: int) -> SaveHandle:
    on_device = [index for index, item in enumerate(items)
                 if staging == 'device' and _is_device_array(item[-1])]
    copies, copied = transfer.device_copies([items[i][-1] for i in on_device])
    device_copies = dict(zip(on_device, copies, strict=True))
    arena = _ArenaCopies.for_state([item[-1] for i, item in enumerate(items)
                                    if i not in device_copies], max_host_bytes)
    handle = SaveHandle(name)
    pipe = _Pipe(max_host_bytes)
    staged = _Countdown(2, handle.staged)  # the caller's copies, then the device's
    _fileio.begin_save(file, handle.committed)
    writer = threading.Thread(target=_write, args=(handle, write, pipe, copied, staged, arena),
                              name=f'gpuserial save {name}', daemon=True)
    writer.start()
    try:
        for index, item in enumerate(items):
            value = item[-1]
            if index in device_copies:
                pipe.put(item[:-1] + (device_copies.pop(index),), 0)
            elif not devices.is_array(value):
                pipe.put(item[:-1] + (copy.deepcopy(value),), 0)  # lists, numbers, strings
            elif value.nbytes > max_host_bytes:
                pipe.put_whole_budget(item)  # written from the original while the caller waits
            else:
                pipe.reserve(value.nbytes)
                pipe.put(item[:-1] + (arena.copy(value),), value.nbytes)
        pipe.close()
    except _WriterFailed:
        pass  # the handle holds the writer's error
    except BaseException as error:
        pipe.abort(error)
        writer.join()
        raise
    finally:
        arena.done()
    staged.count_down()
    return handle


def _is_device_array(value) -> bool:
    backend = devices.backend_of(value)
    return backend is not None and not backend.is_host


def _host_copy(array):
    """A C-contiguous host copy (the bytes a save writes from the array)."""
    if isinstance(array, numpy.ndarray):
        return numpy.array(array, order='C', copy=True, subok=False)
    return devices.to_host(array)  # a device array: a new host array


ALIGNMENT = 64  # bytes: each copy in the arena starts on a cache line


class _ArenaCopies:
    """Host copies of a state that fits the budget in one wave, placed in the memory kept from
    the last save (:data:`transfer.host_arena`); other copies are new arrays."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.used = 0
        self.users = 2  # the caller and the writer: given back once both are done
        self.lock = threading.Lock()

    @classmethod
    def for_state(cls, values: list, max_host_bytes: int) -> _ArenaCopies:
        total = sum(_aligned(v.nbytes) for v in values if _in_arena(v))
        fits = 0 < total and sum(v.nbytes for v in values if devices.is_array(v)) \
            <= max_host_bytes
        return cls(transfer.host_arena.take(total) if fits else None)

    def copy(self, array):
        if self.buffer is None or not _in_arena(array):
            return _host_copy(array)
        out = numpy.ndarray(array.shape, array.dtype, self.buffer, self.used)
        self.used += _aligned(array.nbytes)
        numpy.copyto(out, array, casting='no')
        return out

    def done(self) -> None:
        """One of its two users is done with it; the second gives it back."""
        with self.lock:
            self.users -= 1
            if self.users or self.buffer is None:
                return
            self.buffer = None
        transfer.host_arena.give_back()


def _in_arena(value) -> bool:
    return type(value) is numpy.ndarray and not value.dtype.hasobject


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


class _WriterFailed(Exception):
    """The writer has stopped on an error: staging more is pointless."""


class _Pipe:
    """Staged entries, in order, from the caller to the writer, with at most ``budget`` bytes of
    host copies not yet written."""

    def __init__(self, budget: int):
        self.budget = budget
        self.free = budget
        self.items: collections.deque = collections.deque()  # (entry, host bytes)
        self.closed = False
        self.aborted: BaseException | None = None
        self.failed = False
        self.changed = threading.Condition()

    # the caller's side

    def reserve(self, nbytes: int) -> None:
        """Waits until ``nbytes`` of the budget are free, and takes them."""
        with self.changed:
            self._wait_until(lambda: self.free >= nbytes)
            self.free -= nbytes

    def put(self, entry: tuple, nbytes: int) -> None:
        with self.changed:
            if self.failed:
                raise _WriterFailed
            self.items.append((entry, nbytes))
            self.changed.notify_all()

    def put_whole_budget(self, entry: tuple) -> None:
        """Hands over an entry that is not copied, and waits until it is written."""
        self.reserve(self.budget)
        self.put(entry, self.budget)
        with self.changed:
            self._wait_until(lambda: self.free == self.budget)

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def abort(self, error: BaseException) -> None:
        with self.changed:
            self.aborted = error
            self.changed.notify_all()

    def _wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            if self.failed:
                raise _WriterFailed
            self.changed.wait()
        if self.failed:
            raise _WriterFailed

    # the writer's side

    def entries(self) -> Iterator[tuple]:
        """The entries as they come; each one's budget is given back once the next is asked
        for (the writers take one at a time)."""
        while True:
            with self.changed:
                while not self.items and not self.closed and self.aborted is None:
                    self.changed.wait()
                if self.aborted is not None:
                    raise RuntimeError('the save was interrupted while staging') \
                        from self.aborted
                if not self.items:
                    return
                entry, nbytes = self.items.popleft()
            yield entry
            with self.changed:
                self.free += nbytes
                self.changed.notify_all()

    def fail(self) -> None:
        with self.changed:
            self.failed = True
            self.items.clear()
            self.changed.notify_all()


class _Countdown:
    """Resolves ``future`` once :meth:`count_down` has been called ``count`` times."""

    def __init__(self, count: int, future: concurrent.futures.Future):
        self.count = count
        self.future = future
        self.lock = threading.Lock()

    def count_down(self) -> None:
        with self.lock:
            self.count -= 1
            if self.count == 0 and not self.future.done():
                self.future.set_result(None)


# ---------------------------------------------------------------------------------------------
# The writer's side


def _write(handle: SaveHandle, write: Callable, pipe: _Pipe, copied: Callable[[], None],
           staged: _Countdown, arena: _ArenaCopies) -> None:
    try:
        try:
            copied()  # the device copies are complete
            staged.count_down()
            write(pipe.entries())
        finally:
            pipe.fail()  # the caller stops staging, if it has not finished
            arena.done()
    except BaseException as error:  # noqa: BLE001 - kept for the caller, raised there
        if pipe.aborted is None:  # else the caller raises it
            with _unreported_lock:  # before a future can hand it over
                _unreported.append(error)
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # the caller's last
            if not handle.staged.done():  # count_down may come between these two lines
                handle.staged.set_exception(error)
        handle.committed.set_exception(error)
    else:
        handle.committed.set_result(None)


_unreported: list[BaseException] = []  # writers' errors nothing has raised to the caller
_unreported_lock = threading.Lock()


def _handed_over(error: BaseException) -> None:
    """A handle's future gave ``error`` to the caller: it is not raised again."""
    with _unreported_lock:
        _unreported[:] = [kept for kept in _unreported if kept is not error]


def _raise_unreported() -> None:
    """Raises the first writer's error not raised yet; the others wait for the next call (or
    are printed at exit)."""
    with _unreported_lock:
        error = _unreported.pop(0) if _unreported else None
    if error is not None:
        raise error


def _forget_in_child() -> None:
    global _unreported_lock
    _unreported_lock = threading.Lock()
    _unreported.clear()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _wait_at_exit() -> None:
    """A process that exits normally keeps its last checkpoints."""
    concurrent.futures.wait(_fileio.saves_in_flight())
    with _unreported_lock:
        errors = _unreported[:]
        _unreported.clear()
    for error in errors:
        print(f'gpuserial: an asynchronous save failed: {error!r}', file=sys.stderr)
