"""What every launcher shares: common flags, the output folder (``Logdir``), checkpoints with
resume, progress lines with ETA, and small helpers for flag checking and PNG plots.

A launcher's output folder holds

    config.json    the run's configuration (every launcher flag, plus seed)
    metrics.csv    one row per logged step: run, step, then the metrics
    results.json   the final metrics and the configuration
    tensorboard/   scalars per run (``tf.summary``; readable without the tensorboard package)
    checkpoints/   ``tf.train.CheckpointManager`` folders, one per run

and a second launch with ``--resume`` (the default) continues every run from its last
checkpoint: the iteration counter and all optimizer state are restored, and the rows of
metrics.csv logged after that checkpoint are dropped before they are logged again, so rows are
never duplicated. ``--noresume`` starts afresh, deleting the previous outputs.

Flags are defined by ``define_common_flags`` (called by each launcher's ``define_flags``, only
when it runs as ``__main__``): the launchers are imported together by the tests, and defining
flags at import would clash (both have a ``--T`` of different types). ``run_launcher`` is the
command line of a launcher whose flags are its configuration's fields.
"""

import csv
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging
from tensorflow.core.framework import summary_pb2

METRICS, CONFIG, RESULTS = "metrics.csv", "config.json", "results.json"
EXTENSIBLE = ("hyper_iterations", "time_budget")  # settings a resumed run may change without a warning


class CommonFlags(NamedTuple):
    """The flags every launcher has."""

    logdir: flags.FlagHolder
    seed: flags.FlagHolder
    resume: flags.FlagHolder


def define_common_flags(flag_values: flags.FlagValues = flags.FLAGS) -> CommonFlags:
    """Defines ``--logdir`` (required), ``--seed`` and ``--resume``/``--noresume`` in
    ``flag_values`` (absl's global flags by default)."""
    return CommonFlags(
        logdir=flags.DEFINE_string("logdir", None, "Output folder (created if missing).",
                                   required=True, flag_values=flag_values),
        seed=flags.DEFINE_integer("seed", 0, "Seed of data subsets, corruption and init.",
                                  flag_values=flag_values),
        resume=flags.DEFINE_boolean("resume", True, "Continue from the last checkpoint in "
                                    "--logdir; --noresume deletes previous outputs and restarts.",
                                    flag_values=flag_values))


