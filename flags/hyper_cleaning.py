"""Data hyper-cleaning (Franceschi et al., ICML 2017, §5.1; FAR-HO's AutoML demo, part 1).

A fraction of the training labels (``--corruption``: a third as in FAR-HO's demo, or half as in
BOME's data-cleaning script, github.com/Cranial-XIX/BOME hpo/data_cleaning.py, which draws a
uniform label that keeps the true one a tenth of the time) is replaced by a different random
label; one weight per training example, σ(λ_i), and the inner learning rate η are
hyperparameters:

    L(w, λ) = (1/n) Σ_i σ(λ_i) CE(f_w(x_i), ỹ_i)      inner: T steps of GD with rate η
    E(w)    = mean CE(f_w(x), y) over the clean validation set

with λ = 0 (σ = ½) at the start, η clipped to [1e-5, 1], updated by Adam on the direction of
``--method``: reverse mode (far_ho2 ``ReverseHG``, ``--truncate`` K for truncated; λ and η),
forward mode (``ForwardHG``: one tangent per scalar hyperparameter, so it learns η and log ρ
of an L2 penalty (ρ/2)‖θ‖² only and leaves the weights uniform), ``ImplicitHG`` (needs ρ > 0:
``--l2``), BOME, the penalty method, or ``StochasticHG`` on an SGLD chain at temperature τ (the
last four learn λ only: they see the inner solution, or its Gibbs law, not the trajectory, so
η stays at ``--inner_lr``). f_w is softmax regression or a one-hidden-layer MLP (Keras).

Each hyper-iteration logs to metrics.csv the detection scores at λ_i, the validation loss, the
validation and test accuracy of the model the iteration leaves (w_T(λ_i); BOME and the penalty
method: their w, kept across iterations), its seconds and the elapsed total (``--time_budget``
stops there): test accuracy against time, as in the BOME paper's plots. At the end the model
is retrained from its initial weights for ``--retrain_steps`` GD steps (rate ``--retrain_lr``,
or the run's η) with the learned weights normalised to mean 1 (σ(λ_i)/mean σ(λ): the scale
of the weights is an inner learning rate, not cleaning), and compared with the same training
with uniform weights (the baseline: no cleaning) and with the corrupted examples removed (the
oracle). An example is flagged as corrupted when σ(λ_i) < ``--threshold``; precision, recall
and F1 measure that detection. (RFHO's ICML17 script instead projects the weights onto
[0, 1] ∩ an L1 ball and flags λ < 1e-3; it also retrains on train + validation.)

Data: by default the 1,797 real 8×8 handwritten digits bundled in data/digits/ (UCI's
*Optical Recognition of Handwritten Digits*, test file; origin, licence and checksum in its
README.md), pixels 0..16 scaled to [0, 1]. Their fixed test set is every third image (indices 0,
3, 6, …: 599 images, the same for every seed); training and validation examples are disjoint
subsets of the other 1198 drawn with ``--seed`` (800 and 200 by default). Or ``--data``: a
Keras-format MNIST / Fashion-MNIST .npz (x_train, y_train, x_test, y_test: uint8 images
[n, 28, 28] and integer labels), training and validation drawn from x_train the same way, the
test set x_test. FAR-HO's demo used 1400 / 140 MNIST examples and T = 100
(``--n_train 1400 --n_val 140 --T 100``); on the digits the defaults take T = 300, enough
steps for the corrupted labels to cost the uncleaned baseline accuracy (after 100 steps the
linear model has barely fitted them, and the baseline stays close to the oracle).

    python -m flags.hyper_cleaning --logdir /tmp/cleaning                   # the digits
    python -m flags.hyper_cleaning --logdir /tmp/cleaning_50 --corruption 0.5
    python -m flags.hyper_cleaning --logdir /tmp/bome --method bome --T 10 --l2 1e-3 --time_budget 60
    python -m flags.hyper_cleaning --data ~/.keras/datasets/mnist.npz --logdir /tmp/mnist
"""

import dataclasses
import pathlib
import time
from typing import Any, Callable, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import flags
from absl import logging

