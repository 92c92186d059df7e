"""BOME, "Bilevel Optimization Made Easy" (Liu, Ye, Wright, Stone, Liu; NeurIPS 2022): a first-order
method on the value-function reformulation  min_{λ,w} f(λ, w)  s.t.  q(λ, w) = g(λ, w) − g*(λ) ≤ 0,
solved by the dynamic-barrier gradient method: ``bome_direction`` and its façade ``BOME``.

No second derivatives and no stored trajectory: per iteration T gradients of g for ŵ, two more of
g and one of f. It needs no unique lower-level minimizer (it is defined where the implicit
function theorem is not), and it updates the inner variables w itself: they are kept across runs
(warm-started), not reset to Φ₀.
"""

import copy
from typing import Any, Callable, NamedTuple, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from far_ho2 import autodiff
from far_ho2 import batches as batching
from far_ho2 import inputs as inputs_lib
from far_ho2 import sharding
from far_ho2.batches import Batches
from far_ho2.hypergradients.base import HyperGradient
from far_ho2.hyperparameters import describe_all
from far_ho2.inner_problem import InnerProblem
from far_ho2.registry import Setting
from far_ho2.trajectory import empty_trajectory, run_steps
from far_ho2.types import RunResult

PHI_RULES = ("grad_norm", "value")
ZERO_BARRIER_LIMIT = 3  # iterations in a row with ∇q̂ = 0 while ∇f ≠ 0 before the error
DIAGNOSTICS = ("mu", "q", "phi", "grad_q_norm", "grad_f_norm", "grad_dot", "barrier")


class BOMECarry(NamedTuple):
    """One iteration's barrier, for the joint step and the diagnostics."""

    mu: tf.Tensor  # μ_k, the barrier's multiplier
    q: tf.Tensor  # q̂_k = g(λ, w_k) − g(λ, ŵ_k)
    phi: tf.Tensor  # φ_k, the decrease the barrier enforces
    grad_q_norm: tf.Tensor  # ‖∇q̂_k‖ over (λ, w)
    grad_f_norm: tf.Tensor  # ‖∇f‖ over (λ, w)
    grad_dot: tf.Tensor  # ⟨∇f, ∇q̂_k⟩
    barrier: tf.Tensor  # ⟨d, ∇q̂_k⟩ = ⟨∇f, ∇q̂_k⟩ + μ_k ‖∇q̂_k‖², at least φ_k (up to δ)
    inner_direction: list  # d_w = ∇_w f + μ_k ∇_w q̂, per inner variable
    outer_at_w: tf.Tensor  # f(λ_k, w_k), the outer objective at the method's own w


def _add(a: Optional[tf.Tensor], b: Optional[tf.Tensor], scale: tf.Tensor = None) -> Optional[tf.Tensor]:
    """a + scale·b, with None as zero (None if both are)."""
    if b is not None and scale is not None:
        b = scale * tf.convert_to_tensor(b)
    if a is None:
        return None if b is None else tf.convert_to_tensor(b)
    return tf.convert_to_tensor(a) if b is None else tf.convert_to_tensor(a) + b


def _dot(a: Sequence[Optional[tf.Tensor]], b: Sequence[Optional[tf.Tensor]], dtype: tf.DType) -> tf.Tensor:
    return tf.add_n([tf.zeros((), dtype)] + [tf.reduce_sum(x * y) for x, y in zip(a, b)
                                             if x is not None and y is not None])


