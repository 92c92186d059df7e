"""Stochastic bilevel optimization by Langevin sampling (the formulation of Kim & Hospedales,
AAAI 2025): the inner problem becomes the distribution p(w | λ) ∝ exp(−L(w, λ)/τ), sampled by
SGLD (``far.SGLDOptimizer``), and the outer objective its expectation

    F(λ) = E_{w∼p(·|λ)}[E(w, λ)],

defined whether the inner problem has one minimizer, several, or is not solved to convergence.
``stochastic_hypergradient`` estimates ∇F by Monte Carlo along one chain of T steps (the first
``burn_in`` discarded, every ``thinning``-th state kept), with three estimators (``run_chain`` runs
the chain for each, ``pathwise_estimator``, ``score_estimator`` and ``reversed_estimator`` add
their terms):

    'pathwise'  Z_{t+1} = A_t Z_t + B_t,  ĝ = mean_t [∂E/∂λ(w_t) + Z_tᵀ ∂E/∂w(w_t)]
                (A_t = ∂Φ_t/∂w, B_t = ∂Φ_t/∂λ): forward mode through the chain (ForwardHG's
                recursion), exact in expectation for the discretized chain; memory O(|w|·m),
                m JVPs per step (m scalar hyperparameter components).
    'score'     ∇F = E_p[∂E/∂λ] − Cov_p(E, ∂L/∂λ)/τ  (differentiating the Gibbs density), and
                for K independent chains stacked on a leading axis (``chains=K``: L = Σ_k L_k,
                p = Π_k p_k, F = (1/K) Σ_k E_p[E_k]) each chain's own covariance:
                    ∇F = (1/K) Σ_k (E_p[∂E_k/∂λ] − Cov_p(E_k, ∂L_k/∂λ)/τ),
                    ĝ = (1/KM) Σ_{k,t} [∂E_kt/∂λ − (E_kt − Ē)(∂L_kt/∂λ − ḡ)/τ]
                around the grand means Ē, ḡ. Exactly centred after the chain from per-row sums of
                E, Q = ∂E/∂λ − E·∂L/∂λ/τ and S = ∂L/∂λ, by Σ(E − Ē)(g − ḡ) = ΣEg − ĒΣg − ḡΣE + nĒḡ.
                Cost per kept sample (none in the burn-in): one Jacobian of 2G rows (Q and S of
                each of G groups of chains, G = min(K, ``batches``); G = 1 without chains), i.e.
                2G vectorized vector-Jacobian products; memory O(|w| + R·|λ|) for R rows of
                standard errors. Exact for p (the chain's O(ε) discretization bias aside).
    'reversed'  q_{t+1} = A_tᵀ q_t + ∂E/∂w(w_t),  ĝ = mean_t [∂E/∂λ(w_t) + B_tᵀ q_t]: the
                pathwise sum over pairs s < t with the two ends of every pair exchanged. For a
                stationary time-reversible chain both orders of a pair have the same law, so the
                expectation is the pathwise one (up to SGLD's O(ε) departure from
                reversibility); memory O(|w| + |λ|), one vector-Jacobian product of a step per
                step. Our estimator: Kim & Hospedales describe an O(|w| + |λ|) first-order
                approximation of the forward recursion whose exact form could not be read here,
                and 'reversed' is not claimed to be it.

Every estimate comes with the standard error of each component, SE = sd(row estimates)/√R over
R rows: by batch means, the kept samples cut into R = ``batches`` consecutive batches, which
accounts for the autocorrelation of the chain when a batch spans several autocorrelation times;
for 'score' with K ≥ 2 chains, over R = min(K, ``batches``) groups of chains, independent by
construction: honest whatever the autocorrelation, falling like 1/√K, itself uncertain with few
chains (R − 1 degrees of freedom). 'pathwise' and 'reversed' keep batch means with chains: their
per-sample estimate is already the mean of the chains' terms.

A meta-batch sharded across the D replicas of a strategy (``far.distribute``; replica d holds the
chains d·K/D … (d+1)·K/D − 1 of ``chains`` = K, or a 1/D share of the problems of a scalar
objective, E^(d) their mean and L^(d) their sum) gives every replica the numbers of one device
holding the whole meta-batch: the chain does not depend on the split (``far_ho2.sharding.normal``),
and all that follows it comes from sums linear in the replicas' terms, all-reduced first
(``Chain.across``; hoisted x pulled back to λ on each replica before):

    E_t = (1/D) Σ_d E_t^(d),   L_t = Σ_d L_t^(d)   (the diagnostics' trace),
    per-row sums  (1/D) Σ_d  of each replica's, its terms D times its part as E^(d) is  ('pathwise',
                  'reversed', 'score' without chains),  Σ_d  with the counts for pooled chains,

then the centring, estimate and standard errors of one device. 'score' without chains couples the
replicas in E_t·S_t = E_t·Σ_d S_t^(d): a first pass of the chain (T steps, no derivatives)
all-reduces E_t (``score_estimator``).
Each replica returns the meta-batch's E and ∇E (``far.distribute.share`` divides ∇E by D for the
optimizer's sum).
"""

