"""The ``.npy`` format, pure: bytes and plain values in and out (no zip, no files, no cupy).

Every claim a header makes is checked before anyone allocates memory for it, and the one
pickle accepted, Chainer's ``None`` (a 0-d object array holding ``None``), is recognised by
walking its opcodes against an allow-list: nothing is ever unpickled.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import pickletools
import re
import struct
from typing import Any

import numpy
from numpy.lib import format as npformat

MAGIC = b'\x93NUMPY'
PREFIX_LEN = len(MAGIC) + 2  # magic, major, minor
ALIGN = 64  # numpy pads the header so that the data starts on a 64-byte boundary
MAX_HEADER_LEN = 10000  # numpy's own limit on a header it will parse
VERSION_1_MAX_HEADER = 0xFFFF
LENGTH_V1, LENGTH_V2 = struct.Struct('<H'), struct.Struct('<I')  # the header length's field
V1_PREFIX = MAGIC + b'\x01\x00'
V1_FIXED = PREFIX_LEN + LENGTH_V1.size  # a version 1.0 header's bytes before its text
HEADER_KEYS = {'descr', 'fortran_order', 'shape'}
MAX_NDIM = 64 if numpy.lib.NumpyVersion(numpy.__version__) >= '2.0.0' else 32  # numpy's own
MAX_EXTENT = numpy.iinfo(numpy.intp).max  # numpy refuses shapes whose bytes could exceed this

# Chainer's None is ``numpy.save`` of ``numpy.asarray(None)``: a 0-d object array holding None,
# pickled. Over the years numpy wrote it with pickle protocols 2 to 5, Python 2 and 3 string
# opcodes, ``_codecs.encode`` for bytes (protocol 2 under Python 3), ``numpy.core`` or
# ``numpy._core``, and the dtype's flags as ints or bools. It is recognised by walking the
# opcodes (never running them) against an allow-list of these globals and calls.
NONE_PICKLE_MAX_LEN = 512  # the forms above are about 200 bytes; a longer payload is not one
NONE_PICKLE = (
    b'\x80\x03cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85q\x02C'
    b'\x01bq\x03\x87q\x04Rq\x05(K\x01)cnumpy\ndtype\nq\x06X\x02\x00\x00\x00O8q\x07\x89\x88\x87q'
    b'\x08Rq\t(K\x03X\x01\x00\x00\x00|q\nNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tq\x0bb\x89]q\x0c'
    b'Natq\rb.')
"""What gpuserial writes for ``None``: Chainer's form under NumPy < 2, which every NumPy loads."""

_NONE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): '_reconstruct',
    ('numpy._core.multiarray', '_reconstruct'): '_reconstruct',
    ('numpy', 'ndarray'): 'ndarray',
    ('numpy', 'dtype'): 'dtype',
    ('_codecs', 'encode'): 'encode',
}
_OBJECT_DTYPE_STATE = (3, '|', None, None, None, -1, -1, 63)  # version, byte order, ..., flags
_TEXT_OPS = {'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8', 'UNICODE', 'STRING', 'BINSTRING',
             'SHORT_BINSTRING'}  # Python 2's str arrives as text, as numpy loads it (latin1)
_BYTES_OPS = {'SHORT_BINBYTES', 'BINBYTES', 'BINBYTES8'}
_INT_OPS = {'INT', 'BININT', 'BININT1', 'BININT2', 'LONG1'}
_PUT_OPS = {'PUT', 'BINPUT', 'LONG_BINPUT'}
_GET_OPS = {'GET', 'BINGET', 'LONG_BINGET'}


class _NotNone(Exception):
    """The pickle is not Chainer's None."""


@dataclasses.dataclass(frozen=True)
class _Global:
    name: str  # a value of _NONE_GLOBALS


class _Made:
    """What a REDUCE of an allowed global would make (nothing is made), and its BUILD state."""

    def __init__(self, name: str):
        self.name = name
        self.state: object = _Made


