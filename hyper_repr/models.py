"""Representation networks h_λ of hyper-representation (Franceschi et al., ICML 2018).

The hyperparameters λ are the weights of a network h_λ that maps each image to a feature vector;
each episode fits a linear ground model g_w on top of it:

    f(x) = g_w(h_λ(x)),     λ = every trainable variable of the network

Three architectures, as in the original code (FAR-HO's `hyper_representation.py` and
hyper-representation's `models.py`), with Glorot-uniform ("xavier") convolution kernels and zero
biases and offsets:

    omniglot  4 × [conv 3×3/2, 64, no bias · norm · ReLU]                    28 → 2,   256-d
    c4l       4 × [conv 3×3, 32, no bias · norm · ReLU · max-pool 2×2 VALID]  84 → 5,   800-d
    rn        4 residual blocks (64, 96, 128, 256) + 1×1 convs 2048, 512     84 → 1,   512-d

Normalisation is transductive. The original called `tcl.batch_norm` in training mode and never
ran its moving-average updates. Every forward pass was therefore normalised with the statistics of
its own batch: the support set and the query set separately, at meta-training and meta-testing.
`TransductiveBatchNormalization` does exactly that and nothing else:

    μ_c = mean_{n,i,j} x_nijc,     σ²_c = mean_{n,i,j} (x_nijc − μ_c)²
    y_nijc = γ_c · (x_nijc − μ_c) / √(σ²_c + ε) + β_c,     ε = 10⁻³,   γ ≡ 1 unless learned

It has no moving averages, so the networks hold no state besides λ. This means:
- `model(x)`, `model(x, training=True)` and `model(x, training=False)` are the same function. The
  `training` flag is ignored: no layer behaves differently at test time.
- Calls have no side effects (`keras.layers.BatchNormalization(training=True)` assigns to its
  moving averages on every call). They can be repeated inside `tf.GradientTape` and `tf.function`
  and differentiated to any order. `model.stateless_call(weights, [], x)` is exact.
- To reproduce the original, call the network on the support batch and on the query batch
  separately. A concatenated batch would share statistics.

Within `grouped_statistics(G)` the layer normalises its batch as G equal consecutive groups, each
with its own μ and σ² (the episodes of a flattened meta-batch [B·n, ...], see
`heads.episode_features`): one batched convolution per layer for the whole meta-batch, the
statistics of each episode. On inputs of `XLA_MIN_ELEMENTS` or more (or of unknown size) the
formula runs as one XLA-compiled function (TensorFlow's `jit_compile`), forward and backward: its
element-wise passes fused, which made a meta-training step 4-12 % faster on a CPU than the same
formula as separate TensorFlow operations; smaller inputs skip XLA's compilation.

The original learned only the offsets β (`tcl.batch_norm` defaults to `scale=False`). The scale γ
is therefore fixed at 1 unless `batch_norm_scale=True`; a learnable γ was reported to hurt.

Departure from the original: the residual network's 1×1 skip convolutions and normalisation
offsets were left out of the hyperparameter collection by accident, so they never changed from
their initial values. Here every variable of every network is trainable and part of λ.

Example:
    net = build_network("omniglot", seed=0, dtype="float64")
    features = net(images)  # (batch, 256), normalised with this batch's statistics

References:
    Franceschi, Frasconi, Salzo, Grazzi, Pontil. Bilevel Programming for Hyperparameter
    Optimization and Meta-Learning. ICML 2018, arXiv:1806.04910.
    Mishra, Rohaninejad, Chen, Abbeel. A Simple Neural Attentive Meta-Learner (SNAIL, "TCML").
    ICLR 2018, arXiv:1707.03141 (the residual network).
"""

import contextlib
import threading
from typing import Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

Shape = tuple[int, int, int]


class _Groups(threading.local):
    """The number of groups of the normalisations traced in this thread (``grouped_statistics``)."""

    count: int | tf.Tensor = 1


_GROUPS = _Groups()


@contextlib.contextmanager
def grouped_statistics(groups: int | tf.Tensor) -> Iterator[None]:
    """Within this block, every `TransductiveBatchNormalization` called in this thread splits its
    batch into `groups` equal consecutive groups and normalises each with its own statistics.

    Example (B episodes of n images, one network call, per-episode statistics):
        with grouped_statistics(B):
            features = network(tf.reshape(images, [B * n, *images.shape[2:]]))
    """
    outer, _GROUPS.count = _GROUPS.count, groups
    try:
        yield
    finally:
        _GROUPS.count = outer


