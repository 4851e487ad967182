"""Files: atomic writes to paths, and paths or binary file objects handled alike."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import io
import os
import secrets
import socket
import sys
import threading
from collections.abc import Iterator
from typing import BinaryIO, cast

from gpuserial.errors import naming
from gpuserial.storage import remote

TEMP_SUFFIX = '.gpuserial-tmp'


def is_path(file) -> bool:
    """Whether ``file`` is a local path (a URL is not: see :mod:`gpuserial.storage.remote`)."""
    return isinstance(file, (str, bytes, os.PathLike)) and not remote.is_url(file)


def display_name(file) -> str:
    """How messages name ``file``: its path or URL, or the name of a file object, or its
    type."""
    if remote.is_remote(file):
        return remote.display(file)
    if is_path(file):
        return os.fsdecode(file)
    name = getattr(file, 'name', None)
    return name if isinstance(name, str) else f'<{type(file).__name__}>'


def check_options_have_a_url(storage_options: dict | None, *files) -> None:
    """For calls on several files (diff, convert, consolidate), where ``storage_options``
    serve the URLs among them: refuses options that no URL would take (silently ignored,
    they would hide a mistake, as they would for one local file).

    Raises:
        TypeError: ``storage_options`` given and none of ``files`` is a URL.
    """
    if storage_options is not None and not any(remote.is_url(file) for file in files):
        names = ' nor '.join(repr(display_name(file)) for file in files)
        raise TypeError(f'storage_options= goes with a URL, not with {names}')


def check_file_object(file, *, writing: bool) -> None:
    """Refuses, naming it, a file object that cannot be read (``writing``: written) as bytes.

    Paths and URLs pass. Left alone, a text-mode file's bytes would reach the formats as
    decoding errors (or, for HDF5's writes, crash the process inside libhdf5), and a closed or
    read-only file would look like a corrupt one.

    Raises:
        TypeError: a file open in text mode, or no file object at all (arguments swapped).
        ValueError: a closed file.
        io.UnsupportedOperation: a file not open for reading (``writing``: for writing).
    """
    if is_path(file) or remote.is_remote(file):
        return
    mode = 'wb' if writing else 'rb'
    # .file: what tempfile.NamedTemporaryFile wraps
    if isinstance(file, io.TextIOBase) or isinstance(getattr(file, 'file', None), io.TextIOBase):
        raise TypeError(f'{display_name(file)!r}: the file object is open in text mode; '
                        f'open it in binary mode ({mode!r})')
    needed = 'write' if writing else 'read'
    if not callable(getattr(file, needed, None)):
        raise TypeError(f'{display_name(file)!r}: not a path, a URL or a binary file object '
                        f'({type(file).__name__!r} object has no {needed}())')
    if getattr(file, 'closed', False) is True:
        raise ValueError(f'{display_name(file)!r}: the file object is closed')
    able = getattr(file, 'writable' if writing else 'readable', None)
    if callable(able) and able() is False:
        raise io.UnsupportedOperation(
            f'{display_name(file)!r}: the file object is not open for '
            f'{"writing" if writing else "reading"} (open it with {mode!r})')


def _temp_path(path: str) -> str:
    """A fresh temporary name beside ``path``, ``.NAME.PID-HOST-TOKEN.gpuserial-tmp``, NAME cut
    short where the whole would be longer than a name in that directory may be."""
    directory, name = os.path.split(path)
    tag = f'{os.getpid()}-{HOST}-{secrets.token_hex(6)}{TEMP_SUFFIX}'
    room = (_name_max(directory) or UNKNOWN_NAME_MAX) - len(os.fsencode(f'..{tag}'))
    while name and len(os.fsencode(name)) > room:  # no room at all: creating it says so
        name = name[:-1]
    return os.path.join(directory, f'.{name}.{tag}')


UNKNOWN_NAME_MAX = 255  # bytes a temporary name may have where the system does not say: NTFS's
#                         255 UTF-16 units take at least as many characters


def _name_max(directory: str) -> int | None:
    """The most bytes a name in ``directory`` may have, or None where the system does not say
    (no ``pathconf``, as on Windows, or no limit it knows: -1, 0)."""
    try:
        most = os.pathconf(directory or '.', 'PC_NAME_MAX')
    except (OSError, ValueError, AttributeError):  # AttributeError: no pathconf (Windows)
        return None
    return most if most > 0 else None


def absolute(path: str) -> str:
    """``path`` joined to the working directory, its ``..`` parts left for the system to read:
    ``os.path.abspath`` would take ``link/../m.npz`` for ``./m.npz``, where the system reads the
    parent of the link's target."""
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # in temporary names


@dataclasses.dataclass(frozen=True)
class Temporary:
    """A temporary file of a save (``.NAME.PID-HOST-TOKEN.gpuserial-tmp``) and its state."""

    path: str
    pid: int
    host: str | None  # None in names of older versions, which were all of this host
    size: int
    stale: bool  # its save's process, of this host, is gone

    @property
    def why(self) -> str:
        if self.host not in (None, HOST):
            return 'written on another host'
        return f'process {self.pid} is gone' if self.stale else f'process {self.pid} is running'


def temporaries(directory: str) -> list[Temporary]:
    """The temporary files of gpuserial's saves in ``directory``, whatever their target."""
    found = []
    with contextlib.suppress(OSError), os.scandir(directory or '.') as entries:
        for entry in entries:
            if not (entry.name.startswith('.') and entry.name.endswith(TEMP_SUFFIX)):
                continue
            tag = entry.name[:-len(TEMP_SUFFIX)].rsplit('.', 1)[-1].split('-')
            if len(tag) not in (2, 3) or not tag[0].isdigit():
                continue
            pid, host = int(tag[0]), tag[1] if len(tag) == 3 else None
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            stale = host in (None, HOST) and _gone(pid, info.st_mtime)
            found.append(Temporary(entry.path, pid, host, info.st_size, stale))
    return sorted(found, key=lambda temporary: temporary.path)


def remove_stale_temporaries(directory: str) -> list[Temporary]:
    """Removes the temporary files in ``directory`` whose save's process has died (on this host;
    never a live save's, never another host's); returns those it removed."""
    removed = []
    for temporary in temporaries(directory):
        if temporary.stale:
            with contextlib.suppress(OSError):
                os.unlink(temporary.path)
                removed.append(temporary)
    return removed


def _gone(pid: int, written: float) -> bool:
    """Whether process ``pid`` of this host, which last wrote a file at ``written``, is gone:
    no such process, or one that started after that write (the number was reused)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        pass
    started = _started(pid)
    return started is not None and started > written + 1


def _started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where /proc says (Linux)."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            fields = f.read().rsplit(b')', 1)[1].split()
        with open('/proc/stat', 'rb') as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b'btime'))
        return boot + int(fields[19]) / os.sysconf('SC_CLK_TCK')  # field 22: starttime
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open or sync a directory
        fd = os.open(directory or '.', os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_target(path) -> str:
    """The file a save to the local ``path`` writes (through a link, as numpy does, keeping
    the link), once it is known that it can be: no directory, and in one that exists.

    Raises:
        IsADirectoryError: ``path`` is a directory.
        FileNotFoundError: its directory does not exist.
        OSError: ``ENAMETOOLONG``, its name is longer than a name there may be.
    """
    path = os.fsdecode(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f'cannot save to {path!r}: it is a directory')
    directory = os.path.dirname(path) or '.'
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'cannot save to {path!r}: no such directory {directory!r}'
                                f'{tilde_hint(path)}')
    length, most = len(os.fsencode(os.path.basename(path))), _name_max(directory)
    if most is not None and length > most:
        raise OSError(errno.ENAMETOOLONG, f'{os.strerror(errno.ENAMETOOLONG)} (its name has '
                      f'{length} bytes; names in its directory have at most {most})', path)
    return path


@contextlib.contextmanager
def atomic_path(path, *, durable: bool, size_hint: int | None = None) -> Iterator[str]:
    """A fresh temporary path beside ``path`` that replaces it only when the block succeeds.

    The block creates the file (it does not exist yet: opening a fresh file costs ext4 much
    less than truncating one). The target then holds either the old file or the whole new one.
    With ``durable`` the temporary file is fsync'd before the rename and the directory after
    it, so the new file also survives a power cut; without it the rename is still atomic for
    other processes, but after a crash of the machine the file may be old or empty. On any
    exception (Ctrl-C too) the temporary file is removed and the target is left as it was.
    Temporary files left in the directory by saves whose process died (killed, or its machine
    rebooted) are removed by the next save there, whatever their target. A durable save of
    ``size_hint`` bytes or more (or of an unknown size) hands its bytes to the disk as it
    writes them (:func:`_early_writeback`).
    """
    shown = save_target(path)  # as messages name it
    path = absolute(shown)  # every step, whatever the working directory becomes
    directory = os.path.dirname(path)
    remove_stale_temporaries(directory)
    temp = _temp_path(path)
    try:
        try:
            with (_early_writeback(temp, shown) if durable and (size_hint is None
                                                         or size_hint >= WRITEBACK_MIN)
                  else contextlib.nullcontext()):
                yield temp
        except OSError as error:
            if error.filename == temp:
                raise type(error)(error.errno, f'{error.strerror} (creating a temporary file '
                                  f'beside it to save to)', shown) from None
            named = naming(error, shown, 'writing the file')
            if named is not error:
                raise named from None
            raise
        if durable:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            except OSError as error:
                raise naming(error, shown, 'flushing the file to the disk') from None
            finally:
                os.close(fd)
        with contextlib.suppress(OSError):  # keep the old file's permission bits
            os.chmod(temp, os.stat(path).st_mode & 0o7777 if os.path.exists(path)
                     else 0o666 & ~_UMASK)
        _replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        _fsync_directory(os.path.dirname(path))


WRITEBACK_STEP = 8 << 20  # bytes the early writeback hands the disk at a time, at least
WRITEBACK_MIN = 2 * WRITEBACK_STEP  # smaller saves: the thread would cost more than it saves
_WRITEBACK_POLL = 0.005  # seconds between its looks at the file's size


@contextlib.contextmanager
def _early_writeback(path: str, target: str | None = None) -> Iterator[None]:
    """While the block writes the file at ``path``, hand its written bytes to the disk (an
    error names ``target``, the file the save is for, else ``path``).

    The pages of a save stay dirty in the page cache until something writes them back; left
    alone, a durable save's final fsync then waits for the disk to take the whole file, after
    the write. Here a thread follows the file as it grows and, every ``WRITEBACK_STEP`` bytes,
    starts the writeback of the new bytes and waits for that of the step before (Linux's
    ``sync_file_range``, the pattern its developers advise for streaming writes), so the disk
    works while the save still computes and copies, and the fsync waits for the last steps
    only. The fsync still makes the save durable: this only moves the work earlier. Elsewhere
    than Linux, or where the call fails, nothing is done.
    """
    if _sync_file_range is None:
        yield
        return
    stop, failed = threading.Event(), list[int]()
    thread = threading.Thread(target=_follow, args=(path, stop, failed), daemon=True,
                              name='gpuserial-writeback')
    try:
        thread.start()
    except RuntimeError:  # no thread to be had (the interpreter is exiting): the fsync does all
        yield
        return
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failed:  # the kernel tells a writeback error once: to the thread's call, not the fsync
        raise OSError(failed[0], f'{os.strerror(failed[0])} (writing the file back to the disk)',
                      target or path)


def _follow(path: str, stop: threading.Event, failed: list[int]) -> None:
    """The thread of :func:`_early_writeback`: until ``stop``, hands over each whole step of
    the file at ``path`` and waits for the one before; appends to ``failed`` the errno of a
    writeback that failed (else lost: the kernel reports it once)."""
    fd = None
    try:
        started = 0  # the file's bytes before this have been handed to the disk
        waiting: tuple[int, int] | None = None  # the step handed over last, not yet waited on
        while not stop.is_set():
            if fd is None:
                with contextlib.suppress(FileNotFoundError):  # the block has not created it yet
                    fd = os.open(path, os.O_RDONLY)
            if fd is not None:
                end = os.fstat(fd).st_size // WRITEBACK_STEP * WRITEBACK_STEP
                if end > started:
                    if (_sync_file_range(fd, started, end - started, _SYNC_FILE_RANGE_WRITE)
                            or waiting is not None and _sync_file_range(
                                fd, *waiting, _SYNC_FILE_RANGE_WRITE_AND_WAIT)):
                        error = ctypes.get_errno()
                        if error not in _UNSUPPORTED:
                            failed.append(error)
                        return  # the final fsync does the rest
                    waiting, started = (started, end - started), end
                    continue
            stop.wait(_WRITEBACK_POLL)
    except OSError:  # the file is gone (the save failed): nothing left to help with
        return
    finally:
        if fd is not None:
            os.close(fd)


_UNSUPPORTED = {errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP}  # no such call here


def _linux_call(name: str, *argtypes):
    """Linux's C library function ``name`` (returning an int, setting errno), or None
    elsewhere or where the library lacks it."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _linux_call('sync_file_range', ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2  # SYNC_FILE_RANGE_WAIT_BEFORE = 1, _WRITE = 2, _WAIT_AFTER = 4
_SYNC_FILE_RANGE_WRITE_AND_WAIT = 7  # their sum: start the writeback and wait for it


def _replace(temp: str, path: str) -> None:
    """``os.replace(temp, path)``, by an atomic exchange and an unlink where Linux has one.

    Renaming over an existing file makes ext4 flush the new one first (its guard against
    zero-length files after a crash), which costs a save as much as the write itself; swapping
    the two names does not, and leaves the old file under the temporary name to unlink.
    """
    if _renameat2 is not None and os.path.exists(path):
        if _renameat2(_AT_FDCWD, os.fsencode(temp), _AT_FDCWD, os.fsencode(path),
                      _RENAME_EXCHANGE) == 0:
            os.unlink(temp)
            return
    os.replace(temp, path)


_renameat2 = _linux_call('renameat2', ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                        ctypes.c_char_p, ctypes.c_uint)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@contextlib.contextmanager
def atomic_output(file, *, durable: bool, storage_options: dict | None = None,
                  size_hint: int | None = None) -> Iterator[BinaryIO]:
    """A binary file to write into that replaces ``file`` only when the block succeeds.

    For a path, as :func:`atomic_path` says. For a URL (with ``storage_options``) or an fsspec
    file, a stream to the object committed last (:func:`remote.remote_output`; ``size_hint``,
    the bytes expected, sizes its upload blocks). A file object is written as it is, with no
    such guarantee.
    """
    location = remote.location_of(file, storage_options)
    if location is not None:
        with remote.remote_output(location, size_hint) as out:
            yield cast(BinaryIO, out)
        return
    if not is_path(file):
        check_file_object(file, writing=True)
        yield file
        return
    with atomic_path(file, durable=durable, size_hint=size_hint) as temp, \
            open(temp, 'xb') as out:
        yield out


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask is process-wide and not thread-safe


@contextlib.contextmanager
def open_input(file, storage_options: dict | None = None) -> Iterator[BinaryIO]:
    """``file`` opened for reading when it is a path, a URL (with ``storage_options``) or an
    fsspec file (:func:`remote.remote_input`), else the file object itself (once no save to
    it is in flight)."""
    wait_for_save(file)
    location = remote.location_of(file, storage_options)
    if location is not None:
        with remote.remote_input(location, remote.display(file)) as f:
            yield cast(BinaryIO, f)
        return
    if not is_path(file):
        check_file_object(file, writing=False)
        yield file
        return
    try:
        local = open(file, 'rb')
    except FileNotFoundError as error:  # Python's own, with a hint where it helps
        if not tilde_hint(file):
            raise
        raise FileNotFoundError(error.errno, f'{error.strerror}{tilde_hint(file)}',
                                error.filename) from None
    except IsADirectoryError:  # said "[Errno 21] Is a directory: 'x'"
        raise IsADirectoryError(f'{display_name(file)!r}: is a directory, not a file'
                                f'{sharded_hint(file)}') from None
    with local:
        yield local


def tilde_hint(path) -> str:
    """For a message about a local path that is not there: that ``~`` is not expanded, where the
    path starts with it (as numpy, torch and h5py take it: a directory named ``~``), else
    nothing."""
    path = os.fsdecode(path)
    if path.startswith('~') and os.path.expanduser(path) != path:
        return f' (~ is not expanded: pass os.path.expanduser({path!r}))'
    return ''


def sharded_hint(directory) -> str:
    """For a message about a local directory given as a file: what to load it with, where it
    is a sharded checkpoint (``latest`` returns those too), else nothing."""
    from gpuserial.distributed.index import INDEX_NAME  # a constant: no cycle at import

    if os.path.isfile(os.path.join(os.fsdecode(directory), INDEX_NAME)):
        return ' (a sharded checkpoint: load it with gpuserial.distributed.load_sharded)'
    return ''


# ---------------------------------------------------------------------------------------------
# Saves in flight (asynchronous saves): one per file at a time; loads of it wait for it


class _SavesInFlight:
    def __init__(self):
        self.lock = threading.Lock()
        self.saves: dict[object, concurrent.futures.Future] = {}  # each file's, until done

    def forget_in_child(self) -> None:
        """After a fork: the parent's writer threads are not the child's."""
        _SavesInFlight.__init__(self)


_in_flight = _SavesInFlight()
if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_in_flight.forget_in_child)


