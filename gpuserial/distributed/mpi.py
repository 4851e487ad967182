"""Sharded saves and loads over an MPI communicator (mpi4py's, or anything with ``rank``,
``size``, ``allgather`` and ``bcast``).

A save runs in three steps, each ended by a collective that shares every rank's status, so
that a failure on any rank makes every rank raise and none waits forever:

1. Every rank serializes its object and describes each entry (shape, dtype, CRC-32 of its
   bytes, and for a :class:`~gpuserial.distributed.index.Shard` its place in the global array).
   The descriptions are gathered; every rank computes the same plan from them
   (:func:`~gpuserial.distributed.index.plan_save`).
2. Every rank writes the chunks the plan gives it into its own stored NPZ, under a name new to
   this save, streamed to that name (locally a temporary file, fsync'd and renamed; on an
   object store an upload straight to the final key, committed when complete: never a copy).
3. Rank 0 writes ``index.json`` (committed as a whole: locally temporary file, fsync, rename,
   directory fsync): the commit point. Only then are the data files of the checkpoint it
   replaced removed.

The directory is a local path or a URL (:mod:`gpuserial.storage.folders`). A failed save
removes the files it wrote and leaves the previous checkpoint as it was. A save killed outright
leaves data files that no index names: :func:`gpuserial.checkpoints.clean` removes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import secrets
from collections.abc import Mapping
from typing import Any

from gpuserial.distributed.index import (
    INDEX_NAME,
    EntryMeta,
    RankFailedError,
    Shard,
    box_shape,
    file_name,
    normalize_box,
    plan_save,
)
from gpuserial.distributed.reading import ReadStats, ShardedReader, read_index
from gpuserial.engine import transfer
from gpuserial.errors import KeyCollisionError, KeyNotFoundError, MismatchError
from gpuserial.formats import _npy, _zipstream, loading, npz
from gpuserial.serializer import child_path, entry_key
from gpuserial.storage import remote
from gpuserial.storage.folders import Folder, LocalFolder, RemoteFolder, folder_of

__all__ = ['load_sharded', 'save_sharded']

Shards = Mapping[str, tuple[tuple[int, ...], Any]]  # full key: (global shape, index)


COMMUNICATOR = ('rank', 'size', 'allgather', 'bcast')  # what a communicator has


def _world(call: str, directory, obj, comm):
    """``comm``, or ``MPI.COMM_WORLD`` for None, once the arguments are checked: a swapped
    pair failed deep inside (``expected str, bytes or os.PathLike object, not dict``), and a
    communicator that is none with ``'str' object has no attribute 'rank'``."""
    if not isinstance(directory, (str, bytes, os.PathLike, LocalFolder, RemoteFolder)) \
            and not remote.is_remote(directory):
        first = (' (the directory comes first)' if isinstance(obj, (str, os.PathLike))
                 else '')
        raise TypeError(f'{call}(directory, obj, comm): directory is a path or a URL, not a '
                        f'{type(directory).__name__}{first}')
    if comm is None:
        from mpi4py import MPI  # only here: gpuserial never imports mpi4py unless asked to

        return MPI.COMM_WORLD
    missing = [name for name in COMMUNICATOR if not hasattr(comm, name)]
    if missing:
        raise TypeError(f'{call}: comm is an mpi4py communicator (or anything with rank, size, '
                        f'allgather and bcast), not a {type(comm).__name__} (it has no '
                        f'{", ".join(missing)})')
    return comm


@dataclasses.dataclass
class _Status:
    """One rank's outcome of a step, as sent to the others (the error itself stays home)."""

    rank: int
    payload: Any = None
    failure: str | None = None  # the error's type and message


def _run(rank: int, step, *args) -> tuple[_Status, BaseException | None]:
    try:
        return _Status(rank, step(*args)), None
    except BaseException as error:  # Ctrl-C too: the other ranks must hear of it
        return _Status(rank, failure=f'{type(error).__name__}: {error}'), error


def _share(comm, status: _Status, error: BaseException | None, what: str,
           cleanup=None) -> list[Any]:
    """Gathers every rank's status; if any failed, runs ``cleanup`` and raises: the failed
    rank its own error, the others :class:`RankFailedError` naming the failed ranks."""
    statuses = comm.allgather(status)
    failures = {s.rank: s.failure for s in statuses if s.failure is not None}
    if not failures:
        return [s.payload for s in statuses]
    if cleanup is not None:
        with contextlib.suppress(Exception):
            cleanup()
    if error is not None:
        raise error
    listed = '; '.join(f'rank {rank}: {message}' for rank, message in sorted(failures.items()))
    raise RankFailedError(f'{what} failed on {len(failures)} of {comm.size} ranks ({listed})',
                          failures)


# ---------------------------------------------------------------------------------------------
# Shards in dicts


def _unwrap(mapping: Mapping, path: str, boxes: dict) -> dict:
    """A copy of a nested dict with each :class:`Shard` replaced by its array; the shards'
    global shapes and indices go into ``boxes`` by full key."""
    plain: dict = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            plain[key] = _unwrap(value, child_path(path, key), boxes)
        elif isinstance(value, Shard):
            boxes[entry_key(path, key)] = (value.global_shape, value.index)
            plain[key] = value.array
        else:
            plain[key] = value
    return plain


