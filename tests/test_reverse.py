"""ReverseHG (full, truncated, checkpointed) against exact oracles: the closed form of unrolled
gradient descent on ridge regression, float64 finite differences, and FAR-HO's published numbers."""

from collections import deque

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
import oracles
from oracles import relative_error
from oracles import EXACT, ETA, FD, RHO, T, T1_REVERSE, Ridge, legacy_t1


@pytest.mark.parametrize("method", [far.ReverseHG(unroll=T), far.ReverseHG(unroll=0), far.ReverseHG.truncated(T),
                                    far.ReverseHG(history=deque(maxlen=T + 1)),
                                    far.ReverseHG(checkpoint_every=3),
                                    far.ReverseHG(unroll=0, jit_compile=True),
                                    far.ReverseHG(unroll=T, jit_compile=True)],
                         ids=["unrolled_tapes", "stored_states", "truncated_K=T", "legacy_deque_K=T",
                              "checkpointed_k=3", "xla_stored_states", "xla_unrolled_tapes"])
def test_unrolled_ridge_hypergradient_equals_closed_form(method):
    ridge = Ridge()
    _, grads = ridge.hypergradients(method)
    for got, want in zip(grads, ridge.expected()):
        assert relative_error(got, want) < EXACT


@pytest.mark.parametrize("unroll", [T, 0], ids=["unrolled_tapes", "stored_states"])
@pytest.mark.parametrize("supplier", ["constant", "per_step"])
def test_features_evaluated_once_give_the_same_hypergradient(supplier, unroll):
    ridge = Ridge(features=True)
    batch = tuple(tf.constant(a) for a in ridge.data[:2])
    feed = batch if supplier == "constant" else (lambda t: batch)
    _, grads = ridge.hypergradients(far.ReverseHG(unroll=unroll), inner_objective_feed_dicts=feed)
    for got, want in zip(grads, ridge.expected()):
        assert relative_error(got, want) < EXACT


@pytest.mark.parametrize("options", [{"unroll": T}, {"unroll": 0}, {"checkpoint_every": 3},
                                     {"checkpoint_every": 3, "jit_compile": True}],
                         ids=["unrolled_tapes", "stored_states", "checkpointed_k=3", "xla_checkpointed_k=3"])
def test_truncated_reverse_treats_the_state_at_T_minus_K_as_constant(options):
    ridge, K = Ridge(), 7
    _, grads = ridge.hypergradients(far.ReverseHG(truncate=K, **options))
    w_start = oracles.unrolled_ridge(ridge.data, ridge.H0, RHO, ETA, T - K).w
    exact = oracles.unrolled_ridge(ridge.data, ridge.H0, RHO, ETA, K, w0=w_start)
    expected = [exact.H, RHO * exact.rho, exact.eta]  # E's direct term on H included; w_{T-K}: constant
    for got, want in zip(grads, expected):
        assert relative_error(got, want) < EXACT
    _, full = ridge.hypergradients(far.ReverseHG())
    assert relative_error(grads[0], full[0]) > 1e-3  # truncation really drops a part


def test_learned_initialisation_hypergradient_is_exact():
    ridge = Ridge()
    w0_value = np.random.default_rng(3).normal(size=(5, 2))
    w0 = far.get_hyperparameter("w0", w0_value)
    ho = far.HyperOptimizer()
    run = ho.minimize(ridge.outer, keras.optimizers.SGD(0.0), ridge.inner,
                      far.GradientDescentOptimizer(ridge.eta), hyper_list=ridge.hypers + [w0],
                      init_dynamics_dict=[(ridge.w, w0)])
    run(T, _skip_hyper_ts=True)
    exact = oracles.unrolled_ridge(ridge.data, ridge.H0, RHO, ETA, T, w0=w0_value)
    grads = [g.numpy() for g, _ in ho.hypergradients()]
    for got, want in zip(grads, [exact.H, RHO * exact.rho, exact.eta, exact.w0]):
        assert relative_error(got, want) < EXACT
    np.testing.assert_allclose(ridge.w.numpy(), exact.w, rtol=1e-10)  # the variables hold w_T


