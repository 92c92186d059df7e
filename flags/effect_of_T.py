"""The effect of T (Franceschi et al., ICML 2018, §5.1, Figures 3 and 4, Table 2).

A linear representation H (d×d, λ = H, initialised to the identity) is tuned for ridge heads:

    L(w, H) = ½‖X H w − Y‖² + (ρ/2)‖w‖²        inner, on the training set
    E(w, H) = ½‖Xv H w − Yv‖²                   outer, on the validation set

either through T steps of gradient descent from w₀ = 0 (the hypergradient of
f_T(H) = E(w_T(H), H) by far_ho2's ``ReverseHG``), or exactly through the bilevel solution

    w*(H) = ((XH)ᵀXH + ρI)⁻¹(XH)ᵀY,     f(H) = E(w*(H), H)

(autodiff through ``tf.linalg.solve``). Each T in ``--T_list`` (and ``exact``) is a separate run
with its own H. Every hyper-iteration logs f(H), f_T(H) (what the T-step method sees), the test
accuracy of the classifier argmax(X_test H w_T) and the seconds taken by the hypergradient and
the update (for ``exact``, f_T is f). table2.csv, also printed, lists per T the final f, f_T
and accuracies and the time per hyper-iteration; figure3.png plots f and f_T, figure4.png the
test accuracy. The inner learning rate is fixed: η = eta_scale / (σ_max(X)² + ρ), i.e. half
the stability limit 2/ℓ of L at H = I for eta_scale = 1.

Each run is a Keras ``fit`` (``HyperIterations``: one epoch per hyper-iteration, its step run
eagerly) with the launchers' callbacks (``far_ho2.launch``): metrics/<run>.csv, TensorBoard
scalars in tensorboard/<run>/, checkpoints/<run>/ every ``--checkpoint_seconds`` and on
Ctrl-C/SIGTERM; the same command resumes every run where it stopped.

Data (float64): ``--features`` (an .npz with X_train, Y_train, X_val, Y_val, X_test, Y_test;
Y one-hot or integer labels); else ``--representation LOGDIR``: the 256 features of the
representation learned by ``flags.omniglot`` in LOGDIR (its best-validation weights), on classes
of that run's test split, which it never saw in training (rotation classes, as in its episodes;
the network normalises each split's images as one batch, as it normalises an episode's support
or query set); else Omniglot pixels from ``--data_dir`` (unrotated characters); or ``--source
synthetic`` (class means plus noise, for tests). The paper's sizes: 100 classes, 3 training and
3 validation images per class, the rest of a class's 20 drawings for test.

    python -m flags.effect_of_T --logdir /tmp/effect_of_T --T_list 1,4,16,64,256,exact
    python -m flags.effect_of_T --logdir /tmp/effect_of_T --representation runs/omniglot
"""

import dataclasses
import math
import pathlib
from typing import Any, Callable, NamedTuple, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import flags
from absl import logging

import far_ho2 as far
from far_ho2.launch import callbacks, cli, workdir
from far_ho2.launch.cli import setting
from flags import common

