"""A configured meta-training run of hyper-representation with Keras ``fit``:
``meta_train(config, workdir, splits)``.

``workdir`` holds

    config.json    the `Config`
    metrics.csv    ``keras.callbacks.CSVLogger``: a row per epoch (``eval_every`` hyper-iterations,
                   or fewer when the run stops or resumes mid-epoch), ended by a validation:
                   hyper-iterations done, elapsed seconds, the mean train outer loss E of the
                   epoch (``loss``), the learned η (``eta``), validation accuracy, CI and loss
    tensorboard/   ``keras.callbacks.TensorBoard``: the same scalars per epoch (train/, validation/)
    best.keras     ``keras.callbacks.ModelCheckpoint``: the model at its best validation accuracy
    checkpoints/   ``callbacks.Checkpoint``: the run's state every ``checkpoint_seconds``, at each
                   epoch end and on SIGINT/SIGTERM (weights, optimizer, the hyper-iteration, the
                   time spent, early stopping's best weights and patience count)
    results.json   test accuracies and CIs (best-validation weights) next to the baselines:
                   raw pixels and the untrained network (the initial weights)

A checkpoint in ``workdir`` means resume: meta-batch i holds episodes i·B … i·B + B − 1 of the
stream ``seed`` (``data.episode_dataset(first_episode=i·B)``; 'multiclass': batch i of
``data.image_batches``), so a resumed run trains on the same data with the same weights as an
uninterrupted one; after a resume mid-epoch, the next validation comes ``eval_every``
hyper-iterations later. Training stops after ``iterations``, when validation accuracy has not
improved for ``patience`` epochs (``keras.callbacks.EarlyStopping``), when
``time_budget_seconds`` of training (over all runs) are spent, or at a non-finite outer loss or
hypergradient (``keras.callbacks.TerminateOnNaN``); each stop ends an epoch, so it is validated.
A lock file keeps a second run out of ``workdir`` while one trains.
``meta_test(config, workdir, splits)`` tests the run's best.keras again, writing nothing.

``meta_train(..., strategy=)`` trains under a ``tf.distribute`` strategy of R replicas: the model
is built in its scope, each meta-batch of B episodes (R must divide B) is split across the
replicas by ``fit`` (see ``HyperRepresentation.train_step``) and the evaluations' episodes too.
Under ``MultiWorkerMirroredStrategy`` every worker runs ``meta_train`` with the same arguments:
the chief writes ``workdir`` (and holds its lock), the other workers write to temporary folders
that are deleted at the end (as Keras recommends), and every worker resumes from the chief's
checkpoints, so ``workdir`` must be a folder every worker reads (a shared filesystem).
"""

import contextlib
import csv
import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Iterator, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import far_ho2 as far
from hyper_repr import callbacks, data
from hyper_repr.model import BILEVEL, HyperRepresentation
from hyper_repr.models import build_network

