"""gpuserial.distributed in one process: the planner and the index as pure functions, and saves
and loads over ranks that are threads (tests/fakecomm.py). Real MPI: test_distributed_mpi.py."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import subprocess
import sys
import warnings
import zipfile

import numpy
import pytest

import gpuserial
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
from gpuserial.distributed import index as layout
from gpuserial.distributed import mpi as collectives
from gpuserial.errors import CorruptFileError, KeyCollisionError, KeyNotFoundError, MismatchError
from gpuserial.tools import cli
from tests.conftest import CHAINER_PYTHON, host
from tests.fakecomm import SoloComm, run_ranks

F4 = numpy.dtype('float32')


def meta(key, shape=(4,), crc=1, dtype=F4, global_shape=None, box=None):
    return layout.EntryMeta(key, shape, dtype, crc, global_shape, box)


def split(length: int, parts: int, part: int) -> slice:
    return slice(length * part // parts, length * (part + 1) // parts)


# ---------------------------------------------------------------------------------------------
# The planner


def test_replicated_values_are_written_once_spread_by_bytes():
    keys = [('a', (1000,)), ('b', (10,)), ('c', (600,)), ('d', (500,)), ('e', (10,))]
    plan = layout.plan_save([[meta(k, s) for k, s in keys]] * 3)
    assert {k: e.kind for k, e in plan.entries.items()} == dict.fromkeys('abcde', 'replicated')
    # largest first, each to the least loaded rank: a->0, c->1, d->2, b->2, e->2
    assert plan.writes == {0: [('a', 'a')], 1: [('c', 'c')],
                           2: [('b', 'b'), ('d', 'd'), ('e', 'e')]}
    assert layout.plan_save([[meta(k, s) for k, s in keys]] * 3).writes == plan.writes


def test_chunks_of_equal_size_go_in_key_order():
    # 'w' sorts before 'w2', but its member 'w@0' after 'w2': the order is by key
    both = [meta('w', (4,), global_shape=(4,), box=((0, 4),)), meta('w2', (4,))]
    plan = layout.plan_save([both, both])
    assert plan.writes == {0: [('w', 'w@0')], 1: [('w2', 'w2')]}


def test_values_that_differ_are_kept_per_rank_and_nones_in_the_index():
    plan = layout.plan_save([[meta('rng', crc=1), meta('u', None, dtype=None)],
                             [meta('rng', crc=2), meta('u', None, dtype=None)],
                             [meta('rng', (5,), crc=1)]])
    assert set(plan.local['rng']) == {0, 1, 2}
    assert plan.entries['u'].kind == 'none'
    assert plan.writes == {0: [('rng', 'rng')], 1: [('rng', 'rng')], 2: [('rng', 'rng')]}


def test_a_value_held_by_some_ranks_alike_is_replicated_among_them():
    plan = layout.plan_save([[], [meta('stage1')], [meta('stage1')]])
    assert plan.entries['stage1'].kind == 'replicated'
    assert plan.entries['stage1'].chunks[0].writer == 1


def test_shards_uneven_and_duplicated_parts_are_written_once():
    g = (10, 6)
    parts = [((0, 3), (0, 6)), ((3, 10), (0, 6))]
    metas = [[meta('w', (3, 6), crc=5, global_shape=g, box=parts[0])],
             [meta('w', (7, 6), crc=6, global_shape=g, box=parts[1])],
             [meta('w', (3, 6), crc=5, global_shape=g, box=parts[0])],  # a replica of rank 0's
             [meta('w', (7, 6), crc=6, global_shape=g, box=parts[1])]]
    plan = layout.plan_save(metas)
    entry = plan.entries['w']
    assert entry.kind == 'sharded' and entry.shape == g
    assert [(c.offsets, c.shape, c.member) for c in entry.chunks] == [
        ((0, 0), (3, 6), 'w@0,0'), ((3, 0), (7, 6), 'w@3,0')]
    assert sorted(c.writer for c in entry.chunks) == [0, 1]


@pytest.mark.parametrize('metas, message', [
    ([[meta('w', (2,), global_shape=(4,), box=((0, 2),))],
      [meta('w', (2,), global_shape=(5,), box=((2, 4),))]],
     re.escape("key 'w': rank 0 declares a shard of a global array of shape (4,) and dtype "
               "float32, rank 1 of shape (5,) and dtype float32")),
    ([[meta('w', (2,), global_shape=(4,), box=((0, 2),))], [meta('w')]],
     "key 'w': a shard on rank 0 and a whole value on rank 1"),
    ([[meta('w', (3,), global_shape=(4,), box=((0, 3),))],
      [meta('w', (2,), global_shape=(4,), box=((2, 4),))]],
     r"key 'w': parts \[0:3\] \(rank 0\) and \[2:4\] \(rank 1\) overlap"),
    ([[meta('w', (2,), global_shape=(5,), box=((0, 2),))],
      [meta('w', (2,), global_shape=(5,), box=((2, 4),))]],
     r"key 'w': the parts cover 4 of the 5 elements of the global shape \(5,\)"),
    ([[meta('w', (2,), crc=1, global_shape=(2,), box=((0, 2),))],
      [meta('w', (2,), crc=2, global_shape=(2,), box=((0, 2),))]],
     r"key 'w': ranks 0 and 1 hold the same part \[0:2\] with different values"),
])
def test_inconsistent_shards_are_refused(metas, message):
    with pytest.raises(MismatchError, match=message):
        layout.plan_save(metas)


@pytest.mark.parametrize('index, message', [
    (slice(0, 4, 2), 'slices of step 1'),
    ((slice(0, 1), slice(0, 1), slice(0, 1)), '3 slices for a global shape'),
    (slice(3, 9), 'slice 3:9 of dimension 0 is out of bounds'),
    (1, 'slices of step 1 per dimension, got 1'),
])
def test_bad_shard_indices_are_refused(index, message):
    with pytest.raises(ValueError, match=message):
        layout.normalize_box((8, 2), index, 'w')


def chunk(offsets, shape, member='m'):
    return layout.SavedChunk(offsets, shape, 'f.npz', member, 0, 0)


def test_reads_are_the_intersections_of_the_request_with_the_chunks():
    chunks = [chunk((0, 0), (5, 4)), chunk((0, 4), (5, 6)), chunk((5, 0), (5, 10))]
    pieces = layout.plan_reads(chunks, ((3, 7), (2, 6)), 'w')
    assert [(p.chunk.offsets, p.src, p.dst) for p in pieces] == [
        ((0, 0), ((3, 5), (2, 4)), ((0, 2), (0, 2))),
        ((0, 4), ((3, 5), (0, 2)), ((0, 2), (2, 4))),
        ((5, 0), ((0, 2), (2, 6)), ((2, 4), (0, 4)))]
    with pytest.raises(CorruptFileError,
                       match=r"w: the saved chunks hold 12 of the 16 elements of \[3:7, 2:6\]"):
        layout.plan_reads(chunks[:1] + chunks[2:], ((3, 7), (2, 6)), 'w')


# ---------------------------------------------------------------------------------------------
# The index


def index_doc(**changes):
    doc = {'format': 'gpuserial.sharded', 'version': 1, 'world_size': 1, 'token': 't',
           'files': {'f.npz': {'rank': 0, 'size': 200}},
           'entries': {'w': {'kind': 'replicated', 'shape': [4], 'dtype': '<f4', 'chunks': [
               {'offsets': [0], 'shape': [4], 'file': 'f.npz', 'member': 'w',
                'data_offset': 128, 'crc32': 0}]}}}
    doc.update(changes)
    return json.dumps(doc)


def test_a_valid_index_parses():
    index = layout.parse_index(index_doc(), 'i')
    assert index.keys() == ['w'] and index.entries['w'].dtype == F4


@pytest.mark.parametrize('text, message', [
    ('{', "'i': not a JSON index"),
    (index_doc(format='other'), "'i': not a gpuserial sharded checkpoint index"),
    (index_doc(version=2), "'i': index version 2; this gpuserial reads version 1"),
    (index_doc(files={'f.npz': {'size': 140}}),
     r"'i', key 'w': chunk \[0:4\] runs to byte 144 of 'f.npz', which has 140 bytes"),
    (index_doc(entries={'w': {'kind': 'replicated', 'shape': [5], 'dtype': '<f4',
                              'chunks': []}}), "'i', key 'w': chunks cover 0 of 5 elements"),
    (index_doc(entries={'w': {'kind': 'replicated', 'shape': [4], 'dtype': '<f4', 'chunks': [
        {'offsets': [0], 'shape': [4, 1], 'file': 'f.npz', 'member': 'w', 'data_offset': 128,
         'crc32': 0}]}}),
     re.escape("'i', key 'w': a chunk of offsets [0] and shape [4, 1] in an array of shape "
               "(4,)")),
    (index_doc(entries={'w': {'kind': 'replicated', 'shape': [4], 'dtype': '<f4', 'chunks': [
        {'offsets': [2], 'shape': [4], 'file': 'f.npz', 'member': 'w', 'data_offset': 128,
         'crc32': 0}]}}),
     re.escape("'i', key 'w': chunk [2:6] is outside the shape (4,)")),
    (index_doc(entries={'w': {'kind': 'replicated', 'shape': [], 'dtype': '|O'}}),
     "'i', key 'w': an object dtype"),
    (index_doc(entries={'w': {'kind': 'replicated', 'shape': [], 'dtype': 'zz'}}),
     "'i', key 'w': not a dtype: 'zz'"),
    (index_doc(entries={'w': {'kind': 'replicated', 'shape': [], 'dtype': [['a']]}}),
     re.escape("'i', key 'w': not a dtype: [['a']]")),
    (index_doc(entries={'w': {'kind': 'replicated', 'shape': [-1], 'dtype': '<f4'}}),
     "'i', key 'w': shape must be a list of non-negative integers"),
])
def test_a_bad_index_is_refused(text, message):
    with pytest.raises(CorruptFileError, match=message):
        layout.parse_index(text, 'i')


# ---------------------------------------------------------------------------------------------
# Saves and loads over thread ranks


G = numpy.random.default_rng(0).standard_normal((37, 11)).astype(numpy.float32)
W = numpy.random.default_rng(1).standard_normal((5, 3))


def state(size: int, rank: int, device, empty: bool = False) -> dict:
    def make(array):
        return device.send(numpy.zeros_like(array) if empty else array)

    rows, cols = split(37, size, rank), split(11, size, (rank + 1) % size)
    return {'model': {'W': make(W), 'step': 0 if empty else 3, 'unset': None},
            'rows': Shard(make(G[rows]), G.shape, rows),
            'cols': Shard(make(G[:, cols]), G.shape, (slice(None), cols))}


@pytest.mark.parametrize('n, m', [(1, 3), (3, 2), (2, 1), (2, 2)])
def test_n_ranks_save_and_m_ranks_load(tmp_path, device, small_chunks, n, m):
    assert run_ranks(n, lambda comm: save_sharded(
        tmp_path, state(n, comm.rank, device), comm)) == [None] * n

    def load(comm):
        target = state(m, comm.rank, device, empty=True)
        stats = load_sharded(tmp_path, target, comm)
        expected = state(m, comm.rank, devices_cpu)
        assert host(target['model']['W']).tobytes() == W.tobytes()
        assert target['model']['step'] == 3 and target['model']['unset'] is None
        for key in ('rows', 'cols'):
            assert host(target[key].array).tobytes() == expected[key].array.tobytes()
        return stats

    for stats in run_ranks(m, load):
        assert not isinstance(stats, BaseException), stats
        assert stats.bytes_read == stats.bytes_needed > 0


devices_cpu = gpuserial.get_device('cpu')


def test_a_load_onto_a_device_gives_new_arrays_in_a_dict(tmp_path, device):
    save_sharded(tmp_path, state(1, 0, devices_cpu), SoloComm())
    target = state(1, 0, devices_cpu, empty=True)
    load_sharded(tmp_path, target, SoloComm(), device=device)
    assert isinstance(target['rows'], Shard)
    assert gpuserial.engine.devices.device_of(target['rows'].array) == device
    assert host(target['rows'].array).tobytes() == G.tobytes()


def test_a_shard_is_a_value(tmp_path):
    shard = Shard(numpy.ones(2), (4,), slice(0, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        shard.array = numpy.zeros(2)  # type: ignore[misc]
    assert shard.box == ((0, 2),)


def test_objects_name_their_shards_by_key(tmp_path):
    link = gpuserial.Linear(4, 6)
    weights = link.W.array.copy()

    def save(comm):
        part = gpuserial.Linear(4, 6)
        part.W.array = weights[split(6, 2, comm.rank)].copy()
        part.b.array[...] = link.b.array
        save_sharded(tmp_path, part, comm,
                     shards={'W': ((6, 4), split(6, 2, comm.rank))})

    assert run_ranks(2, save) == [None, None]
    whole = gpuserial.Linear(4, 6)
    load_sharded(tmp_path, whole, SoloComm())
    assert whole.W.array.tobytes() == weights.tobytes()
    assert read_index(tmp_path).entries['W'].kind == 'sharded'


def test_per_rank_values_load_into_the_rank_of_the_same_number(tmp_path):
    run_ranks(2, lambda comm: save_sharded(tmp_path, {'rng': numpy.full(2, comm.rank)}, comm))
    results = run_ranks(3, lambda comm: load_sharded(
        tmp_path, {'rng': numpy.zeros(2, int)}, comm))
    assert isinstance(results[2], KeyNotFoundError)
    assert str(results[2]) == f"{str(tmp_path)!r}, key 'rng': not in the file"
    assert isinstance(results[0], RankFailedError) and results[0].failures == {
        2: f"KeyNotFoundError: {str(tmp_path)!r}, key 'rng': not in the file"}
    targets = [{'rng': numpy.zeros(2, int)} for _ in range(3)]
    run_ranks(3, lambda comm: load_sharded(tmp_path, targets[comm.rank], comm, strict=False))
    assert [list(t['rng']) for t in targets] == [[0, 0], [1, 1], [0, 0]]


def test_a_failing_rank_fails_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    run_ranks(3, lambda comm: save_sharded(tmp_path, {'w': W}, comm))
    before = sorted(os.listdir(tmp_path))

    class Broken:
        def serialize(self, serializer):
            raise ValueError('cannot serialize this')

    results = run_ranks(3, lambda comm: save_sharded(
        tmp_path, Broken() if comm.rank == 1 else {'w': W + 1}, comm))
    assert isinstance(results[1], ValueError) and str(results[1]) == 'cannot serialize this'
    for rank in (0, 2):
        assert isinstance(results[rank], RankFailedError)
        assert str(results[rank]) == (f'saving {str(tmp_path)!r} failed on 1 of 3 ranks (rank 1: '
                                      f'ValueError: cannot serialize this)')
    assert sorted(os.listdir(tmp_path)) == before
    target = {'w': numpy.zeros_like(W)}
    load_sharded(tmp_path, target, SoloComm())
    assert target['w'].tobytes() == W.tobytes()


def test_a_failed_index_write_fails_every_rank_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch):
    run_ranks(2, lambda comm: save_sharded(tmp_path, {'w': W}, comm))
    before = sorted(os.listdir(tmp_path))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(collectives.json, 'dumps', full_disk)
    results = run_ranks(2, lambda comm: save_sharded(tmp_path, {'w': W + 1}, comm))
    assert type(results[0]) is OSError and results[0].errno == errno.ENOSPC  # its own error
    assert isinstance(results[1], RankFailedError)
    error = (f'OSError: [Errno 28] No space left on device (writing the file): '
             f'{str(tmp_path / "index.json")!r}')  # the write's error names the file
    assert str(results[1]) == (f'saving {str(tmp_path)!r} failed on rank 0 writing the index '
                               f'({error})')
    assert results[1].failures == {0: error}
    assert sorted(os.listdir(tmp_path)) == before  # the new data files and the index's temp
    monkeypatch.undo()
    target = {'w': numpy.zeros_like(W)}
    load_sharded(tmp_path, target, SoloComm())
    assert target['w'].tobytes() == W.tobytes()


def test_inconsistent_shards_fail_every_rank_before_writing(tmp_path):
    results = run_ranks(2, lambda comm: save_sharded(
        tmp_path, {'w': Shard(numpy.ones(3), (4,), slice(comm.rank, comm.rank + 3))}, comm))
    for result in results:
        assert isinstance(result, MismatchError)
        assert str(result) == (f"{str(tmp_path)!r}, key 'w': parts [0:3] (rank 0) and [1:4] "
                               f"(rank 1) overlap")
    assert os.listdir(tmp_path) == []


def test_a_key_that_is_another_keys_shard_member_collides_before_writing(tmp_path):
    state = {'emb': Shard(numpy.arange(4.0), (4,), slice(0, 4)), 'emb@0': numpy.full(4, 7.0)}
    with pytest.raises(KeyCollisionError, match=re.escape(
            f"{str(tmp_path)!r}, key 'emb@0': its data would be stored as member 'emb@0', as "
            f"would key 'emb'")):
        save_sharded(tmp_path, state, SoloComm())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(('value', 'message'), [
    (numpy.array([1, 'a'], object), 'object arrays other than None cannot be saved (arrays, '
                                    'numbers, strings and None can)'),
    (gpuserial.Linear(2, 3), 'an object (Linear), not a value: save it with')],
    ids=['object-array', 'link'])
def test_a_value_no_file_holds_is_an_unstorable_value_error(tmp_path, value, message):
    """As save_npz and save_hdf5 raise it (a plain TypeError here, which an ``except
    GpuserialError`` let through, and that did not say how to save a link)."""
    with pytest.raises(gpuserial.UnstorableValueError, match=re.escape(
            f"{str(tmp_path)!r}, key 'g/x': {message}")):
        save_sharded(tmp_path, {'g': {'x': value}, 'n': None}, SoloComm())
    assert os.listdir(tmp_path) == []


def test_a_failure_while_rank_0_makes_the_index_fails_every_rank(tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise UserWarning('metadata on a dtype is not saved')  # as under -W error

    monkeypatch.setattr(layout.SavePlan, 'document', failing)
    results = run_ranks(2, lambda comm: save_sharded(tmp_path, {'w': W}, comm))
    assert isinstance(results[0], UserWarning)  # not a hang of rank 1
    assert isinstance(results[1], RankFailedError) and 'metadata' in str(results[1])
    assert os.listdir(tmp_path) == []


def test_a_load_that_fails_on_one_rank_fills_no_rank(tmp_path):
    run_ranks(2, lambda comm: save_sharded(tmp_path, {'w': W, 'step': 100}, comm))
    targets = [{'w': numpy.zeros_like(W), 'step': 0} for _ in range(2)]
    targets[1]['missing'] = numpy.zeros(3)  # asked for by rank 1 alone
    results = run_ranks(2, lambda comm: load_sharded(tmp_path, targets[comm.rank], comm))
    assert isinstance(results[1], KeyNotFoundError) and isinstance(results[0], RankFailedError)
    for target in targets:
        assert not target['w'].any() and target['step'] == 0


def test_a_load_with_a_path_finds_the_shards_of_a_dict_under_it(tmp_path):
    run_ranks(2, lambda comm: save_sharded(
        tmp_path, {'model': {'g': Shard(W[split(5, 2, comm.rank)], (5, 3), split(5, 2, comm.rank))},
                   'step': 3}, comm))
    target = {'g': Shard(numpy.zeros((2, 3)), (5, 3), slice(1, 3))}
    load_sharded(tmp_path, target, SoloComm(), path='model/')
    assert target['g'].array.tobytes() == W[1:3].tobytes()


@pytest.mark.parametrize('dtype', [
    numpy.dtype([(('the title', 'a'), '<f4'), ('b', '<i4')]),
    numpy.dtype([('n', [('x', '<f4'), ('y', '<i2', (2, 3))]), ('b', 'u1')]),
    numpy.dtype('<f4', metadata={'units': 'm'})])  # not in the index: no warning either
def test_dtypes_round_trip_through_the_index(tmp_path, dtype):
    values = numpy.zeros(3, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        save_sharded(tmp_path, {'v': values}, SoloComm())
    target = {'v': numpy.ones(3, dtype)}
    load_sharded(tmp_path, target, SoloComm())
    assert target['v'].dtype == dtype and target['v'].tobytes() == values.tobytes()


@pytest.mark.parametrize('n', [1, 2])
def test_a_new_save_replaces_the_old_one_and_removes_its_files(tmp_path, n):
    run_ranks(n, lambda comm: save_sharded(tmp_path, {'w': W, 'r': numpy.full(3, comm.rank)},
                                           comm))
    old = read_index(tmp_path)
    assert run_ranks(n, lambda comm: save_sharded(tmp_path, {'w': W * 2}, comm)) == [None] * n
    new = read_index(tmp_path)
    assert new.token != old.token
    assert sorted(os.listdir(tmp_path)) == sorted(['index.json', *new.files])


@pytest.mark.parametrize('problem', ['missing index', 'flipped byte', 'truncated',
                                     'missing file'])
def test_damage_is_reported_with_the_file_and_key(tmp_path, problem):
    save_sharded(tmp_path, {'w': W}, SoloComm())
    index = read_index(tmp_path)
    (name,) = index.files
    path = tmp_path / name
    data_at = index.entries['w'].chunks[0].data_offset
    if problem == 'missing index':
        os.unlink(tmp_path / 'index.json')
        error, message = FileNotFoundError, 'no sharded checkpoint here'
    elif problem == 'flipped byte':
        data = bytearray(path.read_bytes())
        data[data_at + 3] ^= 1
        path.write_bytes(bytes(data))
        error, message = CorruptFileError, f"{str(path)!r}, key 'w' .*: CRC-32 mismatch"
    elif problem == 'truncated':
        os.truncate(path, data_at + 10)
        error, message = CorruptFileError, f"{str(path)!r}, key 'w' .*: truncated"
    else:
        os.unlink(path)
        error, message = CorruptFileError, 'a data file of the checkpoint is missing'
    results = run_ranks(2, lambda comm: load_sharded(tmp_path, {'w': numpy.zeros_like(W)}, comm))
    assert isinstance(results[0], error) and isinstance(results[1], (error, RankFailedError))
    with pytest.raises(error, match=message):
        raise results[0]


@pytest.mark.parametrize('call', [save_sharded, load_sharded])
def test_swapped_arguments_and_a_comm_that_is_none_are_named(tmp_path, call):
    """They failed deep inside: "expected str, bytes or os.PathLike object, not dict" and
    "'str' object has no attribute 'rank'"."""
    name = call.__name__
    with pytest.raises(TypeError, match=rf'^{name}\(directory, obj, comm\): directory is a path '
                                        r'or a URL, not a dict \(the directory comes first\)$'):
        call({'w': numpy.ones(3)}, str(tmp_path / 'ck'), SoloComm())
    with pytest.raises(TypeError, match=rf'^{name}: comm is an mpi4py communicator \(or anything '
                                        r'with rank, size, allgather and bcast\), not a str '
                                        r'\(it has no rank, size, allgather, bcast\)$'):
        call(tmp_path / 'ck', {'w': numpy.ones(3)}, 'world')
    assert list(tmp_path.iterdir()) == []


def test_a_sharded_load_of_one_file_says_so(tmp_path):
    """It said "[Errno 20] Not a directory: '.../m.npz/index.json'"."""
    gpuserial.save(tmp_path / 'm.npz', {'w': numpy.ones(3)})
    target = {'w': numpy.zeros(3)}
    with pytest.raises(NotADirectoryError, match=r"^'.*m\.npz': a file, not a sharded "
                                                 r"checkpoint's directory \(load one NPZ or "
                                                 r"HDF5 file with gpuserial\.load, load_npz or "
                                                 r"load_hdf5\)$"):
        load_sharded(tmp_path / 'm.npz', target, SoloComm())
    assert target['w'].tolist() == [0, 0, 0]


def test_a_single_file_load_of_a_sharded_checkpoint_says_what_loads_it(tmp_path):
    """latest() returns sharded checkpoints too; load_npz of one said only "[Errno 21] Is a
    directory: 'ck'"."""
    save_sharded(tmp_path / 'ck', {'w': numpy.ones(3)}, SoloComm())
    (tmp_path / 'plain').mkdir()
    hint = ' (a sharded checkpoint: load it with gpuserial.distributed.load_sharded)'
    for load, what in ((lambda f: gpuserial.load_npz(f, {'w': numpy.zeros(3)}), 'a file'),
                       (lambda f: gpuserial.load_hdf5(f, {'w': numpy.zeros(3)}),
                        'an HDF5 file'),
                       (gpuserial.load, 'an NPZ or HDF5 file'),
                       (gpuserial.open, 'an NPZ or HDF5 file')):
        with pytest.raises(IsADirectoryError, match=re.escape(
                f"'{tmp_path / 'ck'}': is a directory, not {what}{hint}") + '$'):
            load(tmp_path / 'ck')
        with pytest.raises(IsADirectoryError, match=re.escape(
                f"'{tmp_path / 'plain'}': is a directory, not {what}") + '$'):
            load(tmp_path / 'plain')


