"""The launchers end to end on tiny data: the files they write, resume (k iterations, then
resume to 2k, equals 2k uninterrupted, checkpoint included), and the command line (flag
parsing, ``--noresume``, exit codes and messages for bad flags and missing data)."""

import csv
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from matplotlib import image as mpimg

import far_ho2 as far
from far_ho2.launch import cli, workdir
from flags import common, effect_of_T
from flags import hyper_cleaning

ROOT = pathlib.Path(__file__).resolve().parents[1]
EOT = effect_of_T.Config(data="synthetic", classes=4, dim=6, train_per_class=3, val_per_class=3,
                         test_per_class=5, T=("3", "exact"), hyper_iterations=4, outer_lr=0.05)
TIMING = {"seconds", "seconds_median", "seconds_mean", "seconds_first", "elapsed", "elapsed_seconds"}  # differ between runs


def fake_mnist(path: pathlib.Path, n_train: int = 120, n_test: int = 40, seed: int = 0) -> pathlib.Path:
    """A Keras-format MNIST .npz: 28×28 uint8 images of 10 random templates plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, 28, 28))

    def images(n):
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        x = np.clip(0.6 * templates[y] + rng.normal(0, 60, size=(n, 28, 28)), 0, 255)
        return x.astype(np.uint8), y
    (x_train, y_train), (x_test, y_test) = images(n_train), images(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture
def mnist(tmp_path) -> pathlib.Path:
    return fake_mnist(tmp_path / "mnist.npz")


def cleaning_config(data: pathlib.Path, hyper_iterations: int = 4) -> hyper_cleaning.Config:
    return hyper_cleaning.Config(data=str(data), n_train=60, n_val=30, corruption=0.3,
                                 model="softmax", T=20, hyper_iterations=hyper_iterations,
                                 outer_lr=0.1, inner_lr=0.3)


def metrics_files(logdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """run -> its metrics file: effect_of_T's metrics/<run>.csv, or hyper-cleaning's metrics.csv."""
    runs = sorted((logdir / effect_of_T.METRICS).glob("*.csv")) if (logdir / effect_of_T.METRICS).is_dir() else []
    return {path.stem: path for path in runs} or {"main": logdir / workdir.METRICS}


def rows(logdir: pathlib.Path) -> list[dict]:
    table = []
    for run, path in metrics_files(logdir).items():
        with path.open(newline="") as f:
            table += [{"run": run, **r} for r in csv.DictReader(f)]
    return table


def checkpoint_folders(logdir: pathlib.Path) -> list[pathlib.Path]:
    folder = logdir / workdir.CHECKPOINTS
    runs = sorted(p for p in folder.iterdir() if p.is_dir())
    return runs or [folder]


def without_timing(table: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in table]


def checkpoint_values(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor in the latest checkpoint of ``directory`` (save counter excluded)."""
    reader = tf.train.load_checkpoint(str(directory))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("save_counter") and name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def assert_same_checkpoints(first: pathlib.Path, second: pathlib.Path) -> None:
    a, b = checkpoint_values(first), checkpoint_values(second)
    assert sorted(a) == sorted(b)
    assert any("optimizer" in name for name in a)  # the outer optimizer's state is saved
    for name in a:  # same computations in the same order: equal to round-off
        if isinstance(a[name], bytes):
            continue  # the callbacks' state (JSON), with the time spent
        np.testing.assert_allclose(a[name], b[name], rtol=1e-12, atol=1e-12, err_msg=name)


def assert_png(path: pathlib.Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def assert_resumed_equals_uninterrupted(run, config, tmp_path, k: int) -> dict:
    """Runs k then 2k iterations (with a row logged after the last checkpoint, as after a
    crash, which resume must drop), and 2k at once; compares metrics.csv and checkpoints."""
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    run(dataclasses.replace(config, hyper_iterations=k), resumed)
    for path in metrics_files(resumed).values():  # a row logged, never checkpointed
        with path.open(newline="") as f:
            stale = list(csv.DictReader(f))[-1]
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=list(stale)).writerow({**stale, "epoch": k})
    run(dataclasses.replace(config, hyper_iterations=2 * k), resumed)
    results = run(dataclasses.replace(config, hyper_iterations=2 * k), straight)
    order = lambda r: (r["run"], int(r["epoch"]))  # noqa: E731
    got, want = sorted(rows(resumed), key=order), sorted(rows(straight), key=order)
    assert [(r["run"], r["epoch"]) for r in got] == [(r["run"], r["epoch"]) for r in want]
    for a, b in zip(without_timing(got), without_timing(want)):
        for key in a:
            if key not in ("run", "epoch"):
                np.testing.assert_allclose(float(a[key]), float(b[key]), rtol=1e-9, err_msg=key)
    for folder in checkpoint_folders(straight):
        assert_same_checkpoints(resumed / folder.relative_to(straight), folder)
    return results


