"""Sharded checkpoints on object storage, gpuserial.latest and gpuserial.checkpoints.clean,
against moto's S3 server on loopback, fsspec's memory filesystem and local directories: data
objects streamed to their final keys (never copied), the index committed last, old objects
removed only after it, loads that fetch only the byte ranges they need, and a save killed
between its data and its commit (a child process, SIGKILLed) that leaves the previous
checkpoint whole and found by latest()."""

from __future__ import annotations

import datetime
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import zipfile

import fsspec
import numpy
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import gpuserial
from gpuserial import checkpoints
from gpuserial.distributed import (
    RankFailedError,
    Shard,
    consolidate,
    load_sharded,
    multi_node_snapshot,
    read_index,
    reading,
    save_sharded,
)
from gpuserial.distributed import mpi as collectives
from gpuserial.storage import _fileio, remote
from gpuserial.storage.folders import RemoteFolder, folder_of, join
from gpuserial.tools import cli
from tests import kill_sharded
from tests.fakecomm import SoloComm, run_ranks
from tests.test_distributed import small_trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
G = numpy.random.default_rng(0).standard_normal((64, 48)).astype(numpy.float32)
W = numpy.random.default_rng(1).standard_normal((5, 3))
WRITES = ('PutObject', 'CompleteMultipartUpload')  # what makes an object appear on S3


