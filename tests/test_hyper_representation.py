"""hyper_repr.HyperRepresentation (the Keras model of Algorithm 1), hyper_repr.heads and the
callbacks of far_ho2.launch.callbacks, on tiny synthetic episodes (8×8 images)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
from far_ho2.launch import callbacks
from hyper_repr import HyperRepresentation, data, heads
from hyper_repr.models import build_network

ROOT = pathlib.Path(__file__).resolve().parents[1]
WAYS, SHOTS, QUERIES, STEPS = 3, 1, 2, 3
SHAPE = (8, 8, 1)


def synthetic_split(n_classes: int, seed: int) -> data.Split:
    """Classes = noisy copies of a random prototype image (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((n_classes, 1) + SHAPE)
    images = np.clip(prototypes + 0.3 * rng.standard_normal((n_classes, 6) + SHAPE), 0, 1)
    return data.split_from_array((255 * images).astype(np.uint8))


SPLITS = data.Splits(synthetic_split(12, 0), synthetic_split(6, 1), synthetic_split(6, 2))


def stream(size: int, first: int = 0) -> tf.data.Dataset:
    """Meta-batches of ``size`` episodes of stream 0 of the training split, from episode ``first``."""
    return data.episode_dataset(SPLITS.train, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=0,
                                meta_batch_size=size, first_episode=first)


def meta_batch(first: int, size: int) -> data.Episode:
    return next(iter(stream(size, first)))


def validation(num_episodes: int = 6) -> tf.data.Dataset:
    return data.evaluation_episodes(SPLITS.val, ways=WAYS, shots=SHOTS, queries=QUERIES,
                                    num_episodes=num_episodes, meta_batch_size=4)


def model_of(network=None, *, seed: int = 0, dtype: str = "float64", meta_lr: float = 1e-2,
             **options) -> HyperRepresentation:
    network = network or build_network("omniglot", SHAPE, seed=seed, dtype=dtype)
    model = HyperRepresentation(network, ways=WAYS, steps=STEPS, learning_rate=0.5, **options)
    model.compile(optimizer=keras.optimizers.Adam(meta_lr))
    return model


def values(variables) -> list[np.ndarray]:
    return [v.numpy() for v in variables]


# -- the hypergradient ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape", [("omniglot", SHAPE), ("c4l", (84, 84, 3)), ("rn", (84, 84, 3))])
def test_episode_features_normalise_each_episode_on_its_own(name, shape):
    """The built-in networks run once on the B·n images with B groups of statistics: features and
    ∇λ of a random projection equal the network's on each episode alone (float64 round-off)."""
    network = build_network(name, shape, seed=0, dtype="float64")
    rng = np.random.default_rng(8)
    images = tf.constant(rng.random((3, 4, *shape)))
    probe = tf.constant(rng.normal(size=(3, 4, network.output_shape[-1])))
    assert heads.per_image(network)
    results = []
    for features in (lambda: heads.episode_features(network, images),
                     lambda: tf.stack([network(images[j]) for j in range(3)])):
        with tf.GradientTape() as tape:
            value = features()
            projection = tf.reduce_sum(probe * value)
        results.append([value, *tape.gradient(projection, network.trainable_variables)])
    for ours, each in zip(*results):
        np.testing.assert_allclose(ours, each, rtol=1e-10, atol=1e-12 * np.abs(each).max())


def test_episode_features_of_other_networks_keep_per_episode_results():
    """A network whose layers may couple images otherwise (Keras's BatchNormalization, a subclassed
    layer) is not run on the flattened meta-batch: its features are still each episode's own."""
    inputs = keras.Input(SHAPE, dtype="float64")
    hidden = keras.layers.Conv2D(4, 3, dtype="float64")(inputs)
    network = keras.Model(inputs, keras.layers.Flatten(dtype="float64")(
        keras.layers.BatchNormalization(dtype="float64")(hidden)))

    class Conv(keras.layers.Conv2D):
        pass
    assert not heads.per_image(network) and not heads.per_image(Conv(2, 3))
    images = tf.constant(np.random.default_rng(9).random((2, 5, *SHAPE)))
    np.testing.assert_allclose(heads.episode_features(network, images),
                               tf.stack([network(images[j]) for j in range(2)]), rtol=1e-12, atol=1e-12)


def test_meta_batch_hypergradient_is_the_mean_of_the_episodes_hypergradients():
    hypergradients = compiled(model_of(learn_lr=True))
    value, grads, finite = hypergradients(meta_batch(0, 3))
    alone = [hypergradients(meta_batch(i, 1)) for i in range(3)]
    assert bool(finite) and all(bool(a[2]) for a in alone)
    assert float(value) == pytest.approx(np.mean([float(a[0]) for a in alone]), rel=1e-12)
    for k, g in enumerate(grads):  # float64; the episodes' statistics do not mix: round-off only
        expected = np.mean([a[1][k].numpy() for a in alone], axis=0)
        np.testing.assert_allclose(g.numpy(), expected, rtol=1e-9, atol=1e-14)
    assert all(np.any(g.numpy() != 0) for g in grads)
    assert len(grads) == 9  # 4 kernels, 4 offsets, η


def compiled(model: HyperRepresentation):
    """``model.hypergradients`` compiled (eagerly, each call retraces the vectorized network)."""
    return tf.function(model.hypergradients)


def directional_derivative(model, batch, direction, eps=1e-6) -> float:
    """(E(λ + εd) − E(λ − εd)) / 2ε; float64: truncation O(ε²), round-off ~1e-16/ε relative."""
    origin = values(model.trainable_variables)
    hypergradients, losses = compiled(model), []
    for sign in (1, -1):
        for v, x, d in zip(model.trainable_variables, origin, direction):
            v.assign(x + sign * eps * d)
        losses.append(float(hypergradients(batch)[0]))
    for v, x in zip(model.trainable_variables, origin):
        v.assign(x)
    return (losses[0] - losses[1]) / (2 * eps)


@pytest.mark.parametrize("method", [None, far.ReverseHG(unroll=0),
                                    pytest.param(far.ReverseHG(checkpoint_every=2), marks=pytest.mark.long)],
                         ids=["unrolled", "compiled_loops", "checkpointed"])
def test_hypergradient_matches_central_finite_differences(method):
    """Each path of ReverseHG through the heads with a dynamic meta-batch axis."""
    model = model_of(seed=1, learn_lr=True, hypergradient=method)
    batch = meta_batch(3, 2)
    _, grads, _ = model.hypergradients(batch)
    rng = np.random.default_rng(0)
    for _ in range(2):
        direction = [rng.standard_normal(v.shape) for v in model.trainable_variables]
        actual = sum(float(np.sum(g.numpy() * d)) for g, d in zip(grads, direction))
        assert actual == pytest.approx(directional_derivative(model, batch, direction), rel=1e-6)


def test_truncated_reverse_mode_through_every_step_is_the_full_hypergradient():
    batch = meta_batch(0, 2)
    full = model_of(seed=4).hypergradients(batch)[1]
    for k, expected in ((STEPS, full), (1, None)):
        truncated = model_of(seed=4, hypergradient=far.ReverseHG.truncated(k)).hypergradients(batch)[1]
        difference = max(np.abs(t.numpy() - f.numpy()).max() for t, f in zip(truncated, full))
        if expected is None:
            assert difference > 1e-6  # the first steps' contributions are dropped
        else:
            assert difference < 1e-12


def test_implicit_hypergradient_is_the_implicit_function_theorem_formula():
    """ImplicitHG at w_T against dense float64 algebra, on a linear representation λ and heads
    with a ridge term γ (without it their Hessian is singular):

        ∇E = ∂E/∂λ − (∂²L/∂λ∂w) H⁻¹ ∂E/∂w,     H = ∇²_w L,     L = Σ_j CE_j + (γ/2)‖w_j‖²
    """
    initializer = keras.initializers.GlorotUniform(0)
    network = keras.Sequential([keras.Input(SHAPE, dtype="float64"), keras.layers.Flatten(dtype="float64"),
                                keras.layers.Dense(4, dtype="float64", kernel_initializer=initializer)])
    l2 = 0.1
    model = model_of(network, head_l2=l2, hypergradient=far.ImplicitHG(tolerance=1e-13, max_iter=200))
    batch = meta_batch(0, 2)
    value, grads, finite = model.hypergradients(batch)
    support = lambda: heads.episode_features(network, batch.support_x)  # noqa: E731
    w = [tf.Variable(x) for x in heads.fit_heads(support(), batch.support_y, ways=WAYS, steps=STEPS,
                                                 learning_rate=0.5, l2=l2)]
    inner = lambda: tf.reduce_sum(heads.episode_cross_entropy(  # noqa: E731
        heads.head_logits(*w, support()), batch.support_y) + heads.ridge(*w, l2))
    outer = lambda: tf.reduce_mean(heads.episode_cross_entropy(  # noqa: E731
        heads.head_logits(*w, heads.episode_features(network, batch.query_x)), batch.query_y))
    flat = lambda ts: tf.concat([tf.reshape(t, [-1]) for t in ts], 0)  # noqa: E731
    with tf.GradientTape(persistent=True) as outer_tape:
        with tf.GradientTape() as tape:
            loss = inner()
        dl_dw = flat(tape.gradient(loss, w))
    jacobians = outer_tape.jacobian(dl_dw, w)
    hessian = np.concatenate([j.numpy().reshape(len(dl_dw), -1) for j in jacobians], 1)
    mixed = outer_tape.jacobian(dl_dw, model.trainable_variables)
    with tf.GradientTape() as tape:
        e = outer()
    de_dw, de_dlam = tape.gradient(e, [w, model.trainable_variables])
    q = np.linalg.solve(hessian, flat(de_dw).numpy())
    assert bool(finite) and float(value) == pytest.approx(float(e), rel=1e-12)
    for g, direct, m in zip(grads, de_dlam, mixed):
        expected = direct.numpy() - np.tensordot(q, m.numpy(), axes=1)
        np.testing.assert_allclose(g.numpy(), expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max())


def test_approx_hypergradient_ignores_the_inner_dynamics():
    batch = meta_batch(5, 2)
    hyper = model_of(seed=3).hypergradients(batch)
    approx = model_of(seed=3, variant="approx").hypergradients(batch)
    assert float(hyper[0]) == pytest.approx(float(approx[0]), rel=1e-12)  # same E(w_T)
    difference = sum(float(np.sum((h - a) ** 2)) for h, a in zip(hyper[1], approx[1]))
    assert difference > 1e-6 * sum(float(np.sum(h ** 2)) for h in hyper[1])


def test_clip_bounds_every_hypergradient_entry():
    batch = meta_batch(0, 2)
    raw = model_of(seed=5).hypergradients(batch)[1]
    clip = 0.5 * min(float(np.abs(g.numpy()).max()) for g in raw)
    clipped = model_of(seed=5, clip=clip).hypergradients(batch)[1]
    for r, c in zip(raw, clipped):
        np.testing.assert_array_equal(c.numpy(), np.clip(r.numpy(), -clip, clip))


# -- fit, evaluate, the variants ---------------------------------------------------------------------

def image_batches() -> tf.data.Dataset:
    return data.image_batches(SPLITS.train, batch_size=12, seed=0)


@pytest.mark.parametrize("variant", ["hyper", "bilevel_train", "approx", "approx_train", "classic", "multiclass"])
def test_every_variant_trains_the_representation(variant):
    multiclass = variant == "multiclass"
    model = model_of(seed=2, dtype="float32", variant=variant, num_classes=12 if multiclass else None)
    before = values(model.network.trainable_variables)
    history = model.fit(image_batches() if multiclass else stream(2), steps_per_epoch=2, epochs=1,
                        verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0]) and history.history["loss"][0] > 0
    assert all(np.any(v != b) for v, b in zip(values(model.network.trainable_variables), before))
    assert int(model.optimizer.iterations) == 2


