"""Data hyper-cleaning (Franceschi et al., 2017): a user-level run with a Keras MLP (the
per-example loss weights σ(λ_i) and the inner learning rate are hyperparameters), and
``flags.hyper_cleaning`` on its default data, the bundled 8×8 digits."""

import csv
import dataclasses
import hashlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
from flags import hyper_cleaning


def blobs(n, rng, centers):
    labels = rng.integers(len(centers), size=n)
    return (centers[labels] + rng.normal(size=(n, centers.shape[1]))).astype(np.float32), labels


def test_hyper_cleaning_lowers_validation_loss_and_down_weights_corrupted_examples():
    rng = np.random.default_rng(0)
    centers = 2.0 * rng.normal(size=(3, 10))
    x, y = blobs(150, rng, centers)
    xv, yv = blobs(90, rng, centers)
    corrupted = rng.random(150) < 0.4
    y_noisy = np.where(corrupted, (y + rng.integers(1, 3, size=150)) % 3, y)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="tanh"),
                              keras.layers.Dense(3)])
    weights = far.get_hyperparameter("example_weights", tf.zeros(150))
    lr = far.get_hyperparameter("lr", 0.1, constraint=lambda v: tf.clip_by_value(v, 1e-4, 1.0))
    ce = lambda xs, ys: keras.losses.sparse_categorical_crossentropy(ys, model(xs), from_logits=True)
    inner = lambda: tf.reduce_mean(tf.sigmoid(weights) * ce(x, y_noisy))
    outer = lambda: tf.reduce_mean(ce(xv, yv))

    ho = far.HyperOptimizer()
    run = ho.minimize(outer, keras.optimizers.Adam(0.1), inner, far.GradientDescentOptimizer(lr),
                      hyper_list=[weights, lr])
    losses = [float(run(60)) for _ in range(25)]
    final = float(run(60, _skip_hyper_ts=True))

    assert final < 0.8 * losses[0], losses  # the validation loss really goes down
    w = tf.sigmoid(weights).numpy()
    assert w[corrupted].mean() < w[~corrupted].mean() - 0.1, (w[corrupted].mean(), w[~corrupted].mean())
    assert float(lr) != 0.1  # the learning rate was tuned too


# -- flags.hyper_cleaning on its default data, the bundled digits ---------------------------------

DIGITS_README = hyper_cleaning.DIGITS.parent / "README.md"


def readme_checksum(label: str) -> str:
    """The sha256 that data/digits/README.md gives on the line starting with ``label``."""
    lines = [line for line in DIGITS_README.read_text().splitlines() if line.startswith(label)]
    assert len(lines) == 1, label
    return lines[0].split()[-1]


def test_bundled_digits_are_the_documented_file():
    assert hashlib.sha256(hyper_cleaning.DIGITS.read_bytes()).hexdigest() == readme_checksum(
        "sha256(digits.npz)")
    with np.load(hyper_cleaning.DIGITS) as npz:
        images, labels = npz["images"], npz["labels"]
    content = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    assert content == readme_checksum("sha256(images.tobytes() + labels.tobytes())")
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and labels.dtype == np.uint8
    assert images.min() == 0 and images.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_default_data_is_the_digits_split_without_overlap_and_corrupted():
    config = hyper_cleaning.Config()
    assert config.data is None and config.corruption == 1 / 3
    data = hyper_cleaning.load_data(config)
    with np.load(hyper_cleaning.DIGITS) as npz:
        images, labels = npz["images"].reshape(1797, 64), npz["labels"]
    label_of = {row.tobytes(): label for row, label in zip(images, labels)}  # images are distinct
    assert len(label_of) == 1797
    rows = lambda x: {r.tobytes() for r in np.round(x * 16).astype(np.uint8)}
    train, val, test = rows(data.x_train), rows(data.x_val), rows(data.x_test)
    assert (len(train), len(val), len(test)) == (800, 200, 599)
    assert not (train & val or train & test or val & test)
    assert test == rows(images[::3] / 16)  # the fixed test set: images 0, 3, 6, …
    assert all(0 <= x.min() and x.max() == 1 for x in (data.x_train, data.x_val, data.x_test))
    true = lambda x: np.array([label_of[r.tobytes()] for r in np.round(x * 16).astype(np.uint8)])
    np.testing.assert_array_equal(data.y_val, true(data.x_val))  # clean validation labels
    np.testing.assert_array_equal(data.y_test, true(data.x_test))
    wrong = data.y_train != true(data.x_train)
    np.testing.assert_array_equal(wrong, data.corrupted)  # corrupted: exactly the changed labels
    assert data.corrupted.sum() == 267  # a third of 800

    other = hyper_cleaning.load_data(dataclasses.replace(config, seed=1, corruption=0.5))
    assert rows(other.x_test) == test and rows(other.x_train) != train  # the seed redraws
    assert other.corrupted.sum() == 400
    with pytest.raises(ValueError, match=r"--n_train \+ --n_val = 1300 exceeds the 1198 training "
                                         r"images of the bundled digits"):
        hyper_cleaning.load_data(dataclasses.replace(config, n_train=1100))