EXACT = "exact"
SPLITS = ("train", "val", "test")
METRICS = "metrics"  # the folder of the runs' metrics: metrics/<run>.csv
RESUMABLE = ("hyper_iterations",)  # a resumed run may do more hyper-iterations
OUTPUTS = (METRICS, "table2.csv", "figure3.png", "figure4.png")


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment; the defaults are the paper's §5.1 setting on Omniglot pixels. Every field
    is a flag (``--T_list`` for ``T``, ``--source`` for ``data``)."""

    T: tuple[str, ...] = setting(("1", "4", "16", "64", "256", EXACT), "Inner GD steps T (positive ints) and/or "
                                 "'exact', one run each.", flag="T_list")
    hyper_iterations: int = setting(100, "Hyper-iterations per T.", lower=1)
    outer_optimizer: str = setting("adam", "Optimizer of H.", choices=("adam", "sgd"))
    outer_lr: float = setting(1e-3, "Learning rate of H.", positive=True)
    rho: float = setting(0.1, "Ridge penalty ρ of the inner problem.", positive=True)
    eta_scale: float = setting(1.0, "Inner lr η = eta_scale / (σ_max(X)² + ρ), in (0, 2).", positive=True, below=2)
    data: str = setting("omniglot", "Data source: Omniglot pixels from --data_dir, or class means plus noise "
                        "(ignored with --features or --representation).", flag="source",
                        choices=("omniglot", "synthetic"))
    data_dir: str = setting("data/omniglot", "Omniglot folder.")
    features: Optional[str] = setting(None, ".npz of X_/Y_ train/val/test (overrides --source).")
    representation: Optional[str] = setting(None, "--logdir of a finished flags.omniglot run: its learned "
                                            "features (overrides --source).")
    classes: int = setting(100, "Number of classes.", lower=1)
    train_per_class: int = setting(3, "Training images per class (the inner problem's data).", lower=1)
    val_per_class: int = setting(3, "Validation images per class (the outer objective's data).", lower=1)
    test_per_class: int = setting(15, "Test images per class, at most what is left of a class's images (only "
                                  "for the test accuracy).", lower=1)
    dim: int = setting(0, "Random projection to dim features (0: none).", lower=0)
    seed: int = setting(0, "Seed of the classes, the splits and the projection.")


FLAG_NAMES = cli.flag_names(Config)  # field -> flag: T -> T_list, data -> source


class Data(NamedTuple):
    """Inputs [n, d] and one-hot targets [n, c] of each split, float64."""

    X_train: np.ndarray
    Y_train: np.ndarray
    X_val: np.ndarray
    Y_val: np.ndarray
    X_test: np.ndarray
    Y_test: np.ndarray


# -- data --------------------------------------------------------------------------------------


def one_hot(y: np.ndarray, classes: Optional[int] = None) -> np.ndarray:
    """Integer labels as one-hot rows; one-hot rows unchanged."""
    y = np.asarray(y)
    if y.ndim == 2:
        return y.astype(np.float64)
    return np.eye(classes or int(y.max()) + 1)[y.astype(np.int64)]


def load_features(path: str) -> Data:
    """An .npz with the six arrays of ``Data`` (Y one-hot or integer labels)."""
    with common.open_npz(path, "features") as npz:
        missing = [k for k in Data._fields if k not in npz]
        if missing:
            raise ValueError(f"--features={path} lacks the arrays {missing}; it needs "
                             f"{list(Data._fields)}.")
        arrays = {k: np.asarray(npz[k]) for k in Data._fields}
    classes = max(int(arrays[f"Y_{s}"].max()) + 1 if arrays[f"Y_{s}"].ndim == 1
                  else arrays[f"Y_{s}"].shape[1] for s in SPLITS)
    return Data(**{k: (one_hot(v, classes) if k.startswith("Y") else
                       v.reshape(len(v), -1).astype(np.float64)) for k, v in arrays.items()})


def synthetic_data(config: Config) -> Data:
    """Class means (unit Gaussian, in ``dim`` or 64 dimensions) plus Gaussian noise."""
    rng = np.random.default_rng(config.seed)
    d = config.dim or 64
    means = rng.normal(size=(config.classes, d))
    per_class = (config.train_per_class, config.val_per_class, config.test_per_class)
    arrays = []
    for n in per_class:
        labels = np.repeat(np.arange(config.classes), n)
        arrays += [means[labels] + rng.normal(size=(len(labels), d)), one_hot(labels, config.classes)]
    return Data(*arrays)


def split_classes(split: Any, candidates: np.ndarray, config: Config,
                  features: Callable[[np.ndarray], np.ndarray]) -> Data:
    """``classes`` random classes among ``candidates`` (class indices of ``split``), the images of
    each split at random into train / val / test (``*_per_class``); the inputs of a split are
    ``features(images)`` of its uint8 images [n, H, W, C]."""
    if config.classes > len(candidates):
        raise ValueError(f"--classes={config.classes}: the Omniglot images give only "
                         f"{len(candidates)} classes here.")
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(candidates, config.classes, replace=False))
    wanted = (config.train_per_class, config.val_per_class, config.test_per_class)
    parts: list[list[np.ndarray]] = [[], [], []]
    labels: list[list[np.ndarray]] = [[], [], []]
    for label, c in enumerate(chosen):
        start, stop = split.class_starts[c], split.class_starts[c + 1]
        if stop - start <= sum(wanted[:2]):
            raise ValueError(f"Omniglot class {split.class_names[c]} has {stop - start} images, "
                             f"fewer than --train_per_class + --val_per_class + 1.")
        order = start + rng.permutation(stop - start)
        for k, indices in enumerate(np.split(order, np.cumsum(wanted))[:3]):
            parts[k].append(np.sort(indices))
            labels[k].append(np.full(len(indices), label))
    images = np.asarray(split.images)
    arrays = []
    for k in range(3):
        arrays += [np.asarray(features(images[np.concatenate(parts[k])]), np.float64),
                   one_hot(np.concatenate(labels[k]), config.classes)]
    return Data(*arrays)


def omniglot_data(config: Config) -> Data:
    """Omniglot pixels (ink in [0, 1], 784 per image) of ``classes`` random characters
    (unrotated), each split into train/val/test images at random."""
    from hyper_repr.data import load_omniglot  # noqa: PLC0415 (only this data source needs it)
    split = load_omniglot(config.data_dir, test_alphabets=[], seed=config.seed).train
    characters = np.arange(0, len(split.class_names), 4)  # class 4i + r is character i at 90r°
    return split_classes(split, characters, config, lambda x: x.reshape(len(x), -1) / 255.0)


def representation_data(config: Config) -> Data:
    """The features h_λ(x) of the representation learned by ``flags.omniglot`` in
    ``config.representation`` (best-validation weights), on ``classes`` classes of that run's
    test split; each split's images are normalised as one batch (transductive, as episodes)."""
    from flags import omniglot  # noqa: PLC0415 (only this data source needs them)
    from hyper_repr import train  # noqa: PLC0415
    results = pathlib.Path(config.representation) / workdir.RESULTS
    if not results.is_file():
        raise FileNotFoundError(f"--representation={config.representation}: no {workdir.RESULTS}; "
                                f"give the --logdir of a finished `python -m flags.omniglot` run.")
    run_flags = workdir.read_json(results).get("flags", {})  # the run's split, if it had flags
    split_flags = ("data_source", "tfds_data_dir", "tfds_splits", "split", "test_alphabets", "val_alphabets",
                   "val_characters")
    splits = omniglot.load_splits(run_flags.get("data_dir", config.data_dir),
                                  **{k: run_flags[k] for k in split_flags if k in run_flags})
    network = train.load_representation(config.representation, splits)
    return split_classes(splits.test, np.arange(len(splits.test.class_names)), config,
                         lambda x: network(tf.constant(x, network.dtype) / 255.0).numpy())