def test_shards_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(MismatchError, match=r"key 'w': the shard .* has shape \(2,\), the "
                                            r"array \(3,\)"):
        save_sharded(tmp_path, {'w': Shard(numpy.ones(3), (4,), slice(0, 2))}, SoloComm())
    with pytest.raises(KeyNotFoundError, match="shards= names keys the object does not store: "
                                               "'v'"):
        save_sharded(tmp_path, {'w': numpy.ones(3)}, SoloComm(), shards={'v': ((3,), None)})
    save_sharded(tmp_path, {'w': numpy.ones(4)}, SoloComm())
    with pytest.raises(MismatchError, match=r"key 'w': the shard is of a global shape \(5,\), "
                                            r"the checkpoint holds shape \(4,\)"):
        load_sharded(tmp_path, {'w': Shard(numpy.ones(2), (5,), slice(0, 2))}, SoloComm())


def open_fds() -> list[str]:
    return sorted(os.listdir('/proc/self/fd'))


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='needs /proc/self/fd')
def test_loads_and_consolidation_leave_no_file_open(tmp_path):
    run_ranks(2, lambda comm: save_sharded(tmp_path / 'ckpt', state(2, comm.rank, devices_cpu),
                                           comm))
    before = open_fds()
    target = state(1, 0, devices_cpu, empty=True)
    load_sharded(tmp_path / 'ckpt', target, SoloComm())
    assert host(target['rows'].array).tobytes() == G.tobytes()  # read from both files
    assert open_fds() == before
    with pytest.raises(KeyNotFoundError):  # a failed load too
        load_sharded(tmp_path / 'ckpt', {'rows': G.copy(), 'other': G.copy()}, SoloComm())
    assert open_fds() == before
    consolidate(tmp_path / 'ckpt', tmp_path / 'one.npz')
    assert open_fds() == before


