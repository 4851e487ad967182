"""Deserialization that every format shares: the protocol's rules, checks, and one-pass loads.

A format supplies a :class:`Reader` (what is stored under a key, and how to read it); the
:class:`ReaderDeserializer` applies Chainer's semantics on top: paths, ``strict``,
``ignore_names``, stored ``None``, in-place array loads with a ``same_kind`` cast and an exact
shape, and safe scalar casts.

:meth:`ReaderDeserializer.load` calls the object's ``serialize`` exactly once, as Chainer does.
Each request is checked when it is made (key, stored shape, dtype cast, the entry's size against
the file); the in-place array fills are deferred until ``serialize`` has returned, then streamed.
So a load that fails on a missing key, a mismatch or a malformed entry has filled no array in
place. What ``serialize`` was handed before the failure it may have kept: scalars and strings,
``None`` for stored Nones, and the new arrays of entries asked for with ``value=None`` (or, with
``device=``, made on that device). Dicts, gpuserial's objects and any object that hands its
assignments to :func:`~gpuserial.serializer.after_load` keep none of these until the load
succeeds: those run after the fills. A checksum or read error found while streaming the data
stops the load there; the error says which arrays were already filled (its ``filled``) and
which one was being filled, and may hold part of the bad data (its ``partly_filled``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy

from gpuserial.engine import devices, progress, transfer
from gpuserial.errors import (
    DeviceError,
    DtypeMismatchError,
    GpuserialError,
    KeyNotFoundError,
    MismatchError,
    UnsafeCastError,
)
from gpuserial.serializer import (
    Deserializer,
    as_serializable,
    child_path,
    entry_key,
    is_ignored,
    keeps_returned_arrays,
)

MAX_SCALAR_BYTES = 1 << 20  # a scalar entry larger than this is not a scalar
MAX_NAMED_IN_ERRORS = 8  # arrays listed by name in a message about a load that stopped


@dataclasses.dataclass(slots=True)
class Entry:
    """What a file holds under one key, as far as its metadata says (already checked)."""

    key: str
    shape: tuple[int, ...] | None  # None for a stored None
    dtype: numpy.dtype | None  # None with the shape
    token: Any = None  # the reader's own handle on the entry (of the reader's own type)

    @property
    def is_none(self) -> bool:
        return self.shape is None

    @property
    def size(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize if self.dtype is not None else 0


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a load into an object or a mapping left aside, as torch's ``load_state_dict``
    reports it.

    Attributes:
        missing_keys: keys the object asked for that the file lacks (skipped: ``strict=False``).
        unexpected_keys: keys under the load's path that the file holds and the object never
            asked for (nor ignored).
    """

    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclasses.dataclass
class Tracking:
    """The keys one load asked for, and those of them the file lacked."""

    requested: set[str] = dataclasses.field(default_factory=set)
    missing: list[str] = dataclasses.field(default_factory=list)


