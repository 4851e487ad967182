"""Whole-file loads and saves, lazy reads and slices, load reports (gpuserial.access)."""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import os
import re
import subprocess
import sys
import types
import zipfile

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpuserial
from gpuserial import serializers
from gpuserial.engine import devices, transfer
from gpuserial.errors import CorruptFileError, DeviceError, KeyNotFoundError, MismatchError
from gpuserial.formats.loading import box_reads
from tests.conftest import host

SUFFIXES = {'npz': '.npz', 'npz-deflated': '.npz', 'hdf5': '.h5'}


@pytest.fixture(params=list(SUFFIXES))
def kind(request):
    return request.param


def path_for(tmp_path, kind, name='state'):
    return tmp_path / f'{name}{SUFFIXES[kind]}'


def save(path, kind, mapping):
    gpuserial.save(path, mapping, compression=kind == 'npz-deflated')


def bits(array) -> bytes:
    """An array's raw bytes (NaNs compare equal), from any library."""
    array = devices.engine_array(array)
    return numpy.ascontiguousarray(host(array)).tobytes()


STATE = {
    'f32': numpy.arange(12, dtype=numpy.float32).reshape(3, 4),
    'f64': numpy.array([numpy.nan, -0.0, numpy.inf]),
    'i8': numpy.arange(-5, 5, dtype=numpy.int8),
    'u64': numpy.array([2**64 - 1], numpy.uint64),
    'c64': numpy.array([1 + 2j], numpy.complex64),
    'flag': numpy.array([True, False]),
    'scalar': numpy.float16(1.5),
    'big_endian': numpy.arange(4, dtype='>i4'),
    'empty': numpy.zeros((0, 3), numpy.float32),
    'nested': {'deeper': {'w': numpy.ones((2, 2), numpy.float32)}},
    'none': None,
}


# ---------------------------------------------------------------------------------------------
# save / load


def test_load_gives_every_entry_bit_for_bit(tmp_path, kind):
    path = path_for(tmp_path, kind)
    save(path, kind, STATE)
    loaded = gpuserial.load(path)
    assert sorted(loaded) == sorted(['f32', 'f64', 'i8', 'u64', 'c64', 'flag', 'scalar',
                                     'big_endian', 'empty', 'nested/deeper/w', 'none'])
    assert loaded['none'] is None
    for key, value in loaded.items():
        if key != 'none':
            expected = numpy.asarray(STATE['nested']['deeper']['w'] if key == 'nested/deeper/w'
                                     else STATE[key])
            assert value.shape == expected.shape and value.dtype == expected.dtype, key
            assert bits(value) == bits(expected), key


def test_load_keys_picks_entries_in_the_order_asked(tmp_path, kind):
    path = path_for(tmp_path, kind)
    save(path, kind, STATE)
    loaded = gpuserial.load(path, keys=['i8', 'f32'])
    assert list(loaded) == ['i8', 'f32']
    numpy.testing.assert_array_equal(loaded['f32'], STATE['f32'])


def test_load_keys_as_one_string_is_refused(tmp_path):
    """Its characters were taken for keys: keys='w' loaded 'w', keys='l1/W' said 'l' was
    missing."""
    gpuserial.save(tmp_path / 'a.npz', {'w': numpy.ones(3)})
    with pytest.raises(TypeError, match=r"a\.npz': keys= takes a list of keys \(keys=\['w'\]\), "
                                        r"not a str$"):
        gpuserial.load(tmp_path / 'a.npz', keys='w')


def test_load_of_a_missing_key_names_the_file_and_the_key(tmp_path, kind):
    path = path_for(tmp_path, kind)
    save(path, kind, STATE)
    with pytest.raises(KeyNotFoundError, match=rf"{path.name}.*'nope'.*not in the file"):
        gpuserial.load(path, keys=['f32', 'nope'])
    assert list(gpuserial.load(path, keys=['nope', 'f32'], strict=False)) == ['f32']


def test_load_of_a_file_object_without_a_name(tmp_path, kind):
    path = path_for(tmp_path, kind)
    save(path, kind, STATE)
    loaded = gpuserial.load(io.BytesIO(path.read_bytes()))
    numpy.testing.assert_array_equal(loaded['f32'], STATE['f32'])


def test_load_of_a_file_object_just_written_needs_no_rewind(kind):
    """As load_npz and load_hdf5 read one: the format was told from the bytes at the file's
    position, here its end, and the file called no checkpoint."""
    buffer = io.BytesIO()
    gpuserial.save(buffer, {'w': numpy.arange(3)}, format='hdf5' if kind == 'hdf5' else 'npz')
    numpy.testing.assert_array_equal(gpuserial.load(buffer)['w'], numpy.arange(3))
    with gpuserial.open(buffer) as f:
        assert f.keys() == ['w']


def test_load_of_what_is_no_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.npz'?: no such file"):
        gpuserial.load(tmp_path / 'missing.npz')
    with pytest.raises(CorruptFileError, match=r"'<BytesIO>': not an NPZ or HDF5 file \(it "
                                               r"starts with b'garbage '"):
        gpuserial.load(io.BytesIO(b'garbage and more'))
    (tmp_path / 'text.npz').write_text('not a zip at all')
    with pytest.raises(CorruptFileError, match="text.npz'?: not an NPZ or HDF5 file"):
        gpuserial.open(tmp_path / 'text.npz')


@pytest.mark.parametrize('name, error, why', [
    ('m' * 300 + '.npz', errno.ENAMETOOLONG, 'File name too long'),
    ('text.npz/m.npz', errno.ENOTDIR, 'Not a directory'),
])
@pytest.mark.parametrize('call', [gpuserial.load, gpuserial.open])
def test_a_path_that_cannot_be_looked_at_says_why_not_that_there_is_no_such_file(
        tmp_path, name, error, why, call):
    (tmp_path / 'text.npz').write_text('a file where a directory would be')
    path = str(tmp_path / name)
    with pytest.raises(OSError, match=re.escape(f'[Errno {error}] {why}: {path!r}')) as raised:
        call(path)
    assert raised.value.errno == error  # as numpy.load says


def _claims_more_than_it_holds(path) -> str:
    """Writes at ``path`` an entry 'x' that claims 2 MiB its file cannot hold; returns what the
    refusal says of it."""
    if path.suffix == '.npz':  # a deflated member of a header and no data
        from tests import crafting
        header = crafting.npy_of(numpy.zeros(1 << 18))[:128]
        path.write_bytes(crafting.deflated_npz({'x': (header, 128 + (2 << 20))}))
        return r'header claims 2097152 bytes, more than \d+ stored bytes can hold$'
    import h5py
    with h5py.File(path, 'w') as f:  # contiguous, never written: no storage at all
        f.create_dataset('x', shape=(1 << 18,), dtype='f8')
    return (r'the dataset claims 2097152 bytes \(dtype float64, shape \(262144,\)\) but stores '
            r'only 0; a new array of that size is not made for it')


@pytest.mark.parametrize('suffix', ['.npz', '.h5'])
@pytest.mark.parametrize('call', ['load', 'get'])
def test_a_claim_the_file_cannot_hold_is_refused_before_allocating(tmp_path, suffix, call):
    path = tmp_path / f'hostile{suffix}'
    message = _claims_more_than_it_holds(path)
    with pytest.raises(CorruptFileError, match=re.escape(f"{str(path)!r}, key 'x': ") + message):
        if call == 'load':
            gpuserial.load(path)
        else:
            with gpuserial.open(path) as f:
                f.get('x')


@pytest.mark.parametrize('call', ['load', 'open', 'load_into', 'save', 'save_async'])
def test_a_file_object_in_text_mode_is_refused_naming_it(tmp_path, kind, call):
    path = path_for(tmp_path, kind)
    save(path, kind, {'w': numpy.arange(3)})
    writing, format = call.startswith('save'), 'hdf5' if kind == 'hdf5' else 'npz'
    run = {'load': gpuserial.load, 'open': gpuserial.open,
           'load_into': lambda f: gpuserial.load_into(f, {'w': numpy.zeros(3, int)}),
           'save': lambda f: gpuserial.save(f, {'w': numpy.arange(3)}, format=format),
           'save_async': lambda f: gpuserial.save_async(f, {'w': numpy.arange(3)},
                                                        format=format)}[call]
    with open(path, 'w' if writing else 'r') as f, pytest.raises(
            TypeError, match=rf"^{re.escape(repr(str(path)))}: the file object is open in text "
                             rf"mode; open it in binary mode \('{'wb' if writing else 'rb'}'\)$"):
        run(f)


def test_load_gives_hdf5_text_as_str_arrays(tmp_path):
    gpuserial.save(tmp_path / 'a.h5', {'name': numpy.array(['ab', 'c']), 'one': 'xyz'})
    loaded = gpuserial.load(tmp_path / 'a.h5')
    assert loaded['name'].tolist() == ['ab', 'c'] and loaded['name'].dtype.kind == 'U'
    assert loaded['one'].tolist() == 'xyz'


def test_load_and_get_read_hdf5_text_once(tmp_path, monkeypatch):
    """Text is read whole when its entry comes up, not again with the arrays."""
    from gpuserial.formats import hdf5
    gpuserial.save(tmp_path / 'a.h5', {'name': numpy.array(['ab', 'c']), 'one': 'xyz',
                                       'w': numpy.arange(3.0)})
    read = []
    real_read_scalar = hdf5._GroupReader.read_scalar
    monkeypatch.setattr(hdf5._GroupReader, 'read_scalar',
                        lambda self, entry: read.append(entry.key) or real_read_scalar(self, entry))
    loaded = gpuserial.load(tmp_path / 'a.h5')
    assert loaded['name'].tolist() == ['ab', 'c'] and loaded['one'].tolist() == 'xyz'
    assert sorted(read) == ['name', 'one']
    read.clear()
    with gpuserial.open(tmp_path / 'a.h5') as f:
        assert f.get('name').tolist() == ['ab', 'c']
    assert read == ['name']


def test_load_reads_numpy_and_chainer_style_files(tmp_path):
    path = tmp_path / 'numpy.npz'
    numpy.savez(path, a=numpy.arange(3), b=numpy.asfortranarray(numpy.ones((2, 3))))
    loaded = gpuserial.load(path)
    numpy.testing.assert_array_equal(loaded['a'], numpy.arange(3))
    numpy.testing.assert_array_equal(loaded['b'], numpy.ones((2, 3)))


