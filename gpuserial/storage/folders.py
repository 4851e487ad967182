"""Folders of several files, alike whether a local directory or a prefix of an object store.

A sharded checkpoint (data files, then an index committed last) and the tools that look after
checkpoints (:func:`gpuserial.latest`, :func:`gpuserial.checkpoints.clean`) go through this one
interface, so nothing above it asks which kind of folder it has:

- :class:`LocalFolder`: a directory; each file written atomically (temporary file, fsync,
  rename: :func:`gpuserial.storage._fileio.atomic_output`), read with ``pread``.
- :class:`RemoteFolder`: a prefix of an fsspec filesystem; each object streamed and committed
  last (:func:`gpuserial.storage.remote.remote_output`), read with ranged reads. Object stores
  have no directories: nothing is created for a folder, and a folder with no object under it
  lists as empty. Only the generic fsspec calls are used (``open``, ``ls``, ``info``/
  ``modified``, ``rm``), so nothing here is particular to S3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator
from typing import BinaryIO, cast

from gpuserial.errors import ReadFailedError
from gpuserial.storage import _fileio, remote

__all__ = ['Item', 'LocalFolder', 'RemoteFolder', 'folder_of']


@dataclasses.dataclass(frozen=True)
class Item:
    """A file or subfolder directly in a folder."""

    name: str
    is_dir: bool
    size: int  # 0 for a subfolder


class LocalFolder:
    """A local directory."""

    def __init__(self, path: str):
        self.path = path
        self.name = path  # as messages show it

    def show(self, name: str) -> str:
        return os.path.join(self.path, name)

    def child(self, name: str) -> LocalFolder:
        return LocalFolder(self.show(name))

    def make(self) -> None:
        os.makedirs(self.path, exist_ok=True)

    def output(self, name: str, *, durable: bool, fresh: bool = False,
               size_hint: int | None = None) -> contextlib.AbstractContextManager[BinaryIO]:
        """A file replaced atomically once the block succeeds (``fresh`` changes nothing: a
        rename costs nothing here)."""
        return _fileio.atomic_output(self.show(name), durable=durable, size_hint=size_hint)

    def read_bytes(self, name: str, limit: int) -> bytes:
        """The file's first ``limit + 1`` bytes at most (so a longer file shows).

        Raises:
            FileNotFoundError: no such file.
            gpuserial.errors.ReadFailedError: reading it failed (also an ``OSError``).
        """
        with open(self.show(name), 'rb') as f:  # its errors name the file
            try:
                return f.read(limit + 1)
            except OSError as error:
                raise ReadFailedError(f'{self.show(name)!r}: reading failed: {error}') from None

    @contextlib.contextmanager
    def open_ranged(self, name: str) -> Iterator[_LocalRanged]:
        """The file, for reads at offsets. Raises FileNotFoundError."""
        fd = os.open(self.show(name), os.O_RDONLY)
        try:
            yield _LocalRanged(fd)
        finally:
            os.close(fd)

    def remove(self, names) -> None:
        """Removes the files ``names``; those already gone are no error."""
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.show(name))

    def exists(self, name: str) -> bool:
        return os.path.isfile(self.show(name))

    def modified(self, name: str) -> float:
        """When the file was last modified (seconds since the epoch)."""
        return os.stat(self.show(name)).st_mtime

    def items(self) -> list[Item]:
        """What the directory holds, sorted by name; empty where there is no directory."""
        found = []
        with contextlib.suppress(OSError), os.scandir(self.path) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    is_dir = entry.is_dir(follow_symlinks=False)
                    found.append(Item(entry.name, is_dir, 0 if is_dir else entry.stat().st_size))
        return sorted(found, key=lambda item: item.name)


class _LocalRanged:
    """A local file read by ``pread`` (no read-ahead: the page cache does that)."""

    def __init__(self, fd: int):
        self.fd = fd

    def expect(self, ranges: list[tuple[int, int]]) -> None:
        pass

    def pread(self, buffer: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [buffer], offset)


class RemoteFolder:
    """A prefix of an fsspec filesystem, seen as a directory (``prefix/name``).

    Args:
        fs: the filesystem.
        path: the prefix, as the filesystem names it.
        name: its URL as the caller wrote it (messages and results name objects under it).
    """

    def __init__(self, fs, path: str, name: str):
        self.fs = fs
        self.path = path.rstrip('/')
        self.name = name.rstrip('/')

    def location(self, name: str) -> remote.Location:
        return remote.Location(self.fs, f'{self.path}/{name}')

    def show(self, name: str) -> str:
        return f'{self.name}/{name}'

    def child(self, name: str) -> RemoteFolder:
        return RemoteFolder(self.fs, f'{self.path}/{name}', self.show(name))

    def make(self) -> None:
        pass  # object stores have no directories (and s3fs's makedirs would make a bucket)

    @contextlib.contextmanager
    def output(self, name: str, *, durable: bool, fresh: bool = False,
               size_hint: int | None = None) -> Iterator[BinaryIO]:
        """A stream into the object, committed once the block succeeds (``durable`` is the
        store's own); with ``fresh``, a key no reader looks at before a later commit names it,
        written in place even where the store has no transactions (see
        :func:`remote.remote_output`)."""
        with remote.remote_output(self.location(name), size_hint, fresh=fresh) as out:
            yield cast(BinaryIO, out)

    def read_bytes(self, name: str, limit: int) -> bytes:
        """The object's first ``limit + 1`` bytes at most, in one ranged read.

        Raises:
            FileNotFoundError: no such object.
        """
        try:
            with self.fs.open(f'{self.path}/{name}', 'rb', cache_type='none') as f:
                return f.read(limit + 1)
        except FileNotFoundError:
            raise FileNotFoundError(f'{self.show(name)!r}: no such object') from None

    @contextlib.contextmanager
    def open_ranged(self, name: str) -> Iterator[remote.Ranged]:
        """The object, for ranged reads. Raises FileNotFoundError."""
        with remote.remote_input(self.location(name), self.show(name)) as f:
            yield f

    def remove(self, names) -> None:
        """Removes the objects ``names`` (in one request where the store deletes in bulk);
        those already gone are no error."""
        paths = [f'{self.path}/{name}' for name in names]
        if not paths:
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:  # a store that refuses a missing one: one at a time
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    def exists(self, name: str) -> bool:
        return bool(self.fs.isfile(f'{self.path}/{name}'))

    def modified(self, name: str) -> float:
        """When the object was last written (seconds since the epoch)."""
        moment = self.fs.modified(f'{self.path}/{name}')
        if isinstance(moment, datetime.datetime):
            return moment.timestamp()
        return float(moment)

    def items(self) -> list[Item]:
        """What is directly under the prefix, listed afresh, sorted by name."""
        self.fs.invalidate_cache(self.path)
        try:
            listed = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return []
        found = []
        for info in listed:
            name = info['name'].rstrip('/').rsplit('/', 1)[-1]
            if info['name'].rstrip('/') == self.path:
                continue  # an object at the prefix itself
            is_dir = info.get('type') == 'directory'
            found.append(Item(name, is_dir, 0 if is_dir else int(info.get('size') or 0)))
        return sorted(found, key=lambda item: item.name)


Folder = LocalFolder | RemoteFolder


def folder_of(directory, storage_options: dict | None = None) -> Folder:
    """The folder ``directory`` names: a local path, a URL (with ``storage_options``), an
    fsspec ``OpenFile``, or a folder (returned as it is).

    Raises:
        TypeError: ``storage_options`` with a local path.
    """
    if isinstance(directory, (LocalFolder, RemoteFolder)):
        return directory
    location = remote.location_of(directory, storage_options)
    if location is not None:
        return RemoteFolder(location.fs, location.path, remote.display(directory))
    return LocalFolder(os.fsdecode(directory))


def join(directory, name: str) -> str:
    """``directory/name`` for a local path or a URL."""
    if remote.is_url(directory):
        return f'{directory.rstrip("/")}/{name}'
    return os.path.join(directory, name)
