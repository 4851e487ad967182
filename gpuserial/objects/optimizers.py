"""Optimizers with Chainer's update formulas and serialized state: SGD, MomentumSGD, Adam.

An optimizer set up on a link gives each parameter an :class:`UpdateRule` holding the
parameter's state (``v``; ``m`` and ``v``) and its own update count ``t``. The state is created
lazily on the first update, or from a file when a never-updated optimizer is loaded. Serialized
keys are Chainer's: ``t``, ``epoch``, then ``l1/W/t``, ``l1/W/v``, ... per parameter path.

The math goes through the parameter's array module, so it runs on NumPy and CuPy alike.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import TYPE_CHECKING, Any

import numpy

from gpuserial.engine import devices
from gpuserial.objects.link import Link, Parameter
from gpuserial.serializer import after_load, loads

__all__ = ['Adam', 'AdamRule', 'GradientMethod', 'Hyperparameter', 'MomentumSGD',
           'MomentumSGDRule', 'Optimizer', 'SGD', 'SGDRule', 'UpdateRule']


class Hyperparameter:
    """A set of hyperparameters; an attribute missing here is looked up in the parent."""

    def __init__(self, parent: Hyperparameter | None = None):
        self._parent = parent

    def __getattr__(self, name: str) -> Any:
        parent = self.__dict__.get('_parent')
        if parent is None:
            raise AttributeError(f'no hyperparameter {name!r}')
        return getattr(parent, name)

    if TYPE_CHECKING:  # entries are set by name: hp.lr = 0.1
        def __setattr__(self, name: str, value: Any) -> None: ...

    @property
    def parent(self) -> Hyperparameter | None:
        return self._parent

    def get_dict(self) -> dict[str, Any]:
        """All entries visible from here, the parent's first."""
        d = {} if self._parent is None else self._parent.get_dict()
        d.update((k, v) for k, v in self.__dict__.items() if k != '_parent')
        return d

    def __repr__(self) -> str:
        items = ', '.join(f'{k}={v}' for k, v in sorted(self.get_dict().items()))
        return f'Hyperparameter({items})'


class HyperparameterProxy:
    """An attribute of an optimizer that reads and writes ``self.hyperparam.<name>``."""

    def __init__(self, name: str):
        self._name = name
        self.__doc__ = f'Alias to ``self.hyperparam.{name}``.'

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(obj.hyperparam, self._name)

    def __set__(self, obj, value) -> None:
        setattr(obj.hyperparam, self._name, value)


class UpdateRule:
    """How one parameter is updated, with its own state dict and update count ``t``.

    Subclasses override :meth:`init_state` (to create the state arrays) and :meth:`update_core`.
    """

    keeps_returned_arrays = True  # serialize() keeps the arrays a load returns (see loading)

    def __init__(self, parent_hyperparam: Hyperparameter | None = None):
        self._state: dict[str, Any] | None = None
        self.enabled = True
        self.hyperparam = Hyperparameter(parent_hyperparam)
        self.t = 0

    @property
    def state(self) -> dict[str, Any] | None:
        """The state dict, or None before the first update (or load)."""
        return self._state

    def init_state(self, param: Parameter) -> None:
        """Fills ``self.state`` for ``param``; called at the first update."""

    def update(self, param: Parameter) -> None:
        """Counts the update and applies it to ``param`` from its gradient."""
        if not self.enabled:
            return
        self.t += 1
        device = param.device
        with device.use():
            if param.array is not None:
                self._init_states(param, device)
            self.update_core(param)

    def _init_states(self, param: Parameter, device: devices.Device) -> None:
        if self._state is None:
            self._state = {}
            self.init_state(param)
        for name, value in self._state.items():  # a loaded state may sit elsewhere
            if devices.is_array(value):
                self._state[name] = device.send(value)

    def update_core(self, param: Parameter) -> None:
        raise NotImplementedError

    def serialize(self, serializer) -> None:
        """Saves or loads ``t`` and the state, as Chainer's ``UpdateRule.serialize``.

        Loading into a rule that has no state yet creates the state from the file; when the
        file has no state for it (the parameter was never updated), the state stays None.
        What a load returns is set once it has succeeded
        (:func:`~gpuserial.serializer.after_load`).
        """
        after_load(serializer, functools.partial(setattr, self, 't', serializer('t', self.t)))
        if self._state is not None:
            state = self._state
            loaded = {key: serializer(key, value) for key, value in state.items()}
            if any(loaded[key] is not value for key, value in state.items()):
                after_load(serializer, functools.partial(state.update, loaded))
            return
        if not loads(serializer):
            return
        loaded = {}
        for key in self._state_keys():
            try:
                value = serializer(key, None)
            except KeyError:
                if self.enabled:
                    raise
                value = None
            if value is None:  # not in the file: created at the first update
                return
            loaded[key] = value
        if loaded:  # a stateless rule (SGD) keeps None, so that a dry run changes nothing
            after_load(serializer, functools.partial(setattr, self, '_state', loaded))

    def _state_keys(self) -> list[str]:
        """The keys :meth:`init_state` creates, found on a throwaway one-element parameter."""
        scratch = copy.copy(self)
        scratch._state = {}
        scratch.init_state(Parameter(numpy.empty(1, numpy.float32)))
        return list(scratch._state)


