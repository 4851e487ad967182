"""Run by ``mpiexec`` from tests/test_distributed_mpi.py: real ranks, real MPI.

    mpiexec -n 4 python tests/mpi_worker.py matrix DIR    # save with N, load with M, 1..4
    mpiexec -n 3 python tests/mpi_worker.py fail DIR      # a rank fails mid-save
    mpiexec -n 3 python tests/mpi_worker.py remote URL    # save with 3, load with 2 and 3
                                                          # (options: $GPUSERIAL_TEST_OPTIONS)

Each rank writes what it found to ``DIR/<mode>-rank-<r>.json`` for the test to check, and
raises (exits non-zero) where a check fails.
"""

from __future__ import annotations

import json
import os
import sys

import numpy
from mpi4py import MPI

import gpuserial.distributed.mpi
from gpuserial.distributed import RankFailedError, Shard, load_sharded, read_index, save_sharded

MAX_RANKS = 4
GRIDS = {1: (1, 1), 2: (1, 2), 3: (3, 1), 4: (2, 2)}  # 2-D splits of 'grid' over N ranks


def split(length: int, parts: int, part: int) -> slice:
    """Part ``part`` of ``parts`` uneven parts of ``range(length)``."""
    return slice(length * part // parts, length * (part + 1) // parts)


def global_arrays() -> dict:
    rng = numpy.random.default_rng(15)
    return {
        'model/l1/W': rng.standard_normal((64, 48)).astype(numpy.float32),
        'model/l1/b': rng.standard_normal(48),
        'big/a': rng.standard_normal((128, 512)).astype(numpy.float32),  # 1 MiB replicated
        'big/b': rng.standard_normal((128, 512)).astype(numpy.float32),
        'big/c': rng.standard_normal((128, 512)).astype(numpy.float32),
        'big/d': rng.standard_normal((128, 512)).astype(numpy.float32),
        'emb': rng.standard_normal((1031, 64)).astype(numpy.float32),  # rows, uneven
        'grid': rng.standard_normal((96, 130)),  # 2-D
        'proj': rng.integers(-1000, 1000, (50, 7, 9), dtype=numpy.int32),  # last axis
    }


def shard_index(key: str, size: int, rank: int, shape: tuple) -> tuple:
    if key == 'emb':
        return (split(shape[0], size, rank),)
    if key == 'grid':
        rows, cols = GRIDS[size]
        return (split(shape[0], rows, rank // cols), split(shape[1], cols, rank % cols))
    return (slice(None), slice(None), split(shape[2], size, rank))


def state(size: int, rank: int, arrays: dict, empty: bool) -> dict:
    """Rank ``rank``'s state of ``size`` ranks: the replicated model, its shards, its own RNG."""
    def value(array):
        return numpy.zeros_like(array) if empty else array.copy()

    tree: dict = {'model': {'l1': {'W': value(arrays['model/l1/W']),
                                   'b': value(arrays['model/l1/b'])},
                            'N': 0 if empty else 7, 'unset': None,
                            'name': '' if empty else 'mlp-15'},
                  'big': {k: value(arrays[f'big/{k}']) for k in 'abcd'}}
    for key in ('emb', 'grid', 'proj'):
        index = shard_index(key, size, rank, arrays[key].shape)
        tree[key] = Shard(value(arrays[key][index]), arrays[key].shape, index)
    tree['rng'] = numpy.zeros(4, numpy.int64) if empty else numpy.arange(4) + 10 * rank
    return tree


def matrix(directory: str) -> None:
    world = MPI.COMM_WORLD
    arrays = global_arrays()
    found: dict = {'loads': []}
    for n in range(1, MAX_RANKS + 1):
        comm = world.Split(0 if world.rank < n else 1, world.rank)
        if world.rank < n:
            save_sharded(os.path.join(directory, f'n{n}'), state(n, comm.rank, arrays, False),
                         comm)
        comm.Free()
    world.Barrier()
    for n in range(1, MAX_RANKS + 1):
        for m in range(1, MAX_RANKS + 1):
            comm = world.Split(0 if world.rank < m else 1, world.rank)
            if world.rank < m:
                target = state(m, comm.rank, arrays, True)
                if comm.rank >= n:  # per-rank values exist for the saved ranks only
                    del target['rng']
                stats = load_sharded(os.path.join(directory, f'n{n}'), target, comm)
                check(target, state(m, comm.rank, arrays, False), n, m)
                found['loads'].append({'n': n, 'm': m, 'rank': comm.rank,
                                       'bytes_read': stats.bytes_read,
                                       'bytes_needed': stats.bytes_needed})
            comm.Free()
    with open(os.path.join(directory, f'matrix-rank-{world.rank}.json'), 'w') as f:
        json.dump(found, f)


def check(loaded: dict, expected: dict, n: int, m: int, path: str = '') -> None:
    for key, value in expected.items():
        where = f'{path}{key} (saved by {n}, loaded by {m} ranks, rank {MPI.COMM_WORLD.rank})'
        if key not in loaded:
            continue
        got = loaded[key]
        if isinstance(value, dict):
            check(got, value, n, m, f'{path}{key}/')
        elif isinstance(value, Shard):
            assert got.array.tobytes() == value.array.tobytes(), where
        elif isinstance(value, numpy.ndarray):
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), where
        else:
            assert got == value and type(got) is type(value), (where, got, value)


def fail(directory: str) -> None:
    """A save that rank 1 fails halfway through writing its file, after a good save."""
    comm = MPI.COMM_WORLD
    arrays = global_arrays()
    save_sharded(directory, state(comm.size, comm.rank, arrays, False), comm)
    before = read_index(directory).token
    if comm.rank == 1:
        write_npz = gpuserial.distributed.mpi.npz.write_npz

        def failing(out, items, compression):
            def some():
                yield from items[:1]
                raise OSError(28, 'No space left on device (injected)')
            write_npz(out, some(), compression)

        gpuserial.distributed.mpi.npz.write_npz = failing  # type: ignore[assignment]
    changed = state(comm.size, comm.rank, arrays, False)
    changed['model']['l1']['W'] += 1
    found: dict = {}
    try:
        save_sharded(directory, changed, comm)
    except RankFailedError as error:
        found = {'type': 'RankFailedError', 'message': str(error),
                 'failures': {str(k): v for k, v in error.failures.items()}}
    except OSError as error:
        found = {'type': type(error).__name__, 'message': str(error)}
    found['token_before'] = before
    found['token_after'] = read_index(directory).token
    target = state(comm.size, comm.rank, arrays, True)
    load_sharded(directory, target, comm)  # the previous checkpoint, whole
    check(target, state(comm.size, comm.rank, arrays, False), comm.size, comm.size)
    with open(os.path.join(directory, f'fail-rank-{comm.rank}.json'), 'w') as f:
        json.dump(found, f)
    sys.exit(3)  # every rank exits non-zero, as a training script would on such an error


def remote(url: str) -> None:
    """A save by every rank to an object store, then loads by 2 and by every rank."""
    world = MPI.COMM_WORLD
    options = json.loads(os.environ['GPUSERIAL_TEST_OPTIONS'])
    arrays = global_arrays()
    save_sharded(url, state(world.size, world.rank, arrays, False), world,
                 storage_options=options)
    for m in (2, world.size):
        comm = world.Split(0 if world.rank < m else 1, world.rank)
        if world.rank < m:
            target = state(m, comm.rank, arrays, True)
            load_sharded(url, target, comm, storage_options=options)
            check(target, state(m, comm.rank, arrays, False), world.size, m)
        comm.Free()


if __name__ == '__main__':
    {'matrix': matrix, 'fail': fail, 'remote': remote}[sys.argv[1]](sys.argv[2])
