"""far_ho2.launch, the launchers' library: the output folder (lock, config.json, the resume check,
what a failed launch leaves), the flags generated from a configuration dataclass and the errors
in flag names, and the shared Keras callbacks (budget, progress bar, no-progress verdict)."""

import dataclasses
import json
import math
import signal
import sys
import time
from typing import Optional

import keras
import numpy as np
import pytest
from absl import flags

from far_ho2.launch import callbacks, cli, workdir


@dataclasses.dataclass(frozen=True)
class Demo:
    steps: int = cli.setting(5, "Inner steps.", flag="T", lower=1)
    rate: float = cli.setting(0.1, "A learning rate.", positive=True)
    share: float = cli.setting(0.5, "A fraction.", lower=0, below=1)
    sizes: tuple = cli.setting((1, 2), "Some sizes.", lower=1, item=int)
    budget: Optional[float] = cli.setting(None, "Seconds (default: none).", positive=True)
    kind: str = cli.setting("a", "A kind.", choices=("a", "b"))
    on: bool = cli.setting(True, "A switch.")
    by_hand: str = "x"  # no generated flag


def parse(*args: str) -> tuple[dict, flags.FlagValues]:
    values = flags.FlagValues()
    holders = cli.define_flags(Demo, flag_values=values)
    values(["launcher", *args])
    return holders, values


def test_flags_are_generated_from_the_dataclass_with_its_defaults_help_and_bounds():
    holders, values = parse()
    assert sorted(holders) == ["T", "budget", "kind", "on", "rate", "share", "sizes"]  # not by_hand
    assert Demo(**cli.config_values(Demo, holders)) == Demo()
    assert values["T"].help == "Inner steps." and values["share"].help == "A fraction."
    holders, _ = parse("--T=3", "--rate=2", "--sizes=4,5", "--budget=9", "--kind=b", "--noon")
    assert Demo(**cli.config_values(Demo, holders)) == Demo(steps=3, rate=2.0, sizes=(4, 5), budget=9.0, kind="b",
                                                            on=False)
    assert cli.given_flags(holders) == {"T": 3, "rate": 2.0, "sizes": ["4", "5"], "budget": 9.0, "kind": "b",
                                        "on": False}
    for bad, message in (("--T=0", "--T must be ≥ 1"), ("--rate=0", "--rate must be > 0"),
                         ("--share=1", "--share must be ≥ 0 and < 1"), ("--budget=0", "--budget must be > 0"),
                         ("--kind=c", "--kind"), ("--steps=3", "steps")):
        with pytest.raises(flags.Error, match=message):
            parse(bad)
    for bad in ("--sizes=0,1", "--sizes=a"):
        holders, _ = parse(bad)
        with pytest.raises(cli.LaunchError, match="--sizes must be a comma-separated list of ints ≥ 1"):
            cli.config_values(Demo, holders)


def test_errors_name_the_flags_as_the_user_writes_them():
    names = {"steps": "T", "learn_lr": "learn_lr", "head_l2": "head_l2", "resume": "resume", "data": "source"}
    message = ("`steps` must be ≥ 1; `steps=3` differs; use learn_lr=False; pass head_l2 > 0; start afresh "
               "(`resume=False`); `data`='x'; other=3 and `other` stay")
    assert cli.in_flag_names(message, names) == (
        "--T must be ≥ 1; --T=3 differs; use --nolearn_lr; pass --head_l2 > 0; start afresh (--noresume); "
        "--source='x'; other=3 and `other` stay")


def test_a_session_locks_writes_its_config_and_refuses_another_runs_settings(tmp_path):
    folder = tmp_path / "run"
    with workdir.session(folder, Demo(), resumable=("budget",)) as run:
        assert not run.resumed
        assert workdir.read_json(folder / workdir.CONFIG) == workdir.jsonable(Demo())
        with pytest.raises(workdir.LockedError, match="in use by another run"):
            with workdir.session(folder, Demo()):
                pass
        (folder / workdir.CHECKPOINTS).mkdir()
        (folder / workdir.CHECKPOINTS / "checkpoint").write_text("saved")
    with pytest.raises(workdir.ConfigMismatchError, match=r"`steps`=5 in the run, 3 now.*only `budget` may change"):
        with workdir.session(folder, Demo(steps=3), resumable=("budget",)):
            pass
    with workdir.session(folder, Demo(budget=60.0), resumable=("budget",)) as run:  # a resumable change
        assert run.resumed
    assert workdir.read_json(folder / workdir.CONFIG)["budget"] == 60.0
    with workdir.session(folder, Demo(steps=3), resume=False) as run:  # --noresume: afresh
        assert not run.resumed and not (folder / workdir.CHECKPOINTS).exists()


