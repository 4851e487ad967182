"""Real Chainer training state through every pairing of saver and loader, in new processes.

Run with the Chainer venv's python, gpuserial installed beside Chainer (ci/test.sh does both):

    python tests/data/chainer/resume_pairings.py save DIR       # prints {case: error}
    python tests/data/chainer/resume_pairings.py resume DIR     # a new process: prints JSON
    python tests/data/chainer/resume_pairings.py checks DIR     # prints {check: error or null}

``save`` trains a Chainer Trainer (a model with Linear(None, n), BatchNormalization and
DecorrelatedBatchNormalization; Evaluator, LogReport, ExponentialShift, observe_lr, a
WeightDecay hook) for a few iterations with each optimizer, and its snapshot extension saves
the trainer with each saver (``savefun`` is Chainer's or gpuserial's save function) in each
format. ``resume`` builds fresh objects (fresh optimizers hold no state), loads each snapshot
with each loader, records the whole state, trains on a few iterations and records it again.
It prints ``{case: {"loaded": digest, "resumed": digest, "error": ...}}``, a digest being
``{key: [dtype, shape, sha256 of the bytes]}`` of everything Chainer itself would save, plus
the trainer's elapsed time and the optimizer's hyperparameter that ExponentialShift moves.

Formats: NPZ with LogReport; HDF5 without LogReport (Chainer's own HDF5 cannot store its JSON
strings), all pairings; and HDF5 with LogReport, gpuserial to gpuserial only.
Trainer time comes from a counting clock, so that snapshots of one run are identical whoever
saves them.
"""

import contextlib
import hashlib
import itertools
import json
import os
import sys
import warnings

import chainer
import chainer.functions as F
import chainer.links as L
import numpy
from chainer import iterators, optimizer_hooks, optimizers, serializers, training
from chainer.training import extensions
from chainer.training.extensions import snapshot_writers

import gpuserial.serializers

SAVE_AT = 6  # iterations before the snapshot
RESUME_TO = 10  # iterations after resuming
OPTIMIZERS = {
    'adam': (lambda: optimizers.Adam(alpha=0.01), 'alpha'),
    'momentum_sgd': (lambda: optimizers.MomentumSGD(lr=0.05), 'lr'),
    'rmsprop': (lambda: optimizers.RMSprop(lr=0.01), 'lr'),
    'adadelta': (lambda: optimizers.AdaDelta(), 'eps'),
}
SAVERS = {
    ('chainer', 'npz'): serializers.save_npz, ('chainer', 'hdf5'): serializers.save_hdf5,
    ('gpuserial', 'npz'): gpuserial.serializers.save_npz,
    ('gpuserial', 'hdf5'): gpuserial.serializers.save_hdf5,
}
LOADERS = {
    ('chainer', 'npz'): serializers.load_npz, ('chainer', 'hdf5'): serializers.load_hdf5,
    ('gpuserial', 'npz'): gpuserial.serializers.load_npz,
    ('gpuserial', 'hdf5'): gpuserial.serializers.load_hdf5,
}
# (format, with LogReport, the savers and loaders that can take part)
VARIANTS = {
    'npz': ('npz', True, ('chainer', 'gpuserial')),
    'hdf5': ('hdf5', False, ('chainer', 'gpuserial')),
    'hdf5-log': ('hdf5', True, ('gpuserial',)),
}


