"""Runs one HDF5 operation over and over until Ctrl-C, then says when the interrupt arrived.

Usage: ``python -m tests.interrupt_child OPERATION LEVEL DIR`` with OPERATION one of ``save``
(to DIR/out.h5), ``load`` (DIR/in.h5), ``convert-to-h5`` (DIR/in.npz to DIR/out.h5),
``convert-from-h5`` (DIR/in.h5 to DIR/out.npz), and LEVEL the gzip level of what it writes.
Chunks are small (64 KiB), so that each operation crosses several blocks. Prints ``ready`` before
the first run and ``interrupted TIME`` (``time.time()`` when KeyboardInterrupt arrived), or
``finished`` if no interrupt came within 20 seconds.
"""

from __future__ import annotations

import signal
import sys
import time

import numpy

from gpuserial import configure, serializers
from gpuserial.tools import inspection

SHAPE = (512, 4096)  # 8 MiB of float32


def values() -> numpy.ndarray:
    return numpy.random.default_rng(0).standard_normal(SHAPE).astype(numpy.float32)


def main(operation: str, level: str, directory: str) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job ignores it
    level = int(level)
    data = {'w': values()}
    target = {'w': numpy.zeros(SHAPE, numpy.float32)}
    run = {
        'save': lambda: serializers.save_hdf5(f'{directory}/out.h5', data, compression=level),
        'load': lambda: serializers.load_hdf5(f'{directory}/in.h5', target),
        'convert-to-h5': lambda: inspection.convert(f'{directory}/in.npz',
                                                    f'{directory}/out.h5', compression=level),
        'convert-from-h5': lambda: inspection.convert(f'{directory}/in.h5',
                                                      f'{directory}/out.npz', compression=level),
    }[operation]
    with configure(chunk_bytes=64 << 10):
        print('ready', flush=True)
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                run()
        except KeyboardInterrupt:
            print(f'interrupted {time.time()}', flush=True)
            return
    print('finished', flush=True)


if __name__ == '__main__':
    main(*sys.argv[1:])
