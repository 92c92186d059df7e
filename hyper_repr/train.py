"""A configured meta-training run of hyper-representation with Keras ``fit``:
``meta_train(config, workdir, splits)``.

``workdir`` is a ``far_ho2.launch.workdir`` folder (its lock, config.json, the resume check, the
clean-up of a failed first launch) holding

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
                   raw pixels and the untrained network (the initial weights), and
                   ``no_progress``: a sentence if validation accuracy ended at chance or stuck

A checkpoint in ``workdir`` means resume: meta-batch i holds episodes i·B … i·B + B − 1 of the
stream ``seed`` (``data.episode_dataset(first_episode=i·B)``; 'multiclass': batch i of
``data.image_batches``), so a resumed run trains on the same data with the same weights as an
uninterrupted one; after a resume mid-epoch, the next validation comes ``eval_every``
hyper-iterations later. Training stops after ``iterations``, when validation accuracy has not
improved for ``patience`` epochs (``keras.callbacks.EarlyStopping``), when
``time_budget_seconds`` of hyper-iterations (validation not counted, over all runs) are spent,
or at a non-finite outer loss or
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
import dataclasses
import math
import pathlib
import tempfile
from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import far_ho2 as far
from far_ho2.launch import callbacks
from far_ho2.launch import workdir as workdir_lib
from far_ho2.launch.cli import setting
from far_ho2.launch.workdir import CONFIG, METRICS, RESULTS
from hyper_repr import data
from hyper_repr.model import BILEVEL, VARIANTS, HyperRepresentation
from hyper_repr.models import build_network

RESUMABLE = ("iterations", "time_budget_seconds", "patience")  # may change when resuming
BEST_MODEL = "best.keras"
OUTPUTS = (BEST_MODEL,)  # what a run writes besides workdir.OUTPUTS
read_metrics = workdir_lib.read_metrics


NETWORKS = ("omniglot", "c4l", "rn")  # models.build_network names
DTYPES = ("float32", "float64", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a meta-training run (defaults: Omniglot 5-way 1-shot, the FAR-HO
    example's meta-optimiser: meta-lr 1e-3, decay 1e-5, meta-batch 4). The fields declared with
    ``setting`` are the few-shot launchers' flags (``flags.few_shot``), their help and bounds
    included; the method's settings are defined by the launchers themselves."""

    network: str = setting("omniglot", "Representation h_λ: omniglot (conv-4, stride 2), c4l (conv-4, 32 filters, "
                           "max-pool) or rn (residual network).", choices=NETWORKS)
    batch_norm_scale: bool = setting(False, "Learn the normalisation scale γ too.")
    dtype: str = setting("float32", "Dtype of the network; mixed_bfloat16: float32 weights, bfloat16 computation "
                         "(mixed precision, for GPUs/TPUs with bfloat16 units).", choices=DTYPES)
    ways: int = setting(5, "N, classes per meta-training episode.", lower=1)
    test_ways: Optional[int] = setting(None, "N of the validation and test episodes (default: --ways).", lower=1)
    shots: int = setting(1, "k, support images per class.", lower=1)
    queries: int = setting(15, "Query images per class.", lower=1)
    test_queries: Optional[int] = setting(None, "Query images per class at validation and test (default: "
                                          "--queries).", lower=1)
    legacy_sampling: bool = setting(False, "Support images may reappear as queries (the original sampler).")
    augment_shift: int = setting(0, "Translate every meta-training image by up to this many pixels at random "
                                 "(augmentation; 0: none).", lower=0)
    steps: int = setting(5, "T, inner GD steps of the heads in meta-training.", flag="T", lower=1)
    test_steps: Optional[int] = setting(None, "Head GD steps at validation and test (default: --T).", flag="test_T",
                                        lower=1)
    learning_rate: float = setting(0.1, "η, the heads' learning rate (its initial value if learned).", flag="lr",
                                   positive=True)
    learn_lr: bool = setting(False, "Learn η as a hyperparameter (--nolearn_lr: fixed).")
    meta_batch_size: int = setting(4, "B, episodes per hyper-iteration.", lower=1)
    meta_lr: float = setting(1e-3, "Outer Adam learning rate.", positive=True)
    meta_lr_decay: float = setting(1e-5, "Inverse-time decay rate: meta_lr / (1 + decay·iteration).", lower=0)
    clip: Optional[float] = setting(None, "Clip hypergradients to ±clip (default: none).", positive=True)
    variant: str = setting("hyper", "Training variant (the paper's Table 4).", choices=VARIANTS)
    method: str = "reverse"  # a registered far_ho2 method (far.methods()), of the bilevel variants
    # its settings (far_ho2.registry) given; the others: METHOD_DEFAULTS, then the registry's
    method_settings: dict = dataclasses.field(default_factory=dict)
    head_l2: float = setting(0.0, "γ, the heads' ridge penalty (γ/2)(‖W‖² + ‖b‖²), in training and evaluation "
                             "(implicit needs γ > 0).", lower=0)
    iterations: int = setting(50_000, "Hyper-iterations at most.", flag="hyper_iterations", lower=1)
    eval_every: int = setting(500, "Hyper-iterations between validations (a Keras epoch).", lower=1)
    eval_episodes: int = setting(600, "Validation episodes.", lower=1)
    test_episodes: int = setting(600, "Test episodes.", lower=1)
    test_shots: tuple = setting((), "k of the test evaluations, e.g. 1,5 (default: --shots).", lower=1, item=int)
    eval_batch_size: int = setting(50, "Episodes per compiled evaluation call.", lower=1)
    patience: int = setting(20, "Early stopping: validations without improvement.", lower=1)
    seed: int = setting(0, "Seed of the episodes, the initial weights and the splits.")
    time_budget_seconds: Optional[float] = setting(None, "Seconds of hyper-iterations (validation not counted), "
                                                   "over all resumed runs (default: no limit).", flag="time_budget",
                                                   positive=True)

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
                     for k, v in workdir_lib.read_json(path).items() if k in names})


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