class Reader:
    """A format's view of a file: entries by full key, and reads of their data."""

    name: str  # the file, as messages name it
    progress: progress.Progress = progress.SILENT  # counts bytes as reads go through

    def keys(self) -> list[str]:
        """Every entry's full key, in the file's order."""
        raise NotImplementedError

    def entry(self, key: str) -> Entry | None:
        """The entry under ``key``, checked against the file, or None when there is none."""
        raise NotImplementedError

    def stored_key(self, key: str) -> str:
        """The key, as :meth:`keys` lists it, of the entry :meth:`entry` finds under ``key``
        (by default ``key`` itself)."""
        return key

    def expect_entries(self, keys: Iterable[str] | None = None, under: str = '') -> None:
        """Says which entries :meth:`entry` is about to be asked for (these keys, else all
        those under this path), so that a file that can fetch ahead (an object in a store)
        reads their headers ahead; by default nothing."""

    def read_into(self, entry: Entry, dst) -> None:
        """Fills ``dst`` (of the entry's shape, any backend, any dtype it casts to) in place."""
        raise NotImplementedError

    def read_many(self, fills: list[tuple[Entry, object]], filled: list[str]) -> None:
        """:meth:`read_into` for each ``(entry, array)`` in turn, each entry's key appended to
        ``filled`` once its array is filled (so an error comes while filling the next one)."""
        for entry, array in fills:
            self.read_into(entry, array)
            filled.append(entry.key)

    def reads_whole(self, entry: Entry, dst) -> bool:
        """Whether ``dst`` is better filled with :meth:`read_whole` through a shared buffer
        (see :func:`gpuserial.engine.transfer.fill_many`): small device arrays, where the format
        can."""
        return False

    def read_whole(self, entry: Entry, buffer: memoryview) -> None:
        """Reads the entry's data, of its stored dtype (the target's), into ``buffer``."""
        raise NotImplementedError

    def read_scalar(self, entry: Entry) -> numpy.ndarray:
        """The (small) stored value as a host array."""
        assert entry.shape is not None and entry.dtype is not None  # not a stored None
        stored = numpy.empty(entry.shape, entry.dtype)
        self.read_into(entry, stored)
        return stored

    def check_size(self, entry: Entry, allocating: bool = False) -> None:
        """Raises when the file cannot hold what the entry claims (checked before reading it,
        and before allocating a new array for it when ``allocating``)."""

    def stored_size(self, entry: Entry) -> tuple[int, bool]:
        """The bytes the entry takes in the file, and whether they are compressed."""
        raise NotImplementedError

    def read_box(self, entry: Entry, box: list[tuple[int, int, int]]) -> numpy.ndarray:
        """A new host array of the entry's values in a box, ``(start, stop, step)`` per
        dimension (``0 <= start <= stop``, ``step >= 1``), reading as little as the format
        allows."""
        raise NotImplementedError

    def in_read_order(self, fills: list[tuple[Entry, object]]) -> list[tuple[Entry, object]]:
        """Deferred fills in the order that reads the file best (by default as requested)."""
        return fills

    def where(self, key: str) -> str:
        return f'{self.name!r}, key {key!r}'


class _PendingFills:
    """The in-place fills of one load, run once ``serialize`` has returned, and what the
    objects set from the values it returned (:func:`~gpuserial.serializer.after_load`), run
    after the fills."""

    def __init__(self):
        self.fills: list[tuple[Entry, object]] = []
        self.changes: list[Callable[[], None]] = []
        self.bytes_read_already = 0  # entries read during the pass (value=None, device=)

    def run(self, reader: Reader, show_progress: bool | None) -> None:
        def total() -> int:
            return self.bytes_read_already + sum(entry.nbytes for entry, _ in self.fills)

        with progress.bar(total, f'load {reader.name}', show_progress) as shown:
            shown.update(self.bytes_read_already)
            reader.progress = shown
            filled: list[str] = []
            reading: Entry | None = None
            ordered: set[devices.Device] = set()  # devices whose copies wait for the caller's
            try:
                for whole, run in itertools.groupby(
                        reader.in_read_order(self.fills),  # host arrays are never read whole
                        key=lambda fill: type(fill[1]) is not numpy.ndarray
                        and reader.reads_whole(*fill)):
                    batch = list(run)
                    if whole:  # small device arrays: through shared buffers

                        def read_whole(entry, buffer):
                            nonlocal reading
                            reading = entry
                            reader.read_whole(entry, buffer)

                        transfer.fill_many(
                            [(array, functools.partial(read_whole, entry))
                             for entry, array in batch],
                            # python/mypy#15459: a lambda binding the loop's batch
                            lambda index, batch=batch: filled.append(  # type: ignore[misc]
                                batch[index][0].key),
                            ordered=ordered)
                        continue
                    first = len(filled)
                    try:
                        reader.read_many(batch, filled)
                    except GpuserialError:
                        reading = batch[len(filled) - first][0]
                        raise
            except GpuserialError as error:
                if reading is None:
                    raise
                raise _stopped(error, reading.key, filled, len(self.fills)) from error
            finally:
                reader.progress = progress.SILENT


def read_text(reader: Reader, entry: Entry) -> numpy.ndarray:
    """An entry of object dtype (HDF5 strings; other objects were refused by ``entry()``)
    as a NumPy ``str`` array."""
    value = reader.read_scalar(entry)
    return value.astype(str) if value.dtype.hasobject else numpy.asarray(value)


def run_fills(reader: Reader, fills: list[tuple[Entry, object]], show_progress: bool | None
              ) -> None:
    """Fills each array from its entry, in the reader's best order (see :class:`Reader`)."""
    pending = _PendingFills()
    pending.fills = fills
    pending.run(reader, show_progress)


