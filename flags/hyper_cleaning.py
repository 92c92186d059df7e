"""Data hyper-cleaning (Franceschi et al., ICML 2017, §5.1; FAR-HO's AutoML demo, part 1).

A fraction of the training labels (``--corruption``: a third as in FAR-HO's demo, or half as in
BOME's data-cleaning script, github.com/Cranial-XIX/BOME hpo/data_cleaning.py, which draws a
uniform label that keeps the true one a tenth of the time) is replaced by a different random
label; one weight per training example, s_i = σ(λ_i), is a hyperparameter:

    L(w, λ) = (1/n) Σ_i s_i CE(f_w(x_i), ỹ_i) + (ρ/2)‖w‖²     inner: T steps of GD with rate η
    E(w)    = mean CE(f_w(x), y) over the clean validation set

(``--normalize_weights``: s_i = σ(λ_i) / mean σ(λ)), λ = 0 (σ = ½) at the start, updated along
the direction of ``--method``: reverse mode (far_ho2 ``ReverseHG``, ``--truncate`` K for
truncated; it also learns η, clipped to [1e-5, 1]), forward mode (``ForwardHG``: one tangent per
scalar hyperparameter, so it learns η and log ρ only, leaves the weights uniform and flags
nothing: it reports no detection scores), ``ImplicitHG`` (needs ρ > 0), BOME, the penalty
method, or ``StochasticHG`` on an SGLD chain at temperature τ (the last four learn λ only). f_w
is softmax regression or a one-hidden-layer MLP (Keras).

Each method has its own defaults of T, η, λ's rate, the hyper-iterations, the weighting and of
its settings (``METHOD_DEFAULTS``, over the registry's; a flag given overrides them): BOME's and
the penalty method's come from their official hyper-cleaning code where it fixes them, the rest
was measured here on the digits (seed 0, a third corrupted; docs/results/hyper_cleaning.md lists the measurements):

- BOME, github.com/Cranial-XIX/BOME hpo/data_cleaning.py: T = 10 steps of ŵ, φ = value, η = 0.1
  (``--iterations``, the ``u1·q̂`` rule, ``--u1``) and one SGD step with momentum 0.9 on λ and w
  jointly (``--w_momentum``; here ``--bome_momentum``, w's rate ``--bome_lr`` defaulting to η);
  ŵ's steps are plain GD, as the runs of hpo/grid.py (``--x_momentum 0``). Its rates (0.01 for w and ŵ, 100 for weights clamped to [0, 1]) are for
  standardised MNIST pixels: on the digits' [0, 1] pixels and logits λ they flag with F1 0.55
  after 500 iterations, so η = 1 for w and ŵ alike (equal, as there) and 300 for λ, measured.
- Penalty, github.com/hammlab/bilevel-penalty applications/data_denoising/mnist_experiments/
  small_scale/test_bilevel_importance_learning_mnist.py: T = 20, γ₀ = λ_g₀ = ε₀ = 0.01, ν₀ = 1e-4,
  at each passed stage γ ×1.1, λ_g and ε ×0.9, both rates ×0.9 (far_ho2 ``Penalty``'s
  defaults), Adam on λ, and the training loss weighted by w_i / Σ w (``--normalize_weights``;
  unnormalised, the penalty (γ/2)‖∇_w L‖² shrinks as every weight falls, and clean examples are
  flagged: F1 0.70). Its rates (Adam 3 on minibatch logits, Adam 1e-4 on w) are for another
  optimizer of w: GD at η = 1 and Adam 0.02 on λ, measured.
- reverse, forward, implicit, stochastic: no official hyper-cleaning setting (FAR-HO's demo,
  the closest, runs on MNIST); T, η, λ's rate (Adam) and the hyper-iterations were measured
  here: runs of 5-10 s that flag with F1 ≥ 0.8 and beat the baseline on seeds 0, 1 and 2. The
  implicit solver runs 20 CG iterations at most, the SGLD chain at τ = 1e-4 with the 'reversed'
  estimator and a burn-in of T/2 (``--stochastic_burn_in``).
- A method registered otherwise (``far.register_method``) takes reverse mode's T, η, λ's rate
  and hyper-iterations, learns λ only, with Adam, and its registry defaults.

Each hyper-iteration logs to metrics.csv the detection scores at λ_i, the validation loss, the
validation and test accuracy of the model the iteration leaves (w_T(λ_i); BOME and the penalty
method: their w, kept across iterations), its seconds and the elapsed total: test accuracy
against time, as in the BOME paper's plots. ``--time_budget`` S stops after S seconds of
hyper-iterations (over resumed runs) and ``--hyper_iterations`` N after N, whichever comes first
(as in flags.few_shot); with a budget and no --hyper_iterations only the budget counts.

At the end the model is retrained from its initial weights by one training, the same for every
method: ``--retrain_steps`` GD steps at ``--retrain_lr`` with ρ = ``--l2``, whatever η or ρ the
method learned, with the learned weights normalised to mean 1 (σ(λ_i)/mean σ(λ): the weights'
scale acts as a learning rate, not as cleaning), with uniform weights (the baseline: no
cleaning) and with the corrupted examples removed (the oracle); so the rows of different methods
are comparable (reverse and forward mode also report ``learned_rate_test_accuracy``: the
learned weights at the learned η, ρ). An example is flagged as corrupted when σ(λ_i) <
``--threshold``; precision, recall and F1 measure that detection (BOME's script scores the
other class, w > ½ as clean, which reads higher where fewer labels are corrupted). (RFHO's
ICML17 script instead projects the weights onto [0, 1] ∩ an L1 ball and flags λ < 1e-3; it also
retrains on train + validation.)

Data: by default the 1,797 real 8×8 handwritten digits bundled in data/digits/ (UCI's
*Optical Recognition of Handwritten Digits*, test file; origin, licence and checksum in its
README.md), pixels 0..16 scaled to [0, 1]. Their fixed test set is every third image (indices 0,
3, 6, …: 599 images, the same for every seed); training and validation examples are disjoint
subsets of the other 1198 drawn with ``--seed`` (800 and 200 by default). Or ``--data``: a
Keras-format MNIST / Fashion-MNIST .npz (x_train, y_train, x_test, y_test: uint8 images
[n, 28, 28] and integer labels), or a TensorFlow Datasets name (``mnist``, ``fashion_mnist``,
``kmnist``, …: a dataset of uint8 ``image`` and 10-class ``label`` features with splits train and
test, prepared in ``--tfds_data_dir``, or downloaded by TFDS with ``--tfds_download``; see
docs/data.md). ``--data`` is a file when it exists or ends with .npz, else a TFDS name. Training
and validation are drawn from x_train (TFDS: train) the same way, the test set is x_test (test)
(FAR-HO's demo used 1400 / 140 MNIST examples: ``--n_train 1400 --n_val 140``). The same images
in the same order give the same run from a .npz or from TFDS.

    python -m flags.hyper_cleaning --logdir /tmp/cleaning                   # reverse mode, the digits
    python -m flags.hyper_cleaning --logdir /tmp/bome --method bome         # any --method, its defaults
    python -m flags.hyper_cleaning --logdir /tmp/bome_60s --method bome --time_budget 60
    python -m flags.hyper_cleaning --data ~/.keras/datasets/mnist.npz --logdir /tmp/mnist
    python -m flags.hyper_cleaning --data mnist --tfds_data_dir ~/tensorflow_datasets --logdir /tmp/mnist_tfds
"""
import dataclasses
import os
import pathlib
import sys
from typing import Any, Callable, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import flags
from absl import logging