def meta_train(config: Config, workdir: Any, splits: data.Splits, *, resume: bool = True,
               outputs: Sequence[str] = (), verbose: Any = "auto", checkpoint_seconds: float = 60.0,
               extra_callbacks: Sequence[keras.callbacks.Callback] = (),
               strategy: Optional[tf.distribute.Strategy] = None) -> dict:
    """Meta-trains with ``fit``, resuming from ``workdir`` if it holds a checkpoint; then
    meta-tests (see the module docstring). The model is built (and the config checked) before
    anything is written: a bad config leaves ``workdir`` as it was.

    Args:
        config: the settings.
        workdir: output folder (created).
        splits: train / val / test splits (``data.load_omniglot`` ...).
        resume: continue the run in ``workdir``; else delete its outputs (``workdir.OUTPUTS``,
            ``OUTPUTS`` and ``outputs``) first. Defaults to `True`.
        outputs: other files of the run, deleted when not resuming (e.g. a launcher's plots).
        verbose: ``fit``'s progress output: 0, 1 (a progress bar), 2 (a line per epoch) or
            "auto". Defaults to `"auto"`.
        checkpoint_seconds: the longest time between checkpoints. Defaults to `60.0`.
        extra_callbacks: more Keras callbacks for ``fit`` (e.g. timers), called after the
            budget's clock and before the run's own.
        strategy: the ``tf.distribute`` strategy to train under (see the module docstring).
            Defaults to `None`: the current one (one device, outside a strategy's scope).

    Returns:
        The content of results.json; ``no_progress`` is a sentence if the validation accuracy
        ended at chance or stopped moving (else None).

    Raises:
        ValueError: if the config is invalid, the data too small for its episodes, the
            meta-batch not a multiple of the replicas, or ``workdir`` holds a run with another
            config (``workdir.ConfigMismatchError``).
        workdir.LockedError: if another process trains in ``workdir``.
        callbacks.Interrupted: on SIGINT or SIGTERM, once the run is saved.
    """
    if config.eval_every < 1 or config.iterations < 1:
        raise ValueError(f"`eval_every` and `iterations` must be ≥ 1, got {config.eval_every} and "
                         f"{config.iterations}.")
    check_data(config, splits)
    strategy = strategy or tf.distribute.get_strategy()
    per_replica = check_replicas(config, strategy)
    with strategy.scope():
        model = build_model(config, splits)
    budget = callbacks.TrainingBudget(config.iterations, config.time_budget_seconds,
                                      episodes_per_iteration=config.meta_batch_size)
    logging.info("%s: %d replicas on %d worker(s); meta-batch of %d episodes, %d per replica.",
                 type(strategy).__name__, strategy.num_replicas_in_sync, callbacks.worker_count(strategy),
                 config.meta_batch_size, per_replica)
    root = pathlib.Path(workdir)
    chief = callbacks.is_chief(strategy)
    # the folder this process writes: the run's for the chief, a temporary one for another worker
    with contextlib.ExitStack() as stack:
        if chief:
            out = stack.enter_context(workdir_lib.session(root, config, resume=resume, resumable=RESUMABLE,
                                                          outputs=OUTPUTS + tuple(outputs))).path
        else:
            out = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="worker_")))
            stack.enter_context(workdir_lib.lock(out))
        _barrier(strategy)  # the other workers look for checkpoints once the chief has deleted them
        stopping = keras.callbacks.EarlyStopping("val_accuracy", mode="max", patience=config.patience,
                                                 restore_best_weights=True)
        best = keras.callbacks.ModelCheckpoint(str(out / BEST_MODEL), monitor="val_accuracy",
                                               mode="max", save_best_only=True)
        stagnation = callbacks.Stagnation("val_accuracy", chance=1 / _test_ways(config), patience=config.patience)
        checkpoint = callbacks.Checkpoint(out / workdir_lib.CHECKPOINTS, every_seconds=checkpoint_seconds,
                                          track=[budget, stopping, best, stagnation],
                                          restore_from=root / workdir_lib.CHECKPOINTS)
        done = checkpoint.restore(model)
        _check_same_start(strategy, done.iterations)  # (and the chief writes only after the others read)
        workdir_lib.drop_rows(out, done.epochs)
        history = None
        if budget.stopped_by is None and stopping.wait < config.patience:
            epochs = done.epochs + math.ceil((config.iterations - done.iterations) / config.eval_every)
            validation = evaluation_data(config, splits.val, shots=config.shots,
                                         num_episodes=config.eval_episodes)
            verbose = callbacks.verbosity(verbose)
            history = model.fit(
                training_data(config, splits.train, done.iterations), validation_data=validation,
                steps_per_epoch=config.eval_every, epochs=epochs, initial_epoch=done.epochs,
                shuffle=False, verbose=verbose,
                callbacks=[budget, *extra_callbacks, keras.callbacks.TerminateOnNaN(), stopping, best, stagnation,
                           keras.callbacks.CSVLogger(str(out / METRICS), append=True),
                           callbacks.tensorboard(out / "tensorboard"), checkpoint]
                + ([callbacks.ProgressBar()] if verbose else []))
        elif stopping.best_weights is not None:  # finished earlier: test its best weights
            model.set_weights(stopping.best_weights)
        nonfinite = history is not None and not np.isfinite(history.history["loss"][-1])
        stopped_by = ("non-finite loss" if nonfinite else budget.stopped_by
                      or ("patience" if stopping.wait >= config.patience else None))
        best_row = next((r for r in read_metrics(out) if r["epoch"] == stopping.best_epoch), {})
        results = {"iterations": budget.iterations_done, "elapsed_seconds": budget.elapsed,
                   "stopped_by": stopped_by, "no_progress": stagnation.verdict,
                   "best_val_accuracy": stopping.best, "best_iteration": best_row.get("iteration"),
                   **score(config, model, splits)}
        workdir_lib.write_json(out / RESULTS, results)
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
