"""The ranged GETs (count, bytes) and the time of a load from the modelled store (20 ms a
request, 90 MB/s a connection) of a real model's shapes:

    PYTHONPATH=TREE python count_gets.py 10000x4KiB
"""

import sys
import time

import fsspec.core
import numpy

import gpuserial
from benchmarks import remote as modelled
from gpuserial import serializers


def main(name: str) -> None:
    fs = modelled._modelled_store(0.02, 90e6)
    rng = numpy.random.default_rng(0)
    model = {key: rng.random(shape, dtype=numpy.float32)
             for key, shape in modelled.real_model_shapes(name).items()}
    file = fsspec.core.OpenFile(fs, 'bench/ours.npz')
    gpuserial.save(file, model)
    size = fs.store['/bench/ours.npz'].getbuffer().nbytes
    gets = []
    ranged = type(fs.open('bench/ours.npz', 'rb', cache_type='none'))
    fetch_range = ranged._fetch_range

    def counting(self, start, stop):
        gets.append((start, stop))
        return fetch_range(self, start, stop)

    ranged._fetch_range = counting
    target = {key: numpy.empty_like(value) for key, value in model.items()}
    for what, load in [('gpuserial.load', lambda: gpuserial.load(file)),
                       ('load_npz into existing arrays',
                        lambda: serializers.load_npz(file, target))]:
        gets.clear()
        start = time.monotonic()
        load()
        took = time.monotonic() - start
        print(f'{name} ({size} bytes), {what}: {len(gets)} GETs, '
              f'{sum(stop - start for start, stop in gets)} bytes, {took:.2f} s')


if __name__ == '__main__':
    main(sys.argv[1])
