"""Logistic heads on episode features (Franceschi et al., ICML 2018, §4): pure functions.

Each episode j of a meta-batch fits a multinomial logistic head g_{w_j}, w_j = (W_j, b_j), on the
features h_λ(X_j) of a shared representation:

    z_j = h_λ(X_j) W_j + b_j,     CE_j = (1/n) Σ_i −log softmax(z_ji)[y_ji]

Every function takes the meta-batch on a leading axis: images [B, n, H, W, C], features
[B, n, d], labels [B, n], heads W [B, d, N] and b [B, N].
"""

from typing import Any

import keras
import tensorflow as tf
from keras.src.models.functional import Functional  # the class of keras.Model(inputs, outputs)

from hyper_repr.models import TransductiveBatchNormalization, grouped_statistics


def episode_features(network: keras.Model, images: tf.Tensor) -> tf.Tensor:
    """h_λ applied to each episode on its own: [B, n, H, W, C] -> [B, n, d].

    Each episode's transductive normalisation has its own statistics. A network of per-image
    layers and ``TransductiveBatchNormalization`` (``per_image``: the built-in ones) runs once on
    the B·n images, its normalisation in B groups (``models.grouped_statistics``); any other
    network runs on each episode through ``tf.vectorized_map`` (still one batched convolution per
    layer, but its operations are not fused). Images and features are cast to the dtype of the
    network's variables (float32 under mixed precision, where the layers compute in bfloat16).
    """
    dtype = variable_dtype(network)
    images = tf.cast(images, dtype)
    if not per_image(network):
        return tf.cast(tf.vectorized_map(network, images), dtype)
    episodes, size, *image_shape = _dims(images)
    with grouped_statistics(episodes):
        features = network(tf.reshape(images, [-1, *image_shape]))
    return tf.cast(tf.reshape(features, [episodes, size, *_dims(features)[1:]]), dtype)


def _dims(x: tf.Tensor) -> list:
    """x's dimensions: the static ones as ints (a reshape keeps them), the others as tensors."""
    return [d if d is not None else tf.shape(x)[i] for i, d in enumerate(x.shape)]


# Layers that map each image on its own (the batch axis untouched), besides the normalisation
PER_IMAGE_LAYERS = (keras.layers.InputLayer, keras.layers.Conv2D, keras.layers.Dense, keras.layers.ReLU,
                    keras.layers.LeakyReLU, keras.layers.Activation, keras.layers.MaxPooling2D,
                    keras.layers.AveragePooling2D, keras.layers.Flatten, keras.layers.Add)


def per_image(network: keras.layers.Layer) -> bool:
    """Whether ``network`` couples the images of a batch only through ``TransductiveBatchNormalization``:
    every layer (nested models included) is one of ``PER_IMAGE_LAYERS`` or that normalisation."""
    if type(network) in PER_IMAGE_LAYERS + (TransductiveBatchNormalization,):  # not a subclass: its call may differ
        return True
    # a functional or sequential model runs its layers and nothing else (a subclass's own call may not)
    return (type(network).call in (Functional.call, keras.Sequential.call)
            and all(per_image(layer) for layer in network.layers))


def variable_dtype(network: keras.Model) -> str:
    """The dtype of ``network``'s weights (of its dtype policy if it has none, e.g. raw pixels)."""
    variables = network.weights
    return variables[0].dtype if variables else network.dtype_policy.variable_dtype


def head_logits(weights: tf.Tensor, bias: tf.Tensor, features: tf.Tensor) -> tf.Tensor:
    """Logits of B logistic heads:  z_j = X_j W_j + b_j,  [B, n, d] · [B, d, N] + [B, N] -> [B, n, N]."""
    return tf.einsum("bnd,bdk->bnk", features, weights) + bias[:, None, :]


def episode_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Mean cross-entropy of each episode:  CE_j = (1/n) Σ_i −log softmax(z_ji)[y_ji],  -> [B]."""
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32), logits)
    return tf.reduce_mean(losses, axis=-1)


def episode_accuracy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Fraction of correct predictions of each episode, [B, n, N], [B, n] -> [B] (float64)."""
    correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(labels, tf.int32))
    return tf.reduce_mean(tf.cast(correct, tf.float64), axis=-1)


def ridge(weights: tf.Tensor, bias: tf.Tensor, l2: Any) -> tf.Tensor:
    """The heads' ridge penalty, per episode:  (γ/2)(‖W_j‖² + ‖b_j‖²),  -> [B]."""
    return 0.5 * l2 * (tf.reduce_sum(tf.square(weights), axis=[1, 2])
                       + tf.reduce_sum(tf.square(bias), axis=1))


def head_iterates(features: tf.Tensor, labels: tf.Tensor, *, ways: Any, steps: int,
                  learning_rate: Any, l2: float = 0.0) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """The iterates (W_1, b_1) … (W_T, b_T) of B logistic heads from zero by T steps of gradient
    descent on their mean cross-entropy (plus the ridge penalty (γ/2)(‖W‖² + ‖b‖²)):

        G_t = (softmax(X W_t + b_t) − onehot(Y)) / n
        W_{t+1} = W_t − η (Xᵀ G_t + γ W_t),     b_{t+1} = b_t − η (1ᵀ G_t + γ b_t),     W_0 = b_0 = 0

    (the closed-form gradient of ``episode_cross_entropy`` + ``ridge``; the same dynamics as the
    inner problem of meta-training). Cost O(T·B·n·d·N).

    Args:
        features: X, [B, n, d].
        labels: Y, [B, n] ints in 0 … N−1.
        ways: N, an int or a scalar int tensor.
        steps: T.
        learning_rate: η, a number or scalar tensor.
        l2: γ. Defaults to `0.0` (no penalty, the paper's heads).

    Returns:
        [(W_t [B, d, N], b_t [B, N]) for t = 1 … T].
    """
    dtype = features.dtype
    onehot = tf.one_hot(tf.cast(labels, tf.int32), ways, dtype=dtype)
    n = tf.cast(tf.shape(features)[1], dtype)
    eta = tf.cast(tf.convert_to_tensor(learning_rate, dtype_hint=dtype), dtype)  # no float32 detour
    batch, dim = tf.shape(features)[0], tf.shape(features)[2]
    weights = tf.zeros(tf.stack([batch, dim, ways]), dtype)
    bias = tf.zeros(tf.stack([batch, ways]), dtype)
    iterates = []
    for _ in range(steps):
        g = (tf.nn.softmax(head_logits(weights, bias, features)) - onehot) / n
        weights = weights - eta * (tf.einsum("bnd,bnk->bdk", features, g) + l2 * weights)
        bias = bias - eta * (tf.reduce_sum(g, axis=1) + l2 * bias)
        iterates.append((weights, bias))
    return iterates


def fit_heads(features: tf.Tensor, labels: tf.Tensor, *, ways: Any, steps: int,
              learning_rate: Any, l2: float = 0.0) -> tuple[tf.Tensor, tf.Tensor]:
    """(W_T, b_T): the last of ``head_iterates`` (the heads of evaluation and of 'approx')."""
    return head_iterates(features, labels, ways=ways, steps=steps, learning_rate=learning_rate, l2=l2)[-1]