def test_effect_of_T_writes_outputs_and_resumes_exactly(tmp_path):
    run = lambda config, logdir: effect_of_T.run_experiment(config, logdir)
    results = assert_resumed_equals_uninterrupted(run, EOT, tmp_path, k=2)
    logdir = tmp_path / "straight"
    saved = json.loads((logdir / workdir.RESULTS).read_text())
    assert saved["config"]["T"] == ["3", "exact"] and saved["config"]["hyper_iterations"] == 4
    assert set(saved["metrics"]) == {"T3", "exact"}
    for name, metrics in saved["metrics"].items():
        assert metrics["hyper_iterations"] == 4
        assert all(math.isfinite(metrics[k]) for k in ("f", "f_T", "seconds_median"))
        assert metrics["f"] > 0 and metrics["f_T"] > 0
        assert 0 <= metrics["test_accuracy"] <= 1 and metrics["seconds_median"] >= 0
    assert saved["metrics"]["exact"]["f"] == saved["metrics"]["exact"]["f_T"]  # same objective
    assert results["metrics"] == saved["metrics"]
    exact = [float(r["f"]) for r in rows(logdir) if r["run"] == "exact"]
    assert exact[-1] < exact[0]  # the exact hypergradient lowers f
    assert len(rows(logdir)) == 8  # 4 hyper-iterations × 2 runs, no duplicates
    for png in ("figure3.png", "figure4.png"):
        assert_png(logdir / png)
    table = list(csv.DictReader((logdir / "table2.csv").open()))
    assert [r["T"] for r in table] == ["3", "exact"]
    assert json.loads((logdir / workdir.CONFIG).read_text())["dim"] == 6
    assert list((logdir / "tensorboard" / "T3").rglob("events.out.tfevents.*"))


def test_effect_of_T_features_file_is_read(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"X_{s}": rng.normal(size=(8, 5)) for s in effect_of_T.SPLITS}
    arrays.update({f"Y_{s}": np.arange(8) % 2 for s in effect_of_T.SPLITS})
    np.savez(tmp_path / "features.npz", **arrays)
    data = effect_of_T.load_data(effect_of_T.Config(features=str(tmp_path / "features.npz")))
    assert data.X_train.shape == (8, 5) and data.Y_test.shape == (8, 2)
    np.savez(tmp_path / "bad.npz", X_train=arrays["X_train"])
    with pytest.raises(ValueError, match="lacks the arrays"):
        effect_of_T.load_data(effect_of_T.Config(features=str(tmp_path / "bad.npz")))


def test_effect_of_T_exact_alone_writes_every_output_and_prints_f_and_accuracy(tmp_path, capsys):
    config = dataclasses.replace(EOT, T=("exact",))
    results = effect_of_T.run_experiment(config, tmp_path)
    saved = json.loads((tmp_path / workdir.RESULTS).read_text())
    assert saved["metrics"] == results["metrics"] and set(saved["metrics"]) == {"exact"}
    exact = saved["metrics"]["exact"]
    assert all(math.isfinite(v) for v in exact.values()), exact
    assert exact["hyper_iterations"] == 4 and 0 <= exact["test_accuracy"] <= 1
    table = list(csv.DictReader((tmp_path / "table2.csv").open()))
    assert len(table) == 1 and table[0]["T"] == "exact"
    for key in ("f", "f_T", "test_accuracy", "val_accuracy", "seconds_median"):
        assert float(table[0][key]) == pytest.approx(exact[key]), key
    for png in ("figure3.png", "figure4.png"):
        assert_png(tmp_path / png)
    header, row = capsys.readouterr().out.splitlines()[-2:]
    assert header.split()[:5] == ["T", "f", "f_T", "test_accuracy", "val_accuracy"]
    assert row.split()[0] == "exact"
    assert float(row.split()[1]) == pytest.approx(exact["f"], rel=1e-3)  # printed to 4 digits
    assert float(row.split()[3]) == pytest.approx(exact["test_accuracy"], rel=1e-3)