def project(data: Data, dim: int, seed: int) -> Data:
    """Inputs times a Gaussian matrix [d, dim] / √dim (a random projection)."""
    P = np.random.default_rng([seed, 1]).normal(size=(data.X_train.shape[1], dim)) / np.sqrt(dim)
    return data._replace(**{f"X_{s}": getattr(data, f"X_{s}") @ P for s in SPLITS})


def load_data(config: Config) -> Data:
    """The data the configuration names (see the module docstring)."""
    if config.features:
        data = load_features(config.features)
    elif config.representation:
        data = representation_data(config)
    elif config.data == "synthetic":
        return synthetic_data(config)
    elif config.data == "omniglot":
        data = omniglot_data(config)
    else:
        raise ValueError(f"--source must be 'omniglot' or 'synthetic', got {config.data!r}.")
    return project(data, config.dim, config.seed) if config.dim else data


# -- the two hypergradient methods -------------------------------------------------------------


def exact_weights(H: tf.Tensor, X: tf.Tensor, Y: tf.Tensor, rho: tf.Tensor) -> tf.Tensor:
    """w*(H) = ((XH)ᵀXH + ρI)⁻¹(XH)ᵀY."""
    A = X @ H
    gram = tf.matmul(A, A, transpose_a=True) + rho * tf.eye(tf.shape(H)[1], dtype=H.dtype)
    return tf.linalg.solve(gram, tf.matmul(A, Y, transpose_a=True))