def test_a_reader_closed_twice_closes_its_files_once(tmp_path):
    save_sharded(tmp_path, {'w': W}, SoloComm())
    reader = reading.ShardedReader(str(tmp_path), read_index(tmp_path), 0)
    before = open_fds()
    with reader:
        value = numpy.empty_like(W)
        reader.read_into(reader.entry('w'), value)
    assert open_fds() == before  # closed on leaving the block, the reader still referenced
    held = os.open(tmp_path / 'index.json', os.O_RDONLY)  # may get the number the reader had
    try:
        reader.close()
        os.fstat(held)  # still open
    finally:
        os.close(held)
    assert value.tobytes() == W.tobytes()


def test_a_piece_gives_no_more_bytes_than_it_holds(tmp_path):
    save_sharded(tmp_path, {'w': W}, SoloComm())
    (name,) = read_index(tmp_path).files
    with reading.ShardedReader(tmp_path, read_index(tmp_path), 0) as reader:
        entry = reader.entry('w')
        (piece,) = entry.token
        stream = reading._RunStream(reader, piece, entry.dtype, 'w')
        with pytest.raises(CorruptFileError, match=re.escape(
                f"{str(tmp_path / name)!r}, key 'w' (member 'w'): asked for more bytes than the "
                f"piece holds")):
            stream.read_into(memoryview(bytearray(W.nbytes + 1)))