def test_a_short_run_on_the_digits_down_weights_corrupted_examples(tmp_path):
    config = hyper_cleaning.Config(n_train=200, n_val=100, T=30, hyper_iterations=8, outer_lr=0.2)
    results = hyper_cleaning.run_experiment(config, tmp_path)
    metrics = results["metrics"]
    assert metrics["weight_corrupted"] < 0.5 < metrics["weight_clean"]  # both start at σ(0)
    assert metrics["weight_clean"] - metrics["weight_corrupted"] > 0.15, metrics
    assert metrics["f1"] > 0.5 and 0 <= metrics["test_accuracy"] <= 1
    assert results["config"]["data"] is None and results["config"]["n_train"] == 200
    assert (tmp_path / "weights.png").exists() and (tmp_path / "metrics.csv").exists()


# -- every --method with its launcher defaults ------------------------------------------------------

# The launcher command of each method that learns the example weights, as docs/launchers.md gives it:
# `python -m flags.hyper_cleaning --logdir … --method M` (and --truncate 25 for truncated reverse).
DEFAULT_COMMANDS = {
    "reverse": dict(method="reverse"),
    "truncated reverse": dict(method="reverse", method_settings={"truncate": 25}),
    "implicit": dict(method="implicit"),
    "bome": dict(method="bome"),
    "penalty": dict(method="penalty"),
    "stochastic": dict(method="stochastic"),
}
assert {c["method"] for c in DEFAULT_COMMANDS.values()} == set(hyper_cleaning.METHOD_DEFAULTS) - {"forward"}


@pytest.mark.long
@pytest.mark.parametrize("name", list(DEFAULT_COMMANDS))
def test_each_default_launcher_command_cleans_the_digits(name, tmp_path):
    """The launcher's defaults, 800 digits with a third of the labels corrupted (5-20 s each):
    the learned weights retrain a better model than uniform ones, and flag the corrupted
    examples with F1 ≥ 0.8."""
    settings = DEFAULT_COMMANDS[name]
    m = hyper_cleaning.run_experiment(hyper_cleaning.Config(**settings), tmp_path)["metrics"]
    assert m["hyper_iterations_done"] == hyper_cleaning.METHOD_DEFAULTS[settings["method"]].hyper_iterations
    assert m["f1"] >= 0.8, m
    assert m["test_accuracy"] > m["baseline_test_accuracy"] + 0.01, m  # 6 of the 599 test images


# Other settings of two methods, checked on the slice too.
VARIANTS = {"bome grad_norm": dict(method="bome", method_settings=dict(phi="grad_norm", eta=0.5)),  # the official toys' η
            "stochastic score": dict(method="stochastic", method_settings=dict(estimator="score", temperature=1e-3))}
# On the slice, after a quarter of its iterations, the penalty method has moved the corrupted
# examples' mean weight to 0.43; the score estimator (a covariance over one short chain) is noisy:
# the clean examples' weights rise consistently, the corrupted ones' mean falls to 0.45.
FALL_BELOW = {"penalty": 0.47, "stochastic score": 0.49}


