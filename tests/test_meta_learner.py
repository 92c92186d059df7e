"""hyper_repr.meta_learner and hyper_repr.train on tiny synthetic episodes (8×8 images)."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from hyper_repr import data, meta_learner, train
from hyper_repr.meta_learner import MetaLearner
from hyper_repr.models import build_network

WAYS, SHOTS, QUERIES, STEPS = 3, 1, 2, 3
SHAPE = (8, 8, 1)


def synthetic_split(n_classes: int, seed: int) -> data.Split:
    """Classes = noisy copies of a random prototype image (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((n_classes, 1) + SHAPE)
    images = np.clip(prototypes + 0.3 * rng.standard_normal((n_classes, 6) + SHAPE), 0, 1)
    return data.split_from_array((255 * images).astype(np.uint8))


SPLITS = data.Splits(synthetic_split(12, 0), synthetic_split(6, 1), synthetic_split(6, 2))


def meta_batch(first: int, size: int) -> data.Episode:
    """Episodes first … first + size − 1 of stream 0 of the training split (leading axis)."""
    return next(iter(data.episode_dataset(SPLITS.train, ways=WAYS, shots=SHOTS, queries=QUERIES,
                                          seed=0, meta_batch_size=size, first_episode=first)))


def learner(network, batch_size, **options) -> MetaLearner:
    return MetaLearner(network, ways=WAYS, meta_batch_size=batch_size, steps=STEPS,
                       learning_rate=0.5, **options)


def test_meta_batch_hypergradient_is_the_mean_of_the_episodes_hypergradients():
    network = build_network("omniglot", SHAPE, seed=0, dtype="float64")
    batch = meta_batch(0, 3)
    value, grads = learner(network, 3, learn_lr=True).hypergradients(batch)
    single = learner(network, 1, learn_lr=True)
    alone = [single.hypergradients(meta_batch(i, 1)) for i in range(3)]
    assert float(value) == pytest.approx(np.mean([float(v) for v, _ in alone]), rel=1e-12)
    for k, g in enumerate(grads):  # float64; the episodes' statistics do not mix: round-off only
        expected = np.mean([a[1][k].numpy() for a in alone], axis=0)
        np.testing.assert_allclose(g.numpy(), expected, rtol=1e-9, atol=1e-14)
    assert all(np.any(g.numpy() != 0) for g in grads)


def test_hypergradient_matches_central_finite_differences():
    network = build_network("omniglot", SHAPE, seed=1, dtype="float64")
    model = learner(network, 2, learn_lr=True)
    batch = meta_batch(3, 2)
    _, grads = model.hypergradients(batch)
    origin = [v.numpy() for v in model.hypers]
    rng = np.random.default_rng(0)
    eps = 1e-6  # float64: truncation O(ε²), round-off ~1e-16/ε relative
    for _ in range(2):
        direction = [rng.standard_normal(x.shape) for x in origin]
        values = []
        for sign in (1, -1):
            for v, x, d in zip(model.hypers, origin, direction):
                v.assign(x + sign * eps * d)
            values.append(float(model.hypergradients(batch)[0]))
        expected = (values[0] - values[1]) / (2 * eps)
        actual = sum(float(np.sum(g.numpy() * d)) for g, d in zip(grads, direction))
        assert actual == pytest.approx(expected, rel=1e-6)  # FD error ~1e-9 relative here
    for v, x in zip(model.hypers, origin):
        v.assign(x)


def test_fit_heads_is_gradient_descent_on_the_episode_cross_entropy():
    """The closed-form head training of evaluation follows the inner problem's dynamics."""
    rng = np.random.default_rng(0)
    features = tf.constant(rng.standard_normal((2, 6, 4)))
    labels = tf.constant(rng.integers(0, 3, (2, 6)), tf.int32)
    weights, bias = meta_learner.fit_heads(features, labels, ways=3, steps=4, learning_rate=0.7)
    w, b = tf.zeros((2, 4, 3), tf.float64), tf.zeros((2, 3), tf.float64)
    for _ in range(4):
        with tf.GradientTape() as tape:
            tape.watch([w, b])
            loss = tf.reduce_sum(meta_learner.episode_cross_entropy(
                meta_learner.head_logits(w, b, features), labels))
        gw, gb = tape.gradient(loss, [w, b])
        w, b = w - 0.7 * gw, b - 0.7 * gb
    np.testing.assert_allclose(weights, w, rtol=1e-12)  # same arithmetic up to round-off
    np.testing.assert_allclose(bias, b, rtol=1e-12)


def test_mean_and_ci_and_evaluation():
    mean, ci = meta_learner.mean_and_ci([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and ci == pytest.approx(1.96 * np.sqrt(0.1875) / 2, rel=1e-15)
    with pytest.raises(ValueError, match="accuracies"):
        meta_learner.mean_and_ci([])
    # Pixels of noiseless prototypes: every query is its class's support image, so 100% accuracy.
    prototypes = data.split_from_array(np.repeat(SPLITS.train.images[::6, None], 4, axis=1))
    episodes = data.evaluation_episodes(prototypes, ways=WAYS, shots=1, queries=2, num_episodes=7,
                                        meta_batch_size=3)  # batches of 3, 3 and 1
    result = meta_learner.evaluate(meta_learner.pixel_features, episodes, ways=WAYS, steps=10,
                                   learning_rate=1.0)
    assert result == (1.0, 0.0)
    # Zero steps of training would be chance; one step with η = 0 predicts class 0 only: 1/3.
    chance = meta_learner.evaluate(meta_learner.pixel_features, episodes, ways=WAYS, steps=1,
                                   learning_rate=0.0)
    assert chance[0] == pytest.approx(1 / 3) and chance[1] == 0.0


@pytest.mark.parametrize("variant", ["hyper", "bilevel_train", "approx", "approx_train", "classic"])
def test_every_variant_updates_the_representation(variant):
    network = build_network("omniglot", SHAPE, seed=2, dtype="float32")
    before = [v.numpy() for v in network.trainable_variables]
    if variant == "classic":
        model = learner(network, 2, variant=variant, num_classes=12)
        batch = train.classic_batch(SPLITS.train, 0, 0, 12)
    else:
        model = learner(network, 2, variant=variant)
        batch = meta_batch(0, 2)
    loss = model.meta_step(batch)
    assert np.isfinite(loss) and loss > 0
    assert all(np.any(v.numpy() != b) for v, b in zip(network.trainable_variables, before))


def test_approx_hypergradient_ignores_the_inner_dynamics():
    network = build_network("omniglot", SHAPE, seed=3, dtype="float64")
    batch = meta_batch(5, 2)
    hyper = learner(network, 2).hypergradients(batch)
    approx = learner(network, 2, variant="approx").hypergradients(batch)
    assert float(hyper[0]) == pytest.approx(float(approx[0]), rel=1e-12)  # same E(w_T)
    difference = sum(float(np.sum((h - a) ** 2)) for h, a in zip(hyper[1], approx[1]))
    assert difference > 1e-6 * sum(float(np.sum(h ** 2)) for h in hyper[1])


def test_invalid_options_name_the_argument():
    network = build_network("omniglot", SHAPE, seed=0)
    with pytest.raises(ValueError, match="variant"):
        learner(network, 2, variant="maml")
    with pytest.raises(ValueError, match="learn_lr"):
        learner(network, 2, variant="approx", learn_lr=True)
    with pytest.raises(ValueError, match="num_classes"):
        learner(network, 2, variant="classic")


CONFIG = train.Config(ways=WAYS, shots=SHOTS, queries=QUERIES, steps=STEPS, learning_rate=0.5,
                      meta_batch_size=2, meta_lr=1e-2, iterations=6, eval_every=3,
                      eval_episodes=4, test_episodes=4, eval_batch_size=4, learn_lr=True)


def _checkpoint(workdir) -> dict:
    reader = tf.train.load_checkpoint(str(workdir / "checkpoints"))
    names = [n for n in reader.get_variable_to_shape_map()
             if not n.startswith(("save_counter", "progress/elapsed", "_CHECKPOINTABLE"))]
    return {n: reader.get_tensor(n) for n in names}


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    whole = train.meta_train(CONFIG, str(tmp_path / "whole"), SPLITS)
    half = dataclasses.replace(CONFIG, iterations=3)
    train.meta_train(half, str(tmp_path / "resumed"), SPLITS)
    resumed = train.meta_train(CONFIG, str(tmp_path / "resumed"), SPLITS)
    expected, actual = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "resumed")
    assert sorted(expected) == sorted(actual) and len(expected) > 20
    for name in expected:  # the same float32 operations in the same order
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, err_msg=name)
    assert whole["iterations"] == resumed["iterations"] == 6
    assert whole["test"] == resumed["test"]
    rows = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["iteration", "3", "6"]
    with pytest.raises(ValueError, match="steps"):  # another config in the same workdir
        train.meta_train(dataclasses.replace(CONFIG, steps=2), str(tmp_path / "resumed"), SPLITS)
