"""Progress bars: when they show, what they count, and that they never get in the way."""

from __future__ import annotations

import contextlib
import io
import sys

import numpy
import pytest

from gpuserial import serializers
from gpuserial.engine import progress
from tests.conftest import host, make_device


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError('I/O operation on closed file')


BIG = progress.THRESHOLD_BYTES


@pytest.mark.parametrize(('total', 'enabled', 'stream', 'shown'), [
    (BIG, None, Terminal, True),
    (BIG - 1, None, Terminal, False),  # too small to be worth a bar
    (1 << 20, None, Terminal, False),  # a small checkpoint's megabyte: a bar would only flicker
    (BIG, None, io.StringIO, False),  # not a terminal: a log, a pipe
    (BIG, None, Closed, False),
    (0, True, io.StringIO, True),  # forced on
    (BIG, False, Terminal, False),  # forced off
])
def test_should_show(total, enabled, stream, shown):
    assert progress.should_show(total, enabled, stream()) is shown


def test_should_show_looks_at_stderr_by_default(monkeypatch):
    monkeypatch.setattr(sys, 'stderr', Terminal())
    assert progress.should_show(BIG, None)
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    assert not progress.should_show(BIG, None)


def test_a_hidden_bar_is_silent_and_writes_nothing():
    stream = io.StringIO()
    with progress.bar(BIG, 'save x.npz', stream=stream) as shown:
        assert shown is progress.SILENT
        shown.update(123)
    assert stream.getvalue() == ''


def test_a_shown_bar_reports_bytes_and_throughput():
    stream = Terminal()
    with progress.bar(3 << 20, 'save x.npz', True, stream=stream) as shown:
        assert shown is not progress.SILENT
        for _ in range(3):
            shown.update(1 << 20)
        assert shown.n == 3 << 20
        shown.refresh()
        text = stream.getvalue()
    assert 'save x.npz' in text
    assert '3.00M/3.00M' in text  # binary units (unit_divisor=1024): 3 MiB, not 3.15 MB
    assert 'B/s' in text
    cleared = stream.getvalue().rstrip('\r').rsplit('\r', 1)[-1]
    assert cleared.strip() == ''  # the block's end leaves a blank line, not the bar


def test_the_bar_closes_when_the_block_fails():
    stream = io.StringIO()
    with pytest.raises(RuntimeError), progress.bar(10, 'load', True, stream=stream) as shown:
        raise RuntimeError('boom')
    assert shown.disable  # closed: tqdm marks a closed bar disabled


def test_missing_tqdm_gives_a_silent_bar(monkeypatch):
    monkeypatch.setitem(sys.modules, 'tqdm', None)  # import tqdm fails
    with progress.bar(BIG, 'save', True, stream=Terminal()) as shown:
        assert shown is progress.SILENT


def test_a_total_to_count_is_counted_only_where_a_bar_may_show():
    calls = []

    def total():
        calls.append(1)
        return BIG

    with progress.bar(total, 'load', stream=io.StringIO()) as shown:  # not a terminal
        assert shown is progress.SILENT
    with progress.bar(total, 'load', False, stream=Terminal()) as shown:
        assert shown is progress.SILENT
    assert calls == []
    with progress.bar(total, 'load', stream=Terminal()) as shown:
        assert shown is not progress.SILENT and shown.total == BIG
    assert calls == [1]


def test_counted_passes_chunks_through_and_counts_them():
    class Counter:
        total = 0

        def update(self, nbytes):
            self.total += nbytes

    counter = Counter()
    chunks = [b'abc', bytearray(5), memoryview(bytes(8)).cast('d')]
    assert list(progress.counted(chunks, counter)) == chunks
    assert counter.total == 3 + 5 + 8


class _Recorder:
    """Stands in for progress.bar: records each bar's total and what was counted on it."""

    def __init__(self):
        self.bars = []

    @contextlib.contextmanager
    def __call__(self, total, desc, enabled=None, *, stream=None):
        counted = {'desc': desc, 'total': total() if callable(total) else total, 'done': 0}
        self.bars.append(counted)

        class Shown:
            def update(self, nbytes):
                counted['done'] += nbytes

        yield Shown()


@pytest.mark.parametrize('device', ['cpu', 'standin:0'])  # small device arrays: read whole
@pytest.mark.parametrize('fmt', ['npz', 'npz-stored', 'hdf5'])
def test_a_load_counts_every_array_byte_of_its_single_pass(tmp_path, monkeypatch, fmt, device):
    save, load = {'npz': (serializers.save_npz, serializers.load_npz),
                  'npz-stored': (lambda path, obj: serializers.save_npz(path, obj, False),
                                 serializers.load_npz),
                  'hdf5': (serializers.save_hdf5, serializers.load_hdf5)}[fmt]
    path = tmp_path / f'm.{fmt}'
    save(path, {'a': numpy.ones(1000), 'b': numpy.ones(24, numpy.float32), 'n': 3})
    recorder = _Recorder()
    monkeypatch.setattr(progress, 'bar', recorder)
    target = {'a': make_device(device).send(numpy.zeros(1000)), 'b': None,
              'n': 0}  # b is read during the pass
    load(path, target)
    assert recorder.bars == [{'desc': f'load {path}', 'total': 8000 + 96, 'done': 8000 + 96}]
    assert host(target['a']).tolist() == [1.0] * 1000


def test_a_load_of_hdf5_text_into_str_arrays_counts_what_it_planned(tmp_path, monkeypatch):
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, {'a': numpy.ones(10), 'words': numpy.array(['ab', 'cde'])})
    recorder = _Recorder()
    monkeypatch.setattr(progress, 'bar', recorder)
    load = {'a': numpy.zeros(10), 'words': numpy.zeros(2, 'U3')}
    serializers.load_hdf5(path, load)
    assert load['words'].tolist() == ['ab', 'cde']
    (bar,) = recorder.bars
    assert bar['done'] == bar['total'] > 80  # the floats and the text


def test_an_hdf5_save_counts_every_array_byte_of_its_single_pass(tmp_path, monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(progress, 'bar', recorder)
    path = tmp_path / 'm.h5'
    serializers.save_hdf5(path, {'a': numpy.ones(1000), 'b': {'c': numpy.ones(3)}, 'n': 3})
    assert recorder.bars == [{'desc': f'save {path}', 'total': 8024, 'done': 8024}]
