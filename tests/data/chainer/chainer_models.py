"""Deterministic Chainer objects shared by make_reference.py and
check_gpuserial_files.py.

This module imports chainer: only import it from the Chainer venv (see
README.md), never from the gpuserial test-suite itself.

Every reference file name (without its .npz/.h5 suffix) maps to a
``Case``: ``build()`` returns the object exactly as it was saved into the
reference file, ``fresh()`` returns a structurally identical object (same
keys) whose values differ, to load a file into.
"""

import collections
import functools
import os
import shutil
import tempfile

import chainer
import chainer.functions as F
import chainer.links as L
import numpy
from chainer import datasets, iterators, optimizers, serializers, training

# Value written as the trainer's elapsed time, so that the snapshot is
# byte-for-byte reproducible (Chainer would write wall-clock seconds).
TRAINER_ELAPSED_TIME = 1.25
TRAINER_ITERATIONS = 7


def rand(seed, shape, dtype=numpy.float32, low=-1.0, high=1.0):
    """Deterministic uniform array."""
    rs = numpy.random.RandomState(seed)
    return rs.uniform(low, high, size=shape).astype(dtype)


def _fill_params(link, seed):
    """Fill every initialized parameter of ``link`` deterministically
    (parameters are visited in sorted-name order)."""
    for i, (name, param) in enumerate(sorted(link.namedparams())):
        if param.array is not None:
            param.array[...] = rand(seed + i, param.shape, param.dtype)
    return link


def _zero_params(link):
    for _, param in link.namedparams():
        if param.array is not None:
            param.array[...] = 0
    return link


# ---------------------------------------------------------------- models


