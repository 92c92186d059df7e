"""The hyper-representation meta-learner (Franceschi et al., ICML 2018, §4, Algorithm 1).

Each episode j of a meta-batch fits a multinomial logistic head g_{w_j} on the features of a
shared representation h_λ; the representation (and optionally the inner learning rate η) are the
hyperparameters λ:

    L_j(w_j, λ) = CE(h_λ(X^tr_j) W_j + b_j, Y^tr_j)         inner loss, mean over the support set
    w_{j,t+1} = w_{j,t} − η ∇_w L_j(w_{j,t}, λ),   w_{j,0} = 0,   t = 0 … T−1
    E(λ) = (1/B) Σ_j CE(h_λ(X^val_j) W_{j,T} + b_{j,T}, Y^val_j)    outer loss, over the query sets

The B episodes are one inner problem whose variables hold every head on a leading axis
(W ∈ R^{B×d×N}, b ∈ R^{B×N}) with objective Σ_j L_j: the heads do not interact, so its
hypergradient is the mean of the episodes' hypergradients. ``far.ReverseHG`` computes it through
the T head steps; ``features=`` evaluates h_λ(X^tr) once per hyper-iteration, so the
representation costs one forward and one backward pass on the support sets and one of each on the
query sets (Algorithm 1).

The network is applied to each episode separately (``episode_features``): its transductive
normalisation uses per-episode statistics, of the support set and of the query set apart.

Variants (the paper's Table 4), all options of ``MetaLearner``:

    'hyper'          Algorithm 1 (the default).
    'bilevel_train'  D_val = D_tr: E is evaluated on the support sets.
    'approx'         ∇_λ E with w_T held constant: only the direct path through h_λ(X^val).
    'approx_train'   'approx' with D_val = D_tr.
    'classic'        single-level multitask learning: one linear classifier over all C training
                     classes (V Glorot-initialised, c = 0), trained jointly with h_λ by the
                     outer optimizer on CE(h_λ(X) V + c, Y): single-level training, no inner
                     problem; evaluated like the others (new heads per episode).
    'multiclass'     an alias of 'classic' (no separate multiclass baseline is implemented).

Evaluation (``evaluate``) re-initialises the heads of every episode at zero, trains them by T steps
of gradient descent on the support set and reports the query accuracy: the mean over episodes
and the 95% confidence interval 1.96·σ/√n (σ the standard deviation over the n episodes).

References:
    Franceschi, Frasconi, Salzo, Grazzi, Pontil. Bilevel Programming for Hyperparameter
    Optimization and Meta-Learning. ICML 2018, arXiv:1806.04910.
"""

import functools
from typing import Any, Callable, Iterable, Optional

import keras
import numpy as np
import tensorflow as tf

import far_ho2 as far

VARIANTS = ("hyper", "bilevel_train", "approx", "approx_train", "classic", "multiclass")
_ON_SUPPORT = ("bilevel_train", "approx_train")  # D_val = D_tr
_APPROX = ("approx", "approx_train")
_CLASSIC = ("classic", "multiclass")

Features = Callable[[tf.Tensor], tf.Tensor]  # images [B, n, H, W, C] -> features [B, n, d]


# -- pure functions ---------------------------------------------------------------------------------

def episode_features(network: keras.Model, images: tf.Tensor) -> tf.Tensor:
    """h_λ applied to each episode on its own: [B, n, H, W, C] -> [B, n, d].

    ``tf.vectorized_map`` over the episode axis keeps per-episode normalisation statistics (one
    batched convolution per layer, not B of them); the images are cast to the network's dtype.
    """
    dtype = network.trainable_variables[0].dtype  # the computation may be in half precision
    return tf.cast(tf.vectorized_map(network, tf.cast(images, dtype)), dtype)


def pixel_features(images: tf.Tensor) -> tf.Tensor:
    """The raw-pixel representation (a baseline): [B, n, H, W, C] -> [B, n, H·W·C]."""
    shape = tf.shape(images)
    return tf.reshape(images, tf.concat([shape[:2], [-1]], 0))


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


