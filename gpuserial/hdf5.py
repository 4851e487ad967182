"""HDF5: Chainer's ``HDF5Serializer``/``HDF5Deserializer`` over h5py, device arrays in chunks.

One group per path, one dataset per entry, gzip at the given level for entries larger than one
element, ``None`` as ``h5py.Empty('f')``, as Chainer writes them. Device arrays are written and
read in C-contiguous hyperslabs through the staging engine.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os

import h5py
import numpy

from gpuserial import _signals, devices, loading, transfer
from gpuserial import progress as _progress
from gpuserial._fileio import atomic_path, display_name, is_path
from gpuserial.errors import (
    CorruptFileError,
    InvalidKeyError,
    KeyCollisionError,
    MismatchError,
    UnsafeFileError,
)
from gpuserial.serializer import Serializer, as_serializable, child_path, entry_key

__all__ = ['HDF5Deserializer', 'HDF5Serializer', 'load_hdf5', 'save_hdf5']

MAX_FILTER_RATIO = 1032  # gzip cannot expand data more than this: bounds a dataset's claims
FREE_ALLOCATION_BYTES = 64 << 20  # a dataset whose chunks are unwritten may claim this much
MIN_HOST_BLOCK_BYTES = 1 << 20  # host arrays are written and read in blocks at least this large


class HDF5Serializer(Serializer):
    """Serializer for HDF5 files, as Chainer's.

    Called directly, it writes each entry at once. :meth:`save` calls the object's
    ``serialize`` once, checks the keys it stored (no key twice, no dataset where a group must
    go), and then writes the entries.

    Args:
        group: the h5py file or group to write into.
        compression: the gzip level (0 to 9) for entries of more than one element.
        progress: keyword-only; a progress bar for :meth:`save` (None: on a terminal for large
            saves).
        name: keyword-only; how messages name the file (by default the h5py file's name).
    """

    def __init__(self, group: h5py.Group, compression: int = 4, *,
                 progress: bool | None = None, name: str | None = None):
        self.group = group
        self.compression = compression
        self.progress = progress
        self.name = _file_name(group) if name is None else name
        self._entries: list[tuple[h5py.Group, str, str, object]] | None = None  # in save()

    def __getitem__(self, key: str) -> HDF5Serializer:
        name = child_path('', key).rstrip('/')
        try:
            group = self.group.require_group(name)
        except (TypeError, ValueError) as error:  # a dataset of that name is in the way
            raise KeyCollisionError(f'{self.name!r}, key {_dataset_path(self.group, name)[1:]!r}: '
                                    f'cannot make a group here: {error}') from None
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__, group=group)
        return child

    def __call__(self, key: str, value):
        key = entry_key('', key)
        if self._entries is not None:
            self._entries.append((self.group, key, _dataset_path(self.group, key), value))
        else:
            write_entry(self.group, key, value, self.compression, self.name)
        return value

    def save(self, obj) -> None:
        """Serializes ``obj`` (calling its ``serialize`` once), then writes what it stored."""
        entries: list = []
        self._entries = entries
        try:
            as_serializable(obj).serialize(self)
        except InvalidKeyError as error:
            raise InvalidKeyError(f'{self.name!r}, {error}') from None
        finally:
            self._entries = None
        _check_keys(self.group, entries, self.name)
        total = sum(value.nbytes for _, _, _, value in entries if devices.is_array(value))
        with _progress.bar(total, f'save {self.name}', self.progress) as shown:
            for group, key, _, value in entries:
                _signals.check()
                write_entry(group, key, value, self.compression, self.name, shown)


def _file_name(group: h5py.Group) -> str:
    try:
        return display_name(group.file.filename)
    except (AttributeError, ValueError):
        return '<hdf5>'


def _where(name: str, group: h5py.Group, key: str) -> str:
    return f'{name!r}, key {_dataset_path(group, key)[1:]!r}'


def _dataset_path(group: h5py.Group, key: str) -> str:
    return group.name.rstrip('/') + '/' + key


def _check_keys(root: h5py.Group, entries: list, name: str) -> None:
    """Raises before anything is written if two entries share a path, or one is another's group."""
    sources: dict[str, str] = {}
    for group, key, path, _ in entries:
        source = f'key {key!r} of group {group.name!r}'
        if path in sources:
            raise KeyCollisionError(f'{name!r}, key {path[1:]!r}: stored twice, as '
                                    f'{sources[path]} and as {source}')
        sources[path] = source
    check_paths(sources, name, root)


def check_paths(sources: dict[str, str], name: str, root: h5py.Group | None = None) -> None:
    """Raises if a dataset path (``'/a/b'``: its source, for messages) would have to be a group
    for another path, or (in ``root``'s file) is a group already."""
    for path, source in sources.items():
        parent = path.rsplit('/', 1)[0]
        while parent:
            if parent in sources:
                raise KeyCollisionError(f'{name!r}, key {parent[1:]!r}: a dataset '
                                        f'({sources[parent]}) where {source} needs a group')
            parent = parent.rsplit('/', 1)[0]
        if root is not None and isinstance(root.file.get(path), h5py.Group):
            raise KeyCollisionError(f'{name!r}, key {path[1:]!r}: a group of that name holds '
                                    f'other entries, so {source} cannot be a dataset')


def write_entry(group: h5py.Group, key: str, value, compression: int | None, name: str,
                 shown: _progress.Progress = _progress.SILENT) -> None:
    """Creates dataset ``key`` in ``group`` for one entry, as Chainer writes it."""
    is_array = devices.is_array(value)
    if value is not None and not isinstance(value, str):
        if (value.dtype if is_array else numpy.asarray(value).dtype).hasobject:
            raise TypeError(f'{_where(name, group, key)}: a {type(value).__name__} of objects '
                            f'cannot be saved (arrays, numbers, strings and None can)')
    try:
        if value is None:
            group.create_dataset(key, data=h5py.Empty('f'))
        elif isinstance(value, str):
            group.create_dataset(key, data=value)
        elif is_array and value.dtype.kind == 'U':  # text (Chainer's snapshots pass JSON so)
            group.create_dataset(key, data=value.astype(h5py.string_dtype()) if value.ndim
                                 else value.item())
        elif is_array:
            write_dataset(group, key, value, compression, shown)
        else:
            group.create_dataset(key, data=numpy.asarray(value))
    except (ValueError, TypeError) as error:  # h5py's, such as a name that is taken
        raise type(error)(f'{_where(name, group, key)}: {error}') from None


def write_dataset(group: h5py.Group, key: str, array, compression: int | None,
                  shown: _progress.Progress = _progress.SILENT) -> None:
    """Creates dataset ``key`` holding ``array``, written in hyperslabs of at most a chunk.

    Device arrays stream through the staging engine; with compression, each block is one HDF5
    chunk (no chunk is rewritten). Between blocks a pending Ctrl-C is raised (see ``_signals``).
    """
    compression = compression if array.size > 1 and compression else None
    block_bytes = _block_bytes(devices.backend_of(array).is_host)
    if array.size == 0:
        group.create_dataset(key, shape=array.shape, dtype=array.dtype)
        return
    if devices.backend_of(array).is_host and array.flags.c_contiguous \
            and array.nbytes <= block_bytes:
        group.create_dataset(key, data=array, compression=compression)
        shown.update(array.nbytes)
        return
    blocks = list(transfer.hyperslabs(array.shape, array.dtype.itemsize, block_bytes))
    chunks = None
    if compression and array.size:  # one HDF5 chunk per block, so that no chunk is rewritten
        index = blocks[0][0]
        chunks = (1,) * (len(index) - 1) + transfer.block_shape(array.shape, index)
    dataset = group.create_dataset(key, shape=array.shape, dtype=array.dtype,
                                   compression=compression, chunks=chunks)
    with contextlib.closing(transfer.host_chunks(array, blocks=blocks)) as chunks:
        for (index, _, _), chunk in zip(blocks, chunks, strict=True):
            _signals.check()
            block = numpy.frombuffer(chunk, array.dtype).reshape(
                transfer.block_shape(array.shape, index))
            dataset.write_direct(block, dest_sel=index if index else None)
            shown.update(block.nbytes)


def _block_bytes(host: bool) -> int:
    """The most one HDF5 read or write moves: a staging chunk (host arrays: at least
    :data:`MIN_HOST_BLOCK_BYTES`, as they need no staging buffer)."""
    chunk_bytes = transfer.settings().chunk_bytes
    return max(chunk_bytes, MIN_HOST_BLOCK_BYTES) if host else chunk_bytes


def _read_blocks(dataset: h5py.Dataset, shape: tuple, itemsize: int, host: bool) -> list:
    """Hyperslabs of at most a block, whole bands of the dataset's HDF5 chunks where they fit,
    so that no HDF5 chunk is read (and decompressed) twice."""
    chunk_bytes = _block_bytes(host)
    if dataset.chunks and len(shape) > 1:
        band = itemsize * dataset.chunks[0]
        for extent in shape[1:]:
            band *= extent
        if 0 < band <= chunk_bytes:
            chunk_bytes = chunk_bytes // band * band
    return list(transfer.hyperslabs(shape, itemsize, chunk_bytes))


class _GroupReader(loading.Reader):
    """Datasets of an HDF5 group, by path."""

    def __init__(self, group: h5py.Group, name: str):
        self.group = group
        self.name = name
        self._entries: dict[str, loading.Entry | None] = {}

    def entry(self, key: str) -> loading.Entry | None:
        if key not in self._entries:
            self._entries[key] = self._lookup(key)
        return self._entries[key]

    def _lookup(self, key: str) -> loading.Entry | None:
        where = self.where(key)
        try:
            found = self.group.get(key)
        except (OSError, KeyError, ValueError) as error:
            raise CorruptFileError(f'{where}: {error}') from None
        if found is None:
            return None
        if not isinstance(found, h5py.Dataset):
            raise MismatchError(f'{where}: is an HDF5 {type(found).__name__.lower()}, '
                                f'not a dataset')
        try:  # a corrupt file's datatype or dataspace fails to decode here
            shape, dtype = found.shape, found.dtype
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:
            raise CorruptFileError(f'{where}: {error}') from None
        if shape is None:
            return loading.Entry(key, None, None, found)
        if dtype.hasobject and h5py.check_string_dtype(dtype) is None:
            raise UnsafeFileError(f'{where}: datasets of type {dtype} (object references, '
                                  f'variable-length arrays) are refused')
        return loading.Entry(key, tuple(shape), dtype, found)

    def check_size(self, entry: loading.Entry, allocating: bool = False) -> None:
        """Before memory is allocated for a dataset, its claim against what the file holds.

        A chunked dataset may leave chunks unwritten (they read as the fill value), so its
        claim is checked only against an allocation beyond :data:`FREE_ALLOCATION_BYTES`; a
        load into an existing array allocates nothing and is not checked.
        """
        if not allocating:
            return
        dataset = entry.token
        stored = self._guard(entry, dataset.id.get_storage_size)
        claimed = entry.nbytes
        if claimed <= max(stored, 1) * MAX_FILTER_RATIO:
            return
        if dataset.chunks is not None and claimed <= FREE_ALLOCATION_BYTES:
            return  # unwritten chunks: the fill value
        raise CorruptFileError(f'{self.where(entry.key)}: the dataset claims {claimed} bytes '
                               f'(dtype {entry.dtype}, shape {entry.shape}) but stores only '
                               f'{stored}; a new array of that size is not made for it (load it '
                               f'into an existing array)')

    def read_scalar(self, entry: loading.Entry) -> numpy.ndarray:
        dataset = entry.token
        if h5py.check_string_dtype(dataset.dtype) is not None:
            return numpy.asarray(self._guard(entry, lambda: dataset.asstr()[()]))
        return numpy.asarray(self._guard(entry, lambda: dataset[()]))

    def read_into(self, entry: loading.Entry, dst) -> None:
        dataset = entry.token
        if dst.size == 0:
            return
        host = devices.backend_of(dst).is_host and dst.flags.c_contiguous
        blocks = _read_blocks(dataset, dst.shape, dst.dtype.itemsize, host)
        if host:
            for index, _, _ in blocks:  # straight into the array, a block at a time
                _signals.check()
                self._guard(entry, functools.partial(dataset.read_direct, dst, index or None,
                                                     index or None))
                self.progress.update(dst[index].nbytes if index else dst.nbytes)
            return
        position = iter(blocks)

        def read_into(buffer: memoryview) -> None:
            index, _, _ = next(position)
            block = numpy.frombuffer(buffer, dst.dtype).reshape(
                transfer.block_shape(dst.shape, index))
            if index:
                self._guard(entry, lambda: dataset.read_direct(block, source_sel=index))
            else:
                block[...] = self._guard(entry, lambda: dataset[()])
            self.progress.update(block.nbytes)

        transfer.fill(dst, read_into, dst.dtype, blocks=blocks)

    def _guard(self, entry: loading.Entry, read):
        try:
            return read()
        except (OSError, TypeError, ValueError, RuntimeError) as error:  # h5py's, on bad files
            raise CorruptFileError(f'{self.where(entry.key)}: {error}') from None


class HDF5Deserializer(loading.ReaderDeserializer):
    """Deserializer for HDF5 files, as Chainer's.

    Args:
        group: the h5py file or group to read from.
        strict: whether a missing key is an error (a ``KeyError``), else it is skipped.
        path: keyword-only; the base path that deserialization starts from.
        ignore_names: keyword-only; a string, a callable on the full key, or a list of them.
        device: keyword-only; where arrays end up (None: in place on their own devices).
        progress: keyword-only; a progress bar for :meth:`load` (None: on a terminal for large
            loads).

    Called directly, it loads each entry at once; :meth:`load` calls the object's ``serialize``
    once and fills its arrays in place after that has returned (see :mod:`gpuserial.loading`).
    """

    def __init__(self, group: h5py.Group, strict: bool = True, *, path: str = '',
                 ignore_names=None, device=None, progress: bool | None = None):
        reader = group if isinstance(group, _GroupReader) else _GroupReader(
            group, _file_name(group))
        super().__init__(reader, path, strict, ignore_names, device=device, progress=progress)

    @property
    def group(self) -> h5py.Group | None:
        """The h5py group of this deserializer's path, or None where the file has none."""
        found = self.reader.group.get(self.path.rstrip('/')) if self.path else self.reader.group
        return found if isinstance(found, h5py.Group) else None


def save_hdf5(filename, obj, compression: int = 4, *, durable: bool = True,
              progress: bool | None = None) -> None:
    """Saves an object to a file in HDF5 format.

    Args:
        filename: a path (str or os.PathLike) or a binary file object to write into.
        obj: a serializable object, or a dict of arrays (nested dicts become groups).
        compression: the gzip level (0 to 9; 0 is none) for entries of more than one element.
        durable: for a path, fsync the file and its directory so the save survives a machine
            crash; ``False`` still replaces the file atomically but skips the fsyncs.
        progress: a progress bar on stderr: None (the default) for one on a terminal when the
            save is large, True or False to decide.

    A save to a path goes to a temporary file beside it that replaces the target only once
    complete: a failed save leaves the old file as it was.
    """
    name = display_name(filename)
    if not is_path(filename):
        with _signals.deferred():
            _write_hdf5(filename, obj, compression, progress, name)
        return
    with atomic_path(filename, durable=durable) as temp, open(temp, 'x+b', buffering=0) as out, \
            _signals.deferred():  # Ctrl-C stops the save before the rename
        _write_hdf5(out, obj, compression, progress, name)


def _write_hdf5(out, obj, compression: int, progress: bool | None, name: str) -> None:
    """Writes ``obj`` as HDF5 into the binary file ``out``; raises the first write error."""
    guarded = _KeptErrorFile(out)
    try:
        with h5py.File(guarded, 'w') as f:
            HDF5Serializer(f, compression, progress=progress, name=name).save(obj)
    except BaseException:
        if guarded.error is None:
            raise
        raise guarded.error from None  # the cause of whatever h5py made of the dropped writes
    if guarded.error is not None:
        raise guarded.error


class _KeptErrorFile(io.RawIOBase):
    """The file h5py writes through: a write error is kept for the caller, not passed to HDF5.

    h5py (3.16, HDF5 2.0) crashes the process when a write fails (a full disk), at the latest
    when the objects of the failed file are freed. Through this file HDF5 never sees a failed
    write, truncate or flush: after the first error, writes are dropped, and the save raises that
    error once h5py is done. (Unbuffered files fail only there; a buffered one may also fail in
    ``seek``, flushing its buffer, and that error still reaches HDF5.)
    """

    def __init__(self, raw):
        self.raw = raw
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if hasattr(self.raw, 'readinto'):
            return self.raw.readinto(buffer)
        data = self.raw.read(len(buffer))  # a file object with read() only, as h5py allows
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def write(self, data) -> int:
        data = memoryview(data).cast('B')
        self._keep(self._write_all, data)
        return len(data)

    def _write_all(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            count = self.raw.write(data[done:])
            if not count:
                raise OSError(f'a write of {len(data) - done} bytes made no progress')
            done += count

    def truncate(self, size: int | None = None) -> int:
        self._keep(self.raw.truncate, size)
        return self.tell() if size is None else size

    def flush(self) -> None:
        self._keep(self.raw.flush)

    def _keep(self, operation, *args) -> None:
        if self.error is None:
            try:
                operation(*args)
            except OSError as error:
                self.error = error


def open_hdf5(filename) -> h5py.File:
    """Opens an HDF5 file for reading, with clear errors."""
    name = display_name(filename)
    size = None
    if is_path(filename):
        try:  # Python's own errors for a missing, unreadable or directory path
            with open(filename, 'rb') as f:
                size = f.seek(0, os.SEEK_END)
        except FileNotFoundError:
            raise FileNotFoundError(f'{name!r}: no such file') from None
        except IsADirectoryError:
            raise IsADirectoryError(f'{name!r}: is a directory, not an HDF5 file') from None
    try:
        return h5py.File(filename, 'r')
    except (OSError, ValueError) as error:
        why = 'the file is empty (0 bytes)' if size == 0 else error
        raise CorruptFileError(f'{name!r}: not an HDF5 file: {why}') from None


def load_hdf5(filename, obj, *, path: str = '', strict: bool = True, ignore_names=None,
              device=None, progress: bool | None = None) -> None:
    """Loads an object from a file in HDF5 format.

    ``obj.serialize`` is called once. Each key, shape, cast and dataset size is checked as it is
    asked for, and arrays are filled in place only once ``serialize`` has returned, so a load
    that fails on a missing key, a mismatch or a malformed dataset fills no array. Values handed
    to ``serialize`` before the failure (scalars, strings, new arrays for ``None`` targets) may
    have been kept by it; a dict keeps none of them. A read error found while the data streams
    in stops the load: the error lists the arrays already filled (``error.filled``) and the
    one being filled, which may hold part of the bad data (``error.partly_filled``).

    Args:
        filename: a path (str or os.PathLike) or a binary file object to read from.
        obj: a serializable object, or a dict of arrays to fill.
        path: keyword-only; the base path that deserialization starts from.
        strict: keyword-only; whether a missing key is an error (a ``KeyError``).
        ignore_names: keyword-only; a string, a callable on the full key, or a list of them.
        device: keyword-only; the device the target's arrays end up on (None: in place on
            each array's own device). Dicts and gpuserial's objects get their arrays loaded
            there directly; other objects (Chainer's) are loaded in place, then moved with
            their ``to_device``.
        progress: keyword-only; a progress bar on stderr: None (the default) for one on a
            terminal when the load is large, True or False to decide.

    Raises:
        FileNotFoundError: no such file.
        TypeError: ``device=`` for an object that cannot be moved (see ``device``).
        gpuserial.errors.KeyNotFoundError: a key is missing (also a ``KeyError``).
        gpuserial.errors.MismatchError: a shape or dtype does not fit (also a ``ValueError``).
        gpuserial.errors.CorruptFileError: the file is not valid HDF5 (also a ``ValueError``).
        gpuserial.errors.UnsafeCastError: a scalar does not cast safely (also a ``TypeError``).
    """
    with open_hdf5(filename) as f, _signals.deferred():
        reader = _GroupReader(f, display_name(filename))
        HDF5Deserializer(reader, strict, path=path, ignore_names=ignore_names, device=device,
                         progress=progress).load(obj)