class _Clock:
    """Trainer time that advances 0.25 s per reading, the same in every run."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.25
        return self.now


class Model(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(None, 8)
            self.bn = L.BatchNormalization(8)
            self.dbn = L.DecorrelatedBatchNormalization(8, groups=2)
            self.l2 = L.Linear(8, 3)

    def forward(self, x):
        return self.l2(F.relu(self.dbn(self.bn(self.l1(x)))))


def _dataset(seed, n):
    rs = numpy.random.RandomState(seed)
    x = rs.uniform(-1, 1, (n, 5)).astype(numpy.float32)
    return chainer.datasets.TupleDataset(x, rs.randint(0, 3, n).astype(numpy.int32))


def make_trainer(name, with_log, out, seed, savefun=None):
    """A trainer of ``name``'s optimizer; parameters drawn from ``seed`` (none for Linear(None))."""
    numpy.random.seed(seed)
    model = L.Classifier(Model())
    make_optimizer, attr = OPTIMIZERS[name]
    optimizer = make_optimizer()
    optimizer.setup(model)
    optimizer.add_hook(optimizer_hooks.WeightDecay(1e-4))
    train = iterators.SerialIterator(_dataset(1, 24), 5, shuffle=True)
    test = iterators.SerialIterator(_dataset(2, 10), 5, repeat=False, shuffle=False)
    updater = training.updaters.StandardUpdater(train, optimizer)
    trainer = training.Trainer(updater, (RESUME_TO, 'iteration'), out=out)
    trainer.extend(extensions.Evaluator(test, model), trigger=(3, 'iteration'))
    trainer.extend(extensions.ExponentialShift(attr, 0.9), trigger=(2, 'iteration'))
    trainer.extend(extensions.observe_value(
        'hyper', lambda t: getattr(t.updater.get_optimizer('main'), attr)))
    if attr == 'lr':
        trainer.extend(extensions.observe_lr())
    if with_log:
        trainer.extend(extensions.LogReport(trigger=(2, 'iteration')))
    if savefun is not None:
        trainer.extend(extensions.snapshot(savefun=savefun), trigger=(SAVE_AT, 'iteration'))
    return trainer


def run(trainer, stop):
    training.trainer._get_time = _Clock()
    trainer.stop_trigger = training.triggers.IntervalTrigger(stop, 'iteration')
    numpy.random.seed(1234)  # the shuffle of the next epochs (ShuffleOrderSampler's default)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        trainer.run(show_loop_exception_msg=False)


def _digest_value(value):
    array = numpy.asarray(value)
    if array.dtype.kind in 'OUS':
        return [str(array.dtype), list(array.shape), repr(array.tolist())]
    array = numpy.ascontiguousarray(array)
    return [str(array.dtype), list(array.shape), hashlib.sha256(array.tobytes()).hexdigest()]


def digest(trainer, name):
    """Everything Chainer would save of the trainer, and what it keeps outside its files."""
    state = {}
    parts = {'updater': trainer.updater}
    for ext_name, entry in trainer._extensions.items():
        if hasattr(entry.extension, 'serialize'):
            parts['extensions/' + ext_name] = entry.extension
        if hasattr(entry.trigger, 'serialize'):
            parts['extension_triggers/' + ext_name] = entry.trigger
    for prefix, part in parts.items():
        for key, value in serializers.npz.serialize(part).items():
            state[prefix + '/' + key] = _digest_value(value)
    optimizer = trainer.updater.get_optimizer('main')
    for param_name, param in sorted(optimizer.target.namedparams()):
        rule = param.update_rule
        state['state-is-none' + param_name] = repr(rule.state is None)
    state['_snapshot_elapsed_time'] = repr(trainer._snapshot_elapsed_time)
    state['hyperparameter'] = repr(getattr(optimizer, OPTIMIZERS[name][1]))
    return state


def _cases():
    for variant, (fmt, with_log, parties) in VARIANTS.items():
        for name in OPTIMIZERS:
            for saver in parties:
                yield variant, fmt, with_log, name, saver


def save(directory):
    errors = {}
    for variant, fmt, with_log, name, saver in _cases():
        out = os.path.join(directory, f'{variant}-{name}-{saver}')
        trainer = make_trainer(name, with_log, out, seed=0, savefun=SAVERS[saver, fmt])
        try:
            run(trainer, SAVE_AT)
        except Exception as error:  # reported, so that one saver does not hide the rest
            errors[f'{variant}/{name}/{saver}'] = f'{type(error).__name__}: {error}'
    json.dump(errors, sys.stdout)


