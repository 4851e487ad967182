"""Saves sharded checkpoint A whole, then checkpoint B, killed (SIGKILL) between B's data and
its commit: where rank 0 would write B's index, once every rank's data files are written.

Usage: ``python -m tests.kill_sharded PREFIX new|same [STORAGE_OPTIONS_JSON]``. A goes to
``PREFIX/snapshot_iter_1``; B to ``PREFIX/snapshot_iter_2`` (``new``) or over A (``same``).
Before it dies it prints the names of B's data files, as JSON, on one line.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy

from gpuserial.distributed import Shard, mpi, save_sharded
from gpuserial.storage.folders import join
from tests.fakecomm import run_ranks

RANKS = 2
G = numpy.random.default_rng(7).standard_normal((40, 24)).astype(numpy.float32)
W = numpy.random.default_rng(8).standard_normal((6, 5))


def state(which: int, rank: int, size: int = RANKS) -> dict:
    """Known state ``which`` (0: A, 1: B) of rank ``rank``: replicated, sharded and local."""
    rows = slice(40 * rank // size, 40 * (rank + 1) // size)
    return {'w': W + which, 'rows': Shard(G[rows] + which, G.shape, rows),
            'rng': numpy.arange(3) + 10 * rank + which}


def main(prefix: str, where: str, options_text: str | None = None) -> None:
    options = json.loads(options_text) if options_text else None
    first = join(prefix, 'snapshot_iter_1')
    assert run_ranks(RANKS, lambda comm: save_sharded(
        first, state(0, comm.rank), comm, storage_options=options)) == [None] * RANKS

    def killed(folder, document, durable):
        print(json.dumps(sorted(document['files'])), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    mpi._commit = killed  # type: ignore[assignment]
    second = first if where == 'same' else join(prefix, 'snapshot_iter_2')
    run_ranks(RANKS, lambda comm: save_sharded(second, state(1, comm.rank), comm,
                                               storage_options=options))
    sys.exit('not killed')


if __name__ == '__main__':
    main(*sys.argv[1:])
