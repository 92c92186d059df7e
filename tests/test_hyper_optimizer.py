"""HyperOptimizer as a FAR-HO user drives it: meta-batches of inner problems (separate and
batched), outer optimizers and constraints, suppliers, Keras models, the hyperparameter API."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
import oracles
from oracles import relative_error

T, ETA = 15, 0.02


def episode(data, log_rho, name):
    """One ridge problem on ``data`` with the shared hyperparameter log ρ."""
    X, Y, Xv, Yv = (tf.constant(a) for a in data)
    w = tf.Variable(np.zeros((X.shape[1], Y.shape[1])), name=name)
    inner = lambda: 0.5 * tf.reduce_sum((X @ w - Y) ** 2) + 0.5 * tf.exp(log_rho) * tf.reduce_sum(w ** 2)
    outer = lambda: 0.5 * tf.reduce_sum((Xv @ w - Yv) ** 2)
    return w, inner, outer


def exact(data, rho):
    return rho * oracles.unrolled_ridge(data, np.eye(data.X.shape[1]), rho, ETA, T).rho


DATA = [oracles.ridge_data(seed=s) for s in range(3)]


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_meta_batch_of_inner_problems_aggregates_hypergradients(aggregation):
    log_rho = far.get_hyperparameter("log_rho", np.log(0.5))
    ho = far.HyperOptimizer()
    outer_opt = keras.optimizers.SGD(0.125)  # exact in float32, as Keras stores it
    for k, data in enumerate(DATA):
        w, inner, outer = episode(data, log_rho, f"w{k}")
        problem = ho.inner_problem(inner, far.GradientDescentOptimizer(ETA), var_list=[w])
        ho.outer_problem(outer, problem, outer_opt, hyper_list=[log_rho])
    run = ho.finalize(aggregation_fn=None if aggregation == "mean" else (lambda gs: tf.add_n(gs)))
    run(T, _skip_hyper_ts=True)
    per_episode = [exact(d, 0.5) for d in DATA]
    expected = np.mean(per_episode) if aggregation == "mean" else np.sum(per_episode)
    got = float(ho.hypergradients()[0][0])
    assert relative_error(got, expected) < 1e-10
    run(T, _only_hyper_ts=True)  # the SGD step uses that hypergradient
    assert float(log_rho) == pytest.approx(np.log(0.5) - 0.125 * got, rel=1e-12)
    assert ho.global_step == 1


def test_batched_meta_batch_equals_the_mean_of_separate_problems():
    """One inner problem holding every episode's weights on a leading axis: the inner objective
    is the sum of the episodes' losses (a vector is summed), the outer one their mean."""
    log_rho = far.get_hyperparameter("log_rho", np.log(0.5))
    X, Y, Xv, Yv = (tf.constant(np.stack(a)) for a in zip(*DATA))
    w = tf.Variable(np.zeros((len(DATA), 5, 2)))
    per_episode = lambda X_, Y_: 0.5 * tf.reduce_sum((X_ @ w - Y_) ** 2, axis=[1, 2])
    inner = lambda: per_episode(X, Y) + 0.5 * tf.exp(log_rho) * tf.reduce_sum(w ** 2, axis=[1, 2])
    outer = lambda: tf.reduce_mean(per_episode(Xv, Yv))
    ho = far.HyperOptimizer()
    ho.minimize(outer, keras.optimizers.SGD(0.1), inner, far.GradientDescentOptimizer(ETA),
                hyper_list=[log_rho])(T, _skip_hyper_ts=True)
    expected = np.mean([exact(d, 0.5) for d in DATA])
    assert relative_error(float(ho.hypergradients()[0][0]), expected) < 1e-10


def test_outer_update_projects_onto_the_constraint_and_uses_suppliers():
    lr = far.get_hyperparameter("lr", np.float64(0.01), constraint=lambda v: tf.clip_by_value(v, 1e-5, 0.012))
    weights = far.get_hyperparameter("weights", np.zeros(12))
    data = DATA[0]
    X, Y, Xv, Yv = (tf.constant(a) for a in data)
    w = tf.Variable(np.zeros((5, 2)))
    inner = lambda b: 0.5 * tf.reduce_sum(tf.sigmoid(weights)[:, None] * (b[0] @ w - b[1]) ** 2)
    outer = lambda b: 0.5 * tf.reduce_sum((b[0] @ w - b[1]) ** 2)
    outer_steps, losses = [], []
    ho = far.HyperOptimizer()
    run = ho.minimize(outer, far.GradientDescentOptimizer(10.0), inner, far.GradientDescentOptimizer(lr))

    def outer_supplier(step):
        outer_steps.append(step)
        return Xv, Yv
    values = [float(run(10, (X, Y), outer_supplier, callback=lambda t, v: losses.append((t, v[0]))))
              for _ in range(3)]
    assert outer_steps == [0, 1, 2] and ho.global_step == 3
    assert [t for t, _ in losses] == list(range(10)) * 3
    assert float(lr) == pytest.approx(0.012)  # a large outer step, projected back
    assert values[-1] < values[0]  # the validation loss goes down
    assert {id(v) for v in far.hyperparameters()} >= {id(lr), id(weights)}


