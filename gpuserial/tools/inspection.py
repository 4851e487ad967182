"""What the ``inspect``, ``diff`` and ``convert`` commands do, as a library (no printing).

- :func:`inspect_file`: every entry of an NPZ (gpuserial's, NumPy's, Chainer's) or HDF5 file,
  with shape, dtype, stored and loaded size and compression, read from metadata only: the zip
  directory and each member's ``.npy`` header, or h5py's dataset properties. No data is loaded
  and nothing is ever unpickled.
- :func:`diff_files`: keys only in one file, shape and dtype changes, and for common arrays the
  largest absolute and relative differences.
- :func:`convert`: NPZ <-> HDF5 and compression changes, member by member (memory bounded by the
  largest entry), written atomically; stored ``None`` entries stay ``None``.

Files are recognised by their content (zip or HDF5 signature), whatever their names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Iterator

import h5py
import numpy

from gpuserial.engine import devices, transfer
from gpuserial.engine.progress import bar, counted
from gpuserial.errors import CorruptFileError, ReadFailedError
from gpuserial.formats import _npy, _zipread, _zipstream, hdf5, loading, npz
from gpuserial.storage import _signals, remote
from gpuserial.storage._fileio import (
    atomic_output,
    atomic_path,
    check_file_object,
    check_options_have_a_url,
    display_name,
    is_path,
    open_input,
    sharded_hint,
    tilde_hint,
)

__all__ = ['ConvertResult', 'DiffResult', 'EntryInfo', 'FileInfo', 'KeyDiff', 'compression_level',
           'convert', 'detect_format', 'diff_files', 'dtype_name', 'format_for_path',
           'inspect_file', 'open_reader', 'open_source']

FORMATS = ('npz', 'hdf5')
EXTENSIONS = {'.npz': 'npz', '.h5': 'hdf5', '.hdf5': 'hdf5', '.hdf': 'hdf5'}
ZIP_SIGNATURES = (b'PK\x03\x04', b'PK\x05\x06')  # a first member, or an empty archive
HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'
ZIP_METHODS = {0: 'stored', 8: 'deflate', 12: 'bzip2', 14: 'lzma'}
DEFAULT_COMPRESSION = {'npz': 1, 'hdf5': 4}  # save_npz(compression=True), save_hdf5's gzip 4
NUMERIC = 'biufc'  # kinds whose differences are measured
COMPARE_BLOCK = 1 << 22  # elements compared at a time: bounds diff's temporary arrays


# ---------------------------------------------------------------------------------------------
# Formats


def _check_readable(path: str) -> None:
    """Refuses a missing path and a directory; Python's own error, naming ``path``, for one
    that cannot be looked at (a name too long, a file where a directory should be)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f'{path!r}: no such file{tilde_hint(path)}') from None
    if os.path.isdir(path):
        raise IsADirectoryError(f'{path!r}: is a directory, not an NPZ or HDF5 file'
                                f'{sharded_hint(path)}')


def detect_format(path) -> str:
    """``'npz'`` or ``'hdf5'``, from the file's first bytes (its name does not matter).

    Raises:
        FileNotFoundError: no such file.
        gpuserial.errors.CorruptFileError: neither a zip nor an HDF5 file.
        gpuserial.errors.ReadFailedError: reading the file failed (also an ``OSError``).
    """
    path = os.fsdecode(path)
    _check_readable(path)
    with open(path, 'rb') as f:  # its errors name the path
        try:
            head = f.read(8)
        except OSError as error:
            raise ReadFailedError(f'{path!r}: reading failed: {error}') from None
    if head.startswith(ZIP_SIGNATURES):
        return 'npz'
    if h5py.is_hdf5(path):  # also finds a signature after a user block
        return 'hdf5'
    raise CorruptFileError(f'{path!r}: not an NPZ or HDF5 file (it starts with {head!r})')


def format_for_path(path, format: str | None = None) -> str:
    """The format to write ``path`` in: ``format`` when given, else from its extension.

    Raises:
        ValueError: an unknown format, or an extension that names none.
        IsADirectoryError: no format, and ``path`` is a directory.
    """
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f'unknown format {format!r}: expected one of {", ".join(FORMATS)}')
        return format
    extension = os.path.splitext(os.fsdecode(path))[1].lower()
    if extension not in EXTENSIONS and os.path.isdir(path):  # as a save to it says
        raise IsADirectoryError(f'cannot save to {os.fsdecode(path)!r}: it is a directory')
    if extension not in EXTENSIONS:
        raise ValueError(f'{os.fsdecode(path)!r}: cannot tell the format from the extension '
                         f'{extension!r}; use .npz, .h5 or .hdf5, or give the format')
    return EXTENSIONS[extension]


