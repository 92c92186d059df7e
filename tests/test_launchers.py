"""The launchers end to end on tiny data: the files they write, resume (k iterations, then
resume to 2k, equals 2k uninterrupted, checkpoint included), and the command line (flag
parsing, ``--noresume``, exit codes and messages for bad flags and missing data)."""

import csv
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf
from matplotlib import image as mpimg

from absl import flags

from flags import common
from flags import effect_of_T
from flags import few_shot
from flags import hyper_cleaning
from flags import miniimagenet
from flags import omniglot

ROOT = pathlib.Path(__file__).resolve().parents[1]
EOT = effect_of_T.Config(data="synthetic", classes=4, dim=6, train_per_class=3, val_per_class=3,
                         test_per_class=5, T=("3", "exact"), hyper_iterations=4, outer_lr=0.05)
TIMING = {"seconds", "seconds_median", "seconds_mean", "seconds_first"}  # differ between runs


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


def rows(logdir: pathlib.Path) -> list[dict]:
    with (logdir / common.METRICS).open(newline="") as f:
        return list(csv.DictReader(f))


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
    stale = rows(resumed)[-1]
    with (resumed / common.METRICS).open("a", newline="") as f:  # logged, never checkpointed
        csv.DictWriter(f, fieldnames=list(stale)).writerow({**stale, "step": k})
    run(dataclasses.replace(config, hyper_iterations=2 * k), resumed)
    results = run(dataclasses.replace(config, hyper_iterations=2 * k), straight)
    order = lambda r: (r["run"], int(r["step"]))  # runs interleave differently when resumed
    got, want = sorted(rows(resumed), key=order), sorted(rows(straight), key=order)
    assert [(r["run"], r["step"]) for r in got] == [(r["run"], r["step"]) for r in want]
    for a, b in zip(without_timing(got), without_timing(want)):
        for key in a:
            if key not in ("run", "step"):
                np.testing.assert_allclose(float(a[key]), float(b[key]), rtol=1e-9, err_msg=key)
    for folder in sorted((straight / "checkpoints").iterdir()):
        assert_same_checkpoints(resumed / "checkpoints" / folder.name, folder)
    return results


