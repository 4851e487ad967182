"""Reading a sharded checkpoint: the index, byte-range reads of chunks straight into targets,
consolidation into one NPZ, and a description for ``gpuserial inspect``.

Every read is of exactly the bytes a request needs: the index says where each chunk's C-order
data starts, and :func:`gpuserial.formats.loading.box_reads` gives the runs of a box. Locally
each run is a ``pread``; from an object store, every run of a piece is announced before the
first is read, so that runs closer together than :data:`remote.FETCH_GAP` come in one ranged
read (a strided block costs a few requests, not one per row), in pieces of at most
:data:`gpuserial.storage.remote.FETCH_PIECE` bytes, several in flight. The runs stream into
the target through :func:`gpuserial.engine.transfer.fill` (device arrays through the pinned
staging buffers), so no chunk is ever held whole on the host. A piece that is a whole chunk is
checked against the chunk's CRC-32 as it streams in; a part of a chunk cannot be (the CRC
covers the whole chunk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy

from gpuserial.distributed.index import (
    INDEX_NAME,
    Box,
    Index,
    Piece,
    SavedEntry,
    box_shape,
    normalize_box,
    parse_index,
    plan_reads,
)
from gpuserial.engine import transfer
from gpuserial.errors import CorruptFileError, MismatchError, ReadFailedError
from gpuserial.formats import _zipstream, loading, npz
from gpuserial.formats.loading import Entry
from gpuserial.storage import remote
from gpuserial.storage._fileio import atomic_output, check_options_have_a_url
from gpuserial.storage.folders import RemoteFolder, folder_of

MAX_INDEX_BYTES = 1 << 30  # an index larger than this is not one


def read_index(directory, storage_options: dict | None = None) -> Index:
    """The checked index of the checkpoint in ``directory`` (a path or a URL).

    Raises:
        FileNotFoundError: no committed checkpoint there (no index).
        NotADirectoryError: ``directory`` is a file.
        gpuserial.errors.CorruptFileError: the index is not valid.
    """
    folder = folder_of(directory, storage_options)
    try:
        text = folder.read_bytes(INDEX_NAME, MAX_INDEX_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f'{folder.name!r}: no sharded checkpoint here (no {INDEX_NAME}: '
                                f'never saved, or a save that did not commit)') from None
    except NotADirectoryError:  # said "Not a directory: 'x.npz/index.json'"
        raise NotADirectoryError(f"{folder.name!r}: a file, not a sharded checkpoint's "
                                 f'directory (load one NPZ or HDF5 file with gpuserial.load, '
                                 f'load_npz or load_hdf5)') from None
    path = folder.show(INDEX_NAME)
    if len(text) > MAX_INDEX_BYTES:
        raise CorruptFileError(f'{path!r}: larger than {MAX_INDEX_BYTES} bytes')
    return parse_index(text, path)


@dataclasses.dataclass
class ReadStats:
    """Bytes a reader read from the data files, and the bytes of the values it was asked for."""

    bytes_read: int = 0
    bytes_needed: int = 0


class ShardedReader(loading.Reader):
    """The entries of a sharded checkpoint as one rank sees them.

    An entry is the whole global array unless ``shards`` names the key: then it is that block
    of it, of the block's shape. A ``local`` key is the value saved by the rank of the same
    number (none for a rank the save did not have).

    Args:
        directory: the checkpoint (a path, a URL or a folder).
        index: its parsed index.
        rank: this rank (for local keys).
        shards: full key -> box (``(start, stop)`` per dimension) of the blocks to read.
    """

    def __init__(self, directory, index: Index, rank: int,
                 shards: Mapping[str, tuple[tuple[int, ...], object]] | None = None):
        self.folder = folder_of(directory)
        self.name = self.folder.name
        self.index = index
        self.rank = rank
        self.shards = dict(shards or {})
        self.stats = ReadStats()
        self._files: dict[str, Any] = {}  # data files opened, by name
        self._open = contextlib.ExitStack()

    def keys(self) -> list[str]:
        return self.index.keys()

    def saved(self, key: str) -> SavedEntry | None:
        if key in self.index.local:
            return self.index.local[key].get(self.rank)
        return self.index.entries.get(key)

    def entry(self, key: str) -> Entry | None:
        saved = self.saved(key)
        if saved is None:
            return None
        if saved.kind == 'none':
            return Entry(key, None, None)
        assert saved.shape is not None
        request: Box = tuple((0, n) for n in saved.shape)
        if key in self.shards:
            global_shape, index = self.shards[key]
            if tuple(global_shape) != saved.shape:
                raise MismatchError(f'{self.where(key)}: the shard is of a global shape '
                                    f'{tuple(global_shape)}, the checkpoint holds shape '
                                    f'{saved.shape}')
            request = normalize_box(global_shape, index, self.where(key))
        return Entry(key, box_shape(request), saved.dtype,
                     plan_reads(saved.chunks, request, self.where(key)))

    def stored_size(self, entry: Entry) -> tuple[int, bool]:
        return entry.nbytes, False

    def in_read_order(self, fills: list[tuple[Entry, Any]]) -> list[tuple[Entry, Any]]:
        """The fills that read from one data file, grouped by file in each file's order, then
        those that read from several (a resharded load). From an object store, each file is
        told first every range the fills of the first kind will read from it, so that it
        fetches ahead across entries (neighbouring entries in one request, several requests
        in flight) while the reads go through it in order; the others announce their pieces
        one at a time, so that the fetches of one file at most are in flight."""
        single: list[tuple[Entry, Any]] = []
        spread: list[tuple[Entry, Any]] = []
        for fill in fills:
            files = {piece.chunk.file for piece in fill[0].token}
            (single if len(files) == 1 else spread).append(fill)
        single.sort(key=lambda fill: (fill[0].token[0].chunk.file,
                                      fill[0].token[0].chunk.data_offset))
        if isinstance(self.folder, RemoteFolder):
            plans: dict[str, list[tuple[int, int]]] = {}
            for entry, _ in single:
                assert entry.dtype is not None  # filled: not a stored None
                for piece in entry.token:
                    positions, run = _runs(piece, entry.dtype)
                    plans.setdefault(piece.chunk.file, []).extend(
                        (position, position + run) for position in positions)
            for name, ranges in plans.items():
                self.source(name).expect(sorted(ranges))
        return single + spread

    def read_into(self, entry: Entry, dst) -> None:
        assert entry.dtype is not None
        self.stats.bytes_needed += entry.nbytes
        pieces: list[Piece] = entry.token
        for piece in pieces:
            whole = box_shape(piece.dst) == entry.shape
            target = dst if whole else dst[tuple(slice(a, b) for a, b in piece.dst)]
            stream = _RunStream(self, piece, entry.dtype, entry.key)
            transfer.fill(target, stream.read_into, entry.dtype)
            stream.finish()

    def source(self, name: str):
        """The data file ``name``, opened once for reads at offsets (``pread``, ``expect``)."""
        if name not in self._files:
            try:
                self._files[name] = self._open.enter_context(self.folder.open_ranged(name))
            except FileNotFoundError:
                raise CorruptFileError(f'{self.folder.show(name)!r}: a data file of the '
                                       f'checkpoint is missing (removed by a later save?)'
                                       ) from None
        return self._files[name]

    def close(self) -> None:
        self._files.clear()
        self._open.close()

    def __enter__(self) -> ShardedReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _runs(piece: Piece, dtype: numpy.dtype) -> tuple[list[int], int]:
    """Where each run of the piece's bytes starts in its data file, and a run's bytes."""
    chunk = piece.chunk
    offsets, run = loading.box_reads(chunk.shape, [(a, b, 1) for a, b in piece.src])
    return (chunk.data_offset + offsets * dtype.itemsize).tolist(), run * dtype.itemsize


class _RunStream:
    """The C-order bytes of one piece, read run by run (exact reads at offsets), as a stream
    for :func:`gpuserial.engine.transfer.fill`; its CRC-32 checked when the piece is a whole
    chunk. Its runs are announced to the file first (an object in a store fetches them ahead,
    :data:`remote.FETCHES_IN_FLIGHT` requests at a time; the piece's reads consume them all,
    so none stay fetched once it is read)."""

    def __init__(self, reader: ShardedReader, piece: Piece, dtype: numpy.dtype, key: str):
        self.reader = reader
        self.piece = piece
        self.key = key
        self.positions, self.run = _runs(piece, dtype)
        self.at = 0  # the run being read
        self.within = 0  # bytes of it read
        self.crc = 0 if piece.whole_chunk else None
        self.source = reader.source(piece.chunk.file)
        self.source.expect([(position, position + self.run) for position in self.positions])

    def read_into(self, buffer: memoryview) -> None:
        buffer = buffer.cast('B')
        done = 0
        while done < len(buffer):
            if self.at >= len(self.positions):
                raise CorruptFileError(f'{self._where()}: asked for more bytes than the piece '
                                       f'holds')
            count = min(self.run - self.within, len(buffer) - done)
            try:
                got = self.source.pread(buffer[done:done + count],
                                        self.positions[self.at] + self.within)
            except OSError as error:
                raise ReadFailedError(f'{self._where()}: reading failed: {error}') from error
            if got == 0:
                raise CorruptFileError(f'{self._where()}: truncated: the file ends at byte '
                                       f'{self.positions[self.at] + self.within}')
            self.reader.stats.bytes_read += got
            done += got
            self.within += got
            if self.within == self.run:
                self.at, self.within = self.at + 1, 0
        if self.crc is not None:
            self.crc = _zipstream.crc32(buffer, self.crc)

    def finish(self) -> None:
        if self.crc is not None and self.crc != self.piece.chunk.crc:
            raise CorruptFileError(f'{self._where()}: CRC-32 mismatch: the index says '
                                   f'{self.piece.chunk.crc:#010x}, the data has '
                                   f'{self.crc:#010x}')

    def _where(self) -> str:
        path = self.reader.folder.show(self.piece.chunk.file)
        return f'{path!r}, key {self.key!r} (member {self.piece.chunk.member!r})'


# ---------------------------------------------------------------------------------------------
# Consolidation and description


@dataclasses.dataclass(frozen=True)
class ConsolidateResult:
    """What :func:`consolidate` wrote."""

    entries: int
    nbytes: int


def consolidate(directory, out, *, rank: int = 0, compression: bool = False,
                durable: bool = True, storage_options: dict | None = None
                ) -> ConsolidateResult:
    """Writes a sharded checkpoint as one ordinary NPZ (what Chainer's ``load_npz`` and
    ``numpy.load`` read): every key as its whole global array, a ``local`` key as rank
    ``rank``'s value (left out where that rank saved none). One global array is in memory at a
    time; the file is replaced atomically.

    Args:
        directory: the checkpoint (a path or a URL).
        out: the NPZ to write (a path, a URL or a binary file object).
        rank: whose value of per-rank (``local``) keys to keep.
        compression: deflate the members.
        durable: fsync the file and its directory.
        storage_options: the options of the fsspec filesystem of the URLs among
            ``directory`` and ``out``.

    Raises:
        FileNotFoundError: no committed checkpoint in ``directory``.
        gpuserial.errors.CorruptFileError: the index or a data file is not valid.
        TypeError: ``storage_options`` given and neither is a URL.
    """
    check_options_have_a_url(storage_options, directory, out)
    folder = folder_of(directory, storage_options if remote.is_url(directory) else None)
    index = read_index(folder)
    counted = {'entries': 0, 'nbytes': 0}

    def entries(reader: ShardedReader) -> Iterator[tuple[str, numpy.ndarray]]:
        for key in index.keys():
            entry = reader.entry(key)
            if entry is None:
                continue
            if entry.dtype is None:
                value = numpy.empty((), object)  # Chainer's stored None
            else:
                assert entry.shape is not None
                value = numpy.empty(entry.shape, entry.dtype)
                reader.read_into(entry, value)
            counted['entries'] += 1
            counted['nbytes'] += value.nbytes if entry.dtype is not None else 0
            yield key, value

    with ShardedReader(folder, index, rank) as reader, \
            atomic_output(out, durable=durable,
                          storage_options=storage_options if remote.is_url(out) else None
                          ) as stream:
        npz.write_npz(stream, entries(reader), compression)
    return ConsolidateResult(counted['entries'], counted['nbytes'])


def is_checkpoint(path, storage_options: dict | None = None) -> bool:
    """Whether ``path`` (a directory or a URL) holds a sharded checkpoint's index."""
    return folder_of(path, storage_options).exists(INDEX_NAME)