def bome_direction(problem: InnerProblem, outer_objective: Callable, hypers: Sequence[tf.Variable], *,
                   steps: Any, inner_batches: Batches, outer_batch: Any = None, eta: Any = 0.5,
                   phi: str = "grad_norm", delta: Any = 1e-8, offset: Any = 0) -> RunResult:
    """One BOME iteration at (λ_k, w_k), w_k the values the inner variables hold:

        ŵ = Φ^T(w_k)   (T steps of the inner optimizer from w_k, not differentiated)
        q̂(λ, w) = g(λ, w) − g(λ, ŵ),    ∇q̂ = (∇_λ g(λ, w_k) − ∇_λ g(λ, ŵ),  ∇_w g(λ, w_k))
        φ = η‖∇q̂‖²  ('grad_norm')    or    φ = η q̂(λ_k, w_k)  ('value')
        μ = max(φ − ⟨∇f, ∇q̂⟩, 0) / (‖∇q̂‖² + δ)
        d = ∇f + μ ∇q̂   (so that ⟨d, ∇q̂⟩ ≥ φ, up to δ)

    with f = E and g = L. As the official code (Cranial-XIX/BOME), the 'grad_norm' rule is
    computed as μ = max(η − ⟨∇f, ∇q̂⟩/(‖∇q̂‖² + δ), 0). The q̂ terms use the batch of the first
    step. The inner variables hold w_k afterwards. The value reported is E at the inner solution
    ŵ, E(λ_k, ŵ): w_k, an optimisation variable of the reformulation, need not solve the lower
    level, and f(λ_k, w_k) (in ``carry.outer_at_w``) is optimistic. On a meta-batch sharded across
    replicas (``far_ho2.sharding``: f = (1/R) Σ_r f^(r), g = Σ_r g^(r)) every replica computes the
    meta-batch's μ and λ direction, and d_w on its own problems.

    ``problem``, ``outer_objective``, ``hypers``, ``steps``, ``inner_batches``, ``outer_batch``
    and ``offset`` are as in ``reverse_hypergradient``.

    Args:
        eta: η, the barrier's strength.
        phi: 'grad_norm' or 'value', the control φ.
        delta: δ, the guard of the denominator.

    Returns:
        ``RunResult``: ``value`` is E(λ_k, ŵ), ``grads`` the λ part of d (None where neither f
        nor g depends on λ), ``carry`` a ``BOMECarry``.

    References:
        Liu, Ye, Wright, Stone, Liu. BOME! Bilevel Optimization Made Easy: A Simple First-Order
        Approach. NeurIPS 2022, arXiv:2209.08709.
    """
    hypers, dtype = list(hypers), problem.dtype
    steps = tf.convert_to_tensor(steps, tf.int32)
    w_k = [v.read_value() for v in problem.var_list]
    inputs = inputs_lib.prepare(problem, inner_batches, [])
    trajectory = run_steps(problem, empty_trajectory(problem.current_state(), steps), inputs.at, 0, steps, offset)

    def g_at_first_batch() -> tf.Tensor:  # λ-dependent features are recomputed under the tape
        return problem.loss(problem.inputs(inner_batches.at(0)))

    value = tf.stop_gradient(batching.scalar_objective(outer_objective, outer_batch))  # E(λ_k, ŵ)
    at_hat = autodiff.value_and_gradients(problem, g_at_first_batch, hypers)  # the variables hold ŵ
    problem.load(w_k)
    at_k = autodiff.value_and_gradients(problem, g_at_first_batch, hypers)
    outer = autodiff.outer_gradient(problem, outer_objective, outer_batch, hypers)
    # the meta-batch's f = E (a mean over the replicas) and q (a sum), under a strategy (far_ho2.sharding)
    replicas = sharding.replicas()
    f_hypers = [None if g is None else g / replicas for g in sharding.total(outer.hypers)]
    f_weights = [g / replicas for g in outer.weights] if replicas > 1 else outer.weights
    q_hypers = sharding.total([_add(a, b, tf.constant(-1, dtype)) for a, b in zip(at_k.hypers, at_hat.hypers)])
    q_weights = at_k.weights
    q = sharding.total(at_k.value - at_hat.value)
    q_norm2 = sharding.squared_norm(q_weights, q_hypers)
    inner = _dot(f_hypers, q_hypers, dtype) + sharding.total(_dot(f_weights, q_weights, dtype))
    eta, delta = tf.cast(eta, dtype), tf.cast(delta, dtype)
    if phi == "grad_norm":
        control = eta * q_norm2
        mu = tf.nn.relu(eta - inner / (q_norm2 + delta))
    else:
        control = eta * q
        mu = tf.nn.relu((control - inner) / (q_norm2 + delta))
    grads = [_add(f, gq, mu) for f, gq in zip(f_hypers, q_hypers)]
    inner_direction = [f + mu * gq for f, gq in zip(f_weights, q_weights)]
    f_norm = tf.sqrt(sharding.squared_norm(f_weights, f_hypers))
    carry = BOMECarry(mu, q, control, tf.sqrt(q_norm2), f_norm, inner, inner + mu * q_norm2, inner_direction,
                      sharding.total(outer.value) / replicas)
    return RunResult(value, grads, problem.current_state(), trajectory.losses.stack(),
                     trajectory.health, carry=carry)


