"""Hand-made files for the integrity tests: ``.npy`` members, zips, edits of a zip's records.

Every helper works on bytes, so that a test can say exactly which claim of a file is a lie.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib

import numpy

from gpuserial.formats import _npy

CENTRAL = struct.Struct('<4s4B4H3L5H2L')  # a central directory record, before its name
END = struct.Struct('<4s4H2LH')  # the end of central directory record
LOCAL_SIZE = 30  # a local file header, before its name and extra field

# Offsets of the fields of a central directory record that the tests edit.
CENTRAL_FIELDS = {'version_needed': (6, '<H'), 'flags': (8, '<H'), 'method': (10, '<H'),
                  'crc': (16, '<I'),
                  'compress_size': (20, '<I'), 'file_size': (24, '<I'),
                  'header_offset': (42, '<I')}


def header_text(descr, shape, fortran_order=False) -> str:
    """A ``.npy`` header dict as numpy writes it (any values, so it can lie)."""
    return f"{{'descr': {descr!r}, 'fortran_order': {fortran_order!r}, 'shape': {shape!r}, }}"


def npy_member(header: str | bytes, payload: bytes = b'', version: tuple[int, int] = (1, 0),
               length: int | None = None) -> bytes:
    """A ``.npy`` member: magic, version, header length (``length`` to lie), header, payload."""
    body = header.encode('latin1') if isinstance(header, str) else header
    length_format = '<H' if version[0] == 1 else '<I'
    claimed = len(body) if length is None else length
    return _npy.MAGIC + bytes(version) + struct.pack(length_format, claimed) + body + payload


def npy_of(array: numpy.ndarray) -> bytes:
    """``numpy.save`` of ``array`` (object arrays pickled, as numpy does) as bytes."""
    out = io.BytesIO()
    numpy.save(out, array, allow_pickle=True)
    return out.getvalue()


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip holding ``members`` (name to data), written by the standard library."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, 'w', compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def npz_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    """An NPZ from ``.npy`` members by key (``key.npy``)."""
    return zip_of({key + '.npy': data for key, data in entries.items()}, compression)


def end_record(data: bytes) -> tuple[int, tuple]:
    """The offset and fields of the zip's end of central directory record."""
    offset = data.rindex(b'PK\x05\x06')
    return offset, END.unpack_from(data, offset)


def central_records(data: bytes) -> dict[str, int]:
    """The offset of each member's central directory record, by member name."""
    _, (_, _, _, _, count, _, start, _) = end_record(data)
    records, offset = {}, start
    for _ in range(count):
        fields = CENTRAL.unpack_from(data, offset)
        name_length, extra_length, comment_length = fields[12], fields[13], fields[14]
        name = data[offset + CENTRAL.size:offset + CENTRAL.size + name_length].decode()
        records[name] = offset
        offset += CENTRAL.size + name_length + extra_length + comment_length
    return records


def patch_central(data: bytes, name: str, field: str, value: int) -> bytes:
    """``data`` with one field of member ``name``'s central directory record set to ``value``."""
    position, layout = CENTRAL_FIELDS[field]
    out = bytearray(data)
    struct.pack_into(layout, out, central_records(data)[name] + position, value)
    return bytes(out)


def central_field(data: bytes, name: str, field: str) -> int:
    position, layout = CENTRAL_FIELDS[field]
    return struct.unpack_from(layout, data, central_records(data)[name] + position)[0]


def data_offset(data: bytes, name: str) -> int:
    """Where member ``name``'s (stored or compressed) data starts in the file."""
    local = central_field(data, name, 'header_offset')
    name_length, extra_length = struct.unpack_from('<HH', data, local + 26)
    return local + LOCAL_SIZE + name_length + extra_length