def _normalise(x: tf.Tensor, beta: tf.Tensor, gamma: tf.Tensor | None, epsilon: float) -> tf.Tensor:
    """y = γ·(x − μ)/√(σ² + ε) + β of x [G, m, C], with μ, σ² [G, 1, C] over axis 1 (two passes)."""
    centred = x - tf.reduce_mean(x, axis=1, keepdims=True)
    normalised = centred * tf.math.rsqrt(tf.reduce_mean(tf.square(centred), axis=1, keepdims=True) + epsilon)
    return (normalised if gamma is None else normalised * gamma) + beta


_normalise_compiled = tf.function(_normalise, jit_compile=True, reduce_retracing=True, autograph=False)
# Inputs with fewer elements than this (statically known) skip XLA: each new shape costs a
# compilation (about 0.1 s on a 2-core CPU), and on tensors this small fusing saved nothing measurable
XLA_MIN_ELEMENTS = 2**16


@keras.saving.register_keras_serializable(package="hyper_repr")
class TransductiveBatchNormalization(keras.layers.Layer):
    """Batch normalisation that always uses the statistics of the current batch (no moving averages).

        y = γ · (x − μ_B) / √(σ²_B + ε) + β

    μ_B and σ²_B are the mean and the biased variance of each channel over the batch and spatial
    axes. The output equals `keras.layers.BatchNormalization(epsilon, scale, ...)(x, training=True)`,
    without the moving-average updates. The layer ignores `training`.

    Args:
        scale: whether to learn the scale γ (initialised to 1). If `False`, γ ≡ 1, as in the
            original. Defaults to `False`.
        epsilon: ε, added to the variance. Defaults to `1e-3` (as `tcl.batch_norm` and Keras).
        **kwargs (Any): `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Input shape:
        `(batch, ..., channels)`, with at least two axes.

    Output shape:
        Same as the input.
    """

    def __init__(self, scale: bool = False, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        if epsilon <= 0:
            raise ValueError(f"`epsilon` must be positive, got {epsilon!r}.")
        self.scale, self.epsilon = bool(scale), float(epsilon)

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(f"{self.name!r} needs inputs (batch, ..., channels) with a known "
                             f"number of channels, got shape {input_shape}.")
        channels = (input_shape[-1],)
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta")
        self.gamma = (self.add_weight(shape=channels, initializer="ones", name="gamma")
                      if self.scale else None)

    def call(self, inputs):
        # the statistics in the variables' dtype (float32 under mixed precision, as Keras's own)
        x = tf.cast(inputs, self.variable_dtype)
        beta, gamma = (None if v is None else tf.cast(v, self.variable_dtype) for v in (self.beta, self.gamma))
        size = x.shape.num_elements()
        normalise = _normalise if size is not None and size < XLA_MIN_ELEMENTS else _normalise_compiled
        y = normalise(tf.reshape(x, [_GROUPS.count, -1, x.shape[-1]]), beta, gamma, self.epsilon)
        return tf.cast(tf.reshape(y, tf.shape(x)), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "epsilon": self.epsilon}


# dtype policies: weights in float32, computation in bfloat16 (keras.mixed_precision; float16
# would need loss scaling in the hypergradient, which is not implemented)
MIXED_PRECISION = ("mixed_bfloat16",)


class _LayerFactory:
    """Makes the layers of one network: one dtype, one normalisation option, one seed stream."""

    def __init__(self, seed: int | None, dtype: str | None, batch_norm_scale: bool):
        if dtype not in MIXED_PRECISION:
            try:
                standard = keras.backend.standardize_dtype(dtype or keras.config.floatx())
            except ValueError:
                standard = None
            if standard is None or not standard.startswith(("float", "bfloat")):
                raise ValueError(f"`dtype` must be a floating-point type such as 'float64', or "
                                 f"one of {MIXED_PRECISION}, got {dtype!r}.")
            dtype = standard
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
            raise TypeError(f"`seed` must be an int or None, got {seed!r}.")
        self.dtype, self.batch_norm_scale = dtype, batch_norm_scale
        # one independent kernel seed per layer; without a seed, drawn from NumPy's global state, which
        # keras.utils.set_random_seed seeds (so that a seeded script builds the same network twice)
        self._rng = np.random.default_rng(np.random.randint(2**31) if seed is None else seed)

    def __call__(self, layer_class: Callable, *args, **kwargs) -> keras.layers.Layer:
        """`layer_class(*args, **kwargs)` in the network's dtype."""
        return layer_class(*args, dtype=self.dtype, **kwargs)

    def conv(self, filters: int, kernel_size: int, name: str, *, strides: int = 1,
             use_bias: bool = False, activation: str | None = None) -> keras.layers.Layer:
        """Conv2D, padding SAME, Glorot-uniform kernel, zero bias."""
        kernel_initializer = keras.initializers.GlorotUniform(seed=int(self._rng.integers(2**31)))
        return self(keras.layers.Conv2D, filters, kernel_size, strides=strides, padding="same",
                    use_bias=use_bias, activation=activation,
                    kernel_initializer=kernel_initializer, name=name)

    def norm(self, name: str) -> keras.layers.Layer:
        return self(TransductiveBatchNormalization, scale=self.batch_norm_scale, name=name)


def _input(input_shape: Shape, factory: _LayerFactory, min_size: int) -> keras.KerasTensor:
    """`keras.Input` after checking that `input_shape` is (height, width, channels), ≥ `min_size`."""
    shape = tuple(input_shape)
    if (len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)
            or min(shape[:2]) < min_size):
        raise ValueError(f"`input_shape` must be (height, width, channels) of positive ints with "
                         f"height and width ≥ {min_size}, got {input_shape!r}.")
    return keras.Input(shape=shape, dtype=keras.DTypePolicy(factory.dtype).variable_dtype,
                       name="images")


