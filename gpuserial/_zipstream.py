"""Zip members as streams: a writer for members of known size and a checked member reader.

The standard library's zipfile parses the central directory for us, but its member streams
compute CRCs with zlib (2.4 GB/s on our CPU machines) and deflate only through zlib. Here both
come from ISA-L when the ``isal`` package is installed (CRC about 18 GB/s, deflate level 1 about
25 times zlib's default level at a slightly smaller size on float weights), with zlib as the
fallback. A large stored chunk is checksummed on a worker thread while it is written (both
release the GIL); reads checksum each cache-sized piece just read, which measured faster there.
Files are standard zips (ZIP64 where needed) that ``numpy.load`` and zipfile read.
"""

from __future__ import annotations

import errno
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

try:
    from isal import isal_zlib as deflate_module
except ImportError:  # pragma: no cover - isal is an optional speed-up
    deflate_module = zlib

crc32 = deflate_module.crc32
DEFLATE_ERRORS = (zlib.error, deflate_module.error)  # ISA-L's error is not a zlib.error

__all__ = ['MemberReader', 'ZipWriter', 'crc32']

STORED, DEFLATED = 0, 8
DEFLATE_LEVEL = 1  # ISA-L's level 1 (zlib's when isal is missing)
ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on go into ZIP64 fields
MARKER32, MARKER16 = 0xFFFFFFFF, 0xFFFF  # what a 32/16-bit field says when ZIP64 holds it
VERSION = 45  # ZIP64
UTF8_FLAG = 0x800
ENCRYPTED_FLAG = 0x01
DESCRIPTOR_FLAG = 0x08
PIECE = 1 << 18  # data is checksummed and (de)compressed in pieces that stay in the CPU's cache
WRITE_PIECE = 1 << 20  # stored chunks this large are checksummed on a thread while written in
#                        pieces this size (larger writes measured slower and prone to stalls)