def quadratic_setup(seed=0, n=8, d=3):
    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(n, d)), rng.normal(size=n)
    Xv, yv = rng.normal(size=(n, d)), rng.normal(size=n)
    X[:, -1] = 0.0  # the last weight gets a zero gradient: Adam's v stays 0 there
    return X, y, Xv, yv


@pytest.mark.parametrize("optimizer", ["momentum", "nesterov", "adam"])
def test_optimizer_hyperparameters_match_finite_differences(optimizer):
    X, y, Xv, yv = quadratic_setup()
    steps, w_init = 15, np.array([0.5, -0.3, 0.0])
    w = tf.Variable(w_init)
    log_lr = far.get_hyperparameter("log_lr", np.log(0.05))
    if optimizer == "adam":
        b1 = far.get_hyperparameter("b1", np.float64(0.8))
        b2 = far.get_hyperparameter("b2", np.float64(0.9))
        hypers = [log_lr, b1, b2]
        inner_opt = far.AdamOptimizer(lambda: tf.exp(log_lr), b1, b2, epsilon=1e-3)
        x0 = np.array([np.log(0.05), 0.8, 0.9])
        kwargs = lambda x: dict(optimizer="adam", lr=np.exp(x[0]), beta1=x[1], beta2=x[2], epsilon=1e-3)
    else:
        mu = far.get_hyperparameter("mu", np.float64(0.7))
        hypers = [log_lr, mu]
        inner_opt = far.MomentumOptimizer(lambda: tf.exp(log_lr), mu, use_nesterov=optimizer == "nesterov")
        x0 = np.array([np.log(0.05), 0.7])
        kwargs = lambda x: dict(optimizer="momentum", lr=np.exp(x[0]), momentum=x[1],
                                nesterov=optimizer == "nesterov")
    inner = lambda: 0.5 * tf.reduce_sum((X @ w[:, None] - y[:, None]) ** 2) + 0.05 * tf.reduce_sum(w ** 2)
    outer = lambda: 0.5 * tf.reduce_sum((Xv @ w[:, None] - yv[:, None]) ** 2)
    ho = far.HyperOptimizer()
    ho.minimize(outer, keras.optimizers.SGD(0.0), inner, inner_opt, hyper_list=hypers)(steps, _skip_hyper_ts=True)
    grads = np.array([float(g) for g, _ in ho.hypergradients()])

    def E(x):
        wT = oracles.numpy_unroll(lambda w_, t: X.T @ (X @ w_ - y) + 0.1 * w_, w_init, steps, **kwargs(x))
        return 0.5 * np.sum((Xv @ wT - yv) ** 2)
    expected = oracles.central_difference(E, x0)
    np.testing.assert_allclose(grads, expected, rtol=FD)
    assert np.all(np.isfinite(grads))


def test_learned_initialisation_with_momentum_matches_finite_differences():
    """Φ₀ and optimizer hyperparameters together (the shape of FAR-HO's phi_0 notebook)."""
    X, y, Xv, yv = quadratic_setup(seed=1, d=2)
    X[:, -1] = np.random.default_rng(5).normal(size=X.shape[0])
    w = tf.Variable(np.zeros(2))
    w0 = far.get_hyperparameter("w0", np.array([0.3, -0.2]))
    eta, mu = far.get_hyperparameter("eta", np.float64(0.05)), far.get_hyperparameter("mu", np.float64(0.6))
    inner = lambda: 0.5 * tf.reduce_sum((X @ w[:, None] - y[:, None]) ** 2)
    outer = lambda: 0.5 * tf.reduce_sum((Xv @ w[:, None] - yv[:, None]) ** 2) + 0.1 * tf.reduce_sum(w0 ** 2)
    ho = far.HyperOptimizer()
    ho.minimize(outer, keras.optimizers.SGD(0.0), inner, far.MomentumOptimizer(eta, mu),
                hyper_list=[w0, eta, mu], init_dynamics_dict={w.ref(): w0})(5, _skip_hyper_ts=True)
    grads = np.concatenate([np.ravel(g.numpy()) for g, _ in ho.hypergradients()])

    def E(x):
        wT = oracles.numpy_unroll(lambda w_, t: X.T @ (X @ w_ - y), x[:2], 5, "momentum", x[2], x[3])
        return 0.5 * np.sum((Xv @ wT - yv) ** 2) + 0.1 * np.sum(x[:2] ** 2)  # direct dependence
    np.testing.assert_allclose(grads, oracles.central_difference(E, np.array([0.3, -0.2, 0.05, 0.6])), rtol=FD)