@pytest.mark.parametrize("name", list(DEFAULT_COMMANDS) + list(VARIANTS))
def test_each_method_down_weights_the_corrupted_examples_on_a_slice(name, tmp_path):
    """The short version: a quarter of the training data, a quarter of the hyper-iterations, a
    shorter retraining."""
    settings = {**DEFAULT_COMMANDS, **VARIANTS}[name]
    defaults = hyper_cleaning.METHOD_DEFAULTS[settings["method"]]
    iterations = defaults.hyper_iterations // 4
    config = hyper_cleaning.Config(**settings, n_train=200, n_val=50, hyper_iterations=iterations, retrain_steps=300)
    m = hyper_cleaning.run_experiment(config, tmp_path)["metrics"]
    assert m["weight_corrupted"] < FALL_BELOW.get(name, 0.45), m  # from σ(0) = ½
    assert m["weight_corrupted"] < m["weight_clean"] - 0.1 and m["f1"] > 0.5, m
    assert m["test_accuracy"] > m["baseline_test_accuracy"] + 0.03, m  # the learned weights help
    assert m["hyper_iterations_done"] == iterations
    learns_lr = settings["method"] == "reverse"  # only reverse mode learns η
    assert (m["lr"] == pytest.approx(defaults.inner_lr)) != learns_lr, m["lr"]
    with (tmp_path / "metrics.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(iterations))


def test_baseline_and_oracle_are_retrained_the_same_for_every_method(tmp_path):
    """Rows of different methods are comparable: reverse mode changes η, BOME does not, yet the
    uniform-weight baseline and the oracle are the same training at --retrain_lr."""
    short = dict(n_train=200, n_val=50, hyper_iterations=3, retrain_steps=200)
    reverse = hyper_cleaning.run_experiment(hyper_cleaning.Config(**short), tmp_path / "r")["metrics"]
    bome = hyper_cleaning.run_experiment(hyper_cleaning.Config(**short, method="bome"), tmp_path / "b")["metrics"]
    assert reverse["lr"] != pytest.approx(hyper_cleaning.METHOD_DEFAULTS["reverse"].inner_lr)  # η was learned
    assert bome["lr"] == pytest.approx(hyper_cleaning.METHOD_DEFAULTS["bome"].inner_lr)
    for key in ("baseline_test_accuracy", "oracle_test_accuracy"):
        assert reverse[key] == bome[key], key
    assert "learned_rate_test_accuracy" in reverse and "learned_rate_test_accuracy" not in bome


def test_forward_mode_learns_the_rate_and_the_l2_penalty_only(tmp_path):
    config = hyper_cleaning.Config(n_train=200, n_val=50, method="forward", T=30, hyper_iterations=5, retrain_steps=200)
    m = hyper_cleaning.run_experiment(config, tmp_path)["metrics"]
    assert not {"f1", "precision", "recall", "weight_corrupted"} & set(m)  # no detection: it learns no weights
    assert m["test_accuracy"] == m["baseline_test_accuracy"]  # uniform weights: the baseline's training
    assert 0 <= m["learned_rate_test_accuracy"] <= 1  # the same weights at the learned η and ρ
    assert m["lr"] != pytest.approx(0.3) and m["l2"] != pytest.approx(1e-3, rel=1e-3)
    assert not (tmp_path / "weights.png").exists()
    with pytest.raises(ValueError, match=r"--method=forward learns log ρ: --l2 \(its initial ρ\) must be positive"):
        hyper_cleaning.check_config(dataclasses.replace(config, l2=0.0))


def test_each_method_setting_left_unset_takes_the_method_default():
    bome = hyper_cleaning.resolved(hyper_cleaning.Config(method="bome"))
    official = hyper_cleaning.METHOD_DEFAULTS["bome"]
    assert (bome.T, bome.inner_lr, bome.outer_lr, bome.hyper_iterations) == tuple(official)[:4]
    assert bome.method_settings == dict(eta=0.1, phi="value", inner_learning_rate=bome.inner_lr, momentum=0.9)
    penalty = hyper_cleaning.resolved(hyper_cleaning.Config(method="penalty"))
    assert penalty.normalize_weights is True and penalty.method_settings == dict(gamma=0.01, lambda_g=0.01,
                                                                                 epsilon=0.01, nu=1e-4)
    stochastic = hyper_cleaning.resolved(hyper_cleaning.Config(method="stochastic", T=40)).method_settings
    assert stochastic == dict(estimator="reversed", burn_in=20, warm_start=False, temperature=1e-4)
    assert hyper_cleaning.resolved(hyper_cleaning.Config(method="implicit")).method_settings == dict(
        linear_system_solver="cg", max_iter=20, warm_start=True)
    given = hyper_cleaning.Config(method="bome", T=3, inner_lr=0.5, outer_lr=2.0, hyper_iterations=7,
                                  method_settings={"eta": 0.2})
    assert hyper_cleaning.resolved(given) == dataclasses.replace(given, normalize_weights=False, method_settings=dict(
        eta=0.2, phi="value", inner_learning_rate=0.5, momentum=0.9))
    assert hyper_cleaning.resolved(hyper_cleaning.Config(time_budget=60.0)).hyper_iterations is None  # the budget only
    assert hyper_cleaning.resolved(hyper_cleaning.Config(time_budget=60.0, hyper_iterations=7)).hyper_iterations == 7


def test_a_time_budget_alone_runs_until_the_budget(tmp_path):
    budget = 3.0
    config = hyper_cleaning.Config(n_train=200, n_val=50, T=5, time_budget=budget, retrain_steps=100)
    m = hyper_cleaning.run_experiment(config, tmp_path)["metrics"]
    with (tmp_path / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    # it stops at the hyper-iteration that reaches the budget (the first one traces: its length varies)
    assert m["elapsed"] >= budget > m["elapsed"] - float(table[-1]["seconds"])
    assert m["hyper_iterations_done"] == len(table)
    elapsed = [float(r["elapsed_seconds"]) for r in table]
    assert elapsed == sorted(elapsed) and elapsed[-1] == pytest.approx(m["elapsed"])
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in table)
    np.testing.assert_allclose(np.cumsum([float(r["seconds"]) for r in table]), elapsed, rtol=1e-6)


def test_a_time_budget_with_hyper_iterations_stops_at_the_first_limit(tmp_path):
    config = hyper_cleaning.Config(n_train=200, n_val=50, T=5, time_budget=600.0, hyper_iterations=4, retrain_steps=100)
    m = hyper_cleaning.run_experiment(config, tmp_path)["metrics"]
    assert m["hyper_iterations_done"] == 4 and m["elapsed"] < 600


@pytest.mark.parametrize("setting, message", [
    ({"method_settings": {"truncate": 30}}, "--truncate=30 must be below --T=30"),
    ({"method": "reversed"}, "--method must be one of"),
    ({"method": "stochastic", "method_settings": {"estimator": "pathwise"}},
     "one tangent per scalar hyperparameter: 800 here"),
    ({"method": "stochastic", "method_settings": {"temperature": -1.0}}, "--temperature must be a float ≥ 0, got -1.0"),
    ({"method": "stochastic", "method_settings": {"burn_in": 30}}, "--stochastic_burn_in=30 must be below --T=30"),
    ({"method": "bome", "method_settings": {"truncate": 3}}, "Method 'bome' has no setting 'truncate'"),
    ({"method": "bome", "method_settings": {"momentum": 1.0}}, r"--bome_momentum must be a float in \[0, 1\), got 1.0"),
    ({"method": "bome", "method_settings": {"inner_learning_rate": 0.0}}, "--bome_lr must be a float > 0, got 0.0"),
    ({"method_settings": {"momentum": 0.5}}, "Method 'reverse' has no setting 'momentum'"),
    ({"time_budget": 0.0}, "--time_budget must be positive, got 0.0"),
    ({"retrain_lr": 0.0}, "--retrain_lr must be positive, got 0.0"),
    ({"method": "implicit", "l2": 0.0}, "--method=implicit needs ρ > 0: --l2 must be positive, got 0.0")])
def test_bad_settings_are_named(setting, message):
    with pytest.raises(ValueError, match=message):
        hyper_cleaning.check_config(hyper_cleaning.Config(T=30, **setting))