def split(length: int, parts: int, part: int) -> slice:
    return slice(length * part // parts, length * (part + 1) // parts)


def state(size: int, rank: int, empty: bool = False, plus: float = 0) -> dict:
    def make(array):
        return numpy.zeros_like(array) if empty else array + plus

    rows, cols = split(64, size, rank), split(48, size, (rank + 1) % size)
    return {'model': {'W': make(W), 'step': 0 if empty else 3, 'unset': None},
            'rows': Shard(make(G[rows]), G.shape, rows),
            'cols': Shard(make(G[:, cols]), G.shape, (slice(None), cols))}


def check(target: dict, plus: float = 0) -> None:
    expected = state(1, 0, plus=plus)
    assert target['model']['W'].tobytes() == expected['model']['W'].tobytes()
    assert target['model']['step'] == 3 and target['model']['unset'] is None
    for key in ('rows', 'cols'):
        whole = target[key].array if isinstance(target[key], Shard) else target[key]
        block = target[key].index if isinstance(target[key], Shard) else slice(None)
        assert whole.tobytes() == (G + plus)[block].tobytes(), key


def save(url: str, size: int, options: dict | None, plus: float = 0) -> None:
    assert run_ranks(size, lambda comm: save_sharded(
        url, state(size, comm.rank, plus=plus), comm, storage_options=options)) == [None] * size


def written_keys(bucket) -> list[str]:
    """The keys of the objects that appeared, in order (a PutObject, or a completed upload)."""
    return [params['Key'] for name, params in bucket.calls if name in WRITES]


def gets(bucket) -> list[tuple[str, str | None]]:
    """(key, Range) of each GetObject."""
    return [(params['Key'], params.get('Range')) for name, params in bucket.calls
            if name == 'GetObject']


# ---------------------------------------------------------------------------------------------
# Saves and loads over S3


@pytest.mark.parametrize('n, m', [(2, 3), (3, 1)])
def test_n_ranks_save_to_s3_and_m_ranks_load_bit_for_bit(bucket, n, m):
    url = bucket.url('run/ckpt')
    save(url, n, bucket.options)
    index = read_index(url, bucket.options)
    operations = bucket.operations()
    assert 'CopyObject' not in operations and 'UploadPartCopy' not in operations
    written = written_keys(bucket)
    assert written[-1] == 'run/ckpt/index.json' and written.count('run/ckpt/index.json') == 1
    assert sorted(written[:-1]) == sorted(f'run/ckpt/{name}' for name in index.files)
    assert bucket.keys() == sorted(['run/ckpt/index.json',
                                    *(f'run/ckpt/{name}' for name in index.files)])

    def load(comm):
        target = state(m, comm.rank, empty=True)
        load_sharded(url, target, comm, storage_options=bucket.options)
        check(target)

    assert run_ranks(m, load) == [None] * m


def test_a_new_save_removes_the_old_objects_only_after_its_index(bucket):
    url = bucket.url('ckpt')
    save(url, 2, bucket.options)
    old = read_index(url, bucket.options)
    bucket.calls.clear()
    save(url, 2, bucket.options, plus=1)
    new = read_index(url, bucket.options)
    assert set(new.files).isdisjoint(old.files)
    operations = bucket.operations()
    committed = max(i for i, (name, params) in enumerate(bucket.calls)
                    if name in WRITES and params['Key'] == 'ckpt/index.json')
    deletes = [i for i, name in enumerate(operations) if name.startswith('DeleteObject')]
    assert deletes and min(deletes) > committed
    deleted = sorted(item['Key'] for name, params in bucket.calls if name == 'DeleteObjects'
                     for item in params['Delete']['Objects'])
    assert deleted == sorted(f'ckpt/{name}' for name in old.files)
    assert bucket.keys() == sorted(['ckpt/index.json', *(f'ckpt/{name}' for name in new.files)])
    target = state(1, 0, empty=True)
    load_sharded(url, target, SoloComm(), storage_options=bucket.options)
    check(target, plus=1)


def test_loads_fetch_only_the_byte_ranges_they_need(bucket):
    big = numpy.random.default_rng(2).standard_normal((256, 1024)).astype(numpy.float32)
    other = numpy.ones(1 << 18, numpy.float32)
    url = bucket.url('big')
    assert run_ranks(2, lambda comm: save_sharded(url, {
        'rows': Shard(big[split(256, 2, comm.rank)], big.shape, split(256, 2, comm.rank)),
        'other': other}, comm, storage_options=bucket.options)) == [None, None]
    index = read_index(url, bucket.options)
    chunks = {c.offsets[0]: c for c in index.entries['rows'].chunks}  # by first row
    row = 1024 * 4

    def load_block(block: tuple) -> list[tuple[str, str | None]]:
        bucket.calls.clear()
        target = {'rows': Shard(numpy.zeros_like(big[block]), big.shape, block)}
        stats = load_sharded(url, target, SoloComm(), storage_options=bucket.options)
        assert target['rows'].array.tobytes() == big[block].tobytes()
        assert stats.bytes_read == stats.bytes_needed == big[block].nbytes
        return [(key, span) for key, span in gets(bucket) if not key.endswith('index.json')]

    def span(chunk, first: int, last: int) -> str:  # HTTP's inclusive end
        return f'bytes={chunk.data_offset + first}-{chunk.data_offset + last - 1}'

    # rows 40:80 lie in the first chunk: one ranged read of exactly their bytes
    assert load_block((slice(40, 80),)) == [
        (f'big/{chunks[0].file}', span(chunks[0], 40 * row, 80 * row))]
    # rows 120:136 straddle both chunks: one exact range in each file, nothing else
    assert sorted(load_block((slice(120, 136),))) == sorted([
        (f'big/{chunks[0].file}', span(chunks[0], 120 * row, 128 * row)),
        (f'big/{chunks[128].file}', span(chunks[128], 0, 8 * row))])
    # columns 0:100 of every row: 128 runs of 400 bytes per chunk, 3696 bytes apart, come in
    # one request per chunk (the gaps are read too: below FETCH_GAP, cheaper than 127 requests)
    assert sorted(load_block((slice(None), slice(0, 100)))) == sorted([
        (f'big/{chunk.file}', span(chunk, 0, 127 * row + 400)) for chunk in chunks.values()])
    assert 'other' in read_index(url, bucket.options).entries  # present, and never read


def test_a_load_of_many_small_entries_fetches_ahead_across_them(bucket):
    rng = numpy.random.default_rng(3)
    many = {f'layer{i}/W': rng.standard_normal(256 + i).astype(numpy.float32) for i in range(60)}
    url = bucket.url('many')
    save_sharded(url, many, SoloComm(), storage_options=bucket.options)
    index = read_index(url, bucket.options)
    bucket.calls.clear()
    target = {key: numpy.zeros_like(many[key]) for key in reversed(many)}  # read in file order
    load_sharded(url, target, SoloComm(), storage_options=bucket.options)
    for key, value in many.items():
        assert target[key].tobytes() == value.tobytes()
    data = [(key, span) for key, span in gets(bucket) if not key.endswith('index.json')]
    (name,) = index.files  # one rank, one data file: its entries in one ranged read
    chunks = sorted((c for e in index.entries.values() for c in e.chunks),
                    key=lambda c: c.data_offset)
    last = chunks[-1]
    end = last.data_offset + int(numpy.prod(last.shape)) * 4
    assert data == [(f'many/{name}', f'bytes={chunks[0].data_offset}-{end - 1}')]


def fail_writing(monkeypatch, name: str) -> None:
    """Makes the writing of the data file whose name holds ``name`` fail after some bytes."""
    write_npz = collectives.npz.write_npz

    def failing(out, items, compression):
        if name in out.name:
            out.write(b'partial data')
            raise OSError(28, 'No space left on device (injected)')
        return write_npz(out, items, compression)

    monkeypatch.setattr(collectives.npz, 'write_npz', failing)


def test_a_rank_failing_mid_upload_keeps_the_previous_checkpoint(bucket, monkeypatch):
    url = bucket.url('ckpt')
    save(url, 3, bucket.options)
    before = bucket.keys()
    fail_writing(monkeypatch, 'rank-00001')
    bucket.calls.clear()
    results = run_ranks(3, lambda comm: save_sharded(url, state(3, comm.rank, plus=1), comm,
                                                     storage_options=bucket.options))
    assert isinstance(results[1], OSError) and 'injected' in str(results[1])
    for rank in (0, 2):
        assert isinstance(results[rank], RankFailedError)
        assert str(results[rank]).startswith(f"saving '{url}' failed on 1 of 3 ranks (rank 1: "
                                             f"OSError")
    assert 'ckpt/index.json' not in written_keys(bucket)  # never committed
    assert bucket.keys() == before  # the other ranks' new objects were deleted
    assert bucket.fs.list_multipart_uploads(bucket.name) == []
    monkeypatch.undo()
    target = state(1, 0, empty=True)
    load_sharded(url, target, SoloComm(), storage_options=bucket.options)
    check(target)


def test_the_cli_inspects_and_consolidates_a_sharded_url(bucket, tmp_path, capsys):
    url = bucket.url('ckpt')
    save(url, 2, bucket.options)
    options = ['--storage-options', json.dumps(bucket.options)]
    assert cli.main(['inspect', url, *options]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f'{url}: sharded checkpoint, saved by 2 rank(s), 2 data file(s), 5 keys')
    assert cli.main(['inspect', '--json', url, *options]) == 0
    assert json.loads(capsys.readouterr().out)['path'] == url
    assert cli.main(['consolidate', url, bucket.url('one.npz'), *options]) == 0
    assert cli.main(['consolidate', url, str(tmp_path / 'one.npz'), *options]) == 0
    with numpy.load(tmp_path / 'one.npz') as z:
        assert z['rows'].tobytes() == z['cols'].tobytes() == G.tobytes()
    assert gpuserial.load(bucket.url('one.npz'), storage_options=bucket.options)[
        'model/W'].tobytes() == W.tobytes()


# ---------------------------------------------------------------------------------------------
# memory:// and a store without transactions


def test_memory_round_trip_consolidate_and_describe(memory):
    save('memory://run/snapshot_iter_5', 2, None)
    target = state(1, 0, empty=True)
    load_sharded('memory://run/snapshot_iter_5', target, SoloComm())
    check(target)
    result = consolidate('memory://run/snapshot_iter_5', 'memory://out/one.npz')
    assert result.entries == 5
    assert gpuserial.load('memory://out/one.npz')['rows'].tobytes() == G.tobytes()
    info = reading.describe('memory://run/snapshot_iter_5')
    assert info['path'] == 'memory://run/snapshot_iter_5' and len(info['files']) == 2
    assert reading.is_checkpoint('memory://run/snapshot_iter_5')
    assert not reading.is_checkpoint('memory://out/one.npz')
    with pytest.raises(FileNotFoundError, match="'memory://run': no sharded checkpoint here"):
        read_index('memory://run')


class _CopyingMemory(MemoryFileSystem):
    """A store outside remote.TRANSACTIONAL (as gcs and azure are)."""

    protocol = ('copymem2',)


def test_a_store_without_transactions_gets_data_in_place_and_the_index_moved(memory,
                                                                           monkeypatch):
    fsspec.register_implementation('copymem2', _CopyingMemory, clobber=True)
    moved: list[tuple[str, str]] = []
    monkeypatch.setattr(_CopyingMemory, 'mv', lambda self, a, b: moved.append((a, b))
                        or MemoryFileSystem.mv(self, a, b))
    save('copymem2://b/ckpt', 2, None)
    assert len(moved) == 1 and moved[0][1].endswith('/ckpt/index.json')  # data: never moved
    assert remote.TEMP_MARK in moved[0][0]
    target = state(1, 0, empty=True)
    load_sharded('copymem2://b/ckpt', target, SoloComm())
    check(target)
    keys = sorted(path for path in memory.store if '/ckpt/' in path)
    fail_writing(monkeypatch, 'rank-00000')
    results = run_ranks(2, lambda comm: save_sharded('copymem2://b/ckpt', state(2, comm.rank),
                                                     comm))
    assert isinstance(results[0], OSError) and isinstance(results[1], RankFailedError)
    assert sorted(path for path in memory.store if '/ckpt/' in path) == keys  # nothing left


def test_multi_node_snapshot_to_a_url_and_latest(memory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def train(comm):
        trainer = small_trainer('memory://train', 4)
        trainer.extend(multi_node_snapshot(comm), trigger=(2, 'iteration'))
        trainer.run()

    assert run_ranks(2, train) == [None, None]
    assert os.listdir(tmp_path) == []  # no local directory named after the URL
    found = gpuserial.latest('memory://train')
    assert found == 'memory://train/snapshot_iter_4'
    resumed = small_trainer('memory://train', 4)
    load_sharded(found, resumed, SoloComm())
    assert resumed.updater.iteration == 4


# ---------------------------------------------------------------------------------------------
# latest()


def _npz(target: str, options: dict | None = None) -> None:
    gpuserial.save(target, {'a': numpy.arange(3)}, storage_options=options)


@pytest.fixture(params=['local', 's3'])
def prefix(request, tmp_path):
    """A prefix to put checkpoints under, its storage options, and how to write a raw file."""
    if request.param == 'local':
        def put(name: str, data: bytes) -> None:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(data)

        return str(tmp_path), None, put
    bucket = request.getfixturevalue('bucket')

    def put_object(name: str, data: bytes) -> None:
        bucket.fs.pipe(bucket.url(f'run/{name}'), data)

    return bucket.url('run'), bucket.options, put_object


def test_latest_is_the_committed_checkpoint_with_the_largest_number(prefix):
    root, options, put = prefix
    assert gpuserial.latest(root, options) is None
    save(join(root, 'snapshot_iter_2'), 2, options)
    _npz(join(root, 'snapshot_iter_10.npz'), options)
    gpuserial.save(join(root, 'snapshot_iter_9.h5'), {'a': numpy.arange(3)},
                   storage_options=options)
    put('log', b'{"iteration": 12}')  # no number, and no checkpoint
    put('snapshot_iter_11/rank-00000-0123456789ab.npz', b'PK\x03\x04 data, never committed')
    in_flight = _zip({'a.npy': bytes(100)})[:60]  # a save's temporary: an NPZ's first bytes
    put(f'snapshot_iter_13.npz{remote.TEMP_MARK}123-0123456789ab', in_flight)
    put(f'.snapshot_iter_14.npz.123-{_fileio.HOST}-00aa{_fileio.TEMP_SUFFIX}', in_flight)
    put('snapshot_iter_15.txt', b'not a checkpoint')
    assert gpuserial.latest(root, options) == join(root, 'snapshot_iter_10.npz')
    save(join(root, 'snapshot_iter_11'), 1, options)  # now committed
    assert gpuserial.latest(root, options) == join(root, 'snapshot_iter_11')
    assert gpuserial.latest(join(root, 'snapshot_iter_11'), options) is None  # its data files
    gpuserial.save(join(root, 'snapshot_iter_12.h5'), {'a': numpy.arange(3)},
                   storage_options=options)  # HDF5, told by its first 8 bytes
    assert gpuserial.latest(root, options) == join(root, 'snapshot_iter_12.h5')


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def test_latest_takes_no_zip_that_is_not_an_npz(prefix):
    """Any zip passed for an NPZ: a run's torch.save files (model_epoch_5000.pt, zips whose
    first member is archive/data.pkl) or an archive of logs won over the snapshots."""
    root, options, put = prefix
    save(join(root, 'snapshot_iter_200'), 1, options)
    put('model_epoch_5000.pt', _zip({'archive/data.pkl': b'\x80\x02}q\x00.', 'archive/v': b'3'}))
    put('logs_3000.zip', _zip({'log.txt': b'{}'}))
    assert gpuserial.latest(root, options) == join(root, 'snapshot_iter_200')
    buffer = io.BytesIO()
    numpy.savez(buffer, **{'k' * 2000: numpy.arange(3)})  # a name longer than is read: an NPZ
    put('snapshot_iter_300', buffer.getvalue())
    assert gpuserial.latest(root, options) == join(root, 'snapshot_iter_300')
    gpuserial.save(join(root, 'snapshot_iter_400.npz'), {}, storage_options=options)  # empty
    assert gpuserial.latest(root, options) == join(root, 'snapshot_iter_400.npz')


def test_latest_with_a_pattern_looks_only_at_names_that_match(prefix):
    """A trainer snapshot every 1000 iterations and a model snapshot_object every 500, in one
    directory: resuming the trainer needs the newest trainer snapshot, not the newest file."""
    root, options, _ = prefix
    for name in ('model_iter_500', 'model_iter_1000', 'model_iter_1500', 'snapshot_iter_1000'):
        gpuserial.save(join(root, name), {'a': numpy.arange(3)}, format='npz',
                       storage_options=options)  # Chainer's snapshot names have no suffix
    assert gpuserial.latest(root, options) == join(root, 'model_iter_1500')
    assert gpuserial.latest(root, options, pattern='snapshot_iter_*') == join(
        root, 'snapshot_iter_1000')
    assert gpuserial.latest(root, options, pattern='model_iter_*') == join(
        root, 'model_iter_1500')
    assert gpuserial.latest(root, options, pattern='Snapshot_iter_*') is None  # case counts
    assert gpuserial.latest(root, options, pattern='*_iter_1000') == join(
        root, 'snapshot_iter_1000')  # the larger name on a tie


def test_latest_sees_what_another_writer_committed_after_it_looked(bucket):
    import s3fs  # here, as in conftest: a module that imports it fails the collection of
    # every test where s3fs is missing (the lent GPU machine), gpu-marked ones too
    root = bucket.url('run')
    _npz(join(root, 'step-1.npz'), bucket.options)
    assert gpuserial.latest(root, bucket.options) == join(root, 'step-1.npz')
    buffer = io.BytesIO()
    numpy.savez(buffer, a=numpy.arange(3))
    other = s3fs.S3FileSystem(skip_instance_cache=True, **bucket.options)  # another process's
    other.pipe(f'{bucket.name}/run/step-2.npz', buffer.getvalue())
    assert gpuserial.latest(root, bucket.options) == join(root, 'step-2.npz')


def test_latest_goes_by_commit_time_where_a_name_has_no_number(tmp_path, memory):
    _npz(str(tmp_path / 'step-100.npz'))
    save(str(tmp_path / 'step-50'), 1, None)
    _npz(str(tmp_path / 'best.npz'))
    times = {'step-100.npz': 3000, 'step-50/index.json': 2000, 'best.npz': 1000}
    for name, moment in times.items():
        os.utime(tmp_path / name, (moment, moment))
    assert gpuserial.latest(tmp_path) == str(tmp_path / 'step-100.npz')
    os.utime(tmp_path / 'step-50' / 'index.json', (4000, 4000))  # its commit time
    assert gpuserial.latest(tmp_path) == str(tmp_path / 'step-50')
    os.utime(tmp_path / 'step-50' / 'index.json', (1000, 1000))  # a tie: the larger name
    os.utime(tmp_path / 'step-100.npz', (1000, 1000))
    assert gpuserial.latest(tmp_path) == str(tmp_path / 'step-50')
    for name in ('a.npz', 'b.npz', 'c7.npz'):  # memory:// keeps each write's moment
        _npz(f'memory://m/{name}')
    _npz('memory://m/a.npz')
    assert gpuserial.latest('memory://m') == 'memory://m/a.npz'


# ---------------------------------------------------------------------------------------------
# A save killed between its data and its commit


@pytest.mark.parametrize('where', ['new', 'same'])
@pytest.mark.parametrize('store', ['local', 's3'])
def test_a_save_killed_before_its_commit_leaves_the_previous_one(tmp_path, request, store,
                                                                 where):
    if store == 's3':
        bucket = request.getfixturevalue('bucket')
        root, options = bucket.url('run'), bucket.options
    else:
        root, options = str(tmp_path / 'run'), None
    done = subprocess.run(
        [sys.executable, '-m', 'tests.kill_sharded', root, where,
         *([json.dumps(options)] if options else [])],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    torn = json.loads(done.stdout.splitlines()[-1])  # B's data files, written
    assert len(torn) == kill_sharded.RANKS
    first = join(root, 'snapshot_iter_1')
    second = first if where == 'same' else join(root, 'snapshot_iter_2')
    folder = folder_of(second, options)
    assert set(torn) <= {item.name for item in folder.items()}  # the data did land
    assert not set(torn) & set(read_index(first, options).files)
    assert gpuserial.latest(root, options) == first
    target = {'w': numpy.zeros_like(kill_sharded.W), 'rows': numpy.zeros_like(kill_sharded.G),
              'rng': numpy.zeros(3, int)}
    load_sharded(first, target, SoloComm(), storage_options=options)  # A, bit for bit
    expected = kill_sharded.state(0, 0)
    assert target['w'].tobytes() == expected['w'].tobytes()
    assert target['rows'].tobytes() == kill_sharded.G.tobytes()
    assert target['rng'].tobytes() == expected['rng'].tobytes()
    # clean: B's data files are leftovers once old enough; A's are never touched
    young = checkpoints.clean(root, storage_options=options)
    assert sorted(leftover.path.rsplit('/', 1)[-1] for leftover in young) == sorted(torn)
    assert not any(leftover.removable for leftover in young)
    removed = checkpoints.clean(root, older_than=0, storage_options=options)
    assert all(leftover.removable for leftover in removed) and len(removed) == len(torn)
    assert not set(torn) & {item.name for item in folder.items()}
    assert checkpoints.clean(root, older_than=0, storage_options=options) == []
    load_sharded(first, target, SoloComm(), storage_options=options)
    assert target['rows'].tobytes() == kill_sharded.G.tobytes()


# ---------------------------------------------------------------------------------------------
# clean()


def test_ages_read_in_units_and_an_age_equal_to_the_limit_is_old_enough():
    assert [checkpoints._age_text(seconds) for seconds in (119, 120, 7199, 7200)] == [
        '119 s', '2 min', '120 min', '2.0 h']
    leftover = checkpoints._by_age('x', 1, 'a file', 60.0, 60.0, lambda: None)
    assert leftover.removable and leftover.why == 'a file, 60 s old'
    kept = checkpoints._by_age('x', 1, 'a file', 59.0, 60.0, lambda: None)
    assert not kept.removable and kept.why == 'a file, 59 s old, younger than 60 s'


def test_uploads_under_the_prefix_are_aborted_by_their_age():
    now = time.time()

    def upload(key: str, age: float) -> dict:
        return {'Key': key, 'UploadId': f'id-{key}',
                'Initiated': datetime.datetime.fromtimestamp(now - age, datetime.timezone.utc)}

    class Store:  # what clean asks of s3fs
        aborted: list = []

        def list_multipart_uploads(self, bucket):
            assert bucket == 'bucket'
            return [upload('run/young.npz', 10), upload('run/old.npz', 100),
                    upload('runs/other.npz', 100)]

        def unstrip_protocol(self, path):
            return f's3://{path}'

        def abort_mpu(self, bucket, key, upload_id):
            self.aborted.append((bucket, key, upload_id))

    found = checkpoints._uploads(RemoteFolder(Store(), 'bucket/run', 's3://bucket/run'), 60, now)
    assert [(leftover.path, leftover.removable) for leftover in found] == [
        ('s3://bucket/run/young.npz (upload id-run/young.npz)', False),
        ('s3://bucket/run/old.npz (upload id-run/old.npz)', True)]
    found[1].remove()
    assert Store.aborted == [('bucket', 'run/old.npz', 'id-run/old.npz')]


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                              capture_output=True, text=True, check=True).stdout)


def test_clean_removes_local_leftovers_and_never_a_committed_file(tmp_path):
    save(str(tmp_path / 'ckpt'), 2, None)
    committed = sorted(os.listdir(tmp_path / 'ckpt'))
    orphan = tmp_path / 'ckpt' / 'rank-00003-00000000dead.npz'
    orphan.write_bytes(b'PK\x03\x04 from a killed save')
    torn = tmp_path / 'torn' / 'rank-00000-0000000beef1.npz'
    torn.parent.mkdir()
    torn.write_bytes(b'PK\x03\x04 no index')
    stale = tmp_path / f'.x.npz.{_dead_pid()}-{_fileio.HOST}-00aa{_fileio.TEMP_SUFFIX}'
    stale.write_bytes(bytes(10))
    live = tmp_path / f'.y.npz.{os.getpid()}-{_fileio.HOST}-00aa{_fileio.TEMP_SUFFIX}'
    live.write_bytes(bytes(10))
    elsewhere = tmp_path / f'.z.npz.123-0ther0st-00aa{_fileio.TEMP_SUFFIX}'
    elsewhere.write_bytes(bytes(10))
    for path in (orphan, elsewhere):
        os.utime(path, (1000, 1000))  # old
    found = {pathlib.Path(leftover.path).name: leftover
             for leftover in checkpoints.clean(tmp_path, dry_run=True)}
    assert sorted(name for name, leftover in found.items() if leftover.removable) == sorted(
        [orphan.name, stale.name, elsewhere.name])
    assert not found[torn.name].removable and 'younger than 60 min' in found[torn.name].why
    assert not found[live.name].removable
    assert 'the index does not name' in found[orphan.name].why
    assert all(path.exists() for path in (orphan, torn, stale, live, elsewhere))  # dry run
    checkpoints.clean(tmp_path)
    assert [path.exists() for path in (orphan, torn, stale, live, elsewhere)] == [
        False, True, False, True, False]
    checkpoints.clean(tmp_path, older_than=0)
    assert not torn.exists() and live.exists()
    assert sorted(os.listdir(tmp_path / 'ckpt')) == committed
    target = state(1, 0, empty=True)
    load_sharded(tmp_path / 'ckpt', target, SoloComm())
    check(target)


def test_clean_leaves_a_directory_with_an_unreadable_index_alone(tmp_path):
    (tmp_path / 'index.json').write_text('{"format": "something else"}')
    (tmp_path / 'rank-00000-0123456789ab.npz').write_bytes(b'data')
    (found,) = checkpoints.clean(tmp_path, older_than=0)
    assert not found.removable and 'an index that cannot be read' in found.why
    assert (tmp_path / 'rank-00000-0123456789ab.npz').exists()
    with pytest.raises(NotADirectoryError, match='nowhere.*no such directory'):
        checkpoints.clean(tmp_path / 'nowhere')


def test_clean_on_s3_removes_temporary_keys_orphans_and_stale_uploads(bucket, capsys):
    save(bucket.url('run/ckpt'), 2, bucket.options)
    committed = bucket.keys()
    bucket.fs.pipe(bucket.url(f'run/x.npz{remote.TEMP_MARK}123-0123456789ab'), b'partial')
    bucket.fs.pipe(bucket.url('run/ckpt/rank-00007-0123456789ab.npz'), b'orphan')
    inside = bucket.fs.call_s3('create_multipart_upload', Bucket=bucket.name, Key='run/y.npz')
    outside = bucket.fs.call_s3('create_multipart_upload', Bucket=bucket.name, Key='other.npz')
    options = ['--storage-options', json.dumps(bucket.options)]
    assert cli.main(['clean', bucket.url('run'), '--dry-run', *options]) == 0
    out = capsys.readouterr().out.splitlines()
    # the objects are too young; (moto dates every upload 2010-11-10, so an upload's age is
    # not tested here)
    assert sorted(line.split(' (')[0] for line in out if line.startswith('kept ')) == [
        f'kept {bucket.url("run/ckpt/rank-00007-0123456789ab.npz")}',
        f'kept {bucket.url(f"run/x.npz{remote.TEMP_MARK}123-0123456789ab")}']
    assert cli.main(['clean', bucket.url('run'), '--older-than', '0', '--dry-run',
                     *options]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == 'would remove 3 leftover(s) (13 B); kept 0'
    assert any(f'(upload {inside["UploadId"]})' in line and 'incomplete multipart upload'
               in line for line in out)
    assert cli.main(['clean', bucket.url('run'), '--older-than', '0', *options]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == 'removed 3 leftover(s) (13 B); kept 0'
    assert bucket.keys() == committed
    assert [u['UploadId'] for u in bucket.fs.list_multipart_uploads(bucket.name)] == [
        outside['UploadId']]