def test_classic_is_the_support_loss_gradient_averaged_over_the_head_iterates():
    """'classic' (single-level multitask): (1/T) Σ_t ∂L(w_t, λ)/∂λ with the heads' iterates held;
    at T = 1 it is 'approx_train' (E = L at the one iterate)."""
    from hyper_repr.heads import episode_cross_entropy, episode_features, head_iterates, head_logits
    batch = meta_batch(2, 2)
    model = model_of(seed=4, variant="classic")
    loss, grads, _ = model.hypergradients(batch)
    features = episode_features(model.network, batch.support_x)
    iterates = head_iterates(features, batch.support_y, ways=WAYS, steps=STEPS, learning_rate=0.5)
    with tf.GradientTape() as tape:
        current = episode_features(model.network, batch.support_x)
        expected = tf.add_n([tf.reduce_mean(episode_cross_entropy(head_logits(w, b, current), batch.support_y))
                             for w, b in iterates]) / STEPS
    for g, e in zip(grads, tape.gradient(expected, model.trainable_variables)):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-10, atol=1e-14)  # float64, same arithmetic
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)
    one_step = [HyperRepresentation(build_network("omniglot", SHAPE, seed=4, dtype="float64"), ways=WAYS, steps=1,
                                    learning_rate=0.5, variant=v).hypergradients(batch)[1]
                for v in ("classic", "approx_train")]
    for a, b in zip(*one_step):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-14)
    approx = model_of(seed=4, variant="approx_train").hypergradients(batch)[1]  # T = 3: they differ
    assert sum(float(tf.reduce_sum((a - b) ** 2)) for a, b in zip(grads, approx)) > 1e-8