@pytest.mark.parametrize("names", [["exact"], ["T1"], ["T1", "T8", "exact"]])
def test_effect_of_T_plots_any_values(tmp_path, names):
    """Zero, negative and non-finite objectives (no log axis possible) and runs without an f_T
    curve (exact) or without a T axis (exact alone) still give both figures, without a warning
    (matplotlib warns of a log axis without positive values)."""
    values = [0.0, -1.0, math.nan, math.inf]
    rows = [{"run": n, "epoch": str(i), "f": str(v), "f_T": str(v), "test_accuracy": "0.5"}
            for n in names for i, v in enumerate(values)]
    results = {n: {"test_accuracy": 0.5} for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        effect_of_T.plot_figures(rows, names, results, tmp_path)
    for png in ("figure3.png", "figure4.png"):
        assert_png(tmp_path / png)


@pytest.mark.parametrize("launcher", [effect_of_T, hyper_cleaning])
def test_launcher_flags_have_help_and_default_to_the_config(launcher):
    values = flags.FlagValues()
    holders = launcher.define_flags(values)
    values(["launcher", "--logdir=out"])
    for name in holders:
        assert len(values[name].help.split()) >= 2, (name, values[name].help)  # words, not "."
    run_flags = {"logdir", "resume", "checkpoint_seconds"}
    if launcher is hyper_cleaning:  # the method's settings come from their flags, as the defaults resolve them
        config = hyper_cleaning.config_from_flags(holders)
        assert hyper_cleaning.resolved(config) == hyper_cleaning.resolved(hyper_cleaning.Config())
        methods = [far.registry.get_method(name) for name in far.methods()]
        assert set(holders) == (set(cli.flag_names(hyper_cleaning.Config).values()) | run_flags | {"method"}
                                | {m.flag(s) for m in methods for s in m.settings} | set(common.TFDS_FLAGS))
    else:
        generated = cli.config_values(launcher.Config, holders)
        by_hand = {k: h.value for k, h in holders.items()
                   if k in {f.name for f in dataclasses.fields(launcher.Config)} and k not in generated}
        assert launcher.Config(**generated, **by_hand) == launcher.Config()  # one flag per field, same defaults
        assert len(holders) == len(dataclasses.fields(launcher.Config)) + len(run_flags)


def test_hyper_cleaning_writes_outputs_and_resumes_exactly(tmp_path, mnist):
    run = lambda config, logdir: hyper_cleaning.run_experiment(config, logdir)
    assert_resumed_equals_uninterrupted(run, cleaning_config(mnist), tmp_path, k=2)
    logdir = tmp_path / "straight"
    saved = json.loads((logdir / workdir.RESULTS).read_text())
    metrics = saved["metrics"]
    for key in ("test_accuracy", "baseline_test_accuracy", "oracle_test_accuracy", "precision",
                "recall", "f1", "weight_corrupted", "weight_clean", "val_accuracy"):
        assert 0 <= metrics[key] <= 1, (key, metrics[key])
    assert 1e-5 <= metrics["lr"] <= 1  # the constraint holds
    assert metrics["lr"] != 0.1  # the learning rate was tuned
    assert saved["config"]["model"] == "softmax" and saved["config"]["n_train"] == 60
    table = rows(logdir)
    assert [int(r["epoch"]) for r in table] == [0, 1, 2, 3]
    assert float(table[-1]["val_loss"]) < float(table[0]["val_loss"])
    assert_png(logdir / "weights.png")


@pytest.mark.parametrize("method", ["bome", "penalty", "stochastic"])
def test_hyper_cleaning_resumes_the_methods_with_state_exactly(tmp_path, mnist, method):
    """BOME and the penalty method keep w (and γ, ν, …) across hyper-iterations, the SGLD chain
    counts its runs (its noise): all of it is checkpointed."""
    run = lambda config, logdir: hyper_cleaning.run_experiment(config, logdir)
    config = dataclasses.replace(cleaning_config(mnist), method=method, l2=1e-3, T=6,
                                 method_settings={"burn_in": 2} if method == "stochastic" else {})
    results = assert_resumed_equals_uninterrupted(run, config, tmp_path, k=2)
    assert results["metrics"]["hyper_iterations_done"] == 4


def test_hyper_cleaning_data_is_split_and_corrupted(mnist):
    config = cleaning_config(mnist)
    data = hyper_cleaning.load_data(config)
    assert data.x_train.shape == (60, 784) and data.x_val.shape == (30, 784)
    assert data.x_test.shape == (40, 784) and data.x_train.max() <= 1
    assert data.corrupted.sum() == 18  # 30% of 60
    y = np.arange(1000) % 10
    noisy, corrupted = hyper_cleaning.corrupt(y, 0.25, np.random.default_rng(0))
    assert corrupted.sum() == 250 and np.all(noisy[corrupted] != y[corrupted])
    assert np.all(noisy[~corrupted] == y[~corrupted]) and noisy.max() < 10


def test_detection_scores():
    corrupted = np.array([True, True, False, False])
    scores = hyper_cleaning.detection(np.array([0.1, 0.9, 0.2, 0.8]), corrupted, 0.5)
    assert scores == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert hyper_cleaning.detection(np.ones(4), corrupted, 0.5)["f1"] == 0.0  # nothing flagged


# -- the command line ----------------------------------------------------------------------------


def launch(module: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-m", f"flags.{module}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def test_command_lines(tmp_path, mnist, pytestconfig):
    """Both launchers from the command line, and their errors; started together to overlap (three
    of the errors with --long only: each launch costs a TensorFlow start-up)."""
    eot_dir, hc_dir, hcm_dir, nan_dir = tmp_path / "eot", tmp_path / "hc", tmp_path / "hcm", tmp_path / "nan"
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"\x93NUMPY not really" * 40)
    eot_dir.mkdir()
    (eot_dir / workdir.METRICS).write_text("run,step\nstale,0\n")  # --noresume deletes it
    processes = {
        "eot": launch("effect_of_T", f"--logdir={eot_dir}", "--source=synthetic", "--classes=3",
                      "--dim=4", "--T_list=exact", "--hyper_iterations=2", "--noresume"),
        "hc": launch("hyper_cleaning", f"--logdir={hc_dir}", "--n_train=40", "--n_val=20",
                     "--T=5", "--hyper_iterations=2", "--model=mlp", "--hidden=8",
                     "--corruption=0.5", "--noresume"),  # no --data: the bundled digits
        "hc_method": launch("hyper_cleaning", f"--logdir={hcm_dir}", "--n_train=40", "--n_val=20",
                            "--T=3", "--hyper_iterations=3", "--method=bome", "--bome_phi=grad_norm",
                            "--l2=0.001"),
        "bad_truncate": launch("hyper_cleaning", f"--logdir={tmp_path / 'x'}", "--T=5", "--truncate=5"),
        "bad_T": launch("effect_of_T", f"--logdir={tmp_path / 'x'}", "--source=synthetic", "--T_list=0,abc"),
        "missing_data": launch("hyper_cleaning", f"--logdir={tmp_path / 'x'}",
                               f"--data={tmp_path / 'missing.npz'}"),
        "no_logdir": launch("hyper_cleaning", f"--data={mnist}"),
        "nan": launch("hyper_cleaning", f"--logdir={nan_dir}", "--n_train=40", "--n_val=20", "--T=5",
                      "--hyper_iterations=2", "--retrain_steps=10", "--inner_lr=1e6"),
        "corrupt_data": launch("hyper_cleaning", f"--logdir={tmp_path / 'x'}", f"--data={corrupt}"),
    }
    if pytestconfig.getoption("--long"):
        processes.update({
            "unknown_flag": launch("effect_of_T", f"--logdir={tmp_path / 'x'}", "--no_such_flag=1"),
            "bad_enum": launch("hyper_cleaning", f"--logdir={tmp_path / 'x'}", f"--data={mnist}",
                               "--model=resnet"),
            "missing_features": launch("effect_of_T", f"--logdir={tmp_path / 'x'}",
                                       f"--features={tmp_path / 'missing.npz'}")})
    results = {name: finish(p) for name, p in processes.items()}
    expected_errors = {"bad_T": "--T_list: each value must be a positive int", "unknown_flag": "no_such_flag",
                       "bad_enum": "--model", "missing_data": "missing.npz: no such file",
                       "missing_features": "--features=", "no_logdir": "--logdir",
                       "bad_truncate": "--truncate=5 must be below --T=5",
                       "corrupt_data": f"--data={corrupt} is not a NumPy .npz archive"}
    for name, message in expected_errors.items():
        if name not in results:
            continue  # a --long case
        code, _, stderr = results[name]
        assert code != 0, name
        assert message in stderr.splitlines()[-1], (name, stderr[-2000:])  # one line, the last
        assert stderr.splitlines()[-1].startswith("Error: "), (name, stderr[-2000:])
        assert "Traceback" not in stderr and "USAGE" not in stderr and "allow_pickle" not in stderr, name
        assert len(stderr.splitlines()) <= 3, (name, stderr)  # no help text (at most a log line or two)
    code, _, stderr = results["nan"]  # divergence: one line, and nothing left in --logdir
    assert code == 1 and stderr.splitlines()[-1].startswith("Diverged: ReverseHG, hyper-iteration 0"), stderr
    assert "Traceback" not in stderr and not nan_dir.exists()
    for name, logdir in (("eot", eot_dir), ("hc", hc_dir), ("hc_method", hcm_dir)):
        code, stdout, stderr = results[name]
        assert code == 0, stderr[-3000:]
        assert json.loads((logdir / workdir.RESULTS).read_text())["metrics"]
    assert not (eot_dir / effect_of_T.METRICS / "stale.csv").exists()
    assert "Table 2" in results["eot"][1] and "test_accuracy" in results["hc"][1]
    assert results["eot"][1].splitlines()[-1].split()[0] == "exact"  # --T_list=exact: no crash
    assert (eot_dir / "table2.csv").exists() and (eot_dir / "figure4.png").exists()
    digits = json.loads((hc_dir / workdir.RESULTS).read_text())["config"]
    assert digits["data"] is None and digits["corruption"] == 0.5 and digits["model"] == "mlp"
    bome = json.loads((hcm_dir / workdir.RESULTS).read_text())
    assert bome["config"]["method"] == "bome" and bome["config"]["method_settings"]["phi"] == "grad_norm"
    assert bome["metrics"]["hyper_iterations_done"] == 3
    assert not (tmp_path / "x").exists()  # errors are caught before anything is written
    for name in ("eot", "hc", "hc_method"):  # TensorFlow's start-up notices and checkpoint chatter stay out
        assert not re.search("oneDNN|cpu_feature_guard|loop_optimizer|Sharding callback", results[name][2]), name

    # the corrected relaunch of the diverged launch just runs, and records its own settings; a
    # finished run relaunched with another T is refused, its results kept
    finished = (hc_dir / workdir.RESULTS).read_bytes()
    processes = {"corrected": launch("hyper_cleaning", f"--logdir={nan_dir}", "--n_train=40", "--n_val=20", "--T=5",
                                     "--hyper_iterations=2", "--retrain_steps=10", "--inner_lr=0.3"),
                 "other_T": launch("hyper_cleaning", f"--logdir={hc_dir}", "--n_train=40", "--n_val=20", "--T=6",
                                   "--hyper_iterations=2", "--model=mlp", "--hidden=8", "--corruption=0.5")}
    code, _, stderr = finish(processes["corrected"])
    assert code == 0, stderr[-3000:]
    assert json.loads((nan_dir / workdir.CONFIG).read_text())["inner_lr"] == 0.3
    assert json.loads((nan_dir / workdir.RESULTS).read_text())["config"]["inner_lr"] == 0.3
    code, stdout, stderr = finish(processes["other_T"])
    assert code == 1 and "--T=5 in the run, 6 now" in stderr.splitlines()[-1] and "--noresume" in stderr, stderr
    assert "Hyper-cleaning" not in stdout and (hc_dir / workdir.RESULTS).read_bytes() == finished