def resume(directory):
    results = {}
    for variant, fmt, with_log, name, saver in _cases():
        path = os.path.join(directory, f'{variant}-{name}-{saver}', f'snapshot_iter_{SAVE_AT}')
        for loader in VARIANTS[variant][2]:
            case = f'{variant}/{name}/{saver}->{loader}'
            trainer = make_trainer(name, with_log, os.path.join(directory, 'out'), seed=7)
            try:
                LOADERS[loader, fmt](path, trainer)
                loaded = digest(trainer, name)
                run(trainer, RESUME_TO)
                results[case] = {'loaded': loaded, 'resumed': digest(trainer, name)}
            except Exception as error:  # reported, so that one pairing does not hide the rest
                results[case] = {'error': f'{type(error).__name__}: {error}'}
    json.dump(results, sys.stdout)


# -- smaller checks of the drop-in promise, each reported by name --------------------------------


def _check_classes(directory):
    path = os.path.join(directory, 'm.npz')
    gpuserial.serializers.save_npz(path, {'w': numpy.ones(2)})
    with numpy.load(path) as npz:
        deserializer = gpuserial.serializers.NpzDeserializer(npz)
        assert isinstance(deserializer, chainer.serializer.Deserializer)
        assert isinstance(deserializer['child'], chainer.serializer.Deserializer)
    assert isinstance(gpuserial.serializers.DictionarySerializer(),
                      chainer.serializer.Serializer)
    import h5py
    with h5py.File(os.path.join(directory, 'm.h5'), 'w') as f:
        serializer = gpuserial.serializers.HDF5Serializer(f)
        assert isinstance(serializer['x'], chainer.serializer.Serializer)
        assert not isinstance(serializer, chainer.serializer.Deserializer)
    assert isinstance(deserializer, gpuserial.serializers.NpzDeserializer)


def _check_device_specs(directory):
    path = os.path.join(directory, 'link.npz')
    numpy.random.seed(3)
    source = L.Linear(3, 2)
    gpuserial.serializers.save_npz(path, source)
    for spec in ('cpu', '@numpy', -1):
        target = L.Linear(3, 2)
        gpuserial.serializers.load_npz(path, target, device=spec)
        assert isinstance(target.W.array, numpy.ndarray), spec
        assert (target.W.array == source.W.array).all(), spec


def _check_uninitialized_link_with_device(directory):
    path = os.path.join(directory, 'lazy.h5')
    numpy.random.seed(4)
    source = L.Linear(3, 2)
    gpuserial.serializers.save_hdf5(path, source)
    target = L.Linear(None, 2)
    gpuserial.serializers.load_hdf5(path, target, device='cpu')
    assert (target.W.array == source.W.array).all() and (target.b.array == source.b.array).all()


def _check_dtype_mismatch_is_a_type_error(directory):
    path = os.path.join(directory, 'complex.npz')
    numpy.savez(path, W=numpy.ones((2, 3), numpy.complex64), b=numpy.ones(2, numpy.complex64))
    for load in (serializers.load_npz, gpuserial.serializers.load_npz):
        try:
            load(path, L.Linear(3, 2))
        except TypeError:  # Chainer's numpy.copyto raises it; callers catch it
            continue
        raise AssertionError(f'{load.__module__}.load_npz raised no TypeError')
    h5 = os.path.join(directory, 'complex.h5')
    gpuserial.serializers.save_hdf5(h5, {'W': numpy.ones((2, 3), numpy.complex64),
                                         'b': numpy.ones(2, numpy.complex64)})
    try:
        gpuserial.serializers.load_hdf5(h5, L.Linear(3, 2))
    except TypeError:
        return
    raise AssertionError('load_hdf5 raised no TypeError')


def _check_hdf5_compression_as_chainer(directory):
    import h5py
    for compression in (True, 'gzip', 9, None):
        made = []
        for save in (serializers.save_hdf5, gpuserial.serializers.save_hdf5):
            path = os.path.join(directory, f'{save.__module__}.h5')
            save(path, L.Linear(30, 20), compression=compression)
            with h5py.File(path, 'r') as f:
                made.append((f['W'].compression, f['W'].compression_opts))
        assert made[0] == made[1], (compression, made)