def test_consolidate_writes_one_ordinary_npz(tmp_path, capsys):
    run_ranks(3, lambda comm: save_sharded(tmp_path / 'ckpt', state(3, comm.rank, devices_cpu),
                                           comm))
    result = consolidate(tmp_path / 'ckpt', tmp_path / 'one.npz')
    assert (result.entries, result.nbytes) == (5, W.nbytes + 2 * G.nbytes + 8)
    with numpy.load(tmp_path / 'one.npz') as z:
        assert sorted(z.files) == ['cols', 'model/W', 'model/step', 'model/unset', 'rows']
        assert z['rows'].tobytes() == z['cols'].tobytes() == G.tobytes()
    target = {'model': {'W': numpy.zeros_like(W), 'step': 0, 'unset': None},
              'rows': numpy.zeros_like(G), 'cols': numpy.zeros_like(G)}
    gpuserial.load_npz(tmp_path / 'one.npz', target)
    assert target['model']['step'] == 3 and target['cols'].tobytes() == G.tobytes()
    assert cli.main(['consolidate', str(tmp_path / 'ckpt'), str(tmp_path / 'cli.npz')]) == 0
    assert (tmp_path / 'cli.npz').read_bytes() == (tmp_path / 'one.npz').read_bytes()
    assert capsys.readouterr().out == (f'{tmp_path / "ckpt"} -> {tmp_path / "cli.npz"}: 5 '
                                       f'entries, 3.3 KiB, NPZ (stored)\n')




