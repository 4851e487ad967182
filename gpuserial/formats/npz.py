"""NPZ: Chainer's ``DictionarySerializer``/``NpzDeserializer`` over zip members streamed in chunks.

Files are standard zips that ``numpy.load`` opens, one ``<key>.npy`` member per entry. Members
are written and read chunk by chunk (device arrays through the staging engine), never as a
whole-file or whole-model buffer, and every member's checksum is checked on reading.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO, Protocol, cast

import numpy

from gpuserial.engine import devices, transfer
from gpuserial.engine import progress as _progress
from gpuserial.errors import (
    CorruptFileError,
    DeviceError,
    GpuserialError,
    InvalidKeyError,
    KeyCollisionError,
    ReadFailedError,
    UnsafeFileError,
    UnstorableValueError,
)
from gpuserial.formats import _npy, _zipread, _zipstream, loading
from gpuserial.serializer import (
    Serializer,
    as_serializable,
    child_path,
    entry_key,
    object_as_value_error,
)
from gpuserial.storage._fileio import (
    atomic_output,
    check_file_object,
    display_name,
    is_path,
    open_input,
    tilde_hint,
    wait_for_save,
)

__all__ = ['DictionarySerializer', 'NpzDeserializer', 'load_npz', 'save_npz', 'serialize']

SUFFIX = '.npy'
MAX_NAME_BYTES = 0xFFFF  # a zip's name lengths are 16 bits
MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data more than this: bounds a member's claims
SMALL_BYTES = 1 << 20  # arrays up to this size load in one read, without the staging engine
HEADER_GUESS = 256  # bytes read for a member's .npy header, which numpy pads to 128
READ_ERRORS = (_zipread.ZipError, OSError, EOFError)  # a member's, named with the file and key
SMALL_MEMBER_BYTES = 64 << 10  # arrays up to this size are written whole, with neighbours
MEMBER_OVERHEAD_BYTES = 512  # a member's zip headers and .npy header, at a guess (upload sizes)
REMOTE_WINDOW = 4 << 10  # bytes fetched at each member's local header for its headers
REMOTE_KEPT_BYTES = 64 << 20  # small members' bytes kept from a remote load's header pass


class DictionarySerializer(Serializer):
    """Serializer that collects entries into a flat dict, as Chainer's does.

    Args:
        target: the dict to fill (a new one by default).
        path: the base path of the keys.
        keep_device: keep device arrays as they are (the streaming save uses this); by default
            they are copied to the host, so that ``target`` holds NumPy arrays as in Chainer.

    Raises:
        KeyCollisionError: (on a call) this serializer or one of its children already stored
            an entry under the same full key.
    """

    def __init__(self, target: dict | None = None, path: str = '', *, keep_device: bool = False):
        self.target = {} if target is None else target
        self.path = path
        self.keep_device = keep_device
        self._sources: dict[str, tuple[str, str]] = {}  # full key: (path, key), per tree

    def __getitem__(self, key: str) -> DictionarySerializer:
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__, path=child_path(self.path, key))
        return child

    def __call__(self, key: str, value):
        full_key = entry_key(self.path, key)
        if full_key in self._sources:
            path, first = self._sources[full_key]
            raise KeyCollisionError(f'key {full_key!r}: stored twice, as {first!r} under path '
                                    f'{path!r} and as {key!r} under path {self.path!r}')
        self._sources[full_key] = (self.path, key)
        if type(value) is numpy.ndarray and value.dtype.isbuiltin == 1:  # stored as it is
            self.target[full_key] = value
            return value
        try:
            stored = devices.engine_array(value)  # torch, JAX: views of their memory
        except DeviceError as error:
            raise DeviceError(f'key {full_key!r}: {error}') from None
        except TypeError as error:  # a torch dtype NumPy lacks (float8_e4m3fnuz)
            raise UnstorableValueError(f'key {full_key!r}: {error}') from None
        if not devices.is_array(stored):
            try:
                stored = numpy.asarray(stored)
            except (TypeError, ValueError) as error:  # a ragged list: NumPy makes no array
                raise UnstorableValueError(
                    f'key {full_key!r}: a {type(value).__name__} that NumPy makes no array of '
                    f'({error}) cannot be saved (arrays, numbers, strings and None can; save '
                    f'a list of arrays as a dict)') from None
        elif not self.keep_device:
            stored = devices.to_host(stored)
        why = devices.why_not_storable(stored.dtype)
        if why is not None:  # ml_dtypes' int4
            raise UnstorableValueError(f'key {full_key!r}: {why}')
        self.target[full_key] = stored
        return value


def serialize_refs(obj) -> dict:
    """The flat dict of what ``obj`` stores, arrays as they are (no copies, any device)."""
    serializer = DictionarySerializer(keep_device=True)
    serializer.save(as_serializable(obj))
    return serializer.target


def serialize(obj) -> dict:
    """Serializes ``obj`` (a serializable object or a dict) into a flat dict of NumPy arrays."""
    serializer = DictionarySerializer()
    serializer.save(as_serializable(obj))
    return serializer.target


def collect(file, obj) -> dict:
    """What a save of ``obj`` to ``file`` stores (:func:`serialize_refs`), key errors naming
    the file."""
    try:
        entries = serialize_refs(obj)
    except (InvalidKeyError, KeyCollisionError, DeviceError, UnstorableValueError) as error:
        raise type(error)(f'{display_name(file)!r}, {error}') from None
    for key in [key for key in entries if len(key) > SURELY_SHORT]:  # nearly always none
        check_member_name(file, key)
    return entries


SURELY_SHORT = (MAX_NAME_BYTES - len(SUFFIX)) // 4  # characters: fits, whatever they are


def check_member_name(file, key: str) -> None:
    """Raises, naming ``file`` and ``key``, for a key too long to name a zip member.

    Raises:
        InvalidKeyError: ``key`` and the suffix are more than :data:`MAX_NAME_BYTES` in UTF-8.
    """
    if len(key) > SURELY_SHORT:
        size = len((key + SUFFIX).encode('utf-8'))
        if size > MAX_NAME_BYTES:
            raise InvalidKeyError(f'{display_name(file)!r}, key {key[:40]!r}... ({len(key)} '
                                  f'characters): too long for NPZ: its member name would have '
                                  f'{size} bytes, and a zip takes at most {MAX_NAME_BYTES}')


def save_npz(file, obj, compression: bool = True, *, durable: bool = True,
             progress: bool | None = None, sync: bool = False,
             storage_options: dict | None = None) -> None:
    """Saves an object to a file in NPZ format.

    Args:
        file: a path (str or os.PathLike), a URL (``s3://bucket/key``, ``memory://x``, ...; an
            fsspec ``OpenFile`` too), or a binary file object to write into.
        obj: a serializable object, or a dict of arrays (nested dicts flatten to ``a/b``).
        compression: deflate the members (else store them).
        durable: for a path, fsync the file and its directory so the save survives a machine
            crash; ``False`` still replaces the file atomically but skips the fsyncs.
        progress: a progress bar on stderr: None (the default) for one on a terminal when the
            save is large, True or False to decide.
        sync: first wait for all work on the devices of the arrays, on every stream. Without
            it, the copies wait only for the work queued on the calling thread's current
            stream of each device (what wrote the arrays, as a rule).
        storage_options: for a URL, the options of its fsspec filesystem (credentials, an
            ``endpoint_url`` in ``client_kwargs``, ...).

    A save to a path goes to a temporary file beside it that replaces the target only once
    complete: a failed save leaves the old file as it was. A save to a URL streams to the
    object, which appears only once complete (see :mod:`gpuserial.storage.remote`).
    """
    entries = collect(file, obj)
    wait_for_save(file)
    if sync:
        devices.synchronize_devices_of(entries.values())
    total = sum(value.nbytes for value in entries.values())
    with atomic_output(file, durable=durable, storage_options=storage_options,
                       size_hint=total + len(entries) * MEMBER_OVERHEAD_BYTES) as out, \
            _progress.bar(total, f'save {display_name(file)}', progress) as shown:
        write_npz(out, entries, compression, shown, name=display_name(file))


def write_npz(out: BinaryIO, entries: Mapping[str, object] | Iterable[tuple[str, object]],
              compression: bool, shown: _progress.Progress = _progress.SILENT, *,
              name: str = '<file>') -> dict[str, int]:
    """Writes ``entries`` (arrays of any backend, or 0-d object arrays holding None) as NPZ.

    Runs of small contiguous device arrays are copied to the host together (packed) and
    written whole, as are small host arrays (each on its own: an iterable of entries is taken
    one at a time, never read ahead); larger arrays stream through the staging engine chunk by
    chunk.

    ``name`` names the file in errors.

    Returns:
        Where each member's data (its ``.npy`` header, then its values when stored) starts in
        ``out``, by member name (``key.npy``): a position in ``out`` where it can seek, else
        counted from where it stood.
    """
    items = entries.items() if isinstance(entries, Mapping) else entries
    ordered: set[devices.Device] = set()  # devices whose copies wait for the caller's work
    with _zipstream.ZipWriter(out, compression=compression) as archive:
        for how, run in itertools.groupby(items, key=_how_written):
            if how == PACKED:
                batch = list(run)
                with contextlib.closing(transfer.host_copies([a for _, a in batch],
                                                             ordered=ordered)) as copies:
                    for (key, array), data in zip(batch, copies, strict=True):
                        archive.write_small_member(
                            key + SUFFIX, _npy.encode_header(array.dtype, array.shape), data)
                        shown.update(array.nbytes)
                continue
            if how == WHOLE:
                archive.write_small_members(_whole_members(run, shown))
                continue
            for key, array in run:
                if array.dtype.hasobject:
                    if not _npy.is_none_array(array):
                        raise _unstorable(name, key, array)
                    archive.write_small_member(key + SUFFIX, _npy.none_member())
                else:
                    header = _npy.encode_header(array.dtype, array.shape)
                    with contextlib.closing(transfer.host_chunks(array)) as chunks:  # on failure
                        archive.write_member(key + SUFFIX,
                                             _chain([header], _progress.counted(chunks, shown)),
                                             SMALL_MEMBER_BYTES + len(header))
    return archive.data_starts


PACKED, WHOLE, STREAMED = 'packed', 'whole', 'streamed'


def _how_written(item: tuple[str, Any]) -> str:
    """How an entry is written. Small contiguous arrays are held whole and written with their
    neighbours: a host array as it is (``WHOLE``), a device array packed with its neighbours
    into a staging buffer (``PACKED``, so at most a chunk); the rest is ``STREAMED``."""
    array = item[1]
    if (array.nbytes > SMALL_MEMBER_BYTES or array.dtype.hasobject
            or not array.flags.c_contiguous):
        return STREAMED
    if type(array) is numpy.ndarray:
        return WHOLE
    return PACKED if array.nbytes <= transfer.settings().chunk_bytes else STREAMED


def _whole_members(run: Iterable[tuple[str, numpy.ndarray]], shown: _progress.Progress
                   ) -> Iterator[tuple[str, bytes, memoryview]]:
    """The members of small host arrays, as :meth:`ZipWriter.write_small_members` takes them,
    each counted as shown once written."""
    for key, array in run:
        yield key + SUFFIX, _npy.encode_header(array.dtype, array.shape), host_bytes(array)
        shown.update(array.nbytes)


def host_bytes(array: numpy.ndarray) -> memoryview:
    """The bytes of a C-contiguous host array, not copied."""
    # numpy's stubs under Python 3.11 do not say that arrays are buffers
    try:
        return memoryview(array).cast('B')  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no buffer of its dtype (datetimes); zeros in its shape
        return memoryview(array.reshape(-1).view(numpy.uint8))  # type: ignore[arg-type]


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


def check_storable(entries: Iterable[tuple[str, Any]], name: str) -> None:
    """Raises for an entry a save cannot store (an object array other than a stored None),
    before the save starts (a save checks as it writes)."""
    for key, value in entries:
        if value.dtype.hasobject and not _npy.is_none_array(value):
            raise _unstorable(name, key, value)


def _unstorable(name: str, key: str, array: numpy.ndarray) -> UnstorableValueError:
    where = f'{name!r}, key {key!r}'
    held = array[()] if array.shape == () else None
    return object_as_value_error(where, held) or UnstorableValueError(
        f'{where}: object arrays other than None cannot be saved (arrays, numbers, strings and '
        f'None can)')


# ---------------------------------------------------------------------------------------------
# Reading


class ArchiveFile(_zipread.Input, Protocol):
    """What an :class:`Archive` needs of its file: a seekable binary file object."""

    def close(self) -> None: ...


class Archive:
    """An open NPZ's zip: its members from the central directory and a windowed reader.

    Args:
        fp: the zip's binary file object (seekable).
        members: the members (default: read from ``fp``'s central directory, before which
            their bytes end: ``data_end``, else the file's size).
        owned: close ``fp`` with the archive.
    """

    def __init__(self, fp: ArchiveFile, members: list | None = None, owned: bool = False):
        self.raw = fp
        self.size = fp.seek(0, os.SEEK_END)
        if members is None:
            self.members, self.data_end = _zipread.read_directory(fp)
        else:
            self.members, self.data_end = members, self.size
        self.expect = getattr(fp, 'expect', None)  # an object in a store fetches ahead
        self.fp = _zipread.WindowedFile(fp)
        self.owned = owned

    def infolist(self) -> list:
        return self.members

    def close(self) -> None:
        if self.owned:
            self.raw.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _read_error(where: str, error: BaseException) -> GpuserialError:
    """A member's read error as gpuserial's, naming the file and key: an I/O or network error
    (the file may be whole) apart from what the bytes read say of the file."""
    if isinstance(error, OSError):
        return ReadFailedError(f'{where}: reading failed: {error}')
    return CorruptFileError(f'{where}: {error}')


class _ZipReader(loading.Reader):
    """Entries of an NPZ zip, read member by member; headers parsed once and checked."""

    def __init__(self, archive: Archive, name: str):
        self.archive = archive
        self.name = name
        self._infos = npy_members(archive, name)
        self._entries: dict[str, loading.Entry | None] = {}
        self._kept: dict[str, _zipread.KeptBytes] = {}  # small members read with their headers

    def expect_entries(self, keys: Iterable[str] | None = None, under: str = '') -> None:
        """For an object in a store: parses these members' headers now, in the file's order,
        the store told first all their ranges (:data:`REMOTE_WINDOW` at each local header), so
        that they are fetched ahead, several at once (else one round trip each, in whatever
        order they are asked for). Small members (a window and their stored bytes below
        ``_zipread.DIRECT``, :data:`REMOTE_KEPT_BYTES` in all) are fetched whole, read in one
        window (never going back, which would fetch again) and their bytes kept for the
        fills, which then fetch nothing. A member that fails is left to fail again when asked
        for."""
        if self.archive.expect is None:
            return
        size = self.archive.data_end  # no window runs into the directory, read already
        wanted = (((key, self._infos.get(key)) for key in keys) if keys is not None else
                  ((key, info) for key, info in self._infos.items() if key.startswith(under)))
        ordered = sorted((info.header_offset, key, info) for key, info in wanted
                         if info is not None and key not in self._entries
                         and 0 <= info.header_offset < size)
        ranges, budget = [], REMOTE_KEPT_BYTES
        keeping: dict[str, int] = {}  # key -> the bytes read at its local header at once
        starts = sorted(member.header_offset for member in self.archive.members)
        for offset, key, info in ordered:
            end = min(size, offset + REMOTE_WINDOW)
            if (REMOTE_WINDOW + info.compress_size < _zipread.DIRECT
                    and info.compress_size <= budget):
                budget -= info.compress_size
                following = bisect.bisect_right(starts, offset)  # its bytes end before it
                end = min(size, offset + REMOTE_WINDOW + info.compress_size,
                          *starts[following:following + 1])
                keeping[key] = end - offset
            ranges.append((offset, end))
        self.archive.expect(ranges)
        for offset, key, info in ordered:
            with contextlib.suppress(GpuserialError, *READ_ERRORS):
                if key in keeping:
                    self.archive.fp.window_at(offset, keeping[key])
                entry = self.entry(key)
                if key in keeping and entry is not None and not entry.is_none:
                    self._keep(key, info, entry.token[2])

    def _keep(self, key: str, info, data_start: int) -> None:
        """Keeps the member's stored bytes, where the file holds them all (else its fill
        reads them again, and fails there, naming the key)."""
        data = bytes(self.archive.fp.view(data_start, info.compress_size))
        if len(data) == info.compress_size:
            self._kept[key] = _zipread.KeptBytes(data_start, data)

    def _source(self, key: str) -> _zipread.Viewable:
        """Where the member's bytes are read from for its fill: those kept (handed over
        once), else the file."""
        return self._kept.pop(key, None) or self.archive.fp

    def keys(self) -> list[str]:
        return list(self._infos)

    def entry(self, key: str) -> loading.Entry | None:
        if key in self._entries:
            return self._entries[key]
        info = self._infos.get(key)
        try:
            entry = None if info is None else self._parsed(key, info)
        except (_npy.HeaderError, *READ_ERRORS) as error:
            raise _read_error(self.where(key), error) from error
        self._entries[key] = entry
        return entry

    def _parsed(self, key: str, info) -> loading.Entry:
        if info.header_offset < 0:
            raise _zipread.MemberError(f'the zip directory puts the member at offset '
                                       f'{info.header_offset}, before the start of the file')
        if info.header_offset + info.compress_size > self.archive.size:
            raise _zipread.MemberError(f'the member runs past the end of the file '
                                       f'({self.archive.size} bytes): truncated?')
        regular = _zipread.regular_stored(self.archive.fp, info, HEADER_GUESS)
        if regular is not None:  # as numpy and gpuserial write members: checked in few steps
            window, at, data_start = regular
            header = _npy.regular_header(window, at)
            if (header is not None and not header.dtype.hasobject and header.dtype.itemsize
                    and header.length + header.nbytes == info.file_size):
                return loading.Entry(key, header.shape, header.dtype, (info, header, data_start))
        _zipread.check_member(info)
        if info.compress_type == _zipstream.STORED:
            data_start, head = self._stored_header(info)
        else:
            data_start, head = self._deflated_header(info)
        header = _npy.decode_header(head)
        if header.dtype.hasobject:
            payload_length = info.file_size - header.length
            payload = b''
            if payload_length <= _npy.NONE_PICKLE_MAX_LEN:
                read = bytearray(payload_length)  # read whole, checked: it is never read again
                self._read_member(info, data_start, header.length, read, self.archive.fp)
                payload = bytes(read)
            if _npy.is_chainer_none(header, payload):
                return loading.Entry(key, None, None, info)
            raise UnsafeFileError(f'{self.where(key)}: holds a pickled object array of dtype '
                                  f'{header.dtype} and shape {header.shape}; gpuserial never '
                                  f'unpickles (only Chainer\'s None is accepted)')
        if header.dtype.itemsize == 0 and header.size:
            raise _npy.HeaderError(f'zero-size items of dtype {header.dtype}')
        expected = header.length + header.nbytes
        if info.file_size != expected:
            raise _zipread.MemberError(f'the member holds {info.file_size} bytes but its header '
                                       f'claims {expected} (dtype {header.dtype}, shape '
                                       f'{header.shape}): truncated or corrupt')
        return loading.Entry(key, header.shape, header.dtype, (info, header, data_start))

    def _stored_header(self, info) -> tuple[int, bytes]:
        """Where a stored member's data starts (its local header checked) and its ``.npy``
        header, from the window."""
        data_start, head = _zipread.stored_head(self.archive.fp, info, HEADER_GUESS)
        length = _npy.header_length(head)
        if length > info.file_size:
            raise _npy.HeaderError(f'a header of {length} bytes in a member of '
                                   f'{info.file_size}')
        if length > len(head):
            head = bytes(self.archive.fp.view(data_start, length))
            if len(head) < length:
                raise _zipread.MemberError('truncated: the file ends within the .npy header')
        return data_start, head[:length]

    def _deflated_header(self, info) -> tuple[int, bytes]:
        """Where a deflated member's data starts (its local header checked) and its ``.npy``
        header, inflated."""
        data_start = _zipread.data_start_of(self.archive.fp, info)
        head = _zipread.inflated_head(self.archive.fp, info, data_start, HEADER_GUESS)
        prefix = min(_npy.PREFIX_LEN + 4, info.file_size)  # what says the header's length
        if len(head) < prefix:
            raise _zipread.MemberError(f'the deflate stream ends {prefix - len(head)} bytes '
                                       f'early')
        length = _npy.header_length(head)
        if length > info.file_size:
            raise _npy.HeaderError(f'a header of {length} bytes in a member of '
                                   f'{info.file_size}')
        if length > len(head):
            head = self._inflated(info, data_start, length)
        return data_start, head[:length]

    def _inflated(self, info, data_start: int, count: int) -> bytes:
        """A deflated member's first ``count`` data bytes (it holds that many)."""
        head = _zipread.inflated_head(self.archive.fp, info, data_start, count)
        if len(head) < count:
            raise _zipread.MemberError(f'the deflate stream ends {count - len(head)} bytes '
                                       f'early')
        return head

    def check_size(self, entry: loading.Entry, allocating: bool = False) -> None:
        info, header, _ = entry.token
        if not info.compress_type:  # stored: its size was checked against the header
            return
        if header.nbytes > max(info.compress_size, 1) * MAX_DEFLATE_RATIO:
            raise CorruptFileError(f'{self.where(entry.key)}: header claims {header.nbytes} '
                                   f'bytes, more than {info.compress_size} stored bytes can hold')

    def in_read_order(self, fills: list) -> list:
        """The fills in the file's order, their members announced to a file that can fetch
        them ahead (an object in a store)."""
        ordered = sorted(fills, key=lambda fill: fill[0].token[0].header_offset)
        if self.archive.expect is not None:  # none for a local file
            self.archive.expect([(data_start, data_start + info.compress_size)
                                 for entry, _ in ordered if entry.key not in self._kept
                                 for info, _, data_start in [entry.token]])
        return ordered

    def reads_whole(self, entry: loading.Entry, dst) -> bool:
        header = entry.token[1]
        return (not isinstance(dst, numpy.ndarray) and devices.is_array(dst)
                and header.nbytes <= min(SMALL_MEMBER_BYTES, transfer.settings().chunk_bytes)
                and (dst.dtype == header.dtype or devices.holds_bits_of(dst.dtype, header.dtype))
                and not header.fortran_order
                and bool(dst.flags.c_contiguous))

    def read_whole(self, entry: loading.Entry, buffer: memoryview) -> None:
        info, header, data_start = entry.token
        try:
            self._read_member(info, data_start, header.length, buffer,
                              self._source(entry.key))
        except READ_ERRORS as error:
            raise _read_error(self.where(entry.key), error) from error
        self.progress.update(header.nbytes)

    def _read_member(self, info, data_start: int, head: int, out,
                     source: _zipread.Viewable) -> None:
        """Reads a whole member from ``source`` (the file, or its bytes kept): its first
        ``head`` bytes skipped, the rest into ``out`` (exactly that long), its sizes, end of
        stream and CRC checked."""
        if info.compress_type == _zipstream.STORED:
            _zipread.read_stored(source, info, data_start, head, out)
        elif info.compress_size < _zipread.DIRECT:  # before ``out`` changes
            _zipread.read_deflated(source, info, data_start, head, out)
        else:
            member = _zipread.MemberReader(source, info, data_start, whole=True)
            member.read(head)
            member.readinto(out)
            member.finish()

    def read_into(self, entry: loading.Entry, dst) -> None:
        self.read_many([(entry, dst)], [])

    def read_many(self, fills: list[tuple[loading.Entry, Any]], filled: list[str]) -> None:
        """Fills each array in turn (see :meth:`loading.Reader.read_many`), in one loop: a small
        stored member into a host array of its dtype in one read from the window, the rest
        streamed through the staging engine."""
        shown, read_stored = self.progress, _zipread.read_stored
        for entry, dst in fills:
            info, header, data_start = entry.token
            target = dst.T if header.fortran_order else dst
            source = self._source(entry.key)
            try:
                if (header.nbytes <= SMALL_BYTES and isinstance(target, numpy.ndarray)
                        and target.flags.c_contiguous and target.dtype == header.dtype
                        and (not info.compress_type or info.compress_size < _zipread.DIRECT)):
                    (read_stored if not info.compress_type else _zipread.read_deflated)(
                        source, info, data_start, header.length, host_bytes(target))
                    shown.update(header.nbytes)
                else:
                    self._stream_into(info, header, data_start, target, source)
            except READ_ERRORS as error:
                raise _read_error(self.where(entry.key), error) from error
            filled.append(entry.key)

    def _stream_into(self, info, header: _npy.Header, data_start: int, target,
                     source: _zipread.Viewable) -> None:
        member = _zipread.MemberReader(source, info, data_start, whole=True)
        member.read(header.length)

        def read_into(buffer: memoryview) -> None:
            member.readinto(buffer)
            self.progress.update(len(buffer))

        transfer.fill(target, read_into, header.dtype)
        member.finish()

    def stored_size(self, entry: loading.Entry) -> tuple[int, bool]:
        info = entry.token if entry.is_none else entry.token[0]
        return info.compress_size, info.compress_type != _zipstream.STORED

    def read_box(self, entry: loading.Entry, box: list[tuple[int, int, int]]) -> numpy.ndarray:
        info, header, data_start = entry.token
        shape = header.shape
        if header.fortran_order:  # a C-order array of the reversed shape
            shape, box = shape[::-1], box[::-1]
        offsets, run = loading.box_reads(shape, box)
        out = numpy.empty([len(range(*b)) for b in box], header.dtype)
        into = out.reshape(-1).view(numpy.uint8)
        itemsize = header.dtype.itemsize
        start = data_start + header.length
        try:
            if info.compress_type == _zipstream.STORED:
                _read_runs(self.archive.raw, start + offsets * itemsize, run * itemsize, into)
            else:
                member = _zipread.MemberReader(self.archive.fp, info, data_start)
                _skip(member, header.length)
                for index, offset in enumerate((offsets * itemsize).tolist()):
                    _skip(member, offset - (member.produced - header.length))
                    member.readinto(into[index * run * itemsize:(index + 1) * run * itemsize])
        except READ_ERRORS as error:
            raise _read_error(self.where(entry.key), error) from error
        self.progress.update(into.nbytes)
        return out.T if header.fortran_order else out


