"""What the few-shot launchers (``flags.omniglot``, ``flags.miniimagenet``) share: the flags of
every setting of hyper-representation's experiments (Franceschi et al., ICML 2018, §5.2), their
mapping onto `train.Config`, the device set-up, and the run.

A launcher defines ``define_flags(preset, data_dir=…)`` (defaults: its preset `train.Config`,
the paper's values) next to the common ``--logdir``, ``--seed`` and ``--resume``, and calls
``main(argv, holders, preset, load_splits)``.

``--mode=train`` meta-trains with Keras ``fit`` in ``--logdir`` (``train.meta_train``): it
resumes from the last checkpoint there (``--noresume`` deletes the previous outputs first), and
writes, besides what ``train.meta_train`` writes (config.json, metrics.csv, tensorboard/,
best.keras, checkpoints/, results.json),

    metrics.png    validation accuracy (95% CI band) and train outer loss vs hyper-iteration

results.json gains every flag value ("flags") and the `train.Config` used ("config"), and a line
per tested shot goes to stdout: ``5-way 1-shot: 87.6 ± 0.7 % (600 episodes); baselines: …``.
Ctrl-C or SIGTERM saves the run and exits (the same command resumes it); a checkpoint is also
written every ``--checkpoint_every`` seconds, so SIGKILL loses at most that much training.

``--mode=test`` tests the run's best.keras again: with the run's own settings (its config.json),
except the evaluation flags (``EVALUATION``) given on the command line; it appends its results to
test_results.json and leaves the training's files as they are.

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
import json
import os
import pathlib
import signal
import sys
import typing
from typing import Any, Callable, Mapping, Optional, Sequence

import tensorflow as tf
from absl import flags
from absl import logging

from flags import common
from flags import method_flags
from hyper_repr import callbacks, data, train
from hyper_repr.model import VARIANTS

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
NETWORKS = ("omniglot", "c4l", "rn")  # models.build_network names
DTYPES = ("float32", "float64", "mixed_bfloat16")
EVALUATION = ("test_ways", "test_steps", "test_shots", "test_queries", "test_episodes",
              "eval_batch_size")  # Config fields --mode=test may override
PLOT, TEST_RESULTS = "metrics.png", "test_results.json"
PATHS = ("logdir", "data_dir")  # flags whose ~ is expanded
# flag name -> train.Config field, where they differ (the flags keep FAR-HO's and the other
# launchers' names); every other setting flag is named after its field.
_FIELDS = {"T": "steps", "test_T": "test_steps", "lr": "learning_rate",
           "hyper_iterations": "iterations", "time_budget": "time_budget_seconds"}
_FLAG = {field: flag for flag, field in _FIELDS.items()}
_CHOICES = {"network": NETWORKS, "dtype": DTYPES, "variant": VARIANTS}
_COUNTS = ("augment_shift",)  # ints that may be 0 (others ≥ 1; floats ≥ 0)
METHOD_HELP = ("The far_ho2 method of the bilevel variants (reverse: Algorithm 1; stochastic: Langevin heads); "
               "its settings are the flags named after it.")

# The help of a flag per `train.Config` field but seed (the common --seed) and the method's
# settings (``method_flags``: --method and a flag per setting); each flag's type is its field's,
# its default the launcher's preset.
HELP = {
    "network": "Representation h_λ: omniglot (conv-4, stride 2), c4l (conv-4, 32 filters, "
               "max-pool) or rn (residual network).",
    "batch_norm_scale": "Learn the normalisation scale γ too.",
    "dtype": "Dtype of the network; mixed_bfloat16: float32 weights, bfloat16 computation "
             "(mixed precision, for GPUs/TPUs with bfloat16 units).",
    "ways": "N, classes per meta-training episode.",
    "test_ways": "N of the validation and test episodes (default: --ways).",
    "shots": "k, support images per class.",
    "test_shots": "k of the test evaluations, e.g. 1,5 (default: --shots).",
    "queries": "Query images per class.",
    "test_queries": "Query images per class at validation and test (default: --queries).",
    "legacy_sampling": "Support images may reappear as queries (the original sampler).",
    "augment_shift": "Translate every meta-training image by up to this many pixels at random "
                     "(augmentation; 0: none).",
    "T": "Inner GD steps of the heads in meta-training.",
    "test_T": "Head GD steps at validation and test (default: --T).",
    "lr": "η, the heads' learning rate (its initial value if learned).",
    "learn_lr": "Learn η as a hyperparameter (--nolearn_lr: fixed).",
    "meta_batch_size": "Episodes per hyper-iteration.",
    "meta_lr": "Outer Adam learning rate.",
    "meta_lr_decay": "Inverse-time decay rate: meta_lr / (1 + decay·iteration).",
    "clip": "Clip hypergradients to ±clip (default: none).",
    "variant": "Training variant (the paper's Table 4).",
    "head_l2": "γ, the heads' ridge penalty (γ/2)(‖W‖² + ‖b‖²), in training and evaluation "
               "(implicit needs γ > 0).",
    "hyper_iterations": "Maximum hyper-iterations.",
    "eval_every": "Hyper-iterations between validations (a Keras epoch).",
    "eval_episodes": "Validation episodes.",
    "test_episodes": "Test episodes.",
    "eval_batch_size": "Episodes per compiled evaluation call.",
    "patience": "Early stopping: validations without improvement.",
    "time_budget": "Seconds of training, over all resumed runs (default: none).",
}


class LaunchError(Exception):
    """A problem the user can fix, said in one line in flag names."""


def flag_name(field: str) -> str:
    """``--T`` for the field ``steps``, ``--ways`` for ``ways``."""
    return f"--{_FLAG.get(field, field)}"


def _kind(field: str) -> Any:
    """The flag type of a `train.Config` field: its choices, list, bool, int or float."""
    if field in _CHOICES:
        return _CHOICES[field]
    hint = typing.get_type_hints(train.Config)[field]
    hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # Optional[x]
    return list if hint is tuple else hint


def define_flags(preset: train.Config, *, data_dir: Optional[str],
                 flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """Defines ``--mode``, ``--data_dir``, ``--xla``, ``--strategy``, ``--cpu_devices``,
    ``--verbose``, ``--checkpoint_every``, the settings (``HELP``), with ``preset``'s values as
    defaults, and ``--method`` with its settings (``method_flags``; defaults
    ``train.METHOD_DEFAULTS``, then the registry's)."""
    holders = dict(
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
                                  "on a terminal, else 2.", flag_values=flag_values),
        checkpoint_every=flags.DEFINE_float("checkpoint_every", 60.0, "Seconds between "
                                            "checkpoints (also written at each validation and on "
                                            "Ctrl-C/SIGTERM).", lower_bound=0.0,
                                            flag_values=flag_values))
    for name, help_ in HELP.items():
        field = _FIELDS.get(name, name)
        default, kind = getattr(preset, field), _kind(field)
        if isinstance(kind, tuple):
            holders[name] = flags.DEFINE_enum(name, default, list(kind), help_, flag_values=flag_values)
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
    holders.update(method_flags.define_flags(flag_values, method_help=METHOD_HELP, default=preset.method,
                                             defaults=train.METHOD_DEFAULTS))
    return holders