class SGDRule(UpdateRule):
    """``param -= lr * grad``."""

    def update_core(self, param: Parameter) -> None:
        grad = param.grad
        if grad is None:
            return
        param.array -= self.hyperparam.lr * grad


class MomentumSGDRule(UpdateRule):
    """``v = momentum * v - lr * grad; param += v``."""

    def init_state(self, param: Parameter) -> None:
        assert self.state is not None  # init_state fills an empty state
        self.state['v'] = param.xp.zeros_like(param.array)

    def update_core(self, param: Parameter) -> None:
        grad = param.grad
        if grad is None:
            return
        assert self.state is not None  # update() made it
        v = self.state['v']
        v *= self.hyperparam.momentum
        v -= self.hyperparam.lr * grad
        param.array += v


def _adam_alpha_t(hp: Hyperparameter, t: int) -> float:
    if t == 0:
        raise RuntimeError("can't determine the learning rate of Adam: no update step yet")
    fix1 = 1.0 - math.pow(hp.beta1, t)
    fix2 = 1.0 - math.pow(hp.beta2, t)
    return hp.alpha * math.sqrt(fix2) / fix1


class AdamRule(UpdateRule):
    """Adam (with decoupled weight decay and AMSGrad), Chainer's CPU formulas.

    ``m += (1 - beta1) * (grad - m)``, ``v += (1 - beta2) * (grad**2 - v)``,
    ``param -= eta * (alpha_t * m / (sqrt(v) + eps) + weight_decay_rate * param)`` with
    ``alpha_t = alpha * sqrt(1 - beta2**t) / (1 - beta1**t)``; ``vhat = max(vhat, v)`` replaces
    ``v`` with AMSGrad. float16 parameters compute in float32.
    """

    def init_state(self, param: Parameter) -> None:
        assert self.state is not None  # init_state fills an empty state
        xp = param.xp
        self.state['m'] = xp.zeros_like(param.array)
        self.state['v'] = xp.zeros_like(param.array)
        if self.hyperparam.amsgrad:
            self.state['vhat'] = xp.zeros_like(param.array)

    @property
    def alpha_t(self) -> float:
        """The bias-corrected step size at this rule's ``t``."""
        return _adam_alpha_t(self.hyperparam, self.t)

    lr = alpha_t

    def update_core(self, param: Parameter) -> None:
        grad = param.grad
        if grad is None:
            return
        hp = self.hyperparam
        xp = param.xp
        dtype = numpy.dtype(numpy.float32 if param.dtype == numpy.float16 else param.dtype)
        if hp.eps != 0 and dtype.type(hp.eps) == 0:
            raise ValueError(f'eps of Adam optimizer is too small for {dtype.name} ({hp.eps})')
        grad = grad.astype(dtype, copy=False)
        assert self.state is not None  # update() made it
        m, v = self.state['m'], self.state['v']
        m += (1.0 - hp.beta1) * (grad - m)
        v += (1.0 - hp.beta2) * (grad * grad - v)
        if hp.amsgrad:
            vhat = self.state['vhat']
            xp.maximum(vhat, v, out=vhat)
        else:
            vhat = v
        vhat = vhat.astype(dtype, copy=False)
        step = self.alpha_t / (xp.sqrt(vhat) + hp.eps)
        decay = 1.0 - hp.eta * hp.weight_decay_rate
        if decay == 1:
            param.array += -hp.eta * (step * m)
        else:
            param.array[...] = decay * param.array + -hp.eta * (step * m)


# -------------------------------------------------------------------------------------------------


