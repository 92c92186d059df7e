"""What the few-shot launchers (``flags.omniglot``, ``flags.miniimagenet``) share: the flags of
every setting of hyper-representation's experiments (Franceschi et al., ICML 2018, §5.2), their
mapping onto `train.Config`, the device set-up, and the run.

A launcher defines ``define_flags(preset, data_dir=…)`` (defaults: its preset `train.Config`,
the paper's values; the run's ``--logdir``, ``--resume``, ``--checkpoint_seconds``; the settings
generated from `train.Config`'s fields) and runs ``launch(holders, preset, load_splits)`` under
``far_ho2.launch.cli.run`` (one-line errors).

``--mode=train`` meta-trains with Keras ``fit`` in ``--logdir`` (``train.meta_train``): it
resumes from the last checkpoint there (``--noresume`` deletes the previous outputs first), and
writes, besides what ``train.meta_train`` writes (config.json, metrics.csv, tensorboard/,
best.keras, checkpoints/, results.json),

    metrics.png    validation accuracy (95% CI band) and train outer loss vs hyper-iteration

results.json gains the flags given on the command line ("flags") and the `train.Config` used
("config"), and a line per tested shot goes to stdout: ``5-way 1-shot: 87.6 ± 0.7 % (600
episodes); baselines: …``; a run that made no progress (validation accuracy at chance, or stuck)
says so in one line and in results.json ("no_progress"). Ctrl-C or SIGTERM saves the run and
exits (the same command resumes it); a checkpoint is also written every
``--checkpoint_seconds``, so SIGKILL loses at most that much training.

``--mode=test`` tests the run's best.keras again: with the run's own settings (its config.json),
except the evaluation flags (``EVALUATION``) given on the command line; it appends its results
(the settings tested, and the flags given to it) to test_results.json and leaves the training's
files as they are.

Errors (bad flags, data too small for the episodes, a --logdir in use or holding another run)
stop with a one-line message naming the flag, and exit code 1.

``--strategy`` spreads each meta-batch across devices with ``tf.distribute`` (``train.meta_train``:
the result is that of one device holding the whole meta-batch; ``--meta_batch_size`` must be a
multiple of the replicas): ``mirrored`` over the GPUs of this machine (or, with
``--cpu_devices=N``, over N logical devices of its CPU: what the tests and benchmarks here
measure), ``multi_worker`` over several machines, each running the same command with its own
``TF_CONFIG`` (the cluster and its task; the chief writes --logdir, which every worker must
read, the others write to temporary folders). The replicas and the per-replica meta-batch are
logged.

TensorFlow runs on a GPU whenever one is visible. ``--xla`` turns on XLA auto-clustering
(``tf.config.optimizer.set_jit``), which acts on GPUs only. ``--dtype=mixed_bfloat16`` is mixed
precision: float32 weights and heads, bfloat16 convolutions (float16 would need loss scaling in
the hypergradient, not implemented), meant for accelerators with bfloat16 units.
"""

import dataclasses
import os
import pathlib
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import tensorflow as tf
from absl import flags
from absl import logging

from far_ho2.launch import callbacks, cli, workdir
from flags import common
from far_ho2.launch import method_flags
from hyper_repr import data, train

# The settings both experiments share: the N, k, q and T of hyper-representation's main.py; the
# meta-optimiser of the FAR-HO repository's example (main.py had meta-batch 2, meta-lr 0.3, η
# 0.4), which the paper's author recommends for MiniImagenet (FAR-HO issue #3: meta-lr 1e-3,
# decay 1e-5, T = 5, meta-batch 4); 600 evaluation episodes; and FAR-HO's early stopping after 40
# validations without improvement (it validated every 1000 iterations; 250 here, so that CPU
# runs of minutes validate too).
PRESET = train.Config(ways=5, shots=1, queries=15, steps=5, learning_rate=0.1, learn_lr=True,
                      meta_batch_size=4, meta_lr=1e-3, meta_lr_decay=1e-5, iterations=50_000,
                      eval_every=250, eval_episodes=600, test_episodes=600, patience=40)
MODES = ("train", "test")
STRATEGIES = ("none", "mirrored", "multi_worker")
EVALUATION = ("test_ways", "test_steps", "test_shots", "test_queries", "test_episodes",
              "eval_batch_size")  # Config fields --mode=test may override
