"""Ctrl-C through h5py: remembered while HDF5 works, raised between blocks.

h5py loses a KeyboardInterrupt raised while HDF5 is running (inside its callbacks or its
filters): a save, load or conversion would then run to the end as if nothing had happened and
replace the old file. Within :func:`deferred`, SIGINT only sets a flag; the HDF5 code calls
:func:`check` between blocks of at most a chunk, which raises KeyboardInterrupt there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_pending = threading.Event()


def _remember(signum, frame) -> None:
    _pending.set()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block in which SIGINT is raised only at :func:`check` (and at the block's end).

    Only Python's default SIGINT handler, in the main thread, is replaced: a handler of the
    program's own stays as it is.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    _pending.clear()
    previous = signal.signal(signal.SIGINT, _remember)
    try:
        yield
    except BaseException as error:
        if _pending.is_set() and not isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt from error  # what h5py made of the interrupt, or a failure
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupted = _pending.is_set()
        _pending.clear()
    if interrupted:
        raise KeyboardInterrupt


def check() -> None:
    """Raises KeyboardInterrupt if SIGINT came since the block began (or since the last check)."""
    if _pending.is_set():
        _pending.clear()
        raise KeyboardInterrupt