import far_ho2 as far
from flags import common

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CLASSES = 10
DIGITS = pathlib.Path(__file__).resolve().parent.parent / "data" / "digits" / "digits.npz"
DIGITS_MAX = 16  # the digits' pixels count the ink in 4×4 blocks: 0..16
DIGITS_TEST_EVERY = 3  # the digits' fixed test set: images 0, 3, 6, …
METHOD_SETTING_PREFIXES = {"truncate": "reverse", "implicit_": "implicit", "bome_": "bome", "penalty_": "penalty",
                           "stochastic_": "stochastic", "temperature": "stochastic"}  # a setting's method
CHECKPOINT_SECONDS = 30.0  # at most this much work is redone after a crash (and at every end)


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment; the defaults are for the bundled digits: a third of the labels corrupted
    as in FAR-HO's demo, softmax regression as in the ICML17 paper, reverse-mode hypergradients
    (see the module docstring)."""

    data: Optional[str] = None  # a Keras-format MNIST .npz; None: the bundled digits
    n_train: int = 800
    n_val: int = 200
    n_test: int = 0  # 0: the whole test set
    corruption: float = 1 / 3  # fraction of training labels replaced
    model: str = "softmax"  # "softmax" or "mlp"
    hidden: int = 300  # MLP hidden units
    l2: float = 0.0  # ρ: (ρ/2)‖θ‖² added to the training loss (implicit needs ρ > 0; forward learns it)
    method: str = "reverse"  # METHODS
    T: int = 300  # inner steps per hyper-iteration (BOME: steps of ŵ; penalty: steps on w)
    hyper_iterations: int = 100
    time_budget: float = 0.0  # seconds of hyper-iterations (0: no limit)
    outer_lr: float = 0.1  # Adam on λ (and η with reverse mode)
    inner_lr: float = 0.02  # (initial) η
    truncate: int = 0  # reverse: K of truncated reverse mode (0: all T steps)
    implicit_solver: str = "cg"  # implicit: the linear solver
    implicit_iterations: int = 20  # implicit: its iterations at most
    bome_eta: float = 0.5  # bome: η of the barrier
    bome_phi: str = "value"  # bome: φ, 'value' as the official hyper-cleaning, or 'grad_norm'
    penalty_gamma: float = 1e-2  # penalty: γ₀
    penalty_lambda_g: float = 1e-2  # penalty: λ_g₀
    penalty_epsilon: float = 1e-2  # penalty: ε₀ of the stage test
    temperature: float = 1e-4  # stochastic: τ of the Langevin chain
    stochastic_estimator: str = "reversed"  # stochastic: 'reversed' or 'score'
    stochastic_burn_in: int = 0  # stochastic: steps discarded at the start of the chain
    stochastic_warm_start: bool = False  # stochastic: each chain starts where the last one ended
    retrain_steps: int = 300  # GD steps of the final retraining
    retrain_lr: float = 0.0  # its learning rate (0: the run's η, learned by reverse and forward)
    threshold: float = 0.5  # σ(λ_i) below it: flagged as corrupted
    seed: int = 0


# The methods of --method: their far_ho2 classes are in `hypergradient_method`. Forward mode
# carries one tangent per scalar hyperparameter, so it learns η and log ρ only (the example
# weights stay uniform: it does not clean); so would the pathwise Langevin estimator, which is left out.
METHODS = ("reverse", "forward", "implicit", "bome", "penalty", "stochastic")
STOCHASTIC_ESTIMATORS = ("reversed", "score")


class Data(NamedTuple):
    """Flattened float32 images in [0, 1] and int labels; ``corrupted`` marks replaced labels."""

    x_train: np.ndarray
    y_train: np.ndarray  # with corrupted labels
    corrupted: np.ndarray  # bool [n_train]
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# -- data --------------------------------------------------------------------------------------


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The four arrays of a Keras-format MNIST / Fashion-MNIST .npz, checked: images as float32
    rows in [0, 1] (uint8 pixels / 255), labels as int64."""
    with np.load(common.check_file(path, "data")) as npz:
        missing = [k for k in NPZ_KEYS if k not in npz]
        if missing:
            raise ValueError(f"--data={path} lacks the arrays {missing}; an MNIST .npz in Keras "
                             f"format has {list(NPZ_KEYS)}.")
        arrays = {k: np.asarray(npz[k]) for k in NPZ_KEYS}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y) or y.ndim != 1 or y.min() < 0 or y.max() >= CLASSES:
            raise ValueError(f"--data={path}: x_{split} {x.shape} and y_{split} {y.shape} must "
                             f"hold as many images as labels in 0..{CLASSES - 1}.")
    return normalised(arrays, 255)


