"""Meta-training loop of hyper-representation: ``meta_train(config, workdir, splits)``.

``workdir`` holds

    config.json    the `Config`
    metrics.csv    a row per evaluation: iteration, elapsed seconds, mean train outer loss since
                   the previous row, validation accuracy and its 95% CI
    checkpoints/   tf.train.Checkpoint of the network, the outer Adam, the learned η, the
                   classifier ('classic'), the iteration, the elapsed time, the best validation
                   accuracy, the evaluations since it and the best weights
    results.json   test accuracies and CIs (best-validation weights) next to the baselines:
                   raw pixels and the untrained network (the initial weights)

A checkpoint in ``workdir`` means resume; ``meta_test(config, workdir, splits)`` tests a run's
best checkpoint again without training (and rewrites results.json). Meta-batch i holds episodes
i·B … i·B + B − 1 of the stream ``seed`` (``data.episode_dataset(first_episode=i·B)``), and
'classic' batch i is drawn by ``default_rng([seed, i])``, so a resumed run sees the same data as
an uninterrupted one.
Training stops after ``iterations``, when validation accuracy has not improved for ``patience``
evaluations, or when ``time_budget_seconds`` of training (over all runs) are spent.
"""

import csv
import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from hyper_repr import data, meta_learner
from hyper_repr.models import build_network

_RESUMABLE = ("iterations", "time_budget_seconds", "patience")  # may change when resuming
PROGRESS_SECONDS = 30.0  # a progress line at least this often between validations
_METRICS = ("iteration", "elapsed_seconds", "train_outer_loss", "val_accuracy", "val_ci")


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
    variant: str = "hyper"  # meta_learner.VARIANTS
    iterations: int = 50_000
    eval_every: int = 500  # iterations between validation evaluations (and checkpoints)
    eval_episodes: int = 600  # validation episodes
    test_episodes: int = 600
    test_shots: tuple = ()  # shots of the test evaluations; () means (shots,)
    eval_batch_size: int = 50  # episodes per compiled evaluation call
    patience: int = 20  # evaluations without improvement before stopping
    seed: int = 0
    time_budget_seconds: Optional[float] = None  # of training, over all runs


