"""The Keras callbacks of every launcher's ``fit``: a training budget (a hyper-iteration limit and
seconds of hyper-iterations, both counted over resumed runs), a checkpoint that resumes a run
exactly from any hyper-iteration and saves on SIGINT/SIGTERM, TensorBoard scalars without the
tensorboard package, a progress bar that shows where a stopped epoch stopped, and a verdict on a
run that makes no progress. metrics.csv is Keras's ``CSVLogger`` (``workdir.drop_rows`` on resume).

Keras's ``BackupAndRestore`` restores at epoch boundaries only, after ``fit`` has built its
input iterator, and keeps no callback state; ``Checkpoint`` saves every ``every_seconds`` and on
SIGINT/SIGTERM, and is restored before ``fit``, so that the data stream can start where the run
stopped (e.g. ``hyper_repr.data.episode_dataset(first_episode=…)``) and ``EarlyStopping`` keeps
its best weights and patience across runs:

    budget = TrainingBudget(iterations=10_000, seconds=3600)
    stopping = keras.callbacks.EarlyStopping("val_accuracy", mode="max", patience=20,
                                             restore_best_weights=True)
    checkpoint = Checkpoint("run/checkpoints", track=[budget, stopping])
    done = checkpoint.restore(model)  # after compile
    train = data.episode_dataset(..., meta_batch_size=B, first_episode=done.iterations * B)
    model.fit(train, steps_per_epoch=500, epochs=done.epochs + 20, initial_epoch=done.epochs,
              validation_data=val, callbacks=[budget, stopping, checkpoint])

Callbacks run in list order: ``TrainingBudget`` goes first (its clock then times the
hyper-iteration alone), ``Checkpoint`` after the callbacks it tracks (it saves their state at the
end of each epoch, after they have seen it).

Under ``MultiWorkerMirroredStrategy`` every worker runs the callbacks: ``is_chief`` says which
one writes the run's outputs (the others write to temporary folders, as Keras recommends), a
``Checkpoint`` of another worker restores the chief's saves (``restore_from``: a folder every
worker reads), and ``TrainingBudget`` takes the workers' mean clock, so that every worker stops
at the same hyper-iteration.
"""

import importlib.util
import json
import signal
import sys
import threading
import time
from typing import Any, NamedTuple, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2


def worker_count(strategy: tf.distribute.Strategy) -> int:
    """The processes training together: MultiWorkerMirroredStrategy's workers (TF_CONFIG), else 1."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    return strategy.num_replicas_in_sync // len(strategy.extended.worker_devices)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's outputs: the only process, or the chief of a
    MultiWorkerMirroredStrategy cluster (task 'chief', else worker 0; tf.distribute's
    ``should_checkpoint``)."""
    return bool(strategy.extended.should_checkpoint)


class Progress(NamedTuple):
    """What a restored run had done."""

    iterations: int  # training steps (hyper-iterations)
    epochs: int  # epochs ended (each ended by its validation)


class Interrupted(Exception):
    """``fit`` stopped by SIGINT or SIGTERM after ``Checkpoint`` saved the run."""

    def __init__(self, signum: int, iterations: int, directory: str):
        self.signum, self.iterations, self.directory = signum, iterations, directory
        super().__init__(f"{signal.Signals(signum).name} at hyper-iteration {iterations}: the run is saved in "
                         f"{directory}; the same command resumes it.")


