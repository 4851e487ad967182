"""Hostile and broken files: refused with an error of gpuserial's hierarchy, nothing executed.

Each case pins its message: the file, the key, and what is wrong. None may crash, hang, run a
pickle, or allocate memory on a header's word.
"""

import errno
import io
import os
import pickle
import re
import struct
import tempfile
import tracemalloc
import zipfile

import h5py
import numpy
import pytest

import gpuserial
from gpuserial import serializers
from gpuserial.errors import (
    CorruptFileError,
    GpuserialError,
    InvalidKeyError,
    KeyCollisionError,
    KeyNotFoundError,
    MismatchError,
    ReadFailedError,
    UnsafeCastError,
    UnsafeFileError,
)
from gpuserial.formats import _npy, loading
from gpuserial.tools import inspection
from tests import crafting
from tests.conftest import as_nobody


@pytest.fixture(autouse=True)
def _under_an_address_space_limit(address_space_limit):
    """Every hostile case runs with little memory to spare (see the fixture)."""


EVERY_SAVE = pytest.mark.parametrize(('save', 'ext'), [
    (serializers.save_npz, '.npz'), (serializers.save_hdf5, '.h5'),
    (lambda p, o: gpuserial.save_async(p, o).result(), '.npz'),
    (lambda p, o: gpuserial.save_async(p, o).result(), '.h5'),
], ids=['npz', 'hdf5', 'async-npz', 'async-hdf5'])


def _where(path, key=None) -> str:
    """The regex of the ``'file', key 'k'`` phrase messages start with."""
    text = re.escape(repr(str(path)))
    return text + (re.escape(f", key {key!r}") if key is not None else '')


def _write(tmp_path, data: bytes, name='hostile.npz'):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture(params=['none', 'array'])
def target(request):
    """The one-entry target ``x``: None (an array sized by the file) or a float32 array."""
    return {'x': None} if request.param == 'none' else {'x': numpy.zeros(3, numpy.float32)}


# ---------------------------------------------------------------------------------------------
# Pickles: never run


class _RunsOpen:
    """Pickles to ``open(marker, 'w')``: unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


class _RunsSystem:
    """Pickles to ``os.system('touch marker')``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def _object_array(item, shape):
    array = numpy.empty(shape, object)
    array[...] = item if shape == () else [item] * int(numpy.prod(shape))
    return array


@pytest.mark.parametrize('payload', [_RunsOpen, _RunsSystem])
@pytest.mark.parametrize('shape', [(), (2,)], ids=['0d', '1d'])
def test_a_pickle_that_creates_a_file_never_runs(tmp_path, target, payload, shape):
    marker = tmp_path / 'marker'
    member = crafting.npy_of(_object_array(payload(marker), shape))
    path = _write(tmp_path, crafting.npz_of({'x': member}))
    # The control: numpy with allow_pickle=True does run it, so the file is truly hostile.
    control = tmp_path / 'control'
    control_path = _write(tmp_path, crafting.npz_of(
        {'x': crafting.npy_of(_object_array(payload(control), shape))}), 'control.npz')
    with numpy.load(control_path, allow_pickle=True) as npz:
        crafting.close_unpickled(npz['x'])
    assert control.exists()

    with pytest.raises(UnsafeFileError, match=_where(path, 'x') + r': holds a pickled object '
                       r'array of dtype object and shape ' + re.escape(str(shape))):
        serializers.load_npz(path, target)
    assert not marker.exists()
    with numpy.load(path) as npz, pytest.raises(UnsafeFileError, match='never unpickles'):
        serializers.NpzDeserializer(npz).load(target)  # numpy's NpzFile, read by gpuserial
    assert not marker.exists()


def test_a_short_pickle_is_compared_not_run(tmp_path, target):
    """A pickle as short as Chainer's None is read (to compare with it) but never unpickled."""
    marker = tmp_path / 'marker'
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    assert len(payload) <= _npy.NONE_PICKLE_MAX_LEN
    member = crafting.npy_member(crafting.header_text('|O', ()), payload)
    path = _write(tmp_path, crafting.npz_of({'x': member}))
    with pytest.raises(UnsafeFileError, match=_where(path, 'x') + ': holds a pickled object'):
        serializers.load_npz(path, target)
    assert not marker.exists()


def test_a_pickle_inside_a_structured_dtype_is_refused(tmp_path, target):
    marker = tmp_path / 'marker'
    array = numpy.empty(1, [('a', 'f4'), ('b', 'O')])
    array['b'][0] = _RunsOpen(marker)
    path = _write(tmp_path, crafting.npz_of({'x': crafting.npy_of(array)}))
    with pytest.raises(UnsafeFileError, match=_where(path, 'x') + ': holds a pickled object'):
        serializers.load_npz(path, target)
    assert not marker.exists()


def test_a_header_that_is_code_is_not_evaluated(tmp_path, target):
    marker = tmp_path / 'marker'
    text = (f"{{'descr': __import__('os').system('touch {marker}'), 'fortran_order': False, "
            f"'shape': (3,), }}")
    path = _write(tmp_path, crafting.npz_of({'x': crafting.npy_member(text, bytes(12))}))
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + ': unreadable .npy header'):
        serializers.load_npz(path, target)
    assert not marker.exists()


def test_chainer_none_is_the_one_pickle_accepted(tmp_path):
    path = _write(tmp_path, crafting.npz_of({'x': crafting.npy_of(numpy.asarray(None))}))
    target = {'x': None}
    serializers.load_npz(path, target)
    assert target['x'] is None
    assert serializers.NpzDeserializer(numpy.load(path))('x', numpy.ones(3)) is None


_NONE = crafting.npy_of(numpy.asarray(None))
BROKEN_NONES = {  # Chainer's None in a member that lies: refused as any member is
    'stored, CRC': (crafting.patch_central(crafting.npz_of({'x': _NONE}), 'x.npy', 'crc', 1),
                    'CRC mismatch'),
    'deflated, CRC': (crafting.patch_central(crafting.npz_of({'x': _NONE}, zipfile.ZIP_DEFLATED),
                                             'x.npy', 'crc', 1), 'CRC mismatch'),
    'deflated, bytes after the stream': (crafting.deflated_npz({'x': (_NONE, None)}, b'junk'),
                                         'the member holds 4 bytes after the end of its deflate'),
    'deflated, a longer stream': (crafting.deflated_npz({'x': (_NONE + b'..', len(_NONE))}),
                                  'the deflate stream holds more than the directory says'),
}


@pytest.mark.parametrize('case', list(BROKEN_NONES))
def test_a_broken_member_holding_chainer_none_is_refused(tmp_path, case):
    data, message = BROKEN_NONES[case]
    path = _write(tmp_path, data)
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + ': ' + message):
        serializers.load_npz(path, {'x': None})


# ---------------------------------------------------------------------------------------------
# Bogus .npy headers

