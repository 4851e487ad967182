"""The ``.npy`` format, pure: bytes and plain values in and out (no zip, no files, no cupy).

Every claim a header makes is checked before anyone allocates memory for it, and the one
pickle accepted, Chainer's ``None`` (a 0-d object array holding ``None``), is recognised by its
exact bytes: nothing is ever unpickled.
"""

from __future__ import annotations

import ast
import dataclasses
import struct

import numpy
from numpy.lib import format as npformat

MAGIC = b'\x93NUMPY'
PREFIX_LEN = len(MAGIC) + 2  # magic, major, minor
ALIGN = 64  # numpy pads the header so that the data starts on a 64-byte boundary
MAX_HEADER_LEN = 10000  # numpy's own limit on a header it will parse
VERSION_1_MAX_HEADER = 0xFFFF
HEADER_KEYS = {'descr', 'fortran_order', 'shape'}
MAX_NDIM = 64 if numpy.lib.NumpyVersion(numpy.__version__) >= '2.0.0' else 32  # numpy's own
MAX_EXTENT = numpy.iinfo(numpy.intp).max  # numpy refuses shapes whose bytes could exceed this

# Chainer's None: ``numpy.save`` of ``numpy.asarray(None)``, pickled with the protocol and the
# module path each NumPy writes (protocol 3 and ``numpy.core`` below NumPy 2, protocol 4 and
# ``numpy._core`` from NumPy 2 on). The tail, after the module path, is common to all.
_NONE_TAIL_V2V3 = (b'_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85q\x02')
_NONE_STATE_V3 = (b'C\x01bq\x03\x87q\x04Rq\x05(K\x01)cnumpy\ndtype\nq\x06X\x02\x00\x00\x00O8q'
                  b'\x07\x89\x88\x87q\x08Rq\t(K\x03X\x01\x00\x00\x00|q\nNNNJ\xff\xff\xff\xffJ'
                  b'\xff\xff\xff\xffK?tq\x0bb\x89]q\x0cNatq\rb.')
_NONE_STATE_V2 = (b'c_codecs\nencode\nq\x03X\x01\x00\x00\x00bq\x04X\x06\x00\x00\x00latin1q\x05'
                  b'\x86q\x06Rq\x07\x87q\x08Rq\t(K\x01)cnumpy\ndtype\nq\nX\x02\x00\x00\x00O8q'
                  b'\x0b\x89\x88\x87q\x0cRq\r(K\x03X\x01\x00\x00\x00|q\x0eNNNJ\xff\xff\xff\xffJ'
                  b'\xff\xff\xff\xffK?tq\x0fb\x89]q\x10Natq\x11b.')
_NONE_BODY_V4 = (b'\x94\x8c\x0c_reconstruct\x94\x93\x94\x8c\x05numpy\x94\x8c\x07ndarray\x94\x93'
                 b'\x94K\x00\x85\x94C\x01b\x94\x87\x94R\x94(K\x01)h\x03\x8c\x05dtype\x94\x93\x94'
                 b'\x8c\x02O8\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01|\x94NNNJ\xff\xff\xff\xffJ'
                 b'\xff\xff\xff\xffK?t\x94b\x89]\x94Nat\x94b.')


def _none_pickles() -> frozenset[bytes]:
    found = set()
    for module in (b'numpy.core.multiarray', b'numpy._core.multiarray'):
        head = b'c' + module + b'\n' + _NONE_TAIL_V2V3
        found.add(b'\x80\x02' + head + _NONE_STATE_V2)
        found.add(b'\x80\x03' + head + _NONE_STATE_V3)
        frame = b'\x8c' + bytes([len(module)]) + module + _NONE_BODY_V4
        for protocol in (b'\x80\x04', b'\x80\x05'):
            found.add(protocol + b'\x95' + struct.pack('<Q', len(frame)) + frame)
    return frozenset(found)


NONE_PICKLES = _none_pickles()
NONE_PICKLE_MAX_LEN = max(map(len, NONE_PICKLES))
NONE_PICKLE = b'\x80\x03cnumpy.core.multiarray\n' + _NONE_TAIL_V2V3 + _NONE_STATE_V3
"""What gpuserial writes for ``None``: Chainer's form under NumPy < 2, which every NumPy loads."""


class HeaderError(ValueError):
    """A ``.npy`` header is malformed; the message says what is wrong, the caller says where."""