PAGE = 4096  # runs of a slice are read together when the gap is within a page and a run
MAX_SPAN = 16 << 20  # bytes read at once for runs read together


def _read_runs(fp: ArchiveFile, positions: numpy.ndarray, run: int, into: numpy.ndarray) -> None:
    """Reads ``run`` bytes at each of ``positions`` (increasing) into ``into``, one after the
    other. Runs apart by at most one run and one page are read in one call, the gaps with
    them: never more than twice the bytes asked for, in far fewer calls."""
    if run == 0:
        return
    gaps = positions[1:] - positions[:-1] - run
    breaks = [0, *(numpy.flatnonzero(gaps > min(run, PAGE)) + 1).tolist(), len(positions)]
    for first, end in itertools.pairwise(breaks):
        while first < end:  # runs [first, last) make one span of at most MAX_SPAN
            last = first + 1 + int(numpy.searchsorted(
                positions[first + 1:end], positions[first] + max(MAX_SPAN - run, 0), 'right'))
            base = int(positions[first])
            span = numpy.empty(int(positions[last - 1]) + run - base, numpy.uint8)
            _read_exactly(fp, base, span)
            if last - first == 1:
                into[first * run:last * run] = span
            else:
                relative = positions[first:last] - base
                into[first * run:last * run] = span[
                    (relative[:, None] + numpy.arange(run)).reshape(-1)]
            first = last


