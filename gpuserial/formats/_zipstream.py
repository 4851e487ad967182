"""Zip members written as streams; the zip format's records and constants (reading is in
``_zipread``).

The standard library's zipfile computes CRCs with zlib (2.4 GB/s on our CPU machines) and
deflates only through zlib. Here both come from ISA-L when the ``isal`` package is installed
(CRC about 18 GB/s, deflate level 1 about 25 times zlib's default level at a slightly smaller
size on float weights), with zlib as the fallback. A large stored chunk is checksummed on a
worker thread while it is written (both release the GIL). A deflated member is deflated in
blocks on the worker threads (``engine.workers``), and the directory lists the blocks (see
:meth:`ZipWriter._write_deflated`) so that ``_zipread`` inflates them on the same threads.
Small members are written whole, with their CRC and sizes in place, many to one write. Files
are standard zips (ZIP64 where needed) that ``numpy.load`` and zipfile read.
"""

from __future__ import annotations

import collections
import errno
import io
import itertools
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import BinaryIO

from gpuserial.engine import workers

deflate_module: ModuleType
try:
    from isal import isal_zlib as deflate_module
except ImportError:  # pragma: no cover - isal is an optional speed-up
    deflate_module = zlib

crc32 = deflate_module.crc32
DEFLATE_ERRORS = (zlib.error, deflate_module.error)  # ISA-L's error is not a zlib.error

__all__ = ['ZipWriter', 'crc32']

STORED, DEFLATED = 0, 8
DEFLATE_LEVEL = 1  # ISA-L's level 1 (zlib's when isal is missing)
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on go into ZIP64 fields
MARKER32, MARKER16 = 0xFFFFFFFF, 0xFFFF  # what a 32/16-bit field says when ZIP64 holds it
VERSION = 45  # ZIP64
UTF8_FLAG = 0x800
ENCRYPTED_FLAG = 0x01
DESCRIPTOR_FLAG = 0x08
FILE_ATTRIBUTES = 0o100644 << 16  # a regular file, rw-r--r-- (as zipfile writes it)
PIECE = 1 << 18  # data is checksummed and (de)compressed in pieces that stay in the CPU's cache
WRITE_PIECE = 1 << 20  # a chunk checksummed on a thread is written in pieces this size (larger
#                        writes measured slower and prone to stalls)
BLOCK = 256 << 10  # a deflated member's data is deflated in blocks this size, on several threads
BLOCKS_TAG = 0x6753  # the directory's extra field listing a member's deflated blocks: the
#                      block size, then each whole block's deflated size (32-bit each)
MAX_EXTRA = 0xFFFF  # an extra field's bytes at most
THREAD_MIN = 4 << 20  # stored chunks this large are checksummed on a thread while written;
#                       below it the hand-off (waking the thread, waiting for its result) cost
#                       more than the overlap gained (a ResNet-50-shaped save: 94 -> 87 ms)

LOCAL = struct.Struct('<4sHHHHHIIIHH')
LOCAL_ZIP64_EXTRA = struct.Struct('<HHQQ')
CENTRAL = struct.Struct('<4sBBHHHHHIIIHHHHHII')
END = struct.Struct('<4sHHHHIIH')
END64 = struct.Struct('<4sQHHIIQQQQ')
END64_LOCATOR = struct.Struct('<4sIQI')
DESCRIPTOR64 = struct.Struct('<4sIQQ')
# A small member's records as its loop packs them: the fields that are the same for every member
# of a writer, packed once, then those that vary
LOCAL_FIXED = struct.Struct('<4sHHHHH')  # signature, version needed, flags, method, time, date
CENTRAL_FIXED = struct.Struct('<4sBBHHHHH')  # signature, made by (version, Unix), then as local
CENTRAL_MIDDLE = struct.Struct('<HHHHI')  # extra and comment lengths, disk, attributes
LOCAL_VARYING = struct.Struct(f'<{LOCAL_FIXED.size}sIIIHH')  # crc, sizes, name and extra lengths
CENTRAL_VARYING = struct.Struct(  # crc, sizes, name length, the middle, offset
    f'<{CENTRAL_FIXED.size}sIIIH{CENTRAL_MIDDLE.size}sI')


