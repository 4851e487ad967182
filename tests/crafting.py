"""Hand-made files for the integrity tests: ``.npy`` members, zips, edits of a zip's records.

Every helper works on bytes, so that a test can say exactly which claim of a file is a lie.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile

import numpy

from gpuserial import _npy

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


def temporaries(directory) -> list[str]:
    """The temporary files of saves left in ``directory``."""
    from gpuserial._fileio import TEMP_SUFFIX
    return sorted(name for name in os.listdir(directory) if name.endswith(TEMP_SUFFIX))