F4 = "'<f4'"
BAD_HEADERS = {
    'negative shape': (crafting.header_text('<f4', (-1,)), r'bad shape \(-1,\)'),
    'negative dim among others': (crafting.header_text('<f4', (3, -2)), r'bad shape \(3, -2\)'),
    'float shape': (crafting.header_text('<f4', (1.5,)), r'bad shape \(1\.5,\)'),
    'string shape': (crafting.header_text('<f4', ('3',)), r"bad shape \('3',\)"),
    'bool shape': (crafting.header_text('<f4', (True,)), r'bad shape \(True,\)'),
    'shape not a tuple': (crafting.header_text('<f4', 3), 'bad shape 3 '),
    'shape a list': (crafting.header_text('<f4', [3]), r'bad shape \[3\]'),
    'huge shape': (crafting.header_text('<f4', (2 ** 62, 2 ** 62)),
                   r'shape \(4611686018427387904, 4611686018427387904\) of dtype float32 in '
                   r'.npy header overflows'),
    'overflow behind a zero': (crafting.header_text('<f8', (0, 2 ** 62, 2 ** 62)), 'overflows'),
    'dim beyond intp': (crafting.header_text('<f8', (0, 2 ** 64)), 'overflows'),
    'too many dims': (crafting.header_text('<f4', (1,) * (_npy.MAX_NDIM + 1)),  # NumPy's
                      f'has {_npy.MAX_NDIM + 1} dimensions, over the limit of {_npy.MAX_NDIM}'),
    'too many empty dims': (crafting.header_text('<f4', (0,) * 100), 'has 100 dimensions'),
    'unclaimed size': (crafting.header_text('<f8', (2 ** 40,)), r'the member holds \d+ bytes '
                       r'but its header claims 8796093022\d+ \(dtype float64, shape '
                       r'\(1099511627776,\)\): truncated or corrupt'),
    'unknown dtype': (crafting.header_text('zz9', (3,)), "bad dtype 'zz9'"),
    'dtype an int': (crafting.header_text(5, (3,)), 'bad dtype 5 '),
    'huge subarray dtype': (crafting.header_text([('a', '<f8', (10 ** 12,))], (1,)),
                            'bad dtype|header claims'),
    'zero-size items': (crafting.header_text('<U0', (5,)), 'zero-size items of dtype <U0'),
    'fortran_order not a bool': (crafting.header_text('<f4', (3,), 'yes'),
                                 "bad fortran_order 'yes'"),
    'not a dict': ('[1, 2, 3]', r"must have the keys \['descr', 'fortran_order', 'shape'\], "
                   r'got \[1, 2, 3\]'),
    'a key missing': ("{'descr': '<f4', 'shape': (3,)}", 'must have the keys'),
    'an extra key': ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': 1}",
                     'must have the keys'),
    'not a literal': ('{descr: 1}', 'unreadable .npy header'),
    'deep nesting': ('(' * 5000 + ')' * 5000, 'unreadable .npy header'),
    'huge integer text': ("{'descr': '<f4', 'fortran_order': False, 'shape': (" + '9' * 5000
                          + ',), }', 'unreadable .npy header'),
}


@pytest.mark.parametrize('case', list(BAD_HEADERS))
def test_bogus_npy_header(tmp_path, target, case):
    text, message = BAD_HEADERS[case]
    path = _write(tmp_path, crafting.npz_of({'x': crafting.npy_member(text, bytes(12))}))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match=_where(path, 'x') + ': .*' + message):
            serializers.load_npz(path, target)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the header's claims allocated nothing


BAD_PREFIXES = {
    'bad magic': (b'\x93NUMPX\x01\x00\x10\x00' + b' ' * 16, r"not a .npy member \(starts "),
    'unknown version': (crafting.npy_member(crafting.header_text('<f4', (3,)), bytes(12),
                                            version=(9, 0)), 'unsupported .npy version 9.0'),
    'header length over the limit (v1)': (
        crafting.npy_member(crafting.header_text('<f4', (3,)), bytes(12), length=60000),
        '.npy header of 60000 bytes is over the limit of 10000'),
    'header length over the limit (v2)': (
        crafting.npy_member(crafting.header_text('<f4', (3,)), bytes(12), version=(2, 0),
                            length=2 ** 31), 'of 2147483648 bytes is over the limit'),
    'header longer than the member': (
        crafting.npy_member(crafting.header_text('<f4', (3,)), b'', length=9000),
        r'a header of 9010 bytes in a member of \d+'),
    'v3 header not utf8': (crafting.npy_member(b"{'descr': '\xff\xfe', }", version=(3, 0)),
                           'unreadable .npy header'),
    'empty member': (b'', 'not a .npy member'),
    'one byte': (b'\x93', 'not a .npy member'),
}


@pytest.mark.parametrize('case', list(BAD_PREFIXES))
def test_bogus_npy_prefix(tmp_path, target, case):
    member, message = BAD_PREFIXES[case]
    path = _write(tmp_path, crafting.npz_of({'x': member}))
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + ': .*' + message):
        serializers.load_npz(path, target)



@pytest.mark.parametrize('case', list(BAD_PREFIXES))
def test_inspect_refuses_a_bogus_npy_prefix_as_a_load_does(tmp_path, case):
    member, message = BAD_PREFIXES[case]
    path = _write(tmp_path, crafting.npz_of({'x': member}))
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + ': .*' + message):
        inspection.inspect_file(path)


@pytest.mark.parametrize('data', [bytes(12), bytes(20)], ids=['short', 'long'])
def test_inspect_refuses_a_member_whose_size_is_not_its_headers(tmp_path, data):
    member = crafting.npy_member(crafting.header_text('<f4', (4,)), data)
    path = _write(tmp_path, crafting.npz_of({'x': member}))
    claimed = len(member) - len(data) + 4 * 4
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + f': the member holds '
                       f'{len(member)} bytes but its header claims {claimed}$'):
        inspection.inspect_file(path)

@pytest.mark.parametrize('read', ['load_npz', 'diff', 'convert'])
def test_header_claims_cannot_drive_a_huge_allocation(tmp_path, read):
    """A tiny deflated member whose directory and header both claim 800 MB is refused, by a
    load and by the diff and convert commands."""
    nbytes = 10 ** 8 * 8
    header = crafting.npy_member(crafting.header_text('<f8', (10 ** 8,)))
    data = crafting.npz_of({'x': header + bytes(4096)}, zipfile.ZIP_DEFLATED)
    data = crafting.patch_central(data, 'x.npy', 'file_size', len(header) + nbytes)
    path = _write(tmp_path, data)
    run = {'load_npz': lambda: serializers.load_npz(path, {'x': None}),
           'diff': lambda: inspection.diff_files(path, path),
           'convert': lambda: inspection.convert(path, tmp_path / 'out.h5')}[read]
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match=_where(path, 'x') + r': header claims '
                           r'800000000 bytes, more than \d+ stored bytes can hold'):
            run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


# ---------------------------------------------------------------------------------------------
# Zips whose directory lies