class Optimizer:
    """Base of optimizers: a target link, the global update count ``t`` and ``epoch``."""

    keeps_returned_arrays = True  # serialize() keeps the arrays a load returns (see loading)

    target: Link | None = None
    t = 0
    epoch = 0
    use_auto_new_epoch = False

    def setup(self, link: Link) -> Optimizer:
        """Sets the target link and resets ``t`` and ``epoch``; returns the optimizer.

        Raises:
            TypeError: ``link`` is not a Link.
        """
        if not isinstance(link, Link):
            raise TypeError(f'optimization target must be a link, not {type(link).__name__}')
        self.target = link
        self.t = 0
        self.epoch = 0
        return self

    def update(self, lossfun=None, *args, **kwargs) -> None:
        raise NotImplementedError

    def new_epoch(self, auto: bool = False) -> None:
        """Counts a new epoch (``auto=True`` when an updater calls it).

        Raises:
            RuntimeError: ``auto`` does not match :attr:`use_auto_new_epoch`.
        """
        if auto and not self.use_auto_new_epoch:
            raise RuntimeError('invalid new_epoch call with auto=True: '
                               'set optimizer.use_auto_new_epoch = True in the updater')
        if not auto and self.use_auto_new_epoch:
            raise RuntimeError('duplicated new_epoch with the updater: pass '
                               'auto_new_epoch=False to the updater or stop calling new_epoch')
        self.epoch += 1

    def _set_up_target(self) -> Link:
        if self.target is None:
            raise RuntimeError(f'this {type(self).__name__} has no target link: call '
                               f'setup(link) first')
        return self.target

    def serialize(self, serializer) -> None:
        """Saves or loads ``t``, ``epoch`` and each update rule under its parameter's path.

        The target link's parameters themselves are not included, as in Chainer.
        """
        target = self._set_up_target()
        t, epoch = serializer('t', self.t), serializer('epoch', self.epoch)
        after_load(serializer, functools.partial(self._set_counts, t, epoch))
        for name, param in target.namedparams():
            rule = getattr(param, 'update_rule', None)
            if rule is not None:
                rule.serialize(serializer[name])

    def _set_counts(self, t: int, epoch: int) -> None:
        self.t, self.epoch = t, epoch


class GradientMethod(Optimizer):
    """An optimizer that updates each parameter from its gradient with an :class:`UpdateRule`."""

    def __init__(self):
        self.hyperparam = Hyperparameter()

    def setup(self, link: Link) -> GradientMethod:
        super().setup(link)
        for param in link.params():
            param.update_rule = self.create_update_rule()
        return self

    def create_update_rule(self) -> UpdateRule:
        raise NotImplementedError

    def reallocate_cleared_grads(self) -> None:
        """Gives every initialized parameter without a gradient a zero gradient, as Chainer."""
        for param in self._set_up_target().params(include_uninit=False):
            if param.grad is None:
                param.zerograd()

    def update(self, lossfun=None, *args, **kwargs) -> None:
        """Updates every parameter from its ``.grad``.

        Args:
            lossfun: Optional callable that sets the gradients; when given, the gradients are
                cleared first and ``lossfun(*args, **kwargs)`` is called.
        """
        target = self._set_up_target()
        if lossfun is not None:
            target.cleargrads()
            lossfun(*args, **kwargs)
        self.reallocate_cleared_grads()
        self.t += 1
        for param in target.params():
            param.update()
        self.reallocate_cleared_grads()


class SGD(GradientMethod):
    """Vanilla stochastic gradient descent."""

    lr = HyperparameterProxy('lr')

    def __init__(self, lr: float = 0.01):
        super().__init__()
        self.hyperparam.lr = lr

    def create_update_rule(self) -> SGDRule:
        return SGDRule(self.hyperparam)


class MomentumSGD(GradientMethod):
    """Classical momentum SGD (state ``v``)."""

    lr = HyperparameterProxy('lr')
    momentum = HyperparameterProxy('momentum')

    def __init__(self, lr: float = 0.01, momentum: float = 0.9):
        super().__init__()
        self.hyperparam.lr = lr
        self.hyperparam.momentum = momentum

    def create_update_rule(self) -> MomentumSGDRule:
        return MomentumSGDRule(self.hyperparam)


class Adam(GradientMethod):
    """Adam, with Chainer's hyperparameters (state ``m``, ``v``, and ``vhat`` with AMSGrad)."""

    alpha = HyperparameterProxy('alpha')
    beta1 = HyperparameterProxy('beta1')
    beta2 = HyperparameterProxy('beta2')
    eps = HyperparameterProxy('eps')
    eta = HyperparameterProxy('eta')
    weight_decay_rate = HyperparameterProxy('weight_decay_rate')
    amsgrad = HyperparameterProxy('amsgrad')

    def __init__(self, alpha: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, eta: float = 1.0, weight_decay_rate: float = 0,
                 amsgrad: bool = False):
        super().__init__()
        hp = self.hyperparam
        hp.alpha, hp.beta1, hp.beta2, hp.eps = alpha, beta1, beta2, eps
        hp.eta, hp.weight_decay_rate, hp.amsgrad = eta, weight_decay_rate, amsgrad

    def create_update_rule(self) -> AdamRule:
        return AdamRule(self.hyperparam)

    @property
    def alpha_t(self) -> float:
        """The bias-corrected step size at the optimizer's ``t``."""
        return _adam_alpha_t(self.hyperparam, self.t)

    lr = alpha_t
