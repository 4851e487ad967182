"""Asynchronous saves: the same bytes as a synchronous save, a state captured at the call that
later changes cannot reach, host memory bounded by the staging budget, errors that surface,
one save per file at a time, loads that wait, and no thread, temporary file or deadlock left
behind (after a fork, at exit, after a failure)."""

import concurrent.futures
import gc
import io
import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy
import pytest

import gpuserial
from gpuserial import serializers
from gpuserial.engine import asyncsave, transfer
from gpuserial.formats import _zipstream, hdf5, npz
from gpuserial.objects import training
from gpuserial.storage import _fileio
from tests import crafting, kill_saver, standin
from tests.conftest import ROOT, host, make_device

SAVES = {'npz': serializers.save_npz, 'hdf5': serializers.save_hdf5}
LOADS = {'npz': serializers.load_npz, 'hdf5': serializers.load_hdf5}
EXT = {'npz': '.npz', 'hdf5': '.h5'}


@pytest.fixture(autouse=True)
def _no_save_left():
    yield
    asyncsave.wait_all() if not asyncsave._unreported else asyncsave._unreported.clear()
    assert [t for t in threading.enumerate() if t.name.startswith('gpuserial save')] == []


@pytest.fixture
def frozen_time(monkeypatch):
    """One zip timestamp for every save of the test, so that files can be compared."""
    moment = time.localtime()
    monkeypatch.setattr(_zipstream.time, 'localtime', lambda *args: moment)


def _model(device=None) -> dict:
    """Arrays of several sizes, dtypes and layouts (on ``device`` where given), and scalars."""
    rng = numpy.random.default_rng(0)
    arrays = {
        'w': rng.standard_normal((300, 200)).astype(numpy.float32),
        'b': rng.standard_normal(200),
        'big_endian': numpy.arange(50, dtype='>i4'),
        'scalar': numpy.array(3.5),
        'empty': numpy.zeros((0, 3), numpy.float16),
    }
    if device is not None:  # device arrays hold native byte order only
        arrays = {key: device.send(value.astype(value.dtype.newbyteorder('=')))
                  for key, value in arrays.items()}
    arrays['strided'] = arrays['w'][::3, ::2]
    return {'layer': arrays, 'step': 7, 'name': 'model', 'nothing': None}


def _mutate(tree: dict) -> None:
    """Changes every array of ``tree`` in place."""
    for value in tree.values():
        if isinstance(value, dict):
            _mutate(value)
        elif isinstance(value, standin.StandInArray):  # a write the streams do not order
            value._data[...] = -value._data - 1
        elif gpuserial.engine.devices.is_array(value) and value.size:
            value[...] = -value - 1


def _values(tree: dict) -> dict:
    return {key: (_values(value) if isinstance(value, dict) else
                  host(value).copy() if gpuserial.engine.devices.is_array(value) else value)
            for key, value in tree.items()}


def _loaded(fmt: str, path) -> dict:
    if fmt == 'npz':
        with numpy.load(path) as data:
            return {key: data[key] for key in data.files if key != 'nothing'}
    import h5py
    with h5py.File(path) as f:
        out = {}
        f.visititems(lambda name, item: out.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) and item.shape is not None else None)
        return out


def _flat(values: dict, prefix: str = '') -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f'{prefix}{key}/'))
        elif value is not None:
            out[prefix + key] = value
    return out


def _assert_file_holds(fmt: str, path, values: dict) -> None:
    stored = _loaded(fmt, path)
    expected = _flat(values)
    assert sorted(stored) == sorted(expected)
    for key, value in expected.items():
        got = stored[key]
        if isinstance(got, bytes):
            got = got.decode()
        numpy.testing.assert_array_equal(got, value, err_msg=key)


# ---------------------------------------------------------------------------------------------
# The same bytes, a state captured at the call


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
@pytest.mark.parametrize('compression', [None, 0])
@pytest.mark.parametrize('spec,staging', [
    ('cpu', None), ('standin:0', 'device'), ('standin:1', 'host'),
    pytest.param('cuda:0', 'device', marks=pytest.mark.gpu),
    pytest.param('cuda:0', 'host', marks=pytest.mark.gpu)])
def test_the_file_is_byte_identical_to_a_synchronous_save(tmp_path, frozen_time, fmt,
                                                           compression, spec, staging):
    device = None if spec == 'cpu' else make_device(spec)
    model = _model(device)
    if fmt == 'hdf5' and staging == 'host':
        model['layer'].pop('strided')  # a strided device array's HDF5 chunks follow its blocks
    kwargs = {} if compression is None else {'compression': compression}
    SAVES[fmt](tmp_path / 'sync', model, **kwargs)
    handle = gpuserial.save_async(tmp_path / 'async', model, fmt, staging=staging, **kwargs)
    assert handle.result() is None and handle.staged.done() and handle.committed.done()
    assert (tmp_path / 'async').read_bytes() == (tmp_path / 'sync').read_bytes()
    assert crafting.temporaries(tmp_path) == []