def fit_heads(features: tf.Tensor, labels: tf.Tensor, *, ways: int, steps: int,
              learning_rate: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """B logistic heads from zero by T steps of gradient descent on their mean cross-entropy:

        G_t = (softmax(X W_t + b_t) − onehot(Y)) / n
        W_{t+1} = W_t − η Xᵀ G_t,     b_{t+1} = b_t − η 1ᵀ G_t,     W_0 = 0, b_0 = 0

    (the closed-form gradient of ``episode_cross_entropy``; the same dynamics as the inner problem
    of meta-training). Cost O(T·B·n·d·N).

    Args:
        features: X, [B, n, d].
        labels: Y, [B, n] ints in 0 … N−1.
        ways: N.
        steps: T.
        learning_rate: η, a number or scalar tensor.

    Returns:
        (W_T [B, d, N], b_T [B, N]).
    """
    dtype = features.dtype
    onehot = tf.one_hot(tf.cast(labels, tf.int32), ways, dtype=dtype)
    n = tf.cast(tf.shape(features)[1], dtype)
    eta = tf.cast(tf.convert_to_tensor(learning_rate, dtype_hint=dtype), dtype)  # no float32 detour
    batch, dim = tf.shape(features)[0], tf.shape(features)[2]
    weights, bias = tf.zeros(tf.stack([batch, dim, ways]), dtype), tf.zeros(tf.stack([batch, ways]), dtype)
    for _ in range(steps):
        g = (tf.nn.softmax(head_logits(weights, bias, features)) - onehot) / n
        weights = weights - eta * tf.einsum("bnd,bnk->bdk", features, g)
        bias = bias - eta * tf.reduce_sum(g, axis=1)
    return weights, bias


def mean_and_ci(accuracies: Iterable[float]) -> tuple[float, float]:
    """(mean, 95% confidence half-width) of per-episode accuracies:  m = mean(a),
    ci = 1.96·σ/√n  with σ = √(mean((a − m)²)) (the population standard deviation)."""
    a = np.asarray(list(accuracies), np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"`accuracies` must be a non-empty list of numbers, got shape {a.shape}.")
    return float(a.mean()), float(1.96 * a.std() / np.sqrt(a.size))


@functools.lru_cache(maxsize=16)
def _compiled_accuracies(features: Features, ways: int, steps: int) -> Callable:
    """The compiled per-episode query accuracies of a batch of episodes (kept, so that repeated
    evaluations do not retrace)."""
    @tf.function(reduce_retracing=True)
    def accuracies(support_x, support_y, query_x, query_y, learning_rate):
        weights, bias = fit_heads(features(support_x), support_y, ways=ways, steps=steps,
                                  learning_rate=learning_rate)
        return episode_accuracy(head_logits(weights, bias, features(query_x)), query_y)
    return accuracies


def evaluate(features: Features, episodes: Iterable, *, ways: int, steps: int,
             learning_rate: Any) -> tuple[float, float]:
    """Mean query accuracy and its 95% CI over episodes, heads re-initialised per episode.

    Each episode's head is trained from zero by T steps of GD on its support features
    (``fit_heads``), then scored on its query set.

    Args:
        features: images [B, n, H, W, C] -> features [B, n, d] (``episode_features`` of a
            network, or ``pixel_features``).
        episodes: batches of ``Episode`` (e.g. ``data.evaluation_episodes(..., meta_batch_size=50)``).
        ways, steps, learning_rate: N, T and η of the heads.

    Returns:
        ``mean_and_ci`` of the per-episode accuracies.
    """
    compiled = _compiled_accuracies(features, ways, steps)
    learning_rate = tf.convert_to_tensor(learning_rate, dtype_hint=tf.float64)  # no retracing per value
    accuracies = [compiled(*episode[:4], learning_rate).numpy() for episode in episodes]
    if not accuracies:
        raise ValueError("`episodes` is empty.")
    return mean_and_ci(np.concatenate(accuracies))


class _CompiledUpdate:
    """A Keras optimizer's ``apply_gradients`` on fixed variables, compiled once (eager Keras
    Adam costs ~50 ms per call on the 8 variables of the Omniglot network, a compiled call ~1 ms),
    for the variants whose update does not go through ``far.HyperOptimizer`` (which compiles its
    own)."""

    def __init__(self, optimizer: keras.optimizers.Optimizer, variables: list):
        self._variables = list(variables)
        self._apply = tf.function(lambda grads: optimizer.apply_gradients(zip(grads, self._variables)))

    def apply_gradients(self, grads_and_vars: Iterable) -> None:
        by_variable = {id(v): g for g, v in grads_and_vars}
        self._apply([by_variable[id(v)] for v in self._variables])


# -- the façade ---------------------------------------------------------------------------------------

class MetaLearner:
    """Meta-trains the representation ``network`` on meta-batches of episodes (Algorithm 1).

    Args:
        network: h_λ, a Keras model images -> features [n, d]; its trainable variables are λ.
        ways: N, classes per episode.
        meta_batch_size: B, episodes per hyper-iteration.
        steps: T, gradient-descent steps of the heads (meta-training and, by default, evaluation).
        learning_rate: η, the heads' learning rate (its initial value if learned). Defaults to `0.1`.
        learn_lr: make η a hyperparameter (``far.get_hyperparameter('lr', η)``, kept ≥ 1e-6).
            Defaults to `False`.
        meta_lr: the outer Adam's learning rate. Defaults to `1e-3`.
        meta_lr_decay: inverse-time decay, meta_lr / (1 + decay·iteration). Defaults to `1e-5`.
        clip: clip every hypergradient entry to [−clip, clip]. Defaults to `None` (no clipping).
        variant: one of ``VARIANTS`` (see the module docstring). Defaults to `'hyper'`.
        num_classes: C, the training classes ('classic' and 'multiclass' only).

    Raises:
        ValueError: for an unknown `variant`, a non-positive size, `learn_lr` with an 'approx'
            or 'classic' variant (η would get no gradient), or `num_classes` missing or given
            to a bilevel variant.
    """

    def __init__(self, network: keras.Model, *, ways: int, meta_batch_size: int, steps: int,
                 learning_rate: float = 0.1, learn_lr: bool = False, meta_lr: float = 1e-3,
                 meta_lr_decay: float = 1e-5, clip: Optional[float] = None, variant: str = "hyper",
                 num_classes: Optional[int] = None):
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
        for name, value in (("ways", ways), ("meta_batch_size", meta_batch_size), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if learn_lr and variant not in ("hyper", "bilevel_train"):
            raise ValueError(f"`learn_lr=True` needs the inner dynamics, which variant {variant!r} "
                             f"ignores; use variant 'hyper' or 'bilevel_train', or learn_lr=False.")
        if (variant in _CLASSIC) != (num_classes is not None):
            raise ValueError(f"`num_classes` is required by 'classic'/'multiclass' and only by them; "
                             f"got num_classes={num_classes!r} with variant {variant!r}.")
        if clip is not None and not clip > 0:
            raise ValueError(f"`clip` must be positive or None, got {clip!r}.")
        self.network, self.ways, self.steps, self.variant = network, int(ways), int(steps), variant
        self.meta_batch_size = int(meta_batch_size)
        dtype = self.heads_dtype = network.trainable_variables[0].dtype
        dim = network.output_shape[-1]
        self.learning_rate = (far.get_hyperparameter("lr", np.asarray(learning_rate, dtype),
                                                     constraint=lambda v: tf.maximum(v, 1e-6))
                              if learn_lr else tf.constant(learning_rate, dtype))
        schedule = keras.optimizers.schedules.InverseTimeDecay(meta_lr, decay_steps=1,
                                                               decay_rate=meta_lr_decay)
        self.optimizer = keras.optimizers.Adam(schedule)
        self._process = (lambda g: tf.clip_by_value(g, -clip, clip)) if clip is not None else None
        self.hypers = list(network.trainable_variables) + ([self.learning_rate] if learn_lr else [])
        glorot = keras.initializers.GlorotUniform(seed=0)  # zeros would stall h_λ's first step
        self.classifier = ([tf.Variable(glorot((dim, num_classes), dtype), name="classifier_w"),
                            tf.Variable(tf.zeros((num_classes,), dtype), name="classifier_b")]
                           if variant in _CLASSIC else [])
        self.hypers += self.classifier
        self.optimizer.build(self.hypers)  # slots exist before a checkpoint restores them
        self._update = _CompiledUpdate(self.optimizer, self.hypers)
        if variant in _CLASSIC:
            self._gradients = tf.function(self._classic_gradients)
        elif variant in _APPROX:
            self._gradients = tf.function(self._approx_gradients)
        else:
            self.heads = [tf.Variable(tf.zeros((meta_batch_size, dim, ways), dtype), name="heads_w"),
                          tf.Variable(tf.zeros((meta_batch_size, ways), dtype), name="heads_b")]
            self._hyper_optimizer = far.HyperOptimizer(far.ReverseHG())
            self._run = self._hyper_optimizer.minimize(
                self._outer_loss, self.optimizer, self._inner_loss,
                far.GradientDescentOptimizer(self.learning_rate), hyper_list=self.hypers,
                var_list=self.heads, process_fn=self._process, features=self._support_features)

    # -- objectives of the bilevel variants (read the head variables) ----------------------------

    def _support_features(self, batch):
        images, labels = batch
        return episode_features(self.network, images), labels

    def _inner_loss(self, inputs):  # Σ_j L_j: far sums the vector
        features, labels = inputs
        return episode_cross_entropy(head_logits(*self.heads, features), labels)

    def _outer_loss(self, batch):
        images, labels = batch
        logits = head_logits(*self.heads, episode_features(self.network, images))
        return tf.reduce_mean(episode_cross_entropy(logits, labels))

    def _split(self, episode) -> tuple[tuple, tuple]:
        """(D_tr, D_val) of a meta-batch: (support, query), or (support, support)."""
        support = (episode[0], episode[1])
        return support, (support if self.variant in _ON_SUPPORT else (episode[2], episode[3]))

    # -- gradients of the other variants (pure in the episode) ---------------------------------

    def _approx_gradients(self, support_x, support_y, outer_x, outer_y):
        """∂E/∂λ at fixed w_T = fit_heads(h_λ(X^tr)): the inner dynamics are ignored."""
        features = tf.stop_gradient(episode_features(self.network, support_x))
        heads = fit_heads(features, support_y, ways=self.ways, steps=self.steps,
                          learning_rate=self.learning_rate)
        with tf.GradientTape() as tape:
            logits = head_logits(*heads, episode_features(self.network, outer_x))
            loss = tf.reduce_mean(episode_cross_entropy(logits, outer_y))
        return loss, tape.gradient(loss, self.hypers)

    def _classic_gradients(self, images, labels):
        """∇ of CE(h_λ(X) V + c, Y) over one batch of training images with global labels."""
        with tf.GradientTape() as tape:
            features = self.network(tf.cast(images, self.classifier[0].dtype))
            logits = features @ self.classifier[0] + self.classifier[1]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.cast(labels, tf.int32), logits))
        return loss, tape.gradient(loss, self.hypers)

    # -- public ---------------------------------------------------------------------------------

    def hypergradients(self, batch) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """(E, ∇_λ E) for one meta-batch, clipped if `clip`; λ is not updated. ``batch`` is an
        ``Episode`` with a leading [B] axis, or (images, labels) for 'classic'."""
        if self.variant in _CLASSIC:
            loss, grads = self._gradients(*batch)
        elif self.variant in _APPROX:
            support, outer = self._split(batch)
            loss, grads = self._gradients(*support, *outer)
        else:
            support, outer = self._split(batch)
            loss = self._run(self.steps, support, outer, _skip_hyper_ts=True)
            by_variable = {id(v): g for g, v in self._hyper_optimizer.hypergradients()}
            return loss, [by_variable[id(v)] for v in self.hypers]
        if self._process is not None:
            grads = [self._process(g) for g in grads]
        return loss, grads

    def meta_step(self, batch) -> float:
        """One hyper-iteration: the hypergradient of one meta-batch, then an outer Adam step.
        Returns the outer loss before the update."""
        if self.variant in _CLASSIC or self.variant in _APPROX:
            loss, grads = self.hypergradients(batch)
            self._update.apply_gradients(zip(grads, self.hypers))
            return float(loss)
        support, outer = self._split(batch)
        return float(self._run(self.steps, support, outer))

    def features(self, images: tf.Tensor) -> tf.Tensor:
        """h_λ of each episode: [B, n, H, W, C] -> [B, n, d]."""
        return episode_features(self.network, images)

    def evaluate(self, episodes: Iterable, *, ways: Optional[int] = None, steps: Optional[int] = None,
                 learning_rate: Optional[float] = None) -> tuple[float, float]:
        """``evaluate`` with this representation; N, T and η default to the meta-training ones."""
        eta = self.learning_rate if learning_rate is None else learning_rate
        return evaluate(self.features, episodes, ways=ways or self.ways, steps=steps or self.steps,
                        learning_rate=tf.convert_to_tensor(eta, self.heads_dtype))