PLOT, TEST_RESULTS = "metrics.png", "test_results.json"
PATHS = ("logdir", "data_dir")  # flags whose ~ is expanded
# field -> flag, e.g. steps -> T (the method's settings are flags of their own: ``method_flags``)
FLAG_NAMES = {**{f.name: f.name for f in dataclasses.fields(train.Config)}, **cli.flag_names(train.Config)}
METHOD_HELP = ("The far_ho2 method of the bilevel variants (reverse: Algorithm 1; stochastic: Langevin heads); "
               "its settings are the flags named after it.")


def flag_name(field: str) -> str:
    """``--T`` for the field ``steps``, ``--ways`` for ``ways``."""
    return f"--{FLAG_NAMES.get(field, field)}"


def define_flags(preset: train.Config, *, data_dir: Optional[str],
                 flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """Defines the run's flags (``cli.define_run_flags``), ``--mode``, ``--data_dir``, ``--xla``,
    ``--strategy``, ``--cpu_devices``, ``--verbose``, the settings of `train.Config`
    (``cli.define_flags``), with ``preset``'s values as defaults, and ``--method`` with its
    settings (``method_flags``; defaults ``train.METHOD_DEFAULTS``, then the registry's)."""
    holders = cli.define_run_flags(flag_values)
    holders.update(
        mode=flags.DEFINE_enum("mode", "train", list(MODES), "train: meta-train (resuming from "
                               "--logdir), then meta-test; test: meta-test the best model in "
                               "--logdir again, without training.", flag_values=flag_values),
        data_dir=flags.DEFINE_string("data_dir", data_dir, "Dataset folder.",
                                     flag_values=flag_values),
        xla=flags.DEFINE_boolean("xla", False, "XLA auto-clustering (GPU only).",
                                 flag_values=flag_values),
        strategy=flags.DEFINE_enum("strategy", "none", list(STRATEGIES), "tf.distribute: none (one "
                                   "device), mirrored (this machine's GPUs, or --cpu_devices), "
                                   "multi_worker (several machines, each with its TF_CONFIG); each "
                                   "meta-batch is split across the replicas.", flag_values=flag_values),
        cpu_devices=flags.DEFINE_integer("cpu_devices", 1, "With --strategy=mirrored on a machine "
                                         "without GPU: split the CPU into this many logical "
                                         "devices, one replica each (for testing).", lower_bound=1,
                                         flag_values=flag_values),
        verbose=flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"], "Keras progress "
                                  "output: 1 a progress bar, 2 a line per epoch, 0 none; auto: 1 "
                                  "on a terminal, else 2.", flag_values=flag_values))
    holders.update(cli.define_flags(train.Config, defaults=preset, flag_values=flag_values))
    holders.update(method_flags.define_flags(flag_values, method_help=METHOD_HELP, default=preset.method,
                                             defaults=train.METHOD_DEFAULTS))
    return holders


def config_from_flags(holders: Mapping[str, flags.FlagHolder], preset: train.Config) -> train.Config:
    """``preset`` with the setting flags applied (``--method``'s settings as ``method_settings``).

    Raises:
        cli.LaunchError: if a flag is out of its range, or a method's setting flag is another
            method's or out of its range.
    """
    fields = cli.config_values(train.Config, holders)
    try:
        settings = method_flags.settings_from_flags(holders)
    except ValueError as error:
        raise cli.LaunchError(str(error)) from None
    return dataclasses.replace(preset, **fields, method=holders["method"].value, method_settings=settings)