class _HeldFile(io.BytesIO):
    """A file object whose first write waits until the test lets it go."""

    def __init__(self):
        super().__init__()
        self.go = threading.Event()

    def write(self, data) -> int:
        assert self.go.wait(timeout=30), 'the test never let the writer go'
        return super().write(data)


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
@pytest.mark.parametrize('spec,staging', [
    ('cpu', None), ('standin:0', 'device'), ('standin:0', 'host'),
    pytest.param('cuda:0', 'device', marks=pytest.mark.gpu),
    pytest.param('cuda:0', 'host', marks=pytest.mark.gpu)])
def test_changes_after_the_call_never_reach_the_file(tmp_path, fmt, spec, staging):
    device = None if spec == 'cpu' else make_device(spec)
    model = _model(device)
    before = _values(model)
    out = _HeldFile()
    handle = gpuserial.save_async(out, model, fmt, staging=staging)
    handle.staged.result(timeout=30)
    _mutate(model)  # before the writer has written a byte
    model['step'] = 8
    assert out.getvalue() == b''
    out.go.set()
    handle.result(timeout=30)
    path = tmp_path / f'file{EXT[fmt]}'
    path.write_bytes(out.getvalue())
    _assert_file_holds(fmt, path, before)
    assert _values(model)['layer']['b'][0] == -before['layer']['b'][0] - 1  # it was changed


def test_kernels_queued_after_the_call_run_after_the_device_copies(tmp_path, monkeypatch):
    """On a device, the copies are queued on the engine's stream after the caller's current
    stream, which then waits for them: a kernel the caller queues next, run before the writer
    has even looked at the copies, cannot change what is saved."""
    device = make_device('standin:0')
    array = device.send(numpy.arange(1000.0))
    go = threading.Event()
    device_copies = transfer.device_copies

    def held(arrays):
        copies, wait = device_copies(arrays)
        return copies, lambda: (go.wait(timeout=30), wait())
    monkeypatch.setattr(transfer, 'device_copies', held)
    handle = gpuserial.save_async(tmp_path / 'm.npz', {'x': array}, staging='device')
    standin.BACKEND.launch(device, lambda: array._data.__setitem__(Ellipsis, -1.0))
    standin.BACKEND.synchronize_stream(standin.BACKEND.current_stream(device.id))
    assert host(array)[0] == -1.0  # the kernel has run
    assert not handle.staged.done()  # staged: once the device copies are known complete
    go.set()
    handle.result(timeout=30)
    numpy.testing.assert_array_equal(numpy.load(tmp_path / 'm.npz')['x'], numpy.arange(1000.0))


# ---------------------------------------------------------------------------------------------
# Bounded host memory


def _peak_traced(function) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        function()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
def test_host_staging_holds_at_most_the_budget(tmp_path, fmt):
    """Sixteen arrays of 1 MiB with a budget of 3 MiB stage in waves: the copies held at once
    stay under the budget (plus what the writer itself holds), where an unbounded budget holds
    them all while a slow writer lags behind."""
    model = {f'a{i}': numpy.full(1 << 17, i, numpy.float64) for i in range(16)}

    def save(budget: int):
        def run():
            transfer.release_pool()  # the staging memory a save keeps counts here
            with _SlowFile(tmp_path / f'{budget}{EXT[fmt]}', 'w+') as out:
                handle = gpuserial.save_async(out, model, fmt, max_host_bytes=budget,
                                              compression=0)
                handle.result(timeout=60)
        return run

    bounded = _peak_traced(save(3 << 20))
    unbounded = _peak_traced(save(1 << 30))
    assert bounded < (3 << 20) + (2 << 20)
    assert unbounded > 12 << 20
    for budget in (3 << 20, 1 << 30):
        target = {key: numpy.zeros_like(value) for key, value in model.items()}
        LOADS[fmt](tmp_path / f'{budget}{EXT[fmt]}', target)
        for key, value in model.items():
            numpy.testing.assert_array_equal(target[key], value)


class _SlowFile(io.FileIO):
    """A file on disk that is written slowly (the writer lags behind the caller's staging)."""

    def write(self, data) -> int:
        time.sleep(0.002)
        return super().write(data)


def test_the_caller_waits_while_an_array_over_the_budget_is_written(tmp_path):
    out = _HeldFile()
    returned = threading.Event()
    saver = threading.Thread(target=lambda: (gpuserial.save_async(
        out, {'huge': numpy.arange(1 << 16, dtype=numpy.float64)}, max_host_bytes=1 << 10),
        returned.set()))
    saver.start()
    time.sleep(0.2)
    assert not returned.is_set()  # the original is being written: the call has not returned
    out.go.set()
    saver.join(timeout=30)
    assert returned.is_set()
    gpuserial.wait_all()