class TrainingBudget(keras.callbacks.Callback):
    """Stops ``fit`` after ``iterations`` hyper-iterations or ``seconds`` of hyper-iterations,
    both counted over the runs that ``Checkpoint`` resumes (a stop mid-epoch ends that epoch, so
    it is validated); adds ``iteration`` (hyper-iterations done), ``seconds`` (this epoch's
    seconds of hyper-iterations) and ``elapsed_seconds`` (all of them) to the logs of each
    epoch, and logs a progress line (rate and what is left) at most every ``log_seconds``.

    The time counted is that of the training steps (``on_train_batch_begin`` to its end, as the
    budget's callback sees it first): validation, metrics, checkpoints and start-up are not, so
    a budget buys the same training whatever the launcher logs.

    Args:
        iterations: the hyper-iteration limit. Defaults to `None` (none).
        seconds: the time budget, > 0. Defaults to `None` (none).
        episodes_per_iteration: B, to report episodes/s. Defaults to `1`.
        log_seconds: the least time between two progress lines. Defaults to `10.0`.

    Attributes:
        iterations_done: hyper-iterations done.
        elapsed: seconds of hyper-iterations (under MultiWorkerMirroredStrategy, with a time
            budget, the mean over the workers, agreed at every hyper-iteration by an all-reduce).
        stopped_by: 'iterations' or 'time budget' once a limit is reached, else None.
    """

    def __init__(self, iterations: Optional[int] = None, seconds: Optional[float] = None, *,
                 episodes_per_iteration: int = 1, log_seconds: float = 10.0):
        super().__init__()
        if seconds is not None and not seconds > 0:
            raise ValueError(f"`seconds` (the time budget) must be positive or None (no limit), got {seconds!r}.")
        if iterations is not None and iterations < 1:
            raise ValueError(f"`iterations` must be positive or None (no limit), got {iterations!r}.")
        self.limit, self.seconds, self.batch, self.log_seconds = iterations, seconds, episodes_per_iteration, log_seconds
        self.iterations_done, self.elapsed = 0, 0.0
        self._epoch_start = self._first = 0
        self._step_start = self._epoch_seconds = self._elapsed_at_start = self._logged = 0.0

    def get_state(self) -> dict:
        return {"iterations_done": self.iterations_done, "elapsed": self.elapsed}

    def set_state(self, state: dict) -> None:
        self.iterations_done, self.elapsed = int(state["iterations_done"]), float(state["elapsed"])

    @property
    def stopped_by(self) -> Optional[str]:
        if self.limit is not None and self.iterations_done >= self.limit:
            return "iterations"
        if self.seconds is not None and self.elapsed >= self.seconds:
            return "time budget"
        return None

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        self._elapsed_at_start, self._first, self._logged = self.elapsed, self.iterations_done, time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch_start, self._epoch_seconds = self.iterations_done, 0.0

    def on_train_batch_begin(self, batch: int, logs: Optional[dict] = None) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        seconds = time.perf_counter() - self._step_start
        self._epoch_seconds += seconds
        self.elapsed += seconds
        self.iterations_done = self._epoch_start + batch + 1
        strategy = self.model.distribute_strategy
        if self.seconds is not None and worker_count(strategy) > 1:  # every worker stops at the same step
            self.elapsed = float(strategy.reduce("MEAN", tf.constant(self.elapsed, tf.float64), axis=None))
        if self.stopped_by:
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if logs is not None:
            logs.update(iteration=self.iterations_done, seconds=self._epoch_seconds, elapsed_seconds=self.elapsed)
        if time.monotonic() - self._logged < self.log_seconds and not self.model.stop_training:
            return
        self._logged = time.monotonic()
        rate = (self.iterations_done - self._first) / max(self.elapsed - self._elapsed_at_start, 1e-9)
        left = [f"{self.limit - self.iterations_done} iterations"] if self.limit else []
        if self.seconds is not None:
            left.append(f"{max(self.seconds - self.elapsed, 0):.0f} s")
        episodes = f" ({rate * self.batch:.1f} episodes/s)" if self.batch > 1 else ""
        logging.info("hyper-iteration %d: %.2f it/s%s in this run; left: %s", self.iterations_done, rate, episodes,
                     " or ".join(left) or "-")


# What `tf.summary.scalar` writes; it needs the tensorboard package, `tf.summary.write` does not.
_SCALAR = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