def test_a_non_finite_hyper_iteration_updates_nothing_and_stops_training():
    model = model_of(seed=0, dtype="float32")
    model.learning_rate.assign(np.inf)  # the heads are NaN after the first step
    before = values(model.weights)
    with pytest.warns(RuntimeWarning, match="ReverseHG, hyper-iteration 0: the run"):
        history = model.fit(stream(2), steps_per_epoch=3, epochs=2, verbose=0, shuffle=False,
                            callbacks=[keras.callbacks.TerminateOnNaN()])
    assert np.isnan(history.history["loss"][0]) and len(history.history["loss"]) == 1
    assert int(model.optimizer.iterations) == 0
    for a, b in zip(values(model.weights), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant, learning_rate", [("hyper", 1e12), ("approx", np.inf)])
def test_a_diverging_hyper_iteration_changes_nothing_and_says_so(variant, learning_rate):
    """Heads that grow without bound (finite: η = 1e12, the guard's growth test) or become NaN
    ('approx': its own gradient on the same guard): nothing changes, a warning names the step,
    ``fit`` stops after it without any callback, and the loss logged is NaN."""
    model = model_of(seed=0, variant=variant)
    model.learning_rate.assign(learning_rate)
    before = values(model.weights) + values(model.optimizer.variables)
    with pytest.warns(RuntimeWarning, match=r"hyper-iteration 0: the run .* keeps its value"):
        history = model.fit(stream(2), steps_per_epoch=3, epochs=2, verbose=0, shuffle=False)
    assert np.isnan(history.history["loss"][0]) and len(history.history["loss"]) == 1
    for a, b in zip(values(model.weights) + values(model.optimizer.variables), before):
        np.testing.assert_array_equal(a, b)


def test_bome_moves_the_heads_by_its_joint_step():
    """BOME's own step after the update, w ← w_k − ξ_w d_w, from w_k = T gradient steps from 0 on
    each episode: the heads' displacement from w_k is proportional to ξ_w (the same d_w)."""
    batch = meta_batch(0, 2)
    displacements = []
    for xi in (0.1, 0.3):
        model = model_of(seed=1, hypergradient=far.BOME(inner_learning_rate=xi))
        features = heads.episode_features(model.network, batch.support_x)
        w_k = heads.fit_heads(features, batch.support_y, ways=WAYS, steps=STEPS, learning_rate=0.5)
        model.fit(tf.data.Dataset.from_tensors(batch), steps_per_epoch=1, verbose=0)
        displacements.append([(h - w).numpy() / xi for h, w in zip(model._heads.variables, w_k)])
    for a, b in zip(*displacements):
        assert np.abs(a).max() > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_the_penalty_stages_advance_and_its_multiplier_restarts_with_the_episodes():
    """The penalty's stages pass on the meta-batch's statistic (ε large: every step), growing γ
    and shrinking the outer rate; ν is ν₀ at every step (the heads restart), so the augmented
    Lagrangian trains as the plain penalty."""
    trained = []
    for lagrangian in (True, False):
        method = far.Penalty(gamma=1e-2, epsilon=1e3, lagrangian=lagrangian)
        model = model_of(seed=1, hypergradient=method)
        model.fit(stream(2), steps_per_epoch=3, verbose=0, shuffle=False)
        assert int(method.stage.numpy()) == 3 and float(method.gamma.numpy()) == pytest.approx(1e-2 * 1.1 ** 3)
        assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-2 * 0.9 ** 3)
        trained.append(values(model.trainable_variables))
    for a, b in zip(*trained):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_fit_heads_is_gradient_descent_on_the_episode_cross_entropy():
    """The closed-form head training of evaluation follows the inner problem's dynamics."""
    rng = np.random.default_rng(0)
    features = tf.constant(rng.standard_normal((2, 6, 4)))
    labels = tf.constant(rng.integers(0, 3, (2, 6)), tf.int32)
    weights, bias = heads.fit_heads(features, labels, ways=3, steps=4, learning_rate=0.7)
    w, b = tf.zeros((2, 4, 3), tf.float64), tf.zeros((2, 3), tf.float64)
    for _ in range(4):
        with tf.GradientTape() as tape:
            tape.watch([w, b])
            loss = tf.reduce_sum(heads.episode_cross_entropy(heads.head_logits(w, b, features), labels))
        gw, gb = tape.gradient(loss, [w, b])
        w, b = w - 0.7 * gw, b - 0.7 * gb
    np.testing.assert_allclose(weights, w, rtol=1e-12)  # same arithmetic up to round-off
    np.testing.assert_allclose(bias, b, rtol=1e-12)