def test_an_array_larger_than_the_budget_is_written_while_the_caller_waits(tmp_path):
    model = {'small': numpy.arange(10.0), 'huge': numpy.arange(1 << 18, dtype=numpy.float64),
             'after': numpy.arange(5)}
    expected = _values(model)
    handle = gpuserial.save_async(tmp_path / 'm.npz', model, max_host_bytes=1 << 16)
    _mutate(model)  # the call returned: the huge one is written, the others are copies
    handle.result(timeout=60)
    _assert_file_holds('npz', tmp_path / 'm.npz', expected)


def test_an_array_over_the_budget_after_a_device_copy_is_written_and_the_call_returns(
        tmp_path, monkeypatch):
    """A device copy staged on its device takes none of the host budget: given back after it
    is written, it would leave more than the whole budget free, and the caller waiting for the
    whole budget to come back would wait for ever."""
    pipes: list = []
    init = asyncsave._Pipe.__init__
    monkeypatch.setattr(asyncsave._Pipe, '__init__',
                        lambda self, budget: (init(self, budget), pipes.append(self))[0])
    model = {'d': make_device('standin:0').send(numpy.arange(4.0)),
             'huge': numpy.arange(1 << 12, dtype=numpy.float64)}
    expected = _values(model)
    handles = []
    saver = threading.Thread(target=lambda: handles.append(gpuserial.save_async(
        tmp_path / 'm.npz', model, max_host_bytes=1 << 10, staging='device')))
    saver.start()
    saver.join(timeout=30)
    if not handles:  # stopped, or the wait for every save at the test's end would never end
        pipes[0].abort(RuntimeError('the test stopped the save'))
        saver.join(timeout=30)
        pytest.fail('the call waited for ever for its budget to come back')
    handles[0].result(timeout=30)
    _assert_file_holds('npz', tmp_path / 'm.npz', expected)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
def test_repr_says_how_far_a_save_is_without_waiting_for_it(fmt):
    out = _HeldFile()
    handle = gpuserial.save_async(out, {'x': numpy.arange(10)}, fmt)
    handle.staged.result(timeout=30)
    assert repr(handle).endswith(': writing>')  # the writer is held: repr does not wait for it
    out.go.set()
    handle.result(timeout=30)
    assert repr(handle).endswith(': committed>')


class _FailingFile(io.BytesIO):
    def write(self, data) -> int:
        raise OSError(28, 'No space left on device')


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
def test_a_writer_error_no_one_was_handed_raises_from_the_next_save(tmp_path, fmt):
    """Fire and forget: the next save_async raises it, and does not start."""
    handle = gpuserial.save_async(_FailingFile(), {'x': numpy.arange(10)}, fmt)
    concurrent.futures.wait([handle.committed])  # waits, hands nothing over
    assert 'failed' in repr(handle)  # nor does repr
    with pytest.raises(OSError, match='No space left'):
        gpuserial.save_async(tmp_path / 'next.npz', {'x': numpy.arange(3)})
    assert not (tmp_path / 'next.npz').exists()  # the save that raised it did not start
    with pytest.raises(OSError, match='No space left'):
        handle.result(timeout=30)  # the handle still says so
    gpuserial.save_async(tmp_path / 'next.npz', {'x': numpy.arange(3)}).result(timeout=30)
    gpuserial.wait_all()  # raised once already: not again


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
@pytest.mark.parametrize('how', ['result', 'committed.result', 'committed.exception'])
def test_a_writer_error_a_handle_handed_over_is_not_raised_again(tmp_path, fmt, how):
    """A caller that caught the error (a retry, a log line) saves again: the next save_async
    neither raises it again nor skips its own save, and wait_all and the exit stay quiet."""
    handle = gpuserial.save_async(_FailingFile(), {'x': numpy.arange(10)}, fmt)
    owner, _, call = how.rpartition('.')
    future = getattr(handle, owner) if owner else handle
    if call == 'exception':
        assert 'No space left' in str(future.exception(timeout=30))
    else:
        with pytest.raises(OSError, match='No space left'):
            future.result(timeout=30)
    gpuserial.save_async(tmp_path / 'next.npz', {'x': numpy.arange(3)}).result(timeout=30)
    assert numpy.load(tmp_path / 'next.npz')['x'].tolist() == [0, 1, 2]
    gpuserial.wait_all()
    assert asyncsave._unreported == []


def test_a_failed_save_lets_go_of_the_copies_it_staged_and_never_wrote(tmp_path, monkeypatch):
    """The writer's error, kept by the handle (and for the next call), holds the writer's
    frames: the copies still waiting for it go when it fails, not when the error does. The
    staging memory kept between saves is held by a save in flight, so these are new arrays."""
    go, _ = _held_writes(monkeypatch)
    held = gpuserial.save_async(tmp_path / 'm.npz', {'x': numpy.zeros(3)})
    returned = threading.Event()

    class FailsOnceStaged(io.BytesIO):
        def write(self, data) -> int:
            assert returned.wait(timeout=30)  # the four copies are staged
            raise OSError(28, 'No space left on device')

    model = {f'a{i}': numpy.ones(1 << 17) for i in range(4)}  # 1 MiB each
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        handle = gpuserial.save_async(FailsOnceStaged(), model, max_host_bytes=1 << 30)
        returned.set()
        with pytest.raises(OSError, match='No space left'):
            handle.result(timeout=30)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        go.set()
        held.result(timeout=30)
    assert kept < 2 << 20  # at most the copy being written when it failed


