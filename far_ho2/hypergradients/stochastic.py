"""Stochastic bilevel optimization by Langevin sampling (the formulation of Kim & Hospedales,
AAAI 2025): the inner problem becomes the distribution p(w | λ) ∝ exp(−L(w, λ)/τ), sampled by
SGLD (``far.SGLDOptimizer``), and the outer objective its expectation

    F(λ) = E_{w∼p(·|λ)}[E(w, λ)],

defined whether the inner problem has one minimizer, several, or is not solved to convergence.
``stochastic_hypergradient`` estimates ∇F by Monte Carlo along one chain of T steps (the first
``burn_in`` discarded, every ``thinning``-th state kept), with three estimators:

    'pathwise'  Z_{t+1} = A_t Z_t + B_t,  ĝ = mean_t [∂E/∂λ(w_t) + Z_tᵀ ∂E/∂w(w_t)]
                (A_t = ∂Φ_t/∂w, B_t = ∂Φ_t/∂λ): forward mode through the chain (ForwardHG's
                recursion), exact in expectation for the discretized chain; memory O(|w|·m),
                m JVPs per step (m scalar hyperparameter components).
    'score'     ∇F = E_p[∂E/∂λ] − Cov_p(E, ∂L/∂λ)/τ  (differentiating the Gibbs density):
                running moments only, memory O(|w| + |λ|), one gradient of L and of E per
                kept sample; exact for p (the chain's O(ε) discretization bias aside).
    'reversed'  q_{t+1} = A_tᵀ q_t + ∂E/∂w(w_t),  ĝ = mean_t [∂E/∂λ(w_t) + B_tᵀ q_t]: the
                pathwise sum over pairs s < t with the two ends of every pair exchanged. For a
                stationary time-reversible chain both orders of a pair have the same law, so the
                expectation is the pathwise one (up to SGLD's O(ε) departure from
                reversibility); memory O(|w| + |λ|), one vector-Jacobian product of a step per
                step. Our estimator: Kim & Hospedales describe an O(|w| + |λ|) first-order
                approximation of the forward recursion whose exact form could not be read here,
                and 'reversed' is not claimed to be it.

Every estimate comes with the standard error of each component by batch means: the kept
samples are cut into ``batches`` consecutive batches and SE = sd(batch estimates)/√batches, which
accounts for the autocorrelation of the chain when a batch spans several autocorrelation times.
"""

import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from far_ho2 import autodiff
from far_ho2 import inputs as inputs_lib
from far_ho2.batches import Batches
from far_ho2.hypergradients.forward import contract, forward_step, prepare_tangents, start_tangents
from far_ho2.hypergradients.base import HyperGradient
from far_ho2.inner_problem import InnerProblem
from far_ho2.optimizer import SGLDOptimizer
from far_ho2.trajectory import empty_trajectory, mark_unhealthy
from far_ho2.types import RunResult

ESTIMATORS = ("pathwise", "score", "reversed")
DRIFT_LIMIT = 4.0  # |z| of the mean inner loss, first half vs second half, that says "not mixed"
MIN_EFFECTIVE_SAMPLES = 10.0  # fewer effective samples than this: the SEs are not trustworthy


class ChainStatistics(NamedTuple):
    """A chain's diagnostics (SGLD has no accept/reject step: these use the inner loss)."""

    samples: tf.Tensor  # M, the kept samples
    mean_inner_loss: tf.Tensor  # mean of L over the kept samples
    autocorrelation: tf.Tensor  # ρ₁, the lag-1 autocorrelation of L over the kept samples
    effective_samples: tf.Tensor  # M (1 − ρ₁)/(1 + ρ₁)
    drift: tf.Tensor  # z of the mean of L in the first half of the batches against the second half
    #                   (with the spread of the second half's batch means: a trend shows up)


class StochasticCarry(NamedTuple):
    standard_errors: list  # per hyperparameter, the SE of each component (None where unconnected)
    statistics: ChainStatistics


def _per_batch(sums: tf.Tensor, counts: tf.Tensor) -> tf.Tensor:
    """Batch sums [B, ...] divided by the batch counts [B]."""
    return tf.einsum("b,b...->b...", 1 / tf.maximum(counts, 1.0), sums)


def _standard_error(per_batch: tf.Tensor) -> tf.Tensor:
    """sd(batch estimates)/√B."""
    n = tf.cast(tf.shape(per_batch)[0], per_batch.dtype)
    return tf.sqrt(tf.reduce_sum(tf.square(per_batch - tf.reduce_mean(per_batch, axis=0)), axis=0) / ((n - 1) * n))