def _valid(compression=zipfile.ZIP_STORED) -> bytes:
    members = {'a': crafting.npy_of(numpy.arange(5, dtype=numpy.float32)),
               'x': crafting.npy_of(numpy.arange(3, dtype=numpy.float32) + 1)}
    return crafting.npz_of(members, compression)


def _lie_about_sizes(data):
    size = crafting.central_field(data, 'x.npy', 'file_size')
    data = crafting.patch_central(data, 'x.npy', 'file_size', size - 4)
    return crafting.patch_central(data, 'x.npy', 'compress_size', size - 4)


def _rename_local(data):
    offset = crafting.central_field(data, 'x.npy', 'header_offset') + crafting.LOCAL_SIZE
    return data[:offset] + b'y' + data[offset + 1:]


def _break_local_signature(data):
    offset = crafting.central_field(data, 'x.npy', 'header_offset')
    return data[:offset] + b'XX' + data[offset + 2:]


def _move_directory(data):
    offset, fields = crafting.end_record(data)
    out = bytearray(data)
    crafting.END.pack_into(out, offset, *fields[:6], fields[6] + 1000, fields[7])
    return bytes(out)


def _last_data_byte(data):
    return crafting.data_offset(data, 'x.npy') + crafting.central_field(
        data, 'x.npy', 'compress_size') - 1


LYING_ZIPS = {
    'sizes shorter than the header claims': (
        lambda: _lie_about_sizes(_valid()), CorruptFileError,
        r'the member holds 136 bytes but its header claims 140 \(dtype float32, shape \(3,\)\)'),
    'stored sizes disagree': (
        lambda: crafting.patch_central(_valid(), 'x.npy', 'compress_size', 100),
        CorruptFileError, 'a stored member of 140 bytes takes 100 bytes in the file'),
    'member runs past the end': (
        lambda: crafting.patch_central(crafting.patch_central(
            _valid(), 'x.npy', 'compress_size', 10 ** 6), 'x.npy', 'file_size', 10 ** 6),
        CorruptFileError, r'the member runs past the end of the file \(\d+ bytes\)'),
    'local header names another member': (
        lambda: _rename_local(_valid()), CorruptFileError,
        "the zip directory names 'x.npy' but the local header 'y.npy'"),
    'local header signature broken': (
        lambda: _break_local_signature(_valid()), CorruptFileError, 'bad local file header'),
    'directory before the start of the file': (
        lambda: _move_directory(_valid()), CorruptFileError,
        'the zip directory puts the member at offset -1000, before the start of the file'),
    'unknown compression method': (
        lambda: crafting.patch_central(_valid(), 'x.npy', 'method', 12), CorruptFileError,
        'unsupported compression method 12'),
    'CRC mismatch (stored)': (
        lambda: crafting.patch_central(_valid(), 'x.npy', 'crc', 1234), CorruptFileError,
        r'CRC mismatch \(directory 000004d2, data [0-9a-f]{8}\): the data is corrupt'),
    'data flipped (stored)': (
        lambda: crafting.flip(_valid(), _last_data_byte(_valid())), CorruptFileError,
        'CRC mismatch'),
    'data flipped (deflated)': (
        lambda: crafting.flip(_valid(zipfile.ZIP_DEFLATED), crafting.data_offset(
            _valid(zipfile.ZIP_DEFLATED), 'x.npy')), CorruptFileError,
        'corrupt deflate data|CRC mismatch|deflate stream'),
    'invalid deflate block': (
        lambda: _replace_data(_valid(zipfile.ZIP_DEFLATED), b'\x07'), CorruptFileError,
        'corrupt deflate data'),
    'deflate stream cut short': (
        lambda: crafting.patch_central(_valid(zipfile.ZIP_DEFLATED), 'x.npy', 'compress_size',
                                       20), CorruptFileError,
        'the deflate stream ends .* early|corrupt deflate data|CRC mismatch'),
    'zip version from the future': (
        lambda: crafting.patch_central(_valid(), 'x.npy', 'version_needed', 99),
        CorruptFileError, 'not an NPZ \\(zip\\) file: zip file version 9.9'),
}


# Corrupt data, not metadata: found only while reading (after 'a' may have loaded).
FOUND_WHILE_READING = {'CRC mismatch (stored)', 'data flipped (stored)', 'data flipped (deflated)',
                       'deflate stream cut short'}


def _replace_data(data, first):
    offset = crafting.data_offset(data, 'x.npy')
    return data[:offset] + first + data[offset + len(first):]


@pytest.mark.parametrize('case', list(LYING_ZIPS))
def test_a_zip_whose_directory_lies(tmp_path, case):
    make, error, message = LYING_ZIPS[case]
    path = _write(tmp_path, make())
    key = {'directory before the start of the file': 'a',  # every member moves; 'a' is first
           'zip version from the future': None}.get(case, 'x')  # zipfile refuses the whole file
    where = _where(path, key)
    for target in ({'a': None, 'x': None}, {'a': numpy.zeros(5, 'f4'), 'x': numpy.zeros(3)}):
        with pytest.raises(error, match=where + ': .*' + message):
            serializers.load_npz(path, target)
        if case not in FOUND_WHILE_READING:  # the others are checked before anything changes
            assert target['a'] is None or not target['a'].any()


def test_a_member_one_byte_past_the_end_is_refused_naming_the_file_size(tmp_path):
    """The check is exact: claims that end one byte past the file are refused before the
    member's data is read, saying how long the file is."""
    data = _valid()
    past = len(data) - crafting.central_field(data, 'x.npy', 'header_offset') + 1
    for field in ('compress_size', 'file_size'):
        data = crafting.patch_central(data, 'x.npy', field, past)
    path = _write(tmp_path, data)
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + re.escape(
            f': the member runs past the end of the file ({len(data)} bytes): truncated?')):
        serializers.load_npz(path, {'x': None})


def test_a_missing_member_names_file_and_key(tmp_path):
    path = _write(tmp_path, _valid())
    with pytest.raises(KeyNotFoundError, match=_where(path, 'b') + ': not in the file'):
        serializers.load_npz(path, {'b': None})


# ---------------------------------------------------------------------------------------------
# Truncated, empty and foreign files


def _source():
    rng = numpy.random.default_rng(0)
    return {'w': rng.standard_normal((20, 30)).astype(numpy.float32), 'n': 3, 's': 'text',
            'child': {'b': numpy.arange(50.0), 'none': None}}


class _Asking:
    """A target that records the keys it asks for."""

    def __init__(self, asked: list):
        self.asked = asked

    def serialize(self, serializer):
        self.asked.append('w')
        serializer('w', numpy.zeros(3))


def _zeros():
    return {'w': numpy.zeros((20, 30), numpy.float32), 'n': 0, 's': '',
            'child': {'b': numpy.zeros(50), 'none': numpy.zeros(1)}}


SAVERS = {
    'npz': (lambda p, o: serializers.save_npz(p, o), serializers.load_npz, '.npz'),
    'npz-stored': (lambda p, o: serializers.save_npz(p, o, compression=False),
                   serializers.load_npz, '.npz'),
    'hdf5': (serializers.save_hdf5, serializers.load_hdf5, '.h5'),
}


