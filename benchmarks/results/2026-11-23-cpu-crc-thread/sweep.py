"""The write-size A/B of write-size-ab.log: seconds per 1 GiB save_npz for each way of writing.

It ran against commit 75630b6, where a chunk checksummed on the thread was written in one call
and ``OVERLAP_BYTES`` was the threshold; it patches both, so it reproduces only there.

    PYTHONPATH=. python sweep.py {durable|cache} ROUNDS MODE...

MODE: ``inline:N`` (CRC then write of each N-byte piece), ``thread:N`` (CRC of the chunk on the
writer's thread, writes of N bytes), ``raw`` (one write per array).
"""

import os
import statistics
import sys
import time

import numpy

from gpuserial import _zipstream, bench, serializers

DURABLE = sys.argv[1] == 'durable'
ROUNDS = int(sys.argv[2])
MODES = sys.argv[3:]
DIRECTORY = os.path.abspath('.bench-ab')
MODEL = bench.make_model(1 << 30)
WRITE = _zipstream.ZipWriter._write


def _raw_write(path: str) -> None:
    with open(path, 'wb') as f:
        for array in MODEL.values():
            f.write(memoryview(numpy.ascontiguousarray(array)).cast('B'))
        if DURABLE:
            f.flush()
            os.fsync(f.fileno())
    if DURABLE:
        fd = os.open(DIRECTORY, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run(mode: str) -> float:
    kind, _, size = mode.partition(':')
    piece = int(size or 0)
    path = os.path.join(DIRECTORY, f'{kind}{size}.npz')
    if os.path.exists(path):
        os.unlink(path)
    os.sync()
    _zipstream.OVERLAP_BYTES = (1 << 20) if kind == 'thread' else (1 << 62)
    _zipstream.PIECE = piece if kind == 'inline' else 1 << 18

    def piecewise(self, data):
        data = memoryview(data).cast('B')
        for start in range(0, len(data), piece):
            WRITE(self, data[start:start + piece])

    _zipstream.ZipWriter._write = piecewise if kind == 'thread' else WRITE
    start = time.perf_counter()
    if kind == 'raw':
        _raw_write(path)
    else:
        serializers.save_npz(path, MODEL, compression=False, durable=DURABLE)
    return time.perf_counter() - start


def main() -> None:
    os.makedirs(DIRECTORY, exist_ok=True)
    times = {mode: [] for mode in MODES}
    for round_ in range(ROUNDS):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            times[mode].append(run(mode))
    print('durable' if DURABLE else 'page cache')
    for mode, values in times.items():
        print(f'{mode:16} median {statistics.median(values):.3f} min {min(values):.3f}',
              [round(value, 2) for value in values])


if __name__ == '__main__':
    main()