def _dos_time(moment: time.struct_time) -> tuple[int, int]:
    year = max(moment.tm_year, 1980)
    return ((moment.tm_hour << 11) | (moment.tm_min << 5) | (moment.tm_sec // 2),
            ((year - 1980) << 9) | (moment.tm_mon << 5) | moment.tm_mday)


class ZipWriter:
    """Writes a zip archive member by member, each member's data streamed in chunks.

    Args:
        out: a binary file object; when it is seekable, each member's CRC and sizes are written
            back into its local header, else they follow its data in a descriptor.
        compression: deflate members (else store them).
    """

    def __init__(self, out: BinaryIO, *, compression: bool):
        self.out = out
        self.method = DEFLATED if compression else STORED
        self.seekable = _seekable(out)
        self.position = out.tell() if self.seekable else 0
        self.time, self.date = _dos_time(time.localtime())
        self.central: list[bytes] = []
        self.checksummer: ThreadPoolExecutor | None = None  # started by the first large chunk
        self.pending = bytearray()  # small members not yet written, in order
        self.data_starts: dict[str, int] = {}  # where each member's data starts
        self.fixed_fields = self._fixed_fields()

    def __enter__(self) -> ZipWriter:
        return self

    def __exit__(self, kind, *exc_info) -> None:
        if kind is None:
            self.close()
        else:
            self._stop_checksummer()

    def _write(self, data) -> None:
        self._flush_pending()
        _write_all(self.out, data)
        self.position += len(data)

    def _flush_pending(self) -> None:
        if self.pending:
            _write_all(self.out, self.pending)
            self.pending = bytearray()

    def write_small_member(self, name: str, header: bytes, data=b'') -> None:
        """Adds member ``name``, ``header`` then ``data``, small enough to hold in memory: its
        CRC and sizes go into its local header at once (no descriptor, no seek back; ZIP64 only
        past 4 GiB), and it is written together with its small neighbours, a write per
        :data:`WRITE_PIECE` bytes."""
        self.write_small_members([(name, header, memoryview(data).cast('B'))])

    def write_small_members(self, members: Iterable[tuple[str, bytes, bytes | memoryview]]
                            ) -> None:
        """:meth:`write_small_member` of each ``(name, header, data)`` in turn, in one loop (a
        model has thousands); ``data`` is bytes or a memoryview of bytes (format ``B``)."""
        pending, central, data_starts = self.pending, self.central, self.data_starts
        local_fixed, central_fixed, central_middle = self.fixed_fields
        pack_local, pack_central = LOCAL_VARYING.pack, CENTRAL_VARYING.pack
        local_size = LOCAL_VARYING.size
        deflated = self.method == DEFLATED
        position = self.position
        header_crcs: dict[bytes, int] = {}  # a model's arrays share a few headers
        try:
            for name, header, data in members:
                header_crc = header_crcs.get(header)
                if header_crc is None:
                    header_crc = header_crcs[header] = crc32(header)
                crc = crc32(data, header_crc)
                size = compressed = len(header) + len(data)
                if deflated:
                    deflater = deflate_module.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15)
                    data = deflater.compress(header) + deflater.compress(data) + deflater.flush()
                    header = b''
                    compressed = len(data)
                encoded = name.encode('utf-8')
                flags = 0 if name.isascii() else UTF8_FLAG
                offset = position
                if offset + size + compressed < ZIP64_LIMIT:  # nearly always: no ZIP64 fields
                    pending += pack_local(local_fixed[flags], crc, compressed, size,
                                          len(encoded), 0)
                    pending += encoded
                    central.append(pack_central(central_fixed[flags], crc, compressed, size,
                                                len(encoded), central_middle, offset) + encoded)
                    position = offset + local_size + len(encoded)
                else:
                    local = self._local_header(encoded, flags, crc, size, compressed)
                    central.append(self._central_entry(encoded, flags, crc, size, compressed,
                                                       offset))
                    pending += local
                    position = offset + len(local)
                pending += header
                pending += data
                data_starts[name] = position
                position += compressed
                if len(pending) >= WRITE_PIECE:
                    self._flush_pending()
                    pending = self.pending
        finally:  # where the members gathered so far end, whatever stopped the loop
            self.position = position

    def _fixed_fields(self) -> tuple[dict[int, bytes], dict[int, bytes], bytes]:
        """The fields of a small member's records that are the same for every member of this
        writer, as :data:`LOCAL_VARYING` and :data:`CENTRAL_VARYING` take them: the local and
        directory records' leading fields by flags (an ASCII or UTF-8 name), and the directory
        record's middle fields."""
        local_fixed, central_fixed = {}, {}
        for flags in (0, UTF8_FLAG):
            local_fixed[flags] = LOCAL_FIXED.pack(b'PK\x03\x04', VERSION, flags, self.method,
                                                  self.time, self.date)
            central_fixed[flags] = CENTRAL_FIXED.pack(b'PK\x01\x02', VERSION, 3, VERSION, flags,
                                                      self.method, self.time, self.date)
        return local_fixed, central_fixed, CENTRAL_MIDDLE.pack(0, 0, 0, 0, FILE_ATTRIBUTES)

    def _local_header(self, encoded: bytes, flags: int, crc: int, size: int, compressed: int
                      ) -> bytes:
        """A small member's local header, its name included (ZIP64 only for sizes past 4 GiB,
        as zipfile writes it)."""
        if max(size, compressed) < ZIP64_LIMIT:
            return LOCAL.pack(b'PK\x03\x04', VERSION, flags, self.method, self.time, self.date,
                              crc, compressed, size, len(encoded), 0) + encoded
        return (LOCAL.pack(b'PK\x03\x04', VERSION, flags, self.method, self.time, self.date,
                           crc, MARKER32, MARKER32, len(encoded), LOCAL_ZIP64_EXTRA.size)
                + encoded + LOCAL_ZIP64_EXTRA.pack(1, 16, size, compressed))

    def _checksum_on_a_thread(self, data: memoryview, crc: int) -> Future | None:
        """The CRC of ``data`` (continuing ``crc``) under way on this writer's thread, or None
        where no thread may be used: at interpreter exit, or from a signal handler that
        interrupted a submit (its locks are not reentrant)."""
        if workers.submitting.active:
            return None
        workers.submitting.active = True
        try:
            if self.checksummer is None:
                self.checksummer = ThreadPoolExecutor(1, thread_name_prefix='gpuserial-crc')
            return self.checksummer.submit(crc32, data, crc)
        except RuntimeError:  # the interpreter is exiting, or no thread can start
            return None
        finally:
            workers.submitting.active = False

    def _stop_checksummer(self) -> None:
        if self.checksummer is not None:
            self.checksummer.shutdown()
            self.checksummer = None

    def write_member(self, name: str, chunks: Iterable, small_bytes: int = 0) -> None:
        """Adds member ``name`` whose data is the concatenation of ``chunks`` (bytes-like). Data
        of at most ``small_bytes`` is written as :meth:`write_small_member` writes it: the
        same bytes, however the data came."""
        chunks = iter(chunks)
        held: list[bytes] = []  # copies: a chunk's memory may be reused for the next
        held_bytes = 0
        for chunk in chunks:
            chunk = memoryview(chunk).cast('B')
            if held_bytes + len(chunk) > small_bytes:
                chunks = itertools.chain(held, [chunk], chunks)
                break
            held.append(bytes(chunk))
            held_bytes += len(chunk)
        else:
            self.write_small_member(name, b'', b''.join(held))
            return
        encoded = name.encode('utf-8')
        flags = (0 if encoded.isascii() else UTF8_FLAG) | (0 if self.seekable else DESCRIPTOR_FLAG)
        offset = self.position
        self._write(LOCAL.pack(b'PK\x03\x04', VERSION, flags, self.method, self.time, self.date,
                               0, MARKER32, MARKER32, len(encoded),
                               LOCAL_ZIP64_EXTRA.size) + encoded
                    + LOCAL_ZIP64_EXTRA.pack(1, 16, 0, 0))
        self.data_starts[name] = self.position
        blocks: list[int] = []
        crc, size, compressed = (self._write_deflated(chunks, blocks) if self.method == DEFLATED
                                 else self._write_stored(chunks))
        if self.seekable:
            end = self.position
            self.out.seek(offset + 14)
            _write_all(self.out, struct.pack('<I', crc))
            self.out.seek(offset + LOCAL.size + len(encoded) + 4)
            _write_all(self.out, struct.pack('<QQ', size, compressed))
            self.out.seek(end)
        else:
            self._write(DESCRIPTOR64.pack(b'PK\x07\x08', crc, compressed, size))
        self.central.append(self._central_entry(encoded, flags, crc, size, compressed, offset,
                                                blocks))

    def _write_stored(self, chunks: Iterator) -> tuple[int, int, int]:
        """Writes ``chunks`` as they are; returns their CRC, size and size written."""
        crc, size = 0, 0
        for chunk in chunks:
            chunk = memoryview(chunk).cast('B')
            checksum = self._checksum_on_a_thread(chunk, crc) if len(chunk) >= THREAD_MIN else None
            if checksum is not None:
                try:
                    for start in range(0, len(chunk), WRITE_PIECE):
                        self._write(chunk[start:start + WRITE_PIECE])
                finally:
                    crc = checksum.result()  # the chunk's memory is ours until this returns
            else:
                for start in range(0, len(chunk), PIECE):  # CRC and write each piece while cached
                    piece = chunk[start:start + PIECE]
                    crc = crc32(piece, crc)
                    self._write(piece)
            size += len(chunk)
        return crc, size, size

    def _write_deflated(self, chunks: Iterator, blocks: list[int]) -> tuple[int, int, int]:
        """Writes ``chunks`` deflated, in blocks of :data:`BLOCK` bytes deflated on
        :func:`workers.count` threads while the CRC is taken here, the rest (under a block)
        last; returns their CRC, size and size written, and appends each whole block's
        deflated size to ``blocks``.

        Each block is deflated alone and ends with a sync flush, so that the blocks joined are
        one deflate stream, the same bytes whatever the threads and however the data came in
        chunks, and a reader that knows where they start inflates them on threads too. Blocks
        of a chunk are all deflated before the next chunk is asked for (its memory may be
        reused); at most :func:`workers.count` ``+ 1`` are in flight.
        """
        crc, size, compressed = 0, 0, 0
        held = bytearray()  # the start of the next block, copied from the chunks before
        in_flight: collections.deque[Future | bytes] = collections.deque()
        limit = workers.count() + 1

        def write_until(count: int) -> None:
            nonlocal compressed
            while len(in_flight) > count:
                done = in_flight[0]
                data = done.result() if isinstance(done, Future) else done
                in_flight.popleft()  # after its result: a Ctrl-C meanwhile leaves it to wait for
                compressed += len(data)
                self._write(data)
                blocks.append(len(data))

        try:
            for chunk in chunks:
                chunk = memoryview(chunk).cast('B')
                start = 0
                if held:
                    start = min(BLOCK - len(held), len(chunk))
                    held += chunk[:start]
                    if len(held) == BLOCK:
                        in_flight.append(_deflate(bytes(held)))
                        held = bytearray()
                while len(chunk) - start >= BLOCK:
                    write_until(limit - 1)
                    in_flight.append(_deflate(chunk[start:start + BLOCK]))
                    start += BLOCK
                held += chunk[start:]
                crc = crc32(chunk, crc)  # while the blocks deflate
                size += len(chunk)
                write_until(0)  # before the chunk's memory may be reused
        finally:
            for done in in_flight:  # on failure: no thread reads a chunk once this returns
                if isinstance(done, Future) and not done.cancel():
                    done.exception()
        last = _deflated(held, last=True)
        self._write(last)
        return crc, size, compressed + len(last)

    def _central_entry(self, encoded, flags, crc, size, compressed, offset,
                       blocks: list[int] | None = None) -> bytes:
        extra = b''
        if max(size, compressed, offset) >= ZIP64_LIMIT:
            for value in (size, compressed, offset):  # ZIP64 fields, in this order, where needed
                if value >= ZIP64_LIMIT:
                    extra += struct.pack('<Q', value)
            extra = struct.pack('<HH', 1, len(extra)) + extra
        if blocks and len(extra) + 8 + 4 * len(blocks) <= MAX_EXTRA:  # else read as one stream
            extra += struct.pack(f'<HHI{len(blocks)}I', BLOCKS_TAG, 4 + 4 * len(blocks), BLOCK,
                                 *blocks)
        return CENTRAL.pack(
            b'PK\x01\x02', VERSION, 3, VERSION, flags, self.method, self.time, self.date, crc,
            _field(compressed), _field(size), len(encoded), len(extra), 0, 0, 0, FILE_ATTRIBUTES,
            _field(offset)) + encoded + extra

    def close(self) -> None:
        """Writes the central directory (and the ZIP64 end records where needed)."""
        self._stop_checksummer()  # no member data follows
        start = self.position
        self._write(b''.join(self.central))  # gathered member by member, written at once
        size = self.position - start
        count = len(self.central)
        zip64 = count >= MARKER16 or start >= ZIP64_LIMIT or size >= ZIP64_LIMIT
        if zip64:
            end64 = self.position
            self._write(END64.pack(b'PK\x06\x06', END64.size - 12, VERSION, VERSION, 0, 0,
                                   count, count, size, start))
            self._write(END64_LOCATOR.pack(b'PK\x06\x07', 0, end64, 1))
        entries = MARKER16 if zip64 else count
        self._write(END.pack(b'PK\x05\x06', 0, 0, entries, entries,
                             MARKER32 if zip64 else size, MARKER32 if zip64 else start, 0))
        self.out.flush()


