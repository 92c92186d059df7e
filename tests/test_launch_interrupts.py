"""Every launcher killed at a random moment, then launched again with the same command: SIGINT and
SIGTERM save the run and end it with one line (exit 128 + the signal), SIGKILL loses at most the
checkpoint period (made small here) of hyper-iterations; the relaunch resumes, writes no metrics
row twice, and ends with the results of an uninterrupted run (the launchers are deterministic)."""

import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from far_ho2.launch import workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT_SECONDS = 0.5
SIGNALS = ("SIGINT", "SIGTERM", "SIGKILL")
LAUNCHERS = {  # tiny runs of a few seconds of hyper-iterations, each epoch (metrics row) one hyper-iteration but omniglot's
    "hyper_cleaning": ("hyper_cleaning", "--n_train=100", "--n_val=50", "--T=5", "--hyper_iterations=150",
                       "--retrain_steps=20"),
    "effect_of_T": ("effect_of_T", "--source=synthetic", "--classes=4", "--dim=6", "--T_list=3,exact",
                    "--hyper_iterations=120"),
    "omniglot": ("omniglot", "--ways=3", "--queries=2", "--meta_batch_size=2", "--T=1", "--hyper_iterations=40",
                 "--eval_every=10", "--eval_episodes=4", "--test_episodes=4", "--eval_batch_size=2", "--verbose=0",
                 "--dtype=float64"),
}
TIMING = re.compile(r"seconds|elapsed|logdir")  # differ between the runs


def launch(name: str, logdir: pathlib.Path) -> subprocess.Popen:
    module, *arguments = LAUNCHERS[name]
    return subprocess.Popen([sys.executable, "-m", f"flags.{module}", f"--logdir={logdir}",
                             f"--checkpoint_seconds={CHECKPOINT_SECONDS}", *arguments],
                            cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def metrics_files(logdir: pathlib.Path) -> list[pathlib.Path]:
    """The metrics files: effect_of_T's one per run (metrics/<run>.csv), the others' metrics.csv."""
    return sorted(logdir.glob("metrics/*.csv")) or [logdir / workdir.METRICS]


def saved_iterations(logdir: pathlib.Path, metrics: pathlib.Path) -> int:
    """The hyper-iteration of the latest checkpoint of the run whose metrics file is ``metrics``."""
    folder = logdir / workdir.CHECKPOINTS / (metrics.stem if metrics.parent.name == "metrics" else "")
    index = folder / "checkpoint"
    found = re.search(r'model_checkpoint_path: "ckpt-(\d+)"', index.read_text()) if index.exists() else None
    return int(found.group(1)) if found else 0


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not TIMING.search(k)}
    return value


def assert_same_results(got, want, path: str = "") -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), path
        for key in want:
            assert_same_results(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), path
    else:
        assert got == want, path


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.long) if n == "omniglot" else n
                                  for n in LAUNCHERS])
def test_a_launcher_killed_at_a_random_moment_resumes_losing_at_most_the_checkpoint_period(tmp_path, name):
    rng = random.Random(f"{name}-{time.time_ns()}")
    processes = {kind: launch(name, tmp_path / kind) for kind in ("straight", *SIGNALS)}
    moments = {}
    for kind in SIGNALS:  # a random moment after the first checkpoint (the start-up is not a run yet)
        logdir, process = tmp_path / kind, processes[kind]
        deadline = time.monotonic() + 300
        while not any((logdir / workdir.CHECKPOINTS).rglob("checkpoint")) and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        moments[kind] = rng.uniform(0, 2.0)
        time.sleep(moments[kind])
        process.send_signal(getattr(signal, kind))
    for kind in SIGNALS:
        code, stderr = finish(processes[kind])
        assert "Traceback" not in stderr, stderr[-3000:]
        logdir, signum = tmp_path / kind, getattr(signal, kind)
        if code == 0:
            continue  # it ended before the signal: nothing to resume
        if kind == "SIGKILL":
            assert code == -signum
        else:  # saved, and said in one line
            assert code == 128 + signum, stderr[-3000:]
            assert stderr.splitlines()[-1].startswith(f"Interrupted: {kind}"), stderr[-3000:]
        for path in metrics_files(logdir):  # the work lost: what was logged after the last checkpoint
            rows = workdir.read_metrics(path.parent, path.name)
            saved = saved_iterations(logdir, path)
            if name == "omniglot":  # epochs of 10 hyper-iterations, saved at each end
                assert not rows or saved >= rows[-1]["iteration"], (saved, rows[-1])
                continue
            lost = rows[-1]["elapsed_seconds"] - (rows[saved - 1]["elapsed_seconds"] if saved else 0) if rows else 0
            assert saved <= len(rows) + 1 and lost <= CHECKPOINT_SECONDS + 2.0, (kind, moments[kind], saved, len(rows))
            if kind != "SIGKILL" and code != 0:
                assert saved >= len(rows), (kind, saved, len(rows))  # saved when interrupted: nothing lost
        processes[kind] = launch(name, logdir)  # the same command again
    code, stderr = finish(processes["straight"])
    assert code == 0, stderr[-3000:]
    want = json.loads((tmp_path / "straight" / workdir.RESULTS).read_text())
    want_rows = {p.name: len(workdir.read_metrics(p.parent, p.name)) for p in metrics_files(tmp_path / "straight")}
    for kind in SIGNALS:
        code, stderr = finish(processes[kind])
        assert code == 0, (kind, stderr[-3000:])
        logdir = tmp_path / kind
        for path in metrics_files(logdir):  # every epoch once, in order
            epochs = [int(r["epoch"]) for r in workdir.read_metrics(path.parent, path.name)]
            assert epochs == list(range(want_rows[path.name])), (kind, path.name, epochs)
        got = json.loads((logdir / workdir.RESULTS).read_text())
        assert_same_results(without_timing(got), without_timing(want), kind)