@pytest.fixture(params=list(SAVERS))
def saver(request):
    return SAVERS[request.param]


@pytest.mark.parametrize('fraction', [0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999])
def test_a_truncated_file_is_refused_when_opened(tmp_path, saver, fraction):
    """A file cut short loses its end (a zip's directory, an HDF5 file's last objects): it is
    refused as a whole, before any entry is asked for, and the message says what it is."""
    save, load, ext = saver
    save(tmp_path / f'good{ext}', _source())
    good = (tmp_path / f'good{ext}').read_bytes()
    cut = int(len(good) * fraction) if fraction < 0.999 else len(good) - 1
    path = _write(tmp_path, good[:cut], f'cut{ext}')
    if ext == '.h5':
        why = 'the file is empty' if cut == 0 else 'Unable to'
        match = _where(path) + ': not an HDF5 file: ' + why
    else:
        why = ('the file is empty' if cut == 0 else "it starts with b'PK" if cut < 4 else
               'truncated: it starts as a zip, but the zip directory that ends a zip is missing')
        match = _where(path) + r': not an NPZ \(zip\) file: ' + re.escape(why)
    asked = []
    with pytest.raises(CorruptFileError, match=match):
        load(path, _Asking(asked))
    assert asked == []


@pytest.mark.parametrize('content', [b'', b'\x00', b'PK\x05\x06', b'\x89HDF\r\n\x1a\n',
                                     bytes(range(256)) * 8, os.urandom(4096)],
                         ids=['empty', 'one zero', 'end signature', 'hdf5 signature', 'bytes',
                              'random'])
def test_not_a_checkpoint(tmp_path, saver, content):
    _, load, ext = saver
    path = _write(tmp_path, content, f'junk{ext}')
    with pytest.raises(CorruptFileError, match=_where(path) + ': not an? (NPZ|HDF5)'):
        load(path, {'w': None})


def test_the_other_format(tmp_path):
    serializers.save_npz(tmp_path / 'm.npz', _source())
    serializers.save_hdf5(tmp_path / 'm.h5', _source())
    with pytest.raises(CorruptFileError, match=_where(tmp_path / 'm.npz') + ': not an HDF5'):
        serializers.load_hdf5(tmp_path / 'm.npz', _zeros())
    with pytest.raises(CorruptFileError, match=_where(tmp_path / 'm.h5') + ': not an NPZ'):
        serializers.load_npz(tmp_path / 'm.h5', _zeros())


@pytest.mark.parametrize('load', [serializers.load_npz, serializers.load_hdf5],
                         ids=['npz', 'hdf5'])
def test_a_path_that_does_not_exist(tmp_path, load):
    path = tmp_path / 'missing' / 'm.npz'
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load(path, _zeros())


@pytest.mark.parametrize('load', [serializers.load_npz, serializers.load_hdf5],
                         ids=['npz', 'hdf5'])
def test_a_path_that_is_a_directory(tmp_path, load):
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        load(tmp_path, _zeros())


# ---------------------------------------------------------------------------------------------
# HDF5 files with wrong shapes and types


def _h5(tmp_path, build) -> str:
    path = tmp_path / 'hostile.h5'
    with h5py.File(path, 'w') as f:
        f['a'] = numpy.arange(4.0)
        build(f)
    return path


def _three_byte_integers(f) -> None:
    """A dataset of a valid HDF5 type that NumPy has no dtype for (h5py's TypeError)."""
    three = h5py.h5t.STD_I32LE.copy()
    three.set_size(3)
    h5py.h5d.create(f.id, b'x', three, h5py.h5s.create_simple((3,)))


HDF5_CASES = {
    'object references': (
        lambda f: f.create_dataset('x', data=numpy.array([f['a'].ref] * 3, h5py.ref_dtype)),
        {'x': numpy.zeros(3)}, UnsafeFileError,
        r'datasets of type object \(object references, variable-length arrays\) are refused'),
    'object references into None': (
        lambda f: f.create_dataset('x', data=numpy.array([f['a'].ref] * 3, h5py.ref_dtype)),
        {'x': None}, UnsafeFileError, 'are refused'),
    'variable-length ints': (
        lambda f: f.create_dataset('x', shape=(3,), dtype=h5py.vlen_dtype(numpy.int32)),
        {'x': numpy.zeros(3)}, UnsafeFileError, 'are refused'),
    'wrong shape': (lambda f: f.create_dataset('x', data=numpy.zeros((3, 2))),
                    {'x': numpy.zeros(3)}, MismatchError,
                    r'stored shape \(3, 2\) does not match the target shape \(3,\)'),
    'strings into floats': (lambda f: f.create_dataset('x', data=['a', 'b', 'c']),
                            {'x': numpy.zeros(3)}, MismatchError,
                            r'stored text \(<U1\) does not cast to the target dtype float64'),
    'bytes into floats': (lambda f: f.create_dataset('x', data=numpy.array([b'a'] * 3)),
                          {'x': numpy.zeros(3)}, MismatchError,
                          'stored dtype |S1 does not cast to the target dtype float64'),
    'compound into floats': (
        lambda f: f.create_dataset('x', data=numpy.zeros(3, [('p', 'f4'), ('q', 'i4')])),
        {'x': numpy.zeros(3)}, MismatchError, 'does not cast to the target dtype float64'),
    'complex into floats': (lambda f: f.create_dataset('x', data=numpy.zeros(3, complex)),
                            {'x': numpy.zeros(3)}, MismatchError,
                            'stored dtype complex128 does not cast'),
    'a type NumPy has no dtype for': (_three_byte_integers, {'x': numpy.zeros(3)},
                                      CorruptFileError, "data type '<i3' not understood"),
    'a group, not a dataset': (lambda f: f.create_group('x'), {'x': numpy.zeros(3)},
                               MismatchError, 'is an HDF5 group, not a dataset'),
    'an array into a scalar': (lambda f: f.create_dataset('x', data=numpy.zeros(300000)),
                               {'x': 0}, MismatchError,
                               r'a stored array of shape \(300000,\) cannot load into a int'),
    'a dangling soft link': (lambda f: f.__setitem__('x', h5py.SoftLink('/nowhere')),
                             {'x': numpy.zeros(3)}, KeyNotFoundError, 'not in the file'),
    'a dangling external link': (
        lambda f: f.__setitem__('x', h5py.ExternalLink('/nonexistent/file.h5', '/x')),
        {'x': numpy.zeros(3)}, KeyNotFoundError, 'not in the file'),
    'a path through a dataset': (lambda f: None, {'a': {'b': numpy.zeros(3)}},
                                 KeyNotFoundError, 'not in the file'),
    'a sparse dataset claiming 16 GiB': (
        lambda f: f.create_dataset('x', shape=(2 ** 31,), dtype='f8', chunks=(1024,)),
        {'x': None}, CorruptFileError,
        r'the dataset claims 17179869184 bytes \(dtype float64, shape \(2147483648,\)\) but '
        r'stores only 0'),
    'a contiguous dataset claiming 2 GiB': (
        lambda f: f.create_dataset('x', shape=(2 ** 28,), dtype='f8'), {'x': None},
        CorruptFileError, 'the dataset claims 2147483648 bytes'),
}