def _read_exactly(fp: ArchiveFile, position: int, into: numpy.ndarray) -> None:
    fp.seek(position)
    view = into.data.cast('B')
    done = 0
    while done < len(view):
        count = fp.readinto(view[done:])
        if not count:
            raise _zipread.MemberError(f'truncated: the file ends {len(view) - done} bytes '
                                       f'early')
        done += count


def _skip(member: _zipread.MemberReader, count: int) -> None:
    scratch = bytearray(min(count, 1 << 20))
    while count > 0:
        step = min(count, len(scratch))
        member.readinto(memoryview(scratch)[:step])
        count -= step


def npy_members(archive: Archive, name: str) -> dict[str, _zipread.Member | zipfile.ZipInfo]:
    """The ``.npy`` members of an NPZ by key.

    Raises:
        CorruptFileError: the zip has members, but not one ``.npy`` (it is some other zip).
    """
    members = {info.filename[:-len(SUFFIX)]: info for info in archive.infolist()
               if info.filename.endswith(SUFFIX)}
    if not members and archive.infolist():
        names = [info.filename for info in archive.infolist()[:3]]
        raise CorruptFileError(f'{name!r}: not an NPZ file: a zip of {len(archive.infolist())} '
                               f'members, none of them .npy ({", ".join(map(repr, names))}'
                               f'{", ..." if len(archive.infolist()) > 3 else ""})')
    return members