def test_load_onto_a_device(tmp_path, kind, device):
    path = path_for(tmp_path, kind)
    save(path, kind, STATE)
    loaded = gpuserial.load(path, device=device, keys=['f32', 'big_endian', 'empty'])
    for key, value in loaded.items():
        assert devices.device_of(value) == device
        numpy.testing.assert_array_equal(host(value), STATE[key])


def test_text_and_dates_stay_on_the_host_in_a_load_onto_a_device(tmp_path):
    """No GPU array holds text or dates (CuPy 14: 'Unsupported dtype <U2', which the stand-in
    says too): loads onto a device give them as NumPy arrays, as they give HDF5's text."""
    from tests.standin import StandInDevice
    device = StandInDevice(0)
    state = {'names': numpy.array(['ab', 'c']), 'raw': numpy.array([b'xy', b'z']),
             'when': numpy.array(['2026-12-07'], 'M8[D]'), 'took': numpy.array([3], 'm8[s]'),
             'w': numpy.arange(3.0)}
    path = tmp_path / 'a.npz'
    gpuserial.save(path, state)
    loaded = gpuserial.load(path, device=device)
    with gpuserial.open(path, device=device) as f:
        got = {key: f.get(key) for key in state}
    target = dict.fromkeys(state)
    serializers.load_npz(path, target, device=device)
    for each in (loaded, got, target):
        assert devices.device_of(each['w']) == device
        for key in ('names', 'raw', 'when', 'took'):
            assert type(each[key]) is numpy.ndarray, key
            numpy.testing.assert_array_equal(each[key], state[key])


def test_large_new_host_arrays_get_their_own_mapping(tmp_path, kind):
    import mmap
    data = numpy.arange(devices.OWN_MAPPING_BYTES // 4 + 3, dtype=numpy.float32)
    path = path_for(tmp_path, kind)
    save(path, kind, {'big': data, 'small': data[:10]})
    loaded = gpuserial.load(path)
    numpy.testing.assert_array_equal(loaded['big'], data)

    def memory_of(array):
        while isinstance(array, numpy.ndarray):
            array = array.base
        return array.obj if isinstance(array, memoryview) else array

    assert isinstance(memory_of(loaded['big']), mmap.mmap) and loaded['big'].flags.writeable
    assert memory_of(loaded['small']) is None


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='MAP_POPULATE is Linux\'s')
def test_a_large_new_host_array_is_resident_before_it_is_written():
    array = devices.CPU.backend.empty((devices.OWN_MAPPING_BYTES // 4 + 1024,), numpy.float32,
                                      devices.CPU)
    page = os.sysconf('SC_PAGE_SIZE')
    start = array.__array_interface__['data'][0]
    first, last = start // page, (start + array.nbytes - 1) // page
    with open('/proc/self/pagemap', 'rb') as pagemap:  # a word per page; bit 63: present
        pagemap.seek(first * 8)
        words = numpy.frombuffer(pagemap.read((last - first + 1) * 8), '<u8')
    assert len(words) == last - first + 1
    assert bool(numpy.all(words >> 63 == 1))  # every page made up front, none left to fault in


def test_save_takes_mappings_that_are_not_dicts(tmp_path, kind):
    """A mapping that is not a dict (MappingProxyType, flax's FrozenDict) was refused ('it
    has no serialize() method and is not a dict'), and nested, it was taken for an object
    array, though save is documented to take a flat or nested mapping."""
    path = path_for(tmp_path, kind)
    save(path, kind, types.MappingProxyType({
        'a': numpy.ones(2), 'g': types.MappingProxyType({'b': numpy.arange(3)})}))
    loaded = gpuserial.load(path)
    assert sorted(loaded) == ['a', 'g/b'] and loaded['g/b'].tolist() == [0, 1, 2]


def test_save_refuses_what_is_not_a_mapping(tmp_path):
    with pytest.raises(TypeError, match=r"x\.npz': gpuserial\.save takes a mapping of arrays, "
                                        r"got list; save serializable objects with save_npz or "
                                        r"save_hdf5$"):
        gpuserial.save(tmp_path / 'x.npz', [numpy.zeros(1)])

    class Module:  # as torch.nn.Module, whose state_dict() is the mapping to save
        def state_dict(self):
            return {}

    with pytest.raises(TypeError, match=r"got Module; .* save_hdf5; save a torch module's "
                                        r"state_dict\(\)$"):
        gpuserial.save(tmp_path / 'x.npz', Module())


def test_save_tells_the_format_by_suffix_or_argument(tmp_path):
    gpuserial.save(tmp_path / 'a.h5', {'x': numpy.ones(2)})
    assert (tmp_path / 'a.h5').read_bytes().startswith(b'\x89HDF')
    gpuserial.save(tmp_path / 'b.bin', {'x': numpy.ones(2)}, format='npz')
    assert zipfile.is_zipfile(tmp_path / 'b.bin')
    with pytest.raises(ValueError, match="cannot tell the format from the extension '.bin'"):
        gpuserial.save(tmp_path / 'c.bin', {'x': numpy.ones(2)})
    with pytest.raises(ValueError, match='give format= for a file object without a name'):
        gpuserial.save(io.BytesIO(), {'x': numpy.ones(2)})
    out = io.BytesIO()
    gpuserial.save(out, {'x': numpy.ones(2)}, format='npz')
    numpy.testing.assert_array_equal(numpy.load(io.BytesIO(out.getvalue()))['x'], numpy.ones(2))


@pytest.mark.parametrize(('name', 'signature'), [('a.npz', b'PK\x03\x04'), ('a.h5', b'\x89HDF')])
def test_save_tells_the_format_of_an_open_file_by_its_name(tmp_path, name, signature):
    """A file object with a name is told by its extension, as its path would be."""
    with open(tmp_path / name, 'wb') as f:
        gpuserial.save(f, {'x': numpy.ones(2)})
    assert (tmp_path / name).read_bytes().startswith(signature)
    numpy.testing.assert_array_equal(gpuserial.load(tmp_path / name)['x'], numpy.ones(2))
    with open(tmp_path / 'a.bin', 'wb') as f, pytest.raises(ValueError, match=re.escape(
            f"{str(tmp_path / 'a.bin')!r}: cannot tell the format from the extension '.bin'")):
        gpuserial.save(f, {'x': numpy.ones(2)})


@pytest.mark.parametrize('suffix', ['.npz', '.h5'])
@pytest.mark.parametrize('durable', [None, True, False], ids=['default', 'durable', 'not'])
def test_save_is_durable_unless_told_otherwise(tmp_path, monkeypatch, suffix, durable):
    """The file's data, then its directory entry, reach the disk before save returns."""
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, 'fsync',
                        lambda fd: fsynced.append(os.fstat(fd).st_ino) or real_fsync(fd))
    path = tmp_path / f'a{suffix}'
    options = {} if durable is None else {'durable': durable}
    gpuserial.save(path, {'x': numpy.ones(2)}, **options)
    assert fsynced == ([] if durable is False else [os.stat(path).st_ino,
                                                     os.stat(tmp_path).st_ino])


@pytest.mark.parametrize('suffix', ['.npz', '.h5'])
def test_save_waits_for_other_streams_only_when_told_to(tmp_path, suffix):
    """As save_npz: a save orders after the current stream only (``sync=False``, the
    default); ``sync=True`` first waits for every stream of the arrays' devices."""
    from tests.standin import BACKEND, StandInDevice
    device = StandInDevice(0)
    path = tmp_path / f'a{suffix}'
    for sync in (None, False, True):
        array = device.send(numpy.zeros(4, numpy.float32))
        with BACKEND.using(device, 'writer'):  # written on a stream not current at the save
            BACKEND.launch(device, lambda a=array: a._data.__setitem__(Ellipsis, 5.0))
        gpuserial.save(path, {'w': array}, **({} if sync is None else {'sync': sync}))
        assert gpuserial.load(path)['w'].tolist() == [5.0 if sync else 0.0] * 4, sync
        BACKEND.synchronize_device(device)



@pytest.mark.parametrize('where', ['path', 'url', 'file object'])
def test_reads_refuse_an_unknown_format(tmp_path, memory, where):
    gpuserial.save(tmp_path / 'a.npz', {'x': numpy.ones(2)})
    gpuserial.save('memory://a/a.npz', {'x': numpy.ones(2)})
    file = {'path': tmp_path / 'a.npz', 'url': 'memory://a/a.npz',
            'file object': io.BytesIO((tmp_path / 'a.npz').read_bytes())}[where]
    for read in (lambda: gpuserial.load(file, format='zip'),
                 lambda: gpuserial.open(file, format='zip').close()):
        with pytest.raises(ValueError, match="unknown format 'zip': expected one of npz, hdf5"):
            read()

def test_save_compression_off_by_default_and_on_request(tmp_path):
    state = {'zeros': numpy.zeros(1 << 16, numpy.float32)}
    gpuserial.save(tmp_path / 'plain.npz', state)
    gpuserial.save(tmp_path / 'deflated.npz', state, compression=True)
    gpuserial.save(tmp_path / 'gzip.h5', state, compression=True)
    with zipfile.ZipFile(tmp_path / 'plain.npz') as z:
        assert z.infolist()[0].compress_type == zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp_path / 'deflated.npz') as z:
        assert z.infolist()[0].compress_type == zipfile.ZIP_DEFLATED
    with gpuserial.open(tmp_path / 'gzip.h5') as f:
        assert f.metadata('zeros').compressed


def test_bfloat16_onto_a_device_without_the_dtype_is_a_clear_error(tmp_path, monkeypatch):
    ml_dtypes = pytest.importorskip('ml_dtypes')
    from tests import standin
    monkeypatch.setattr(standin.BACKEND, 'extension_dtypes', False)  # as CuPy before 14
    gpuserial.save(tmp_path / 'a.npz', {'b': numpy.ones(3, ml_dtypes.bfloat16)})
    with pytest.raises(DeviceError, match="'b': bfloat16 has no dtype on @standin:0; load it "
                                          "with like='torch'"):
        gpuserial.load(tmp_path / 'a.npz', device=standin.StandInDevice(0))
    with gpuserial.open(tmp_path / 'a.npz', device=standin.StandInDevice(0)) as f:
        with pytest.raises(DeviceError, match="'b': bfloat16 has no dtype on @standin:0"):
            f.get_slice('b')[1:]