def set_up_devices(xla: bool, strategy: str = "none", cpu_devices: int = 1) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy of ``--strategy`` (made before TensorFlow initialises its
    devices: ``cpu_devices`` logical CPU devices for ``mirrored``); logs the devices it uses (the
    visible GPUs, else the CPU); ``xla`` turns on XLA auto-clustering when a GPU is visible.

    Raises:
        cli.LaunchError: for ``--cpu_devices`` > 1 with another strategy than ``mirrored`` or with a
            GPU visible, and for ``--strategy=multi_worker`` without TF_CONFIG.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if cpu_devices > 1 and (strategy != "mirrored" or gpus):
        raise cli.LaunchError(f"--cpu_devices={cpu_devices} splits a CPU without GPU for --strategy=mirrored; "
                          f"here --strategy={strategy} with {len(gpus)} GPU(s) visible.")
    if strategy == "multi_worker" and not os.environ.get("TF_CONFIG"):
        raise cli.LaunchError("--strategy=multi_worker needs the TF_CONFIG environment variable: the cluster "
                          "(every worker's host:port) and this worker's task (see docs/distribute.md).")
    if gpus:
        logging.info("Running on %d GPU(s): %s", len(gpus), ", ".join(g.name for g in gpus))
    else:
        logging.info("No GPU visible: running on the CPU%s.",
                     f" split into {cpu_devices} devices" if cpu_devices > 1 else "")
    if xla and gpus:
        tf.config.optimizer.set_jit("autoclustering")
    elif xla:
        logging.warning("--xla ignored: XLA auto-clustering acts on GPUs, and none is visible.")
    if strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if strategy == "mirrored":
        if cpu_devices > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
        devices = None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def plot_metrics(logdir: Any) -> None:
    """metrics.png: validation accuracy (with its 95% CI) and train outer loss vs hyper-iteration,
    from metrics.csv (nothing if it has no row)."""
    rows = train.read_metrics(logdir)
    if not rows:
        return
    column = lambda key: [r[key] for r in rows]  # noqa: E731
    iterations, accuracy, ci = column("iteration"), column("val_accuracy"), column("val_ci")
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(iterations, [100 * a for a in accuracy], "o-")
    left.fill_between(iterations, [100 * (a - c) for a, c in zip(accuracy, ci)],
                      [100 * (a + c) for a, c in zip(accuracy, ci)], alpha=0.3)
    left.set(xlabel="hyper-iteration", ylabel="validation accuracy (%)",
             title="Validation accuracy (95% CI)")
    right.plot(iterations, column("loss"), "o-")
    right.set(xlabel="hyper-iteration", ylabel="outer loss",
              title="Train outer loss (mean over the epoch)")
    fig.tight_layout()
    fig.savefig(os.path.join(logdir, PLOT), dpi=100)
    plt.close(fig)


def summary(results: Mapping[str, Any], config: train.Config) -> list[str]:
    """Lines ``5-way 1-shot: 87.6 ± 0.7 % (600 episodes); baselines: …``, one per tested shot,
    after a line on the training (if ``results`` has one)."""
    percent = lambda s: f"{100 * s['accuracy']:.1f} ± {100 * s['ci']:.1f} %"  # noqa: E731
    lines = []
    if "iterations" in results:
        best, at = results["best_val_accuracy"], results["best_iteration"]
        validated = "none" if best is None else f"{100 * best:.1f} %" + (
            f" (hyper-iteration {at:.0f})" if at is not None else "")
        lines.append(f"{results['iterations']} hyper-iterations, {results['elapsed_seconds']:.0f} s "
                     f"of training (stopped by: {results['stopped_by'] or 'nothing'}); best "
                     f"validation accuracy {validated}; η = {results['learning_rate']:.4g}")
    for setting, scores in results["test"].items():
        baselines = ", ".join(f"{name} {percent(s)}" for name, s in scores.items()
                              if name != config.variant)
        name = setting.replace("way_", "-way ").replace("shot", "-shot")
        lines.append(f"{name}: {percent(scores[config.variant])} ({config.test_episodes} "
                     f"episodes); baselines: {baselines}")
    if results.get("no_progress"):
        lines.append(f"Warning: {results['no_progress']}: the run learned nothing; lower --meta_lr or --lr.")
    return lines


def _print(lines: Sequence[str]) -> None:
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