def pixels() -> keras.Model:
    return keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten()])


def test_evaluate_scores_episodes_with_their_confidence_interval():
    # Pixels of noiseless prototypes: every query is its class's support image, so 100% accuracy.
    prototypes = data.split_from_array(np.repeat(SPLITS.train.images[::6, None], 4, axis=1))
    episodes = data.evaluation_episodes(prototypes, ways=WAYS, shots=1, queries=2, num_episodes=7,
                                        meta_batch_size=3)  # batches of 3, 3 and 1
    model = HyperRepresentation(pixels(), ways=WAYS, steps=10, learning_rate=1.0)
    model.compile()
    result = model.evaluate(episodes, verbose=0, return_dict=True)
    assert result["accuracy"] == 1.0 and result["ci"] == 0.0 and result["loss"] > 0
    # One step with η = 0 predicts class 0 only: 1/3, the CE of uniform logits log 3.
    model.learning_rate.assign(0.0)
    model.test_steps = 1
    chance = model.evaluate(episodes, verbose=0, return_dict=True)
    assert chance["accuracy"] == pytest.approx(1 / 3) and chance["ci"] == 0.0
    assert chance["loss"] == pytest.approx(np.log(3), rel=1e-6)
    # Over noisy episodes, ci = 1.96·σ/√n of the per-episode accuracies (computed here).
    model.learning_rate.assign(1.0)
    noisy = validation(num_episodes=9)
    accuracies = []
    for episode in noisy:
        w, b = heads.fit_heads(heads.episode_features(model.network, episode.support_x),
                               episode.support_y, ways=WAYS, steps=1, learning_rate=1.0)
        logits = heads.head_logits(w, b, heads.episode_features(model.network, episode.query_x))
        accuracies += list(heads.episode_accuracy(logits, episode.query_y).numpy())
    result = model.evaluate(noisy, verbose=0, return_dict=True)
    a = np.array(accuracies)
    assert 0 < a.std() and result["accuracy"] == pytest.approx(a.mean(), rel=1e-12)
    assert result["ci"] == pytest.approx(1.96 * a.std() / np.sqrt(a.size), rel=1e-9)