@dataclasses.dataclass(frozen=True)
class Header:
    """What a ``.npy`` header claims."""

    dtype: numpy.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    length: int  # bytes from the start of the member to the start of the data

    @property
    def size(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def is_object(self) -> bool:
        return self.dtype.hasobject


def encode_header(dtype: numpy.dtype, shape: tuple[int, ...]) -> bytes:
    """The header of a C-order ``.npy`` of ``dtype`` and ``shape``, padded as numpy pads it."""
    descr = npformat.dtype_to_descr(numpy.dtype(dtype))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    body = text.encode('latin1')
    for version, length_format in ((b'\x01\x00', '<H'), (b'\x02\x00', '<I')):
        fixed = PREFIX_LEN + struct.calcsize(length_format)
        padding = -(fixed + len(body) + 1) % ALIGN
        length = len(body) + padding + 1
        if version == b'\x02\x00' or length <= VERSION_1_MAX_HEADER:
            return (MAGIC + version + struct.pack(length_format, length) + body
                    + b' ' * padding + b'\n')
    raise AssertionError('unreachable')


def none_member() -> bytes:
    """The whole ``.npy`` member for a stored ``None``, as Chainer writes it."""
    return encode_header(numpy.dtype(object), ()) + NONE_PICKLE


def header_length(prefix: bytes) -> int:
    """From the first ``PREFIX_LEN + 4`` bytes of a member, the total header length.

    Raises:
        HeaderError: not a ``.npy`` member, an unknown version, or a header over the limit.
    """
    if len(prefix) < PREFIX_LEN + 2 or not prefix.startswith(MAGIC):
        raise HeaderError(f'not a .npy member (starts {prefix[:8]!r})')
    version = prefix[6], prefix[7]
    if version == (1, 0):
        (length,) = struct.unpack_from('<H', prefix, PREFIX_LEN)
        fixed = PREFIX_LEN + 2
    elif version in ((2, 0), (3, 0)):
        if len(prefix) < PREFIX_LEN + 4:
            raise HeaderError('truncated .npy header')
        (length,) = struct.unpack_from('<I', prefix, PREFIX_LEN)
        fixed = PREFIX_LEN + 4
    else:
        raise HeaderError(f'unsupported .npy version {version[0]}.{version[1]}')
    if length > MAX_HEADER_LEN:
        raise HeaderError(f'.npy header of {length} bytes is over the limit of {MAX_HEADER_LEN}')
    return fixed + length


def decode_header(header: bytes) -> Header:
    """Parses a whole header (as long as :func:`header_length` said) and checks its claims.

    Raises:
        HeaderError: malformed text, unknown keys, a bad dtype, or a bad shape.
    """
    length = header_length(header)
    if len(header) < length:
        raise HeaderError(f'truncated .npy header: {len(header)} of {length} bytes')
    start = PREFIX_LEN + (2 if header[6] == 1 else 4)
    encoding = 'utf8' if header[6] == 3 else 'latin1'
    try:
        text = header[start:length].decode(encoding)
        fields = ast.literal_eval(text)
    except (ValueError, SyntaxError, UnicodeDecodeError, RecursionError, MemoryError,
            TypeError) as error:
        raise HeaderError(f'unreadable .npy header {header[start:length][:80]!r}') from error
    if not isinstance(fields, dict) or set(fields) != HEADER_KEYS:
        raise HeaderError(f'.npy header must have the keys {sorted(HEADER_KEYS)}, '
                          f'got {fields!r:.200}')
    shape = fields['shape']
    if (not isinstance(shape, tuple)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise HeaderError(f'bad shape {shape!r:.200} in .npy header')
    if len(shape) > MAX_NDIM:
        raise HeaderError(f'shape {shape!r:.200} in .npy header has {len(shape)} dimensions, '
                          f'over the limit of {MAX_NDIM}')
    if not isinstance(fields['fortran_order'], bool):
        raise HeaderError(f"bad fortran_order {fields['fortran_order']!r:.80} in .npy header")
    try:
        dtype = npformat.descr_to_dtype(fields['descr'])
    except Exception as error:
        raise HeaderError(f"bad dtype {fields['descr']!r:.200} in .npy header") from error
    extent = max(dtype.itemsize, 1)  # as numpy counts it: zero-length axes do not help
    for dim in shape:
        extent *= max(dim, 1)
    if extent > MAX_EXTENT:
        raise HeaderError(f'shape {shape!r:.200} of dtype {dtype} in .npy header overflows: '
                          f'{extent} bytes is over the limit of {MAX_EXTENT}')
    return Header(dtype, shape, fields['fortran_order'], length)


def is_chainer_none(header: Header, payload: bytes) -> bool:
    """Whether an object member is exactly Chainer's ``None`` (no pickle is run)."""
    return header.is_object and header.shape == () and payload in NONE_PICKLES
