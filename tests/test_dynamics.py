"""The differentiable dynamics Φ follow the trajectories of ``keras.optimizers`` step by step,
and the far optimizers work as outer optimizers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
from far_ho2 import dynamics

# Values exact in float32 (Keras keeps its hyperparameters in float32), so float64 runs agree
# to round-off.
LR, MU, B1, B2 = 0.0625, 0.875, 0.875, 0.9375
A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
b = np.array([1.0, -2.0, 0.5])


def grad(w):
    return tf.linalg.matvec(tf.constant(A), w) - tf.constant(b)


CASES = {
    "sgd": (lambda: far.GradientDescentOptimizer(LR), lambda: keras.optimizers.SGD(LR)),
    "momentum": (lambda: far.MomentumOptimizer(LR, MU), lambda: keras.optimizers.SGD(LR, momentum=MU)),
    "nesterov": (lambda: far.MomentumOptimizer(LR, MU, use_nesterov=True),
                 lambda: keras.optimizers.SGD(LR, momentum=MU, nesterov=True)),
    "adam_eps0": (lambda: far.AdamOptimizer(LR, B1, B2, epsilon=0.0),
                  lambda: keras.optimizers.Adam(LR, B1, B2, epsilon=0.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_keras_step_by_step(case):
    far_opt, keras_opt = (make() for make in CASES[case])
    w0 = np.array([1.0, -1.0, 2.0])
    kv = tf.Variable(w0)
    state = far_opt.dynamics.init([tf.constant(w0)])
    for t in range(25):
        keras_opt.apply_gradients([(grad(kv), kv)])
        state = far_opt.dynamics.step(state, [grad(state.w[0])], far_opt.params(t, tf.float64))
        np.testing.assert_allclose(state.w[0].numpy(), kv.numpy(), rtol=1e-12, atol=1e-14)  # round-off


def test_adam_epsilon_inside_the_root_differs_from_keras_only_by_the_convention():
    """ε inside the root (FAR-HO) vs outside (Keras): the trajectories agree to O(ε²/v)."""
    eps = 1e-4
    far_opt, keras_opt = far.AdamOptimizer(LR, B1, B2, epsilon=eps), keras.optimizers.Adam(LR, B1, B2, epsilon=0.0)
    kv = tf.Variable(np.array([1.0, -1.0, 2.0]))
    state = far_opt.dynamics.init([kv.read_value()])
    for t in range(10):
        keras_opt.apply_gradients([(grad(kv), kv)])
        state = far_opt.dynamics.step(state, [grad(state.w[0])], far_opt.params(t, tf.float64))
    np.testing.assert_allclose(state.w[0].numpy(), kv.numpy(), rtol=1e-6)  # |g| ≫ ε here
    assert not np.allclose(state.w[0].numpy(), kv.numpy(), rtol=1e-12)  # but it is a different map


def test_adam_at_zero_second_moment_is_finite_with_finite_derivatives():
    adam = dynamics.adam()
    w = tf.constant([1.0, 2.0], tf.float64)
    params = dynamics.AdamParams(*(tf.constant(x, tf.float64) for x in (0.1, 0.9, 0.999, 1e-5)))
    g = tf.constant([0.0, 0.5], tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(g)
        new = adam.step(adam.init([w]), [g], params)
        out = tf.reduce_sum(new.w[0])
    dg = tape.gradient(out, g).numpy()
    assert np.all(np.isfinite(new.w[0].numpy())) and np.all(np.isfinite(dg))


@pytest.mark.parametrize("case", ["sgd", "momentum", "adam_eps0"])
def test_far_optimizer_as_outer_optimizer_matches_keras(case):
    far_opt, keras_opt = (make() for make in CASES[case])
    hf = far.get_hyperparameter("h", np.array([1.0, -1.0, 2.0]))
    hk = tf.Variable(hf.read_value(), trainable=False)
    for _ in range(5):
        far_opt.apply_gradients([(grad(hf), hf)])
        keras_opt.apply_gradients([(grad(hk), hk)])
    np.testing.assert_allclose(hf.numpy(), hk.numpy(), rtol=1e-12)


def test_schedules_and_callables_are_evaluated_at_each_step():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.5)
    beta = far.get_hyperparameter("beta", 0.0)
    opt = far.MomentumOptimizer(schedule, lambda: tf.sigmoid(beta))
    assert float(opt.params(3, tf.float32).learning_rate) == pytest.approx(0.5 * 0.5 ** 3)
    beta.assign(2.0)
    assert float(opt.params(0, tf.float32).momentum) == pytest.approx(1 / (1 + np.exp(-2.0)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(learning_rate=0.1, momentum=1.5), "momentum"),
    (dict(learning_rate="fast", momentum=0.5), "learning_rate"),
])
def test_bad_optimizer_parameters_name_the_argument(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        far.MomentumOptimizer(**kwargs) if "momentum" in kwargs else far.GradientDescentOptimizer(**kwargs)
