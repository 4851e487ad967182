"""Atomic saves: whatever goes wrong during a save to a path, the old file stays as it was.

Failures from every side: the user's ``serialize`` raising halfway, a write failing (a
monkeypatched writer, a real file size limit, a file object that fails after N bytes),
Ctrl-C, and a saving process killed with SIGKILL at random points. After each, the old file is
intact and no temporary file is left (or, after SIGKILL, at most one, which the next save
removes).
"""

import ctypes
import errno
import io
import itertools
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy
import pytest

import gpuserial
from gpuserial import serializers
from gpuserial.errors import ReadFailedError
from gpuserial.formats import _zipstream, hdf5
from gpuserial.storage import _fileio, _signals
from tests import crafting, interrupt_child, kill_saver
from tests.conftest import as_nobody

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORMATS = {
    'npz': (lambda f, o, **kw: serializers.save_npz(f, o, **kw), serializers.load_npz, '.npz'),
    'npz-stored': (lambda f, o, **kw: serializers.save_npz(f, o, compression=False, **kw),
                   serializers.load_npz, '.npz'),
    'hdf5': (lambda f, o, **kw: serializers.save_hdf5(f, o, **kw), serializers.load_hdf5, '.h5'),
}


@pytest.fixture(params=list(FORMATS))
def fmt(request):
    return request.param


@pytest.fixture
def old_file(tmp_path, fmt):
    """A good file at the target path, and its bytes."""
    save, _, ext = FORMATS[fmt]
    path = tmp_path / f'model{ext}'
    save(path, kill_saver.state(0))
    return path, path.read_bytes()


def _assert_intact(path, old: bytes, fmt: str):
    assert path.read_bytes() == old
    assert crafting.temporaries(path.parent) == []
    target = kill_saver.zeros()
    FORMATS[fmt][1](path, target)
    assert target['which'] == 0


class FailsHalfway:
    """A serializable object whose ``serialize`` raises after storing some entries.

    Args:
        error: the exception to raise.
        when: raise only for serializers of this type (None: always).
    """

    def __init__(self, error: BaseException, when: type | None = None):
        self.error = error
        self.when = when
        self.seen: list = []  # temporary files present when it raised

    def serialize(self, serializer):
        state = kill_saver.state(1)
        serializer('w', state['w'])
        serializer('b', state['b'])
        if self.when is None or isinstance(serializer, self.when):
            self.seen.append(crafting.temporaries(self.directory))
            raise self.error
        serializer('which', 1)


ERRORS = [RuntimeError('boom'), KeyboardInterrupt(), OSError(errno.ENOSPC, 'disk full'),
          PermissionError(errno.EACCES, 'Permission denied', 'another file'),
          ReadFailedError("'source.npz': reading failed: [Errno 5] Input/output error")]
ERROR_IDS = ['exception', 'ctrl-c', 'enospc', 'another-file', 'read-failed']


@pytest.mark.parametrize('error', ERRORS, ids=ERROR_IDS)
def test_serialize_raises_halfway(fmt, old_file, error):
    path, old = old_file
    obj = FailsHalfway(error)
    obj.directory = path.parent
    with pytest.raises(type(error)):
        FORMATS[fmt][0](path, obj)
    _assert_intact(path, old, fmt)


@pytest.mark.parametrize('error', ERRORS, ids=ERROR_IDS)
def test_hdf5_serialize_runs_before_any_file_is_made(tmp_path, error):
    """serialize runs, once, before the temporary file exists: when it raises, nothing was
    written anywhere."""
    path = tmp_path / 'model.h5'
    serializers.save_hdf5(path, kill_saver.state(0))
    old = path.read_bytes()
    obj = FailsHalfway(error, when=hdf5.HDF5Serializer)
    obj.directory = tmp_path
    with pytest.raises(type(error)):
        serializers.save_hdf5(path, obj)
    assert obj.seen == [[]]  # no temporary file yet when it raised
    _assert_intact(path, old, 'hdf5')


@pytest.mark.parametrize('error', ERRORS, ids=ERROR_IDS)
def test_write_fails_midway(fmt, old_file, monkeypatch, error):
    """The third entry's write fails: the temporary file, half written, is removed."""
    path, old = old_file
    seen = []
    if fmt.startswith('npz'):
        module, names = _zipstream.ZipWriter, ['write_member', 'write_small_members']
    else:
        module, names = hdf5, ['write_entry']
    calls = []

    def count():
        calls.append(1)
        if len(calls) == 3:
            seen.append(crafting.temporaries(path.parent))
            raise error

    def failing(original):
        def write(*args, **kwargs):
            count()
            return original(*args, **kwargs)
        return write

    def failing_members(original):  # small members are written many to a call: one each
        def write(writer, members):
            def counted():
                for member in members:
                    count()
                    yield member
            return original(writer, counted())
        return write

    for name in names:
        wrap = failing_members if name == 'write_small_members' else failing
        monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    with pytest.raises(type(error)) as raised:
        FORMATS[fmt][0](path, kill_saver.state(1))
    if getattr(error, 'filename', None) is not None or isinstance(error, ReadFailedError):
        assert raised.value is error  # names its own file: raised as it is
    assert len(seen) == 1 and len(seen[0]) == 1
    monkeypatch.undo()
    _assert_intact(path, old, fmt)


