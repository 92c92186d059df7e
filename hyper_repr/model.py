"""The hyper-representation meta-learner as a Keras model (Franceschi et al., ICML 2018, §4).

Each episode j of a meta-batch fits a multinomial logistic head g_{w_j} on the features of a
shared representation h_λ; the representation (and optionally the heads' learning rate η) are the
hyperparameters λ, the model's trainable variables:

    L_j(w_j, λ) = CE(h_λ(X^tr_j) W_j + b_j, Y^tr_j)         inner loss, mean over the support set
                  (+ (γ/2)‖w_j‖² with ``head_l2`` = γ > 0)
    w_{j,t+1} = w_{j,t} − η ∇_w L_j(w_{j,t}, λ),   w_{j,0} = 0,   t = 0 … T−1
    E(λ) = (1/B) Σ_j CE(h_λ(X^val_j) W_{j,T} + b_{j,T}, Y^val_j)    outer loss, over the query sets

``fit`` runs Algorithm 1: each training step is one hyper-iteration on a meta-batch of B episodes
(heads fitted by T steps of gradient descent, the hypergradient ∇_λ E by far_ho2, one update by
the compiled optimizer). The model is a ``far.BilevelModel``: the B episodes are its one inner
problem, posed once, whose variables hold every head on a leading axis (W ∈ R^{B×d×N},
b ∈ R^{B×N}, any B) with objective Σ_j L_j: the heads do not interact, so its hypergradient is
the mean of the episodes' hypergradients. Each training step is ``far_ho2.engine.step``, the step
of ``far.HyperOptimizer.run``: the method's direction, the guard (``far_ho2.guard``: non-finite or
unbounded growth of the heads, E, ∇E, λ or the optimizer's slots, and the method's own test), the
update, the method's own step (BOME's joint step on the heads, the penalty's stage schedule), all
undone in-graph if the step fails; the heads are set to 0 at its start. h_λ of the support sets
is evaluated once per hyper-iteration (far_ho2's ``features=``), so the representation costs one
forward and one backward pass on the support sets and one of each on the query sets.

A failed hyper-iteration changes nothing, logs a NaN loss, warns (``RuntimeWarning``, naming the
hyper-iteration and the part that failed) and stops ``fit`` as ``keras.callbacks.TerminateOnNaN``
would: the epoch ends and is validated, and no error is raised (``far.BilevelModel`` raises
``far.DivergenceError``), so that a launcher still scores and saves the model it has.

``evaluate`` scores episodes: each episode's head is trained from zero by T steps of gradient
descent on its support features (``heads.fit_heads``), then its query set is classified; it
reports the mean accuracy, the mean query cross-entropy, and the 95% confidence interval of the
accuracy over episodes, 1.96·σ/√n (σ the standard deviation over the n episodes).

The network is applied to each episode separately (``heads.episode_features``): its transductive
normalisation uses per-episode statistics, of the support set and of the query set apart.

Under ``tf.distribute`` (the model built in ``strategy.scope()``: ``MirroredStrategy`` for the
GPUs of a machine, ``MultiWorkerMirroredStrategy`` for several machines), ``fit`` splits each
meta-batch across the R replicas (R must divide B): replica r fits the heads of its B/R episodes
(each replica's own variables) and computes their E^(r), ∇E^(r); the optimizer's all-reduce sums
∇E^(r)/R into ∇E, the mean over the B episodes, and applies one update (``train_step``): the
update of one device holding the whole meta-batch. ``evaluate`` splits its episodes the same way
(any split: its metrics sum over the replicas). Langevin heads draw the noise one device would;
'multiclass' normalises each replica's share of its images with that share's statistics.

Variants (the paper's Table 4), the ``variant`` argument:

    'hyper'          Algorithm 1 (the default).
    'bilevel_train'  D_val = D_tr: E is evaluated on the support sets.
    'approx'         ∇_λ E with w_T held constant: only the direct path through h_λ(X^val).
    'approx_train'   'approx' with D_val = D_tr.
    'classic'        single-level multitask learning: h_λ and the heads both minimise the
                     training error, the heads by their T steps and h_λ by the gradient of the
                     support-set loss averaged over the heads' iterates, (1/T) Σ_t ∂L(w_t, λ)/∂λ,
                     with the heads held (no dependence of w_t on λ); at T = 1 it is 'approx_train'.
    'multiclass'     one linear classifier over all C training classes (V Glorot-initialised,
                     c = 0), trained jointly with h_λ on CE(h_λ(X) V + c, Y) over batches of
                     training images (``data.image_batches``); no inner problem.

Every variant is evaluated alike (new heads per episode, T gradient steps from zero). The
non-bilevel variants compute their gradient themselves, then take the same guard, update and
in-graph restore as the bilevel ones (``far_ho2.engine.settle``).

References:
    Franceschi, Frasconi, Salzo, Grazzi, Pontil. Bilevel Programming for Hyperparameter
    Optimization and Meta-Learning. ICML 2018, arXiv:1806.04910.
"""

