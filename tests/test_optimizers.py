"""Optimizers: Chainer's update formulas, state created lazily or from a file, Chainer's layout."""

import math
import pathlib

import numpy
import pytest

from gpuserial import serializers
from gpuserial.engine import devices
from gpuserial.objects.link import Chain, Linear, Link
from gpuserial.objects.optimizers import SGD, Adam, Hyperparameter, MomentumSGD
from tests.test_link import FromDict, Net, Recorder, assert_same_state, snapshot_state

CHAINER_DATA = pathlib.Path(__file__).parent / 'data' / 'chainer'
OPTIMIZERS = {'sgd': lambda: SGD(lr=0.1), 'momentum_sgd': lambda: MomentumSGD(lr=0.1),
              'adam': lambda: Adam(), 'amsgrad': lambda: Adam(alpha=0.01, amsgrad=True),
              'adamw': lambda: Adam(alpha=0.01, weight_decay_rate=0.1, eta=0.5)}
STATE_KEYS = {'sgd': [], 'momentum_sgd': ['v'], 'adam': ['m', 'v'], 'amsgrad': ['m', 'v', 'vhat'],
              'adamw': ['m', 'v']}


def one_param(value, opt, dtype=numpy.float32):
    link = Link()
    link.add_param('w', initializer=numpy.array(value, dtype))
    opt.setup(link)
    return link


def step(link, grads):
    for p, g in zip(link.params(), grads, strict=True):
        p.grad = numpy.array(g, p.dtype)


# -- formulas ------------------------------------------------------------------------------------


def test_sgd_formula():
    opt = SGD(lr=0.5)
    link = one_param([1.0, 2.0], opt)
    step(link, [[1.0, -2.0]])
    opt.update()
    numpy.testing.assert_array_equal(link.w.array, [0.5, 3.0])
    assert opt.t == 1 and link.w.update_rule.t == 1 and link.w.update_rule.state == {}


def test_momentum_sgd_formula_by_hand():
    opt = MomentumSGD(lr=0.1, momentum=0.9)
    link = one_param([1.0], opt, numpy.float64)
    for g in (1.0, 2.0, -1.0):
        step(link, [[g]])
        opt.update()
    # v1 = -0.1, w = 0.9; v2 = -0.09 - 0.2 = -0.29, w = 0.61; v3 = -0.261 + 0.1 = -0.161
    numpy.testing.assert_allclose(link.w.update_rule.state['v'], [-0.161], rtol=1e-12)
    numpy.testing.assert_allclose(link.w.array, [0.449], rtol=1e-12)