def _check_partial_loads_as_chainer(directory):
    """path=, ignore_names (a name, a callable on the full key, a list) and strict=False, into
    Chainer links (a lazy one too), give what Chainer's load_npz gives."""
    def model(seed, extra):
        numpy.random.seed(seed)
        predictor = chainer.Sequential(L.Linear(None, 4), F.relu, L.BatchNormalization(4),
                                       L.Linear(4, 2))
        if extra:  # not in the file
            predictor[0].add_persistent('extra', numpy.zeros(2))
        return L.Classifier(predictor)

    path = os.path.join(directory, 'partial.npz')
    source = model(6, False)
    source(numpy.ones((2, 3), numpy.float32), numpy.zeros(2, numpy.int32))
    serializers.save_npz(path, {'updater/model:main/' + key: value for key, value
                                in serializers.npz.serialize(source).items()})
    under = 'updater/model:main/'
    cases = [({}, False),
             ({'ignore_names': under + 'predictor/0/b'}, False),
             ({'ignore_names': lambda key: key.endswith('/W')}, False),
             ({'ignore_names': ['predictor/0/b', lambda key: 'avg' in key]}, False),
             ({'strict': False}, True)]
    for arguments, extra in cases:
        loaded = []
        for load in (serializers.load_npz, gpuserial.serializers.load_npz):
            target = model(7, extra)
            load(path, target, path=under, **arguments)
            loaded.append({key: _digest_value(value) for key, value
                           in serializers.npz.serialize(target).items()})
        assert loaded[0] == loaded[1], arguments


def _check_multiprocess_iterator_resumes(directory):
    """Its order is loaded in place after serialize has returned: a fresh iterator (not yet
    prefetching, as in a resume) then gives the saved one's batches."""
    def iterator(seed):
        numpy.random.seed(seed)
        return iterators.MultiprocessIterator(list(range(23)), 4, n_processes=1)

    source = iterator(0)
    for _ in range(3):
        next(source)
    paths = {}
    for (party, fmt), save in SAVERS.items():
        paths[party, fmt] = os.path.join(directory, f'iterator-{party}.{fmt}')
        save(paths[party, fmt], source)
    numpy.random.seed(9)  # the next epoch's shuffle
    expected = [next(source) for _ in range(8)]
    source.finalize()
    for (party, fmt), path in paths.items():
        target = iterator(5)
        LOADERS['gpuserial', fmt](path, target)
        numpy.random.seed(9)
        got = [next(target) for _ in range(8)]
        target.finalize()
        assert got == expected, (party, fmt, got, expected)


def _check_snapshot_writers_save_hdf5_with_a_lazy_link(directory):
    """Chainer's snapshots hand savefun the dict of npz.serialize, where a lazy link's None is a
    0-d object array: gpuserial's save_hdf5 stores it as None, through each writer."""
    for writer in (snapshot_writers.SimpleWriter, snapshot_writers.ThreadWriter,
                   snapshot_writers.ProcessWriter):
        numpy.random.seed(8)
        model = chainer.Sequential(L.Linear(3, 2), L.Linear(None, 4))  # before any forward
        train = iterators.SerialIterator([numpy.zeros(3, numpy.float32)], 1)
        updater = training.updaters.StandardUpdater(train, optimizers.SGD().setup(model))
        trainer = training.Trainer(updater, out=os.path.join(directory, writer.__name__))
        os.makedirs(trainer.out)  # as trainer.run makes it
        snapshot = extensions.snapshot_object(
            model, 'model.h5', writer=writer(savefun=gpuserial.serializers.save_hdf5))
        snapshot(trainer)
        snapshot.finalize()  # waits for a thread's or a process's save
        target = chainer.Sequential(L.Linear(3, 2), L.Linear(None, 4))
        gpuserial.serializers.load_hdf5(os.path.join(trainer.out, 'model.h5'), target)
        assert (target[0].W.array == model[0].W.array).all(), writer.__name__
        assert target[1].W.array is None, writer.__name__


