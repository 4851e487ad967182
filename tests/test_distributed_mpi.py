"""gpuserial.distributed under real MPI: ``mpiexec`` from mpich's wheel (the test extras install
it beside this Python), running tests/mpi_worker.py. The whole matrix (save with N, load with
M, for N and M in 1..4) runs in one launch of 4 ranks, so that it costs a few seconds."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import gpuserial
from gpuserial.distributed import read_index

pytest.importorskip('mpi4py')  # the test extras bring it; ci/test-oldest.sh leaves it out
from tests import mpi_worker  # noqa: E402 - it imports mpi4py

ROOT = pathlib.Path(__file__).resolve().parent.parent
MPIEXEC = pathlib.Path(sys.executable).parent / 'mpiexec'
TIMEOUT = 120

pytestmark = pytest.mark.mpi


def mpiexec(ranks: int, mode: str, directory: pathlib.Path | str,
            options: dict | None = None) -> subprocess.CompletedProcess:
    assert MPIEXEC.exists(), (f'no mpiexec beside {sys.executable}: install the test extras '
                              f"(pip install -e '.[test]' brings mpi4py and mpich)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), GPUSERIAL_TEST_OPTIONS=json.dumps(options))
    return subprocess.run([str(MPIEXEC), '-n', str(ranks), sys.executable,
                           str(ROOT / 'tests' / 'mpi_worker.py'), mode, str(directory)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_save_with_n_load_with_m_ranks_bit_for_bit(tmp_path):
    done = mpiexec(4, 'matrix', tmp_path)  # a hang fails at TIMEOUT; its speed is not tested
    assert done.returncode == 0, done.stderr[-3000:]
    loads = [load for rank in range(4)
             for load in json.loads((tmp_path / f'matrix-rank-{rank}.json').read_text())['loads']]
    assert sorted({(load['n'], load['m']) for load in loads}) == [
        (n, m) for n in range(1, 5) for m in range(1, 5)]
    assert len(loads) == sum(m for m in range(1, 5)) * 4  # every rank of every load
    for load in loads:  # each rank reads the bytes it needs, no more
        assert load['bytes_needed'] > 0
        assert load['bytes_read'] <= 1.05 * load['bytes_needed'], load
    arrays = mpi_worker.global_arrays()
    for n in range(1, 5):
        directory = tmp_path / f'n{n}'
        index = read_index(directory)
        assert index.world_size == n
        on_disk = sum(f.stat().st_size for f in directory.iterdir() if f.suffix == '.npz')
        assert on_disk == sum(index.files.values())
        unique = sum(a.nbytes for a in arrays.values()) + 8 * 4 * n + 8 + 4 * 6  # rng, N, name
        assert unique <= on_disk <= 1.01 * unique, (n, on_disk, unique)
        assert {e.kind for e in index.entries.values()} == {'replicated', 'sharded', 'none'}
        assert set(index.local) == ({'rng'} if n > 1 else set())  # one rank: one value
        assert len(index.entries['grid'].chunks) == math.prod(mpi_worker.GRIDS[n])


def test_a_rank_failing_mid_save_fails_every_rank_and_keeps_the_checkpoint(tmp_path):
    directory = tmp_path / 'ckpt'
    done = mpiexec(3, 'fail', directory)  # nobody hangs: a hang fails at TIMEOUT
    assert done.returncode != 0
    found = [json.loads((directory / f'fail-rank-{rank}.json').read_text()) for rank in range(3)]
    assert found[1]['type'] == 'OSError'
    assert 'No space left on device (injected)' in found[1]['message']
    for rank in (0, 2):
        assert found[rank]['type'] == 'RankFailedError'
        (failure,) = found[rank]['failures'].items()  # rank 1's write, naming its data file
        assert failure[0] == '1' and failure[1].startswith(
            f"OSError: [Errno 28] No space left on device (injected) (writing the file): "
            f"'{directory}{os.sep}")
        assert f"saving '{directory}' failed on 1 of 3 ranks (rank 1: OSError" in \
            found[rank]['message']
    for rank in range(3):  # the failed save committed nothing, and the old one loaded whole
        assert found[rank]['token_after'] == found[rank]['token_before']
    index = read_index(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ['index.json', *index.files, *(f'fail-rank-{r}.json' for r in range(3))])


def test_ranks_save_to_s3_and_load_over_http(bucket):
    """Processes that share moto's server (its port) with this one: 3 ranks save, 2 and 3
    load, bit for bit (checked by the ranks); the objects are the index and its data."""
    url = bucket.url('run/snapshot_iter_7')
    done = mpiexec(3, 'remote', url, bucket.options)
    assert done.returncode == 0, done.stderr[-3000:]
    index = read_index(url, bucket.options)
    assert index.world_size == 3
    assert bucket.keys() == sorted(['run/snapshot_iter_7/index.json',
                                    *(f'run/snapshot_iter_7/{name}' for name in index.files)])
    assert gpuserial.latest(bucket.url('run'), bucket.options) == url
