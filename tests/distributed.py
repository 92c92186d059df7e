"""Runs under ``tf.distribute`` for tests/test_distribute.py, each in a fresh process: the
logical CPU devices of a MirroredStrategy must be configured before TensorFlow initialises its
devices (the pytest process has), and MultiWorkerMirroredStrategy reads TF_CONFIG at start-up.

    python tests/distributed.py mirrored DEVICES CASE[,CASE...]    one JSON line {case: results}
    python tests/distributed.py worker OUT.npz     3 hyper-iterations of ``fit`` (Adam, float64) under
                                                   MultiWorkerMirroredStrategy if TF_CONFIG is set,
                                                   else on one device; the weights to OUT.npz

Each ``mirrored`` case runs the same computation under a MirroredStrategy of DEVICES logical CPU
devices and on one device of the same process (float64), and returns relative errors (and the
messages of the errors it provokes); the test asserts on them.
"""

import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository's packages

import far_ho2 as far  # noqa: E402  (first: its CPU kernels)
import tensorflow as tf  # noqa: E402

if __name__ == "__main__" and sys.argv[1] == "mirrored":  # before anything initialises the devices
    tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                               [tf.config.LogicalDeviceConfiguration()] * int(sys.argv[2]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from far_ho2.launch import callbacks  # noqa: E402
from hyper_repr import data, train  # noqa: E402
from oracles import relative_error  # noqa: E402
from test_few_shot_launchers import last_checkpoint  # noqa: E402
from test_hyper_representation import (QUERIES, SHOTS, SPLITS, WAYS, Crash, Crashed, model_of,  # noqa: E402
                                       stream, validation)

ONE = tf.distribute.get_strategy()  # the default strategy: one device


def values(variables) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in variables]


# -- the cases --------------------------------------------------------------------------------------

def sgd_step(strategy: tf.distribute.Strategy, batches: tf.data.Dataset, **options) -> tuple:
    """One fit step with SGD(1) under ``strategy``: λ_0 − λ_1 (the hypergradient it applied),
    fit's loss, and the model."""
    with strategy.scope():
        model = model_of(**options)
        model.compile(optimizer=keras.optimizers.SGD(1.0))
    start = values(model.trainable_variables)
    history = model.fit(batches, steps_per_epoch=1, epochs=1, verbose=0, shuffle=False)
    return [b - e for b, e in zip(start, values(model.trainable_variables))], history.history["loss"], model


def compare_step(strategy: tf.distribute.Strategy, **options) -> dict:
    """One fit step with SGD(1) (λ_1 = λ_0 − ∇E, a learned η included), against ``hypergradients``
    of the whole meta-batch on one device; E, fit's loss (a float32 Keras metric)."""
    size = 2 * strategy.num_replicas_in_sync
    loss, grads, finite = tf.function(model_of(learn_lr=True, **options).hypergradients)(next(iter(stream(size))))
    steps, fit_loss, model = sgd_step(strategy, stream(size), learn_lr=True, **options)
    return {"grads": max(relative_error(s, g.numpy()) for s, g in zip(steps, grads)),
            "loss": relative_error(fit_loss[0], float(loss)), "finite": bool(finite),
            "heads": type(model._heads.variables[0]).__name__}


def hypergradient(strategy: tf.distribute.Strategy) -> dict:
    return compare_step(strategy)


def clipped(strategy: tf.distribute.Strategy) -> dict:
    """``compare_step`` with clipping, which applies to the all-reduced mean ∇E (the threshold
    clips some of its entries)."""
    raw = tf.function(model_of(learn_lr=True).hypergradients)(next(iter(stream(2 * strategy.num_replicas_in_sync))))[1]
    clip = 0.5 * max(float(np.abs(g.numpy()).max()) for g in raw)
    return {**compare_step(strategy, clip=clip),
            "clipped": float(np.mean([np.mean(np.abs(g.numpy()) > clip) for g in raw]))}


