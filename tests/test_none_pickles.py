"""Chainer's None in every encoding numpy has written loads as None; look-alikes are refused.

Each encoding is a real pickle of a 0-d object array holding None (the tests check that with
``pickle.loads``, on pickles they made themselves), written into an NPZ member as numpy.save
writes it. gpuserial recognises it by walking its opcodes, never by running it.
"""

import binascii
import io
import pickle
import pickletools
import struct

import numpy
import pytest

from gpuserial import serializers
from gpuserial.errors import UnsafeFileError
from tests import crafting

# The 192-byte protocol-2 pickle of Chainer files saved under Python 3 with numpy < 1.17.
ISSUE_SAMPLE = binascii.unhexlify(
    '8002636e756d70792e636f72652e6d756c746961727261790a5f7265636f6e7374727563740a7100636e756d70'
    '790a6e6461727261790a71014b00857102635f636f646563730a656e636f64650a710358010000006271045806'
    '0000006c6174696e317105867106527107877108527109284b0129636e756d70790a64747970650a710a580200'
    '00004f38710b4b004b0187710c52710d284b0358010000007c710e4e4e4e4affffffff4affffffff4b3f74710f'
    '62895d71104e61747111622e')


def _ops(payload: bytes) -> list[tuple[str, object]]:
    return [(op.name, arg) for op, arg, _ in pickletools.genops(payload)]


def _emit(ops: list[tuple[str, object]]) -> bytes:
    """Pickle bytes of ``(opcode name, argument)`` pairs; a protocol-4+ body gets one frame."""
    out = io.BytesIO()
    for name, arg in ops:
        if name == 'FRAME':
            continue
        op = pickletools.opcodes[[o.name for o in pickletools.opcodes].index(name)]
        out.write(op.code.encode('latin1'))
        out.write(_encode_arg(name, arg))
    body = out.getvalue()
    protocol = ops[0][1]
    if protocol < 4:
        return body
    head, rest = body[:2], body[2:-1]  # PROTO n, ..., STOP
    return head + b'\x95' + struct.pack('<Q', len(rest) + 1) + rest + b'.'


def _encode_arg(name: str, arg) -> bytes:
    if name in ('PROTO', 'BININT1', 'BINPUT', 'BINGET'):
        return struct.pack('<B', arg)
    if name == 'BININT':
        return struct.pack('<i', arg)
    if name == 'GLOBAL':
        return arg.replace(' ', '\n').encode('latin1') + b'\n'
    if name == 'BINUNICODE':
        data = arg.encode('utf-8')
        return struct.pack('<I', len(data)) + data
    if name == 'SHORT_BINUNICODE':
        data = arg.encode('utf-8')
        return struct.pack('<B', len(data)) + data
    if name in ('SHORT_BINBYTES', 'SHORT_BINSTRING'):
        data = arg if isinstance(arg, bytes) else arg.encode('latin1')
        return struct.pack('<B', len(data)) + data
    if name == 'INT':
        return (b'I01' if arg is True else b'I00' if arg is False else b'I%d' % arg) + b'\n'
    if arg is None:
        return b''
    raise AssertionError(f'no encoder for {name}')


def _with_module(ops, module: str):
    old = ('numpy._core.multiarray', 'numpy.core.multiarray')
    out = []
    for name, arg in ops:
        if name == 'GLOBAL' and arg.split(' ')[0] in old:
            arg = module + ' ' + arg.split(' ')[1]
        elif name == 'SHORT_BINUNICODE' and arg in old:
            arg = module
        out.append((name, arg))
    return out


def _python2(ops):
    """Python 2's numpy: str as SHORT_BINSTRING, the type code a str, flags as ints."""
    out, skip = [], 0
    for index, (name, arg) in enumerate(ops):
        if skip:
            skip -= 1
            continue
        if name == 'GLOBAL' and arg == '_codecs encode':  # encode('b', 'latin1') -> 'b'
            reduce_at = next(i for i in range(index, len(ops)) if ops[i][0] == 'REDUCE')
            out.append(('SHORT_BINSTRING', 'b'))
            skip = reduce_at - index
            continue
        if name in ('BINUNICODE', 'SHORT_BINUNICODE') and arg in ('O8', '|', 'b'):
            name = 'SHORT_BINSTRING'
        if name == 'SHORT_BINBYTES':
            name, arg = 'SHORT_BINSTRING', arg.decode('latin1')
        out.append((name, arg))
    return _flags_as_ints(out)


def _flags_as_ints(ops):
    out = list(ops)
    for index, (name, _) in enumerate(ops[:-2]):
        if (name, ops[index + 1][0], ops[index + 2][0]) == ('NEWFALSE', 'NEWTRUE', 'TUPLE3'):
            out[index], out[index + 1] = ('BININT1', 0), ('BININT1', 1)
    return out


def _numpy_pickle(protocol: int) -> bytes:
    return pickle.dumps(numpy.asarray(None, dtype=object), protocol=protocol)


ENCODINGS = {'issue sample (protocol 2, numpy < 1.17)': ISSUE_SAMPLE}
for _protocol in (2, 3, 4, 5):
    _base = _ops(_numpy_pickle(_protocol))
    for _module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        _path = _module.split('.')[1]
        ENCODINGS[f'protocol {_protocol}, {_path}'] = _emit(_with_module(_base, _module))
        ENCODINGS[f'protocol {_protocol}, {_path}, int flags'] = _emit(
            _flags_as_ints(_with_module(_base, _module)))
    if _protocol == 2:
        ENCODINGS['protocol 2, Python 2'] = _emit(_python2(_with_module(
            _base, 'numpy.core.multiarray')))