def _reduce(function, args) -> object:
    if not isinstance(function, _Global) or not isinstance(args, tuple):
        raise _NotNone
    if function.name == 'encode' and len(args) == 2 and args[1] == 'latin1' \
            and isinstance(args[0], str):
        return args[0].encode('latin1')
    if function.name == 'dtype' and args == ('O8', False, True):
        return _Made('dtype')
    if (function.name == '_reconstruct' and len(args) == 3 and args[0] == _Global('ndarray')
            and args[1] == (0,) and args[2] in ('b', b'b')):
        return _Made('ndarray')
    raise _NotNone


def _walk(payload: bytes) -> object:
    """The value a pickle would build, as far as the allow-list lets it be described."""
    stack: list = []
    marks: list[int] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list:
        start = marks.pop()  # an IndexError where there is no MARK
        items = stack[start:]
        del stack[start:]
        return items

    arg: Any  # of the opcode's own type (genops says Any | None)
    for number, (op, arg, position) in enumerate(pickletools.genops(payload)):
        name = op.name
        if number == 0 and (name != 'PROTO' or not 2 <= arg <= 5):
            raise _NotNone
        if name in ('PROTO', 'FRAME'):
            continue
        if name == 'STOP':
            if position != len(payload) - 1 or len(stack) != 1 or marks:
                raise _NotNone  # more data after the pickle, or a stack left unbalanced
            return stack[0]
        if name == 'MARK':
            marks.append(len(stack))
        elif name in ('GLOBAL', 'STACK_GLOBAL'):
            if name == 'GLOBAL':
                module, _, attribute = arg.partition(' ')
            else:
                attribute, module = stack.pop(), stack.pop()
            if (module, attribute) not in _NONE_GLOBALS:
                raise _NotNone
            stack.append(_Global(_NONE_GLOBALS[module, attribute]))
        elif name in _PUT_OPS:
            memo[arg] = stack[-1]
        elif name == 'MEMOIZE':
            memo[len(memo)] = stack[-1]
        elif name in _GET_OPS:
            stack.append(memo[arg])
        elif name in ('NONE', 'NEWTRUE', 'NEWFALSE'):
            stack.append({'NONE': None, 'NEWTRUE': True, 'NEWFALSE': False}[name])
        elif name in _INT_OPS or name in _TEXT_OPS or name in _BYTES_OPS:
            stack.append(arg)
        elif name == 'EMPTY_TUPLE':
            stack.append(())
        elif name in ('TUPLE1', 'TUPLE2', 'TUPLE3'):
            count = int(name[-1])
            items = tuple(stack[-count:])
            if len(items) != count:
                raise _NotNone
            del stack[-count:]
            stack.append(items)
        elif name == 'TUPLE':
            stack.append(tuple(pop_mark()))
        elif name == 'EMPTY_LIST':
            stack.append([])
        elif name == 'APPEND':
            item = stack.pop()
            if not isinstance(stack[-1], list):
                raise _NotNone
            stack[-1].append(item)
        elif name == 'REDUCE':
            args = stack.pop()
            stack.append(_reduce(stack.pop(), args))
        elif name == 'BUILD':
            state = stack.pop()
            if not isinstance(stack[-1], _Made) or stack[-1].state is not _Made:
                raise _NotNone
            stack[-1].state = state
        else:
            raise _NotNone
    raise _NotNone  # not reached: genops raises ValueError for a pickle without STOP


def _is_none_pickle(payload: bytes) -> bool:
    if len(payload) > NONE_PICKLE_MAX_LEN:
        return False
    try:
        made = _walk(payload)
    except (_NotNone, ValueError, IndexError, KeyError, TypeError, UnicodeError):
        return False  # genops on malformed data, a pop from an empty stack, an unknown memo
    if not isinstance(made, _Made) or made.name != 'ndarray' or not isinstance(made.state, tuple):
        return False
    if len(made.state) != 5:
        return False
    version, shape, dtype, fortran_order, data = made.state
    return (version == 1 and shape == () and fortran_order is not True and fortran_order == 0
            and isinstance(dtype, _Made) and dtype.name == 'dtype'
            and dtype.state == _OBJECT_DTYPE_STATE and data == [None]
            and isinstance(data, list))


class HeaderError(ValueError):
    """A ``.npy`` header is malformed; the message says what is wrong, the caller says where."""


