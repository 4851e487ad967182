"""Devices and array modules: spec forms, clear errors, the fallback, and the import promise."""

import ast
import pathlib
import subprocess
import sys
import types

import numpy
import pytest

import gpuserial
from gpuserial.engine import devices
from gpuserial.errors import DeviceError
from tests.conftest import host
from tests.standin import StandInArray, StandInDevice


@pytest.mark.parametrize('spec', ['cpu', '@numpy', -1, numpy.int64(-1)])
def test_cpu_specs(spec):
    assert gpuserial.get_device(spec) == devices.CPU
    assert gpuserial.get_device(spec).xp is numpy


@pytest.mark.parametrize('spec', ['tpu', 'cuda:x', '@cupy:-1', -2, 1.5, None, True])
def test_unknown_specs_are_named(spec):
    with pytest.raises(DeviceError, match=f'unknown device {spec!r}'.replace('(', r'\(')
                       .replace(')', r'\)').replace('.', r'\.')):
        gpuserial.get_device(spec)


@pytest.mark.parametrize('spec, spelling', [('gpu', "'cuda:N'"), ('gpu:1', "'cuda:1'"),
                                             ('GPU:0', "'cuda:0'")])
def test_gpu_is_no_spec_and_its_error_gives_the_spelling_that_is(spec, spelling):
    """'gpu' was taken as GPU 0 since the first commit, by accident (no docs, no test):
    neither torch nor Chainer takes it."""
    with pytest.raises(DeviceError, match=f"^unknown device {spec!r}: name GPU .* as "
                                          f"{spelling} .*; 'cuda' is the current GPU$"):
        gpuserial.get_device(spec)


@pytest.mark.skipif(devices.gpu_available(), reason='checks the no-GPU fallback')
@pytest.mark.parametrize('spec', ['cuda', 'cuda:0', '@cupy:1', 0, 3])
def test_gpu_specs_without_a_gpu_are_clear_errors(spec):
    with pytest.raises(DeviceError, match=f'device {spec!r} is not usable: no GPU'):
        gpuserial.get_device(spec)


class _FakeRuntime:
    """cupy.cuda.runtime of a machine with 4 GPUs whose current one is GPU 2."""

    @staticmethod
    def getDeviceCount():
        return 4

    @staticmethod
    def getDevice():
        return 2


@pytest.mark.parametrize('spec, gpu', [('cuda', 2), ('@cupy', 2), ('cuda:0', 0), ('@cupy:3', 3),
                                       (1, 1)])
def test_cuda_is_the_current_gpu_and_cuda_n_is_gpu_n(monkeypatch, spec, gpu):
    """As torch takes 'cuda' (and gpuserial takes torch.device('cuda')): with one process per
    GPU, each naming its own current GPU 'cuda', a load onto 'cuda' lands on that process's
    GPU, not on GPU 0 for all. (A fake cupy: a machine with 4 GPUs, GPU 2 current.)"""
    cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=_FakeRuntime))
    monkeypatch.setattr(devices, '_usable_cupy', lambda: cupy)
    assert gpuserial.get_device(spec) == devices.CudaDevice(gpu)


@pytest.mark.gpu
@pytest.mark.parametrize('spec', ['cuda', 'cuda:0', '@cupy:0', 0])
def test_gpu_specs(spec):
    import cupy
    device = gpuserial.get_device(spec)
    assert device == devices.CudaDevice(0) and device.xp is cupy
    assert gpuserial.get_device(cupy.cuda.Device(0)) == device


@pytest.mark.gpu
def test_gpu_beyond_count_is_named():
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    with pytest.raises(DeviceError, match=f'cuda:{count}'):
        gpuserial.get_device(f'cuda:{count}')


def test_a_device_passes_through():
    device = StandInDevice(1)
    assert gpuserial.get_device(device) is device


def test_get_array_module():
    assert gpuserial.get_array_module(numpy.ones(1), 3, None) is numpy
    assert gpuserial.get_array_module() is numpy


def test_device_send_and_device_of(device):
    array = device.send(numpy.arange(5))
    assert devices.device_of(array) == device
    assert device.send(array) is array
    numpy.testing.assert_array_equal(host(array), numpy.arange(5))
    back = devices.CPU.send(array)
    assert isinstance(back, numpy.ndarray)


