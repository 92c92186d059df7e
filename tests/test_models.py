"""Tests of hyper_repr.models: the representation networks h_λ and their transductive normalisation."""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from far_ho2 import oracles
from hyper_repr import models
from hyper_repr.models import TransductiveBatchNormalization

# name, builder, default input shape, number of features
NETWORKS = [("omniglot", models.omniglot_network, (28, 28, 1), 256),
            ("c4l", models.c4l_network, (84, 84, 3), 800),
            ("rn", models.residual_network, (84, 84, 3), 512)]
IDS = [n[0] for n in NETWORKS]


def _images(batch, shape, dtype="float32", seed=0):
    return tf.constant(np.random.default_rng(seed).random((batch, *shape)), dtype)


def _expected_variables(name, batch_norm_scale=False):
    """[(path, shape)] of the trainable variables in the architecture's specification."""
    norm = ["beta", "gamma"] if batch_norm_scale else ["beta"]
    if name in ("omniglot", "c4l"):
        channels, filters = {"omniglot": (1, 64), "c4l": (3, 32)}[name]
        expected = []
        for i, c_in in enumerate([channels] + [filters] * 3, start=1):
            expected += [(f"conv{i}/kernel", (3, 3, c_in, filters))]
            expected += [(f"norm{i}/{v}", (filters,)) for v in norm]
        return expected
    expected, c_in = [], 3
    for block, filters in enumerate((64, 96, 128, 256), start=1):
        for i, c in enumerate([c_in, filters, filters], start=1):
            expected += [(f"block{block}_conv{i}/kernel", (3, 3, c, filters))]
            expected += [(f"block{block}_norm{i}/{v}", (filters,)) for v in norm]
        expected += [(f"block{block}_skip/kernel", (1, 1, c_in, filters)),
                     (f"block{block}_skip/bias", (filters,))]
        c_in = filters
    return expected + [("head_conv1/kernel", (1, 1, 256, 2048)), ("head_conv1/bias", (2048,)),
                       ("head_conv2/kernel", (1, 1, 2048, 512)), ("head_conv2/bias", (512,))]


@pytest.fixture(scope="module")
def rn():
    return models.residual_network(seed=0)  # the slowest to build: shared


# ------------------------------------------------------------------ architectures


@pytest.mark.parametrize("name, builder, shape, features", NETWORKS, ids=IDS)
def test_output_has_the_paper_size(name, builder, shape, features, rn):
    model = rn if name == "rn" else builder(seed=0)
    out = model(_images(3, shape))
    assert model.input_shape == (None, *shape)
    assert model.output_shape == (None, features)
    assert tuple(out.shape) == (3, features)


@pytest.mark.parametrize("batch_norm_scale", [False, True], ids=["beta", "beta_gamma"])
@pytest.mark.parametrize("name", IDS)
def test_every_variable_is_trainable_and_as_specified(name, batch_norm_scale, rn):
    if name == "rn" and not batch_norm_scale:
        model = rn
    else:
        model = models.build_network(name, seed=0, batch_norm_scale=batch_norm_scale)
    actual = [(v.path, tuple(v.shape)) for v in model.trainable_variables]
    assert actual == _expected_variables(name, batch_norm_scale)
    # Nothing is frozen (the original froze RN's skip convs and β by accident) and, without
    # moving averages, there is no state besides λ.
    assert model.non_trainable_variables == []
    assert len(model.variables) == len(actual)


def _layer_settings(model):
    """Counter of (layer type, settings that the specification fixes) over the model's layers."""
    settings = collections.Counter()
    for layer in model.layers:
        c = layer.get_config()
        if isinstance(layer, keras.layers.Conv2D):
            settings["conv", c["kernel_size"], c["strides"], c["padding"], c["use_bias"],
                     c["activation"]] += 1
        elif isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
            settings[type(layer).__name__, c["pool_size"], c["strides"], c["padding"]] += 1
        elif isinstance(layer, (keras.layers.ReLU, keras.layers.LeakyReLU)):
            settings[type(layer).__name__, c.get("negative_slope")] += 1
        elif isinstance(layer, TransductiveBatchNormalization):
            settings["norm", c["epsilon"]] += 1
    return settings