def test_consolidate_keeps_rank_0s_value_of_a_local_key_unless_told(tmp_path, capsys):
    run_ranks(2, lambda comm: save_sharded(tmp_path / 'ckpt', {'rng': numpy.full(2, comm.rank)},
                                           comm))
    for options, rank in (([], 0), (['--rank', '1'], 1)):
        out = tmp_path / f'rank{rank}.npz'
        assert cli.main(['consolidate', str(tmp_path / 'ckpt'), str(out), *options]) == 0
        with numpy.load(out) as z:
            assert z['rng'].tolist() == [rank, rank]
    capsys.readouterr()

@pytest.mark.parametrize(('option', 'method', 'shown'), [
    ('none', zipfile.ZIP_STORED, 'stored'), ('0', zipfile.ZIP_STORED, 'stored'),
    ('deflate', zipfile.ZIP_DEFLATED, 'deflate'), ('6', zipfile.ZIP_DEFLATED, 'deflate')])
def test_consolidate_compression_option(tmp_path, capsys, option, method, shown):
    save_sharded(tmp_path / 'ckpt', {'w': W, 'step': 3}, SoloComm())
    out = tmp_path / 'one.npz'
    assert cli.main(['consolidate', str(tmp_path / 'ckpt'), str(out), '--compression',
                     option]) == 0
    assert capsys.readouterr().out == (f'{tmp_path / "ckpt"} -> {out}: 2 entries, '
                                       f'{cli.format_bytes(W.nbytes + 8)}, NPZ ({shown})\n')
    with zipfile.ZipFile(out) as archive:
        assert {info.compress_type for info in archive.infolist()} == {method}
        assert archive.testzip() is None