def test_send_between_standin_devices():
    a = StandInDevice(0).send(numpy.arange(3))
    b = StandInDevice(1).send(a)
    assert isinstance(b, StandInArray) and b.device == StandInDevice(1) and b is not a
    numpy.testing.assert_array_equal(b.get(), [0, 1, 2])


def test_device_use_makes_the_device_current(device):
    with device.use():
        if isinstance(device, devices.CudaDevice):
            import cupy
            assert cupy.cuda.Device().id == device.id
            array = cupy.zeros(2)
            assert devices.device_of(array) == device  # made where use() points
    if isinstance(device, devices.CudaDevice):
        assert cupy.cuda.Device().id == 0 or device.id == 0  # restored afterwards


def test_register_backend_context_removes_it():
    class Fake(devices.Backend):
        def owns(self, array):
            return array == 'fake'

    with devices.register_backend(Fake()) as fake:
        assert devices.backend_of('fake') is fake
    assert devices.backend_of('fake') is None


def test_numpy_only_use_imports_no_other_array_library():
    code = ('import io, sys, numpy, gpuserial, gpuserial.serializers;'
            'f = io.BytesIO(); gpuserial.save_npz(f, {"a": numpy.ones(2)});'
            'f.seek(0); gpuserial.load(f); gpuserial.load_npz(f, {"a": numpy.ones(2)});'
            'print([m for m in ("cupy", "torch", "jax", "ml_dtypes") if m in sys.modules])')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]'


@pytest.mark.parametrize('library', ['cupy', 'torch', 'jax', 'ml_dtypes'])
def test_only_devices_imports_array_libraries(library):
    package = pathlib.Path(gpuserial.__file__).parent
    importers = set()
    for path in package.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ''] if isinstance(node, ast.ImportFrom)
                     else [node.args[0].value] if (
                         isinstance(node, ast.Call) and getattr(node.func, 'id', '') ==
                         '__import__' and isinstance(node.args[0], ast.Constant)) else [])
            if any(name.split('.')[0] == library for name in names):
                importers.add(path.name)
    assert importers == {'devices.py'}


def test_the_default_device_is_the_current_gpu_or_the_cpu():
    expected = devices.CPU
    if devices.gpu_available():
        import cupy
        expected = devices.CudaDevice(cupy.cuda.Device().id)
    assert devices.default_device() == expected


def test_the_array_module_is_that_of_the_first_array_not_numpys():
    import types
    module = types.ModuleType('fake_xp')

    class Backend(devices.Backend):
        xp = module

        def owns(self, array):
            return isinstance(array, list)

    with devices.register_backend(Backend()):
        assert devices.get_array_module(numpy.zeros(1), [1.0]) is module
        assert devices.get_array_module(numpy.zeros(1)) is numpy


def test_integers_of_an_extension_dtypes_size_hold_its_bits_little_endian_only():
    bfloat16, float8 = devices.encoded_dtype('bfloat16'), devices.encoded_dtype('float8_e5m2')
    assert devices.holds_bits_of(numpy.dtype('<i2'), bfloat16)
    assert devices.holds_bits_of(numpy.dtype('<u2'), bfloat16)
    assert devices.holds_bits_of(numpy.dtype('u1'), float8)
    assert not devices.holds_bits_of(numpy.dtype('>i2'), bfloat16)  # other bytes in memory
    assert not devices.holds_bits_of(numpy.dtype('<f2'), bfloat16)  # values, not bits
    assert not devices.holds_bits_of(numpy.dtype('u1'), bfloat16)  # another size
    assert not devices.holds_bits_of(numpy.dtype('<i2'), numpy.dtype('<u2'))  # no extension
    assert not devices.holds_bits_of(numpy.dtype('<i2'), numpy.dtype([('other', '<u2')]))


def test_cupy_holds_bfloat16_from_version_14_on():
    """CuPy allocates arrays of any dtype, but only from 14 on do its kernels take bfloat16 (and
    14 takes no float8): loads make CuPy arrays of such a dtype only then."""
    cupy = pytest.importorskip('cupy')
    pytest.importorskip('ml_dtypes')
    major = int(cupy.__version__.split('.')[0])
    gpu = devices.CudaDevice(0)  # the answer needs no GPU
    assert devices.CUPY.holds_extension('bfloat16', gpu) == (major >= 14)
    if major <= 14:
        assert not devices.CUPY.holds_extension('float8_e4m3fn', gpu)