import far_ho2 as far
from far_ho2.launch import callbacks, cli, workdir
from far_ho2.launch.cli import setting
from flags import common
from far_ho2.launch import method_flags
from hyper_repr.data import tfds_source

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CLASSES = 10
DIGITS = pathlib.Path(__file__).resolve().parent.parent / "data" / "digits" / "digits.npz"
DIGITS_MAX = 16  # the digits' pixels count the ink in 4×4 blocks: 0..16
DIGITS_TEST_EVERY = 3  # the digits' fixed test set: images 0, 3, 6, …
RESUMABLE = ("hyper_iterations", "time_budget")  # settings a resumed run may change
PLOT = "weights.png"
UNLIMITED = 2 ** 31 - 1  # fit's epochs when only the time budget limits the run
STUCK_EVALUATIONS = 20  # hyper-iterations without a change of E that mean no progress


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment; the defaults are for the bundled digits: a third of the labels corrupted
    as in FAR-HO's demo, softmax regression as in the ICML17 paper, reverse-mode hypergradients.
    A setting left at None takes its method's default (``resolved``). The fields declared with
    ``setting`` are the launcher's flags (their help and bounds); the method's flags are defined
    in ``define_flags``."""

    data: Optional[str] = setting(None, "MNIST or Fashion-MNIST .npz in Keras format (x_train, y_train, x_test, "
                                  "y_test: a file that exists or ends with .npz), or a TensorFlow Datasets name "
                                  "(mnist, fashion_mnist, kmnist, ...: see --tfds_data_dir); default: the bundled "
                                  "8×8 digits (data/digits).")
    n_train: int = setting(800, "Training examples.", lower=1)
    n_val: int = setting(200, "Validation examples (clean labels).", lower=1)
    n_test: int = setting(0, "Test examples (0: all).", lower=0)
    corruption: float = setting(1 / 3, "Fraction of training labels replaced by another one (FAR-HO's demo: 1/3; "
                                "BOME's: 0.5).", lower=0, below=1)
    model: str = setting("softmax", "Classifier.", choices=("softmax", "mlp"))
    hidden: int = setting(300, "MLP hidden units.", lower=1)
    l2: float = setting(1e-3, "ρ: (ρ/2)‖θ‖² added to the training loss, and to the retrainings (implicit needs "
                        "ρ > 0; forward learns it).", lower=0)
    normalize_weights: Optional[bool] = setting(None, "Weight the training loss by σ(λ_i) / mean σ(λ) instead of "
                                                "σ(λ_i); default: the method's.")
    method: str = "reverse"  # a registered far_ho2 method (far.methods())
    T: Optional[int] = setting(None, "Inner steps per hyper-iteration (bome: steps of ŵ; penalty: steps on w); "
                               "default: the method's.", lower=1)
    hyper_iterations: Optional[int] = setting(None, "Hyper-iterations (steps on λ) at most; default: the method's, "
                                              "or none with --time_budget.", lower=1)
    time_budget: Optional[float] = setting(None, "Seconds of hyper-iterations (metrics not counted), over all "
                                           "resumed runs (default: no limit); the run stops at the budget or "
                                           "--hyper_iterations, whichever comes first.", positive=True)
    outer_lr: Optional[float] = setting(None, "Learning rate of λ (and η): Adam's, bome: SGD's with "
                                        "--bome_momentum; default: the method's.", positive=True)
    inner_lr: Optional[float] = setting(None, "(Initial) inner learning rate η; default: the method's.",
                                        positive=True)
    # the settings of --method (far_ho2.registry) given; the others: METHOD_DEFAULTS, then the registry's
    method_settings: dict = dataclasses.field(default_factory=dict)
    retrain_steps: int = setting(1000, "GD steps of the final retrainings (learned weights, baseline, oracle).",
                                 lower=1)
    retrain_lr: float = setting(0.5, "Learning rate of the final retrainings, whatever the method's η.",
                                positive=True)
    threshold: float = setting(0.5, "Weights below it flag an example as corrupted.", positive=True)
    seed: int = setting(0, "Seed of data subsets, corruption and init.")


class MethodDefaults(NamedTuple):
    """A method's defaults of the settings every method has, and of its own settings where they
    differ from the registry's (``far_ho2.registry``)."""

    T: int
    inner_lr: float
    outer_lr: float
    hyper_iterations: int
    normalize_weights: bool = False
    settings: dict = {}  # setting name -> value