def _rewrap(original: dict, plain: dict) -> None:
    """Sets what a load put into ``plain`` (new arrays, scalars) back into ``original``."""
    for key, value in plain.items():
        old = original[key]
        if isinstance(old, dict):
            _rewrap(old, value)
        elif isinstance(old, Shard):
            if value is not old.array:
                original[key] = dataclasses.replace(old, array=value)
        elif value is not old:
            original[key] = value


def _target(obj, shards: Shards | None, path: str = '') -> tuple[Any, dict, dict | None]:
    """The object to serialize, the shards by full key (a dict's under ``path``, where a load
    starts), and the plain copy of a dict."""
    boxes = dict(shards or {})
    if isinstance(obj, dict):
        plain = _unwrap(obj, path, boxes)
        return plain, boxes, plain
    return obj, boxes, None


# ---------------------------------------------------------------------------------------------
# Saving


def _crc(array) -> int:
    crc = 0
    with contextlib.closing(transfer.host_chunks(array)) as chunks:
        for chunk in chunks:
            crc = _zipstream.crc32(chunk, crc)
    return crc


def _describe(obj, shards: Shards | None, folder: Folder, rank: int):
    """Step 1 on one rank: the entries, and their descriptions to gather."""
    folder.make()
    target, boxes, _ = _target(obj, shards)
    entries = npz.collect(folder.name, target)
    unknown = sorted(set(boxes) - set(entries))
    if unknown:
        raise KeyNotFoundError(f'{folder.name!r}: shards= names keys the object does not store: '
                               f'{", ".join(map(repr, unknown))}')
    metas = []
    for key, array in entries.items():
        where = f'{folder.name!r}, key {key!r}'
        if array.dtype.hasobject:
            npz.check_storable([(key, array)], folder.name)  # None only, as a save checks
            metas.append(EntryMeta(key, None, None, 0))
            continue
        shape = tuple(array.shape)
        global_shape = box = None
        if key in boxes:
            global_shape = tuple(int(n) for n in boxes[key][0])
            box = normalize_box(global_shape, boxes[key][1], where)
            if box_shape(box) != shape:
                raise MismatchError(f'{where}: the shard {boxes[key][1]!r} of the global shape '
                                    f'{global_shape} has shape {box_shape(box)}, the array '
                                    f'{shape}')
        metas.append(EntryMeta(key, shape, array.dtype, _crc(array), global_shape, box))
    token = secrets.token_hex(6) if rank == 0 else None
    return entries, metas, token


def _write(folder: Folder, name: str, items: list[tuple[str, Any]], durable: bool
           ) -> tuple[dict[str, int], int]:
    """Step 2 on one rank: its file, streamed to its final name; where each member's values
    start (after its ``.npy`` header), and the file's size."""
    size_hint = sum(array.nbytes for _, array in items) + len(items) * npz.MEMBER_OVERHEAD_BYTES
    with folder.output(name, durable=durable, fresh=True, size_hint=size_hint) as out:
        starts = npz.write_npz(out, items, compression=False)
        size = out.tell()
    offsets = {member: starts[member + npz.SUFFIX] + len(_npy.encode_header(array.dtype,
                                                                            array.shape))
               for member, array in items}
    return offsets, size


def _commit(folder: Folder, document: dict, durable: bool) -> list[str]:
    """Step 3 on rank 0: the index, committed whole; returns the replaced checkpoint's files."""
    try:
        old = list(read_index(folder).files)
    except Exception:  # none, or not readable: nothing of it to remove
        old = []
    with folder.output(INDEX_NAME, durable=durable) as out:
        out.write(json.dumps(document, indent=1).encode())
    return [name for name in old if name not in document['files']]