def describe(directory, storage_options: dict | None = None) -> dict:
    """A JSON-ready description of a checkpoint: totals, files, and per key its kind, global
    shape, dtype and chunks (from the index only: no data is read)."""
    folder = folder_of(directory, storage_options)
    index = read_index(folder)

    def entry_dict(saved: SavedEntry) -> dict:
        if saved.kind == 'none':
            return {'kind': 'none'}
        assert saved.shape is not None and saved.dtype is not None
        return {'kind': saved.kind, 'shape': list(saved.shape), 'dtype': str(saved.dtype),
                'nbytes': math.prod(saved.shape) * saved.dtype.itemsize,
                'chunks': [{'offsets': list(c.offsets), 'shape': list(c.shape),
                            'file': c.file} for c in saved.chunks]}

    entries = {key: entry_dict(e) for key, e in index.entries.items()}
    for key, ranks in index.local.items():
        entries[key] = {'kind': 'local', 'ranks': {r: entry_dict(e) for r, e in ranks.items()}}
    unique = sum(e.get('nbytes', 0) for e in entries.values())
    unique += sum(r.get('nbytes', 0) for e in entries.values() for r in e.get('ranks', {}).values())
    return {'path': folder.name, 'format': 'sharded', 'world_size': index.world_size,
            'token': index.token, 'files': dict(index.files),
            'file_bytes': sum(index.files.values()), 'nbytes': unique,
            'entries': dict(sorted(entries.items()))}