def box_reads(shape: tuple[int, ...], box: list[tuple[int, int, int]]
              ) -> tuple[numpy.ndarray, int]:
    """How to read a box, ``(start, stop, step)`` per dimension, of a C-order array: the element
    offsets of the runs to read, in increasing order, and the elements in each run. Read one
    after the other, the runs make the box, in C order; nothing else is read."""
    counts = [len(range(*b)) for b in box]
    if 0 in counts:
        return numpy.zeros(0, numpy.int64), 0
    inner = len(shape) - 1  # the innermost dimension not wholly selected
    while inner >= 0 and box[inner] == (0, shape[inner], 1):
        inner -= 1
    if inner < 0:
        return numpy.zeros(1, numpy.int64), math.prod(shape)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    start, stop, step = box[inner]
    contiguous = step == 1  # a run covers the inner range, else one index of it
    offsets = numpy.full((), start * strides[inner] if contiguous else 0, numpy.int64)
    for d in reversed(range(inner if contiguous else inner + 1)):
        offsets = (numpy.arange(*box[d], dtype=numpy.int64)[(...,) + (None,) * offsets.ndim]
                   * strides[d] + offsets)
    return offsets.reshape(-1), (stop - start if contiguous else 1) * strides[inner]


def _stopped(error: GpuserialError, key: str, filled: list[str], count: int
             ) -> GpuserialError:
    """``error`` again, saying that it came while array ``key`` was being filled, after the
    arrays ``filled`` (of ``count``); the error's ``filled`` and ``partly_filled`` say so too."""
    named = ', '.join(map(repr, filled[:MAX_NAMED_IN_ERRORS])) or 'none'
    if len(filled) > MAX_NAMED_IN_ERRORS:
        named += f' and {len(filled) - MAX_NAMED_IN_ERRORS} more'
    stopped = type(error)(f'{error} (the load stopped while filling {key!r}, which may now '
                          f'hold part of that data; {len(filled)} of {count} arrays were already '
                          f'filled in place: {named}; the others are as they were)')
    stopped.filled, stopped.partly_filled = list(filled), key
    if isinstance(error, OSError) and isinstance(stopped, OSError):  # a failed read's errno
        stopped.errno = error.errno  # (ReadFailedError) says what failed
    return stopped


@functools.lru_cache(maxsize=1024)
def _casts(stored: numpy.dtype, target: numpy.dtype) -> bool:
    """Whether stored values load into the target's dtype (NumPy's ``same_kind``; text into text
    at least as wide); structured
    dtypes (such as the encodings of bfloat16 and float8) only into themselves: NumPy would
    cast them field by field, bits as numbers."""
    if stored.names is not None or target.names is not None:
        return False
    if stored.kind in 'US':  # text, only where it fits whole (same_kind would cut it short)
        return bool(numpy.can_cast(stored, target, 'safe'))
    return bool(numpy.can_cast(stored, target, 'same_kind'))