def _totals(sums: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    return [tf.reduce_sum(x, axis=0) for x in sums]


def _centred(product: tf.Tensor, lower: tf.Tensor, outer: tf.Tensor, counts: tf.Tensor, e_mean: tf.Tensor,
             g_mean: tf.Tensor) -> tf.Tensor:
    """Σ_{t∈b} (E_t − Ē)(g_t − ḡ) per batch b, from the batch sums of E·g, g and E and the counts."""
    expand = lambda v: tf.reshape(v, tf.concat([tf.shape(v), tf.ones(tf.rank(lower) - 1, tf.int32)], 0))  # noqa: E731
    return product - e_mean * lower - expand(outer) * g_mean + expand(counts) * e_mean * g_mean


def stochastic_hypergradient(problem: InnerProblem, outer_objective: Callable, hypers: Sequence[tf.Variable], *,
                             steps: Any, inner_batches: Batches, outer_batch: Any = None,
                             estimator: str = "pathwise", burn_in: int = 0, thinning: int = 1, batches: int = 20,
                             initial_state: Any = None, offset: Any = 0) -> RunResult:
    """The Monte-Carlo hypergradient of F(λ) = E_{w∼p(·|λ)}[E(w, λ)] along one SGLD chain of T =
    ``steps`` steps from Φ₀ (or ``initial_state``): the states w_t, t = ``burn_in``, … , T − 1,
    every ``thinning``-th one, are the M samples (see the module docstring for the estimators).
    The samples are cut into ``batches`` batches (at most M) for the standard errors. Hoisted
    features x = φ_λ(batch) are differentiated as extra sources and pulled back to λ once per
    batch of samples (all the estimators are linear in the per-sample terms).

    Returns:
        ``RunResult``: ``value`` is the MC estimate of F, ``grads`` the estimate of ∇F,
        ``final_state`` w_T, ``carry`` a ``StochasticCarry`` (standard errors, chain statistics).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
    hypers, dtype = list(hypers), problem.dtype
    steps = tf.convert_to_tensor(steps, tf.int32)
    kept = tf.maximum((steps - burn_in + thinning - 1) // thinning, 1)
    n_batches = tf.minimum(tf.constant(batches, tf.int32), kept)
    if estimator == "pathwise":  # forward mode carries ∂x/∂λ of hoisted inputs in its tangents
        tangents = prepare_tangents(problem, hypers, inner_batches)
        inputs, sources = tangents.inputs, []
        s0, z0 = (start_tangents(problem, tangents, hypers) if initial_state is None else
                  (initial_state, [[tf.zeros_like(x) for x in tf.nest.flatten(initial_state)]
                                   for _ in tangents.components]))
    else:
        inputs = inputs_lib.prepare(problem, inner_batches, hypers, pull_backs=batches + 1)
        sources, tangents, z0 = inputs.sources, None, []
        s0 = problem.initial_state() if initial_state is None else initial_state
    q0 = [tf.zeros_like(w) for w in s0.w] if estimator == "reversed" else []
    zero = tf.zeros((), dtype)
    connected = [False] * len(hypers)
    # per-batch sums, for λ and for the hoisted inputs x: 'score' keeps E, then (∂E/∂λ, ∂L/∂λ,
    # E·∂L/∂λ) per λ and (∂L/∂x, E·∂L/∂x) per x; the others the per-sample estimate.
    per_hyper, per_source = (3, 2) if estimator == "score" else (1, 1)
    shapes = ([()] if estimator == "score" else []) + [tuple(h.shape) for h in hypers for _ in range(per_hyper)] \
        + [tuple(x.shape) for x in sources for _ in range(per_source)]
    first_hyper = 1 if estimator == "score" else 0
    first_source = first_hyper + per_hyper * len(hypers)

    def add(sums: list, index: int, b: tf.Tensor, value: Optional[tf.Tensor], weight: tf.Tensor,
            hyper: Optional[int] = None) -> None:
        if value is None:
            return
        if hyper is not None:
            connected[hyper] = True
        sums[index] = tf.tensor_scatter_nd_add(sums[index], [[b]], [weight * tf.cast(tf.convert_to_tensor(value), dtype)])

    def body(t, flat, z, q, sums, stats, losses, health):
        state = tf.nest.pack_sequence_as(s0, flat)
        problem.load(state.w)
        sample = (t >= burn_in) & (tf.math.floormod(t - burn_in, thinning) == 0)
        weight = tf.cast(sample, dtype)
        b = tf.clip_by_value(((t - burn_in) // thinning) * n_batches // kept, 0, n_batches - 1)
        sums = list(sums)
        outer = autodiff.outer_gradient(problem, outer_objective, outer_batch, hypers)
        if estimator == "pathwise":  # the step first: it marks which components reach the state
            new, new_z, loss = forward_step(problem, tangents, hypers, state, z, t, t + offset)
            for i, g in enumerate(contract(tangents, hypers, outer, z)):
                add(sums, i, b, g, weight, i)
            z = new_z
        elif estimator == "reversed":
            recorded = autodiff.record_transition(problem, state, lambda: inputs.at(t), t + offset, hypers, sources)
            vjp = autodiff.pull_back(problem, recorded, autodiff.state_cotangent(state, q), hypers, sources)
            for i, (direct, through) in enumerate(zip(outer.hypers, vjp.hypers)):
                terms = [tf.convert_to_tensor(x) for x in (direct, through) if x is not None]
                add(sums, i, b, tf.add_n(terms) if terms else None, weight, i)
            for j, through in enumerate(vjp.extra):
                add(sums, first_source + j, b, through, weight)
            q = [a + v for a, v in zip(tf.nest.flatten(vjp.state)[:len(q)], outer.weights)]
            new, loss = recorded.new_state, recorded.loss
        else:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(hypers + sources)
                lower_value = problem.loss(inputs.at(t))
            lower = tape.gradient(lower_value, hypers + sources)
            add(sums, 0, b, outer.value, weight)
            for i, (outer_grad, lower_grad) in enumerate(zip(outer.hypers, lower[:len(hypers)])):
                add(sums, 1 + 3 * i, b, outer_grad, weight, i)
                add(sums, 2 + 3 * i, b, lower_grad, weight, i)
                add(sums, 3 + 3 * i, b, None if lower_grad is None else outer.value * lower_grad, weight, i)
            for j, lower_grad in enumerate(lower[len(hypers):]):
                add(sums, first_source + 2 * j, b, lower_grad, weight)
                add(sums, first_source + 2 * j + 1, b, None if lower_grad is None else outer.value * lower_grad, weight)
            new, loss = problem.transition(state, inputs.at(t), t + offset)
        previous, by_batch, lag, square, value_sum = stats
        current = tf.cast(loss, dtype)
        stats = (tf.where(sample, current, previous),
                 tf.tensor_scatter_nd_add(by_batch, [[b]], [tf.stack([weight, weight * current])]),
                 lag + tf.where(sample & ~tf.equal(t, burn_in), previous * current, zero),
                 square + weight * current * current, value_sum + weight * tf.cast(outer.value, dtype))
        new_flat = tf.nest.flatten(new)
        return (t + 1, new_flat, z, q, sums, stats, losses.write(t, current), mark_unhealthy(health, t, new_flat))

    sums0 = [tf.zeros((batches,) + shape, dtype) for shape in shapes]
    stats0 = (zero, tf.zeros((batches, 2), dtype), zero, zero, zero)
    trajectory = empty_trajectory(s0, steps)
    _, flat, _, _, sums, stats, losses, health = tf.while_loop(
        lambda t, *_: t < steps, body,
        (tf.constant(0), tf.nest.flatten(s0), z0, q0, sums0, stats0, trajectory.losses, trajectory.health))
    final = tf.nest.pack_sequence_as(s0, flat)
    problem.load(final.w)

    _, by_batch, lag, square, value_sum = stats
    counts = by_batch[:n_batches, 0]
    total = tf.reduce_sum(counts)
    sums = [x[:n_batches] for x in sums]
    hyper_sums, source_sums = sums[first_hyper:first_source], sums[first_source:]
    if estimator == "score":
        temperature = problem.optimizer.params(steps + offset, dtype).temperature
        e_mean = tf.reduce_sum(sums[0]) / total
        parts = []  # per λ: the λ part of the per-sample estimate, summed per batch
        for i in range(len(hypers)):
            outer_grad, lower_grad, product = hyper_sums[3 * i: 3 * i + 3]
            g_mean = tf.reduce_sum(lower_grad, axis=0) / total
            parts.append(outer_grad - _centred(product, lower_grad, sums[0], counts, e_mean, g_mean) / temperature)
        x_parts = []
        for j in range(len(sources)):
            lower_grad, product = source_sums[2 * j: 2 * j + 2]
            g_mean = tf.reduce_sum(lower_grad, axis=0) / total
            x_parts.append(-_centred(product, lower_grad, sums[0], counts, e_mean, g_mean) / temperature)
    else:
        parts, x_parts = hyper_sums, source_sums
    # λ parts plus the pull-back of the x parts: the total, then each batch (for the SEs)
    through_x = inputs.pull_back(_totals(x_parts), hypers) if sources else [None] * len(hypers)
    grads = []
    for i, (part, pulled) in enumerate(zip(parts, through_x)):
        connected[i] = connected[i] or pulled is not None
        grads.append((tf.reduce_sum(part, axis=0) + (0 if pulled is None else pulled)) / total)
    per_batch = [_per_batch(part, counts) for part in parts]
    if sources:  # one pull-back per batch (padded to ``batches``: the batch count is only known in-graph)
        padded = [tf.concat([x, tf.zeros(tf.concat([[batches - n_batches], tf.shape(x)[1:]], 0), x.dtype)], 0)
                  for x in x_parts]
        pulled_batches = [inputs.pull_back([x[k] for x in padded], hypers) for k in range(batches)]
        for i in range(len(hypers)):
            rows = [tf.zeros_like(hypers[i]) if pulled[i] is None else tf.cast(pulled[i], dtype) for pulled in pulled_batches]
            per_batch[i] = per_batch[i] + _per_batch(tf.stack(rows)[:n_batches], counts)
    errors = [_standard_error(x) for x in per_batch]
    loss_means = by_batch[:n_batches, 1] / tf.maximum(counts, 1.0)
    mean_loss = tf.reduce_sum(by_batch[:n_batches, 1]) / total
    variance = square / total - mean_loss * mean_loss
    rho = tf.clip_by_value(tf.math.divide_no_nan(lag / tf.maximum(total - 1, 1.0) - mean_loss * mean_loss, variance),
                           -0.99, 0.99)
    half = n_batches // 2
    first, second = loss_means[:half], loss_means[half:]
    n1, n2 = tf.cast(tf.size(first), dtype), tf.cast(tf.size(second), dtype)
    spread = tf.reduce_sum(tf.square(second - tf.reduce_mean(second))) / tf.maximum(n2 - 1, 1.0)
    drift = tf.math.divide_no_nan(tf.reduce_mean(first) - tf.reduce_mean(second), tf.sqrt(spread * (1 / n1 + 1 / n2)))
    statistics = ChainStatistics(total, mean_loss, rho, total * (1 - rho) / (1 + rho), drift)
    carry = StochasticCarry([e if c else None for e, c in zip(errors, connected)], statistics)
    return RunResult(value_sum / total, [g if c else None for g, c in zip(grads, connected)], final, losses.stack(),
                     health, carry=carry)


class StochasticHG(HyperGradient):
    """The hypergradient of the expected outer objective under the Langevin distribution of the
    inner problem (see the module docstring): each ``run(T, ...)`` runs one SGLD chain of T
    steps (the inner optimizer must be a ``far.SGLDOptimizer``), discards the first
    ``burn_in``, keeps every ``thinning``-th state, and returns the Monte-Carlo hypergradient of
    E_p[E]; the outer optimizer then updates λ as with any method.

    After each run ``standard_errors`` holds, per inner problem and hyperparameter, the standard
    error of every component, and ``statistics`` the chain's ``ChainStatistics``; a warning says
    when the chain has visibly not mixed (|drift| > ``DRIFT_LIMIT``: the mean inner loss of the
    first half of the samples differs from the second's) or has fewer than
    ``MIN_EFFECTIVE_SAMPLES`` effective samples.

    Args:
        estimator: 'pathwise', 'score' or 'reversed'. Defaults to `'pathwise'`.
        burn_in: steps discarded at the start of each chain. Defaults to `0`.
        thinning: keep every k-th state. Defaults to `1`.
        batches: batches for the standard errors (at least 2). Defaults to `20`.
        warm_start: start each chain from the previous run's last state instead of Φ₀ (the
            chain goes on; ``burn_in`` may then be small). Defaults to `False`.
        name: a name.

    'score' and 'reversed' differentiate λ where it enters the objectives L and E; a
    hyperparameter of the SGLD optimizer (ε, τ) or of Φ₀ needs 'pathwise'.

    References:
        Kim, Hospedales. A Stochastic Approach to Bi-Level Optimization for Hyperparameter
        Optimization and Meta Learning. AAAI 2025, arXiv:2410.10417 (the formulation).
        Welling, Teh. ICML 2011 (SGLD).
    """

    online_modes = ()
    # Grappler's arithmetic optimizer rewrites adds of the chain's loop body (AddOpsRewrite) into
    # nodes whose temporary variables collide across the loop's iterations: TensorFlow 2.21 fails
    # with AlreadyExistsError ".../ArithmeticOptimizer/AddOpsRewrite_add_8/tmp_var" on 40-way
    # Omniglot episodes (20-way runs); with the pass off the same run trains.
    grappler_off = ("arithmetic_optimization",)

    def __init__(self, estimator: str = "pathwise", burn_in: int = 0, thinning: int = 1, batches: int = 20,
                 warm_start: bool = False, name: str = "StochasticHG"):
        super().__init__(name)
        if estimator not in ESTIMATORS:
            raise ValueError(f"StochasticHG: `estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
        for argument, value, low in (("burn_in", burn_in, 0), ("thinning", thinning, 1), ("batches", batches, 2)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"StochasticHG: `{argument}` must be an int ≥ {low}, got {value!r}.")
        self.estimator, self.burn_in, self.thinning, self.batches = estimator, int(burn_in), int(thinning), int(batches)
        self.uses_previous = bool(warm_start)
        self.differentiates_dynamics = estimator == "pathwise"
        self.unconnected_hint = ("" if estimator == "pathwise" else
                                 f" StochasticHG('{estimator}') differentiates λ in the objectives only: use "
                                 f"'pathwise' for the SGLD optimizer's parameters or Φ₀.")
        self.standard_errors: list = []
        self.statistics: list[dict] = []

    def _settings(self) -> dict:
        return {"estimator": self.estimator, "burn_in": self.burn_in, "thinning": self.thinning,
                "batches": self.batches, "warm_start": self.uses_previous}

    def _build(self) -> None:
        for problem in self.inner_problems:
            if not isinstance(problem.optimizer, SGLDOptimizer):
                raise TypeError(f"{self.name} samples the inner problem with Langevin dynamics: its optimizer "
                                f"must be a far.SGLDOptimizer, got {type(problem.optimizer).__name__}.")

    def _steps(self, T: int) -> Any:
        if T <= self.burn_in:
            raise ValueError(f"{self.name}: `T` = {T} leaves no sample after `burn_in` = {self.burn_in}; "
                             f"T counts every step of the chain, burn-in included.")
        return super()._steps(T)

    def hypergradient(self, problem, outer_objective, hypers, *, steps, inner_batches, outer_batch=None,
                      previous=None, online=False, offset=0, options=None) -> RunResult:
        return stochastic_hypergradient(problem, outer_objective, hypers, steps=steps, inner_batches=inner_batches,
                                        outer_batch=outer_batch, estimator=self.estimator, burn_in=self.burn_in,
                                        thinning=self.thinning, batches=self.batches,
                                        initial_state=previous.state if previous is not None else None,
                                        offset=offset)

    def _checked(self, result: RunResult) -> list[tf.Tensor]:
        return [e for e in result.carry.standard_errors if e is not None]

    def _after_run(self, results: list[RunResult], global_step: int) -> None:
        self.standard_errors = [[None if e is None else e.numpy() for e in r.carry.standard_errors] for r in results]
        self.statistics = [{field: float(value.numpy()) for field, value in r.carry.statistics._asdict().items()}
                           for r in results]
        for k, s in enumerate(self.statistics):
            where = f" of inner problem {k}" if len(results) > 1 else ""
            if abs(s["drift"]) > DRIFT_LIMIT or s["effective_samples"] < MIN_EFFECTIVE_SAMPLES:
                warnings.warn(f"{self.name}: the chain{where} has visibly not mixed at hyper-iteration "
                              f"{global_step}: the mean inner loss moved by {s['drift']:.1f} standard errors "
                              f"between the first and the second half of the samples, and "
                              f"{s['effective_samples']:.0f} of {s['samples']:.0f} samples are effective. The "
                              f"hypergradient and its standard errors are unreliable: raise `burn_in` or T, or "
                              f"the step size.", RuntimeWarning, stacklevel=3)