# Forward mode carries one tangent per scalar hyperparameter, so it learns η and log ρ only (the
# example weights stay uniform: it does not clean); so would the pathwise Langevin estimator,
# which is refused.
NOT_CLEANING = ("forward",)  # the methods that learn no example weight
STOCHASTIC_ESTIMATORS = ("reversed", "score")
# Each method's defaults (see the module docstring for their sources); a method without an entry
# takes reverse mode's.
METHOD_DEFAULTS = {
    "reverse": MethodDefaults(T=50, inner_lr=0.3, outer_lr=0.1, hyper_iterations=100),
    "forward": MethodDefaults(T=50, inner_lr=0.3, outer_lr=0.1, hyper_iterations=100),
    "implicit": MethodDefaults(T=100, inner_lr=0.3, outer_lr=0.1, hyper_iterations=60, settings=dict(max_iter=20)),
    "bome": MethodDefaults(T=10, inner_lr=1.0, outer_lr=300.0, hyper_iterations=500,
                           settings=dict(eta=0.1, phi="value", momentum=0.9)),  # inner_learning_rate: η
    "penalty": MethodDefaults(T=20, inner_lr=1.0, outer_lr=0.02, hyper_iterations=300, normalize_weights=True,
                              settings=dict(nu=1e-4)),
    "stochastic": MethodDefaults(T=100, inner_lr=0.3, outer_lr=0.1, hyper_iterations=60,
                                 settings=dict(estimator="reversed", temperature=1e-4, burn_in=None)),  # None: T // 2
}


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