def check_no_arguments(argv: Sequence[str]) -> None:
    """``main``'s first check: only flags, no positional arguments."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}.")


def check_file(path: Optional[str], flag: str) -> pathlib.Path:
    """``path`` as a Path, or a ``UsageError`` naming ``--flag`` if it is not an existing file."""
    if not path:
        raise app.UsageError(f"--{flag} is required.")
    if not os.path.isfile(path):
        raise app.UsageError(f"--{flag}={path}: no such file.")
    return pathlib.Path(path)


def usage_errors(function, *args, **kwargs):
    """Calls ``function``, turning the ``ValueError``/``FileNotFoundError`` of a bad
    configuration into an ``app.UsageError`` (exit code 1 with the message, no traceback)."""
    try:
        return function(*args, **kwargs)
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from error


def run_launcher(holders: Mapping[str, flags.FlagHolder], make_config: Callable[..., Any],
                 check_config: Callable[[Any], Any], load_data: Callable[[Any], Any],
                 run_experiment: Callable[..., Any]) -> None:
    """Parses the command line (``app.run``) and runs a launcher whose flags ``holders`` are the
    common ones and one per field of its configuration.

    The configuration is ``make_config(**values)`` (list flags as tuples), checked by
    ``check_config`` and its data read by ``load_data`` before anything is written, so that a
    bad value or a missing file stops with a one-line usage error; then
    ``run_experiment(config, logdir, resume=resume, data=data)``.
    """
    def main(argv: Sequence[str]) -> None:
        check_no_arguments(argv)
        values = {k: tuple(h.value) if isinstance(h.value, list) else h.value
                  for k, h in holders.items()}
        logdir, resume = values.pop("logdir"), values.pop("resume")
        config = usage_errors(make_config, **values)
        usage_errors(check_config, config)
        data = usage_errors(load_data, config)
        run_experiment(config, logdir, resume=resume, data=data)
    app.run(main)


def set_seed(seed: int) -> None:
    """Seeds Python's, NumPy's, TensorFlow's and Keras's generators."""
    import keras  # noqa: PLC0415 (kept local: importing Keras is slow)
    keras.utils.set_random_seed(seed)


# -- the output folder -------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Numbers, strings, lists and dicts as JSON accepts them (NumPy/TF scalars as floats)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (tf.Tensor, tf.Variable, np.ndarray, np.generic)):
        value = np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def write_json(path: pathlib.Path, data: dict) -> None:
    """Writes ``data`` atomically (a crash never leaves half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def config_dict(config: Any) -> dict:
    """A dataclass configuration as a dict (or a dict as is)."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


class Checkpointer:
    """The checkpoints of one run: ``restore()`` returns the iteration to continue from,
    ``save(iteration)`` stores the state reached after ``iteration`` iterations.

    Args:
        directory: the run's checkpoint folder.
        max_to_keep: checkpoints kept. Defaults to `2`.
        trackables: the state: variables, Keras optimizers (built), lists of variables.
    """

    def __init__(self, directory: pathlib.Path, max_to_keep: int = 2, **trackables: Any):
        self.iteration = tf.Variable(0, dtype=tf.int64, trainable=False, name="iteration")
        self._checkpoint = tf.train.Checkpoint(iteration=self.iteration, **trackables)
        self._manager = tf.train.CheckpointManager(self._checkpoint, str(directory), max_to_keep)

    def restore(self) -> int:
        """Restores the latest checkpoint, if any; returns the number of iterations done."""
        latest = self._manager.latest_checkpoint
        if latest is None:
            return 0
        self._checkpoint.restore(latest).assert_existing_objects_matched()
        logging.info("Resumed from %s at iteration %d.", latest, int(self.iteration))
        return int(self.iteration)

    def save(self, iteration: int) -> None:
        self.iteration.assign(iteration)
        self._manager.save(checkpoint_number=iteration)


class Logdir:
    """A launcher's output folder (see the module docstring).

    Args:
        path: the folder, created if missing.
        config: the configuration (a dataclass or dict), written to config.json.
        resume: keep previous outputs and continue from checkpoints; otherwise delete them.
    """

    def __init__(self, path: Any, config: Any, *, resume: bool = True):
        self.path = pathlib.Path(path)
        self.config = config_dict(config)
        self.resume = resume
        if not resume:
            self._clear()
        self.path.mkdir(parents=True, exist_ok=True)
        self._warn_if_config_changed()
        write_json(self.path / CONFIG, self.config)
        self._writers: dict[str, Any] = {}

    def _clear(self) -> None:
        for name in (METRICS, CONFIG, RESULTS):
            (self.path / name).unlink(missing_ok=True)
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(self.path / name, ignore_errors=True)

    def _warn_if_config_changed(self) -> None:
        previous = self.path / CONFIG
        if not previous.exists():
            return
        old = json.loads(previous.read_text())
        changed = sorted(k for k in (set(old) | set(self.config)) - set(EXTENSIBLE)
                         if old.get(k) != _jsonable(self.config.get(k)))
        if changed:
            logging.warning("Resuming in %s with changed settings %s: earlier rows of %s were "
                            "computed with the old ones.", self.path, changed, METRICS)

    def checkpointer(self, run: str = "main", **trackables: Any) -> Checkpointer:
        """The checkpoints of ``run`` (a folder under checkpoints/)."""
        return Checkpointer(self.path / "checkpoints" / run, **trackables)

    def resume_run(self, checkpointer: Checkpointer, run: str = "main") -> int:
        """Restores ``run`` (if resuming) and drops its metrics rows past the restored
        iteration; returns the iteration to continue from."""
        start = checkpointer.restore() if self.resume else 0
        self._drop_rows(run, after=start)
        return start

    # -- metrics ---------------------------------------------------------------------------

    def read_metrics(self) -> list[dict]:
        """The rows of metrics.csv (values as strings)."""
        path = self.path / METRICS
        if not path.exists():
            return []
        with path.open(newline="") as f:
            return list(csv.DictReader(f))

    def _drop_rows(self, run: str, after: int) -> None:
        """Drops ``run``'s rows logged at a step ≥ ``after`` (they are logged again)."""
        rows = self.read_metrics()
        kept = [r for r in rows if r["run"] != run or int(r["step"]) < after]
        if len(kept) != len(rows):
            self._write_rows(kept, list(rows[0]))

    def _write_rows(self, rows: list[dict], fieldnames: list[str]) -> None:
        tmp = self.path / (METRICS + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path / METRICS)

    def log(self, step: int, metrics: dict, run: str = "main") -> None:
        """Appends a row (run, step, metrics…) to metrics.csv and writes TensorBoard scalars."""
        row = {"run": run, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        path = self.path / METRICS
        if path.exists():
            with path.open(newline="") as f:
                header = next(csv.reader(f), None)
            if header is not None and header != list(row):
                self._write_rows(self.read_metrics(), _merged(header, list(row)))
                header = None
            if header is not None:
                with path.open("a", newline="") as f:
                    csv.DictWriter(f, fieldnames=header).writerow(row)
            else:
                rows = self.read_metrics() + [row]
                self._write_rows(rows, _merged(list(rows[0]), list(row)))
        else:
            self._write_rows([row], list(row))
        self._scalars(run, step, metrics)

    def _scalars(self, run: str, step: int, metrics: dict) -> None:
        if run not in self._writers:
            self._writers[run] = tf.summary.create_file_writer(str(self.path / "tensorboard" / run))
        write_scalars(self._writers[run], step, metrics)

    def write_results(self, metrics: dict) -> dict:
        """Writes results.json: ``{"metrics": …, "config": …}``; returns it."""
        results = {"metrics": _jsonable(metrics), "config": self.config}
        write_json(self.path / RESULTS, results)
        return results


# What `tf.summary.scalar` writes; it needs the tensorboard package, `tf.summary.write` does not.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def write_scalars(writer: tf.summary.SummaryWriter, step: int, metrics: Mapping[str, float]) -> None:
    """Writes each ``name: value`` of ``metrics`` as a TensorBoard scalar at ``step``, flushed."""
    with writer.as_default(step=int(step)):
        for name, value in metrics.items():
            tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=_SCALAR_METADATA)
    writer.flush()


def _merged(first: list[str], second: list[str]) -> list[str]:
    return first + [k for k in second if k not in first]


# -- progress ----------------------------------------------------------------------------------


def progress(iterations: Iterable[int], total: Optional[int], *, every_seconds: float = 10.0,
             label: str = "") -> Iterator[int]:
    """Yields ``iterations`` and logs ``label i/total, elapsed, ETA`` (``label i, elapsed`` for
    a ``total`` of None: unknown) at most every ``every_seconds`` (and at the last one), through
    ``absl.logging``."""
    start = last = time.perf_counter()
    done = 0
    for i in iterations:
        yield i
        done += 1
        now = time.perf_counter()
        if now - last >= every_seconds or i + 1 == total:
            if total is None:
                logging.info("%s %d  %s elapsed", label, i + 1, _duration(now - start))
            else:
                rate = (now - start) / done
                logging.info("%s %d/%d  %s elapsed, ETA %s", label, i + 1, total,
                             _duration(now - start), _duration(rate * (total - i - 1)))
            last = now


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


# -- plots and tables --------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot with the Agg backend (no display needed)."""
    import matplotlib  # noqa: PLC0415 (only launchers that plot pay for the import)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    """Writes ``rows`` (dicts sharing keys) as CSV."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict]) -> str:
    """``rows`` as an aligned plain-text table (floats with 4 significant digits)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    header = list(rows[0])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_table(title: str, rows: list[dict]) -> None:
    """Prints a table to stdout (the launcher's result, not a log line)."""
    sys.stdout.write(f"{title}\n{format_table(rows)}\n")
    sys.stdout.flush()
