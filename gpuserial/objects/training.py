"""A small training loop whose whole state serializes, with Chainer's key layout.

:class:`Trainer` runs a :class:`StandardUpdater` (a :class:`SerialIterator` and an optimizer;
``step(model, batch)`` sets the gradients) and calls extensions on triggers; :func:`snapshot`
saves the trainer every so often. A trainer serializes as Chainer's does::

    updater/iterator:main/{current_position,epoch,is_new_epoch,order,previous_epoch_detail}
    updater/optimizer:main/{t,epoch,<param path>/t,<param path>/<state>}
    updater/model:main/<param path>
    updater/iteration
    stop_trigger/..., extensions/<name>/..., extension_triggers/<name>/...
    _snapshot_elapsed_time

so a Chainer snapshot of the matching objects loads here and back. The iterator also saves its
random state under ``updater/iterator:main/random_state/...`` (Chainer ignores it), which makes a
resume bit-exact across epoch boundaries.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy

from gpuserial import serializers
from gpuserial.engine import asyncsave, devices
from gpuserial.errors import MismatchError
from gpuserial.serializer import after_load, saves
from gpuserial.storage import remote
from gpuserial.storage.folders import join

__all__ = ['Extension', 'IntervalTrigger', 'PRIORITY_EDITOR', 'PRIORITY_READER',
           'PRIORITY_WRITER', 'SerialIterator', 'StandardUpdater', 'Trainer', 'get_trigger',
           'snapshot', 'snapshot_object']

PRIORITY_WRITER = 300
PRIORITY_EDITOR = 200
PRIORITY_READER = 100


# -------------------------------------------------------------------------------------------------
# Iterator


class SerialIterator:
    """Visits a dataset in batches, in order or in a shuffled order drawn each epoch.

    Follows Chainer 7's ``SerialIterator``; the shuffle comes from this iterator's own
    ``numpy.random.RandomState(seed)``, whose state is serialized with the position.

    Args:
        dataset: Anything with ``len`` and integer indexing.
        batch_size: Examples per batch.
        repeat: Loop over the dataset forever; otherwise stop after one epoch.
        shuffle: Shuffle every epoch (None means True, as in Chainer).
        seed: Seed of the shuffle's RandomState (None: fresh entropy).
    """

    keeps_returned_arrays = True  # serialize() keeps the arrays a load returns (see loading)

    def __init__(self, dataset, batch_size: int, repeat: bool = True,
                 shuffle: bool | None = None, *, seed: int | None = None):
        self.dataset = dataset
        self.batch_size = batch_size
        self._repeat = repeat
        self._shuffle = shuffle is None or bool(shuffle)
        self._random = numpy.random.RandomState(seed)
        self.reset()

    def reset(self) -> None:
        """Goes back to the start of epoch 0 (drawing a new order when shuffling)."""
        self.current_position = 0
        self.epoch = 0
        self.is_new_epoch = False
        self.order = self._new_order()
        self._previous_epoch_detail = -1.0

    def _new_order(self):
        return self._random.permutation(len(self.dataset)) if self._shuffle else None

    @property
    def repeat(self) -> bool:
        return self._repeat

    @property
    def _epoch_size(self) -> int:
        return len(self.dataset) if self.order is None else len(self.order)

    @property
    def epoch_detail(self) -> float:
        """The epoch as a float: ``epoch + current_position / epoch size``."""
        return self.epoch + self.current_position / max(self._epoch_size, 1)

    @property
    def previous_epoch_detail(self) -> float | None:
        """:attr:`epoch_detail` before the last batch, None before the first one."""
        return None if self._previous_epoch_detail < 0 else self._previous_epoch_detail

    def __iter__(self):
        return self

    def __next__(self) -> list:
        """The next batch, a list of examples (Chainer's iterator state machine)."""
        n = self._epoch_size
        if self._repeat and n == 0:
            raise ValueError('epoch size must be positive for an iterator that repeats')
        self._previous_epoch_detail = self.epoch_detail
        if not self._repeat and self.epoch > 0:
            raise StopIteration
        i, order = self.current_position, self.order
        i_end = i + self.batch_size
        is_new_epoch = False
        parts = []
        while i_end >= n:
            parts.append(numpy.arange(i, n, dtype=numpy.intp) if order is None else order[i:n])
            if order is not None:
                order = self._new_order()
            self.epoch += 1
            is_new_epoch = True
            i = 0
            if not self._repeat:
                i_end = 0
                break
            i_end -= n
        parts.append(numpy.arange(i, i_end, dtype=numpy.intp) if order is None
                     else order[i:i_end])
        self.current_position, self.is_new_epoch, self.order = i_end, is_new_epoch, order
        return [self.dataset[index] for index in numpy.concatenate(parts)]

    next = __next__

    def finalize(self) -> None:
        """Nothing to release."""

    def serialize(self, serializer) -> None:
        """Saves or loads the position, epoch, shuffle order and random state (what a load
        returns is set once it has succeeded: :func:`~gpuserial.serializer.after_load`)."""
        position = serializer('current_position', self.current_position)
        epoch = serializer('epoch', self.epoch)
        is_new_epoch = serializer('is_new_epoch', self.is_new_epoch)
        order, random_state = self.order, None
        if order is not None:
            try:
                order = serializer('order', order)
            except KeyError:
                order = serializer('_order', order)
            order = _on_host(order)  # a load with device= hands back a device array
            random_state = self._serialize_random_state(serializer['random_state'])
        try:
            previous = serializer('previous_epoch_detail', self._previous_epoch_detail)
        except KeyError:  # an old Chainer snapshot: guess, as Chainer does
            size = self._epoch_size
            previous = epoch + (position - self.batch_size) / size
            previous = max(previous, 0.0) if epoch + position / max(size, 1) > 0 else -1.0

        def apply() -> None:
            self.current_position, self.epoch, self.is_new_epoch = position, epoch, is_new_epoch
            self.order, self._previous_epoch_detail = order, previous
            if random_state is not None:
                self._random.set_state(random_state)

        after_load(serializer, apply)

    def _serialize_random_state(self, serializer) -> tuple | None:
        """Saves the random state, or loads it: the state to set, None to keep this one."""
        kind, key, pos, has_gauss, gauss = self._random.get_state()
        own = numpy.asarray(key)  # what a key must look like (a message says so)
        saving = saves(serializer)
        try:  # a load reads the key at once (value None)
            key = serializer('key', key if saving else None)
            if key is None:  # not in the file (strict=False) or ignored: keep this state
                return None
            pos = serializer('pos', int(pos))
            has_gauss = serializer('has_gauss', int(has_gauss))
            gauss = serializer('cached_gaussian', float(gauss))
        except KeyError:  # a Chainer snapshot: keep this iterator's own random state
            return None
        if saving:
            return None
        stored = _on_host(key)
        state = (kind, stored, pos, has_gauss, gauss)
        try:  # set on a scratch one now: a state set_state refuses fails the load, not after it
            numpy.random.RandomState().set_state(state)
        except (TypeError, ValueError, IndexError) as error:
            where = getattr(serializer, 'where', None)
            if where is None:
                raise
            raise MismatchError(f'{where("key")}: not an {kind} random state: stored key of '
                                f'shape {stored.shape} and dtype {stored.dtype}, expected '
                                f'shape {own.shape} and dtype {own.dtype} ({error})') from None
        return state


def _on_host(array) -> numpy.ndarray:
    return numpy.asarray(devices.to_host(array))


# -------------------------------------------------------------------------------------------------
# Updater


class StandardUpdater:
    """One iteration: take a batch, let ``step`` set the gradients, update the optimizer.

    Args:
        iterator: The main iterator, or a dict of named iterators (one named ``'main'``).
        optimizer: The main optimizer (set up on the model), or a dict of named optimizers.
        step: ``step(model, batch)`` computes and sets the parameters' ``.grad`` (any function).
        device: If given, the model is sent there first.
        auto_new_epoch: Call ``optimizer.new_epoch(auto=True)`` when an epoch ends.
    """

    keeps_returned_arrays = True  # serialize() keeps the arrays a load returns (see loading)

    def __init__(self, iterator, optimizer, step: Callable[[Any, list], Any], *, device=None,
                 auto_new_epoch: bool = True):
        self._iterators = iterator if isinstance(iterator, dict) else {'main': iterator}
        self._optimizers = optimizer if isinstance(optimizer, dict) else {'main': optimizer}
        self.step = step
        self.iteration = 0
        if device is not None:
            for opt in self._optimizers.values():
                opt.target.to_device(device)
        self.auto_new_epoch = auto_new_epoch
        if auto_new_epoch:
            for opt in self._optimizers.values():
                opt.use_auto_new_epoch = True

    def connect_trainer(self, trainer: Trainer) -> None:
        """Called by the trainer it belongs to; nothing to do."""

    def get_iterator(self, name: str):
        return self._iterators[name]

    def get_optimizer(self, name: str):
        return self._optimizers[name]

    def get_all_optimizers(self) -> dict:
        return dict(self._optimizers)

    @property
    def epoch(self) -> int:
        return self._iterators['main'].epoch

    @property
    def epoch_detail(self) -> float:
        return self._iterators['main'].epoch_detail

    @property
    def previous_epoch_detail(self) -> float | None:
        return self._iterators['main'].previous_epoch_detail

    @property
    def is_new_epoch(self) -> bool:
        return self._iterators['main'].is_new_epoch

    def update(self) -> None:
        """Runs one iteration and counts it."""
        self.update_core()
        self.iteration += 1

    def update_core(self) -> None:
        iterator = self._iterators['main']
        optimizer = self._optimizers['main']
        batch = iterator.next()
        optimizer.update(self.step, optimizer.target, batch)
        if self.auto_new_epoch and iterator.is_new_epoch:
            optimizer.new_epoch(auto=True)

    def finalize(self) -> None:
        for iterator in self._iterators.values():
            iterator.finalize()

    def serialize(self, serializer) -> None:
        """Iterators, optimizers, models and the iteration count, in Chainer's layout."""
        for name, iterator in self._iterators.items():
            iterator.serialize(serializer['iterator:' + name])
        for name, optimizer in self._optimizers.items():
            optimizer.serialize(serializer['optimizer:' + name])
            optimizer.target.serialize(serializer['model:' + name])
        after_load(serializer, functools.partial(setattr, self, 'iteration',
                                                 serializer('iteration', self.iteration)))


# -------------------------------------------------------------------------------------------------
# Triggers and extensions


class IntervalTrigger:
    """Fires every ``period`` iterations or epochs (fractional epochs allowed)."""

    def __init__(self, period: int | float, unit: str):
        if unit not in ('epoch', 'iteration'):
            raise ValueError(f"trigger unit must be 'epoch' or 'iteration', not {unit!r}")
        self.period = period
        self.unit = unit
        self._previous_iteration = 0
        self._previous_epoch_detail = 0.0

    def __call__(self, trainer: Trainer) -> bool:
        updater = trainer.updater
        if self.unit == 'epoch':
            epoch_detail = updater.epoch_detail
            previous = self._previous_epoch_detail
            if previous < 0:
                previous = updater.previous_epoch_detail
            fire = previous // self.period != epoch_detail // self.period
        else:
            iteration = updater.iteration
            previous = self._previous_iteration
            if previous < 0:
                previous = iteration - 1
            fire = previous // self.period != iteration // self.period
        self._previous_iteration = updater.iteration
        if hasattr(updater, 'epoch_detail'):
            self._previous_epoch_detail = updater.epoch_detail
        return fire

    def serialize(self, serializer) -> None:
        try:
            iteration = serializer('previous_iteration', self._previous_iteration)
        except KeyError:
            warnings.warn('IntervalTrigger: previous_iteration is not saved; guessing it',
                          stacklevel=2)
            iteration = -1
        try:
            epoch_detail = serializer('previous_epoch_detail', self._previous_epoch_detail)
        except KeyError:
            warnings.warn('IntervalTrigger: previous_epoch_detail is not saved; guessing it',
                          stacklevel=2)
            epoch_detail = -1.0
        after_load(serializer, functools.partial(self._set_previous, iteration, epoch_detail))

    def _set_previous(self, iteration: int, epoch_detail: float) -> None:
        self._previous_iteration, self._previous_epoch_detail = iteration, epoch_detail

    def get_training_length(self) -> tuple:
        return self.period, self.unit

    def __repr__(self) -> str:
        return f'IntervalTrigger({self.period}, {self.unit!r})'


def _never_fire(trainer: Trainer) -> bool:
    return False


def get_trigger(trigger) -> Callable[[Trainer], bool]:
    """A callable as it is, None as a never-firing trigger, ``(n, unit)`` as IntervalTrigger."""
    if callable(trigger):
        return trigger
    if trigger is None:
        return _never_fire
    return IntervalTrigger(*trigger)


class Extension:
    """Base of trainer extensions: called with the trainer when its trigger fires."""

    trigger: Any = (1, 'iteration')
    priority = PRIORITY_READER
    name: str | None = None
    keeps_returned_arrays = True  # serialize() keeps the arrays a load returns (see loading)

    @property
    def default_name(self) -> str:
        return type(self).__name__

    def __call__(self, trainer: Trainer) -> None:
        raise NotImplementedError

    def initialize(self, trainer: Trainer) -> None:
        """Called once before the training loop."""

    def on_error(self, trainer: Trainer, exc: BaseException, tb) -> None:
        """Called when the training loop raises."""

    def finalize(self) -> None:
        """Called after the training loop."""

    def serialize(self, serializer) -> None:
        """Saves or loads the extension's state (nothing by default)."""


def _make_out(out: str) -> None:
    """Makes the output directory ``out``; a URL needs none (object stores have none)."""
    if not remote.is_url(out):
        os.makedirs(out, exist_ok=True)


class _Snapshot(Extension):
    trigger = (1, 'epoch')
    priority = -100  # its name is '_Snapshot', as in Chainer (extension_triggers/_Snapshot/...)

    def __init__(self, savefun, filename, target, condition, snapshot_on_error,
                 async_format: str | None = None):
        self.savefun = savefun
        self.filename = filename
        self._target = target
        self.condition = condition
        self._snapshot_on_error = snapshot_on_error
        self._async_format = async_format  # None: saves return once the file is written
        self._saving: list[asyncsave.SaveHandle] = []  # asynchronous snapshots in flight

    def __call__(self, trainer: Trainer) -> None:
        if self.condition is None or self.condition():
            self._make_snapshot(trainer)

    def on_error(self, trainer: Trainer, exc: BaseException, tb) -> None:
        if self._snapshot_on_error:
            self._make_snapshot(trainer)

    def _make_snapshot(self, trainer: Trainer) -> None:
        target = trainer if self._target is None else self._target
        filename = self.filename
        filename = filename(trainer) if callable(filename) else filename.format(trainer)
        _make_out(trainer.out)
        path = join(trainer.out, filename)
        if self._async_format is not None:
            self._saving = [handle for handle in self._saving if not handle.done()]
            self._saving.append(asyncsave.save_async(path, target, self._async_format))
            return
        savefun = self.savefun
        if savefun is None:
            from gpuserial.serializers import save_npz as savefun
        savefun(path, target)  # atomic: temp file + rename

    def finalize(self) -> None:
        """Waits for the asynchronous snapshots in flight; raises the first error."""
        saving, self._saving = self._saving, []
        concurrent.futures.wait([handle.committed for handle in saving])
        for handle in saving:
            handle.result()


def snapshot(savefun: Callable | None = None,
             filename: str | Callable = 'snapshot_iter_{.updater.iteration}', *,
             target=None, condition: Callable[[], bool] | None = None,
             snapshot_on_error: bool = False, async_: bool = False) -> Extension:
    """An extension saving the trainer (or ``target``) into ``trainer.out``.

    It runs once per epoch unless ``trainer.extend`` gets another trigger, with priority -100.
    The file is written atomically (a temporary file renamed into place).

    Args:
        savefun: ``savefun(path, obj)``; default :func:`gpuserial.serializers.save_npz`.
        filename: A format string given the trainer (``'snapshot_iter_{.updater.iteration}'``),
            or a callable on the trainer.
        target: What to save instead of the trainer.
        condition: A callable; the snapshot is skipped when it returns False.
        snapshot_on_error: Also save when the training loop raises.
        async_: write in the background (:func:`gpuserial.save_async`): training goes on once
            the state is staged; the trainer's end waits for the snapshots. ``savefun``
            is then None, ``save_npz`` or ``save_hdf5``.
    """
    async_format = None
    if async_:
        formats = {None: 'npz', serializers.save_npz: 'npz', serializers.save_hdf5: 'hdf5'}
        if savefun not in formats:
            raise ValueError(f'snapshot(async_=True) saves NPZ or HDF5 (savefun None, save_npz '
                             f'or save_hdf5), not with {savefun!r}')
        async_format = formats[savefun]
    return _Snapshot(savefun, filename, target, condition, snapshot_on_error, async_format)


def snapshot_object(target, filename: str | Callable, savefun: Callable | None = None,
                    **kwargs) -> Extension:
    """:func:`snapshot` of ``target`` instead of the trainer."""
    return snapshot(savefun, filename, target=target, **kwargs)


# -------------------------------------------------------------------------------------------------
# Trainer


class _Entry:
    def __init__(self, extension, priority: int, trigger, call_before_training: bool):
        self.extension = extension
        self.priority = priority
        self.trigger = trigger
        self.call_before_training = call_before_training


class Trainer:
    """The training loop: update, then the extensions whose triggers fire, until stop.

    Args:
        updater: The updater (its ``update()`` runs one iteration).
        stop_trigger: When to stop: a trigger, or ``(n, 'iteration' | 'epoch')``; None runs
            forever.
        out: Output directory of extensions such as :func:`snapshot`.
        extensions: Extensions to register with their defaults.
    """

    keeps_returned_arrays = True  # serialize() keeps the arrays a load returns (see loading)

    def __init__(self, updater, stop_trigger=None, out: str | os.PathLike = 'result',
                 extensions=None):
        self.updater = updater
        self.stop_trigger = get_trigger(stop_trigger)
        self.out = os.fspath(out)
        self.observation: dict = {}
        self._extensions: dict[str, _Entry] = {}
        self._done = False
        self._start_at: float | None = None
        self._snapshot_elapsed_time = 0.0
        self._final_elapsed_time: float | None = None
        updater.connect_trainer(self)
        for extension in extensions or ():
            self.extend(extension)

    @property
    def is_before_training(self) -> bool:
        return self.updater.iteration == 0

    @property
    def elapsed_time(self) -> float:
        """Seconds spent training, including those before the snapshot this was loaded from."""
        if self._done:
            assert self._final_elapsed_time is not None  # set before _done
            return self._final_elapsed_time
        if self._start_at is None:
            return self._snapshot_elapsed_time
        return time.perf_counter() - self._start_at + self._snapshot_elapsed_time

    def extend(self, extension, name: str | None = None, trigger=None,
               priority: int | None = None, *, call_before_training: bool = False) -> None:
        """Registers an extension (a callable on the trainer).

        Args:
            name: Its name (default: its ``name``, ``default_name`` or ``__name__``); a taken
                name gets a ``_1``, ``_2``... suffix.
            trigger: When to call it (default: its ``trigger``, else every iteration).
            priority: Higher runs first (default: its ``priority``, else PRIORITY_READER).
            call_before_training: Also call it once before the first iteration.

        Raises:
            TypeError: no name can be found. ValueError: the name is ``'training'``.
        """
        if name is None:
            name = (getattr(extension, 'name', None) or getattr(extension, 'default_name', None)
                    or getattr(extension, '__name__', None))
            if name is None:
                raise TypeError(f'name is not given for the extension {extension!r}')
        if name == 'training':
            raise ValueError('the name "training" is prohibited as an extension name')
        if trigger is None:
            trigger = getattr(extension, 'trigger', (1, 'iteration'))
        if priority is None:
            priority = getattr(extension, 'priority', PRIORITY_READER)
        modified, ordinal = name, 0
        while modified in self._extensions:
            ordinal += 1
            modified = f'{name}_{ordinal}'
        extension.name = modified
        self._extensions[modified] = _Entry(extension, priority, get_trigger(trigger),
                                            call_before_training)

    def get_extension(self, name: str):
        """The extension registered as ``name``.

        Raises:
            ValueError: there is none.
        """
        if name not in self._extensions:
            raise ValueError(f'extension {name} not found')
        return self._extensions[name].extension

    def run(self) -> None:
        """Runs the loop until the stop trigger fires (once per trainer).

        Raises:
            RuntimeError: the trainer has already run.
        """
        if self._done:
            raise RuntimeError('cannot run training loop multiple times')
        _make_out(self.out)
        entries = sorted(self._extensions.values(), key=lambda e: e.priority, reverse=True)
        self._start_at = time.perf_counter()
        for entry in entries:
            initialize = getattr(entry.extension, 'initialize', None)
            if initialize and not getattr(entry.trigger, 'finished', False):
                initialize(self)
        if self.is_before_training:
            for entry in entries:
                if entry.call_before_training:
                    entry.extension(self)
        try:
            while not self.stop_trigger(self):
                self.observation = {}
                self.updater.update()
                for entry in entries:
                    if entry.trigger(self):
                        entry.extension(self)
        except Exception as error:
            for entry in entries:
                handler = getattr(entry.extension, 'on_error', None)
                if handler:
                    handler(self, error, error.__traceback__)
            raise
        finally:
            for entry in entries:
                finalize = getattr(entry.extension, 'finalize', None)
                if finalize:
                    finalize()
            self.updater.finalize()
        self._final_elapsed_time = self.elapsed_time
        self._done = True

    def serialize(self, serializer) -> None:
        """The updater, triggers, extensions and elapsed time, in Chainer's layout."""
        self.updater.serialize(serializer['updater'])
        if hasattr(self.stop_trigger, 'serialize'):
            self.stop_trigger.serialize(serializer['stop_trigger'])
        extensions = serializer['extensions']
        triggers = serializer['extension_triggers']
        for name, entry in self._extensions.items():
            if hasattr(entry.extension, 'serialize'):
                entry.extension.serialize(extensions[name])
            if hasattr(entry.trigger, 'serialize'):
                entry.trigger.serialize(triggers[name])
        if saves(serializer):
            serializer('_snapshot_elapsed_time', self.elapsed_time)
        else:
            after_load(serializer, functools.partial(
                setattr, self, '_snapshot_elapsed_time',
                serializer('_snapshot_elapsed_time', float(self._snapshot_elapsed_time))))
