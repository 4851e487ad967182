"""The threads that deflate and inflate beside the caller: NPZ members' blocks and HDF5 chunks
(ISA-L and zlib release the GIL while they work).

One pool for the process, one thread per CPU it may run on (at most :data:`MAX_THREADS`),
started when first needed and shared by every save and load; a forked child starts its own.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ['MAX_THREADS', 'THREADS_VARIABLE', 'count', 'submit', 'submitting']

MAX_THREADS = 6  # at most this many threads by default (fewer where fewer CPUs are ours): each
#                 holds some MiB (its deflate state, its allocator's arena), and a save stays
#                 within 32 MiB of extra host memory
THREADS_VARIABLE = 'GPUSERIAL_THREADS'  # the environment variable that sets the count instead


@functools.cache
def count() -> int:
    """How many threads the pool has: :data:`THREADS_VARIABLE` where it is set (1: none, the
    caller's thread does the work), else the CPUs this process may run on, at most
    :data:`MAX_THREADS`.

    Raises:
        ValueError: the variable is set to something other than a positive integer.
    """
    named = os.environ.get(THREADS_VARIABLE)
    if named is not None:
        try:
            threads = int(named)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f'{THREADS_VARIABLE}={named!r}: expected a positive number of '
                             f'threads')
        return threads
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_THREADS))


class _Submitting(threading.local):
    active = False  # this thread is in a submit: a signal handler that interrupts it must not


submitting = _Submitting()


def submit(function: Callable[..., Any], *args) -> Future | None:
    """``function(*args)`` under way on a thread of the pool; None where one thread is all
    there is (the caller runs it itself), or where no thread may be used: at interpreter exit,
    or from a signal handler that interrupted a submit (its locks are not reentrant)."""
    global _pool
    if count() < 2 or submitting.active:
        return None
    submitting.active = True
    try:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(count(), thread_name_prefix='gpuserial-worker')
        return _pool.submit(function, *args)
    except RuntimeError:  # the interpreter is exiting, or no thread can start
        return None
    finally:
        submitting.active = False


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool_in_child() -> None:
    """A forked child has none of its parent's threads: it starts a pool of its own."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_forget_pool_in_child)