@pytest.mark.parametrize('call', ['load', 'get'])
def test_bfloat16_onto_a_device_without_the_dtype_fails_before_reading_it(
        tmp_path, monkeypatch, call):
    ml_dtypes = pytest.importorskip('ml_dtypes')
    from tests import standin
    monkeypatch.setattr(standin.BACKEND, 'extension_dtypes', False)  # as CuPy before 14
    gpuserial.save(tmp_path / 'a.npz', {'b': numpy.ones(1 << 22, ml_dtypes.bfloat16)})  # 8 MiB
    on_0 = standin.StandInDevice(0)
    with CountingFile(tmp_path / 'a.npz') as fp:
        with pytest.raises(DeviceError, match="'b': bfloat16 has no dtype on @standin:0"):
            if call == 'load':
                gpuserial.load(fp, device=on_0)
            else:
                with gpuserial.open(fp, device=on_0) as f:
                    f.get('b')
        assert fp.count < 1 << 20  # the zip's directory and the header, not the data


@pytest.mark.parametrize('like', ['numpy', numpy])
def test_like_numpy_on_the_cpu(tmp_path, like):
    gpuserial.save(tmp_path / 'a.npz', {'x': numpy.ones(2)})
    assert type(gpuserial.load(tmp_path / 'a.npz', like=like)['x']) is numpy.ndarray


def test_like_and_device_that_do_not_go_together(tmp_path):
    gpuserial.save(tmp_path / 'a.npz', {'x': numpy.ones(2)})
    with pytest.raises(ValueError, match="unknown like='tensorflow'"):
        gpuserial.load(tmp_path / 'a.npz', like='tensorflow')
    with pytest.raises(ValueError, match="like='numpy' cannot hold arrays on @standin:0"):
        from tests import standin
        gpuserial.load(tmp_path / 'a.npz', like='numpy', device=standin.StandInDevice(0))
    if not devices.gpu_available():
        with pytest.raises(DeviceError, match="'cuda' is not usable"):
            gpuserial.load(tmp_path / 'a.npz', like='cupy')


# ---------------------------------------------------------------------------------------------
# torch and JAX




def _torch():
    return pytest.importorskip('torch')


def _jax():
    return pytest.importorskip('jax')


TORCH_DTYPES = ['float16', 'bfloat16', 'float32', 'float64', 'complex64', 'complex128', 'int8',
                'int16', 'int32', 'int64', 'uint8', 'bool', 'float8_e4m3fn', 'float8_e5m2']


@pytest.mark.parametrize('dtype', TORCH_DTYPES)
def test_torch_tensors_round_trip_bit_for_bit(tmp_path, kind, dtype):
    torch = _torch()
    generator = torch.Generator().manual_seed(0)
    tensor = (torch.randn(3, 5, generator=generator) * 100).to(getattr(torch, dtype))
    path = path_for(tmp_path, kind)
    save(path, kind, {'t': tensor, 'strided': tensor.t()})
    loaded = gpuserial.load(path, like='torch')
    for key, original in (('t', tensor), ('strided', tensor.t())):
        assert isinstance(loaded[key], torch.Tensor)
        assert loaded[key].dtype == original.dtype and loaded[key].shape == original.shape
        assert bits(loaded[key]) == bits(original)


def test_a_torch_device_means_torch_tensors(tmp_path):
    torch = _torch()
    gpuserial.save(tmp_path / 'a.npz', {'x': numpy.arange(3.0)})
    loaded = gpuserial.load(tmp_path / 'a.npz', device=torch.device('cpu'))['x']
    assert isinstance(loaded, torch.Tensor) and loaded.tolist() == [0.0, 1.0, 2.0]
    assert gpuserial.get_device(torch.device('cpu')) is devices.CPU


def test_bfloat16_is_stored_as_named_raw_bits_numpy_reads(tmp_path):
    torch = _torch()
    tensor = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    gpuserial.save(tmp_path / 'a.npz', {'w': tensor})
    raw = numpy.load(tmp_path / 'a.npz')['w']
    assert raw.dtype == numpy.dtype([('bfloat16', '<u2')])
    assert raw['bfloat16'].tolist() == tensor.view(torch.int16).numpy().view(numpy.uint16).tolist()


def test_bfloat16_does_not_load_into_float32(tmp_path, kind):
    torch = _torch()
    path = path_for(tmp_path, kind)
    save(path, kind, {'w': torch.ones(2, dtype=torch.bfloat16)})
    target = {'w': numpy.zeros(2, numpy.float32)}
    with pytest.raises(MismatchError, match=r"'w': stored dtype bfloat16 does not cast to the "
                       r"target dtype float32 \(same_kind; bfloat16 and float8 only into the "
                       r"same type\)$"):
        gpuserial.load_into(path, target)
    assert target['w'].tolist() == [0.0, 0.0]


@pytest.mark.parametrize('dtype', ['float8_e4m3fnuz', 'complex32', 'uint4'])
def test_torch_dtypes_numpy_lacks_are_refused_naming_the_file_and_key(tmp_path, kind, dtype):
    """torch's own bare TypeError ('Got unsupported ScalarType ...') named no file or key,
    on a save and on a load into such a tensor."""
    torch = _torch()
    path = path_for(tmp_path, kind)
    message = (f"^{re.escape(repr(str(path)))}, key 'g/x': a torch tensor of dtype torch.{dtype} "
               f"has no NumPy view .*: gpuserial stores NumPy's dtypes and bfloat16, ")
    with pytest.raises(gpuserial.UnstorableValueError, match=message):
        save(path, kind, {'g': {'x': torch.zeros(2, dtype=getattr(torch, dtype))}})
    assert not path.exists()
    save(path, kind, {'g': {'x': numpy.zeros(2, numpy.uint8)}})
    with pytest.raises(MismatchError, match=message):
        gpuserial.load_into(path, {'g': {'x': torch.zeros(2, dtype=getattr(torch, dtype))}})


@pytest.mark.parametrize('dtype', ['int4', 'float8_e4m3fnuz', 'float4_e2m1fn'])
def test_ml_dtypes_without_an_encoding_are_refused_not_saved_as_raw_bytes(tmp_path, kind, dtype):
    """ml_dtypes' types other than bfloat16 and float8_e4m3fn/e5m2 were saved as NumPy
    writes them, raw bytes ('|V1'): the file loaded back as void, the type lost."""
    ml_dtypes = pytest.importorskip('ml_dtypes')
    path = path_for(tmp_path, kind)
    with pytest.raises(gpuserial.UnstorableValueError,
                       match=f"^{re.escape(repr(str(path)))}, key 'x': an array of dtype "
                       f"{dtype} cannot be saved: gpuserial stores NumPy's dtypes and "
                       r"bfloat16, .*\.view\(numpy\.uint8\)\)$"):
        save(path, kind, {'x': numpy.zeros(2, getattr(ml_dtypes, dtype))})
    assert not path.exists()


@pytest.mark.parametrize('like', ['torch', pytest.param('jax', marks=pytest.mark.jax)])
@pytest.mark.parametrize('how', ['load', 'get', 'slice'])
def test_a_dtype_the_library_lacks_names_the_file_and_key(tmp_path, like, how):
    """like='torch' or 'jax' for a dtype the library lacks (a structured array) raised the
    library's bare TypeError ("can't convert np.ndarray of type numpy.void"), naming neither
    the file nor the key."""
    pytest.importorskip(like)
    path = tmp_path / 'a.npz'
    gpuserial.save(path, {'ok': numpy.ones(2), 'v': numpy.zeros(2, [('a', '<i4'), ('b', '<f4')])})
    read = {'load': lambda: gpuserial.load(path, like=like),
            'get': lambda: gpuserial.open(path).get('v', like=like),
            'slice': lambda: gpuserial.open(path, like=like).get_slice('v')[:1]}[how]
    with pytest.raises(TypeError, match=rf"^{re.escape(repr(str(path)))}, key 'v': stored dtype "
                       rf"\[\('a', '<i4'\), \('b', '<f4'\)\] has no {like} dtype \(.*\); "
                       r"load it with like='numpy'$"):
        read()


def test_float32_does_not_load_into_bfloat16_and_the_error_names_it(tmp_path, kind):
    """The error named the target's dtype as its stored encoding, [('bfloat16', '<u2')], which a
    torch user with a bfloat16 model does not recognise."""
    torch = _torch()
    path = path_for(tmp_path, kind)
    save(path, kind, {'w': torch.ones(2)})
    target = {'w': torch.zeros(2, dtype=torch.bfloat16)}
    with pytest.raises(MismatchError, match=r"'w': stored dtype float32 does not cast to the "
                       r"target dtype bfloat16 \(same_kind; bfloat16 and float8 only into the "
                       r"same type\)$"):
        gpuserial.load_into(path, target)
    assert target['w'].tolist() == [0.0, 0.0]


def test_torch_tensors_load_in_place(tmp_path, kind):
    torch = _torch()
    source = {'w': torch.randn(4, 3), 'b': torch.randn(3, dtype=torch.bfloat16),
              'steps': torch.tensor(7)}
    path = path_for(tmp_path, kind)
    save(path, kind, source)
    parameter = torch.nn.Parameter(torch.zeros(4, 3))
    target = {'w': parameter, 'b': torch.zeros(3, dtype=torch.bfloat16),
              'steps': torch.tensor(0)}
    kept = {key: (value, value.data_ptr()) for key, value in target.items()}
    report = gpuserial.load_into(path, target)
    assert report == gpuserial.LoadReport([], [])
    for key, (tensor, pointer) in kept.items():
        assert target[key] is tensor and tensor.data_ptr() == pointer
        assert torch.equal(tensor.detach(), source[key])
    assert parameter.requires_grad


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_an_expanded_torch_tensor_is_refused_not_filled(tmp_path, kind, dtype):
    torch = _torch()
    path = path_for(tmp_path, kind)
    save(path, kind, {'w': torch.arange(6.0).reshape(2, 3).to(getattr(torch, dtype))})
    expanded = torch.zeros(3, dtype=getattr(torch, dtype)).expand(2, 3)  # rows share memory
    with pytest.raises(MismatchError, match="'w': the target array cannot be loaded in place: "
                                            "its elements share memory"):
        gpuserial.load_into(path, {'w': expanded})
    assert expanded.float().eq(0).all()


def test_a_lazy_conjugate_or_negative_torch_view_is_refused_not_filled(tmp_path, kind):
    """torch hands out such a view's values as a resolved copy: a load through it would fill
    the copy and leave the tensor as it was."""
    torch = _torch()
    path = path_for(tmp_path, kind)
    save(path, kind, {'c': torch.tensor([1 + 2j, 3 - 4j]), 'i': torch.tensor([5.0, 6.0])})
    owner = torch.zeros(2, dtype=torch.complex128)
    for key, view in (('c', owner.conj()), ('i', owner.conj().imag)):
        with pytest.raises(MismatchError, match=f"'{key}': the target array cannot be loaded in "
                                                f"place: it is a lazy conjugate or negative view"):
            gpuserial.load_into(path, {key: view}, strict=False)
    assert owner.eq(0).all()
    loaded = gpuserial.load_into(path, {'c': owner}, strict=False)  # its owner loads
    assert loaded.unexpected_keys == ['i'] and owner.tolist() == [1 + 2j, 3 - 4j]