def is_npz_path(data: str) -> bool:
    """Whether ``--data`` names a .npz file (it exists, or its name ends with .npz) rather than a
    TensorFlow Datasets dataset."""
    return data.endswith(".npz") or os.path.exists(data)


def read_data(data: Optional[str], tfds: common.Tfds = common.Tfds()) -> dict[str, np.ndarray]:
    """The arrays of ``--data`` as ``read_npz`` returns them: the bundled digits (``None``), a
    .npz (``is_npz_path``) or a TFDS dataset (``read_tfds``)."""
    if not data:
        return read_digits()
    return read_npz(data) if is_npz_path(data) else read_tfds(data, tfds)


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The four arrays of a Keras-format MNIST / Fashion-MNIST .npz, checked: images as float32
    rows in [0, 1] (uint8 pixels / 255), labels as int64."""
    with common.open_npz(path, "data") as npz:
        missing = [k for k in NPZ_KEYS if k not in npz]
        if missing:
            raise ValueError(f"--data={path} lacks the arrays {missing}; an MNIST .npz in Keras "
                             f"format has {list(NPZ_KEYS)}.")
        arrays = {k: np.asarray(npz[k]) for k in NPZ_KEYS}
    return checked(arrays, f"--data={path}")


def read_tfds(name: str, tfds: common.Tfds = common.Tfds()) -> dict[str, np.ndarray]:
    """The splits train and test of the TensorFlow Datasets dataset ``name``, prepared in
    ``tfds.tfds_data_dir`` (or downloaded, with ``tfds.tfds_download``), as ``read_npz`` returns
    MNIST: its uint8 "image" and 10-class "label" features, in the prepared files' order.

    Raises:
        cli.LaunchError: naming --data for a name TFDS does not know, a dataset of other features
            or without a split train or test, or one not prepared (then naming --tfds_data_dir and
            --tfds_download).
    """
    if not tfds_source.is_dataset_name(name):
        raise cli.LaunchError(f"--data={name}: no such file, and no TensorFlow Datasets dataset of that name (give "
                              f"a Keras-format .npz or a TFDS name such as mnist, fashion_mnist, kmnist).")
    with cli.user_errors(common.TFDS_NAMES, prefix=f"--data={name}: "):
        builder = tfds_source.prepared_builder(name, tfds.tfds_data_dir, download=tfds.tfds_download)
    features = {key: builder.info.features[key] for key in builder.info.features.keys()}
    if (getattr(features.get("image"), "np_dtype", None) != np.uint8
            or getattr(features.get("label"), "num_classes", None) != CLASSES):
        raise cli.LaunchError(f"--data={name}: hyper-cleaning reads the uint8 'image' and {CLASSES}-class 'label' "
                              f"features; TFDS {name} has the features {sorted(features)}.")
    arrays = {}
    for split in ("train", "test"):
        try:
            batches = list(tfds_source.read_split(builder, split))
        except ValueError as error:  # TFDS's "Unknown split"
            raise cli.LaunchError(f"--data={name}: hyper-cleaning reads the splits train and test: {error}") from None
        arrays[f"x_{split}"] = np.concatenate([b["image"] for b in batches])
        arrays[f"y_{split}"] = np.concatenate([b["label"] for b in batches])
    return checked(arrays, f"--data={name}")


def checked(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The arrays (x_train, y_train, x_test, y_test: uint8 images, integer labels) of ``source``
    (as the user named it) as ``normalised`` returns them, once checked.

    Raises:
        ValueError: naming ``source`` if the images and labels of a split do not pair up, or a
            label is not in 0..CLASSES − 1.
    """
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y) or y.ndim != 1 or y.min() < 0 or y.max() >= CLASSES:
            raise ValueError(f"{source}: x_{split} {x.shape} and y_{split} {y.shape} must "
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


def load_data(config: Config, tfds: common.Tfds = common.Tfds()) -> Data:
    """The data of ``config``: the bundled digits, or the MNIST .npz or TFDS dataset of
    ``config.data`` (TFDS's: in ``tfds.tfds_data_dir``; ``read_data``).

    Training and validation examples are disjoint subsets of x_train drawn with ``config.seed``
    (so each seed draws other examples and other corruptions); the test set is the first
    ``n_test`` images of x_test (all for 0), the same for every seed.

    Raises:
        ValueError: if the sizes exceed the data or the .npz is malformed; FileNotFoundError.
    """
    arrays = read_data(config.data, tfds)
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


def weighted_loss(model: keras.Model, weights: Callable[[], tf.Tensor],
                  l2: Optional[Callable[[], tf.Tensor]] = None) -> Callable[[Any], tf.Tensor]:
    """The objective of a batch (x, y):  mean_i w_i · CE(model(x_i), y_i) + (ρ/2)‖θ‖²,  w =
    ``weights()`` and ρ = ``l2()`` (read at each call, so they may depend on hyperparameters; no
    ρ: 0), θ the model's weights."""
    def loss(batch: Any) -> tf.Tensor:
        x, y = batch
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
    """The model, the hyperparameters, the bilevel problem as a Keras model, and the problems that
    retrain the model. The retrainings run GD from the initial weights at ``retrain_lr`` with ρ =
    ``l2``, the same for every method."""

    model: keras.Model
    example_weights: tf.Variable  # λ
    learning_rate: tf.Variable  # η
    l2: Callable[[], tf.Tensor]  # ρ (learned by forward mode)
    bilevel: far.BilevelModel  # one hyper-iteration per element of `hyper_iterations_data`
    state: dict  # what a checkpoint holds besides the bilevel model and its optimizer
    learned: far.InnerProblem  # the weights σ(λ) / mean σ(λ)
    baseline: far.InnerProblem  # uniform weights
    oracle: far.InnerProblem  # the corrupted examples removed
    learned_rate: Optional[far.InnerProblem]  # σ(λ) / mean σ(λ) at the learned η and ρ (reverse, forward)




def outer_optimizer(config: Config) -> keras.optimizers.Optimizer:
    """λ's optimizer: Adam at ``outer_lr``; for BOME, SGD with its ``momentum``, whose step on λ
    and (BOME's own, at ``inner_learning_rate``) on w is the official code's joint step on (λ, w)
    (github.com/Cranial-XIX/BOME hpo/data_cleaning.py)."""
    if config.method == "bome":
        return keras.optimizers.SGD(config.outer_lr, momentum=float(config.method_settings["momentum"]))
    return keras.optimizers.Adam(config.outer_lr)


def hyper_iterations_data(data: Data) -> tf.data.Dataset:
    """The elements ``far.BilevelModel.fit`` takes, one per hyper-iteration: (training set,
    validation set), the whole of each (full-batch, as every method here runs)."""
    return tf.data.Dataset.from_tensors(((data.x_train, data.y_train), (data.x_val, data.y_val))).repeat()


def build(config: Config, data: Data) -> Experiment:
    """The model (seeded) and the bilevel problem of a ``resolved`` configuration, compiled; every
    problem starts from the same weights."""
    keras.utils.set_random_seed(config.seed)
    model = make_model(config, data.x_train.shape[1])
    lam = far.get_hyperparameter("example_weights", tf.zeros(len(data.x_train)))
    lr = far.get_hyperparameter("lr", float(config.inner_lr),
                                constraint=lambda v: tf.clip_by_value(v, 1e-5, 1.0))
    log_l2 = far.get_hyperparameter("log_l2", float(np.log(config.l2))) if config.method == "forward" else None
    l2 = (lambda: tf.exp(log_l2)) if log_l2 is not None else constant(config.l2)
    # Only reverse and forward mode differentiate the inner trajectory, so only they learn η (the
    # other methods see the inner problem's solution, or its Gibbs law, which η does not change).
    hypers = {"reverse": [lam, lr], "forward": [lr, log_l2]}.get(config.method, [lam])
    registered = far.registry.get_method(config.method)
    settings, inner = registered.split(config.method_settings)
    inner_optimizer = (far.SGLDOptimizer(lr, temperature=inner["temperature"], seed=config.seed)
                       if config.method == "stochastic" else far.GradientDescentOptimizer(lr))
    mean_one = lambda: tf.sigmoid(lam) / tf.reduce_mean(tf.sigmoid(lam))  # noqa: E731
    weights = mean_one if config.normalize_weights else lambda: tf.sigmoid(lam)
    method = registered.make(**settings)
    bilevel = far.BilevelModel(weighted_loss(model, weights, l2),
                               weighted_loss(model, constant(np.ones(len(data.x_val)))), inner_optimizer,
                               steps=config.T, hypergradient=method, inner_variables=model, hyperparameters=hypers)
    bilevel.compile(optimizer=outer_optimizer(config))
    bilevel.resolve(hyper_iterations_data(data))  # every variable exists: a checkpoint can be restored
    state = {"hyperparameters": [lam, lr] + ([log_l2] if log_l2 is not None else []),
             "inner_optimizer": list(inner_optimizer.run_variables), "method": method.state_variables()}
    clean = (~data.corrupted).astype(np.float32)
    train = (tf.constant(data.x_train), tf.constant(data.y_train))

    def retraining(weights: Callable[[], tf.Tensor], rate: Any = config.retrain_lr,
                   rho: Callable[[], tf.Tensor] = constant(config.l2)) -> far.InnerProblem:
        loss = weighted_loss(model, weights, rho)
        return far.InnerProblem(lambda: loss(train), far.GradientDescentOptimizer(rate),
                                var_list=model.trainable_variables)
    learned_rate = retraining(mean_one, lr, l2) if config.method in ("reverse", "forward") else None
    return Experiment(model, lam, lr, l2, bilevel, state, retraining(mean_one),
                      retraining(constant(np.ones_like(clean))), retraining(constant(clean / clean.mean())),
                      learned_rate)


# -- the experiment ----------------------------------------------------------------------------


def resolved(config: Config) -> Config:
    """``config`` with each setting left at None set: --T, --inner_lr, --outer_lr,
    --hyper_iterations and --normalize_weights to ``METHOD_DEFAULTS[method]``
    (--hyper_iterations stays None, no limit but the budget, when --time_budget is given), and
    every setting of the method (``method_settings``) to the value given, else
    ``METHOD_DEFAULTS``', else the registry's; then --bome_lr None to η, --stochastic_burn_in
    None to T // 2.

    Raises:
        ValueError: for an unknown ``method``.
    """
    method = registered_method(config)
    defaults = METHOD_DEFAULTS.get(config.method, METHOD_DEFAULTS["reverse"])._asdict()
    given = {k: v for k, v in config.method_settings.items() if v is not None}
    settings = {**method.defaults(defaults.pop("settings")), **given}
    if config.time_budget is not None:
        del defaults["hyper_iterations"]
    config = dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})
    if config.method == "bome" and settings["inner_learning_rate"] is None:
        settings["inner_learning_rate"] = config.inner_lr
    if config.method == "stochastic" and settings["burn_in"] is None:
        settings["burn_in"] = config.T // 2
    return dataclasses.replace(config, method_settings=settings)