def save_sharded(directory: str | os.PathLike, obj, comm=None, *, shards: Shards | None = None,
                 durable: bool = True, storage_options: dict | None = None) -> None:
    """Saves every rank's object into one sharded checkpoint (collective: every rank calls it).

    Values that every rank holding the key holds alike (same shape, dtype and CRC-32 of the
    bytes: data-parallel replicas) are written once, the work spread over the ranks by bytes.
    Parts of global arrays (a :class:`Shard` in a dict, or named in ``shards``) are written by
    a rank that holds them, each distinct part once. Values that differ between ranks are kept
    per rank (``local``). The checkpoint exists once ``index.json`` is in place, written last.

    Args:
        directory: the checkpoint's directory (made if missing; shared by every rank), or a
            URL (``s3://bucket/run/step-100``: objects ``.../rank-00000-TOKEN.npz`` and
            ``.../index.json``). A checkpoint already there stays whole until the new index
            replaces it; then its data files are removed.
        obj: a serializable object, or a dict (values may be :class:`Shard`).
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
        shards: for objects, full key -> ``(global_shape, index)``: the part of a global array
            this rank's entry holds (``index`` a slice or a tuple of slices of step 1).
        durable: fsync the files and the directory (local directories).
        storage_options: for a URL, the options of its fsspec filesystem.

    Raises:
        gpuserial.distributed.RankFailedError: on the other ranks, when a rank failed; the
            failed rank raises its own error. No index is written then, the new files are
            removed, and the previous checkpoint is intact.
        gpuserial.errors.MismatchError: (on every rank) ranks disagree about a shard.
    """
    comm = _world('save_sharded', directory, obj, comm)
    rank = comm.rank
    folder = folder_of(directory, storage_options)
    status, error = _run(rank, _describe, obj, shards, folder, rank)
    gathered = _share(comm, dataclasses.replace(
        status, payload=None if status.payload is None else status.payload[1:]),
        error, f'saving {folder.name!r}')
    entries = status.payload[0]
    token = gathered[0][1]
    try:  # on every rank alike: each raises the same error
        plan = plan_save([metas for metas, _ in gathered])
    except (MismatchError, KeyCollisionError) as refused:
        raise type(refused)(f'{folder.name!r}, {refused}') from None
    name = file_name(rank, token)
    items = [(member, entries[key]) for key, member in plan.writes[rank]]
    status, error = _run(rank, lambda: _write(folder, name, items, durable) if items
                         else ({}, 0))
    written = _share(comm, status, error, f'saving {folder.name!r}',
                     cleanup=lambda: folder.remove([name]))
    status = _Status(rank)
    if rank == 0:  # whatever fails here, the other ranks hear of it
        status, error = _run(rank, lambda: _commit(folder, plan.document(
            comm.size, token, {r: w[0] for r, w in enumerate(written)},
            {r: w[1] for r, w in enumerate(written)}), durable))
    result = comm.bcast(status, root=0)
    if result.failure is not None:
        folder.remove([name])
        if rank == 0:
            assert error is not None
            raise error
        raise RankFailedError(f'saving {folder.name!r} failed on rank 0 writing the index '
                              f'({result.failure})', {0: result.failure})
    if rank == 0:
        folder.remove(result.payload)


# ---------------------------------------------------------------------------------------------
# Loading


def _portable(error: BaseException) -> BaseException:
    """``error`` if it can travel to the other ranks (pickles), else a stand-in saying it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RankFailedError(f'rank 0: {type(error).__name__}: {error}')


def load_sharded(directory: str | os.PathLike, obj, comm=None, *, shards: Shards | None = None,
                 path: str = '', strict: bool = True, ignore_names=None, device=None,
                 storage_options: dict | None = None) -> ReadStats:
    """Loads every rank's object from a sharded checkpoint (collective: every rank calls it),
    saved by any number of ranks.

    Each rank reads what its object asks for: whole arrays, or for a :class:`Shard` in a dict
    (or a key named in ``shards``) its block of the global array. Only the bytes of the saved
    chunks that intersect the request are read, straight into the target (device arrays
    through the staging engine); from an object store, by ranged reads of those bytes (runs
    of a piece closer than :data:`~gpuserial.storage.remote.FETCH_GAP` in one request).
    A ``local`` key gives each rank the value saved by the rank of the same number. The
    semantics are :func:`gpuserial.load_npz`'s: arrays load in place with a ``same_kind`` cast
    and an exact shape, and a failed load fills no array.

    Args:
        directory: the checkpoint's directory, or its URL.
        obj: a serializable object, or a dict (values may be :class:`Shard`).
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
        shards: for objects, full key -> ``(global_shape, index)``: the block to load.
        path, strict, ignore_names, device: as for :func:`gpuserial.load_npz`.
        storage_options: for a URL, the options of its fsspec filesystem.

    Returns:
        The bytes this rank read from the data files and the bytes of the values it filled.

    Raises:
        FileNotFoundError: (on every rank) no committed checkpoint in ``directory``.
        gpuserial.distributed.RankFailedError: on the other ranks, when a rank failed; the
            failed rank raises its own error (``KeyNotFoundError``, ``MismatchError``, ...).
    """
    comm = _world('load_sharded', directory, obj, comm)
    rank = comm.rank
    folder = folder_of(directory, storage_options)
    shared: tuple[Any, BaseException | None] = (None, None)
    if rank == 0:
        try:
            shared = (read_index(folder), None)
        except Exception as problem:
            shared = (None, _portable(problem))
    index, failure = comm.bcast(shared, root=0)
    if failure is not None:
        raise failure

    with contextlib.ExitStack() as open_files:

        def check():  # every key, shape and dtype; nothing filled
            target, boxes, plain = _target(obj, shards, path)
            reader = open_files.enter_context(ShardedReader(folder, index, rank, boxes))
            return reader, loading.ReaderDeserializer(
                reader, path, strict, ignore_names, device=device).prepare(target), plain

        status, error = _run(rank, check)
        _share(comm, dataclasses.replace(status, payload=None), error,
               f'loading {folder.name!r}')
        reader, fill, plain = status.payload  # every rank's checks passed

        def load():
            fill()
            if plain is not None:
                _rewrap(obj, plain)
            return reader.stats

        status, error = _run(rank, load)
        _share(comm, dataclasses.replace(status, payload=None), error,
               f'loading {folder.name!r}')
    return status.payload