def test_torch_cpu_tensors_load_in_place_where_dlpack_views_are_read_only(tmp_path, kind,
                                                                          monkeypatch):
    torch = _torch()
    path = path_for(tmp_path, kind)
    save(path, kind, {'w': torch.arange(4.0), 'b': torch.ones(2, dtype=torch.bfloat16)})

    def read_only(value):  # as numpy.from_dlpack gives them before NumPy 2.3
        array = numpy.asarray(value)
        array.setflags(write=False)
        return array

    monkeypatch.setattr(numpy, 'from_dlpack', read_only)
    target = {'w': torch.zeros(4), 'b': torch.zeros(2, dtype=torch.bfloat16)}
    gpuserial.load_into(path, target)
    assert target['w'].tolist() == [0.0, 1.0, 2.0, 3.0] and target['b'].tolist() == [1.0, 1.0]


def test_a_chainer_style_object_of_torch_tensors(tmp_path, fmt):
    torch = _torch()
    save_fn, load_fn, suffix = fmt

    class Model:
        def __init__(self, scale):
            self.w = torch.full((2, 3), float(scale))
            self.h = torch.full((4,), float(scale), dtype=torch.bfloat16)

        def serialize(self, serializer):
            serializer('w', self.w)
            serializer('h', self.h)

    save_fn(tmp_path / f'm{suffix}', Model(3))
    model = Model(0)
    load_fn(tmp_path / f'm{suffix}', model)
    assert model.w.eq(3).all() and model.h.eq(3).all()


def test_a_failed_load_leaves_torch_tensors_as_they_were(tmp_path):
    torch = _torch()
    gpuserial.save(tmp_path / 'a.npz', {'a': torch.ones(3), 'b': torch.ones(2)})
    target = {'a': torch.zeros(3), 'b': torch.zeros(5)}
    with pytest.raises(MismatchError, match="'b': stored shape"):
        gpuserial.load_into(tmp_path / 'a.npz', target)
    assert target['a'].eq(0).all()


@pytest.mark.jax
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'int32', 'bool', 'float16',
                                   'complex64', 'uint8'])
def test_jax_arrays_round_trip_bit_for_bit(tmp_path, kind, dtype):
    jax = _jax()
    array = (jax.random.normal(jax.random.PRNGKey(0), (4, 3)) * 50).astype(dtype)
    path = path_for(tmp_path, kind)
    save(path, kind, {'x': array})
    loaded = gpuserial.load(path, like='jax')['x']
    assert isinstance(loaded, jax.Array) and loaded.dtype == array.dtype
    assert bits(loaded) == bits(array)
    assert gpuserial.load(path, device=jax.devices('cpu')[0])['x'].dtype == array.dtype


@pytest.mark.jax
def test_jax_arrays_in_a_mapping_are_replaced_with_loaded_ones(tmp_path):
    jax = _jax()
    gpuserial.save(tmp_path / 'a.h5', {'x': numpy.arange(3, dtype=numpy.float32)})
    target = {'x': jax.numpy.zeros(3, dtype=jax.numpy.float32)}
    gpuserial.load_into(tmp_path / 'a.h5', target)
    assert isinstance(target['x'], jax.Array) and target['x'].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(MismatchError, match="'x': stored shape \\(3,\\) does not match the "
                                            "target shape \\(4,\\)"):
        gpuserial.load_into(tmp_path / 'a.h5', {'x': jax.numpy.zeros(4, dtype=jax.numpy.float32)})


def test_a_tensor_the_engine_cannot_stage_names_the_file_and_key_and_keeps_the_old_file(
        tmp_path, kind):
    torch = _torch()
    path = path_for(tmp_path, kind)
    gpuserial.save(path, {'layer': {'w': numpy.ones(3)}}, compression=kind == 'npz-deflated')
    before = path.read_bytes()
    with pytest.raises(gpuserial.DeviceError, match=r"state\.\w+'?, key 'layer/w': torch "
                                                    r"tensors on meta"):
        gpuserial.save(path, {'layer': {'w': torch.empty(3, device='meta')}})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


SPREAD_JAX_SCRIPT = r"""
import sys
import types
import jax, jax.numpy as jnp, ml_dtypes, numpy
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import gpuserial
from gpuserial.engine import devices

assert len(jax.devices()) == 4, jax.devices()
mesh = Mesh(numpy.array(jax.devices()).reshape(2, 2), ('a', 'b'))
def spread(values, spec):
    return jax.device_put(values, NamedSharding(mesh, spec))
rng = numpy.random.default_rng(0)
values = {'blocks': rng.standard_normal((6, 8)).astype(numpy.float32),
          'rows': rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16),
          'everywhere': numpy.arange(6, dtype=numpy.int32)}
arrays = {'blocks': spread(values['blocks'], P('a', 'b')),
          'rows': spread(values['rows'], P('a')),
          'everywhere': spread(values['everywhere'], P())}
# a replicated array is written from one replica, without a copy
one = numpy.asarray(arrays['everywhere'].addressable_shards[0].data)
assert numpy.shares_memory(devices.engine_array(arrays['everywhere']), one)
for name in ('a.npz', 'a.h5'):
    path = sys.argv[1] + '/' + name
    gpuserial.save(path, arrays)
    if name.endswith('.npz'):  # numpy reads it: the values as they are, bfloat16 as its bits
        with numpy.load(path) as stored:
            assert stored['blocks'].tobytes() == values['blocks'].tobytes()
            assert stored['rows'].tobytes() == values['rows'].tobytes()
            assert stored['everywhere'].tolist() == values['everywhere'].tolist()
    # loaded into arrays spread otherwise: new arrays with the targets' shardings
    targets = {'blocks': spread(numpy.zeros((6, 8), numpy.float32), P(None, 'b')),
               'rows': spread(numpy.zeros((4, 6), ml_dtypes.bfloat16), P('b', 'a')),
               'everywhere': spread(numpy.zeros(6, numpy.int32), P('a'))}
    before = {key: value.sharding for key, value in targets.items()}
    gpuserial.load_into(path, targets)
    for key, value in targets.items():
        assert value.sharding == before[key], (key, value.sharding)
        assert value.dtype == values[key].dtype, key
        assert numpy.asarray(value).tobytes() == values[key].tobytes(), key
    # as new arrays: on one device
    loaded = gpuserial.load(path, like='jax')
    assert all(len(value.devices()) == 1 for value in loaded.values())
    assert numpy.asarray(loaded['blocks']).tobytes() == values['blocks'].tobytes()
print('ok')
"""