def outer_objective(H: tf.Tensor, w: tf.Tensor, X: tf.Tensor, Y: tf.Tensor) -> tf.Tensor:
    """E(w, H) = ½‖X H w − Y‖²."""
    return 0.5 * tf.reduce_sum((X @ H @ w - Y) ** 2)


@tf.function(reduce_retracing=True)
def exact_objective(H: tf.Tensor, X: tf.Tensor, Y: tf.Tensor, Xv: tf.Tensor, Yv: tf.Tensor,
                    rho: tf.Tensor) -> tf.Tensor:
    """f(H) = E(w*(H), H), the exact bilevel objective."""
    return outer_objective(H, exact_weights(H, X, Y, rho), Xv, Yv)


def accuracy(H: tf.Tensor, w: tf.Tensor, X: tf.Tensor, Y: tf.Tensor) -> tf.Tensor:
    """The fraction of rows where argmax(X H w) is the class of Y."""
    hits = tf.equal(tf.argmax(X @ H @ w, axis=1), tf.argmax(Y, axis=1))
    return tf.reduce_mean(tf.cast(hits, tf.float64))


def inner_learning_rate(data: Data, rho: float, eta_scale: float) -> float:
    """η = eta_scale / ℓ, ℓ = σ_max(X)² + ρ the Lipschitz constant of ∇_w L at H = I."""
    return eta_scale / (np.linalg.norm(data.X_train, 2) ** 2 + rho)


class Method(NamedTuple):
    """One run's hyper-iteration ``step() -> (f_T, w_T)`` (both at H before the update)."""

    name: str
    step: Callable[[], tuple[tf.Tensor, tf.Tensor]]


def unrolled_method(T: int, H: tf.Variable, tensors: Data, rho: float, eta: float,
                    optimizer: keras.optimizers.Optimizer) -> Method:
    """T steps of GD from w₀ = 0, reverse-mode hypergradient (far_ho2 ``ReverseHG``)."""
    X, Y, Xv, Yv = tensors.X_train, tensors.Y_train, tensors.X_val, tensors.Y_val
    w = tf.Variable(tf.zeros((H.shape[1], Y.shape[1]), tf.float64), name="w")
    inner = lambda f: 0.5 * tf.reduce_sum((f[0] @ w - f[1]) ** 2) + 0.5 * rho * tf.reduce_sum(w ** 2)
    run = far.HyperOptimizer(far.ReverseHG()).minimize(
        lambda: outer_objective(H, w, Xv, Yv), optimizer, inner, far.GradientDescentOptimizer(eta),
        hyper_list=[H], var_list=[w], features=lambda batch: (batch[0] @ H, batch[1]))

    def step():
        value = run(T, inner_objective_feed_dicts=(X, Y))
        return value, tf.identity(w)
    return Method(f"T{T}", step)


def exact_method(H: tf.Variable, tensors: Data, rho: float,
                 optimizer: keras.optimizers.Optimizer) -> Method:
    """The exact bilevel hypergradient ∇f(H), by autodiff through ``tf.linalg.solve``."""
    X, Y, Xv, Yv = tensors.X_train, tensors.Y_train, tensors.X_val, tensors.Y_val

    @tf.function
    def value_and_grad():
        with tf.GradientTape() as tape:
            tape.watch(H)  # hyperparameters are not trainable variables
            w = exact_weights(H, X, Y, rho)
            value = outer_objective(H, w, Xv, Yv)
        return value, w, tape.gradient(value, H)

    def step():
        value, w, grad = value_and_grad()
        optimizer.apply_gradients([(grad, H)])
        return value, w
    return Method(EXACT, step)