def flip(data: bytes, offset: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def close_unpickled(array: numpy.ndarray) -> None:
    """Closes the files a hostile pickle opened when a control case really unpickled it."""
    for item in numpy.asarray(array).flat:
        if hasattr(item, 'close'):
            item.close()


def temporaries(directory) -> list[str]:
    """The temporary files of saves left in ``directory``."""
    from gpuserial.storage._fileio import TEMP_SUFFIX
    return sorted(name for name in os.listdir(directory) if name.endswith(TEMP_SUFFIX))


# ---------------------------------------------------------------------------------------------
# A strict reader of the zips gpuserial writes: every record against every other


LOCAL = struct.Struct('<4s5H3L2H')
CENTRAL_RECORD = struct.Struct('<4s6H3L5H2L')
DESCRIPTOR = struct.Struct('<4sLQQ')
END64 = struct.Struct('<4sQ2H2L4Q')
LOCATOR = struct.Struct('<4sLQL')
MARKER32 = 0xFFFFFFFF


def check_zip_records(data: bytes, zip64_limit: int = MARKER32) -> list[dict]:
    """Checks each member's local header (and data descriptor) against its central directory
    record, the ZIP64 fields against ``zip64_limit`` (a value at or above it must be in ZIP64),
    and the end records; returns the members (name, offset, sizes, crc). Raises AssertionError.
    """
    end_at, (_, _, _, count16, total16, size32, start32, _) = end_record(data)
    zip64 = start32 == MARKER32 or size32 == MARKER32 or total16 == 0xFFFF
    if zip64:
        locator = data.rindex(b'PK\x06\x07', 0, end_at)
        assert locator == end_at - LOCATOR.size, 'the ZIP64 locator must precede the end record'
        _, _, end64_at, _ = LOCATOR.unpack_from(data, locator)
        (signature, record_size, _, _, _, _, count, total, size, start) = END64.unpack_from(
            data, end64_at)
        assert signature == b'PK\x06\x06' and end64_at + END64.size == locator
        assert record_size == END64.size - 12, 'the record size leaves out its first 12 bytes'
    else:
        count, total, size, start = count16, total16, size32, start32
    assert count == total
    assert (start >= zip64_limit or size >= zip64_limit or count >= 0xFFFF) == zip64, \
        'ZIP64 end records exactly when the directory needs them'
    members, position = [], start
    for _ in range(total):
        fields = CENTRAL_RECORD.unpack_from(data, position)
        (signature, _, needed, flags, method, _, _, crc, compressed32, size32, name_length,
         extra_length, comment_length, _, _, _, offset32) = fields
        assert signature == b'PK\x01\x02'
        name = data[position + CENTRAL_RECORD.size:][:name_length].decode()
        extra = data[position + CENTRAL_RECORD.size + name_length:][:extra_length]
        wide = iter(_zip64_values(extra))
        real_size = next(wide) if size32 == MARKER32 else size32
        real_compressed = next(wide) if compressed32 == MARKER32 else compressed32
        offset = next(wide) if offset32 == MARKER32 else offset32
        for value, field in ((real_size, size32), (real_compressed, compressed32),
                             (offset, offset32)):
            assert (field == MARKER32) == (value >= zip64_limit), (name, value, field)
        members.append(dict(name=name, offset=offset, size=real_size,
                            compressed=real_compressed, crc=crc, flags=flags, method=method))
        _check_local(data, members[-1], needed, zip64_limit)
        position += CENTRAL_RECORD.size + name_length + extra_length + comment_length
    assert position == start + size, 'the directory size in the end record'
    ends = [m['end'] for m in members]
    assert [m['offset'] for m in members[1:]] == ends[:-1], 'members follow one another'
    assert (ends[-1] if members else 0) == start, 'the directory follows the last member'
    return members


def _zip64_values(extra: bytes) -> list[int]:
    values, position = [], 0
    while position < len(extra):
        tag, length = struct.unpack_from('<HH', extra, position)
        if tag == 1:
            values = list(struct.unpack_from(f'<{length // 8}Q', extra, position + 4))
        position += 4 + length
    return values


def _check_local(data: bytes, member: dict, needed: int, zip64_limit: int) -> None:
    (signature, local_needed, flags, method, _, _, crc, compressed, size, name_length,
     extra_length) = LOCAL.unpack_from(data, member['offset'])
    assert signature == b'PK\x03\x04', member['name']
    assert (local_needed, flags, method) == (needed, member['flags'], member['method'])
    start = member['offset'] + LOCAL.size
    assert data[start:start + name_length].decode() == member['name']
    extra = data[start + name_length:start + name_length + extra_length]
    if (compressed, size) == (MARKER32, MARKER32):  # the sizes are in the ZIP64 extra field
        local_size, local_compressed = _zip64_values(extra)
    else:  # a member written whole, its sizes known: in the header itself, when they fit
        assert not flags & 0x08 and extra_length == 0, member['name']
        assert max(member['size'], member['compressed']) < zip64_limit, member['name']
        local_size, local_compressed = size, compressed
    data_start = start + name_length + extra_length
    end = data_start + member['compressed']
    if flags & 0x08:  # a data descriptor after the data holds the CRC and the sizes
        assert (crc, local_size, local_compressed) == (0, 0, 0), member['name']
        signature, crc, compressed, size = DESCRIPTOR.unpack_from(data, end)
        assert signature == b'PK\x07\x08'
        assert (crc, compressed, size) == (member['crc'], member['compressed'], member['size'])
        end += DESCRIPTOR.size
    else:
        assert (crc, local_size, local_compressed) == (member['crc'], member['size'],
                                                     member['compressed']), member['name']
    member['end'] = end


def deflated_npz(members: dict[str, tuple[bytes, int | None]], trailing: bytes = b'') -> bytes:
    """An NPZ whose members are deflate streams of ``data``, each member ``key: (data,
    claimed size)`` saying it inflates to the claimed size (None: its real size), each stream
    followed by ``trailing`` bytes."""
    streams = {}
    for key, (data, _) in members.items():
        deflater = zlib.compressobj(wbits=-15)
        streams[key + '.npy'] = deflater.compress(data) + deflater.flush() + trailing
    out = zip_of(streams)  # stored: the streams as they are; now say they are deflated
    for key, (data, claimed) in members.items():
        name = key + '.npy'
        local = central_field(out, name, 'header_offset')
        out = out[:local + 8] + struct.pack('<H', 8) + out[local + 10:]
        out = patch_central(out, name, 'method', 8)
        out = patch_central(out, name, 'file_size', len(data) if claimed is None else claimed)
        out = patch_central(out, name, 'crc', zlib.crc32(data))
    return out


class Unseekable(io.RawIOBase):
    """A write-only stream (a pipe, a socket): what was written is in ``data``."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.data += bytes(b)
        return len(b)