# ---------------------------------------------------------------------------------------------
# inspect


@dataclasses.dataclass(frozen=True)
class EntryInfo:
    """One entry of a file, from its metadata.

    Attributes:
        key: the full key (``predictor/l1/W``).
        kind: ``'array'``, ``'none'`` (a stored None), ``'string'``, ``'object'`` (a pickled
            or reference entry that gpuserial refuses to load), or ``'other'`` (a zip member
            that is not ``.npy``).
        shape: the array's shape (None for a None or an ``'other'`` member).
        dtype: the dtype's name (``'float32'``; None when there is none).
        nbytes: the bytes of the data once loaded (shape times item size).
        stored_bytes: the bytes the entry takes in the file (compressed; for NPZ with its header).
        compression: ``'deflate'``, ``'stored'`` (NPZ), ``'gzip:4'``, ``'none'`` (HDF5), ...
    """

    key: str
    kind: str
    shape: tuple[int, ...] | None
    dtype: str | None
    nbytes: int
    stored_bytes: int
    compression: str


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """A file's entries, in file order, and its totals."""

    path: str
    format: str
    file_size: int
    entries: tuple[EntryInfo, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def stored_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.entries)

    @property
    def none_count(self) -> int:
        return sum(e.kind == 'none' for e in self.entries)

    def as_dict(self) -> dict:
        """A JSON-ready dict: the file, its entries and totals."""
        return {'path': self.path, 'format': self.format, 'file_size': self.file_size,
                'entries': [dict(dataclasses.asdict(e), shape=None if e.shape is None
                                 else list(e.shape)) for e in self.entries],
                'totals': {'entries': len(self.entries), 'none': self.none_count,
                           'nbytes': self.nbytes, 'stored_bytes': self.stored_bytes}}


def inspect_file(path, *, storage_options: dict | None = None) -> FileInfo:
    """Lists the entries of an NPZ or HDF5 file from its metadata, without loading any data.

    ``path`` may be a URL (with ``storage_options``): an NPZ object is read by ranges (its
    directory and each member's header), an HDF5 one through a local spool file.

    Raises:
        FileNotFoundError: no such file.
        gpuserial.errors.CorruptFileError: not NPZ/HDF5, or a header or directory is corrupt.
    """
    if remote.is_remote(path):
        name = display_name(path)
        with open_input(path, storage_options) as f:
            format = _format_of_stream(f)
            size = f.seek(0, os.SEEK_END)
            if format == 'npz':
                return FileInfo(name, format, size, tuple(_inspect_npz(f, name)))
        return FileInfo(name, format, size,
                        tuple(_inspect_hdf5(path, name, storage_options)))
    remote.location_of(path, storage_options)  # storage_options only with a URL
    path = os.fsdecode(path)
    format = detect_format(path)
    if format == 'npz':
        with open(path, 'rb') as f:
            entries = _inspect_npz(f, path)
    else:
        entries = _inspect_hdf5(path, path)
    return FileInfo(path, format, os.path.getsize(path), tuple(entries))


def _inspect_npz(f, path: str) -> list[EntryInfo]:
    entries = []
    with npz.open_npz(f) as archive:
        size = f.seek(0, os.SEEK_END)
        npz.npy_members(archive, path)  # some other zip is refused
        for info in archive.infolist():
            if info.is_dir():
                continue
            method = ZIP_METHODS.get(info.compress_type, f'method {info.compress_type}')
            if not info.filename.endswith(npz.SUFFIX):
                entries.append(EntryInfo(info.filename, 'other', None, None, info.file_size,
                                         info.compress_size, method))
                continue
            key = info.filename[:-len(npz.SUFFIX)]
            where = f'{path!r}, key {key!r}'
            if info.header_offset + info.compress_size > size:
                raise CorruptFileError(f'{where}: the member runs past the end of the file '
                                       f'({size} bytes): truncated?')
            try:
                kind, header = _npz_header(archive.fp, info)
            except (_npy.HeaderError, _zipread.ZipError, OSError, EOFError) as error:
                raise CorruptFileError(f'{where}: {error}') from None
            if kind == 'array' and info.file_size != header.length + header.nbytes:
                raise CorruptFileError(f'{where}: the member holds {info.file_size} bytes but '
                                       f'its header claims {header.length + header.nbytes}')
            entries.append(EntryInfo(
                key, kind, None if kind == 'none' else header.shape,
                None if kind == 'none' else dtype_name(header.dtype),
                header.nbytes if kind == 'array' else 0, info.compress_size, method))
    return entries