class EpochScalars(keras.callbacks.Callback):
    """Each epoch's logs as TensorBoard scalars ``epoch_<name>`` at step = epoch, in
    ``log_dir``/train and (``val_`` entries) ``log_dir``/validation, as
    ``keras.callbacks.TensorBoard`` lays them out; written with ``tf.summary.write``, so that
    the tensorboard package is needed only to view them (Keras's callback needs it to write).

    Args:
        log_dir: the folder.
    """

    def __init__(self, log_dir: Any):
        super().__init__()
        self.log_dir, self._writers = str(log_dir), {}

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        for key, value in (logs or {}).items():
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            if split not in self._writers:
                self._writers[split] = tf.summary.create_file_writer(f"{self.log_dir}/{split}")
            with self._writers[split].as_default(step=epoch):
                tf.summary.write(f"epoch_{name}", tf.constant(float(value)), metadata=_SCALAR)
        for writer in self._writers.values():
            writer.flush()


def _state_of(callback: Any) -> tuple[dict, Optional[list]]:
    """(JSON state, best weights or None) of a tracked callback."""
    if hasattr(callback, "get_state"):
        return callback.get_state(), None
    if isinstance(callback, keras.callbacks.EarlyStopping):
        return ({"wait": callback.wait, "best": callback.best,  # best_epoch: set by on_train_begin
                 "best_epoch": getattr(callback, "best_epoch", 0), "stopped_epoch": callback.stopped_epoch},
                callback.best_weights)
    return {"best": callback.best}, None  # ModelCheckpoint


def _check_trackable(callback: Any) -> None:
    if not (hasattr(callback, "get_state") or isinstance(
            callback, (keras.callbacks.EarlyStopping, keras.callbacks.ModelCheckpoint))):
        raise TypeError(f"`track` holds {type(callback).__name__}: Checkpoint keeps the state of "
                        f"EarlyStopping, ModelCheckpoint and callbacks with get_state/set_state.")


def _set_state(callback: Any, state: dict, best_weights: Optional[list]) -> None:
    if hasattr(callback, "set_state"):
        callback.set_state(state)
        return
    for name, value in state.items():
        setattr(callback, name, value)
    if best_weights is not None:
        callback.best_weights = best_weights


def _jsonable(value: Any) -> Any:
    return float(value) if isinstance(value, (np.floating, np.integer)) else value


