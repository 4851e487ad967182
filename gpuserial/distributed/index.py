"""The sharded checkpoint's layout as pure functions: shards, the save planner, the JSON index
and the read planner. Nothing here talks to MPI or touches array data, so all of it is tested
in one process.

A checkpoint is a directory: one stored (uncompressed) NPZ per rank that wrote something
(``rank-00003-TOKEN.npz``) and ``index.json``, written last, which is the commit point. The
index names, for every key, its kind and its chunks:

- ``replicated``: every rank that held the key held the same bytes (same shape, dtype and
  CRC-32); one chunk, the whole array, written by one of those ranks.
- ``sharded``: ranks declared their parts of a global array (:class:`Shard`); one chunk per
  distinct part, written by one rank that holds it.
- ``local``: ranks held different values under the key; each rank's value is kept, under its
  rank, for the rank of the same number to load.
- ``none``: a stored ``None``, in the index only.

A chunk says where its values lie in the global array (``offsets``, ``shape``), which file and
member hold them, and where their C-order bytes start in that file (``data_offset``), with the
CRC-32 of those bytes. Loads read byte ranges straight from there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy
from numpy.lib import format as npformat

from gpuserial.errors import CorruptFileError, GpuserialError, KeyCollisionError, MismatchError
from gpuserial.formats import _npy

__all__ = ['FILE_NAME', 'INDEX_NAME', 'Chunk', 'EntryMeta', 'Piece', 'RankFailedError',
           'SavePlan', 'Shard', 'file_name', 'normalize_box', 'parse_index', 'plan_reads',
           'plan_save']

INDEX_NAME = 'index.json'
FORMAT = 'gpuserial.sharded'
VERSION = 1
SHARD_MARK = '@'  # a shard's member is KEY@OFFSETS (``emb@0,64``)

Box = tuple[tuple[int, int], ...]  # (start, stop) per dimension


class RankFailedError(GpuserialError, RuntimeError):
    """Another rank of a sharded save or load failed; this rank raises too, so that none hangs.

    Attributes:
        failures: the failed ranks and their error messages.
    """

    def __init__(self, message: str, failures: Mapping[int, str] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


def file_name(rank: int, token: str) -> str:
    """The data file a rank writes in one save (its name matches :data:`FILE_NAME`)."""
    return f'rank-{rank:05d}-{token}.npz'


FILE_NAME = re.compile(r'rank-\d{5,}-[0-9a-f]+\.npz')  # the names file_name gives


def normalize_box(global_shape: Sequence[int], index, where: str) -> Box:
    """``(start, stop)`` per dimension from ``index``, a slice (step 1) or a tuple of them;
    dimensions left out are whole (all of them for None).

    Raises:
        ValueError: not slices of step 1, more slices than dimensions, or out of bounds.
    """
    shape = tuple(int(n) for n in global_shape)
    if any(n < 0 for n in shape):
        raise ValueError(f'{where}: a global shape {shape} with a negative size')
    slices = () if index is None else index if isinstance(index, tuple) else (index,)
    if len(slices) > len(shape):
        raise ValueError(f'{where}: {len(slices)} slices for a global shape {shape}')
    box = []
    for dim, size in enumerate(shape):
        part = slices[dim] if dim < len(slices) else slice(None)
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise ValueError(f'{where}: a shard is given by slices of step 1 per dimension, '
                             f'got {part!r} in dimension {dim}')
        start = 0 if part.start is None else int(part.start)
        stop = size if part.stop is None else int(part.stop)
        if not 0 <= start <= stop <= size:
            raise ValueError(f'{where}: slice {start}:{stop} of dimension {dim} is out of '
                             f'bounds for the global shape {shape}')
        box.append((start, stop))
    return tuple(box)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's part of a global array, as a value in a dict that is saved or loaded.

    ``array`` holds ``global[index]``: ``Shard(w[:, 64:128], (512, 256), (slice(None),
    slice(64, 128)))``. For objects (links, trainers) name the parts instead, by full key:
    ``shards={'predictor/l1/W': ((512, 256), (slice(None), slice(64, 128)))}``.

    Args:
        array: the part (any backend); loads fill it in place.
        global_shape: the whole array's shape.
        index: a slice (step 1) or a tuple of them, one per leading dimension (None: the
            whole array).
    """

    array: Any
    global_shape: tuple[int, ...]
    index: Any = None

    @property
    def box(self) -> Box:
        return normalize_box(self.global_shape, self.index, 'Shard')


