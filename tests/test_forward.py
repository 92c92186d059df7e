"""ForwardHG against the same oracles as ReverseHG, FAR-HO's published numbers, and the
semantics of its online modes (RTHO and warm restart)."""

import keras
import numpy as np
import tensorflow as tf

import far_ho2 as far
import oracles
from oracles import relative_error
from oracles import ETA, EXACT, RHO, T, T1_FORWARD, Ridge, legacy_t1


def test_forward_equals_closed_form_for_matrix_scalar_and_learning_rate_hyperparameters():
    ridge = Ridge()
    _, grads = ridge.hypergradients(far.ForwardHG())
    for got, want in zip(grads, ridge.expected()):
        assert relative_error(got, want) < EXACT


def test_forward_with_hoisted_features_and_learned_initialisation():
    ridge = Ridge(features=True)
    w0_value = np.random.default_rng(3).normal(size=(5, 2))
    w0 = far.get_hyperparameter("w0", w0_value)
    ho = far.HyperOptimizer(far.ForwardHG())
    run = ho.minimize(ridge.outer, keras.optimizers.SGD(0.0), ridge.inner,
                      far.GradientDescentOptimizer(ridge.eta), hyper_list=ridge.hypers + [w0],
                      init_dynamics_dict=[(ridge.w, w0)], features=ridge.features)
    run(T, inner_objective_feed_dicts=tuple(tf.constant(a) for a in ridge.data[:2]), _skip_hyper_ts=True)
    exact = oracles.unrolled_ridge(ridge.data, ridge.H0, RHO, ETA, T, w0=w0_value)
    for (got, _), want in zip(ho.hypergradients(), [exact.H, RHO * exact.rho, exact.eta, exact.w0]):
        assert relative_error(got.numpy(), want) < EXACT


def momentum_problem(method, steps=12):
    rng = np.random.default_rng(4)
    X, y, Xv, yv = rng.normal(size=(10, 3)), rng.normal(size=10), rng.normal(size=(10, 3)), rng.normal(size=10)
    w = tf.Variable(np.zeros(3))
    log_lr = far.get_hyperparameter("log_lr", np.log(0.05))
    mu = far.get_hyperparameter("mu", np.float64(0.7))
    decay = far.get_hyperparameter("decay", np.array([0.1, 0.2, 0.3]))  # a small vector
    inner = lambda: 0.5 * tf.reduce_sum((X @ w[:, None] - y[:, None]) ** 2) + 0.5 * tf.reduce_sum(decay * w ** 2)
    outer = lambda: 0.5 * tf.reduce_sum((Xv @ w[:, None] - yv[:, None]) ** 2)
    ho = far.HyperOptimizer(method)
    ho.minimize(outer, keras.optimizers.SGD(0.0), inner, far.MomentumOptimizer(lambda: tf.exp(log_lr), mu),
                hyper_list=[log_lr, mu, decay])(steps, _skip_hyper_ts=True)
    return [g.numpy() for g, _ in ho.hypergradients()]


def test_forward_equals_reverse_for_momentum_hyperparameters():
    forward, reverse = momentum_problem(far.ForwardHG()), momentum_problem(far.ReverseHG())
    for f, r in zip(forward, reverse):
        np.testing.assert_allclose(f, r, rtol=1e-10)  # two exact methods, round-off apart


def test_legacy_farho_check_forward_notebook_forward_part():
    np.testing.assert_allclose(legacy_t1(far.ForwardHG()), T1_FORWARD, rtol=2e-6)  # float32 run


def online_ridge(hypers=slice(1, None), outer_optimizer=None):
    """The ridge problem with the scalar hyperparameters log ρ and η (H fixed: fewer JVPs)."""
    ridge = Ridge()
    ho = far.HyperOptimizer(far.ForwardHG())
    run = ho.minimize(ridge.outer, outer_optimizer or keras.optimizers.SGD(0.0), ridge.inner,
                      far.GradientDescentOptimizer(ridge.eta), hyper_list=ridge.hypers[hypers])
    return ridge, ho, run


def test_rtho_carries_the_state_and_the_tangents_over():
    """Two online runs of 8 steps (hyperparameters unchanged) are one run of 16 steps: same
    state, and the same hypergradient, which needs Z carried over, not reset."""
    ridge, ho, run = online_ridge()
    run(8, online=True, _skip_hyper_ts=True)
    run(8, online=True, _skip_hyper_ts=True)
    exact = oracles.unrolled_ridge(ridge.data, ridge.H0, RHO, ETA, 16)
    np.testing.assert_allclose(ridge.w.numpy(), exact.w, rtol=1e-10)
    for (got, _), want in zip(ho.hypergradients(), [RHO * exact.rho, exact.eta]):
        assert relative_error(got.numpy(), want) < EXACT


def test_warm_restart_carries_the_state_but_resets_the_tangents():
    ridge, ho, run = online_ridge()
    run(8, online="wr", _skip_hyper_ts=True)
    w8 = ridge.w.numpy()
    run(8, online="wr", _skip_hyper_ts=True)
    exact = oracles.unrolled_ridge(ridge.data, ridge.H0, RHO, ETA, 8, w0=w8)  # Z_8 = 0: w_8 constant
    np.testing.assert_allclose(ridge.w.numpy(), exact.w, rtol=1e-10)
    for (got, _), want in zip(ho.hypergradients(), [RHO * exact.rho, exact.eta]):
        assert relative_error(got.numpy(), want) < EXACT
    run(8, _skip_hyper_ts=True)  # offline again: from Φ₀
    np.testing.assert_allclose(ridge.w.numpy(), oracles.unrolled_ridge(ridge.data, ridge.H0, RHO, ETA, 8).w,
                               rtol=1e-10)


def test_rtho_updates_hyperparameters_between_chunks():
    """Real-time HO: the learning rate changes every chunk while w keeps training, and the inner
    steps are counted across the chunks (suppliers and callbacks see 0 … 14)."""
    ridge, ho, run = online_ridge(hypers=slice(2, 3), outer_optimizer=keras.optimizers.SGD(1e-3))
    etas, steps = [], []
    for _ in range(3):
        run(5, online=True, callback=lambda t, values: steps.append(t))
        etas.append(float(ridge.eta))
    assert len(set(etas)) == 3 and etas[0] != ETA  # only η moves, by plain SGD
    assert steps == list(range(15))
