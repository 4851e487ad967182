"""Zip archives read as streams: the central directory, member data checked as it is read.

The directory is parsed here, not by zipfile, in one read and a few microseconds a member
(checkpoints hold thousands). Reads go through a read-ahead window, so that a run of small
members (local headers, ``.npy`` headers, small arrays) costs one read of the file per window,
while large reads go straight into the caller's buffer. Every member's size and CRC are checked
as its data is read. A member that gpuserial deflated in blocks (:class:`Blocks`) is inflated
a block a thread, ahead of the reader.
"""

from __future__ import annotations

import collections
import io
import struct
import zlib
from concurrent.futures import Future
from typing import NamedTuple, Protocol

from gpuserial.engine import workers
from gpuserial.formats._zipstream import (
    BLOCKS_TAG,
    CENTRAL,
    DEFLATE_ERRORS,
    DEFLATED,
    ENCRYPTED_FLAG,
    END,
    END64,
    LOCAL,
    MARKER32,
    PIECE,
    STORED,
    UTF8_FLAG,
    crc32,
    deflate_module,
)

__all__ = ['Directory', 'Input', 'KeptBytes', 'Member', 'MemberError', 'MemberReader',
           'NotAZip', 'WindowedFile', 'ZipError', 'check_member', 'data_start_of',
           'inflated_head', 'read_deflated', 'read_directory', 'read_stored', 'regular_stored',
           'stored_head']

MAX_EXTRACT_VERSION = 63  # ZIP 6.3: what zipfile reads too
END_SIGNATURE = b'PK\x05\x06'
END_SEARCH = END.size + 0xFFFF  # the end record lies within the last 64 KiB (its comment)
END64_LOCATOR = struct.Struct('<4sIQI')
LOCAL_CHECKED = struct.Struct('<4s2xH18xHH')  # of a local header: signature, flags, lengths
CENTRAL_READ = struct.Struct('<4s2xHHH4xIIIHHH8xI')  # of a central header: the fields read
assert LOCAL_CHECKED.size == LOCAL.size and CENTRAL_READ.size == CENTRAL.size
WINDOW = 256 << 10  # bytes read ahead for small reads
DIRECT = 64 << 10  # reads this large skip the window: straight into the caller's buffer
HEAD_GUESS = 256  # local header name and extra field bytes read with it, at a guess
HEAD_PIECE = 1 << 10  # deflated bytes read at a time for a member's first bytes (its header)
BLOCK_SIZES = (64 << 10, 64 << 20)  # the block sizes a block list may give (memory stays bound)
SYNC_FLUSH_END = b'\x00\x00\xff\xff'  # how a sync flush ends: an empty stored block


class ZipError(ValueError):
    """The zip's structure is wrong; the message says how, the caller says where."""


class NotAZip(ZipError):
    """No end record: not a zip at all (or one whose end is missing)."""


class MemberError(ZipError):
    """A member's data is corrupt or truncated; the message says how, the caller says where."""


class Input(Protocol):
    """What reading a zip needs of its file: a seekable binary file object (an open file,
    ``io.BytesIO``, a :class:`WindowedFile`)."""

    def read(self, count: int, /) -> bytes: ...

    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...


class Blocks(NamedTuple):
    """A deflated member's blocks, as the directory lists them (gpuserial writes them, see
    ``_zipstream.ZipWriter``): each ``size`` bytes of data deflated alone, ending with a sync
    flush, ``deflated`` bytes each; the rest (under ``size``) ends the stream."""

    size: int
    deflated: tuple[int, ...]


class Member(NamedTuple):
    """A member as the central directory describes it (zipfile.ZipInfo's attribute names, its
    name's bytes, and where gpuserial wrote it in blocks, their list)."""

    filename: str
    header_offset: int
    compress_size: int
    file_size: int
    CRC: int
    compress_type: int
    flag_bits: int
    raw_name: bytes
    blocks: Blocks | None = None

    def is_dir(self) -> bool:
        return self.filename.endswith('/')


class Directory(NamedTuple):
    """A zip's central directory: its members, and where it starts (the members' bytes all lie
    before it)."""

    members: list[Member]
    start: int