def config_from_flags(holders: Mapping[str, flags.FlagHolder], preset: train.Config) -> train.Config:
    """``preset`` with the parsed setting flags of ``holders`` applied (``--method``'s settings
    as ``method_settings``).

    Raises:
        LaunchError: if ``--test_shots`` holds something other than positive ints,
            ``--time_budget`` is 0, or a method's setting flag is another method's or out of its
            range.
    """
    values = _values(holders)
    try:
        settings = method_flags.settings_from_flags(holders)
    except ValueError as error:
        raise LaunchError(str(error)) from None
    if not all(s.isdigit() and int(s) > 0 for s in values["test_shots"]):
        raise LaunchError(f"--test_shots must be positive ints, e.g. 1,5; got "
                          f"{','.join(values['test_shots'])!r}.")
    if values["time_budget"] == 0:
        raise LaunchError("--time_budget must be a positive number of seconds, got 0.")
    names = {f.name for f in dataclasses.fields(train.Config)}
    fields = {_FIELDS.get(k, k): v for k, v in values.items() if _FIELDS.get(k, k) in names}
    fields["test_shots"] = tuple(int(s) for s in values["test_shots"])
    return dataclasses.replace(preset, **fields, method_settings=settings)


def set_up_devices(xla: bool, strategy: str = "none", cpu_devices: int = 1) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy of ``--strategy`` (made before TensorFlow initialises its
    devices: ``cpu_devices`` logical CPU devices for ``mirrored``); logs the devices it uses (the
    visible GPUs, else the CPU); ``xla`` turns on XLA auto-clustering when a GPU is visible.

    Raises:
        LaunchError: for ``--cpu_devices`` > 1 with another strategy than ``mirrored`` or with a
            GPU visible, and for ``--strategy=multi_worker`` without TF_CONFIG.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if cpu_devices > 1 and (strategy != "mirrored" or gpus):
        raise LaunchError(f"--cpu_devices={cpu_devices} splits a CPU without GPU for --strategy=mirrored; "
                          f"here --strategy={strategy} with {len(gpus)} GPU(s) visible.")
    if strategy == "multi_worker" and not os.environ.get("TF_CONFIG"):
        raise LaunchError("--strategy=multi_worker needs the TF_CONFIG environment variable: the cluster "
                          "(every worker's host:port) and this worker's task (see the README).")
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
    return lines


