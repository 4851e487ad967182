"""Parameters and links: the state-holding part of Chainer's ``Link``, ``Chain`` and ``ChainList``.

There is no autograd here. A :class:`Parameter` holds an array and its gradient; a :class:`Link`
holds parameters and persistent values and serializes them under Chainer's key layout (``W``,
``b``, ``l1/W``, ``0/W``), so that files move between Chainer and gpuserial both ways.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator, MutableSequence
from typing import TYPE_CHECKING, Any

import numpy

from gpuserial.engine import devices
from gpuserial.engine.devices import Device
from gpuserial.errors import DtypeMismatchError, MismatchError
from gpuserial.serializer import after_load

if TYPE_CHECKING:
    from gpuserial.objects.optimizers import UpdateRule

__all__ = ['BatchNormalization', 'Chain', 'ChainList', 'Linear', 'Link', 'Parameter']

Shape = int | tuple[int, ...]
ShapeSpec = Shape | None


def _as_shape(shape: Shape) -> tuple[int, ...]:
    return tuple(int(n) for n in shape) if isinstance(shape, Iterable) else (int(shape),)


class Parameter:
    """An array that a link owns and an optimizer updates, with its gradient.

    Args:
        initializer: How to fill the array: ``None`` (NaN, as Chainer does), a scalar constant,
            an array (used as the data itself, so ``shape`` may be left out), or a callable that
            fills the array it is given in place (its ``dtype`` attribute, if any, sets the
            dtype).
        shape: The shape; ``None`` leaves the parameter uninitialized until :meth:`initialize`
            is called or a load gives it one.
        dtype: The dtype when ``initializer`` does not fix one (default float32).
        name: The parameter's name (a link sets it on registration).

    Raises:
        ValueError: ``initializer`` is an array whose shape is not ``shape``.
    """

    def __init__(self, initializer=None, shape: ShapeSpec = None, *, dtype=None,
                 name: str | None = None):
        self.name = name
        self.grad: Any = None
        self.update_rule: UpdateRule | None = None
        self._array: Any = None
        self._device: Device = devices.CPU
        if devices.is_array(initializer):
            if shape is not None and _as_shape(shape) != initializer.shape:
                raise ValueError(f'parameter {name!r}: initial array has shape '
                                 f'{initializer.shape}, expected {_as_shape(shape)}')
            self.initializer = None
            self._dtype = numpy.dtype(initializer.dtype)
            self._array = initializer
            return
        self.initializer = initializer
        self._dtype = numpy.dtype(getattr(initializer, 'dtype', None) or dtype or numpy.float32)
        if shape is not None:
            self.initialize(shape)

    # -- data ------------------------------------------------------------------------------------

    @property
    def array(self):
        """The data array (NumPy or CuPy), or None while uninitialized."""
        return self._array

    @array.setter
    def array(self, value) -> None:
        self._array = value
        if value is not None:
            self._dtype = numpy.dtype(value.dtype)
            self._device = devices.device_of(value)

    data = array

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The array's shape, or None while uninitialized."""
        return None if self._array is None else tuple(self._array.shape)

    @property
    def dtype(self) -> numpy.dtype:
        """The array's dtype (known before initialization too)."""
        return self._dtype

    @property
    def size(self) -> int:
        return 0 if self._array is None else int(self._array.size)

    @property
    def is_initialized(self) -> bool:
        return self._array is not None

    @property
    def device(self) -> Device:
        """The device of the array, or where it will be created while uninitialized."""
        return self._device if self._array is None else devices.device_of(self._array)

    @property
    def xp(self):
        return self.device.xp

    def initialize(self, shape: Shape) -> None:
        """Creates the array with ``shape`` on the parameter's device and fills it."""
        dims = _as_shape(shape)
        device = self._device
        with device.use():
            array = device.backend.empty(dims, self._dtype, device)
            if hasattr(array, 'fill'):  # NumPy and CuPy: filled where it lives
                self._fill(array)
            else:  # a backend without array arithmetic: filled on the host, then sent
                host = numpy.empty(dims, self._dtype)
                self._fill(host)
                array = device.send(host)
        self.array = array

    def _fill(self, array) -> None:
        init = self.initializer
        if init is None:
            array.fill(math.nan if self._dtype.kind in 'fc' else 0)
        elif callable(init):
            init(array)
        else:
            array.fill(init)

    def cleargrad(self) -> None:
        """Drops the gradient."""
        self.grad = None

    def zerograd(self) -> None:
        """Sets the gradient to zeros (nothing while uninitialized)."""
        if self._array is not None:
            with self.device.use():
                self.grad = self.xp.zeros_like(self._array)

    def to_device(self, device) -> Parameter:
        """Moves the array and gradient to ``device`` (a spec for ``get_device``)."""
        device = devices.get_device(device)
        if self._array is not None:
            self._array = device.send(self._array)
        if self.grad is not None:
            self.grad = device.send(self.grad)
        self._device = device
        return self

    def to_cpu(self) -> Parameter:
        return self.to_device(devices.CPU)

    def update(self) -> None:
        """Updates the array with the update rule an optimizer set, if any."""
        if self.update_rule is not None:
            self.update_rule.update(self)

    def __repr__(self) -> str:
        return f'<Parameter {self.name} shape={self.shape} dtype={self._dtype} {self.device}>'