def adam(strategy: tf.distribute.Strategy) -> dict:
    """Two fit steps with Adam and a learned η, against one device."""
    updates = []
    for s in (ONE, strategy):
        with s.scope():
            model = model_of(learn_lr=True)
        start = values(model.trainable_variables)
        model.fit(stream(2 * strategy.num_replicas_in_sync), steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)
        updates.append([end - begin for end, begin in zip(values(model.trainable_variables), start)])
    return {"update": max(relative_error(d, s) for s, d in zip(*updates))}


def by_share(strategy: tf.distribute.Strategy, batches: tf.data.Dataset, **options) -> dict:
    """A fit step with SGD(1) under ``strategy``, against the mean of the hypergradients of the
    replicas' shares of the batch computed one by one on one device."""
    replicas, batch = strategy.num_replicas_in_sync, next(iter(batches))
    model = model_of(**options)
    compute, shares = tf.function(model.hypergradients), []
    for r in range(replicas):
        size = tf.shape(tf.nest.flatten(batch)[0])[0] // replicas
        shares.append(compute(tf.nest.map_structure(lambda x: x[r * size:(r + 1) * size], batch))[1])
    steps = sgd_step(strategy, batches, **options)[0]
    return {"steps": steps, "expected": [np.mean([s[k].numpy() for s in shares], axis=0) for k in range(len(steps))]}


def langevin(strategy: tf.distribute.Strategy) -> dict:
    """StochasticHG with Langevin heads: each replica draws its episodes' rows of the meta-batch's
    noise (far_ho2.sharding.normal), so a fit step under the strategy is the one-device step on
    the whole meta-batch; not the mean of the shares' hypergradients each drawn on one device
    with noise for a batch of its own size (what a split-unaware draw would give)."""
    replicas = strategy.num_replicas_in_sync
    def options() -> dict:  # a method serves one model
        return dict(hypergradient=far.StochasticHG("reversed", batches=3), temperature=1e-3)
    batches = stream(2 * replicas)
    batch, model = next(iter(batches)), model_of(**options())
    compute = tf.function(model.hypergradients)
    whole = compute(batch)[1]  # run 1, as the first fit step
    steps = sgd_step(strategy, batches, **options())[0]
    shares = []
    for r in range(replicas):
        model._langevin.runs.assign(0)
        shares.append(compute(tf.nest.map_structure(lambda x: x[2 * r:2 * r + 2], batch))[1])
    naive = [np.mean([s[k].numpy() for s in shares], axis=0) for k in range(len(shares[0]))]
    return {"grads": max(relative_error(s, e) for s, e in zip(steps, whole)),
            "naive": min(relative_error(s, n) for s, n in zip(steps, naive))}


def multiclass(strategy: tf.distribute.Strategy) -> dict:
    """The 'multiclass' variant: batches of images split across the replicas, each normalised with
    its own share's statistics (as a Keras BatchNormalization under a strategy); against the
    mean of the shares' gradients on one device."""
    images = data.image_batches(SPLITS.train, batch_size=6 * strategy.num_replicas_in_sync, seed=0)
    run = by_share(strategy, images, variant="multiclass", num_classes=12)
    return {"grads": max(relative_error(s, e) for s, e in zip(run["steps"], run["expected"]))}


def evaluate(strategy: tf.distribute.Strategy) -> dict:
    """evaluate() of 6 episodes in batches of 4: the last batch splits unevenly (some replicas get
    no episode); the metrics sum over the replicas."""
    results = []
    for s in (ONE, strategy):
        with s.scope():
            results.append(model_of(seed=3).evaluate(validation(6), verbose=0, return_dict=True))
    return {name: relative_error(results[1][name], results[0][name]) for name in results[0]}


