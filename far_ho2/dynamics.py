"""Differentiable inner-optimizer dynamics Φ, as pure functions.

An inner optimizer is a pair ``Dynamics(init, step)``, like ``optax.GradientTransformation``:

    s_0 = init(w_0),        s_{t+1} = step(s_t, ∇_w L_t(w_t, λ), params)

where the state ``s`` holds the weights ``w`` (always the first field) and the optimizer's slots.
``params`` is a NamedTuple of tensors, the optimizer's own parameters (learning rate, momentum,
...). Any of them may be a function of the hyperparameters λ, so ``step`` is differentiable in
``s``, the gradients and ``params``. Dtypes follow the inputs, so float64 works everywhere.
"""

from typing import Callable, NamedTuple

import tensorflow as tf

from far_ho2 import sharding

Tensors = list[tf.Tensor]


class Dynamics(NamedTuple):
    """An inner optimizer as a pure transition: ``init(w0) -> s0``, ``step(s, grads, params) -> s'``."""

    init: Callable[[Tensors], NamedTuple]
    step: Callable[[NamedTuple, Tensors, NamedTuple], NamedTuple]


class GradientDescentState(NamedTuple):
    w: Tensors  # weights


class GradientDescentParams(NamedTuple):
    learning_rate: tf.Tensor  # η


def gradient_descent_step(s: GradientDescentState, grads: Tensors,
                          params: GradientDescentParams) -> GradientDescentState:
    """Gradient descent Φ:  w' = w − η·∇_w L(w, λ)."""
    return GradientDescentState([w - params.learning_rate * g for w, g in zip(s.w, grads)])


def gradient_descent() -> Dynamics:
    """Plain gradient descent; the state is the weights alone."""
    return Dynamics(lambda w0: GradientDescentState(list(w0)), gradient_descent_step)


class MomentumState(NamedTuple):
    w: Tensors  # weights
    m: Tensors  # velocities


class MomentumParams(NamedTuple):
    learning_rate: tf.Tensor  # η
    momentum: tf.Tensor  # μ


def momentum(*, nesterov: bool = False) -> Dynamics:
    """Heavy-ball momentum (FAR-HO's ``MomentumOptimizer``), optionally Nesterov's variant.

        m' = μ·m + ∇_w L(w, λ)
        w' = w − η·m'                      (heavy ball)
        w' = w − η·(∇_w L(w, λ) + μ·m')    (Nesterov)

    With a constant η these are exactly the trajectories of ``keras.optimizers.SGD(η, μ,
    nesterov)``, whose velocity is −η·m.
    """
    def init(w0: Tensors) -> MomentumState:
        return MomentumState(list(w0), [tf.zeros_like(w) for w in w0])

    def step(s: MomentumState, grads: Tensors, params: MomentumParams) -> MomentumState:
        m = [params.momentum * m_i + g for m_i, g in zip(s.m, grads)]
        if nesterov:
            direction = [g + params.momentum * m_i for g, m_i in zip(grads, m)]
        else:
            direction = m
        return MomentumState([w - params.learning_rate * d for w, d in zip(s.w, direction)], m)

    return Dynamics(init, step)


class AdamState(NamedTuple):
    w: Tensors  # weights
    m: Tensors  # first moments
    v: Tensors  # second moments
    beta1_power: tf.Tensor  # β₁ᵗ
    beta2_power: tf.Tensor  # β₂ᵗ


class AdamParams(NamedTuple):
    learning_rate: tf.Tensor  # η
    beta1: tf.Tensor  # β₁
    beta2: tf.Tensor  # β₂
    epsilon: tf.Tensor  # ε


def adam() -> Dynamics:
    """Adam as in FAR-HO: ε inside the square root, the powers βᵗ part of the state.

        m' = β₁·m + (1 − β₁)·g,       v' = β₂·v + (1 − β₂)·g²
        β₁ᵗ' = β₁ᵗ·β₁,  β₂ᵗ' = β₂ᵗ·β₂,  η_t = η·√(1 − β₂ᵗ') / (1 − β₁ᵗ')
        w' = w − η_t·m' / √(v' + ε²)

    Keras (and Kingma & Ba) put ε outside the root, ``m'/(√v' + ε)``; that has an infinite
    derivative ∂w'/∂v' at v' = 0, which makes hypergradients NaN for weights whose gradient is
    zero. Inside the root, ∂w'/∂v' is bounded by 1/(2ε³), so hypergradients stay finite; with
    ε = 0 both forms coincide. The powers start at 1, so their derivative with respect to β₁
    and β₂ is part of the hypergradient.
    """
    def init(w0: Tensors) -> AdamState:
        zeros = [tf.zeros_like(w) for w in w0]
        one = tf.ones((), w0[0].dtype)
        return AdamState(list(w0), zeros, list(zeros), one, one)

    def step(s: AdamState, grads: Tensors, params: AdamParams) -> AdamState:
        b1, b2 = params.beta1, params.beta2
        m = [b1 * m_i + (1 - b1) * g for m_i, g in zip(s.m, grads)]
        v = [b2 * v_i + (1 - b2) * g * g for v_i, g in zip(s.v, grads)]
        beta1_power, beta2_power = s.beta1_power * b1, s.beta2_power * b2
        eta_t = params.learning_rate * tf.sqrt(1 - beta2_power) / (1 - beta1_power)
        eps2 = params.epsilon * params.epsilon
        w = [w_i - eta_t * m_i / tf.sqrt(v_i + eps2) for w_i, m_i, v_i in zip(s.w, m, v)]
        return AdamState(w, m, v, beta1_power, beta2_power)

    return Dynamics(init, step)


class LangevinState(NamedTuple):
    w: Tensors  # weights (one sample of the chain)


class LangevinParams(NamedTuple):
    learning_rate: tf.Tensor  # ε, the step size
    temperature: tf.Tensor  # τ
    seed: tf.Tensor  # int64 [2], the stateless seed of this step's noise


def langevin_step(s: LangevinState, grads: Tensors, params: LangevinParams) -> LangevinState:
    """Langevin dynamics Φ (SGLD, Welling & Teh 2011), sampling p(w) ∝ exp(−L(w, λ)/τ):

        w' = w − ε ∇_w L(w, λ) + √(2ετ)·ξ,    ξ ~ N(0, I) drawn from ``params.seed``

    The noise is a pure function of the seed (``tf.random.stateless_normal``, one seed per
    weight tensor folded from it), so recomputing a step reproduces it exactly; it does not
    depend on w or λ, so derivatives through a chain are the pathwise ones for that noise. Under a
    strategy, a replica's rows of a sharded meta-batch draw their slice of the meta-batch's noise
    (``far_ho2.sharding.normal``)."""
    scale = tf.sqrt(2 * params.learning_rate * params.temperature)
    new = []
    for i, (w, g) in enumerate(zip(s.w, grads)):
        noise = sharding.normal(tf.shape(w), tf.random.experimental.stateless_fold_in(params.seed, i), w.dtype)
        new.append(w - params.learning_rate * g + scale * noise)
    return LangevinState(new)


def langevin() -> Dynamics:
    """Stochastic gradient Langevin dynamics; the state is the weights alone."""
    return Dynamics(lambda w0: LangevinState(list(w0)), langevin_step)
