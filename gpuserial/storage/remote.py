"""Object storage through fsspec: ``s3://bucket/key``, ``gs://``, ``memory://``, ... URLs.

Object stores have no atomic rename, no fsync and no cheap seek, so a save there does not go
through a temporary file and a rename. It streams to the final key through the filesystem's
buffered writer (on S3 a multipart upload, one part per upload block), and the object appears
only when the upload is committed, after the last byte: a save that fails or is interrupted
(Ctrl-C too) aborts the upload and leaves no object and the previous one as it was. That is
fsspec's own transaction protocol (files opened with ``autocommit=False``, then ``commit()`` or
``discard()``), used only for the filesystems known to honour it (:data:`TRANSACTIONAL`). Any
other filesystem writes a temporary key beside the target and moves it into place once
complete: where the store's move is a copy and a delete, that final move is not atomic.

Reads open the object with no fsspec cache: the zip reader's own read-ahead window decides
the read sizes, so a load of some keys fetches the directory and only those members' bytes;
large reads and members' data go as ranged GETs of :data:`FETCH_PIECE` bytes, several in
flight at once (bounded memory).

fsspec is imported only here, and only when a URL or an fsspec file is seen: ``import
gpuserial`` and local use never import it. Install it with ``pip install fsspec`` (the extra
``remote``) plus the store's package: ``s3fs``, ``gcsfs``, ...

Layouts of several objects (sharded checkpoints: data objects first, an index object
committed last) go through :mod:`gpuserial.storage.folders`, which builds on this module.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from gpuserial.errors import naming

__all__ = ['FETCHES_IN_FLIGHT', 'FETCH_PIECE', 'SPOOL_DIR_VARIABLE', 'TRANSACTIONAL',
           'UPLOAD_BLOCK', 'Location', 'is_remote', 'is_url', 'location_of', 'remote_input',
           'remote_output', 'spool_directory']

UPLOAD_BLOCK = 16 << 20  # bytes buffered per uploaded part (S3 takes 5 MiB at least)
MAX_PARTS = 9000  # S3 takes up to 10,000 parts: larger objects get larger blocks
FETCH_PIECE = 8 << 20  # the most bytes of one ranged GET
FETCHES_IN_FLIGHT = 4  # ranged GETs at once, ahead of the reader, in a large read or a member
SMALL_FETCHES_IN_FLIGHT = 16  # GETs at once of ranges smaller than a piece (members' headers),
# while their bytes are no more than FETCHES_IN_FLIGHT pieces
FETCH_GAP = 64 << 10  # announced ranges this close are fetched as one (the gap too)
COPY_PIECE = 8 << 20  # bytes copied at a time between a spool file and an object
SPOOL_DIR_VARIABLE = 'GPUSERIAL_SPOOL_DIR'  # where HDF5 spool files go (default: the temp dir)
TEMP_MARK = '.gpuserial-tmp-'  # in the temporary keys of non-transactional filesystems
# Filesystems whose files opened with autocommit=False publish nothing until commit() and
# leave nothing after discard(): S3 (a multipart upload, aborted), local files.
TRANSACTIONAL = frozenset({'s3', 's3a', 'file', 'local'})  # not memory: fsspec's puts the
#                              object in its store when opened, empty, and discard() keeps it
_SCHEME = re.compile(r'[A-Za-z][A-Za-z0-9+.\-]+://')  # two letters at least: not C:\


def is_url(file) -> bool:
    """Whether ``file`` is a URL (``s3://bucket/key``, ``memory://x``, chained ``a::b://c``)."""
    return isinstance(file, str) and (_SCHEME.match(file) is not None or (
        '::' in file and _SCHEME.match(file.rsplit('::', 1)[-1]) is not None))


def _is_open_file(file) -> bool:
    core = sys.modules.get('fsspec.core')  # never imported for it
    return core is not None and isinstance(file, core.OpenFile)


def is_remote(file) -> bool:
    """Whether ``file`` goes through fsspec: a URL, or an ``fsspec.core.OpenFile`` (which
    carries its filesystem: ``fsspec.core.OpenFile(fs, path)`` for a filesystem object)."""
    return is_url(file) or _is_open_file(file)


@dataclasses.dataclass(frozen=True)
class Location:
    """An object: its fsspec filesystem and its path there."""

    fs: Any
    path: str

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    @property
    def protocols(self) -> tuple[str, ...]:
        protocol = self.fs.protocol
        return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _fsspec():
    try:
        import fsspec
        import fsspec.core
    except ImportError:
        raise ImportError("URLs need fsspec: pip install fsspec (gpuserial's extra: pip "
                          "install -e '.[remote]' in its checkout), and the store's package, "
                          'such as s3fs for s3://') from None
    return fsspec


def location_of(file, storage_options: dict | None = None) -> Location | None:
    """The object ``file`` names (a URL with ``storage_options``, or an fsspec ``OpenFile``),
    or None for a local path or a file object.

    Raises:
        TypeError: ``storage_options`` with something other than a URL, or not a mapping.
        ImportError: fsspec, or the store's package (``s3fs``, ``gcsfs``), is not installed.
        ValueError: fsspec knows no such protocol.
    """
    if is_url(file):
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(f"{file!r}: storage_options= takes a dict of the filesystem's "
                            f'options, not a {type(storage_options).__name__}')
        try:
            fs, path = _fsspec().core.url_to_fs(file, **(storage_options or {}))
        except (ImportError, ValueError) as error:  # no fsspec, or the store's package; or
            raise type(error)(f'{file!r}: {error}') from None  # "Protocol not known: foo"
        return Location(fs, path)
    if storage_options is not None:
        raise TypeError(f'storage_options= goes with a URL, not with {display(file)!r}')
    if _is_open_file(file):
        return Location(file.fs, file.path)
    return None


def display(file) -> str:
    """A URL as it is; an fsspec ``OpenFile`` as its URL."""
    return file.fs.unstrip_protocol(file.path) if _is_open_file(file) else str(file)


def save_key(file) -> object:
    """What identifies the object ``file`` among saves in flight."""
    return ('object', display(file))


# ---------------------------------------------------------------------------------------------
# Writing


def upload_block(size_hint: int | None) -> int:
    """The upload block for an object of about ``size_hint`` bytes: :data:`UPLOAD_BLOCK`, or
    more where the object would otherwise take more than :data:`MAX_PARTS` parts."""
    if not size_hint:
        return UPLOAD_BLOCK
    return max(UPLOAD_BLOCK, -(-size_hint // MAX_PARTS))


@contextlib.contextmanager
def remote_output(location: Location, size_hint: int | None = None, *,
                  fresh: bool = False) -> Iterator[Upload]:
    """A binary stream (not seekable) into the object at ``location``, committed only when
    the block succeeds.

    Peak memory is about two upload blocks (:func:`upload_block`). On any exception (Ctrl-C
    too) the upload is aborted: no object is left at the key, and the previous one, if any,
    was never touched. For a filesystem outside :data:`TRANSACTIONAL`, the stream goes to a
    temporary key beside the target, moved into place on success (not atomic where the store
    moves by copying) and removed on failure; with ``fresh`` (a key new to this save, which
    no reader looks at before a later commit names it: a sharded checkpoint's data objects)
    it goes straight to the key, with no move, and a failure removes what it wrote.
    """
    fs, path = location.fs, location.path
    block = upload_block(size_hint)
    if TRANSACTIONAL.intersection(location.protocols):
        f = fs.open(path, 'wb', autocommit=False, block_size=block)
        try:
            yield Upload(f, location.url)
            f.close()
            f.commit()
        except BaseException as error:
            _discard(f)
            if isinstance(error, OSError):
                raise _naming(error, location.url) from None
            raise
        return
    temp = path if fresh else f'{path}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(6)}'
    try:
        with fs.open(temp, 'wb', block_size=block) as f:
            yield Upload(f, location.url)
        if temp != path:
            fs.mv(temp, path)
    except BaseException as error:
        with contextlib.suppress(Exception):
            fs.rm(temp)
        if isinstance(error, OSError):
            raise _naming(error, location.url) from None
        raise


def _naming(error: OSError, url: str) -> OSError:
    """An upload's ``error`` naming the object: with :func:`naming` where it has an errno,
    else (the store's packages raise ``FileNotFoundError('The specified bucket does not
    exist')``) as the same type with the URL in front."""
    named = naming(error, url, 'writing the object')
    if named is not error or error.errno is not None or error.filename is not None \
            or url in str(error):
        return named
    try:
        named = type(error)(f'{url!r}: {error} (writing the object)')
    except Exception:  # noqa: BLE001 - a subclass that takes other arguments: as it is
        return error
    return named.with_traceback(error.__traceback__)


def _discard(f) -> None:
    """Throws away what ``f`` (opened with autocommit=False) wrote, committing nothing."""
    spec = sys.modules['fsspec.spec']
    with contextlib.suppress(Exception):
        if isinstance(f, spec.AbstractBufferedFile):
            f.discard()  # aborts the multipart upload; close() would complete it
            f.closed = True  # nor may its finalizer flush it
        else:
            f.close()
            f.discard()


class Upload:
    """The stream a save writes into: the filesystem's file, seen as not seekable (the zip
    writer then puts each member's CRC and sizes after its data, never seeking back)."""

    def __init__(self, f, name: str):
        self.f = f
        self.name = name
        self.position = 0

    def write(self, data) -> int:
        count = len(memoryview(data).cast('B'))
        self.f.write(data)
        self.position += count
        return count

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        pass  # the filesystem uploads whole blocks; the commit sends the rest


# ---------------------------------------------------------------------------------------------
# Reading


@contextlib.contextmanager
def remote_input(location: Location, name: str | None = None) -> Iterator[Ranged]:
    """The object at ``location`` opened for reading with no read-ahead cache of fsspec's:
    reads are ranged GETs of what was asked for, and within a member's data, fetches ahead in
    parallel (see :class:`Ranged`). ``name`` is how messages show it (default: its URL).

    Raises:
        FileNotFoundError: no such object.
    """
    name = name or location.url
    try:
        f = location.fs.open(location.path, 'rb', cache_type='none')
    except FileNotFoundError:
        raise FileNotFoundError(f'{name!r}: no such object') from None
    except IsADirectoryError:
        raise IsADirectoryError(f'{name!r}: is a directory, not a file') from None
    except ValueError as error:  # s3fs: "Attempt to open non key-like path: bucket"
        raise ValueError(f'{name!r}: {error}') from None
    if getattr(f, 'details', {}).get('type') == 'directory':  # s3fs opens a prefix: 0 bytes
        f.close()
        raise IsADirectoryError(f'{name!r}: is a directory (a prefix of objects), not a file')
    ranged = Ranged(f, location, name)
    try:
        yield ranged
    finally:
        ranged.close()


class Ranged:
    """A seekable binary file over an object.

    A small read is one ranged GET of what was asked for. Byte ranges announced with
    :meth:`expect` (the members a load reads, in order) and large reads are fetched as ranged
    GETs of :data:`FETCH_PIECE` bytes, up to :data:`FETCHES_IN_FLIGHT` at once ahead of the
    reader (up to :data:`SMALL_FETCHES_IN_FLIGHT` of smaller ranges, as many bytes at most),
    never outside those ranges. One GET at a time is bound by its round trip and one
    connection's rate; several in flight are how object stores give their bandwidth. Memory:
    at most ``FETCHES_IN_FLIGHT + 1`` pieces.
    """

    def __init__(self, f, location: Location, name: str):
        self.f = f
        self.location = location
        self.name = name  # as messages show it
        self.position = 0
        self.ranges: list[tuple[int, int]] = []  # announced: fetched ahead, in order
        self.fetches: collections.deque = collections.deque()  # (start, stop, Future of bytes)
        self.dropped: list = []  # fetches no longer wanted that were running: their memory
        self.next_fetch = (0, 0)  # the range and the position the next fetch starts at
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def expect(self, ranges: list[tuple[int, int]]) -> None:
        """Announces byte ranges, increasing, to be read in order; ranges within those
        announced before (a member of a load that announced them all) change nothing."""
        if all(self._range_at(start) == self._range_at(end - 1) is not None
               for start, end in ranges if end > start):
            return
        self._drop_fetches()
        self.ranges = []
        for start, end in ranges:
            if self.ranges and start - self.ranges[-1][1] <= FETCH_GAP:
                self.ranges[-1] = (self.ranges[-1][0], max(end, self.ranges[-1][1]))
            elif end > start:
                self.ranges.append((start, end))

    def fetching_ahead(self, position: int) -> bool:
        """Whether ``position`` lies in an announced range, fetched ahead: a reader's own
        read-ahead there gains nothing, and a read it ran past would start the fetches
        afresh."""
        return self._range_at(position) is not None

    def _range_at(self, position: int) -> int | None:
        index = bisect.bisect_right(self.ranges, (position, math.inf)) - 1
        return index if index >= 0 and position < self.ranges[index][1] else None

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self.position = offset
        elif whence == 1:
            self.position += offset
        else:
            self.position = self.f.seek(offset, whence)
        return self.position

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return True

    def pread(self, buffer, offset: int) -> int:
        """Reads into ``buffer`` from ``offset`` (as :meth:`readinto`); returns the count."""
        self.seek(offset)
        return self.readinto(buffer)

    def read(self, count: int = -1) -> bytes:
        if count is None or count < 0:
            count = max(0, self.f.seek(0, 2) - self.position)
        buffer = bytearray(count)
        return bytes(buffer[:self.readinto(buffer)])

    def readinto(self, buffer) -> int:
        buffer = memoryview(buffer).cast('B')
        if len(buffer) <= FETCH_PIECE or self._range_at(self.position) is not None:
            return self._read(buffer)
        announced = self.ranges  # a large read: in pieces too
        self.expect([(self.position, self.position + len(buffer))])
        try:
            return self._read(buffer)
        finally:
            self.expect(announced)

    def _read(self, buffer: memoryview) -> int:
        done = 0
        while done < len(buffer):
            index = self._range_at(self.position)
            if index is not None:
                count = self._copy_fetched(index, buffer[done:])
            else:
                self.f.seek(self.position)
                data = self.f.read(min(FETCH_PIECE, len(buffer) - done))
                count = len(data)
                buffer[done:done + count] = data
            if count <= 0:
                break
            done += count
            self.position += count
        return done

    def _copy_fetched(self, index: int, buffer: memoryview) -> int:
        """Copies into ``buffer`` from the fetched piece that holds ``position`` (in announced
        range ``index``), the fetches ahead topped up; returns the count (0 where the object
        ends)."""
        while self.fetches and self.fetches[0][1] <= self.position:
            self._drop(self.fetches.popleft())  # read past
        if not self.fetches or self.fetches[0][0] > self.position:  # a seek: start afresh
            self._drop_fetches()
            self.next_fetch = (index, self.position)
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(
                max(FETCHES_IN_FLIGHT, SMALL_FETCHES_IN_FLIGHT), 'gpuserial-fetch')
        self.dropped = [fetch for fetch in self.dropped if not fetch[2].done()]
        running = (*self.fetches, *self.dropped)  # all count: their memory, their connections
        in_flight, count = sum(stop - start for start, stop, _ in running), len(running)
        while self.next_fetch[0] < len(self.ranges):
            index, start = self.next_fetch
            end = self.ranges[index][1]
            stop = min(start + FETCH_PIECE, end)
            in_flight, count = in_flight + stop - start, count + 1
            if self.fetches and (in_flight > FETCHES_IN_FLIGHT * FETCH_PIECE
                                 or count > max(FETCHES_IN_FLIGHT, SMALL_FETCHES_IN_FLIGHT)):
                break
            self.fetches.append((start, stop, self.pool.submit(self._fetch, start, stop)))
            following = index + 1
            self.next_fetch = ((index, stop) if stop < end else
                               (following, self.ranges[following][0])
                               if following < len(self.ranges) else (following, 0))
        start, _, fetch = self.fetches[0]
        piece = memoryview(fetch.result())[self.position - start:]
        count = min(len(buffer), len(piece))
        buffer[:count] = piece[:count]
        return count

    def _fetch(self, start: int, stop: int) -> bytes:
        """One ranged GET, through the open file where it has its own (s3fs's names the
        object's ETag, so that a save replacing the object meanwhile fails the read)."""
        fetch_range = getattr(self.f, '_fetch_range', None)
        if fetch_range is not None:
            stop = min(stop, self.f.size)
            return fetch_range(start, stop) if start < stop else b''
        return self.location.fs.cat_file(self.location.path, start=start, end=stop)

    def _drop(self, fetch: tuple) -> None:
        """Cancels a fetch, or where it runs already, keeps it counted until it is done."""
        if not fetch[2].cancel():  # running (or done: dropped at the next count)
            self.dropped.append(fetch)

    def _drop_fetches(self) -> None:
        for fetch in self.fetches:
            self._drop(fetch)
        self.fetches.clear()

    def close(self) -> None:
        self._drop_fetches()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.f.close()


# ---------------------------------------------------------------------------------------------
# Spool files (HDF5, which needs seek)


def spool_directory() -> str:
    """Where spool files go: ``$GPUSERIAL_SPOOL_DIR``, else the temporary directory."""
    return os.environ.get(SPOOL_DIR_VARIABLE) or tempfile.gettempdir()


@contextlib.contextmanager
def spool_path(suffix: str = '') -> Iterator[str]:
    """A fresh path in :func:`spool_directory` (not created), removed after the block."""
    path = os.path.join(spool_directory(),
                        f'gpuserial-spool-{os.getpid()}-{secrets.token_hex(6)}{suffix}')
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def upload_file(local: str, location: Location) -> None:
    """Streams the local file ``local`` to the object at ``location`` (see
    :func:`remote_output`)."""
    size = os.path.getsize(local)
    with open(local, 'rb') as src, remote_output(location, size) as out:
        buffer = memoryview(bytearray(COPY_PIECE))
        while count := src.readinto(buffer):
            out.write(buffer[:count])


def download_file(location: Location, local: str) -> None:
    """Copies the object at ``location`` into a new local file ``local``."""
    with remote_input(location) as src, open(local, 'xb') as out:
        src.expect([(0, src.seek(0, 2))])
        src.seek(0)
        buffer = memoryview(bytearray(COPY_PIECE))
        while count := src.readinto(buffer):
            out.write(buffer[:count])