RESUMABLE = ("iterations", "time_budget_seconds", "patience")  # may change when resuming
BEST_MODEL, METRICS, CONFIG, RESULTS = "best.keras", "metrics.csv", "config.json", "results.json"
LOCK = ".lock"
OUTPUTS = (CONFIG, METRICS, RESULTS, BEST_MODEL, "checkpoints", "tensorboard")  # what a run writes


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a meta-training run (defaults: Omniglot 5-way 1-shot, the FAR-HO
    example's meta-optimiser: meta-lr 1e-3, decay 1e-5, meta-batch 4)."""

    network: str = "omniglot"  # models.build_network name
    batch_norm_scale: bool = False  # learn the normalisation scale γ too
    dtype: str = "float32"
    ways: int = 5  # N of the meta-training episodes
    test_ways: Optional[int] = None  # N of the validation and test episodes; None: ways
    shots: int = 1  # k, support images per class
    queries: int = 15  # q, query images per class of the meta-training episodes
    test_queries: Optional[int] = None  # q of the validation and test episodes; None: queries
    legacy_sampling: bool = False  # support images may reappear in the query set (original)
    augment_shift: int = 0  # random translations of the meta-training images, in pixels
    steps: int = 5  # T, head GD steps of meta-training
    test_steps: Optional[int] = None  # T of validation and test; None: steps
    learning_rate: float = 0.1  # η, head learning rate (initial value if learned)
    learn_lr: bool = False
    meta_batch_size: int = 4  # B
    meta_lr: float = 1e-3
    meta_lr_decay: float = 1e-5  # inverse-time decay rate per iteration
    clip: Optional[float] = None  # hypergradient clipping value
    variant: str = "hyper"  # model.VARIANTS
    method: str = "reverse"  # a registered far_ho2 method (far.methods()), of the bilevel variants
    # its settings (far_ho2.registry) given; the others: METHOD_DEFAULTS, then the registry's
    method_settings: dict = dataclasses.field(default_factory=dict)
    head_l2: float = 0.0  # γ, the heads' ridge penalty (ImplicitHG needs γ > 0)
    iterations: int = 50_000
    eval_every: int = 500  # hyper-iterations per epoch: between validations
    eval_episodes: int = 600  # validation episodes
    test_episodes: int = 600
    test_shots: tuple = ()  # shots of the test evaluations; () means (shots,)
    eval_batch_size: int = 50  # episodes per compiled evaluation call
    patience: int = 20  # validations without improvement before stopping
    seed: int = 0
    time_budget_seconds: Optional[float] = None  # of training, over all runs

    @property
    def multiclass(self) -> bool:
        """The variant trains on batches of images (``data.image_batches``), not episodes."""
        return self.variant == "multiclass"


# Meta-learning's defaults of the methods' settings, where they differ from the registry's
# (far_ho2.registry; any setting given in `Config.method_settings` overrides them). The solver is
# not warm-started: each meta-batch has new episodes. BOME's barrier and the penalty term also move
# λ towards features on which the heads' loss is flat: with the official η = 0.5 or γ = 1 the
# bundled-Omniglot runs stayed near chance (24.5 and 24.7 % 5-way validation accuracy after 60 s),
# with 0.01 they learn (73.1, 73.3 %); γ is held (ε = 0): the episodes change at every
# hyper-iteration. The Langevin heads run at τ = 1e-3 with the O(|w| + |λ|) 'reversed' estimator.
METHOD_DEFAULTS = {
    "implicit": dict(max_iter=20, warm_start=False),
    "bome": dict(eta=0.01),
    "penalty": dict(gamma=0.01, lambda_g=0.01, epsilon=0.0),
    "stochastic": dict(estimator="reversed", temperature=1e-3),
}


def method_settings(config: Config) -> dict:
    """Every setting of ``config.method``: those given, else ``METHOD_DEFAULTS``', else the
    registry's."""
    method = far.registry.get_method(config.method)
    return {**method.defaults(METHOD_DEFAULTS.get(config.method)), **config.method_settings}


def hypergradient_method(config: Config) -> tuple[Optional[far.HyperGradient], dict]:
    """The far_ho2 method of ``config`` (None for the variants that do not use one) and the
    settings of the heads' optimizer it needs (e.g. the Langevin heads' ``temperature``)."""
    if config.variant not in BILEVEL:
        return None, {}
    method = far.registry.get_method(config.method)
    settings, inner = method.split(method_settings(config))
    return method.make(**settings), inner


class ConfigMismatchError(ValueError):
    """Resuming a workdir whose run has another config; ``fields`` are those that differ."""

    def __init__(self, workdir: pathlib.Path, fields: list):
        self.fields = fields
        super().__init__(f"{str(workdir)!r} holds a run with another config (fields {fields} "
                         f"differ); only {list(RESUMABLE)} may change on resume.")


class LockedError(RuntimeError):
    """Another process trains in the workdir."""


@contextlib.contextmanager
def lock(workdir: Any) -> Iterator[None]:
    """Holds an exclusive lock on ``workdir`` (released when the process ends, however it
    ends); ``meta_train`` trains under it.

    Raises:
        LockedError: if another process (or another ``lock`` of this one) holds it.
    """
    root = pathlib.Path(workdir)
    with open(root / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise LockedError(f"{str(root)!r} is in use by another run (process "
                              f"{f.read().strip() or '?'}); wait for it to end.") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_config(workdir: Any) -> Config:
    """The `Config` of the run in ``workdir`` (its config.json).

    Raises:
        FileNotFoundError: if ``workdir`` holds no config.json.
    """
    path = pathlib.Path(workdir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(workdir)!r} holds no trained run (no {CONFIG}): "
                                f"meta-train first.")
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: tuple(v) if isinstance(v, list) else v
                     for k, v in json.loads(path.read_text()).items() if k in names})


