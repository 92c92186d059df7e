"""The few-shot launchers (flags.omniglot, flags.miniimagenet) end to end on tiny data: the files
they write, resume, --mode=test, and the command line (flags, one-line errors in flag names, a
lock on --logdir, ~ in paths, Ctrl-C / SIGTERM / SIGKILL at any moment)."""

import csv
import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from matplotlib import image as mpimg
from tensorflow.core.util import event_pb2

from far_ho2.launch import cli, workdir
from flags import effect_of_T
from flags import few_shot
from flags import miniimagenet
from flags import omniglot
from hyper_repr import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(ways=3, shots=1, queries=2, steps=1, meta_batch_size=2, eval_every=2, eval_episodes=4,
            test_episodes=4, eval_batch_size=2)


@pytest.fixture(scope="module")
def omniglot_splits(tmp_path_factory):
    """The bundled Omniglot, split as the launcher's default (decoded into a private cache)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield omniglot.load_splits(omniglot.DATA_DIR)


def rows(logdir: pathlib.Path) -> list[dict]:
    with (logdir / train.METRICS).open(newline="") as f:
        return list(csv.DictReader(f))


def last_checkpoint(logdir: pathlib.Path) -> dict[str, np.ndarray]:
    """The weights and optimizer state of the latest checkpoint (not the bookkeeping)."""
    reader = tf.train.load_checkpoint(str(logdir / "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "optimizer/"))}


def assert_same_checkpoints(first: pathlib.Path, second: pathlib.Path, rtol: float) -> None:
    a, b = last_checkpoint(first), last_checkpoint(second)
    assert sorted(a) == sorted(b) and len(a) > 20 and any(n.startswith("optimizer/") for n in a)
    for name in a:  # the same operations in the same order
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, err_msg=name)


def scalars(folder: pathlib.Path) -> dict[str, list[float]]:
    """The scalars of the TensorBoard event files in ``folder``, by tag."""
    found: dict[str, list[float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            for value in event_pb2.Event.FromString(record.numpy()).summary.value:
                found.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return found


def test_few_shot_flags_default_to_the_paper_and_map_onto_the_config():
    assert (omniglot.PRESET.network, miniimagenet.PRESET.network) == ("omniglot", "c4l")
    for preset in (omniglot.PRESET, miniimagenet.PRESET):  # hyper-representation's main.py
        assert (preset.ways, preset.shots, preset.queries, preset.steps) == (5, 1, 15, 5)
        assert (preset.meta_batch_size, preset.meta_lr, preset.meta_lr_decay) == (4, 1e-3, 1e-5)
        assert preset.learn_lr and preset.learning_rate == 0.1 and preset.test_episodes == 600

    def parse(preset, *args):
        values = flags.FlagValues()
        holders = few_shot.define_flags(preset, data_dir="data", flag_values=values)
        values(["launcher", "--logdir=out", *args])
        return few_shot.config_from_flags(holders, preset)

    reverse = {"truncate": 0}  # the settings of the default --method, from their flags
    assert parse(omniglot.PRESET) == dataclasses.replace(omniglot.PRESET, method_settings=reverse)
    assert parse(miniimagenet.PRESET) == dataclasses.replace(miniimagenet.PRESET, method_settings=reverse)
    config = parse(miniimagenet.PRESET, "--nolearn_lr", "--T=3", "--test_T=4", "--lr=0.4",
                   "--hyper_iterations=7", "--test_shots=1,5", "--network=rn", "--clip=0.5",
                   "--time_budget=60", "--ways=20", "--augment_shift=2")
    assert config == dataclasses.replace(
        miniimagenet.PRESET, learn_lr=False, steps=3, test_steps=4, learning_rate=0.4, iterations=7,
        test_shots=(1, 5), network="rn", clip=0.5, time_budget_seconds=60.0, ways=20,
        augment_shift=2, method_settings=reverse)
    assert omniglot.PRESET.augment_shift == 0
    for bad in ("--network=vgg", "--ways=0", "--mode=eval", "--lr=-1", "--augment_shift=-1", "--time_budget=0",
                "--lr=0", "--meta_lr=0"):
        with pytest.raises(flags.Error):
            parse(omniglot.PRESET, bad)
    for bad in ("--test_shots=1,x", "--test_shots=0"):
        with pytest.raises(cli.LaunchError, match="--test_shots must be a comma-separated list of ints ≥ 1"):
            parse(omniglot.PRESET, bad)
    recipe = parse(omniglot.PRESET, f"--flagfile={ROOT / 'flags' / 'omniglot_bundled.flags'}",
                   "--time_budget=180")  # the runs of docs/results/few_shot.md
    assert recipe == dataclasses.replace(
        omniglot.PRESET, ways=40, queries=5, test_ways=5, test_queries=15, steps=1, learning_rate=1.0,
        meta_lr=0.002, eval_every=300, eval_episodes=400, time_budget_seconds=180.0,
        test_shots=(1, 5), augment_shift=2, method_settings=reverse)
    generated = set(cli.flag_names(train.Config))  # one flag per field but the method's (far_ho2.launch.method_flags)
    assert generated == {f.name for f in dataclasses.fields(train.Config)} - {"method", "method_settings"}


@pytest.mark.parametrize("method, flags_", [
    ("reverse", ["--truncate=1"]),
    pytest.param("implicit", ["--head_l2=0.1", "--nolearn_lr"], marks=pytest.mark.long),
    ("bome", ["--nolearn_lr", "--bome_phi=value"]),
    pytest.param("penalty", ["--nolearn_lr", "--penalty_gamma=2"], marks=pytest.mark.long),
    ("stochastic", ["--nolearn_lr", "--temperature=0.01", "--stochastic_estimator=score"])])
def test_method_flag_runs_every_method_end_to_end(tmp_path, omniglot_splits, method, flags_):
    """--method and its settings reach the model: the run trains, tests and saves its method."""
    values = flags.FlagValues()
    holders = few_shot.define_flags(omniglot.PRESET, data_dir="data", flag_values=values)
    values(["launcher", "--logdir=out", f"--method={method}", *flags_, "--T=2", "--ways=3", "--queries=2", "--meta_batch_size=2",
            "--hyper_iterations=2", "--eval_every=2", "--eval_episodes=4", "--test_episodes=4", "--eval_batch_size=2"])
    config = few_shot.config_from_flags(holders, omniglot.PRESET)
    assert config.method == method
    results = few_shot.run_train(config, tmp_path / method, omniglot_splits, verbose=0)
    scores = results["test"]["3way_1shot"]["hyper"]
    assert results["iterations"] == 2 and 0 <= scores["accuracy"] <= 1
    model = train.load_representation(str(tmp_path / method), omniglot_splits)  # best.keras reloads
    saved = json.loads((tmp_path / method / train.CONFIG).read_text())
    assert saved["method"] == method and model is not None
    if method == "implicit":
        with pytest.raises(cli.LaunchError, match="head_l2 > 0"):
            few_shot.run_train(dataclasses.replace(config, head_l2=0.0), tmp_path / "bad", omniglot_splits,
                               verbose=0)


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


def test_omniglot_launcher_writes_outputs_resumes_exactly_and_tests(tmp_path, omniglot_splits, capsys):
    config = dataclasses.replace(omniglot.PRESET, **TINY, iterations=2)
    longer = dataclasses.replace(config, iterations=4)
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    few_shot.run_train(config, resumed, omniglot_splits, verbose=0)  # k = 2 iterations
    few_shot.run_train(longer, resumed, omniglot_splits, verbose=0)  # resumed to 2k
    results = few_shot.run_train(longer, straight, omniglot_splits, flag_values={"ways": 3}, verbose=0)
    assert_same_checkpoints(resumed, straight, rtol=1e-6)  # float32
    timeless = lambda logdir: [{k: v for k, v in r.items() if k not in ("seconds", "elapsed_seconds")}  # noqa: E731
                               for r in rows(logdir)]
    assert timeless(resumed) == timeless(straight)
    assert [(r["epoch"], r["iteration"]) for r in rows(straight)] == [("0", "2"), ("1", "4")]

    saved = json.loads((straight / train.RESULTS).read_text())
    assert saved["test"] == results["test"] and saved["flags"] == {"ways": 3}
    assert saved["config"] == json.loads((straight / train.CONFIG).read_text())
    assert saved["iterations"] == 4 and saved["stopped_by"] == "iterations"
    assert 0 <= saved["best_val_accuracy"] <= 1 and saved["best_iteration"] in (2, 4)
    assert abs(saved["learning_rate"] - 0.1) > 1e-4  # η is learned by default
    scores = saved["test"]["3way_1shot"]
    assert set(scores) == {"hyper", "pixels", "untrained"}
    assert all(0 <= s["accuracy"] <= 1 and s["ci"] >= 0 for s in scores.values())
    assert json.loads((resumed / train.RESULTS).read_text())["test"] == saved["test"]
    pixels = mpimg.imread(straight / few_shot.PLOT)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    validation = scalars(straight / "tensorboard" / "validation")
    assert validation["epoch_accuracy"] == pytest.approx([float(r["val_accuracy"]) for r in rows(straight)])
    assert scalars(straight / "tensorboard" / "train")["epoch_iteration"] == [2, 4]
    assert (straight / train.BEST_MODEL).is_file()
    out = capsys.readouterr().out
    assert "3-way 1-shot: " in out and "4 hyper-iterations" in out and "stopped by: iterations" in out

    # --mode=test: the run's own settings (T = 1, 3-way), but the test flags given; results.json kept
    training_results = (straight / train.RESULTS).read_bytes()
    entry = few_shot.run_test(straight, omniglot_splits, {"test_ways": 2, "test_episodes": 6})
    again = few_shot.run_test(straight, omniglot_splits)
    assert (straight / train.RESULTS).read_bytes() == training_results
    assert set(entry["test"]) == {"2way_1shot"} and entry["config"]["steps"] == 1
    assert again["test"] == saved["test"]  # best.keras reloaded: the same test accuracies
    saved_tests = json.loads((straight / few_shot.TEST_RESULTS).read_text())
    assert saved_tests == json.loads(json.dumps([entry, again]))
    with pytest.raises(cli.LaunchError, match="--logdir=.*no trained run"):
        few_shot.run_test(tmp_path / "empty", omniglot_splits)
    with pytest.raises(cli.LaunchError, match="--test_queries=30"):
        few_shot.run_test(straight, omniglot_splits, {"test_queries": 30})

    # the lock: a --logdir another launch trains in is refused
    with workdir.lock(straight):
        with pytest.raises(cli.LaunchError, match=f"{straight}' is in use by another run"):
            few_shot.run_train(longer, straight, omniglot_splits, verbose=0)

    # flags.effect_of_T on the representation learned here: 256 features of test-split classes
    eot = effect_of_T.Config(representation=str(straight), data_dir=str(omniglot.DATA_DIR), classes=5,
                             dim=0, train_per_class=3, val_per_class=3, test_per_class=4,
                             T=("3", "exact"), hyper_iterations=2, outer_lr=0.05)
    data = effect_of_T.load_data(eot)
    assert [x.shape for x in data] == [(15, 256), (15, 5), (15, 256), (15, 5), (20, 256), (20, 5)]
    assert np.isfinite(data.X_train).all() and data.X_train.std() > 0
    assert not np.allclose(data.X_train, effect_of_T.load_data(
        dataclasses.replace(eot, seed=1)).X_train)  # the seed draws other classes and images
    eot_results = effect_of_T.run_experiment(eot, tmp_path / "eot", data=data)
    assert set(eot_results["metrics"]) == {"T3", "exact"}
    with pytest.raises(FileNotFoundError, match="--representation="):
        effect_of_T.load_data(dataclasses.replace(eot, representation=str(tmp_path / "empty")))


# -- the command line ----------------------------------------------------------------------------------

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


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> tuple:
    """A tiny MiniImagenet folder and the flags of flags.miniimagenet runs on it."""
    data_dir = tmp_path_factory.mktemp("mini_data") / "mini"
    write_tiny_mini_imagenet(data_dir)
    return (f"--data_dir={data_dir}", "--image_size=16", "--images_per_class=4", "--ways=3",
            "--queries=1", "--meta_batch_size=2", "--eval_episodes=2", "--test_episodes=2",
            "--eval_batch_size=2", "--verbose=0")


def launch(module: str, *args: str, home: Optional[pathlib.Path] = None) -> subprocess.Popen:
    """``python -m flags.<module> args``, with ``HOME`` = ``home`` if given (for ``~``)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **({"HOME": str(home)} if home else {})}
    return subprocess.Popen([sys.executable, "-m", f"flags.{module}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


def error_line(stderr: str) -> str:
    """The launcher's message: the last line, which must say everything (no usage text, no
    traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.strip()][-1]


def test_few_shot_command_lines(tmp_path, mini, pytestconfig):
    """flags.miniimagenet end to end (--nolearn_lr, --noresume), bad flags and data, a corrected
    relaunch after a failed one, ~ in --logdir; started together to overlap (three of the bad
    flags with --long only: each launch costs a TensorFlow start-up)."""
    logdir, home = tmp_path / "mini_run", tmp_path / "home"
    home.mkdir()
    (logdir / "checkpoints").mkdir(parents=True)
    (logdir / train.METRICS).write_text("epoch\n999\n")  # --noresume deletes it
    run = ("miniimagenet", f"--logdir={logdir}", *mini, "--hyper_iterations=3", "--eval_every=2",
           "--nolearn_lr", "--lr=0.2")
    bad = ("miniimagenet", f"--logdir={tmp_path / 'x'}", *mini)
    processes = {
        "run": launch(*run, "--T=1", "--noresume"),
        "missing": launch("omniglot", f"--logdir={tmp_path / 'x'}", f"--data_dir={tmp_path / 'missing'}"),
        "shots": launch(*bad[:1], "--logdir=~/run", *bad[2:], "--shots=4", home=home),
        "T": launch(*bad, "--T=0"),
        "no_logdir": launch("miniimagenet", *mini),
    }
    if pytestconfig.getoption("--long"):
        processes.update({"test_queries": launch(*bad, "--test_queries=9"),
                          "hyper_iterations": launch(*bad, "--hyper_iterations=0"),
                          "time_budget": launch(*bad, "--time_budget=0")})
    results = {name: finish(p) for name, p in processes.items()}
    code, stdout, stderr = results.pop("run")
    assert code == 0, stderr[-3000:]
    assert "3-way 1-shot: " in stdout and "baselines: pixels" in stdout
    assert [r["iteration"] for r in rows(logdir)] == ["2", "3"]  # validated at the last one too
    saved = json.loads((logdir / train.RESULTS).read_text())
    assert saved["flags"]["learn_lr"] is False and saved["config"]["learn_lr"] is False
    assert saved["config"]["network"] == "c4l" and saved["learning_rate"] == pytest.approx(0.2)
    expected = {"missing": rf"--data_dir={re.escape(str(tmp_path / 'missing'))}: .* does not exist",
                "shots": r"--shots=4, --queries=1\); lower --shots or --queries",
                "test_queries": r"--test_queries=9\); lower --shots or --test_queries",
                "T": "flag --T=0: ", "hyper_iterations": "flag --hyper_iterations=0: ",
                "time_budget": "--time_budget must be > 0", "no_logdir": "--logdir"}
    for name, pattern in expected.items():
        if name not in results:
            continue  # a --long case
        code, _, stderr = results[name]
        assert code == 1 and re.search(pattern, error_line(stderr)), (name, stderr[-2000:])
        assert not re.search("usage|USAGE|flags:", stderr), (name, stderr[-2000:])
    assert not (tmp_path / "x").exists() and not (home / "run").exists()  # nothing written

    # the corrected relaunch of the failed one needs no --noresume; another T does
    processes = {"corrected": launch(*bad[:1], "--logdir=~/run", *bad[2:], "--hyper_iterations=1",
                                     home=home),
                 "other_T": launch(*run, "--T=2")}
    code, stdout, stderr = finish(processes["corrected"])
    assert code == 0 and "1 hyper-iterations" in stdout, stderr[-3000:]
    assert (home / "run" / train.RESULTS).is_file() and not (ROOT / "~").exists()
    code, _, stderr = finish(processes["other_T"])
    assert code == 1 and "--T=1 in the run, 2 now" in error_line(stderr) and "--noresume" in stderr


def checkpoint_number(logdir: pathlib.Path) -> int:
    """The hyper-iteration of the latest checkpoint (-1 if none), read from its index file."""
    index = logdir / "checkpoints" / "checkpoint"
    found = re.search(r'model_checkpoint_path: "ckpt-(\d+)"', index.read_text()) if index.exists() else None
    return int(found.group(1)) if found else -1


def wait_for_checkpoint(logdir: pathlib.Path, process: subprocess.Popen, at_least: int) -> int:
    deadline = time.monotonic() + 300
    while checkpoint_number(logdir) < at_least:
        assert process.poll() is None and time.monotonic() < deadline, finish(process)[2][-3000:]
        time.sleep(0.05)
    return checkpoint_number(logdir)


@pytest.mark.long
def test_few_shot_runs_lose_nothing_when_interrupted(tmp_path, mini):
    """SIGKILL mid-run then the same command: the weights and optimizer state of an
    uninterrupted run (float64); Ctrl-C and SIGTERM: saved, one line, no traceback."""
    run = lambda name, *extra: launch("miniimagenet", f"--logdir={tmp_path / name}", *mini,  # noqa: E731
                                      "--hyper_iterations=60", "--eval_every=25", "--T=2",
                                      "--dtype=float64", "--checkpoint_seconds=0", *extra)
    processes = {name: run(name) for name in ("straight", "killed", "SIGINT", "SIGTERM")}
    at = {name: wait_for_checkpoint(tmp_path / name, processes[name], 5)
          for name in ("killed", "SIGINT", "SIGTERM")}
    processes["killed"].send_signal(signal.SIGKILL)
    for name in ("SIGINT", "SIGTERM"):
        processes[name].send_signal(getattr(signal, name))
    assert processes["killed"].wait(timeout=60) == -signal.SIGKILL
    killed_at = checkpoint_number(tmp_path / "killed")
    assert at["killed"] <= killed_at < 60
    relaunched = run("killed")
    for name in ("SIGINT", "SIGTERM"):
        code, _, stderr = finish(processes[name])
        saved = checkpoint_number(tmp_path / name)
        assert code == 128 + getattr(signal, name) and at[name] <= saved < 60, stderr[-3000:]
        assert error_line(stderr).startswith(f"Interrupted: {name} at hyper-iteration {saved}: "
                                             f"the run is saved in")
    for name, process in (("straight", processes["straight"]), ("killed", relaunched)):
        code, stdout, stderr = finish(process)
        assert code == 0 and "60 hyper-iterations" in stdout, stderr[-3000:]
    assert f"Resumed {tmp_path / 'killed' / 'checkpoints' / 'ckpt'}-{killed_at} at hyper-iteration " \
           f"{killed_at}" in stderr
    assert_same_checkpoints(tmp_path / "killed", tmp_path / "straight", rtol=1e-12)
    epochs = [r["epoch"] for r in rows(tmp_path / "killed")]
    assert epochs == sorted(set(epochs))  # no row written twice