@dataclasses.dataclass(frozen=True)
class EntryMeta:
    """What one rank holds under one key: gathered from every rank before planning."""

    key: str
    shape: tuple[int, ...] | None  # None for a stored None
    dtype: numpy.dtype | None
    crc: int  # CRC-32 of the C-order bytes
    global_shape: tuple[int, ...] | None = None  # for a shard
    box: Box | None = None  # for a shard

    @property
    def nbytes(self) -> int:
        if self.shape is None or self.dtype is None:
            return 0
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def same(self) -> tuple:
        """What must agree for two ranks' values to be one replicated value."""
        return (self.shape, None if self.dtype is None else self.dtype.str, self.crc)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A block of a global array in one member of one rank's file."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    writer: int
    member: str  # the NPZ key (the zip member without ``.npy``)
    crc: int

    @property
    def box(self) -> Box:
        return tuple((o, o + n) for o, n in zip(self.offsets, self.shape, strict=True))


@dataclasses.dataclass
class PlannedEntry:
    """One key of the checkpoint (for ``local`` keys, one rank's value)."""

    kind: str  # 'replicated', 'sharded', 'none' (and each rank's 'array' or 'none' of 'local')
    shape: tuple[int, ...] | None = None
    dtype: numpy.dtype | None = None
    chunks: list[Chunk] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SavePlan:
    """Who writes what: the same on every rank, since every rank plans from the same data."""

    entries: dict[str, PlannedEntry]  # replicated, sharded and none keys
    local: dict[str, dict[int, PlannedEntry]]  # local keys: each rank's value
    writes: dict[int, list[tuple[str, str]]]  # rank: (key, member) pairs, in order

    def chunks(self):
        for entry in self.entries.values():
            yield from entry.chunks
        for ranks in self.local.values():
            for entry in ranks.values():
                yield from entry.chunks

    def document(self, world_size: int, token: str, offsets: Mapping[int, Mapping[str, int]],
                 sizes: Mapping[int, int]) -> dict:
        """The JSON index, given where each rank's members' data start and its file size."""

        def entry_json(entry: PlannedEntry) -> dict:
            if entry.kind == 'none':
                return {'kind': 'none'}
            assert entry.shape is not None and entry.dtype is not None  # an array
            return {'kind': entry.kind, 'shape': list(entry.shape),
                    'dtype': dtype_to_json(entry.dtype),
                    'chunks': [{'offsets': list(c.offsets), 'shape': list(c.shape),
                                'file': file_name(c.writer, token), 'member': c.member,
                                'data_offset': offsets[c.writer][c.member], 'crc32': c.crc}
                               for c in entry.chunks]}

        entries: dict[str, dict] = {key: entry_json(e) for key, e in self.entries.items()}
        for key, ranks in self.local.items():
            entries[key] = {'kind': 'local', 'ranks': {str(r): entry_json(e)
                                                       for r, e in sorted(ranks.items())}}
        return {'format': FORMAT, 'version': VERSION, 'world_size': world_size, 'token': token,
                'files': {file_name(r, token): {'rank': r, 'size': sizes[r]}
                          for r in sorted(self.writes) if self.writes[r]},
                'entries': dict(sorted(entries.items()))}


def _holders_text(ranks: Sequence[int]) -> str:
    return 'rank ' + str(ranks[0]) if len(ranks) == 1 else 'ranks ' + ', '.join(map(str, ranks))