import warnings
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf

import far_ho2 as far
from far_ho2 import engine, sharding
from far_ho2 import inputs as far_inputs
from far_ho2.launch import callbacks
from far_ho2.trajectory import empty_trajectory, run_steps
from far_ho2.types import RunResult
from hyper_repr.data import Episode
from hyper_repr.heads import (episode_accuracy, episode_cross_entropy, episode_features,
                              fit_heads, head_iterates, head_logits, ridge, variable_dtype)

VARIANTS = ("hyper", "bilevel_train", "approx", "approx_train", "classic", "multiclass")
BILEVEL = ("hyper", "bilevel_train")  # the variants that differentiate the heads' dynamics
_ON_SUPPORT = ("bilevel_train", "approx_train")  # D_val = D_tr
_APPROX = ("approx", "approx_train")
_MULTICLASS = ("multiclass",)
MIN_LEARNING_RATE = 1e-6  # a learned η is kept ≥ this


@keras.saving.register_keras_serializable(package="hyper_repr")
class ConfidenceInterval(keras.metrics.Metric):
    """Half-width of the 95% confidence interval of the mean of per-episode values:

        ci = 1.96·σ/√n,     σ² = (1/n) Σ_i a_i² − ((1/n) Σ_i a_i)²

    (σ the population standard deviation of the n values seen), accumulated in float64.
    """

    def __init__(self, name: str = "ci", **kwargs):
        super().__init__(name=name, dtype="float64", **kwargs)
        self.count, self.total, self.total_sq = (
            self.add_variable(shape=(), initializer="zeros", dtype="float64", name=n)
            for n in ("count", "total", "total_sq"))

    def update_state(self, values: Any) -> None:
        values = tf.reshape(tf.cast(values, tf.float64), [-1])
        self.count.assign_add(tf.cast(tf.size(values), tf.float64))
        self.total.assign_add(tf.reduce_sum(values))
        self.total_sq.assign_add(tf.reduce_sum(tf.square(values)))

    def result(self) -> tf.Tensor:
        n = tf.maximum(self.count, 1.0)
        variance = tf.maximum(self.total_sq / n - tf.square(self.total / n), 0.0)
        return 1.96 * tf.sqrt(variance / n)


def _unwrap(data: Any) -> Any:
    """A batch as the dataset gives it: ``fit`` passes the element, ``train_on_batch`` and
    ``test_on_batch`` pass (x, y, sample_weight) with y (for 'multiclass', the labels) and
    sample_weight possibly None."""
    if isinstance(data, tuple) and not isinstance(data, Episode) and len(data) == 3 and data[2] is None:
        return data[0] if data[1] is None else data[:2]
    return data


def _reducible(logs: dict) -> dict:
    """A step's logs as Keras can reduce them over the replicas: with several workers (Keras's
    test: MultiWorkerMirroredStrategy in multi-worker mode), Keras 3 reduces each log by
    ``strategy.reduce("MEAN", v, axis=0)``, which fails for scalars (tensorflow/tensorflow#72388),
    so there they are given as [1] vectors (and come out of the reduction as scalars)."""
    if callbacks.worker_count(tf.distribute.get_strategy()) > 1:
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def _tf_variable(variable: Any) -> tf.Variable:
    """The ``tf.Variable`` that holds a Keras variable (far_ho2's functions watch those)."""
    return variable.value if isinstance(variable, keras.Variable) else variable