def read_directory(fp: Input) -> Directory:
    """The members of the zip in ``fp``, from its central directory (ZIP64 included; data
    prepended to the zip is allowed, as zipfile allows it). The bytes of its last 64 KiB are
    read once: the end records and the directory take what they can from them.

    Raises:
        NotAZip: no end record.
        ZipError: a directory that is truncated, lies, spans disks, or needs a newer reader.
    """
    size = fp.seek(0, 2)
    tail_start = max(0, size - END_SEARCH)
    fp.seek(tail_start)
    tail = fp.read(size - tail_start)
    at = _end_record_at(tail)
    if at < 0:
        raise NotAZip('File is not a zip file')
    _, disk, directory_disk, _, _, directory_size, directory_offset, _ = END.unpack_from(tail, at)
    end = tail_start + at
    if end >= END64_LOCATOR.size + END64.size:
        locator = _read_span(fp, tail, tail_start, end - END64_LOCATOR.size, END64_LOCATOR.size)
        if locator[:4] == b'PK\x06\x07':
            _, locator_disk, _, disks = END64_LOCATOR.unpack(locator)
            if locator_disk or disks > 1:
                raise ZipError('zipfiles that span multiple disks are not supported')
            end = end - END64_LOCATOR.size - END64.size
            fields = END64.unpack(_read_span(fp, tail, tail_start, end, END64.size))
            if fields[0] != b'PK\x06\x06':
                raise ZipError('Corrupt ZIP64 end of central directory record')
            disk, directory_disk = fields[4], fields[5]
            directory_size, directory_offset = fields[8], fields[9]
    if disk or directory_disk:
        raise ZipError('zipfiles that span multiple disks are not supported')
    concat = end - directory_size - directory_offset  # bytes before the zip, if any
    start = directory_offset + concat
    if start < 0 or directory_size < 0 or start + directory_size > size:
        raise ZipError('Truncated central directory')
    data = _read_span(fp, tail, tail_start, start, directory_size)
    return Directory(_members(data, concat), start)


def _read_span(fp: Input, tail: bytes, tail_start: int, start: int, count: int) -> bytes:
    """``count`` bytes of ``fp`` from ``start`` (fewer where it ends), those from
    ``tail_start`` on taken from ``tail``, which holds the file's end (a ZipError if not)."""
    if start >= tail_start:
        return tail[start - tail_start:start - tail_start + count]
    fp.seek(start)
    head = fp.read(min(count, tail_start - start))
    if len(head) < min(count, tail_start - start):  # cut short since the tail was read
        raise ZipError('Truncated central directory')
    return head if start + count <= tail_start else head + tail[:start + count - tail_start]


def _end_record_at(tail: bytes) -> int:
    """Where the end record starts in ``tail`` (-1 if nowhere): the first signature whose
    comment reaches exactly to the end (the comment may hold signatures, even whole records),
    else the last whose record fits (some tools append bytes after a zip)."""
    fits = -1
    at = tail.find(END_SIGNATURE)
    while at >= 0 and at + END.size <= len(tail):
        if at + END.size + END.unpack_from(tail, at)[-1] == len(tail):
            return at
        fits = at
        at = tail.find(END_SIGNATURE, at + 1)
    return fits


def _members(data: bytes, concat: int) -> list[Member]:
    members: list[Member] = []
    add, unpack, fixed = members.append, CENTRAL_READ.unpack_from, CENTRAL.size  # looked up once
    new = tuple.__new__  # a NamedTuple's own __new__ is a Python function: twice as slow
    position = 0
    while position < len(data):
        if position + fixed > len(data):
            raise ZipError('Truncated central directory')
        (signature, needed, flags, method, crc, compressed, size, name_length, extra_length,
         comment_length, offset) = unpack(data, position)
        if signature != b'PK\x01\x02':
            raise ZipError('Bad magic number for central directory')
        if needed > MAX_EXTRACT_VERSION:
            raise ZipError(f'zip file version {needed / 10:.1f}')
        start = position + fixed
        raw_name = data[start:start + name_length]
        if raw_name.isascii():  # as nearly every name is: the same text in cp437 and UTF-8
            name = raw_name.decode('ascii')
        else:
            name = raw_name.decode('utf-8' if flags & UTF8_FLAG else 'cp437')
        blocks = None
        if extra_length or size == MARKER32 or compressed == MARKER32 or offset == MARKER32:
            size, compressed, offset, blocks = _extra_fields(
                data[start + name_length:start + name_length + extra_length],
                size, compressed, offset)
            if blocks is not None and not _fits(blocks, method, size, compressed):
                blocks = None  # not ours: read as one stream, as any reader would
        add(new(Member, (name, offset + concat, compressed, size, crc, method, flags,
                         raw_name, blocks)))
        position = start + name_length + extra_length + comment_length
    return members