class ReaderDeserializer(Deserializer):
    """Deserializer over a :class:`Reader`, with Chainer's semantics.

    Called directly, it loads each entry at once. :meth:`load` defers the in-place fills until
    the object's ``serialize`` has returned (see the module's docstring).

    Args:
        reader: the format's reader.
        path: the base path that deserialization starts from.
        strict: whether a missing key is an error (else the value is left as it is).
        ignore_names: a string, a callable on the full key, or a list of these, naming entries
            to skip.
        device: where arrays end up (None: in place, on each array's own device). Objects that
            keep returned arrays (dicts, gpuserial's objects) get new arrays made there; others
            are loaded in place and then moved with their ``to_device``.
        progress: a progress bar for :meth:`load`: None for one on a terminal for large loads,
            or a bool.
    """

    def __init__(self, reader: Reader, path: str = '', strict: bool = True, ignore_names=None,
                 *, device=None, progress: bool | None = None):
        self.reader = reader
        self.path = path
        self._root = path  # the path the load starts from (a child's path goes on from it)
        self.strict = strict
        self.ignore_names = ignore_names
        self.device = None if device is None else devices.get_device(device)
        self.progress = progress
        self._pending: _PendingFills | None = None
        self._new_arrays_on_device = True
        self._tracking: Tracking | None = None  # see load_reporting
        self._holders: dict[int, dict[str, list[str]]] = {}  # see _elsewhere (children share it)

    def __getitem__(self, key: str) -> ReaderDeserializer:
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__, path=child_path(self.path, key))
        return child

    def load(self, obj) -> None:
        """Loads an object (or a dict), calling its ``serialize`` once (see the module).

        Raises:
            TypeError: ``device=`` was given for an object that neither keeps the arrays a
                load returns nor has ``to_device``.
        """
        self.prepare(obj)()

    def prepare(self, obj) -> Callable[[], None]:
        """The first half of :meth:`load`: calls ``serialize``, which checks every entry, and
        returns the second half, which fills the arrays (a sharded load runs it on every rank
        only once every rank's checks have passed)."""
        target = as_serializable(obj)
        keeps = keeps_returned_arrays(target)
        if self.device is not None and not keeps and not hasattr(obj, 'to_device'):
            raise TypeError(f'cannot load {self.reader.name!r} into a {type(obj).__name__} with '
                            f'device={self.device.name!r}: it has no to_device() and does not '
                            f'declare keeps_returned_arrays; load it without device= and move '
                            f'its arrays')
        self.reader.expect_entries(under=self.path)
        pending = _PendingFills()
        deferring = object.__new__(type(self))  # this deserializer, deferring its fills
        deferring.__dict__.update(self.__dict__, _pending=pending, _new_arrays_on_device=keeps)
        target.serialize(deferring)

        def finish() -> None:
            pending.run(self.reader, self.progress)
            for change in pending.changes:
                change()
            if self.device is not None and hasattr(obj, 'to_device'):
                # whatever the load did not carry (gradients, arrays it did not load)
                obj.to_device(devices.device_spec_for(obj, self.device))

        return finish

    def after_load(self, apply: Callable[[], None]) -> None:
        """Runs ``apply`` once this load has succeeded: after every entry's checks and every
        fill (at once where this deserializer is called directly, not through :meth:`load`)."""
        if self._pending is None:
            apply()
        else:
            self._pending.changes.append(apply)

    def where(self, key: str) -> str:
        """How messages name entry ``key`` under this deserializer's path: the file and the
        full key."""
        return self.reader.where(entry_key(self.path, key))

    def load_reporting(self, obj) -> LoadReport:
        """:meth:`load`, returning what the file and the object did not share: the keys under
        this path that the file holds and ``serialize`` never asked for (nor ignored), and the
        keys it asked for that the file lacks (skipped, with ``strict=False``)."""
        tracking = Tracking()
        reporting = object.__new__(type(self))
        reporting.__dict__.update(self.__dict__, _tracking=tracking)
        reporting.load(obj)
        requested = {self.reader.stored_key(key) for key in tracking.requested}
        unexpected = [key for key in self.reader.keys()
                      if key.startswith(self.path) and key not in requested]
        return LoadReport(tracking.missing, unexpected)

    def __call__(self, key: str, value):
        key = entry_key(self.path, key)
        if self._tracking is not None:
            self._tracking.requested.add(key)
        if self.ignore_names is not None and is_ignored(key, self.ignore_names):
            return value
        entry = self.reader.entry(key)
        if entry is None:
            if self.strict:
                hint = (f" (path={self.path!r} does not end with '/': a key is path + name, as "
                        f'in Chainer)' if not self.path.endswith('/') and self.path
                        else self._elsewhere(key[len(self._root):]))
                raise KeyNotFoundError(f'{self.reader.where(key)}: not in the file{hint}')
            if self._tracking is not None:
                self._tracking.missing.append(key)
            return value
        if entry.dtype is None:  # a stored None
            return None
        if value is None:
            if entry.dtype.hasobject:  # HDF5 text (the readers refuse other objects)
                return read_text(self.reader, entry)
            return self._new_placed(entry, entry.dtype)
        if type(value) is numpy.ndarray or devices.is_array(value):
            # ml_dtypes' bfloat16, ... (never one of NumPy's own types): through its encoding
            if value.dtype.isbuiltin != 1 and devices.extension_of(value.dtype) is not None:
                return self._load_view(entry, value, None)
            return self._load_array(entry, value)
        framework = devices.framework_of(value)
        if framework is not None:
            return self._load_view(entry, value, framework)
        return self._load_scalar(entry, value)

    def _elsewhere(self, name: str) -> str:
        """A hint naming the paths under which the file holds ``name`` (a model loaded from a
        trainer's snapshot without ``path='updater/model:main/'``), or ''."""
        paths = sorted(set(self._holders_of(name))
                       - {self._root})  # listed but not readable here (a sharded load's rank)
        if not paths:
            return ''
        shown = ', '.join(f'path={path!r}' for path in paths[:3])
        return f" (the file has it under {shown}{', ...' if len(paths) > 3 else ''})"

    def _holders_of(self, name: str) -> list[str]:
        """The paths under which the file holds ``name``: keys are indexed by their last parts,
        as many as ``name`` has, once for the load (a serialize that catches the KeyError of
        each entry it finds missing, as Chainer's optimizers do for frozen parameters, else
        looked through every key for each)."""
        count = name.count('/') + 1
        holders = self._holders.get(count)
        if holders is None:
            holders = self._holders[count] = {}
            for key in self.reader.keys():
                if not isinstance(key, str):
                    continue
                parts = key.rsplit('/', count)
                if len(parts) == count:
                    holders.setdefault(key, []).append('')
                elif len(parts) > count:
                    holders.setdefault(key[len(parts[0]) + 1:], []).append(parts[0] + '/')
        return holders.get(name, [])

    def _new_array(self, entry: Entry, dtype: numpy.dtype, device: devices.Device | None = None):
        """A new array on ``device`` (by default the load's, else the CPU), read at once; an
        extension dtype (bfloat16, ...) is read on the host, in its stored encoding, and text
        and dates stay there (see :data:`~gpuserial.engine.devices.HOST_ONLY_KINDS`)."""
        self.reader.check_size(entry, allocating=True)
        assert entry.shape is not None  # not a stored None
        device = device or self.device or devices.CPU
        if dtype.kind == 'V' or dtype.kind in devices.HOST_ONLY_KINDS:
            device = devices.CPU
        if not device.backend.is_host:
            dtype = dtype.newbyteorder('=')  # device arrays are native: swapped on the host
        array = device.backend.empty(entry.shape, dtype, device)
        self.reader.read_into(entry, array)
        if self._pending is not None:
            self._pending.bytes_read_already += entry.nbytes
        return array

    def _new_placed(self, entry: Entry, dtype: numpy.dtype):
        """A new array of ``dtype`` on the load's device (else the CPU), read at once; an
        extension dtype's encoding as that type (ml_dtypes' on the host, where installed), on
        a device that holds it (else an error, before anything is read)."""
        extension = devices.extension_of(dtype)
        if extension is None:
            return self._new_array(entry, dtype)
        device = self.device or devices.CPU
        if not device.backend.is_host and not device.backend.holds_extension(extension, device):
            raise DeviceError(f'{self.reader.where(entry.key)}: {extension} has no dtype on '
                              f'{device.name}; load it on the CPU')
        host = devices.decoded(self._new_array(entry, dtype))  # read on the host
        return host if device.backend.is_host else device.send(host)

    def _moves(self, value) -> bool:
        """Whether ``value`` is replaced with a new array on the load's device."""
        return (self.device is not None and self._new_arrays_on_device
                and devices.device_of(value) != self.device)

    def _load_view(self, entry: Entry, value, framework: devices.Framework | None):
        """A torch tensor, filled in place through a view of its memory; a JAX array, which
        is immutable, as a new one (read at once) placed as it is, on its device or with its
        sharding, or on the load's device; a NumPy array of a dtype NumPy lacks (ml_dtypes'
        bfloat16), filled through its stored encoding."""
        if framework is not None and not framework.mutable:
            dtype = framework.stored_dtype(value)
            self._check_fits(entry, value.shape, dtype)
            device = self.device or framework.device_of(value)
            array = self._new_array(entry, dtype, device)
            if self.device is None:
                return framework.new_like(value, array)
            return framework.from_engine(array, device)
        extension = (devices.extension_of(numpy.dtype(value.dtype)) if framework is None
                     else framework.extension(value))
        holds = None if extension is None else devices.encoded_dtype(extension)
        if framework is None and self._moves(value):  # an array of that type, elsewhere
            assert holds is not None and entry.dtype is not None  # an extension; not a None
            self._check_fits(entry, value.shape, holds)
            return self._new_placed(entry, entry.dtype)
        try:
            view = devices.engine_array(value, writable=True)
        except TypeError as error:  # a torch dtype NumPy lacks (float8_e4m3fnuz)
            raise DtypeMismatchError(f'{self.reader.where(entry.key)}: {error}') from None
        why = None if framework is None or self._moves(view) else framework.why_not_fillable(value)
        if why is not None:
            raise MismatchError(f'{self.reader.where(entry.key)}: the target array cannot be '
                                f'loaded in place: {why}')
        loaded = self._load_array(entry, view, holds)
        if loaded is view:
            return value
        assert framework is not None and self.device is not None  # the view moved
        return framework.from_engine(loaded, self.device)

    def _load_array(self, entry: Entry, value, holds: numpy.dtype | None = None):
        """``value`` filled in place (or a new array on the load's device). ``holds``: the
        encoding whose bits a view of integers holds (a torch bfloat16 tensor on a GPU)."""
        dtype = value.dtype if holds is None else holds
        if dtype != entry.dtype or value.shape != entry.shape:  # else it fits
            self._check_fits(entry, value.shape, dtype)
        if (self.device is not None and dtype.kind not in devices.HOST_ONLY_KINDS
                and self._moves(value)):
            return self._new_array(entry, dtype)  # (text, dates stay on the host, filled in place)
        why = devices.why_not_fillable(value)
        if why is not None:
            raise MismatchError(f'{self.reader.where(entry.key)}: the target array cannot be '
                                f'loaded in place: {why}')
        self.reader.check_size(entry)
        if self._pending is not None:
            self._pending.fills.append((entry, value))
        else:
            self.reader.read_into(entry, value)
        return value

    def _check_fits(self, entry: Entry, shape, dtype: numpy.dtype) -> None:
        if tuple(shape) != entry.shape:
            raise MismatchError(f'{self.reader.where(entry.key)}: stored shape {entry.shape} '
                                f'does not match the target shape {tuple(shape)}')
        assert entry.dtype is not None  # not a stored None
        if dtype == entry.dtype:
            return
        if entry.dtype.hasobject:  # HDF5 text (the readers refuse other objects), as wide as
            stored = read_text(self.reader, entry).dtype  # its longest string: read to know
            what = f'text ({stored})'
        else:
            stored, what = entry.dtype, f'dtype {_dtype_name(entry.dtype)}'
        if not _casts(stored, dtype):
            rule = ('bfloat16 and float8 only into the same type' if devices.extension_of(stored)
                    or devices.extension_of(dtype) else 'text only into text at least as wide')
            raise DtypeMismatchError(f'{self.reader.where(entry.key)}: stored {what} does not '
                                     f'cast to the target dtype {_dtype_name(dtype)} '
                                     f'(same_kind; {rule})')

    def _load_scalar(self, entry: Entry, value):
        """The stored value as ``type(value)``, by a safe cast: numbers into numbers (any
        integer into an ``int``, as in Chainer), text into ``str``, bytes into ``bytes``."""
        value_type = type(value)
        where = self.reader.where(entry.key)
        assert entry.dtype is not None  # not a stored None
        if entry.dtype.itemsize * entry.size > MAX_SCALAR_BYTES:
            raise MismatchError(f'{where}: a stored array of shape {entry.shape} cannot load '
                                f'into a {value_type.__name__}')
        stored = self.reader.read_scalar(entry)
        kind = stored.dtype.kind
        wanted = 'U' if issubclass(value_type, str) else 'S' if issubclass(
            value_type, bytes) else None
        if kind in 'USO' or wanted:
            if kind != wanted:
                what = {'U': 'text', 'S': 'bytes', 'O': 'an object'}.get(kind, 'a number')
                raise UnsafeCastError(f'{where}: the file stores {what} (dtype {stored.dtype}, '
                                      f'shape {entry.shape}), which does not load into a '
                                      f'{value_type.__name__}')
        elif (issubclass(stored.dtype.type, numpy.number)
                and not (issubclass(stored.dtype.type, numpy.integer) and value_type is int)
                and not numpy.can_cast(stored.dtype, value_type)):  # any integer fits an int
            raise UnsafeCastError(f'{where}: stored dtype {stored.dtype} does not cast safely '
                                  f'to {value_type.__name__}')
        try:
            return value_type(stored)
        except (TypeError, ValueError) as error:
            raise UnsafeCastError(f'{where}: stored {stored.dtype} array of shape '
                                  f'{entry.shape} does not convert to {value_type.__name__}: '
                                  f'{error}') from error


def _dtype_name(dtype: numpy.dtype) -> str:
    """``bfloat16`` (and float8's names) for their stored encodings, else NumPy's name."""
    return devices.extension_of(dtype) or str(dtype)