def describe_lines(directory, storage_options: dict | None = None) -> list[str]:
    """``gpuserial inspect DIR``: one line per key (kind, global shape, dtype, chunks per
    file), then the files and totals."""
    info = describe(directory, storage_options)
    lines = [f'{info["path"]}: sharded checkpoint, saved by {info["world_size"]} rank(s), '
             f'{len(info["files"])} data file(s), {len(info["entries"])} keys']
    rows = [('key', 'kind', 'shape', 'dtype', 'chunks')]

    def chunk_text(chunks: list[dict]) -> str:
        per_file: dict[str, int] = {}
        for chunk in chunks:
            per_file[chunk['file']] = per_file.get(chunk['file'], 0) + 1
        return ', '.join(f'{count} in {name}' for name, count in per_file.items()) or '-'

    for key, entry in info['entries'].items():
        if entry['kind'] == 'local':
            rows.append((key, 'local', '', '', f'{len(entry["ranks"])} rank(s)'))
            for rank, value in sorted(entry['ranks'].items()):
                rows.append((f'  rank {rank}', value['kind'], _shape(value.get('shape')),
                             value.get('dtype', ''), chunk_text(value.get('chunks', []))))
            continue
        rows.append((key, entry['kind'], _shape(entry.get('shape')), entry.get('dtype', ''),
                     chunk_text(entry.get('chunks', []))))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        lines.append('  '.join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                          strict=True)).rstrip())
    for name, size in info['files'].items():
        lines.append(f'file {name}: {size} bytes')
    lines.append(f'total: {info["nbytes"]} bytes of values, {info["file_bytes"]} bytes in files')
    return lines


def _shape(shape) -> str:
    if shape is None:
        return 'None'
    return '(' + ', '.join(map(str, shape)) + (',)' if len(shape) == 1 else ')')