def _npz_header(fp, info) -> tuple[str, _npy.Header]:
    """A member's kind and ``.npy`` header, read from its first bytes (never its data)."""
    member = _zipread.MemberReader(fp, info)
    prefix = member.read(min(_npy.PREFIX_LEN + 4, info.file_size))
    length = _npy.header_length(prefix)
    if length > info.file_size:
        raise _npy.HeaderError(f'a header of {length} bytes in a member of {info.file_size}')
    header = _npy.decode_header(prefix + member.read(length - len(prefix)))
    if not header.is_object:
        return 'array', header
    payload_length = info.file_size - header.length
    payload = member.read(payload_length) if payload_length <= _npy.NONE_PICKLE_MAX_LEN else b''
    return ('none' if _npy.is_chainer_none(header, payload) else 'object'), header


def _inspect_hdf5(path, name: str, storage_options: dict | None = None) -> list[EntryInfo]:
    entries = []

    def visit(name: str, node) -> None:
        if not isinstance(node, h5py.Dataset):
            return
        stored = node.id.get_storage_size()
        compression = ('none' if node.compression is None else node.compression
                       if node.compression_opts is None
                       else f'{node.compression}:{node.compression_opts}')
        if node.shape is None:
            entries.append(EntryInfo(name, 'none', None, None, 0, stored, compression))
            return
        dtype = node.dtype
        if h5py.check_string_dtype(dtype) is not None:
            kind, nbytes = 'string', stored
        else:
            kind = 'object' if dtype.hasobject else 'array'
            nbytes = int(node.size) * dtype.itemsize  # h5py 3.6 gives a numpy.int64 (not JSON)
        entries.append(EntryInfo(name, kind, tuple(node.shape), dtype_name(dtype), nbytes, stored,
                                 compression))

    with hdf5.open_hdf5(path, storage_options) as f:
        try:
            f.visititems(visit)
        except (OSError, KeyError, RuntimeError) as error:
            raise hdf5.read_error(repr(name), error, 'unreadable HDF5 metadata: ') from None
    return entries


# ---------------------------------------------------------------------------------------------
# Reading entries (for diff and convert)


class _Source:
    """The entries of an open file through its format's checked reader."""

    def __init__(self, path: str, format: str, reader: loading.Reader, keys: list[str]):
        self.path = path
        self.format = format
        self.reader = reader
        self.keys = keys

    def entry(self, key: str) -> loading.Entry:
        entry = self.reader.entry(key)
        assert entry is not None  # the keys are the reader's own
        return entry

    def read(self, entry: loading.Entry):
        """The entry's value: None, or a host array (strings as a ``str`` array)."""
        if entry.dtype is None:  # a stored None
            return None
        if entry.dtype.hasobject:
            return loading.read_text(self.reader, entry)
        self.reader.check_size(entry, allocating=True)
        assert entry.shape is not None  # with the dtype
        array = numpy.empty(entry.shape, entry.dtype)
        self.reader.read_into(entry, array)
        return array


@contextlib.contextmanager
def open_reader(file, format: str | None = None, storage_options: dict | None = None
                ) -> Iterator[loading.Reader]:
    """The checked reader of an NPZ or HDF5 file: a path (its format recognised by content
    unless given), a URL (with ``storage_options``; NPZ read by ranges, HDF5 through a spool
    file) or a seekable binary file object."""
    if remote.is_remote(file):
        with open_input(file, storage_options) as stream:
            if format is None:
                format = _format_of_stream(stream)
            format_for_path('', format)  # a known one
            if format == 'npz':
                with npz.open_npz(stream) as archive:
                    yield npz._ZipReader(archive, display_name(file))
                return
        with hdf5.open_hdf5(file, storage_options) as f:
            yield hdf5._GroupReader(f, display_name(file))
        return
    remote.location_of(file, storage_options)  # storage_options only with a URL
    check_file_object(file, writing=False)
    if format is None:
        format = detect_format(file) if is_path(file) else _format_of_stream(file)
    format_for_path('', format)  # a known one
    if format == 'npz':
        with open_input(file) as stream, npz.open_npz(stream) as archive:
            yield npz._ZipReader(archive, display_name(file))
        return
    with hdf5.open_hdf5(file) as f:
        yield hdf5._GroupReader(f, display_name(file))