@dataclasses.dataclass(frozen=True)
class Header:
    """What a ``.npy`` header claims."""

    dtype: numpy.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    length: int  # bytes from the start of the member to the start of the data

    @functools.cached_property
    def size(self) -> int:
        return math.prod(self.shape)

    @functools.cached_property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def is_object(self) -> bool:
        return self.dtype.hasobject


@functools.lru_cache(maxsize=1024)
def encode_header(dtype: numpy.dtype, shape: tuple[int, ...]) -> bytes:
    """The header of a C-order ``.npy`` of ``dtype`` and ``shape``, padded as numpy pads it
    (a dtype's metadata, such as h5py's string encoding, is not stored)."""
    descr = npformat.dtype_to_descr(without_metadata(numpy.dtype(dtype)))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    body = text.encode('latin1')
    for version, length_format in ((b'\x01\x00', '<H'), (b'\x02\x00', '<I')):  # noqa: B007
        fixed = PREFIX_LEN + struct.calcsize(length_format)
        padding = -(fixed + len(body) + 1) % ALIGN
        length = len(body) + padding + 1
        if length <= VERSION_1_MAX_HEADER:
            break
    return MAGIC + version + struct.pack(length_format, length) + body + b' ' * padding + b'\n'


def without_metadata(dtype: numpy.dtype) -> numpy.dtype:
    """``dtype`` without the metadata on it or on its fields (h5py marks its strings and enums
    so), which a ``.npy`` header cannot hold (numpy warns of it); ``dtype`` itself when it has
    none."""
    if not _has_metadata(dtype):
        return dtype
    if dtype.subdtype is not None:  # an array of a dtype, as a field's type
        base, shape = dtype.subdtype
        return numpy.dtype((without_metadata(base), shape))
    if dtype.names is None or dtype.fields is None:
        return numpy.dtype(dtype.str)
    fields = [dtype.fields[name] for name in dtype.names]
    return numpy.dtype({'names': list(dtype.names), 'itemsize': dtype.itemsize,
                        'formats': [without_metadata(field[0]) for field in fields],
                        'offsets': [field[1] for field in fields],
                        'titles': [field[2] if len(field) > 2 else None for field in fields]})


def _has_metadata(dtype: numpy.dtype) -> bool:
    if dtype.metadata is not None:
        return True
    if dtype.subdtype is not None:
        return _has_metadata(dtype.subdtype[0])
    return dtype.fields is not None and any(_has_metadata(field[0])
                                            for field in dtype.fields.values())


def none_member() -> bytes:
    """The whole ``.npy`` member for a stored ``None``, as Chainer writes it."""
    return encode_header(numpy.dtype(object), ()) + NONE_PICKLE


def regular_header(data: bytes, at: int) -> Header | None:
    """The header at ``at`` in ``data`` (bytes) when it is numpy's usual (version 1.0) and
    whole there, decoded (see :func:`decode_header`); None for any other, which the caller
    reads in full."""
    if not data.startswith(V1_PREFIX, at):
        return None
    end = at + V1_FIXED
    if end > len(data):
        return None
    end += data[end - 2] | data[end - 1] << 8  # the header's length, a little-endian uint16
    if end > len(data):
        return None
    header = data[at:end]
    return _decode_cached(header) if len(header) <= CACHED_HEADER_LEN else _decode(header)


def header_length(prefix: bytes | memoryview) -> int:
    """From the first ``PREFIX_LEN + 4`` bytes of a member (or more), the total header length.

    Raises:
        HeaderError: not a ``.npy`` member, an unknown version, or a header over the limit.
    """
    if len(prefix) < PREFIX_LEN + 2 or prefix[:len(MAGIC)] != MAGIC:
        raise HeaderError(f'not a .npy member (starts {bytes(prefix[:8])!r})')
    version = prefix[6], prefix[7]
    if version == (1, 0):
        (length,) = LENGTH_V1.unpack_from(prefix, PREFIX_LEN)
        fixed = PREFIX_LEN + LENGTH_V1.size
    elif version in ((2, 0), (3, 0)):
        if len(prefix) < PREFIX_LEN + 4:
            raise HeaderError('truncated .npy header')
        (length,) = LENGTH_V2.unpack_from(prefix, PREFIX_LEN)
        fixed = PREFIX_LEN + LENGTH_V2.size
    else:
        raise HeaderError(f'unsupported .npy version {version[0]}.{version[1]}')
    if length > MAX_HEADER_LEN:
        raise HeaderError(f'.npy header of {length} bytes is over the limit of {MAX_HEADER_LEN}')
    return fixed + length