LOCAL = struct.Struct('<4sHHHHHIIIHH')
LOCAL_ZIP64_EXTRA = struct.Struct('<HHQQ')
CENTRAL = struct.Struct('<4sBBHHHHHIIIHHHHHII')
END = struct.Struct('<4sHHHHIIH')
END64 = struct.Struct('<4sQHHIIQQQQ')
END64_LOCATOR = struct.Struct('<4sIQI')
DESCRIPTOR64 = struct.Struct('<4sIQQ')


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

    def __enter__(self) -> ZipWriter:
        return self

    def __exit__(self, kind, *exc_info) -> None:
        if kind is None:
            self.close()
        else:
            self._stop_checksummer()

    def _write(self, data) -> None:
        _write_all(self.out, data)
        self.position += len(data)

    def _checksum_on_a_thread(self, data: memoryview, crc: int) -> Future | None:
        """The CRC of ``data`` (continuing ``crc``) under way on this writer's thread, or None
        where no thread may be used: at interpreter exit, or from a signal handler that
        interrupted a submit (its locks are not reentrant)."""
        if _submitting.active:
            return None
        _submitting.active = True
        try:
            if self.checksummer is None:
                self.checksummer = ThreadPoolExecutor(1, thread_name_prefix='gpuserial-crc')
            return self.checksummer.submit(crc32, data, crc)
        except RuntimeError:  # the interpreter is exiting, or no thread can start
            return None
        finally:
            _submitting.active = False

    def _stop_checksummer(self) -> None:
        if self.checksummer is not None:
            self.checksummer.shutdown()
            self.checksummer = None

    def write_member(self, name: str, chunks: Iterable) -> None:
        """Adds member ``name`` whose data is the concatenation of ``chunks`` (bytes-like)."""
        encoded = name.encode('utf-8')
        flags = (0 if encoded.isascii() else UTF8_FLAG) | (0 if self.seekable else DESCRIPTOR_FLAG)
        offset = self.position
        self._write(LOCAL.pack(b'PK\x03\x04', VERSION, flags, self.method, self.time, self.date,
                               0, MARKER32, MARKER32, len(encoded),
                               LOCAL_ZIP64_EXTRA.size) + encoded
                    + LOCAL_ZIP64_EXTRA.pack(1, 16, 0, 0))
        crc, size, compressed = 0, 0, 0
        compressor = (deflate_module.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15)
                      if self.method == DEFLATED else None)
        for chunk in chunks:
            chunk = memoryview(chunk).cast('B')
            checksum = (self._checksum_on_a_thread(chunk, crc)
                        if compressor is None and len(chunk) >= WRITE_PIECE else None)
            if checksum is not None:
                try:
                    for start in range(0, len(chunk), WRITE_PIECE):
                        self._write(chunk[start:start + WRITE_PIECE])
                finally:
                    crc = checksum.result()  # the chunk's memory is ours until this returns
                compressed += len(chunk)
            else:
                for start in range(0, len(chunk), PIECE):  # CRC and write each piece while cached
                    piece = chunk[start:start + PIECE]
                    crc = crc32(piece, crc)
                    data = compressor.compress(piece) if compressor else piece
                    compressed += len(data)
                    self._write(data)
            size += len(chunk)
        if compressor:
            data = compressor.flush()
            compressed += len(data)
            self._write(data)
        if self.seekable:
            end = self.position
            self.out.seek(offset + 14)
            _write_all(self.out, struct.pack('<I', crc))
            self.out.seek(offset + LOCAL.size + len(encoded) + 4)
            _write_all(self.out, struct.pack('<QQ', size, compressed))
            self.out.seek(end)
        else:
            self._write(DESCRIPTOR64.pack(b'PK\x07\x08', crc, compressed, size))
        self.central.append(self._central_entry(encoded, flags, crc, size, compressed, offset))

    def _central_entry(self, encoded, flags, crc, size, compressed, offset) -> bytes:
        extra = b''
        for value in (size, compressed, offset):  # ZIP64 fields, in this order, where needed
            if value >= ZIP64_LIMIT:
                extra += struct.pack('<Q', value)
        if extra:
            extra = struct.pack('<HH', 1, len(extra)) + extra
        return CENTRAL.pack(
            b'PK\x01\x02', VERSION, 3, VERSION, flags, self.method, self.time, self.date, crc,
            _field(compressed), _field(size), len(encoded), len(extra), 0, 0, 0, 0o100644 << 16,
            _field(offset)) + encoded + extra

    def close(self) -> None:
        """Writes the central directory (and the ZIP64 end records where needed)."""
        self._stop_checksummer()  # no member data follows
        start = self.position
        for entry in self.central:
            self._write(entry)
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


class _Submitting(threading.local):
    active = False


_submitting = _Submitting()


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


class MemberError(ValueError):
    """A member's data is corrupt or truncated; the message says how, the caller says where."""