def _extra_fields(extra: bytes, size: int, compressed: int, offset: int
                  ) -> tuple[int, int, int, Blocks | None]:
    """The 64-bit values of the ZIP64 extra field for the 32-bit fields that say so, and the
    member's block list where it has one."""
    position, zip64, blocks = 0, False, None
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from('<HH', extra, position)
        if position + 4 + length > len(extra):
            raise ZipError('Corrupt extra field')
        if tag == 1 and not zip64:
            zip64 = True
            values = list(struct.unpack_from(f'<{length // 8}Q', extra, position + 4))
            wanted = [size, compressed, offset].count(MARKER32)
            if len(values) < wanted:
                raise ZipError('Corrupt extra field: too few ZIP64 values')
            if size == MARKER32:
                size = values.pop(0)
            if compressed == MARKER32:
                compressed = values.pop(0)
            if offset == MARKER32:
                offset = values.pop(0)
        elif tag == BLOCKS_TAG and length >= 4 and length % 4 == 0:
            block_size, *deflated = struct.unpack_from(f'<{length // 4}I', extra, position + 4)
            blocks = Blocks(block_size, tuple(deflated))
        position += 4 + length
    if not zip64 and MARKER32 in (size, compressed, offset):
        raise ZipError('a field says ZIP64, but there is no ZIP64 extra field')
    return size, compressed, offset, blocks


def _fits(blocks: Blocks, method: int, size: int, compressed: int) -> bool:
    """Whether a block list fits its member: deflated, a block for each whole block size of
    its data, each ending in a sync flush (5 bytes at least), the stream's end after them."""
    return (method == DEFLATED and BLOCK_SIZES[0] <= blocks.size <= BLOCK_SIZES[1]
            and len(blocks.deflated) == size // blocks.size
            and min(blocks.deflated, default=5) >= 5 and sum(blocks.deflated) < compressed)


class WindowedFile:
    """A seekable binary file read through a read-ahead window (see the module)."""

    def __init__(self, fp: Input, window: int = WINDOW):
        self.fp = fp
        self.window = window
        self.start = 0
        self.bytes = b''  # the window
        self.data = memoryview(self.bytes)
        self.position = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self.position = self.fp.seek(offset, 2)
        else:
            self.position = offset if whence == 0 else self.position + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def expect(self, ranges: list[tuple[int, int]]) -> None:
        """Says that these byte ranges (members' data, increasing) are to be read in order, to
        a file that can fetch them ahead (an object in a store)."""
        expect = getattr(self.fp, 'expect', None)
        if expect is not None:
            expect(ranges)

    def _cached(self, count: int) -> memoryview | None:
        """The next ``count`` bytes from the window, refilled when they are not in it; None
        for a large read, which goes straight to the file."""
        at = self.position - self.start
        if 0 <= at and at + count <= len(self.data):
            return self.data[at:at + count]
        if count >= DIRECT:
            return None
        fetching = getattr(self.fp, 'fetching_ahead', None)  # an object in a store
        if fetching is not None and fetching(self.position):
            # no read-ahead, nor a read again of what the window holds: going back, the
            # store's fetches ahead would start afresh (fetching pieces again)
            held = self.data[at:] if 0 <= at < len(self.data) else b''
            self.fp.seek(self.position + len(held))
            data = bytes(held) + self.fp.read(count - len(held))
        else:
            self.fp.seek(self.position)
            data = self.fp.read(max(self.window, count))
        self.bytes = data if type(data) is bytes else bytes(data)  # sliced into headers to hash
        self.data = memoryview(self.bytes)
        self.start = self.position
        return self.data[:count]

    def window_at(self, position: int, count: int) -> tuple[bytes, int]:
        """The window, refilled to hold up to ``count`` bytes at ``position`` (fewer at the end
        of the file; ``count`` below :data:`DIRECT`), and where ``position`` lies in it: small
        reads slice and compare its bytes without a view each. The position is left at
        ``position``."""
        self.position = position
        at = position - self.start
        if not (0 <= at and at + count <= len(self.bytes)):
            self._cached(count)
            at = position - self.start
        return self.bytes, at

    def view(self, position: int, count: int) -> memoryview:
        """Up to ``count`` bytes at ``position`` (fewer at the end of the file): a view of the
        window where they fit in one, else read at once. The position is left at ``position``,
        not past the bytes."""
        self.position = position
        at = position - self.start
        if 0 <= at and at + count <= len(self.data):  # in the window, as small reads nearly are
            return self.data[at:at + count]
        cached = self._cached(count)
        if cached is None:
            self.fp.seek(position)
            cached = memoryview(self.fp.read(count))
        return cached

    def read(self, count: int) -> bytes:
        cached = self._cached(count)
        if cached is None:
            self.fp.seek(self.position)
            data = self.fp.read(count)
        else:
            data = bytes(cached)
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int | None:
        buffer = memoryview(buffer).cast('B')
        cached = self._cached(len(buffer))
        if cached is None:
            self.fp.seek(self.position)
            count = self.fp.readinto(buffer)
        else:
            count = len(cached)
            buffer[:count] = cached
        self.position += count or 0
        return count