class BOME(HyperGradient):
    """BOME (Liu et al., NeurIPS 2022): each ``run(T, ...)`` is one iteration (see
    ``bome_direction``): T steps of the inner optimizer from the current w give ŵ, then the
    dynamic-barrier direction d = ∇f + μ∇q̂ is applied to λ by the outer optimizer and, by
    the step's ``finish``, to w by a step of its own:

        w ← w − ξ_w d_w        (``inner_learning_rate`` ξ_w), or ``inner_optimizer`` on d_w.

    The inner variables are kept across runs (never reset to Φ₀). ``HyperOptimizer.run``
    returns E(λ, ŵ), E at the inner solution ŵ, not at w (``carry.outer_at_w``). The joint step
    is checked by the guard (``far_ho2.guard``): a step that makes w non-finite or grow without
    bound undoes the hyper-iteration. ``diagnostics`` holds, per inner problem, the last
    iteration's μ, q̂, φ, ‖∇q̂‖ and ‖∇f‖; a warning says when λ's direction has been exactly 0
    for ``STALL_ITERATIONS`` hyper-iterations while w moves (an inactive barrier). With several
    inner problems, each has its own barrier (μ per problem) and their λ directions are averaged.

    Args:
        eta: η, the barrier's strength (0.5 in the official toys). Defaults to `0.5`.
        phi: 'grad_norm' (φ = η‖∇q̂‖², the toys) or 'value' (φ = η q̂, the official
            hyper-cleaning). Defaults to `'grad_norm'`.
        inner_learning_rate: ξ_w, the size of w's step. Defaults to the inner optimizer's
            learning rate (all step sizes are equal in the official toys).
        inner_optimizer: a Keras optimizer for w's step instead (e.g. SGD with momentum 0.9, as
            the official hyper-cleaning). Defaults to `None`.
        delta: δ, the guard of μ's denominator; near a solution the iterates stall at an error
            that shrinks with δ. Defaults to `1e-8` (the official code's).
        name: a name.

    Raises (at ``run``): a ``ValueError`` for a hyperparameter only the optimizer or Φ₀ read
    (BOME differentiates no trajectory), for one with a ``constraint=`` (the barrier is derived
    for an unconstrained step: projected, it can stall where a constraint is active), and when
    ∇q̂ = 0 for ``ZERO_BARRIER_LIMIT`` iterations in a row while ∇f ≠ 0 (a lower-level objective
    constant in w); a ``far.DivergenceError`` naming the iteration and the quantity that stopped
    being finite or grew without bound.

    References:
        Liu, Ye, Wright, Stone, Liu, NeurIPS 2022, arXiv:2209.08709; official code
        github.com/Cranial-XIX/BOME.
    """

    online_modes = ()
    differentiates_dynamics = False
    persistent = True
    unconnected_hint = (" BOME differentiates no inner trajectory: optimizer hyperparameters (learning "
                        "rate, momentum) and the initialisation Φ₀ get no direction; use ReverseHG or "
                        "ForwardHG for them.")

    settings = (
        Setting("eta", float, 0.5, "η, the barrier's strength.", low=0.0),
        Setting("phi", str, "grad_norm", "the control φ (grad_norm: η‖∇q̂‖², value: η·q̂).", choices=PHI_RULES),
        Setting("inner_learning_rate", float, None, "ξ_w, the rate of w's step along d (default: the inner "
                "optimizer's).", low=0.0, low_open=True, flag="bome_lr"),
        Setting("momentum", float, 0.0, "momentum of w's step: SGD at rate ξ_w (0: plain steps).", low=0.0,
                high=1.0, high_open=True))

    def __init__(self, eta: float = 0.5, phi: str = "grad_norm", inner_learning_rate: Optional[float] = None,
                 inner_optimizer: Optional[keras.optimizers.Optimizer] = None, delta: float = 1e-8,
                 name: str = "BOME"):
        super().__init__(name)
        if phi not in PHI_RULES:
            raise ValueError(f"BOME: `phi` must be one of {PHI_RULES}, got {phi!r}.")
        for argument, value in (("eta", eta), ("delta", delta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"BOME: `{argument}` must be a non-negative number, got {value!r}.")
        if inner_learning_rate is not None and inner_optimizer is not None:
            raise ValueError("BOME: give `inner_learning_rate` or `inner_optimizer`, not both.")
        if inner_learning_rate is not None and not (isinstance(inner_learning_rate, (int, float))
                                                    and inner_learning_rate > 0):
            raise ValueError(f"BOME: `inner_learning_rate` must be a positive number, got {inner_learning_rate!r}.")
        if inner_optimizer is not None and not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"BOME: `inner_optimizer` must be a Keras optimizer, got "
                            f"{type(inner_optimizer).__name__}.")
        self.eta, self.phi, self.delta = float(eta), phi, float(delta)
        self.inner_learning_rate, self.inner_optimizer = inner_learning_rate, inner_optimizer
        self.diagnostics: list[dict] = []
        self._zero_barrier = 0

    @classmethod
    def from_settings(cls, momentum: float = 0.0, **settings: Any) -> "BOME":
        """BOME with its settings; a ``momentum`` > 0 makes w's step Keras SGD at
        ``inner_learning_rate`` with that momentum (the official hyper-cleaning's)."""
        if not momentum:
            return cls(**settings)
        rate = settings.pop("inner_learning_rate")
        if rate is None:
            raise ValueError("BOME: `momentum` > 0 needs `inner_learning_rate`, the rate of w's SGD step.")
        return cls(inner_optimizer=keras.optimizers.SGD(rate, momentum=momentum), **settings)

    @classmethod
    def from_config(cls, config: dict) -> "BOME":
        """BOME of ``get_config()``, its ``inner_optimizer`` deserialized (from a copy: Keras
        edits the dict it deserializes)."""
        optimizer = config.get("inner_optimizer")
        return cls(**{**config, "inner_optimizer": optimizer and keras.optimizers.deserialize(copy.deepcopy(optimizer))})

    def _settings(self) -> dict:
        return {"eta": self.eta, "phi": self.phi, "inner_learning_rate": self.inner_learning_rate,
                "inner_optimizer": None if self.inner_optimizer is None else
                keras.optimizers.serialize(self.inner_optimizer), "delta": self.delta}

    def hypergradient(self, problem, outer_objective, hypers, *, steps, inner_batches, outer_batch=None,
                      previous=None, online=False, offset=0, options=None) -> RunResult:
        return bome_direction(problem, outer_objective, hypers, steps=steps, inner_batches=inner_batches,
                              outer_batch=outer_batch, eta=self.eta, phi=self.phi, delta=self.delta,
                              offset=offset)

    def _build(self) -> None:
        hypers = [h for reg in self.registrations for h in (reg.hypers if reg.hypers is not None else
                                                             [v for v, _ in reg.candidates])]
        constrained = [h for h in hypers if getattr(h, "constraint", None) is not None]
        if constrained:
            raise ValueError(f"{self.name} cannot take hyperparameters with `constraint=` ({describe_all(constrained)}): "
                             f"its dynamic barrier is derived for an unconstrained step, and projecting λ after it can "
                             f"stall away from the solution where a constraint is active. Reparametrise λ instead "
                             f"(e.g. σ(λ) for a weight in [0, 1]), or use far.Penalty, far.ReverseHG or far.ImplicitHG, "
                             f"whose steps handle projections.")
        if self.inner_optimizer is not None:
            self.inner_optimizer.build([v for p in self.inner_problems for v in p.var_list])

    def state_variables(self) -> dict:
        return {"inner_optimizer": self.inner_optimizer} if self.inner_optimizer is not None else {}

    def health(self, result: RunResult) -> tf.Tensor:
        """The barrier's quantities (μ, q̂, ‖∇q̂‖, ‖∇f‖) finite."""
        carry = result.carry
        return tf.reduce_all(tf.math.is_finite(tf.stack([carry.mu, carry.q, carry.grad_q_norm, carry.grad_f_norm])))

    def failure(self, result: RunResult) -> Optional[str]:
        carry = result.carry
        for symbol, value in (("q̂", carry.q), ("‖∇q̂‖", carry.grad_q_norm), ("‖∇f‖", carry.grad_f_norm),
                              ("μ", carry.mu)):
            if not np.isfinite(float(value.numpy())):
                return f"{symbol} is {float(value.numpy())}: {self.diverged_hint or 'check the objectives'}"
        return None

    def finish(self, results: list[RunResult]) -> tf.Tensor:
        """The joint step on w:  w ← w − ξ_w d_w  (or ``inner_optimizer`` on d_w), in-graph."""
        for problem, result in zip(self.inner_problems, results):
            direction = result.carry.inner_direction
            if self.inner_optimizer is not None:
                self.inner_optimizer.apply_gradients(zip(direction, problem.var_list))
                continue
            size = (tf.constant(self.inner_learning_rate, problem.dtype) if self.inner_learning_rate is not None
                    else problem.optimizer.params(0, problem.dtype).learning_rate)
            for v, d in zip(problem.var_list, direction):
                v.assign_sub(size * d)
        return tf.constant(True)

    def report(self, results: list[RunResult], moved: Optional[float], global_step: int) -> None:
        """The diagnostics; the error for a lower level constant in w (∇q̂ = 0 while ∇f ≠ 0 for
        ``ZERO_BARRIER_LIMIT`` iterations in a row)."""
        self.diagnostics = [{field: float(getattr(r.carry, field).numpy()) for field in DIAGNOSTICS} for r in results]
        if any(d["grad_q_norm"] == 0 and d["grad_f_norm"] > 0 for d in self.diagnostics):
            self._zero_barrier += 1
        else:
            self._zero_barrier = 0
        if self._zero_barrier >= ZERO_BARRIER_LIMIT:
            self._zero_barrier = 0
            norm = max(d["grad_f_norm"] for d in self.diagnostics)
            raise ValueError(f"{self.name}, hyper-iteration {global_step}: ∇q̂ = 0 for {ZERO_BARRIER_LIMIT} "
                             f"iterations in a row while ‖∇f‖ = {norm:.3g}: the lower-level objective does "
                             f"not change with the inner variables (is it constant in w?), so the "
                             f"constraint q ≤ 0 gives no direction.")
        super().report(results, moved, global_step)

    def _stall_reason(self) -> Optional[str]:
        moving = [d for d in self.diagnostics if d["grad_f_norm"] > 0 or d["grad_q_norm"] > 0]
        if not moving:
            return None
        d = moving[0]
        return (f"the direction on λ, ∇_λ f + μ∇_λ q̂, is 0 while w still moves (μ = {d['mu']:.3g}, q̂ = {d['q']:.3g}, "
                f"⟨∇f, ∇q̂⟩ = {d['grad_dot']:.3g}, ‖∇q̂‖ = {d['grad_q_norm']:.3g}): with μ = 0 the barrier is "
                f"inactive and λ only follows ∇_λ f, here 0, so it learns nothing. Raise `eta` (φ must exceed "
                f"⟨∇f, ∇q̂⟩), or T (q̂ grows with the steps of ŵ).")