@pytest.mark.jax
def test_jax_arrays_spread_over_devices_save_and_load_with_their_shardings(tmp_path):
    _jax()
    pytest.importorskip('ml_dtypes')
    # several CPU devices need the setting before JAX starts: in a process of its own
    env = dict(os.environ, JAX_NUM_CPU_DEVICES='4', JAX_PLATFORMS='cpu')
    done = subprocess.run([sys.executable, '-c', SPREAD_JAX_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stderr[-3000:]


EXTENSIONS = list(devices.EXTENSION_DTYPES)  # ml_dtypes' types: kind 'V', float8_e5m2 'f'


@pytest.mark.parametrize('name', EXTENSIONS)
def test_ml_dtypes_numpy_arrays_round_trip_and_load_in_place(tmp_path, kind, name):
    ml_dtypes = pytest.importorskip('ml_dtypes')
    array = numpy.array([0.5, -1.25, 7.0], getattr(ml_dtypes, name))
    path = path_for(tmp_path, kind)
    save(path, kind, {'x': array})
    if kind != 'hdf5':
        with numpy.load(path) as raw:
            assert raw['x'].dtype == devices.encoded_dtype(name)
    loaded = gpuserial.load(path)['x']
    assert loaded.dtype == array.dtype and bits(loaded) == bits(array)
    target = numpy.zeros(3, getattr(ml_dtypes, name))
    serializers.load_npz(path, {'x': target}) if kind != 'hdf5' else serializers.load_hdf5(
        path, {'x': target})
    assert bits(target) == bits(array)


@pytest.mark.parametrize('name', EXTENSIONS)
@pytest.mark.parametrize('shape', [(3,), (300, 200)])  # packed with its neighbours; streamed
def test_bfloat16_device_arrays_save_and_load_as_themselves(tmp_path, kind, shape, name):
    """Device arrays of ml_dtypes' bfloat16 (CuPy from 14 on, here the stand-in) and float8 are
    stored in its encoding, not as anonymous bytes, and load in place or as new device
    arrays."""
    ml_dtypes = pytest.importorskip('ml_dtypes')
    from tests import standin
    on_0, on_1 = standin.StandInDevice(0), standin.StandInDevice(1)
    rng = numpy.random.default_rng(3)
    dtype = numpy.dtype(getattr(ml_dtypes, name))
    values = {key: rng.standard_normal(shape).astype(dtype) for key in 'ab'}
    path = path_for(tmp_path, kind)
    save(path, kind, {key: on_0.send(value) for key, value in values.items()})
    if kind != 'hdf5':
        with numpy.load(path) as raw:
            assert raw['a'].dtype == devices.encoded_dtype(name)
    loaded = gpuserial.load(path)
    for key, value in values.items():
        assert loaded[key].dtype == value.dtype and bits(loaded[key]) == bits(value)

    target = {key: on_0.send(numpy.zeros(shape, dtype)) for key in 'ab'}
    held = dict(target)
    assert gpuserial.load_into(path, target) == gpuserial.LoadReport([], [])
    for key, value in values.items():
        assert target[key] is held[key] and target[key].dtype == value.dtype
        assert bits(target[key]) == bits(value)

    gpuserial.load_into(path, target, device=on_1)  # new arrays there
    loaded = gpuserial.load(path, device=on_1)
    with gpuserial.open(path, device=on_1) as f:
        rows = f.get_slice('a')[1:3]
    for arrays in (target, loaded):
        for key, value in values.items():
            assert devices.device_of(arrays[key]) == on_1 and arrays[key].dtype == value.dtype
            assert bits(arrays[key]) == bits(value)
    assert devices.device_of(rows) == on_1 and bits(rows) == bits(values['a'][1:3])


@pytest.mark.parametrize('is_async', [False, True], ids=['save', 'save_async'])
def test_bfloat16_device_arrays_of_any_layout_save_by_their_bits(tmp_path, kind, is_async):
    """Non-contiguous arrays and asynchronous saves copy such arrays on the device first: as
    integers, since no device kernel takes the structured encoding (the stand-in refuses it)."""
    ml_dtypes = pytest.importorskip('ml_dtypes')
    from tests import standin
    on_0 = standin.StandInDevice(0)
    value = numpy.linspace(-3, 3, 600, dtype=numpy.float32).astype(ml_dtypes.bfloat16)
    value = value.reshape(20, 30)
    arrays = {'rows': on_0.send(value), 'columns': on_0.send(value).T}
    path = path_for(tmp_path, kind)
    with transfer.configure(chunk_bytes=256, buffers=2):  # several chunks each
        if is_async:
            gpuserial.save_async(path, arrays, 'hdf5' if kind == 'hdf5' else 'npz',
                                 compression=kind == 'npz-deflated').result()
        else:
            save(path, kind, arrays)
        target = {'rows': on_0.send(numpy.zeros_like(value)),
                  'columns': on_0.send(numpy.zeros_like(value)).T}
        gpuserial.load_into(path, target)
    loaded = gpuserial.load(path)
    for key, expected in (('rows', value), ('columns', value.T)):
        assert loaded[key].dtype == value.dtype and bits(loaded[key]) == bits(expected)
        assert bits(target[key]) == bits(expected)


def test_bfloat16_device_arrays_of_any_layout_reach_the_host(tmp_path):
    """serialize() and a save staged on the host copy device arrays to the host, a
    non-contiguous one through a kernel (CuPy's get()): as integers, like the engine."""
    ml_dtypes = pytest.importorskip('ml_dtypes')
    from tests import standin
    on_0 = standin.StandInDevice(0)
    value = numpy.linspace(-3, 3, 600, dtype=numpy.float32).astype(ml_dtypes.bfloat16)
    value = value.reshape(20, 30)
    arrays = {'rows': on_0.send(value), 'columns': on_0.send(value).T}
    flat = gpuserial.serialize(arrays)
    gpuserial.save_async(tmp_path / 'host.npz', arrays, staging='host').result()
    loaded = gpuserial.load(tmp_path / 'host.npz')
    for key, expected in (('rows', value), ('columns', value.T)):
        assert type(flat[key]) is numpy.ndarray and bits(flat[key]) == bits(expected)
        assert loaded[key].dtype == value.dtype and bits(loaded[key]) == bits(expected)


@pytest.mark.parametrize('where', ['cpu', 'standin'])
def test_an_extension_dtype_loads_only_into_itself(tmp_path, kind, where):
    """NumPy casts one structured encoding into another field by field, and into numbers not at
    all: bfloat16 bits into a float8 target would be truncated integers."""
    ml_dtypes = pytest.importorskip('ml_dtypes')
    from tests import standin
    path = path_for(tmp_path, kind)
    save(path, kind, {'x': numpy.ones(3, ml_dtypes.bfloat16)})
    for dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, numpy.float32, numpy.uint16):
        target = numpy.zeros(3, dtype)
        if where == 'standin':
            target = standin.StandInDevice(0).send(target)
        with pytest.raises(MismatchError, match="'x': stored dtype .*bfloat16.* does not cast"):
            gpuserial.load_into(path, {'x': target})
        assert not host(devices.engine_array(target)).view(numpy.uint8).any()


def test_targets_of_other_non_builtin_dtypes_move_as_plain_arrays(tmp_path, kind):
    """Big-endian and string targets are not extension dtypes: moved like any array."""
    from tests import standin
    on_0 = standin.StandInDevice(0)
    path = path_for(tmp_path, kind)
    save(path, kind, {'x': numpy.arange(3, dtype='>i4')})
    target = {'x': numpy.zeros(3, '>i4')}
    gpuserial.load_into(path, target, device=on_0)
    assert devices.device_of(target['x']) == on_0 and host(target['x']).tolist() == [0, 1, 2]


def test_new_arrays_of_an_extension_dtype_are_of_that_type(tmp_path, kind, monkeypatch):
    """A None in the target, or an uninitialized parameter: a new array of that type, on the
    load's device where it holds the type (else an error), converted by value into a
    parameter's dtype."""
    ml_dtypes = pytest.importorskip('ml_dtypes')
    from tests import standin
    on_0 = standin.StandInDevice(0)
    value = numpy.array([0.5, -1.25, 7.0], ml_dtypes.bfloat16)
    path = path_for(tmp_path, kind)
    save(path, kind, {'x': value, 'W': value})
    for device in (None, on_0):
        target: dict = {'x': None}
        gpuserial.load_into(path, target, device=device, strict=False)
        assert devices.device_of(target['x']) == (device or devices.CPU)
        assert target['x'].dtype == value.dtype and bits(target['x']) == bits(value)
    link = gpuserial.Link()
    with link.init_scope():
        link.W = gpuserial.Parameter()  # float32, shaped by the load
    gpuserial.load_into(path, link, strict=False)
    assert link.W.array.dtype == numpy.float32
    assert link.W.array.tolist() == [0.5, -1.25, 7.0]  # values, not their bits
    monkeypatch.setitem(sys.modules, 'ml_dtypes', None)  # not installed: bits, not values
    link.W.array = None
    with pytest.raises(MismatchError, match=re.escape(f"{str(path)!r}, key 'W': parameter 'W': "
                                                      f"stored values of dtype") + '.*bfloat16'):
        gpuserial.load_into(path, link, strict=False)
    monkeypatch.setattr(standin.BACKEND, 'extension_dtypes', False)  # as CuPy before 14
    with pytest.raises(DeviceError, match="'x': bfloat16 has no dtype on @standin:0"):
        gpuserial.load_into(path, {'x': None}, device=on_0, strict=False)


def test_bfloat16_targets_moved_to_another_device_keep_their_type(tmp_path, kind,
                                                                   monkeypatch):
    ml_dtypes = pytest.importorskip('ml_dtypes')
    from tests import standin
    on_0 = standin.StandInDevice(0)
    value = numpy.array([0.5, -1.25, 7.0], ml_dtypes.bfloat16)
    path = path_for(tmp_path, kind)
    save(path, kind, {'x': value})
    onto_cpu = {'x': on_0.send(numpy.zeros(3, ml_dtypes.bfloat16))}
    gpuserial.load_into(path, onto_cpu, device='cpu')
    assert type(onto_cpu['x']) is numpy.ndarray and onto_cpu['x'].dtype == value.dtype
    assert bits(onto_cpu['x']) == bits(value)

    onto_device = {'x': numpy.zeros(3, ml_dtypes.bfloat16)}
    gpuserial.load_into(path, onto_device, device=on_0)
    assert devices.device_of(onto_device['x']) == on_0 and onto_device['x'].dtype == value.dtype
    assert bits(onto_device['x']) == bits(value)
    with pytest.raises(MismatchError, match="'x': stored shape \\(3,\\) does not match"):
        gpuserial.load_into(path, {'x': numpy.zeros(4, ml_dtypes.bfloat16)}, device=on_0)

    monkeypatch.setattr(standin.BACKEND, 'extension_dtypes', False)  # as CuPy before 14
    kept = numpy.zeros(3, ml_dtypes.bfloat16)
    target = {'x': kept}
    with pytest.raises(DeviceError, match="'x': bfloat16 has no dtype on @standin:0; load it "
                                          "on the CPU"):
        gpuserial.load_into(path, target, device=on_0)
    assert target['x'] is kept and not kept.any()


class _Bf16OnDevice:
    """A bfloat16 tensor on a stand-in GPU, as torch holds one on CUDA: the engine sees its bits
    as integers of its size (CuPy has no bfloat16)."""

    def __init__(self, bits):
        self.bits = bits
        self.shape = bits.shape


class _Bf16Framework(devices.Framework):
    name = 'stand-in bfloat16'
    mutable = True

    def owns(self, value):
        return isinstance(value, _Bf16OnDevice)

    def engine_array(self, value, writable=False):
        return value.bits

    def extension(self, value):
        return 'bfloat16'

    def device_of(self, value):
        return devices.device_of(value.bits)

    def from_engine(self, array, device):  # a host array of the encoding, read by the load
        return _Bf16OnDevice(device.send(array.view('<u2')))


@pytest.mark.parametrize('shape', [(3,), (300, 200)])  # packed with its neighbours; streamed
def test_bfloat16_loads_in_place_into_a_gpu_view_of_its_bits(tmp_path, kind, monkeypatch,
                                                              shape):
    ml_dtypes = pytest.importorskip('ml_dtypes')
    from tests import standin
    monkeypatch.setitem(devices.FRAMEWORKS, 'stand-in bfloat16', _Bf16Framework())
    rng = numpy.random.default_rng(7)
    values = {key: rng.standard_normal(shape).astype(ml_dtypes.bfloat16) for key in 'ab'}
    path = path_for(tmp_path, kind)
    save(path, kind, values)
    on_0 = standin.StandInDevice(0)
    target = {key: _Bf16OnDevice(on_0.send(numpy.zeros(shape, numpy.uint16))) for key in 'ab'}
    held = {key: value.bits for key, value in target.items()}
    report = gpuserial.load_into(path, target)
    assert (report.missing_keys, report.unexpected_keys) == ([], [])
    for key, value in values.items():
        assert target[key].bits is held[key]  # in place
        assert target[key].bits.get().tobytes() == value.tobytes()

    moved = {key: _Bf16OnDevice(on_0.send(numpy.zeros(shape, numpy.uint16))) for key in 'ab'}
    on_1 = standin.StandInDevice(1)
    gpuserial.load_into(path, moved, device=on_1)
    for key, value in values.items():  # new arrays there, the same bits
        assert devices.device_of(moved[key].bits) == on_1
        assert moved[key].bits.get().tobytes() == value.tobytes()

    plain = {key: on_0.send(numpy.zeros(shape, numpy.int16)) for key in 'ab'}
    with pytest.raises(MismatchError, match="'a'.*does not cast to the target dtype int16"):
        gpuserial.load_into(path, plain)  # integers of no framework are not bfloat16


# ---------------------------------------------------------------------------------------------
# Load reports


class Owner:
    def __init__(self):
        self.w = numpy.zeros(3)
        self.extra = numpy.zeros(1)

    def serialize(self, serializer):
        self.w = serializer('w', self.w)
        self.extra = serializer('extra', self.extra)


def test_load_into_reports_missing_and_unexpected_keys(tmp_path, kind, caplog):
    path = path_for(tmp_path, kind)
    save(path, kind, {'model': {'w': numpy.ones(3), 'v': numpy.ones(1)}, 'iteration': 4})
    with caplog.at_level(logging.INFO, logger='gpuserial'):
        report = gpuserial.load_into(path, Owner(), path='model/', strict=False)
    assert report.missing_keys == ['model/extra']
    assert report.unexpected_keys == ['model/v']  # 'iteration' is outside the path
    assert "1 missing keys ['model/extra'], 1 unexpected keys ['model/v']" in caplog.text


@pytest.mark.parametrize(('stored', 'logged'), [
    ({'w', 'extra'}, None),
    ({'w'}, "1 missing keys ['extra'], 0 unexpected keys []"),
    ({'w', 'extra', 'v'}, "0 missing keys [], 1 unexpected keys ['v']"),
], ids=['neither', 'missing', 'unexpected'])
def test_load_into_logs_a_report_that_is_not_empty(tmp_path, kind, caplog, stored, logged):
    path = path_for(tmp_path, kind)
    save(path, kind, {key: numpy.ones(1 if key == 'extra' else 3) for key in sorted(stored)})
    with caplog.at_level(logging.INFO, logger='gpuserial'):
        gpuserial.load_into(path, Owner(), strict=False)
    messages = [r.getMessage() for r in caplog.records if r.name == 'gpuserial']
    assert messages == ([] if logged is None else [f'loaded {str(path)!r}: {logged}'])


def test_load_into_logs_the_first_eight_keys_of_each_kind(tmp_path, caplog):
    gpuserial.save(tmp_path / 'a.npz', {f'u{i}': numpy.ones(1) for i in range(10)})
    with caplog.at_level(logging.INFO, logger='gpuserial'):
        report = gpuserial.load_into(tmp_path / 'a.npz',
                                     {f'm{i}': numpy.ones(1) for i in range(10)}, strict=False)
    assert len(report.missing_keys) == len(report.unexpected_keys) == 10
    first = [f'{i}' for i in range(8)]
    assert caplog.messages == [
        f"loaded {str(tmp_path / 'a.npz')!r}: 10 missing keys {['m' + i for i in first]}, "
        f"10 unexpected keys {['u' + i for i in first]}"]


def test_load_into_counts_ignored_names_as_asked_for(tmp_path):
    gpuserial.save(tmp_path / 'a.npz', {'w': numpy.ones(3), 'extra': numpy.ones(1),
                                        'v': numpy.ones(2)})
    report = gpuserial.load_into(tmp_path / 'a.npz', Owner(), ignore_names='extra')
    assert report == gpuserial.LoadReport([], ['v'])


def test_load_into_is_strict_by_default(tmp_path):
    gpuserial.save(tmp_path / 'a.npz', {'w': numpy.ones(3)})
    with pytest.raises(KeyNotFoundError, match="'extra': not in the file"):
        gpuserial.load_into(tmp_path / 'a.npz', Owner())


def test_the_chainer_calls_keep_returning_none(tmp_path):
    gpuserial.save(tmp_path / 'a.npz', {'w': numpy.ones(3), 'extra': numpy.ones(1)})
    assert serializers.load_npz(tmp_path / 'a.npz', Owner()) is None


# ---------------------------------------------------------------------------------------------
# Lazy access


def test_in_answers_as_keys_lists_without_reading_the_entry(tmp_path, kind):
    """``key in f`` is ``key in f.keys()``: a group or a path prefix is not in the file (HDF5
    said 'is an HDF5 group' before), and a damaged entry is in it (its header is read, and
    fails, only when the entry is read)."""
    path = path_for(tmp_path, kind)
    save(path, kind, {'l1/W': numpy.arange(4.0), 'l1/b': numpy.zeros(2), 'top': numpy.ones(3)})
    data = bytearray(path.read_bytes())
    if kind != 'hdf5':  # the member's npy magic: its header no longer reads
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo('l1/b.npy')
        data[info.header_offset + 30 + len(info.filename) + len(info.extra)] ^= 0xFF
        path.write_bytes(bytes(data))
    with gpuserial.open(path) as f:
        assert all(key in f for key in f.keys())
        assert ['l1' in f, 'l1/' in f, '/l1/W' in f, 'l1/W/x' in f, 'W' in f, 7 in f] == [
            False] * 6
        if kind != 'hdf5':
            assert 'l1/b' in f
            with pytest.raises(CorruptFileError, match=r"'l1/b'"):
                f.get('l1/b')


def test_open_lists_and_describes_without_reading_data(tmp_path, kind):
    path = path_for(tmp_path, kind)
    save(path, kind, STATE)
    with gpuserial.open(path) as f:
        assert len(f) == 11 and 'f32' in f and 'nope' not in f and 3 not in f
        assert set(f) == set(f.keys())
        meta = f.metadata('f32')
        assert (meta.shape, meta.dtype, meta.dtype_name, meta.nbytes) == (
            (3, 4), numpy.dtype(numpy.float32), 'float32', 48)
        assert meta.compressed == (kind == 'npz-deflated')
        assert f.metadata('none').shape is None and f.metadata('none').dtype is None
        with pytest.raises(KeyNotFoundError, match="'nope': not in the file"):
            f.metadata('nope')
        numpy.testing.assert_array_equal(f.get('f32'), STATE['f32'])
        assert f.get('none') is None
        numpy.testing.assert_array_equal(f['f32'], STATE['f32'])  # a mapping, as numpy.load's
        assert dict(f).keys() == set(f.keys())
        with pytest.raises(KeyNotFoundError, match="'nope': not in the file"):
            f['nope']
        assert 'entries>' in repr(f)


@pytest.mark.skipif(not hasattr(getattr(numpy, 'dtypes', None), 'StringDType'),
                    reason="NumPy 2's dtype")
def test_numpy_string_dtype_text_saves_as_str(tmp_path, kind):
    """NumPy 2's variable-width StringDType was refused as an object array, though strings can
    be saved: it is stored as fixed-width str (what a load gives back), in every format."""
    text = numpy.dtypes.StringDType()
    state = {'names': numpy.array(['a', 'bbé', ''], dtype=text),
             'one': numpy.array('xyz', dtype=text), 'none': numpy.array([], dtype=text)}
    path = path_for(tmp_path, kind)
    save(path, kind, state)
    loaded = gpuserial.load(path)
    for key, value in state.items():
        assert loaded[key].dtype.kind == 'U' and loaded[key].shape == value.shape
        assert loaded[key].tolist() == value.tolist()
    missing = numpy.array(['a', None], dtype=numpy.dtypes.StringDType(na_object=None))
    with pytest.raises(TypeError, match=re.escape(f"{str(path)!r}, key 'g/s': a StringDType "
                                                  f"array with missing values cannot be saved")):
        save(path, kind, {'g': {'s': missing}})
    assert gpuserial.load(path).keys() == state.keys()  # the file as it was


def test_metadata_names_dtypes_as_inspect_does(tmp_path, kind):
    """Text is 'str' in every format (HDF5 stores it as an object dtype, and 'object' is what
    metadata said), as `get` gives it and `gpuserial inspect` shows it."""
    path = path_for(tmp_path, kind)
    save(path, kind, {'names': numpy.array(['ab', 'c']), 'w': numpy.arange(3, dtype='>i4'),
                      'b': numpy.zeros(2, numpy.bool_)})
    with gpuserial.open(path) as f:
        assert [f.metadata(key).dtype_name for key in ('names', 'w', 'b')] == [
            'str', 'int32', 'bool']
        assert f.get('names').dtype.kind == 'U'


def test_metadata_is_an_immutable_value(tmp_path):
    gpuserial.save(tmp_path / 'a.npz', {'x': numpy.ones(3)})
    with gpuserial.open(tmp_path / 'a.npz') as f:
        meta, again = f.metadata('x'), f.metadata('x')
    assert meta == again and len({meta, again}) == 1  # hashable: a set, a dict's key
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.shape = (4,)  # type: ignore[misc]


def test_get_draws_no_progress_bar(tmp_path, capsys):
    gpuserial.save(tmp_path / 'a.npz', {'x': numpy.ones(3)})
    with gpuserial.open(tmp_path / 'a.npz') as f:
        assert f.get('x').tolist() == [1, 1, 1]
    assert capsys.readouterr().err == ''


def test_open_on_a_device_and_as_torch(tmp_path, device):
    gpuserial.save(tmp_path / 'a.npz', {'x': numpy.arange(6.0).reshape(2, 3)})
    with gpuserial.open(tmp_path / 'a.npz', device=device) as f:
        assert devices.device_of(f.get('x')) == device
        assert devices.device_of(f.get_slice('x')[1]) == device
        numpy.testing.assert_array_equal(host(f.get_slice('x')[1]), [3.0, 4.0, 5.0])
        assert devices.device_of(f.get('x', device='cpu')) == devices.CPU


def test_get_keeps_the_files_device_or_library_where_it_names_only_the_other(tmp_path):
    """open(..., like='torch').get(key, device='cpu') gave a NumPy array, and
    open(..., device=d).get(key, like='cupy') CuPy's default GPU, not d."""
    torch = _torch()
    from tests.standin import StandInDevice
    gpuserial.save(tmp_path / 'a.npz', {'x': numpy.arange(3.0)})
    with gpuserial.open(tmp_path / 'a.npz', like='torch') as f:
        tensor = f.get('x', device='cpu')
        assert isinstance(tensor, torch.Tensor) and tensor.tolist() == [0, 1, 2]
    on_0 = StandInDevice(0)
    with gpuserial.open(tmp_path / 'a.npz', device=on_0) as f:
        assert devices.device_of(f.get('x', like='cupy')) == on_0
        with pytest.raises(ValueError, match="like='numpy' cannot hold arrays on @standin:0"):
            f.get('x', like='numpy')
        assert type(f.get('x', device='cpu', like='numpy')) is numpy.ndarray


def test_get_checks_the_crc_and_slices_read_around_it(tmp_path):
    data = numpy.arange(1000, dtype=numpy.float32)
    gpuserial.save(tmp_path / 'a.npz', {'x': data})
    raw = bytearray((tmp_path / 'a.npz').read_bytes())
    at = raw.index(data[900:904].tobytes())
    raw[at] ^= 0xFF
    (tmp_path / 'a.npz').write_bytes(raw)
    with gpuserial.open(tmp_path / 'a.npz') as f:
        with pytest.raises(CorruptFileError, match="'x'.*CRC mismatch"):
            f.get('x')
        numpy.testing.assert_array_equal(f.get_slice('x')[:10], data[:10])


class CountingFile(io.FileIO):
    """A file that counts the bytes read from it."""

    count = 0

    def readinto(self, buffer):
        done = super().readinto(buffer)
        self.count += done or 0
        return done

    def read(self, size=-1):
        data = super().read(size)
        self.count += len(data)
        return data


@pytest.mark.parametrize(('index', 'needed'), [
    ((slice(10, 20),), 10 * 1000 * 4),
    ((5,), 1000 * 4),
    ((slice(None), slice(5, 7)), 1000 * 2 * 4),
    ((slice(0, 100, 10), slice(0, 10)), 10 * 10 * 4),
    ((Ellipsis, 999), 1000 * 4),
])
def test_slices_of_stored_members_read_only_their_bytes(tmp_path, index, needed):
    data = numpy.arange(1000 * 1000, dtype=numpy.float32).reshape(1000, 1000)
    gpuserial.save(tmp_path / 'a.npz', {'x': data})
    with CountingFile(tmp_path / 'a.npz') as fp, gpuserial.open(fp) as f:
        sliced = f.get_slice('x')
        before = fp.count
        numpy.testing.assert_array_equal(sliced[index], data[index])
        assert fp.count - before == needed


def test_slices_read_neighbouring_small_runs_together(tmp_path):
    data = numpy.arange(100_000, dtype=numpy.float32)
    gpuserial.save(tmp_path / 'a.npz', {'x': data})
    with CountingFile(tmp_path / 'a.npz') as fp, gpuserial.open(fp) as f:
        sliced = f.get_slice('x')
        before = fp.count
        numpy.testing.assert_array_equal(sliced[::2], data[::2])
        assert fp.count - before <= 2 * data[::2].nbytes


def test_open_does_not_read_a_large_file(tmp_path):
    data = numpy.zeros((64, 1 << 16), numpy.float32)  # 16 MiB
    gpuserial.save(tmp_path / 'a.npz', {'x': data, 'y': numpy.ones(3)})
    with CountingFile(tmp_path / 'a.npz') as fp, gpuserial.open(fp) as f:
        assert f.metadata('x').nbytes == data.nbytes and f.get('y').tolist() == [1, 1, 1]
        assert fp.count < 2 << 20


def _open_files_of(path) -> int:
    """How many of this process's file descriptors are open on ``path``."""
    links = (os.path.join('/proc/self/fd', fd) for fd in os.listdir('/proc/self/fd'))
    return sum(1 for link in links if _readlink(link) == str(path))


def _readlink(link: str) -> str | None:
    try:
        return os.readlink(link)
    except OSError:  # gone meanwhile (the listing's own descriptor)
        return None


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='needs /proc')
@pytest.mark.parametrize('suffix', ['.npz', '.h5'])
def test_open_closes_the_file_when_listing_its_keys_fails(tmp_path, monkeypatch, suffix):
    from gpuserial.formats import hdf5, npz
    path = tmp_path / f'a{suffix}'
    gpuserial.save(path, {'x': numpy.zeros(3)})
    reader = npz._ZipReader if suffix == '.npz' else hdf5._GroupReader

    def failing_keys(self):
        raise OSError(5, 'Input/output error')

    monkeypatch.setattr(reader, 'keys', failing_keys)
    with pytest.raises(OSError, match='Input/output error') as raised:
        gpuserial.open(path)
    assert raised.value.__traceback__ is not None  # held, as a caller that keeps the error
    assert _open_files_of(path) == 0