class Checkpoint(keras.callbacks.Callback):
    """The state of a ``fit`` run (the model's weights, the optimizer's, the hyper-iterations and
    epochs done, and the state of the ``track``ed callbacks), saved at each epoch end, every
    ``every_seconds`` and on SIGINT/SIGTERM (then ``fit`` raises ``Interrupted``); ``restore``
    before ``fit`` continues from the latest save (see the module docstring). A run killed at any
    moment (SIGKILL) loses at most ``every_seconds`` of training.

    Args:
        directory: the checkpoint folder (``tf.train.CheckpointManager``, 2 kept).
        every_seconds: the longest time between saves. Defaults to `60.0`; `0` saves after
            every hyper-iteration.
        restore_from: the folder ``restore`` reads, if not ``directory``: under
            MultiWorkerMirroredStrategy, a worker other than the chief restores the chief's
            saves and writes its own to a temporary ``directory``. Defaults to `None`.
        track: callbacks whose state is saved and restored: ``keras.callbacks.EarlyStopping``
            (patience count, best value and weights), ``keras.callbacks.ModelCheckpoint`` (best
            value), and any callback with ``get_state()``/``set_state(state)`` (e.g.
            ``TrainingBudget``).
        variables: more trackables to save with the model, by name (e.g. hyperparameters held
            by tf.Variables outside the model, a method's state).
        at_epoch_end: save at every epoch end (epochs of many hyper-iterations, ended by a
            validation); else at most every ``every_seconds`` there too (epochs of one).
            Defaults to `True`.
    """

    def __init__(self, directory: Any, *, every_seconds: float = 60.0, track: Sequence[Any] = (),
                 restore_from: Any = None, variables: Optional[dict] = None, at_epoch_end: bool = True):
        super().__init__()
        if not every_seconds >= 0:
            raise ValueError(f"`every_seconds` must be ≥ 0, got {every_seconds!r}.")
        for callback in track:
            _check_trackable(callback)
        self.directory, self.every_seconds, self.track = str(directory), every_seconds, list(track)
        self.variables, self.at_epoch_end = dict(variables or {}), at_epoch_end
        self.restore_from = str(restore_from or directory)
        self.iterations = self.epochs = self._epoch_start = 0
        self._pending: Optional[list] = None  # restored callback states, applied in on_train_begin
        self._saver: Optional[tuple] = None
        self._signal: Optional[int] = None
        self._handlers: dict = {}
        self._last_save = 0.0
        self._saved_at: tuple = (-1, -1)

    # -- saving and restoring ---------------------------------------------------------------------

    def _checkpoint(self, model: keras.Model) -> tuple:
        """(manager, state variable, best-weight variables per tracked callback), made once."""
        if self._saver is None:
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)  # its slots are restored too
            state = tf.Variable("", dtype=tf.string, trainable=False)
            best = [[tf.Variable(tf.zeros(w.shape, w.dtype), trainable=False) for w in model.weights]
                    if isinstance(c, keras.callbacks.EarlyStopping) else [] for c in self.track]
            checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, state=state,
                                             best_weights=best, **self.variables)
            self._saver = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=2), state, best
        return self._saver

    def restore(self, model: keras.Model) -> Progress:
        """Loads the latest save into ``model`` (compiled), its optimizer and the tracked
        callbacks (now, and again when ``fit`` starts); returns what the run had done (0, 0 if
        nothing was saved)."""
        manager, state, best = self._checkpoint(model)
        latest = tf.train.latest_checkpoint(self.restore_from)
        if latest is None:
            return Progress(0, 0)
        manager.checkpoint.restore(latest).assert_existing_objects_matched()
        saved = json.loads(state.numpy().decode())
        self.iterations, self.epochs = saved["iterations"], saved["epochs"]
        self._pending = [(s, [v.numpy() for v in weights] if s.pop("has_best_weights", False) else None)
                         for s, weights in zip(saved["callbacks"], best)]
        for callback, (s, weights) in zip(self.track, self._pending):
            _set_state(callback, s, weights)  # now, for the caller to read (e.g. the time spent)
        logging.info("Resumed %s at hyper-iteration %d.", latest, self.iterations)
        return Progress(self.iterations, self.epochs)

    def save(self) -> None:
        """Saves the run now."""
        manager, state, best = self._checkpoint(self.model)
        states = []
        for callback, variables in zip(self.track, best):
            s, weights = _state_of(callback)
            if weights is not None:
                for v, w in zip(variables, weights):
                    v.assign(w)
            states.append({k: _jsonable(v) for k, v in s.items()} | {"has_best_weights": weights is not None})
        state.assign(json.dumps({"iterations": self.iterations, "epochs": self.epochs, "callbacks": states}))
        manager.save(checkpoint_number=self.iterations)
        self._last_save, self._saved_at = time.monotonic(), (self.iterations, self.epochs)

    # -- fit ------------------------------------------------------------------------------------------

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        for callback, (s, weights) in zip(self.track, self._pending or ()):
            _set_state(callback, s, weights)  # again: Keras's callbacks reset in on_train_begin
        self._pending, self._signal, self._last_save = None, None, time.monotonic()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """The first SIGINT/SIGTERM asks for a save; a second one acts as if unhandled."""
        self._signal = signum
        self._restore_handlers()
        logging.warning("%s: saving the run at the end of this hyper-iteration (again to quit "
                        "without saving).", signal.Signals(signum).name)

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers.clear()

    def _save_if_asked(self) -> None:
        if self._signal is not None:
            self.save()
            raise Interrupted(self._signal, self.iterations, self.directory)

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch_start = self.iterations

    def _due(self) -> bool:
        return time.monotonic() - self._last_save >= self.every_seconds

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        self.iterations = self._epoch_start + batch + 1
        if batch + 1 == self.params.get("steps") or self.model.stop_training:
            return  # the epoch ends here: saved in on_epoch_end, after its callbacks
        self._save_if_asked()
        if self._due():
            self.save()

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self.epochs = epoch + 1
        if self.at_epoch_end or self._due() or self.model.stop_training or self._signal is not None:
            self.save()
        self._save_if_asked()

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        self._restore_handlers()
        if self._saved_at != (self.iterations, self.epochs):
            self.save()  # the end of the run (e.g. the epochs ran out between two timed saves)