class MLP(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(4, 3)
            self.l2 = L.Linear(3, 2)

    def forward(self, x):
        return self.l2(F.relu(self.l1(x)))


class Net(chainer.Chain):
    """Classifier-like chain: keys look like ``predictor/l1/W``."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.predictor = MLP()

    def forward(self, x):
        return self.predictor(x)


class Single(chainer.Chain):
    """Chain with a single Linear(4, 2) named ``l`` (trainer predictor)."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l = L.Linear(4, 2)

    def forward(self, x):
        return self.l(x)


def build_linear():
    return _fill_params(L.Linear(3, 2), seed=100)


def fresh_linear():
    return _zero_params(L.Linear(3, 2))


def build_chain():
    return _fill_params(Net(), seed=200)


def fresh_chain():
    return _zero_params(Net())


def build_chainlist():
    return _fill_params(chainer.ChainList(L.Linear(2, 3), L.Linear(3, 1)), seed=300)


def fresh_chainlist():
    return _zero_params(chainer.ChainList(L.Linear(2, 3), L.Linear(3, 1)))


def build_bn():
    bn = L.BatchNormalization(3)
    _fill_params(bn, seed=400)  # gamma, beta
    # Chainer only counts N in finetune mode: two plain training passes
    # (exponential moving averages), then two finetune passes (N == 2).
    with chainer.using_config("train", True):
        for step in range(4):
            x = rand(410 + step, (5, 3), low=-2.0, high=3.0)
            bn(x, finetune=step >= 2)
    assert bn.N == 2
    return bn


def fresh_bn():
    return _zero_params(L.BatchNormalization(3))


def build_uninit():
    # W is uninitialized (in_size=None) and is saved as None; b exists.
    link = L.Linear(None, 2)
    link.b.array[...] = rand(500, (2,))
    return link


def fresh_uninit():
    return _zero_params(L.Linear(None, 2))


# ------------------------------------------------------------ optimizers

OPTIMIZERS = collections.OrderedDict(
    [
        ("momentum_sgd", lambda: optimizers.MomentumSGD(lr=0.1, momentum=0.9)),
        ("adam", lambda: optimizers.Adam()),
    ]
)
OPTIMIZER_STEPS = 3


def build_optimized(name):
    """(model, optimizer) after OPTIMIZER_STEPS updates with deterministic
    gradients."""
    model = build_chain()
    opt = OPTIMIZERS[name]()
    opt.setup(model)
    for step in range(OPTIMIZER_STEPS):
        model.cleargrads()
        for i, (pname, param) in enumerate(sorted(model.namedparams())):
            param.grad = rand(1000 + 100 * step + i, param.shape, param.dtype)
        opt.update()
    return model, opt


def fresh_optimizer(name):
    model = fresh_chain()
    opt = OPTIMIZERS[name]()
    opt.setup(model)
    return opt


# --------------------------------------------------------------- trainer


def trainer_dataset():
    x = rand(600, (20, 4))
    t = rand(601, (20, 2))
    return datasets.TupleDataset(x, t)


def _make_trainer(out):
    predictor = Single()
    model = L.Classifier(predictor, lossfun=F.mean_squared_error)
    model.compute_accuracy = False
    # The shuffle order comes from numpy's global RandomState.
    numpy.random.seed(0)
    it = iterators.SerialIterator(trainer_dataset(), batch_size=4, shuffle=True)
    opt = optimizers.MomentumSGD(lr=0.1, momentum=0.9)
    opt.setup(model)
    updater = training.updaters.StandardUpdater(it, opt)
    trainer = training.Trainer(
        updater, stop_trigger=(TRAINER_ITERATIONS, "iteration"), out=out
    )
    return trainer, predictor


def build_trainer():
    out = tempfile.mkdtemp(prefix="chainer_trainer_")
    trainer, predictor = _make_trainer(out)
    _fill_params(predictor, seed=700)
    try:
        trainer.run()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # Make the stored elapsed time reproducible.
    trainer._final_elapsed_time = TRAINER_ELAPSED_TIME
    return trainer


def fresh_trainer():
    # Never run, so the output directory is never created.
    out = os.path.join(tempfile.gettempdir(), "chainer_trainer_unused")
    trainer, predictor = _make_trainer(out)
    _zero_params(predictor)
    return trainer


def finish_loaded_trainer(trainer):
    """A trainer that has been loaded but not run cannot be re-serialized
    (its elapsed_time raises); mark it done with the loaded time."""
    trainer._done = True
    trainer._final_elapsed_time = trainer._snapshot_elapsed_time
    return trainer


# ----------------------------------------------------------------- cases

Case = collections.namedtuple("Case", ["build", "fresh", "formats"])

CASES = collections.OrderedDict(
    [
        ("linear", Case(build_linear, fresh_linear, ("npz", "h5"))),
        ("chain", Case(build_chain, fresh_chain, ("npz", "h5"))),
        ("chainlist", Case(build_chainlist, fresh_chainlist, ("npz", "h5"))),
        ("bn", Case(build_bn, fresh_bn, ("npz", "h5"))),
        ("uninit", Case(build_uninit, fresh_uninit, ("npz", "h5"))),
    ]
)


def build_optimizer(name):
    return build_optimized(name)[1]


def build_optimized_model(name):
    return build_optimized(name)[0]


for _name in OPTIMIZERS:
    CASES[_name] = Case(
        functools.partial(build_optimizer, _name),
        functools.partial(fresh_optimizer, _name),
        ("npz", "h5"),
    )
    CASES[_name + "_model"] = Case(
        functools.partial(build_optimized_model, _name), fresh_chain, ("npz", "h5")
    )
CASES["trainer_snapshot"] = Case(build_trainer, fresh_trainer, ("npz", "h5"))


def case_for_filename(filename):
    """Map e.g. 'linear_uncompressed.npz' or 'chain.h5' to (Case, fmt)."""
    if filename.endswith(".npz"):
        stem, fmt = filename[:-4], "npz"
    elif filename.endswith(".h5"):
        stem, fmt = filename[:-3], "h5"
    else:
        return None, None
    stem = stem.removesuffix("_uncompressed")
    case = CASES.get(stem)
    if case is None or fmt not in case.formats:
        return None, None
    return case, fmt


def flat_state(obj):
    """Serialize ``obj`` with Chainer's DictionarySerializer: {key: array}."""
    if isinstance(obj, training.Trainer) and not obj._done:
        finish_loaded_trainer(obj)
    s = serializers.DictionarySerializer()
    s.save(obj)
    return s.target


def value_sum(arr):
    """float64 sum of an array, None for a stored None."""
    if arr is None:
        return None
    arr = numpy.asarray(arr)
    if arr.dtype == object:
        if arr.shape == () and arr[()] is None:
            return None
        raise TypeError("unexpected object array")
    if arr.dtype.kind == "c":
        return float(arr.astype(numpy.complex128).sum().real)
    return float(arr.astype(numpy.float64).sum())