def test_slices_of_hdf5_datasets_read_only_their_part(tmp_path, monkeypatch):
    data = numpy.arange(200 * 50, dtype=numpy.int32).reshape(200, 50)
    gpuserial.save(tmp_path / 'a.h5', {'x': data})
    with gpuserial.open(tmp_path / 'a.h5') as f:
        numpy.testing.assert_array_equal(f.get_slice('x')[3:9, ::7], data[3:9, ::7])
        numpy.testing.assert_array_equal(f.get_slice('x')[-1], data[-1])


@pytest.mark.parametrize(('key', 'index'), [
    ('words', ()), ('words', (slice(0, 1),)), ('words', (1,)), ('word', ()), ('word', Ellipsis),
])
def test_slices_of_text_give_str_as_get_does(tmp_path, kind, key, index):
    """HDF5 text sliced came back as an object array of bytes, and a scalar string's slice
    raised AttributeError ('bytes' object has no attribute 'nbytes')."""
    path = path_for(tmp_path, kind)
    save(path, kind, {'words': numpy.array(['ab', 'ç']), 'word': 'héllo'})
    _assert_text_slices_as_get(path, key, index)


def _whole_and_sliced(path, key: str, index):
    """The entry read whole, and its slice ``[index]`` read as a slice."""
    with gpuserial.open(path) as f:
        return f.get(key), f.get_slice(key)[index]