def plan_save(metas: Sequence[Sequence[EntryMeta]]) -> SavePlan:
    """Plans a save from every rank's entries (``metas[rank]``): the kind of each key, its
    chunks, and which rank writes each chunk, spreading the bytes over the ranks.

    Chunks that only one rank can write (local values) are assigned first; then the rest,
    largest first, each to the least loaded rank that holds it (the lowest rank on a tie).

    Raises:
        MismatchError: ranks disagree on a shard's global shape or dtype, a key is a shard on
            some ranks and a whole value on others, parts overlap without being equal, two
            ranks hold the same part with different values, or the parts leave a gap.
        KeyCollisionError: a key's data would be stored under another key's member name
            (``emb@0`` is a shard of ``emb``).
    """
    by_key: dict[str, list[tuple[int, EntryMeta]]] = {}
    for rank, rank_metas in enumerate(metas):
        for meta in rank_metas:
            by_key.setdefault(meta.key, []).append((rank, meta))
    entries: dict[str, PlannedEntry] = {}
    local: dict[str, dict[int, PlannedEntry]] = {}
    jobs: list[tuple[int, str, str, list[int], Chunk]] = []  # bytes, key, member, holders
    for key in sorted(by_key):
        held = by_key[key]
        shards = [rank for rank, meta in held if meta.box is not None]
        if shards and len(shards) != len(held):
            whole = [rank for rank, meta in held if meta.box is None]
            raise MismatchError(f'key {key!r}: a shard on {_holders_text(shards)} and a whole '
                                f'value on {_holders_text(whole)}')
        if shards:
            entries[key] = _plan_shards(key, held, jobs)
        elif all(meta.shape is None for _, meta in held):
            entries[key] = PlannedEntry('none')
        elif len({meta.same for _, meta in held}) == 1:
            meta = held[0][1]
            chunk = Chunk((0,) * len(meta.shape or ()), meta.shape or (), -1, key, meta.crc)
            entries[key] = PlannedEntry('replicated', meta.shape, meta.dtype, [chunk])
            jobs.append((meta.nbytes, key, key, [rank for rank, _ in held], chunk))
        else:
            local[key] = {}
            for rank, meta in held:
                if meta.shape is None:
                    local[key][rank] = PlannedEntry('none')
                    continue
                chunk = Chunk((0,) * len(meta.shape), meta.shape, rank, key, meta.crc)
                local[key][rank] = PlannedEntry('array', meta.shape, meta.dtype, [chunk])
                jobs.append((meta.nbytes, key, key, [rank], chunk))
    owners: dict[str, str] = {}  # member name: the key whose data it holds
    for _, key, member, _, _ in jobs:
        if owners.setdefault(member, key) != key:
            raise KeyCollisionError(f'key {key!r}: its data would be stored as member '
                                    f'{member!r}, as would key {owners[member]!r}\'s (a '
                                    f'shard\'s member is its key, {SHARD_MARK!r} and its '
                                    f'offsets)')
    writers = _assign(jobs, len(metas))
    writes: dict[int, list[tuple[str, str]]] = {rank: [] for rank in range(len(metas))}
    for key, entry in entries.items():
        entry.chunks = [dataclasses.replace(c, writer=writers.get(id(c), c.writer))
                        for c in entry.chunks]
        for chunk in entry.chunks:
            writes[chunk.writer].append((key, chunk.member))
    for key, ranks in local.items():
        for rank, entry in ranks.items():
            for chunk in entry.chunks:
                writes[rank].append((key, chunk.member))
    return SavePlan(entries, local, writes)


def _plan_shards(key: str, held: list[tuple[int, EntryMeta]], jobs: list) -> PlannedEntry:
    first_rank, first = held[0]
    for rank, meta in held[1:]:
        if (meta.global_shape, meta.dtype) != (first.global_shape, first.dtype):
            raise MismatchError(
                f'key {key!r}: rank {first_rank} declares a shard of a global array of shape '
                f'{first.global_shape} and dtype {first.dtype}, rank {rank} of shape '
                f'{meta.global_shape} and dtype {meta.dtype}')
    parts: dict[Box, tuple[list[int], EntryMeta]] = {}
    for rank, meta in held:
        assert meta.box is not None
        if meta.box in parts:
            other = parts[meta.box]
            if other[1].crc != meta.crc:
                raise MismatchError(f'key {key!r}: ranks {other[0][0]} and {rank} hold the same '
                                    f'part {_box_text(meta.box)} with different values')
            other[0].append(rank)
        else:
            parts[meta.box] = ([rank], meta)
    boxes = sorted(parts)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if _intersect(a, b) is not None:
                raise MismatchError(f'key {key!r}: parts {_box_text(a)} (rank {parts[a][0][0]})'
                                    f' and {_box_text(b)} (rank {parts[b][0][0]}) overlap')
    assert first.global_shape is not None
    covered = sum(math.prod(box_shape(box)) for box in boxes)
    if covered != math.prod(first.global_shape):
        raise MismatchError(f'key {key!r}: the parts cover {covered} of the '
                            f'{math.prod(first.global_shape)} elements of the global shape '
                            f'{first.global_shape}')
    chunks = []
    for box in boxes:
        holders, meta = parts[box]
        offsets = tuple(start for start, _ in box)
        member = key + SHARD_MARK + ','.join(map(str, offsets))
        chunk = Chunk(offsets, box_shape(box), -1, member, meta.crc)
        chunks.append(chunk)
        jobs.append((meta.nbytes, key, member, holders, chunk))
    return PlannedEntry('sharded', first.global_shape, first.dtype, chunks)