def backup(strategy: tf.distribute.Strategy) -> dict:
    """Keras's BackupAndRestore under the strategy: a run crashed in epoch 2 of 3 and relaunched
    ends with the weights of an uninterrupted one (and of one device)."""
    size, folder = 2 * strategy.num_replicas_in_sync, pathlib.Path(tempfile.mkdtemp())
    batches = stream(size).take(2)

    def run(s: tf.distribute.Strategy, name: str, crash: int = 0) -> list[np.ndarray]:
        with s.scope():
            model = model_of(seed=8, learn_lr=True)
        try:
            model.fit(batches, epochs=3, verbose=0, shuffle=False,
                      callbacks=[keras.callbacks.BackupAndRestore(str(folder / name))] + ([Crash(crash)] if crash else []))
        except Crashed:
            pass
        return values(model.trainable_variables)

    one, straight = run(ONE, "one"), run(strategy, "straight")
    run(strategy, "resumed", crash=3)
    resumed = run(strategy, "resumed")
    return {"resumed": max(relative_error(r, s) for r, s in zip(resumed, straight)),
            "one_device": max(relative_error(s, o) for s, o in zip(straight, one))}


def tiny_config(meta_batch_size: int, iterations: int) -> train.Config:
    """A meta_train run of a few seconds on the synthetic episodes (float64)."""
    return train.Config(network="omniglot", dtype="float64", ways=WAYS, shots=SHOTS, queries=QUERIES, steps=2,
                        meta_batch_size=meta_batch_size, iterations=iterations, eval_every=2, eval_episodes=4,
                        test_episodes=4, eval_batch_size=4)


def meta_train(strategy: tf.distribute.Strategy) -> dict:
    """The launchers' run (callbacks.Checkpoint, EarlyStopping, ModelCheckpoint, CSVLogger, the
    lock, results.json) under the strategy: 2 hyper-iterations, then resumed to 4, against 4 in
    a row on one device: the last checkpoints' weights and optimizer state, and the tests."""
    folder = pathlib.Path(tempfile.mkdtemp())
    config = tiny_config(2 * strategy.num_replicas_in_sync, iterations=2)
    train.meta_train(config, folder / "resumed", SPLITS, verbose=0, strategy=strategy)
    longer = dataclasses.replace(config, iterations=4)
    results = {name: train.meta_train(longer, folder / name, SPLITS, verbose=0, strategy=s)
               for name, s in (("resumed", strategy), ("one", ONE))}
    resumed, one = (last_checkpoint(folder / name) for name in ("resumed", "one"))
    return {"checkpoint": max(relative_error(resumed[n], one[n]) for n in one if np.any(one[n])),
            "variables": sorted(one) == sorted(resumed) and len(one),
            "files": sorted(p.name for p in (folder / "resumed").iterdir()),
            "rows": [r["iteration"] for r in train.read_metrics(folder / "resumed")],
            "test": [results[name]["test"] for name in ("resumed", "one")]}


def ridge_problems(size: int, seed: int = 0) -> tuple:
    """``size`` ridge regressions (far.oracles.ridge_data), stacked on a leading axis."""
    problems = [far.oracles.ridge_data(seed=seed + j) for j in range(size)]
    return problems, tuple(tf.constant(np.stack([getattr(p, f) for p in problems])) for f in ("X", "Y", "Xv", "Yv"))


class Ridge:
    """B ridge regressions sharing the hyperparameters H (a matrix), ρ and η (far.oracles'):

        L = Σ_j ½‖X_j H w_j − Y_j‖² + (ρ/2)‖w_j‖²,     E = (1/B) Σ_j ½‖Xv_j H w_j − Yv_j‖²

    T steps of gradient descent with step η from w = 0; ``local`` makes w each replica's own."""

    def __init__(self, local: bool):
        self.H = tf.Variable(np.eye(5) + 0.1 * np.random.default_rng(1).normal(size=(5, 5)), name="H")
        self.rho = tf.Variable(np.float64(0.3), name="rho")
        self.eta = tf.Variable(np.float64(0.02), name="eta")
        with far.distribute.local_variables() if local else tf.name_scope("w"):
            self.w = tf.Variable(tf.zeros((0, 5, 2), tf.float64), shape=(None, 5, 2), name="w")
        self.hypers = [self.H, self.rho, self.eta]
        self.problem = far.InnerProblem(self.inner, far.GradientDescentOptimizer(self.eta), var_list=[self.w],
                                        init_dynamics_dict=[(self.w, lambda: tf.zeros_like(self.w))])

    def inner(self, batch):
        X, Y = batch[0], batch[1]
        residual = tf.einsum("bnd,de,bec->bnc", X, self.H, self.w) - Y
        return 0.5 * tf.reduce_sum(tf.square(residual)) + 0.5 * self.rho * tf.reduce_sum(tf.square(self.w))

    def outer(self, batch):
        residual = tf.einsum("bnd,de,bec->bnc", batch[2], self.H, self.w) - batch[3]
        return tf.reduce_mean(0.5 * tf.reduce_sum(tf.square(residual), axis=[1, 2]))

    def reset(self, size) -> None:
        self.w.assign(tf.zeros(tf.stack([size, 5, 2]), tf.float64))


