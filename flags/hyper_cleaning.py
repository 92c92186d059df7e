"""Data hyper-cleaning (Franceschi et al., ICML 2017, §5.1; FAR-HO's AutoML demo, part 1).

A fraction of the training labels (``--corruption``: a third as in FAR-HO's demo, or half as in
BOME's data-cleaning script, github.com/Cranial-XIX/BOME hpo/data_cleaning.py, which draws a
uniform label that keeps the true one a tenth of the time) is replaced by a different random
label; one weight per training example, σ(λ_i), and the inner learning rate η are
hyperparameters:

    L(w, λ) = (1/n) Σ_i σ(λ_i) CE(f_w(x_i), ỹ_i)      inner: T steps of GD with rate η
    E(w)    = mean CE(f_w(x), y) over the clean validation set

with λ = 0 (σ = ½) at the start, η clipped to [1e-5, 1], both updated by Adam on the reverse-mode
hypergradient (far_ho2 ``ReverseHG``). f_w is softmax regression or a one-hidden-layer MLP
(Keras). At the end the model is retrained from its initial weights on the training set with
the learned weights and η, and compared with the same training (learned η, same steps) with
uniform weights (the baseline: no cleaning) and with the corrupted examples removed (the
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


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment; the defaults are for the bundled digits: a third of the labels corrupted
    as in FAR-HO's demo, softmax regression as in the ICML17 paper (see the module docstring)."""

    data: Optional[str] = None  # a Keras-format MNIST .npz; None: the bundled digits
    n_train: int = 800
    n_val: int = 200
    n_test: int = 0  # 0: the whole test set
    corruption: float = 1 / 3  # fraction of training labels replaced
    model: str = "softmax"  # "softmax" or "mlp"
    hidden: int = 300  # MLP hidden units
    T: int = 300
    hyper_iterations: int = 100
    outer_lr: float = 0.1  # Adam on λ and η
    inner_lr: float = 0.02  # initial η
    retrain_steps: int = 0  # 0: T
    threshold: float = 0.5  # σ(λ_i) below it: flagged as corrupted
    seed: int = 0


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


def weighted_loss(model: keras.Model, x: tf.Tensor, y: tf.Tensor,
                  weights: Callable[[], tf.Tensor]) -> Callable[[], tf.Tensor]:
    """The objective  mean_i w_i · CE(model(x_i), y_i),  w = ``weights()`` (read at each call,
    so it may depend on hyperparameters)."""
    def loss() -> tf.Tensor:
        ce = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
        return tf.reduce_mean(weights() * ce)
    return loss


def constant(weights: np.ndarray) -> Callable[[], tf.Tensor]:
    """Fixed example weights, as the callable ``weighted_loss`` takes."""
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
    optimizer: keras.optimizers.Optimizer  # of λ and η
    run: Callable  # one hyper-iteration
    problem: far.InnerProblem  # training with σ(λ) and η
    baseline: far.InnerProblem  # uniform weights, learned η
    oracle: far.InnerProblem  # corrupted examples removed, learned η


def build(config: Config, data: Data) -> Experiment:
    """The model (seeded) and the bilevel problem; every problem starts from the same weights."""
    keras.utils.set_random_seed(config.seed)
    model = make_model(config, data.x_train.shape[1])
    x, y, xv, yv = (tf.constant(a) for a in (data.x_train, data.y_train, data.x_val, data.y_val))
    lam = far.get_hyperparameter("example_weights", tf.zeros(len(data.x_train)))
    lr = far.get_hyperparameter("lr", float(config.inner_lr),
                                constraint=lambda v: tf.clip_by_value(v, 1e-5, 1.0))
    optimizer = keras.optimizers.Adam(config.outer_lr)
    optimizer.build([lam, lr])
    variables = model.trainable_variables
    ho = far.HyperOptimizer(far.ReverseHG())
    problem = ho.inner_problem(weighted_loss(model, x, y, lambda: tf.sigmoid(lam)),
                               far.GradientDescentOptimizer(lr), var_list=variables)
    ho.outer_problem(weighted_loss(model, xv, yv, constant(np.ones(len(data.x_val)))), problem,
                     optimizer, hyper_list=[lam, lr])
    clean = (~data.corrupted).astype(np.float32)

    def fixed(weights: np.ndarray) -> far.InnerProblem:  # the learned η, fixed weights
        return far.InnerProblem(weighted_loss(model, x, y, constant(weights)),
                                far.GradientDescentOptimizer(lr), var_list=variables)
    return Experiment(model, lam, lr, optimizer, ho.finalize(), problem,
                      fixed(np.ones_like(clean)), fixed(clean / clean.mean()))