def registered_method(config: Config) -> far.registry.Method:
    """The registered method of ``config.method``, or a ``ValueError`` naming --method."""
    if config.method not in far.methods():
        raise ValueError(f"--method must be one of {list(far.methods())}, got {config.method!r}.")
    return far.registry.get_method(config.method)


def check_config(config: Config) -> None:
    """Raises ``ValueError`` naming the first bad setting (of ``config`` as given, before or
    after ``resolved``), the method's settings by their flags (``--bome_eta``)."""
    method = registered_method(config)
    for name, value in config.method_settings.items():
        setting = method.setting(name)
        if value is not None:
            setting.check(value, f"--{method.flag(setting)}")
    config = resolved(config)
    settings = config.method_settings
    for name in ("n_train", "n_val", "T", "hyper_iterations", "hidden", "retrain_steps"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(config, name)}.")
    if config.n_test < 0:
        raise ValueError(f"--n_test must be ≥ 0, got {config.n_test}.")
    if not config.l2 >= 0:
        raise ValueError(f"--l2 must be ≥ 0, got {config.l2}.")
    if not 0 <= config.corruption < 1:
        raise ValueError(f"--corruption must be in [0, 1), got {config.corruption}.")
    if config.model not in ("softmax", "mlp"):
        raise ValueError(f"--model must be 'softmax' or 'mlp', got {config.model!r}.")
    for name in ("outer_lr", "inner_lr", "retrain_lr", "threshold", "time_budget"):
        if getattr(config, name) is not None and not getattr(config, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(config, name)}.")
    if config.method == "stochastic" and settings["estimator"] not in STOCHASTIC_ESTIMATORS:
        raise ValueError(f"--stochastic_estimator must be one of {STOCHASTIC_ESTIMATORS}, got "
                         f"{settings['estimator']!r} (it carries one tangent per scalar hyperparameter: "
                         f"{config.n_train} here).")
    if config.method in ("forward", "implicit") and not config.l2 > 0:
        what = "learns log ρ: --l2 (its initial ρ)" if config.method == "forward" else "needs ρ > 0: --l2"
        raise ValueError(f"--method={config.method} {what} must be positive, got {config.l2}.")
    if config.method == "reverse" and settings["truncate"] >= config.T:
        raise ValueError(f"--truncate={settings['truncate']} must be below --T={config.T} (0: no truncation).")
    if config.method == "stochastic" and settings["burn_in"] >= config.T:
        raise ValueError(f"--stochastic_burn_in={settings['burn_in']} must be below --T={config.T}.")


