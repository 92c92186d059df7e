"""Which hypergradient method? Cost, memory and accuracy of every far_ho2 method on one problem.

The problem is the hyper-representation ridge regression of Franceschi et al. (ICML 2018,
Example 3.4 and §5.1), built by ``hypergradient_cost.make_problem`` (the same arrays as that
benchmark): d = 256 features, c = 100 classes, 3 training and 3 validation examples per class,
x = class mean + noise, Y one-hot,

    L(w, λ) = ½‖X H w − Y‖² + (ρ/2)‖w‖²,       λ = (H, log ρ),  H ∈ R^{256×256} (near I), ρ = 0.1
    E(w, λ) = ½‖Xv H w − Yv‖²
    w_0 = 0,   w_{t+1} = w_t − η ∇_w L(w_t, λ),  η = 1/(σ_max(X H_0)² + ρ)  (fixed),  w ∈ R^{256×100}

Every method is compared with the exact bilevel hypergradient ∇F(λ) = dE(w*(λ), λ)/dλ (the
float64 closed form ``far_ho2.oracles.unrolled_ridge(..., T=None)``):

* ``ReverseHG`` for T ∈ {16, 64, 256, 1024}; ``ReverseHG.truncated(K)`` at T = 1024 for
  K ∈ {16, 64, 256}; ``ReverseHG(checkpoint_every=32)`` at T = 1024;
* ``ImplicitHG`` ('cg', 'neumann', 'fixed_point') after T = 1024 inner steps, for
  max_iter ∈ {4, 16, 64, 256}, ``tolerance=0`` (exactly max_iter iterations) and
  ``warm_start=False`` (every call solves from q = 0, so repeated calls are alike);
* ``ForwardHG`` on log ρ alone (m = 1 scalar hyperparameter) for T ∈ {16, 64, 256};
* ``BOME`` (η = 0.5, both φ rules) for T ∈ {1, 10, 100} steps of ŵ, and the penalty method
  (``Penalty``: γ ∈ {1, 100} held, ν = λ_g = 0, T = 1024 surrogate steps at the rate 1/(γℒ² + ℒ)
  its curvature allows): they keep w across calls, so each timed call is one outer iteration
  (λ held: the outer learning rate is 0) and the errors are read after the timed calls. BOME's
  direction d = ∇f + μ∇q̂ is the update of (λ, w) together, not an estimate of ∇F: only its
  cosine with ∇F is reported (the cosine is reported for every row);
* ``StochasticHG`` ('reversed', 'score') with SGLD at η and τ ∈ {1e-6, 1e-4}, T = 1024 (burn-in
  512), against the τ = 0 bilevel ∇F (the Langevin expectation differs from it by O(τ));
* the cost against the number m of scalar hyperparameter components, at T = 64: a vector of m
  regularisers log ρ_j, class k penalised by ρ_{k mod m} (½ Σ_k ρ_{k mod m}‖w_{:,k}‖²), with
  ``ForwardHG`` (m JVPs per step) for m ∈ {1, 2, 4, 8} and ``ReverseHG`` (one reverse pass)
  for m ∈ {1, 8}; and at T = 16, regularisers over the weights (w_ik penalised by
  ρ_{(iC+k) mod m}, up to one per weight: m = 25,600) with StochasticHG's O(|w| + |λ|)
  estimators ('score', 'reversed') for m ∈ {1, 64, 4096, 25600} next to 'pathwise' (forward
  mode, memory O(|w|·m)) for m ∈ {1, 8, 64, 256}.
  All ρ_j equal ρ, so Σ_j dE/dlog ρ_j is dE/dlog ρ: its error is reported.

Per configuration: ms per hypergradient (``HyperOptimizer.run(T, batch, _skip_hyper_ts=True)``,
median of the timed calls after a warm-up call), peak memory (peak RSS above the process's
baseline after imports and set-up, one fresh process per configuration), the relative errors
‖g − ∇F‖/‖∇F‖ for H and log ρ and, for ImplicitHG, the solver's relative residual and
iterations (``method.residuals``). Time and memory are measured in float32 (what one runs);
the errors and residuals come from a float64 run of every configuration afterwards, in one
process (float32 would floor at ~1e-6–1e-5); the float32 errors are saved too.

Run from the repository root (``--quick``: a smoke run on a smaller grid, T ≤ 32):

    python -m benchmarks.hypergradient_methods
    python -m benchmarks.hypergradient_methods --quick

Progress goes to stderr, the table to stdout; results go to
``benchmarks/results/hypergradient_methods[_quick].{csv,json,png}``. The worker mode
(``--worker CONFIG_JSON``: time and memory of one configuration) and the ``--errors`` mode
(the float64 errors of every configuration, in one process) are internal; they print JSON lines.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/hypergradient_methods.py`: the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness  # noqa: E402
from benchmarks.harness import fmt, max_rss_mb, relative_error, table, timed  # noqa: E402
from benchmarks.hypergradient_cost import (Problem, inner_objective, make_problem, outer_objective,  # noqa: E402
                                           reference_hypergradient)

FAMILIES = ("ReverseHG", "ReverseHG truncated", "ReverseHG checkpointed", "ImplicitHG cg",
            "ImplicitHG neumann", "ImplicitHG fixed_point", "ForwardHG", "BOME grad_norm", "BOME value",
            "Penalty", "StochasticHG reversed", "StochasticHG score", "ForwardHG vs m", "ReverseHG vs m",
            "StochasticHG pathwise vs m", "StochasticHG score vs m", "StochasticHG reversed vs m")
PERSISTENT = ("BOME", "Penalty")  # methods that keep w across calls: each call is one outer iteration


# -- the configurations --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration: a method, its setting and the hyperparameters it differentiates."""

    family: str  # one of FAMILIES
    steps: int  # T, the inner steps
    truncate: Optional[int] = None  # K of ReverseHG.truncated(K)
    checkpoint_every: Optional[int] = None  # k of ReverseHG(checkpoint_every=k)
    solver: Optional[str] = None  # ImplicitHG's linear solver
    max_iter: Optional[int] = None  # ImplicitHG's iterations
    blocks: Optional[int] = None  # m: a vector of m regularisers log ρ_j (else H and/or log ρ)
    per_weight: bool = False  # the m regularisers are spread over the weights w_ik (else over the classes k)
    gamma: Optional[float] = None  # Penalty's γ (held: no stage)
    temperature: Optional[float] = None  # StochasticHG's τ
    burn_in: int = 0  # StochasticHG's discarded steps

    @property
    def setting(self) -> str:
        optional = (("K={:d}", self.truncate), ("every {:d}", self.checkpoint_every), ("{:d} iters", self.max_iter),
                    ("γ={:g}", self.gamma), ("τ={:g}", self.temperature), ("m={:d}", self.blocks))
        return ", ".join([f"T={self.steps}"] + [form.format(value) for form, value in optional if value])

    @property
    def differentiates_H(self) -> bool:
        return self.blocks is None and not self.family.startswith("ForwardHG")