def _assign(jobs: list[tuple[int, str, str, list[int], Chunk]], world_size: int
            ) -> dict[int, int]:
    """Writers (by ``id`` of the chunk) of the jobs that several ranks could write, balancing
    bytes: fixed jobs first, then the largest first to the least loaded holder."""
    load = [0] * world_size
    free = []
    for job in jobs:
        if len(job[3]) == 1:
            load[job[3][0]] += job[0]
        else:
            free.append(job)
    writers = {id(job[4]): job[3][0] for job in jobs if len(job[3]) == 1}
    for nbytes, _, _, holders, chunk in sorted(free, key=lambda j: (-j[0], j[1], j[2])):
        rank = min(holders, key=lambda r: (load[r], r))
        load[rank] += nbytes
        writers[id(chunk)] = rank
    return writers


def _box_text(box: Box) -> str:
    return '[' + ', '.join(f'{a}:{b}' for a, b in box) + ']'


def _intersect(a: Box, b: Box) -> Box | None:
    box = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    if any(start >= stop for start, stop in box):
        return None
    return box


# ---------------------------------------------------------------------------------------------
# The index file


def dtype_to_json(dtype: numpy.dtype):
    """The dtype as numpy's ``.npy`` header writes it (``'<f4'``, or a list for structured
    dtypes such as the encoding of bfloat16)."""
    return npformat.dtype_to_descr(_npy.without_metadata(dtype))


def dtype_from_json(descr, where: str) -> numpy.dtype:
    def fields(value):  # a structured dtype's fields, as JSON gave back their tuples
        return [field(*item) if isinstance(item, list) else item for item in value]

    def field(name, kind, *shape):  # its name may be [title, name], its type a structure
        return (tuple(name) if isinstance(name, list) else name,
                fields(kind) if isinstance(kind, list) else kind,
                *(tuple(extent) if isinstance(extent, list) else extent for extent in shape))

    try:
        dtype = npformat.descr_to_dtype(fields(descr) if isinstance(descr, list) else descr)
    except (TypeError, ValueError, IndexError) as error:
        raise CorruptFileError(f'{where}: not a dtype: {descr!r} ({error})') from None
    if dtype.hasobject:
        raise CorruptFileError(f'{where}: an object dtype {descr!r} (never loaded)')
    return dtype


