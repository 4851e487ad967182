"""Deserialization that every format shares: the protocol's rules, checks, and two-pass loads.

A format supplies a :class:`Reader` (what is stored under a key, and how to read it); the
:class:`ReaderDeserializer` applies Chainer's semantics on top: paths, ``strict``,
``ignore_names``, stored ``None``, in-place array loads with a ``same_kind`` cast and an exact
shape, and safe scalar casts. :func:`load` runs it twice, first as a dry run that checks every
key, shape and cast without changing anything, so a load that fails leaves the target as it was.
"""

from __future__ import annotations

import dataclasses

import numpy

from gpuserial import devices, progress
from gpuserial.errors import KeyNotFoundError, MismatchError, UnsafeCastError
from gpuserial.serializer import Deserializer, as_serializable, child_path, entry_key, is_ignored

MAX_SCALAR_BYTES = 1 << 20  # a scalar entry larger than this is not a scalar


@dataclasses.dataclass(frozen=True)
class Entry:
    """What a file holds under one key, as far as its metadata says (already checked)."""

    key: str
    shape: tuple[int, ...] | None  # None for a stored None
    dtype: numpy.dtype | None
    token: object = None  # the reader's own handle on the entry

    @property
    def is_none(self) -> bool:
        return self.shape is None

    @property
    def size(self) -> int:
        return int(numpy.prod(self.shape, dtype=object)) if self.shape is not None else 0


class Reader:
    """A format's view of a file: entries by full key, and reads of their data."""

    name: str  # the file, as messages name it
    planned_bytes: int = 0  # array bytes the dry run found the target will read
    progress: progress.Progress = progress.SILENT  # counts bytes as reads go through

    def entry(self, key: str) -> Entry | None:
        """The entry under ``key``, checked against the file, or None when there is none."""
        raise NotImplementedError

    def read_into(self, entry: Entry, dst) -> None:
        """Fills ``dst`` (of the entry's shape, any backend, any dtype it casts to) in place."""
        raise NotImplementedError

    def read_scalar(self, entry: Entry) -> numpy.ndarray:
        """The (small) stored value as a host array."""
        stored = numpy.empty(entry.shape, entry.dtype)
        self.read_into(entry, stored)
        return stored

    def check_allocation(self, entry: Entry) -> None:
        """Raises when the file is too small to hold what the entry claims (before allocating)."""

    def where(self, key: str) -> str:
        return f'{self.name!r}, key {key!r}'


class ReaderDeserializer(Deserializer):
    """Deserializer over a :class:`Reader`, with Chainer's semantics.

    Args:
        reader: the format's reader.
        path: the base path that deserialization starts from.
        strict: whether a missing key is an error (else the value is left as it is).
        ignore_names: a string, a callable on the full key, or a list of these, naming entries
            to skip.
        device: where arrays end up; an array on another device is loaded onto this one and
            the new array is returned (None: in place, on each array's own device).
        dry_run: check every call against the file without reading data or changing anything.
    """

    def __init__(self, reader: Reader, path: str = '', strict: bool = True, ignore_names=None,
                 *, device=None, dry_run: bool = False):
        self.reader = reader
        self.path = path
        self.strict = strict
        self.ignore_names = ignore_names
        self.device = None if device is None else devices.get_device(device)
        self.dry_run = dry_run

    def __getitem__(self, key: str) -> ReaderDeserializer:
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__, path=child_path(self.path, key))
        return child

    def __call__(self, key: str, value):
        key = entry_key(self.path, key)
        if is_ignored(key, self.ignore_names):
            return value
        entry = self.reader.entry(key)
        if entry is None:
            if self.strict:
                raise KeyNotFoundError(f'{self.reader.where(key)}: not in the file')
            return value
        if entry.is_none:
            return value if self.dry_run else None
        if value is None:
            return self._new_array(entry)
        if devices.is_array(value):
            return self._load_array(entry, value)
        return self._load_scalar(entry, value)

    def _new_array(self, entry: Entry):
        self.reader.check_allocation(entry)
        if self.dry_run:
            self.reader.planned_bytes += entry.size * entry.dtype.itemsize
            return None
        device = self.device or devices.CPU
        array = device.backend.empty(entry.shape, entry.dtype, device)
        self.reader.read_into(entry, array)
        return array

    def _load_array(self, entry: Entry, value):
        if tuple(value.shape) != entry.shape:
            raise MismatchError(f'{self.reader.where(entry.key)}: stored shape {entry.shape} '
                                f'does not match the target shape {tuple(value.shape)}')
        if not numpy.can_cast(entry.dtype, value.dtype, 'same_kind'):
            raise MismatchError(f'{self.reader.where(entry.key)}: stored dtype {entry.dtype} '
                                f'does not cast to the target dtype {value.dtype} (same_kind)')
        if self.dry_run:
            self.reader.planned_bytes += entry.size * entry.dtype.itemsize
            return value
        if self.device is not None and devices.device_of(value) != self.device:
            target = self.device.backend.empty(entry.shape, value.dtype, self.device)
            self.reader.read_into(entry, target)
            return target
        self.reader.read_into(entry, value)
        return value

    def _load_scalar(self, entry: Entry, value):
        value_type = type(value)
        if entry.dtype.itemsize * entry.size > MAX_SCALAR_BYTES:
            raise MismatchError(f'{self.reader.where(entry.key)}: a stored array of shape '
                                f'{entry.shape} cannot load into a {value_type.__name__}')
        if (issubclass(entry.dtype.type, numpy.number)
                and not (issubclass(entry.dtype.type, numpy.integer) and value_type is int)
                and not numpy.can_cast(entry.dtype, value_type)):  # any integer fits an int
            raise UnsafeCastError(f'{self.reader.where(entry.key)}: stored dtype {entry.dtype} '
                                  f'does not cast safely to {value_type.__name__}')
        stored = self.reader.read_scalar(entry)
        try:
            loaded = value_type(stored)
        except (TypeError, ValueError) as error:
            raise UnsafeCastError(f'{self.reader.where(entry.key)}: stored {entry.dtype} array '
                                  f'of shape {entry.shape} does not convert to '
                                  f'{value_type.__name__}: {error}') from error
        return value if self.dry_run else loaded


def load(obj, reader: Reader, make_deserializer, *, device=None, show_progress=None) -> None:
    """Loads ``obj`` transactionally: a dry run first, then the real pass.

    Args:
        obj: a serializable object or a dict of arrays.
        reader: the file's reader (its ``progress`` counts the real pass's bytes).
        make_deserializer: called with ``dry_run=`` and ``device=``, gives a deserializer.
        device: where the target's arrays end up (None: on their own devices).
        show_progress: a progress bar: None for one on a terminal for large loads, or a bool.
    """
    target = as_serializable(obj)
    reader.planned_bytes = 0
    make_deserializer(dry_run=True, device=device).load(target)
    with progress.bar(reader.planned_bytes, f'load {reader.name}', show_progress) as shown:
        reader.progress = shown
        try:
            make_deserializer(dry_run=False, device=device).load(target)
        finally:
            reader.progress = progress.SILENT
    if device is not None and hasattr(obj, 'to_device'):
        obj.to_device(device)  # whatever the load did not carry (gradients, unloaded arrays)