def make_optimizer(config: Config) -> keras.optimizers.Optimizer:
    if config.outer_optimizer == "adam":
        return keras.optimizers.Adam(config.outer_lr)
    if config.outer_optimizer == "sgd":
        return keras.optimizers.SGD(config.outer_lr)
    raise ValueError(f"--outer_optimizer must be 'adam' or 'sgd', got {config.outer_optimizer!r}.")


def parse_T(values: Sequence[str]) -> list[Any]:
    """``--T_list`` as positive ints and the string "exact"."""
    parsed = []
    for v in values:
        v = str(v).strip()
        if v == EXACT:
            parsed.append(EXACT)
        elif v.isdigit() and int(v) > 0:
            parsed.append(int(v))
        else:
            raise ValueError(f"--T_list: each value must be a positive int or '{EXACT}', got {v!r}.")
    if not parsed:
        raise ValueError("--T_list is empty: give at least one value, e.g. --T_list=1,4,16,exact.")
    return parsed


def check_config(config: Config) -> list[Any]:
    """Validates the configuration; returns the parsed T values."""
    if config.hyper_iterations < 1:
        raise ValueError(f"--hyper_iterations must be positive, got {config.hyper_iterations}.")
    for name in ("outer_lr", "rho", "eta_scale"):
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(config, name)}.")
    if config.eta_scale >= 2:
        raise ValueError(f"--eta_scale={config.eta_scale}: GD diverges at H = I for η ≥ 2/ℓ; "
                         "use a value in (0, 2).")
    for name in ("classes", "train_per_class", "val_per_class", "test_per_class"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(config, name)}.")
    return parse_T(config.T)


# -- the experiment ----------------------------------------------------------------------------


class HyperIterations(keras.Model):
    """One run (a T, or "exact") as a Keras model: ``train_step`` is the run's hyper-iteration,
    run eagerly (it calls the method's own compiled step); each epoch is one, logged with f(H_i)
    (taken at the epoch's start), f_T and the accuracies of w_T at H_i."""

    def __init__(self, method: Method, H: tf.Variable, tensors: Data, rho: float):
        super().__init__(name=method.name)
        self.method, self.tensors, self.rho = method, tensors, tf.constant(rho, tf.float64)
        self.__dict__["H"] = H  # saved by the checkpoint's `variables`
        self.start: dict = {}
        self.built = True

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        """Nothing to build: H and the method's variables exist."""

    def train_step(self, data: Any) -> dict:
        f_T, w = self.method.step()
        H, t = self.start["H"], self.tensors
        return {"f": self.start["f"], "f_T": f_T, "test_accuracy": accuracy(H, w, t.X_test, t.Y_test),
                "val_accuracy": accuracy(H, w, t.X_val, t.Y_val)}


class AtStart(keras.callbacks.Callback):
    """H_i and f(H_i), before the epoch's hyper-iteration (not timed by the budget)."""

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        model, t = self.model, self.model.tensors
        H = tf.identity(model.H)
        model.start = {"H": H, "f": exact_objective(H, t.X_train, t.Y_train, t.X_val, t.Y_val, model.rho)}