# why the training step is not compiled by XLA as a whole
_NO_XLA = ("HyperRepresentation's training step cannot be compiled by XLA (its heads' variables take the size of "
           "each meta-batch; the networks' normalisation is XLA-compiled already)")


def _check_method(method: Any, variant: str, learn_lr: bool, head_l2: float) -> far.HyperGradient:
    """The hypergradient method, or a clear error for one this model cannot run."""
    if method is None:
        return far.ReverseHG()
    if not isinstance(method, far.HyperGradient):
        raise TypeError(f"`hypergradient` must be a far_ho2 method, e.g. far.make_method(name, ...) for a name of "
                        f"{list(far.methods())}; got {type(method).__name__}.")
    if variant not in ("hyper", "bilevel_train"):
        raise ValueError(f"`hypergradient` is used by the bilevel variants 'hyper' and "
                         f"'bilevel_train' only; variant {variant!r} computes its own gradient. "
                         f"Leave `hypergradient=None`.")
    if isinstance(method, far.ForwardHG) or getattr(method, "estimator", None) == "pathwise":
        raise ValueError(f"`hypergradient={method.name}` carries one tangent per scalar hyperparameter (every "
                         f"weight of the network here); use far.ReverseHG(), far.ImplicitHG(), or "
                         f"far.StochasticHG('reversed' or 'score').")
    if getattr(method, "jit_compile", False):
        raise ValueError(f"`hypergradient={method.name}` has jit_compile=True: {_NO_XLA}; use it without jit_compile.")
    if learn_lr and not method.differentiates_dynamics:
        raise ValueError(f"{method.name} differentiates λ where it enters the objectives, not the heads' "
                         f"learning rate η: use learn_lr=False with it.")
    if isinstance(method, far.ImplicitHG) and not head_l2 > 0:
        raise ValueError("far.ImplicitHG solves ∇²_w L q = ∂E/∂w, but without a ridge term the "
                         "heads' Hessian is singular (the softmax is shift-invariant, and an "
                         "episode has fewer support images than features): pass head_l2 > 0.")
    return method


class _Heads:
    """The heads of meta-training, W [B, d, N] and b [B, N] for any B: the variables of far_ho2's
    inner problem, scratch state reset to 0 at every hyper-iteration; under ``tf.distribute``,
    each replica's own (``far.distribute.local_variables``), of its share of the meta-batch. A
    plain object, so that neither Keras nor ``tf.train.Checkpoint`` tracks them."""

    def __init__(self, dim: int, ways: int, dtype: str):
        with far.distribute.local_variables():  # under tf.distribute: each replica's own heads
            self.variables = [tf.Variable(tf.zeros((0,) + shape, dtype), shape=(None,) + shape, name=name)
                              for shape, name in (((dim, ways), "heads_kernel"), ((ways,), "heads_bias"))]


