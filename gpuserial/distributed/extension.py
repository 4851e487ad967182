"""A trainer extension that saves sharded snapshots over MPI, as ChainerMN's
``multi_node_snapshot`` does: every rank takes part, each writes its share."""

from __future__ import annotations

from collections.abc import Callable

from gpuserial.distributed.mpi import Shards, save_sharded
from gpuserial.objects.training import Extension
from gpuserial.storage.folders import join

__all__ = ['multi_node_snapshot']


class _MultiNodeSnapshot(Extension):
    trigger = (1, 'epoch')
    priority = -100

    def __init__(self, comm, filename, target, shards: Shards | None,
                 condition: Callable[[], bool] | None, durable: bool,
                 storage_options: dict | None):
        self.comm = comm
        self.filename = filename
        self._target = target
        self.shards = shards
        self.condition = condition
        self.durable = durable
        self.storage_options = storage_options

    def __call__(self, trainer) -> None:
        if self.condition is not None and not self.condition():
            return
        filename = self.filename
        filename = filename(trainer) if callable(filename) else filename.format(trainer)
        save_sharded(join(trainer.out, filename),
                     trainer if self._target is None else self._target, self.comm,
                     shards=self.shards, durable=self.durable,
                     storage_options=self.storage_options)


def multi_node_snapshot(comm=None, filename: str | Callable = 'snapshot_iter_{.updater.iteration}',
                        *, target=None, shards: Shards | None = None,
                        condition: Callable[[], bool] | None = None,
                        durable: bool = True,
                        storage_options: dict | None = None) -> Extension:
    """An extension saving the trainer (or ``target``) of every rank into one sharded
    checkpoint, the directory ``trainer.out/filename`` (see :func:`save_sharded`);
    ``trainer.out`` may be a URL (``s3://bucket/run``). :func:`gpuserial.latest` finds the
    newest committed snapshot there.

    Every rank must register it with the same trigger: the save is collective. Resume with
    :func:`gpuserial.distributed.load_sharded` on any number of ranks. The condition, when
    given, must answer alike on every rank.

    Args:
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
        filename: a format string given the trainer, or a callable on the trainer.
        target: what to save instead of the trainer.
        shards: parts of global arrays by full key (see :func:`save_sharded`).
        condition: a callable; the snapshot is skipped when it returns False.
        durable: fsync the files and the directory.
        storage_options: for a URL, the options of its fsspec filesystem.
    """
    return _MultiNodeSnapshot(comm, filename, target, shards, condition, durable,
                              storage_options)