FULL_DISK = r'''
import json, os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
from tests import kill_saver
from tests.test_atomic import FORMATS
fmt, path, limits = sys.argv[1], sys.argv[2], [int(n) for n in sys.argv[3:]]
save = FORMATS[fmt][0]
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
for limit in limits:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        save(path, kill_saver.state(1))
        outcome = 'saved'
    except OSError as error:
        outcome = f'OSError {error.errno}'
    except BaseException as error:
        outcome = f'{type(error).__name__}: {error}'
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    print(json.dumps([limit, outcome, sorted(os.listdir(os.path.dirname(path)))]), flush=True)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='needs RLIMIT_FSIZE')
def test_a_full_disk(fmt, old_file):
    """Real write errors (EFBIG under a file size limit) at many points of a save.

    Run in a subprocess: the limit applies to the whole process.
    """
    path, old = old_file
    size = len(kill_saver.state(1)['w'].tobytes()) * 2
    limits = [0, 1, 100, 1000, 4096] + list(range(5000, size, size // 23))
    result = subprocess.run([sys.executable, '-c', FULL_DISK, fmt, str(path), *map(str, limits)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert [limit for limit, _, _ in outcomes] == limits
    for limit, outcome, listing in outcomes:
        assert outcome == f'OSError {errno.EFBIG}', (limit, outcome)
        assert listing == [path.name], (limit, listing)
    assert 'Exception ignored' not in result.stderr
    _assert_intact(path, old, fmt)


class FailsAfter(io.RawIOBase):
    """A seekable binary file in memory whose writes fail once ``limit`` bytes are written."""

    def __init__(self, limit: int):
        self.data = io.BytesIO()
        self.limit = limit
        self.written = 0

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        return self.data.readinto(buffer)

    def write(self, data):
        data = bytes(data)
        if self.written + len(data) > self.limit:
            raise OSError(errno.ENOSPC, 'No space left on device (simulated)')
        self.written += len(data)
        return self.data.write(data)

    def seek(self, *args):
        return self.data.seek(*args)

    def tell(self):
        return self.data.tell()

    def truncate(self, size=None):
        return self.data.truncate(size)


@pytest.mark.parametrize('limit', [0, 1, 64, 100, 1000, 4096, 10000, 30000])
def test_a_file_object_that_fails_after_n_bytes(fmt, limit):
    """File objects are written as they are: the save raises the write's own error, cleanly."""
    out = FailsAfter(limit)
    with pytest.raises(OSError, match='No space left on device'):
        FORMATS[fmt][0](out, kill_saver.state(1))


def test_a_file_object_with_room_gets_a_whole_file(fmt):
    out = FailsAfter(10 ** 7)
    FORMATS[fmt][0](out, kill_saver.state(1))
    out.seek(0)
    target = kill_saver.zeros()
    FORMATS[fmt][1](io.BytesIO(out.data.getvalue()), target)
    assert target['which'] == 1


class ReadOnlyRead:
    """A file object with ``read`` but no ``readinto`` (h5py accepts those)."""

    def __init__(self):
        self.data = io.BytesIO()
        for name in ('read', 'write', 'seek', 'tell', 'truncate', 'flush'):
            setattr(self, name, getattr(self.data, name))


def test_an_hdf5_file_object_without_readinto():
    out = ReadOnlyRead()
    serializers.save_hdf5(out, kill_saver.state(1))
    target = kill_saver.zeros()
    serializers.load_hdf5(io.BytesIO(out.data.getvalue()), target)
    assert target['which'] == 1


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def _temporary(directory, target: str, pid: int, host: str | None = _fileio.HOST) -> pathlib.Path:
    tag = f'{pid}-{host}-0123456789ab' if host else f'{pid}-0123456789ab'  # None: an old name
    path = directory / f'.{target}.{tag}{_fileio.TEMP_SUFFIX}'
    path.write_bytes(b'a torn save')
    return path


def test_a_save_removes_the_stale_temporaries_of_its_directory(fmt, old_file):
    path, _ = old_file
    directory = path.parent
    sleeper = subprocess.Popen([sys.executable, '-c', 'import signal, time\n'  # as a user's:
                                'signal.signal(signal.SIGHUP, signal.SIG_DFL)\n'  # no nohup
                                'time.sleep(60)'])
    try:
        stale = [_temporary(directory, path.name, _dead_pid()),
                 _temporary(directory, 'other.npz', _dead_pid()),  # another target's
                 _temporary(directory, 'old.h5', _dead_pid(), host=None)]  # an older version's
        reused = _temporary(directory, 'x.npz', sleeper.pid)  # a number the sleeper took later
        os.utime(reused, (time.time() - 3600, time.time() - 3600))
        kept = [_temporary(directory, path.name, os.getpid()),  # a save of this very process
                _temporary(directory, 'y.npz', _dead_pid(), host='0badc0de'),  # another host's
                _temporary(directory, 'z.npz', sleeper.pid)]  # a save still running
        (directory / '.notes.1-x').write_bytes(b'not ours')
        FORMATS[fmt][0](path, kill_saver.state(1))
        time.sleep(0.05)
        assert sleeper.poll() is None  # asked whether it lives, not sent a signal that kills
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not any(p.exists() for p in stale + [reused])
    assert all(p.exists() for p in kept) and (directory / '.notes.1-x').exists()
    target = kill_saver.zeros()
    FORMATS[fmt][1](path, target)
    assert target['which'] == 1


def test_another_users_running_save_is_not_stale():
    """``kill(pid, 0)`` fails with EPERM for another user's process: it is alive."""
    with tempfile.TemporaryDirectory() as name:  # under /tmp: nobody can reach it
        directory = pathlib.Path(name)
        directory.chmod(0o755)
        if os.geteuid() == 0:  # root: look as nobody at a save of root's (this process)
            temporary = _temporary(directory, 'm.npz', os.getpid())
            assert as_nobody(lambda: [t.stale for t in _fileio.temporaries(name)]) == [False]
        else:  # anyone else: look at init's, root's
            temporary = _temporary(directory, 'm.npz', 1)
            assert [t.stale for t in _fileio.temporaries(name)] == [False]
        assert temporary.exists()


def _record_durability(monkeypatch) -> list:
    """Records each fsync (of which inode) and the rename that puts a save in place."""
    events = []
    real_fsync, real_replace = os.fsync, _fileio._replace

    def fsync(fd):
        events.append(('fsync', os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(temp, path):
        events.append(('rename', os.stat(temp).st_ino))
        real_replace(temp, path)

    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(_fileio, '_replace', replace)
    return events


@pytest.mark.parametrize('durable', [True, False, None], ids=['durable', 'not', 'default'])
def test_durable_saves_fsync_the_file_then_rename_then_fsync_the_directory(
        fmt, tmp_path, monkeypatch, durable):
    """``durable=True`` (the default): the new file's data reaches the disk before it takes the
    name, and the directory entry after; ``durable=False``: the rename alone."""
    events = _record_durability(monkeypatch)
    save, load, ext = FORMATS[fmt]
    path = tmp_path / f'model{ext}'
    options = {} if durable is None else {'durable': durable}
    for which in (0, 1):  # a new file, then over an old one
        events.clear()
        save(path, kill_saver.state(which), **options)
        file, directory = os.stat(path).st_ino, os.stat(tmp_path).st_ino
        if durable is False:
            assert events == [('rename', file)]
        else:
            assert events == [('fsync', file), ('rename', file), ('fsync', directory)]
        target = kill_saver.zeros()
        load(path, target)
        assert target['which'] == which
    assert crafting.temporaries(tmp_path) == []


def test_saving_to_a_directory_path(fmt, tmp_path):
    (tmp_path / 'model').mkdir()
    with pytest.raises(IsADirectoryError, match=re.escape(
            f"cannot save to {str(tmp_path / 'model')!r}: it is a directory")):
        FORMATS[fmt][0](tmp_path / 'model', kill_saver.state(0))
    assert sorted(os.listdir(tmp_path)) == ['model']
    assert os.listdir(tmp_path / 'model') == []


def test_saving_into_a_missing_directory(fmt, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'missing'))):
        FORMATS[fmt][0](tmp_path / 'missing' / 'model', kill_saver.state(0))
    assert os.listdir(tmp_path) == []


def test_the_old_file_keeps_its_permissions(fmt, old_file):
    path, _ = old_file
    os.chmod(path, 0o600)
    FORMATS[fmt][0](path, kill_saver.state(1))
    assert os.stat(path).st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------------------------------
# SIGKILL at random points of repeated saves

KILLS = 24


@pytest.mark.skipif(not hasattr(signal, 'SIGKILL'), reason='needs SIGKILL')
@pytest.mark.parametrize('kill_fmt', ['npz', 'npz-stored', 'hdf5', 'npz-async', 'hdf5-async'])
def test_sigkill_during_saves_leaves_a_whole_file(tmp_path, kill_fmt):
    """A process saving two states alternately is killed at random points, again and again
    (``-async``: the saves written in the background, the next one started at once).

    After each kill the file loads completely and equals one of the two states, and at most
    one temporary file is left (the next saver's first save removes it).
    """
    rng = random.Random(5)
    save, load, ext = FORMATS[kill_fmt.removesuffix('-async')]
    path = tmp_path / f'model{ext}'
    states = [kill_saver.state(0), kill_saver.state(1)]
    seen, torn = set(), 0
    for _ in range(KILLS):
        saver = subprocess.Popen([sys.executable, '-m', 'tests.kill_saver', kill_fmt, str(path)],
                                 cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert saver.stdout.readline() == 'ready\n'
            time.sleep(rng.uniform(0, 0.03))
        finally:
            saver.send_signal(signal.SIGKILL)
            saver.wait()
            saver.stdout.close()
        left = len(crafting.temporaries(tmp_path))
        assert left <= 1
        torn += left
        target = kill_saver.zeros()
        load(path, target)
        which = target['which']
        seen.add(which)
        _assert_state_equal(target, states[which])
    assert seen == {0, 1} and torn > 0  # kills landed between saves and inside them
    save(path, states[0])
    assert crafting.temporaries(tmp_path) == []


def _assert_state_equal(got, expected):
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_state_equal(got[key], value)
        elif isinstance(value, numpy.ndarray):
            assert got[key].tobytes() == value.tobytes(), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize('name', ['npz', 'hdf5'])
def test_a_save_to_a_symlink_writes_through_it(tmp_path, name):
    save, load = ((serializers.save_npz, serializers.load_npz) if name == 'npz'
                  else (serializers.save_hdf5, serializers.load_hdf5))
    real = tmp_path / 'real' / 'm.bin'
    real.parent.mkdir()
    link = tmp_path / 'link.bin'
    os.symlink(real, link)
    save(link, {'w': numpy.arange(3.0)})
    assert link.is_symlink() and real.is_file()
    target = {'w': numpy.zeros(3)}
    load(real, target)
    numpy.testing.assert_array_equal(target['w'], numpy.arange(3.0))


@pytest.mark.parametrize('level', [0, 4], ids=['plain', 'gzip'])
@pytest.mark.parametrize('operation', ['save', 'load', 'convert-to-h5', 'convert-from-h5'])
def test_ctrl_c_stops_long_hdf5_work_within_a_second(tmp_path, operation, level):
    """h5py loses a KeyboardInterrupt raised while HDF5 runs; gpuserial raises it between
    blocks, so the work stops, the old file stays and no temporary file is left."""
    values = {'w': interrupt_child.values()}
    serializers.save_hdf5(tmp_path / 'in.h5', values, compression=level)
    serializers.save_npz(tmp_path / 'in.npz', values)
    for name in ('out.h5', 'out.npz'):
        (tmp_path / name).write_bytes(b'the old file')
    child = subprocess.Popen([sys.executable, '-m', 'tests.interrupt_child', operation,
                              str(level), str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == 'ready\n'
    time.sleep(0.3)  # well into the first runs
    sent = time.time()
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=30)
    word, _, when = out.partition(' ')
    assert word == 'interrupted', out
    assert float(when) - sent < 1.0
    for name, load in (('out.h5', serializers.load_hdf5), ('out.npz', serializers.load_npz)):
        if (tmp_path / name).read_bytes() != b'the old file':  # a run before the interrupt
            target = {'w': numpy.zeros_like(values['w'])}
            load(tmp_path / name, target)
            assert (target['w'] == values['w']).all()
    assert crafting.temporaries(tmp_path) == []


def test_names_that_only_look_like_temporaries_are_left_alone(tmp_path):
    for name in ('.m.npz.abc-host-token', '.m.npz.12', '.m.npz.1-2-3-4'):
        (tmp_path / (name + _fileio.TEMP_SUFFIX)).write_bytes(b'not ours')
    assert _fileio.temporaries(str(tmp_path)) == []
    assert _fileio.remove_stale_temporaries(str(tmp_path)) == []
    assert len(list(tmp_path.iterdir())) == 3


def test_removing_stale_temporaries_says_which_and_unlinks_links_not_targets(tmp_path):
    kept = tmp_path / 'precious.npz'
    kept.write_bytes(b'keep me')
    stale = _temporary(tmp_path, 'a.npz', _dead_pid())
    linked = tmp_path / f'.b.npz.{_dead_pid()}-{_fileio.HOST}-0123456789ab{_fileio.TEMP_SUFFIX}'
    linked.symlink_to(kept)
    dangling = tmp_path / f'.c.npz.{_dead_pid()}-{_fileio.HOST}-0123456789ab{_fileio.TEMP_SUFFIX}'
    dangling.symlink_to(tmp_path / 'nowhere')
    removed = _fileio.remove_stale_temporaries(str(tmp_path))
    assert sorted(t.path for t in removed) == sorted(map(str, (stale, linked, dangling)))
    assert [p.name for p in tmp_path.iterdir()] == ['precious.npz']
    assert kept.read_bytes() == b'keep me'


def test_a_process_started_more_than_a_second_after_the_write_took_a_reused_number(
        monkeypatch):
    alive = os.getppid()
    for started, gone in ((1001.0, False), (1001.5, True)):
        monkeypatch.setattr(_fileio, '_started', lambda pid, started=started: started)
        assert _fileio._gone(alive, 1000.0) is gone


def test_a_process_whose_name_holds_a_parenthesis_still_has_a_start_time():
    child = subprocess.Popen([sys.executable, '-c', 'import sys, time\n'
                              'open("/proc/self/comm", "w").write("a) b c d e f g h i j")\n'
                              'print(flush=True); time.sleep(30)'], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # renamed
        started = _fileio._started(child.pid)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert started is not None and abs(started - time.time()) < 10


def test_an_error_about_another_file_passes_through_unchanged(tmp_path):
    error = FileNotFoundError(errno.ENOENT, 'No such file or directory', '/elsewhere')
    with pytest.raises(FileNotFoundError) as raised, \
            _fileio.atomic_path(tmp_path / 'm.npz', durable=False):
        raise error
    assert raised.value is error
    with pytest.raises(FileNotFoundError, match='creating a temporary file beside it') as raised, \
            _fileio.atomic_path(tmp_path / 'm.npz', durable=False) as temp:
        open(temp, 'rb')  # an error about the temporary file: it names the user's
    assert raised.value.filename == str(tmp_path / 'm.npz')


@pytest.mark.parametrize('fmt', ['npz', 'h5'])
def test_a_durable_save_closes_what_it_opens_and_a_new_file_has_the_umask_mode(tmp_path, fmt):
    save = serializers.save_npz if fmt == 'npz' else serializers.save_hdf5
    save(tmp_path / f'warm.{fmt}', {'W': numpy.zeros(3)})
    before = sorted(os.listdir('/proc/self/fd'))
    save(tmp_path / f'm.{fmt}', {'W': numpy.zeros(3)}, durable=True)
    assert sorted(os.listdir('/proc/self/fd')) == before
    assert os.stat(tmp_path / f'm.{fmt}').st_mode & 0o7777 == 0o666 & ~_fileio._UMASK


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='renameat2 is Linux\'s')
def test_a_save_over_a_file_swaps_names_rather_than_renaming_over_it(tmp_path, monkeypatch):
    """ext4 flushes a file renamed over another before the rename returns; an exchange and an
    unlink of the old file do not make it wait."""
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, 'replace', lambda *args: renamed.append(args) or real_replace(*args))
    serializers.save_npz(tmp_path / 'm.npz', {'W': numpy.zeros(3)}, durable=False)
    assert len(renamed) == 1  # a new file: a plain rename
    serializers.save_npz(tmp_path / 'm.npz', {'W': numpy.ones(3)}, durable=False)
    assert len(renamed) == 1  # over the old one: exchanged
    assert [p.name for p in tmp_path.iterdir()] == ['m.npz']
    with numpy.load(tmp_path / 'm.npz') as stored:
        assert stored['W'].tolist() == [1, 1, 1]


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler, as an interactive program has it (a background job's
    SIGINT may be ignored, or a test runner's handler in place), put back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs between bytecodes, soon after


@pytest.mark.usefixtures('default_sigint')
def test_ctrl_c_waits_for_a_check_and_the_handler_comes_back():
    with pytest.raises(KeyboardInterrupt):
        with _signals.deferred():
            _interrupt()  # remembered, not raised
            _signals.check()
            pytest.fail('check() did not raise')
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # no check in the block: raised at its end
        with _signals.deferred():
            _interrupt()
    _signals.check()  # nothing left over


@pytest.mark.usefixtures('default_sigint')
def test_what_hdf5_made_of_an_interrupt_becomes_the_interrupt():
    with pytest.raises(KeyboardInterrupt) as raised:
        with _signals.deferred():
            _interrupt()
            raise OSError('Can\'t write data (what h5py raises for a lost interrupt)')
    assert isinstance(raised.value.__cause__, OSError)
    with pytest.raises(OSError, match='no interrupt') as raised:  # without one: as it is
        with _signals.deferred():
            raise OSError('no interrupt')
    assert raised.value.__cause__ is None


@pytest.mark.usefixtures('default_sigint')
def test_an_interrupt_is_raised_once_even_if_the_block_catches_it():
    with _signals.deferred():
        _interrupt()
        with pytest.raises(KeyboardInterrupt):
            _signals.check()
        _signals.check()  # handled: not raised again, nor at the block's end


def test_only_the_main_threads_default_handler_is_replaced():
    errors = []
    thread = threading.Thread(target=lambda: _catch(errors, _deferred_and_checked))
    thread.start()
    thread.join(30)
    assert errors == []
    own = lambda signum, frame: None  # noqa: E731 - the program's own handler
    previous = signal.signal(signal.SIGINT, own)
    try:
        with _signals.deferred():
            assert signal.getsignal(signal.SIGINT) is own
    finally:
        signal.signal(signal.SIGINT, previous)


def _deferred_and_checked():
    with _signals.deferred():
        _signals.check()


def _catch(errors, function):
    try:
        function()
    except Exception as error:
        errors.append(error)


def test_importing_gpuserial_leaves_the_process_umask_as_it_was():
    code = ('import os\nos.umask(0o027)\nimport gpuserial.storage._fileio\n'
            'print(oct(os.umask(0)))\n')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True, cwd=REPO)
    assert done.stdout.strip() == '0o27'


def test_a_save_into_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot save to .*: no such directory "
                                                + repr(str(tmp_path / 'missing'))):
        serializers.save_npz(tmp_path / 'missing' / 'm.npz', {'x': numpy.zeros(2)})


class _WritebackCalls:
    """Stands in for ``sync_file_range``: records each call (offset, length, flags, the file's
    size then) and passes it on to the real one where there is one."""

    def __init__(self, monkeypatch, step: int):
        self.calls: list[tuple[int, int, int, int]] = []
        self.real = _fileio._sync_file_range
        monkeypatch.setattr(_fileio, '_sync_file_range', self)
        monkeypatch.setattr(_fileio, 'WRITEBACK_STEP', step)
        monkeypatch.setattr(_fileio, 'WRITEBACK_MIN', 2 * step)

    def __call__(self, fd: int, offset: int, length: int, flags: int) -> int:
        self.calls.append((offset, length, flags, os.fstat(fd).st_size))
        return 0 if self.real is None else self.real(fd, offset, length, flags)

    def handed(self) -> list[tuple[int, int]]:
        return [(o, n) for o, n, flags, _ in self.calls if flags == _fileio._SYNC_FILE_RANGE_WRITE]

    def waited(self) -> list[tuple[int, int]]:
        return [(o, n) for o, n, flags, _ in self.calls if flags != _fileio._SYNC_FILE_RANGE_WRITE]


def _until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, 'the writeback thread did not keep up'
        time.sleep(0.001)


def test_the_early_writeback_hands_each_written_step_to_the_disk_and_waits_for_the_one_before(
        tmp_path, monkeypatch):
    step = 4096
    calls = _WritebackCalls(monkeypatch, step)
    path = tmp_path / 'file'
    with _fileio._early_writeback(str(path)):
        time.sleep(0.02)  # the thread looks for the file before it exists
        with open(path, 'xb') as f:
            for written, whole_steps in ((step, 1), (2 * step, 3), (3 * step + step // 2, 6)):
                f.write(os.urandom(written))
                f.flush()
                _until(lambda n=whole_steps * step: sum(m for _, m in calls.handed()) >= n)
    # 1 step, then 2 more (handed as one range), then 3.5 more: 3 whole ones, the half left
    assert calls.handed() == [(0, step), (step, 2 * step), (3 * step, 3 * step)]
    assert calls.waited() == [(0, step), (step, 2 * step)]
    assert all(offset + length <= size for offset, length, _, size in calls.calls)
    assert [t.name for t in threading.enumerate() if t.name == 'gpuserial-writeback'] == []


@pytest.mark.parametrize('fmt', ['npz', 'npz-stored', 'hdf5'])
def test_a_durable_save_hands_its_bytes_to_the_disk_while_it_writes(fmt, tmp_path, monkeypatch):
    """Only durable saves, and only the file's bytes written so far, in whole steps, in order;
    the save's file is whole and its descriptors closed."""
    from gpuserial.engine import transfer
    step = 64 << 10
    calls = _WritebackCalls(monkeypatch, step)
    real_check = _signals.check
    monkeypatch.setattr(_signals, 'check', lambda: time.sleep(0.002) or real_check())
    state = {f'a{i}': numpy.random.default_rng(i).random(1 << 17) for i in range(4)}  # 4 MiB
    save, load, ext = FORMATS[fmt]
    before = sorted(os.listdir('/proc/self/fd'))
    with transfer.configure(chunk_bytes=64 << 10):
        save(tmp_path / f'fast{ext}', state, durable=False)
        assert calls.calls == []
        save(tmp_path / f'm{ext}', state)
    size = os.stat(tmp_path / f'm{ext}').st_size
    handed = calls.handed()
    assert sum(n for _, n in handed) >= size // 2  # most of it before the save ended
    assert [o for o, _ in handed] == [0] + list(itertools.accumulate(n for _, n in handed[:-1]))
    assert all(o % step == 0 and n % step == 0 and o + n <= size for o, n in handed)
    assert calls.waited() == handed[:len(calls.waited())]
    assert len(calls.waited()) >= len(handed) - 1
    assert sorted(os.listdir('/proc/self/fd')) == before
    target = {key: numpy.zeros_like(value) for key, value in state.items()}
    load(tmp_path / f'm{ext}', target)
    assert all(numpy.array_equal(target[key], state[key]) for key in state)


def _failing_writeback(monkeypatch, error: int, on_flags: int) -> list:
    """``sync_file_range`` failing with ``error`` for calls with ``on_flags``; its calls."""
    calls = []

    def call(fd, offset, length, flags):
        calls.append((offset, length, flags))
        if flags != on_flags:
            return 0
        ctypes.set_errno(error)
        return -1

    monkeypatch.setattr(_fileio, '_sync_file_range', call)
    return calls


def _pace_the_save_to_the_writeback(monkeypatch, directory, calls: list, failing: int) -> None:
    """Each interrupt check of the save waits until the writeback thread has
    handed over every whole step of the temporary file in ``directory``, or its call with
    ``failing`` flags came: the thread sees the file grow step by step, however loaded the
    machine (a fixed sleep here let a busy machine's save end before the thread looked twice)."""
    real_check = _signals.check

    def handed_over() -> bool:
        if any(flags == failing for _, _, flags in calls):
            return True  # the thread has failed, and stopped
        names = crafting.temporaries(directory)
        written = max((os.stat(directory / name).st_size for name in names), default=0)
        whole = written // _fileio.WRITEBACK_STEP * _fileio.WRITEBACK_STEP
        return max((o + n for o, n, _ in calls), default=0) >= whole

    def paced_check():
        _until(handed_over)
        real_check()

    monkeypatch.setattr(_signals, 'check', paced_check)


@pytest.mark.parametrize('error', [errno.EINVAL, errno.ENOSYS, errno.ESPIPE],
                         ids=['einval', 'enosys', 'espipe'])
def test_where_the_writeback_call_is_unsupported_the_save_goes_on_without_it(
        tmp_path, monkeypatch, error):
    calls = _failing_writeback(monkeypatch, error, _fileio._SYNC_FILE_RANGE_WRITE)
    monkeypatch.setattr(_fileio, 'WRITEBACK_STEP', 4096)
    path = tmp_path / 'file'
    with _fileio._early_writeback(str(path)):
        with open(path, 'xb') as f:
            f.write(bytes(3 * 4096))
            f.flush()
            _until(lambda: calls)
            f.write(bytes(3 * 4096))
            f.flush()
            time.sleep(0.05)
    assert len(calls) == 1  # tried once, then left to the fsync


@pytest.mark.parametrize('flags', [_fileio._SYNC_FILE_RANGE_WRITE,
                                   _fileio._SYNC_FILE_RANGE_WRITE_AND_WAIT],
                         ids=['start', 'wait'])
@pytest.mark.parametrize('error', [errno.EIO, errno.ENOSPC], ids=['eio', 'enospc'])
def test_a_failed_writeback_fails_the_durable_save_and_leaves_the_old_file(
        fmt, old_file, monkeypatch, flags, error):
    """The kernel reports a writeback error once, to the call that waits (or starts) it: the
    fsync after would not see it, so the save raises it, and the old file stays."""
    from gpuserial.engine import transfer
    calls = _failing_writeback(monkeypatch, error, flags)
    monkeypatch.setattr(_fileio, 'WRITEBACK_STEP', 64 << 10)
    monkeypatch.setattr(_fileio, 'WRITEBACK_MIN', 0)
    path, old = old_file
    _pace_the_save_to_the_writeback(monkeypatch, path.parent, calls, flags)
    # 8 MiB: deflated members reach the file a 1 MiB block at a time, and the thread must see
    # it grow more than once
    state = dict(kill_saver.state(1), big=numpy.random.default_rng(0).random(1 << 20))
    with transfer.configure(chunk_bytes=64 << 10), \
            pytest.raises(OSError, match=r'\(writing the file back to the disk\)') as raised:
        FORMATS[fmt][0](path, state)
    assert raised.value.errno == error and raised.value.filename == str(path)
    assert calls[-1][2] == flags
    _assert_intact(path, old, fmt)


@pytest.mark.parametrize('error', [errno.EIO, errno.EDQUOT], ids=['eio', 'edquot'])
def test_a_failed_fsync_fails_the_durable_save_naming_the_file_and_leaves_the_old_file(
        fmt, old_file, monkeypatch, error):
    def failing_fsync(fd):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, 'fsync', failing_fsync)
    path, old = old_file
    with pytest.raises(OSError, match=re.escape(
            f'{os.strerror(error)} (flushing the file to the disk)')) as raised:
        FORMATS[fmt][0](path, kill_saver.state(1))
    assert raised.value.errno == error and raised.value.filename == str(path)
    assert type(raised.value) is OSError  # with the failing call's frames
    assert 'failing_fsync' in [f.name for f in traceback.extract_tb(raised.value.__traceback__)]
    _assert_intact(path, old, fmt)
    assert crafting.temporaries(path.parent) == []


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="sync_file_range is Linux's")
def test_the_writeback_call_is_bound_to_linuxs_own(tmp_path):
    """64-bit offsets beyond 4 GiB reach the kernel as they are: a range there of a file
    opened for reading is accepted, a negative one refused with EINVAL."""
    path = tmp_path / 'file'
    path.write_bytes(b'x' * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _fileio._sync_file_range(fd, 5 << 30, 4096, _fileio._SYNC_FILE_RANGE_WRITE) == 0
        assert _fileio._sync_file_range(fd, 0, 4096,
                                        _fileio._SYNC_FILE_RANGE_WRITE_AND_WAIT) == 0
        assert _fileio._sync_file_range(fd, -1, 4096, _fileio._SYNC_FILE_RANGE_WRITE) == -1
        assert ctypes.get_errno() == errno.EINVAL
    finally:
        os.close(fd)


def test_the_writeback_flags_are_the_kernels():
    """As ``<linux/fs.h>`` defines them (the kernel's ABI): a wrong value would start no
    writeback, or stop waiting for the step before, and still pass every other test."""
    assert _fileio._SYNC_FILE_RANGE_WRITE == 2  # SYNC_FILE_RANGE_WRITE
    assert _fileio._SYNC_FILE_RANGE_WRITE_AND_WAIT == 7  # ..._WAIT_BEFORE | _WRITE | _WAIT_AFTER


@pytest.mark.parametrize('fmt', ['npz', 'npz-stored', 'hdf5'])
def test_only_durable_saves_of_writeback_min_bytes_or_more_start_the_writeback(
        fmt, tmp_path, monkeypatch):
    """Below it the thread would cost a small save more than the fsync it shortens."""
    started = []
    real = _fileio._early_writeback
    monkeypatch.setattr(_fileio, '_early_writeback', lambda path, target: started.append(path)
                        or real(path, target))
    save, load, ext = FORMATS[fmt]
    state = {'a': numpy.random.default_rng(0).random(1 << 14)}  # 128 KiB
    save(tmp_path / f'small{ext}', state)
    assert started == []
    monkeypatch.setattr(_fileio, 'WRITEBACK_MIN', state['a'].nbytes)
    save(tmp_path / f'm{ext}', state)
    save(tmp_path / f'not{ext}', state, durable=False)
    assert len(started) == 1 and os.path.basename(started[0]).startswith(f'.m{ext}.')
    target = {'a': numpy.zeros(1 << 14)}
    load(tmp_path / f'm{ext}', target)
    assert numpy.array_equal(target['a'], state['a'])


def test_where_no_thread_can_start_a_durable_save_goes_on_without_the_writeback(
        tmp_path, monkeypatch):
    def refused(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_fileio, 'WRITEBACK_MIN', 0)
    monkeypatch.setattr(threading.Thread, 'start', refused)
    serializers.save_npz(tmp_path / 'm.npz', kill_saver.state(1), compression=False)
    target = kill_saver.zeros()
    serializers.load_npz(tmp_path / 'm.npz', target)
    assert target['which'] == 1


@pytest.mark.parametrize('stem', ['m' * 250, 'é' * 125, 'm' + 'é' * 124],
                         ids=['ascii', 'two-byte', 'two-byte-odd'])
def test_a_name_as_long_as_names_may_be_saves_through_a_shorter_temporary_name(fmt, tmp_path,
                                                                               stem):
    """A temporary name adds about 45 bytes to the target's: cut short (between characters),
    it still fits, where it failed with ENAMETOOLONG though the target's name was valid."""
    save, load, ext = FORMATS[fmt]
    path = tmp_path / (stem[:(255 - len(ext)) // len(stem[-1].encode())] + ext)
    assert 250 <= len(os.fsencode(path.name)) <= 255
    save(path, kill_saver.state(1))
    save(path, kill_saver.state(0))  # over the file: a second temporary name, swapped in
    assert os.listdir(tmp_path) == [path.name]
    target = kill_saver.zeros()
    load(path, target)
    assert target['which'] == 0


def test_a_name_longer_than_names_may_be_is_refused_before_anything_is_written(fmt, tmp_path):
    path = tmp_path / ('m' * 253 + FORMATS[fmt][2])
    message = (f"[Errno {errno.ENAMETOOLONG}] File name too long (its name has "
               f"{len(path.name)} bytes; names in its directory have at most 255): {str(path)!r}")
    with pytest.raises(OSError, match=re.escape(message)) as raised:
        FORMATS[fmt][0](path, kill_saver.state(0))
    assert raised.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError, match=re.escape(message)):  # at the call
        gpuserial.save_async(path, kill_saver.state(0))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('length', [254, 255])
def test_a_temporary_name_keeps_as_much_of_the_target_name_as_fits(fmt, tmp_path, monkeypatch,
                                                                   length):
    """Cut short no further than needed: the temporary name is as long as a name there may be
    (255 bytes), so that one left behind says as much as it can of whose it is; and a target
    name of exactly 255 bytes saves."""
    save, load, ext = FORMATS[fmt]
    path = tmp_path / ('m' * (length - len(ext)) + ext)
    temporaries = []
    replace = _fileio._replace
    monkeypatch.setattr(_fileio, '_replace', lambda temp, target: (
        temporaries.append(os.path.basename(temp)), replace(temp, target))[1])
    save(path, kill_saver.state(1))
    assert os.listdir(tmp_path) == [path.name]
    [name] = temporaries
    assert len(os.fsencode(name)) == 255 and name.startswith('.mmm')
    assert name.endswith(_fileio.TEMP_SUFFIX)


def _name_max_of(directory: pathlib.Path, most: int | None):
    """``os.pathconf`` as on a file system whose names in ``directory`` have at most ``most``
    bytes (eCryptfs: 143), or as where the system does not say (None)."""
    pathconf = os.pathconf

    def fake(path, name):
        if most is None:
            raise OSError(errno.EINVAL, 'Invalid argument')
        return most if os.path.samefile(path, directory) else pathconf(path, name)
    return fake


@pytest.mark.parametrize(('most', 'length'), [(143, 144), (None, 256)],
                         ids=['eCryptfs', 'unknown'])
def test_a_name_longer_than_the_directory_takes_is_refused_naming_its_limit(
        fmt, tmp_path, monkeypatch, most, length):
    """The limit is the target directory's (not the working directory's). Where the system
    does not say, nothing is refused up front (Windows has no pathconf, and NTFS counts UTF-16
    units): the system refuses the name, with its own error, and nothing is left."""
    save, load, ext = FORMATS[fmt]
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'elsewhere')  # another directory, with longer names
    monkeypatch.setattr(os, 'pathconf', _name_max_of(tmp_path, most))
    path = tmp_path / ('m' * (length - len(ext)) + ext)
    said = (re.escape(f'(its name has {length} bytes; names in its directory have at most '
                      f'{most}): {str(path)!r}') if most else 'File name too long')
    with pytest.raises(OSError, match=said) as raised:
        save(path, kill_saver.state(0))
    assert raised.value.errno == errno.ENAMETOOLONG
    assert os.listdir(tmp_path) == ['elsewhere']
    shorter = tmp_path / ('m' * (length - 1 - len(ext)) + ext)
    save(shorter, kill_saver.state(1))  # a temporary name that fits the limit too
    assert sorted(os.listdir(tmp_path)) == sorted(['elsewhere', shorter.name])


def test_a_change_of_working_directory_during_a_save_changes_nothing(fmt, tmp_path, monkeypatch):
    """Another thread's os.chdir while a save to a relative path writes: the file goes where
    the save began, as numpy.save's (which opens it once); it failed, or left its temporary."""
    (tmp_path / 'here').mkdir()
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'here')
    if fmt.startswith('npz'):
        owner, attribute = _zipstream.ZipWriter, 'write_small_members'
    else:
        owner, attribute = hdf5, 'write_entry'
    original = getattr(owner, attribute)

    def moving(*args, **kwargs):
        os.chdir(tmp_path / 'elsewhere')
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, moving)
    save, load, ext = FORMATS[fmt]
    save('model' + ext, kill_saver.state(1))
    assert os.listdir(tmp_path / 'elsewhere') == []
    assert os.listdir(tmp_path / 'here') == ['model' + ext]
    monkeypatch.undo()
    target = kill_saver.zeros()
    load(tmp_path / 'here' / ('model' + ext), target)
    assert target['which'] == 1


@pytest.mark.parametrize('how', ['relative', 'absolute'])
def test_a_path_through_a_link_and_up_saves_where_the_system_reads_it(fmt, tmp_path,
                                                                     monkeypatch, how):
    """``link/../m`` names the file beside the link's target, as open() and numpy.save read
    it; os.path.abspath took it for ``./m`` and saved there, beside the link, where the load of
    the same path then read another file."""
    (tmp_path / 'real' / 'sub').mkdir(parents=True)
    (tmp_path / 'work').mkdir()
    (tmp_path / 'work' / 'link').symlink_to(tmp_path / 'real' / 'sub')
    monkeypatch.chdir(tmp_path / 'work')
    save, load, ext = FORMATS[fmt]
    name = os.path.join('link', '..', 'model' + ext)
    save(name if how == 'relative' else str(tmp_path / 'work' / name), kill_saver.state(1))
    assert os.listdir(tmp_path / 'work') == ['link']
    assert sorted(os.listdir(tmp_path / 'real')) == ['model' + ext, 'sub']
    target = kill_saver.zeros()
    load(name, target)
    assert target['which'] == 1


@pytest.mark.parametrize('how', ['relative', 'absolute'])
@pytest.mark.parametrize('ext', ['.npz', '.h5'])
def test_an_asynchronous_save_through_a_link_and_up_saves_where_the_system_reads_it(
        tmp_path, monkeypatch, how, ext):
    (tmp_path / 'real' / 'sub').mkdir(parents=True)
    (tmp_path / 'work').mkdir()
    (tmp_path / 'work' / 'link').symlink_to(tmp_path / 'real' / 'sub')
    monkeypatch.chdir(tmp_path / 'work')
    name = os.path.join('link', '..', 'model' + ext)
    gpuserial.save_async(name if how == 'relative' else str(tmp_path / 'work' / name),
                         {'w': numpy.arange(3.0)}).result(timeout=30)
    assert os.listdir(tmp_path / 'work') == ['link']
    assert gpuserial.load(tmp_path / 'real' / ('model' + ext))['w'].tolist() == [0, 1, 2]


@pytest.mark.parametrize('limit', [-1, 0], ids=['indeterminate', 'zero'])
def test_a_directory_whose_name_limit_the_system_does_not_know_takes_saves(fmt, tmp_path,
                                                                          monkeypatch, limit):
    """pathconf says -1 where a limit is indeterminate: every save was refused as 'File name
    too long (its name has 9 bytes; names in its directory have at most -1)'."""
    monkeypatch.setattr(os, 'pathconf', lambda path, name: limit)
    save, load, ext = FORMATS[fmt]
    save(tmp_path / ('model' + ext), kill_saver.state(1))
    monkeypatch.undo()
    target = kill_saver.zeros()
    load(tmp_path / ('model' + ext), target)
    assert target['which'] == 1 and os.listdir(tmp_path) == ['model' + ext]


def test_a_name_limit_shorter_than_the_temporary_tag_ends(tmp_path, monkeypatch):
    """A file system whose names are short (14 or 30 bytes): the temporary name's NAME is cut
    to nothing and the name made as it is (the system says if it is too long); cutting it
    looped for ever."""
    monkeypatch.setattr(os, 'pathconf', lambda path, name: 30)
    made = []
    thread = threading.Thread(target=lambda: made.append(_fileio._temp_path(
        str(tmp_path / 'model.npz'))), daemon=True)
    thread.start()
    thread.join(30)
    assert len(made) == 1 and os.path.basename(made[0]).startswith('..')
    assert made[0].endswith(_fileio.TEMP_SUFFIX)


def test_where_the_system_has_no_pathconf_a_long_name_is_left_to_it(tmp_path, monkeypatch):
    """No pathconf (Windows): NTFS's names have 255 UTF-16 units, not 255 UTF-8 bytes, so a
    name of 100 CJK characters (300 bytes) is not refused, and the temporary name is cut to
    255 bytes, which is fewer units."""
    monkeypatch.delattr(os, 'pathconf')
    path = str(tmp_path / ('字' * 100 + '.npz'))
    assert _fileio.save_target(path) == path
    temp = os.path.basename(_fileio._temp_path(path))
    assert 240 < len(temp.encode()) <= 255 and temp.startswith('.字')
