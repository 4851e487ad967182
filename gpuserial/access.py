"""Whole files and lazy reads: ``save``, ``load``, ``load_into`` and ``open``.

The calls people know from ``numpy.load``, ``torch.load(map_location=)``,
``safetensors.load_file(device=)`` and ``safe_open(...).get_slice(...)``, over gpuserial's NPZ
and HDF5 files and through the same engine as the Chainer calls: pinned staging, bounded memory,
atomic saves, every CRC checked on whole reads, nothing unpickled.

Arrays come back as NumPy, CuPy, torch or JAX arrays: ``device=`` names where (``'cpu'``,
``'cuda:1'``, a ``torch.device``, a JAX device) and ``like=`` which library (by default the one
the device object belongs to, else NumPy on the CPU and CuPy on a GPU). Dtypes NumPy lacks
(bfloat16, float8) are stored as a one-field structured dtype named for the type
(``[('bfloat16', '<u2')]``): ``numpy.load`` reads the raw bits, and these calls give the type
back (as ml_dtypes' type for NumPy, when ml_dtypes is installed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
from collections.abc import Iterable, Iterator, Mapping

import numpy

from gpuserial.engine import devices
from gpuserial.errors import DeviceError, KeyNotFoundError
from gpuserial.formats import hdf5, loading, npz
from gpuserial.formats.loading import LoadReport
from gpuserial.storage import remote
from gpuserial.storage._fileio import display_name, is_path
from gpuserial.tools import inspection

__all__ = ['EntryMetadata', 'LazyFile', 'LazySlice', 'LoadReport', 'load', 'load_into', 'open',
           'save']

logger = logging.getLogger('gpuserial')
LIBRARIES = ('numpy', 'cupy', 'torch', 'jax')


def save(file, mapping: Mapping, *, format: str | None = None, compression: bool | int = False,
         durable: bool = True, progress: bool | None = None, sync: bool = False,
         storage_options: dict | None = None) -> None:
    """Saves a flat or nested mapping of arrays (NumPy, CuPy, torch, JAX), scalars and strings.

    Args:
        file: a path (str or os.PathLike), a URL (``s3://bucket/key``, ``memory://x``, ...;
            an fsspec ``OpenFile`` too) or a binary file object.
        mapping: the entries; nested mappings flatten to ``a/b`` keys.
        format: ``'npz'`` or ``'hdf5'`` (default: from the file's extension).
        compression: NPZ: deflate when true; HDF5: the gzip level (``True`` is 4). Off by
            default: checkpoints of floats hardly compress.
        durable, progress, sync: as for :func:`gpuserial.save_npz`.
        storage_options: for a URL, the options of its fsspec filesystem.

    Raises:
        TypeError: ``mapping`` is not a mapping.
        ValueError: no format given and none told by the extension.
    """
    if not isinstance(mapping, Mapping):
        hint = ("; save a torch module's state_dict()" if callable(
            getattr(mapping, 'state_dict', None)) else '')
        raise TypeError(f'{display_name(file)!r}: gpuserial.save takes a mapping of arrays, got '
                        f'{type(mapping).__name__}; save serializable objects with save_npz or '
                        f'save_hdf5{hint}')
    format = _format(file, format)
    mapping = _as_dicts(mapping)
    if format == 'npz':
        npz.save_npz(file, mapping, bool(compression), durable=durable, progress=progress,
                     sync=sync, storage_options=storage_options)
    else:
        hdf5.save_hdf5(file, mapping, compression, durable=durable, progress=progress, sync=sync,
                       storage_options=storage_options)


def _as_dicts(mapping: Mapping) -> dict:
    """``mapping`` and the mappings in it as dicts, which the serializers walk (a
    ``MappingProxyType``, flax's ``FrozenDict``); the values are not copied."""
    return {key: _as_dicts(value) if isinstance(value, Mapping) else value
            for key, value in mapping.items()}


def _format(file, format: str | None) -> str:
    named = is_path(file) or remote.is_remote(file)
    if format is None and not named and not isinstance(getattr(file, 'name', None), str):
        raise ValueError(f'{display_name(file)!r}: give format= for a file object without a name')
    return inspection.format_for_path(display_name(file) if named or format is None
                                      else '', format)


def load(file, device=None, keys: Iterable[str] | None = None, *, like=None,
         format: str | None = None, strict: bool = True, progress: bool | None = None,
         storage_options: dict | None = None) -> dict:
    """Every entry of a file, or the listed ones, as new arrays on one device.

    Args:
        file: a path, a URL (NPZ: only the listed keys' bytes are read) or a seekable binary
            file object, NPZ or HDF5 (told by its content).
        device: where the arrays go: ``'cpu'`` (the default), ``'cuda:N'``, a ``torch.device``,
            a JAX device, ... (see :func:`gpuserial.get_device`).
        keys: the full keys to load (default: all of them).
        like: the array library: ``'numpy'``, ``'cupy'``, ``'torch'`` or ``'jax'`` (default: the
            device object's library, else NumPy on the CPU and CuPy on a GPU).
        format: ``'npz'`` or ``'hdf5'``, for a file its content does not tell.
        strict: whether a listed key the file lacks is an error (else it is left out).
        progress: a progress bar on stderr (None: on a terminal for large loads).
        storage_options: for a URL, the options of its fsspec filesystem.

    Returns:
        A dict from full key to array (stored ``None`` entries as None, strings as NumPy
        string arrays), in the file's order or the order of ``keys``.

    Raises:
        gpuserial.errors.KeyNotFoundError: a listed key is missing (with ``strict``).
        TypeError: ``keys`` is one string (its characters would be taken for keys).
    """
    if isinstance(keys, (str, bytes)):
        raise TypeError(f'{display_name(file)!r}: keys= takes a list of keys '
                        f'(keys=[{keys!r}]), not a {type(keys).__name__}')
    place = _Placement.of(device, like)
    with inspection.open_reader(file, format, storage_options) as reader:
        wanted = reader.keys() if keys is None else list(dict.fromkeys(keys))  # once each
        reader.expect_entries(wanted)  # an object in a store fetches their headers ahead
        found, fills = {}, []
        for key in wanted:
            entry = reader.entry(key)
            if entry is None:
                if strict:
                    raise KeyNotFoundError(f'{reader.where(key)}: not in the file')
                continue
            found[key], fill = place.new(reader, entry)
            if fill:
                fills.append((entry, found[key]))
        loading.run_fills(reader, fills, progress)
    return {key: place.convert(value, reader.where(key)) for key, value in found.items()}


def load_into(file, target, *, path: str = '', strict: bool = True, ignore_names=None,
              device=None, format: str | None = None, progress: bool | None = None,
              storage_options: dict | None = None) -> LoadReport:
    """Loads a serializable object or a (nested) mapping in place, as ``load_npz`` and
    ``load_hdf5`` do, and reports what the file and the target did not share.

    Arrays of any library load in place (torch tensors through a view of their memory); JAX
    arrays, which are immutable, are replaced with new ones in a mapping. ``file`` may be a
    URL, with ``storage_options``.

    Returns:
        A :class:`LoadReport`: ``missing_keys`` the target asked for and the file lacks
        (skipped, with ``strict=False``) and ``unexpected_keys`` under ``path`` that the file
        holds and the target never asked for. Both are also logged (logger ``gpuserial``, at
        INFO) when not empty.
    """
    with inspection.open_reader(file, format, storage_options) as reader:
        if isinstance(reader, hdf5._GroupReader):
            deserializer: loading.ReaderDeserializer = hdf5.HDF5Deserializer(
                reader, strict, path=path, ignore_names=ignore_names, device=device,
                progress=progress)
        else:
            deserializer = npz.NpzDeserializer(reader, path, strict, ignore_names,
                                               device=device, progress=progress)
        report = deserializer.load_reporting(target)
    if report.missing_keys or report.unexpected_keys:
        logger.info('loaded %r: %d missing keys %s, %d unexpected keys %s', display_name(file),
                    len(report.missing_keys), report.missing_keys[:8],
                    len(report.unexpected_keys), report.unexpected_keys[:8])
    return report


@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where new arrays go (a device) and which library holds them (None: NumPy or CuPy)."""

    device: devices.Device
    framework: devices.Framework | None

    @classmethod
    def of(cls, device, like) -> _Placement:
        library = like if like is None or isinstance(like, str) else getattr(like, '__name__', like)
        if library is not None and library not in LIBRARIES:
            raise ValueError(f'unknown like={like!r}: expected one of {", ".join(LIBRARIES)}')
        placed = None if device is None else devices.get_device(device)
        if library is None:
            framework = next((f for f in devices.FRAMEWORKS.values() if device is not None
                              and f.device(device) is not None), None)
            return cls(placed or devices.CPU, framework)
        if library == 'cupy' and placed is None:
            placed = devices.get_device('cuda')
        placed = placed or devices.CPU
        if (library == 'numpy') != placed.backend.is_host and library in ('numpy', 'cupy'):
            raise ValueError(f'like={library!r} cannot hold arrays on {placed.name}')
        return cls(placed, devices.FRAMEWORKS.get(library))

    def new(self, reader: loading.Reader, entry: loading.Entry) -> tuple[object, bool]:
        """An array for ``entry`` and whether it waits to be filled, or its whole value."""
        if entry.shape is None or entry.dtype is None:  # a stored None
            return None, False
        if entry.dtype.hasobject:
            return loading.read_text(reader, entry), False
        self._check_holds(entry.dtype, reader.where(entry.key))
        reader.check_size(entry, allocating=True)
        kind = entry.dtype.kind  # NumPy alone holds extension encodings ('V'), text and dates
        on = devices.CPU if kind == 'V' or kind in devices.HOST_ONLY_KINDS else self.device
        dtype = entry.dtype if on.backend.is_host else entry.dtype.newbyteorder('=')
        return on.backend.empty(entry.shape, dtype, on), True

    def convert(self, value, where: str):
        if not devices.is_array(value) or value.dtype.kind in devices.HOST_ONLY_KINDS + 'O':
            return value
        if self.framework is not None:
            try:
                return self.framework.from_engine(value, self.device)
            except TypeError as error:  # a dtype the library lacks (float128, structured)
                raise TypeError(f'{where}: stored dtype {value.dtype} has no {self.framework.name} '
                                f'dtype ({error}); load it with like=\'numpy\'') from None
        if isinstance(value, numpy.ndarray) and not self.device.backend.is_host:
            self._check_holds(value.dtype, where)  # read on the host: an extension dtype, a slice
            return self.device.send(devices.decoded(value))
        return devices.decoded(value)

    def _check_holds(self, dtype: numpy.dtype, where: str) -> None:
        """Raises when the arrays made here cannot hold ``dtype`` (bfloat16 on CuPy before 14)."""
        extension = devices.extension_of(dtype)
        if (extension is not None and self.framework is None and not self.device.backend.is_host
                and not self.device.backend.holds_extension(extension, self.device)):
            raise DeviceError(f"{where}: {extension} has no dtype on {self.device.name}; "
                              f"load it with like='torch' or like='jax', or on the CPU")


# ---------------------------------------------------------------------------------------------
# Lazy access


@dataclasses.dataclass(frozen=True)
class EntryMetadata:
    """What a file says about one entry, read from its metadata only.

    Attributes:
        shape: the array's shape (None for a stored None).
        dtype: the stored NumPy dtype (None for a stored None); extension dtypes in their
            encoding, named by ``dtype_name``.
        dtype_name: ``'float32'``, ``'bfloat16'``, ``'str'`` (text: NumPy's, or HDF5's,
            which ``get`` gives as ``str``), ... (as ``gpuserial inspect`` shows it).
        nbytes: the array's size in memory.
        stored_bytes: what it takes in the file (compressed size, or the dataset's storage).
        compressed: whether the data is deflated (NPZ) or filtered (HDF5).
    """

    shape: tuple[int, ...] | None
    dtype: numpy.dtype | None
    dtype_name: str | None
    nbytes: int
    stored_bytes: int
    compressed: bool


class LazyFile:
    """An open NPZ or HDF5 file whose entries are read only when asked for.

    Opening reads the zip directory (or nothing, for HDF5): memory stays small whatever the
    file's size. Use it as a context manager, or :meth:`close` it.

    Args:
        file: a path, a URL (NPZ: each read fetches only its bytes; HDF5: copied into a local
            spool file on opening) or a seekable binary file object.
        device, like: the defaults of :meth:`get` (see :func:`load`).
        format: ``'npz'`` or ``'hdf5'``, for a file its content does not tell.
        storage_options: for a URL, the options of its fsspec filesystem.
    """

    def __init__(self, file, *, device=None, like=None, format: str | None = None,
                 storage_options: dict | None = None):
        self.name = display_name(file)
        self._device, self._like = device, like
        self._placement = _Placement.of(device, like)
        with contextlib.ExitStack() as resources:  # closed again if listing the keys fails
            self._reader = resources.enter_context(
                inspection.open_reader(file, format, storage_options))
            self._keys = self._reader.keys()
            self._key_set = frozenset(self._keys)
            self._resources = resources.pop_all()

    def keys(self) -> list[str]:
        """Every entry's full key, in the file's order."""
        return list(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        """Whether :meth:`keys` lists ``key`` (no entry is read: a damaged one fails when
        read)."""
        return key in self._key_set

    def _entry(self, key: str) -> loading.Entry:
        entry = self._reader.entry(key)
        if entry is None:
            raise KeyNotFoundError(f'{self._reader.where(key)}: not in the file')
        return entry

    def metadata(self, key: str) -> EntryMetadata:
        """The entry's shape, dtype and sizes, from the file's metadata."""
        entry = self._entry(key)
        stored, compressed = self._reader.stored_size(entry)
        name = None if entry.dtype is None else inspection.dtype_name(entry.dtype)
        return EntryMetadata(entry.shape, entry.dtype, name, entry.nbytes, stored, compressed)

    def get(self, key: str, device=None, like=None):
        """The whole entry as a new array (its CRC checked), on ``device`` as ``like`` (each by
        default the file's)."""
        placement = self._placement if device is None and like is None else _Placement.of(
            self._device if device is None else device, self._like if like is None else like)
        entry = self._entry(key)
        value, fill = placement.new(self._reader, entry)
        if fill:
            loading.run_fills(self._reader, [(entry, value)], False)
        return placement.convert(value, self._reader.where(key))

    def __getitem__(self, key: str):
        """``f[key]`` is ``f.get(key)``, so that ``dict(f)`` reads the whole file, as with
        ``numpy.load`` and h5py."""
        return self.get(key)

    def get_slice(self, key: str) -> LazySlice:
        """The entry, to be indexed: ``get_slice(key)[a:b, ..., c]`` reads only that part."""
        entry = self._entry(key)
        if entry.is_none:
            raise TypeError(f'{self._reader.where(key)}: a stored None cannot be sliced')
        return LazySlice(self, entry)

    def close(self) -> None:
        self._resources.close()

    def __enter__(self) -> LazyFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f'<gpuserial.LazyFile {self.name!r}, {len(self._keys)} entries>'


def open(file, *, device=None, like=None, format: str | None = None,
         storage_options: dict | None = None) -> LazyFile:
    """Opens an NPZ or HDF5 file for lazy access (see :class:`LazyFile`)."""
    return LazyFile(file, device=device, like=like, format=format,
                    storage_options=storage_options)


class LazySlice:
    """One entry of a :class:`LazyFile`, read when indexed with integers, slices (steps of 1
    or more) and an Ellipsis, as NumPy's basic indexing.

    Reads only the bytes of the selection for HDF5 datasets and stored (not deflated) NPZ
    members, where runs of the innermost partial dimension closer than a page apart are read
    together; deflated members are inflated up to the selection's end. A slice is not checked
    against the member's CRC, which covers the whole member: :meth:`LazyFile.get` checks it.
    """

    def __init__(self, file: LazyFile, entry: loading.Entry):
        self._file = file
        assert entry.shape is not None and entry.dtype is not None  # not a stored None
        self._entry = entry
        self.shape: tuple[int, ...] = entry.shape
        self.dtype: numpy.dtype = entry.dtype

    def get_shape(self) -> list[int]:
        """The shape, as safetensors' slices give it."""
        return list(self.shape)

    def __getitem__(self, index):
        where = self._file._reader.where(self._entry.key)
        selection = normalize_index(index, self.shape, where)
        box = self._file._reader.read_box(self._entry, [(s.start, s.stop, s.step) if isinstance(
            s, slice) else (s, s + 1, 1) for s in selection])
        squeezed = tuple(0 if isinstance(s, int) else slice(None) for s in selection)
        return self._file._placement.convert(box[squeezed], where)


def normalize_index(index, shape: tuple[int, ...], where: str) -> list:
    """``index`` (ints, slices, one Ellipsis) as one non-negative int or a slice with explicit
    start, stop and a step >= 1 per dimension."""
    items = list(index) if isinstance(index, tuple) else [index]
    ellipses = [at for at, item in enumerate(items) if item is Ellipsis]  # not ==: an array's
    if len(ellipses) > 1:                                                 # is elementwise
        raise IndexError(f'{where}: an index can only have a single ellipsis')
    if ellipses:
        at = ellipses[0]
        items[at:at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    if len(items) > len(shape):
        raise IndexError(f'{where}: too many indices ({len(items)}) for shape {shape}')
    items += [slice(None)] * (len(shape) - len(items))
    selection: list = []
    for item, size in zip(items, shape, strict=True):
        if isinstance(item, slice):
            try:
                start, stop, step = item.indices(size)
            except (TypeError, ValueError) as error:  # a step of 0, a float bound
                raise type(error)(f'{where}: {item}: {error}') from None
            if step < 1:
                raise IndexError(f'{where}: slices take steps of 1 or more, not {step}')
            selection.append(slice(start, max(start, stop), step))
        elif (not isinstance(item, (bool, numpy.bool_))
              and (number := _as_index(item)) is not None):
            if not -size <= number < size:
                raise IndexError(f'{where}: index {number} is out of bounds for a dimension of '
                                 f'size {size}')
            selection.append(number % size)
        else:
            raise IndexError(f'{where}: get_slice takes integers, slices and an Ellipsis, not '
                             f'{type(item).__name__}')
    return selection


def _as_index(item) -> int | None:
    """``item`` as an int where it is one (a NumPy integer, a 0-d integer array or tensor:
    whatever has ``__index__``), else None."""
    try:
        return operator.index(item)
    except TypeError:
        return None