import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from far_ho2 import autodiff
from far_ho2 import batches as batching
from far_ho2 import inputs as inputs_lib
from far_ho2 import sharding
from far_ho2.batches import Batches
from far_ho2.hypergradients.forward import contract, forward_step, prepare_tangents, start_tangents
from far_ho2.hypergradients.base import HyperGradient
from far_ho2.inner_problem import InnerProblem
from far_ho2.inputs import InnerInputs
from far_ho2.optimizer import SGLDOptimizer
from far_ho2.registry import Setting
from far_ho2.trajectory import empty_trajectory, mark_unhealthy
from far_ho2.types import Health, RunResult

ESTIMATORS = ("pathwise", "score", "reversed")
DRIFT_LIMIT = 4.0  # |z| of the mean inner loss, first half vs second half, that says "not mixed"
MIN_EFFECTIVE_SAMPLES = 10.0  # fewer effective samples than this: the SEs are not trustworthy
SUMMARY_EVERY = 100  # runs: after its first "not mixed" warning, StochasticHG sums up at most this often


class ChainStatistics(NamedTuple):
    """A run's diagnostics (SGLD has no accept/reject step: these use the inner loss L, summed
    over the chains, at the kept samples; see ``chain_statistics``)."""

    samples: tf.Tensor  # K·M, the kept samples of the K chains
    chains: tf.Tensor  # K
    mean_inner_loss: tf.Tensor  # mean of L over the kept samples
    autocorrelation: tf.Tensor  # ρ₁, the lag-1 autocorrelation of L
    effective_samples: tf.Tensor  # K·M/τ̂ ≤ K·M (τ̂ ≥ 1, the integrated autocorrelation time of L)
    drift: tf.Tensor  # z of the mean of L in the first half of the samples against the second half


class StochasticCarry(NamedTuple):
    standard_errors: list  # per hyperparameter, the SE of each component (None where unconnected)
    statistics: ChainStatistics


def _mean(x: tf.Tensor) -> tf.Tensor:
    """The mean of a vector (0 for an empty one)."""
    return tf.math.divide_no_nan(tf.reduce_sum(x), tf.cast(tf.size(x), x.dtype))