def _deflate(block) -> Future | bytes:
    """``block`` deflated (not the stream's last) on a worker thread, or here where there is
    none (see :func:`workers.submit`)."""
    future = workers.submit(_deflated, block, False)
    return _deflated(block, last=False) if future is None else future


def _deflated(block, last: bool) -> bytes:
    """``block`` deflated alone: the stream's end when ``last``, else ended by a sync flush (a
    byte boundary, from which the next block's deflate goes on as one stream)."""
    deflater = deflate_module.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15)
    return deflater.compress(block) + deflater.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _write_all(out, data) -> None:
    """Writes all of ``data``: a raw file may take only part of it per call."""
    data = memoryview(data).cast('B')
    while data:
        count = out.write(data)
        if count is None:
            if isinstance(out, io.RawIOBase):  # non-blocking and not ready
                raise BlockingIOError(errno.EAGAIN, 'the output cannot take data now')
            count = len(data)  # a file-like object that does not say how much it took
        data = data[count:]


def _field(value: int) -> int:
    """A size or offset as its 32-bit field holds it: itself, or the ZIP64 marker."""
    return MARKER32 if value >= ZIP64_LIMIT else value


def _seekable(out) -> bool:
    try:
        return out.seekable() and out.tell() >= 0
    except (AttributeError, OSError):
        return False