def _adam_reference(w, grads, alpha, beta1, beta2, eps, eta=1.0, wd=0.0, amsgrad=False):
    """Adam from the paper, in float64, with Chainer's bias correction and decoupled decay."""
    m = v = vhat = 0.0
    for t, g in enumerate(grads, 1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        vhat = max(vhat, v) if amsgrad else v
        alpha_t = alpha * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        w = w - eta * (alpha_t * m / (math.sqrt(vhat) + eps) + wd * w)
    return w, m, v


@pytest.mark.parametrize('kwargs', [{}, {'amsgrad': True}, {'weight_decay_rate': 0.1, 'eta': 0.5},
                                    {'weight_decay_rate': -2.0, 'eta': 0.5},  # decay factor 2
                                    {'alpha': 0.1, 'beta1': 0.5, 'beta2': 0.9, 'eps': 1e-3}])
def test_adam_formula_against_float64_reference(kwargs):
    opt = Adam(**kwargs)
    link = one_param([0.7], opt, numpy.float64)
    grads = [0.3, -1.2, 0.05, 2.0, -0.4]
    for g in grads:
        step(link, [[g]])
        opt.update()
    hp = opt.hyperparam
    w, m, v = _adam_reference(0.7, grads, hp.alpha, hp.beta1, hp.beta2, hp.eps, hp.eta,
                              hp.weight_decay_rate, hp.amsgrad)
    numpy.testing.assert_allclose(link.w.array, [w], rtol=1e-12)
    numpy.testing.assert_allclose(link.w.update_rule.state['m'], [m], rtol=1e-12)
    numpy.testing.assert_allclose(link.w.update_rule.state['v'], [v], rtol=1e-12)
    assert sorted(link.w.update_rule.state) == sorted(['m', 'v'] + ['vhat'] * hp.amsgrad)


def test_adam_alpha_t_and_lr():
    opt = Adam(alpha=0.1, beta1=0.5, beta2=0.75)
    link = one_param([0.0], opt)
    with pytest.raises(RuntimeError, match='no update step yet'):
        _ = opt.alpha_t
    step(link, [[1.0]])
    opt.update()
    expected = 0.1 * math.sqrt(1 - 0.75) / (1 - 0.5)
    assert opt.alpha_t == opt.lr == expected
    assert link.w.update_rule.alpha_t == link.w.update_rule.lr == expected


def test_adam_float16_keeps_state_dtype_and_computes_in_float32():
    opt = Adam(alpha=0.01)
    link = one_param([1.0, -1.0], opt, numpy.float16)
    step(link, [[0.5, 0.25]])
    opt.update()
    assert link.w.dtype == numpy.float16
    assert link.w.update_rule.state['m'].dtype == numpy.float16
    numpy.testing.assert_allclose(link.w.array, [0.99, -1.01], atol=1e-3)


def test_adam_eps_underflow_names_dtype():
    opt = Adam(eps=1e-50)
    link = one_param([1.0], opt)
    step(link, [[1.0]])
    with pytest.raises(ValueError, match=r'too small for float32 \(1e-50\)'):
        opt.update()


def test_missing_grad_is_zero_and_still_decays_adam_state():
    opt = Adam()
    link = one_param([1.0], opt)
    step(link, [[1.0]])
    opt.update()
    m1 = link.w.update_rule.state['m'].copy()
    link.cleargrads()
    opt.update()  # Chainer reallocates cleared gradients as zeros
    numpy.testing.assert_allclose(link.w.update_rule.state['m'], m1 * 0.9)
    assert link.w.grad is not None and not link.w.grad.any()


def test_update_with_a_gradient_function():
    opt = SGD(lr=1.0)
    link = one_param([3.0], opt)
    link.w.grad = numpy.array([100.0], numpy.float32)  # cleared before the function runs

    def set_grads(target, value):
        assert target.w.grad is None
        target.w.grad = numpy.array([value], numpy.float32)
    opt.update(set_grads, link, 2.0)
    numpy.testing.assert_array_equal(link.w.array, [1.0])


def test_disabled_rule_and_uninitialized_params():
    opt = MomentumSGD()
    model = Chain(a=Linear(2, 2), lazy=Linear(None, 2))
    opt.setup(model)
    model.a.b.update_rule.enabled = False
    model.zerograds()
    opt.update()
    assert model.a.b.update_rule.t == 0 and model.a.b.update_rule.state is None
    assert model.lazy.W.update_rule.t == 1 and model.lazy.W.update_rule.state is None
    assert model.a.W.update_rule.state['v'].shape == (2, 2)


def test_hyperparameters_are_shared_and_overridable():
    opt = MomentumSGD(lr=0.1)
    link = one_param([0.0], opt)
    rule = link.w.update_rule
    assert rule.hyperparam.lr == 0.1 and rule.hyperparam.parent is opt.hyperparam
    opt.lr = 0.2
    assert rule.hyperparam.lr == 0.2
    rule.hyperparam.lr = 0.3
    assert opt.lr == 0.2 and rule.hyperparam.get_dict() == {'lr': 0.3, 'momentum': 0.9}
    assert 'lr=0.3' in repr(rule.hyperparam)
    with pytest.raises(AttributeError, match="no hyperparameter 'beta'"):
        _ = Hyperparameter().beta


def test_setup_requires_a_link_and_resets_counts():
    opt = SGD()
    with pytest.raises(TypeError, match='must be a link, not dict'):
        opt.setup({})
    opt.t, opt.epoch = 5, 2
    assert opt.setup(Link()) is opt and (opt.t, opt.epoch) == (0, 0)


def test_new_epoch_auto_checks():
    opt = SGD().setup(Link())
    opt.new_epoch()
    assert opt.epoch == 1
    with pytest.raises(RuntimeError, match='invalid new_epoch call with auto=True'):
        opt.new_epoch(auto=True)
    opt.use_auto_new_epoch = True
    with pytest.raises(RuntimeError, match='duplicated new_epoch'):
        opt.new_epoch()
    opt.new_epoch(auto=True)
    assert opt.epoch == 2


# -- serialize -----------------------------------------------------------------------------------


def trained(name, steps=3, model=None):
    model = Net() if model is None else model
    opt = OPTIMIZERS[name]().setup(model)
    for i in range(steps):
        for j, p in enumerate(model.params()):
            p.grad = numpy.random.RandomState(10 * i + j).uniform(-1, 1, p.shape).astype(p.dtype)
        opt.update()
    return model, opt


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_serialize_layout(name):
    _, opt = trained(name, steps=2)
    opt.epoch = 1
    state = Recorder()
    opt.serialize(state)
    params = ['predictor/l1/W', 'predictor/l1/b', 'predictor/l2/W', 'predictor/l2/b']
    expected = ['t', 'epoch'] + [f'{p}/{k}' for p in params for k in ['t'] + STATE_KEYS[name]]
    assert sorted(state.target) == sorted(expected)
    assert state.target['t'] == 2 and state.target['epoch'] == 1
    assert state.target['predictor/l1/W/t'] == 2


def test_serialize_before_any_update_has_counts_only():
    opt = Adam().setup(Net())
    state = Recorder()
    opt.serialize(state)
    assert sorted(state.target) == ['epoch', 'predictor/l1/W/t', 'predictor/l1/b/t',
                                    'predictor/l2/W/t', 'predictor/l2/b/t', 't']


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_load_into_never_updated_optimizer_creates_state(name):
    model, opt = trained(name, steps=2)
    data = snapshot_state(opt)
    model2 = Net()
    model2.serialize(FromDict(snapshot_state(model)))
    opt2 = OPTIMIZERS[name]().setup(model2)
    opt2.serialize(FromDict(data))
    assert_same_state(data, snapshot_state(opt2))
    assert model2.predictor.l1.W.update_rule.t == 2
    # and it goes on exactly as the original
    for m, o in ((model, opt), (model2, opt2)):
        for j, p in enumerate(m.params()):
            p.grad = numpy.full(p.shape, 0.1 * j, p.dtype)
        o.update()
    assert_same_state(snapshot_state(opt), snapshot_state(opt2))
    assert_same_state(snapshot_state(model), snapshot_state(model2))


@pytest.mark.parametrize('ext', ['npz', 'h5'])
@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_round_trip_through_files(tmp_path, name, ext):
    save, load = ((serializers.save_npz, serializers.load_npz) if ext == 'npz'
                  else (serializers.save_hdf5, serializers.load_hdf5))
    _, opt = trained(name)
    save(tmp_path / f'opt.{ext}', opt)
    fresh = OPTIMIZERS[name]().setup(Net())
    load(tmp_path / f'opt.{ext}', fresh)
    assert_same_state(snapshot_state(opt), snapshot_state(fresh))
    assert type(fresh.t) is int and fresh.t == 3
    # loaded into an optimizer that has state already: in place
    arrays = [(p.update_rule.state or {}).get('v') for p in fresh.target.params()]
    load(tmp_path / f'opt.{ext}', fresh)
    assert [(p.update_rule.state or {}).get('v') for p in fresh.target.params()] == arrays


def test_never_updated_file_into_fresh_optimizer_is_chainers_key_error(tmp_path):
    serializers.save_npz(tmp_path / 'opt.npz', Adam().setup(Net()))
    fresh = Adam().setup(Net())
    with pytest.raises(KeyError, match='predictor/l1/W/m'):
        serializers.load_npz(tmp_path / 'opt.npz', fresh)
    assert all(p.update_rule.state is None for p in fresh.target.params())
    serializers.load_npz(tmp_path / 'opt.npz', fresh, strict=False)
    assert all(p.update_rule.state is None for p in fresh.target.params())


def test_state_loaded_onto_another_device_follows_the_parameter(tmp_path):
    from tests import standin
    _, opt = trained('momentum_sgd')
    serializers.save_npz(tmp_path / 'opt.npz', opt)
    fresh = MomentumSGD(lr=0.1).setup(Net())
    device = standin.StandInDevice(0)
    serializers.load_npz(tmp_path / 'opt.npz', fresh, device=device)
    for p in fresh.target.params():
        assert p.update_rule.state['v'].device == device
    assert isinstance(fresh.target.predictor.l1.W.array, numpy.ndarray)  # not loaded: stays


@pytest.mark.parametrize('updated', [False, True])  # state created from the file, or in place
def test_an_update_rule_loads_onto_another_device_by_itself(tmp_path, updated):
    from tests import standin
    _, opt = trained('momentum_sgd')
    rule = opt.target.predictor.l1.W.update_rule
    serializers.save_npz(tmp_path / 'rule.npz', rule)
    fresh = trained('momentum_sgd', steps=int(updated))[1].target.predictor.l1.W.update_rule
    device = standin.StandInDevice(0)
    serializers.load_npz(tmp_path / 'rule.npz', fresh, device=device)
    assert fresh.t == rule.t and fresh.state['v'].device == device
    numpy.testing.assert_array_equal(devices.to_host(fresh.state['v']), rule.state['v'])


# -- Chainer's reference files -------------------------------------------------------------------


def _rand(seed, shape, dtype=numpy.float32):
    return numpy.random.RandomState(seed).uniform(-1.0, 1.0, size=shape).astype(dtype)


def _chainer_run(name):
    """chainer_models.build_optimized, with gpuserial objects."""
    model = Net()
    for i, (_, p) in enumerate(sorted(model.namedparams())):
        p.array[...] = _rand(200 + i, p.shape)
    opt = {'momentum_sgd': lambda: MomentumSGD(lr=0.1, momentum=0.9), 'adam': Adam}[name]()
    opt.setup(model)
    for k in range(3):
        model.cleargrads()
        for i, (_, p) in enumerate(sorted(model.namedparams())):
            p.grad = _rand(1000 + 100 * k + i, p.shape)
        opt.update()
    return model, opt


def _file_state(path):
    from tests.test_link import _stored_values
    return _stored_values(path)


@pytest.mark.parametrize('ext', ['npz', 'h5'])
@pytest.mark.parametrize('name', ['momentum_sgd', 'adam'])
def test_same_run_as_chainer_is_bit_identical(name, ext):
    model, opt = _chainer_run(name)
    for obj, stem in ((opt, name), (model, name + '_model')):
        state = snapshot_state(obj)
        stored = _file_state(CHAINER_DATA / f'{stem}.{ext}')
        assert set(state) == set(stored)
        for key, value in state.items():
            numpy.testing.assert_array_equal(value, stored[key], err_msg=key, strict=False)
            assert numpy.asarray(value).dtype.kind == stored[key].dtype.kind


@pytest.mark.parametrize('ext', ['npz', 'h5'])
@pytest.mark.parametrize('name', ['momentum_sgd', 'adam'])
def test_chainer_optimizer_file_loads_and_training_goes_on(name, ext):
    load = serializers.load_npz if ext == 'npz' else serializers.load_hdf5
    model = Net()
    load(CHAINER_DATA / f'{name}_model.{ext}', model)
    opt = {'momentum_sgd': lambda: MomentumSGD(lr=0.1, momentum=0.9), 'adam': Adam}[name]()
    opt.setup(model)
    load(CHAINER_DATA / f'{name}.{ext}', opt)
    expected_model, expected_opt = _chainer_run(name)
    assert_same_state(snapshot_state(expected_opt), snapshot_state(opt))
    for m, o in ((model, opt), (expected_model, expected_opt)):
        for i, (_, p) in enumerate(sorted(m.namedparams())):
            p.grad = _rand(5000 + i, p.shape)
        o.update()
    assert_same_state(snapshot_state(expected_opt), snapshot_state(opt))
    assert_same_state(snapshot_state(expected_model), snapshot_state(model))


# -- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_gpu_updates_match_numpy(name):
    cpu_model, cpu_opt = trained(name)
    model = Net().to_gpu()
    opt = OPTIMIZERS[name]().setup(model)
    for i in range(3):
        for j, p in enumerate(model.params()):
            g = numpy.random.RandomState(10 * i + j).uniform(-1, 1, p.shape).astype(p.dtype)
            p.grad = devices.get_device('cuda:0').send(g)
        opt.update()
    gpu_state, cpu_state = snapshot_state(opt), snapshot_state(cpu_opt)
    for key, value in cpu_state.items():
        numpy.testing.assert_allclose(devices.to_host(gpu_state[key]), value, rtol=1e-6,
                                      atol=1e-7, err_msg=key)
    for (name_, p), (_, q) in zip(model.namedparams(), cpu_model.namedparams(), strict=True):
        numpy.testing.assert_allclose(p.array.get(), q.array, rtol=1e-6, atol=1e-7,
                                      err_msg=name_)


@pytest.mark.parametrize('call', ['serialize', 'update', 'reallocate_cleared_grads'])
def test_an_optimizer_without_a_target_says_to_call_setup(call):
    optimizer = Adam()
    arguments = {'serialize': (serializers.DictionarySerializer(),)}.get(call, ())
    with pytest.raises(RuntimeError, match=r'this Adam has no target link: call setup\(link\)'):
        getattr(optimizer, call)(*arguments)
    assert (optimizer.t, optimizer.epoch) == (0, 0)
