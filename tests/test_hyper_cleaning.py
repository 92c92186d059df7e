"""A user-level run: data hyper-cleaning (Franceschi et al., 2017) with a Keras MLP. The
per-example loss weights σ(λ_i) and the inner learning rate are hyperparameters."""

import keras
import numpy as np
import tensorflow as tf

import far_ho2 as far


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
