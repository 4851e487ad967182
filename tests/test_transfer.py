"""The staging engine: chunking, double buffering, in-place fills, on every device kind."""

import numpy
import pytest

from gpuserial.engine import devices, transfer
from tests.conftest import host
from tests.standin import BACKEND, StandInDevice

CHUNK = 64
# element counts around the chunk boundaries for 1-, 2-, 3-(as 'V3') and 8-byte items
SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1000]
DTYPES = ['u1', '<f2', '<i4', '<f8', '<c16', '?', 'V3']


def _values(size, dtype):
    raw = numpy.random.default_rng(size).integers(0, 256, size * numpy.dtype(dtype).itemsize,
                                                  dtype=numpy.uint8)
    return raw.view(dtype) if dtype != '?' else raw.astype(bool)


def _stream(array):
    return b''.join(bytes(chunk) for chunk in transfer.host_chunks(array))


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('dtype', DTYPES)
def test_host_chunks_give_the_c_order_bytes(device, small_chunks, size, dtype):
    values = _values(size, dtype)
    assert _stream(device.send(values)) == values.tobytes()


@pytest.mark.parametrize('view', ['transposed', 'sliced', 'fortran'])
def test_host_chunks_of_non_contiguous_arrays(device, small_chunks, view):
    base = numpy.arange(7 * 13, dtype=numpy.float32).reshape(7, 13)
    array = {'transposed': base.T, 'sliced': base[::2, 1::3],
             'fortran': numpy.asfortranarray(base)}[view]
    source = device.send(array) if device.name != '@numpy' else array
    assert _stream(source) == numpy.ascontiguousarray(array).tobytes()


def test_host_chunks_of_a_numpy_array_are_its_own_memory(small_chunks):
    array = numpy.arange(100, dtype=numpy.uint8)
    first = next(transfer.host_chunks(array))
    assert numpy.shares_memory(numpy.frombuffer(first, numpy.uint8), array)
    assert len(first) == CHUNK


def _reader(data: bytes, sizes: list):
    position = 0

    def read_into(buffer):
        nonlocal position
        sizes.append(len(buffer))
        buffer[:] = data[position:position + len(buffer)]
        position += len(buffer)
    return read_into


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('dtype', DTYPES)
def test_fill_in_place(device, small_chunks, size, dtype):
    values = _values(size, dtype)
    target = device.send(numpy.zeros(size, dtype))
    before = target
    sizes = []
    transfer.fill(target, _reader(values.tobytes(), sizes), values.dtype)
    assert target is before
    assert host(target).tobytes() == values.tobytes()
    assert all(s <= max(CHUNK, values.dtype.itemsize) for s in sizes)
    assert sum(sizes) == values.nbytes


@pytest.mark.parametrize(('src', 'dst'), [('<f4', '<f2'), ('<i2', '<i8'), ('<f8', '<f4'),
                                          ('?', '<i4'), ('<c8', '<c16')])
def test_fill_with_a_cast(device, small_chunks, src, dst):
    values = (numpy.arange(-50, 50) % 7).astype(src).reshape(10, 10)
    target = device.send(numpy.zeros((10, 10), dst))
    transfer.fill(target, _reader(values.tobytes(), []), values.dtype)
    numpy.testing.assert_array_equal(host(target), values.astype(dst))


@pytest.mark.parametrize(('encoding', 'dst'), [('bfloat16', '<i2'), ('bfloat16', '<u2'),
                                               ('float8_e4m3fn', 'u1')])
def test_fill_moves_an_extension_encoding_into_integers_of_its_size_bit_for_bit(
        device, small_chunks, encoding, dst):
    stored = devices.encoded_dtype(encoding)
    values = _values(100, f'V{stored.itemsize}').view(stored).reshape(10, 10)
    target = device.send(numpy.zeros((10, 10), dst))
    transfer.fill(target, _reader(values.tobytes(), []), stored)
    assert host(target).tobytes() == values.tobytes()


def test_fill_a_non_contiguous_target(device, small_chunks):
    base = device.send(numpy.zeros((6, 10), numpy.float32))
    values = numpy.arange(30, dtype=numpy.float32).reshape(6, 5)
    if device.name == '@numpy':
        target = base[:, ::2]
        transfer.fill(target, _reader(values.tobytes(), []), values.dtype)
        numpy.testing.assert_array_equal(base[:, ::2], values)
        numpy.testing.assert_array_equal(base[:, 1::2], 0)
    else:
        target = device.send(numpy.zeros((5, 6), numpy.float32)).T
        transfer.fill(target, _reader(values.tobytes(), []), values.dtype)
        numpy.testing.assert_array_equal(host(target), values)