def test_invalid_options_name_the_argument():
    network = build_network("omniglot", SHAPE, seed=0)
    for options, message in ((dict(variant="maml"), "variant"), (dict(steps=0), "steps"),
                             (dict(variant="approx", learn_lr=True), "learn_lr"),
                             (dict(variant="multiclass"), "num_classes"),
                             (dict(hypergradient=far.ForwardHG()), "ForwardHG"),
                             (dict(hypergradient=far.ImplicitHG(), learn_lr=True), "learn_lr=False"),
                             (dict(hypergradient=far.ImplicitHG()), "head_l2 > 0"),
                             (dict(variant="approx", hypergradient=far.ReverseHG()), "hypergradient"),
                             (dict(hypergradient=far.ReverseHG(jit_compile=True)), "jit_compile=True: "),
                             (dict(clip=0.0), "clip")):
        with pytest.raises(ValueError, match=message):
            HyperRepresentation(network, **({"ways": WAYS, "steps": STEPS} | options))
    with pytest.raises(TypeError, match="hypergradient"):
        HyperRepresentation(network, ways=WAYS, steps=STEPS, hypergradient="reverse")
    model = HyperRepresentation(network, ways=WAYS, steps=STEPS)
    with pytest.raises(ValueError, match="^`jit_compile=True`: .*cannot be compiled by XLA"):
        model.compile(optimizer="adam", jit_compile=True)