def generic(strategy: tf.distribute.Strategy, steps: int = 10, iterations: int = 2) -> dict:
    """far.distribute's recipe (its module docstring) on B ridge problems, against a
    far.HyperOptimizer of the same batched problem on one device and the closed form
    (far.oracles.unrolled_ridge, the mean over the problems): ∇E of the first hyper-iteration and
    the hyperparameters after ``iterations`` Adam updates."""
    size = 2 * strategy.num_replicas_in_sync
    problems, batch = ridge_problems(size)
    single = Ridge(local=False)
    exact = [far.oracles.unrolled_ridge(p, single.H.numpy(), 0.3, 0.02, steps) for p in problems]
    exact = [np.mean([getattr(e, f) for e in exact], axis=0) for f in ("H", "rho", "eta")]
    single.reset(size)
    ho = far.HyperOptimizer(far.ReverseHG())
    run = ho.minimize(single.outer, keras.optimizers.Adam(0.01), single.inner, single.problem.optimizer,
                      hyper_list=single.hypers, var_list=[single.w],
                      init_dynamics_dict=[(single.w, lambda: tf.zeros_like(single.w))])
    start, reference = values(single.hypers), []
    for _ in range(iterations):
        run(steps, inner_objective_feed_dicts=batch, outer_objective_feed_dicts=batch)
        reference.append([g.numpy() for g, _ in ho.hypergradients()])

    with strategy.scope():
        ridge = Ridge(local=True)
        optimizer = keras.optimizers.Adam(0.01)
        optimizer.build(ridge.hypers)
    method = far.ReverseHG()

    @tf.function
    def hyper_iteration(batch):
        def replica(batch):
            ridge.reset(tf.shape(batch[0])[0])
            share = far.distribute.hypergradient(method, ridge.problem, ridge.outer, ridge.hypers, steps=steps,
                                                 inner_batches=far.Batches(batch, False), outer_batch=batch)
            far.distribute.apply_gradients(optimizer, share.grads, ridge.hypers, share.finite)
            return share.value, share.grads
        value, grads = strategy.run(replica, args=(batch,))
        return strategy.reduce("MEAN", value, axis=None), [strategy.reduce("SUM", g, axis=None) for g in grads]

    distributed = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat())
    first = [g.numpy() for g in hyper_iteration(next(iter(distributed)))[1]]
    for _ in range(iterations - 1):
        hyper_iteration(next(iter(distributed)))
    return {"closed_form": max(relative_error(g, e) for g, e in zip(first, exact)),
            "hyper_optimizer": max(relative_error(g, r) for g, r in zip(first, reference[0])),
            "hypers": max(relative_error(d.numpy(), s.numpy()) for d, s in zip(ridge.hypers, single.hypers)),
            "moved": min(relative_error(s.numpy(), b) for s, b in zip(single.hypers, start)),
            "w": type(ridge.w).__name__}