class Grid(NamedTuple):
    reverse_steps: tuple  # T of full ReverseHG
    long_steps: int  # T of the truncated, checkpointed and implicit runs
    truncations: tuple  # K
    checkpoint_every: int
    max_iters: tuple  # ImplicitHG's iterations
    forward_steps: tuple  # T of ForwardHG on log ρ
    components: tuple  # m of ForwardHG
    reverse_components: tuple  # m of ReverseHG (its cost does not depend on m: two points suffice)
    components_steps: int  # T of the m sweep
    bome_steps: tuple  # T of BOME's ŵ
    penalty_gammas: tuple  # γ of the penalty method
    temperatures: tuple  # τ of StochasticHG on the §5.1 problem (T = long_steps, burn-in half)
    weight_components: tuple  # m of the O(|w| + |λ|) StochasticHG estimators, regularisers over the weights
    pathwise_components: tuple  # m of StochasticHG('pathwise') (m JVPs per step)
    weight_steps: int  # T of the per-weight sweeps


FULL = Grid((16, 64, 256, 1024), 1024, (16, 64, 256), 32, (4, 16, 64, 256), (16, 64, 256), (1, 2, 4, 8), (1, 8), 64,
            (1, 10, 100), (1.0, 100.0), (1e-6, 1e-4), (1, 64, 4096, 25600), (1, 8, 64, 256), 16)
QUICK = Grid((16, 32), 32, (8,), 8, (8,), (16,), (1, 2), (1, 2), 16, (10,), (10.0,), (1e-4,), (1, 64), (1, 4), 8)