def test_saved_model_reloads_with_identical_features_and_scores(tmp_path):
    model = model_of(learn_lr=True, hypergradient=far.ReverseHG.truncated(2), test_steps=2)
    model.fit(stream(2), steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)
    model.save(tmp_path / "repr.keras")
    loaded = keras.models.load_model(tmp_path / "repr.keras")
    images = tf.constant(SPLITS.test.images[:10] / 255.0)
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())
    eta = [float(keras.ops.convert_to_numpy(m.learning_rate)) for m in (loaded, model)]
    assert eta[0] == eta[1] != 0.5  # η was learned and saved
    assert (loaded.test_steps, loaded.hypergradient.truncate, loaded.learn_lr) == (2, 2, True)
    assert loaded.optimizer.get_config()["learning_rate"] == pytest.approx(1e-2)  # compiled as saved
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):  # Adam's state too
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    test = data.evaluation_episodes(SPLITS.test, ways=WAYS, shots=SHOTS, queries=QUERIES, num_episodes=8,
                                    meta_batch_size=4)
    assert loaded.evaluate(test, verbose=0, return_dict=True) == model.evaluate(test, verbose=0,
                                                                                return_dict=True)
    config = model_of(hypergradient=far.ImplicitHG("neumann", tolerance=1e-8, max_iter=7),
                      head_l2=0.5).get_config()
    method = HyperRepresentation.from_config(json.loads(json.dumps(config))).hypergradient
    assert (type(method), method.solver, method.tolerance, method.max_iter) == (far.ImplicitHG, "neumann",
                                                                                 1e-8, 7)


# -- the Keras callbacks -----------------------------------------------------------------------------

class RecordWeights(keras.callbacks.Callback):
    """The model's weights at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())


def test_early_stopping_restores_the_best_validation_weights():
    model = model_of(seed=6, meta_lr=0.05)  # a large step: validation accuracy goes up and down
    record = RecordWeights()
    stopping = keras.callbacks.EarlyStopping("val_accuracy", mode="max", patience=2,
                                             restore_best_weights=True)
    history = model.fit(stream(2), validation_data=validation(), steps_per_epoch=2, epochs=8,
                        verbose=0, shuffle=False, callbacks=[record, stopping])
    accuracy = history.history["val_accuracy"]
    best = int(np.argmax(accuracy))  # the first maximum, as EarlyStopping keeps
    assert best < len(accuracy) - 1 and accuracy[best] > accuracy[-1]
    for a, b in zip(model.get_weights(), record.weights[best]):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(a != b) for a, b in zip(record.weights[-1], record.weights[best]))


class Crashed(Exception):
    pass


class Crash(keras.callbacks.Callback):
    """Raises after ``after`` training steps, as a killed process stops."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.steps = after, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.after:
            raise Crashed


class AtStart(keras.callbacks.Callback):
    """What EarlyStopping holds when ``fit`` starts (after the callbacks before this one)."""

    def __init__(self, stopping: keras.callbacks.EarlyStopping):
        super().__init__()
        self.stopping, self.state = stopping, None

    def on_train_begin(self, logs=None):
        self.state = (self.stopping.wait, self.stopping.best, self.stopping.best_weights)