@pytest.mark.parametrize('case', list(HDF5_CASES))
def test_hdf5_wrong_shapes_and_types(tmp_path, case):
    build, target, error, message = HDF5_CASES[case]
    path = _h5(tmp_path, build)
    key = 'a/b' if case == 'a path through a dataset' else 'x'
    tracemalloc.start()
    try:
        with pytest.raises(error, match=_where(path, key) + ': .*' + message):
            serializers.load_hdf5(path, target)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def test_every_error_is_a_gpuserial_error_or_a_standard_one():
    """The hierarchy the tests above rely on, as README documents it."""
    assert issubclass(KeyNotFoundError, (GpuserialError, KeyError))
    assert issubclass(MismatchError, ValueError) and issubclass(CorruptFileError, ValueError)
    assert issubclass(UnsafeFileError, CorruptFileError)
    assert str(KeyNotFoundError("'f', key 'k': not in the file")) == (
        "'f', key 'k': not in the file")  # not quoted again, as KeyError would


def test_pickle_module_is_not_used_by_loads(tmp_path, monkeypatch):
    """Loads never reach pickle at all: any call to it fails the test."""
    serializers.save_npz(tmp_path / 'm.npz', {'w': numpy.ones(3), 'none': None})
    serializers.save_hdf5(tmp_path / 'm.h5', {'w': numpy.ones(3), 'none': None})

    def refuse(*args, **kwargs):
        raise AssertionError('pickle was called')

    for name in ('load', 'loads', 'Unpickler'):
        monkeypatch.setattr(pickle, name, refuse)
    for load, ext in ((serializers.load_npz, '.npz'), (serializers.load_hdf5, '.h5')):
        target = {'w': numpy.zeros(3), 'none': None}
        load(tmp_path / f'm{ext}', target)
        assert target['none'] is None and (target['w'] == 1).all()


class _FailsReading:
    """A seekable file object over ``data`` whose reads fail once ``limit`` bytes are read."""

    def __init__(self, data: bytes, limit: int):
        self.data = io.BytesIO(data)
        self.limit = limit
        self.done = 0
        self.seek, self.tell = self.data.seek, self.data.tell

    def seekable(self):
        return True

    def readable(self):
        return True

    def read(self, count=-1):
        data = self.data.read(count)
        self.done += len(data)
        if self.done > self.limit:
            raise OSError(errno.EIO, 'Input/output error (simulated)')
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


@pytest.mark.parametrize('limit', [0, 10, 100, 1000, 3000, 6000, 10000])
def test_a_file_object_whose_reads_fail(saver, limit):
    """An I/O error while reading is a ReadFailedError naming the file (and the key), never a
    corrupt file (or the load had read all it needed)."""
    save, load, _ = saver
    out = io.BytesIO()
    save(out, _source())
    target = _zeros()
    try:
        load(_FailsReading(out.getvalue(), limit), target)
    except ReadFailedError as error:  # an I/O error, not the file's fault
        assert re.match(r"'<_FailsReading>'(, key '[\w/]+')?: reading (the zip directory )?"
                        r"failed: .*Input/output error \(simulated\)", str(error))
    else:
        assert target['n'] == 3 and target['s'] == 'text'


# ---------------------------------------------------------------------------------------------
# Nothing lost, nothing accepted that should not be, errors that say what happened


class _StoresTwice:
    """Stores ``c/w`` twice, through a child and through a path."""

    def serialize(self, serializer):
        serializer['c']('w', numpy.zeros(2))
        serializer('c/w', numpy.ones(2))


@pytest.mark.parametrize('obj', [{'a': {'b': numpy.zeros(2)}, 'a/b': numpy.ones(2)},
                                 _StoresTwice()], ids=['dict', 'object'])
def test_a_key_stored_twice_raises_before_anything_is_written(tmp_path, saver, obj):
    save, _, ext = saver
    path = tmp_path / f'm{ext}'
    path.write_bytes(b'the old file')
    key = 'a/b' if isinstance(obj, dict) else 'c/w'
    with pytest.raises(KeyCollisionError, match=_where(path, key) + ': stored twice, as .*'
                       + re.escape(repr(key.split('/')[1])) + '.* and as .*'
                       + re.escape(repr(key))):
        save(path, obj)
    assert path.read_bytes() == b'the old file' and crafting.temporaries(tmp_path) == []


def test_hdf5_refuses_a_dataset_where_a_group_must_go(tmp_path):
    path = tmp_path / 'm.h5'
    with pytest.raises(KeyCollisionError, match=_where(path, 'a') + r": a dataset \(key 'a' of "
                       r"group '/'\) where key 'a/b' of group '/' needs a group"):
        serializers.save_hdf5(path, {'a': numpy.zeros(2), 'a/b': numpy.ones(2)})
    assert not path.exists() and crafting.temporaries(tmp_path) == []
    serializers.save_npz(tmp_path / 'm.npz', {'a': numpy.zeros(2), 'a/b': numpy.ones(2)})  # fine


@pytest.mark.parametrize(('obj', 'key', 'message'), [
    ({'': numpy.zeros(2)}, '', 'is empty'),
    ({1: numpy.zeros(2)}, 1, r"is not a string \(it is of type int\): keys are strings \(a "
                             r"torch optimizer's state_dict\(\) has int keys"),
    ({'a': {'/': numpy.zeros(2)}}, '/', 'is empty'),
])
def test_bad_keys_are_named_with_the_file(tmp_path, saver, obj, key, message):
    save, _, ext = saver
    path = tmp_path / f'm{ext}'
    with pytest.raises(InvalidKeyError, match=_where(path) + ', key ' + re.escape(repr(key))
                       + '.*' + message):
        save(path, obj)
    assert not path.exists() and crafting.temporaries(tmp_path) == []


@EVERY_SAVE
def test_a_ragged_list_is_named_with_the_file_and_key(tmp_path, save, ext):
    """A list NumPy makes no array of (a JAX or torch user's list of layers) raised NumPy's
    bare ValueError, naming neither the file nor the key."""
    path = tmp_path / f'm{ext}'
    with pytest.raises(gpuserial.UnstorableValueError,
                       match=_where(path, 'g/layers') + ': a list that NumPy makes no '
                       r'array of \(setting an array element.*save a list of arrays as a dict'):
        save(path, {'g': {'layers': [numpy.ones(2), numpy.zeros(3)]}})
    assert not path.exists() and crafting.temporaries(tmp_path) == []


class _TorchLikeModule:
    """What the message goes by: a ``state_dict()`` (torch stays optional here)."""

    def state_dict(self) -> dict:
        return {}