def train_run(method_T: Any, config: Config, data: Data, root: pathlib.Path, checkpoint_seconds: float) -> None:
    """One T (or "exact"): ``hyper_iterations`` hypergradient steps on a fresh H = I by ``fit``,
    resuming from the run's checkpoint (checkpoints/<run>/). Logs f, f_T, accuracies and the
    seconds of each hyper-iteration to metrics/<run>.csv."""
    tensors = Data(*(tf.constant(a, tf.float64) for a in data))
    d = data.X_train.shape[1]
    H = far.get_hyperparameter("H", np.eye(d))
    optimizer = make_optimizer(config)
    optimizer.build([H])
    if method_T == EXACT:
        method = exact_method(H, tensors, config.rho, optimizer)
    else:
        eta = inner_learning_rate(data, config.rho, config.eta_scale)
        method = unrolled_method(method_T, H, tensors, config.rho, eta, optimizer)
    model = HyperIterations(method, H, tensors, config.rho)
    model.compile(optimizer=optimizer, run_eagerly=True)
    budget = callbacks.TrainingBudget(config.hyper_iterations)
    checkpoint = callbacks.Checkpoint(root / workdir.CHECKPOINTS / method.name, every_seconds=checkpoint_seconds,
                                      track=[budget], variables={"H": H}, at_epoch_end=False)
    done = checkpoint.restore(model)
    metrics = metrics_file(method.name)
    (root / metrics).parent.mkdir(exist_ok=True)
    workdir.drop_rows(root, done.epochs, name=metrics)
    if budget.stopped_by is None:
        model.fit(tf.data.Dataset.from_tensors(0).repeat(), steps_per_epoch=1, epochs=config.hyper_iterations,
                  initial_epoch=done.epochs, verbose=0, shuffle=False,
                  callbacks=[budget, AtStart(), keras.callbacks.CSVLogger(str(root / metrics), append=True),
                             callbacks.tensorboard(root / "tensorboard" / method.name), checkpoint])


def metrics_file(name: str) -> str:
    """The metrics of the run ``name``, relative to the output folder."""
    return f"{METRICS}/{name}.csv"


def final_metrics(rows: list[dict], names: Sequence[str]) -> dict:
    """Per run: the last logged f, f_T, accuracies, and the median seconds per hyper-iteration
    (the first, which traces the compiled functions, excluded when there are others)."""
    results = {}
    for name in names:
        mine = sorted((r for r in rows if r["run"] == name), key=lambda r: int(r["epoch"]))
        last = mine[-1]
        seconds = [float(r["seconds"]) for r in mine]
        timed = seconds[1:] or seconds
        results[name] = {"f": float(last["f"]), "f_T": float(last["f_T"]),
                         "test_accuracy": float(last["test_accuracy"]),
                         "val_accuracy": float(last["val_accuracy"]),
                         "seconds_median": float(np.median(timed)),
                         "seconds_mean": float(np.mean(timed)), "seconds_first": seconds[0],
                         "hyper_iterations": len(mine)}
    return results