def test_keras_model_inner_problem_and_default_var_list():
    """A Keras model read by the objective: its trainable weights are the default var_list; the
    hypergradient equals the one of the same model written by hand on the same variables."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 1))
    xv, yv = rng.normal(size=(16, 4)), rng.normal(size=(16, 1))
    model = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(3, activation="tanh", dtype="float64"),
                              keras.layers.Dense(1, dtype="float64")])
    log_decay = far.get_hyperparameter("log_decay", np.log(0.1))
    decay = lambda: tf.exp(log_decay) * tf.add_n([tf.reduce_sum(v ** 2) for v in model.trainable_variables])

    def by_hand(inputs):
        k1, b1, k2, b2 = model.trainable_variables
        return tf.tanh(inputs @ k1 + b1) @ k2 + b2
    results, initial = [], [v.numpy() for v in model.trainable_variables]
    for forward in (lambda inputs: model(inputs), by_hand):
        for v, value in zip(model.trainable_variables, initial):  # a run leaves w_T in the model
            v.assign(value)
        inner = lambda b: tf.reduce_mean((forward(b[0]) - b[1]) ** 2) + decay()
        outer = lambda b: tf.reduce_mean((forward(b[0]) - b[1]) ** 2)
        ho = far.HyperOptimizer()
        run = ho.minimize(outer, keras.optimizers.Adam(0.01), inner, far.GradientDescentOptimizer(0.1),
                          hyper_list=[log_decay])
        run(12, (x, y), (xv, yv), _skip_hyper_ts=True)
        problem = ho.hypergradient.inner_problems[0]
        assert [v.name for v in problem.var_list] == [v.value.name for v in model.trainable_variables]
        results.append(float(ho.hypergradients()[0][0]))
    assert results[0] == pytest.approx(results[1], rel=1e-12) and results[0] != 0.0


def test_get_hyperparameter_initializers_and_scalar_components():
    assert far.get_hyperparameter("a", 0.5).dtype == tf.float32
    assert far.get_hyperparameter("b", np.array([1.0, 2.0])).dtype == tf.float64
    assert far.get_hyperparameter("c", 1, shape=(2, 3)).numpy().tolist() == [[1.0] * 3] * 2
    assert far.get_hyperparameter("d", keras.initializers.Ones, shape=(2,)).numpy().tolist() == [1.0, 1.0]
    assert far.get_hyperparameter("e", shape=(3, 3)).trainable is False
    comps = far.get_hyperparameter("f", np.array([[1.0, 2.0], [3.0, 4.0]]), scalar=True)
    assert len(comps.components) == 4 and comps.components[3].name.startswith("f_components/1_1")
    np.testing.assert_array_equal((comps * 2).numpy(), [[2.0, 4.0], [6.0, 8.0]])
    comps.components[0].assign(10.0)
    assert float(tf.reduce_sum(comps)) == 19.0  # reads the current values
    with pytest.raises(ValueError, match="shape"):
        far.get_hyperparameter("g", np.zeros(3), shape=(4,))
    with pytest.raises(ValueError, match="shape"):
        far.get_hyperparameter("h", keras.initializers.Ones)


def test_inner_problem_run_solves_the_inner_problem_alone():
    data = DATA[0]
    log_rho = far.get_hyperparameter("log_rho", np.log(0.5))
    w, inner, outer = episode(data, log_rho, "w")
    problem = far.GradientDescentOptimizer(ETA).minimize(inner, var_list=[w])
    w.assign(np.ones((5, 2)))  # Φ₀ was captured when the problem was made: zeros
    losses = problem.run(T).numpy()
    np.testing.assert_allclose(w.numpy(), oracles.unrolled_ridge(data, np.eye(5), 0.5, ETA, T).w, rtol=1e-10)
    assert losses.shape == (T,) and np.all(np.diff(losses) < 0)