# -------------------------------------------------------------------------------------------------


def _gpu_device(device) -> Device:
    if device is not None:
        return devices.get_device(device)
    current = devices.default_device()
    return current if current is not devices.CPU else devices.get_device('cuda')


class Link:
    """A set of parameters and persistent values, serializable with Chainer's key layout.

    Register parameters by assigning them inside :meth:`init_scope` or with :meth:`add_param`,
    and persistent values (arrays, scalars, strings, serializable objects) with
    :meth:`add_persistent`. ``Link(W=(2, 3))`` adds uninitialized-or-shaped parameters by name.
    """

    keeps_returned_arrays = True  # serialize() keeps the arrays a load returns (see loading)

    # Set with object.__setattr__, around the registering __setattr__:
    _params: dict[str, None]  # ordered sets of names
    _persistent: dict[str, None]
    _within_init_scope: bool
    _device: Device

    def __init__(self, **params: ShapeSpec):
        object.__setattr__(self, '_params', {})  # ordered sets of names
        object.__setattr__(self, '_persistent', {})
        object.__setattr__(self, '_within_init_scope', False)
        object.__setattr__(self, '_device', devices.CPU)
        self.name: str | None = None
        for name, shape in params.items():
            self.add_param(name, shape)

    @contextlib.contextmanager
    def init_scope(self) -> Iterator[None]:
        """A scope in which assigning a Parameter (or, in a Chain, a Link) registers it."""
        old = self._within_init_scope
        object.__setattr__(self, '_within_init_scope', True)
        try:
            yield
        finally:
            object.__setattr__(self, '_within_init_scope', old)

    @property
    def within_init_scope(self) -> bool:
        return self._within_init_scope

    def __setattr__(self, name: str, value: Any) -> None:
        if self._within_init_scope and isinstance(value, Parameter):
            value.name = name
            self._params[name] = None
            self._persistent.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._params.pop(name, None)
        self._persistent.pop(name, None)
        object.__delattr__(self, name)

    def add_param(self, name: str, shape: ShapeSpec = None, dtype=numpy.float32,
                  initializer=None) -> None:
        """Registers a new parameter ``name`` (uninitialized when ``shape`` is None).

        Raises:
            AttributeError: the link already has an attribute ``name``.
        """
        if name in self.__dict__:
            raise AttributeError(f'cannot register a new parameter {name!r}: attribute exists')
        param = Parameter(initializer, shape, dtype=dtype)
        param.to_device(self._device)
        with self.init_scope():
            setattr(self, name, param)

    def add_persistent(self, name: str, value: Any) -> None:
        """Registers a persistent value: an array, a scalar, a string or a serializable object.

        Raises:
            AttributeError: the link already has an attribute ``name``.
        """
        if name in self.__dict__:
            raise AttributeError(f'cannot register a new persistent value {name!r}: '
                                 f'attribute exists')
        self.register_persistent(name, value)

    def register_persistent(self, name: str, *value: Any) -> None:
        """Registers the existing attribute ``name`` (or sets it to ``value``) as persistent."""
        if value:
            object.__setattr__(self, name, value[0])
        elif not hasattr(self, name):
            raise AttributeError(f'cannot register non-existent attribute {name!r} '
                                 f'as a persistent value')
        self._persistent[name] = None
        self._params.pop(name, None)

    # -- hierarchy -------------------------------------------------------------------------------

    def _named_children(self) -> Iterator[tuple[str, Link]]:
        """The (name, child) pairs under this link; a plain Link has none."""
        return iter(())

    def children(self) -> Iterator[Link]:
        """The direct child links."""
        for _, child in self._named_children():
            yield child

    def params(self, include_uninit: bool = True) -> Iterator[Parameter]:
        """All parameters under this link: its own (sorted by name), then its children's."""
        for _, param in self.namedparams(include_uninit):
            yield param

    def namedparams(self, include_uninit: bool = True) -> Iterator[tuple[str, Parameter]]:
        """All ``(path, parameter)`` pairs under this link, paths like ``'/l1/W'``."""
        d = self.__dict__
        for name in sorted(self._params):
            if include_uninit or d[name].is_initialized:
                yield '/' + name, d[name]
        for name, child in self._named_children():
            for path, param in child.namedparams(include_uninit):
                yield '/' + name + path, param

    def links(self, skipself: bool = False) -> Iterator[Link]:
        """This link (unless ``skipself``) and all links under it."""
        for _, link in self.namedlinks(skipself):
            yield link

    def namedlinks(self, skipself: bool = False) -> Iterator[tuple[str, Link]]:
        """All ``(path, link)`` pairs: ``('/', self)`` unless ``skipself``, then ``'/l1'``..."""
        if not skipself:
            yield '/', self
        for name, child in self._named_children():
            yield '/' + name, child
            for path, link in child.namedlinks(True):
                yield '/' + name + path, link

    def cleargrads(self) -> None:
        """Drops the gradients of all parameters."""
        for param in self.params():
            param.cleargrad()

    def zerograds(self) -> None:
        """Sets the gradients of all initialized parameters to zeros."""
        for param in self.params():
            param.zerograd()

    def count_params(self) -> int:
        """The number of elements in all initialized parameters."""
        return sum(param.size for param in self.params())

    # -- devices ---------------------------------------------------------------------------------

    @property
    def device(self) -> Device:
        """The device this link was last sent to (the CPU to begin with)."""
        return self._device

    @property
    def xp(self):
        """The array module of :attr:`device`."""
        return self._device.xp

    def to_device(self, device) -> Link:
        """Moves parameters, gradients and array persistents here and below to ``device``.

        Args:
            device: Anything :func:`gpuserial.engine.devices.get_device` accepts.

        Returns:
            This link.
        """
        device = devices.get_device(device)
        d = self.__dict__
        for name in self._params:
            d[name].to_device(device)
        for name in self._persistent:
            value = d[name]
            if devices.is_array(value):
                d[name] = device.send(value)
            elif callable(getattr(value, 'to_device', None)):
                value.to_device(device)
        for child in self.children():
            child.to_device(device)
        object.__setattr__(self, '_device', device)
        return self

    def to_cpu(self) -> Link:
        """Moves everything to the host (NumPy)."""
        return self.to_device(devices.CPU)

    def to_gpu(self, device=None) -> Link:
        """Moves everything to GPU ``device`` (the current GPU when None).

        Raises:
            DeviceError: no GPU is usable, or ``device`` names none.
        """
        return self.to_device(_gpu_device(device))

    # -- serialization ---------------------------------------------------------------------------

    def serialize(self, serializer) -> None:
        """Saves or loads parameters, persistent values and children, as Chainer does.

        A deserializer that hands back a new array (a load onto another device, or into an
        uninitialized parameter) gets that array installed; one that returns the value it was
        given leaves the link untouched. What a load returns is set once it has succeeded
        (:func:`~gpuserial.serializer.after_load`).
        """
        d = self.__dict__
        for name in self._params:
            param = d[name]
            data = serializer(name, param.array)
            if data is not None and data is not param.array:
                try:
                    data = _installable(param, data, name)
                except MismatchError as error:  # gpuserial's deserializers name the file
                    where = getattr(serializer, 'where', None)
                    if where is None:
                        raise
                    raise type(error)(f'{where(name)}: {error}') from None
                after_load(serializer, functools.partial(_install, param, data))
        for name in self._persistent:
            value = d[name]
            if not devices.is_array(value) and callable(getattr(value, 'serialize', None)):
                value.serialize(serializer[name])
                continue
            loaded = serializer(name, value)
            if loaded is not value:
                after_load(serializer, functools.partial(d.__setitem__, name, loaded))
        for name, child in self._named_children():
            child.serialize(serializer[name])

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f'{type(self).__name__} has no forward')