def errors(strategy: tf.distribute.Strategy) -> dict:
    """A meta-batch the replicas do not divide: fit's error, far.distribute's check, and the
    error of a custom loop that distributes it anyway (tf.distribute splits it unevenly)."""
    replicas = strategy.num_replicas_in_sync
    messages = {}
    with strategy.scope():
        model = model_of()
    try:
        model.fit(stream(replicas + 1), steps_per_epoch=1, epochs=1, verbose=0)
    except ValueError as error:
        messages["fit"] = str(error)
    try:
        far.distribute.replica_batch_size(replicas + 1, strategy, "--meta_batch_size")
    except ValueError as error:
        messages["check"] = str(error)
    with strategy.scope():
        ridge = Ridge(local=True)

    @tf.function
    def shares(batch):
        def replica(batch):
            ridge.reset(tf.shape(batch[0])[0])
            return far.distribute.hypergradient(far.ReverseHG(), ridge.problem, ridge.outer, ridge.hypers, steps=2,
                                                inner_batches=far.Batches(batch, False), outer_batch=batch).value
        return strategy.run(replica, args=(batch,))

    _, batch = ridge_problems(2 * replicas + 1)
    try:
        shares(next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch)))))
    except tf.errors.InvalidArgumentError as error:
        messages["uneven"] = error.message
    return messages


