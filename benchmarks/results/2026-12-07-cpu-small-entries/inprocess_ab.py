"""Two trees of gpuserial side by side: one warm process each, alternating, 10,000 x 4 KiB.

    python inprocess_ab.py save 21 /work/main /work/wt-small   # also load, saveh, loadh

Each process saves (or loads) the same model in turn; the report is microseconds per entry
(median and best of the rounds) and the median of per-round ratios old / new.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

ENTRIES = 10000


def serve() -> None:
    """The worker: runs the operation named on each line of stdin, prints us per entry."""
    import numpy

    import gpuserial
    rng = numpy.random.default_rng(0)
    model = {f'p{i:05d}/W': rng.standard_normal(1024, numpy.float32) for i in range(ENTRIES)}
    target = {key: numpy.zeros_like(value) for key, value in model.items()}
    path = os.path.join(tempfile.mkdtemp(), 'x.npz')
    gpuserial.save_npz(path, model, compression=False, durable=False)
    gpuserial.save_hdf5(path + '.h5', model, compression=0, durable=False)
    for line in sys.stdin:
        what = line.strip()
        if what in ('save', 'saveh'):
            os.remove(path if what == 'save' else path + '.h5')
        start = time.perf_counter()
        if what == 'save':
            gpuserial.save_npz(path, model, compression=False, durable=False)
        elif what == 'load':
            gpuserial.load_npz(path, target)
        elif what == 'saveh':
            gpuserial.save_hdf5(path + '.h5', model, compression=0, durable=False)
        else:
            gpuserial.load_hdf5(path + '.h5', target)
        print((time.perf_counter() - start) / ENTRIES * 1e6, flush=True)


def main(what: str, rounds: int, old: str, new: str) -> None:
    trees = {'old': old, 'new': new}
    procs = {name: subprocess.Popen([sys.executable, os.path.abspath(__file__), 'serve'],
                                    cwd=tree, env={**os.environ, 'PYTHONPATH': tree},
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name, tree in trees.items()}
    times: dict[str, list[float]] = {name: [] for name in trees}
    for round_ in range(rounds + 1):  # the first round warms up, untimed
        for name in (list(trees) if round_ % 2 else list(trees)[::-1]):
            procs[name].stdin.write(what + '\n')
            procs[name].stdin.flush()
            value = float(procs[name].stdout.readline())
            if round_:
                times[name].append(value)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    ratios = [o / n for o, n in zip(times['old'], times['new'], strict=True)]
    print(f"{what}: old med {statistics.median(times['old']):.2f} min {min(times['old']):.2f} | "
          f"new med {statistics.median(times['new']):.2f} min {min(times['new']):.2f} us/entry | "
          f"old/new median ratio {statistics.median(ratios):.3f}")


if __name__ == '__main__':
    if sys.argv[1] == 'serve':
        serve()
    else:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
