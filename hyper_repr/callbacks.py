"""Keras callbacks for meta-training runs where Keras has no equivalent: a training budget (a
hyper-iteration limit and a time budget, both counted over resumed runs) and a checkpoint that
resumes a run exactly from any hyper-iteration.

Keras's ``BackupAndRestore`` restores at epoch boundaries only, after ``fit`` has built its
input iterator, and keeps no callback state; ``Checkpoint`` saves every ``every_seconds`` and on
SIGINT/SIGTERM, and is restored before ``fit``, so that the episode stream can start where the
run stopped (``data.episode_dataset(first_episode=…)``) and ``EarlyStopping`` keeps its best
weights and patience across runs:

    budget = TrainingBudget(iterations=10_000, seconds=3600)
    stopping = keras.callbacks.EarlyStopping("val_accuracy", mode="max", patience=20,
                                             restore_best_weights=True)
    checkpoint = Checkpoint("run/checkpoints", track=[budget, stopping])
    done = checkpoint.restore(model)  # after compile
    train = data.episode_dataset(..., meta_batch_size=B, first_episode=done.iterations * B)
    model.fit(train, steps_per_epoch=500, epochs=done.epochs + 20, initial_epoch=done.epochs,
              validation_data=val, callbacks=[budget, stopping, checkpoint])

Callbacks run in list order: ``Checkpoint`` goes after the callbacks it tracks (it saves their
state at the end of each epoch, after they have seen it).

Under ``MultiWorkerMirroredStrategy`` every worker runs the callbacks: ``is_chief`` says which
one writes the run's outputs (the others write to temporary folders, as Keras recommends), a
``Checkpoint`` of another worker restores the chief's saves (``restore_from``: a folder every
worker reads), and ``TrainingBudget`` takes the workers' mean clock, so that every worker stops
at the same hyper-iteration.
"""

import json
import signal
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
        super().__init__(f"{signal.Signals(signum).name} at hyper-iteration {iterations}: the run "
                         f"is saved in {directory}; the same command resumes it.")


class TrainingBudget(keras.callbacks.Callback):
    """Stops ``fit`` after ``iterations`` hyper-iterations or ``seconds`` of training, both
    counted over the runs that ``Checkpoint`` resumes (a stop mid-epoch ends that epoch, so it
    is validated); adds ``iteration`` (hyper-iterations done) and ``elapsed_seconds`` to the logs
    of each epoch and logs a progress line (rate and what is left of the budget).

    Args:
        iterations: the hyper-iteration limit. Defaults to `None` (none).
        seconds: the time budget (wall time in ``fit``, validation included). Defaults to
            `None` (none).
        episodes_per_iteration: B, to report episodes/s. Defaults to `1`.

    Attributes:
        iterations_done: hyper-iterations done.
        elapsed: seconds of training (under MultiWorkerMirroredStrategy, with a time budget, the
            mean over the workers, agreed at every hyper-iteration by an all-reduce).
        stopped_by: 'iterations' or 'time budget' once a limit is reached, else None.
    """

    def __init__(self, iterations: Optional[int] = None, seconds: Optional[float] = None, *,
                 episodes_per_iteration: int = 1):
        super().__init__()
        self.limit, self.seconds, self.batch = iterations, seconds, episodes_per_iteration
        self.iterations_done, self.elapsed = 0, 0.0
        self._epoch_start = self._first = 0
        self._clock = self._elapsed_at_start = 0.0

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
        self._clock, self._elapsed_at_start = time.monotonic(), self.elapsed
        self._first = self.iterations_done

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch_start = self.iterations_done

    def _tick(self) -> None:
        self.elapsed = self._elapsed_at_start + time.monotonic() - self._clock
        strategy = self.model.distribute_strategy
        if self.seconds is not None and worker_count(strategy) > 1:  # every worker stops at the same step
            self.elapsed = float(strategy.reduce("MEAN", tf.constant(self.elapsed, tf.float64), axis=None))
        if self.stopped_by:
            self.model.stop_training = True

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        self.iterations_done = self._epoch_start + batch + 1
        self._tick()

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._tick()
        if logs is not None:
            logs.update(iteration=self.iterations_done, elapsed_seconds=self.elapsed)
        rate = (self.iterations_done - self._first) / max(self.elapsed - self._elapsed_at_start, 1e-9)
        left = [f"{self.limit - self.iterations_done} iterations"] if self.limit else []
        if self.seconds is not None:
            left.append(f"{max(self.seconds - self.elapsed, 0):.0f} s")
        logging.info("hyper-iteration %d: %.2f it/s (%.1f episodes/s) in this run; left: %s",
                     self.iterations_done, rate, rate * self.batch, " or ".join(left) or "-")


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
    """

    def __init__(self, directory: Any, *, every_seconds: float = 60.0, track: Sequence[Any] = (),
                 restore_from: Any = None):
        super().__init__()
        if not every_seconds >= 0:
            raise ValueError(f"`every_seconds` must be ≥ 0, got {every_seconds!r}.")
        for callback in track:
            _check_trackable(callback)
        self.directory, self.every_seconds, self.track = str(directory), every_seconds, list(track)
        self.restore_from = str(restore_from or directory)
        self.iterations = self.epochs = self._epoch_start = 0
        self._pending: Optional[list] = None  # restored callback states, applied in on_train_begin
        self._saver: Optional[tuple] = None
        self._signal: Optional[int] = None
        self._handlers: dict = {}
        self._last_save = 0.0

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
                                             best_weights=best)
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
        self._last_save = time.monotonic()

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

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        self.iterations = self._epoch_start + batch + 1
        self._save_if_asked()
        if time.monotonic() - self._last_save >= self.every_seconds:
            self.save()

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self.epochs = epoch + 1
        self.save()
        self._save_if_asked()

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        self._restore_handlers()