def _check_resumable(config: Config, root: pathlib.Path) -> None:
    saved = dataclasses.asdict(read_config(root))
    fields = dataclasses.asdict(config)
    changed = sorted(k for k in fields if k not in RESUMABLE
                     and json.loads(json.dumps(fields[k])) != json.loads(json.dumps(saved.get(k))))
    if changed:
        raise ConfigMismatchError(root, changed)


def _test_ways(config: Config) -> int:
    return config.test_ways or config.ways


def check_data(config: Config, splits: data.Splits,
               name: Callable[[str], str] = lambda field: f"`{field}`") -> None:
    """Raises a ValueError unless every episode of the run can be drawn; it names the fields of
    ``config`` at fault by ``name(field)`` (e.g. a launcher's flag names)."""
    evaluated = {"ways": "test_ways" if config.test_ways else "ways", "shots": "shots",
                 "queries": "test_queries" if config.test_queries else "queries"}
    sizes = {"ways": _test_ways(config), "queries": config.test_queries or config.queries}
    checks = [] if config.multiclass else [
        ("the training split", splits.train, dict(ways=config.ways, shots=config.shots,
                                                  queries=config.queries), {})]
    checks.append(("the validation split", splits.val, sizes | {"shots": config.shots}, evaluated))
    tested = evaluated | {"shots": "test_shots" if config.test_shots else "shots"}
    checks += [("the test split", splits.test, sizes | {"shots": k}, tested)
               for k in config.test_shots or (config.shots,)]
    for split_name, split, values, fields in checks:
        data.episodes.check_episode_size(
            split, **values, legacy_sampling=config.legacy_sampling, split_name=split_name,
            names={k: name(fields.get(k, k)) for k in values})


def check_replicas(config: Config, strategy: tf.distribute.Strategy,
                   name: Callable[[str], str] = lambda field: f"`{field}`") -> int:
    """B/R, the episodes of each replica of ``strategy``; a ValueError naming
    ``name("meta_batch_size")`` unless its R replicas divide the meta-batch B."""
    return far.distribute.replica_batch_size(config.meta_batch_size, strategy, name("meta_batch_size"))


def evaluation_data(config: Config, split: data.Split, *, shots: int, num_episodes: int) -> tf.data.Dataset:
    """The fixed validation or test episodes of ``config`` (test ways and queries)."""
    return data.evaluation_episodes(split, ways=_test_ways(config), shots=shots,
                                    queries=config.test_queries or config.queries,
                                    num_episodes=num_episodes, seed=config.seed,
                                    meta_batch_size=config.eval_batch_size,
                                    legacy_sampling=config.legacy_sampling)


def training_data(config: Config, split: data.Split, first_iteration: int = 0) -> tf.data.Dataset:
    """Meta-batches (or 'multiclass' batches) ``first_iteration``, ``first_iteration`` + 1, …"""
    if config.multiclass:
        size = config.meta_batch_size * config.ways * (config.shots + config.queries)
        return data.image_batches(split, batch_size=size, seed=config.seed, first_batch=first_iteration)
    return data.episode_dataset(split, ways=config.ways, shots=config.shots, queries=config.queries,
                                seed=config.seed, meta_batch_size=config.meta_batch_size,
                                legacy_sampling=config.legacy_sampling,
                                first_episode=first_iteration * config.meta_batch_size,
                                shift=config.augment_shift)