def _conv4_network(input_shape: Shape, *, filters: int, strides: int, max_pool: bool, name: str,
                   min_size: int, seed: int | None, dtype: str | None,
                   batch_norm_scale: bool) -> keras.Model:
    """4 × [conv 3×3 (no bias), norm, ReLU, optional max-pool 2×2 VALID], flattened."""
    make = _LayerFactory(seed, dtype, batch_norm_scale)
    x = images = _input(input_shape, make, min_size)
    for i in range(1, 5):
        x = make.conv(filters, 3, f"conv{i}", strides=strides)(x)
        x = make.norm(f"norm{i}")(x)
        x = make(keras.layers.ReLU, name=f"relu{i}")(x)
        if max_pool:
            x = make(keras.layers.MaxPooling2D, 2, 2, padding="valid", name=f"pool{i}")(x)
    return keras.Model(images, make(keras.layers.Flatten, name="features")(x), name=name)


def omniglot_network(input_shape: Shape = (28, 28, 1), *, batch_norm_scale: bool = False,
                     seed: int | None = None, dtype: str | None = None,
                     name: str = "omniglot_network") -> keras.Model:
    """The Omniglot representation: 4 strided convolutions of 64 filters, no pooling.

        4 × [conv 3×3, 64 filters, stride 2, SAME, no bias → norm(β) → ReLU] → flatten
        (batch, h, w, c) → (batch, ⌈h/16⌉·⌈w/16⌉·64):   28 → 14 → 7 → 4 → 2,   256 features

    Args:
        input_shape: (height, width, channels). Defaults to `(28, 28, 1)`.
        name: the model's name. Defaults to `"omniglot_network"`.

    `batch_norm_scale`, `seed` and `dtype` are as in `build_network`, which lists the errors.

    Returns:
        A functional `keras.Model` with 8 trainable variables (12 with `batch_norm_scale`) and no
        non-trainable ones.
    """
    return _conv4_network(input_shape, filters=64, strides=2, max_pool=False, name=name,
                          min_size=1, seed=seed, dtype=dtype, batch_norm_scale=batch_norm_scale)


def c4l_network(input_shape: Shape = (84, 84, 3), *, batch_norm_scale: bool = False,
                seed: int | None = None, dtype: str | None = None,
                name: str = "c4l_network") -> keras.Model:
    """The MiniImagenet "C4L" representation: 4 convolutions of 32 filters with max-pooling.

        4 × [conv 3×3, 32 filters, stride 1, SAME, no bias → norm(β) → ReLU
             → max-pool 2×2, stride 2, VALID] → flatten
        (batch, h, w, c) → (batch, ⌊h/16⌋·⌊w/16⌋·32):   84 → 42 → 21 → 10 → 5,   800 features

    Args:
        input_shape: (height, width, channels), height and width ≥ 16 (else `build_network`'s
            ValueError). Defaults to `(84, 84, 3)`.

    `batch_norm_scale`, `seed`, `dtype` and `name` are as in `omniglot_network` (the name
    defaults to `"c4l_network"`), with the same 8 (or 12) trainable variables in the model returned.
    """
    return _conv4_network(input_shape, filters=32, strides=1, max_pool=True, name=name,
                          min_size=16, seed=seed, dtype=dtype, batch_norm_scale=batch_norm_scale)


def _residual_block(x: keras.KerasTensor, make: _LayerFactory, filters: int,
                    block: int) -> keras.KerasTensor:
    """3 × [conv 3×3 (no bias) → norm → leaky-ReLU(0.1)] + conv 1×1 skip, then max-pool 2×2 SAME."""
    skip = make.conv(filters, 1, f"block{block}_skip", use_bias=True)(x)
    for i in range(1, 4):
        x = make.conv(filters, 3, f"block{block}_conv{i}")(x)
        x = make.norm(f"block{block}_norm{i}")(x)
        x = make(keras.layers.LeakyReLU, negative_slope=0.1, name=f"block{block}_relu{i}")(x)
    x = make(keras.layers.Add, name=f"block{block}_add")([skip, x])
    return make(keras.layers.MaxPooling2D, 2, 2, padding="same", name=f"block{block}_pool")(x)