def _print(lines: Sequence[str]) -> None:
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()


def _verbose(value: str) -> int:
    return (1 if sys.stdout.isatty() else 2) if value == "auto" else int(value)


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
        flag_values: every flag value, for results.json. Defaults to `None` (none).
        verbose: Keras's progress output (0, 1, 2 or "auto"). Defaults to `"auto"`.
        checkpoint_seconds: the longest time between checkpoints. Defaults to `60.0`.
        strategy: the ``tf.distribute`` strategy (``set_up_devices``); only its chief writes
            the outputs and prints. Defaults to `None` (one device).

    Returns:
        The content of results.json.

    Raises:
        LaunchError: for data too small for the episodes, a meta-batch the replicas do not
            divide, a ``logdir`` in use by another launch, or holding a run with other settings.
        callbacks.Interrupted: on SIGINT/SIGTERM, once the run is saved.
    """
    strategy = strategy or tf.distribute.get_strategy()
    try:
        train.check_data(config, splits, flag_name)
        train.check_replicas(config, strategy, flag_name)
        results = train.meta_train(config, logdir, splits, resume=resume,
                                   outputs=(PLOT, TEST_RESULTS), verbose=verbose,
                                   checkpoint_seconds=checkpoint_seconds, strategy=strategy)
    except train.ConfigMismatchError as error:
        saved = train.read_config(logdir)
        changes = ", ".join(f"{flag_name(f)}={getattr(saved, f)!r} in the run, "
                            f"{getattr(config, f)!r} now" for f in error.fields)
        raise LaunchError(f"--logdir={logdir} holds a run with other settings ({changes}): "
                          f"relaunch with its settings, use another --logdir, or --noresume to "
                          f"delete it and restart.") from None
    except (train.LockedError, OSError) as error:
        raise LaunchError(f"--logdir={logdir}: {error}") from None
    except ValueError as error:  # check_data's and check_replicas', in flag names
        raise LaunchError(str(error)) from None
    results = {**results, "config": dataclasses.asdict(config), "flags": dict(flag_values or {})}
    if callbacks.is_chief(strategy):
        plot_metrics(logdir)
        common.write_json(pathlib.Path(logdir) / train.RESULTS, results)
        _print(summary(results, config))
    return results


def run_test(logdir: Any, splits: data.Splits, overrides: Optional[Mapping[str, Any]] = None, *,
             flag_values: Optional[Mapping[str, Any]] = None) -> dict:
    """Meta-tests the run in ``logdir`` (its best.keras) with its own settings but the
    ``EVALUATION`` fields in ``overrides``; appends the results to test_results.json, prints
    the summary.

    Returns:
        The entry appended: ``{"config", "flags", "learning_rate", "test"}``.

    Raises:
        LaunchError: if ``logdir`` holds no validated model, or the data is too small.
    """
    try:
        config = dataclasses.replace(train.read_config(logdir), **dict(overrides or {}))
        train.check_data(config, splits, flag_name)
        results = train.meta_test(config, logdir, splits)
    except FileNotFoundError as error:
        raise LaunchError(f"--logdir={logdir}: {error}") from None
    except ValueError as error:  # check_data's, in flag names
        raise LaunchError(str(error)) from None
    entry = {"config": dataclasses.asdict(config), "flags": dict(flag_values or {}), **results}
    path = pathlib.Path(logdir) / TEST_RESULTS
    previous = json.loads(path.read_text()) if path.exists() else []
    common.write_json(path, previous + [entry])
    _print(summary(results, config))
    return entry


def _values(holders: Mapping[str, flags.FlagHolder]) -> dict:
    """Every flag value, ``~`` expanded in paths."""
    values = {name: holder.value for name, holder in holders.items()}
    for name in PATHS:
        if values.get(name):
            values[name] = os.path.expanduser(values[name])
    return values


def _launch(holders: Mapping[str, flags.FlagHolder], preset: train.Config,
            load_splits: Callable[[Mapping[str, Any]], data.Splits]) -> None:
    values = _values(holders)
    config = config_from_flags(holders, preset)
    logdir = values["logdir"]
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise LaunchError(f"--logdir={logdir} is a file, not a folder.")
    strategy = set_up_devices(values["xla"], values["strategy"], values["cpu_devices"])
    try:
        splits = load_splits(values)
    except (ValueError, FileNotFoundError) as error:
        raise LaunchError(f"--data_dir={values['data_dir']}: {error}") from None
    if values["mode"] == "test":
        overrides = {_FIELDS.get(name, name): getattr(config, _FIELDS.get(name, name))
                     for name, holder in holders.items()
                     if holder.present and _FIELDS.get(name, name) in EVALUATION}
        run_test(logdir, splits, overrides, flag_values=values)
    else:
        run_train(config, logdir, splits, resume=values["resume"], flag_values=values,
                  verbose=_verbose(values["verbose"]), checkpoint_seconds=values["checkpoint_every"],
                  strategy=strategy)


def _not_checkpoint_chatter(record: Any) -> bool:
    """False for TensorFlow's log line at every checkpoint save ("Sharding callback duration")."""
    return not record.pathname.endswith("functional_saver.py")


def main(argv: Sequence[str], holders: Mapping[str, flags.FlagHolder], preset: train.Config,
         load_splits: Callable[[Mapping[str, Any]], data.Splits]) -> None:
    """A launcher's ``main``: flags -> `train.Config` and data -> ``run_train`` or ``run_test``.
    Problems end the process with a one-line message: exit code 1 for bad flags, data or
    --logdir; 128 + the signal's number after Ctrl-C or SIGTERM."""
    logging.get_absl_logger().addFilter(_not_checkpoint_chatter)
    try:
        if len(argv) > 1:
            raise LaunchError(f"Unexpected arguments: {list(argv[1:])}.")
        _launch(holders, preset, load_splits)
    except LaunchError as error:
        sys.exit(f"Error: {error}")
    except callbacks.Interrupted as error:
        sys.stderr.write(f"Interrupted: {error}\n")
        sys.exit(128 + error.signum)
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted (Ctrl-C) outside training: the run's checkpoints are kept, "
                         "the same command resumes it.\n")
        sys.exit(128 + signal.SIGINT)