@pytest.mark.parametrize("error", [FloatingPointError, ValueError])
def test_a_failed_first_launch_leaves_nothing_that_blocks_the_corrected_one(tmp_path, error):
    folder = tmp_path / "run"
    with pytest.raises(error):
        with workdir.session(folder, Demo(rate=1e6)) as run:
            (run.path / workdir.METRICS).write_text("epoch\n0\n")
            (run.path / workdir.CHECKPOINTS).mkdir()
            (run.path / workdir.CHECKPOINTS / "checkpoint").write_text("saved")
            raise error("diverged")
    assert not folder.exists()  # not even the lock
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(error):
        with workdir.session(existing, Demo(rate=1e6)):
            raise error("diverged")
    assert [p.name for p in existing.iterdir()] == [workdir.LOCK]  # a folder the user made stays


def test_an_interrupted_or_resumed_launch_keeps_its_work(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with workdir.session(folder, Demo()) as run:
            (run.path / workdir.CHECKPOINTS).mkdir()
            (run.path / workdir.CHECKPOINTS / "checkpoint").write_text("saved")
            raise KeyboardInterrupt
    assert (folder / workdir.CHECKPOINTS / "checkpoint").exists()
    with pytest.raises(FloatingPointError):
        with workdir.session(folder, Demo()):  # resumed, then diverged: the saved run stays
            raise FloatingPointError("diverged")
    assert (folder / workdir.CHECKPOINTS / "checkpoint").exists() and (folder / workdir.CONFIG).exists()


def test_metrics_rows_past_the_checkpoint_and_a_half_row_are_dropped(tmp_path):
    (tmp_path / workdir.METRICS).write_text("epoch,loss\n0,1.5\n1,1.25\n2,1.0\n3,0.9\n4")
    workdir.drop_rows(tmp_path, 3)
    assert workdir.read_metrics(tmp_path) == [{"epoch": 0.0, "loss": 1.5}, {"epoch": 1.0, "loss": 1.25},
                                              {"epoch": 2.0, "loss": 1.0}]
    workdir.drop_rows(tmp_path / "none", 0)  # no file: nothing to do


def test_json_is_written_atomically_with_numbers_json_can_hold(tmp_path):
    workdir.write_json(tmp_path / "r.json", {"a": np.float32(0.5), "b": (1, 2), "c": math.nan, "d": Demo()})
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == {"a": 0.5, "b": [1, 2], "c": "nan", "d": workdir.jsonable(Demo())}
    assert not list(tmp_path.glob("*.tmp"))


def test_the_time_budget_has_one_meaning():
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="`seconds` .* must be positive or None"):
            callbacks.TrainingBudget(seconds=bad)
    with pytest.raises(ValueError, match="`iterations` must be positive"):
        callbacks.TrainingBudget(iterations=0)


def test_a_run_without_progress_is_named():
    at_chance = callbacks.Stagnation("val_accuracy", chance=0.2, patience=None)
    for value in (0.2, 0.21, 0.19):
        at_chance.on_epoch_end(0, {"val_accuracy": value})
    assert at_chance.verdict == "no progress: val_accuracy 0.19 is at chance (0.2)"
    stuck = callbacks.Stagnation("val_loss", patience=3)
    for value in (2.0, 1.5, 1.5, 1.5, 1.5):
        stuck.on_epoch_end(0, {"val_loss": value})
    assert stuck.verdict == "no progress: val_loss stuck at 1.5 for the last 3 evaluations"
    learning = callbacks.Stagnation("val_loss", patience=3)
    learning.set_state(stuck.get_state())
    learning.on_epoch_end(0, {"val_loss": 1.2})
    assert learning.verdict is None
    assert callbacks.Stagnation("val_loss").verdict is None  # nothing seen yet


def test_the_progress_bar_of_a_stopped_epoch_ends_where_it_stopped():
    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.model.stop_training = True

    def fit(bar):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        model.fit(np.zeros((40, 2)), np.zeros(40), batch_size=4, epochs=1, verbose=2, callbacks=[Stop(), bar])
        return bar.progbar.target
    assert fit(callbacks.ProgressBar()) == 3
    assert fit(keras.callbacks.ProgbarLogger()) == 10  # Keras's own: the whole epoch, as if done


def test_a_signal_that_lands_in_a_finalizer_is_delivered_again_not_lost():
    """Python prints and drops an exception raised in ``__del__``: a SIGTERM handled there would
    be lost (the run would go on, or exit 0); the handler delivers it again a moment later."""

    class Finalized:
        def __del__(self):
            cli._terminate(signal.SIGUSR1, sys._getframe())  # as if the signal landed here

    previous = signal.signal(signal.SIGUSR1, cli._terminate)
    try:
        with pytest.raises(cli.Terminated, match="SIGUSR1"):
            Finalized()  # finalized at once: the handler returns, then the signal comes again
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    with pytest.raises(cli.Terminated, match="SIGTERM"):
        cli._terminate(signal.SIGTERM, sys._getframe())  # elsewhere it raises at once