def configurations(grid: Grid) -> list[Config]:
    """Every configuration of ``grid``, in the order of the table."""
    configs = [Config("ReverseHG", T) for T in grid.reverse_steps]
    configs += [Config("ReverseHG truncated", grid.long_steps, truncate=K) for K in grid.truncations]
    configs.append(Config("ReverseHG checkpointed", grid.long_steps, checkpoint_every=grid.checkpoint_every))
    configs += [Config(f"ImplicitHG {solver}", grid.long_steps, solver=solver, max_iter=n)
                for solver in ("cg", "neumann", "fixed_point") for n in grid.max_iters]
    configs += [Config("ForwardHG", T) for T in grid.forward_steps]
    configs += [Config(f"BOME {phi}", T) for phi in ("grad_norm", "value") for T in grid.bome_steps]
    configs += [Config("Penalty", grid.long_steps, gamma=g) for g in grid.penalty_gammas]
    configs += [Config(f"StochasticHG {e}", grid.long_steps, temperature=tau, burn_in=grid.long_steps // 2)
                for e in ("reversed", "score") for tau in grid.temperatures]
    configs += [Config("ForwardHG vs m", grid.components_steps, blocks=m) for m in grid.components]
    configs += [Config("ReverseHG vs m", grid.components_steps, blocks=m) for m in grid.reverse_components]
    configs += [Config("StochasticHG pathwise vs m", grid.weight_steps, blocks=m, per_weight=True, temperature=1e-4)
                for m in grid.pathwise_components]
    configs += [Config(f"StochasticHG {e} vs m", grid.weight_steps, blocks=m, per_weight=True, temperature=1e-4)
                for e in ("score", "reversed") for m in grid.weight_components]
    return configs


# -- one configuration, in the worker process -----------------------------------------------------

class Built(NamedTuple):
    """A configuration ready to run: ``call()`` computes one hypergradient; ``read()`` returns the
    last (dE/dH or None, dE/dlog ρ summed over its components, ImplicitHG's (residual, iterations)
    or None)."""

    call: Callable[[], None]
    read: Callable[[], tuple[Optional[np.ndarray], float, Optional[tuple[float, int]]]]


def make_method(config: Config) -> Any:
    import far_ho2 as far

    if config.family.startswith("ForwardHG"):
        return far.ForwardHG()
    if config.family.startswith("ImplicitHG"):
        return far.ImplicitHG(config.solver, tolerance=0.0, max_iter=config.max_iter, warm_start=False)
    if config.family.startswith("BOME"):
        return far.BOME(eta=0.5, phi=config.family.split()[1])
    if config.family == "Penalty":  # γ held (no stage), plain: the estimate's O(1/γ) bias is what is seen
        return far.Penalty(gamma=config.gamma, lambda_g=0.0, epsilon=0.0, lagrangian=False)
    if config.family.startswith("StochasticHG"):
        return far.StochasticHG(config.family.split()[1], burn_in=config.burn_in)
    if config.truncate is not None:
        return far.ReverseHG.truncated(config.truncate)
    return far.ReverseHG(checkpoint_every=config.checkpoint_every)


def make_inner_optimizer(config: Config, problem: Problem) -> Any:
    """Gradient descent at η; SGLD at η and τ for StochasticHG; for the penalty method the
    rate its surrogate allows, 1/(γℒ² + ℒ) with ℒ = 1/η the smoothness constant of L."""
    import far_ho2 as far

    eta = float(problem.eta)
    if config.family.startswith("StochasticHG"):
        return far.SGLDOptimizer(eta, temperature=config.temperature, seed=0)
    if config.family == "Penalty":
        smoothness = 1.0 / eta
        return far.GradientDescentOptimizer(1.0 / (config.gamma * smoothness ** 2 + smoothness))
    return far.GradientDescentOptimizer(eta)


def build(problem: Problem, config: Config, dtype: type) -> Built:
    """The problem through far_ho2's public API in ``dtype``, with fresh variables (w_0 = 0):
    X·H as a feature map (evaluated once per run), objectives as closures over the variables."""
    import keras
    import tensorflow as tf

    import far_ho2 as far

    D, C = problem.H0.shape[0], problem.Y.shape[1]
    X, Y, Xv, Yv = (tf.constant(a.astype(dtype)) for a in problem[:4])
    w = tf.Variable(tf.zeros((D, C), dtype), name="w")
    H = far.get_hyperparameter("H", problem.H0.astype(dtype)) if config.differentiates_H \
        else tf.constant(problem.H0.astype(dtype))
    if config.blocks is None:
        log_rho = far.get_hyperparameter("log_rho", dtype(problem.log_rho))
        inner = lambda f: inner_objective(f[0], w, f[1], tf.exp(log_rho), tf.reduce_sum)  # noqa: E731
    else:
        log_rho = far.get_hyperparameter("log_rho", np.full(config.blocks, problem.log_rho, dtype))
        if config.per_weight:  # ½‖Zw − Y‖² + ½ Σ_ik ρ_{(iC+k) mod m} w_ik²
            block = tf.constant(np.arange(D * C).reshape(D, C) % config.blocks)
            penalty = lambda: 0.5 * tf.reduce_sum(tf.gather(tf.exp(log_rho), block) * w ** 2)  # noqa: E731
        else:  # ½‖Zw − Y‖² + ½ Σ_k ρ_{k mod m} ‖w_{:,k}‖²
            block = tf.constant(np.arange(C) % config.blocks)
            penalty = lambda: 0.5 * tf.reduce_sum(tf.gather(tf.exp(log_rho), block) * tf.reduce_sum(w ** 2, axis=0))  # noqa: E731

        def inner(f: tuple) -> tf.Tensor:
            return inner_objective(f[0], w, f[1], 0.0, tf.reduce_sum) + penalty()
    outer = lambda: outer_objective(Xv @ H, w, Yv, tf.reduce_sum)  # noqa: E731
    hypers = [H, log_rho] if config.differentiates_H else [log_rho]

    method = make_method(config)
    ho = far.HyperOptimizer(method)
    inner_problem = ho.inner_problem(inner, make_inner_optimizer(config, problem), var_list=[w],
                                     features=lambda batch: (batch[0] @ H, batch[1]))
    ho.outer_problem(outer, inner_problem, keras.optimizers.SGD(0.0), hyper_list=hypers)
    run = ho.finalize()
    persistent = config.family.startswith(PERSISTENT)

    def call() -> None:  # run() checks the results for finiteness with .numpy(): computed on return
        # a persistent method's call is one outer iteration (its joint / stage update included;
        # λ does not move: the outer learning rate is 0); the others only compute
        run(config.steps, (X, Y), _skip_hyper_ts=not persistent)

    def read() -> tuple[Optional[np.ndarray], float, Optional[tuple[float, int]]]:
        grads = {id(v): g.numpy() for g, v in ho.hypergradients()}
        dH = grads[id(H)] if config.differentiates_H else None
        residual = method.residuals[0] if config.family.startswith("ImplicitHG") else None
        return dH, float(np.sum(grads[id(log_rho)])), residual
    return Built(call, read)


@dataclasses.dataclass
class Measurement:
    config: dict
    times_ms: list[float]  # timed calls after the warm-up (float32)
    first_call_s: float  # trace + run (float32)
    baseline_mb: float  # max RSS after imports and set-up
    memory_mb: float  # peak RSS above the baseline during the float32 calls
    error_H: Optional[float] = None  # float64 run, vs the exact bilevel hypergradient
    error_log_rho: Optional[float] = None
    cosine_H: Optional[float] = None  # float64 run: cos(direction for H, exact dF/dH)
    residual: Optional[float] = None  # ImplicitHG, float64 run
    iterations: Optional[int] = None
    error_H_float32: Optional[float] = None
    error_log_rho_float32: Optional[float] = None
    residual_float32: Optional[float] = None

    @property
    def ms(self) -> float:
        return statistics.median(self.times_ms)



def errors(read: tuple, exact: tuple[np.ndarray, float]) -> tuple[Optional[float], float]:
    dH, dlog_rho, _ = read
    return (None if dH is None else relative_error(dH, exact[0])), relative_error(dlog_rho, exact[1])


def cosine(read: tuple, exact: tuple[np.ndarray, float]) -> Optional[float]:
    """cos(g_H, dF/dH): whether the direction points the right way (BOME's is not a hypergradient)."""
    dH = read[0]
    if dH is None:
        return None
    return float(np.sum(dH * exact[0]) / (np.linalg.norm(dH) * np.linalg.norm(exact[0])))


def measure(config: Config, repeats: int) -> Measurement:
    """float32: a warm-up call, ``repeats`` timed calls, the peak memory, the float32 errors."""
    problem = make_problem()
    built = build(problem, config, np.float32)
    baseline = max_rss_mb()
    first = timed(built.call)
    times = [1e3 * timed(built.call) for _ in range(repeats)]
    result = Measurement(dataclasses.asdict(config), times, first, baseline, max_rss_mb() - baseline)
    read = built.read()
    result.error_H_float32, result.error_log_rho_float32 = errors(read, reference_hypergradient(problem, None))
    if read[2] is not None:
        result.residual_float32 = read[2][0]
    return result


def measure_errors(config: Config, problem: Problem, exact: tuple[np.ndarray, float], repeats: int) -> dict:
    """float64: the errors against ``exact`` and ImplicitHG's residual and iterations after one
    call, or, for a method that keeps w across calls, after as many calls as the timed run."""
    built = build(problem, config, np.float64)
    for _ in range(1 + repeats if config.family.startswith(PERSISTENT) else 1):
        built.call()
    read = built.read()
    error_H, error_log_rho = errors(read, exact)
    residual, iterations = read[2] if read[2] is not None else (None, None)
    return {"error_H": error_H, "error_log_rho": error_log_rho, "residual": residual, "iterations": iterations,
            "cosine_H": cosine(read, exact)}


def error_worker(configs: Sequence[Config], repeats: int) -> None:
    """``measure_errors`` of every configuration in this one process (no memory is measured
    here), one JSON line each."""
    problem = make_problem()
    exact = reference_hypergradient(problem, None)
    for config in configs:
        print(json.dumps(measure_errors(config, problem, exact, repeats)), flush=True)


def run_worker(config: Config, repeats: int, timeout_s: float = 900) -> Measurement:
    """``measure`` in a fresh Python process, so that its memory baseline and peak are its own."""
    arguments = ["--worker", json.dumps(dataclasses.asdict(config)), "--repeats", str(repeats)]
    return Measurement(**harness.run_worker("hypergradient_methods", arguments, f"{config.family} {config.setting}",
                                            timeout=timeout_s))


# -- the driver ------------------------------------------------------------------------------------

def run_all(configs: Sequence[Config], repeats: int, timeout_s: float = 1800) -> list[Measurement]:
    """Phase 1: time and memory (float32), one fresh process per configuration. Phase 2: the
    float64 errors of every configuration, in one process."""
    results, start = [], time.perf_counter()
    for i, config in enumerate(configs, 1):
        m = run_worker(config, repeats)
        results.append(m)
        print(f"[time {i:2d}/{len(configs)}] {config.family:<26s} {config.setting:<16s} {m.ms:8.1f} ms "
              f"{m.memory_mb:6.1f} MB  first call {m.first_call_s:5.1f} s  ({time.perf_counter() - start:4.0f} s)",
              file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "benchmarks.hypergradient_methods", "--errors",
               json.dumps([dataclasses.asdict(c) for c in configs]), "--repeats", str(repeats)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=harness.worker_env(),
                          cwd=harness.REPOSITORY) as errors_process:
        lines = (line for line in errors_process.stdout if line.startswith("{"))
        for i, (config, m, line) in enumerate(zip(configs, results, lines), 1):
            for key, value in json.loads(line).items():
                setattr(m, key, value)
            print(f"[float64 {i:2d}/{len(configs)}] {config.family:<26s} {config.setting:<16s} "
                  f"error H {fmt(m.error_H, '.1e'):>7s}  log ρ {m.error_log_rho:.1e}  "
                  f"({time.perf_counter() - start:4.0f} s)", file=sys.stderr, flush=True)
        returncode = errors_process.wait(timeout_s)
    if returncode != 0 or any(m.error_log_rho is None for m in results):
        raise RuntimeError(f"the float64 error process failed ({returncode}); see its stderr above.")
    return results


def report(results: Sequence[Measurement], repeats: int, problem: Problem, load: tuple) -> str:
    rows = []
    for m in results:
        c = Config(**m.config)
        residual = "-" if m.residual is None else f"{m.residual:.1e} ({m.iterations})"
        estimate = not c.family.startswith("BOME")  # BOME's direction is not a hypergradient estimate
        rows.append([c.family, c.setting, f"{m.ms:.1f}", f"{m.memory_mb:.1f}",
                     fmt(m.error_H if estimate else None, ".2e"),
                     (f"{m.error_log_rho:.2e}" + (" (Σ_j)" if c.blocks else "")) if estimate else "-",
                     fmt(m.cosine_H, ".4f"), residual])
    header = [
        "Hypergradient methods on the §5.1 problem (Franceschi et al. 2018): L = ½‖XHw − Y‖² + (ρ/2)‖w‖², "
        "E = ½‖XvHw − Yv‖²,",
        f"  H ∈ R^256×256, log ρ (ρ = {np.exp(problem.log_rho):.2g}), w ∈ R^256×100, w0 = 0, GD with "
        f"η = {problem.eta:.4f}; n = {problem.X.shape[0]} train / {problem.Xv.shape[0]} validation.",
        f"  ms: median of {repeats} float32 calls after a warm-up, one fresh process per row. MB: peak RSS "
        "above the process baseline (float32).",
        "  Errors: ‖g − ∇F‖/‖∇F‖ against the exact bilevel hypergradient (float64 closed form), of a float64 "
        "run of the same row (a separate process).",
        "  Residual: ImplicitHG's relative residual (iterations), float64; for fixed_point it is the last "
        "step ‖q_{k+1} − q_k‖/‖b‖.",
        "  ForwardHG rows differentiate log ρ only; 'vs m' rows: m regularisers ρ_j (class k uses ρ_{k mod m}; "
        "StochasticHG: weight (i, k) uses ρ_{(iC+k) mod m}), error of Σ_j dE/dlog ρ_j.",
        "  BOME and Penalty keep w across calls: a call is one outer iteration (λ held: outer rate 0), errors after "
        "the timed calls; BOME's direction is no hypergradient estimate: cos(d_H, ∇_H F) only.",
        "  Penalty: γ held (no stage), ν = λ_g = 0, inner rate 1/(γℒ² + ℒ); StochasticHG: SGLD at η and τ, "
        "burn-in T/2 (for the 'vs m' rows τ = 1e-4, no burn-in), error vs the τ = 0 bilevel ∇F.",
        f"  1-min load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end (2 cores, shared: "
        "timings vary by up to ~25%).",
    ]
    return "\n".join(header + ["", table(["method", "setting", "ms", "MB", "error H", "error log ρ", "cos H",
                                          "residual (iters)"], rows, left=2)])


def write_results(prefix: Path, results: Sequence[Measurement], meta: dict) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fields = ["family", "setting", "steps", "truncate", "checkpoint_every", "solver", "max_iter", "blocks",
              "per_weight", "gamma", "temperature", "burn_in",
              "ms", "memory_mb", "error_H", "error_log_rho", "cosine_H", "residual", "iterations", "first_call_s",
              "error_H_float32", "error_log_rho_float32", "residual_float32"]
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for m in results:
            row = {**m.config, **dataclasses.asdict(m), "setting": Config(**m.config).setting, "ms": m.ms}
            writer.writerow({k: row[k] for k in fields})
    with open(prefix.with_suffix(".json"), "w") as f:
        json.dump({**meta, "measurements": [{**dataclasses.asdict(m), "ms": m.ms} for m in results]}, f, indent=1)


# -- the figure ------------------------------------------------------------------------------------

STYLES = {"ReverseHG": ("tab:blue", "o", "T"), "ReverseHG truncated": ("tab:cyan", "v", "K"),
          "ReverseHG checkpointed": ("navy", "s", ""), "ImplicitHG cg": ("tab:red", "D", "it"),
          "ImplicitHG neumann": ("tab:orange", "^", "it"), "ImplicitHG fixed_point": ("tab:brown", "x", "it"),
          "ForwardHG": ("tab:green", "P", "T"), "Penalty": ("tab:purple", "*", "γ"),
          "StochasticHG reversed": ("tab:olive", "h", "τ"), "StochasticHG score": ("tab:gray", "p", "τ")}
SWEEPS = (("ForwardHG vs m", "tab:green", "P"), ("ReverseHG vs m", "tab:blue", "o"),
          ("StochasticHG pathwise vs m", "tab:olive", "P"), ("StochasticHG score vs m", "tab:gray", "p"),
          ("StochasticHG reversed vs m", "olive", "h"))
ERROR_FLOOR = 1e-16  # an error of exactly 0 is drawn here on the log axis


def annotation(config: Config, key: str) -> str:
    value = {"T": config.steps, "K": config.truncate, "it": config.max_iter, "γ": config.gamma,
             "τ": config.temperature}.get(key)
    return f"{key}={value:g}" if value else ""


def plot_errors(ax: Any, results: Sequence[Measurement], error: str, title: str) -> None:
    for family, (color, marker, key) in STYLES.items():
        points = [(m.ms, getattr(m, error), Config(**m.config)) for m in results
                  if m.config["family"] == family and getattr(m, error) is not None]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [max(p[1], ERROR_FLOOR) for p in points]
        label = family + (f" (T={points[0][2].steps}, k={points[0][2].checkpoint_every})" if not key else "")
        ax.plot(xs, ys, marker=marker, color=color, label=label, linestyle="-" if len(xs) > 1 else "none")
        for x, y, (_, _, config) in zip(xs, ys, points):
            ax.annotate(annotation(config, key), (x, y), textcoords="offset points", xytext=(4, 3),
                        fontsize=6.5, color=color)
    ax.set(xscale="log", yscale="log", xlabel="ms per hypergradient (float32)",
           ylabel="relative error vs exact ∇F (float64)", title=title)
    ax.grid(True, which="major", alpha=0.3)


def plot_sweep(ax: Any, results: Sequence[Measurement], value: str, ylabel: str) -> None:
    """``value`` ('ms' or 'memory_mb') against m for every 'vs m' family."""
    import matplotlib.ticker
    ticks = set()
    for family, color, marker in SWEEPS:
        points = sorted((m.config["blocks"], m.ms if value == "ms" else m.memory_mb) for m in results
                        if m.config["family"] == family)
        if points:
            ax.plot(*zip(*points), marker=marker, color=color, label=family.replace(" vs m", ""))
            ticks.update(p[0] for p in points)
    ax.set(xscale="log", yscale="log" if value == "ms" else "symlog", xlabel="m (scalar regularisers log ρ_j)",
           ylabel=ylabel, title=f"{ylabel} vs the number of hyperparameter components m")
    if ticks:  # after set(xscale=...), which resets the tick formatters
        ax.set_xticks(sorted(ticks), [str(int(m)) for m in sorted(ticks)])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="major", alpha=0.3)