class KeptBytes:
    """Bytes of the file read before, at their offset in it (a member's, kept from an earlier
    pass): read again as :class:`WindowedFile` reads them, with no read of the file."""

    def __init__(self, start: int, data: bytes):
        self.start = start
        self.data = memoryview(data)
        self.position = start

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise io.UnsupportedOperation('kept bytes seek to an offset only')
        self.position = offset
        return offset

    def tell(self) -> int:
        return self.position

    def view(self, position: int, count: int) -> memoryview:
        """Up to ``count`` bytes at ``position`` (none before or past the kept bytes)."""
        self.position = position
        at = position - self.start
        return self.data[at:at + count] if at >= 0 else self.data[:0]

    def read(self, count: int) -> bytes:
        data = bytes(self.view(self.position, count))
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        out = memoryview(buffer).cast('B')
        data = self.view(self.position, len(out))
        out[:len(data)] = data
        self.position += len(data)
        return len(data)


Viewable = WindowedFile | KeptBytes  # what reads a small member whole from its bytes at hand


def check_member(info) -> None:
    """Raises for a member this reader cannot read: encrypted, an unknown method, or stored
    sizes that disagree."""
    if info.compress_type not in (STORED, DEFLATED):
        raise MemberError(f'unsupported compression method {info.compress_type}')
    if info.compress_type == STORED and info.compress_size != info.file_size:
        raise MemberError(f'the zip directory says a stored member of {info.file_size} '
                          f'bytes takes {info.compress_size} bytes in the file')
    if info.flag_bits & ENCRYPTED_FLAG:
        raise MemberError('the member is encrypted (zip encryption is not supported)')


def data_start_of(fp: Input, info) -> int:
    """Checks the member's local header against the directory; returns where data starts."""
    fp.seek(info.header_offset)
    signature, flags, name_length, extra_length = LOCAL_CHECKED.unpack(_read(fp, LOCAL.size))
    return _checked_local(info, signature, flags, _read(fp, name_length), extra_length)


def _checked_local(info, signature: bytes, flags: int, name: bytes | memoryview,
                   extra_length: int) -> int:
    """Checks a local header's fields against the directory; returns where the data starts."""
    if signature != b'PK\x03\x04':
        raise MemberError('bad local file header')
    if flags & ENCRYPTED_FLAG:
        raise MemberError('the member is encrypted (its local header says so)')
    if getattr(info, 'raw_name', None) != name:  # the bytes, else (a ZipInfo) the text
        text = bytes(name).decode('utf-8' if info.flag_bits & UTF8_FLAG else 'cp437', 'replace')
        if text != info.filename:
            raise MemberError(f'the zip directory names {info.filename!r} but the local header '
                              f'{text!r}')
    return info.header_offset + LOCAL.size + len(name) + extra_length