def _assert_text_slices_as_get(path, key: str, index) -> None:
    whole, part = _whole_and_sliced(path, key, index)
    assert whole.dtype.kind == 'U'
    assert isinstance(part, (numpy.ndarray, numpy.str_)) and part.dtype.kind == 'U'
    numpy.testing.assert_array_equal(part, whole[index])


@pytest.mark.parametrize(('key', 'index'), [
    ('raw', ()), ('raw', (slice(1, 2),)), ('raw', (0,)), ('one', ()), ('one', Ellipsis),
])
def test_slices_of_bytes_give_bytes_as_get_does(tmp_path, kind, key, index):
    """Bytes (numpy.bytes_, fixed-length ASCII in HDF5) stay bytes when sliced, as get gives
    them; a scalar's slice in HDF5 raised TypeError ('byte indices must be integers or slices,
    not tuple')."""
    path = path_for(tmp_path, kind)
    save(path, kind, {'raw': numpy.array([b'ab', b'c']), 'one': numpy.bytes_(b'xy')})
    whole, part = _whole_and_sliced(path, key, index)
    assert whole.dtype == numpy.dtype('S2')
    assert isinstance(part, (numpy.ndarray, numpy.bytes_)) and part.dtype == numpy.dtype('S2')
    numpy.testing.assert_array_equal(part, whole[index])


@pytest.mark.parametrize(('key', 'index'), [
    ('names', ()), ('names', (slice(1, 2),)), ('names', (0,)), ('name', Ellipsis),
])
def test_slices_of_variable_length_ascii_text_give_str_as_get_does(tmp_path, key, index):
    """Variable-length ASCII strings (h5py.string_dtype('ascii'), as other HDF5 writers store
    text) are text, not bytes: sliced, they read as str, as get gives them."""
    import h5py
    path = tmp_path / 'ascii.h5'
    with h5py.File(path, 'w') as f:
        f.create_dataset('names', data=['ab', 'c'], dtype=h5py.string_dtype('ascii'))
        f.create_dataset('name', data='xy', dtype=h5py.string_dtype('ascii'))
    _assert_text_slices_as_get(path, key, index)


@pytest.mark.parametrize(('index', 'message'), [
    ((slice(None, None, -1),), 'slices take steps of 1 or more, not -1'),
    ((0, 0, 0), r'too many indices \(3\) for shape \(3, 4\)'),
    ((0, Ellipsis, 0, 0), r'too many indices \(3\) for shape \(3, 4\)'),
    ((7,), 'index 7 is out of bounds for a dimension of size 3'),
    ((0, -5), 'index -5 is out of bounds for a dimension of size 4'),
    (([0, 1],), 'get_slice takes integers, slices and an Ellipsis, not list'),
    ((None,), 'get_slice takes integers, slices and an Ellipsis, not NoneType'),
    ((True,), 'get_slice takes integers, slices and an Ellipsis, not bool'),
    ((Ellipsis, Ellipsis), 'an index can only have a single ellipsis'),
    ((Ellipsis, 0, Ellipsis), 'an index can only have a single ellipsis'),
    # a bool mask (an array: 'Ellipsis in items' compared it elementwise, NumPy's bare
    # "truth value of an array ... is ambiguous"), a step of 0 and a float bound (slice's own
    # ValueError and TypeError, naming no file or key)
    ((numpy.array([True, False, True]),), 'get_slice takes integers, slices and an Ellipsis, '
                                          'not ndarray'),
    ((0, numpy.array([0, 1])), 'get_slice takes integers, slices and an Ellipsis, not ndarray'),
    ((numpy.array(True),), 'get_slice takes integers, slices and an Ellipsis, not ndarray'),
    ((numpy.array(7),), 'index 7 is out of bounds for a dimension of size 3'),
    ((slice(0, 3, 0),), r'slice\(0, 3, 0\): slice step cannot be zero'),
    ((slice(0.5, 2),), r'slice\(0.5, 2, None\): slice indices must be integers .*'),
])
def test_bad_slices_name_the_file_and_key(tmp_path, index, message):
    gpuserial.save(tmp_path / 'a.npz', {'x': numpy.zeros((3, 4))})
    where = re.escape(f"{str(tmp_path / 'a.npz')!r}, key 'x': ")
    with gpuserial.open(tmp_path / 'a.npz') as f, pytest.raises((IndexError, ValueError,
                                                                  TypeError),
                                                                 match=f'^{where}{message}$'):
        f.get_slice('x')[index]


@pytest.mark.parametrize('index', [
    Ellipsis, (Ellipsis,), (1, Ellipsis), (Ellipsis, 2), (0, Ellipsis, 1),
    (slice(1, 3), Ellipsis, slice(None, None, 2)), (1, 0, 2, Ellipsis), (Ellipsis, 1, 0, 2),
])
def test_slices_with_an_ellipsis_match_numpy_indexing(tmp_path, kind, index):
    data = numpy.arange(2 * 3 * 4, dtype=numpy.int32).reshape(2, 3, 4)
    path = path_for(tmp_path, kind)
    save(path, kind, {'x': data})
    with gpuserial.open(path) as f:
        numpy.testing.assert_array_equal(f.get_slice('x')[index], data[index])


def test_integers_of_any_kind_index_slices_as_numpy_takes_them(tmp_path, kind):
    """NumPy integers, 0-d integer arrays and torch's 0-d integer tensors (whatever has
    ``__index__``), as NumPy indexing takes them."""
    torch = pytest.importorskip('torch')
    data = numpy.arange(2 * 3 * 4, dtype=numpy.int32).reshape(2, 3, 4)
    path = path_for(tmp_path, kind)
    save(path, kind, {'x': data})
    with gpuserial.open(path) as f:
        for index in [numpy.int64(1), (numpy.array(1), slice(None), numpy.uint8(3)),
                      (torch.tensor(-1), torch.tensor(2))]:
            numpy.testing.assert_array_equal(f.get_slice('x')[index], data[index])


