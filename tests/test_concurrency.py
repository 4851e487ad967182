"""Threads: saves of different objects to different files at once, loads of one file at once."""

import threading

import numpy

from tests import crafting
from tests.conftest import host
from tests.standin import StandInDevice

THREADS = 8
ROUNDS = 3

def _state(seed: int, device=None) -> dict:
    rng = numpy.random.default_rng(seed)
    send = device.send if device is not None else (lambda a: a)
    return {'w': send(rng.standard_normal((40, 50)).astype(numpy.float32)),
            'b': send(rng.integers(0, 1 << 40, 700)),
            'child': {'v': send(rng.standard_normal(333)), 'seed': seed}}


def _zeros(device=None) -> dict:
    send = device.send if device is not None else (lambda a: a)
    return {'w': send(numpy.zeros((40, 50), numpy.float32)), 'b': send(numpy.zeros(700, int)),
            'child': {'v': send(numpy.zeros(333)), 'seed': -1}}


def _assert_equal(got, expected):
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_equal(got[key], value)
        elif isinstance(value, int):
            assert got[key] == value, key
        else:
            assert host(got[key]).tobytes() == host(value).tobytes(), key


def _run(work, count=THREADS):
    """Runs ``work(i)`` in ``count`` threads started together; re-raises the first failure."""
    barrier = threading.Barrier(count)
    errors = []

    def run(i):
        try:
            barrier.wait()
            for round_ in range(ROUNDS):
                work(i, round_)
        except BaseException as error:  # noqa: B036 - reported to the test below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]


def test_saves_of_different_objects_to_different_files(tmp_path, fmt):
    save, load, ext = fmt

    def work(i, round_):
        save(tmp_path / f'm{i}{ext}', _state(i * 10 + round_))

    _run(work)
    for i in range(THREADS):
        target = _zeros()
        load(tmp_path / f'm{i}{ext}', target)
        _assert_equal(target, _state(i * 10 + ROUNDS - 1))
    assert crafting.temporaries(tmp_path) == []


def test_loads_of_one_file(tmp_path, fmt):
    save, load, ext = fmt
    save(tmp_path / f'm{ext}', _state(7))

    def work(i, round_):
        target = _zeros()
        load(tmp_path / f'm{ext}', target)
        _assert_equal(target, _state(7))

    _run(work)


def test_saves_and_loads_on_stand_in_devices_with_small_chunks(tmp_path, small_chunks, fmt):
    """Each thread on its own stand-in device: the pinned pool is shared between them."""
    save, load, ext = fmt

    def work(i, round_):
        device = StandInDevice(100 + i)
        path = tmp_path / f'm{i}{ext}'
        save(path, _state(i, device))
        target = _zeros(device)
        load(path, target)
        _assert_equal(target, _state(i))

    _run(work)


def test_saves_of_different_objects_to_one_file(tmp_path, fmt):
    """Racing saves to one path: the file is one of them, whole, and no temporary is left."""
    save, load, ext = fmt

    def work(i, round_):
        save(tmp_path / f'm{ext}', _state(i))

    _run(work)
    target = _zeros()
    load(tmp_path / f'm{ext}', target)
    assert 0 <= target['child']['seed'] < THREADS
    _assert_equal(target, _state(target['child']['seed']))
    assert crafting.temporaries(tmp_path) == []
