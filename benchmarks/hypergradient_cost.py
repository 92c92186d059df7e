"""Cost of one reverse-mode hypergradient: far_ho2 ``ReverseHG`` against the plain inner loop and JAX.

The problem is the hyper-representation ridge regression of Franceschi et al. (ICML 2018,
Example 3.4 and §5.1), with the paper's shape: d = 256 features, c = 100 classes, 3 training and
3 validation examples per class (n = 300 each), x = class mean + noise, Y one-hot:

    L(w, λ) = ½‖X H w − Y‖² + (ρ/2)‖w‖²,           λ = (H, log ρ),  H ∈ R^{256×256}, ρ = 0.1
    E(w, λ) = ½‖Xv H w − Yv‖²                        (E reads H directly as well)
    w_0 = 0,   w_{t+1} = w_t − η ∇_w L(w_t, λ),      t = 0 … T−1,   w ∈ R^{256×100}
    η = 1/ℒ,   ℒ = σ_max(X H_0)² + ρ                 (the smoothness constant of L; fixed, not learned)
    hypergradient  g_T = d E(w_T(λ), λ) / dλ         (by reverse mode through the T steps)

The inner gradient ∇_w L is taken by autodiff, as a generic library does. Every subject runs in
float32 on the same arrays (NumPy seed 0). Subjects, each timed in its own process:

* ``far_ho2``: ``HyperOptimizer.run(T, batch, _skip_hyper_ts=True)`` with ``features=`` (X·H is
  evaluated once per run) and ``far.ReverseHG()``, which unrolls runs of T ≤ 16 steps into the
  graph keeping each step's tape and runs longer ones in a compiled loop storing one state per
  step; ``far_ho2_nofeat``: the same problem written without ``features=``;
  ``far_ho2_unrolled``: ``far.ReverseHG(unroll=T)``, measured where T > 16 (it is ``far_ho2``
  below); ``far_ho2_xla``: ``far.ReverseHG(jit_compile=True)``, compiled by XLA.
* ``far_ho2_vs_jax`` / ``far_ho2_xla_vs_jax``: ``far_ho2`` / ``far_ho2_xla`` and ``jax_hoisted``
  built in one process and called alternately; the median ratio of adjacent calls is the
  side-by-side far_ho2 / JAX figure (the medians of separate processes drift by up to 25 % on
  this shared machine).
* ``inner`` / ``inner_nofeat``: ``InnerProblem.run(T, batch)`` of the same problems: the T-step
  inner loop alone, compiled, without hypergradient. The cheap-gradient principle bounds the
  hypergradient's cost by a small multiple of it (target: ≤ 3).
* ``jax_naive`` / ``jax_hoisted``: ``jax.jit(jax.value_and_grad(E(w_T)))`` through
  ``lax.fori_loop``, with X·H inside the loop body / computed once before the loop.
* ``jax_inner``: ``jax.jit`` of the hoisted T-step inner loop alone, for JAX's own
  hypergradient / inner-loop ratio: how much of the ratio is the algorithm (reverse mode through
  T steps of GD costs a Hessian-vector and a mixed product per step, about three inner steps),
  not the library.

The side-by-side processes also report the arithmetic (``flops_per_call``: the matrix products
of one hypergradient, counted, the same for both) over the time, next to this machine's peak
measured in the same process (``harness.peak_gflops``: one 2048³ float32 product), the step's
products alone in TensorFlow and in JAX (``product_rates``: chains of dependent products of the
problem's shapes, the bound of the ratio where both run the same products), and where
far_ho2's time goes: TensorFlow's profiler over its calls, the op time per part of the
computation (the library's name scopes: the features X·H, the inner run, the outer objective,
the reverse pass, the guard) and the time outside the graph (Python and dispatch); with
``--side-by-side`` only these processes run (``far.ReverseHG()`` and, above T = 16,
``far.ReverseHG(unroll=T)``), a few minutes in all.

Reported per T: median ms per call (after warm-up calls), ratios, ms per inner step, peak memory
(peak RSS above the process's baseline after imports and data set-up, one fresh process per
subject and T), the memory growth per inner step between the two largest T in units of one
inner state (w: 256×100 float32 = 0.1 MB; Algorithm 1 stores one state per step), and the
relative errors ‖g_T − g‖/‖g‖ of the hypergradients to the float64 closed forms of
``far_ho2.oracles.unrolled_ridge``: the exact bilevel hypergradient (T → ∞) and the exact unrolled
hypergradient of the same T (float32 round-off, ~1e-5: it checks the fast path).

Run from the repository root (about 20 minutes on 2 cores: 112 processes; JAX is optional,
``pip install -e .[bench]``):

    python -m benchmarks.hypergradient_cost                     # T ∈ {1, 4, 16, 64, 256}
    python -m benchmarks.hypergradient_cost --steps 16 256 1024 --rounds 3
    python -m benchmarks.hypergradient_cost --quick             # smoke run: T ∈ {1, 4}, 1 repeat
    python -m benchmarks.hypergradient_cost --side-by-side --steps 16 64 256   # ratios, peak, profile

Between T = 64 and 256 the stored states grow by only 19 MB, about the size of the RSS noise, so
the hypergradient subjects also run once at the larger ``--memory-steps`` (default 1024 and 2048;
pass the flag with no value to skip), and the memory growth per step is read between the two
largest T measured. These processes run with glibc's ``MALLOC_ARENA_MAX=1``: with the default
per-thread arenas the peak RSS of identical far_ho2 runs at T ≥ 1024 varied by ±60 MB (it depends
on which thread frees which buffer), more than the growth being measured; with one arena it
repeats to ±3 MB. JAX's peaks are the same either way.

Progress goes to stderr, the tables to stdout; the results are written to
``benchmarks/results/hypergradient_cost[_quick].{csv,json}``. The worker mode
(``--worker SUBJECT --steps T``) is internal: it prints one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/hypergradient_cost.py`: the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from benchmarks.harness import fmt, max_rss_mb, relative_error, table, timed  # noqa: E402

D, C, PER_CLASS, RHO = 256, 100, 3, 0.1
STATE_MB = D * C * 4 / 2**20  # one inner state w, float32, in MiB
DEFAULT_STEPS, QUICK_STEPS = (1, 4, 16, 64, 256), (1, 4)
DEFAULT_MEMORY_STEPS = (1024, 2048)  # one process each, for the memory growth per step
HYPERGRADIENT_SUBJECTS = ("far_ho2", "far_ho2_xla", "jax_naive", "jax_hoisted")  # at --memory-steps
MEMORY_ENV = {"MALLOC_ARENA_MAX": "1"}  # for the --memory-steps processes (see the docstring)
# After the first (tracing) call, warm-up calls for this long: TF's first calls after tracing are
# up to 2x slower than its steady state, JAX's are not. Then at least `--repeats` timed calls, and
# more for fast calls, up to this many seconds or calls.
WARMUP_SECONDS, TIMED_SECONDS, MAX_TIMED_CALLS = 0.3, 0.5, 100

# Targets (see the module docstring); timings on this shared 2-core machine drift by up to 25 %.
MAX_COST_RATIO = 3.0  # hypergradient / inner loop: the cheap-gradient bound
NOISE = 1.25  # a far_ho2 / JAX ratio up to this is "the same" on this machine
DEFAULT_UNROLL = 16  # far.ReverseHG() unrolls T ≤ 16: far_ho2_unrolled differs from far_ho2 only above
MAX_STATES_PER_STEP = 1.5  # "about one state per step"
MAX_UNROLLED_ERROR = 1e-4  # float32 against the float64 closed form of the same T (expected ~1e-5)
MIN_RESOLVABLE_MB = 50.0  # RSS peaks vary by ~10 MB between runs: resolve growth ≥ 5x that
ZERO = 1e-12  # a float64 reference hypergradient this small is zero up to round-off


# -- the problem, shared by every subject ----------------------------------------------------------

class Problem(NamedTuple):
    """The float32 arrays every subject reads, and the fixed scalars."""

    X: np.ndarray  # training inputs, n × d
    Y: np.ndarray  # one-hot training targets, n × c
    Xv: np.ndarray  # validation inputs
    Yv: np.ndarray  # one-hot validation targets
    H0: np.ndarray  # the hyperparameter H, d × d, near the identity
    log_rho: np.float32  # the hyperparameter log ρ
    eta: np.float32  # the inner learning rate η = 1/ℒ (fixed)


def make_problem(seed: int = 0) -> Problem:
    """The §5.1 shape: class means ~ N(0, I/d), x = mean + N(0, I/(4d)), H_0 = I + N(0, 0.01·I/d)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(C, D)) / np.sqrt(D)

    def split() -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(C), PER_CLASS)
        x = means[labels] + 0.5 / np.sqrt(D) * rng.normal(size=(len(labels), D))
        return x.astype(np.float32), np.eye(C, dtype=np.float32)[labels]

    (X, Y), (Xv, Yv) = split(), split()
    H0 = (np.eye(D) + 0.1 / np.sqrt(D) * rng.normal(size=(D, D))).astype(np.float32)
    smoothness = np.linalg.norm(X.astype(np.float64) @ H0, ord=2) ** 2 + RHO
    return Problem(X, Y, Xv, Yv, H0, np.float32(np.log(RHO)), np.float32(1.0 / smoothness))