def regular_stored(fp: WindowedFile, info, count: int) -> tuple[bytes, int, int] | None:
    """The common case of :func:`stored_head`, in few steps: for a stored, unencrypted member
    whose local header repeats the directory's name bytes, the window, where the member's data
    starts in it and in the file, with up to ``count`` of its bytes in the window; None for any
    other member (:func:`stored_head` then checks it and says what is wrong)."""
    if type(info) is not Member:  # a zipfile.ZipInfo: no name bytes to compare
        return None
    _, offset, compress_size, file_size, _, method, flags, raw_name, _ = info
    if method != STORED or flags & ENCRYPTED_FLAG or compress_size != file_size or offset < 0:
        return None
    window, at = fp.window_at(offset, LOCAL.size + HEAD_GUESS + count)
    start = at + LOCAL.size
    if len(window) < start:
        return None
    signature, flags, name_length, extra_length = LOCAL_CHECKED.unpack_from(window, at)
    if (signature != b'PK\x03\x04' or flags & ENCRYPTED_FLAG or name_length != len(raw_name)
            or not window.startswith(raw_name, start)):
        return None
    start += name_length + extra_length
    if len(window) - start < (count if count < file_size else file_size):
        return None
    return window, start, offset + start - at


def stored_head(fp: WindowedFile, info, count: int) -> tuple[int, bytes]:
    """For a stored member: where its data starts (its local header checked) and up to
    ``count`` of its first bytes, from the window where they fit."""
    regular = regular_stored(fp, info, count)
    if regular is not None:
        window, at, start = regular
        return start, window[at:at + min(count, info.file_size)]
    view = fp.view(info.header_offset, LOCAL.size + HEAD_GUESS + count)
    if len(view) < LOCAL.size:
        raise MemberError(f'truncated: {len(view)} of {LOCAL.size} header bytes')
    signature, flags, name_length, extra_length = LOCAL_CHECKED.unpack_from(view)
    name_end = LOCAL.size + name_length
    if len(view) < name_end:  # a name longer than the guess: read again, whole
        view = fp.view(info.header_offset, name_end)
    if len(view) < name_end:
        raise MemberError(f'truncated: {len(view)} of {name_end} header bytes')
    start = _checked_local(info, signature, flags, view[LOCAL.size:name_end], extra_length)
    wanted = min(count, info.file_size)
    head = bytes(view[start - info.header_offset:start - info.header_offset + wanted])
    if len(head) < wanted:
        head = bytes(fp.view(start, wanted))
        if len(head) < wanted:
            raise MemberError(f'truncated: the file ends within the member ({info.file_size} '
                              f'bytes)')
    return start, head


def read_stored(fp: Viewable, info, data_start: int, head: int, out) -> None:
    """Reads a whole stored member: its first ``head`` bytes are skipped, the rest go into
    ``out`` (exactly that long); checks the CRC of all of it."""
    if (type(out) is not memoryview or out.format != 'B' or out.ndim != 1
            or not out.c_contiguous):  # else cast already
        out = memoryview(out).cast('B')
    if head + len(out) != info.file_size:
        raise MemberError(f'asked for {head + len(out)} bytes of a member of {info.file_size}')
    if info.file_size < DIRECT:  # from the window, with its neighbours
        data = fp.view(data_start, info.file_size)
        if len(data) < info.file_size:
            raise MemberError(f'truncated: the file ends {info.file_size - len(data)} bytes '
                              f'early')
        crc = crc32(data)  # checked before ``out`` changes: it may be the caller's array
        if crc != info.CRC:
            raise _crc_mismatch(info, crc)
        out[:] = data[head:]
        return
    crc = crc32(fp.view(data_start, head))  # larger: straight into ``out``
    fp.seek(data_start + head)
    done = 0
    while done < len(out):
        count = fp.readinto(out[done:])
        if not count:
            raise MemberError(f'truncated: the file ends {len(out) - done} bytes early')
        done += count
    crc = crc32(out, crc)
    if crc != info.CRC:
        raise _crc_mismatch(info, crc)