# The layers of the original code: FAR-HO's hyper_representation.py, hyper-representation's models.py.
LAYER_SETTINGS = {
    "omniglot": {("conv", (3, 3), (2, 2), "same", False, "linear"): 4, ("norm", 1e-3): 4,
                 ("ReLU", 0.0): 4},
    "c4l": {("conv", (3, 3), (1, 1), "same", False, "linear"): 4, ("norm", 1e-3): 4,
            ("ReLU", 0.0): 4, ("MaxPooling2D", (2, 2), (2, 2), "valid"): 4},
    "rn": {("conv", (3, 3), (1, 1), "same", False, "linear"): 12, ("norm", 1e-3): 12,
           ("LeakyReLU", 0.1): 12,
           ("conv", (1, 1), (1, 1), "same", True, "linear"): 4,  # skips
           ("MaxPooling2D", (2, 2), (2, 2), "same"): 4,
           ("conv", (1, 1), (1, 1), "same", True, "relu"): 2,  # head
           ("AveragePooling2D", (6, 6), (6, 6), "valid"): 1},
}


@pytest.mark.parametrize("name", IDS)
def test_layers_have_the_specified_settings(name, rn):
    model = rn if name == "rn" else models.build_network(name, seed=0)
    assert _layer_settings(model) == LAYER_SETTINGS[name]


@pytest.mark.parametrize("name", IDS)
def test_initialisation_is_glorot_uniform_with_zero_offsets(name, rn):
    model = rn if name == "rn" else models.build_network(name, seed=0, batch_norm_scale=True)
    for v in model.trainable_variables:
        w = v.numpy()
        if v.path.endswith("kernel"):
            *window, fan_in, fan_out = w.shape
            limit = np.sqrt(6 / (np.prod(window) * (fan_in + fan_out)))
            assert np.abs(w).max() <= limit, v.path
            # ≥ 192 uniform draws: the largest is within 10% of the limit with prob. > 1 − 1e-8
            assert np.abs(w).max() > 0.9 * limit, v.path
        else:
            assert np.all(w == (1 if v.path.endswith("gamma") else 0)), v.path


def test_same_seed_same_weights_and_different_seed_different_weights():
    first, again, other = (models.omniglot_network(seed=s) for s in (7, 7, 8))
    for a, b, c in zip(first.weights, again.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        if a.path.endswith("kernel"):
            assert not np.allclose(a.numpy(), c.numpy()), a.path
    # Same-shaped layers of one network are drawn independently.
    kernels = [v.numpy() for v in first.trainable_variables if v.path.endswith("kernel")]
    assert not np.allclose(kernels[1], kernels[2])
    unseeded = [models.omniglot_network().trainable_variables[0].numpy() for _ in range(2)]
    assert not np.allclose(*unseeded)


# ------------------------------------------------------------------ transductive normalisation


def test_normalisation_equals_the_formula_in_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(4, 5, 5, 3))
    layer = TransductiveBatchNormalization(scale=True, dtype="float64")
    layer.build(x.shape)
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    mean = x.mean(axis=(0, 1, 2))
    variance = ((x - mean) ** 2).mean(axis=(0, 1, 2))  # biased, as tcl.batch_norm
    expected = gamma * (x - mean) / np.sqrt(variance + 1e-3) + beta
    np.testing.assert_allclose(layer(x), expected, rtol=1e-12)  # same formula, float64 round-off


def test_normalisation_equals_keras_batch_normalization_in_training_mode():
    rng = np.random.default_rng(1)
    x = rng.normal(-1.0, 2.0, size=(6, 4, 4, 5))
    ours = TransductiveBatchNormalization(scale=True, dtype="float64")
    theirs = keras.layers.BatchNormalization(epsilon=1e-3, dtype="float64")
    ours.build(x.shape)
    theirs.build(x.shape)
    gamma, beta = rng.normal(size=5), rng.normal(size=5)
    for layer in (ours, theirs):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    # Equivalent float64 formulas in a different order: round-off only.
    np.testing.assert_allclose(ours(x), theirs(x, training=True), rtol=1e-10, atol=1e-12)
    # Keras' layer has state that `training=True` overwrites; ours has none.
    assert not np.allclose(theirs.moving_mean.numpy(), 0)
    assert ours.non_trainable_variables == []