def classic_batch(split: data.Split, seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``index`` of 'classic' training: ``size`` images drawn uniformly from ``split`` by
    ``default_rng([seed, index])``, with their class numbers as labels."""
    rng = np.random.default_rng([seed, index])
    indices = np.sort(rng.choice(int(split.class_starts[-1]), size=size, replace=False))
    labels = np.searchsorted(split.class_starts, indices, side="right") - 1
    return np.asarray(split.images[indices], np.float32) / 255.0, labels.astype(np.int32)


class _Progress(tf.Module):
    """The loop's state that a checkpoint restores besides the learner's."""

    def __init__(self, weights: list):
        super().__init__()
        self.iteration = tf.Variable(0, dtype=tf.int64)
        self.elapsed = tf.Variable(0.0, dtype=tf.float64)
        self.best_accuracy = tf.Variable(-1.0, dtype=tf.float64)
        self.evaluations_since_best = tf.Variable(0, dtype=tf.int64)
        self.best_weights = [tf.Variable(w, trainable=False) for w in weights]


class ConfigMismatchError(ValueError):
    """Resuming a workdir whose run has another config."""


def _write_config(config: Config, workdir: pathlib.Path) -> None:
    path, fields = workdir / "config.json", dataclasses.asdict(config)
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in fields if k not in _RESUMABLE
                         and json.loads(json.dumps(fields[k])) != saved.get(k))
        if changed:
            raise ConfigMismatchError(
                f"`workdir` {str(workdir)!r} holds a run with another config (fields {changed} "
                f"differ); only {_RESUMABLE} may change on resume. Use a new workdir.")
    path.write_text(json.dumps(fields, indent=2))


def _truncate_metrics(path: pathlib.Path, iteration: int) -> None:
    """Creates metrics.csv, or drops rows written after the restored checkpoint."""
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, _METRICS)
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["iteration"]) <= iteration)


def _episodes(split: data.Split, config: Config, *, shots: int, num_episodes: int) -> Any:
    return data.evaluation_episodes(split, ways=_test_ways(config), shots=shots,
                                    queries=config.test_queries or config.queries,
                                    num_episodes=num_episodes, seed=config.seed,
                                    meta_batch_size=config.eval_batch_size,
                                    legacy_sampling=config.legacy_sampling)


def _test_ways(config: Config) -> int:
    return config.test_ways or config.ways


def _test_steps(config: Config) -> int:
    return config.test_steps or config.steps


def _train_batches(splits: data.Splits, config: Config, first: int):
    """Meta-batches (or 'classic' batches) first, first + 1, …"""
    if config.variant in ("classic", "multiclass"):
        size = config.meta_batch_size * config.ways * (config.shots + config.queries)
        index = first
        while True:
            yield classic_batch(splits.train, config.seed, index, size)
            index += 1
    yield from data.episode_dataset(splits.train, ways=config.ways, shots=config.shots,
                                    queries=config.queries, seed=config.seed,
                                    meta_batch_size=config.meta_batch_size,
                                    legacy_sampling=config.legacy_sampling,
                                    first_episode=first * config.meta_batch_size,
                                    shift=config.augment_shift)


class _Run(NamedTuple):
    """The learner of a run and the state its checkpoints hold (see `_restore`)."""

    learner: meta_learner.MetaLearner
    learned: list  # λ (+ η): the variables whose best-validation values are kept
    progress: _Progress
    manager: tf.train.CheckpointManager
    initial_weights: list  # the network's weights before meta-training (the 'untrained' baseline)


def _restore(config: Config, root: pathlib.Path, splits: data.Splits) -> _Run:
    """Builds the network and the learner of ``config``; restores the latest checkpoint in
    ``root``, if any."""
    input_shape = tuple(splits.train.images.shape[1:])
    network = build_network(config.network, input_shape, seed=config.seed, dtype=config.dtype,
                            batch_norm_scale=config.batch_norm_scale)
    initial_weights = [v.numpy() for v in network.trainable_variables]
    classic = config.variant in ("classic", "multiclass")
    learner = meta_learner.MetaLearner(
        network, ways=config.ways, meta_batch_size=config.meta_batch_size, steps=config.steps,
        learning_rate=config.learning_rate, learn_lr=config.learn_lr, meta_lr=config.meta_lr,
        meta_lr_decay=config.meta_lr_decay, clip=config.clip, variant=config.variant,
        num_classes=len(splits.train.class_names) if classic else None)
    learned = learner.hypers[:len(learner.hypers) - len(learner.classifier)]  # λ (+ η)
    progress = _Progress([v.numpy() for v in learned])
    checkpoint = tf.train.Checkpoint(network=network, optimizer=learner.optimizer, progress=progress,
                                     classifier=learner.classifier,
                                     learning_rate=learned[len(network.trainable_variables):])
    manager = tf.train.CheckpointManager(checkpoint, root / "checkpoints", max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        logging.info("Resumed %s at iteration %d.", manager.latest_checkpoint, int(progress.iteration))
    return _Run(learner, learned, progress, manager, initial_weights)


def meta_train(config: Config, workdir: str, splits: data.Splits,
               callback: Optional[Callable[[dict], None]] = None) -> dict:
    """Meta-trains, resuming from ``workdir`` if it holds a checkpoint; then meta-tests.

    Args:
        config: the settings.
        workdir: output folder (created).
        splits: train / val / test splits (``data.load_omniglot`` ...).
        callback: called with each row of metrics.csv as a dict of numbers (e.g. to write
            TensorBoard scalars). Defaults to `None`.

    Returns:
        The content of results.json.

    Raises:
        ValueError: if ``workdir`` holds a run with another config, or the config is invalid.
    """
    if config.eval_every < 1 or config.iterations < 0:
        raise ValueError(f"`eval_every` must be ≥ 1 and `iterations` ≥ 0, got "
                         f"{config.eval_every} and {config.iterations}.")
    root = pathlib.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    _write_config(config, root)
    run = _restore(config, root, splits)
    learner, learned, progress, manager = run.learner, run.learned, run.progress, run.manager
    metrics_path = root / "metrics.csv"
    _truncate_metrics(metrics_path, int(progress.iteration))
    validation = _episodes(splits.val, config, shots=config.shots, num_episodes=config.eval_episodes)

    start, first = time.time(), int(progress.iteration)
    elapsed0 = float(progress.elapsed)
    last_line, budget = start, config.time_budget_seconds

    def speed(iteration: int) -> str:  # "it i/n  r it/s (e episodes/s)  ETA s"
        rate = (iteration - first) / (time.time() - start)
        eta = (config.iterations - iteration) / rate
        if budget is not None:  # the budget may stop the run first
            eta = max(0.0, min(eta, budget - elapsed0 - (time.time() - start)))
        return (f"it {iteration}/{config.iterations}  {rate:.1f} it/s "
                f"({rate * config.meta_batch_size:.1f} episodes/s)  ETA {eta:.0f} s")

    losses: list[float] = []
    batches = _train_batches(splits, config, first)
    while (progress.iteration < config.iterations
           and progress.evaluations_since_best < config.patience
           and (budget is None or elapsed0 + time.time() - start < budget)):
        losses.append(learner.meta_step(next(batches)))
        progress.iteration.assign_add(1)
        iteration = int(progress.iteration)
        if iteration % config.eval_every == 0 or iteration == config.iterations:
            accuracy, ci = learner.evaluate(validation, ways=_test_ways(config), steps=_test_steps(config))
            if accuracy > float(progress.best_accuracy):
                progress.best_accuracy.assign(accuracy)
                progress.evaluations_since_best.assign(0)
                for best, v in zip(progress.best_weights, learned):
                    best.assign(v)
            else:
                progress.evaluations_since_best.assign_add(1)
            elapsed = elapsed0 + time.time() - start
            progress.elapsed.assign(elapsed)
            with metrics_path.open("a", newline="") as f:
                csv.writer(f).writerow([iteration, f"{elapsed:.2f}", f"{np.mean(losses):.6g}",
                                        f"{accuracy:.6g}", f"{ci:.6g}"])
            if callback is not None:
                callback(dict(zip(_METRICS, (iteration, elapsed, float(np.mean(losses)), accuracy,
                                             ci))))
            logging.info("%s  loss %.4f  val %.2f%% ± %.2f", speed(iteration), np.mean(losses),
                         100 * accuracy, 100 * ci)
            losses = []
            manager.save()
            last_line = time.time()
        elif time.time() - last_line >= PROGRESS_SECONDS:
            logging.info("%s  loss %.4f", speed(iteration), np.mean(losses))
            last_line = time.time()
    progress.elapsed.assign(elapsed0 + time.time() - start)
    manager.save()  # the stopping point (budget, patience or the last iteration)
    return _test(config, root, splits, run)


def meta_test(config: Config, workdir: str, splits: data.Splits) -> dict:
    """Meta-tests the run in ``workdir`` without training, as ``meta_train`` does after
    training (its best-validation weights, next to the baselines); rewrites results.json.

    Args:
        config: the run's settings (its config.json); the evaluation fields (``test_*``,
            ``eval_batch_size``) may differ.
        workdir: the folder of a ``meta_train`` run.
        splits: train / val / test splits; ``test`` is evaluated.

    Returns:
        The content of results.json.

    Raises:
        FileNotFoundError: if ``workdir`` holds no checkpoint.
    """
    root = pathlib.Path(workdir)
    return _test(config, root, splits, _restore_trained(config, root, splits))


def read_config(workdir: str) -> Config:
    """The `Config` of the run in ``workdir`` (its config.json).

    Raises:
        FileNotFoundError: if ``workdir`` holds no config.json.
    """
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(workdir)!r} holds no trained run (no config.json): "
                                f"meta-train first.")
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: tuple(v) if isinstance(v, list) else v
                     for k, v in json.loads(path.read_text()).items() if k in names})


def _restore_trained(config: Config, root: pathlib.Path, splits: data.Splits) -> _Run:
    """``_restore``, for a run that must have a checkpoint."""
    if tf.train.latest_checkpoint(str(root / "checkpoints")) is None:
        raise FileNotFoundError(f"{str(root)!r} holds no checkpoint: meta-train first.")
    return _restore(config, root, splits)


def _use_best_weights(run: _Run) -> None:
    """Loads the best-validation weights of ``run`` into its learner (none if never validated)."""
    if float(run.progress.best_accuracy) >= 0:
        for v, best in zip(run.learned, run.progress.best_weights):
            v.assign(best)


def load_representation(workdir: str, splits: data.Splits) -> keras.Model:
    """The representation h_λ of the ``meta_train`` run in ``workdir``, with its best-validation
    weights (its last ones if it was never validated).

    Args:
        workdir: the folder of a ``meta_train`` run (config.json, checkpoints/).
        splits: the run's data (for the input shape, and the class count of 'classic').

    Raises:
        FileNotFoundError: if ``workdir`` holds no config.json or no checkpoint.
    """
    run = _restore_trained(read_config(workdir), pathlib.Path(workdir), splits)
    _use_best_weights(run)
    return run.learner.network


def _test(config: Config, root: pathlib.Path, splits: data.Splits, run: _Run) -> dict:
    """Tests the best-validation weights of ``run`` (the last ones if it was never validated)
    and the baselines on ``splits.test``; writes results.json."""
    learner, progress = run.learner, run.progress
    _use_best_weights(run)
    untrained = build_network(config.network, tuple(splits.train.images.shape[1:]),
                              seed=config.seed, dtype=config.dtype,
                              batch_norm_scale=config.batch_norm_scale)
    for v, w in zip(untrained.trainable_variables, run.initial_weights):
        v.assign(w)
    eta, ways, steps = learner.learning_rate, _test_ways(config), _test_steps(config)
    results: dict[str, Any] = {"iterations": int(progress.iteration),
                               "elapsed_seconds": float(progress.elapsed),
                               "best_val_accuracy": float(progress.best_accuracy),
                               "learning_rate": float(eta), "test": {}}
    for shots in config.test_shots or (config.shots,):
        test = _episodes(splits.test, config, shots=shots, num_episodes=config.test_episodes)
        scores = {
            config.variant: learner.evaluate(test, ways=ways, steps=steps),
            "pixels": meta_learner.evaluate(meta_learner.pixel_features, test, ways=ways,
                                            steps=steps, learning_rate=eta),
            "untrained": meta_learner.evaluate(
                lambda x: meta_learner.episode_features(untrained, x), test, ways=ways,
                steps=steps, learning_rate=eta),
        }
        results["test"][f"{ways}way_{shots}shot"] = {
            name: {"accuracy": m, "ci": c} for name, (m, c) in scores.items()}
        logging.info("test %d-way %d-shot: %s", ways, shots,
                     {k: f"{100 * m:.2f} ± {100 * c:.2f}" for k, (m, c) in scores.items()})
    (root / "results.json").write_text(json.dumps(results, indent=2))
    return results