def run_train(config: train.Config, logdir: Any, splits: data.Splits, *, resume: bool = True,
              flag_values: Optional[Mapping[str, Any]] = None, verbose: Any = "auto",
              checkpoint_seconds: float = 60.0, strategy: Optional[tf.distribute.Strategy] = None) -> dict:
    """Meta-trains then meta-tests in ``logdir`` (``train.meta_train``); writes the outputs of
    the module docstring, prints the summary.

    Args:
        config: the settings.
        logdir: the output folder.
        splits: the data.
        resume: continue the run in ``logdir``; else delete its outputs first. Defaults to
            `True`.
        flag_values: the flags given on the command line, for results.json. Defaults to `None`
            (none).
        verbose: Keras's progress output (0, 1, 2 or "auto"). Defaults to `"auto"`.
        checkpoint_seconds: the longest time between checkpoints. Defaults to `60.0`.
        strategy: the ``tf.distribute`` strategy (``set_up_devices``); only its chief writes
            the outputs and prints. Defaults to `None` (one device).

    Returns:
        The content of results.json.

    Raises:
        cli.LaunchError: for a bad setting, data too small for the episodes, a meta-batch the
            replicas do not divide, a ``logdir`` in use by another launch.
        workdir.ConfigMismatchError: if ``logdir`` holds a run with other settings.
        callbacks.Interrupted: on SIGINT/SIGTERM, once the run is saved.
    """
    strategy = strategy or tf.distribute.get_strategy()
    with cli.user_errors(FLAG_NAMES):
        results = train.meta_train(config, logdir, splits, resume=resume,
                                   outputs=(PLOT, TEST_RESULTS), verbose=verbose,
                                   checkpoint_seconds=checkpoint_seconds, strategy=strategy)
    results = {**results, "config": dataclasses.asdict(config), "flags": dict(flag_values or {})}
    if callbacks.is_chief(strategy):
        plot_metrics(logdir)
        workdir.write_json(pathlib.Path(logdir) / workdir.RESULTS, results)
        _print(summary(results, config))
    return results


def run_test(logdir: Any, splits: data.Splits, overrides: Optional[Mapping[str, Any]] = None, *,
             flag_values: Optional[Mapping[str, Any]] = None) -> dict:
    """Meta-tests the run in ``logdir`` (its best.keras) with its own settings but the
    ``EVALUATION`` fields in ``overrides``; appends the results to test_results.json, prints
    the summary.

    Returns:
        The entry appended: ``{"config", "flags", "learning_rate", "test"}``: the settings
        tested, and the flags given to this command.

    Raises:
        cli.LaunchError: if ``logdir`` holds no validated model, or the data is too small.
    """
    with cli.user_errors(FLAG_NAMES, prefix=f"--logdir={logdir}: "):
        config = dataclasses.replace(train.read_config(logdir), **dict(overrides or {}))
        train.check_data(config, splits, flag_name)
        results = train.meta_test(config, logdir, splits)
    entry = {"config": dataclasses.asdict(config), "flags": dict(flag_values or {}), **results}
    path = pathlib.Path(logdir) / TEST_RESULTS
    previous = workdir.read_json(path) if path.exists() else []
    workdir.write_json(path, previous + [entry])
    _print(summary(results, config))
    return entry


def _values(holders: Mapping[str, flags.FlagHolder]) -> dict:
    """Every flag value, ``~`` expanded in paths."""
    values = {name: holder.value for name, holder in holders.items()}
    for name in PATHS:
        if values.get(name):
            values[name] = os.path.expanduser(values[name])
    return values


def launch(holders: Mapping[str, flags.FlagHolder], preset: train.Config,
           load_splits: Callable[[Mapping[str, Any]], data.Splits]) -> None:
    """A launcher's ``main``: flags -> `train.Config` and data -> ``run_train`` or ``run_test``
    (run by ``cli.run``: problems end the process with one line)."""
    values = _values(holders)
    config = config_from_flags(holders, preset)
    logdir = values["logdir"]
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise cli.LaunchError(f"--logdir={logdir} is a file, not a folder.")
    strategy = set_up_devices(values["xla"], values["strategy"], values["cpu_devices"])
    with cli.user_errors(prefix=f"--data_dir={values['data_dir']}: "):
        splits = load_splits(values)
    with cli.user_errors(FLAG_NAMES):
        train.check_data(config, splits, flag_name)
        train.check_replicas(config, strategy, flag_name)
    given = cli.given_flags(holders)
    if values["mode"] == "test":
        overrides = {field: getattr(config, field) for field in EVALUATION
                     if holders[FLAG_NAMES[field]].present}
        run_test(logdir, splits, overrides, flag_values=given)
    else:
        run_train(config, logdir, splits, resume=values["resume"], flag_values=given,
                  verbose=values["verbose"], checkpoint_seconds=values["checkpoint_seconds"],
                  strategy=strategy)