def test_normalisation_without_scale_has_zero_mean_and_unit_variance():
    x = tf.constant(np.random.default_rng(2).normal(5.0, 10.0, size=(8, 3, 3, 4)))
    y = TransductiveBatchNormalization(dtype="float64")(x).numpy()
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-12)  # round-off
    # var(y) = σ² / (σ² + ε) with σ² ≈ 100: 1 − 1e-5; the tolerance keeps ε's effect visible
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1, rtol=2e-5)


def test_normalisation_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    x0, probe = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 2, 2, 2))
    layer = TransductiveBatchNormalization(scale=True, dtype="float64")
    layer.build(x0.shape)
    layer.gamma.assign(rng.normal(size=2))
    layer.beta.assign(rng.normal(size=2))

    def f(x):  # a random projection: Σ y alone would not depend on x
        return float(tf.reduce_sum(probe * layer(x)))

    x = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = tf.reduce_sum(probe * layer(x))
    grad_x, grad_gamma, grad_beta = tape.gradient(value, [x, layer.gamma, layer.beta])
    np.testing.assert_allclose(grad_x, oracles.central_difference(f, x0), rtol=1e-6)  # FD, ε=1e-6
    np.testing.assert_allclose(grad_beta, probe.sum(axis=(0, 1, 2)), rtol=1e-12)  # ∂/∂β exact
    assert np.all(np.abs(grad_gamma) > 0)