def test_extension_dtypes_are_ml_dtypes_types_of_those_names_and_their_encodings():
    ml_dtypes = pytest.importorskip('ml_dtypes')
    for name in devices.EXTENSION_DTYPES:  # float8_e5m2 is of kind 'f' in ml_dtypes 0.7
        assert devices.extension_of(numpy.dtype(getattr(ml_dtypes, name))) == name
        assert devices.extension_of(devices.encoded_dtype(name)) == name
    for other in (ml_dtypes.int4, numpy.float32, '>u2', 'V2', [('bfloat16', '>u2')]):
        assert devices.extension_of(numpy.dtype(other)) is None


def test_why_not_fillable_tells_overlapping_elements_from_strided_ones():
    base = numpy.zeros((4, 6), numpy.float32)
    for fillable in (base, base.T, base[::2, ::3], base[::-1, 1:], base[:, ::2].T,
                     numpy.zeros((3, 1, 4))[:, :, ::2], numpy.zeros((3, 4))[:, None, ::2],
                     numpy.zeros((2, 0, 3))):
        assert devices.why_not_fillable(fillable) is None, fillable.strides
    strided = numpy.lib.stride_tricks.as_strided
    for apart in (strided(numpy.zeros(8, numpy.float32), (2, 2), (12, 8)),  # bytes 0 8 12 20
                  strided(numpy.zeros(4, numpy.float32), (2, 2), (4, 8))):  # bytes 0 8 4 12
        assert devices.why_not_fillable(apart) is None, apart.strides
    shared = [strided(numpy.zeros(4, numpy.float32), (3, 2), (4, 0)),  # a column repeated
              strided(numpy.zeros(6, numpy.float32), (2, 3), (8, 4)),  # rows share an element
              strided(numpy.zeros(6, numpy.float32), (4,), (2,))]  # items overlap by half
    for array in shared:
        assert devices.why_not_fillable(array).startswith('its elements share memory'), \
            array.strides
    int32 = numpy.zeros(64, numpy.int32)
    interleaved = strided(int32, (3, 2), (8, 12))  # bytes 0 12 8 20 16 28: compared one by one
    assert devices.why_not_fillable(interleaved) is None
    assert devices.why_not_fillable(strided(int32, (3, 2), (8, 16))).startswith(
        'its elements share memory')  # bytes 0 16 8 24 16 32: 16 twice
    read_only = numpy.zeros(3)
    read_only.setflags(write=False)
    assert devices.why_not_fillable(read_only) == 'it is read-only'
    assert devices.why_not_fillable(read_only[:0]) is None  # nothing to fill


def test_why_not_fillable_says_when_too_many_elements_are_interleaved_to_compare(monkeypatch):
    strided = numpy.lib.stride_tricks.as_strided
    interleaved = strided(numpy.zeros(64, numpy.int32), (3, 2), (8, 12))  # 6 elements
    monkeypatch.setattr(devices, 'OVERLAP_CHECK_MAX', 6)  # compared
    assert devices.why_not_fillable(interleaved) is None
    monkeypatch.setattr(devices, 'OVERLAP_CHECK_MAX', 5)  # too many
    assert devices.why_not_fillable(interleaved) == ('its strides (8, 12) interleave its '
                                                     'elements, which may share memory (too '
                                                     'many to compare)')
    # known without comparing: rows of 5 of 6 floats (each stride clears the bytes before it),
    # and one element six times
    assert devices.why_not_fillable(numpy.zeros((4, 6), numpy.float32)[:, :5]) is None
    assert devices.why_not_fillable(strided(numpy.zeros(1), (6,), (0,))).startswith(
        'its elements share memory (a broadcast')


def test_why_not_fillable_takes_arrays_whose_flags_say_nothing_of_writing():
    class DeviceArray:  # as CuPy's: contiguity flags, no writeable flag
        size = 3
        flags = types.SimpleNamespace(c_contiguous=True, f_contiguous=True)

    assert devices.why_not_fillable(DeviceArray()) is None