def decode_header(header: bytes) -> Header:
    """Parses a whole header (as long as :func:`header_length` said) and checks its claims.

    Headers repeat (a model's arrays share a few shapes): short ones are decoded once.

    Raises:
        HeaderError: malformed text, unknown keys, a bad dtype, or a bad shape.
    """
    if len(header) <= CACHED_HEADER_LEN:
        return _decode_cached(bytes(header))
    return _decode(header)


CACHED_HEADER_LEN = 256  # numpy's headers are 128 bytes; longer ones are decoded each time


@functools.lru_cache(maxsize=4096)
def _decode_cached(header: bytes) -> Header:
    return _decode(header)


def _decode(header: bytes) -> Header:
    length = header_length(header)
    if len(header) < length:
        raise HeaderError(f'truncated .npy header: {len(header)} of {length} bytes')
    start = PREFIX_LEN + (2 if header[6] == 1 else 4)
    encoding = 'utf8' if header[6] == 3 else 'latin1'
    fields = _canonical_fields(header[start:length])
    if fields is None:  # not as numpy writes it: Python's own (safe) literal parser
        try:
            text = header[start:length].decode(encoding)
            fields = ast.literal_eval(text)
        except (ValueError, SyntaxError, UnicodeDecodeError, RecursionError, MemoryError,
                TypeError) as error:
            raise HeaderError(f'unreadable .npy header {header[start:length][:80]!r}') \
                from error
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
    dtype = _dtype_of(fields['descr'])
    extent = max(dtype.itemsize, 1)  # as numpy counts it: zero-length axes do not help
    for dim in shape:
        extent *= max(dim, 1)
    if extent > MAX_EXTENT:
        raise HeaderError(f'shape {shape!r:.200} of dtype {dtype} in .npy header overflows: '
                          f'{extent} bytes is over the limit of {MAX_EXTENT}')
    return Header(dtype, shape, fields['fortran_order'], length)


# The header as numpy (and gpuserial) writes it: a plain descr string, then fortran_order, then
# a tuple of integers, padded with spaces. Read with a regular expression, it costs a fraction
# of ast.literal_eval; anything else goes to literal_eval, with the same checks after both.
_DIM = rb'(?:0|[1-9]\d{0,18})'  # as Python writes an int (longer ones: literal_eval's limits)
_CANONICAL = re.compile(rb"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (True|False), "
                        rb"'shape': \(((?:" + _DIM + rb", )*" + _DIM + rb"?,?)\), \} *\n?")


def _canonical_fields(text: bytes) -> dict | None:
    match = _CANONICAL.fullmatch(text)
    if match is None:
        return None
    descr, fortran, shape = match.groups()
    dims = tuple(int(dim) for dim in shape.split(b',') if dim.strip())
    if len(dims) == 1 and not shape.rstrip().endswith(b','):
        return None  # '(3)' is an int, not a tuple: literal_eval says so
    return {'descr': descr.decode(), 'fortran_order': fortran == b'True', 'shape': dims}


_descr_to_dtype = functools.lru_cache(maxsize=256)(npformat.descr_to_dtype)


def _dtype_of(descr) -> numpy.dtype:
    try:  # a plain string (nearly every header) from a cache
        return _descr_to_dtype(descr) if isinstance(descr, str) else npformat.descr_to_dtype(descr)
    except Exception as error:
        raise HeaderError(f'bad dtype {descr!r:.200} in .npy header') from error


def is_none_array(value) -> bool:
    """Whether ``value`` is Chainer's ``None`` as an array: a 0-d object array holding None,
    as ``DictionarySerializer`` stores it (and Chainer's snapshot writers are handed it)."""
    return isinstance(value, numpy.ndarray) and value.shape == () and value[()] is None


def is_chainer_none(header: Header, payload: bytes) -> bool:
    """Whether an object member is Chainer's ``None`` (its pickle is walked, never run)."""
    return (header.is_object and header.dtype == numpy.dtype(object) and header.shape == ()
            and _is_none_pickle(payload))