def test_grouped_statistics_normalise_each_group_with_its_own_statistics():
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(1.0, 2.0, size=(3 * 4, 5, 5, 2)))  # 3 groups of 4
    layer = TransductiveBatchNormalization(scale=True, dtype="float64")
    layer.build(x.shape)
    layer.gamma.assign(rng.normal(size=2))
    layer.beta.assign(rng.normal(size=2))
    with models.grouped_statistics(3):
        grouped = layer(x).numpy()
        with models.grouped_statistics(1):  # nested: the inner count, then the outer one again
            whole = layer(x).numpy()
        again = tf.function(layer)(x).numpy()  # traced inside the block: the same groups
    each = np.concatenate([layer(x[4 * g:4 * g + 4]).numpy() for g in range(3)])
    np.testing.assert_allclose(grouped, each, rtol=1e-12, atol=1e-12)  # same formula, round-off
    np.testing.assert_allclose(again, grouped, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(whole, layer(x).numpy())  # outside any block: the whole batch
    assert np.abs(grouped - whole).max() > 0.1


@pytest.mark.parametrize("shape", [(2 * 3, 2, 2, 2), (2 * 3, 24, 24, 32)], ids=["small", "xla"])
def test_grouped_normalisation_second_derivatives_match_finite_differences(shape):
    """uᵀHv of Σ p·y(x) in 2 groups, by differentiating the formula's gradient (the plain formula on
    the small input, the XLA-compiled one on the large), against the central difference of
    t ↦ ⟨∇(x + t·v), u⟩ (float64): what a hypergradient through the network needs."""
    assert (np.prod(shape) >= models.XLA_MIN_ELEMENTS) == (shape[1] > 2)
    rng = np.random.default_rng(7)
    x0, probe, u, v = (rng.normal(size=shape) for _ in range(4))
    layer = TransductiveBatchNormalization(scale=True, dtype="float64")
    layer.build(x0.shape)
    layer.gamma.assign(rng.normal(size=shape[-1]))
    layer.beta.assign(rng.normal(size=shape[-1]))

    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            with models.grouped_statistics(2):
                value = tf.reduce_sum(probe * layer(x))
        return tape.gradient(value, x)

    x = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        directional = tf.reduce_sum(gradient(x) * v)
    u_hessian_v = float(tf.reduce_sum(tape.gradient(directional, x) * u))
    expected = oracles.central_difference(
        lambda t: float(tf.reduce_sum(gradient(tf.constant(x0 + float(t) * u)) * v)), np.zeros(()))
    np.testing.assert_allclose(u_hessian_v, expected, rtol=1e-6)  # central FD, ε = 1e-6


@pytest.mark.parametrize("name", ["omniglot", "c4l"])
def test_features_of_an_example_depend_on_the_rest_of_its_batch(name):
    model = models.build_network(name, seed=0)
    shape = model.input_shape[1:]
    support, query = _images(5, shape, seed=1), _images(5, shape, seed=2)
    alone = model(support).numpy()
    joint = model(tf.concat([support, query], 0)).numpy()[:5]
    # Different statistics, different features: support and query must be fed separately.
    assert np.abs(alone - joint).max() > 1e-2
    # The same batch gives the same features, whatever the `training` flag says.
    for training in (True, False):
        np.testing.assert_array_equal(model(support, training=training).numpy(), alone)


def test_network_normalisation_is_the_numpy_formula_on_the_first_layer():
    model = models.omniglot_network(seed=0, dtype="float64")
    x = _images(4, (28, 28, 1), "float64")
    first = keras.Model(model.input, model.get_layer("norm1").output)
    conv = keras.Model(model.input, model.get_layer("conv1").output)(x).numpy()
    mean, variance = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    np.testing.assert_allclose(first(x), (conv - mean) / np.sqrt(variance + 1e-3),
                               rtol=1e-10, atol=1e-12)  # float64 round-off (atol near 0)


# ------------------------------------------------------------------ float64 and differentiation


@pytest.mark.parametrize("name, builder, shape, features", NETWORKS, ids=IDS)
def test_float64_gradients_reach_every_variable(name, builder, shape, features):
    model = builder(seed=0, dtype="float64", batch_norm_scale=True)
    x = _images(2, shape, "float64")
    with tf.GradientTape() as tape:
        out = model(x)
        value = tf.reduce_sum(tf.sin(out))  # not invariant to any β: a nonzero gradient for all
    grads = tape.gradient(value, model.trainable_variables)
    assert out.dtype == tf.float64 and tuple(out.shape) == (2, features)
    assert all(v.dtype == "float64" for v in model.variables)
    for v, g in zip(model.trainable_variables, grads):
        assert g is not None, v.path
        assert g.dtype == tf.float64 and np.all(np.isfinite(g)), v.path
        assert np.abs(g.numpy()).max() > 0, v.path


def test_stateless_call_is_differentiable_to_second_order_inside_tf_function():
    """The hypergradient pattern: ∂/∂λ of ∇_w L(w, λ) with L = ½‖h_λ(x) w − y‖², checked by FD."""
    model = models.omniglot_network((8, 8, 1), seed=0, dtype="float64")
    x, y = _images(3, (8, 8, 1), "float64"), tf.constant(np.eye(3))
    w = tf.constant(np.random.default_rng(4).normal(size=(model.output_shape[-1], 3)))
    lam0 = [tf.constant(v.numpy()) for v in model.trainable_variables]
    directions = [tf.constant(np.random.default_rng(5).normal(size=v.shape)) for v in lam0]

    def inner_gradient_norm(lam):  # ½‖∇_w L(w, λ)‖²
        with tf.GradientTape() as tape:
            tape.watch(w)
            features, _ = model.stateless_call(lam, [], x)
            loss = 0.5 * tf.reduce_sum((features @ w - y) ** 2)
        return 0.5 * tf.reduce_sum(tape.gradient(loss, w) ** 2)

    traces = []

    @tf.function
    def value_and_grad(lam):
        traces.append(1)
        with tf.GradientTape() as tape:
            tape.watch(lam)
            value = inner_gradient_norm(lam)
        return value, tape.gradient(value, lam)

    value, grads = value_and_grad(lam0)
    value_and_grad([v + 1.0 for v in lam0])  # new values, same signature: no retracing
    assert len(traces) == 1
    np.testing.assert_allclose(value, inner_gradient_norm(lam0), rtol=1e-12)  # graph = eager
    directional = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, directions))

    def along(t):
        return float(inner_gradient_norm([v + t * d for v, d in zip(lam0, directions)]))

    expected = oracles.central_difference(lambda t: along(float(t)), np.zeros(()))
    np.testing.assert_allclose(directional, expected, rtol=1e-6)  # central FD, ε = 1e-6


# ------------------------------------------------------------------ factory, serialisation, errors