def test_inspect_describes_a_sharded_checkpoint(tmp_path, capsys):
    run_ranks(2, lambda comm: save_sharded(tmp_path, state(2, comm.rank, devices_cpu), comm))
    token = read_index(tmp_path).token
    assert cli.main(['inspect', str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f'{tmp_path}: sharded checkpoint, saved by 2 rank(s), 2 data file(s), 5 keys'
    rows = {line.split()[0]: line.split(None, 4)[1:] for line in lines[2:7]}
    assert rows['rows'] == ['sharded', '(37,', '11)', f'float32  1 in rank-00000-{token}.npz, '
                            f'1 in rank-00001-{token}.npz']
    assert rows['model/unset'][:2] == ['none', 'None']
    sizes = {name: os.path.getsize(tmp_path / name) for name in read_index(tmp_path).files}
    assert lines[-3:] == [*(f'file {name}: {size} bytes' for name, size in sorted(sizes.items())),
                          f'total: {W.nbytes + 2 * G.nbytes + 8} bytes of values, '
                          f'{sum(sizes.values())} bytes in files']
    assert cli.main(['inspect', '--json', str(tmp_path)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described['nbytes'] == W.nbytes + 2 * G.nbytes + 8  # nothing for the None
    assert described['entries']['cols']['chunks'][1] == {
        'offsets': [0, 5], 'shape': [37, 6], 'file': f'rank-00000-{token}.npz'}  # rank 0's


def test_inspect_lists_the_values_of_each_rank_of_a_local_key(tmp_path, capsys):
    run_ranks(2, lambda comm: save_sharded(tmp_path, {'rng': numpy.full(2, comm.rank)}, comm))
    token = read_index(tmp_path).token
    assert cli.main(['inspect', str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:5]]
    assert rows == [['rng', 'local', '2', 'rank(s)'],
                    *(['rank', str(rank), 'array', '(2,)', 'int64', '1', 'in',
                       f'rank-0000{rank}-{token}.npz'] for rank in (0, 1))]


@pytest.mark.chainer
def test_chainer_loads_a_consolidated_checkpoint(tmp_path):
    link = gpuserial.Linear(4, 6)

    def save(comm):
        part = gpuserial.Linear(4, 6)
        part.W.array = link.W.array[split(6, 2, comm.rank)].copy()
        part.b.array[...] = link.b.array
        save_sharded(tmp_path / 'ckpt', part, comm, shards={'W': ((6, 4), split(6, 2, comm.rank))})

    run_ranks(2, save)
    consolidate(tmp_path / 'ckpt', tmp_path / 'one.npz')
    code = ('import sys, chainer, numpy; link = chainer.links.Linear(4, 6); '
            'chainer.serializers.load_npz(sys.argv[1], link); '
            'sys.stdout.buffer.write(link.W.array.tobytes() + link.b.array.tobytes())')
    out = subprocess.run([CHAINER_PYTHON, '-c', code, str(tmp_path / 'one.npz')],
                         capture_output=True, check=True).stdout
    assert out == link.W.array.tobytes() + link.b.array.tobytes()


def small_trainer(out, iterations: int) -> gpuserial.Trainer:
    """A trainer of a small linear model with momentum, the same on every rank, that stops
    after ``iterations``."""
    model = gpuserial.Linear(3, 2)
    model.W.array[...] = 1
    optimizer = gpuserial.MomentumSGD(lr=0.1)
    optimizer.setup(model)
    data = [(numpy.ones(3, numpy.float32), numpy.zeros(2, numpy.float32))] * 8

    def step(model, batch):
        model.W.grad = numpy.full_like(model.W.array, 0.5)
        model.b.grad = numpy.full_like(model.b.array, 0.5)

    iterator = gpuserial.SerialIterator(data, batch_size=2, shuffle=False)
    updater = gpuserial.StandardUpdater(iterator, optimizer, step)
    return gpuserial.Trainer(updater, stop_trigger=(iterations, 'iteration'), out=out)


def test_multi_node_snapshot_saves_the_trainers_of_every_rank(tmp_path):
    def train(comm):
        trainer = small_trainer(tmp_path, 3)
        trainer.extend(multi_node_snapshot(comm), trigger=(3, 'iteration'))
        trainer.run()
        return trainer.updater.get_optimizer('main').target.W.array.copy()

    trained = run_ranks(2, train)
    assert trained[0].tobytes() == trained[1].tobytes()
    resumed = small_trainer(tmp_path, 3)
    load_sharded(tmp_path / 'snapshot_iter_3', resumed, SoloComm())
    assert resumed.updater.iteration == 3
    assert resumed.updater.get_optimizer('main').target.W.array.tobytes() == trained[0].tobytes()
    kinds = {e.kind for e in read_index(tmp_path / 'snapshot_iter_3').entries.values()}
    assert kinds <= {'replicated', 'none'}


def test_multi_node_snapshot_runs_where_the_snapshot_would(tmp_path):
    trainer = small_trainer(tmp_path, 8)  # 4 iterations an epoch
    extension = multi_node_snapshot(SoloComm())
    trainer.extend(extension)  # its own trigger and priority
    trainer.extend(multi_node_snapshot(SoloComm(), 'second_{.updater.iteration}',
                                       condition=lambda: trainer.updater.epoch == 2))
    trainer.run()
    assert sorted(os.listdir(tmp_path)) == ['second_8', 'snapshot_iter_4', 'snapshot_iter_8']
    assert extension.priority == gpuserial.training.snapshot().priority  # after the others


def test_importing_gpuserial_does_not_import_mpi4py():
    code = ('import sys, gpuserial, gpuserial.distributed, gpuserial.tools.cli; '
            'print("mpi4py" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == 'False'
