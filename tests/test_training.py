"""The training loop: iterator, triggers, trainer, snapshots, exact resume, Chainer's layout.

Run as a module (``python -m tests.test_training resume ...``) it is the "new process" of the
resume tests: it builds fresh objects, loads a snapshot, trains on and writes the final state.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import warnings

import numpy
import pytest

from gpuserial import serializers
from gpuserial.engine import devices
from gpuserial.errors import MismatchError
from gpuserial.formats.npz import serialize_refs
from gpuserial.objects.link import Chain, Linear
from gpuserial.objects.optimizers import SGD, Adam, MomentumSGD
from gpuserial.objects.training import (
    PRIORITY_EDITOR,
    PRIORITY_READER,
    PRIORITY_WRITER,
    Extension,
    IntervalTrigger,
    SerialIterator,
    StandardUpdater,
    Trainer,
    get_trigger,
    snapshot,
    snapshot_object,
)
from tests.conftest import CHAINER_PYTHON
from tests.test_link import Echo, FromDict, Net, assert_same_state, snapshot_state

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHAINER_DATA = ROOT / 'tests' / 'data' / 'chainer'
OPTIMIZERS = {'sgd': lambda: SGD(lr=0.05), 'momentum_sgd': lambda: MomentumSGD(lr=0.05),
              'adam': lambda: Adam(alpha=0.01)}
FORMATS = {'npz': (serializers.save_npz, serializers.load_npz),
           'h5': (serializers.save_hdf5, serializers.load_hdf5)}


# -- a least-squares model with analytic gradients ------------------------------------------------


def dataset(n=20):
    rs = numpy.random.RandomState(600)
    x = rs.uniform(-1, 1, (n, 4)).astype(numpy.float32)
    t = (x @ rs.uniform(-1, 1, (4, 2)) + 0.5).astype(numpy.float32)
    return list(zip(x, t, strict=True))


def least_squares_step(model, batch):
    """Gradients of mean((x W^T + b - t)^2) for ``model.predictor.l``."""
    xp = model.xp
    x = xp.asarray(numpy.stack([example[0] for example in batch]))
    t = xp.asarray(numpy.stack([example[1] for example in batch]))
    link = model.predictor.l
    r = x @ link.W.array.T + link.b.array - t
    link.W.grad = (2.0 / r.size) * (r.T @ x)
    link.b.grad = (2.0 / r.size) * r.sum(axis=0)


def make_model():
    w = numpy.random.RandomState(700).uniform(-1, 1, (2, 4)).astype(numpy.float32)
    return Chain(predictor=Chain(l=Linear(4, 2, initialW=w)))


def chainer_dataset():
    """chainer_models.trainer_dataset(), as a list of (x, t)."""
    x = numpy.random.RandomState(600).uniform(-1, 1, (20, 4)).astype(numpy.float32)
    t = numpy.random.RandomState(601).uniform(-1, 1, (20, 2)).astype(numpy.float32)
    return list(zip(x, t, strict=True))


def make_trainer(optimizer='momentum_sgd', stop=7, out=None, every=None, fmt='npz',
                 device='cpu', batch_size=3, data=None):
    """A trainer like chainer_models._make_trainer: keys ``updater/model:main/predictor/l/W``."""
    model = make_model().to_device(device)
    iterator = SerialIterator(dataset() if data is None else data, batch_size, shuffle=True,
                              seed=0)
    opt = OPTIMIZERS[optimizer]() if isinstance(optimizer, str) else optimizer
    opt.setup(model)
    updater = StandardUpdater(iterator, opt, least_squares_step)
    # out=None: a trainer that must not run (os.devnull is no directory)
    trainer = Trainer(updater, stop_trigger=(stop, 'iteration'), out=str(out or os.devnull))
    if every:
        trainer.extend(snapshot(FORMATS[fmt][0], filename='snapshot_iter_{.updater.iteration}'),
                       trigger=(every, 'iteration'))
    return trainer


def host_state(obj):
    """{key: NumPy value} of everything ``obj`` serializes, except the wall-clock time."""
    state = snapshot_state(obj)
    state.pop('_snapshot_elapsed_time', None)
    return {k: devices.to_host(v) for k, v in state.items()}


def resume_main(argv):
    """The new process: fresh objects, load the snapshot, train on to N, save the state."""
    optimizer, fmt, device, snapshot_path, out_path, stop, every = argv
    trainer = make_trainer(optimizer, int(stop), pathlib.Path(out_path).parent / 'result2',
                           int(every), fmt, device)
    FORMATS[fmt][1](snapshot_path, trainer)
    trainer.run()
    state = host_state(trainer)
    numpy.savez(out_path, **{k: numpy.asarray(v) for k, v in state.items()})


# -- SerialIterator -------------------------------------------------------------------------------


def test_iterator_without_shuffle_follows_chainers_state_machine():
    it = SerialIterator(list(range(5)), 2, shuffle=False)
    assert it.order is None
    seen = []
    for _ in range(4):
        seen.append((it.next(), it.epoch, it.is_new_epoch, it.current_position))
    assert seen == [([0, 1], 0, False, 2), ([2, 3], 0, False, 4), ([4, 0], 1, True, 1),
                    ([1, 2], 1, False, 3)]
    assert it.epoch_detail == 1.6 and it.previous_epoch_detail == 1.2


def test_iterator_without_repeat_stops_after_one_epoch():
    it = SerialIterator(list(range(5)), 2, repeat=False, shuffle=False)
    assert [list(b) for b in it] == [[0, 1], [2, 3], [4]]
    assert it.epoch == 1 and not it.repeat


def test_iterator_shuffle_is_seeded_and_a_permutation_each_epoch():
    a = SerialIterator(list(range(6)), 6, seed=3)
    b = SerialIterator(list(range(6)), 6, seed=3)
    batches = [a.next() for _ in range(3)]
    assert batches == [b.next() for _ in range(3)]
    assert all(sorted(batch) == list(range(6)) for batch in batches)
    assert a.previous_epoch_detail == 2.0 and a.is_new_epoch


def test_iterator_empty_dataset_that_repeats_fails():
    with pytest.raises(ValueError, match='epoch size must be positive'):
        SerialIterator([], 2, shuffle=False).next()


def test_iterator_reset():
    it = SerialIterator(list(range(4)), 3, seed=1)
    it.next()
    it.next()
    it.reset()
    assert (it.epoch, it.current_position, it.is_new_epoch, it.previous_epoch_detail) == (
        0, 0, False, None)


def test_iterator_serialize_layout_and_exact_resume():
    it = SerialIterator(list(range(7)), 3, seed=4)
    for _ in range(2):
        it.next()
    state = snapshot_state(it)
    assert sorted(state) == sorted([
        'current_position', 'epoch', 'is_new_epoch', 'order', 'previous_epoch_detail',
        'random_state/key', 'random_state/pos', 'random_state/has_gauss',
        'random_state/cached_gaussian'])
    assert state['order'].dtype == numpy.intp and state['random_state/key'].shape == (624,)
    resumed = SerialIterator(list(range(7)), 3, seed=99)
    resumed.serialize(FromDict(state))
    assert_same_state(state, snapshot_state(resumed))
    assert [it.next() for _ in range(6)] == [resumed.next() for _ in range(6)]


def test_iterator_loads_a_chainer_state_without_random_state():
    it = SerialIterator(list(range(5)), 2, seed=0)
    chainer_state = {'current_position': 4, 'epoch': 2, 'is_new_epoch': False,
                     'order': numpy.array([4, 3, 2, 1, 0])}
    rng = it._random.get_state()[1].copy()
    it.serialize(FromDict(chainer_state))  # previous_epoch_detail missing: guessed as Chainer
    assert (it.epoch, it.current_position) == (2, 4) and list(it.order) == [4, 3, 2, 1, 0]
    assert it.previous_epoch_detail == 2.4
    numpy.testing.assert_array_equal(it._random.get_state()[1], rng)
    assert it.next() == [0, *it.order[:1]]


@pytest.mark.chainer
def test_iterator_matches_chainers_with_the_same_random_state():
    script = ('import numpy\nfrom chainer.iterators import SerialIterator, ShuffleOrderSampler\n'
              'it = SerialIterator(list(range(7)), 3, order_sampler=ShuffleOrderSampler('
              'numpy.random.RandomState(5)))\n'
              'print([[int(i) for i in it.next()] + [it.epoch] for _ in range(9)])\n')
    out = subprocess.run([str(CHAINER_PYTHON), '-c', script], capture_output=True, text=True,
                         check=True).stdout
    it = SerialIterator(list(range(7)), 3, seed=5)
    assert json.loads(out) == [[int(i) for i in it.next()] + [it.epoch] for _ in range(9)]


# -- triggers and trainer -------------------------------------------------------------------------


class _FakeUpdater:
    def __init__(self):
        self.iteration, self.epoch_detail, self.previous_epoch_detail = 0, 0.0, None


class _FakeTrainer:
    def __init__(self):
        self.updater = _FakeUpdater()

    def advance(self, iterations=1, epochs=0.25):
        self.updater.previous_epoch_detail = self.updater.epoch_detail
        self.updater.iteration += iterations
        self.updater.epoch_detail += epochs


def test_interval_trigger_iterations_and_epochs():
    by_iteration, by_epoch = IntervalTrigger(3, 'iteration'), IntervalTrigger(0.5, 'epoch')
    trainer = _FakeTrainer()
    fired = []
    for _ in range(6):
        trainer.advance()
        fired.append((by_iteration(trainer), by_epoch(trainer)))
    assert fired == [(False, False), (False, True), (True, False), (False, True),
                     (False, False), (True, True)]
    assert by_iteration.get_training_length() == (3, 'iteration')
    assert repr(by_epoch) == "IntervalTrigger(0.5, 'epoch')"
    with pytest.raises(ValueError, match="not 'step'"):
        IntervalTrigger(1, 'step')


def test_interval_trigger_serialize_and_old_snapshot_fallback():
    trigger = IntervalTrigger(2, 'iteration')
    state = snapshot_state(trigger)
    assert state == {'previous_iteration': 0, 'previous_epoch_detail': 0.0}
    with pytest.warns(UserWarning) as caught:
        trigger.serialize(_MissingKeys())
    assert sorted(str(w.message) for w in caught) == [
        'IntervalTrigger: previous_epoch_detail is not saved; guessing it',
        'IntervalTrigger: previous_iteration is not saved; guessing it']
    assert trigger._previous_iteration == -1 and trigger._previous_epoch_detail == -1.0
    trainer = _FakeTrainer()  # resumed at iteration 3: the guess is 2, in the same period
    trainer.advance(3)
    assert not trigger(trainer)
    trainer.advance()
    assert trigger(trainer)


class _MissingKeys(Echo):
    def __call__(self, key, value):
        raise KeyError(key)


@pytest.mark.chainer
def test_priorities_are_chainers():
    script = ('import json\nfrom chainer import training as t\n'
              'print(json.dumps([t.PRIORITY_WRITER, t.PRIORITY_EDITOR, t.PRIORITY_READER]))\n')
    out = subprocess.run([str(CHAINER_PYTHON), '-c', script], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == [PRIORITY_WRITER, PRIORITY_EDITOR, PRIORITY_READER]


def test_get_trigger():
    assert get_trigger(None)(None) is False
    assert get_trigger(len) is len
    assert isinstance(get_trigger((2, 'epoch')), IntervalTrigger)


class _Recording(Extension):
    def __init__(self, log, tag):
        self.log, self.tag = log, tag

    def __call__(self, trainer):
        self.log.append((self.tag, trainer.updater.iteration))

    def initialize(self, trainer):
        self.log.append((self.tag, 'init'))

    def finalize(self):
        self.log.append((self.tag, 'final'))


def test_trainer_runs_extensions_by_priority_and_trigger(tmp_path):
    trainer = make_trainer(stop=4, out=tmp_path / 'out')
    log = []
    trainer.extend(_Recording(log, 'low'), priority=1)
    trainer.extend(_Recording(log, 'high'), trigger=(2, 'iteration'), priority=5)
    trainer.extend(lambda t: log.append(('fn', t.updater.iteration)), name='fn',
                   trigger=(4, 'iteration'), call_before_training=True)
    assert trainer.elapsed_time == 0.0
    trainer.run()
    assert (tmp_path / 'out').is_dir() and trainer.updater.iteration == 4
    assert log == [('high', 'init'), ('low', 'init'), ('fn', 0), ('low', 1), ('high', 2),
                   ('low', 2), ('low', 3), ('fn', 4), ('high', 4), ('low', 4), ('high', 'final'),
                   ('low', 'final')]
    assert trainer.elapsed_time > 0
    with pytest.raises(RuntimeError, match='cannot run training loop multiple times'):
        trainer.run()


def test_trainer_extension_names():
    trainer = make_trainer()
    log = []
    for _ in range(3):
        trainer.extend(_Recording(log, 'x'))
    assert list(trainer._extensions) == ['_Recording', '_Recording_1', '_Recording_2']
    assert trainer.get_extension('_Recording_1').name == '_Recording_1'
    trainer.extend(snapshot())
    assert '_Snapshot' in trainer._extensions  # Chainer's name for it
    with pytest.raises(ValueError, match='extension nope not found'):
        trainer.get_extension('nope')
    with pytest.raises(ValueError, match='"training" is prohibited'):
        trainer.extend(_Recording(log, 'x'), name='training')
    with pytest.raises(TypeError, match='name is not given'):
        trainer.extend(type('Anon', (), {'__call__': lambda s, t: None, 'name': None,
                                         'default_name': None})())


def test_trainer_error_calls_on_error_and_finalize(tmp_path):
    def boom(model, batch):
        raise ArithmeticError('boom')
    trainer = make_trainer(out=tmp_path)
    trainer.updater.step = boom
    events = []

    class Watch(Extension):
        def __call__(self, trainer):
            pass

        def on_error(self, trainer, exc, tb):
            events.append(('error', str(exc)))

        def finalize(self):
            events.append('final')
    trainer.extend(Watch())
    trainer.extend(snapshot(filename='crash', snapshot_on_error=True))
    with pytest.raises(ArithmeticError, match='boom'):
        trainer.run()
    assert events == [('error', 'boom'), 'final']
    assert (tmp_path / 'crash').exists()


def test_updater_epochs_and_auto_new_epoch():
    trainer = make_trainer(stop=10, batch_size=4)
    updater = trainer.updater
    opt = updater.get_optimizer('main')
    assert opt.use_auto_new_epoch and updater.get_all_optimizers() == {'main': opt}
    for _ in range(5):
        updater.update()
    assert updater.iteration == 5 and updater.epoch == 1 and updater.is_new_epoch
    assert opt.epoch == 1 and opt.t == 5 and updater.epoch_detail == 1.0
    assert updater.previous_epoch_detail == 0.8
    assert updater.get_iterator('main') is updater._iterators['main']


def test_trainer_stops_on_epochs(tmp_path):
    trainer = make_trainer(batch_size=5, out=tmp_path)
    trainer.stop_trigger = get_trigger((2, 'epoch'))
    trainer.run()
    assert trainer.updater.iteration == 8 and trainer.updater.epoch == 2


# -- serialize layout ------------------------------------------------------------------------------


CHAINER_TRAINER_KEYS = [
    'updater/iterator:main/current_position', 'updater/iterator:main/epoch',
    'updater/iterator:main/is_new_epoch', 'updater/iterator:main/order',
    'updater/iterator:main/previous_epoch_detail', 'updater/optimizer:main/t',
    'updater/optimizer:main/epoch', 'updater/optimizer:main/predictor/l/W/t',
    'updater/optimizer:main/predictor/l/W/v', 'updater/optimizer:main/predictor/l/b/t',
    'updater/optimizer:main/predictor/l/b/v', 'updater/model:main/predictor/l/b',
    'updater/model:main/predictor/l/W', 'updater/iteration', 'stop_trigger/previous_iteration',
    'stop_trigger/previous_epoch_detail', '_snapshot_elapsed_time']
RANDOM_STATE_KEYS = [f'updater/iterator:main/random_state/{k}'
                     for k in ('key', 'pos', 'has_gauss', 'cached_gaussian')]


def test_trainer_layout_is_chainers(tmp_path):
    with numpy.load(CHAINER_DATA / 'trainer_snapshot.npz') as npz:
        assert sorted(npz.files) == sorted(CHAINER_TRAINER_KEYS)
    trainer = make_trainer(batch_size=4, out=tmp_path)
    trainer.run()
    assert sorted(snapshot_state(trainer)) == sorted(CHAINER_TRAINER_KEYS + RANDOM_STATE_KEYS)
    trainer = make_trainer(every=3, out=tmp_path)
    trainer.run()
    extra = ['extension_triggers/_Snapshot/previous_iteration',
             'extension_triggers/_Snapshot/previous_epoch_detail']
    assert sorted(snapshot_state(trainer)) == sorted(CHAINER_TRAINER_KEYS + RANDOM_STATE_KEYS
                                                     + extra)


def test_a_failed_trainer_load_fills_no_array(tmp_path):
    trainer = make_trainer(every=2, out=tmp_path)
    trainer.run()
    serializers.save_npz(tmp_path / 'snap.npz', trainer)
    with numpy.load(tmp_path / 'snap.npz') as npz:
        values = {key: npz[key] for key in npz.files}
    del values['updater/model:main/predictor/l/b']  # asked for after the optimizer's state
    serializers.save_npz(tmp_path / 'broken.npz', values)
    fresh = make_trainer(out=tmp_path)
    fresh.run()  # arrays and state of its own, unlike the snapshot's
    arrays = {key: (value, value.copy()) for key, value in  # the arrays the objects hold
              serialize_refs(fresh.updater).items() if value.ndim and 'random_state' not in key}
    with pytest.raises(KeyError, match="'updater/model:main/predictor/l/b': not in the file"):
        serializers.load_npz(tmp_path / 'broken.npz', fresh)
    now = serialize_refs(fresh.updater)
    for key, (array, copy) in arrays.items():
        assert now[key] is array and (array == copy).all(), key


def test_a_failed_trainer_load_changes_no_count_nor_random_state(tmp_path):
    trainer = make_trainer(out=tmp_path)
    trainer.run()
    serializers.save_npz(tmp_path / 'snap.npz', trainer)
    with numpy.load(tmp_path / 'snap.npz') as npz:
        values = {key: npz[key] for key in npz.files}
    del values['updater/model:main/predictor/l/b']  # asked for after the counts
    serializers.save_npz(tmp_path / 'broken.npz', values)
    fresh = make_trainer(stop=2, out=tmp_path)
    fresh.run()
    before = host_state(fresh)
    with pytest.raises(KeyError, match="'updater/model:main/predictor/l/b': not in the file"):
        serializers.load_npz(tmp_path / 'broken.npz', fresh)
    after = host_state(fresh)
    assert [key for key in before if not numpy.array_equal(before[key], after[key])] == []


@pytest.mark.parametrize('key, found', [
    (numpy.arange(10, dtype=numpy.uint32), 'shape (10,) and dtype uint32'),
    (numpy.zeros((2, 312), numpy.uint32), 'shape (2, 312) and dtype uint32')])
def test_a_bad_random_state_fails_the_load_before_anything_is_set(tmp_path, key, found):
    trainer = make_trainer(out=tmp_path)
    trainer.run()
    serializers.save_npz(tmp_path / 'snap.npz', trainer)
    with numpy.load(tmp_path / 'snap.npz') as npz:
        values = {key: npz[key] for key in npz.files}
    values[RANDOM_STATE_KEYS[0]] = key  # set_state refuses it: checked as it is asked for
    serializers.save_npz(tmp_path / 'broken.npz', values)
    fresh = make_trainer(stop=2, out=tmp_path)
    fresh.run()
    before = host_state(fresh)
    where = re.escape(f"{str(tmp_path / 'broken.npz')!r}, key {RANDOM_STATE_KEYS[0]!r}: "
                      f"not an MT19937 random state: stored key of {found}, expected shape "
                      f"(624,) and dtype uint32")
    with pytest.raises(MismatchError, match=where):
        serializers.load_npz(tmp_path / 'broken.npz', fresh)
    after = host_state(fresh)
    assert [key for key in before if not numpy.array_equal(before[key], after[key])] == []


@pytest.mark.parametrize('options', [  # the random state is not in the file, or is ignored
    {}, {'strict': False}, {'ignore_names': lambda key: 'random_state' in key},
    {'ignore_names': 'updater/iterator:main/random_state/key'}])
@pytest.mark.parametrize('ext', ['npz', 'h5'])
def test_chainer_trainer_snapshot_loads_with_equal_values(tmp_path, ext, options):
    path = CHAINER_DATA / 'trainer_snapshot.npz'
    if ext == 'h5':  # Chainer's layout, written by gpuserial as HDF5 from the NPZ values
        with numpy.load(path) as npz:
            values = {k: npz[k] for k in npz.files}
        serializers.save_hdf5(tmp_path / 'snap.h5', values)
        path = tmp_path / 'snap.h5'
    trainer = make_trainer(MomentumSGD(lr=0.1, momentum=0.9), batch_size=4, out=tmp_path)
    rng = trainer.updater.get_iterator('main')._random.get_state()[1].copy()
    FORMATS[ext][1](path, trainer, **options)
    with numpy.load(CHAINER_DATA / 'trainer_snapshot.npz') as npz:
        stored = {k: npz[k] for k in npz.files}
    state = snapshot_state(trainer)
    for key, value in stored.items():
        numpy.testing.assert_array_equal(state[key], value, err_msg=key)
    assert trainer.updater.iteration == 7 and trainer._snapshot_elapsed_time == 1.25
    numpy.testing.assert_array_equal(state[RANDOM_STATE_KEYS[0]], rng)  # kept its own
    trainer.stop_trigger = get_trigger((10, 'iteration'))
    trainer.run()  # and it trains on
    assert trainer.updater.iteration == 10


@pytest.mark.parametrize('ext', ['npz', 'h5'])
def test_trainer_loads_onto_another_device(tmp_path, ext):
    from tests import standin
    trainer = make_trainer(out=tmp_path / 'a')
    trainer.run()
    FORMATS[ext][0](tmp_path / 'snap', trainer)
    fresh = make_trainer(out=tmp_path / 'b')
    device = standin.StandInDevice(1)
    FORMATS[ext][1](tmp_path / 'snap', fresh, device=device)
    model = fresh.updater.get_optimizer('main').target
    assert all(p.array.device == device for p in model.params())
    assert all(p.update_rule.state['v'].device == device for p in model.params())
    iterator = fresh.updater.get_iterator('main')
    assert isinstance(iterator.order, numpy.ndarray)  # host-side state stays on the host
    model.to_cpu()
    assert_same_state(host_state(trainer), host_state(fresh))


class _Tally(Extension):
    def __init__(self):
        self.seen = numpy.zeros(3)

    def __call__(self, trainer):
        self.seen[trainer.updater.iteration % 3] += 1

    def serialize(self, serializer):
        self.seen = serializer('seen', self.seen)


def test_an_extensions_state_goes_with_the_trainer(tmp_path):
    trainer, fresh = make_trainer(out=tmp_path), make_trainer(out=tmp_path)
    tally, loaded = _Tally(), _Tally()
    trainer.extend(tally)
    fresh.extend(loaded)
    trainer.run()
    serializers.save_npz(tmp_path / 'snap.npz', trainer)
    serializers.load_npz(tmp_path / 'snap.npz', fresh)
    assert tally.seen.any() and (loaded.seen == tally.seen).all()


def test_an_extension_loads_by_itself_onto_another_device(tmp_path):
    from tests import standin
    trainer = make_trainer(out=tmp_path)
    tally = _Tally()
    trainer.extend(tally)
    trainer.run()
    serializers.save_npz(tmp_path / 'tally.npz', tally)
    fresh, device = _Tally(), standin.StandInDevice(0)
    serializers.load_npz(tmp_path / 'tally.npz', fresh, device=device)
    assert fresh.seen.device == device
    numpy.testing.assert_array_equal(devices.to_host(fresh.seen), tally.seen)


@pytest.mark.chainer
def test_chainer_trainer_snapshot_trains_on_like_chainer(tmp_path):
    """Chainer's snapshot, resumed by Chainer and by gpuserial for 3 iterations (within the
    stored shuffle order), gives the same parameters and iterator position."""
    script = (
        'import json, sys\nsys.path.insert(0, sys.argv[1])\nimport chainer_models as cm\n'
        'from chainer import serializers, training\n'
        'trainer = cm.fresh_trainer()\n'
        'serializers.load_npz(sys.argv[1] + "/trainer_snapshot.npz", trainer)\n'
        'trainer.stop_trigger = training.triggers.IntervalTrigger(10, "iteration")\n'
        'trainer.run()\n'
        'l = trainer.updater.get_optimizer("main").target.predictor.l\n'
        'it = trainer.updater.get_iterator("main")\n'
        'print(json.dumps([l.W.array.tolist(), l.b.array.tolist(), it.epoch,'
        ' it.current_position, trainer.updater.iteration]))\n')
    result = subprocess.run([str(CHAINER_PYTHON), '-c', script, str(CHAINER_DATA)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    w, b, epoch, position, iteration = json.loads(result.stdout)
    trainer = make_trainer(MomentumSGD(lr=0.1, momentum=0.9), stop=10, out=tmp_path,
                           batch_size=4, data=chainer_dataset())
    serializers.load_npz(CHAINER_DATA / 'trainer_snapshot.npz', trainer)
    trainer.stop_trigger = get_trigger((10, 'iteration'))
    trainer.run()
    link = trainer.updater.get_optimizer('main').target.predictor.l
    iterator = trainer.updater.get_iterator('main')
    assert (iterator.epoch, iterator.current_position, trainer.updater.iteration) == (
        epoch, position, iteration)
    numpy.testing.assert_allclose(link.W.array, w, rtol=1e-5, atol=1e-6)
    numpy.testing.assert_allclose(link.b.array, b, rtol=1e-5, atol=1e-6)


# -- snapshots -------------------------------------------------------------------------------------


def test_snapshot_writes_atomically_at_its_trigger(tmp_path):
    trainer = make_trainer(stop=6, out=tmp_path, every=2)
    trainer.run()
    assert sorted(os.listdir(tmp_path)) == ['snapshot_iter_2', 'snapshot_iter_4',
                                            'snapshot_iter_6']
    with numpy.load(tmp_path / 'snapshot_iter_4') as npz:
        assert int(npz['updater/iteration']) == 4


def test_snapshot_object_condition_and_callable_filename(tmp_path):
    trainer = make_trainer(stop=4, out=tmp_path)
    model = trainer.updater.get_optimizer('main').target
    saved = []
    trainer.extend(snapshot_object(model, lambda t: f'model_{t.updater.iteration}.h5',
                                   savefun=serializers.save_hdf5), trigger=(2, 'iteration'))
    trainer.extend(snapshot(savefun=lambda path, obj: saved.append(path),
                            condition=lambda: False), name='never', trigger=(1, 'iteration'))
    trainer.run()
    assert sorted(os.listdir(tmp_path)) == ['model_2.h5', 'model_4.h5'] and saved == []
    fresh = make_model()
    serializers.load_hdf5(tmp_path / 'model_4.h5', fresh)
    assert_same_state(snapshot_state(model), snapshot_state(fresh))


# -- exact resume in a new process -----------------------------------------------------------------


DEVICES = [pytest.param('cpu', id='cpu'), pytest.param('cuda:0', id='cuda0', marks=pytest.mark.gpu)]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('fmt', sorted(FORMATS))
@pytest.mark.parametrize('optimizer', sorted(OPTIMIZERS))
def test_resume_in_a_new_process_is_bit_identical(tmp_path, optimizer, fmt, device):
    n, k = 17, 8  # 20 examples in batches of 3: both runs cross epoch boundaries
    straight = make_trainer(optimizer, n, tmp_path / 'straight', k, fmt, device)
    straight.run()
    first = make_trainer(optimizer, k, tmp_path / 'first', k, fmt, device)
    first.run()
    snapshot_path = tmp_path / 'first' / f'snapshot_iter_{k}'
    assert snapshot_path.exists()
    out = tmp_path / 'resumed.npz'
    subprocess.run([sys.executable, '-m', 'tests.test_training', 'resume', optimizer, fmt,
                    device, str(snapshot_path), str(out), str(n), str(k)],
                   cwd=ROOT, check=True, timeout=120)
    expected = host_state(straight)
    with numpy.load(out) as npz:
        resumed = {key: npz[key] for key in npz.files}
    assert set(resumed) == set(expected)
    assert int(resumed['updater/iteration']) == n
    for key, value in expected.items():
        value = numpy.asarray(value)
        assert resumed[key].dtype == value.dtype, key
        numpy.testing.assert_array_equal(resumed[key], value, err_msg=key)
    assert (tmp_path / 'result2' / f'snapshot_iter_{2 * k}').exists()


# -- the seeds' snippets ---------------------------------------------------------------------------


@pytest.mark.parametrize('fmt', ['npz', 'hdf5'])
def test_seed_snippets_run_as_written(tmp_path, monkeypatch, fmt):
    monkeypatch.chdir(tmp_path)
    from gpuserial import serializers  # noqa: F811  the snippets' import
    save = getattr(serializers, f'save_{fmt}')
    load = getattr(serializers, f'load_{fmt}')

    trainer = make_trainer(MomentumSGD(lr=0.1), stop=5, out='result')
    trainer.run()
    optimizer = trainer.updater.get_optimizer('main')
    model = optimizer.target

    save('my.model', model)
    save('my.state', optimizer)
    save('my.trainer', trainer)

    expected = [host_state(x) for x in (model, optimizer, trainer)]
    fresh_trainer = make_trainer(MomentumSGD(lr=0.1), stop=5)
    trainer = fresh_trainer
    optimizer = trainer.updater.get_optimizer('main')
    model = optimizer.target
    load('my.model', model)
    load('my.state', optimizer)
    assert_same_state(expected[0], host_state(model))
    assert_same_state(expected[1], host_state(optimizer))
    load('my.trainer', trainer)
    assert_same_state(expected[2], host_state(trainer))
    assert sorted(os.listdir(tmp_path)) == ['my.model', 'my.state', 'my.trainer', 'result']


# -- Chainer loads what gpuserial writes ---------------------------------------------------------


@pytest.mark.chainer
def test_chainer_loads_gpuserial_files(tmp_path):
    """Every reference file, loaded into gpuserial objects and saved again by gpuserial (in both
    formats), loads into the matching real Chainer 7.8.1 objects with the same values."""
    from tests.test_link import _reference_model
    written = []
    for name in ['linear', 'chain', 'chainlist', 'bn', 'uninit', 'momentum_sgd_model',
                 'adam_model', 'momentum_sgd', 'adam', 'trainer_snapshot']:
        if name in ('momentum_sgd', 'adam'):
            model = Net()
            serializers.load_npz(CHAINER_DATA / f'{name}_model.npz', model)
            obj = (MomentumSGD(lr=0.1) if name == 'momentum_sgd' else Adam()).setup(model)
        elif name == 'trainer_snapshot':
            obj = make_trainer(MomentumSGD(lr=0.1), batch_size=4)
        else:
            obj = _reference_model(name)
        serializers.load_npz(CHAINER_DATA / f'{name}.npz', obj)
        for ext, save in (('npz', serializers.save_npz), ('h5', serializers.save_hdf5)):
            save(tmp_path / f'{name}.{ext}', obj)
            written.append(f'{name}.{ext}')
    result = subprocess.run(
        [str(CHAINER_PYTHON), str(CHAINER_DATA / 'check_gpuserial_files.py'), str(tmp_path),
         '--compare'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(json.loads(result.stdout)) == set(written)


CHAINER_ROUND_TRIP = """
import sys