@pytest.mark.parametrize(('value', 'how'), [
    (gpuserial.Linear(2, 3), r'an object \(Linear\), not a value: save it with '
                             r'save_npz\(file, obj\) or save_hdf5, or as a child'),
    (_TorchLikeModule(), r'an object \(_TorchLikeModule\), not a value: save its '
                         r'state_dict\(\)')], ids=['link', 'torch-module'])
@pytest.mark.parametrize('suffix', ['npz', 'h5'])
def test_an_object_in_a_dict_is_refused_saying_how_to_save_it(tmp_path, value, how, suffix):
    """A link or a torch module is not a value: a dict of them (the way torch checkpoints
    hold ``{'model': ..., 'optimizer': ...}``) is refused saying what to save instead."""
    path = tmp_path / f'm.{suffix}'
    with pytest.raises(gpuserial.UnstorableValueError,
                       match=_where(path, 'run/model') + ': ' + how):
        gpuserial.save(path, {'run': {'model': value}, 'epoch': 3})
    assert not path.exists() and crafting.temporaries(tmp_path) == []


@EVERY_SAVE
def test_a_masked_array_is_refused_rather_than_saved_without_its_mask(tmp_path, save, ext):
    """NPZ failed with NumPy's bare 'cannot reshape array of size 3 into shape (24,)'; HDF5
    saved the data and dropped the mask, as numpy.savez and h5py do."""
    path = tmp_path / f'm{ext}'
    value = numpy.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    with pytest.raises(gpuserial.UnstorableValueError, match=_where(path, 'g/m') + re.escape(
            ': a masked array cannot be saved: its mask would be lost (numpy.savez and h5py '
            'drop it); save its .data and numpy.ma.getmaskarray() of it as two entries, or its '
            '.filled() values')):
        save(path, {'g': {'m': value}})
    assert not path.exists() and crafting.temporaries(tmp_path) == []
    save(path, {'g': {'m': value.data}})
    target = numpy.ma.masked_array(numpy.zeros(3), mask=[False, True, False])
    gpuserial.load_into(path, {'g': {'m': target}})  # a masked target: its data, in place
    numpy.testing.assert_array_equal(target.data, [1.0, 2.0, 3.0])
    assert target.mask.tolist() == [False, True, False]


@pytest.mark.parametrize('value', [numpy.array([1, 'a'], object), 10**30],
                         ids=['object-array', 'int-beyond-64-bits'])
def test_object_arrays_are_named_with_the_file_and_key(tmp_path, value):
    """In the same words and the same error in both formats (HDF5 said 'a int of objects', in
    a plain TypeError that an ``except GpuserialError`` let through)."""
    message = ': object arrays other than None cannot be saved'
    path = tmp_path / 'm.h5'
    with pytest.raises(gpuserial.UnstorableValueError, match=_where(path, 'g/x') + message):
        serializers.save_hdf5(path, {'g': {'x': value}})
    path = tmp_path / 'm.npz'
    with pytest.raises(gpuserial.UnstorableValueError, match=_where(path, 'g/x') + message):
        serializers.save_npz(path, {'g': {'x': value}})
    assert crafting.temporaries(tmp_path) == []
    assert issubclass(gpuserial.UnstorableValueError, gpuserial.GpuserialError)
    assert issubclass(gpuserial.UnstorableValueError, TypeError)  # as NumPy would raise
    with h5py.File(tmp_path / 'open.h5', 'w') as f:  # a serializer made on an open file
        with pytest.raises(gpuserial.UnstorableValueError,
                           match=_where(tmp_path / 'open.h5', 'x') + message):
            serializers.HDF5Serializer(f)('x', value)
        assert list(f) == []


@pytest.mark.parametrize('dtype', ['M8[D]', 'm8[ns]'])
def test_dates_and_times_are_refused_by_hdf5_naming_the_file_key_and_way_out(tmp_path, dtype):
    """h5py has no type for them: its bare 'No conversion path for dtype' became a message that
    says what to do; NPZ stores them."""
    value = numpy.array([1, 2]).astype(dtype)
    path = tmp_path / 'm.h5'
    with pytest.raises(gpuserial.UnstorableValueError, match=_where(path, 'g/t') + re.escape(
            f": {value.dtype} arrays cannot be saved to HDF5 (h5py has no type for dates and "
            f"times): save to NPZ, or save their .view('int64') and the unit")):
        serializers.save_hdf5(path, {'g': {'t': value}})
    assert not path.exists() and crafting.temporaries(tmp_path) == []
    gpuserial.save(tmp_path / 'm.npz', {'t': value})
    assert gpuserial.load(tmp_path / 'm.npz')['t'].tobytes() == value.tobytes()


@pytest.mark.parametrize('field', ['M8[s]', 'U3'], ids=['date', 'text'])
def test_a_structured_field_hdf5_has_no_type_for_is_refused_naming_the_file_and_key(
        tmp_path, field):
    """h5py's bare 'No conversion path for dtype' for a field of dates or text reached the
    caller as a plain TypeError (not a GpuserialError), and save_async met it only as it
    wrote; NPZ stores such arrays."""
    value = numpy.zeros(2, [('step', 'i8'), ('at', field)])
    path = tmp_path / 'm.h5'
    message = re.escape(": a structured array h5py has no type for (No conversion path for "
                        f"dtype: dtype('{numpy.dtype(field).str}')) cannot be saved to HDF5: "
                        "save to NPZ")
    with pytest.raises(gpuserial.UnstorableValueError, match=_where(path, 'g/t') + message):
        serializers.save_hdf5(path, {'g': {'t': value}})
    with pytest.raises(gpuserial.UnstorableValueError, match=_where(path, 'g/t') + message):
        gpuserial.save_async(path, {'g': {'t': value}})  # refused before it returns
    assert not path.exists() and crafting.temporaries(tmp_path) == []
    gpuserial.save(tmp_path / 'm.npz', {'t': value})
    assert gpuserial.load(tmp_path / 'm.npz')['t'].tobytes() == value.tobytes()


def _encrypted(where: str) -> bytes:
    data = crafting.npz_of({'x': crafting.npy_of(numpy.arange(3.0))})
    if where in ('central', 'both'):
        data = crafting.patch_central(data, 'x.npy', 'flags', 1)
    if where in ('local', 'both'):
        local = crafting.central_field(data, 'x.npy', 'header_offset')
        data = crafting.flip(data, local + 6, 0x01)
    return data


@pytest.mark.parametrize('where', ['central', 'local', 'both'])
def test_an_encrypted_member_is_refused(tmp_path, target, where):
    path = _write(tmp_path, _encrypted(where))
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + ': the member is encrypted'):
        serializers.load_npz(path, target)