def _installable(param: Parameter, data, name: str):
    """A loaded array as ``param``'s data would be (:func:`_install`): of the parameter's
    dtype, and for an uninitialized parameter of a link moved off the host, sent to its
    device, as Chainer initializes it there.

    Raises:
        DtypeMismatchError: the array's values do not convert to the parameter's dtype.
    """
    backend, device = devices.backend_of(data), devices.device_of(data)
    assert backend is not None  # a deserializer hands back arrays
    if data.dtype.names is not None and data.dtype != param.dtype:  # NumPy would cast the bits
        raise DtypeMismatchError(f'parameter {name!r}: stored values of dtype {data.dtype} do '
                                 f'not convert to its dtype {param.dtype} (bfloat16 and float8 '
                                 f'values do where ml_dtypes is installed)')
    if data.dtype != param.dtype:
        cast = backend.empty(data.shape, param.dtype, device)
        backend.assign(cast, data)
        data = cast
    if param.array is None and device == devices.CPU and param.device != devices.CPU:
        data = param.device.send(data)
    return data


def _install(param: Parameter, data) -> None:
    """Sets ``data`` (:func:`_installable`) as ``param``'s data, moving its gradient along."""
    param.array = data
    if param.grad is not None:
        param.grad = param.device.send(param.grad)


