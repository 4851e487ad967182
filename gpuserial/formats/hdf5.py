"""HDF5: Chainer's ``HDF5Serializer``/``HDF5Deserializer`` over h5py, device arrays in chunks.

One group per path, one dataset per entry, gzip at the given level for entries larger than one
element, ``None`` as ``h5py.Empty('f')``, as Chainer writes them. Device arrays are written and
read in C-contiguous hyperslabs through the staging engine. Gzipped chunks are compressed, and
read back, on the worker threads (``engine.workers``): libhdf5's filter runs on one.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import itertools
import math
import numbers
import os
import re
import zlib
from collections.abc import Collection, Generator, Iterable
from concurrent.futures import Future
from types import ModuleType

import h5py
import numpy

from gpuserial.engine import devices, transfer, workers
from gpuserial.engine import progress as _progress
from gpuserial.errors import (
    CorruptFileError,
    DeviceError,
    GpuserialError,
    InvalidKeyError,
    KeyCollisionError,
    MismatchError,
    ReadFailedError,
    UnsafeFileError,
    UnstorableValueError,
)
from gpuserial.formats import _npy, loading
from gpuserial.formats._zipstream import DEFLATE_ERRORS, deflate_module
from gpuserial.serializer import (
    Serializer,
    as_serializable,
    child_path,
    entry_key,
    object_as_value_error,
)
from gpuserial.storage import _signals, remote
from gpuserial.storage._fileio import (
    atomic_path,
    check_file_object,
    display_name,
    is_path,
    sharded_hint,
    tilde_hint,
    wait_for_save,
)

resource: ModuleType | None
try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None

__all__ = ['HDF5Deserializer', 'HDF5Serializer', 'load_hdf5', 'save_hdf5']

MAX_FILTER_RATIO = 1032  # gzip cannot expand data more than this: bounds a dataset's claims
FREE_ALLOCATION_BYTES = 64 << 20  # a dataset whose chunks are unwritten may claim this much
MIN_HOST_BLOCK_BYTES = 1 << 20  # host arrays are written and read in blocks at least this large
GZIP_CHUNK_BYTES = 64 << 10  # a compressed dataset's HDF5 chunks hold this much at most (zlib runs
#                               faster on small inputs; h5py picks 32-128 KiB for such data)
HDF5_ENTRY_BYTES = 4 << 10  # what a dataset costs beyond its data, at most (headers, indexes)
HDF5_FILE_BYTES = 1 << 20  # and the file itself
HDF5_SPARE_BYTES = 256 << 20  # free space left beyond twice the file's: room for others' writes
MAX_DEPTH = 1000  # groups a dataset's path may pass through: libhdf5 crashes the process (a
# segfault) reading paths nested about 16,000 deep (measured; fewer where threads have less stack)
H5PY_FILLS_CHUNKS_AT_ALLOCATION = h5py.version.version_tuple[:2] < (3, 12)  # its
#                                  create_dataset did so for every chunked dataset before 3.12
GZIP_DEFAULT = 4  # Chainer's default level, and h5py's for compression=True or 'gzip'
INFLATE_MIN_BYTES = 256 << 10  # a gzip dataset this large is inflated chunk by chunk on the
#                                worker threads (below it libhdf5's filter reads it in one call)
MAX_INFLATE_CHUNK_BYTES = 1 << 20  # ... when its chunks hold at most this (h5py's largest
#                                    guess; gpuserial writes 64 KiB): each thread holds one
_PHIL = h5py._objects.phil  # h5py's lock on libhdf5, which its direct-chunk calls took only from
#                            3.16 on (h5py#2764): HDF5 saves and loads in two threads crashed
CAN_LIST_CHUNKS = hasattr(h5py.h5d.DatasetID, 'chunk_iter')  # which gzip reads need: h5py
#                 built with HDF5 1.12.3 or later (its wheels from 3.10 on); else libhdf5 reads


class HDF5Serializer(Serializer):
    """Serializer for HDF5 files, as Chainer's.

    Called directly, it writes each entry at once. :meth:`save` calls the object's
    ``serialize`` once, checks the keys it stored (no key twice, no dataset where a group must
    go), and then writes the entries.

    Args:
        group: the h5py file or group to write into.
        compression: the gzip level (0 to 9; 0 is none) for entries of more than one element,
            or as h5py takes it: ``'gzip'`` or True for level 4, None or False for none.
        progress: keyword-only; a progress bar for :meth:`save` (None: on a terminal for large
            saves).
        name: keyword-only; how messages name the file (by default the h5py file's name).

    Raises:
        ValueError: ``compression`` is none of these (h5py's other filters are not written).
    """

    def __init__(self, group: h5py.Group, compression: int | str | None = GZIP_DEFAULT, *,
                 progress: bool | None = None, name: str | None = None):
        self.group = group
        self.progress = progress
        self.name = _file_name(group) if name is None else name
        self.compression = gzip_level(compression, self.name)
        self._plan: _Plan | None = None  # while collecting: the groups and entries stored

    def _path(self) -> str:
        """The path of this serializer's group, as the keys under it spell it (``'a/b/'``)."""
        path = self.group.name.strip('/')
        return path + '/' if path else ''

    def __getitem__(self, key: str) -> HDF5Serializer:
        path = self._path()
        try:
            name = plain_key(child_path(path, key)[len(path):]) or '.'  # '.': this group
        except InvalidKeyError as error:
            raise InvalidKeyError(f'{self.name!r}, {error}') from None
        if name != '.':  # a group its entries could not be in (their paths too deep)
            _check_depth(path + name + '/', self.name)
        try:
            group = self.group.require_group(name)
        except (TypeError, ValueError) as error:  # a dataset of that name is in the way
            raise KeyCollisionError(f'{self.name!r}, key {_dataset_path(self.group, name)[1:]!r}: '
                                    f'cannot make a group here: {error}') from None
        if self._plan is not None:
            self._plan.groups.append(group.name)
        child = object.__new__(type(self))
        child.__dict__.update(self.__dict__, group=group)
        return child

    def __call__(self, key: str, value):
        path = self._path()
        try:
            key = entry_key(path, key)[len(path):]
        except InvalidKeyError as error:
            raise InvalidKeyError(f'{self.name!r}, {error}') from None
        if key.rsplit('/', 1)[-1] in ('', '.'):  # HDF5 would take it for its group
            raise InvalidKeyError(f'{self.name!r}, key {key!r} of group {self.group.name!r}: '
                                  f'the name of an HDF5 dataset cannot end with \'/\' or \'/.\'')
        key = plain_key(key)
        _check_depth(path + key, self.name)  # path: the group's, as HDF5 spells it
        try:
            stored = devices.engine_array(value)  # torch, JAX: views of their memory
        except DeviceError as error:
            raise DeviceError(f'{self.name!r}, key {_dataset_path(self.group, key)[1:]!r}: '
                              f'{error}') from None
        except TypeError as error:  # a torch dtype NumPy lacks (float8_e4m3fnuz)
            raise UnstorableValueError(f'{_where(self.name, self.group, key)}: {error}') from None
        if _npy.is_none_array(stored):  # a dict from Chainer's npz.serialize holds None so
            stored = None
        if self._plan is not None:  # checked now: the writes may come later (save_async)
            _check_storable(self.group, key, stored, self.name)
            self._plan.entries.append((self.group, key, _dataset_path(self.group, key), stored))
        else:
            write_entry(self.group, key, stored, self.compression, self.name)
        return value

    def save(self, obj) -> None:
        """Serializes ``obj`` (calling its ``serialize`` once), then writes what it stored."""
        self.write(self.collect(obj))

    def collect(self, obj) -> _Plan:
        """Calls ``obj.serialize`` once and returns what it stored, its keys checked."""
        plan = _Plan()
        self._plan = plan
        try:
            as_serializable(obj).serialize(self)
        finally:
            self._plan = None
        _check_keys(plan, self.name)
        return plan

    def write(self, plan: _Plan, root: h5py.Group | None = None,
              entries: Iterable[tuple] | None = None) -> None:
        """Writes what :meth:`collect` gathered; a plan made on planned groups (see
        :func:`save_hdf5`) is written into ``root``, its groups made there first. ``entries``:
        the plan's entries as they are to be written (staged copies), taken one at a time."""
        groups = {}
        if root is not None:
            groups[root.name] = root
            for path in plan.groups:
                groups[path] = root.require_group(path)
        with _progress.bar(plan.nbytes, f'save {self.name}', self.progress) as shown:
            for group, key, _, value in plan.entries if entries is None else entries:
                _signals.check()
                if root is not None:
                    group = groups[group.name]
                write_entry(group, key, value, self.compression, self.name, shown)


class _Plan:
    """What one save stores: the groups asked for, then the entries ``(group, key, path,
    value)``, in order."""

    def __init__(self):
        self.groups: list[str] = []
        self.entries: list[tuple] = []

    @property
    def nbytes(self) -> int:
        return sum(value.nbytes for *_, value in self.entries if devices.is_array(value))


class _Planned:
    """A group that will be made once the save knows what to write: its path, for the
    serializer to work with while ``serialize`` runs."""

    def __init__(self, name: str = '/'):
        self.name = name

    def require_group(self, name: str) -> _Planned:
        return _Planned(_dataset_path(self, name))  # as HDF5 will name it


def gzip_level(compression, name: str) -> int:
    """The gzip level (0: none) of a ``compression`` argument as Chainer passes it to h5py.

    Raises:
        ValueError: ``compression`` is not a level 0-9, 'gzip', a bool or None.
    """
    if compression is None or compression is False:
        return 0
    if compression is True or compression == 'gzip':
        return GZIP_DEFAULT
    if isinstance(compression, numbers.Integral) and 0 <= int(compression) <= 9:
        return int(compression)
    raise ValueError(f'{name!r}: compression {compression!r}: expected a gzip level 0-9 (0 for '
                     f'none), \'gzip\' or True (level {GZIP_DEFAULT}), None or False (none)')


def _file_name(group) -> str:
    try:
        return display_name(group.file.filename)
    except (AttributeError, ValueError):
        return '<hdf5>'


def _where(name: str, group, key: str) -> str:
    return f'{name!r}, key {_dataset_path(group, key)[1:]!r}'


def _dataset_path(group, key: str) -> str:
    """The path HDF5 gives dataset ``key`` of ``group``: ``'a//b'``, ``'./a/b'`` and
    ``'a/./b'`` name ``'/a/b'`` there (``'..'`` is a name like any other)."""
    return '/' + plain_key(f'{group.name}/{key}')


def plain_key(key: str) -> str:
    """``key`` without the empty and ``'.'`` parts HDF5 reads past (which h5py cannot make
    groups of: ``'a/./b'`` failed as "name already exists")."""
    return '/'.join(part for part in key.split('/') if part not in ('', '.'))


def _check_depth(path: str, name: str) -> None:
    """Raises for a dataset path (``'a/b'``, as :func:`plain_key` spells it) nested deeper than
    :data:`MAX_DEPTH` groups, before anything is written: libhdf5 would write the file, then
    crash every process that reads it."""
    depth = path.count('/')
    if depth > MAX_DEPTH:
        raise InvalidKeyError(f'{name!r}, key {path[:40]!r}...: nested {depth} groups deep; '
                              f'HDF5 takes at most {MAX_DEPTH} here (libhdf5 crashes reading '
                              f'paths some 16,000 deep): save it to NPZ')


def _check_keys(plan: _Plan, name: str) -> None:
    """Raises before anything is written if two entries share a path, or one is another's
    group (or a group ``serialize`` asked for)."""
    sources: dict[str, str] = {}
    for group, key, path, _ in plan.entries:
        source = f'key {key!r} of group {group.name!r}'
        if path in sources:
            raise KeyCollisionError(f'{name!r}, key {path[1:]!r}: stored twice, as '
                                    f'{sources[path]} and as {source}')
        sources[path] = source
    check_paths(sources, name, set(plan.groups))


def check_paths(sources: dict[str, str], name: str, groups: Collection[str] = frozenset()
                ) -> None:
    """Raises if a dataset path (``'/a/b'``: its source, for messages) is nested too deep
    (:func:`_check_depth`), would have to be a group for another path, or is one of
    ``groups``."""
    for path in sources:
        _check_depth(path[1:], name)
    for path, source in sources.items():
        parent = path.rsplit('/', 1)[0]
        while parent:
            if parent in sources:
                raise KeyCollisionError(f'{name!r}, key {parent[1:]!r}: a dataset '
                                        f'({sources[parent]}) where {source} needs a group')
            parent = parent.rsplit('/', 1)[0]
        if path in groups:
            raise KeyCollisionError(f'{name!r}, key {path[1:]!r}: a group of that name holds '
                                    f'other entries, so {source} cannot be a dataset')


def _check_storable(group: h5py.Group, key: str, value, name: str) -> None:
    """Raises for a value no dataset can hold: objects other than strings and None, dates and
    times, types NumPy does not define (ml_dtypes' int4)."""
    if value is None or isinstance(value, str):
        return
    is_array = devices.is_array(value)
    if not is_array:  # its message made only here: a dataset's path costs libhdf5 a call
        error = object_as_value_error(_where(name, group, key), value)
        if error is not None:
            raise error
    try:
        dtype = value.dtype if is_array else numpy.asarray(value).dtype
    except (TypeError, ValueError) as error:  # a ragged list: NumPy makes no array
        raise UnstorableValueError(
            f'{_where(name, group, key)}: a {type(value).__name__} that NumPy makes no array of '
            f'({error}) cannot be saved (arrays, numbers, strings and None can; save a list of '
            f'arrays as a dict)') from None
    why: str | None
    if dtype.hasobject:  # as NPZ says it
        why = ('object arrays other than None cannot be saved (arrays, numbers, strings and '
               'None can)')
    elif dtype.kind in 'mM':
        why = (f'{dtype} arrays cannot be saved to HDF5 (h5py has no type for dates and times): '
               f"save to NPZ, or save their .view('int64') and the unit")
    else:
        why = devices.why_not_storable(dtype)
    if why is None and dtype.names is not None:  # a field of dates or text: h5py's type
        try:
            h5py.h5t.py_create(dtype, logical=True)  # as create_dataset makes it
        except TypeError as error:
            why = (f'a structured array h5py has no type for ({error}) cannot be saved to '
                   f'HDF5: save to NPZ')
    if why is not None:
        raise UnstorableValueError(f'{_where(name, group, key)}: {why}')


def write_entry(group: h5py.Group, key: str, value, compression: int | None, name: str,
                 shown: _progress.Progress = _progress.SILENT) -> None:
    """Creates dataset ``key`` in ``group`` for one entry, as Chainer writes it."""
    is_array = devices.is_array(value)
    _check_storable(group, key, value, name)
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
    except UnicodeEncodeError as error:  # text h5py cannot encode (a lone surrogate)
        raise ValueError(f'{_where(name, group, key)}: text that is not UTF-8 (it holds '
                         f'{error.object[error.start:error.end]!r}: {error.reason}) cannot be '
                         f'saved to HDF5, which stores text as UTF-8 (NPZ stores it)') from None
    except (ValueError, TypeError) as error:  # h5py's, such as a name that is taken
        raise type(error)(f'{_where(name, group, key)}: {error}') from None


def write_dataset(group: h5py.Group, key: str, array, compression: int | None,
                  shown: _progress.Progress = _progress.SILENT) -> None:
    """Creates dataset ``key`` holding ``array``, written in hyperslabs of at most a chunk.

    Device arrays stream through the staging engine; with compression, each block is one HDF5
    chunk of at most :data:`GZIP_CHUNK_BYTES` (no chunk is rewritten), gzipped on the worker
    threads (see :func:`_write_gzipped_chunks`). Between blocks a pending Ctrl-C is raised (see
    ``_signals``).
    """
    compression = compression if array.size > 1 and compression else None
    if array.size == 0:
        group.create_dataset(key, shape=array.shape, dtype=array.dtype)
        return
    backend = devices.backend_of(array)
    assert backend is not None  # write_entry checked is_array
    host = backend.is_host
    # Compressed, each block is one HDF5 chunk (no chunk is rewritten), the same whatever the
    # array's device and layout and the staging settings: the file does not depend on them.
    block_bytes = GZIP_CHUNK_BYTES if compression else _block_bytes(host)
    if host and array.nbytes <= block_bytes:  # one block: the whole array, one HDF5 chunk
        data = array if array.flags.c_contiguous else array.copy(order='C')  # at most a block
        if data.dtype.kind in PLAIN_KINDS:
            _create_plain_dataset(group, key, data, compression)
        else:
            group.create_dataset(key, data=data, compression=compression,
                                 chunks=array.shape if compression else None)
        shown.update(array.nbytes)
        return
    blocks = list(transfer.hyperslabs(array.shape, array.dtype.itemsize, block_bytes))
    chunk_shape = None
    if compression:
        index = blocks[0][0]
        chunk_shape = (1,) * (len(index) - 1) + transfer.block_shape(array.shape, index)
    dataset = group.create_dataset(key, shape=array.shape, dtype=array.dtype,
                                   compression=compression, chunks=chunk_shape)
    if compression and chunk_shape and array.dtype.kind in PLAIN_KINDS:
        _write_gzipped_chunks(dataset, array, blocks, chunk_shape, compression, shown)
        return
    with contextlib.closing(transfer.host_chunks(array, blocks=blocks)) as chunks:
        for (index, _, _), chunk in zip(blocks, chunks, strict=True):
            _signals.check()
            block = numpy.frombuffer(chunk, array.dtype).reshape(
                transfer.block_shape(array.shape, index))
            dataset.write_direct(block, dest_sel=index if index else None)
            shown.update(block.nbytes)


PLAIN_KINDS = frozenset('biufc')  # numbers and bools: h5py stores their arrays as they are


def _write_gzipped_chunks(dataset: h5py.Dataset, array, blocks: list, chunk_shape: tuple,
                          level: int, shown: _progress.Progress) -> None:
    """Writes ``array`` into ``dataset``, one HDF5 chunk a block, each gzipped as libhdf5's
    filter gzips it (zlib at ``level``, an edge chunk padded with zeros, the fill value) on the
    worker threads, and written in order as it is (``write_direct_chunk``): at most
    :func:`workers.count` ``+ 1`` chunks in flight."""
    chunk_bytes = math.prod(chunk_shape) * array.dtype.itemsize
    in_flight: collections.deque[tuple[tuple, int, Future | bytes]] = collections.deque()

    def write_until(count: int) -> None:
        while len(in_flight) > count:
            offsets, size, done = in_flight[0]
            data = done.result() if isinstance(done, Future) else done
            in_flight.popleft()  # after its result: a Ctrl-C meanwhile leaves it to wait for
            with _PHIL:
                dataset.id.write_direct_chunk(offsets, data)
            shown.update(size)

    try:
        with contextlib.closing(transfer.host_chunks(array, blocks=blocks)) as chunks:
            for (index, _, _), chunk in zip(blocks, chunks, strict=True):
                _signals.check()
                data = bytes(chunk).ljust(chunk_bytes, b'\0')  # a copy: its memory is reused
                write_until(workers.count())
                future = workers.submit(zlib.compress, data, level)
                offsets = tuple(i if isinstance(i, int) else i.start for i in index)
                in_flight.append((offsets + (0,) * (array.ndim - len(offsets)), len(chunk),
                                  zlib.compress(data, level) if future is None else future))
            write_until(0)
    finally:
        for _, _, done in in_flight:  # on failure: no thread left working for nothing
            if isinstance(done, Future):
                done.cancel()


def _read_direct_chunk(dataset: h5py.h5d.DatasetID, offsets: tuple) -> tuple[int, bytes]:
    """``dataset.read_direct_chunk(offsets)`` under h5py's lock (see :data:`_PHIL`)."""
    with _PHIL:
        return dataset.read_direct_chunk(offsets)


def _create_plain_dataset(group: h5py.Group, key: str, data: numpy.ndarray,
                          compression: int | None) -> None:
    """``group.create_dataset(key, data=data, compression=..., chunks=data.shape or None)``
    for a C-contiguous host array of numbers, made with the same HDF5 calls h5py makes (the
    same file), without h5py's high-level objects: thousands of datasets cost less."""
    name = key.encode('utf-8')  # as h5py encodes a name, and finds its group
    if b'/' in name.lstrip(b'/'):
        parent, name = name.rsplit(b'/', 1)
        group = group.require_group(parent)
    properties = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if compression:
        properties.set_chunk(data.shape)
        if H5PY_FILLS_CHUNKS_AT_ALLOCATION:
            properties.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
        properties.set_deflate(compression)
    properties.set_obj_track_times(False)
    dataset = h5py.h5d.create(group.id, name, h5py.h5t.py_create(data.dtype, logical=True),
                              h5py.h5s.create_simple(data.shape), dcpl=properties)
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, data)


def _block_bytes(host: bool) -> int:
    """The most one HDF5 read or write moves: a staging chunk (host arrays: at least
    :data:`MIN_HOST_BLOCK_BYTES`, as they need no staging buffer)."""
    chunk_bytes = transfer.settings().chunk_bytes
    return max(chunk_bytes, MIN_HOST_BLOCK_BYTES) if host else chunk_bytes


def _converts(stored: numpy.dtype, target: numpy.dtype) -> bool:
    """Whether libhdf5 converts values of ``stored`` into ``target`` as it reads: not a real
    number into a complex one (h5py's complex type is a compound of two floats, which libhdf5
    makes only from another such compound), which the engine casts instead."""
    return target.kind != 'c' or stored.kind == 'c'


def _read_blocks(dataset: h5py.h5d.DatasetID, shape: tuple, itemsize: int, host: bool) -> list:
    """Hyperslabs of at most a block, whole bands of the dataset's HDF5 chunks where they fit,
    so that no HDF5 chunk is read (and decompressed) twice."""
    chunk_bytes = _block_bytes(host)
    if itemsize * math.prod(shape) <= chunk_bytes:
        return list(transfer.hyperslabs(shape, itemsize, chunk_bytes))
    chunks = _chunks(dataset)
    bands = chunks and chunk_bands(shape, chunks, itemsize, chunk_bytes)
    return bands or list(transfer.hyperslabs(shape, itemsize, chunk_bytes))


class _GroupReader(loading.Reader):
    """Datasets of an HDF5 group, by path."""

    def __init__(self, group: h5py.Group, name: str):
        self.group = group
        self.name = name
        self._entries: dict[str, loading.Entry | None] = {}

    def keys(self) -> list[str]:
        keys: list[str] = []
        try:
            self.group.visititems(lambda name, node: keys.append(name)
                                  if isinstance(node, h5py.Dataset) else None)
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            raise read_error(repr(self.name), error) from None
        return keys

    def stored_key(self, key: str) -> str:
        return plain_key(key)  # libhdf5 reads 'a//b' and 'a/./b' as 'a/b', './a' as 'a'

    def entry(self, key: str) -> loading.Entry | None:
        if key not in self._entries:
            self._entries[key] = self._lookup(key)
        return self._entries[key]

    def _lookup(self, key: str) -> loading.Entry | None:
        """The dataset at ``key``, through libhdf5's own calls (h5py's objects cost more than
        a small dataset's read)."""
        where = self.where(key)
        try:
            found = h5py.h5o.open(self.group.id, key.encode('utf-8'))
        except KeyError as error:  # no such path, a dangling link, a path through a dataset
            if not error.args or _failed_read(str(error.args[0])) is None:
                return None
            raise read_error(where, error) from None  # a read of the group's metadata failed
        except (OSError, ValueError, RuntimeError) as error:
            raise read_error(where, error) from None
        if not isinstance(found, h5py.h5d.DatasetID):
            kind = 'group' if isinstance(found, h5py.h5g.GroupID) else 'datatype'
            raise MismatchError(f'{where}: is an HDF5 {kind}, not a dataset')
        try:  # a corrupt file's datatype or dataspace fails to decode here
            shape, dtype = found.shape, found.dtype
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:
            raise read_error(where, error) from None
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
        stored = self._guard(entry, entry.token.get_storage_size)
        claimed = entry.nbytes
        if claimed <= max(stored, 1) * MAX_FILTER_RATIO:
            return
        if _chunks(entry.token) is not None and claimed <= FREE_ALLOCATION_BYTES:
            return  # unwritten chunks: the fill value
        raise CorruptFileError(f'{self.where(entry.key)}: the dataset claims {claimed} bytes '
                               f'(dtype {entry.dtype}, shape {entry.shape}) but stores only '
                               f'{stored}; a new array of that size is not made for it (load it '
                               f'into an existing array)')

    def read_scalar(self, entry: loading.Entry) -> numpy.ndarray:
        string = h5py.check_string_dtype(entry.dtype)
        if string is not None and (string.encoding, string.length is None) != ('ascii', False):
            # text; fixed-length ASCII strings are bytes (what numpy.bytes_ are saved as)
            dataset = h5py.Dataset(entry.token)
            return numpy.asarray(self._guard(entry, lambda: dataset.asstr()[()]))
        assert entry.shape is not None and entry.dtype is not None  # not a stored None
        stored = numpy.empty(entry.shape, entry.dtype)
        self._guard(entry, lambda: entry.token.read(h5py.h5s.ALL, h5py.h5s.ALL, stored))
        return stored

    def read_into(self, entry: loading.Entry, dst) -> None:
        dataset = entry.token
        if dst.size == 0:
            return
        if entry.dtype is not None and entry.dtype.hasobject:  # text, into a NumPy str array
            dst[...] = loading.read_text(self, entry)
            self.progress.update(entry.nbytes)  # as the load's total counts it
            return
        backend = devices.backend_of(dst)
        assert backend is not None  # an array of some backend
        # what h5py reads into: the target's dtype (h5py converts), or the stored encoding
        # whose bits the target holds (see devices.holds_bits_of)
        assert entry.dtype is not None  # not a stored None
        read_as = (entry.dtype if devices.holds_bits_of(dst.dtype, entry.dtype)
                   or not _converts(entry.dtype, dst.dtype) else dst.dtype)
        if read_as == entry.dtype and dst.nbytes >= INFLATE_MIN_BYTES:
            chunks = self._inflatable_chunks(entry)
            bands = chunks and chunk_bands(dst.shape, chunks[0], read_as.itemsize,
                                           _block_bytes(backend.is_host))
            if chunks and bands:
                self._read_inflating(entry, dst, *chunks, bands)
                return
        host = backend.is_host and dst.flags.c_contiguous and _converts(entry.dtype, dst.dtype)
        blocks = _read_blocks(dataset, dst.shape, dst.dtype.itemsize, host)
        if host and len(blocks) == 1:  # the whole dataset in one read, as h5py's read_direct
            self._guard(entry, lambda: dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, dst))
            self.progress.update(dst.nbytes)
            return
        dataset = h5py.Dataset(dataset)  # selections of blocks: h5py's
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
            block = numpy.frombuffer(buffer, read_as).reshape(
                transfer.block_shape(dst.shape, index))
            if index:
                self._guard(entry, lambda: dataset.read_direct(block, source_sel=index))
            else:
                block[...] = self._guard(entry, lambda: dataset[()])
            self.progress.update(block.nbytes)

        transfer.fill(dst, read_into, read_as, blocks=blocks)

    def _inflatable_chunks(self, entry: loading.Entry) -> tuple[tuple, numpy.ndarray] | None:
        """The dataset's chunk shape, and where each chunk is stored (its file offset, size
        and filter mask, a row a chunk in C order of their grid), when gpuserial may inflate
        its chunks itself: gzip is its only filter (as Chainer's and gpuserial's saves make
        it), it stores numbers as the target's memory holds them, every chunk is written, and
        none is larger than :data:`MAX_INFLATE_CHUNK_BYTES`; else None (libhdf5's filter reads
        it)."""
        assert entry.shape is not None and entry.dtype is not None  # not a stored None
        if entry.dtype.kind not in PLAIN_KINDS:
            return None
        dataset, dtype, shape = entry.token, entry.dtype, entry.shape

        def chunks() -> tuple[tuple, numpy.ndarray] | None:
            plist = dataset.get_create_plist()
            if (plist.get_layout() != h5py.h5d.CHUNKED or plist.get_nfilters() != 1
                    or plist.get_filter(0)[0] != h5py.h5z.FILTER_DEFLATE
                    or not dataset.get_type().equal(h5py.h5t.py_create(dtype))):
                return None
            size = plist.get_chunk()
            nbytes = dtype.itemsize * math.prod(size)
            if nbytes > MAX_INFLATE_CHUNK_BYTES:
                return None
            counts = [-(-extent // step) for extent, step in zip(shape, size, strict=True)]
            grid = math.prod(counts)
            if dataset.get_num_chunks() < grid or not CAN_LIST_CHUNKS:
                return None  # unwritten ones (or an h5py that cannot tell which are written)
            strides = [math.prod(counts[axis + 1:]) for axis in range(len(counts))]
            table = numpy.full((grid, 3), -1, numpy.int64)  # offset, size, mask: a chunk's
            inside = 0  # chunks may lie past the extent (libhdf5 writes one at an offset equal
            #             to it), so a full count may still miss some inside: count those
            unfiltered_edge = False  # a partial edge chunk of its full size, its filter mask
            # clear: libhdf5 does not inflate those where the dataset says so (H5Pset_chunk_opts'
            # H5D_CHUNK_DONT_FILTER_PARTIAL_CHUNKS, which h5py does not show)

            def count(chunk) -> None:
                nonlocal inside, unfiltered_edge
                spans = list(zip(chunk.chunk_offset, size, shape, strict=True))
                if all(offset < extent for offset, _, extent in spans):
                    inside += 1
                    table[sum(offset // step * stride for (offset, step, _), stride
                              in zip(spans, strides, strict=True))] = (
                        chunk.byte_offset, chunk.size, chunk.filter_mask)
                    if (chunk.size == nbytes and not chunk.filter_mask & 1
                            and any(offset + step > extent for offset, step, extent in spans)):
                        unfiltered_edge = True

            dataset.chunk_iter(count)
            return (size, table) if inside == grid and not unfiltered_edge else None

        return self._guard(entry, chunks)

    def _read_inflating(self, entry: loading.Entry, dst, size: tuple, table: numpy.ndarray,
                        bands: list) -> None:
        """Fills ``dst`` from the dataset's gzipped chunks (of shape ``size``, stored where
        ``table`` says), read and inflated on the worker threads (:meth:`_inflated_chunks`),
        block by block (``bands``, from :func:`chunk_bands`)."""
        assert entry.shape is not None and entry.dtype is not None  # not a stored None
        shape, dtype = entry.shape, entry.dtype
        with contextlib.closing(self._inflated_chunks(entry, size, table)) as chunks:

            def read_into(buffer: memoryview) -> None:
                index, _, _ = next(position)
                axis, rows = len(index) - 1, index[-1]  # the block: rows of this axis
                block = numpy.frombuffer(buffer, dtype).reshape(
                    transfer.block_shape(shape, index))
                count = -(-(rows.stop - rows.start) // size[axis]) * math.prod(
                    -(-extent // step) for extent, step in zip(shape[axis + 1:],
                                                              size[axis + 1:], strict=True))
                ends = (rows.stop, *shape[axis + 1:])  # of the block, in the dataset
                starts = (rows.start, *[0] * len(ends[1:]))
                for offsets, chunk in itertools.islice(chunks, count):
                    into = tuple(slice(o - start, min(o + step, end) - start)
                                 for o, step, start, end
                                 in zip(offsets[axis:], size[axis:], starts, ends, strict=True))
                    block[into] = chunk.reshape(size[axis:])[
                        tuple(slice(0, i.stop - i.start) for i in into)]
                self.progress.update(block.nbytes)

            position = iter(bands)
            transfer.fill(dst, read_into, dtype, blocks=bands)

    def _inflated_chunks(self, entry: loading.Entry, size: tuple, table: numpy.ndarray
                         ) -> Generator[tuple[tuple, numpy.ndarray], None, None]:
        """The dataset's chunks (of shape ``size``) in C order of their grid, as ``(offsets,
        values)``: read and inflated on the worker threads, at most :func:`workers.count`
        ``+ 1`` ahead of the caller. A file libhdf5 reads from a descriptor, opened read-only,
        is read there at the offsets of ``table`` (libhdf5 looks each chunk up again, on the
        caller's thread); else libhdf5 reads each chunk as it is stored, here."""
        assert entry.shape is not None and entry.dtype is not None  # not a stored None
        dataset, dtype = entry.token, entry.dtype
        nbytes = dtype.itemsize * math.prod(size)
        fd = self._descriptor(entry, table)
        in_flight: collections.deque[tuple[tuple, Future | functools.partial]] = (
            collections.deque())

        def first() -> tuple[tuple, numpy.ndarray]:
            offsets, job = in_flight[0]
            try:
                data = job.result() if isinstance(job, Future) else job()
            except (ValueError, *DEFLATE_ERRORS) as error:
                raise CorruptFileError(f'{self.where(entry.key)}: the HDF5 chunk at '
                                       f'{offsets}: {error}') from None
            except OSError as error:  # the read failed: the file may be whole
                failure = ReadFailedError(f'{self.where(entry.key)}: reading failed: the '
                                          f'HDF5 chunk at {offsets}: {error}')
                failure.errno = error.errno
                raise failure from None
            in_flight.popleft()
            return offsets, numpy.frombuffer(data, dtype).reshape(size)

        try:
            for index, offsets in enumerate(itertools.product(*(
                    range(0, extent, step)
                    for extent, step in zip(entry.shape, size, strict=True)))):
                _signals.check()
                if fd is None:
                    mask, data = self._guard(entry, functools.partial(
                        _read_direct_chunk, dataset, offsets))
                    work = functools.partial(inflate_chunk, data, mask, nbytes)
                else:
                    at, stored, mask = table[index].tolist()
                    work = functools.partial(read_chunk, fd, at, stored, mask, nbytes)
                in_flight.append((offsets, workers.submit(work) or work))
                if len(in_flight) > workers.count():
                    yield first()
            while in_flight:
                yield first()
        finally:
            for _, job in in_flight:  # on failure: no thread left working for nothing
                if isinstance(job, Future):
                    job.cancel()

    def _descriptor(self, entry: loading.Entry, table: numpy.ndarray) -> int | None:
        """The file descriptor libhdf5 reads the file from, where the file is open read-only
        (no chunk of it waits in libhdf5's memory) and ``table``'s first chunk is where its
        offset says (libhdf5 lays out files so; this checks it); else None."""
        file = self.group.file
        if file.driver != 'sec2' or file.mode != 'r' or not hasattr(os, 'pread'):
            return None
        fd = file.id.get_vfd_handle()
        at, stored, _ = table[0].tolist()
        _, data = self._guard(entry, functools.partial(_read_direct_chunk, entry.token,
                                                       (0,) * len(entry.token.shape)))
        try:
            return fd if isinstance(fd, int) and os.pread(fd, stored, at) == data else None
        except OSError:
            return None  # libhdf5 reads it (and says why it cannot)

    def stored_size(self, entry: loading.Entry) -> tuple[int, bool]:
        storage = self._guard(entry, entry.token.get_storage_size)
        return storage, entry.token.get_create_plist().get_nfilters() > 0

    def read_box(self, entry: loading.Entry, box: list[tuple[int, int, int]]) -> numpy.ndarray:
        if any(stop <= start for start, stop, _ in box):
            return numpy.empty([len(range(*b)) for b in box], entry.dtype)
        dataset = h5py.Dataset(entry.token)
        selection = tuple(slice(*b) for b in box)
        string = h5py.check_string_dtype(entry.dtype)
        if string is not None and (string.encoding, string.length is None) != ('ascii', False):
            # text as read_scalar gives it (str, not bytes objects; a 0-d array, not bytes)
            return numpy.asarray(self._guard(entry, lambda: dataset.asstr()[selection]), str)
        # an array: a scalar reads as a NumPy scalar, and numpy.bytes_ takes no tuple index
        values = numpy.asarray(self._guard(entry, lambda: dataset[selection]))
        self.progress.update(values.nbytes)
        return values

    def _guard(self, entry: loading.Entry, read):
        try:
            return read()
        except (OSError, TypeError, ValueError, RuntimeError) as error:  # h5py's, on bad files
            raise read_error(self.where(entry.key), error) from None


def read_error(where: str, error: BaseException, what: str = '', size: int | None = None
               ) -> GpuserialError:
    """An error of h5py's as gpuserial's, naming the file (and key). One with an errno (see
    :func:`_failed_read`) came from the OS or the file object (the read failed; the file may
    be whole), and keeps it; HDF5's own complaints about a file's contents have none, and say
    it is corrupt (``what`` first)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    failed = _failed_read(text)
    if failed is not None:  # libhdf5's file driver: its words, less the time and pointer
        code, words, offset = failed
        doing = re.sub(r'^\[Errno \d+\] ', '', text.split(' (file read failed', 1)[0])
        text = f'[Errno {code}] {words} (libhdf5: {doing}, at offset {offset})'
    elif isinstance(error, OSError) and error.errno is not None:
        code = error.errno
    else:
        why = 'the file is empty (0 bytes)' if size == 0 else text
        return CorruptFileError(f'{where}: {what}{why}')
    failure = ReadFailedError(f'{where}: reading failed: {text}')
    failure.errno = code
    return failure


# What libhdf5's file drivers say when a read of the file fails (sec2, the default for paths),
# inside h5py's message for what it was doing: "... (file read failed: time = Mon Dec  7
# 07:17:12 2026\n, filename = 'm.h5', file descriptor = 3, errno = 5, error message =
# 'Input/output error', buf = 0x55f0977f2c40, total read size = 328, ..., offset = 1072)"
_FAILED_READ = re.compile(r"\(file read failed: time = [^,]*, filename = '.*?', file "
                          r"descriptor = -?\d+, errno = (\d+), error message = '(.*?)',"
                          r".*?offset = (\d+)\)", re.DOTALL)


def _failed_read(text: str) -> tuple[int, str, int] | None:
    """The errno, its words and the offset of the failed read that libhdf5's file driver wrote
    into an h5py error's text, which h5py raises as what it was doing when the read failed (a
    ``KeyError`` while opening an object, an ``OSError`` without errno); else None."""
    found = _FAILED_READ.search(text)
    return None if found is None else (int(found[1]), found[2], int(found[3]))


def chunk_bands(shape: tuple, chunks: tuple, itemsize: int, block_bytes: int
                ) -> list[tuple[tuple, int, int]] | None:
    """Hyperslabs of an array of ``shape`` stored in HDF5 chunks of ``chunks``, as
    :func:`transfer.hyperslabs` makes them, each at most ``block_bytes`` and whole bands of
    chunks: along the first axis whose band (one chunk deep, whole in the axes after it) fits,
    where the chunks are one deep in every axis before it; else None."""
    for axis, step in enumerate(chunks):
        row_size = math.prod(shape[axis + 1:])
        band = step * row_size * itemsize
        if band <= block_bytes:
            break
        if step != 1:
            return None
    else:
        return None
    rows = block_bytes // band * chunks[axis]
    blocks = []
    for lead in itertools.product(*map(range, shape[:axis])):
        base = sum(i * math.prod(shape[j + 1:]) for j, i in enumerate(lead))
        for start in range(0, shape[axis], rows):
            stop = min(start + rows, shape[axis])
            blocks.append(((*lead, slice(start, stop)), base + start * row_size,
                           base + stop * row_size))
    return blocks


def read_chunk(fd: int, offset: int, stored: int, filter_mask: int, nbytes: int) -> bytes:
    """An HDF5 chunk of ``nbytes``, read from ``stored`` bytes at ``offset`` of file ``fd``
    and inflated (:func:`inflate_chunk`).

    Raises:
        ValueError: the file ends first, or the chunk is corrupt (as :func:`inflate_chunk`).
        OSError: the read failed.
    """
    data = os.pread(fd, stored, offset)
    while len(data) < stored:  # a short read: the rest
        more = os.pread(fd, stored - len(data), offset + len(data))
        if not more:
            raise ValueError(f'the file ends {stored - len(data)} bytes into the chunk\'s '
                             f'{stored} stored bytes')
        data += more
    return inflate_chunk(data, filter_mask, nbytes)


def inflate_chunk(data: bytes, filter_mask: int, nbytes: int) -> bytes:
    """An HDF5 chunk of ``nbytes`` from the bytes its dataset stores: inflated (a zlib stream,
    its Adler-32 checked), unless its filter mask says the filter was skipped.

    Raises:
        ValueError: the stream does not end, or the chunk is not ``nbytes`` long.
        zlib.error: (or ISA-L's error) corrupt data.
    """
    if not filter_mask & 1:
        inflater = deflate_module.decompressobj()
        data = inflater.decompress(data, nbytes + 1)  # a longer chunk shows, memory stays bound
        if not inflater.eof and len(data) <= nbytes:
            raise ValueError('its gzip stream ends early (a truncated chunk)')
    if len(data) > nbytes:
        raise ValueError(f'it holds more than the {nbytes} bytes of its chunk shape')
    if len(data) < nbytes:
        raise ValueError(f'it holds {len(data)} bytes where its chunk shape holds {nbytes}')
    return data


def _chunks(dataset: h5py.h5d.DatasetID) -> tuple | None:
    """The dataset's chunk shape, or None when it is not chunked."""
    plist = dataset.get_create_plist()
    return plist.get_chunk() if plist.get_layout() == h5py.h5d.CHUNKED else None


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
    once and fills its arrays in place after that has returned (see
    :mod:`gpuserial.formats.loading`).
    """

    reader: _GroupReader

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


def save_hdf5(filename, obj, compression: int | str | None = GZIP_DEFAULT, *,
              durable: bool = True, progress: bool | None = None, sync: bool = False,
              storage_options: dict | None = None) -> None:
    """Saves an object to a file in HDF5 format.

    Args:
        filename: a path (str or os.PathLike), a URL (``s3://bucket/key``, ...; an fsspec
            ``OpenFile`` too) or a binary file object to write into.
        obj: a serializable object, or a dict of arrays (nested dicts become groups).
        compression: the gzip level (0 to 9; 0 is none) for entries of more than one element,
            or as h5py takes it: ``'gzip'`` or True for level 4, None or False for none.
        durable: for a path, fsync the file and its directory so the save survives a machine
            crash; ``False`` still replaces the file atomically but skips the fsyncs.
        progress: a progress bar on stderr: None (the default) for one on a terminal when the
            save is large, True or False to decide.
        sync: first wait for all work on the devices of the arrays, on every stream. Without
            it, the copies wait only for the work queued on the calling thread's current
            stream of each device (what wrote the arrays, as a rule).
        storage_options: for a URL, the options of its fsspec filesystem.

    A save to a path goes to a temporary file beside it that replaces the target only once
    complete: a failed save leaves the old file as it was. HDF5 needs to seek, so a save to a
    URL writes a local spool file first (in ``$GPUSERIAL_SPOOL_DIR``, else the temporary
    directory: disk use is the file's size) and then streams it to the object, which appears
    only once complete.
    """
    serializer, plan = collect(filename, obj, compression, progress=progress)
    location = remote.location_of(filename, storage_options)
    wait_for_save(filename)
    if sync:
        devices.synchronize_devices_of(value for *_, value in plan.entries)
    write_planned(filename if location is None else location, serializer, plan,
                  durable=durable)


def collect(filename, obj, compression: int | str | None, *, progress: bool | None = None
            ) -> tuple[HDF5Serializer, _Plan]:
    """What a save of ``obj`` to ``filename`` stores: ``serialize`` called once, nothing
    written yet; the serializer writes the plan (:func:`write_planned`)."""
    serializer = HDF5Serializer(_Planned(), compression, progress=progress,
                                name=display_name(filename))
    return serializer, serializer.collect(obj)


def write_planned(filename, serializer: HDF5Serializer, plan: _Plan, *, durable: bool,
                  entries: Iterable[tuple] | None = None,
                  storage_options: dict | None = None) -> None:
    """Writes ``plan`` to ``filename`` (a path: atomically; a :class:`remote.Location`: through
    a spool file, committed last; or a binary file object), taking its entries from
    ``entries`` when given (the same entries, staged elsewhere)."""
    location = (filename if isinstance(filename, remote.Location)
                else remote.location_of(filename, storage_options))
    if location is not None:
        with remote.spool_path('.h5') as spool:
            write_planned(spool, serializer, plan, durable=False, entries=entries)
            remote.upload_file(spool, location)  # Ctrl-C aborts the upload
        return
    if not is_path(filename):
        check_file_object(filename, writing=True)
        with _signals.deferred():
            _write_guarded(filename, serializer, plan, entries)
        return
    with atomic_path(filename, durable=durable, size_hint=_file_bytes(plan)) as temp, \
            _signals.deferred():
        if _roomy(os.path.dirname(temp) or '.', plan):  # libhdf5 writes the file itself
            open(temp, 'xb').close()  # Python's own error if it cannot be made
            os.unlink(temp)  # for libhdf5 to create: truncating a file makes ext4 flush on close
            with h5py.File(temp, 'x') as f:
                serializer.write(plan, f, entries)
        else:  # near a full disk: every write through Python, where a failure can be kept
            with open(temp, 'x+b', buffering=0) as out:
                _write_guarded(out, serializer, plan, entries)


def _file_bytes(plan: _Plan) -> int:
    """The bytes of the file ``plan`` makes, at a guess (without compression)."""
    return plan.nbytes + len(plan.entries) * HDF5_ENTRY_BYTES + HDF5_FILE_BYTES


def _roomy(directory: str, plan: _Plan) -> bool:
    """Whether the disk has room to spare for the file: libhdf5 crashes the process when a write
    fails as it closes a file (HDF5 2.0), so a save that might fill the disk writes through
    :class:`_KeptErrorFile` instead, more slowly (about 1.5 times for many small entries)."""
    if resource is None:  # pragma: no cover - not on Windows
        return False
    needed = _file_bytes(plan)
    try:
        info = os.statvfs(directory)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]  # a process's own file size limit
    except (OSError, AttributeError, NameError):
        return False
    if limit != resource.RLIM_INFINITY and limit < 2 * needed:
        return False
    return info.f_bavail * info.f_frsize >= 2 * needed + HDF5_SPARE_BYTES


def _write_guarded(out, serializer: HDF5Serializer, plan: _Plan,
                   entries: Iterable[tuple] | None = None) -> None:
    """Writes ``plan`` as HDF5 into the binary file ``out``; raises the first write error."""
    guarded = _KeptErrorFile(out)
    try:
        with h5py.File(guarded, 'w') as f:
            serializer.write(plan, f, entries)
    except BaseException:
        if guarded.error is None:
            raise
        raise guarded.error from None  # the cause of whatever h5py made of the dropped writes
    if guarded.error is not None:
        raise guarded.error


class _KeptErrorFile(io.RawIOBase):
    """The file h5py writes through: a write error is kept for the caller, not passed to HDF5.

    h5py (3.16, HDF5 2.0) crashes the process when a write fails (a full disk, or a file
    object's own error of any type), at the latest when the objects of the failed file are
    freed. Through this file HDF5 never sees a failed write, truncate or flush: after the first
    error, writes are dropped, and the save raises that error once h5py is done. (Unbuffered
    files fail only there; a buffered one may also fail in ``seek``, flushing its buffer, and
    that error still reaches HDF5.)
    """

    def __init__(self, raw):
        self.raw = raw
        self.error: Exception | None = None

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
            except Exception as error:  # not only OSError: a file object may raise anything
                self.error = error


def open_hdf5(filename, storage_options: dict | None = None) -> h5py.File:
    """Opens an HDF5 file for reading, with clear errors.

    A URL (with ``storage_options``) is first copied whole into a local spool file (in
    ``$GPUSERIAL_SPOOL_DIR``, else the temporary directory), whose name is removed once h5py
    has it open: its disk space returns when the file is closed, or when the process ends.
    """
    name = display_name(filename)
    size = None
    wait_for_save(filename)
    location = remote.location_of(filename, storage_options)
    if location is not None:
        with remote.spool_path('.h5') as spool:
            remote.download_file(location, spool)
            size = os.path.getsize(spool)
            try:
                return h5py.File(spool, 'r', rdcc_nbytes=0)
            except (OSError, ValueError) as error:
                raise read_error(repr(name), error, 'not an HDF5 file: ', size) from None
    if is_path(filename):
        try:  # Python's own errors for a missing, unreadable or directory path
            with open(filename, 'rb') as f:
                size = f.seek(0, os.SEEK_END)
        except FileNotFoundError:
            raise FileNotFoundError(f'{name!r}: no such file{tilde_hint(filename)}') from None
        except IsADirectoryError:
            raise IsADirectoryError(f'{name!r}: is a directory, not an HDF5 file'
                                    f'{sharded_hint(filename)}') from None
    else:
        check_file_object(filename, writing=False)
    try:  # no chunk cache: reads take whole chunks, each once, and an open dataset's cache
        #   stayed allocated (a gzip load of 1 GiB held 109 MiB, one of 8 datasets 81 MiB)
        return h5py.File(filename, 'r', rdcc_nbytes=0)
    except (OSError, ValueError) as error:
        head = _head(filename)
        if head in (b'PK\x03\x04', b'PK\x05\x06'):  # a zip: the other format, most likely
            raise CorruptFileError(f'{name!r}: not an HDF5 file: it starts with {head!r}, as an '
                                   f'NPZ (zip) file does: load it with load_npz (or '
                                   f'gpuserial.load, which tells the format by content)'
                                   ) from None
        raise read_error(repr(name), error, 'not an HDF5 file: ', size) from None


def _head(filename) -> bytes:
    """The first 4 bytes of the file at a path (b'' for a file object, or where they cannot be
    read: the error h5py gave then stands)."""
    if not is_path(filename):
        return b''
    try:
        with open(filename, 'rb') as f:
            return f.read(4)
    except OSError:
        return b''


def load_hdf5(filename, obj, *, path: str = '', strict: bool = True, ignore_names=None,
              device=None, progress: bool | None = None,
              storage_options: dict | None = None) -> None:
    """Loads an object from a file in HDF5 format.

    ``obj.serialize`` is called once. Each key, shape, cast and dataset size is checked as it is
    asked for, and arrays are filled in place only once ``serialize`` has returned, so a load
    that fails on a missing key, a mismatch or a malformed dataset fills no array. Values handed
    to ``serialize`` before the failure (scalars, strings, new arrays for ``None`` targets) may
    have been kept by it; a dict keeps none of them. A read error found while the data streams
    in stops the load: the error lists the arrays already filled (``error.filled``) and the
    one being filled, which may hold part of the bad data (``error.partly_filled``).

    Args:
        filename: a path (str or os.PathLike), a URL (copied whole into a local spool file
            first: see :func:`open_hdf5`) or a binary file object to read from.
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
        storage_options: keyword-only; for a URL, the options of its fsspec filesystem.

    Raises:
        FileNotFoundError: no such file.
        TypeError: ``device=`` for an object that cannot be moved (see ``device``).
        gpuserial.errors.KeyNotFoundError: a key is missing (also a ``KeyError``).
        gpuserial.errors.MismatchError: a shape or dtype does not fit (also a ``ValueError``).
        gpuserial.errors.CorruptFileError: the file is not valid HDF5 (also a ``ValueError``).
        gpuserial.errors.ReadFailedError: reading the file failed (also an ``OSError``).
        gpuserial.errors.UnsafeCastError: a scalar does not cast safely (also a ``TypeError``).
    """
    with open_hdf5(filename, storage_options) as f, _signals.deferred():
        reader = _GroupReader(f, display_name(filename))
        HDF5Deserializer(reader, strict, path=path, ignore_names=ignore_names, device=device,
                         progress=progress).load(obj)