def test_a_writer_that_fails_as_the_caller_finishes_staging_still_says_so(monkeypatch):
    """The writer's failure wakes a caller waiting for budget, whose last count_down can come
    between the writer's check that ``staged`` is not done and its setting the error: that
    raised InvalidStateError in the writer, which never set ``committed``, so result() and
    wait_all() waited for ever. This makes that interleaving happen."""
    done, count_down = asyncsave._Outcome.done, asyncsave._Countdown.count_down
    checked = threading.Event()
    handles: list = []

    def on_the_writer() -> bool:
        return threading.current_thread().name.startswith('gpuserial save')

    def the_caller_counts_down_last(countdown):
        if not on_the_writer():
            assert checked.wait(timeout=10)
        count_down(countdown)

    def the_caller_finishes_meanwhile(future):
        if on_the_writer() and handles and future is handles[0].staged and not done(future):
            future.set_result(None)  # the caller's count_down, just after the check
            checked.set()
            return False
        return done(future)

    init = asyncsave.SaveHandle.__init__
    monkeypatch.setattr(asyncsave.SaveHandle, '__init__',
                        lambda self, name: (init(self, name), handles.append(self))[0])
    monkeypatch.setattr(asyncsave._Countdown, 'count_down', the_caller_counts_down_last)
    monkeypatch.setattr(asyncsave._Outcome, 'done', the_caller_finishes_meanwhile)
    model = {f'a{i}': numpy.ones(1 << 17) for i in range(4)}  # 1 MiB each, 1 MiB of budget
    handle = gpuserial.save_async(_FailingFile(), model, max_host_bytes=1 << 20)
    try:
        with pytest.raises(OSError, match='No space left'):
            handle.result(timeout=10)
    finally:
        if not done(handle.committed):  # else the wait at the test's end would never end
            handle.committed.set_exception(AssertionError('the writer never said'))


def test_a_save_cannot_be_cancelled(tmp_path):
    out = _HeldFile()
    handle = gpuserial.save_async(out, {'x': numpy.arange(3)})
    assert not handle.committed.cancel() and not handle.staged.cancel()
    out.go.set()
    handle.result(timeout=30)  # the writer could still say how it ended
    (tmp_path / 'm.npz').write_bytes(out.getvalue())
    assert numpy.load(tmp_path / 'm.npz')['x'].tolist() == [0, 1, 2]


def test_wait_all_raises_an_error_no_call_has_raised(tmp_path):
    gpuserial.save_async(_FailingFile(), {'x': numpy.arange(10)})
    with pytest.raises(OSError, match='No space left'):
        gpuserial.wait_all()
    gpuserial.wait_all()


class _GatedFailingFile(io.BytesIO):
    """Fails its first write with ``error``, once ``gate`` is set."""

    def __init__(self, gate: threading.Event, error: OSError):
        super().__init__()
        self.gate, self.error = gate, error

    def write(self, data) -> int:
        assert self.gate.wait(timeout=30)
        raise self.error


def test_each_failed_save_is_raised_by_one_call_none_dropped():
    gate = threading.Event()
    handles = [gpuserial.save_async(_GatedFailingFile(gate, error), {'x': numpy.arange(10)})
               for error in (OSError(28, 'No space left on device'),
                             OSError(5, 'Input/output error'))]
    gate.set()
    concurrent.futures.wait([handle.committed for handle in handles])
    raised = []
    for _ in handles:
        with pytest.raises(OSError) as error:
            gpuserial.wait_all()
        raised.append(error.value.errno)
    assert sorted(raised) == [5, 28]
    gpuserial.wait_all()  # each raised once


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, fmt, monkeypatch):
    path = tmp_path / f'm{EXT[fmt]}'
    SAVES[fmt](path, kill_saver.state(0))
    old = path.read_bytes()
    module, function = (npz, 'write_npz') if fmt == 'npz' else (hdf5, 'write_entry')
    original = getattr(module, function)

    def failing(*args, **kwargs):  # after some bytes of the new file are written
        original(*args, **kwargs)
        raise OSError(5, 'Input/output error')

    monkeypatch.setattr(module, function, failing)
    handle = gpuserial.save_async(path, kill_saver.state(1), fmt)
    with pytest.raises(OSError, match='Input/output error'):
        handle.result(timeout=30)
    asyncsave._unreported.clear()
    assert path.read_bytes() == old
    assert crafting.temporaries(tmp_path) == []


