"""Checkpoints under a prefix (a local directory or a URL): the newest committed one
(:func:`latest`), and the leftovers of saves that never committed (:func:`clean`).

A checkpoint under a prefix is either a single NPZ or HDF5 file (any name: it is recognised by
its first bytes) or a sharded checkpoint's directory (:mod:`gpuserial.distributed`), directly
under the prefix. Either exists only once committed: a single file once renamed into place or
its upload completed, a sharded checkpoint once its ``index.json`` is written (last).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import os
import re
import time
from collections.abc import Callable

from gpuserial.storage import _fileio, remote
from gpuserial.storage.folders import Folder, Item, LocalFolder, RemoteFolder, folder_of

__all__ = ['CLEAN_AGE', 'Leftover', 'clean', 'latest']

CLEAN_AGE = 3600.0  # seconds: clean() leaves younger leftovers alone (a save may be writing them)
SIGNATURE_BYTES = 8  # the first bytes that tell an NPZ or HDF5 file
HEAD_BYTES = 30 + 1024  # read to tell them: a zip's first local header and its member's name
EXTENSIONS = re.compile(r'\.(npz|h5|hdf5|hdf)$')  # left out when looking for a name's number


def _number(name: str) -> int | None:
    """The last number in ``name`` once its extension is gone (``snapshot_iter_1200`` ->
    1200, ``step-7.npz`` -> 7, ``model.h5`` -> None)."""
    found = re.findall(r'\d+', EXTENSIONS.sub('', name))
    return int(found[-1]) if found else None


def _is_leftover_name(name: str) -> bool:
    """A temporary file or key of a save in flight (or killed): never a checkpoint."""
    return name.startswith('.') or remote.TEMP_MARK in name


def _committed(folder: Folder, item: Item) -> bool:
    """Whether ``item`` is a committed checkpoint: a directory holding an index, or an NPZ or
    HDF5 file (a sharded checkpoint's own data files are not: they are parts)."""
    from gpuserial.distributed.index import FILE_NAME, INDEX_NAME
    from gpuserial.tools.inspection import HDF5_SIGNATURE, ZIP_SIGNATURES

    if item.is_dir:
        return folder.child(item.name).exists(INDEX_NAME)
    if FILE_NAME.fullmatch(item.name) or item.size < len(ZIP_SIGNATURES[0]):
        return False
    try:
        head = folder.read_bytes(item.name, HEAD_BYTES - 1)
    except (FileNotFoundError, IsADirectoryError):  # removed meanwhile
        return False
    if head.startswith(ZIP_SIGNATURES[0]):
        return _is_npz_head(head)
    return head.startswith(ZIP_SIGNATURES[1]) or head[:SIGNATURE_BYTES] == HDF5_SIGNATURE


def _is_npz_head(head: bytes) -> bool:
    """Whether a zip that starts with ``head`` is an NPZ: its first member is a ``.npy``
    (torch.save's files are zips too, as are archives of logs). A name longer than ``head``
    is taken to be one."""
    if len(head) < 30:
        return False
    length = int.from_bytes(head[26:28], 'little')
    name = head[30:30 + length]
    return len(name) < length or name.endswith(b'.npy')


def _modified(folder: Folder, item: Item) -> float:
    """When ``item`` was committed: a file's modification time, a sharded checkpoint's
    index's."""
    from gpuserial.distributed.index import INDEX_NAME

    if item.is_dir:
        return folder.child(item.name).modified(INDEX_NAME)
    return folder.modified(item.name)


def latest(prefix, storage_options: dict | None = None, *, pattern: str | None = None
           ) -> str | None:
    """The newest committed checkpoint directly under ``prefix``, or None where there is none
    (a ``prefix`` that does not exist yet included: a run's first start, or a misspelt name).

    Checkpoints are single NPZ or HDF5 files (recognised by their first bytes, whatever their
    name; a zip whose first member is no ``.npy``, as ``torch.save`` writes, is none) and
    sharded checkpoint directories holding their index. Left out: directories without an
    index (a sharded save that did not commit), temporary files and keys of saves (in flight
    or killed), other files (logs), and uploads in flight (which object stores do not show).

    Newest means: when the name of every committed checkpoint carries a number (the last run
    of digits once ``.npz``/``.h5``/``.hdf5`` is gone: ``snapshot_iter_1200``, ``step-7.npz``),
    the largest number, the larger name on a tie; otherwise (one name has none, as in
    ``best.npz``) the latest commit (a file's modification time; a sharded checkpoint's
    index's), the larger name on a tie. Numbers go first because modification times on object
    stores come from the store's clock and a copied run gets new ones; a trainer's snapshot
    names (``snapshot_iter_{N}``) carry the iteration.

    Args:
        prefix: a local directory, or a URL (``s3://bucket/run``) read as a directory.
        storage_options: for a URL, the options of its fsspec filesystem.
        pattern: only names that match this shell pattern (``'snapshot_iter_*'``: a trainer's
            snapshots, not the ``snapshot_object`` files beside them), case-sensitive.

    Returns:
        The checkpoint's path (under ``prefix``) or URL; load it with :func:`gpuserial.load`
        or, for a directory, :func:`gpuserial.distributed.load_sharded`.
    """
    folder = folder_of(prefix, storage_options)
    items = [item for item in folder.items() if not _is_leftover_name(item.name)
             and (pattern is None or fnmatch.fnmatchcase(item.name, pattern))]
    unnumbered = [item for item in items
                  if _number(item.name) is None and _committed(folder, item)]
    numbered = sorted((item for item in items if _number(item.name) is not None),
                      key=lambda item: (_number(item.name), item.name), reverse=True)
    if not unnumbered:  # by number: only the newest few need looking at
        for item in numbered:
            if _committed(folder, item):
                return folder.show(item.name)
        return None
    committed = unnumbered + [item for item in numbered if _committed(folder, item)]
    newest = max(committed, key=lambda item: (_modified(folder, item), item.name))
    return folder.show(newest.name)


# ---------------------------------------------------------------------------------------------
# Leftovers


@dataclasses.dataclass(frozen=True)
class Leftover:
    """Something a save left behind that no committed checkpoint uses.

    Attributes:
        path: its path or URL (for an upload, the URL of its key and the upload's ID).
        size: its bytes (None where not known: an upload in progress).
        why: what it is, and why it is kept where it is.
        removable: whether :func:`clean` removes it (or would, with ``dry_run``).
        remove: removes it (what :func:`clean` calls for each removable one).
    """

    path: str
    size: int | None
    why: str
    removable: bool
    remove: Callable[[], None] = dataclasses.field(repr=False, compare=False)


def _age_text(seconds: float) -> str:
    if seconds < 120:
        return f'{seconds:.0f} s'
    if seconds < 7200:
        return f'{seconds / 60:.0f} min'
    return f'{seconds / 3600:.1f} h'


def _by_age(path: str, size: int | None, what: str, age: float, older_than: float,
            remove: Callable[[], None]) -> Leftover:
    removable = age >= older_than
    why = f'{what}, {_age_text(age)} old' + ('' if removable else
                                              f', younger than {_age_text(older_than)}')
    return Leftover(path, size, why, removable, remove)


def _unlink(path: str) -> Callable[[], None]:
    def remove() -> None:
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile (a save there)
            os.unlink(path)
    return remove


def _local_temporaries(folder: LocalFolder, older_than: float, now: float) -> list[Leftover]:
    """The temporary files of local atomic saves: a stale one (its process, on this host, is
    gone) at once; another host's once old enough; never a running save's."""
    found = []
    for temporary in _fileio.temporaries(folder.path):
        remove = _unlink(temporary.path)
        if temporary.host in (None, _fileio.HOST):
            found.append(Leftover(temporary.path, temporary.size, temporary.why,
                                  temporary.stale, remove))
            continue
        with contextlib.suppress(OSError):
            found.append(_by_age(temporary.path, temporary.size, temporary.why,
                                 now - os.stat(temporary.path).st_mtime, older_than, remove))
    return found


def _temporary_keys(folder: RemoteFolder, items: list[Item], older_than: float, now: float
                    ) -> list[Leftover]:
    """The temporary keys of saves to stores without transactions, moved into place once
    complete: left by a save killed before the move."""
    return [_by_age(folder.show(item.name), item.size, 'a temporary key of a save',
                    now - folder.modified(item.name), older_than,
                    functools.partial(folder.remove, [item.name]))
            for item in items if not item.is_dir and remote.TEMP_MARK in item.name]


def _unreferenced(folder: Folder, items: list[Item], older_than: float, now: float
                  ) -> list[Leftover]:
    """Data files of sharded saves in ``folder`` that its index (if any) does not name; none
    at all where the index cannot be read."""
    from gpuserial.distributed.index import FILE_NAME, INDEX_NAME, parse_index
    from gpuserial.distributed.reading import MAX_INDEX_BYTES

    data = [item for item in items if not item.is_dir and FILE_NAME.fullmatch(item.name)]
    if not data:
        return []
    referenced: set[str] = set()
    what = 'a data file and no index (a sharded save that did not commit)'
    if any(item.name == INDEX_NAME for item in items):
        try:
            referenced = set(parse_index(folder.read_bytes(INDEX_NAME, MAX_INDEX_BYTES),
                                         folder.show(INDEX_NAME)).files)
        except Exception as error:  # noqa: BLE001 - reported, and nothing is removed
            return [Leftover(folder.show(INDEX_NAME), None, f'an index that cannot be read, so '
                             f'nothing beside it is removed ({error})', False, lambda: None)]
        what = 'a data file the index does not name (a sharded save that did not commit)'
    found = []
    for item in data:
        if item.name not in referenced:
            with contextlib.suppress(OSError):  # gone meanwhile
                found.append(_by_age(folder.show(item.name), item.size, what,
                                     now - folder.modified(item.name), older_than,
                                     functools.partial(folder.remove, [item.name])))
    return found


def _uploads(folder: RemoteFolder, older_than: float, now: float) -> list[Leftover]:
    """Incomplete multipart uploads under the prefix, where the filesystem lists them (s3fs's
    ``list_multipart_uploads``: the bucket's first 1000); none elsewhere."""
    fs = folder.fs
    if not hasattr(fs, 'list_multipart_uploads'):
        return []
    bucket, _, key = folder.path.partition('/')
    found = []
    for upload in fs.list_multipart_uploads(bucket):
        if upload['Key'].startswith(f'{key}/' if key else ''):
            url = fs.unstrip_protocol(f'{bucket}/{upload["Key"]}')
            found.append(_by_age(
                f'{url} (upload {upload["UploadId"]})', None, 'an incomplete multipart upload',
                now - upload['Initiated'].timestamp(), older_than,
                functools.partial(fs.abort_mpu, bucket, upload['Key'], upload['UploadId'])))
    return found


def clean(prefix, *, older_than: float = CLEAN_AGE, dry_run: bool = False,
          storage_options: dict | None = None) -> list[Leftover]:
    """Removes what saves that never committed left under ``prefix`` (in it, and in the
    directories directly in it); never anything a committed checkpoint uses.

    What it finds:

    - temporary files of local atomic saves (``.NAME.PID-HOST-TOKEN.gpuserial-tmp``): removed
      when their process, on this host, is gone; another host's when older than
      ``older_than``; a running save's never;
    - temporary keys of saves to stores without transactions (``NAME.gpuserial-tmp-...``),
      and data files of sharded checkpoints (``rank-NNNNN-TOKEN.npz``) that their
      directory's index does not name (a killed save's), when older than ``older_than``. A
      directory whose index cannot be read is left alone;
    - where the filesystem lists them (s3fs), incomplete multipart uploads under the prefix
      older than ``older_than``: aborted.

    Age is the time since the last write (an upload's: since it began), so ``older_than``
    must exceed the longest time a save into the prefix takes: a sharded save's data files
    are named by no index until its index is written, last.

    Args:
        prefix: a local directory or a URL.
        older_than: seconds; younger leftovers are listed and kept.
        dry_run: list only; remove nothing.
        storage_options: for a URL, the options of its fsspec filesystem.

    Returns:
        Everything found, removable or kept, with the reason.

    Raises:
        NotADirectoryError: a local prefix that is not a directory.
    """
    folder = folder_of(prefix, storage_options)
    if isinstance(folder, LocalFolder) and not os.path.isdir(folder.path):
        raise NotADirectoryError(f'{folder.path!r}: no such directory')
    now = time.time()
    found: list[Leftover] = []
    for place in [folder, *(folder.child(item.name) for item in folder.items() if item.is_dir)]:
        items = place.items()
        if isinstance(place, LocalFolder):
            found += _local_temporaries(place, older_than, now)
        else:
            found += _temporary_keys(place, items, older_than, now)
        found += _unreferenced(place, items, older_than, now)
    if isinstance(folder, RemoteFolder):
        found += _uploads(folder, older_than, now)
    if not dry_run:
        for leftover in found:
            if leftover.removable:
                leftover.remove()
    return found