def _format_of_stream(fp) -> str:
    """The format of a file object, from its first bytes (whatever its position: both formats
    read at absolute offsets)."""
    start = fp.tell()
    fp.seek(0)
    head = fp.read(8)
    fp.seek(start)
    if head.startswith(ZIP_SIGNATURES):
        return 'npz'
    if head == HDF5_SIGNATURE:
        return 'hdf5'
    raise CorruptFileError(f'{display_name(fp)!r}: not an NPZ or HDF5 file (it starts with '
                           f'{head!r}; for an HDF5 file with a user block, give format=)')


@contextlib.contextmanager
def open_source(path, storage_options: dict | None = None) -> Iterator[_Source]:
    """Opens an NPZ or HDF5 file or URL (recognised by content) for reading entry by entry."""
    if remote.is_remote(path):
        with open_reader(path, None, storage_options) as reader:
            format = 'hdf5' if isinstance(reader, hdf5._GroupReader) else 'npz'
            yield _Source(display_name(path), format, reader, reader.keys())
        return
    remote.location_of(path, storage_options)  # storage_options only with a URL
    path = os.fsdecode(path)
    format = detect_format(path)
    with open_reader(path, format) as reader:
        yield _Source(path, format, reader, reader.keys())


# ---------------------------------------------------------------------------------------------
# diff


@dataclasses.dataclass(frozen=True)
class KeyDiff:
    """How one key common to both files differs.

    Attributes:
        key: the key.
        what: ``'none'`` (None in one file only), ``'shape'``, ``'dtype'`` or ``'values'``.
        a, b: the entry in each file, described (``'(3, 4) float32'``, ``'None'``).
        max_abs: the largest ``|a - b|`` (None when the values were not compared).
        max_rel: the largest ``|a - b| / |b|`` (``inf`` where ``b`` is 0 and ``a`` is not).
        count: how many elements differ beyond the tolerance.
    """

    key: str
    what: str
    a: str
    b: str
    max_abs: float | None = None
    max_rel: float | None = None
    count: int = 0


@dataclasses.dataclass(frozen=True)
class DiffResult:
    """What :func:`diff_files` found."""

    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    changed: tuple[KeyDiff, ...]
    compared: int  # keys in both files

    @property
    def equal(self) -> bool:
        return not (self.only_a or self.only_b or self.changed)


def dtype_name(dtype: numpy.dtype) -> str:
    """``'float32'`` for numbers, ``'bfloat16'`` for its encoding (and float8's), ``'str'`` for
    strings (NumPy's or HDF5's), else NumPy's code."""
    if dtype.kind in 'biufcmM':
        return dtype.name
    extension = devices.extension_of(dtype)
    if extension is not None:
        return extension
    if dtype.kind == 'U' or h5py.check_string_dtype(dtype) is not None:
        return 'str'
    return dtype.str


def _describe(entry: loading.Entry) -> str:
    return 'None' if entry.dtype is None else f'{entry.shape} {dtype_name(entry.dtype)}'


def diff_files(a, b, *, rtol: float = 0.0, atol: float = 0.0,
               storage_options: dict | None = None) -> DiffResult:
    """Compares two files (NPZ or HDF5, in any mix), entry by entry.

    Two values are equal when ``|a - b| <= atol + rtol * |b|`` everywhere (NaN equals NaN); with
    the default tolerances of 0 that is exact equality. Entries are read one at a time.
    Either file may be a URL; ``storage_options`` serve the URLs among them.

    Raises:
        FileNotFoundError, gpuserial.errors.CorruptFileError: a file cannot be read.
        TypeError: ``storage_options`` given and neither file is a URL.
    """
    check_options_have_a_url(storage_options, a, b)
    changed = []
    first_options = storage_options if remote.is_url(a) else None
    second_options = storage_options if remote.is_url(b) else None
    with open_source(a, first_options) as first, open_source(b, second_options) as second, \
            _signals.deferred():
        entries_a = {key: first.entry(key) for key in first.keys}  # every header checked
        entries_b = {key: second.entry(key) for key in second.keys}
        common = [key for key in entries_a if key in entries_b]
        for key in common:
            found = _diff_entry(key, entries_a[key], entries_b[key], first, second, rtol, atol)
            if found is not None:
                changed.append(found)
        return DiffResult(tuple(k for k in entries_a if k not in entries_b),
                          tuple(k for k in entries_b if k not in entries_a), tuple(changed),
                          len(common))