class _MappingReader(loading.Reader):
    """Entries of a plain mapping of arrays (``serialize`` output, or any dict), of any device."""

    _left: memoryview | None  # what the last chunk of a read_into had left over

    def __init__(self, mapping: Mapping, name: str = '<mapping>'):
        self.mapping = mapping
        self.name = name

    def keys(self) -> list[str]:
        return list(self.mapping)

    def entry(self, key: str) -> loading.Entry | None:
        if key not in self.mapping:
            return None
        value = self.mapping[key]
        array = value if devices.is_array(value) else numpy.asarray(value)
        if array.dtype.hasobject:
            if array.shape == () and array[()] is None:
                return loading.Entry(key, None, None)
            raise UnsafeFileError(f'{self.where(key)}: object arrays other than None are '
                                  f'refused')
        return loading.Entry(key, tuple(array.shape), array.dtype, array)

    def read_into(self, entry: loading.Entry, dst) -> None:
        chunks = transfer.host_chunks(entry.token)

        def read_into(buffer: memoryview) -> None:
            filled = 0
            while filled < len(buffer):
                chunk = memoryview(self._left or next(chunks)).cast('B')
                taken = min(len(chunk), len(buffer) - filled)
                buffer[filled:filled + taken] = chunk[:taken]
                self._left = chunk[taken:] if taken < len(chunk) else None
                filled += taken

        self._left = None
        assert entry.dtype is not None  # not a stored None
        with contextlib.closing(chunks):
            transfer.fill(dst, read_into, entry.dtype)