@contextlib.contextmanager
def _chainer_serializers_are(party):
    """Point ``chainer.serializers`` (and its ``npz`` module, which Chainer's own snapshot
    extension and vision models call) at ``party``'s functions, as a user of a library does."""
    names = ('save_npz', 'load_npz', 'NpzDeserializer', 'serialize')
    saved = {(module, name): getattr(module, name) for module in (serializers, serializers.npz)
             for name in names if hasattr(module, name)}
    if party == 'gpuserial':
        for module, name in saved:
            setattr(module, name, getattr(gpuserial.serializers, name))
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def _check_library_call_patterns(directory):
    """Two ways libraries built on Chainer call its serializers, with gpuserial's patched in.

    ChainerRL's ``agent.load`` (``load_npz_no_strict``): a strict ``load_npz`` that raises
    KeyError, then ``NpzDeserializer(numpy.load(f), strict=False)`` on a plain NpzFile (no
    pickle allowed) holding a lazy link's None. Chainer's ``snapshot(autoload=True)``: its
    ``initialize`` loads the latest snapshot with ``chainer.serializers.npz.load_npz``; every
    saver and loader must resume as Chainer does (the snapshot's ``savefun`` is looked up then).
    """
    def model(seed):
        numpy.random.seed(seed)
        return chainer.Sequential(L.Linear(3, 2), L.Linear(None, 4))

    path = os.path.join(directory, 'agent-model.npz')
    source = model(10)
    serializers.save_npz(path, source)
    target = model(11)
    target[0].add_persistent('extra', numpy.zeros(2))  # not in the file: the strict load fails
    with _chainer_serializers_are('gpuserial'):
        try:
            serializers.load_npz(path, target)
            raise AssertionError('the strict load found a key that is not in the file')
        except KeyError:
            with numpy.load(path) as f:
                serializers.NpzDeserializer(f, strict=False).load(target)
    assert (target[0].W.array == source[0].W.array).all() and target[1].W.array is None

    def trainer(out, seed):
        numpy.random.seed(seed)
        classifier = L.Classifier(chainer.Sequential(L.Linear(5, 4), L.BatchNormalization(4),
                                                     L.Linear(4, 3)))
        train = iterators.SerialIterator(_dataset(1, 12), 4, shuffle=True)
        updater = training.updaters.StandardUpdater(train, optimizers.Adam().setup(classifier))
        made = training.Trainer(updater, (5, 'iteration'), out=out)
        made.extend(extensions.snapshot(filename='snapshot_{.updater.iteration}', autoload=True),
                    trigger=(3, 'iteration'))
        return made

    resumed = {}
    for saver, loader in itertools.product(('chainer', 'gpuserial'), repeat=2):
        out = os.path.join(directory, f'autoload-{saver}-{loader}')
        with _chainer_serializers_are(saver):
            run(trainer(out, 0), 4)  # snapshot_3
        with _chainer_serializers_are(loader):
            resuming = trainer(out, 5)
            run(resuming, 5)
        resumed[saver, loader] = {key: _digest_value(value) for key, value
                                  in serializers.npz.serialize(resuming.updater).items()}
    fresh = trainer(os.path.join(directory, 'autoload-none'), 5)  # nothing to autoload
    run(fresh, 5)
    assert resumed['chainer', 'chainer'] != {key: _digest_value(value) for key, value
                                             in serializers.npz.serialize(fresh.updater).items()}
    for pairing, state in resumed.items():
        assert state == resumed['chainer', 'chainer'], pairing


def _check_import_does_not_import_chainer(directory):
    import subprocess
    code = 'import sys, gpuserial.serializers; print("chainer" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == 'False', out


CHECKS = {name[len('_check_'):]: check for name, check in list(globals().items())
          if name.startswith('_check_')}


def checks(directory):
    results = {}
    for name, check in CHECKS.items():
        try:
            check(directory)
            results[name] = None
        except Exception as error:
            results[name] = f'{type(error).__name__}: {error}'
    json.dump(results, sys.stdout)


if __name__ == '__main__':
    {'save': save, 'resume': resume, 'checks': checks}[sys.argv[1]](sys.argv[2])