def read_digits(path: pathlib.Path = DIGITS) -> dict[str, np.ndarray]:
    """The bundled 8×8 digits (data/digits/README.md) as ``read_npz`` returns MNIST: the fixed
    test set is every ``DIGITS_TEST_EVERY``-th image (0, 3, 6, …: 599, whatever the seed), the
    training images are the other 1198, from which ``load_data`` draws training and validation."""
    with np.load(path) as npz:
        images, labels = np.asarray(npz["images"]), np.asarray(npz["labels"])
    test = np.arange(len(images)) % DIGITS_TEST_EVERY == 0
    return normalised({"x_train": images[~test], "y_train": labels[~test],
                       "x_test": images[test], "y_test": labels[test]}, DIGITS_MAX)


def normalised(arrays: dict[str, np.ndarray], pixel_max: float) -> dict[str, np.ndarray]:
    """Images [n, ...] as float32 rows [n, pixels] of ``pixel / pixel_max``; labels as int64."""
    return {k: (v.reshape(len(v), -1) / pixel_max).astype(np.float32) if k.startswith("x")
            else v.astype(np.int64) for k, v in arrays.items()}


def corrupt(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Replaces the labels of round(fraction·n) random examples by a different random label."""
    corrupted = np.zeros(len(y), bool)
    corrupted[rng.choice(len(y), int(round(fraction * len(y))), replace=False)] = True
    shifted = (y + rng.integers(1, CLASSES, size=len(y))) % CLASSES
    return np.where(corrupted, shifted, y), corrupted


def load_data(config: Config) -> Data:
    """The data of ``config``: the bundled digits, or the MNIST .npz of ``config.data``.

    Training and validation examples are disjoint subsets of x_train drawn with ``config.seed``
    (so each seed draws other examples and other corruptions); the test set is the first
    ``n_test`` images of x_test (all for 0), the same for every seed.

    Raises:
        ValueError: if the sizes exceed the data or the .npz is malformed; FileNotFoundError.
    """
    arrays = read_npz(config.data) if config.data else read_digits()
    available, source = len(arrays["x_train"]), config.data or "the bundled digits"
    if config.n_train + config.n_val > available:
        raise ValueError(f"--n_train + --n_val = {config.n_train + config.n_val} exceeds the "
                         f"{available} training images of {source}.")
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(available)
    train, val = order[:config.n_train], order[config.n_train:config.n_train + config.n_val]
    y_noisy, corrupted = corrupt(arrays["y_train"][train], config.corruption, rng)
    n_test = config.n_test or len(arrays["x_test"])
    return Data(arrays["x_train"][train], y_noisy, corrupted,
                arrays["x_train"][val], arrays["y_train"][val],
                arrays["x_test"][:n_test], arrays["y_test"][:n_test])


# -- model and objectives ----------------------------------------------------------------------


def make_model(config: Config, inputs: int) -> keras.Model:
    """Softmax regression or a ReLU MLP with ``hidden`` units, returning logits."""
    layers = [keras.Input((inputs,))]
    if config.model == "mlp":
        layers.append(keras.layers.Dense(config.hidden, activation="relu"))
    layers.append(keras.layers.Dense(CLASSES))
    return keras.Sequential(layers)


def weighted_loss(model: keras.Model, x: tf.Tensor, y: tf.Tensor, weights: Callable[[], tf.Tensor],
                  l2: Optional[Callable[[], tf.Tensor]] = None) -> Callable[[], tf.Tensor]:
    """The objective  mean_i w_i · CE(model(x_i), y_i) + (ρ/2)‖θ‖²,  w = ``weights()`` and
    ρ = ``l2()`` (read at each call, so they may depend on hyperparameters; no ρ: 0), θ the
    model's weights."""
    def loss() -> tf.Tensor:
        ce = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
        value = tf.reduce_mean(weights() * ce)
        if l2 is not None:
            value += 0.5 * l2() * tf.add_n([tf.reduce_sum(tf.square(v)) for v in model.trainable_variables])
        return value
    return loss


def constant(weights: np.ndarray) -> Callable[[], tf.Tensor]:
    """Fixed values (example weights, ρ), as the callables ``weighted_loss`` takes."""
    tensor = tf.constant(weights, tf.float32)
    return lambda: tensor


def accuracy(model: keras.Model, x: tf.Tensor, y: tf.Tensor) -> float:
    return float(np.mean(np.argmax(model(x).numpy(), axis=1) == y.numpy()))


def detection(weights: np.ndarray, corrupted: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of flagging ``weights < threshold`` as corrupted."""
    flagged = weights < threshold
    hits = float(np.sum(flagged & corrupted))
    precision = hits / max(flagged.sum(), 1)
    recall = hits / max(corrupted.sum(), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class Experiment(NamedTuple):
    """The model, the hyperparameters, and the problems that train it."""

    model: keras.Model
    example_weights: tf.Variable  # λ
    learning_rate: tf.Variable  # η
    l2: Optional[Callable[[], tf.Tensor]]  # ρ (learned by forward mode)
    optimizer: keras.optimizers.Optimizer  # of λ (and η)
    hyper_optimizer: far.HyperOptimizer
    run: Callable  # one hyper-iteration
    learned: far.InnerProblem  # GD from the initial weights with σ(λ) / mean σ(λ) and η
    baseline: far.InnerProblem  # uniform weights, learned η
    oracle: far.InnerProblem  # corrupted examples removed, learned η


def hypergradient_method(config: Config) -> far.HyperGradient:
    """The far_ho2 method of ``config.method``, with its settings."""
    if config.method == "reverse":
        return far.ReverseHG(truncate=config.truncate or None)
    if config.method == "forward":
        return far.ForwardHG()
    if config.method == "implicit":
        return far.ImplicitHG(config.implicit_solver, max_iter=config.implicit_iterations)
    if config.method == "bome":
        return far.BOME(eta=config.bome_eta, phi=config.bome_phi)
    if config.method == "penalty":
        return far.Penalty(gamma=config.penalty_gamma, lambda_g=config.penalty_lambda_g,
                           epsilon=config.penalty_epsilon)
    return far.StochasticHG(config.stochastic_estimator, burn_in=config.stochastic_burn_in,
                            warm_start=config.stochastic_warm_start)


def build(config: Config, data: Data) -> Experiment:
    """The model (seeded) and the bilevel problem; every problem starts from the same weights."""
    keras.utils.set_random_seed(config.seed)
    model = make_model(config, data.x_train.shape[1])
    x, y, xv, yv = (tf.constant(a) for a in (data.x_train, data.y_train, data.x_val, data.y_val))
    lam = far.get_hyperparameter("example_weights", tf.zeros(len(data.x_train)))
    lr = far.get_hyperparameter("lr", float(config.inner_lr),
                                constraint=lambda v: tf.clip_by_value(v, 1e-5, 1.0))
    log_l2 = far.get_hyperparameter("log_l2", float(np.log(config.l2))) if config.method == "forward" else None
    l2 = (lambda: tf.exp(log_l2)) if log_l2 is not None else constant(config.l2) if config.l2 else None
    # Only reverse and forward mode differentiate the inner trajectory, so only they learn η (the
    # other methods see the inner problem's solution, or its Gibbs law, which η does not change).
    hypers = {"reverse": [lam, lr], "forward": [lr, log_l2]}.get(config.method, [lam])
    optimizer = keras.optimizers.Adam(config.outer_lr)
    optimizer.build(hypers)
    variables = model.trainable_variables
    ho = far.HyperOptimizer(hypergradient_method(config))
    inner_optimizer = (far.SGLDOptimizer(lr, temperature=config.temperature, seed=config.seed)
                       if config.method == "stochastic" else far.GradientDescentOptimizer(lr))
    problem = ho.inner_problem(weighted_loss(model, x, y, lambda: tf.sigmoid(lam), l2),
                               inner_optimizer, var_list=variables)
    ho.outer_problem(weighted_loss(model, xv, yv, constant(np.ones(len(data.x_val)))), problem,
                     optimizer, hyper_list=hypers)
    clean = (~data.corrupted).astype(np.float32)

    retrain_lr = config.retrain_lr or lr

    def retraining(weights: Callable[[], tf.Tensor]) -> far.InnerProblem:  # GD with the learned η, ρ
        return far.InnerProblem(weighted_loss(model, x, y, weights, l2),
                                far.GradientDescentOptimizer(retrain_lr), var_list=variables)
    normalised = lambda: tf.sigmoid(lam) / tf.reduce_mean(tf.sigmoid(lam))  # noqa: E731
    return Experiment(model, lam, lr, l2, optimizer, ho, ho.finalize(), retraining(normalised),
                      retraining(constant(np.ones_like(clean))), retraining(constant(clean / clean.mean())))


# -- the experiment ----------------------------------------------------------------------------


def check_config(config: Config) -> None:
    """Raises ``ValueError`` naming the first bad setting."""
    for name in ("n_train", "n_val", "T", "hyper_iterations", "hidden", "implicit_iterations"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(config, name)}.")
    for name in ("n_test", "retrain_steps", "truncate", "stochastic_burn_in"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name} must be ≥ 0, got {getattr(config, name)}.")
    for name in ("l2", "retrain_lr", "time_budget", "bome_eta", "penalty_gamma", "penalty_lambda_g", "penalty_epsilon",
                 "temperature"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"--{name} must be ≥ 0, got {getattr(config, name)}.")
    if not 0 <= config.corruption < 1:
        raise ValueError(f"--corruption must be in [0, 1), got {config.corruption}.")
    if config.model not in ("softmax", "mlp"):
        raise ValueError(f"--model must be 'softmax' or 'mlp', got {config.model!r}.")
    for name in ("outer_lr", "inner_lr", "threshold"):
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(config, name)}.")
    if config.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {config.method!r}.")
    if config.stochastic_estimator not in STOCHASTIC_ESTIMATORS:
        why = (" (it carries one tangent per scalar hyperparameter: "
               f"{config.n_train} here)" if config.stochastic_estimator == "pathwise" else "")
        raise ValueError(f"--stochastic_estimator must be one of {STOCHASTIC_ESTIMATORS}, got "
                         f"{config.stochastic_estimator!r}{why}.")
    if config.method == "forward" and not config.l2 > 0:
        raise ValueError(f"--method=forward learns log ρ: --l2 (its initial ρ) must be positive, got {config.l2}.")
    if config.truncate >= config.T:
        raise ValueError(f"--truncate={config.truncate} must be below --T={config.T} (0: no truncation).")
    defaults = Config()
    for field in dataclasses.fields(Config):
        owner = next((method for prefix, method in METHOD_SETTING_PREFIXES.items() if field.name.startswith(prefix)),
                     None)
        if owner not in (None, config.method) and getattr(config, field.name) != getattr(defaults, field.name):
            raise ValueError(f"--{field.name} is a setting of --method={owner}; here --method={config.method}.")


def hyper_iteration_metrics(exp: Experiment, data: Data, config: Config) -> dict[str, float]:
    """Detection scores and weights of the corrupted / clean examples at the current λ, η."""
    weights = tf.sigmoid(exp.example_weights).numpy()
    return {**detection(weights, data.corrupted, config.threshold), "lr": float(exp.learning_rate),
            "l2": float(exp.l2()) if exp.l2 is not None else 0.0,
            "weight_corrupted": float(weights[data.corrupted].mean()) if data.corrupted.any() else 0.0,
            "weight_clean": float(weights[~data.corrupted].mean())}


def retrained_accuracy(problem: far.InnerProblem, model: keras.Model, steps: int, data: Data) -> float:
    """Trains ``problem`` from its initial weights for ``steps``, then the test accuracy."""
    problem.run(steps)
    return accuracy(model, tf.constant(data.x_test), tf.constant(data.y_test))


def plot_weights(weights: np.ndarray, corrupted: np.ndarray, threshold: float, path: Any) -> None:
    """weights.png: histograms of σ(λ) for the clean and the corrupted examples."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 41)
    ax.hist(weights[~corrupted], bins, alpha=0.6, label="clean")
    ax.hist(weights[corrupted], bins, alpha=0.6, label="corrupted")
    ax.axvline(threshold, color="k", ls=":", label="threshold")
    ax.set(xlabel="example weight σ(λ_i)", ylabel="examples", title="Hyper-cleaning weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path / "weights.png", dpi=100)
    plt.close(fig)


def run_experiment(config: Config, logdir: Any, *, resume: bool = True,
                   data: Optional[Data] = None) -> dict:
    """Runs (or resumes) hyper-cleaning in ``logdir``: ``hyper_iterations`` hypergradient steps
    logged to metrics.csv, then the retrained test accuracies and detection scores in
    results.json, weights.png. Returns the results.

    Args:
        data: the data, if already loaded. Defaults to `None`: ``load_data(config)``.

    Raises:
        ValueError: for a bad configuration; FileNotFoundError for missing data.
    """
    check_config(config)
    data = load_data(config) if data is None else data
    logging.info("Data: %d train (%d corrupted), %d val, %d test.", len(data.x_train),
                 data.corrupted.sum(), len(data.x_val), len(data.x_test))
    out = common.Logdir(logdir, config, resume=resume)
    exp = build(config, data)
    checkpointer = out.checkpointer(learning_rate=exp.learning_rate, **exp.hyper_optimizer.state())
    start = out.resume_run(checkpointer)
    rows = [r for r in out.read_metrics() if r["run"] == "main"]
    elapsed = float(rows[-1]["elapsed"]) if rows else 0.0
    xv, yv = tf.constant(data.x_val), tf.constant(data.y_val)
    xt, yt = tf.constant(data.x_test), tf.constant(data.y_test)
    done, saved = start, time.monotonic()
    for i in common.progress(range(start, config.hyper_iterations), config.hyper_iterations,
                             label=f"hyper-cleaning ({config.method})"):
        if config.time_budget and elapsed >= config.time_budget:
            logging.info("--time_budget=%g s reached after %d hyper-iterations.", config.time_budget, i)
            break
        metrics = hyper_iteration_metrics(exp, data, config)  # at λ_i, η_i
        seconds = time.perf_counter()
        val_loss = float(exp.run(config.T))
        seconds = time.perf_counter() - seconds
        elapsed += seconds
        out.log(i, {**metrics, "val_loss": val_loss, "val_accuracy": accuracy(exp.model, xv, yv),
                    "test_accuracy": accuracy(exp.model, xt, yt), "seconds": seconds, "elapsed": elapsed})
        done = i + 1
        if time.monotonic() - saved >= CHECKPOINT_SECONDS:
            checkpointer.save(done)
            saved = time.monotonic()
    if done > start:  # the last iterations, and the state the results are computed from
        checkpointer.save(done)
    weights = tf.sigmoid(exp.example_weights).numpy()
    results = {**hyper_iteration_metrics(exp, data, config), "hyper_iterations_done": done, "elapsed": elapsed,
               "final_model_test_accuracy": accuracy(exp.model, xt, yt),
               "test_accuracy": retrained_accuracy(exp.learned, exp.model, config.retrain_steps, data),
               "val_accuracy": accuracy(exp.model, xv, yv),
               "baseline_test_accuracy": retrained_accuracy(exp.baseline, exp.model, config.retrain_steps, data),
               "oracle_test_accuracy": retrained_accuracy(exp.oracle, exp.model, config.retrain_steps, data)}
    plot_weights(weights, data.corrupted, config.threshold, out.path)
    common.print_table("Hyper-cleaning", [{k: float(v) for k, v in results.items()}])
    return out.write_results(results)


# -- flags -------------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """Hyper-cleaning's flags, defined in ``flag_values``: ``--data``, one per other ``Config``
    field, and the common ones."""
    d, into = Config(), {"flag_values": flag_values}
    holders = common.define_common_flags(flag_values)._asdict()
    holders.update(
        data=flags.DEFINE_string("data", None, "MNIST or Fashion-MNIST .npz in Keras format "
                                 "(x_train, y_train, x_test, y_test); default: the bundled 8×8 "
                                 "digits (data/digits).", **into),
        n_train=flags.DEFINE_integer("n_train", d.n_train, "Training examples.", **into),
        n_val=flags.DEFINE_integer("n_val", d.n_val, "Validation examples (clean labels).",
                                   **into),
        n_test=flags.DEFINE_integer("n_test", d.n_test, "Test examples (0: all).", **into),
        corruption=flags.DEFINE_float("corruption", d.corruption, "Fraction of training labels "
                                      "replaced by another one (FAR-HO's demo: 1/3; BOME's: "
                                      "0.5).", **into),
        model=flags.DEFINE_enum("model", d.model, ["softmax", "mlp"], "Classifier.", **into),
        hidden=flags.DEFINE_integer("hidden", d.hidden, "MLP hidden units.", **into),
        l2=flags.DEFINE_float("l2", d.l2, "ρ: (ρ/2)‖θ‖² added to the training loss (implicit "
                              "needs ρ > 0).", **into),
        method=flags.DEFINE_enum("method", d.method, list(METHODS), "The far_ho2 method: reverse "
                                 "(also learns η), forward (learns η and log ρ only: no example "
                                 "weights), implicit, bome, penalty or stochastic (Langevin inner "
                                 "dynamics); its settings are the flags below.", **into),
        T=flags.DEFINE_integer("T", d.T, "Inner steps per hyper-iteration (bome: steps of ŵ; "
                               "penalty: steps on w).", **into),
        hyper_iterations=flags.DEFINE_integer("hyper_iterations", d.hyper_iterations,
                                              "Hyper-iterations (Adam steps on λ).", **into),
        time_budget=flags.DEFINE_float("time_budget", d.time_budget, "Stop the hyper-iterations "
                                       "after this many seconds of them (0: no limit).", **into),
        outer_lr=flags.DEFINE_float("outer_lr", d.outer_lr, "Adam learning rate of λ (and η).",
                                    **into),
        inner_lr=flags.DEFINE_float("inner_lr", d.inner_lr, "(Initial) inner learning rate η.",
                                    **into),
        truncate=flags.DEFINE_integer("truncate", d.truncate, "reverse: back-propagate through "
                                      "the last K inner steps only (0: all T).", **into),
        implicit_solver=flags.DEFINE_enum("implicit_solver", d.implicit_solver,
                                          ["cg", "neumann", "fixed_point"],
                                          "implicit: the linear solver of the Hessian system.", **into),
        implicit_iterations=flags.DEFINE_integer("implicit_iterations", d.implicit_iterations,
                                                 "implicit: the solver's iterations at most.", **into),
        bome_eta=flags.DEFINE_float("bome_eta", d.bome_eta, "bome: η, the barrier's strength.", **into),
        bome_phi=flags.DEFINE_enum("bome_phi", d.bome_phi, ["grad_norm", "value"], "bome: the "
                                   "control φ (grad_norm: η‖∇q̂‖², value: η·q̂).", **into),
        penalty_gamma=flags.DEFINE_float("penalty_gamma", d.penalty_gamma, "penalty: γ₀, the "
                                         "initial weight of ‖∇_w L‖².", **into),
        penalty_lambda_g=flags.DEFINE_float("penalty_lambda_g", d.penalty_lambda_g, "penalty: "
                                            "λ_g₀, the weight of L in w's surrogate.", **into),
        penalty_epsilon=flags.DEFINE_float("penalty_epsilon", d.penalty_epsilon, "penalty: ε₀, "
                                           "the stage tolerance (0: γ held).", **into),
        temperature=flags.DEFINE_float("temperature", d.temperature, "stochastic: τ, the "
                                       "temperature of the Langevin chain.", **into),
        stochastic_estimator=flags.DEFINE_enum("stochastic_estimator", d.stochastic_estimator,
                                               list(STOCHASTIC_ESTIMATORS), "stochastic: the "
                                               "O(|w| + |λ|) Monte-Carlo estimator.", **into),
        stochastic_burn_in=flags.DEFINE_integer("stochastic_burn_in", d.stochastic_burn_in,
                                                "stochastic: chain steps discarded before the "
                                                "samples (of --T).", **into),
        stochastic_warm_start=flags.DEFINE_boolean("stochastic_warm_start", d.stochastic_warm_start,
                                                   "stochastic: start each chain where the last one "
                                                   "ended (less burn-in).", **into),
        retrain_steps=flags.DEFINE_integer("retrain_steps", d.retrain_steps,
                                           "GD steps of the final retraining.", **into),
        retrain_lr=flags.DEFINE_float("retrain_lr", d.retrain_lr, "Learning rate of the final "
                                      "retraining (0: the run's η).", **into),
        threshold=flags.DEFINE_float("threshold", d.threshold,
                                     "Weights below it flag an example as corrupted.", **into))
    return holders


def main() -> None:
    """Hyper-cleaning as the command line's flags configure it."""
    common.run_launcher(define_flags(), Config, check_config, load_data, run_experiment)


if __name__ == "__main__":
    main()