def checkpointed_run(directory, steps: int, crash: int = 0) -> tuple:
    """``steps`` hyper-iterations (epochs of 3, validated) resumed from ``directory``; crash
    after ``crash`` steps of this run if > 0. Returns (model, progress restored, budget, the
    weights at each epoch end, EarlyStopping's state at the start)."""
    model = model_of(seed=7, learn_lr=True)
    budget = callbacks.TrainingBudget(iterations=steps)
    stopping = keras.callbacks.EarlyStopping("val_accuracy", mode="max", patience=100,
                                             restore_best_weights=True)
    checkpoint = callbacks.Checkpoint(directory, every_seconds=0, track=[budget, stopping])
    done = checkpoint.restore(model)
    record, start = RecordWeights(), AtStart(stopping)
    try:
        model.fit(stream(2, first=2 * done.iterations), validation_data=validation(), steps_per_epoch=3,
                  epochs=done.epochs + 3, initial_epoch=done.epochs, verbose=0, shuffle=False,
                  callbacks=[budget, stopping, checkpoint, record, start] + ([Crash(crash)] if crash else []))
    except Crashed:
        pass
    return model, done, budget, record.weights, start.state


def test_checkpoint_resumes_mid_epoch_exactly_with_early_stopping_state(tmp_path):
    """Killed after 4 of 6 hyper-iterations (one epoch of 3 validated), resumed: the same last
    weights and optimizer state as 6 uninterrupted ones, the same best-validation weights, and
    EarlyStopping resumes with what it held before the crash."""
    straight, _, _, epoch_weights, _ = checkpointed_run(tmp_path / "straight", 6)
    checkpointed_run(tmp_path / "resumed", 6, crash=4)
    resumed, done, budget, _, (wait, best, best_weights) = checkpointed_run(tmp_path / "resumed", 6)
    assert (done.iterations, done.epochs) == (4, 1)
    assert budget.iterations_done == 6 and budget.stopped_by == "iterations"
    assert wait == 0 and 0 < best <= 1  # after the first validation
    for a, b in zip(best_weights, epoch_weights[0]):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    for a, b in zip(resumed.get_weights(), straight.get_weights()):  # best weights, restored
        np.testing.assert_allclose(a, b, rtol=1e-12)
    last = [tf.train.load_checkpoint(str(tmp_path / d)) for d in ("straight", "resumed")]
    names = [n for n in last[0].get_variable_to_shape_map() if n.startswith(("model/", "optimizer/"))]
    assert len(names) > 20
    for name in names:  # the last weights and the optimizer's state, after 6 steps each
        np.testing.assert_allclose(last[1].get_tensor(name), last[0].get_tensor(name), rtol=1e-12,
                                   err_msg=name)


BACKUP_SCRIPT = textwrap.dedent("""
    import sys, time
    import far_ho2, keras, numpy as np
    sys.path.insert(0, {tests!r})
    from test_hyper_representation import model_of, stream

    class Pace(keras.callbacks.Callback):  # announces each epoch, slowly enough to be killed
        def on_epoch_end(self, epoch, logs=None):
            print("epoch", epoch, flush=True)
            time.sleep(0.3)

    model = model_of(seed=8, learn_lr=True)
    model.fit(stream(2).take(3), epochs=5, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.BackupAndRestore({backup!r}), Pace()])
    np.savez({out!r}, *model.get_weights())
""")


def backup_run(tmp_path, name: str) -> subprocess.Popen:
    script = BACKUP_SCRIPT.format(tests=str(ROOT / "tests"), backup=str(tmp_path / f"{name}_backup"),
                                  out=str(tmp_path / f"{name}.npz"))
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def test_fit_with_backup_and_restore_killed_midway_resumes_to_the_same_weights(tmp_path):
    """Keras's BackupAndRestore: a run killed by SIGKILL during epoch 3 of 5 (of the same 3
    meta-batches) and relaunched ends with the weights of an uninterrupted run (float64)."""
    straight, killed = backup_run(tmp_path, "straight"), backup_run(tmp_path, "resumed")
    for line in killed.stdout:
        if line.strip() == "epoch 1":
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=120)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "resumed.npz").exists()
    relaunched = backup_run(tmp_path, "resumed")
    outputs = [process.communicate(timeout=300) for process in (straight, relaunched)]
    for process, (_, stderr) in zip((straight, relaunched), outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert outputs[1][0].split() == ["epoch", "2", "epoch", "3", "epoch", "4"]  # resumed at epoch 2
    a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert len(a.files) == 9
    for name in a.files:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-12, err_msg=name)
