"""Saves two known states to one path, alternately, forever (until the test kills it).

Usage: ``python -m tests.kill_saver FORMAT PATH``. Prints ``ready`` once the first save is done.
The states are :func:`state` 0 and 1; the test checks that whatever is on disk when it kills
this process is one of them, whole.
"""

from __future__ import annotations

import sys

import numpy

from gpuserial import save_async, serializers


def state(which: int) -> dict:
    """Known state ``which`` (0 or 1): arrays of several sizes and dtypes, and scalars."""
    rng = numpy.random.default_rng(which)
    return {'w': rng.standard_normal((64, 96)).astype(numpy.float32),
            'b': rng.integers(-1000, 1000, 4000),
            'child': {'v': rng.standard_normal(3000), 'steps': 1000 + which,
                      'name': f'state {which}'},
            'which': which}


def zeros() -> dict:
    """A target of the states' structure."""
    return {'w': numpy.zeros((64, 96), numpy.float32), 'b': numpy.zeros(4000, numpy.int64),
            'child': {'v': numpy.zeros(3000), 'steps': 0, 'name': ''}, 'which': -1}


SAVES = {
    'npz': lambda path, obj, durable: serializers.save_npz(path, obj, durable=durable),
    'npz-stored': lambda path, obj, durable: serializers.save_npz(path, obj, compression=False,
                                                                  durable=durable),
    'hdf5': lambda path, obj, durable: serializers.save_hdf5(path, obj, durable=durable),
    'npz-async': lambda path, obj, durable: save_async(path, obj, durable=durable),
    'hdf5-async': lambda path, obj, durable: save_async(path, obj, 'hdf5', durable=durable),
}


def main(fmt: str, path: str) -> None:
    save = SAVES[fmt]
    states = [state(0), state(1)]
    count = 0
    while True:
        handle = save(path, states[count % 2], durable=count % 4 < 2)
        if count == 0:
            if handle is not None:  # an asynchronous save: ready once the first is on disk
                handle.result()
            print('ready', flush=True)
        count += 1


if __name__ == '__main__':
    main(*sys.argv[1:])
