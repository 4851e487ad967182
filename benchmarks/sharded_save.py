"""Saving a replicated model from N MPI ranks: spread writes against rank 0 alone and against
every rank writing a full copy.

    python benchmarks/sharded_save.py                          # 1 GiB, 1, 2 and 4 ranks
    python benchmarks/sharded_save.py --bytes 256MiB --ranks 2 --json out.json

For each N, one ``mpiexec -n N`` job builds the same model on every rank (64 float32 arrays,
data-parallel replicas) and times, round after round in alternating order, all durable:

- ``spread``: ``gpuserial.distributed.save_sharded``: digests gathered, each array written once,
  the writes spread over the ranks, the index committed by rank 0;
- ``rank0``: rank 0 alone saves the model with ``gpuserial.save_npz`` (stored) while the others
  wait (what ChainerMN users do to avoid N copies);
- ``copies``: every rank saves the whole model to its own file (ChainerMN's default snapshot).

A time is from a barrier to the last rank done. It prints the medians, the ratios
``spread / rank0`` and ``spread / copies``, and the bytes on disk against one copy. Targets
(issue 15): disk bytes of ``spread`` <= 1.01x one copy; ``spread`` faster than ``rank0`` at
N = 2.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ''):  # run as a script: make `benchmarks` and `gpuserial` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy  # noqa: E402

import gpuserial  # noqa: E402
from gpuserial.tools import bench  # noqa: E402

ARRAYS = 64
WAYS = ('spread', 'rank0', 'copies')
MPIEXEC = pathlib.Path(sys.executable).parent / 'mpiexec'


def model(nbytes: int) -> dict:
    """The same model on every rank: ``ARRAYS`` float32 arrays of ``nbytes`` in all."""
    size = max(nbytes // ARRAYS // 4, 1)
    return {f'layer{i:02d}/W': numpy.arange(size, dtype=numpy.float32) * (i + 1)
            for i in range(ARRAYS)}


def disk_bytes(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file())


def worker(nbytes: int, rounds: int, directory: str, out: str) -> None:
    """One ``mpiexec`` job: every way, ``rounds`` times."""
    from mpi4py import MPI

    from gpuserial.distributed import save_sharded

    comm = MPI.COMM_WORLD
    state = model(nbytes)
    root = pathlib.Path(directory)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    disk: dict[str, int] = {}
    for round_ in range(rounds):
        order = WAYS if round_ % 2 == 0 else WAYS[::-1]
        for way in order:
            target = root / way
            if comm.rank == 0:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir()
            comm.Barrier()
            start = time.perf_counter()
            if way == 'spread':
                save_sharded(target / 'ckpt', state, comm)
            elif way == 'rank0':
                if comm.rank == 0:
                    gpuserial.save_npz(target / 'model.npz', state, compression=False)
            else:
                gpuserial.save_npz(target / f'model-{comm.rank}.npz', state, compression=False)
            comm.Barrier()
            seconds[way].append(time.perf_counter() - start)
            if comm.rank == 0:
                disk[way] = disk_bytes(target)
    if comm.rank == 0:
        with open(out, 'w') as f:
            json.dump({'seconds': seconds, 'disk': disk}, f)


def run(ranks: int, nbytes: int, rounds: int, directory: str) -> dict:
    out = os.path.join(directory, f'result-{ranks}.json')
    subprocess.run([str(MPIEXEC), '-n', str(ranks), sys.executable, os.path.abspath(__file__),
                    '--worker', '--bytes', str(nbytes), '--rounds', str(rounds), '--dir',
                    directory, '--json', out], check=True)
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bytes', type=bench.parse_size, default=bench.parse_size('1GiB'))
    parser.add_argument('--ranks', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--dir', help='where to write (default: a temporary directory)')
    parser.add_argument('--json', help='write the results here')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.bytes, args.rounds, args.dir, args.json)
        return 0
    directory = tempfile.mkdtemp(prefix='sharded-', dir=args.dir)
    one_copy = sum(a.nbytes for a in model(args.bytes).values())
    report: dict = {'bytes': one_copy, 'rounds': args.rounds, 'machine': {
        'cpus': os.cpu_count(), 'platform': platform.platform(), 'python': sys.version.split()[0],
        'numpy': numpy.__version__, 'gpuserial': gpuserial.__version__}, 'ranks': {}}
    verdicts = []
    try:
        for ranks in args.ranks:
            result = run(ranks, args.bytes, args.rounds, directory)
            medians = {way: statistics.median(result['seconds'][way]) for way in WAYS}
            ratios = {'spread / rank0': medians['spread'] / medians['rank0'],
                      'spread / copies': medians['spread'] / medians['copies'],
                      'disk spread / one copy': result['disk']['spread'] / one_copy,
                      'disk copies / one copy': result['disk']['copies'] / one_copy}
            report['ranks'][ranks] = {'seconds': result['seconds'], 'medians': medians,
                                      'disk': result['disk'], 'ratios': ratios}
            print(f'{ranks} rank(s), {one_copy / 2**30:.2f} GiB replicated: median save '
                  + ', '.join(f'{way} {medians[way]:.3f} s' for way in WAYS))
            print('  ' + ', '.join(f'{name} {value:.3f}' for name, value in ratios.items()))
            verdicts.append(ratios['disk spread / one copy'] <= 1.01)
            if ranks == 2:
                verdicts.append(ratios['spread / rank0'] < 1)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    report['verdict'] = 'PASS' if all(verdicts) else 'FAIL'
    print(f'verdict: {report["verdict"]} (disk <= 1.01x one copy; at 2 ranks spread faster '
          f'than rank 0 alone)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