def test_step_dependent_minibatches_are_replayed_exactly():
    """A supplier giving a different mini-batch at every step: the reverse pass must replay the
    batch of step t for the transition out of s_t (FAR-HO used the batch of step t−1)."""
    X, y, Xv, yv = quadratic_setup(seed=2, n=12)
    X[:, -1] = 1.0
    steps, size = 9, 4
    schedule = [np.random.default_rng(t).choice(12, size, replace=False) for t in range(steps)]
    calls = []

    def supplier(t):
        calls.append(t)
        return X[schedule[t]], y[schedule[t]]

    w = tf.Variable(np.zeros(3))
    log_lr = far.get_hyperparameter("log_lr", np.log(0.1))
    inner = lambda b: 0.5 * tf.reduce_mean((b[0] @ w[:, None] - b[1][:, None]) ** 2)
    outer = lambda: 0.5 * tf.reduce_sum((Xv @ w[:, None] - yv[:, None]) ** 2)
    ho = far.HyperOptimizer()
    ho.minimize(outer, keras.optimizers.SGD(0.0), inner, far.GradientDescentOptimizer(lambda: tf.exp(log_lr)),
                hyper_list=[log_lr])(steps, inner_objective_feed_dicts=supplier, _skip_hyper_ts=True)
    assert calls == list(range(steps))

    def E(x):
        grad = lambda w_, t: X[schedule[t]].T @ (X[schedule[t]] @ w_ - y[schedule[t]]) / size
        wT = oracles.numpy_unroll(grad, np.zeros(3), steps, "gd", np.exp(x[0]))
        return 0.5 * np.sum((Xv @ wT - yv) ** 2)
    expected = oracles.central_difference(E, np.array([np.log(0.1)]))
    np.testing.assert_allclose(float(ho.hypergradients()[0][0]), expected[0], rtol=FD)


def test_legacy_farho_check_forward_notebook_reverse_part():
    np.testing.assert_allclose(legacy_t1(far.ReverseHG()), T1_REVERSE, rtol=2e-6)  # float32 run


def test_online_reverse_continues_the_state_and_the_step_count():
    ridge = Ridge(with_batches=True)
    batch = tuple(tf.constant(a) for a in ridge.data[:2])
    seen = []

    def supplier(t):
        seen.append(t)
        return batch

    ho = far.HyperOptimizer(far.ReverseHG())
    run = ho.minimize(ridge.outer, keras.optimizers.SGD(0.0), ridge.inner,
                      far.GradientDescentOptimizer(ridge.eta), hyper_list=ridge.hypers)
    run(8, inner_objective_feed_dicts=supplier, online=True, _skip_hyper_ts=True)
    first_w = ridge.w.numpy()
    run(8, inner_objective_feed_dicts=supplier, online=True, _skip_hyper_ts=True)
    assert seen == list(range(16))
    exact = oracles.unrolled_ridge(ridge.data, ridge.H0, RHO, ETA, 8, w0=first_w)  # s_8 is constant
    np.testing.assert_allclose(ridge.w.numpy(), oracles.unrolled_ridge(ridge.data, ridge.H0, RHO, ETA, 16).w,
                               rtol=1e-10)
    for (got, _), want in zip(ho.hypergradients(), [exact.H, RHO * exact.rho, exact.eta]):
        assert relative_error(got.numpy(), want) < EXACT
    run(8, inner_objective_feed_dicts=supplier, _skip_hyper_ts=True)  # not online: restart at Φ₀
    assert seen[16:] == list(range(8))
    np.testing.assert_allclose(ridge.w.numpy(), oracles.unrolled_ridge(ridge.data, ridge.H0, RHO, ETA, 8).w,
                               rtol=1e-10)


def test_eager_execution_gives_the_same_hypergradient():
    ridge = Ridge()
    tf.config.run_functions_eagerly(True)
    try:
        _, grads = ridge.hypergradients(far.ReverseHG(), steps=5)
    finally:
        tf.config.run_functions_eagerly(False)
    for got, want in zip(grads, ridge.expected(steps=5)):
        assert relative_error(got, want) < EXACT