def _network(config: Config, splits: data.Splits) -> keras.Model:
    return build_network(config.network, tuple(splits.train.images.shape[1:]), seed=config.seed,
                         dtype=config.dtype, batch_norm_scale=config.batch_norm_scale)


def build_model(config: Config, splits: data.Splits) -> HyperRepresentation:
    """The compiled model of ``config``: outer Adam with inverse-time decay,
    meta_lr / (1 + meta_lr_decay · iteration)."""
    method, inner = hypergradient_method(config)
    model = HyperRepresentation(
        _network(config, splits), ways=config.ways, steps=config.steps,
        learning_rate=config.learning_rate, learn_lr=config.learn_lr, variant=config.variant,
        num_classes=len(splits.train.class_names) if config.multiclass else None, clip=config.clip,
        test_steps=config.test_steps, hypergradient=method, head_l2=config.head_l2,
        temperature=inner.get("temperature"))
    schedule = keras.optimizers.schedules.InverseTimeDecay(config.meta_lr, decay_steps=1,
                                                           decay_rate=config.meta_lr_decay)
    model.compile(optimizer=keras.optimizers.Adam(schedule))
    return model


def _drop_rows(path: pathlib.Path, epochs: int) -> None:
    """Drops the rows of metrics.csv logged for epochs ≥ ``epochs`` (not checkpointed)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if int(r[0]) < epochs]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, path)


def read_metrics(workdir: Any) -> list[dict]:
    """The rows of metrics.csv as numbers (a row per epoch, see the module docstring)."""
    path = pathlib.Path(workdir) / METRICS
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _tensorboard(log_dir: pathlib.Path) -> keras.callbacks.Callback:
    """``keras.callbacks.TensorBoard`` if the tensorboard package is installed, else
    ``callbacks.EpochScalars`` (the same epoch scalars, which that package can read later)."""
    if importlib.util.find_spec("tensorboard") is None:
        return callbacks.EpochScalars(log_dir)
    return keras.callbacks.TensorBoard(str(log_dir), write_graph=False, profile_batch=0)


def _delete(root: pathlib.Path, names: Sequence[str]) -> None:
    for name in names:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def meta_train(config: Config, workdir: Any, splits: data.Splits, *, resume: bool = True,
               outputs: Sequence[str] = (), verbose: Any = "auto", checkpoint_seconds: float = 60.0,
               extra_callbacks: Sequence[keras.callbacks.Callback] = (),
               strategy: Optional[tf.distribute.Strategy] = None) -> dict:
    """Meta-trains with ``fit``, resuming from ``workdir`` if it holds a checkpoint; then
    meta-tests (see the module docstring).

    Args:
        config: the settings.
        workdir: output folder (created).
        splits: train / val / test splits (``data.load_omniglot`` ...).
        resume: continue the run in ``workdir``; else delete its outputs (``OUTPUTS`` and
            ``outputs``) first. Defaults to `True`.
        outputs: other files of the run, deleted when not resuming (e.g. a launcher's plots).
        verbose: ``fit``'s progress output: 0, 1 (a progress bar), 2 (a line per epoch) or
            "auto". Defaults to `"auto"`.
        checkpoint_seconds: the longest time between checkpoints. Defaults to `60.0`.
        extra_callbacks: more Keras callbacks for ``fit`` (e.g. timers), called before the
            run's own.
        strategy: the ``tf.distribute`` strategy to train under (see the module docstring).
            Defaults to `None`: the current one (one device, outside a strategy's scope).

    Returns:
        The content of results.json.

    Raises:
        ValueError: if the config is invalid, the data too small for its episodes, the
            meta-batch not a multiple of the replicas, or ``workdir`` holds a run with another
            config (``ConfigMismatchError``).
        LockedError: if another process trains in ``workdir``.
        callbacks.Interrupted: on SIGINT or SIGTERM, once the run is saved.
    """
    if config.eval_every < 1 or config.iterations < 1:
        raise ValueError(f"`eval_every` and `iterations` must be ≥ 1, got {config.eval_every} and "
                         f"{config.iterations}.")
    check_data(config, splits)
    strategy = strategy or tf.distribute.get_strategy()
    per_replica = check_replicas(config, strategy)
    logging.info("%s: %d replicas on %d worker(s); meta-batch of %d episodes, %d per replica.",
                 type(strategy).__name__, strategy.num_replicas_in_sync, callbacks.worker_count(strategy),
                 config.meta_batch_size, per_replica)
    root = pathlib.Path(workdir)
    chief = callbacks.is_chief(strategy)
    if chief:
        root.mkdir(parents=True, exist_ok=True)
    # the folder this process writes: the run's for the chief, a temporary one for another worker
    with contextlib.nullcontext(str(root)) if chief else tempfile.TemporaryDirectory(prefix="worker_") as folder:
        out = pathlib.Path(folder)
        with lock(out):
            if not resume and chief:
                _delete(root, OUTPUTS + tuple(outputs))
            _barrier(strategy)  # the other workers look for checkpoints once the chief has deleted them
            if tf.train.latest_checkpoint(str(root / "checkpoints")) is not None:
                _check_resumable(config, root)
            with strategy.scope():
                model = build_model(config, splits)
            budget = callbacks.TrainingBudget(config.iterations, config.time_budget_seconds,
                                              episodes_per_iteration=config.meta_batch_size)
            stopping = keras.callbacks.EarlyStopping("val_accuracy", mode="max", patience=config.patience,
                                                     restore_best_weights=True)
            best = keras.callbacks.ModelCheckpoint(str(out / BEST_MODEL), monitor="val_accuracy",
                                                   mode="max", save_best_only=True)
            checkpoint = callbacks.Checkpoint(out / "checkpoints", every_seconds=checkpoint_seconds,
                                              track=[budget, stopping, best], restore_from=root / "checkpoints")
            done = checkpoint.restore(model)
            _check_same_start(strategy, done.iterations)  # (and the chief writes only after the others read)
            (out / CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=2))
            _drop_rows(out / METRICS, done.epochs)
            history = None
            if budget.stopped_by is None and stopping.wait < config.patience:
                epochs = done.epochs + math.ceil((config.iterations - done.iterations) / config.eval_every)
                validation = evaluation_data(config, splits.val, shots=config.shots,
                                             num_episodes=config.eval_episodes)
                history = model.fit(
                    training_data(config, splits.train, done.iterations), validation_data=validation,
                    steps_per_epoch=config.eval_every, epochs=epochs, initial_epoch=done.epochs,
                    shuffle=False, verbose=verbose,
                    callbacks=[*extra_callbacks, keras.callbacks.TerminateOnNaN(), budget, stopping, best,
                               keras.callbacks.CSVLogger(str(out / METRICS), append=True),
                               _tensorboard(out / "tensorboard"),
                               checkpoint])
            elif stopping.best_weights is not None:  # finished earlier: test its best weights
                model.set_weights(stopping.best_weights)
        nonfinite = history is not None and not np.isfinite(history.history["loss"][-1])
        stopped_by = ("non-finite loss" if nonfinite else budget.stopped_by
                      or ("patience" if stopping.wait >= config.patience else None))
        best_row = next((r for r in read_metrics(out) if r["epoch"] == stopping.best_epoch), {})
        results = {"iterations": budget.iterations_done, "elapsed_seconds": budget.elapsed,
                   "stopped_by": stopped_by, "best_val_accuracy": stopping.best,
                   "best_iteration": best_row.get("iteration"),
                   **score(config, model, splits)}
        (out / RESULTS).write_text(json.dumps(results, indent=2))
    return results


def _barrier(strategy: tf.distribute.Strategy) -> None:
    """Waits until every worker is here (an all-reduce of a scalar; nothing with one worker)."""
    if callbacks.worker_count(strategy) > 1:
        strategy.reduce("SUM", tf.constant(1.0), axis=None)


def _check_same_start(strategy: tf.distribute.Strategy, iterations: int) -> None:
    """Raises unless every worker resumed at the same hyper-iteration (each read the chief's
    checkpoints: a folder they all see)."""
    if callbacks.worker_count(strategy) > 1:
        mean = float(strategy.reduce("MEAN", tf.constant(float(iterations), tf.float64), axis=None))
        if mean != iterations:
            raise ValueError(f"The workers resumed at different hyper-iterations (this one at {iterations}, "
                             f"their mean {mean:g}): `workdir` must be a folder every worker reads.")


def _baselines(config: Config, splits: data.Splits, learning_rate: float) -> dict:
    """The untrained network (the initial weights, from the seed) and raw pixels, under heads
    with the learned η."""
    shape = tuple(splits.train.images.shape[1:])
    pixels = keras.Sequential([keras.Input(shape), keras.layers.Flatten()], name="pixels")
    models = {}
    for name, network in (("pixels", pixels), ("untrained", _network(config, splits))):
        models[name] = HyperRepresentation(network, ways=config.ways, steps=config.steps,
                                           learning_rate=learning_rate,
                                           test_steps=config.test_steps)
        models[name].compile()
    return models


def score(config: Config, model: HyperRepresentation, splits: data.Splits) -> dict:
    """Test accuracies of ``model`` and of the baselines on ``splits.test``, for each of
    ``config.test_shots``: ``{"learning_rate": η, "test": {"5way_1shot": {name: {"accuracy",
    "ci"}}}}``."""
    eta = float(keras.ops.convert_to_numpy(model.learning_rate))
    with model.distribute_strategy.scope():  # the baselines are evaluated as the model is
        models = {config.variant: model, **_baselines(config, splits, eta)}
    scores: dict = {}
    for shots in config.test_shots or (config.shots,):
        episodes = evaluation_data(config, splits.test, shots=shots, num_episodes=config.test_episodes)
        result = {name: m.evaluate(episodes, verbose=0, return_dict=True) for name, m in models.items()}
        scores[f"{_test_ways(config)}way_{shots}shot"] = {
            name: {"accuracy": r["accuracy"], "ci": r["ci"]} for name, r in result.items()}
        logging.info("test %d-way %d-shot: %s", _test_ways(config), shots,
                     {k: f"{100 * r['accuracy']:.2f} ± {100 * r['ci']:.2f}" for k, r in result.items()})
    return {"learning_rate": eta, "test": scores}


def load_model(workdir: Any) -> HyperRepresentation:
    """The model of the run in ``workdir`` at its best validation accuracy (best.keras).

    Raises:
        FileNotFoundError: if ``workdir`` holds no best.keras (never validated).
    """
    path = pathlib.Path(workdir) / BEST_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{str(workdir)!r} holds no validated model ({BEST_MODEL}): "
                                f"meta-train first.")
    return keras.models.load_model(path)


def meta_test(config: Config, workdir: Any, splits: data.Splits) -> dict:
    """Tests the run in ``workdir`` (its best.keras) without training, as ``meta_train`` does
    after training, with the evaluation settings of ``config`` (``test_*``, ``eval_batch_size``);
    writes nothing.

    Raises:
        FileNotFoundError: if ``workdir`` holds no validated model.
    """
    model = load_model(workdir)
    model.test_steps = config.test_steps or config.steps
    return score(config, model, splits)


def load_representation(workdir: Any, splits: Optional[data.Splits] = None) -> keras.Model:
    """The representation h_λ of the run in ``workdir`` at its best validation accuracy.

    Args:
        workdir: the folder of a ``meta_train`` run.
        splits: if given, the images the network will see: their shape must be its input shape.

    Raises:
        FileNotFoundError: if ``workdir`` holds no validated model.
        ValueError: if ``splits`` has images of another shape.
    """
    network = load_model(workdir).network
    if splits is not None and tuple(network.input_shape[1:]) != tuple(splits.train.images.shape[1:]):
        raise ValueError(f"The network of {str(workdir)!r} takes images of shape "
                         f"{tuple(network.input_shape[1:])}, the data has "
                         f"{tuple(splits.train.images.shape[1:])}.")
    return network