def _save_key(file) -> object:
    if remote.is_remote(file):
        return remote.save_key(file)
    return os.path.realpath(os.fsdecode(file)) if is_path(file) else ('file object', id(file))


def begin_save(file, committed: concurrent.futures.Future) -> None:
    """Records ``committed`` as the save in flight to ``file`` until it is done, once the one
    before (if any) is done."""
    key = _save_key(file)
    while True:
        with _in_flight.lock:
            previous = _in_flight.saves.get(key)
            if previous is None or previous.done():
                _in_flight.saves[key] = committed
                break
        concurrent.futures.wait([previous])

    def forget(done: concurrent.futures.Future) -> None:
        with _in_flight.lock:
            if _in_flight.saves.get(key) is done:
                del _in_flight.saves[key]
    committed.add_done_callback(forget)


def wait_for_save(file) -> None:
    """Waits until no save to ``file`` is in flight (its outcome is the save's to report)."""
    with _in_flight.lock:
        committed = _in_flight.saves.get(_save_key(file))
    if committed is not None:
        concurrent.futures.wait([committed])


def saves_in_flight() -> list[concurrent.futures.Future]:
    with _in_flight.lock:  # a done one may be waiting for its callback to forget it
        return [committed for committed in _in_flight.saves.values() if not committed.done()]