def test_a_stored_none_cannot_be_sliced(tmp_path):
    gpuserial.save(tmp_path / 'a.npz', {'n': None})
    with gpuserial.open(tmp_path / 'a.npz') as f, pytest.raises(TypeError, match='None'):
        f.get_slice('n')


def _selections(shape):
    def one(size):
        return st.one_of(
            st.integers(-size, size - 1) if size else st.nothing(),
            st.builds(slice, st.none() | st.integers(-size - 2, size + 2),
                      st.none() | st.integers(-size - 2, size + 2),
                      st.none() | st.integers(1, 4)))
    return st.tuples(*[one(size) for size in shape])


@st.composite
def arrays_and_selections(draw):
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=4)))
    return shape, draw(_selections(shape)), draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(case=arrays_and_selections(), where=st.sampled_from(list(SUFFIXES)))
def test_slices_match_numpy_indexing(tmp_path_factory, case, where):
    shape, index, fortran = case
    data = numpy.arange(int(numpy.prod(shape)), dtype=numpy.int16).reshape(shape)
    if fortran and data.ndim:  # (asfortranarray makes a 0-d array 1-d)
        data = numpy.asfortranarray(data)
    path = path_for(tmp_path_factory.mktemp('slices'), where)
    save(path, where, {'x': data})
    with gpuserial.open(path) as f:
        sliced = f.get_slice('x')
        assert sliced.get_shape() == list(shape)
        numpy.testing.assert_array_equal(sliced[index], data[index])


@pytest.mark.parametrize(('shape', 'box', 'offsets', 'run'), [
    ((4, 5), [(0, 4, 1), (0, 5, 1)], [0], 20),
    ((4, 5), [(1, 3, 1), (0, 5, 1)], [5], 10),
    ((4, 5), [(0, 4, 2), (0, 5, 1)], [0, 10], 5),
    ((4, 5), [(1, 3, 1), (2, 4, 1)], [7, 12], 2),
    ((4, 5), [(0, 1, 1), (0, 5, 3)], [0, 3], 1),
    ((4, 5), [(2, 2, 1), (0, 5, 1)], [], 0),
])
def test_box_reads(shape, box, offsets, run):
    got_offsets, got_run = box_reads(shape, box)
    assert got_offsets.tolist() == offsets and got_run == run


# ---------------------------------------------------------------------------------------------
# On a GPU: CuPy arrays and torch CUDA tensors


@pytest.mark.gpu
def test_load_onto_a_gpu_as_cupy_and_torch(tmp_path, kind):
    torch = _torch()
    path = path_for(tmp_path, kind)
    save(path, kind, {'x': numpy.arange(6, dtype=numpy.float32).reshape(2, 3)})
    as_cupy = gpuserial.load(path, device='cuda:0')['x']
    assert devices.device_of(as_cupy) == devices.get_device('cuda:0')
    as_torch = gpuserial.load(path, device=torch.device('cuda', 0))['x']
    assert as_torch.is_cuda and as_torch.cpu().tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.gpu
def test_torch_cuda_tensors_save_and_load_in_place(tmp_path, kind):
    torch = _torch()
    source = {'w': torch.randn(300, 70, device='cuda'), 'h': torch.randn(9, device='cuda').half()}
    path = path_for(tmp_path, kind)
    save(path, kind, source)
    target = {key: torch.zeros_like(value) for key, value in source.items()}
    pointers = {key: value.data_ptr() for key, value in target.items()}
    assert gpuserial.load_into(path, target) == gpuserial.LoadReport([], [])
    for key, value in target.items():
        assert value.data_ptr() == pointers[key] and torch.equal(value, source[key])


@pytest.mark.gpu
def test_bfloat16_cuda_tensors_save_and_load_in_place(tmp_path, kind):
    torch = _torch()
    source = {'small': torch.randn(17, device='cuda').to(torch.bfloat16),  # packed
              'large': torch.randn(300, 200, device='cuda').to(torch.bfloat16),  # streamed
              'columns': torch.randn(200, 30, device='cuda').to(torch.bfloat16).T}
    path = path_for(tmp_path, kind)
    save(path, kind, source)
    later = path_for(tmp_path, kind, 'async')  # copied on the device first
    gpuserial.save_async(later, source, 'hdf5' if kind == 'hdf5' else 'npz').result()
    for key, array in gpuserial.load(later, like='torch').items():
        assert array.dtype == torch.bfloat16 and torch.equal(array.cuda(), source[key])
    for key, tensor in source.items():
        loaded = gpuserial.load(path, device='cuda:0', like='torch')[key]
        assert loaded.is_cuda and loaded.dtype == torch.bfloat16 and torch.equal(loaded, tensor)
    target = {key: torch.zeros_like(value) for key, value in source.items()}
    pointers = {key: value.data_ptr() for key, value in target.items()}
    assert gpuserial.load_into(path, target) == gpuserial.LoadReport([], [])
    for key, value in target.items():
        assert value.data_ptr() == pointers[key] and value.dtype == torch.bfloat16
        assert torch.equal(value, source[key])
    if devices.CUPY.holds_extension('bfloat16', devices.get_device('cuda:0')):  # CuPy 14 on
        for key, array in gpuserial.load(path, device='cuda:0').items():
            assert str(array.dtype) == 'bfloat16' and bits(array) == bits(source[key])
    else:
        with pytest.raises(DeviceError, match='bfloat16 has no dtype on @cupy:0'):
            gpuserial.load(path, device='cuda:0')


@pytest.mark.gpu
@pytest.mark.parametrize('shape', [(17,), (300, 200)])  # packed; streamed
def test_cupy_bfloat16_arrays_save_and_load_in_place(tmp_path, kind, shape):
    ml_dtypes = pytest.importorskip('ml_dtypes')
    gpu = devices.get_device('cuda:0')
    if not devices.CUPY.holds_extension('bfloat16', gpu):
        pytest.skip('CuPy before 14 has no bfloat16 arrays')
    rng = numpy.random.default_rng(5)
    values = {key: rng.standard_normal(shape).astype(ml_dtypes.bfloat16) for key in 'ab'}
    values['columns'] = values['b'].T  # not contiguous: copied on the device as integers
    path = path_for(tmp_path, kind)
    arrays = {'a': gpu.send(values['a']), 'b': gpu.send(values['b'])}
    arrays['columns'] = arrays['b'].T
    save(path, kind, arrays)
    later = path_for(tmp_path, kind, 'async')  # copied on the device first
    gpuserial.save_async(later, arrays, 'hdf5' if kind == 'hdf5' else 'npz').result()
    for key, array in gpuserial.load(later).items():
        assert array.dtype == values[key].dtype and bits(array) == bits(values[key])
    target = {key: gpu.send(numpy.zeros(value.shape, ml_dtypes.bfloat16))
              for key, value in values.items()}
    pointers = {key: value.data.ptr for key, value in target.items()}
    assert gpuserial.load_into(path, target) == gpuserial.LoadReport([], [])
    loaded = gpuserial.load(path, device=gpu)
    for key, value in values.items():
        assert target[key].data.ptr == pointers[key] and target[key].dtype == value.dtype
        assert bits(target[key]) == bits(value) and bits(loaded[key]) == bits(value)
        assert devices.device_of(loaded[key]) == gpu and loaded[key].dtype == value.dtype


def test_a_star_import_keeps_the_builtin_open():
    namespace: dict = {}
    exec('from gpuserial import *', namespace)
    assert 'open' not in namespace and 'load' in namespace and 'LazyFile' in namespace


@pytest.mark.parametrize('name', ['m.npz', 'm.h5'])
def test_a_key_listed_twice_is_read_once(tmp_path, monkeypatch, name):
    from gpuserial import access
    gpuserial.save(tmp_path / name, {'a': numpy.arange(3.0), 'b': numpy.ones(2)})
    made = []
    real = access._Placement.new

    def new(self, reader, entry):
        made.append(entry.key)
        return real(self, reader, entry)

    monkeypatch.setattr(access._Placement, 'new', new)
    loaded = gpuserial.load(tmp_path / name, keys=['b', 'a', 'b'])
    assert list(loaded) == ['b', 'a'] and made == ['b', 'a']
    numpy.testing.assert_array_equal(loaded['b'], numpy.ones(2))


TILDE_CALLS = {
    'save': lambda path: gpuserial.save(path, {'w': numpy.ones(2)}),
    'save_async': lambda path: gpuserial.save_async(path, {'w': numpy.ones(2)}),
    'save_hdf5': lambda path: serializers.save_hdf5(path, {'w': numpy.ones(2)}),
    'load': gpuserial.load,
    'open': gpuserial.open,
    'load_npz': lambda path: serializers.load_npz(path, {}),
    'load_hdf5': lambda path: serializers.load_hdf5(path, {}),
}


@pytest.mark.parametrize('call', list(TILDE_CALLS))
def test_a_missing_path_that_starts_with_a_tilde_says_it_is_not_expanded(tmp_path, monkeypatch,
                                                                        call):
    """As in numpy, torch and h5py, '~' is a name like any other (a directory named '~' is
    where it saves); where nothing is there, the error says so."""
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.chdir(tmp_path)
    path = '~/run/m.npz'
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"(~ is not expanded: pass os.path.expanduser({path!r}))")):
        TILDE_CALLS[call](path)
    (tmp_path / '~' / 'run').mkdir(parents=True)  # a directory named '~': taken as it is
    if call.startswith('save'):
        TILDE_CALLS[call](path)
        gpuserial.wait_all()
        assert os.listdir(tmp_path / '~' / 'run') == ['m.npz']
    with pytest.raises(FileNotFoundError) as raised:
        TILDE_CALLS[call]('missing/m.npz')
    assert 'expanduser' not in str(raised.value)


def test_load_npz_of_a_directory_says_it_is_one(tmp_path):
    """Python's own said "[Errno 21] Is a directory: 'x'"."""
    with pytest.raises(IsADirectoryError, match=re.escape(
            f'{str(tmp_path)!r}: is a directory, not a file') + '$'):
        serializers.load_npz(tmp_path, {})


@pytest.mark.parametrize('call', list(TILDE_CALLS))
def test_a_tilde_that_names_no_user_gets_no_hint(tmp_path, monkeypatch, call):
    """os.path.expanduser('~nobody-...') leaves it as it is: expanding it would not help."""
    monkeypatch.chdir(tmp_path)
    path = '~no-such-user-5c1e/m.npz'
    assert os.path.expanduser(path) == path
    with pytest.raises(FileNotFoundError) as raised:
        TILDE_CALLS[call](path)
    assert 'no-such-user-5c1e' in str(raised.value) and 'expanduser' not in str(raised.value)