@keras.saving.register_keras_serializable(package="hyper_repr")
class HyperRepresentation(far.BilevelModel):
    """A representation network h_λ meta-trained by hypergradients (see the module docstring).

    ``fit`` takes meta-batches of episodes (``data.episode_dataset(..., meta_batch_size=B)``:
    ``Episode`` tuples with a leading [B] axis), or (images, labels) batches of training images
    for 'multiclass'; ``evaluate`` takes batches of episodes (``data.evaluation_episodes``) and
    returns ``loss`` (query cross-entropy), ``accuracy`` and ``ci``. Calling the model on images
    [n, H, W, C] gives their features h_λ [n, d] (normalised with the statistics of those n
    images). A hyper-iteration that fails the guard updates nothing, reports a NaN loss, warns
    and stops ``fit`` (see the module docstring).

    Args:
        network: h_λ, a Keras model images [n, H, W, C] -> features [n, d]; its trainable
            variables are λ.
        ways: N, classes per meta-training episode (validation and test episodes may have
            another N: it is read from their labels).
        steps: T, gradient-descent steps of the heads in meta-training.
        learning_rate: η, the heads' learning rate (its initial value if learned). Defaults to
            `0.1`.
        learn_lr: make η a hyperparameter, trained with λ and kept ≥ 1e-6. Defaults to `False`.
        variant: one of ``VARIANTS`` (see the module docstring). Defaults to `'hyper'`.
        hypergradient: the far_ho2 method of the bilevel variants: ``far.ReverseHG()``
            (Algorithm 1, the default), ``far.ReverseHG.truncated(K)`` or
            ``far.ReverseHG(checkpoint_every=k)``, ``far.ImplicitHG(...)`` (η fixed; its
            warm start is not used, the episodes change at every hyper-iteration),
            ``far.BOME(...)`` or ``far.Penalty(...)`` (they step from the current heads w_k,
            which here are T gradient steps from 0 on each episode, and take their own step
            after the update: BOME's joint step w ← w − ξ_w d_w moves the heads, which the
            next meta-batch resets; the heads start afresh with every episode, so the penalty's
            multiplier ν is ν₀ at every step (``Penalty.restart``), while its stages advance on
            the meta-batch's statistic ‖G_λ‖² + ‖∇_w h_w‖² < ε²: γ, λ_g, ε and the step sizes
            follow the schedule across meta-batches), or
            ``far.StochasticHG('reversed' or 'score')`` (Langevin heads, see ``temperature``).
        num_classes: C, the training classes ('multiclass' only).
        head_l2: γ, the ridge penalty (γ/2)(‖W_j‖² + ‖b_j‖²) of the heads, in meta-training and
            evaluation. Defaults to `0.0` (the paper's heads); ImplicitHG needs γ > 0.
        clip: clip every hypergradient entry to [−clip, clip]. Defaults to `None`.
        test_steps: T of ``evaluate``. Defaults to `None` (``steps``); settable later.
        temperature: τ of the Langevin heads of ``far.StochasticHG`` (their T meta-training steps
            are SGLD, w' = w − η∇L + √(2ητ)ξ, a new noise sequence at every hyper-iteration:
            run k of ``far.SGLDOptimizer`` at hyper-iteration k; under a strategy each replica
            draws its episodes' rows of the meta-batch's noise, as one device would;
            evaluation stays gradient descent). Required with
            StochasticHG, and only with it.
        name: the model's name. Defaults to `"hyper_representation"`.

    Raises:
        ValueError: for an unknown `variant`, a non-positive size, `learn_lr` with an 'approx'
            or 'multiclass' variant or with ImplicitHG (η would get no gradient), `num_classes`
            missing or given to a bilevel variant, or a method this model cannot run.

    Example:
        model = HyperRepresentation(build_network("omniglot"), ways=5, steps=5, learn_lr=True)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        model.fit(train_episodes, steps_per_epoch=500, epochs=10, validation_data=val_episodes)
        model.evaluate(test_episodes, return_dict=True)  # {'accuracy': …, 'ci': …, 'loss': …}

        with tf.distribute.MirroredStrategy().scope():  # the same on every GPU of the machine
            model = HyperRepresentation(build_network("omniglot"), ways=5, steps=5)
            model.compile(optimizer=keras.optimizers.Adam(1e-3))
        model.fit(train_episodes, steps_per_epoch=500)  # meta-batches of B: B/R per replica
    """

    def __init__(self, network: keras.Model, *, ways: int, steps: int, learning_rate: float = 0.1,
                 learn_lr: bool = False, variant: str = "hyper",
                 hypergradient: Optional[far.HyperGradient] = None,
                 num_classes: Optional[int] = None, head_l2: float = 0.0,
                 clip: Optional[float] = None, test_steps: Optional[int] = None,
                 temperature: Optional[float] = None, name: str = "hyper_representation", **kwargs):
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
        for argument, value in (("ways", ways), ("steps", steps), ("test_steps", test_steps or 1),
                                ("num_classes", num_classes or 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{argument}` must be a positive int, got {value!r}.")
        if learn_lr and variant not in ("hyper", "bilevel_train"):
            raise ValueError(f"`learn_lr=True` needs the inner dynamics, which variant {variant!r} "
                             f"ignores; use variant 'hyper' or 'bilevel_train', or learn_lr=False.")
        if (variant in _MULTICLASS) != (num_classes is not None):
            raise ValueError(f"`num_classes` is required by 'multiclass' and only by it; "
                             f"got num_classes={num_classes!r} with variant {variant!r}.")
        if clip is not None and not clip > 0:
            raise ValueError(f"`clip` must be positive or None, got {clip!r}.")
        for argument, value in (("learning_rate", learning_rate), ("head_l2", head_l2)):
            if not value >= 0:
                raise ValueError(f"`{argument}` must be non-negative, got {value!r}.")
        method = _check_method(hypergradient, variant, learn_lr, head_l2)
        stochastic = isinstance(method, far.StochasticHG)
        if stochastic != (temperature is not None) or (stochastic and not temperature > 0):
            raise ValueError(f"`temperature` (τ > 0) goes with hypergradient=far.StochasticHG(...) and only with it; "
                             f"got temperature={temperature!r} with {method.name}.")
        dtype, dim = variable_dtype(network), network.output_shape[-1]
        # λ, created before the model so that the heads' problem can be posed with them
        eta = keras.Variable(learning_rate, shape=(), dtype=dtype, trainable=bool(learn_lr), name="learning_rate")
        if learn_lr:
            eta.constraint = lambda value: keras.ops.maximum(value, MIN_LEARNING_RATE)
        classifier = [] if variant not in _MULTICLASS else [  # zeros would stall h_λ's first step
            keras.Variable(keras.initializers.GlorotUniform(seed=0), shape=(dim, num_classes), dtype=dtype,
                           name="classifier_kernel"),
            keras.Variable(keras.initializers.Zeros(), shape=(num_classes,), dtype=dtype, name="classifier_bias")]
        heads_state = _Heads(dim, int(ways), dtype)
        heads = heads_state.variables
        if temperature is None:
            optimizer = far.GradientDescentOptimizer(_tf_variable(eta))
        else:  # Langevin heads: its run counter is each replica's scratch state, like the heads
            with far.distribute.local_variables():
                optimizer = far.SGLDOptimizer(_tf_variable(eta), temperature=float(temperature), seed=0)

        def outer_objective(batch: tuple) -> tf.Tensor:
            return tf.reduce_mean(episode_cross_entropy(head_logits(*heads, episode_features(network, batch[0])),
                                                        batch[1]))

        def inner_objective(inputs: tuple) -> tf.Tensor:  # without γ, no ridge operations in the T steps
            loss = episode_cross_entropy(head_logits(*heads, inputs[0]), inputs[1])
            return loss + ridge(*heads, head_l2) if head_l2 else loss
        hypers = ([eta] if learn_lr else []) + classifier + list(network.trainable_variables)
        super().__init__(
            inner_objective, outer_objective, optimizer, steps=int(steps), hypergradient=method, inner_variables=heads,
            hyperparameters=hypers or None,  # none: a fixed network (e.g. raw pixels), evaluated only
            init_dynamics_dict=[(h, lambda h=h: tf.zeros_like(h)) for h in heads],
            features=lambda batch: (episode_features(network, batch[0]), batch[1]), name=name, dtype=dtype, **kwargs)
        if hypers:
            self.method.resolve_as_given()  # the heads and λ are given; _check_method checked the method
        self.network, self.variant, self.clip, self.head_l2 = network, variant, clip, float(head_l2)
        self.ways, self.num_classes = int(ways), num_classes
        self.learn_lr, self._initial_learning_rate = bool(learn_lr), float(learning_rate)
        self.temperature = None if temperature is None else float(temperature)
        self._test_steps = int(test_steps or steps)
        self.learning_rate = eta
        if classifier:
            self.classifier_kernel, self.classifier_bias = classifier
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy", dtype="float64")
        self.ci_tracker = ConfidenceInterval(name="ci")
        self._heads = heads_state
        if self.temperature is not None:  # not tracked: its run counter is scratch state too
            self.__dict__["_langevin"] = optimizer
        self.built = True  # every variable exists (the heads are scratch state, see _Heads)

    # -- Keras ----------------------------------------------------------------------------------

    @property
    def metrics(self) -> list:
        return [self.loss_tracker, self.accuracy_tracker, self.ci_tracker]

    @property
    def hypergradient(self) -> far.HyperGradient:
        """The far_ho2 method of the bilevel variants (``far.BilevelModel.method``)."""
        return self.method

    @property
    def test_steps(self) -> int:
        """T of ``evaluate``; setting it retraces the evaluation."""
        return self._test_steps

    @test_steps.setter
    def test_steps(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`test_steps` must be a positive int, got {value!r}.")
        self._test_steps, self.test_function = int(value), None

    def compile(self, optimizer: Any = "adam", *, jit_compile: Any = False, **kwargs) -> None:
        """``keras.Model.compile`` (no loss: the model has its own) without XLA: ``jit_compile``
        may be `False` or `"auto"` (both mean `False`), `True` raises a ValueError (the step's
        heads take each meta-batch's size; the networks' normalisation is compiled by XLA already).
        The optimizer is built and the guard fixed here: every variable exists already."""
        if jit_compile not in (False, "auto", None):
            raise ValueError(f"`jit_compile={jit_compile!r}`: {_NO_XLA}; use jit_compile=False.")
        super().compile(optimizer=optimizer, jit_compile=False, **kwargs)
        if self.trainable_variables:
            self.optimizer.build(self.trainable_variables)  # before tracing: one trace, not two
            self._resolve(lambda: None)

    def fit(self, x: Any = None, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        """``far.BilevelModel.fit``; a clear error for a network without trainable variables and,
        under a strategy of R replicas, for meta-batches of ``x`` that R does not divide (see
        ``train_step``)."""
        if not self.trainable_variables:
            raise ValueError(f"{self.name}.fit: the network has no trainable variables (λ), so there is nothing "
                             f"to meta-train; `evaluate` it as it is.")
        if isinstance(x, tf.data.Dataset):
            size = tf.nest.flatten(x.element_spec)[0].shape[0]
            if size is not None:
                far.distribute.replica_batch_size(size, self.distribute_strategy, "`x`: the meta-batch size")
        return super().fit(x, *args, **kwargs)

    def evaluate(self, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``keras.Model.evaluate`` on batches of episodes (``test_step``: new heads by
        ``fit_heads``; nothing of far.BilevelModel's inner problem to set up)."""
        return keras.Model.evaluate(self, x, *args, **kwargs)

    def compile_from_config(self, config: dict) -> None:
        """Compiles as the saved model was (``load_model`` calls it; Keras's own skips models
        that override ``compile``)."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    def call(self, images: Any, training: bool = False) -> tf.Tensor:
        """h_λ: images [n, H, W, C] -> features [n, d] (normalised with these n images'
        statistics)."""
        return self.network(images)

    def get_config(self) -> dict:
        return {"name": self.name, "network": keras.saving.serialize_keras_object(self.network),
                "ways": self.ways, "steps": self.steps, "learning_rate": self._initial_learning_rate,
                "learn_lr": self.learn_lr, "variant": self.variant,
                "hypergradient": (self.hypergradient.get_config()
                                  if self.variant in ("hyper", "bilevel_train") else None),
                "num_classes": self.num_classes, "head_l2": self.head_l2, "clip": self.clip,
                "test_steps": self.test_steps, "temperature": self.temperature}

    @classmethod
    def from_config(cls, config: dict) -> "HyperRepresentation":
        config = dict(config)
        network = keras.saving.deserialize_keras_object(config.pop("network"))
        method = config.pop("hypergradient")
        return cls(network, hypergradient=method and far.from_config(method), **config)

    # -- one hyper-iteration ----------------------------------------------------------------------

    @tf.autograph.experimental.do_not_convert  # far_ho2's code is written for tracing as is
    def hypergradients(self, batch: Any) -> tuple[tf.Tensor, list, tf.Tensor]:
        """(E, ∇E, healthy) on one meta-batch, on one device: the outer loss, its gradient with
        respect to each of ``trainable_variables`` (clipped if ``clip``), and whether the guard's
        tests of the run pass (E, ∇E and the heads' states finite and bounded, the method's own
        test); only the heads' scratch state changes. ``batch`` is an ``Episode`` with a leading
        [B] axis (for 'multiclass', (images, labels)). ``train_step`` computes the same on each
        replica's share of the meta-batch and clips the meta-batch's ∇E."""
        result = self._directions(_unwrap(batch))
        grads = [tf.zeros_like(h) if g is None else g for g, h in zip(result.grads, self.trainable_variables)]
        return result.value, self._clipped(grads), engine.result_healthy(self.method, result)

    def _clipped(self, grads: list) -> list:
        """The hypergradients clipped to [−clip, clip] (as they are without ``clip``)."""
        if self.clip is None:
            return grads
        return [tf.clip_by_value(g, -self.clip, self.clip) for g in grads]

    def _outer_pairs(self, pairs: list) -> list:
        """With ``clip``, clip(∇E)/R for each of the R replicas: ∇E = Σ_r ∇E^(r)/R is summed
        here first (clipping is not linear), and the optimizer's all-reduce sums the terms."""
        if self.clip is None:
            return pairs
        replicas = sharding.replicas()
        total = self._clipped(sharding.total([g for g, _ in pairs]))
        return [(g / replicas, v) for g, (_, v) in zip(total, pairs)]

    def _batches(self, data: Any) -> tuple[tuple, tuple]:
        """(support sets, outer sets) of a meta-batch of episodes."""
        episode = Episode(*data)
        support = (episode.support_x, episode.support_y)
        return support, support if self.variant in _ON_SUPPORT else (episode.query_x, episode.query_y)

    def _prepare_step(self, data: Any) -> tuple[tuple, tuple]:
        """The heads set up for a meta-batch of B episodes: W = 0, b = 0 (Φ₀) of size B, the
        method restarted (``HyperGradient.restart``: the penalty's ν ← ν₀); for a persistent
        method (BOME, the penalty), which steps from the current heads w_k, w_k = T gradient
        steps from 0:  w_{t+1} = w_t − η∇L(w_t, λ)."""
        support, outer = self._batches(data)
        problem = self._problem
        for h in problem.var_list:
            h.assign(tf.zeros(tf.concat([tf.shape(support[0])[:1], h.shape[1:]], 0), h.dtype))
        self.method.restart()
        if self.method.persistent:
            inputs = far_inputs.prepare(problem, far.Batches(support, per_step=False), [])
            warm = run_steps(problem, empty_trajectory(problem.current_state(), self.steps), inputs.at, 0, self.steps)
            problem.load(warm.final.w)
        return support, outer

    def _directions(self, data: Any) -> RunResult:
        """The meta-batch's result at the current λ (nothing of λ updated): the method's through
        the heads' T steps (bilevel variants), else the variant's gradient (``engine.plain_result``)."""
        if self.variant in BILEVEL:
            support, outer = self._prepare_step(data)
            optimizer = getattr(self, "optimizer", None)
            return engine.directions(
                self.method, steps=self.method._steps(self.steps), inner_data=support, per_step=False,
                outer_data=outer, previous=None, online=False, offset=tf.constant(0),
                options=self.method._options(0 if optimizer is None else optimizer.iterations))[0]
        if self.variant in _MULTICLASS:
            return engine.plain_result(*self._multiclass_gradients(*data))
        gradients = self._classic_gradients if self.variant == "classic" else self._approx_gradients
        return engine.plain_result(*gradients(*self._batches(data)))

    @tf.autograph.experimental.do_not_convert
    def train_step(self, data: Any) -> dict:
        """One hyper-iteration of Algorithm 1 (see ``far.BilevelModel``): for the bilevel variants
        ``far_ho2.engine.step`` (the heads set up by ``_prepare_step``), for the others their
        gradient on the same guard, update and restore (``engine.settle``). A failed step changes
        nothing and logs a NaN loss (see ``_diverged``).

        Under ``tf.distribute`` (the model built under ``strategy.scope()``), ``fit`` gives each
        of the R replicas B/R of the B episodes (images for 'multiclass') of a meta-batch; their
        ∇E^(r)/R are summed by the optimizer's all-reduce into ∇E, the mean over the B episodes:
        the update is that of one device with the whole meta-batch."""
        data = _unwrap(data)
        if self.variant in BILEVEL:
            logs = super().train_step(data)
        else:
            arguments = self._step_arguments()
            before = [tf.identity(v) for v in arguments["guarded"]]
            logs = self._logs(engine.settle(self.method, [self._directions(data)], before, **arguments))
        if self.learn_lr:
            logs["eta"] = tf.convert_to_tensor(self.learning_rate)
        return _reducible(logs)

    def _diverged(self, phase: int) -> None:
        """After a failed hyper-iteration, which changed nothing (the loss logged is NaN): a
        ``RuntimeWarning`` that says so and where, and ``fit`` stops, as
        ``keras.callbacks.TerminateOnNaN`` would (the epoch ends and is validated; no error, so
        that a launcher still scores the model it has)."""
        self.stop_training = True
        warnings.warn(self._failure(phase), RuntimeWarning, stacklevel=2)

    @tf.autograph.experimental.do_not_convert
    def test_step(self, data: Any) -> dict:
        """Scores a batch of episodes: new heads, ``test_steps`` GD steps, query predictions."""
        episode = Episode(*_unwrap(data))
        support = episode_features(self.network, episode.support_x)
        # labels are 0 … N−1, each in the support set; ≥ 1 for a replica's empty share of a last batch
        ways = tf.maximum(tf.reduce_max(episode.support_y) + 1, 1)
        weights, bias = fit_heads(support, episode.support_y, ways=ways, steps=self.test_steps,
                                  learning_rate=self.learning_rate, l2=self.head_l2)
        logits = head_logits(weights, bias, episode_features(self.network, episode.query_x))
        accuracies = episode_accuracy(logits, episode.query_y)
        self.loss_tracker.update_state(episode_cross_entropy(logits, episode.query_y))
        self.accuracy_tracker.update_state(accuracies)
        self.ci_tracker.update_state(accuracies)
        return _reducible({m.name: m.result() for m in self.metrics})

    # -- the gradients of the other variants ---------------------------------------------------------

    def _approx_gradients(self, support: tuple, outer: tuple) -> tuple[tf.Tensor, list]:
        """∂E/∂λ at fixed w_T = fit_heads(h_λ(X^tr)): the inner dynamics are ignored."""
        features = tf.stop_gradient(episode_features(self.network, support[0]))
        heads = fit_heads(features, support[1], ways=self.ways, steps=self.steps,
                          learning_rate=self.learning_rate, l2=self.head_l2)
        with tf.GradientTape() as tape:
            logits = head_logits(*heads, episode_features(self.network, outer[0]))
            loss = tf.reduce_mean(episode_cross_entropy(logits, outer[1]))
        return loss, tape.gradient(loss, self.trainable_variables)

    def _classic_gradients(self, support: tuple, outer: tuple) -> tuple[tf.Tensor, list]:
        """(1/T) Σ_t ∂L(w_t, λ)/∂λ on the support sets, w_1 … w_T the heads' iterates (held)."""
        images, labels = support
        features = tf.stop_gradient(episode_features(self.network, images))
        iterates = head_iterates(features, labels, ways=self.ways, steps=self.steps,
                                 learning_rate=self.learning_rate, l2=self.head_l2)
        with tf.GradientTape() as tape:
            current = episode_features(self.network, images)
            loss = tf.add_n([tf.reduce_mean(episode_cross_entropy(head_logits(w, b, current), labels))
                             for w, b in iterates]) / self.steps
        return loss, tape.gradient(loss, self.trainable_variables)

    def _multiclass_gradients(self, images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, list]:
        """∇ of CE(h_λ(X) V + c, Y) over one batch of training images with their class numbers."""
        with tf.GradientTape() as tape:
            features = self.network(tf.cast(images, self.compute_dtype))
            logits = (tf.cast(features, self.classifier_kernel.dtype) @ self.classifier_kernel
                      + self.classifier_bias)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.cast(labels, tf.int32), logits))
        return loss, tape.gradient(loss, self.trainable_variables)
