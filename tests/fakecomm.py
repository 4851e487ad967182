"""Communicators for one process: a single rank, and N ranks as N threads.

They have the part of mpi4py's ``Comm`` that :mod:`gpuserial.distributed` uses: ``rank``,
``size``, ``allgather`` and ``bcast``. Objects travel pickled, as through MPI, so that what
cannot cross a process boundary does not cross here either.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable


class SoloComm:
    """A communicator of one rank."""

    rank, size = 0, 1

    def allgather(self, obj):
        return [pickle.loads(pickle.dumps(obj))]

    def bcast(self, obj, root=0):
        return pickle.loads(pickle.dumps(obj))


class _Shared:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list = [None] * size


class ThreadComm:
    """Rank ``rank`` of ``size`` ranks that are threads of this process."""

    def __init__(self, shared: _Shared, rank: int):
        self.shared = shared
        self.rank = rank
        self.size = shared.size

    def allgather(self, obj):
        self.shared.slots[self.rank] = pickle.dumps(obj)
        self.shared.barrier.wait()
        gathered = [pickle.loads(data) for data in self.shared.slots]
        self.shared.barrier.wait()
        return gathered

    def bcast(self, obj, root=0):
        return self.allgather(obj if self.rank == root else None)[root]


def run_ranks(size: int, work: Callable[[ThreadComm], object]) -> list:
    """Runs ``work(comm)`` on ``size`` thread ranks; returns each rank's result or the
    exception it raised."""
    shared = _Shared(size)
    results: list = [None] * size

    def run(rank: int) -> None:
        try:
            results[rank] = work(ThreadComm(shared, rank))
        except BaseException as error:  # noqa: BLE001 - returned to the test
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), 'a rank hangs'
    return results