def read_deflated(fp: Viewable, info, data_start: int, head: int, out) -> None:
    """:func:`read_stored` for a small deflated member (stored bytes below :data:`DIRECT`):
    its bytes from the window, inflated in one call; the sizes, the end of the stream and the
    CRC are checked before ``out`` changes."""
    out = memoryview(out).cast('B')
    if head + len(out) != info.file_size:
        raise MemberError(f'asked for {head + len(out)} bytes of a member of {info.file_size}')
    raw = fp.view(data_start, info.compress_size)
    if len(raw) < info.compress_size:
        raise MemberError(f'truncated: the file ends {info.compress_size - len(raw)} bytes '
                          f'early')
    inflater = deflate_module.decompressobj(-15)
    try:  # one byte more than the directory says: a longer stream shows, memory stays bound
        data = inflater.decompress(raw, info.file_size + 1)
    except DEFLATE_ERRORS as error:
        raise MemberError(f'corrupt deflate data: {error}') from None
    if len(data) < info.file_size:
        raise MemberError(f'the deflate stream ends {info.file_size - len(data)} bytes early')
    if len(data) > info.file_size or not inflater.eof:
        raise MemberError('the deflate stream holds more than the directory says')
    if inflater.unused_data:  # (at the end of the stream, all the input left is here)
        raise MemberError(f'the member holds {len(inflater.unused_data)} bytes after the end '
                          f'of its deflate stream')
    crc = crc32(data)
    if crc != info.CRC:
        raise _crc_mismatch(info, crc)
    out[:] = memoryview(data)[head:]


def inflated_head(fp: Input, info, data_start: int, count: int) -> bytes:
    """Up to ``count`` of a deflated member's first data bytes, for its headers (fewer where
    its stream ends first), inflated by zlib, which stops once it has them: ISA-L inflates all
    the input it is given, whatever is asked for. Not checked beyond them (their CRC is, as
    the member's data is read)."""
    count = min(count, info.file_size)
    inflater = zlib.decompressobj(-15)
    position, left = data_start, info.compress_size
    pending, out = b'', b''
    while len(out) < count and not inflater.eof:
        if not pending:
            if not left:
                break
            fp.seek(position)
            pending = fp.read(min(HEAD_PIECE, left))
            if not pending:
                raise MemberError(f'truncated: the file ends {left} bytes early')
            position, left = position + len(pending), left - len(pending)
        try:
            out += inflater.decompress(pending, count - len(out))
        except zlib.error as error:
            raise MemberError(f'corrupt deflate data: {error}') from None
        pending = inflater.unconsumed_tail
    return out


def _crc_mismatch(info, crc: int) -> MemberError:
    return MemberError(f'CRC mismatch (directory {info.CRC:08x}, data {crc:08x}): the data is '
                       f'corrupt')


class MemberReader:
    """Reads one member's data (stored or deflated) as a stream, checking size and CRC.

    Args:
        fp: the archive's binary file object (seekable; a :class:`WindowedFile` for speed).
        info: the member from the central directory (a :class:`Member` or a
            ``zipfile.ZipInfo``).
        data_start: where its data starts, when an earlier reader of it found out (the local
            header is then not read again).
        whole: the member is to be read whole: where it was deflated in blocks, they are
            inflated ahead of the reader on the worker threads (else a piece at a time, as
            asked for: its first bytes, a slice).
    """

    def __init__(self, fp: Input, info, data_start: int | None = None, *, whole: bool = False):
        check_member(info)
        self.fp = fp
        self.info = info
        self.position = data_start_of(fp, info) if data_start is None else data_start
        self.left = info.compress_size  # stored bytes not yet read
        expect = getattr(fp, 'expect', None)  # a remote file reads ahead within the member
        if expect is not None:
            expect([(self.position, self.position + self.left)])
        self.produced = 0
        self.crc = 0
        self.inflater = deflate_module.decompressobj(-15) if info.compress_type else None
        self.pending = b''  # inflater input not yet consumed
        blocks = getattr(info, 'blocks', None)  # a zipfile.ZipInfo has none
        self.blocks = (_BlockInflater(self._raw, blocks, info.file_size, info.compress_size)
                       if whole and blocks is not None and info.compress_type
                       and workers.count() > 1 else None)

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
        if self.blocks is not None:
            self.blocks.readinto(buffer)
            self.crc = crc32(buffer, self.crc)
        elif self.inflater is None:
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
        if self.blocks is not None:
            self.blocks.finish()
        elif self.inflater is not None and not self.inflater.eof:
            try:
                extra = self.inflater.decompress(self.pending + self._raw(self.left), 1)
            except DEFLATE_ERRORS as error:
                raise MemberError(f'corrupt deflate data: {error}') from None
            if extra or not self.inflater.eof:
                raise MemberError('the deflate stream holds more than the directory says')
            self.pending = self.inflater.unconsumed_tail
        if self.inflater is not None and self.blocks is None:
            trailing = len(self.pending) + len(self.inflater.unused_data) + self.left
            if trailing:
                raise MemberError(f'the member holds {trailing} bytes after the end of its '
                                  f'deflate stream')
        if self.crc != self.info.CRC:
            raise MemberError(f'CRC mismatch (directory {self.info.CRC:08x}, data '
                              f'{self.crc:08x}): the data is corrupt')