def _diff_entry(key, x, y, first, second, rtol, atol) -> KeyDiff | None:
    a, b = _describe(x), _describe(y)
    if x.is_none or y.is_none:
        return None if x.is_none and y.is_none else KeyDiff(key, 'none', a, b)
    if x.shape != y.shape:
        return KeyDiff(key, 'shape', a, b)
    left, right = _comparable(first.read(x)), _comparable(second.read(y))
    what = 'values' if a == b else 'dtype'
    if left.dtype.kind in NUMERIC and right.dtype.kind in NUMERIC:
        max_abs, max_rel, count = _compare(left, right, rtol, atol)
        found = KeyDiff(key, what, a, b, max_abs, max_rel, count)
    else:  # strings, or a string against a number: equal or not
        equal = left.dtype.kind == right.dtype.kind and numpy.array_equal(left, right)
        found = KeyDiff(key, what, a, b, count=0 if equal else max(left.size, 1))
    return None if what == 'values' and found.count == 0 else found


def _comparable(array: numpy.ndarray) -> numpy.ndarray:
    """An array as it is compared: an extension dtype's values as float32, which holds every
    bfloat16 and float8 value (where ml_dtypes is installed; else its bits, equal or not)."""
    decoded = devices.decoded(array)
    return array if decoded is array else decoded.astype(numpy.float32)


def _compare(a: numpy.ndarray, b: numpy.ndarray, rtol: float, atol: float
             ) -> tuple[float, float, int]:
    """The largest absolute and relative differences, and how many elements are not close."""
    a, b = a.reshape(-1), b.reshape(-1)
    kinds = a.dtype.kind + b.dtype.kind
    work = numpy.complex128 if 'c' in kinds else numpy.float64
    inexact = 'f' in kinds or 'c' in kinds
    max_abs = max_rel = 0.0
    count = 0
    for start in range(0, a.size, COMPARE_BLOCK):
        x, y = a[start:start + COMPARE_BLOCK], b[start:start + COMPARE_BLOCK]
        same = x == y  # exact, in the stored dtypes (int64 beyond 2**53 included)
        xf, yf = x.astype(work), y.astype(work)
        if inexact:
            same |= numpy.isnan(xf) & numpy.isnan(yf)
        with numpy.errstate(invalid='ignore', divide='ignore', over='ignore'):
            difference = numpy.abs(xf - yf) if inexact else _integer_distance(x, y)
            difference[same] = 0
            difference[numpy.isnan(difference)] = numpy.inf
            scale = numpy.abs(yf)
            relative = numpy.where(difference == 0, 0.0, difference / scale)
            relative[numpy.isnan(relative)] = numpy.inf  # inf against -inf: inf / inf
            close = same | (difference <= atol + rtol * scale)
        if difference.size:
            max_abs = max(max_abs, float(difference.max()))
            max_rel = max(max_rel, float(relative.max()))
        count += int(close.size - numpy.count_nonzero(close))
    return max_abs, max_rel, count


def _integer_distance(x: numpy.ndarray, y: numpy.ndarray) -> numpy.ndarray:
    """``|x - y|`` of integers (or bools) as float64, from an exact difference (no overflow,
    and 2**62 + 1 against 2**62 differs by 1, not by 0 as their float64 values would say)."""
    xu, yu = x.astype(numpy.uint64), y.astype(numpy.uint64)  # wraps; the difference does not
    return numpy.where(x >= y, xu - yu, yu - xu).astype(numpy.float64)


# ---------------------------------------------------------------------------------------------
# convert