class Chain(Link):
    """A link with named child links, registered in :meth:`init_scope` or with :meth:`add_link`.

    Children serialize under their names: ``l1/W``.
    """

    _children: dict[str, None]  # an ordered set of names

    def __init__(self, **links: Link):
        super().__init__()
        object.__setattr__(self, '_children', {})
        for name, link in links.items():
            self.add_link(name, link)

    def __getitem__(self, name: str) -> Any:
        """Equivalent to ``getattr(self, name)``."""
        return getattr(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._within_init_scope and isinstance(value, Link):
            if hasattr(self, name):
                raise AttributeError(f'cannot register a new link {name!r}: attribute exists')
            value.name = name
            self._children[name] = None
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self._children.pop(name, None)
        super().__delattr__(name)

    def add_link(self, name: str, link: Link) -> None:
        """Registers ``link`` as the child ``name``.

        Raises:
            AttributeError: the chain already has an attribute ``name``.
            TypeError: ``link`` is not a Link.
        """
        if name in self.__dict__:
            raise AttributeError(f'cannot register a new link {name!r}: attribute exists')
        if not isinstance(link, Link):
            raise TypeError(f'cannot register a non-link object {link!r} as a child')
        with self.init_scope():
            setattr(self, name, link)

    def _named_children(self) -> Iterator[tuple[str, Link]]:
        d = self.__dict__
        for name in sorted(self._children):
            yield name, d[name]


class ChainList(Link, MutableSequence):
    """A link with indexed child links: a list whose items serialize under ``0``, ``1``, ..."""

    _children: list[Link]

    def __init__(self, *links: Link):
        super().__init__()
        object.__setattr__(self, '_children', [])
        for link in links:
            self.append(link)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._within_init_scope and isinstance(value, Link):
            raise TypeError('cannot register a new link within a "with chainlist.init_scope():" '
                            'block: use append')
        super().__setattr__(name, value)

    def _rename(self) -> None:
        for index, child in enumerate(self._children):
            child.name = str(index)

    def __getitem__(self, index):
        return self._children[index]

    def __setitem__(self, index, value) -> None:
        self._children[index] = value
        self._rename()

    def __delitem__(self, index) -> None:
        del self._children[index]
        self._rename()

    def insert(self, index: int, link: Link) -> None:
        """Inserts a child link before ``index``."""
        if not isinstance(link, Link):
            raise TypeError(f'cannot register a non-link object {link!r} as a child')
        self._children.insert(index, link)
        self._rename()

    def __iter__(self) -> Iterator[Link]:
        return iter(self._children)

    def __len__(self) -> int:
        return len(self._children)

    def add_link(self, link: Link) -> None:
        """Appends a child link."""
        self.append(link)

    def _named_children(self) -> Iterator[tuple[str, Link]]:
        for index, child in enumerate(self._children):
            yield str(index), child


# -------------------------------------------------------------------------------------------------
# Two small links with Chainer's names and layouts, for tests and interchange.


def _lecun_normal(array) -> None:
    """Fills a 2-d ``array`` from N(0, 1/fan_in) using NumPy's global RNG, as Chainer does."""
    fan_in = array.shape[1] if array.ndim > 1 else array.shape[0]
    values = numpy.random.normal(0.0, math.sqrt(1.0 / max(fan_in, 1)), array.shape)
    array[...] = devices.get_array_module(array).asarray(values.astype(array.dtype))


class Linear(Link):
    """Chainer's ``L.Linear`` state: ``W`` of shape (out_size, in_size) and ``b`` of (out_size,).

    ``Linear(out_size)`` or ``Linear(None, out_size)`` leaves ``W`` uninitialized.

    Args:
        in_size: Input size, or None to defer ``W``'s shape (to a load, or the first forward).
        out_size: Output size.
        nobias: No ``b`` parameter.
        initialW: Initializer of ``W`` (default: LeCun normal).
        initial_bias: Initializer of ``b`` (default: 0).
    """

    def __init__(self, in_size: int | None, out_size: int | None = None, nobias: bool = False,
                 initialW=None, initial_bias=None):
        super().__init__()
        if out_size is None:
            in_size, out_size = None, in_size
        self.in_size = in_size
        self.out_size = out_size
        with self.init_scope():
            self.W = Parameter(_lecun_normal if initialW is None else initialW)
            if in_size is not None and not self.W.is_initialized:
                assert out_size is not None  # in_size alone was moved to out_size above
                self.W.initialize((out_size, in_size))
            if nobias:
                self.b = None
            else:
                self.b = Parameter(0 if initial_bias is None else initial_bias, out_size)

    def forward(self, x):
        """``x @ W.T + b``; initializes ``W`` from ``x``'s width when needed."""
        if self.W.array is None:
            if self.out_size is None:
                raise TypeError('Linear(None) has no out_size to initialize W with: load W first')
            self.W.initialize((self.out_size, x.shape[1]))
        y = x @ self.W.array.T
        return y if self.b is None else y + self.b.array


class BatchNormalization(Link):
    """Chainer's ``L.BatchNormalization`` state, without training-mode statistics.

    Parameters ``gamma`` (ones) and ``beta`` (zeros); persistents ``avg_mean`` (zeros),
    ``avg_var`` (ones) and ``N`` (0). With ``size=None`` they stay unset until a load.
    """

    N: int  # persistent values, registered in __init__
    avg_mean: Any  # arrays, None until a load with size=None
    avg_var: Any

    def __init__(self, size: ShapeSpec = None, decay: float = 0.9, eps: float = 2e-5,
                 dtype=numpy.float32, use_gamma: bool = True, use_beta: bool = True):
        super().__init__()
        self.decay = decay
        self.eps = eps
        self.register_persistent('N', 0)
        with self.init_scope():
            if use_gamma:
                self.gamma = Parameter(1, size, dtype=dtype)
            if use_beta:
                self.beta = Parameter(0, size, dtype=dtype)
        shape = None if size is None else _as_shape(size)
        self.register_persistent('avg_mean', None if shape is None else numpy.zeros(shape, dtype))
        self.register_persistent('avg_var', None if shape is None else numpy.ones(shape, dtype))

    def forward(self, x):
        """Normalizes ``x`` with the running statistics (inference mode)."""
        xp = devices.get_array_module(x)
        y = (x - self.avg_mean) / xp.sqrt(self.avg_var + self.eps)
        if getattr(self, 'gamma', None) is not None:
            y = y * self.gamma.array
        if getattr(self, 'beta', None) is not None:
            y = y + self.beta.array
        return y