def _member(payload: bytes) -> bytes:
    return crafting.npy_member(crafting.header_text('|O', ()), payload)


def _file(tmp_path, payload: bytes):
    path = tmp_path / 'none.npz'
    path.write_bytes(crafting.npz_of({'W': _member(payload), 'b': crafting.npy_of(
        numpy.arange(2.0))}))
    return path


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_the_assembler_writes_numpy_pickles_back_exactly(protocol):
    payload = _numpy_pickle(protocol)
    assert _emit(_ops(payload)) == payload


class _NumpyOneUnpickler(pickle.Unpickler):
    """Unpickles NumPy 2's pickles under NumPy 1 too, as NumPy 2 reads NumPy 1's: numpy._core
    is numpy.core there."""

    def find_class(self, module: str, name: str):
        if module.startswith('numpy._core') and numpy.lib.NumpyVersion(numpy.__version__) < '2.0.0':
            module = 'numpy.core' + module[len('numpy._core'):]
        return super().find_class(module, name)


@pytest.mark.parametrize('name', list(ENCODINGS))
def test_each_encoding_is_a_real_none(name):
    """The test files are what they claim: real pickles of array(None, dtype=object)."""
    array = _NumpyOneUnpickler(io.BytesIO(ENCODINGS[name]), encoding='latin1').load()
    assert isinstance(array, numpy.ndarray) and array.shape == () and array.dtype == object
    assert array[()] is None


@pytest.mark.parametrize('name', list(ENCODINGS))
def test_each_encoding_loads_as_none(tmp_path, name):
    path = _file(tmp_path, ENCODINGS[name])
    target = {'W': None, 'b': numpy.zeros(2)}
    serializers.load_npz(path, target)
    assert target['W'] is None and target['b'].tolist() == [0.0, 1.0]
    with numpy.load(path) as npz:
        assert serializers.NpzDeserializer(npz)('W', numpy.ones(3)) is None


def _replace(ops, index, *new):
    return ops[:index] + list(new) + ops[index + 1:]


def _index(ops, name, arg=None):
    return next(i for i, (n, a) in enumerate(ops) if n == name and (arg is None or a == arg))


BASE = _ops(_numpy_pickle(3))
HOSTILE = {
    'a None followed by more data': _numpy_pickle(3) + b'.',
    'two pickles': _numpy_pickle(3) + _numpy_pickle(3),
    'an extra DUP and POP': _emit(_replace(BASE, 1, BASE[1], ('DUP', None), ('POP', None))),
    'os.system instead of _reconstruct': _emit(_replace(
        BASE, _index(BASE, 'GLOBAL'), ('GLOBAL', 'os system'))),
    'a numpy.core global not on the list': _emit(_replace(
        BASE, _index(BASE, 'GLOBAL'), ('GLOBAL', 'numpy.core.multiarray scalar'))),
    'a reconstruct of numpy.matrix': _emit(_replace(
        BASE, _index(BASE, 'GLOBAL', 'numpy ndarray'), ('GLOBAL', 'numpy.matrixlib matrix'))),
    'an object array holding 1': _emit(_replace(
        BASE, len(BASE) - 6, ('BININT1', 1))),  # the list's item
    'a dtype other than O8': _emit(_replace(
        BASE, _index(BASE, 'BINUNICODE', 'O8'), ('BINUNICODE', 'V8'))),
    'other dtype flags': _emit(_replace(BASE, _index(BASE, 'BININT1', 63), ('BININT1', 62))),
    'Fortran order claimed': _emit(_replace(
        BASE, len(BASE) - 9, ('NEWTRUE', None))),  # the state's is_fortran
    'encode to another codec': pickle.dumps(numpy.asarray(None, dtype=object), 2).replace(
        b'latin1', b'utf_16'),
    'a second BUILD of the array': _emit(BASE[:-1] + [('BINGET', BASE[-3][1]), ('BUILD', None),
                                                      ('STOP', None)]),
    'no pickle at all': b'\x80\x03N.',
    'an APPEND onto a tuple': b'\x80\x02)Na.',
    'protocol 6, which does not exist': b'\x80\x06' + _numpy_pickle(5)[2:],
    'a TUPLE without a MARK': b'\x80\x02Nt.',
    'protocol 0': pickle.dumps(None, 0),
}


def test_the_hostile_cases_change_what_they_say():
    assert _ops(HOSTILE['an object array holding 1'])[-6] == ('BININT1', 1)
    assert _ops(HOSTILE['Fortran order claimed'])[-9] == ('NEWTRUE', None)


@pytest.mark.parametrize('name', list(HOSTILE))
def test_look_alikes_are_refused(tmp_path, name):
    path = _file(tmp_path, HOSTILE[name])
    target = {'W': None, 'b': numpy.zeros(2)}
    with pytest.raises(UnsafeFileError, match=r"none\.npz', key 'W': holds a pickled object "
                                              r"array of dtype object and shape \(\)"):
        serializers.load_npz(path, target)
    assert target == {'W': None, 'b': target['b']} and target['b'].tolist() == [0.0, 0.0]