def test_an_error_of_serialize_raises_at_the_call_and_writes_nothing(tmp_path):
    class Broken:
        def serialize(self, serializer):
            serializer('x', numpy.arange(3))
            raise RuntimeError('broken serialize')

    with pytest.raises(RuntimeError, match='broken serialize'):
        gpuserial.save_async(tmp_path / 'm.npz', Broken())
    assert list(tmp_path.iterdir()) == []
    gpuserial.wait_all()


@pytest.mark.parametrize('format', ['npz', 'hdf5'])
def test_an_object_that_cannot_be_saved_raises_at_the_call_naming_the_file(tmp_path, format):
    path = tmp_path / 'm'
    serializers.save_npz(path, {'a': numpy.ones(2)}) if format == 'npz' else \
        serializers.save_hdf5(path, {'a': numpy.ones(2)})
    old = path.read_bytes()
    with pytest.raises(TypeError, match=re.escape(f"{str(path)!r}, key 'b'")):
        gpuserial.save_async(path, {'a': numpy.zeros(2), 'b': object()}, format=format)
    gpuserial.wait_all()
    assert path.read_bytes() == old and sorted(tmp_path.iterdir()) == [path]


def test_an_interrupt_while_staging_stops_the_writer_and_keeps_the_old_file(tmp_path,
                                                                             monkeypatch):
    path = tmp_path / 'm.npz'
    serializers.save_npz(path, kill_saver.state(0))
    old = path.read_bytes()
    copies = []
    copy = asyncsave._ArenaCopies.copy

    def interrupted(self, array):
        copies.append(array)
        if len(copies) == 2:
            time.sleep(0.2)  # the writer has written the first and waits for the next
            raise KeyboardInterrupt
        return copy(self, array)
    monkeypatch.setattr(asyncsave._ArenaCopies, 'copy', interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpuserial.save_async(path, kill_saver.state(1), max_host_bytes=1 << 20)
    assert path.read_bytes() == old
    assert crafting.temporaries(tmp_path) == []
    gpuserial.wait_all()  # the interrupt was raised at the call: nothing left to raise


@pytest.mark.parametrize('kwargs,message', [({'format': 'zip'}, 'format'),
                                            ({'staging': 'disk'}, 'staging'),
                                            ({'max_host_bytes': 0}, 'max_host_bytes')])
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gpuserial.save_async(tmp_path / 'm', {'x': numpy.arange(3)}, **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('name, expected', [
    ('ckpt.h5', 'hdf5'), ('ckpt.HDF5', 'hdf5'), ('ckpt.hdf', 'hdf5'), ('ckpt.npz', 'npz'),
    ('snapshot_iter_100', 'npz'), ('memory://async/ckpt.h5', 'hdf5')])
def test_the_format_comes_from_the_name_unless_given(tmp_path, memory, name, expected):
    """save_async('ckpt.h5', ...) wrote an NPZ under that name, which load_hdf5 refused."""
    file = name if '://' in name else tmp_path / name
    from gpuserial.tools.inspection import inspect_file

    gpuserial.save_async(file, {'x': numpy.arange(3)}).result()
    assert inspect_file(file).format == expected
    other = {'npz': 'hdf5', 'hdf5': 'npz'}[expected]
    gpuserial.save_async(file, {'x': numpy.arange(3)}, other).result()  # format= wins
    assert inspect_file(file).format == other


def test_a_path_in_no_directory_or_a_directory_is_refused_at_the_call(tmp_path):
    """The error came from the handle, or from the next save_async, wait_all or the exit:
    a run saving every 1000 iterations learned of a missing directory only then."""
    missing = tmp_path / 'checkpoints' / 'm.npz'
    with pytest.raises(FileNotFoundError, match=rf"^cannot save to '{missing}': no such "
                                                rf"directory '{missing.parent}'$"):
        gpuserial.save_async(missing, {'x': numpy.arange(3)})
    with pytest.raises(IsADirectoryError, match=rf"^cannot save to '{tmp_path}': it is a "
                                                r"directory$"):
        gpuserial.save_async(tmp_path, {'x': numpy.arange(3)}, 'hdf5')
    gpuserial.wait_all()  # nothing left to raise
    assert list(tmp_path.iterdir()) == []


def test_a_host_budget_that_is_no_number_is_refused(tmp_path):
    """'1GiB' failed with "'<' not supported between instances of 'str' and 'int'"."""
    with pytest.raises(TypeError, match=r"^max_host_bytes must be a number of bytes \(such as "
                                        r"1 << 30\), not '1GiB'$"):
        gpuserial.save_async(tmp_path / 'm.npz', {'x': numpy.arange(3)}, max_host_bytes='1GiB')
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# One save per file; loads wait; threads, forks and exits


def _held_writes(monkeypatch) -> tuple[threading.Event, list]:
    """Makes the first NPZ write of the test wait for the returned event; logs every write's
    start and end."""
    go, log = threading.Event(), []
    original = npz.write_npz

    def write_npz(out, entries, compression, *args, **kwargs):
        log.append('start')
        if log.count('start') == 1:
            assert go.wait(timeout=30)
        original(out, entries, compression, *args, **kwargs)
        log.append('end')
    monkeypatch.setattr(npz, 'write_npz', write_npz)
    return go, log


def test_a_second_save_of_a_file_waits_for_the_first(tmp_path, monkeypatch):
    go, log = _held_writes(monkeypatch)
    path = tmp_path / 'm.npz'
    first = gpuserial.save_async(path, {'x': numpy.zeros(3)})
    second = []
    saver = threading.Thread(target=lambda: second.append(
        gpuserial.save_async(path, {'x': numpy.ones(3)})))
    saver.start()
    time.sleep(0.2)
    assert log == ['start'] and second == []  # the second has not started
    go.set()
    saver.join(timeout=30)
    first.result(timeout=30)
    second[0].result(timeout=30)
    assert log == ['start', 'end', 'start', 'end']
    numpy.testing.assert_array_equal(numpy.load(path)['x'], numpy.ones(3))


@pytest.mark.parametrize('load', ['npz', 'save_npz'])
def test_a_load_or_synchronous_save_of_the_file_waits_for_the_save(tmp_path, monkeypatch, load):
    path = tmp_path / 'm.npz'
    serializers.save_npz(path, {'x': numpy.zeros(3)})
    go, _ = _held_writes(monkeypatch)
    handle = gpuserial.save_async(path, {'x': numpy.ones(3)})
    target = {'x': numpy.full(3, 5.0)}
    if load == 'npz':
        worker = threading.Thread(target=serializers.load_npz, args=(path, target))
    else:
        worker = threading.Thread(target=serializers.save_npz,
                                  args=(path, {'x': numpy.full(3, 2.0)}))
    worker.start()
    time.sleep(0.2)
    go.set()
    worker.join(timeout=30)
    handle.result(timeout=30)
    if load == 'npz':
        numpy.testing.assert_array_equal(target['x'], numpy.ones(3))  # the new file
    else:
        numpy.testing.assert_array_equal(numpy.load(path)['x'], numpy.full(3, 2.0))  # last


def test_memory_does_not_grow_over_twenty_saves(tmp_path):
    model = {f'a{i}': numpy.random.default_rng(i).standard_normal(1 << 18) for i in range(8)}
    sizes = []
    for index in range(20):
        gpuserial.save_async(tmp_path / f'm{index % 2}.npz', model, compression=False).result()
        gc.collect()
        sizes.append(_rss())  # after each save: what a save leaves behind
    assert sizes[-1] <= sizes[0] * 1.05


def _rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs fork')
def test_a_fork_while_a_save_is_in_flight_does_not_deadlock_the_child(tmp_path, monkeypatch):
    go, _ = _held_writes(monkeypatch)
    path = tmp_path / 'm.npz'
    handle = gpuserial.save_async(path, {'x': numpy.zeros(3)})
    failed = gpuserial.save_async(_FailingFile(), {'x': numpy.arange(3)}, 'hdf5')
    concurrent.futures.wait([failed.committed])  # an error nothing has raised yet
    pid = os.fork()
    if pid == 0:  # the child: no writer thread here, the parent's save is not its own
        status = 1
        try:
            gpuserial.wait_all()  # neither the parent's save nor its error
            go.set()
            gpuserial.save_async(tmp_path / 'child.npz', {'y': numpy.ones(2)}).result(10)
            target = {'y': numpy.zeros(2)}
            serializers.load_npz(tmp_path / 'child.npz', target)
            status = 0 if target['y'].tolist() == [1.0, 1.0] else 2
        finally:
            os._exit(status)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail('the child hung')
    go.set()
    handle.result(timeout=30)
    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(OSError, match='No space left'):  # the parent's, raised in the parent
        gpuserial.wait_all()


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs fork')
def test_a_forked_child_has_the_staging_memory_a_save_of_its_parent_held(tmp_path, monkeypatch):
    """The parent's save in flight holds the kept staging memory at the fork; it is not the
    child's save, and would never give it back there: the child's saves would all make new
    copies."""
    go, _ = _held_writes(monkeypatch)
    handle = gpuserial.save_async(tmp_path / 'm.npz', {'x': numpy.zeros(3)})
    assert transfer.host_arena.take(8) is None  # held by the save in flight
    pid = os.fork()
    if pid == 0:
        os._exit(0 if transfer.host_arena.take(8) is not None else 1)
    _, status = os.waitpid(pid, 0)
    go.set()
    handle.result(timeout=30)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_process_that_exits_normally_keeps_its_last_save(tmp_path):
    path = tmp_path / 'last.npz'
    code = ('import numpy, gpuserial, sys\n'
            'model = {f"a{i}": numpy.full(1 << 20, i, numpy.float64) for i in range(8)}\n'
            f'gpuserial.save_async({str(path)!r}, model)\n'
            'sys.exit(0)\n')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT,
                   timeout=120)
    with numpy.load(path) as data:
        assert sorted(data.files) == [f'a{i}' for i in range(8)]
        assert data['a7'][-1] == 7
    assert crafting.temporaries(tmp_path) == []


def test_an_error_at_exit_is_printed(tmp_path):
    code = ('import io, numpy, gpuserial\n'
            'class F(io.BytesIO):\n'
            '    def write(self, data): raise OSError(28, "No space left on device")\n'
            'gpuserial.save_async(F(), {"x": numpy.arange(3)})\n')
    done = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert 'an asynchronous save failed' in done.stderr and 'No space left' in done.stderr


# ---------------------------------------------------------------------------------------------
# Trainer snapshots


def _snapshotting_trainer(out, async_: bool) -> training.Trainer:
    """A trainer of 4 iterations that snapshots at 2 and 4."""
    numpy.random.seed(0)  # the same initial weights
    model = gpuserial.Chain()
    with model.init_scope():
        model.fc = gpuserial.Linear(3, 2)
    optimizer = gpuserial.Adam()
    optimizer.setup(model)
    iterator = training.SerialIterator(numpy.arange(12.0).reshape(6, 2), 2, shuffle=False)

    def step(target, batch):  # the optimizer calls it, then updates
        for param in target.params():
            param.grad = numpy.full_like(param.array, float(numpy.sum(batch)))
    trainer = training.Trainer(training.StandardUpdater(iterator, optimizer, step),
                               (4, 'iteration'), out=str(out))
    trainer.extend(training.snapshot(async_=async_), trigger=(2, 'iteration'))
    return trainer


def test_a_trainer_snapshot_saved_asynchronously_loads_as_a_synchronous_one(tmp_path):
    _snapshotting_trainer(tmp_path / 'sync', False).run()
    _snapshotting_trainer(tmp_path / 'async', True).run()
    assert _fileio.saves_in_flight() == []  # the trainer's end waited for the last snapshot
    for name in ('snapshot_iter_2', 'snapshot_iter_4'):
        with numpy.load(tmp_path / 'sync' / name) as sync, \
                numpy.load(tmp_path / 'async' / name) as done:
            assert sorted(sync.files) == sorted(done.files)
            for key in sync.files:
                if sync[key].dtype.hasobject or key.endswith('elapsed_time'):
                    continue
                numpy.testing.assert_array_equal(done[key], sync[key], err_msg=key)


def test_the_trainers_end_raises_the_error_of_its_last_asynchronous_snapshot(tmp_path):
    (tmp_path / 'snapshot_iter_4').mkdir()  # the last snapshot cannot take its place
    with pytest.raises(IsADirectoryError, match='snapshot_iter_4'):
        _snapshotting_trainer(tmp_path, True).run()
    assert (tmp_path / 'snapshot_iter_2').is_file()
    assert crafting.temporaries(tmp_path) == []


def test_an_asynchronous_snapshot_takes_the_formats_it_can_write():
    assert training.snapshot(serializers.save_hdf5, async_=True)._async_format == 'hdf5'
    with pytest.raises(ValueError, match='async_=True'):
        training.snapshot(lambda path, obj: None, async_=True)


def test_hdf5_plan_entries_are_written_from_the_staged_copies(tmp_path):
    """The HDF5 writer takes the entries it is given, not the plan's originals."""
    serializer, plan = hdf5.collect(tmp_path / 'm.h5', {'x': numpy.arange(3)}, 4)
    staged = [(group, key, path, numpy.arange(3) + 10) for group, key, path, _ in plan.entries]
    hdf5.write_planned(tmp_path / 'm.h5', serializer, plan, durable=False, entries=iter(staged))
    target = {'x': numpy.zeros(3, numpy.int64)}
    serializers.load_hdf5(tmp_path / 'm.h5', target)
    assert target['x'].tolist() == [10, 11, 12]


# ---------------------------------------------------------------------------------------------
# The staging memory kept between saves


def test_the_staging_memory_is_kept_for_the_next_save_and_released_on_request(tmp_path):
    transfer.release_pool()
    model = {'a': numpy.arange(1000.0), 'b': numpy.ones((30, 30), numpy.float32)}
    gpuserial.save_async(tmp_path / 'm.npz', model).result(timeout=30)
    kept = transfer.host_arena._buffer
    assert kept is not None and kept.nbytes >= model['a'].nbytes + model['b'].nbytes
    gpuserial.save_async(tmp_path / 'm.npz', {'a': model['a'] + 1}).result(timeout=30)
    assert transfer.host_arena._buffer is kept  # reused, not made anew
    transfer.release_pool()
    assert transfer.host_arena._buffer is None
    target = {'a': numpy.zeros(1000)}
    serializers.load_npz(tmp_path / 'm.npz', target)
    numpy.testing.assert_array_equal(target['a'], model['a'] + 1)


def test_saves_in_flight_together_never_share_staging_memory(tmp_path):
    """The first save's writer waits before its first byte, its copy (streamed: larger than a
    small member) still to be read, while a second save stages and commits."""
    values = numpy.arange(20_000.0)
    first = {'x': values.copy()}
    out = _HeldFile()
    held = gpuserial.save_async(out, first, compression=False)
    gpuserial.save_async(tmp_path / 'second.npz', {'x': -values}).result(timeout=30)
    first['x'][...] = 7
    out.go.set()
    held.result(timeout=30)
    (tmp_path / 'first.npz').write_bytes(out.getvalue())
    numpy.testing.assert_array_equal(numpy.load(tmp_path / 'first.npz')['x'], values)
    numpy.testing.assert_array_equal(numpy.load(tmp_path / 'second.npz')['x'], -values)


def test_a_budget_of_one_byte_writes_every_array_from_the_original(tmp_path):
    model = {'a': numpy.arange(10.0), 'b': numpy.arange(3)}
    gpuserial.save_async(tmp_path / 'm.npz', model, max_host_bytes=1).result(timeout=30)
    _assert_file_holds('npz', tmp_path / 'm.npz', _values(model))


def test_the_next_save_of_a_file_raises_the_error_of_the_save_in_flight_to_it(tmp_path,
                                                                              monkeypatch):
    go = threading.Event()
    original = npz.write_npz

    def failing_once(out, entries, compression, *args, **kwargs):
        if not go.is_set():
            assert go.wait(timeout=30)
            raise OSError(28, 'No space left on device')
        original(out, entries, compression, *args, **kwargs)
    monkeypatch.setattr(npz, 'write_npz', failing_once)
    path = tmp_path / 'm.npz'
    first = gpuserial.save_async(path, {'x': numpy.zeros(3)})
    raised = []

    def second():
        try:
            gpuserial.save_async(path, {'x': numpy.ones(3)})
        except OSError as error:
            raised.append(error)
    saver = threading.Thread(target=second)
    saver.start()
    time.sleep(0.1)
    go.set()
    saver.join(timeout=30)
    with pytest.raises(OSError):
        first.result(timeout=30)
    assert len(raised) == 1 and 'No space left' in str(raised[0])
    assert not path.exists()


def test_a_writer_that_fails_wakes_a_caller_waiting_for_the_budget():
    model = {f'a{i}': numpy.ones(1 << 17) for i in range(4)}  # 1 MiB each, 1 MiB of budget
    returned = []
    caller = threading.Thread(target=lambda: returned.append(
        gpuserial.save_async(_FailingFile(), model, max_host_bytes=1 << 20)))
    caller.start()
    caller.join(timeout=30)
    assert returned, 'the caller still waits for budget that the failed writer never frees'
    with pytest.raises(OSError, match='No space left'):
        returned[0].result(timeout=30)
    asyncsave._unreported.clear()


def test_staged_raises_when_the_device_copies_fail(tmp_path):
    device = make_device('standin:0')
    standin.BACKEND.failing_waits = 1
    try:
        handle = gpuserial.save_async(tmp_path / 'm.npz', {'x': device.send(numpy.arange(3.0))})
        with pytest.raises(standin.StandInError, match='a wait made to fail'):
            handle.staged.result(timeout=30)
        assert asyncsave._unreported == []  # handed over: no later call raises it again
        with pytest.raises(standin.StandInError):
            handle.result(timeout=30)
    finally:
        standin.BACKEND.failing_waits = 0
        asyncsave._unreported.clear()
    assert not (tmp_path / 'm.npz').exists()


@pytest.mark.parametrize('name', ['m.npz', 'm.h5'])
def test_a_relative_path_names_the_file_of_the_working_directory_of_the_call(tmp_path,
                                                                             monkeypatch, name):
    """The writer runs later: a change of working directory meanwhile (a training script's
    os.chdir) made it fail ('No such file or directory' for its temporary file) or write
    elsewhere."""
    (tmp_path / 'here').mkdir()
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'here')
    moved = threading.Event()
    if name.endswith('.npz'):
        original, owner, attribute = asyncsave.atomic_output, asyncsave, 'atomic_output'
    else:
        original, owner, attribute = hdf5.write_planned, hdf5, 'write_planned'

    def after_the_move(*args, **kwargs):
        moved.wait(10)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, after_the_move)
    handle = gpuserial.save_async(name, {'w': numpy.arange(3.0)})
    os.chdir(tmp_path / 'elsewhere')
    moved.set()
    handle.result()
    assert os.listdir(tmp_path / 'here') == [name] and os.listdir(tmp_path / 'elsewhere') == []
    numpy.testing.assert_array_equal(gpuserial.load(tmp_path / 'here' / name)['w'],
                                     numpy.arange(3.0))