def _reader_of(npz, name: str | None = None) -> loading.Reader:
    if isinstance(npz, loading.Reader):
        return npz
    archive = getattr(npz, 'zip', None)  # numpy.load()'s NpzFile
    if isinstance(npz, zipfile.ZipFile):
        archive = npz
    if isinstance(npz, numpy.lib.npyio.NpzFile) and archive is None:
        raise ValueError('the NPZ file (a numpy.load() result) is closed: read it while it is '
                         'open')
    if isinstance(archive, zipfile.ZipFile):
        if archive.fp is None:
            raise ValueError(f'{archive.filename!r}: the NPZ file is closed: read it while it is '
                             f'open')
        # zipfile's stub types its file IO[bytes], which has no readinto: it is the caller's
        # binary file
        return _ZipReader(Archive(cast(ArchiveFile, archive.fp), archive.infolist()),
                          name or display_name(archive.fp))
    if isinstance(npz, Archive):
        return _ZipReader(npz, name or display_name(npz.raw))
    if isinstance(npz, Mapping):
        return _MappingReader(npz)
    raise TypeError(f'NpzDeserializer needs an NPZ file opened by gpuserial or numpy.load, a '
                    f'zipfile.ZipFile, or a mapping; got {type(npz).__name__}')


class NpzDeserializer(loading.ReaderDeserializer):
    """Deserializer for NPZ files, as Chainer's.

    Args:
        npz: an open NPZ file: a ``numpy.load()`` result, a ``zipfile.ZipFile``, or any mapping
            of keys to arrays.
        path: the base path that deserialization starts from.
        strict: whether a missing key is an error (a ``KeyError``), else it is skipped.
        ignore_names: a string, a callable on the full key, or a list of them: entries to skip.
        device: keyword-only; where arrays end up (None: in place on their own devices).
        progress: keyword-only; a progress bar for :meth:`load` (None: on a terminal for large
            loads).

    Called directly, it loads each entry at once; :meth:`load` calls the object's ``serialize``
    once and fills its arrays in place after that has returned (see
    :mod:`gpuserial.formats.loading`).
    """

    def __init__(self, npz, path: str = '', strict: bool = True, ignore_names=None, *,
                 device=None, progress: bool | None = None):
        super().__init__(_reader_of(npz), path, strict, ignore_names, device=device,
                         progress=progress)
        self.npz = npz


