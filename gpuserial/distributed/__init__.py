"""Sharded checkpoints over MPI: N ranks save, M ranks load.

Every rank saves its own object; values that are the same on every rank are written once,
parts of global arrays (:class:`Shard`) by a rank that holds them, each rank into its own
stored NPZ; rank 0 commits the checkpoint by writing ``index.json`` last. Loads read only the
byte ranges each rank needs. The directory may be a URL (``s3://bucket/run/step-100``, with
``storage_options=``): data objects are streamed to their final keys, the index committed last.
mpi4py is imported only when a call is made without ``comm=``.

- :func:`save_sharded`, :func:`load_sharded`: collective; any communicator with ``rank``,
  ``size``, ``allgather`` and ``bcast`` (mpi4py's).
- :func:`consolidate`: the checkpoint as one ordinary NPZ (``gpuserial consolidate``).
- :func:`multi_node_snapshot`: the trainer extension.
"""

from gpuserial.distributed.extension import multi_node_snapshot
from gpuserial.distributed.index import INDEX_NAME, RankFailedError, Shard
from gpuserial.distributed.mpi import load_sharded, save_sharded
from gpuserial.distributed.reading import (
    ConsolidateResult,
    ReadStats,
    consolidate,
    describe,
    is_checkpoint,
    read_index,
)

__all__ = ['INDEX_NAME', 'ConsolidateResult', 'RankFailedError', 'ReadStats', 'Shard',
           'consolidate', 'describe', 'is_checkpoint', 'load_sharded', 'multi_node_snapshot',
           'read_index', 'save_sharded']