def residual_network(input_shape: Shape = (84, 84, 3), *, batch_norm_scale: bool = False,
                     seed: int | None = None, dtype: str | None = None,
                     name: str = "residual_network") -> keras.Model:
    """The MiniImagenet residual representation "RN" (the SNAIL/TCML ResNet).

        4 residual blocks with 64, 96, 128, 256 filters, each
            main:  3 × [conv 3×3, SAME, no bias → norm(β) → leaky-ReLU(0.1)]
            skip:  conv 1×1 with bias, no activation
            out:   max-pool 2×2, stride 2, SAME (main + skip)
        → conv 1×1, 2048, ReLU → average-pool 6×6 VALID → conv 1×1, 512, ReLU → flatten
        84 → 42 → 21 → 11 → 6 → 1:   512 features

    Unlike the original, the skip convolutions and the normalisation offsets are trainable.

    Args:
        input_shape: (height, width, channels), height and width in 81…176 for a 512-d output.
            Defaults to `(84, 84, 3)`.
        name: the model's name. Defaults to `"residual_network"`.

    `batch_norm_scale`, `seed` and `dtype` are as in `build_network`.

    Returns:
        A functional `keras.Model` with 36 trainable variables (48 with `batch_norm_scale`):
        per block 3 kernels, 3 offsets β, a skip kernel and a skip bias; then 2 kernels and
        2 biases. It has no non-trainable variables.

    Raises:
        ValueError, TypeError: as `build_network`; height and width must be ≥ 81.

    Input shape:
        `(batch, 84, 84, 3)`, or `(batch, *input_shape)`.

    Output shape:
        `(batch, 512)` for height and width in 81…176 (one 6×6 pooling window); larger inputs
        give a multiple of 512 features.
    """
    make = _LayerFactory(seed, dtype, batch_norm_scale)
    x = images = _input(input_shape, make, min_size=81)  # ⌈81/16⌉ = 6 fits the 6×6 pool
    for block, filters in enumerate((64, 96, 128, 256), start=1):
        x = _residual_block(x, make, filters, block)
    x = make.conv(2048, 1, "head_conv1", use_bias=True, activation="relu")(x)
    x = make(keras.layers.AveragePooling2D, 6, 6, padding="valid", name="head_pool")(x)
    x = make.conv(512, 1, "head_conv2", use_bias=True, activation="relu")(x)
    return keras.Model(images, make(keras.layers.Flatten, name="features")(x), name=name)


_NETWORKS = {"omniglot": omniglot_network, "c4l": c4l_network, "rn": residual_network}


def build_network(name: str, input_shape: Shape | None = None, *, batch_norm_scale: bool = False,
                  seed: int | None = None, dtype: str | None = None) -> keras.Model:
    """The representation network h_λ called `name`, as in hyper-representation's experiments.

    Args:
        name: 'omniglot' (`omniglot_network`), 'c4l' (`c4l_network`) or 'rn'
            (`residual_network`), case-insensitive.
        input_shape: (height, width, channels). Defaults to `None`: (28, 28, 1) for 'omniglot'
            and (84, 84, 3) for 'c4l' and 'rn'.
        batch_norm_scale: learn the normalisation scale γ too. Defaults to `False` (β only).
        seed: seeds the kernel initialisers: equal seeds give equal weights. Defaults to `None`
            (weights drawn from NumPy's global state: fresh ones, the same after
            ``keras.utils.set_random_seed``).
        dtype: dtype of the weights and the computation, or 'mixed_bfloat16' (float32 weights,
            bfloat16 computation, float32 normalisation statistics). Defaults to `None`
            (`keras.config.floatx()`).

    Returns:
        The `keras.Model`, named after its builder (e.g. "residual_network").

    Raises:
        ValueError: if `name` is not one of the names above, `input_shape` is not 3 positive ints
            (large enough for the network), or `dtype` is not floating-point.
        TypeError: if `seed` is not an int or None.

    Example:
        net = build_network("C4L", seed=0)
        net(np.zeros((5, 84, 84, 3), "float32")).shape  # (5, 800)
    """
    builder = _NETWORKS.get(name.lower()) if isinstance(name, str) else None
    if builder is None:
        raise ValueError(f"`name` must be one of {sorted(_NETWORKS)} (case-insensitive), "
                         f"got {name!r}.")
    options = dict(batch_norm_scale=batch_norm_scale, seed=seed, dtype=dtype)
    if input_shape is None:
        return builder(**options)
    return builder(input_shape, **options)