def open_npz(file) -> Archive:
    """Opens an NPZ file (a path or a seekable binary file object), with clear errors."""
    name = display_name(file)
    check_file_object(file, writing=False)
    try:
        fp = open(os.fspath(file), 'rb') if is_path(file) else file
    except FileNotFoundError:
        raise FileNotFoundError(f'{name!r}: no such file{tilde_hint(file)}') from None
    except IsADirectoryError:
        raise IsADirectoryError(f'{name!r}: is a directory, not an NPZ file') from None
    try:
        return Archive(fp, owned=is_path(file))
    except BaseException as error:
        if is_path(file):
            fp.close()
        if isinstance(error, _zipread.NotAZip):  # say what the file is instead
            raise CorruptFileError(f'{name!r}: not an NPZ (zip) file: '
                                   f'{_why_not_a_zip(file) or error}') from None
        if isinstance(error, (_zipread.ZipError, UnicodeDecodeError, EOFError, ValueError)):
            raise CorruptFileError(f'{name!r}: not an NPZ (zip) file: {error}') from None
        if isinstance(error, (AttributeError, io.UnsupportedOperation)):
            raise CorruptFileError(f'{name!r}: not an NPZ (zip) file: reading it needs a '
                                   f'seekable file ({error})') from None
        if isinstance(error, OSError) and not isinstance(error, PermissionError):
            raise ReadFailedError(f'{name!r}: reading the zip directory failed: {error}'
                                  ) from error
        raise