def hyper_iteration_metrics(exp: Experiment, data: Data, config: Config) -> dict[str, float]:
    """η, ρ and, for a method that learns the example weights (not those of ``NOT_CLEANING``),
    the detection scores and the mean weights of the corrupted / clean examples at λ."""
    metrics = {"lr": float(exp.learning_rate), "l2": float(exp.l2())}
    if config.method in NOT_CLEANING:
        return metrics
    weights = tf.sigmoid(exp.example_weights).numpy()
    return {**detection(weights, data.corrupted, config.threshold), **metrics,
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


class IterationMetrics(keras.callbacks.Callback):
    """Each hyper-iteration's row (``fit`` runs epochs of one): the detection scores, η and ρ at
    λ_i (``hyper_iteration_metrics``, taken at the epoch's start), then E before the update
    (``val_loss``) and the validation and test accuracy of the model the hyper-iteration leaves."""

    def __init__(self, exp: Experiment, data: Data, config: Config):
        super().__init__()
        self.exp, self.data, self.config, self.before = exp, data, config, {}
        self.val = (tf.constant(data.x_val), tf.constant(data.y_val))
        self.test = (tf.constant(data.x_test), tf.constant(data.y_test))

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self.before = hyper_iteration_metrics(self.exp, self.data, self.config)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        logs.update(self.before, val_loss=logs.pop("loss"), val_accuracy=accuracy(self.exp.model, *self.val),
                    test_accuracy=accuracy(self.exp.model, *self.test))


def run_experiment(config: Config, logdir: Any, *, resume: bool = True, data: Optional[Data] = None,
                   checkpoint_seconds: float = 60.0) -> dict:
    """Runs (or resumes) hyper-cleaning in ``logdir``: ``far.BilevelModel.fit``, one epoch per
    hyper-iteration, with the launchers' callbacks (a row per hyper-iteration in metrics.csv, the
    budget, checkpoints every ``checkpoint_seconds`` and on SIGINT/SIGTERM); then the retrained
    test accuracies and detection scores in results.json, weights.png. Returns the results.

    Args:
        config: the settings; those left at None take their method's defaults (``resolved``),
            and config.json records the values used.
        data: the data, if already loaded. Defaults to `None`: ``load_data(config)``.
        checkpoint_seconds: the longest time between checkpoints. Defaults to `60.0`.

    Raises:
        ValueError: for a bad configuration; FileNotFoundError for missing data;
            ``workdir.ConfigMismatchError`` if ``logdir`` holds a run with other settings.
        far.DivergenceError: if a hyper-iteration fails (a fresh run leaves nothing behind).
        callbacks.Interrupted: on SIGINT/SIGTERM, once the run is saved.
    """
    check_config(config)
    config = resolved(config)
    data = load_data(config) if data is None else data
    logging.info("Data: %d train (%d corrupted), %d val, %d test.", len(data.x_train),
                 data.corrupted.sum(), len(data.x_val), len(data.x_test))
    exp = build(config, data)
    with workdir.session(logdir, config, resume=resume, resumable=RESUMABLE, outputs=(PLOT,)) as run:
        budget = callbacks.TrainingBudget(config.hyper_iterations, config.time_budget)
        chance = callbacks.Stagnation("val_accuracy", chance=1 / CLASSES, patience=None)
        stuck = callbacks.Stagnation("val_loss", patience=STUCK_EVALUATIONS)
        checkpoint = callbacks.Checkpoint(run.path / workdir.CHECKPOINTS, every_seconds=checkpoint_seconds,
                                          track=[budget, chance, stuck], variables=exp.state, at_epoch_end=False)
        done = checkpoint.restore(exp.bilevel)
        workdir.drop_rows(run.path, done.epochs)
        if budget.stopped_by is None:
            exp.bilevel.fit(hyper_iterations_data(data), steps_per_epoch=1, initial_epoch=done.epochs,
                            epochs=config.hyper_iterations or UNLIMITED, verbose=0,
                            callbacks=[budget, IterationMetrics(exp, data, config), chance, stuck,
                                       keras.callbacks.CSVLogger(str(run.path / workdir.METRICS), append=True),
                                       callbacks.tensorboard(run.path / "tensorboard"), checkpoint])
        xv, yv = tf.constant(data.x_val), tf.constant(data.y_val)
        xt, yt = tf.constant(data.x_test), tf.constant(data.y_test)
        results = {**hyper_iteration_metrics(exp, data, config), "hyper_iterations_done": budget.iterations_done,
                   "elapsed": budget.elapsed, "final_model_test_accuracy": accuracy(exp.model, xt, yt),
                   "val_accuracy": accuracy(exp.model, xv, yv)}
        if exp.learned_rate is not None:
            results["learned_rate_test_accuracy"] = retrained_accuracy(exp.learned_rate, exp.model,
                                                                       config.retrain_steps, data)
        results.update({
            "test_accuracy": retrained_accuracy(exp.learned, exp.model, config.retrain_steps, data),
            "baseline_test_accuracy": retrained_accuracy(exp.baseline, exp.model, config.retrain_steps, data),
            "oracle_test_accuracy": retrained_accuracy(exp.oracle, exp.model, config.retrain_steps, data)})
        if config.method not in NOT_CLEANING:
            plot_weights(tf.sigmoid(exp.example_weights).numpy(), data.corrupted, config.threshold, run.path)
        common.print_table("Hyper-cleaning", [{k: float(v) for k, v in results.items()}])
        verdict = chance.verdict or stuck.verdict
        if verdict:
            sys.stdout.write(f"Warning: {verdict}: hyper-cleaning learned nothing; change --inner_lr or --outer_lr.\n")
        saved = {"metrics": results, "no_progress": verdict, "config": config}
        workdir.write_json(run.path / workdir.RESULTS, saved)
    return workdir.jsonable(saved)


# -- flags -------------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """Hyper-cleaning's flags, defined in ``flag_values``: the run's (``cli.define_run_flags``),
    one per ``setting`` field of ``Config`` (``cli.define_flags``), the TensorFlow Datasets ones
    (``common.define_tfds_flags``) and the method's."""
    d = Config()
    holders = cli.define_run_flags(flag_values)
    holders.update(cli.define_flags(Config, flag_values=flag_values))
    holders.update(common.define_tfds_flags(flag_values))
    holders.update(method_flags.define_flags(
        flag_values, default=d.method, defaults={name: m.settings for name, m in METHOD_DEFAULTS.items()},
        method_help="The far_ho2 method: reverse (also learns η), forward (learns η and log ρ only: no "
                    "example weights), stochastic (Langevin inner dynamics), ...; its settings are the flags "
                    "named after it."))
    return holders


def config_from_flags(holders: dict[str, flags.FlagHolder]) -> Config:
    """The ``Config`` of the parsed flags ``holders``: a flag per ``setting`` field
    (``cli.config_values``), ``--method``, and its settings from their flags
    (``method_flags.settings_from_flags``).

    Raises:
        ValueError: for a setting flag of another method given, or one out of its range.
    """
    return Config(**cli.config_values(Config, holders), method=holders["method"].value,
                  method_settings=method_flags.settings_from_flags(holders))


def launch(holders: dict[str, flags.FlagHolder]) -> None:
    """Hyper-cleaning as the command line's flags configure it; bad settings and data stop it
    before anything is written."""
    with cli.user_errors():
        config = config_from_flags(holders)
        check_config(config)
        if not config.data or is_npz_path(config.data):
            common.check_not_given(holders, common.TFDS_FLAGS,
                                   f"--data={config.data}" if config.data else "the bundled digits")
        data = load_data(config, common.tfds_from_flags(holders))
    run_experiment(config, holders["logdir"].value, resume=holders["resume"].value, data=data,
                   checkpoint_seconds=holders["checkpoint_seconds"].value)


def main() -> None:
    """Hyper-cleaning as the command line's flags configure it."""
    holders = define_flags()
    cli.run(lambda: launch(holders), {f.name: f.name for f in dataclasses.fields(Config)})


if __name__ == "__main__":
    main()