def test_effect_of_T_writes_outputs_and_resumes_exactly(tmp_path):
    run = lambda config, logdir: effect_of_T.run_experiment(config, logdir)
    results = assert_resumed_equals_uninterrupted(run, EOT, tmp_path, k=2)
    logdir = tmp_path / "straight"
    saved = json.loads((logdir / common.RESULTS).read_text())
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
    assert json.loads((logdir / common.CONFIG).read_text())["dim"] == 6
    assert list((logdir / "tensorboard" / "T3").glob("events.out.tfevents.*"))


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
    saved = json.loads((tmp_path / common.RESULTS).read_text())
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
    rows = [{"run": n, "step": str(i), "f": str(v), "f_T": str(v), "test_accuracy": "0.5"}
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
    fields = {k: tuple(h.value) if isinstance(h.value, list) else h.value
              for k, h in holders.items() if k not in ("logdir", "resume")}
    assert launcher.Config(**fields) == launcher.Config()  # one flag per field, same defaults


def test_hyper_cleaning_writes_outputs_and_resumes_exactly(tmp_path, mnist):
    run = lambda config, logdir: hyper_cleaning.run_experiment(config, logdir)
    assert_resumed_equals_uninterrupted(run, cleaning_config(mnist), tmp_path, k=2)
    logdir = tmp_path / "straight"
    saved = json.loads((logdir / common.RESULTS).read_text())
    metrics = saved["metrics"]
    for key in ("test_accuracy", "baseline_test_accuracy", "oracle_test_accuracy", "precision",
                "recall", "f1", "weight_corrupted", "weight_clean", "val_accuracy"):
        assert 0 <= metrics[key] <= 1, (key, metrics[key])
    assert 1e-5 <= metrics["lr"] <= 1  # the constraint holds
    assert metrics["lr"] != 0.1  # the learning rate was tuned
    assert saved["config"]["model"] == "softmax" and saved["config"]["n_train"] == 60
    table = rows(logdir)
    assert [int(r["step"]) for r in table] == [0, 1, 2, 3]
    assert float(table[-1]["val_loss"]) < float(table[0]["val_loss"])
    assert_png(logdir / "weights.png")


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


def test_logdir_resume_drops_rows_and_noresume_clears(tmp_path):
    out = common.Logdir(tmp_path, {"a": 1})
    for step in range(3):
        out.log(step, {"x": step})
    common.Logdir(tmp_path, {"a": 1}).resume_run(common.Checkpointer(tmp_path / "none"))
    assert [r["step"] for r in rows(tmp_path)] == []  # no checkpoint: iteration 0, rows dropped
    out.log(0, {"x": 0.5, "y": 2.0})  # a new metric extends the header
    assert rows(tmp_path) == [{"run": "main", "step": "0", "x": "0.5", "y": "2.0"}]
    common.Logdir(tmp_path, {"a": 2}, resume=False)
    assert not (tmp_path / common.METRICS).exists()
    assert json.loads((tmp_path / common.CONFIG).read_text()) == {"a": 2}


# -- the command line ----------------------------------------------------------------------------


def launch(module: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-m", f"flags.{module}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def test_command_lines(tmp_path, mnist):
    """Both launchers from the command line, and their errors; started together to overlap."""
    eot_dir, hc_dir = tmp_path / "eot", tmp_path / "hc"
    eot_dir.mkdir()
    (eot_dir / common.METRICS).write_text("run,step\nstale,0\n")  # --noresume deletes it
    processes = {
        "eot": launch("effect_of_T", f"--logdir={eot_dir}", "--data=synthetic", "--classes=3",
                      "--dim=4", "--T=exact", "--hyper_iterations=2", "--noresume"),
        "hc": launch("hyper_cleaning", f"--logdir={hc_dir}", "--n_train=40", "--n_val=20",
                     "--T=5", "--hyper_iterations=2", "--model=mlp", "--hidden=8",
                     "--corruption=0.5", "--noresume"),  # no --data: the bundled digits
        "bad_T": launch("effect_of_T", f"--logdir={tmp_path / 'x'}", "--data=synthetic", "--T=0,abc"),
        "unknown_flag": launch("effect_of_T", f"--logdir={tmp_path / 'x'}", "--no_such_flag=1"),
        "bad_enum": launch("hyper_cleaning", f"--logdir={tmp_path / 'x'}", f"--data={mnist}",
                           "--model=resnet"),
        "missing_data": launch("hyper_cleaning", f"--logdir={tmp_path / 'x'}",
                               f"--data={tmp_path / 'missing.npz'}"),
        "missing_features": launch("effect_of_T", f"--logdir={tmp_path / 'x'}",
                                   f"--features={tmp_path / 'missing.npz'}"),
        "no_logdir": launch("hyper_cleaning", f"--data={mnist}"),
    }
    results = {name: finish(p) for name, p in processes.items()}
    expected_errors = {"bad_T": "--T: each value must be a positive int", "unknown_flag": "no_such_flag",
                       "bad_enum": "--model", "missing_data": "missing.npz: no such file",
                       "missing_features": "--features=", "no_logdir": "--logdir"}
    for name, message in expected_errors.items():
        code, _, stderr = results[name]
        assert code != 0, name
        assert message in stderr, (name, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])
    for name, logdir in (("eot", eot_dir), ("hc", hc_dir)):
        code, stdout, stderr = results[name]
        assert code == 0, stderr[-3000:]
        assert json.loads((logdir / common.RESULTS).read_text())["metrics"]
    assert "stale" not in (eot_dir / common.METRICS).read_text()
    assert "Table 2" in results["eot"][1] and "test_accuracy" in results["hc"][1]
    assert results["eot"][1].splitlines()[-1].split()[0] == "exact"  # --T=exact: no crash
    assert (eot_dir / "table2.csv").exists() and (eot_dir / "figure4.png").exists()
    digits = json.loads((hc_dir / common.RESULTS).read_text())["config"]
    assert digits["data"] is None and digits["corruption"] == 0.5 and digits["model"] == "mlp"
    assert not (tmp_path / "x").exists()  # errors are caught before anything is written


# -- the few-shot launchers (flags.omniglot, flags.miniimagenet) -----------------------------------

TINY = dict(ways=3, shots=1, queries=2, steps=1, meta_batch_size=2, eval_every=2, eval_episodes=4,
            test_episodes=4, eval_batch_size=2)


@pytest.fixture(scope="module")
def omniglot_splits(tmp_path_factory):
    """The bundled Omniglot, split as the launcher's default (decoded into a private cache)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield omniglot.load_splits(omniglot.DATA_DIR)


def few_shot_checkpoint(logdir: pathlib.Path) -> dict[str, np.ndarray]:
    """``checkpoint_values`` but the wall-clock time."""
    return {k: v for k, v in checkpoint_values(logdir / "checkpoints").items()
            if not k.startswith("progress/elapsed")}


def test_few_shot_flags_default_to_the_paper_and_map_onto_the_config():
    assert (omniglot.PRESET.network, miniimagenet.PRESET.network) == ("omniglot", "c4l")
    for preset in (omniglot.PRESET, miniimagenet.PRESET):  # farho.md §7.1-§7.2
        assert (preset.ways, preset.shots, preset.queries, preset.steps) == (5, 1, 15, 5)
        assert (preset.meta_batch_size, preset.meta_lr, preset.meta_lr_decay) == (4, 1e-3, 1e-5)
        assert preset.learn_lr and preset.learning_rate == 0.1 and preset.test_episodes == 600

    def parse(preset, *args):
        values = flags.FlagValues()
        holders = few_shot.define_flags(preset, data_dir="data", flag_values=values)
        values(["launcher", *args])
        return few_shot.config_from_flags({k: h.value for k, h in holders.items()}, preset)

    assert parse(omniglot.PRESET) == omniglot.PRESET
    assert parse(miniimagenet.PRESET) == miniimagenet.PRESET
    config = parse(miniimagenet.PRESET, "--nolearn_lr", "--T=3", "--test_T=4", "--lr=0.4",
                   "--hyper_iterations=7", "--test_shots=1,5", "--network=rn", "--clip=0.5",
                   "--time_budget=60", "--ways=20", "--augment_shift=2")
    assert config == dataclasses.replace(
        miniimagenet.PRESET, learn_lr=False, steps=3, test_steps=4, learning_rate=0.4, iterations=7,
        test_shots=(1, 5), network="rn", clip=0.5, time_budget_seconds=60.0, ways=20,
        augment_shift=2)
    assert omniglot.PRESET.augment_shift == 0
    for bad in ("--network=vgg", "--ways=0", "--mode=eval", "--lr=-1", "--augment_shift=-1"):
        with pytest.raises(flags.Error):
            parse(omniglot.PRESET, bad)
    with pytest.raises(ValueError, match="--test_shots must be positive ints"):
        parse(omniglot.PRESET, "--test_shots=1,x")
    recipe = parse(omniglot.PRESET, f"--flagfile={ROOT / 'flags' / 'omniglot_bundled.flags'}",
                   "--time_budget=180")  # the README's runs on the bundled data
    assert recipe == dataclasses.replace(
        omniglot.PRESET, ways=40, queries=5, test_ways=5, test_queries=15, steps=1, learning_rate=1.0,
        meta_lr=0.002, eval_every=300, eval_episodes=400, time_budget_seconds=180.0,
        test_shots=(1, 5), augment_shift=2)


def test_omniglot_split_rule(omniglot_splits):
    alphabets = [{name.split("/")[0] for name in split.class_names} for split in omniglot_splits]
    assert alphabets[1:] == [{"Early_Aramaic"}, {"Sanskrit", "Tagalog"}]  # 'auto': not 1623
    drawn = omniglot.load_splits(omniglot.DATA_DIR, val_characters=10)
    assert len(drawn.val.class_names) == 40  # 10 characters × 4 rotations
    assert not {name.split("/")[0] for name in drawn.val.class_names} & alphabets[2]
    with pytest.raises(ValueError, match="Found 242 Omniglot characters"):
        omniglot.load_splits(omniglot.DATA_DIR, split="standard")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        omniglot.load_splits(ROOT / "no_such_folder")


def test_omniglot_launcher_writes_outputs_resumes_exactly_and_tests(tmp_path, omniglot_splits,
                                                                    capsys):
    config = dataclasses.replace(omniglot.PRESET, **TINY, iterations=2)
    longer = dataclasses.replace(config, iterations=4)
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    few_shot.run(config, resumed, omniglot_splits)  # k = 2 iterations
    few_shot.run(longer, resumed, omniglot_splits)  # resumed to 2k
    results = few_shot.run(longer, straight, omniglot_splits, flag_values={"ways": 3})
    a, b = few_shot_checkpoint(resumed), few_shot_checkpoint(straight)
    assert sorted(a) == sorted(b) and any("optimizer" in name for name in a)
    for name in a:  # the same float32 operations in the same order
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)
    elapsed = lambda logdir: [{k: v for k, v in r.items() if k != "elapsed_seconds"}
                              for r in rows(logdir)]
    assert elapsed(resumed) == elapsed(straight)
    assert [r["iteration"] for r in rows(straight)] == ["2", "4"]

    saved = json.loads((straight / "results.json").read_text())
    assert saved["test"] == results["test"] and saved["flags"] == {"ways": 3}
    assert saved["config"] == json.loads((straight / "config.json").read_text())
    assert saved["iterations"] == 4 and 0 <= saved["best_val_accuracy"] <= 1
    assert abs(saved["learning_rate"] - 0.1) > 1e-4  # η is learned by default
    scores = saved["test"]["3way_1shot"]
    assert set(scores) == {"hyper", "pixels", "untrained"}
    assert all(0 <= s["accuracy"] <= 1 and s["ci"] >= 0 for s in scores.values())
    assert json.loads((resumed / "results.json").read_text())["test"] == saved["test"]
    assert_png(straight / few_shot.PLOT)
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert "3-way 1-shot: " in capsys.readouterr().out

    # --mode=test: the model's settings come from config.json (steps=3 is ignored)
    tested = few_shot.run(dataclasses.replace(longer, steps=3), straight, omniglot_splits,
                          mode="test")
    assert tested["test"] == saved["test"] and tested["config"]["steps"] == 1
    with pytest.raises(FileNotFoundError, match="no trained run"):
        few_shot.run(config, tmp_path / "empty", omniglot_splits, mode="test")

    # flags.effect_of_T on the representation learned here: 256 features of test-split classes
    eot = dataclasses.replace(EOT, representation=str(straight), data_dir=str(omniglot.DATA_DIR),
                              classes=5, test_per_class=4, dim=0, hyper_iterations=2)
    data = effect_of_T.load_data(eot)
    assert [x.shape for x in data] == [(15, 256), (15, 5), (15, 256), (15, 5), (20, 256), (20, 5)]
    assert np.isfinite(data.X_train).all() and data.X_train.std() > 0
    assert not np.allclose(data.X_train, effect_of_T.load_data(
        dataclasses.replace(eot, seed=1)).X_train)  # the seed draws other classes and images
    eot_results = effect_of_T.run_experiment(eot, tmp_path / "eot", data=data)
    assert set(eot_results["metrics"]) == {"T3", "exact"}
    assert eot_results["config"]["representation"] == str(straight)
    with pytest.raises(FileNotFoundError, match="--representation="):
        effect_of_T.load_data(dataclasses.replace(eot, representation=str(tmp_path / "empty")))


def write_tiny_mini_imagenet(data_dir: pathlib.Path, size: int = 16, per_class: int = 4) -> None:
    """{train,val,test}.h5 of 4, 3 and 3 classes: a colour per class plus noise, size×size."""
    import h5py  # noqa: PLC0415 (only this test writes h5 files)
    rng = np.random.default_rng(0)
    data_dir.mkdir()
    for split, classes in (("train", 4), ("val", 3), ("test", 3)):
        colours = rng.integers(0, 256, size=(classes, 1, 1, 3))
        images = np.repeat(colours, per_class, axis=0) + rng.normal(0, 40, (classes * per_class,
                                                                            size, size, 3))
        with h5py.File(data_dir / f"{split}.h5", "w") as f:
            f["X"] = np.clip(images, 0, 255).astype(np.uint8)


def test_few_shot_command_lines(tmp_path):
    """flags.miniimagenet end to end on tiny h5 files (--nolearn_lr, --noresume), then
    relaunched with another T; a missing data folder; started together to overlap."""
    data_dir, logdir = tmp_path / "mini", tmp_path / "mini_run"
    write_tiny_mini_imagenet(data_dir)
    (logdir / "checkpoints").mkdir(parents=True)
    (logdir / "metrics.csv").write_text("iteration\n999\n")  # --noresume deletes it
    mini = ("miniimagenet", f"--logdir={logdir}", f"--data_dir={data_dir}", "--image_size=16",
            "--images_per_class=4", "--ways=3", "--queries=2", "--meta_batch_size=2",
            "--hyper_iterations=2", "--eval_every=1", "--eval_episodes=2", "--test_episodes=2",
            "--eval_batch_size=2", "--nolearn_lr", "--lr=0.2")
    processes = {
        "mini": launch(*mini, "--T=1", "--noresume"),
        "missing": launch("omniglot", f"--logdir={tmp_path / 'x'}",
                          f"--data_dir={tmp_path / 'missing'}"),
    }
    (code, stdout, stderr), (error_code, _, error) = (finish(p) for p in processes.values())
    assert code == 0, stderr[-3000:]
    assert "3-way 1-shot: " in stdout and "baselines: pixels" in stdout
    assert [r["iteration"] for r in rows(logdir)] == ["1", "2"]
    saved = json.loads((logdir / "results.json").read_text())
    assert saved["flags"]["learn_lr"] is False and saved["config"]["learn_lr"] is False
    assert saved["config"]["network"] == "c4l" and saved["learning_rate"] == pytest.approx(0.2)
    assert error_code == 1 and "Traceback" not in error
    assert f"{tmp_path / 'missing'}' does not exist" in error, error[-2000:]
    assert not (tmp_path / "x").exists()
    code, _, error = finish(launch(*mini, "--T=2"))  # resuming the run with another T
    assert code == 1 and "Traceback" not in error
    assert "fields ['steps'] differ" in error and "--noresume" in error, error[-2000:]