@pytest.mark.parametrize("name, builder, shape, features", NETWORKS, ids=IDS)
def test_build_network_is_case_insensitive_with_default_input_shapes(name, builder, shape, features):
    model = models.build_network(name.upper(), seed=3, dtype="float64")
    assert model.name == builder.__name__
    assert model.input_shape == (None, *shape) and model.output_shape == (None, features)
    assert model.variables[0].dtype == "float64"
    assert models.build_network(name.capitalize(), seed=3).name == builder.__name__
    np.testing.assert_array_equal(model.trainable_variables[0].numpy(),
                                  builder(seed=3, dtype="float64").trainable_variables[0].numpy())


def test_build_network_passes_the_input_shape():
    model = models.build_network("omniglot", (32, 32, 3))
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 2 * 2 * 64)


@pytest.mark.parametrize("name", ["resnet", "", None])
def test_build_network_rejects_unknown_names(name):
    with pytest.raises(ValueError, match=r"`name` must be one of \['c4l', 'omniglot', 'rn'\]"):
        models.build_network(name)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras saving
def test_saved_network_reloads_with_the_same_features(tmp_path):
    model = models.omniglot_network(seed=0, batch_norm_scale=True)
    model.get_layer("norm2").gamma.assign(np.full(64, 1.5, "float32"))
    path = str(tmp_path / "omniglot.keras")
    model.save(path)
    x = _images(4, (28, 28, 1))
    np.testing.assert_array_equal(keras.saving.load_model(path)(x), model(x))


@pytest.mark.parametrize("builder, input_shape", [
    (models.omniglot_network, (28, 28)),
    (models.omniglot_network, (28, 0, 1)),
    (models.c4l_network, (15, 84, 3)),  # ⌊15/16⌋ = 0 after the 4 pools
    (models.residual_network, (80, 80, 3)),  # ⌈80/16⌉ = 5 < the 6×6 average pool
])
def test_networks_reject_bad_input_shapes(builder, input_shape):
    with pytest.raises(ValueError, match="`input_shape`"):
        builder(input_shape)


def test_networks_reject_a_non_float_dtype_and_a_non_int_seed():
    with pytest.raises(ValueError, match="`dtype`"):
        models.omniglot_network(dtype="int32")
    with pytest.raises(TypeError, match="`seed`"):
        models.omniglot_network(seed=0.5)


def test_normalisation_rejects_bad_epsilon_and_inputs_without_channels():
    with pytest.raises(ValueError, match="`epsilon`"):
        TransductiveBatchNormalization(epsilon=0.0)
    with pytest.raises(ValueError, match="channels"):
        TransductiveBatchNormalization()(tf.ones((3,)))


def test_mixed_bfloat16_keeps_float32_weights_and_matches_float32_features():
    full = models.build_network("omniglot", seed=0, dtype="float32")
    mixed = models.build_network("omniglot", seed=0, dtype="mixed_bfloat16")
    assert {v.dtype for v in mixed.trainable_variables} == {"float32"}
    assert {layer.compute_dtype for layer in mixed.layers[1:]} == {"bfloat16"}
    images = tf.random.stateless_uniform((20, 28, 28, 1), seed=(1, 2))
    expected = full(images).numpy()
    actual = mixed(images)
    assert actual.dtype == tf.bfloat16
    # bfloat16 keeps 8 bits of mantissa: relative error ~2⁻⁸ per operation, not float32's 1e-7
    error = np.linalg.norm(actual.numpy().astype(np.float32) - expected) / np.linalg.norm(expected)
    assert 1e-5 < error < 0.05
    with pytest.raises(ValueError, match="mixed_bfloat16"):
        models.build_network("omniglot", dtype="mixed_float16")


def test_an_unseeded_network_follows_keras_global_seed():
    """``build_network(seed=None)`` draws its layers' seeds from NumPy's global state: a script
    seeded with ``keras.utils.set_random_seed`` builds the same network twice."""
    def first_kernel():
        keras.utils.set_random_seed(0)
        return models.build_network("omniglot").weights[0].numpy()
    np.testing.assert_array_equal(first_kernel(), first_kernel())
    assert not np.array_equal(first_kernel(), models.build_network("omniglot").weights[0].numpy())