def chain_statistics(trace: tf.Tensor, chains: int) -> ChainStatistics:
    """The diagnostics of the kept inner losses L_1 … L_M of a run (L summed over K independent
    chains has the autocorrelations of one chain's loss):

        ρ_s = Σ_t (L_t − L̄)(L_{t+s} − L̄) / Σ_t (L_t − L̄)²,   Γ_m = ρ_{2m} + ρ_{2m+1},
        τ̂ = max(1, −1 + 2 Σ_{m < m*} Γ_m),  m* the first m with Γ_m ≤ 0  (Geyer's initial positive
        sequence), effective samples K·M/τ̂ ≤ K·M,
        drift z = (L̄₁ − L̄₂) / √(s₂² τ̂ (1/n₁ + 1/n₂))  over the halves 1 and 2 of the samples,

    s₂² the second half's variance: a transient at the start of the chain inflates neither s₂ nor
    the first half's weight, while τ̂ makes z a standard score on a stationary chain (on the
    Gaussian test problem |z| > 4 on 0.5 % of stationary runs of M = 200, on none of M = 1000).
    A transient also raises τ̂, i.e. lowers the effective samples: ``visibly_not_mixed`` flags
    either.
    """
    dtype = trace.dtype
    m = tf.size(trace)
    size = tf.cast(m, dtype)
    centred = trace - _mean(trace)
    spectrum = tf.signal.rfft(centred, [2 * m])
    covariances = tf.signal.irfft(spectrum * tf.math.conj(spectrum), [2 * m])[:m]
    rho = tf.math.divide_no_nan(covariances, covariances[0])
    pairs = rho[0:2 * (m // 2):2] + rho[1:2 * (m // 2):2]
    initial = tf.math.cumprod(tf.cast(pairs > 0, dtype))  # 1 up to the first Γ_m ≤ 0, then 0
    tau = tf.maximum(2 * tf.reduce_sum(initial * pairs) - 1, 1.0)
    half = m // 2
    first, second = trace[:half], trace[half:]
    n1, n2 = tf.cast(half, dtype), tf.cast(m - half, dtype)
    spread = tf.reduce_sum(tf.square(second - _mean(second))) / tf.maximum(n2 - 1, 1.0)
    drift = tf.math.divide_no_nan(_mean(first) - _mean(second),
                                  tf.sqrt(spread * tau * (tf.math.divide_no_nan(1.0, n1) + 1 / n2)))
    k = tf.constant(chains, dtype)
    return ChainStatistics(k * size, k, _mean(trace), tf.pad(rho, [[0, 1]])[1], k * size / tau, drift)


def effective_samples(statistics: Mapping[str, float], batch_means: bool) -> tuple[float, float]:
    """(effective samples, samples) behind the standard errors, from the fields of a
    ``ChainStatistics`` as numbers: each chain's for batch means (a batch must span several
    autocorrelation times of one chain), all the chains' for their spread across chains."""
    chains = statistics["chains"] if batch_means else 1.0
    return statistics["effective_samples"] / chains, statistics["samples"] / chains


def visibly_not_mixed(statistics: Mapping[str, float], batch_means: bool) -> bool:
    """|drift| > ``DRIFT_LIMIT``, or fewer than ``MIN_EFFECTIVE_SAMPLES`` effective samples behind
    the standard errors (``effective_samples``)."""
    return (abs(statistics["drift"]) > DRIFT_LIMIT
            or effective_samples(statistics, batch_means)[0] < MIN_EFFECTIVE_SAMPLES)


def _standard_error(parts: tf.Tensor, counts: tf.Tensor) -> tf.Tensor:
    """The SE of ĝ = Σ_r P_r / N from R independent rows of sums P_r [R, ...] over n_r samples
    (N = Σ n_r, ĝ_r = P_r/n_r):  SE² = Σ_r n_r (ĝ_r − ĝ)² / ((R − 1) N),  sd(ĝ_r)/√R for equal n_r."""
    n = tf.cast(tf.shape(parts)[0], parts.dtype)
    total = tf.reduce_sum(counts)
    per_row = tf.einsum("b,b...->b...", 1 / tf.maximum(counts, 1.0), parts)
    deviations = tf.einsum("b,b...->b...", counts, tf.square(per_row - tf.reduce_sum(parts, axis=0) / total))
    return tf.sqrt(tf.reduce_sum(deviations, axis=0) / ((n - 1) * total))


def _centring(lower: tf.Tensor, outer: tf.Tensor, counts: tf.Tensor, e_mean: tf.Tensor, g_mean: tf.Tensor) -> tf.Tensor:
    """Σ_{t∈r} (E_t g_t − (E_t − Ē)(g_t − ḡ)) = Ē·Σg + ḡ·ΣE − n·Ē·ḡ per row r, from its sums of g and
    E and its count n (Ē, ḡ the means over every row)."""
    expand = lambda v: tf.reshape(v, tf.concat([tf.shape(v), tf.ones(tf.rank(lower) - 1, tf.int32)], 0))  # noqa: E731
    return e_mean * lower + expand(outer) * g_mean - expand(counts) * e_mean * g_mean


def _means(sums: list, counts: tf.Tensor) -> tuple[tf.Tensor, list]:
    """F̂ = ΣE / N over the N samples of every row, and the per-row sums of the other terms as they
    are (the per-sample estimate, for 'pathwise' and 'reversed')."""
    return tf.reduce_sum(sums[0]) / tf.reduce_sum(counts), sums[1:]


def _shapes(sources: Sequence[Any], width: int) -> list[tuple]:
    """The shapes of one row's sums: E, then ``width`` terms per source (λ, then hoisted x)."""
    return [()] + [tuple(x.shape) for x in sources for _ in range(width)]


class Chain(NamedTuple):
    """What the estimators and the chain loop share of a run: the problem, λ and the objectives,
    the T steps (their schedules from ``offset``) whose states t = ``burn_in``, ``burn_in`` +
    ``thinning``, … are the kept samples, and the ``rows`` of the per-row sums: batches of
    consecutive samples, or (``pooled``: 'score' with K ≥ 2 chains) groups of chains."""

    problem: InnerProblem
    outer_objective: Callable
    outer_batch: Any
    hypers: list
    chains: Optional[int]  # K, or None for scalar objectives (of the whole meta-batch when sharded)
    steps: tf.Tensor  # T
    offset: Any
    burn_in: int
    thinning: int
    rows: int
    pooled: bool
    replicas: int  # D, the replicas sharing the meta-batch (1 on one device)

    @property
    def dtype(self) -> tf.DType:
        """The dtype of the sums and the estimate (the problem's)."""
        return self.problem.dtype

    @property
    def share(self) -> Optional[int]:
        """K/D, the chains of this replica's objectives (None for scalar objectives)."""
        return None if self.chains is None else self.chains // self.replicas

    @property
    def groups(self) -> int:
        """G, the rows one sample adds to: every group of chains when pooled, else its batch."""
        return self.rows if self.pooled else 1

    def outer_values(self) -> tf.Tensor:
        """E_k per chain of this replica, [K/D] (a scalar objective as [1])."""
        if self.chains is None:
            return tf.reshape(batching.scalar_objective(self.outer_objective, self.outer_batch), [1])
        return batching.chain_values(self.outer_objective, self.outer_batch, self.share, "outer_objective")

    def inner_values(self, inputs: Any) -> tf.Tensor:
        """L_k per chain of this replica, [K/D]."""
        if self.chains is None:
            return tf.reshape(self.problem.loss(inputs), [1])
        return batching.chain_values(self.problem.objective, inputs, self.share, "inner_objective")

    def across(self, sums: list) -> list:
        """The meta-batch's sums from each replica's (one all-reduce; unchanged on one device):
        Σ_d when pooled (sums over chains, each replica adding its chains'), else (1/D) Σ_d (sums
        over samples of per-sample terms each replica holds D times its part of, as E^(d))."""
        if self.replicas == 1:
            return sums
        summed = sharding.total(sums)
        return summed if self.pooled else [s / self.replicas for s in summed]

    def outer_gradient(self) -> autodiff.OuterGradient:
        """mean_k E_k and its gradients in w and λ, at the weights the variables hold."""
        return autodiff.value_and_gradients(self.problem, lambda: tf.reduce_mean(self.outer_values()), self.hypers)


class Estimator(NamedTuple):
    """One estimator's part of a run; ``run_chain`` does the rest. Its per-row sums are E, then
    ``width`` terms per λ and per hoisted x (``sources``), in that order."""

    inputs: InnerInputs  # the inner objective's inputs at each step
    sources: list  # hoisted x, differentiated as extra sources: their parts are pulled back to λ
    state: NamedTuple  # s_0
    carry: Any  # the estimator's own state at t = 0 (Z_0, q_0, or nothing)
    width: int
    sizes: tf.Tensor  # [G]: the samples a kept state adds to each of its rows
    connected: list  # per λ and x, whether a term reaches it (filled at trace time: static)
    # (t, s_t, carry, sample) -> (s_{t+1}, L_t, carry, the state's terms: [G, ...] per sum), sample:
    # whether s_t is kept (its terms are weighted 0 otherwise)
    step: Callable[[tf.Tensor, NamedTuple, Any, tf.Tensor], tuple[NamedTuple, tf.Tensor, Any, list]]
    # (sums, counts) -> (F̂, per λ and x the per-row sums of the per-sample estimate)
    finish: Callable[[list, tf.Tensor], tuple[tf.Tensor, list]]


def _sample_terms(value: tf.Tensor, grads: Sequence[Any], sources: Sequence[Any], connected: list,
                  dtype: tf.DType) -> list[tf.Tensor]:
    """One state's terms as a row each: E, then the per-sample estimate per source (zeros where
    None: unconnected; ``connected`` marks the others)."""
    terms = [tf.reshape(tf.cast(value, dtype), [1])]
    for i, (g, x) in enumerate(zip(grads, sources)):
        connected[i] = connected[i] or g is not None
        terms.append(tf.zeros((1,) + tuple(x.shape), dtype) if g is None else
                     tf.cast(tf.convert_to_tensor(g), dtype)[None])
    return terms


def pathwise_estimator(chain: Chain, inner_batches: Batches, initial_state: Any) -> Estimator:
    """'pathwise', forward mode through the chain (``forward_step``; hoisted inputs carry their
    tangents ∂x/∂λ in Z, so nothing is pulled back), m JVPs of a step per step:

        Z_{t+1} = A_t Z_t + B_t,   ĝ = mean_t [∂E/∂λ(w_t) + Z_tᵀ ∂E/∂w(w_t)],

    Z_0 = ∂Φ₀/∂λ, or 0 from ``initial_state``."""
    problem, hypers, dtype = chain.problem, chain.hypers, chain.dtype
    tangents = prepare_tangents(problem, hypers, inner_batches)
    s0, z0 = (start_tangents(problem, tangents, hypers) if initial_state is None else
              (initial_state, [[tf.zeros_like(x) for x in tf.nest.flatten(initial_state)]
                               for _ in tangents.components]))
    connected = [False] * len(hypers)

    def step(t: tf.Tensor, state: NamedTuple, z: list, sample: tf.Tensor) -> tuple[NamedTuple, tf.Tensor, list, list]:
        outer = chain.outer_gradient()
        # the step before the contraction: it marks which components reach the state
        new, new_z, loss = forward_step(problem, tangents, hypers, state, z, t, t + chain.offset)
        return new, loss, new_z, _sample_terms(outer.value, contract(tangents, hypers, outer, z), hypers,
                                               connected, dtype)

    return Estimator(tangents.inputs, [], s0, z0, 1, tf.ones([1], dtype), connected, step, _means)


def reversed_estimator(chain: Chain, inner_batches: Batches, initial_state: Any) -> Estimator:
    """'reversed', the pathwise sum over pairs s < t with the ends of every pair exchanged, one
    vector-Jacobian product of a step per step:

        q_{t+1} = A_tᵀ q_t + ∂E/∂w(w_t),   ĝ = mean_t [∂E/∂λ(w_t) + B_tᵀ q_t],   q_0 = 0."""
    problem, hypers, dtype = chain.problem, chain.hypers, chain.dtype
    inputs = inputs_lib.prepare(problem, inner_batches, hypers, pull_backs=chain.rows + 1)
    s0 = problem.initial_state() if initial_state is None else initial_state
    connected = [False] * (len(hypers) + len(inputs.sources))

    def step(t: tf.Tensor, state: NamedTuple, q: list, sample: tf.Tensor) -> tuple[NamedTuple, tf.Tensor, list, list]:
        outer = chain.outer_gradient()
        recorded = autodiff.record_transition(problem, state, lambda: inputs.at(t), t + chain.offset, hypers,
                                              inputs.sources)
        vjp = autodiff.pull_back(problem, recorded, autodiff.state_cotangent(state, q), hypers, inputs.sources)
        per_hyper = []  # ∂E/∂λ + B_tᵀ q_t (None where neither reaches λ)
        for direct, through in zip(outer.hypers, vjp.hypers):
            given = [tf.convert_to_tensor(x) for x in (direct, through) if x is not None]
            per_hyper.append(tf.add_n(given) if given else None)
        q = [a + v for a, v in zip(tf.nest.flatten(vjp.state)[:len(q)], outer.weights)]
        return recorded.new_state, recorded.loss, q, _sample_terms(
            outer.value, per_hyper + vjp.extra, hypers + inputs.sources, connected, dtype)

    return Estimator(inputs, inputs.sources, s0, [tf.zeros_like(w) for w in s0.w], 1, tf.ones([1], dtype),
                     connected, step, _means)


def score_estimator(chain: Chain, inner_batches: Batches, initial_state: Any) -> Estimator:
    """'score', differentiating the Gibbs density, each chain k with its own covariance:

        ∇F = (1/K) Σ_k (E_p[∂E_k/∂λ] − Cov_p(E_k, ∂L_k/∂λ)/τ),

    from each row's sums of E, Q = ∂E/∂λ − E·∂L/∂λ/τ and S = ∂L/∂λ per λ and x, centred after the
    chain around the grand means (``_centring``); one Jacobian of 2G rows per kept state, none in
    the burn-in (the chain's states are not differentiated).

    Sharded, pooled chains add their sums (replica d's chains d·K/D … in their groups). A scalar
    objective's E_t·S_t couples the replicas: with S_t = (1/D) Σ_d ∂(D·L_t^(d))/∂λ,

        Q_t = (1/D) Σ_d ∂/∂λ (E_t^(d) − E_t·D·L_t^(d)/τ)

    needs the meta-batch's E_t = (1/D) Σ_d E_t^(d) at every kept sample, all-reduced after a first
    pass of the chain without derivatives (``_outer_trace``)."""
    problem, hypers, dtype, groups = chain.problem, chain.hypers, chain.dtype, chain.groups
    inputs = inputs_lib.prepare(problem, inner_batches, hypers, pull_backs=chain.rows + 1)
    s0 = problem.initial_state() if initial_state is None else initial_state
    differentiated = hypers + inputs.sources
    connected = [False] * len(differentiated)
    temperature = tf.stop_gradient(tf.cast(problem.optimizer.params(chain.steps + chain.offset, dtype).temperature,
                                           dtype))
    n_chains, share = chain.chains or 1, chain.share or 1
    first = sharding.first_row(share) if chain.pooled else 0  # the meta-batch's index of this replica's chain 0
    member = tf.one_hot((first + tf.range(share)) * groups // n_chains, groups, dtype=dtype)  # [K/D, G]: groups
    outer_trace = _outer_trace(chain, inputs, s0) if chain.replicas > 1 and not chain.pooled else None

    def terms(t: tf.Tensor) -> list[tf.Tensor]:
        """One state's sums per group g (its chains k): Σ_k E_k, then per λ and per x
        Q_g = ∂/∂λ Σ_k (E_k − E_k L_k/τ)  (E_k held fixed in the product) and S_g = ∂/∂λ Σ_k L_k:
        one Jacobian of the 2G rows (Q, S) by vectorized reverse mode (row by row when run eagerly,
        where the vectorization would be traced again at every step)."""
        eager = tf.executing_eagerly()
        with tf.GradientTape(watch_accessed_variables=False, persistent=eager) as tape:
            tape.watch(differentiated)
            e = tf.cast(chain.outer_values(), dtype)
            lower = tf.cast(chain.inner_values(inputs.at(t)), dtype)
            weight = tf.stop_gradient(e)
            if outer_trace is not None:  # the meta-batch's E_t, and D·L^(d)
                weight, lower = outer_trace[t][None], chain.replicas * lower
            per_chain = tf.stack([e - weight * lower / temperature, lower])  # [2, K/D]
            grouped = tf.reshape(tf.matmul(per_chain, member), [2 * groups])
        jacobians = tape.jacobian(grouped, differentiated, experimental_use_pfor=not eager)
        out = [tf.linalg.matvec(member, tf.stop_gradient(e), transpose_a=True)]
        for i, (jacobian, x) in enumerate(zip(jacobians, differentiated)):
            if jacobian is None:
                out += [tf.zeros((groups,) + tuple(x.shape), dtype)] * 2
                continue
            connected[i] = True
            jacobian = tf.cast(tf.convert_to_tensor(jacobian), dtype)
            out += [jacobian[:groups], jacobian[groups:]]
        return out

    def step(t: tf.Tensor, state: NamedTuple, carry: tuple,
             sample: tf.Tensor) -> tuple[NamedTuple, tf.Tensor, tuple, list]:
        zeros = [tf.zeros((groups,) + shape, dtype) for shape in _shapes(differentiated, 2)]
        sums = tf.cond(sample, lambda: terms(t), lambda: zeros)
        new, loss = problem.transition(state, inputs.at(t), t + chain.offset)
        return new, loss, carry, sums

    def finish(sums: list, counts: tf.Tensor) -> tuple[tf.Tensor, list]:
        """Ē, and per row ΣQ + (ĒΣS + S̄ΣE − nĒS̄)/τ = Σ_t [∂E/∂λ − (E_t − Ē)(S_t − S̄)/τ]."""
        e_mean, pairs = _means(sums, counts)
        total = tf.reduce_sum(counts)
        return e_mean, [raised + _centring(lower, sums[0], counts, e_mean, tf.reduce_sum(lower, axis=0) / total)
                        / temperature for raised, lower in zip(pairs[0::2], pairs[1::2])]

    return Estimator(inputs, inputs.sources, s0, (), 2, tf.reduce_sum(member, 0), connected, step, finish)


def _outer_trace(chain: Chain, inputs: InnerInputs, s0: NamedTuple) -> tf.Tensor:
    """E_t of the meta-batch at each step t of the chain from s_0 (0 at the states not kept),
    (1/D) Σ_d E_t^(d): the chain run once without derivatives, its [T] values all-reduced."""
    problem, dtype = chain.problem, chain.dtype

    def step(t: tf.Tensor, state: NamedTuple, trace: tf.TensorArray,
             sample: tf.Tensor) -> tuple[NamedTuple, tf.Tensor, tf.TensorArray, list]:
        value = tf.cond(sample, lambda: tf.reduce_sum(tf.cast(chain.outer_values(), dtype)),
                        lambda: tf.zeros((), dtype))
        new, loss = problem.transition(state, inputs.at(t), t + chain.offset)
        return new, loss, trace.write(t, value), [value[None]]

    values = Estimator(inputs, [], s0, tf.TensorArray(dtype, size=chain.steps), 0, tf.ones([1], dtype), [], step,
                       _means)
    return chain.across([run_chain(chain, values)[1].stack()])[0]


def run_chain(chain: Chain, estimator: Estimator) -> tuple[NamedTuple, Any, list, tf.Tensor, tf.Tensor, tf.Tensor,
                                                           Health]:
    """The SGLD chain every estimator runs: T steps from s_0, each step's terms weighted 1 at a kept
    state (t ≥ ``burn_in``, every ``thinning``-th) and 0 elsewhere and added to its rows, the batch
    ⌊i·R/M⌋ of the i-th of M kept states (R = min(``rows``, M)), or every group of chains when
    pooled (R = ``rows``). Returns (s_T, the estimator's carry at T, the per-row sums, the per-row
    counts, R, L_0 … L_{T−1}, the guard's health record); the inner variables hold w_T."""
    problem, dtype, s0 = chain.problem, chain.dtype, estimator.state
    steps, burn_in, thinning = chain.steps, chain.burn_in, chain.thinning
    kept = tf.maximum((steps - burn_in + thinning - 1) // thinning, 1)
    n_rows = tf.constant(chain.rows) if chain.pooled else tf.minimum(tf.constant(chain.rows, tf.int32), kept)

    def body(t, flat, carry, sums, counts, losses, health):
        state = tf.nest.pack_sequence_as(s0, flat)
        problem.load(state.w)
        sample = (t >= burn_in) & (tf.math.floormod(t - burn_in, thinning) == 0)
        weight = tf.cast(sample, dtype)
        b = tf.clip_by_value(((t - burn_in) // thinning) * n_rows // kept, 0, n_rows - 1)
        index = tf.range(chain.groups)[:, None] if chain.pooled else [[b]]
        new, loss, carry, terms = estimator.step(t, state, carry, sample)
        sums = [tf.tensor_scatter_nd_add(s, index, weight * term) for s, term in zip(sums, terms)]
        counts = tf.tensor_scatter_nd_add(counts, index, weight * estimator.sizes)
        new_flat = tf.nest.flatten(new)
        return (t + 1, new_flat, carry, sums, counts, losses.write(t, tf.cast(loss, dtype)),
                mark_unhealthy(health, t, new_flat))

    shapes = _shapes(chain.hypers + estimator.sources, estimator.width)
    trajectory = empty_trajectory(s0, steps)
    _, flat, carry, sums, counts, losses, health = tf.while_loop(
        lambda t, *_: t < steps, body,
        (tf.constant(0), tf.nest.flatten(s0), estimator.carry, [tf.zeros((chain.rows,) + s, dtype) for s in shapes],
         tf.zeros((chain.rows,), dtype), trajectory.losses, trajectory.health))
    final = tf.nest.pack_sequence_as(s0, flat)
    problem.load(final.w)
    return final, carry, sums, counts, n_rows, losses.stack(), health


def _through_features(chain: Chain, inputs: InnerInputs, parts: list, connected: list) -> tuple[list, list]:
    """Per λ, the sum over the rows of its parts plus (∂x/∂λ)ᵀ of the summed parts of the hoisted
    x (one pull-back), and its per-row parts plus each row's own pull-back (one per row, for the
    standard errors); ``connected`` marks the λ that x reaches."""
    hypers, dtype = chain.hypers, chain.dtype
    parts, x_parts = parts[:len(hypers)], parts[len(hypers):]
    through_x = (inputs.pull_back([tf.reduce_sum(x, axis=0) for x in x_parts], hypers) if x_parts
                 else [None] * len(hypers))
    totals = []
    for i, (part, pulled) in enumerate(zip(parts, through_x)):
        connected[i] = connected[i] or pulled is not None
        totals.append(tf.reduce_sum(part, axis=0) + (0 if pulled is None else pulled))
    if x_parts:
        pulled_rows = [inputs.pull_back([x[r] for x in x_parts], hypers) for r in range(chain.rows)]
        for i in range(len(hypers)):
            parts[i] = parts[i] + tf.stack([tf.zeros_like(hypers[i], dtype) if p[i] is None else tf.cast(p[i], dtype)
                                            for p in pulled_rows])
    return totals, parts


def stochastic_hypergradient(problem: InnerProblem, outer_objective: Callable, hypers: Sequence[tf.Variable], *,
                             steps: Any, inner_batches: Batches, outer_batch: Any = None,
                             estimator: str = "pathwise", burn_in: int = 0, thinning: int = 1, batches: int = 20,
                             chains: Optional[int] = None, initial_state: Any = None, offset: Any = 0) -> RunResult:
    """The Monte-Carlo hypergradient of F(λ) = E_{w∼p(·|λ)}[E(w, λ)] along one SGLD chain of T =
    ``steps`` steps from Φ₀ (or ``initial_state``): the states w_t, t = ``burn_in``, … , T − 1,
    every ``thinning``-th one, are the M samples (see the module docstring for the estimators).
    With ``chains`` = K the objectives return the [K] values of K independent problems stacked on
    a leading axis: the energy is Σ_k L_k, F = (1/K) Σ_k E_p[E_k]. The standard errors come from
    ``batches`` rows: batches of consecutive samples, or for 'score' with K ≥ 2 groups of chains.
    Hoisted features x = φ_λ(batch) are differentiated as extra sources and pulled back to λ once
    per row (all the estimators are linear in the per-sample terms).

    Returns:
        ``RunResult``: ``value`` is the MC estimate of F, ``grads`` the estimate of ∇F,
        ``final_state`` w_T, ``carry`` a ``StochasticCarry`` (standard errors, chain statistics).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
    static_steps = tf.get_static_value(steps)
    if static_steps is not None and static_steps <= burn_in:
        raise ValueError(f"`steps` = {static_steps} leaves no sample after `burn_in` = {burn_in}.")
    hypers, n_chains, replicas = list(hypers), chains or 1, sharding.replicas()
    if chains is not None and chains % replicas:
        raise ValueError(f"`chains` = {chains} does not split across the {replicas} replicas of the strategy: "
                         f"each replica holds the same number of chains, so use a multiple of {replicas}.")
    pooled = estimator == "score" and n_chains >= 2  # rows: groups of chains, not batches of samples
    chain = Chain(problem, outer_objective, outer_batch, hypers, chains, tf.convert_to_tensor(steps, tf.int32),
                  offset, burn_in, thinning, min(n_chains, batches) if pooled else batches, pooled, replicas)
    build = {"pathwise": pathwise_estimator, "score": score_estimator, "reversed": reversed_estimator}[estimator]
    method = build(chain, inner_batches, initial_state)
    if chains is not None:  # the inner objective's shape, checked once
        chain.inner_values(method.inputs.at(0))
    final, _, sums, counts, n_rows, losses, health = run_chain(chain, method)
    sums[0], counts = chain.across([sums[0], counts])
    value, parts = method.finish(sums, counts)
    connected = method.connected[:len(hypers)]
    totals, parts = _through_features(chain, method.inputs, parts, connected)
    shared = chain.across(totals + parts)  # the estimate and its rows are linear in each replica's
    totals, parts = shared[:len(totals)], shared[len(totals):]
    total = tf.reduce_sum(counts)
    grads = [g / total for g in totals]
    errors = [_standard_error(part[:n_rows], counts[:n_rows]) for part in parts]
    trace = sharding.total(tf.gather(losses, tf.range(burn_in, chain.steps, thinning)))  # L_t = Σ_d L_t^(d)
    statistics = chain_statistics(trace, n_chains)
    carry = StochasticCarry([e if c else None for e, c in zip(errors, connected)], statistics)
    return RunResult(value, [g if c else None for g, c in zip(grads, connected)], final, losses, health,
                     carry=carry)


class StochasticHG(HyperGradient):
    """The hypergradient of the expected outer objective under the Langevin distribution of the
    inner problem (see the module docstring): each ``run(T, ...)`` runs one SGLD chain of T
    steps (the inner optimizer must be a ``far.SGLDOptimizer``), discards the first
    ``burn_in``, keeps every ``thinning``-th state, and returns the Monte-Carlo hypergradient of
    E_p[E]; the outer optimizer then updates λ as with any method.

    Stacked chains (the meta-batch idiom: K independent inner problems as inner variables with a
    leading axis K) are declared with ``chains=K``: the inner objective then returns the K
    chains' losses L_k and the outer objective their outer losses E_k, both [K] vectors, each
    reading chain k's weights only; the energy is Σ_k L_k and F = (1/K) Σ_k E_p[E_k]. 'score'
    then pools the chains (only each chain's own covariance Cov(E_k, ∂L_k/∂λ) enters) and takes
    its standard errors from their spread, so they fall like 1/√K. Without ``chains`` a tensor-valued objective is summed, as
    with every method. On a meta-batch sharded across D replicas (``far.distribute``) K counts
    the whole meta-batch's chains, each replica's objectives return its K/D, and every replica
    gets the estimate and diagnostics of one device holding the whole meta-batch.

    After each run ``standard_errors`` holds, per inner problem and hyperparameter, the standard
    error of every component, and ``statistics`` the chain's ``ChainStatistics``. A chain has
    visibly not mixed when |drift| > ``DRIFT_LIMIT`` (the mean inner loss of the first half of
    the samples differs from the second's) or it has fewer than ``MIN_EFFECTIVE_SAMPLES``
    effective samples behind the standard errors: the first such run gives a warning with its
    numbers, the next ones are counted in ``not_mixed_runs`` (of ``runs``) and summed up in one
    warning at most every ``SUMMARY_EVERY`` runs.

    Args:
        estimator: 'pathwise', 'score' or 'reversed'. Defaults to `'pathwise'`.
        burn_in: steps discarded at the start of each chain. Defaults to `0`.
        thinning: keep every k-th state. Defaults to `1`.
        batches: rows of the standard errors (at least 2): batches of consecutive samples, or
            for 'score' with K ≥ 2 chains groups of chains (each chain its own when K ≤
            ``batches``). Defaults to `20`.
        warm_start: start each chain from the previous run's last state instead of Φ₀ (the
            chain goes on; ``burn_in`` may then be small). Defaults to `False`.
        chains: K, the number of chains stacked on the leading axis of the inner variables,
            whose losses the objectives return as [K] vectors (under a strategy: the meta-batch's
            K, a multiple of the D replicas, each returning [K/D]); `None` for scalar objectives.
            Defaults to `None`.
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

    settings = (
        Setting("estimator", str, "pathwise", "the Monte-Carlo estimator: pathwise (one tangent per scalar "
                "hyperparameter), or reversed and score (O(|w| + |λ|)).", choices=ESTIMATORS),
        Setting("burn_in", int, 0, "chain steps discarded before the samples (of T).", low=0),
        Setting("warm_start", bool, False, "start each chain where the last one ended (less burn-in)."),
        Setting("temperature", float, 1.0, "τ, the temperature of the Langevin chain (of its far.SGLDOptimizer).",
                low=0.0, flag="temperature", inner=True))

    def __init__(self, estimator: str = "pathwise", burn_in: int = 0, thinning: int = 1, batches: int = 20,
                 warm_start: bool = False, chains: Optional[int] = None, name: str = "StochasticHG"):
        super().__init__(name)
        if estimator not in ESTIMATORS:
            raise ValueError(f"StochasticHG: `estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
        for argument, value, low in (("burn_in", burn_in, 0), ("thinning", thinning, 1), ("batches", batches, 2)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"StochasticHG: `{argument}` must be an int ≥ {low}, got {value!r}.")
        if chains is not None and (isinstance(chains, bool) or not isinstance(chains, (int, np.integer)) or chains < 1):
            raise ValueError(f"StochasticHG: `chains` must be None or an int ≥ 1, got {chains!r}.")
        self.estimator, self.burn_in, self.thinning, self.batches = estimator, int(burn_in), int(thinning), int(batches)
        self.chains = None if chains is None else int(chains)
        self.batch_means = estimator != "score" or (self.chains or 1) == 1  # else the spread across chains
        self.uses_previous = bool(warm_start)
        self.differentiates_dynamics = estimator == "pathwise"
        self.unconnected_hint = ("" if estimator == "pathwise" else
                                 f" StochasticHG('{estimator}') differentiates λ in the objectives only: use "
                                 f"'pathwise' for the SGLD optimizer's parameters or Φ₀.")
        self.standard_errors: list = []
        self.statistics: list[dict] = []
        self.runs, self.not_mixed_runs = 0, 0  # runs, and those where a chain had not mixed
        self._unreported: list[dict] = []  # the statistics of not-mixed chains since the last warning

    def _settings(self) -> dict:
        return {"estimator": self.estimator, "burn_in": self.burn_in, "thinning": self.thinning,
                "batches": self.batches, "warm_start": self.uses_previous, "chains": self.chains}

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
                                        thinning=self.thinning, batches=self.batches, chains=self.chains,
                                        initial_state=previous.state if previous is not None else None,
                                        offset=offset)

    def health(self, result: RunResult) -> tf.Tensor:
        """The standard errors finite."""
        errors = [tf.reduce_all(tf.math.is_finite(e)) for e in result.carry.standard_errors if e is not None]
        return tf.reduce_all(tf.stack(errors)) if errors else tf.constant(True)

    def report(self, results: list[RunResult], moved: Optional[float], global_step: int) -> None:
        """The standard errors and chain statistics; a warning for the first chain that visibly
        has not mixed, then counts."""
        super().report(results, moved, global_step)
        self.standard_errors = [[None if e is None else e.numpy() for e in r.carry.standard_errors] for r in results]
        self.statistics = [{field: float(value.numpy()) for field, value in r.carry.statistics._asdict().items()}
                           for r in results]
        self.runs += 1
        unmixed = [(k, s) for k, s in enumerate(self.statistics) if visibly_not_mixed(s, self.batch_means)]
        if unmixed:
            self.not_mixed_runs += 1
        if unmixed and self.not_mixed_runs == 1:
            k, s = unmixed[0]
            where = f" of inner problem {k}" if len(results) > 1 else ""
            effective, samples = effective_samples(s, self.batch_means)
            each = " of each chain" if self.batch_means and s["chains"] > 1 else ""
            warnings.warn(f"{self.name}: the chain{where} has visibly not mixed at hyper-iteration "
                          f"{global_step}: the mean inner loss moved by {s['drift']:.1f} standard errors "
                          f"between the first and the second half of the samples, and {effective:.0f} of "
                          f"{samples:.0f} samples{each} are effective. The hypergradient and its standard "
                          f"errors are unreliable: raise `burn_in` or T, or the step size. Further such runs "
                          f"are counted in `not_mixed_runs`.", RuntimeWarning, stacklevel=3)
        elif unmixed:
            self._unreported += [s for _, s in unmixed]
        if self._unreported and self.runs % SUMMARY_EVERY == 0:
            worst = max(abs(s["drift"]) for s in self._unreported)
            fewest = min(effective_samples(s, self.batch_means)[0] for s in self._unreported)
            warnings.warn(f"{self.name}: {len(self._unreported)} more chains had not mixed by hyper-iteration "
                          f"{global_step} ({self.not_mixed_runs} of {self.runs} runs so far): up to {worst:.1f} "
                          f"standard errors of drift, down to {fewest:.0f} effective samples.",
                          RuntimeWarning, stacklevel=3)
            self._unreported = []