import numpy

import gpuserial


def make(out, stop):
    model = gpuserial.Linear(3, 2)
    model.W.array[...] = 1
    optimizer = gpuserial.MomentumSGD(lr=0.1).setup(model)
    data = [numpy.full(3, i, numpy.float32) for i in range(8)]

    def step(model, batch):
        model.W.grad = numpy.outer(numpy.ones(2, numpy.float32), numpy.sum(batch, axis=0))
        model.b.grad = numpy.ones(2, numpy.float32)

    updater = gpuserial.StandardUpdater(gpuserial.SerialIterator(data, 3, seed=0), optimizer, step)
    return gpuserial.Trainer(updater, stop_trigger=(stop, 'iteration'), out=out)


if __name__ == '__main__':  # in Chainer's environment: Chainer loads, trains on, saves
    import chainer
    source, target, out = sys.argv[1:]
    trainer = make(out, 7)
    load = chainer.serializers.load_hdf5 if source.endswith('.h5') else chainer.serializers.load_npz
    load(source, trainer)
    trainer.run()
    chainer.serializers.save_npz(target, trainer)
    print(trainer.elapsed_time)
"""


@pytest.mark.chainer
@pytest.mark.parametrize('ext', ['npz', 'h5'])
def test_chainer_resumes_and_saves_gpuserial_trainers(tmp_path, ext):
    """Chainer's load_npz and load_hdf5 give a fresh gpuserial trainer its optimizer's state,
    and Chainer's save_npz stores its random state and its elapsed time: a run resumed and
    saved by Chainer is the straight run."""
    namespace: dict = {}
    exec(compile(CHAINER_ROUND_TRIP, 'CHAINER_ROUND_TRIP', 'exec'), namespace)
    make = namespace['make']
    first = make(str(tmp_path), 5)
    first.run()
    FORMATS[ext][0](tmp_path / f'five.{ext}', first)
    result = subprocess.run(
        [str(CHAINER_PYTHON), '-c', CHAINER_ROUND_TRIP, str(tmp_path / f'five.{ext}'),
         str(tmp_path / 'seven.npz'), str(tmp_path)], capture_output=True, text=True,
        timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    straight = make(str(tmp_path), 7)
    straight.run()
    resumed = make(str(tmp_path), 7)
    serializers.load_npz(tmp_path / 'seven.npz', resumed)
    expected, got = host_state(straight), host_state(resumed)
    assert sorted(got) == sorted(expected)
    assert [key for key in expected if not numpy.array_equal(got[key], expected[key])] == []
    assert resumed._snapshot_elapsed_time == float(result.stdout)


if __name__ == '__main__':
    warnings.simplefilter('error')
    if sys.argv[1] == 'resume':
        resume_main(sys.argv[2:])
