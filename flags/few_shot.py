"""What the few-shot launchers (``flags.omniglot``, ``flags.miniimagenet``) share: the flags of
every setting of hyper-representation's experiments (Franceschi et al., ICML 2018, §5.2), their
mapping onto `train.Config`, the device set-up, and the run.

A launcher defines ``define_flags(preset, data_dir=…)`` (defaults: its preset `train.Config`,
the paper's values) next to the common ``--logdir``, ``--seed`` and ``--resume``, and calls
``main(argv, holders, preset, load_splits)``. ``--mode=train`` runs ``train.meta_train`` in
``--logdir`` (resuming from its last checkpoint; ``--noresume`` deletes the previous outputs
first); ``--mode=test`` runs ``train.meta_test`` on the run in ``--logdir``: the settings of the
trained model come from its config.json, the evaluation flags (``EVALUATION``) from the command
line. ``--logdir`` then holds what ``train`` writes (config.json, metrics.csv, checkpoints/,
results.json) and

    tensorboard/   per evaluation: validation accuracy and CI, train outer loss, elapsed seconds
                   (``tf.summary.write``; readable without the tensorboard package)
    metrics.png    validation accuracy (95% CI band) and train outer loss vs hyper-iteration

results.json gains every flag value ("flags") and the `train.Config` used ("config"), and a line
per tested shot goes to stdout: ``5-way 1-shot: 87.6 ± 0.7 % (600 episodes); baselines: …``.

TensorFlow runs on a GPU whenever one is visible. ``--xla`` turns on XLA auto-clustering
(``tf.config.optimizer.set_jit``), which acts on GPUs only. ``--dtype=mixed_bfloat16`` is mixed
precision: float32 weights and heads, bfloat16 convolutions (float16 would need loss scaling in
the hypergradient, not implemented), meant for accelerators with bfloat16 units.
"""

import csv
import dataclasses
import pathlib
import shutil
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import tensorflow as tf
from absl import flags
from absl import logging

from flags import common
from hyper_repr import data, meta_learner, train

# The settings both experiments share (farho.md §7.1-§7.2): N, k, q and T of main.py, the
# FAR-HO example's meta-optimiser (main.py had MBS 2, meta-lr 0.3, η 0.4), which the author
# recommends for MiniImagenet (issue #3: meta-lr 1e-3, decay 1e-5, T = 5, MBS = 4), 600
# evaluation episodes, and FAR-HO's early stopping after 40 validations without improvement (it
# validated every 1000 iterations; 250 here, so that CPU runs of minutes validate too).
PRESET = train.Config(ways=5, shots=1, queries=15, steps=5, learning_rate=0.1, learn_lr=True,
                      meta_batch_size=4, meta_lr=1e-3, meta_lr_decay=1e-5, iterations=50_000,
                      eval_every=250, eval_episodes=600, test_episodes=600, patience=40)
MODES = ("train", "test")
NETWORKS = ("omniglot", "c4l", "rn")  # models.build_network names
EVALUATION = ("test_ways", "test_steps", "test_shots", "test_queries", "test_episodes",
              "eval_batch_size")
PLOT = "metrics.png"
# flag name -> train.Config field, where they differ (the flags keep FAR-HO's and the other
# launchers' names); every other setting flag is named after its field.
_FIELDS = {"T": "steps", "test_T": "test_steps", "lr": "learning_rate",
           "hyper_iterations": "iterations", "time_budget": "time_budget_seconds"}


# A flag per `train.Config` field but seed (the common --seed): (name, type or enum values, help).
# Ints must be ≥ 1 (those of _COUNTS ≥ 0), floats ≥ 0; defaults come from the launcher's
# preset.
_COUNTS = ("augment_shift",)
_SETTINGS = (
    ("network", NETWORKS, "Representation h_λ: omniglot (conv-4, stride 2), c4l (conv-4, 32 "
                          "filters, max-pool) or rn (residual network)."),
    ("batch_norm_scale", bool, "Learn the normalisation scale γ too."),
    ("dtype", ("float32", "float64", "mixed_bfloat16"), "Dtype of the network; mixed_bfloat16: "
              "float32 weights, bfloat16 computation (mixed precision, for GPUs/TPUs with "
              "bfloat16 units)."),
    ("ways", int, "N, classes per meta-training episode."),
    ("test_ways", int, "N of the validation and test episodes (default: --ways)."),
    ("shots", int, "k, support images per class."),
    ("test_shots", list, "k of the test evaluations, e.g. 1,5 (default: --shots)."),
    ("queries", int, "Query images per class."),
    ("test_queries", int, "Query images per class at validation and test (default: --queries)."),
    ("legacy_sampling", bool, "Support images may reappear as queries (the original sampler)."),
    ("augment_shift", int, "Translate every meta-training image by up to this many pixels at "
                           "random (augmentation; 0: none)."),
    ("T", int, "Inner GD steps of the heads in meta-training."),
    ("test_T", int, "Head GD steps at validation and test (default: --T)."),
    ("lr", float, "η, the heads' learning rate (its initial value if learned)."),
    ("learn_lr", bool, "Learn η as a hyperparameter (--nolearn_lr: fixed)."),
    ("meta_batch_size", int, "Episodes per hyper-iteration."),
    ("meta_lr", float, "Outer Adam learning rate."),
    ("meta_lr_decay", float, "Inverse-time decay rate: meta_lr / (1 + decay·iteration)."),
    ("clip", float, "Clip hypergradients to ±clip (default: none)."),
    ("variant", meta_learner.VARIANTS, "Training variant (the paper's Table 4)."),
    ("hyper_iterations", int, "Maximum hyper-iterations."),
    ("eval_every", int, "Hyper-iterations between validations (and checkpoints)."),
    ("eval_episodes", int, "Validation episodes."),
    ("test_episodes", int, "Test episodes."),
    ("eval_batch_size", int, "Episodes per compiled evaluation call."),
    ("patience", int, "Early stopping: validations without improvement."),
    ("time_budget", float, "Seconds of training, over all resumed runs (default: none)."),
)


