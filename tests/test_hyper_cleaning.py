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


# -- every --method on a slice of the digits -------------------------------------------------------

SLICE = dict(n_train=200, n_val=100, l2=1e-3, inner_lr=0.3, retrain_steps=300)
METHOD_SETTINGS = {  # the first-order methods take many cheap iterations, the others a few
    "reverse": dict(T=30, hyper_iterations=10, outer_lr=0.2),
    "truncated reverse": dict(method="reverse", truncate=10, T=30, hyper_iterations=10, outer_lr=0.2),
    "implicit": dict(method="implicit", T=30, hyper_iterations=10, outer_lr=0.2),
    "bome value": dict(method="bome", T=10, hyper_iterations=100, outer_lr=0.05),
    "bome grad_norm": dict(method="bome", bome_phi="grad_norm", T=10, hyper_iterations=100, outer_lr=0.05),
    "penalty": dict(method="penalty", T=30, hyper_iterations=40, outer_lr=0.1),
    "stochastic reversed": dict(method="stochastic", T=30, stochastic_burn_in=15, hyper_iterations=10,
                                outer_lr=0.2),
    "stochastic score": dict(method="stochastic", stochastic_estimator="score", T=60, stochastic_burn_in=30,
                             hyper_iterations=20, outer_lr=0.1, temperature=1e-3),
}
# The score estimator (a covariance over one short chain) is noisy: the clean examples' weights
# rise consistently, the corrupted ones' spread over (0.1, 0.8) with a mean just below ½.
FALL_BELOW = {"stochastic score": 0.49}


@pytest.mark.parametrize("name", list(METHOD_SETTINGS))
def test_each_method_down_weights_the_corrupted_examples(name, tmp_path):
    results = hyper_cleaning.run_experiment(hyper_cleaning.Config(**SLICE, **METHOD_SETTINGS[name]), tmp_path)
    m = results["metrics"]
    assert m["weight_corrupted"] < FALL_BELOW.get(name, 0.45), m  # from σ(0) = 0.5
    assert m["weight_corrupted"] < m["weight_clean"] - 0.1, m
    assert m["test_accuracy"] > m["baseline_test_accuracy"] + 0.03, m  # the learned weights help
    assert m["hyper_iterations_done"] == METHOD_SETTINGS[name]["hyper_iterations"]
    assert m["lr"] == pytest.approx(0.3) or name.startswith(("reverse", "truncated"))  # only they learn η
    with (tmp_path / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(m["hyper_iterations_done"]))


def test_forward_mode_learns_the_rate_and_the_l2_penalty_only(tmp_path):
    config = hyper_cleaning.Config(**SLICE, method="forward", T=30, hyper_iterations=5, outer_lr=0.2)
    m = hyper_cleaning.run_experiment(config, tmp_path)["metrics"]
    assert m["weight_corrupted"] == m["weight_clean"] == 0.5 and m["f1"] == 0.0  # not a cleaning method
    assert m["lr"] != pytest.approx(0.3) and m["l2"] != pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match=r"--method=forward learns log ρ: --l2 \(its initial ρ\) must be positive"):
        hyper_cleaning.check_config(dataclasses.replace(config, l2=0.0))


def test_the_time_budget_stops_and_the_log_has_test_accuracy_against_time(tmp_path):
    config = hyper_cleaning.Config(**SLICE, method="bome", T=5, hyper_iterations=10_000, time_budget=3.0)
    m = hyper_cleaning.run_experiment(config, tmp_path)["metrics"]
    assert 3.0 <= m["elapsed"] < 3.0 + 2.0 and 1 < m["hyper_iterations_done"] < 10_000
    with (tmp_path / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    elapsed = [float(r["elapsed"]) for r in table]
    assert elapsed == sorted(elapsed) and elapsed[-1] == pytest.approx(m["elapsed"])
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in table)
    np.testing.assert_allclose(np.cumsum([float(r["seconds"]) for r in table]), elapsed, rtol=1e-6)


@pytest.mark.parametrize("setting, message", [
    ({"truncate": 30}, "--truncate=30 must be below --T=30"),
    ({"method": "reversed"}, "--method must be one of"),
    ({"stochastic_estimator": "pathwise"}, "one tangent per scalar hyperparameter: 800 here"),
    ({"temperature": -1.0}, "--temperature must be ≥ 0, got -1.0"),
    ({"method": "bome", "truncate": 3}, "--truncate is a setting of --method=reverse; here --method=bome")])
def test_bad_method_settings_are_named(setting, message):
    with pytest.raises(ValueError, match=message):
        hyper_cleaning.check_config(hyper_cleaning.Config(T=30, **setting))