def plot(path: Path, results: Sequence[Measurement]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(24, 5.8))
    plot_errors(axes[0], results, "error_H", "Error of dE/dH vs cost")
    plot_errors(axes[1], results, "error_log_rho", "Error of dE/dlog ρ vs cost")
    plot_sweep(axes[2], results, "ms", "ms per hypergradient (float32)")
    plot_sweep(axes[3], results, "memory_mb", "peak memory above baseline (MB)")
    for ax in axes:
        ax.legend(fontsize=7.5, loc="best")
    fig.suptitle("far_ho2 hypergradient methods, ridge hyper-representation (d=256, c=100, 300+300 examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- entry point -----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a small grid (T ≤ 32), 1 repeat")
    parser.add_argument("--repeats", type=int, help="timed calls per configuration after the warm-up "
                                                    "(default 3; 1 with --quick)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--errors", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    return args


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    if args.worker:  # internal: one configuration in this fresh process
        print(json.dumps(dataclasses.asdict(measure(Config(**json.loads(args.worker)), args.repeats))))
        return
    if args.errors:  # internal: the float64 errors of every configuration, one process
        error_worker([Config(**c) for c in json.loads(args.errors)], args.repeats)
        return
    load, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S")
    grid = QUICK if args.quick else FULL
    results = run_all(configurations(grid), args.repeats)
    print(report(results, args.repeats, make_problem(), load))
    prefix = harness.RESULTS_DIR / ("hypergradient_methods_quick" if args.quick else "hypergradient_methods")
    write_results(prefix, results, {"started": started, "grid": grid._asdict(), "repeats": args.repeats,
                                    "load_average_start": load, "load_average_end": os.getloadavg(),
                                    "timing_dtype": "float32", "error_dtype": "float64"})
    plot(prefix.with_suffix(".png"), results)
    print(f"\nWrote {prefix.with_suffix('.csv')}, {prefix.with_suffix('.json')} and {prefix.with_suffix('.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