def test_a_zip_without_npy_members_is_not_an_npz(tmp_path):
    path = _write(tmp_path, crafting.zip_of({'notes.txt': b'hello', 'data.bin': bytes(8)}))
    message = (_where(path) + r": not an NPZ file: a zip of 2 members, none of them \.npy "
               r"\('notes\.txt', 'data\.bin'\)")
    with pytest.raises(CorruptFileError, match=message):
        serializers.load_npz(path, {}, strict=False)
    with pytest.raises(CorruptFileError, match=message):
        inspection.inspect_file(path)
    with pytest.raises(CorruptFileError, match=message):
        inspection.convert(path, tmp_path / 'out.h5')
    with pytest.raises(CorruptFileError, match=message):
        inspection.diff_files(path, path)
    empty = _write(tmp_path, crafting.zip_of({}), 'empty.npz')  # numpy.savez() of nothing
    serializers.load_npz(empty, {})
    assert inspection.inspect_file(empty).entries == ()


@pytest.mark.parametrize('ext', ['.npz', '.h5'])
@pytest.mark.parametrize(('stored', 'value', 'what'), [
    ('42', 0, r'the file stores text \(dtype <U2, shape \(\)\), which does not load into a int'),
    ('1.5', 0.0, r'the file stores text \(dtype <U3, shape \(\)\), which does not load into a '
     r'float'),
    (5, '', r'the file stores a number \(dtype int64, shape \(\)\), which does not load into a '
     r'str'),
    (2.5, '', r'the file stores a number \(dtype float64, shape \(\)\), which does not load '
     r'into a str'),
])
def test_text_and_numbers_do_not_cross(tmp_path, ext, stored, value, what):
    path = tmp_path / f'm{ext}'
    save = serializers.save_npz if ext == '.npz' else serializers.save_hdf5
    load = serializers.load_npz if ext == '.npz' else serializers.load_hdf5
    save(path, {'k': stored})
    target = {'k': value}
    with pytest.raises(UnsafeCastError, match=_where(path, 'k') + ': ' + what):
        load(path, target)
    assert target == {'k': value}
    same = {'k': type(stored)()}
    load(path, same)
    assert same == {'k': stored}


def test_unwritten_hdf5_chunks_read_as_the_fill_value(tmp_path):
    path = tmp_path / 'sparse.h5'
    with h5py.File(path, 'w') as f:
        f.create_dataset('x', shape=(1000, 1000), dtype='f4', chunks=(100, 100), fillvalue=1.5)
        f['x'][:100, :100] = 2.0  # one chunk of 100 written
    expected = numpy.full((1000, 1000), 1.5, numpy.float32)
    expected[:100, :100] = 2.0
    for target in ({'x': numpy.zeros((1000, 1000), numpy.float32)}, {'x': None}):
        serializers.load_hdf5(path, target)
        numpy.testing.assert_array_equal(target['x'], expected)
    inspection.convert(path, tmp_path / 'sparse.npz')
    with numpy.load(tmp_path / 'sparse.npz') as npz:
        numpy.testing.assert_array_equal(npz['x'], expected)
    assert inspection.diff_files(path, tmp_path / 'sparse.npz').equal


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason='makes a process of user nobody')


@needs_root
@pytest.mark.parametrize('save', [serializers.save_npz, serializers.save_hdf5])
def test_a_save_without_permission_names_the_file(save):
    with tempfile.TemporaryDirectory() as name:
        os.chmod(name, 0o755)  # nobody may look, not write
        path = os.path.join(name, 'model.npz')
        kind, message = as_nobody(save, path, {'w': numpy.ones(2)})
        assert kind == 'PermissionError'
        assert message == (f"[Errno 13] Permission denied (creating a temporary file beside it "
                           f"to save to): {path!r}")
        assert os.listdir(name) == []


@needs_root
@pytest.mark.parametrize('load', [serializers.load_npz, serializers.load_hdf5])
def test_an_unreadable_file_is_a_permission_error(load):
    with tempfile.TemporaryDirectory() as name:
        os.chmod(name, 0o755)
        path = os.path.join(name, 'model')
        (serializers.save_npz if load is serializers.load_npz else serializers.save_hdf5)(
            path, {'w': numpy.ones(2)})
        os.chmod(path, 0o600)
        kind, message = as_nobody(load, path, {'w': numpy.zeros(2)})
        assert kind == 'PermissionError' and repr(path) in message


@pytest.mark.parametrize(('make', 'message'), [
    (lambda data: b'', 'the file is empty \\(0 bytes\\)'),
    (lambda data: data[:len(data) // 2], 'truncated: it starts as a zip, but the zip directory '
                                         'that ends a zip is missing'),
    (lambda data: b'hello, not a zip', "it starts with b'hell'"),
])
def test_what_a_broken_npz_is_called(tmp_path, make, message):
    data = crafting.npz_of({'x': crafting.npy_of(numpy.arange(100.0))})
    path = _write(tmp_path, make(data))
    with pytest.raises(CorruptFileError, match=_where(path) + ': not an NPZ \\(zip\\) file: '
                       + message):
        serializers.load_npz(path, {'x': None})


def test_an_empty_hdf5_file_is_called_empty(tmp_path):
    path = _write(tmp_path, b'', 'empty.h5')
    with pytest.raises(CorruptFileError, match=_where(path) + ': not an HDF5 file: the file is '
                       'empty'):
        serializers.load_hdf5(path, {})


@pytest.mark.parametrize('compression', [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED],
                         ids=['stored', 'deflated'])
def test_a_crc_error_says_which_arrays_were_filled(tmp_path, compression):
    members = {key: crafting.npy_of(numpy.full(50, i, numpy.float64))
               for i, key in enumerate(['a', 'b', 'c', 'd'])}
    data = crafting.npz_of(members, compression)
    end = crafting.data_offset(data, 'c.npy') + crafting.central_field(
        data, 'c.npy', 'compress_size')
    path = _write(tmp_path, crafting.flip(data, end - 3, 0x01))
    target = {key: numpy.full(50, -1.0) for key in members}
    with pytest.raises(CorruptFileError) as raised:
        serializers.load_npz(path, target)
    message = str(raised.value)
    assert re.match(_where(path, 'c') + ': (CRC mismatch|corrupt deflate data|the deflate '
                    'stream)', message), message
    assert ("(the load stopped while filling 'c', which may now hold part of that data; 2 of 4 "
            "arrays were already filled in place: 'a', 'b'; the others are as they were)"
            ) in message
    assert raised.value.filled == ['a', 'b'] and raised.value.partly_filled == 'c'
    assert (target['a'] == 0).all() and (target['b'] == 1).all() and (target['d'] == -1).all()


@pytest.mark.parametrize('trailing', [b'\x00', b'garbage', bytes(5000)])
def test_data_after_the_deflate_stream_is_refused(tmp_path, trailing):
    npy = crafting.npy_of(numpy.arange(50.0))
    path = _write(tmp_path, crafting.deflated_npz({'x': (npy, None)}, trailing))
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + f': the member holds '
                       f'{len(trailing)} bytes after the end of its deflate stream'):
        serializers.load_npz(path, {'x': numpy.zeros(50)})
    good = _write(tmp_path, crafting.deflated_npz({'x': (npy, None)}), 'good.npz')  # control
    target = {'x': numpy.zeros(50)}
    serializers.load_npz(good, target)
    assert target['x'].tolist() == list(range(50))