def inner_objective(Z: Any, w: Any, Y: Any, rho: Any, reduce_sum: Callable) -> Any:
    """L = ½‖Z w − Y‖² + (ρ/2)‖w‖² with Z = X H, for TF and JAX alike."""
    return 0.5 * reduce_sum((Z @ w - Y) ** 2) + 0.5 * rho * reduce_sum(w ** 2)


def outer_objective(Zv: Any, w: Any, Yv: Any, reduce_sum: Callable) -> Any:
    """E = ½‖Zv w − Yv‖² with Zv = Xv H."""
    return 0.5 * reduce_sum((Zv @ w - Yv) ** 2)


def load_oracles() -> Any:
    """``far_ho2.oracles`` (NumPy only) without importing the package, which imports TensorFlow:
    JAX workers stay free of TF."""
    package_dir = importlib.util.find_spec("far_ho2").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("far_ho2_oracles", Path(package_dir) / "oracles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_hypergradient(problem: Problem, steps: Optional[int]) -> tuple[np.ndarray, float]:
    """(dE/dH, dE/dlog ρ) in float64 on the same (float32-rounded) numbers; ``steps=None``: the
    exact bilevel hypergradient (T → ∞), else the exact hypergradient of T unrolled steps."""
    oracles = load_oracles()
    data = oracles.RidgeData(*(a.astype(np.float64) for a in problem[:4]))
    rho = float(np.exp(np.float64(problem.log_rho)))
    exact = oracles.unrolled_ridge(data, problem.H0.astype(np.float64), rho, float(problem.eta), steps)
    return exact.H, rho * exact.rho  # dE/dlog ρ = ρ·dE/dρ


# -- the subjects ------------------------------------------------------------------------------------

class Built(NamedTuple):
    """A subject ready to run: ``call()`` does one measured call and returns when its result is
    computed; ``hypergradient()`` reads (dE/dH, dE/dlog ρ) of the last call (None: not a
    hypergradient)."""

    call: Callable[[], None]
    hypergradient: Optional[Callable[[], tuple[np.ndarray, float]]]


def build_far_ho2(problem: Problem, steps: int, *, features: bool, hypergradient: bool,
                  unroll: Optional[int] = None, jit_compile: bool = False) -> Built:
    """The problem through far_ho2's public API, as a user writes it: hyperparameters from
    ``far.get_hyperparameter``, objectives as closures over the variables, the training batch fed
    to ``run``. With ``features``, X·H is a feature map evaluated once per run; ``unroll`` and
    ``jit_compile`` are ``ReverseHG``'s (default: the library's)."""
    import far_ho2 as far  # before TensorFlow, as users are told to (far_ho2.cpu_kernels)
    import keras
    import tensorflow as tf

    X, Y, Xv, Yv = (tf.constant(a) for a in problem[:4])
    H = far.get_hyperparameter("H", problem.H0)
    log_rho = far.get_hyperparameter("log_rho", problem.log_rho)
    w = tf.Variable(tf.zeros((D, C)), name="w")
    if features:
        feature_map = lambda batch: (batch[0] @ H, batch[1])  # noqa: E731
        inner = lambda f: inner_objective(f[0], w, f[1], tf.exp(log_rho), tf.reduce_sum)  # noqa: E731
    else:
        feature_map = None
        inner = lambda b: inner_objective(b[0] @ H, w, b[1], tf.exp(log_rho), tf.reduce_sum)  # noqa: E731
    outer = lambda: outer_objective(Xv @ H, w, Yv, tf.reduce_sum)  # noqa: E731

    options = {"jit_compile": jit_compile, **({} if unroll is None else {"unroll": unroll})}
    ho = far.HyperOptimizer(far.ReverseHG(**options))
    inner_problem = ho.inner_problem(inner, far.GradientDescentOptimizer(float(problem.eta)),
                                     var_list=[w], features=feature_map)
    ho.outer_problem(outer, inner_problem, keras.optimizers.SGD(0.0), hyper_list=[H, log_rho])
    run = ho.finalize()
    batch = (X, Y)

    def call() -> None:  # both calls end with .numpy() checks: the result is computed on return
        if hypergradient:
            run(steps, batch, _skip_hyper_ts=True)
        else:
            inner_problem.run(steps, batch)

    def read() -> tuple[np.ndarray, float]:
        grads = {id(v): g for g, v in ho.hypergradients()}
        return grads[id(H)].numpy(), float(grads[id(log_rho)])
    return Built(call, read if hypergradient else None)


def build_jax(problem: Problem, steps: int, *, hoist: bool, hypergradient: bool = True) -> Built:
    """``jit(value_and_grad)`` of E(w_T) through ``lax.fori_loop``; ``hoist`` computes X·H once
    before the loop instead of in every step's body. ``hypergradient=False``: ``jit`` of the
    inner loop alone (w_T)."""
    import jax
    import jax.numpy as jnp

    X, Y, Xv, Yv, H0 = (jnp.asarray(a) for a in problem[:5])
    log_rho0, eta = jnp.asarray(problem.log_rho), float(problem.eta)
    inner_gradient = jax.grad(inner_objective, argnums=1)

    def inner_loop(H: jax.Array, log_rho: jax.Array) -> jax.Array:
        rho = jnp.exp(log_rho)
        Z = X @ H if hoist else None

        def step(_: int, w: jax.Array) -> jax.Array:
            return w - eta * inner_gradient(Z if hoist else X @ H, w, Y, rho, jnp.sum)
        return jax.lax.fori_loop(0, steps, step, jnp.zeros((D, C), X.dtype))

    if not hypergradient:
        compiled_loop = jax.jit(inner_loop)

        def call_loop() -> None:
            jax.block_until_ready(compiled_loop(H0, log_rho0))
        return Built(call_loop, None)

    def validation_loss(H: jax.Array, log_rho: jax.Array) -> jax.Array:
        return outer_objective(Xv @ H, inner_loop(H, log_rho), Yv, jnp.sum)

    value_and_grad = jax.jit(jax.value_and_grad(validation_loss, argnums=(0, 1)))
    last: list = []

    def call() -> None:
        last[:] = [jax.block_until_ready(value_and_grad(H0, log_rho0)[1])]
    return Built(call, lambda: (np.asarray(last[0][0]), float(last[0][1])))


class Subject(NamedTuple):
    framework: str  # the distribution the subject needs
    label: str
    build: Callable[[Problem, int], Built]


def reverse_hg(jit_compile: bool = False) -> Callable[[Problem, int], Built]:
    """The builder of ``far.ReverseHG(jit_compile=...)`` with ``features=``."""
    return lambda p, T: build_far_ho2(p, T, features=True, hypergradient=True, jit_compile=jit_compile)


SUBJECTS: dict[str, Subject] = {
    "far_ho2": Subject("tensorflow-cpu", "far_ho2 ReverseHG, features=", reverse_hg()),
    "far_ho2_unrolled": Subject("tensorflow-cpu", "far_ho2 ReverseHG(unroll=T), features=",
                                lambda p, T: build_far_ho2(p, T, features=True, hypergradient=True, unroll=T)),
    "far_ho2_xla": Subject("tensorflow-cpu", "far_ho2 ReverseHG(jit_compile=True), features=",
                           reverse_hg(jit_compile=True)),
    "far_ho2_vs_jax": Subject("jax", "far_ho2 ReverseHG and JAX hoisted, alternating in one process",
                              reverse_hg()),
    "far_ho2_xla_vs_jax": Subject("jax", "far_ho2 ReverseHG(jit_compile=True) and JAX hoisted, "
                                  "alternating in one process", reverse_hg(jit_compile=True)),
    "far_ho2_unrolled_vs_jax": Subject("jax", "far_ho2 ReverseHG(unroll=T) and JAX hoisted, alternating in one "
                                       "process", lambda p, T: build_far_ho2(p, T, features=True, hypergradient=True,
                                                                             unroll=T)),
    "far_ho2_nofeat": Subject("tensorflow-cpu", "far_ho2 ReverseHG, X·H in L",
                              lambda p, T: build_far_ho2(p, T, features=False, hypergradient=True)),
    "inner": Subject("tensorflow-cpu", "far_ho2 InnerProblem.run, features=",
                     lambda p, T: build_far_ho2(p, T, features=True, hypergradient=False)),
    "inner_nofeat": Subject("tensorflow-cpu", "far_ho2 InnerProblem.run, X·H in L",
                            lambda p, T: build_far_ho2(p, T, features=False, hypergradient=False)),
    "jax_naive": Subject("jax", "JAX jit(grad) fori_loop, X·H in body",
                         lambda p, T: build_jax(p, T, hoist=False)),
    "jax_hoisted": Subject("jax", "JAX jit(grad) fori_loop, X·H hoisted",
                           lambda p, T: build_jax(p, T, hoist=True)),
    "jax_inner": Subject("jax", "JAX jit fori_loop inner loop alone, X·H hoisted",
                         lambda p, T: build_jax(p, T, hoist=True, hypergradient=False)),
}


# -- the worker: one subject, one T, in a fresh process ------------------------------------------------

@dataclasses.dataclass
class Measurement:
    subject: str
    steps: int
    round: int
    times_ms: list[float]  # the timed calls, after the warm-up calls
    first_call_s: float  # trace/compile + run
    baseline_mb: float  # max RSS after imports, data and set-up
    memory_mb: float  # peak RSS above the baseline
    error_exact_H: Optional[float] = None  # relative errors of the hypergradient
    error_exact_log_rho: Optional[float] = None
    error_unrolled_H: Optional[float] = None
    error_unrolled_log_rho: Optional[float] = None
    load_average: float = 0.0  # 1-min load average at the end of the timed calls (other processes)
    malloc_arena_max: Optional[str] = None  # the process's MALLOC_ARENA_MAX (None: glibc's default)
    ratios: Optional[list[float]] = None  # *_vs_jax: far_ho2 / JAX of each pair of adjacent calls
    jax_times_ms: Optional[list[float]] = None  # *_vs_jax: JAX's calls, adjacent to ``times_ms``
    peak_gflops: Optional[float] = None  # *_vs_jax: the machine's measured peak (harness.peak_gflops)
    profile: Optional[dict] = None  # *_vs_jax: harness.Profile of far_ho2's calls
    product_gflops: Optional[dict] = None  # far_ho2_vs_jax: product_rates(), chain -> [TensorFlow, JAX]


def measure_side_by_side(subject: str, steps: int, repeats: int, round_: int) -> Measurement:
    """far_ho2 (``subject``'s ``ReverseHG``) and JAX (hoisted) built in one process and called
    alternately: the ratio of two adjacent calls cancels the drifts of the shared machine, which
    move the medians of separate processes by up to 25 %. ``times_ms`` are far_ho2's."""
    problem = make_problem()
    far, jax_ = SUBJECTS[subject].build(problem, steps), build_jax(problem, steps, hoist=True)
    for built in (far, jax_):
        built.call()
        warm_until = time.perf_counter() + WARMUP_SECONDS
        while time.perf_counter() < warm_until:
            built.call()
    far_ms, jax_ms, timed_until = [], [], time.perf_counter() + 2 * TIMED_SECONDS
    while len(far_ms) < repeats or (time.perf_counter() < timed_until and len(far_ms) < MAX_TIMED_CALLS):
        far_ms.append(1e3 * timed(far.call))
        jax_ms.append(1e3 * timed(jax_.call))
    where = harness.profile(far.call, max(3, min(PROFILE_CALLS, int(2e3 / statistics.median(far_ms)))),
                            PROFILE_CATEGORIES)
    return Measurement(subject, steps, round_, far_ms, 0.0, 0.0, 0.0, load_average=os.getloadavg()[0],
                       ratios=[f / j for f, j in zip(far_ms, jax_ms)], jax_times_ms=jax_ms,
                       peak_gflops=harness.peak_gflops(), profile=dataclasses.asdict(where),
                       product_gflops=product_rates(problem) if subject == "far_ho2_vs_jax" else None)


CHAIN_PAIRS, CHAIN_CALLS = 32, 15  # product_rates: 64 dependent products per call, median of 15 calls
PRODUCT_CHAINS = {"Zᵀ(Z·v)": "n×d·d×c, then d×n·n×c (transposed Z)", "(r·wᵀ)·w": "n×c·c×d, then n×d·d×c"}


def product_rates(problem: Problem) -> dict[str, list[float]]:
    """GFLOP/s of the step's matrix products alone, in TensorFlow (oneDNN) and JAX (XLA), called
    alternately in this process: chains of 2·``CHAIN_PAIRS`` dependent products of the problem's
    shapes with no other operation, v ← Zᵀ(Z·v) (the Hessian-vector pair of the reverse pass and
    the forward step's pair) and r ← (r·wᵀ)·w (the mixed ∂/∂Z form, then the forward form); Z and
    w are scaled to unit spectral norm so that the chains stay normal numbers. Where both run the
    same products, as at T ≤ 16, the ratio of these rates bounds far_ho2 / JAX."""
    import jax
    import jax.numpy as jnp
    import tensorflow as tf

    Z = (problem.X @ problem.H0).astype(np.float64)
    Z = (Z / np.linalg.norm(Z, ord=2)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(D, C))
    w = (w / np.linalg.norm(w, ord=2)).astype(np.float32)
    v, r = np.ones((D, C), np.float32), np.ones((C * PER_CLASS, C), np.float32)

    def hvp_chain(matmul: Callable, Z: Any, v: Any) -> Any:
        for _ in range(CHAIN_PAIRS):
            v = matmul(Z, matmul(Z, v), transpose_a=True)
        return v[0, 0]

    def mixed_chain(matmul: Callable, w: Any, r: Any) -> Any:
        for _ in range(CHAIN_PAIRS):
            r = matmul(matmul(r, w, transpose_b=True), w)
        return r[0, 0]

    def jax_matmul(a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        return (a.T if transpose_a else a) @ (b.T if transpose_b else b)

    flops = 2 * CHAIN_PAIRS * 2.0 * C * PER_CLASS * D * C

    def rates(chain: Callable, args: tuple) -> list[float]:
        tf_call = tf.function(lambda *a: chain(tf.linalg.matmul, *a), autograph=False)
        jax_call = jax.jit(lambda *a: chain(jax_matmul, *a))
        tf_args, jax_args = [tf.constant(a) for a in args], [jnp.asarray(a) for a in args]
        calls = (lambda: tf_call(*tf_args).numpy(), lambda: jax_call(*jax_args).block_until_ready())
        for call in calls:
            call()
        times = [[timed(call) for call in calls] for _ in range(CHAIN_CALLS)]
        return [flops / statistics.median(t[i] for t in times) / 1e9 for i in range(2)]
    return {"Zᵀ(Z·v)": rates(hvp_chain, (Z, v)), "(r·wᵀ)·w": rates(mixed_chain, (w, r))}


PROFILE_CALLS = 20  # far_ho2 calls under TensorFlow's profiler (fewer above 2 s of calls)
# By name scope (see harness.profile). Unrolled steps (T ≤ 16, unroll=T): their inner gradients and
# the reverse pass through them are both gradients of the steps' ops, named alike: one category.
PROFILE_CATEGORIES = [("features X·H and their pull-back", "features/"),
                      ("unrolled steps' gradients (inner and reverse)", "^gradient_tape/(gradient_tape/)?inner_run/"),
                      ("reverse pass", "^reverse_pass/"), ("inner run (forward)", "inner_run/"),
                      ("outer objective E", "outer/"), ("guard", "guard/"), ("update", "update/")]


def flops_per_call(steps: int) -> float:
    """The products of one hypergradient, counted (multiply-adds as 2 operations), the same for
    every subject: per step 2 products of n×d by d×c forward (Z·w, Zᵀ·r) and 4 backward (the
    Hessian-vector product Zᵀ(Z·v) and the mixed ∂/∂Z: r·vᵀ, Z·v·wᵀ); once, Z = X·H and Xv·H and
    their two backward products for ∂/∂H. Element-wise work is not counted."""
    n = C * PER_CLASS
    return steps * 6 * (2.0 * n * D * C) + 4 * (2.0 * n * D * D)


def measure(subject: str, steps: int, repeats: int, round_: int = 0) -> Measurement:
    """The first call, warm-up calls, timed calls (see ``WARMUP_SECONDS``), peak memory; then
    (outside the measurement) the hypergradient's errors against the float64 references."""
    if subject.endswith("_vs_jax"):
        return measure_side_by_side(subject, steps, repeats, round_)
    problem = make_problem()
    built = SUBJECTS[subject].build(problem, steps)
    baseline = max_rss_mb()
    first = timed(built.call)
    warm_until = time.perf_counter() + WARMUP_SECONDS
    built.call()
    while time.perf_counter() < warm_until:
        built.call()
    times, timed_until = [], time.perf_counter() + TIMED_SECONDS
    while len(times) < repeats or (time.perf_counter() < timed_until and len(times) < MAX_TIMED_CALLS):
        times.append(1e3 * timed(built.call))
    result = Measurement(subject, steps, round_, times, first, baseline, max_rss_mb() - baseline,
                         load_average=os.getloadavg()[0], malloc_arena_max=os.environ.get("MALLOC_ARENA_MAX"))
    if built.hypergradient is not None:
        dH, dlog_rho = built.hypergradient()
        for name, reference_steps in (("exact", None), ("unrolled", steps)):
            ref_H, ref_log_rho = reference_hypergradient(problem, reference_steps)
            setattr(result, f"error_{name}_H", relative_error(dH, ref_H))
            setattr(result, f"error_{name}_log_rho", relative_error(dlog_rho, ref_log_rho))
    return result


def run_worker(subject: str, steps: int, repeats: int, round_: int, env: Optional[dict] = None) -> Measurement:
    """``measure`` in a fresh Python process, so that memory baselines and peaks are its own;
    ``env`` adds environment variables."""
    arguments = ["--worker", subject, "--steps", str(steps), "--repeats", str(repeats), "--round", str(round_)]
    return Measurement(**harness.run_worker("hypergradient_cost", arguments, f"{subject} T={steps}",
                                            harness.worker_env(**(env or {}))))


# -- the driver: interleaved rounds, then tables -------------------------------------------------------

def available_subjects() -> list[str]:
    has_jax = importlib.util.find_spec("jax") is not None
    return [name for name, s in SUBJECTS.items() if s.framework != "jax" or has_jax]


def run_all(subjects: Sequence[str], steps: Sequence[int], repeats: int, rounds: int,
            memory_steps: Sequence[int] = ()) -> list[Measurement]:
    """Every (subject, T) once per round. Subjects alternate at each T and their order flips
    every round, so slow drifts of the shared machine hit them alike. Then the hypergradient
    subjects once at each of ``memory_steps`` (one timed call, one malloc arena: for memory)."""
    schedule = [(r, T, name, repeats, None) for r in range(rounds) for T in steps
                for name in (subjects if r % 2 == 0 else list(reversed(subjects)))
                if not name.startswith("far_ho2_unrolled") or T > DEFAULT_UNROLL]
    schedule += [(0, T, name, 1, MEMORY_ENV) for T in memory_steps for name in subjects
                 if name in HYPERGRADIENT_SUBJECTS]
    results, start = [], time.perf_counter()
    for i, (r, T, name, calls, env) in enumerate(schedule, 1):
        m = run_worker(name, T, calls, r, env)
        results.append(m)
        print(f"[{i:3d}/{len(schedule)}] {'memory ' if T in memory_steps else f'round {r + 1}/{rounds}'}  "
              f"T={T:<5d} {name:<15s} {statistics.median(m.times_ms):9.2f} ms  first {m.first_call_s:5.2f} s  "
              f"+{m.memory_mb:6.1f} MB  load {m.load_average:4.2f}  ({time.perf_counter() - start:4.0f} s)",
              file=sys.stderr, flush=True)
    return results


class Summary(NamedTuple):
    """One (subject, T) over all rounds."""

    subject: str
    steps: int
    ms: float  # median over every timed call of every round
    ms_per_step: float
    first_call_s: float  # median over rounds
    memory_mb: float  # median over rounds
    samples: int
    load_average: float  # mean over rounds of the 1-min load average (other processes)
    error_exact_H: Optional[float]
    error_exact_log_rho: Optional[float]
    error_unrolled_H: Optional[float]
    error_unrolled_log_rho: Optional[float]
    side_by_side: Optional[float] = None  # *_vs_jax: median far_ho2 / JAX of adjacent calls


def summarize(results: Sequence[Measurement]) -> dict[tuple[str, int], Summary]:
    groups: dict[tuple[str, int], list[Measurement]] = {}
    for m in results:
        groups.setdefault((m.subject, m.steps), []).append(m)
    out = {}
    for (name, T), ms in groups.items():
        times = [t for m in ms for t in m.times_ms]
        median = statistics.median(times)
        out[name, T] = Summary(name, T, median, median / T, statistics.median(m.first_call_s for m in ms),
                               statistics.median(m.memory_mb for m in ms), len(times),
                               statistics.mean(m.load_average for m in ms),
                               ms[0].error_exact_H, ms[0].error_exact_log_rho,
                               ms[0].error_unrolled_H, ms[0].error_unrolled_log_rho,
                               statistics.median(r for m in ms for r in m.ratios) if ms[0].ratios else None)
    return out


def best_jax(summary: dict, T: int) -> Optional[Summary]:
    candidates = [summary[n, T] for n in ("jax_naive", "jax_hoisted") if (n, T) in summary]
    return min(candidates, key=lambda s: s.ms) if candidates else None


class Growth(NamedTuple):
    """Memory growth per inner step between the two largest T measured for a subject."""

    low: int
    high: int
    states_per_step: float  # in inner states (w, 0.1 MB)
    resolvable: bool  # the stored states alone would grow by ≥ MIN_RESOLVABLE_MB


def memory_growth(summary: dict, name: str) -> Optional[Growth]:
    steps = sorted(T for n, T in summary if n == name)
    if len(steps) < 2:
        return None
    low, high = summary[name, steps[-2]], summary[name, steps[-1]]
    per_step = (high.memory_mb - low.memory_mb) / (high.steps - low.steps) / STATE_MB
    return Growth(low.steps, high.steps, per_step, (high.steps - low.steps) * STATE_MB >= MIN_RESOLVABLE_MB)


def verdict(ok: bool, near: bool = False) -> str:
    return "PASS" if ok else ("PASS~" if near else "FAIL")


class Report(NamedTuple):
    """A section of the printed report and its verdicts."""

    lines: list[str]
    verdicts: dict[str, str]


def overall(verdicts: Sequence[str]) -> str:
    return "FAIL" if "FAIL" in verdicts else "PASS~" if "PASS~" in verdicts else "PASS"


def header(info: dict, problem: Problem, args: argparse.Namespace, has_jax: bool) -> list[str]:
    lines = [
        "Hypergradient cost: far_ho2 ReverseHG vs the plain inner loop and JAX (Franceschi et al. 2018, §5.1)",
        f"  L = ½‖XHw − Y‖² + (ρ/2)‖w‖²,  E = ½‖XvHw − Yv‖²,  λ = (H ∈ R^{D}×{D}, log ρ),  w ∈ R^{D}×{C}, w0 = 0,",
        f"  n = {C * PER_CLASS} train / {C * PER_CLASS} validation, T steps of GD with η = 1/(σmax(XH0)² + ρ) = "
        f"{problem.eta:.4f}, ρ = {RHO}; float32.",
        f"  Python {info['python']}, TF {info['tensorflow-cpu']}, Keras {info['keras']}, JAX {info['jax']}, "
        f"NumPy {info['numpy']}; {info['cpu_count']} CPUs ({info['cpu']}); 1-min load average "
        f"{info['load_average'][0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end; far_ho2 at "
        f"{info['far_ho2_source']}.",
        f"  Times: median over {args.rounds} round(s) of ≥ {args.repeats} calls (fast calls: {TIMED_SECONDS:g} s of "
        f"calls) after {WARMUP_SECONDS:g} s of warm-up; each (subject, T) in a fresh process, subjects interleaved.",
        "  Memory: peak RSS above the process baseline (after imports and data set-up), same processes.",
    ]
    if not has_jax:
        lines.append("  JAX is not installed: the JAX columns were skipped (pip install -e .[bench]).")
    return lines


def time_section(summary: dict, steps: Sequence[int]) -> Report:
    rows, cost, vs_jax, xla_vs_jax, best_vs_jax = [], [], [], [], []

    def side_by_side(pair: Optional[Summary], verdicts: list) -> str:
        if pair is None:
            return "-"
        verdicts.append(verdict(pair.side_by_side <= 1, pair.side_by_side <= NOISE))
        return f"{pair.side_by_side:.2f} {verdicts[-1]}"

    for T in steps:
        hg, nofeat, inner, inner_nf, naive, hoisted, jax_inner, unrolled, xla = (
            summary.get((n, T)) for n in ("far_ho2", "far_ho2_nofeat", "inner", "inner_nofeat", "jax_naive",
                                          "jax_hoisted", "jax_inner", "far_ho2_unrolled", "far_ho2_xla"))
        best = best_jax(summary, T)
        ratio, ratio_nf = hg.ms / inner.ms, nofeat.ms / inner_nf.ms
        cost.append(verdict(ratio <= MAX_COST_RATIO))
        jax_cell = unrolled_cell = xla_cell = "-"
        if best is not None:
            r = min(s.ms for s in (hg, unrolled, xla) if s is not None) / best.ms
            best_vs_jax.append(verdict(r <= 1, r <= NOISE))
            jax_cell = f"{hg.ms / best.ms:.2f}"
            unrolled_cell = f"{unrolled.ms / best.ms:.2f}" if unrolled else "="
            xla_cell = fmt(xla and xla.ms / best.ms, ".2f")
        pair_cell = side_by_side(summary.get(("far_ho2_vs_jax", T)), vs_jax)
        xla_pair_cell = side_by_side(summary.get(("far_ho2_xla_vs_jax", T)), xla_vs_jax)
        load = statistics.mean(v.load_average for (_, t), v in summary.items() if t == T)
        rows.append([str(T), f"{hg.ms:.2f}", fmt(unrolled and unrolled.ms, ".2f"), fmt(xla and xla.ms, ".2f"),
                     f"{nofeat.ms:.2f}",
                     f"{inner.ms:.2f}", f"{inner_nf.ms:.2f}", f"{ratio:.2f} {cost[-1]}", f"{ratio_nf:.2f}",
                     f"{hg.ms_per_step:.3f}", f"{inner.ms_per_step:.3f}", fmt(naive and naive.ms, ".2f"),
                     fmt(hoisted and hoisted.ms, ".2f"), fmt(jax_inner and jax_inner.ms, ".2f"),
                     fmt(hoisted and jax_inner and hoisted.ms / jax_inner.ms, ".2f"),
                     best.subject.removeprefix("jax_") if best else "-", jax_cell, unrolled_cell, xla_cell,
                     pair_cell, xla_pair_cell, f"{load:.1f}"])
    lines = ["", "Time (ms per call; targets: ReverseHG/inner ≤ 3, far_ho2/JAX ≤ 1; PASS~: within the 25% noise)",
             table(["T", "ReverseHG", "unroll=T", "XLA", "(no feat.)", "inner", "(no feat.)", "HG/inner",
                    "(no feat.)", "HG ms/step", "inner ms/step", "JAX naive", "JAX hoisted", "JAX inner",
                    "JAX HG/inner", "best JAX", "far_ho2/JAX", "unroll=T/JAX", "XLA/JAX", "side by side",
                    "XLA side by side", "load"], rows),
             f"  ReverseHG: far.ReverseHG(), which unrolls T ≤ {DEFAULT_UNROLL} keeping each step's tape and stores "
             "one state per step above;", "  unroll=T: far.ReverseHG(unroll=T) (= ReverseHG where T ≤ "
             f"{DEFAULT_UNROLL});  XLA: far.ReverseHG(jit_compile=True);  (no feat.): the problem written "
             "without features=;",
             "  far_ho2/JAX: medians of separate processes;  side by side: median far_ho2 / JAX hoisted of adjacent "
             "calls in one process;", "  JAX HG/inner: JAX's own ratio (hoisted);  load: mean 1-min load average "
             "of the machine during the measurements (2 CPUs)"]
    return Report(lines, {
        f"ReverseHG / inner loop ≤ {MAX_COST_RATIO:g} at every T": overall(cost),
        "far.ReverseHG() ≤ JAX side by side at every T": overall(vs_jax) if vs_jax else "skipped (no JAX)",
        "ReverseHG(jit_compile=True) ≤ JAX side by side at every T":
            overall(xla_vs_jax) if xla_vs_jax else "skipped (no JAX)",
        "best far_ho2 setting ≤ best JAX at every T": overall(best_vs_jax) if best_vs_jax else
        "skipped (no JAX)"})


def arithmetic_section(results: Sequence[Measurement], steps: Sequence[int]) -> Report:
    """far_ho2 and JAX side by side: time, arithmetic rate, fraction of the machine's peak, and
    where far_ho2's time goes (the ``far_ho2_vs_jax`` processes)."""
    rows, profiles, verdicts = [], [], []
    for T, subject in itertools.product(steps, ("far_ho2_vs_jax", "far_ho2_unrolled_vs_jax")):
        pairs = [m for m in results if m.subject == subject and m.steps == T]
        if not pairs:
            continue
        setting = "unroll=T" if "unrolled" in subject else "default"
        far_ms = statistics.median(t for m in pairs for t in m.times_ms)
        jax_ms = statistics.median(t for m in pairs for t in m.jax_times_ms)
        ratio = statistics.median(r for m in pairs for r in m.ratios)
        peak = statistics.median(m.peak_gflops for m in pairs)
        flops = flops_per_call(T)
        cell = verdict(ratio <= 1, ratio <= NOISE)
        if setting == "default":
            verdicts.append(cell)
        rows.append([str(T), setting, f"{far_ms:.2f}", f"{jax_ms:.2f}", f"{ratio:.3f} {cell}",
                     str(sum(len(m.ratios) for m in pairs)), f"{flops / 1e9:.3f}", f"{flops / far_ms / 1e6:.0f}",
                     f"{flops / jax_ms / 1e6:.0f}", f"{peak:.0f}", f"{flops / far_ms / 1e6 / peak:.0%}",
                     f"{flops / jax_ms / 1e6 / peak:.0%}"])
        profiles.append(f"  T={T:<4d} {setting:<8s} {harness.Profile(**pairs[0].profile).describe()}")
    if not rows:
        return Report([], {})
    lines = ["", "far.ReverseHG() and JAX side by side (one process, alternating calls), and the machine's limit",
             table(["T", "ReverseHG", "far_ho2 ms", "JAX ms", "far_ho2/JAX", "pairs", "GFLOP/call", "far_ho2 GFLOP/s",
                    "JAX GFLOP/s", "peak GFLOP/s", "far_ho2 of peak", "JAX of peak"], rows),
             f"  ReverseHG: far.ReverseHG() (it unrolls T ≤ {DEFAULT_UNROLL}), or far.ReverseHG(unroll=T);"
             " far_ho2/JAX: median ratio of adjacent calls; GFLOP/call: the products of one hypergradient, "
             "counted (flops_per_call);", f"  peak: one {harness.PEAK_SIZE}³ float32 matrix product in "
             "TensorFlow, best of 8, in the same process",
             ""] + product_lines(results) + [
             "", "Where far_ho2's time goes (TensorFlow's profiler; op time adds over the 2 threads, so it can "
             "exceed the wall time):"] + profiles
    return Report(lines, {"far.ReverseHG() ≤ JAX side by side at every T (this section)": overall(verdicts)})


def product_lines(results: Sequence[Measurement]) -> list[str]:
    """The table of ``product_rates`` over the default side-by-side processes (medians)."""
    measured = [m.product_gflops for m in results if m.product_gflops]
    if not measured:
        return []
    rows = []
    for name, shapes in PRODUCT_CHAINS.items():
        tf_rate, jax_rate = (statistics.median(m[name][i] for m in measured) for i in range(2))
        rows.append([name, shapes, f"{tf_rate:.0f}", f"{jax_rate:.0f}", f"{jax_rate / tf_rate:.3f}"])
    return [f"The step's products alone (product_rates: chains of {2 * CHAIN_PAIRS} dependent products, n = "
            f"{C * PER_CLASS}, d = {D}, c = {C}, nothing else; median of {CHAIN_CALLS} alternating calls in "
            f"each of {len(measured)} process(es)):",
            table(["chain", "shapes", "TensorFlow GFLOP/s", "JAX GFLOP/s", "TF time / JAX time"], rows),
            "  Where far_ho2 and JAX run the same products (T ≤ 16, or unroll=T), far_ho2 / JAX cannot go much "
            "below the time ratio of these rates; the rest is the element-wise work, which XLA fuses."]


def memory_section(summary: dict, steps: Sequence[int]) -> tuple[Report, dict]:
    names = [n for n in ("far_ho2", "far_ho2_xla", "far_ho2_nofeat", "inner", "inner_nofeat", "jax_naive",
                         "jax_hoisted", "jax_inner")
             if (n, steps[0]) in summary]
    all_steps = sorted({T for _, T in summary})
    rows = [[f"{T}{'' if T in steps else '*'}"] + [fmt(summary[n, T].memory_mb if (n, T) in summary else None, ".1f")
                                                   for n in names] for T in all_steps]
    growth = {n: memory_growth(summary, n) for n in names}
    rows.append(["states/step"] + [f"{g.states_per_step:.2f}" if g and g.resolvable else "n/a"
                                   for g in growth.values()])
    rows.append(["between T"] + [f"{g.low}→{g.high}" if g else "-" for g in growth.values()])
    lines = ["", "Peak memory (MB above the process baseline). states/step: growth per inner step between the two "
                 "largest T,", f"  in states w of {STATE_MB:.3f} MB (n/a: the states of that span are < "
                 f"{MIN_RESOLVABLE_MB:g} MB, the RSS noise); target ≈ 1 state per step",
             table(["T"] + names, rows)]
    extra = [T for T in all_steps if T not in steps and ("far_ho2", T) in summary]
    if extra:
        lines.append("  * --memory-steps: one process each, MALLOC_ARENA_MAX=1 (see the module docstring)")
        lines.append(f"  at T = {', '.join(map(str, extra))} (1 timed call), ms/step: " + "; ".join(
            f"{n} " + " / ".join(fmt(summary[n, T].ms_per_step if (n, T) in summary else None, ".2f") for T in extra)
            for n in HYPERGRADIENT_SUBJECTS if (n, extra[0]) in summary))
    far = growth.get("far_ho2")
    result = (f"{verdict(far.states_per_step <= MAX_STATES_PER_STEP)} ({far.states_per_step:.2f})"
              if far and far.resolvable else "n/a (T span too small)")
    name = f"far_ho2 memory ≤ {MAX_STATES_PER_STEP:g} states per inner step"
    return Report(lines, {name: result}), {n: g and g._asdict() for n, g in growth.items()}


def error_section(summary: dict, steps: Sequence[int]) -> Report:
    rows, checks = [], []
    worst = lambda s: max(s.error_unrolled_H, s.error_unrolled_log_rho)  # noqa: E731
    for T in steps:
        hg, nofeat, best = summary[("far_ho2", T)], summary[("far_ho2_nofeat", T)], best_jax(summary, T)
        unrolled, xla = summary.get(("far_ho2_unrolled", T)), summary.get(("far_ho2_xla", T))
        checks += [verdict(worst(s) <= MAX_UNROLLED_ERROR) for s in (unrolled, xla, hg) if s is not None]
        rows.append([str(T), f"{hg.error_exact_H:.3g}", f"{hg.error_exact_log_rho:.3g}",
                     f"{hg.error_unrolled_H:.2e}", f"{hg.error_unrolled_log_rho:.2e}", checks[-1],
                     fmt(unrolled and worst(unrolled), ".2e"), fmt(xla and worst(xla), ".2e"),
                     f"{worst(nofeat):.2e}",
                     f"{worst(best):.2e}" if best else "-"])
    lines = ["", "Relative error ‖g_T − g‖/‖g‖ of the float32 hypergradient (g: float64 closed forms; target vs "
                 f"unrolled T ≤ {MAX_UNROLLED_ERROR:g};",
             "  at T = 1 the unrolled dE/dlog ρ is 0, as ρ enters ∇L only through ρ·w0 = 0: absolute error)",
             table(["T", "vs exact: H", "log ρ", "vs unrolled T: H", "log ρ", "", "unroll=T (max)", "XLA (max)",
                    "no feat. (max)", "best JAX (max)"], rows)]
    return Report(lines, {f"error vs the unrolled hypergradient ≤ {MAX_UNROLLED_ERROR:g}": overall(checks)})


def report(summary: dict, results: Sequence[Measurement], steps: Sequence[int], info: dict, problem: Problem,
           args: argparse.Namespace, has_jax: bool) -> tuple[str, dict]:
    """The printed report, and the verdicts and memory growths for the JSON file."""
    if args.side_by_side:
        section = arithmetic_section(results, steps)
        lines = header(info, problem, args, has_jax) + section.lines
        return "\n".join(lines), {"targets": section.verdicts}
    memory, growth = memory_section(summary, steps)
    sections = [time_section(summary, steps), arithmetic_section(results, steps), memory, error_section(summary, steps)]
    targets = {name: result for section in sections for name, result in section.verdicts.items()}
    lines = header(info, problem, args, has_jax) + [line for section in sections for line in section.lines]
    lines += ["", "Targets"] + [f"  {name:<62s} {result}" for name, result in targets.items()]
    return "\n".join(lines), {"targets": targets, "memory_growth": growth}


def write_results(prefix: Path, summary: dict, results: Sequence[Measurement], meta: dict) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fields = list(Summary._fields) + ["label"]
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for s in sorted(summary.values(), key=lambda s: (s.steps, s.subject)):
            writer.writerow({**s._asdict(), "label": SUBJECTS[s.subject].label})
    with open(prefix.with_suffix(".json"), "w") as f:
        json.dump({**meta, "summary": [s._asdict() for s in summary.values()],
                   "measurements": [dataclasses.asdict(m) for m in results]}, f, indent=1)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", help=f"the T values (default {DEFAULT_STEPS})")
    parser.add_argument("--repeats", type=int, help="least timed calls per process after the warm-up; fast calls "
                        f"are repeated for {TIMED_SECONDS} s, up to {MAX_TIMED_CALLS} (default 5)")
    parser.add_argument("--rounds", type=int, help="processes per (subject, T), interleaved (default 2)")
    parser.add_argument("--memory-steps", type=int, nargs="*",
                        help=f"larger T for the memory growth, hypergradients only (default {DEFAULT_MEMORY_STEPS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: T in {QUICK_STEPS}, 1 repeat, 1 round (unless given)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="only far_ho2 and JAX side by side, the fraction of the peak and the profile "
                             "(--rounds processes per T; no memory processes)")
    parser.add_argument("--worker", choices=list(SUBJECTS), help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side_by_side and args.memory_steps:
        parser.error("--side-by-side measures no memory: drop --memory-steps")
    args.steps = sorted(set(args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)))
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    if args.memory_steps is None:
        args.memory_steps = [] if args.quick or args.side_by_side else list(DEFAULT_MEMORY_STEPS)
    args.memory_steps = sorted(set(args.memory_steps) - set(args.steps))
    if min(args.steps + args.memory_steps) < 1 or args.repeats < 1 or args.rounds < 1:
        parser.error("--steps, --memory-steps, --repeats and --rounds must be positive")
    return args


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    if args.worker:  # internal: one measurement in this fresh process
        print(json.dumps(dataclasses.asdict(measure(args.worker, args.steps[0], args.repeats, args.round))))
        return
    subjects = available_subjects()
    has_jax = any(SUBJECTS[n].framework == "jax" for n in subjects)
    if not has_jax:
        print("JAX is not installed: the JAX subjects are skipped (pip install -e .[bench]).", file=sys.stderr)
        if args.side_by_side:
            sys.exit("--side-by-side needs JAX (pip install -e .[bench]).")
    if args.side_by_side:
        subjects = ["far_ho2_vs_jax", "far_ho2_unrolled_vs_jax"]
    info = harness.machine_info()
    results = run_all(subjects, args.steps, args.repeats, args.rounds, args.memory_steps)
    summary = summarize(results)
    text, verdicts = report(summary, results, args.steps, info, make_problem(), args, has_jax)
    print(text)
    prefix = harness.RESULTS_DIR / ("hypergradient_cost_side_by_side" if args.side_by_side else
                                    "hypergradient_cost_quick" if args.quick else "hypergradient_cost")
    write_results(prefix, summary, results, {"machine": info, "steps": args.steps, "repeats": args.repeats,
                                             "rounds": args.rounds, "memory_steps": args.memory_steps,
                                             **verdicts})
    print(f"\nWrote {prefix.with_suffix('.csv')} and {prefix.with_suffix('.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