# -- the experiment ----------------------------------------------------------------------------


def check_config(config: Config) -> None:
    """Raises ``ValueError`` naming the first bad setting."""
    for name in ("n_train", "n_val", "T", "hyper_iterations", "hidden"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(config, name)}.")
    for name in ("n_test", "retrain_steps"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name} must be ≥ 0, got {getattr(config, name)}.")
    if not 0 <= config.corruption < 1:
        raise ValueError(f"--corruption must be in [0, 1), got {config.corruption}.")
    if config.model not in ("softmax", "mlp"):
        raise ValueError(f"--model must be 'softmax' or 'mlp', got {config.model!r}.")
    for name in ("outer_lr", "inner_lr", "threshold"):
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(config, name)}.")


def hyper_iteration_metrics(exp: Experiment, data: Data, config: Config) -> dict[str, float]:
    """Detection scores and weights of the corrupted / clean examples at the current λ, η."""
    weights = tf.sigmoid(exp.example_weights).numpy()
    return {**detection(weights, data.corrupted, config.threshold), "lr": float(exp.learning_rate),
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
    checkpointer = out.checkpointer(example_weights=exp.example_weights,
                                    learning_rate=exp.learning_rate, optimizer=exp.optimizer)
    start = out.resume_run(checkpointer)
    xv, yv = tf.constant(data.x_val), tf.constant(data.y_val)
    for i in common.progress(range(start, config.hyper_iterations), config.hyper_iterations,
                             label="hyper-cleaning"):
        metrics = hyper_iteration_metrics(exp, data, config)  # at λ_i, η_i
        seconds = time.perf_counter()
        val_loss = float(exp.run(config.T))
        seconds = time.perf_counter() - seconds
        out.log(i, {**metrics, "val_loss": val_loss, "val_accuracy": accuracy(exp.model, xv, yv),
                    "seconds": seconds})
        checkpointer.save(i + 1)
    steps = config.retrain_steps or config.T
    weights = tf.sigmoid(exp.example_weights).numpy()
    results = {**hyper_iteration_metrics(exp, data, config),
               "test_accuracy": retrained_accuracy(exp.problem, exp.model, steps, data),
               "val_accuracy": accuracy(exp.model, xv, yv),
               "baseline_test_accuracy": retrained_accuracy(exp.baseline, exp.model, steps, data),
               "oracle_test_accuracy": retrained_accuracy(exp.oracle, exp.model, steps, data)}
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
        T=flags.DEFINE_integer("T", d.T, "Inner GD steps per hyper-iteration.", **into),
        hyper_iterations=flags.DEFINE_integer("hyper_iterations", d.hyper_iterations,
                                              "Hyper-iterations (Adam steps on λ and η).", **into),
        outer_lr=flags.DEFINE_float("outer_lr", d.outer_lr, "Adam learning rate of λ and η.",
                                    **into),
        inner_lr=flags.DEFINE_float("inner_lr", d.inner_lr, "Initial inner learning rate η.",
                                    **into),
        retrain_steps=flags.DEFINE_integer("retrain_steps", d.retrain_steps,
                                           "GD steps of the final retraining (0: T).", **into),
        threshold=flags.DEFINE_float("threshold", d.threshold,
                                     "Weights below it flag an example as corrupted.", **into))
    return holders


def main() -> None:
    """Hyper-cleaning as the command line's flags configure it."""
    common.run_launcher(define_flags(), Config, check_config, load_data, run_experiment)


if __name__ == "__main__":
    main()