@dataclasses.dataclass(frozen=True)
class SavedChunk:
    """A chunk as the index gives it, checked."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    file: str
    member: str
    data_offset: int
    crc: int

    @property
    def box(self) -> Box:
        return tuple((o, o + n) for o, n in zip(self.offsets, self.shape, strict=True))


@dataclasses.dataclass(frozen=True)
class SavedEntry:
    """An array (its global shape, dtype and chunks) or a stored None, from the index."""

    kind: str
    shape: tuple[int, ...] | None = None
    dtype: numpy.dtype | None = None
    chunks: tuple[SavedChunk, ...] = ()


@dataclasses.dataclass(frozen=True)
class Index:
    """A parsed, checked ``index.json``."""

    world_size: int
    token: str
    files: dict[str, int]  # name: size
    entries: dict[str, SavedEntry]  # replicated, sharded, none
    local: dict[str, dict[int, SavedEntry]]

    def keys(self) -> list[str]:
        return sorted([*self.entries, *self.local])


def _ints(value, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise CorruptFileError(f'{where}: {what} must be a list of non-negative integers, got '
                               f'{value!r}')
    return tuple(value)


def _entry(doc, files: Mapping[str, int], where: str) -> SavedEntry:
    if not isinstance(doc, dict) or doc.get('kind') not in ('replicated', 'sharded', 'array',
                                                            'none'):
        raise CorruptFileError(f'{where}: not an entry: {doc!r}'[:300])
    if doc['kind'] == 'none':
        return SavedEntry('none')
    shape = _ints(doc.get('shape'), where, 'shape')
    dtype = dtype_from_json(doc.get('dtype'), where)
    chunks = []
    for chunk in doc.get('chunks') or []:
        try:
            saved = SavedChunk(_ints(chunk['offsets'], where, 'offsets'),
                               _ints(chunk['shape'], where, 'a chunk shape'), chunk['file'],
                               chunk['member'], int(chunk['data_offset']), int(chunk['crc32']))
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptFileError(f'{where}: a malformed chunk {chunk!r} ({error})') from None
        if saved.file not in files:
            raise CorruptFileError(f'{where}: a chunk in {saved.file!r}, which the index does '
                                   f'not list')
        if len(saved.offsets) != len(shape) or len(saved.shape) != len(shape):
            raise CorruptFileError(f'{where}: a chunk of offsets {list(saved.offsets)} and shape '
                                   f'{list(saved.shape)} in an array of shape {shape}')
        if any(stop > size for (_, stop), size in zip(saved.box, shape, strict=True)):
            raise CorruptFileError(f'{where}: chunk {_box_text(saved.box)} is outside the '
                                   f'shape {shape}')
        end = saved.data_offset + math.prod(saved.shape) * dtype.itemsize
        if saved.data_offset < 0 or end > files[saved.file]:
            raise CorruptFileError(f'{where}: chunk {_box_text(saved.box)} runs to byte {end} '
                                   f'of {saved.file!r}, which has {files[saved.file]} bytes')
        chunks.append(saved)
    covered = sum(math.prod(c.shape) for c in chunks)
    if covered != math.prod(shape):
        raise CorruptFileError(f'{where}: chunks cover {covered} of {math.prod(shape)} '
                               f'elements')
    return SavedEntry(doc['kind'], shape, dtype, tuple(chunks))


def parse_index(text: bytes | str, name: str) -> Index:
    """Checks and parses an ``index.json`` (named ``name`` in messages).

    Raises:
        CorruptFileError: not JSON, not this format, a newer version, or an entry that
            does not add up (chunks outside the shape, past the end of their file, a gap).
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptFileError(f'{name!r}: not a JSON index: {error}') from None
    if not isinstance(doc, dict) or doc.get('format') != FORMAT:
        raise CorruptFileError(f'{name!r}: not a gpuserial sharded checkpoint index '
                               f'(format {doc.get("format") if isinstance(doc, dict) else None!r}'
                               f', expected {FORMAT!r})')
    if doc.get('version') != VERSION:
        raise CorruptFileError(f'{name!r}: index version {doc.get("version")!r}; this '
                               f'gpuserial reads version {VERSION}')
    try:
        files = {str(f): int(info['size']) for f, info in doc['files'].items()}
        world_size, token = int(doc['world_size']), str(doc['token'])
        raw = doc['entries']
        raw.items()
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CorruptFileError(f'{name!r}: a malformed index ({error!r})') from None
    entries, local = {}, {}
    for key, entry in raw.items():
        where = f'{name!r}, key {key!r}'
        if isinstance(entry, dict) and entry.get('kind') == 'local':
            ranks = entry.get('ranks')
            if not isinstance(ranks, dict) or not all(r.isdigit() for r in ranks):
                raise CorruptFileError(f'{where}: a local entry without ranks')
            local[key] = {int(r): _entry(e, files, where) for r, e in ranks.items()}
        else:
            entries[key] = _entry(entry, files, where)
    return Index(world_size, token, files, entries, local)


# ---------------------------------------------------------------------------------------------
# Reads


@dataclasses.dataclass(frozen=True)
class Piece:
    """The part of a request that one saved chunk holds: ``src`` in the chunk's coordinates,
    ``dst`` in the request's."""

    chunk: SavedChunk
    src: Box
    dst: Box

    @property
    def whole_chunk(self) -> bool:
        return box_shape(self.src) == self.chunk.shape


def plan_reads(chunks: Sequence[SavedChunk], request: Box, where: str) -> list[Piece]:
    """The pieces to read for the block ``request`` of a global array: its intersection with
    each saved chunk (chunks do not overlap), so nothing outside the request is read.

    Raises:
        CorruptFileError: the chunks leave part of the request uncovered.
    """
    pieces = []
    for chunk in chunks:
        common = _intersect(chunk.box, request)
        if common is None:
            continue
        pieces.append(Piece(
            chunk, tuple((a - o, b - o) for (a, b), o in zip(common, chunk.offsets, strict=True)),
            tuple((a - r, b - r) for (a, b), (r, _) in zip(common, request, strict=True))))
    covered = sum(math.prod(box_shape(p.src)) for p in pieces)
    needed = math.prod(box_shape(request))
    if covered != needed:
        raise CorruptFileError(f'{where}: the saved chunks hold {covered} of the {needed} '
                               f'elements of {_box_text(request)}')
    return pieces