class MemberReader:
    """Reads one member's data (stored or deflated) as a stream, checking size and CRC.

    Args:
        fp: the archive's binary file object (seekable).
        info: the member's ``zipfile.ZipInfo`` from the central directory.
    """

    def __init__(self, fp: BinaryIO, info):
        if info.compress_type not in (STORED, DEFLATED):
            raise MemberError(f'unsupported compression method {info.compress_type}')
        if info.compress_type == STORED and info.compress_size != info.file_size:
            raise MemberError(f'the zip directory says a stored member of {info.file_size} '
                              f'bytes takes {info.compress_size} bytes in the file')
        self.fp = fp
        self.info = info
        if info.flag_bits & ENCRYPTED_FLAG:
            raise MemberError('the member is encrypted (zip encryption is not supported)')
        fp.seek(info.header_offset)
        signature, _, flags, *_, name_length, extra_length = LOCAL.unpack(_read(fp, LOCAL.size))
        if signature != b'PK\x03\x04':
            raise MemberError('bad local file header')
        if flags & ENCRYPTED_FLAG:
            raise MemberError('the member is encrypted (its local header says so)')
        name = _read(fp, name_length).decode('utf-8' if info.flag_bits & UTF8_FLAG else 'cp437',
                                             'replace')
        if name != info.filename:
            raise MemberError(f'the zip directory names {info.filename!r} but the local header '
                              f'{name!r}')
        self.position = fp.seek(extra_length, 1)
        self.left = info.compress_size  # stored bytes not yet read
        self.produced = 0
        self.crc = 0
        self.inflater = deflate_module.decompressobj(-15) if info.compress_type else None
        self.pending = b''  # inflater input not yet consumed

    def _raw(self, limit: int) -> bytes:
        count = min(limit, self.left)
        self.fp.seek(self.position)
        data = self.fp.read(count)
        if len(data) < count:
            raise MemberError(f'truncated: the file ends {self.left - len(data)} bytes early')
        self.position += len(data)
        self.left -= len(data)
        return data

    def readinto(self, buffer) -> int:
        """Fills ``buffer`` completely with the next data bytes, or raises MemberError."""
        buffer = memoryview(buffer).cast('B')
        wanted = len(buffer)
        if self.produced + wanted > self.info.file_size:
            raise MemberError(f'asked for {self.produced + wanted} bytes of a member of '
                              f'{self.info.file_size}')
        if self.inflater is None:
            if wanted > self.left:
                raise MemberError('stored sizes disagree')
            self.fp.seek(self.position)
            for start in range(0, wanted, PIECE):  # CRC each piece while it is in the cache
                piece = buffer[start:start + PIECE]
                done = 0
                while done < len(piece):
                    count = self.fp.readinto(piece[done:])
                    if not count:
                        raise MemberError(f'truncated: the file ends {wanted - start - done} '
                                          f'bytes early')
                    done += count
                self.crc = crc32(piece, self.crc)
            self.position += wanted
            self.left -= wanted
        else:
            done = 0
            while done < wanted:
                if not self.pending and self.left:
                    self.pending = self._raw(PIECE)
                try:  # with no input left, this drains what the inflater holds
                    data = self.inflater.decompress(self.pending, min(PIECE, wanted - done))
                except DEFLATE_ERRORS as error:
                    raise MemberError(f'corrupt deflate data: {error}') from None
                self.pending = self.inflater.unconsumed_tail
                buffer[done:done + len(data)] = data
                done += len(data)
                self.crc = crc32(data, self.crc)
                if done < wanted and not data and not self.pending and not self.left:
                    raise MemberError(f'the deflate stream ends {wanted - done} bytes early')
        self.produced += wanted
        return wanted

    def read(self, count: int) -> bytes:
        """The next ``count`` data bytes (all of them, or MemberError)."""
        buffer = bytearray(count)
        self.readinto(buffer)
        return bytes(buffer)

    def finish(self) -> None:
        """Checks that the whole member was read and that its CRC matches the directory's."""
        if self.produced != self.info.file_size:
            raise MemberError(f'read {self.produced} of {self.info.file_size} bytes')
        if self.inflater is not None and not self.inflater.eof:
            try:
                extra = self.inflater.decompress(self.pending + self._raw(self.left), 1)
            except DEFLATE_ERRORS as error:
                raise MemberError(f'corrupt deflate data: {error}') from None
            if extra or not self.inflater.eof:
                raise MemberError('the deflate stream holds more than the directory says')
            self.pending = self.inflater.unconsumed_tail
        if self.inflater is not None:
            trailing = len(self.pending) + len(self.inflater.unused_data) + self.left
            if trailing:
                raise MemberError(f'the member holds {trailing} bytes after the end of its '
                                  f'deflate stream')
        if self.crc != self.info.CRC:
            raise MemberError(f'CRC mismatch (directory {self.info.CRC:08x}, data '
                              f'{self.crc:08x}): the data is corrupt')


def _read(fp, count: int) -> bytes:
    data = fp.read(count)
    if len(data) < count:
        raise MemberError(f'truncated: {len(data)} of {count} header bytes')
    return data