def compression_level(format: str, compression: int | bool | None) -> int:
    """The level 0-9 that ``compression`` means for ``format`` (see :func:`convert`).

    Raises:
        ValueError: a level outside 0-9.
    """
    if compression is None or compression is True:
        return DEFAULT_COMPRESSION[format]
    level = int(compression)
    if not 0 <= level <= 9:
        raise ValueError(f'compression level must be 0 to 9, got {compression!r}')
    return level


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote."""

    format: str
    compression: int
    entries: int
    nbytes: int


def convert(src, dst, *, format: str | None = None, compression: int | bool | None = None,
            progress: bool | None = None, durable: bool = True,
            storage_options: dict | None = None) -> ConvertResult:
    """Writes the entries of ``src`` into ``dst``, in another format or compression.

    Args:
        src: an NPZ or HDF5 file (recognised by content).
        dst: the file to write (replaced atomically, only once complete).
        format: ``'npz'`` or ``'hdf5'`` (default: from ``dst``'s extension).
        compression: for NPZ, false/0 stores members and true/1-9 deflates them; for HDF5, the
            gzip level 0-9 (0 or False: none; True: 4). Default: the format's save default
            (deflate for NPZ, gzip 4 for HDF5).
        progress: a progress bar: None (the default) on a terminal for large files only, or
            True/False (see :func:`gpuserial.engine.progress.bar`).
        durable: fsync the new file and its directory.
        storage_options: the options of the fsspec filesystems of ``src`` or ``dst`` where
            either is a URL (an object is written committed last; HDF5 through a spool file).

    Raises:
        ValueError: an unknown format or compression level, or keys HDF5 cannot hold (``a`` and
            ``a/b`` both).
        FileNotFoundError, gpuserial.errors.CorruptFileError: ``src`` cannot be read.
        TypeError: ``storage_options`` given and neither file is a URL.
    """
    check_options_have_a_url(storage_options, src, dst)
    format = format_for_path(display_name(dst), format)
    level = compression_level(format, compression)
    dst_options = storage_options if remote.is_url(dst) else None
    if not remote.is_remote(dst):
        directory = os.path.dirname(os.fsdecode(dst)) or '.'
        if not os.path.isdir(directory):
            raise FileNotFoundError(f'{os.fsdecode(dst)!r}: no such directory {directory!r}'
                                    f'{tilde_hint(dst)}')
    with open_source(src, storage_options if remote.is_url(src) else None) as source:
        entries = [source.entry(key) for key in source.keys]
        total = sum(e.size * e.dtype.itemsize for e in entries
                    if e.dtype is not None and not e.dtype.hasobject)
        name = os.path.basename(display_name(dst))
        with bar(2 * total, f'convert {name}', progress) as shown:  # read, then write
            source.reader.progress = shown
            write = _write_npz if format == 'npz' else _write_hdf5
            write(source, entries, dst, level, shown, durable, dst_options)
    return ConvertResult(format, level, len(entries), total)


def _write_npz(source: _Source, entries, dst, level: int, shown, durable: bool,
               storage_options: dict | None) -> None:
    for entry in entries:
        npz.check_member_name(dst, entry.key)
    size_hint = sum(entry.nbytes for entry in entries) + len(entries) * npz.MEMBER_OVERHEAD_BYTES
    with (atomic_output(dst, durable=durable, storage_options=storage_options,
                        size_hint=size_hint) as out,
          _zipstream.ZipWriter(out, compression=level > 0) as archive, _signals.deferred()):
        for entry in entries:
            value = source.read(entry)
            name = entry.key + npz.SUFFIX
            if value is None:
                archive.write_member(name, [_npy.none_member()])
                continue
            header = _npy.encode_header(value.dtype, value.shape)
            with contextlib.closing(transfer.host_chunks(value)) as chunks:
                archive.write_member(name, itertools.chain([header], counted(chunks, shown)))
            del value


def _write_hdf5(source: _Source, entries, dst, level: int, shown, durable: bool,
                storage_options: dict | None) -> None:
    name = display_name(dst)
    hdf5.check_paths({'/' + hdf5.plain_key(entry.key): f'key {entry.key!r}'
                      for entry in entries}, name)
    location = remote.location_of(dst, storage_options)
    if location is not None:  # HDF5 needs to seek: a local spool file, then streamed
        with remote.spool_path('.h5') as spool:
            _write_hdf5(source, entries, spool, level, shown, False, None)
            remote.upload_file(spool, location)
        return
    with atomic_path(dst, durable=durable) as temp, h5py.File(temp, 'x') as f, \
            _signals.deferred():
        for entry in entries:
            value = source.read(entry)
            parent, _, key = entry.key.rpartition('/')
            parent = hdf5.plain_key(parent)  # h5py makes no group of 'a/.'
            hdf5.write_entry(f.require_group(parent) if parent else f, key, value, level, name,
                             shown)
            del value