def define_flags(preset: train.Config, *, data_dir: Optional[str],
                 flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """Defines ``--mode``, ``--data_dir``, ``--xla`` and the settings (``_SETTINGS``), with
    ``preset``'s values as defaults."""
    holders = dict(
        mode=flags.DEFINE_enum("mode", "train", list(MODES), "train: meta-train (resuming from "
                               "--logdir), then meta-test; test: meta-test the best checkpoint "
                               "in --logdir, without training.", flag_values=flag_values),
        data_dir=flags.DEFINE_string("data_dir", data_dir, "Dataset folder.",
                                     flag_values=flag_values),
        xla=flags.DEFINE_boolean("xla", False, "XLA auto-clustering (GPU only).",
                                 flag_values=flag_values))
    for name, kind, help_ in _SETTINGS:
        default = getattr(preset, _FIELDS.get(name, name))
        if isinstance(kind, tuple):
            holders[name] = flags.DEFINE_enum(name, default, list(kind), help_,
                                              flag_values=flag_values)
        elif kind is list:
            holders[name] = flags.DEFINE_list(name, [str(v) for v in default], help_,
                                              flag_values=flag_values)
        elif kind is bool:
            holders[name] = flags.DEFINE_boolean(name, default, help_, flag_values=flag_values)
        elif kind is int:
            holders[name] = flags.DEFINE_integer(name, default, help_,
                                                 lower_bound=0 if name in _COUNTS else 1,
                                                 flag_values=flag_values)
        else:
            holders[name] = flags.DEFINE_float(name, default, help_, lower_bound=0.0,
                                               flag_values=flag_values)
    return holders


def config_from_flags(values: Mapping[str, Any], preset: train.Config) -> train.Config:
    """``preset`` with the setting flags of ``values`` (flag name -> value) applied.

    Raises:
        ValueError: if ``--test_shots`` holds something other than positive ints.
    """
    names = {f.name for f in dataclasses.fields(train.Config)}
    fields = {_FIELDS.get(k, k): v for k, v in values.items() if _FIELDS.get(k, k) in names}
    if not all(s.isdigit() and int(s) > 0 for s in values["test_shots"]):
        raise ValueError(f"--test_shots must be positive ints, e.g. 1,5; got "
                         f"{','.join(values['test_shots'])!r}.")
    fields["test_shots"] = tuple(int(s) for s in values["test_shots"])
    return dataclasses.replace(preset, **fields)


def set_up_devices(xla: bool) -> None:
    """Logs the device TensorFlow uses (a visible GPU, else the CPU); ``xla`` turns on XLA
    auto-clustering when a GPU is visible."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        logging.info("Running on %d GPU(s): %s", len(gpus), ", ".join(g.name for g in gpus))
    else:
        logging.info("No GPU visible: running on the CPU.")
    if xla and gpus:
        tf.config.optimizer.set_jit("autoclustering")
    elif xla:
        logging.warning("--xla ignored: XLA auto-clustering acts on GPUs, and none is visible.")


def clear(logdir: pathlib.Path) -> None:
    """Deletes the outputs of a previous run in ``logdir`` (other files are kept)."""
    for name in ("config.json", "metrics.csv", "results.json", PLOT):
        (logdir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(logdir / name, ignore_errors=True)


def saved_config(logdir: pathlib.Path, config: train.Config) -> train.Config:
    """The config.json of the run in ``logdir``, with the ``EVALUATION`` fields of ``config``.

    Raises:
        FileNotFoundError: if ``logdir`` holds no config.json.
    """
    saved = train.read_config(str(logdir))
    tested = dataclasses.replace(saved, **{k: getattr(config, k) for k in EVALUATION})
    flag_of = {field: flag for flag, field in _FIELDS.items()}
    ignored = sorted(f"--{flag_of.get(f.name, f.name)}" for f in dataclasses.fields(train.Config)
                     if getattr(tested, f.name) != getattr(config, f.name))
    if ignored:
        logging.info("--mode=test takes the trained model's settings from %s, not from the flags "
                     "(flags that differ: %s).", logdir / "config.json", ", ".join(ignored))
    return tested


class TensorBoardScalars:
    """A ``train.meta_train`` callback writing each metrics row as TensorBoard scalars at step
    ``row["iteration"]``."""

    def __init__(self, directory: pathlib.Path):
        self._writer = tf.summary.create_file_writer(str(directory))

    def __call__(self, row: Mapping[str, float]) -> None:
        common.write_scalars(self._writer, row["iteration"],
                             {name: value for name, value in row.items() if name != "iteration"})


def plot_metrics(logdir: pathlib.Path) -> None:
    """metrics.png: validation accuracy (with its 95% CI) and train outer loss vs iteration,
    from metrics.csv."""
    with (logdir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    column = lambda key: [float(r[key]) for r in rows]
    iterations, accuracy, ci = column("iteration"), column("val_accuracy"), column("val_ci")
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(iterations, [100 * a for a in accuracy], "o-")
    left.fill_between(iterations, [100 * (a - c) for a, c in zip(accuracy, ci)],
                      [100 * (a + c) for a, c in zip(accuracy, ci)], alpha=0.3)
    left.set(xlabel="hyper-iteration", ylabel="validation accuracy (%)",
             title="Validation accuracy (95% CI)")
    right.plot(iterations, column("train_outer_loss"), "o-")
    right.set(xlabel="hyper-iteration", ylabel="outer loss",
              title="Train outer loss (mean since the previous validation)")
    fig.tight_layout()
    fig.savefig(logdir / PLOT, dpi=100)
    plt.close(fig)


def summary(results: Mapping[str, Any], config: train.Config) -> list[str]:
    """Lines ``5-way 1-shot: 87.6 ± 0.7 % (600 episodes); baselines: …``, one per tested shot,
    after a line on the training."""
    percent = lambda s: f"{100 * s['accuracy']:.1f} ± {100 * s['ci']:.1f} %"
    best = results["best_val_accuracy"]  # −1 if never validated
    validated = f"{100 * best:.1f} %" if best >= 0 else "none"
    lines = [f"{results['iterations']} hyper-iterations, {results['elapsed_seconds']:.0f} s of "
             f"training; best validation accuracy {validated}; η = {results['learning_rate']:.4g}"]
    for setting, scores in results["test"].items():
        baselines = ", ".join(f"{name} {percent(s)}" for name, s in scores.items()
                              if name != config.variant)
        name = setting.replace("way_", "-way ").replace("shot", "-shot")
        lines.append(f"{name}: {percent(scores[config.variant])} ({config.test_episodes} "
                     f"episodes); baselines: {baselines}")
    return lines


def run(config: train.Config, logdir: Any, splits: data.Splits, *, mode: str = "train",
        resume: bool = True, flag_values: Optional[Mapping[str, Any]] = None) -> dict:
    """Meta-trains then meta-tests (``mode="train"``), or meta-tests the run in ``logdir``
    (``"test"``); writes the outputs of the module docstring, prints the summary.

    Args:
        config: the settings (with ``mode="test"``, only its ``EVALUATION`` fields are used).
        logdir: the output folder.
        splits: the data.
        mode: one of ``MODES``. Defaults to `"train"`.
        resume: continue the run in ``logdir``; else delete its outputs first (train only).
            Defaults to `True`.
        flag_values: every flag value, for results.json. Defaults to `None` (none).

    Returns:
        The content of results.json.

    Raises:
        ValueError: for an invalid config, or one that differs from the run in ``logdir``.
        FileNotFoundError: with ``mode="test"``, if ``logdir`` holds no trained run.
    """
    path = pathlib.Path(logdir)
    if mode == "test":
        config = saved_config(path, config)
        results = train.meta_test(config, str(path), splits)
    else:
        if not resume:
            clear(path)
        try:
            results = train.meta_train(config, str(path), splits,
                                       callback=TensorBoardScalars(path / "tensorboard"))
        except train.ConfigMismatchError as error:
            raise ValueError(f"{error} Or relaunch with --noresume to delete it and "
                             f"restart.") from None
    plot_metrics(path)
    results = {**results, "config": dataclasses.asdict(config), "flags": dict(flag_values or {})}
    common.write_json(path / "results.json", results)
    sys.stdout.write("".join(f"{line}\n" for line in summary(results, config)))
    sys.stdout.flush()
    return results


def main(argv: Sequence[str], holders: Mapping[str, flags.FlagHolder], preset: train.Config,
         load_splits: Callable[[Mapping[str, Any]], data.Splits]) -> None:
    """A launcher's ``main``: flags -> `train.Config` and data -> ``run``; bad flags, data or
    logdir raise ``app.UsageError`` (exit code 1 and the message)."""
    common.check_no_arguments(argv)
    values = {name: holder.value for name, holder in holders.items()}
    config = common.usage_errors(config_from_flags, values, preset)
    set_up_devices(values["xla"])
    splits = common.usage_errors(load_splits, values)
    common.usage_errors(run, config, values["logdir"], splits, mode=values["mode"],
                        resume=values["resume"], flag_values=values)