def _why_not_a_zip(file) -> str:
    """What the start and size of a file that zipfile refused say about it ('' if unknown)."""
    try:
        with open_input(file) as fp:
            size = fp.seek(0, os.SEEK_END)
            fp.seek(0)
            head = fp.read(4)
    except (OSError, ValueError, AttributeError):
        return ''
    if size == 0:
        return 'the file is empty (0 bytes)'
    if head == b'PK\x03\x04':
        return (f'truncated: it starts as a zip, but the zip directory that ends a zip is '
                f'missing ({size} bytes)')
    if head == b'\x89HDF':  # the other format, most likely
        return (f'it starts with {head!r}, as an HDF5 file does: load it with load_hdf5 (or '
                f'gpuserial.load, which tells the format by content)')
    return f'it starts with {head!r}'


def load_npz(file, obj, path: str = '', strict: bool = True, ignore_names=None, *,
             device=None, progress: bool | None = None,
             storage_options: dict | None = None) -> None:
    """Loads an object from a file in NPZ format.

    ``obj.serialize`` is called once. Each key, shape, cast and member size is checked as it is
    asked for, and arrays are filled in place only once ``serialize`` has returned, so a load
    that fails on a missing key, a mismatch or a malformed member fills no array. Values handed
    to ``serialize`` before the failure (scalars, strings, new arrays for ``None`` targets) may
    have been kept by it; a dict keeps none of them. A checksum error found while the data
    streams in stops the load: the error lists the arrays already filled (``error.filled``)
    and the one being filled, which may hold part of the bad data (``error.partly_filled``).

    Args:
        file: a path (str or os.PathLike), a URL (read by ranges: only the members asked for)
            or a binary file object to read from.
        obj: a serializable object, or a dict of arrays to fill.
        path: the base path that deserialization starts from (loads a sub-tree).
        strict: whether a missing key is an error (a ``KeyError``), else it is skipped.
        ignore_names: a string, a callable on the full key, or a list of them: entries to skip.
        device: keyword-only; the device the target's arrays end up on (None: in place on
            each array's own device). Dicts and gpuserial's objects get their arrays loaded
            there directly; other objects (Chainer's) are loaded in place, then moved with
            their ``to_device``.
        progress: keyword-only; a progress bar on stderr: None (the default) for one on a
            terminal when the load is large, True or False to decide.
        storage_options: keyword-only; for a URL, the options of its fsspec filesystem.

    Raises:
        FileNotFoundError: no such file.
        TypeError: ``device=`` for an object that cannot be moved (see ``device``).
        gpuserial.errors.KeyNotFoundError: a key is missing (also a ``KeyError``).
        gpuserial.errors.MismatchError: a shape or dtype does not fit (also a ``ValueError``).
        gpuserial.errors.CorruptFileError: the file is not valid NPZ (also a ``ValueError``).
        gpuserial.errors.ReadFailedError: reading the file failed (also an ``OSError``).
        gpuserial.errors.UnsafeCastError: a scalar does not cast safely (also a ``TypeError``).
    """
    with open_input(file, storage_options) as stream, open_npz(stream) as archive:
        reader = _ZipReader(archive, display_name(file))
        NpzDeserializer(reader, path, strict, ignore_names, device=device,
                        progress=progress).load(obj)
