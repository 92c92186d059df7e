"""Every method through three doors on one float64 meta-batch of ridge problems: ``HyperOptimizer.run``
on one device, ``far.BilevelModel.fit`` on one device, and ``fit`` under a MirroredStrategy of 2
logical CPU devices (each replica holding half of the meta-batch). Run as a script (the logical
devices must be configured before TensorFlow initialises them): prints one JSON line, per method
the largest differences of λ and w from the ``HyperOptimizer`` door, and the penalty's stages; and a failed hyper-iteration under the strategy."""

import json
import sys

import tensorflow as tf

if __name__ == "__main__":
    tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                               [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import far_ho2 as far  # noqa: E402

B, D, T, ITERATIONS = 4, 3, 6, 6


def meta_batch(seed: int = 5) -> tuple:
    """B ridge problems of their own data, as ((X, y), (X_val, y_val)) with a leading [B] axis."""
    rng = np.random.default_rng(seed)
    X, Xv = rng.normal(size=(B, 10, D)), rng.normal(size=(B, 8, D))
    truth = rng.normal(size=(B, D))
    y = np.einsum("bnd,bd->bn", X, truth) + 0.1 * rng.normal(size=(B, 10))
    return (X, y), (Xv, np.einsum("bnd,bd->bn", Xv, truth))


def objectives(w: tf.Variable, lam: tf.Variable) -> tuple:
    """L = Σ_j L_j (ridge, one log weight per feature shared by the problems), E = mean_j E_j."""
    def inner(batch):
        x, t = batch
        fit = 0.5 * tf.reduce_mean((tf.einsum("bnd,bd->bn", x, w) - t) ** 2, axis=1)
        return tf.reduce_sum(fit + 0.5 * tf.reduce_sum(tf.exp(lam) * w ** 2, axis=1))

    def outer(batch):
        x, t = batch
        return tf.reduce_mean(0.5 * tf.reduce_mean((tf.einsum("bnd,bd->bn", x, w) - t) ** 2, axis=1))
    return inner, outer


METHODS = {
    "reverse": lambda: (far.ReverseHG(), far.GradientDescentOptimizer(0.3)),
    "truncated": lambda: (far.ReverseHG.truncated(3), far.GradientDescentOptimizer(0.3)),
    "forward": lambda: (far.ForwardHG(), far.GradientDescentOptimizer(0.3)),
    "implicit": lambda: (far.ImplicitHG("cg", tolerance=1e-14), far.GradientDescentOptimizer(0.3)),
    "bome": lambda: (far.BOME(eta=0.5, inner_learning_rate=0.2), far.GradientDescentOptimizer(0.3)),
    "penalty": lambda: (far.Penalty(gamma=1.0, epsilon=1.0), far.GradientDescentOptimizer(0.05)),
    "stochastic": lambda: (far.StochasticHG("reversed", burn_in=2), far.SGLDOptimizer(0.05, temperature=1e-3, seed=3)),
}


def hyper_optimizer(name: str) -> tuple:
    far.clear_hyperparameters()
    train, valid = meta_batch()
    w = tf.Variable(np.zeros((B, D)), name="w")
    lam = tf.Variable(np.full(D, -1.0), name="log_decay")
    inner, outer = objectives(w, lam)
    method, optimizer = METHODS[name]()
    run = far.HyperOptimizer(method).minimize(outer, keras.optimizers.Adam(0.1), inner, optimizer,
                                             hyper_list=[lam], var_list=[w])
    for _ in range(ITERATIONS):
        run(T, inner_objective_feed_dicts=train, outer_objective_feed_dicts=valid)
    return lam.numpy(), w.numpy(), method


def keras_fit(name: str, strategy: tf.distribute.Strategy) -> tuple:
    far.clear_hyperparameters()
    train, valid = meta_batch()
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        lam = tf.Variable(np.full(D, -1.0), name="log_decay")
        with far.distribute.local_variables():
            w = tf.Variable(np.zeros((B // replicas, D)), name="w")
        inner, outer = objectives(w, lam)
        method, optimizer = METHODS[name]()
        model = far.BilevelModel(inner, outer, optimizer, steps=T, hypergradient=method, inner_variables=[w],
                                 hyperparameters=[lam], init_dynamics_dict=[(w, lambda: tf.zeros_like(w))])
        model.compile(optimizer=keras.optimizers.Adam(0.1))
    model.fit(tf.data.Dataset.from_tensors((train, valid)).repeat(), steps_per_epoch=ITERATIONS, verbose=0)
    if replicas == 1:
        return lam.numpy(), w.numpy(), method
    return lam.numpy(), np.concatenate([v.numpy() for v in strategy.experimental_local_results(w)]), method


def compare(name: str, mirrored: tf.distribute.Strategy) -> dict:
    lam, w, method = hyper_optimizer(name)
    out = {"moved": float(np.max(np.abs(lam + 1.0)))}
    for door, strategy in (("fit", tf.distribute.get_strategy()),
                           ("mirrored", mirrored)):
        lam_door, w_door, method_door = keras_fit(name, strategy)
        out[door] = {"lam": float(np.max(np.abs(lam_door - lam) / np.maximum(np.abs(lam), 1.0))),
                     "w": float(np.max(np.abs(w_door - w) / np.maximum(np.abs(w), 1.0)))}
        if name == "penalty":
            out[door]["stage"] = [int(method.stage.numpy()), int(method_door.stage.numpy())]
    return out


def failure(mirrored: tf.distribute.Strategy) -> dict:
    """A diverging inner loop under the strategy: fit stops with the guard's error, and λ, every
    replica's w and the optimizer's step are unchanged."""
    far.clear_hyperparameters()
    train, valid = meta_batch()
    with mirrored.scope():
        lam = tf.Variable(np.full(D, -1.0), name="log_decay")
        with far.distribute.local_variables():
            w = tf.Variable(np.zeros((B // 2, D)), name="w")
        inner, outer = objectives(w, lam)
        model = far.BilevelModel(inner, outer, far.GradientDescentOptimizer(1e3), steps=40, inner_variables=[w],
                                 hyperparameters=[lam], init_dynamics_dict=[(w, lambda: tf.zeros_like(w))])
        model.compile(optimizer=keras.optimizers.Adam(0.1))
    try:
        model.fit(tf.data.Dataset.from_tensors((train, valid)).repeat(), steps_per_epoch=3, verbose=0)
        error = ""
    except far.DivergenceError as raised:
        error = str(raised)
    return {"error": error, "lam": lam.numpy().tolist(), "iterations": int(model.optimizer.iterations.numpy()),
            "w": float(max(np.max(np.abs(v.numpy())) for v in mirrored.experimental_local_results(w)))}


if __name__ == "__main__":
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # one: a second one's collectives would clash
    print(json.dumps({**{name: compare(name, mirrored) for name in sys.argv[1].split(",")},
                      "failure": failure(mirrored)}))