def log_scale_if_positive(ax: Any, axis: str, values: Sequence[float]) -> None:
    """A log scale on ``axis`` ("x" or "y") of ``ax`` if every finite value is positive (and
    there is one); else the linear scale stays (a log axis of values ≤ 0 cannot be drawn)."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        getattr(ax, f"set_{axis}scale")("log")


def plot_figures(rows: list[dict], names: Sequence[str], results: dict, path: Any) -> None:
    """figure3.png (f solid, f_T dashed vs hyper-iterations; the exact run has f only) and
    figure4.png (test accuracy vs hyper-iterations, and the final one vs T, the exact run's as a
    horizontal line). Log axes where the values allow them."""
    plt = common.pyplot()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = {n: sorted((r for r in rows if r["run"] == n), key=lambda r: int(r["epoch"]))
              for n in names}
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = []
    for k, name in enumerate(names):
        steps = [int(r["epoch"]) for r in series[name]]
        color = colors[k % len(colors)]
        for key, style in (("f", "-"), ("f_T", "--")) if name != EXACT else (("f", "-"),):
            values = [float(r[key]) for r in series[name]]
            ax.plot(steps, values, style, color=color, label=f"{name}: {key}")
            plotted += values
    log_scale_if_positive(ax, "y", plotted)
    ax.set(xlabel="hyper-iteration", ylabel="validation objective",
           title="Figure 3: f (solid) and f_T (dashed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path / "figure3.png", dpi=100)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for k, name in enumerate(names):
        left.plot([int(r["epoch"]) for r in series[name]],
                  [float(r["test_accuracy"]) for r in series[name]], color=colors[k % len(colors)],
                  label=name)
    left.set(xlabel="hyper-iteration", ylabel="test accuracy", title="Figure 4: test accuracy")
    left.legend(fontsize=7)
    unrolled = [n for n in names if n != EXACT]
    if unrolled:
        right.plot([int(n[1:]) for n in unrolled], [results[n]["test_accuracy"] for n in unrolled],
                   "o-", label="T steps")
        right.set_xscale("log")
    if EXACT in names:
        right.axhline(results[EXACT]["test_accuracy"], color="k", ls=":", label="exact")
    right.set(xlabel="T", ylabel="final test accuracy", title="vs T")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path / "figure4.png", dpi=100)
    plt.close(fig)


def summary_table(results: dict) -> list[dict]:
    """Table 2 with the final values: per T, f and f_T at the last hyper-iteration's H, the
    test and validation accuracy there, and the seconds per hyper-iteration."""
    keys = ("f", "f_T", "test_accuracy", "val_accuracy", "seconds_median", "seconds_mean",
            "seconds_first")
    return [{"T": name[1:] if name != EXACT else EXACT, **{k: metrics[k] for k in keys}}
            for name, metrics in results.items()]


def run_experiment(config: Config, logdir: Any, *, resume: bool = True, data: Optional[Data] = None,
                   checkpoint_seconds: float = 60.0) -> dict:
    """Runs (or resumes) every T of ``config`` in ``logdir``; writes metrics/<run>.csv,
    results.json, table2.csv, figure3.png and figure4.png, prints Table 2 with f, f_T and the
    accuracies. Returns the results.

    Args:
        data: the data, if already loaded. Defaults to `None`: ``load_data(config)``.
        checkpoint_seconds: the longest time between checkpoints. Defaults to `60.0`.

    Raises:
        ValueError: for a bad configuration; FileNotFoundError for missing data;
            ``workdir.ConfigMismatchError`` if ``logdir`` holds a run with other settings.
        callbacks.Interrupted: on SIGINT/SIGTERM, once the run is saved.
    """
    values = check_config(config)
    data = load_data(config) if data is None else data
    logging.info("Data: %s", {k: v.shape for k, v in data._asdict().items()})
    common.set_seed(config.seed)
    names = [EXACT if v == EXACT else f"T{v}" for v in values]
    with workdir.session(logdir, config, resume=resume, resumable=RESUMABLE, outputs=OUTPUTS) as run:
        for value in values:
            train_run(value, config, data, run.path, checkpoint_seconds)
        rows = [{"run": name, **row} for name in names for row in workdir.read_metrics(run.path, metrics_file(name))]
        results = final_metrics(rows, names)
        table = summary_table(results)
        common.write_csv(run.path / "table2.csv", table)
        saved = {"metrics": results, "config": config}
        workdir.write_json(run.path / workdir.RESULTS, saved)
        common.print_table("Table 2 (seconds per hyper-iteration) and the final f, f_T and "
                           "accuracies per T", table)
        plot_figures(rows, names, results, run.path)
    return workdir.jsonable(saved)


# -- flags -------------------------------------------------------------------------------------


def launch(holders: dict[str, flags.FlagHolder]) -> None:
    """The effect of T as the command line's flags configure it; bad settings and data stop it
    before anything is written."""
    with cli.user_errors(FLAG_NAMES):
        config = Config(**cli.config_values(Config, holders))
        check_config(config)
        data = load_data(config)
    run_experiment(config, holders["logdir"].value, resume=holders["resume"].value, data=data,
                   checkpoint_seconds=holders["checkpoint_seconds"].value)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """The effect-of-T flags, defined in ``flag_values``: the run's (``cli.define_run_flags``) and
    one per ``Config`` field (``cli.define_flags``; ``--T_list`` a list of values)."""
    return {**cli.define_run_flags(flag_values), **cli.define_flags(Config, flag_values=flag_values)}


def main() -> None:
    """The effect of T as the command line's flags configure it."""
    holders = define_flags()
    cli.run(lambda: launch(holders), FLAG_NAMES)


if __name__ == "__main__":
    main()
