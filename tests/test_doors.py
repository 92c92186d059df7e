"""One engine behind every door: the same float64 problem, the same hyper-iterations through
``HyperOptimizer.run``, through the Keras ``far.BilevelModel.fit``, and through ``fit`` under a
MirroredStrategy of 2 logical CPU devices (``tests/doors_mirrored.py``, a meta-batch split across
them) give the same hyperparameters and inner variables (≤ 1e-12), for every method, the penalty
method's stage schedule and BOME's joint step included."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far

T, ITERATIONS = 6, 6


def ridge_problem(seed: int = 3):
    """Ridge regression with one log weight per feature (float64): data, w, λ, L and E."""
    rng = np.random.default_rng(seed)
    X, Xv = rng.normal(size=(12, 4)), rng.normal(size=(10, 4))
    y, yv = X @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.1 * rng.normal(size=12), Xv @ np.array([1.0, -2.0, 0.5, 0.0])
    w = tf.Variable(np.zeros(4), name="w")
    lam = far.get_hyperparameter("log_decay", np.full(4, -1.0))

    def inner(batch):
        x, t = batch
        return 0.5 * tf.reduce_mean((tf.linalg.matvec(x, w) - t) ** 2) + 0.5 * tf.reduce_sum(tf.exp(lam) * w ** 2)

    def outer(batch):
        x, t = batch
        return 0.5 * tf.reduce_mean((tf.linalg.matvec(x, w) - t) ** 2)

    return (X, y), (Xv, yv), w, lam, inner, outer


METHODS = {
    "reverse": lambda: (far.ReverseHG(), far.GradientDescentOptimizer(0.3)),
    "truncated": lambda: (far.ReverseHG.truncated(3), far.GradientDescentOptimizer(0.3)),
    "forward": lambda: (far.ForwardHG(), far.GradientDescentOptimizer(0.3)),
    "implicit": lambda: (far.ImplicitHG("cg"), far.GradientDescentOptimizer(0.3)),
    "bome": lambda: (far.BOME(eta=0.5, inner_learning_rate=0.2), far.GradientDescentOptimizer(0.3)),
    "penalty": lambda: (far.Penalty(gamma=1.0, epsilon=1.0), far.GradientDescentOptimizer(0.05)),
    "stochastic": lambda: (far.StochasticHG("reversed", burn_in=2), far.SGLDOptimizer(0.05, temperature=1e-3, seed=3)),
}


OTHER_INNER_OPTIMIZERS = {  # other inner dynamics Φ through both doors
    "reverse+momentum": lambda: (far.ReverseHG(), far.MomentumOptimizer(0.1, 0.9)),
    "reverse+adam": lambda: (far.ReverseHG(), far.AdamOptimizer(0.05)),
    "reverse+backtracking": lambda: (far.ReverseHG(), far.BackTrackingGradientDescentOptimizer(1.0)),
    "forward+momentum": lambda: (far.ForwardHG(), far.MomentumOptimizer(0.1, 0.9)),
    "bome+adam": lambda: (far.BOME(eta=0.5, inner_learning_rate=0.2), far.AdamOptimizer(0.05)),
}


def through_hyper_optimizer(name: str) -> tuple[np.ndarray, np.ndarray, far.HyperGradient]:
    train, valid, w, lam, inner, outer = ridge_problem()
    method, optimizer = {**METHODS, **OTHER_INNER_OPTIMIZERS}[name]()
    run = far.HyperOptimizer(method).minimize(outer, keras.optimizers.Adam(0.1), inner, optimizer,
                                             hyper_list=[lam], var_list=[w])
    for _ in range(ITERATIONS):
        run(T, inner_objective_feed_dicts=train, outer_objective_feed_dicts=valid)
    return lam.numpy(), w.numpy(), method


def through_keras_fit(name: str) -> tuple[np.ndarray, np.ndarray, far.HyperGradient]:
    train, valid, w, lam, inner, outer = ridge_problem()
    method, optimizer = {**METHODS, **OTHER_INNER_OPTIMIZERS}[name]()
    model = far.BilevelModel(inner, outer, optimizer, steps=T, hypergradient=method, inner_variables=[w],
                             hyperparameters=[lam])
    model.compile(optimizer=keras.optimizers.Adam(0.1))
    data = tf.data.Dataset.from_tensors((train, valid)).repeat()
    model.fit(data, steps_per_epoch=ITERATIONS, epochs=1, verbose=0)
    return lam.numpy(), w.numpy(), method


@pytest.mark.parametrize("name", sorted(METHODS) + sorted(OTHER_INNER_OPTIMIZERS))
def test_every_method_gives_the_same_hyperparameters_through_hyper_optimizer_and_keras_fit(name):
    lam, w, method = through_hyper_optimizer(name)
    far.clear_hyperparameters()
    lam_fit, w_fit, method_fit = through_keras_fit(name)
    assert not np.allclose(lam, -1.0)  # the hyperparameters moved
    np.testing.assert_allclose(lam_fit, lam, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(w_fit, w, rtol=1e-12, atol=1e-14)
    if name == "penalty":  # the stage schedule ran in both doors, to the same state
        assert int(method.stage) > 0 and int(method_fit.stage) == int(method.stage)
        assert float(method_fit.gamma) == float(method.gamma)


@pytest.fixture(scope="module")
def three_doors() -> dict:
    """Every method on a meta-batch of 4 ridge problems through the three doors, in one process
    with 2 logical CPU devices: per method, the largest relative differences from the
    ``HyperOptimizer`` door."""
    script = pathlib.Path(__file__).with_name("doors_mirrored.py")
    done = subprocess.run([sys.executable, str(script), ",".join(sorted(METHODS))], capture_output=True, text=True,
                          timeout=900, cwd=script.parents[1], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_the_same_hyperparameters_under_a_mirrored_strategy(three_doors, name):
    """fit on one device and fit with the meta-batch split across two replicas (each holding its
    problems' inner variables) agree with HyperOptimizer.run on the whole meta-batch."""
    result = three_doors[name]
    assert result["moved"] > 0.1  # the hyperparameters moved
    for door in ("fit", "mirrored"):
        assert result[door]["lam"] <= 1e-12 and result[door]["w"] <= 1e-12, (door, result)
    if name == "penalty":  # the stages advanced, equally in every door
        assert all(stages[0] > 0 and stages[0] == stages[1]
                   for stages in (result["fit"]["stage"], result["mirrored"]["stage"]))


def test_a_failed_hyper_iteration_under_a_mirrored_strategy_changes_nothing(three_doors):
    result = three_doors["failure"]
    assert "ReverseHG, hyper-iteration 0: the run" in result["error"]
    assert result["lam"] == [-1.0] * 3 and result["iterations"] == 0 and result["w"] == 0.0


def test_keras_fit_stops_on_a_failed_hyper_iteration_and_changes_nothing():
    """An inner learning rate far beyond the stable range: the guard's error stops ``fit`` and
    every variable keeps its value."""
    train, valid, w, lam, inner, outer = ridge_problem()
    model = far.BilevelModel(inner, outer, far.GradientDescentOptimizer(1e3), steps=40, inner_variables=[w],
                             hyperparameters=[lam])
    model.compile(optimizer=keras.optimizers.Adam(0.1))
    before = (lam.numpy().copy(), w.numpy().copy())
    with pytest.raises(far.DivergenceError, match=r"ReverseHG, hyper-iteration 0: the run .* keeps its value"):
        model.fit(tf.data.Dataset.from_tensors((train, valid)).repeat(), steps_per_epoch=3, verbose=0)
    np.testing.assert_array_equal(lam.numpy(), before[0])
    np.testing.assert_array_equal(w.numpy(), before[1])
    assert int(model.optimizer.iterations.numpy()) == 0


def keras_problem():
    """A Keras classifier (the inner variables) with a log weight decay as a Keras variable (λ),
    seeded: the same weights at every call."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    X, Xv = rng.normal(size=(64, 5)).astype("float32"), rng.normal(size=(64, 5)).astype("float32")
    direction = rng.normal(size=5)
    y, yv = (X @ direction > 0).astype("int32"), (Xv @ direction > 0).astype("int32")
    net = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
    log_decay = keras.Variable(-3.0, name="log_decay")

    def cross_entropy(batch):
        return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(batch[1], net(batch[0]), from_logits=True))

    def inner(batch):
        return cross_entropy(batch) + tf.exp(log_decay.value) * tf.add_n([tf.reduce_sum(v ** 2) for v in net.trainable_weights])

    model = far.BilevelModel(inner, cross_entropy, far.GradientDescentOptimizer(0.5), steps=10, inner_variables=net,
                             hyperparameters=[log_decay])
    model.compile(optimizer=keras.optimizers.Adam(0.1))
    return model, log_decay, tf.data.Dataset.from_tensors(((X, y), (Xv, yv))).repeat()


class _Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt


def test_keras_fit_resumes_exactly_with_backup_and_restore(tmp_path):
    """Interrupted after one of two epochs, a new model (a new process would build the same one)
    resumes from the backup: λ, w and Φ₀ (the model's ``initial_weights``) as in one run."""
    model, log_decay, data = keras_problem()
    model.fit(data, steps_per_epoch=3, epochs=2, verbose=0)
    expected = float(log_decay.numpy()), [v.numpy() for v in model.inner_layer.weights]
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model, log_decay, data = keras_problem()
    with pytest.raises(KeyboardInterrupt):
        model.fit(data, steps_per_epoch=3, epochs=2, verbose=0, callbacks=[backup, _Crash()])
    model, log_decay, data = keras_problem()
    for w in model.initial_weights:  # a different Φ₀ before resuming: the backup restores it
        w.assign(w + 1.0)
    model.fit(data, steps_per_epoch=3, epochs=2, verbose=0,
              callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert float(log_decay.numpy()) == pytest.approx(expected[0], abs=1e-6) and expected[0] != -3.0
    for got, want in zip(model.inner_layer.weights, expected[1]):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_keras_weights_save_and_load_into_the_model_built_again_and_a_keras_file_is_refused(tmp_path):
    """``save_weights`` / ``load_weights`` round-trip λ, w, Φ₀ and Adam's slots into the model built
    again in code; loading before ``resolve`` and saving as ``.keras`` (callables) are clear errors."""
    model, log_decay, data = keras_problem()
    model.fit(data, steps_per_epoch=3, verbose=0)
    model.save_weights(tmp_path / "model.weights.h5")
    with pytest.raises(NotImplementedError, match=r"cannot be saved as a \.keras file.*save_weights"):
        model.save(tmp_path / "model.keras")
    again, decay_again, data = keras_problem()
    with pytest.raises(ValueError, match=r"call `compile\(optimizer=\.\.\.\)` and `resolve\(dataset\)` first"):
        again.load_weights(tmp_path / "model.weights.h5")
    again.resolve(data)
    again.load_weights(tmp_path / "model.weights.h5")
    assert float(decay_again.numpy()) == float(log_decay.numpy()) != -3.0
    for got, want in zip(again.weights + again.optimizer.variables, model.weights + model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    model.fit(data, steps_per_epoch=2, verbose=0)  # and both continue alike
    again.fit(data, steps_per_epoch=2, verbose=0)
    assert float(decay_again.numpy()) == pytest.approx(float(log_decay.numpy()), abs=1e-6)


def test_keras_evaluate_is_the_outer_loss_after_t_inner_steps_in_float64():
    """``evaluate`` on a float64 problem (Keras would cast a batch given to ``model(...)`` to
    float32): E at w_T, T gradient steps from Φ₀ = 0 at the current λ, against NumPy."""
    (X, y), (Xv, yv), w, lam, inner, outer = ridge_problem()
    model = far.BilevelModel(inner, outer, far.GradientDescentOptimizer(0.3), steps=T, inner_variables=[w],
                             hyperparameters=[lam])
    model.compile(optimizer=keras.optimizers.Adam(0.1))
    data = tf.data.Dataset.from_tensors(((X, y), (Xv, yv))).repeat()
    history = model.fit(data, steps_per_epoch=2, verbose=0)
    assert set(history.history) == {"loss"}  # E only: the engine's status stays out of the user's logs
    got = model.evaluate(data, steps=1, verbose=0, return_dict=True)["loss"]
    w_t, decay = np.zeros(4), np.exp(lam.numpy())
    for _ in range(T):
        w_t = w_t - 0.3 * (X.T @ (X @ w_t - y) / len(y) + decay * w_t)
    assert got == pytest.approx(0.5 * np.mean((Xv @ w_t - yv) ** 2), rel=1e-12)
    np.testing.assert_allclose(w.numpy(), w_t, rtol=1e-12)  # the inner variables keep w_T