@pytest.mark.parametrize('kept', [0, 5, 20])
def test_a_deflate_stream_that_ends_within_the_npy_header_is_truncated(tmp_path, kept):
    npy = crafting.npy_of(numpy.arange(50.0))
    path = _write(tmp_path, crafting.deflated_npz({'x': (npy[:kept], len(npy))}))
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + r': the deflate stream ends '
                       r'\d+ bytes early'):
        serializers.load_npz(path, {'x': numpy.zeros(50)})


@pytest.mark.parametrize('shape', [(1,) * _npy.MAX_NDIM, (2,) + (1,) * (_npy.MAX_NDIM - 1)],
                         ids=['ones', 'two then ones'])
def test_as_many_dimensions_as_numpy_allows_load(tmp_path, shape):
    values = numpy.arange(numpy.prod(shape), dtype=numpy.float32).reshape(shape)
    path = _write(tmp_path, crafting.npz_of({'x': crafting.npy_of(values)}))
    for target in ({'x': None}, {'x': numpy.zeros(shape, numpy.float32)}):
        serializers.load_npz(path, target)
        assert target['x'].shape == shape and (target['x'] == values).all()


def test_a_crc_error_after_many_arrays_names_the_first_and_counts_the_rest(tmp_path):
    keys = [f'a{i}' for i in range(11)]
    members = {key: crafting.npy_of(numpy.full(4, i, numpy.float64)) for i, key in enumerate(keys)}
    data = crafting.npz_of(members)
    end = crafting.data_offset(data, 'a10.npy') + crafting.central_field(
        data, 'a10.npy', 'compress_size')
    path = _write(tmp_path, crafting.flip(data, end - 1, 0x01))
    with pytest.raises(CorruptFileError) as raised:
        serializers.load_npz(path, {key: numpy.zeros(4) for key in keys})
    named = ', '.join(repr(key) for key in keys[:8])
    assert f'10 of 11 arrays were already filled in place: {named} and 2 more;' in str(raised.value)
    assert raised.value.filled == keys[:10]


def test_a_member_claiming_more_than_its_bytes_can_inflate_to_fills_nothing(tmp_path):
    """The claim is checked when the array is asked for, not found out while filling."""
    claimed = crafting.npy_of(numpy.zeros(1 << 18))[:128]  # the header of 2 MiB, no data
    data = crafting.deflated_npz({'a': (crafting.npy_of(numpy.zeros(4)), None),
                                  'x': (claimed, 128 + (2 << 20))})
    path = _write(tmp_path, data)
    target = {'a': numpy.ones(4), 'x': numpy.ones(1 << 18)}
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + ': header claims 2097152 '
                       'bytes, more than \\d+ stored bytes can hold'):
        serializers.load_npz(path, target)
    assert (target['a'] == 1).all() and (target['x'] == 1).all()


def test_an_array_into_a_number_does_not_convert(tmp_path):
    path = tmp_path / 'm.npz'
    serializers.save_npz(path, {'k': numpy.arange(2)})
    with pytest.raises(UnsafeCastError, match=_where(path, 'k') + r': stored int64 array of '
                       r'shape \(2,\) does not convert to int'):
        serializers.load_npz(path, {'k': 0})


def test_a_header_cut_after_its_length_field(tmp_path, target):
    member = _npy.MAGIC + b'\x01\x00' + struct.pack('<H', 118)  # nothing after the length
    path = _write(tmp_path, crafting.npz_of({'x': member}))
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + ': a header of 128 bytes in '
                       'a member of 10'):
        serializers.load_npz(path, target)


def test_a_shape_of_exactly_the_largest_size_numpy_allows_is_no_overflow(tmp_path):
    shape = (_npy.MAX_EXTENT,)
    path = _write(tmp_path, crafting.npz_of({'x': crafting.npy_member(
        crafting.header_text('|u1', shape))}))
    with pytest.raises(CorruptFileError, match=_where(path, 'x') + ': the member holds \\d+ '
                       'bytes but its header claims'):
        serializers.load_npz(path, {'x': None})
    header = crafting.header_text('|u1', (_npy.MAX_EXTENT + 1,))
    with pytest.raises(_npy.HeaderError, match='overflows'):
        _npy.decode_header(crafting.npy_member(header))


def test_the_address_space_limit_stops_a_huge_allocation(address_space_limit):
    """The limit these tests run under is real: a broken allocation bound fails one test."""
    with pytest.raises(MemoryError):
        numpy.ones(address_space_limit, numpy.uint8)


@pytest.mark.parametrize('fmt', ['npz', 'h5'])
def test_scalars_up_to_the_limit_load_and_larger_ones_do_not(tmp_path, fmt):
    save, load = ((serializers.save_npz, serializers.load_npz) if fmt == 'npz' else
                  (serializers.save_hdf5, serializers.load_hdf5))
    limit = 1 << 20  # 1 MiB: larger entries are not scalars
    assert loading.MAX_SCALAR_BYTES == limit
    save(tmp_path / f'at.{fmt}', {'s': numpy.bytes_(b'x' * limit)})
    target = {'s': b''}
    load(tmp_path / f'at.{fmt}', target)
    assert target['s'] == b'x' * limit
    save(tmp_path / f'over.{fmt}', {'s': numpy.bytes_(b'x' * (limit + 1))})
    with pytest.raises(MismatchError, match=r"key 's': a stored array of shape \(\) cannot "
                                            r"load into a bytes"):
        load(tmp_path / f'over.{fmt}', {'s': b''})


def test_a_crc_error_after_exactly_as_many_arrays_as_are_named(tmp_path):
    count = loading.MAX_NAMED_IN_ERRORS
    keys = [f'a{i}' for i in range(count + 1)]
    data = crafting.npz_of({key: crafting.npy_of(numpy.full(4, i, numpy.float64))
                            for i, key in enumerate(keys)})
    end = crafting.data_offset(data, keys[-1] + '.npy') + crafting.central_field(
        data, keys[-1] + '.npy', 'compress_size')
    path = _write(tmp_path, crafting.flip(data, end - 1, 0x01))
    with pytest.raises(CorruptFileError) as raised:
        serializers.load_npz(path, {key: numpy.zeros(4) for key in keys})
    named = ', '.join(repr(key) for key in keys[:count])
    assert f'{count} of {count + 1} arrays were already filled in place: {named};' in str(
        raised.value)


@pytest.mark.parametrize('fmt', ['npz', 'h5'])
def test_new_host_arrays_keep_the_stored_byte_order(tmp_path, fmt):
    """As numpy.load gives them (Chainer's None targets); device arrays are made native."""
    save, load = ((serializers.save_npz, serializers.load_npz) if fmt == 'npz' else
                  (serializers.save_hdf5, serializers.load_hdf5))
    save(tmp_path / f'm.{fmt}', {'x': numpy.arange(3, dtype='>f4')})
    target = {'x': None}
    load(tmp_path / f'm.{fmt}', target)
    assert target['x'].dtype == numpy.dtype('>f4') and target['x'].tolist() == [0, 1, 2]
