"""A run's output folder: its lock, config.json, metrics.csv, results.json and checkpoints.

    config.json    the run's configuration, written atomically once the folder is locked (and
                   deleted again if a fresh launch fails: it is never a failed launch's record)
    metrics.csv    ``keras.callbacks.CSVLogger``'s rows (``epoch`` first), appended; on resume
                   the rows of epochs past the last checkpoint are dropped, so none is duplicated
    results.json   written by the run that computed them (``write_json``)
    checkpoints/   ``callbacks.Checkpoint``'s saves
    .lock          held (``fcntl.flock``) while a process works in the folder

``session(folder, config, ...)`` is the whole protocol: lock, ``--noresume`` deletion, the resume
check (a checkpoint made with another configuration stops the launch with
``ConfigMismatchError``, unless only ``resumable`` settings changed), config.json, and on a failed
fresh launch (a bad setting found late, divergence) the deletion of everything it wrote.
"""

import contextlib
import csv
import dataclasses
import fcntl
import json
import math
import os
import pathlib
import shutil
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

LOCK, CONFIG, METRICS, RESULTS, CHECKPOINTS = ".lock", "config.json", "metrics.csv", "results.json", "checkpoints"
OUTPUTS = (CONFIG, METRICS, RESULTS, CHECKPOINTS, "tensorboard")  # what every run writes


class LockedError(RuntimeError):
    """Another process works in the folder."""


class ConfigMismatchError(ValueError):
    """The folder holds a run with another configuration: ``changes`` maps each setting that
    differs to its (saved, given) values."""

    def __init__(self, folder: pathlib.Path, changes: Mapping[str, tuple], resumable: Sequence[str]):
        self.folder, self.changes = folder, dict(changes)
        described = ", ".join(f"`{k}`={old!r} in the run, {new!r} now" for k, (old, new) in self.changes.items())
        super().__init__(f"{str(folder)!r} holds a run with other settings ({described}); only "
                         f"{', '.join(f'`{k}`' for k in resumable) or 'nothing'} may change on resume: relaunch with "
                         f"its settings, use another folder, or start it afresh (`resume=False`).")


def jsonable(value: Any) -> Any:
    """``value`` as JSON holds it: tuples as lists, NumPy/TF scalars and arrays as numbers and
    lists, non-finite floats as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def write_json(path: Any, data: Any) -> None:
    """Writes ``data`` (``jsonable``) atomically: a crash never leaves half a file."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Any) -> Any:
    return json.loads(pathlib.Path(path).read_text())


@contextlib.contextmanager
def lock(folder: Any) -> Iterator[None]:
    """Holds an exclusive lock on ``folder`` (an existing folder; released when the process ends,
    however it ends).

    Raises:
        LockedError: if another process (or another ``lock`` of this one) holds it.
    """
    root = pathlib.Path(folder)
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


def delete(folder: Any, names: Sequence[str]) -> None:
    """Deletes the files and folders ``names`` of ``folder`` (those that exist)."""
    for name in names:
        path = pathlib.Path(folder) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def has_checkpoint(folder: Any) -> bool:
    """Whether ``folder``/checkpoints holds a save (of any of its runs)."""
    return any((pathlib.Path(folder) / CHECKPOINTS).rglob("checkpoint"))


def check_resumable(folder: Any, config: Mapping[str, Any], resumable: Sequence[str] = ()) -> None:
    """Raises ``ConfigMismatchError`` unless config.json in ``folder`` matches ``config`` in
    every setting but ``resumable`` (nothing to check without config.json)."""
    path = pathlib.Path(folder) / CONFIG
    if not path.is_file():
        return
    saved, given = read_json(path), jsonable(dict(config))
    changes = {k: (saved.get(k), given.get(k)) for k in sorted(set(saved) | set(given))
               if k not in resumable and saved.get(k) != given.get(k)}
    if changes:
        raise ConfigMismatchError(pathlib.Path(folder), changes, resumable)


def read_metrics(folder: Any, name: str = METRICS) -> list[dict]:
    """The rows of ``folder``/metrics.csv, values as floats where they are numbers."""
    path = pathlib.Path(folder) / name
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str) -> Any:
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def drop_rows(folder: Any, epochs: int, name: str = METRICS) -> None:
    """Drops the rows of epochs ≥ ``epochs`` (logged after the last checkpoint) from
    ``folder``/``name``, whose first column is the epoch, and a row cut short by a kill."""
    path = pathlib.Path(folder) / name
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if len(r) == len(rows[0]) and int(float(r[0])) < epochs]  # (and no half row)
    if len(kept) != len(rows):
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, path)


@dataclasses.dataclass
class Session:
    """What ``session`` yields: the folder, and whether the launch resumes a saved run."""

    path: pathlib.Path
    resumed: bool


@contextlib.contextmanager
def session(folder: Any, config: Any, *, resume: bool = True, resumable: Sequence[str] = (),
            outputs: Sequence[str] = (), drop_on: tuple = (ValueError, FloatingPointError)) -> Iterator[Session]:
    """The run in ``folder`` (created), locked for the ``with`` block (see the module docstring).

    Args:
        folder: the output folder.
        config: the configuration (a dataclass or a dict), written to config.json.
        resume: continue the run saved in ``folder``; else delete its outputs (``OUTPUTS`` and
            ``outputs``) first. Defaults to `True`.
        resumable: the settings a resumed run may change (e.g. its limits).
        outputs: the launcher's other files (plots, tables), deleted with the run's.
        drop_on: the exceptions after which a fresh launch deletes what it wrote: a bad setting
            found late, and divergence (``far_ho2.DivergenceError`` is a FloatingPointError).
            After any other (an interrupt, a crash) its checkpoints are kept for the resume.

    Raises:
        LockedError: if another process works in ``folder``.
        ConfigMismatchError: if ``folder`` holds a saved run with other settings.
    """
    root = pathlib.Path(folder)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    names = tuple(OUTPUTS) + tuple(outputs)
    try:
        with lock(root):
            if not resume:
                delete(root, names)
            resumed = has_checkpoint(root)
            if resumed:
                check_resumable(root, jsonable(config), resumable)
            write_json(root / CONFIG, config)
            try:
                yield Session(root, resumed)
            except BaseException as error:
                if not resumed and isinstance(error, drop_on):
                    delete(root, names)  # a failed fresh launch: nothing it wrote may block the next one
                raise
    finally:
        if created and all(p.name == LOCK for p in root.iterdir()):
            shutil.rmtree(root)  # a launch that wrote nothing leaves no folder