class Quadratics:
    """B Gaussian problems sharing λ (a weight decay per coordinate) and H (the features X·H):

        L_j = ½‖X_j H w_j − y_j‖² + ½ Σ_i λ_i w_ji²,     E_j = ½‖Xv_j H w_j − yv_j‖²,

    sampled by SGLD from w = 0; declared as ``chains`` (the objectives return the [B] values of
    the problems) or as one scalar problem (Σ_j L_j, mean_j E_j), with X·H hoisted (``features``)
    if ``hoisted``; w and the SGLD run counter each replica's own."""

    def __init__(self, chains: bool, hoisted: bool):
        rng = np.random.default_rng(4)
        self.lam = tf.Variable([0.5, 1.0, 1.5], dtype=tf.float64, name="lam")
        self.H = tf.Variable(np.eye(3) + 0.1 * rng.normal(size=(3, 3)), name="H")
        with far.distribute.local_variables():
            self.w = tf.Variable(tf.zeros((0, 3), tf.float64), shape=(None, 3), name="w")
            optimizer = far.SGLDOptimizer(0.02, temperature=0.3, seed=5)
        self.hypers, self.chains = [self.lam, self.H], chains
        inner = ((lambda f: self.reduce(self.energies(f[0], f[1]), tf.reduce_sum)) if hoisted else
                 (lambda batch: self.reduce(self.energies(batch[0] @ self.H, batch[1]), tf.reduce_sum)))
        self.problem = far.InnerProblem(inner, optimizer, var_list=[self.w],
                                        init_dynamics_dict=[(self.w, lambda: tf.zeros_like(self.w))],
                                        features=(lambda batch: (batch[0] @ self.H, batch[1])) if hoisted else None)

    def reduce(self, values: tf.Tensor, reduction) -> tf.Tensor:
        return values if self.chains else reduction(values)

    def energies(self, features: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        return (0.5 * tf.reduce_sum(tf.square(tf.einsum("bnd,bd->bn", features, self.w) - y), axis=1)
                + 0.5 * tf.reduce_sum(self.lam * tf.square(self.w), axis=1))

    def outer(self, batch) -> tf.Tensor:
        values = 0.5 * tf.reduce_sum(tf.square(tf.einsum("bnd,bd->bn", batch[2] @ self.H, self.w) - batch[3]), axis=1)
        return self.reduce(values, tf.reduce_mean)

    def hypergradient(self, method: far.StochasticHG, batch: tuple, steps: int) -> tuple:
        """(E, ∇E, the standard errors, the chain statistics, the meta-batch's share) of the
        batch (this replica's share of it under a strategy), as far.distribute.hypergradient
        computes the share."""
        size = tf.shape(batch[0])[0]
        self.w.assign(tf.zeros(tf.stack([size, 3]), tf.float64))
        result = method.hypergradient(self.problem, self.outer, self.hypers, steps=steps,
                                      inner_batches=far.Batches(batch, False), outer_batch=batch)
        share = far.distribute.share(result.value, result.grads, far.engine.result_healthy(method, result), size)
        return result.value, result.grads, result.carry.standard_errors, result.carry.statistics._asdict(), share


def distance(actual, expected) -> float:
    """``relative_error``, or the largest |actual| where ``expected`` is 0."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return relative_error(actual, expected) if np.any(expected) else float(np.max(np.abs(actual)))


def stochastic(strategy: tf.distribute.Strategy, steps: int = 16) -> dict:
    """far.StochasticHG on a meta-batch of B = 2R Gaussian problems split across the replicas,
    each estimator with the problems as one scalar problem (X·H hoisted) and as declared chains
    (grouped into 3 rows for 'score'): every replica's E, ∇E, standard errors and chain
    statistics, and the hypergradient the replicas' shares sum to, against the whole meta-batch
    on one device (the worst relative error of each, over the runs); and the rows of a batch
    that experimental_distribute_dataset gives each replica."""
    replicas, size = strategy.num_replicas_in_sync, 2 * strategy.num_replicas_in_sync
    rng = np.random.default_rng(3)
    batch = tuple(tf.constant(rng.normal(size=shape)) for shape in [(size, 6, 3), (size, 6), (size, 6, 3), (size, 6)])
    distributed = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat())))
    shares = [strategy.experimental_local_results(x) for x in distributed]
    rows = all(np.array_equal(shares[i][r].numpy(), batch[i][r * 2:(r + 1) * 2].numpy())  # [r·n, (r+1)·n), n = 2
               for i in range(len(batch)) for r in range(replicas))
    errors, finite, runs = {}, True, 0
    for estimator, chains, hoisted in (("pathwise", False, True), ("reversed", True, True), ("score", False, True),
                                       ("score", True, False)):
        method = far.StochasticHG(estimator, burn_in=4, batches=3, chains=size if chains else None)
        single = Quadratics(chains, hoisted)
        value, grads, ses, stats, _ = tf.function(lambda b: single.hypergradient(method, b, steps))(batch)
        with strategy.scope():
            sharded = Quadratics(chains, hoisted)
        results = tf.function(lambda b: strategy.run(lambda b: sharded.hypergradient(method, b, steps),
                                                     args=(b,)))(distributed)
        measured = {"grads": [], "value": [], "standard_errors": [], "statistics": []}
        for r in range(replicas):
            value_r, grads_r, ses_r, stats_r = tf.nest.map_structure(
                lambda x: strategy.experimental_local_results(x)[r], results[:4])
            measured["value"].append(distance(value_r, value))
            measured["grads"] += [distance(g, e) for g, e in zip(grads_r, grads)]
            measured["standard_errors"] += [distance(s, e) for s, e in zip(ses_r, ses)]
            measured["statistics"] += [distance(stats_r[k], stats[k]) for k in stats]
        share = results[4]
        measured["share_value"] = [distance(v, value) for v in strategy.experimental_local_results(share.value)]
        measured["share_grads"] = [distance(strategy.reduce("SUM", g, axis=None), e)
                                   for g, e in zip(share.grads, grads)]
        for name, values in measured.items():
            errors[name] = max(errors.get(name, 0.0), *values)
        finite &= all(bool(f) for f in strategy.experimental_local_results(share.finite))
        runs += 1
    return {**errors, "finite": finite, "runs": runs, "rows": rows}


CASES = {f.__name__: f for f in (hypergradient, clipped, adam, multiclass, langevin, evaluate, backup, meta_train, generic,
                                 errors, stochastic)}


def worker(out: str) -> None:
    """3 hyper-iterations of fit on meta-batches of 4 (Adam, a learned η, float64), under
    MultiWorkerMirroredStrategy when TF_CONFIG is set, else on one device; the weights to ``out``
    (.npz), the process's role to stdout."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if os.environ.get("TF_CONFIG") else ONE
    with strategy.scope():
        model = model_of(learn_lr=True)
    history = model.fit(stream(4), steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
    np.savez(out, *values(model.trainable_variables))
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "workers": callbacks.worker_count(strategy),
                      "chief": callbacks.is_chief(strategy), "loss": history.history["loss"]}))


if __name__ == "__main__":
    if sys.argv[1] == "mirrored":
        strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
        results = {}
        for name in sys.argv[3].split(","):
            start = time.perf_counter()
            results[name] = {**CASES[name](strategy), "seconds": time.perf_counter() - start}
        print(json.dumps(results))
    else:
        worker(sys.argv[2])