def tensorboard(log_dir: Any) -> keras.callbacks.Callback:
    """``keras.callbacks.TensorBoard`` if the tensorboard package is installed, else
    ``EpochScalars`` (the same epoch scalars, which that package can read later)."""
    if importlib.util.find_spec("tensorboard") is None:
        return EpochScalars(log_dir)
    return keras.callbacks.TensorBoard(str(log_dir), write_graph=False, profile_batch=0)


class ProgressBar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, whose epoch stopped early (a budget, an interrupt) ends at the
    hyper-iteration reached (Keras's shows the whole epoch done: 300/300 after 218 steps)."""

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        planned = self.target
        if self.model.stop_training and self.seen and self.progbar is not None:
            self.target = self.progbar.target = self.seen  # where the epoch stopped, not its planned length
        super().on_epoch_end(epoch, logs)
        self.target = planned


class Stagnation(keras.callbacks.Callback):
    """Watches an epoch metric for a run that makes no progress: ``verdict`` is a sentence when
    the last ``monitor`` value is within ``margin`` of ``chance`` (e.g. validation accuracy at
    chance), or when it has moved by less than ``tolerance`` (relative) over the last
    ``patience`` epochs, else None. Its state is saved by ``Checkpoint`` (``track``).

    Args:
        monitor: the logs' key (e.g. "val_accuracy", "val_loss").
        chance: the value of a model that learned nothing. Defaults to `None` (not checked).
        margin: how close to ``chance`` counts as at chance. Defaults to `0.02`.
        patience: epochs without movement that count as stuck. Defaults to `10`; None: not
            checked.
        tolerance: the relative movement below which the metric is stuck. Defaults to `1e-4`.
    """

    def __init__(self, monitor: str, *, chance: Optional[float] = None, margin: float = 0.02,
                 patience: Optional[int] = 10, tolerance: float = 1e-4):
        super().__init__()
        self.monitor, self.chance, self.margin, self.patience, self.tolerance = monitor, chance, margin, patience, tolerance
        self.values: list = []
        self._kept = (patience or 0) + 1  # the values the verdict needs

    def get_state(self) -> dict:
        return {"values": self.values}

    def set_state(self, state: dict) -> None:
        self.values = [float(v) for v in state["values"]]

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if logs and self.monitor in logs:
            self.values = (self.values + [float(logs[self.monitor])])[-self._kept:]

    @property
    def verdict(self) -> Optional[str]:
        if not self.values:
            return None
        last = self.values[-1]
        if not np.isfinite(last):
            return f"no progress: {self.monitor} is {last}"
        if self.chance is not None and abs(last - self.chance) <= self.margin:
            return f"no progress: {self.monitor} {last:.4g} is at chance ({self.chance:.4g})"
        recent = self.values
        if self.patience and len(recent) > self.patience and max(recent) - min(recent) <= self.tolerance * max(abs(last), 1e-12):
            return f"no progress: {self.monitor} stuck at {last:.4g} for the last {self.patience} evaluations"
        return None


def verbosity(verbose: Any) -> int:
    """``fit``'s verbose of a launcher's ``--verbose``: 0, 1 (a progress bar), 2 (a line per
    epoch), or "auto": 1 on a terminal, else 2."""
    return (1 if sys.stdout.isatty() else 2) if verbose == "auto" else int(verbose)