class _BlockInflater:
    """A deflated member's data from its blocks (see :class:`Blocks`), inflated in order on the
    worker threads (``engine.workers``), up to :func:`workers.count` ``+ 1`` blocks ahead of the
    reader. ``raw`` reads the member's next deflated bytes."""

    def __init__(self, raw, blocks: Blocks, file_size: int, compress_size: int):
        self.raw = raw
        last = (compress_size - sum(blocks.deflated), file_size % blocks.size, True)
        self.blocks = collections.deque([*((deflated, blocks.size, False)
                                           for deflated in blocks.deflated), last])
        self.ahead: collections.deque[Future | bytes] = collections.deque()
        self.data = memoryview(b'')  # the block being read, from where the reader stands

    def readinto(self, buffer: memoryview) -> None:
        """Fills ``buffer`` with the next data bytes (the caller checks that the member holds
        them)."""
        done = 0
        while done < len(buffer):
            if not self.data:
                self.data = self._next()
            count = min(len(self.data), len(buffer) - done)
            buffer[done:done + count] = self.data[:count]
            self.data = self.data[count:]
            done += count

    def _next(self) -> memoryview:
        """The next block's data, the blocks after it put under way. (There is one: each
        block holds what the list says, and the reader asks for no more than they hold.)"""
        while self.blocks and len(self.ahead) <= workers.count():
            deflated, size, last = self.blocks.popleft()
            data = self.raw(deflated)
            self.ahead.append(workers.submit(_inflate_block, data, size, last)
                              or _inflate_block(data, size, last))
        done = self.ahead.popleft()
        return memoryview(done.result() if isinstance(done, Future) else done)

    def finish(self) -> None:
        """Checks that the blocks not read yet hold nothing (the stream's end)."""
        while self.blocks or self.ahead or self.data:
            if self.data or self._next():
                raise MemberError('the deflate stream holds more than the directory says')


def _inflate_block(data: bytes, size: int, last: bool) -> bytes:
    """A block of ``size`` bytes inflated alone from ``data``: a whole block ends with a sync
    flush, the last ends the stream; MemberError otherwise."""
    inflater = deflate_module.decompressobj(-15)
    try:  # one byte more than the block holds: a longer stream shows, memory stays bound
        inflated = inflater.decompress(data, size + 1)
    except DEFLATE_ERRORS as error:
        raise MemberError(f'corrupt deflate data: {error}') from None
    if len(inflated) > size or inflater.unconsumed_tail:
        raise MemberError('the deflate stream holds more than the directory says')
    if last and (len(inflated) < size or not inflater.eof):
        raise MemberError(f'the deflate stream ends {size - len(inflated)} bytes early'
                          if len(inflated) < size else 'the deflate stream does not end')
    if last and inflater.unused_data:
        raise MemberError(f'the member holds {len(inflater.unused_data)} bytes after the end '
                          f'of its deflate stream')
    if not last and (len(inflated) < size or inflater.eof or data[-4:] != SYNC_FLUSH_END):
        raise MemberError('its deflate stream does not break where the directory\'s block list '
                          'says')
    return inflated


def _read(fp, count: int) -> bytes:
    data = fp.read(count)
    if len(data) < count:
        raise MemberError(f'truncated: {len(data)} of {count} header bytes')
    return data