def test_device_copies_cycle_through_the_buffers_in_order():
    BACKEND.reset()
    device = StandInDevice(1)
    values = numpy.arange(1000, dtype=numpy.uint8)
    with transfer.configure(chunk_bytes=100, buffers=3):
        transfer.release_pool()
        assert _stream(device.send(values)) == values.tobytes()
        target = device.send(numpy.zeros(1000, numpy.uint8))
        transfer.fill(target, _reader(values.tobytes(), []), values.dtype)
    assert target.get().tobytes() == values.tobytes()
    d2h = [entry for entry in BACKEND.log if entry[0] == 'd2h']
    h2d = [entry for entry in BACKEND.log if entry[0] == 'h2d']
    assert d2h == [('d2h', 1, start, 100) for start in range(0, 1000, 100)]
    assert h2d == [('h2d', 1, start, 100) for start in range(0, 1000, 100)]
    assert BACKEND.pinned_allocations == 3  # one pool, reused by the load after the save


def test_arrays_of_many_sizes_share_one_set_of_pinned_buffers():
    BACKEND.reset()
    device = StandInDevice(0)
    with transfer.configure(chunk_bytes=100, buffers=3):
        transfer.release_pool()
        empty = device.send(numpy.zeros(0, numpy.float32))
        assert _stream(empty) == b''
        transfer.fill(empty, _reader(b'', []), numpy.float32)
        assert BACKEND.pinned_allocations == 0  # nothing to copy, nothing pinned
        for size in (1, 7, 50, 99, 100, 101, 250):
            values = numpy.arange(size, dtype=numpy.uint8)
            assert _stream(device.send(values)) == values.tobytes()
            target = device.send(numpy.zeros(size // 2, numpy.uint16))  # a cast: wider buffers
            transfer.fill(target, _reader(values[:size // 2].tobytes(), []), numpy.uint8)
    assert BACKEND.pinned_allocations == 3


def test_a_consumer_that_stops_early_leaves_no_copy_in_flight(small_chunks):
    device = StandInDevice(0)
    chunks = transfer.host_chunks(device.send(numpy.arange(1000, dtype=numpy.uint8)))
    next(chunks)
    chunks.close()
    assert BACKEND.pending() == 0


def test_configure_is_global_and_a_context():
    default = transfer.settings()
    with transfer.configure(chunk_bytes=1024) as settings:
        assert settings.chunk_bytes == 1024 and settings.buffers == default.buffers
        assert transfer.settings().chunk_bytes == 1024
    assert transfer.settings() == default
    transfer.configure(buffers=4)
    try:
        assert transfer.settings().buffers == 4
    finally:
        transfer.configure(buffers=default.buffers)


@pytest.mark.parametrize(('kwargs', 'message'), [({'chunk_bytes': 0}, 'chunk_bytes'),
                                                 ({'buffers': 1}, 'at least 2')])
def test_configure_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        transfer.configure(**kwargs)


@pytest.mark.parametrize('kwargs', [{'chunk_bytes': 1.5e6}, {'chunk_bytes': '16MiB'},
                                    {'buffers': 3.0}], ids=['float', 'str', 'float-buffers'])
def test_configure_refuses_what_is_no_int(kwargs):
    """A float was taken, and every save then failed deep inside ('float' object cannot be
    interpreted as an integer); a str failed with '<' not supported."""
    (name, value), = kwargs.items()
    with pytest.raises(TypeError, match=rf"^{name} must be an int .*, got {value!r}$"):
        transfer.configure(**kwargs)
    transfer.configure(chunk_bytes=numpy.int64(1 << 20)).__exit__(None, None, None)  # NumPy's


@pytest.mark.parametrize('shape', [(), (0,), (5,), (3, 0, 2), (4, 5), (2, 3, 40), (3, 100),
                                   (2, 2, 2, 50)])
def test_hyperslabs_tile_the_array_in_order(shape):
    array = numpy.arange(int(numpy.prod(shape)), dtype=numpy.float64).reshape(shape)
    position = 0
    for index, start, stop in transfer.hyperslabs(shape, 8, chunk_bytes=64):
        assert start == position
        block = array[index] if index else array
        assert block.flags.c_contiguous and block.size == stop - start
        assert block.size * 8 <= 64 or block.ndim <= 1 or block.shape[0] == 1
        numpy.testing.assert_array_equal(block.reshape(-1), array.reshape(-1)[start:stop])
        position = stop
    assert position == array.size
