"""A randomized oracle suite: every method on random quadratic bilevel problems (random
dimensions, conditioning 1 … 1e3, coupling, box constraints on λ, step sizes from stable to
unstable, several inner optimizers), each case against an exact float64 NumPy oracle.

Right or loud: every case either
  * matches its oracle within the method's tolerance, with every variable finite, or
  * raises a ``FloatingPointError`` naming the method and the hyper-iteration, every variable
    (inner, Φ₀, hyperparameters, inner-optimizer state, outer-optimizer slots, the method's own
    state) left exactly as before the run, and no NaN anywhere.
A raise is a failure (a false alarm) where the exact computation does not grow: its float64
states stay within ``GROWTH_LIMIT`` times their initial distance to the fixed point (the tangent
within ``GROWTH_LIMIT`` times its limit), the linear solver contracts, the chain is stable, and
(ImplicitHG's own condition) the inner loop does not move away from stationarity.
Any other outcome fails: a finite value outside tolerance (silent, or with a warning only), NaN
left in a variable, another exception. Where float64 cannot decide the exact value (one-ulp
perturbations of the inputs move it by more than 1e-3 of its size: long Adam runs near
convergence are chaotic; a line-search decision within round-off) only the guard's properties
are checked, and the case is counted as unchecked.

Oracles and tolerances (no method's docstring states one, except ImplicitHG's residual):
  * ReverseHG, ``ReverseHG.truncated(8)`` (T = 8: K = T; T > 8: w_{T−8} constant), ForwardHG:
    the tangent recursion of T steps of GD, heavy ball, Nesterov, Adam (ε inside the root) and
    back-tracking GD (j held constant) in float64 (``far_ho2.oracles.unroll_quadratic``);
    tolerance ``EXACT`` = 1e-8 relative to the size of the terms summed (‖∇_λE‖ + ‖Z_T‖‖∇_wE‖),
    plus 100 times the oracle's own spread under one-ulp input perturbations.
  * ImplicitHG: ∇_λE − C A⁻¹ ∇_wE at the inner iterate w_T (exact for any w_T: the Hessian A is
    constant); tolerance = the solver's relative-residual target (1e-10 CG, 1e-8 Neumann and
    fixed point) times the error per unit of residual (‖C‖‖A⁻¹‖‖∇_wE‖; for the fixed point
    ‖B‖‖J‖‖(I − Jᵀ)⁻¹‖‖∇_wE‖ with J, B the step's Jacobians), plus 1e-8 round-off.
  * BOME, Penalty, one iteration from random (λ, w) (and γ, λ_g, ε, ν): their NumPy references
    (``oracles.bome_step``, ``oracles.penalty_step``), 1e-8 relative; the stage schedule exactly.
  * End to end over a box: the box-constrained minimizer λ* by active-set enumeration, KKT
    checked (``far_ho2.oracles.box_minimizer``). ReverseHG + projected outer GD on the T-step
    hyper-objective: within (1 − μ/L)^K ‖λ0 − λ*‖ (the projected step's contraction).
    Penalty (fast schedule, 400 runs of 60 steps): 1e-6 × max(1, ‖λ*‖) (its NumPy reference
    reaches 1e-9 relative where it converges), or a raise where that reference's stage
    diverges (the penalty's own test, ``Penalty._trusted``); BOME only unconstrained (it refuses
    ``constraint=``; decaying steps, 800 iterations: at 500 one case in 16 had only reached
    0.11): the error below 0.1 of the initial one (first order and approximate), and its NumPy
    reference's λ to 1e-6 plus 100 times that reference's spread under per-step round-off
    (with φ = value, q̂ = g(w) − g(ŵ) cancels and μ amplifies its round-off).
  * StochasticHG: ``far_ho2.oracles.gaussian_bilevel`` for the chain's own stationary law,
    within 4.5 batch-means standard errors (40 batches: t with 39 degrees of freedom,
    P(|t| > 4.5) ≈ 6e-5 per component, so that hundreds of components in ``--long`` give no
    false failure).

Each case draws everything from its seed: a failure prints the seed, the drawn parameters and
the command that reruns it. Cases sharing a method, an inner optimizer and a shape reuse one
compiled problem (its data are variables, so the traces are reused); smaller dimensions are
embedded in the shape with decoupled coordinates that stay exactly zero. ``--long`` runs
``LONG_FACTOR`` times as many cases; the outcomes per method are printed at the end.
"""

import gc
import itertools
import warnings
from collections import Counter
from typing import Any, Callable, NamedTuple, Optional

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
import oracles
from far_ho2 import oracles as fo
from far_ho2.oracles import InnerOptimizerSpec

# -- sizes and tolerances --------------------------------------------------------------------------

SHORT = {  # cases per method in the default (CI) run
    "reverse": 60, "truncated": 36, "forward": 40, "implicit_cg": 30, "implicit_neumann": 24,
    "implicit_fixed_point": 24, "bome": 36, "penalty": 30,
    "reverse_solution": 2, "penalty_solution": 3, "bome_solution": 2, "stochastic": 6,
}
LONG_FACTOR = 8  # --long runs this many times as many cases of every method

EXACT = 1e-8  # float64 NumPy oracle vs float64 TensorFlow, relative to the size of the terms summed
GROWTH_LIMIT = 10.0  # below this growth of the exact computation a raise is a false alarm
Z_SE = 4.5  # StochasticHG: |estimate − oracle| within this many of its batch-means standard errors
SE_BATCHES = 40  # batches of the standard errors (t with 39 degrees of freedom: P(|t| > 4.5) ≈ 6e-5)
CG_TOLERANCE, SERIES_TOLERANCE = 1e-10, 1e-8  # ImplicitHG's relative residual targets
SERIES_MAX_ITER = 40_000  # Neumann / fixed point: enough for a contraction factor 1 − 1/2000
BOME_SOLUTION = 0.1  # BOME end to end: the error falls below this fraction of the initial one
PENALTY_SOLUTION = 1e-6  # Penalty end to end: ‖λ − λ*‖ ≤ this × max(1, ‖λ*‖)
M_MAX, N_MAX = 4, 6  # dimensions of λ and of w

RESULTS: Counter = Counter()  # (method, outcome) over the session, printed at the end


# -- the compiled problems -------------------------------------------------------------------------

class Rig:
    """A compiled quadratic bilevel problem whose data, step sizes, box and outer learning rate are
    variables: every case of a (method, inner optimizer, shape) group loads its values and runs
    the same traces. λ has shape ``()`` when ``scalar``, else ``(m,)``; w has shape ``(n,)``."""

    count = itertools.count()

    def __init__(self, method: far.HyperGradient, kind: str, m: int, n: int, scalar: bool = False,
                 outer: Optional[keras.optimizers.Optimizer] = None, constrained: bool = True):
        self.method, self.kind, self.m, self.n, self.scalar = method, kind, m, n, scalar
        variable = lambda shape: tf.Variable(np.zeros(shape), trainable=False, dtype=tf.float64)  # noqa: E731
        shapes = dict(A=(n, n), B=(m, m), C=(m, n), a=(n,), b=(m,), F=(n, n), H=(m, m), K=(m, n), f_v=(n,), h=(m,))
        self.data = {name: variable(shape) for name, shape in shapes.items()}
        shape = () if scalar else (m,)
        self.lo, self.hi = variable(shape), variable(shape)
        self.params = {name: variable(()) for name in ("lr", "momentum", "beta1", "beta2", "epsilon")}
        self.lam = far.get_hyperparameter(f"oracle_lambda_{next(self.count)}", np.zeros(shape),
                                          constraint=(lambda v: tf.clip_by_value(v, self.lo, self.hi)) if constrained
                                          else None)
        self.w = tf.Variable(np.zeros(n), name="w")
        d, p = self.data, self.params
        lam = lambda: tf.reshape(self.lam, [m])  # noqa: E731
        quad = lambda M, u, v: tf.tensordot(u, tf.linalg.matvec(M, v), 1)  # noqa: E731
        dot = lambda u, v: tf.tensordot(u, v, 1)  # noqa: E731
        inner = lambda: (0.5 * quad(d["A"], self.w, self.w) + 0.5 * quad(d["B"], lam(), lam())  # noqa: E731
                         + quad(d["C"], lam(), self.w) + dot(d["a"], self.w) + dot(d["b"], lam()))
        outer_objective = lambda: (0.5 * quad(d["F"], self.w, self.w) + 0.5 * quad(d["H"], lam(), lam())  # noqa: E731
                                   + quad(d["K"], lam(), self.w) + dot(d["f_v"], self.w) + dot(d["h"], lam()))
        optimizer = {"gd": lambda: far.GradientDescentOptimizer(p["lr"]),
                     "momentum": lambda: far.MomentumOptimizer(p["lr"], p["momentum"]),
                     "nesterov": lambda: far.MomentumOptimizer(p["lr"], p["momentum"], use_nesterov=True),
                     "adam": lambda: far.AdamOptimizer(p["lr"], p["beta1"], p["beta2"], p["epsilon"]),
                     "backtracking": lambda: far.BackTrackingGradientDescentOptimizer(p["lr"])}[kind]()
        self.outer = outer or keras.optimizers.SGD(0.1, momentum=0.5)
        self.ho = far.HyperOptimizer(method)
        self.run = self.ho.minimize(outer_objective, self.outer, inner, optimizer, hyper_list=[self.lam],
                                    var_list=[self.w])
        self.problem = method.inner_problems[0]
        self.phi0 = self.problem.initial_values[0]
        self.variables = labelled_variables(self.ho, self.phi0)
        self.initial = {name: v.numpy().copy() for name, v in self.variables}

    def load(self, p: fo.QuadraticBilevel, x0: np.ndarray, w0: np.ndarray, spec: InnerOptimizerSpec,
             lo: np.ndarray, hi: np.ndarray, outer_lr: float) -> None:
        """A case's values (``p``, x0, w0, lo, hi of the case's own dimensions, padded here); the
        method's, the optimizers' and the counters' state back to their initial values."""
        for name, value in pad_problem(p, self.m, self.n)._asdict().items():
            self.data[name].assign(value)
        shape = () if self.scalar else (self.m,)
        self.lo.assign(np.reshape(pad(lo, self.m, -1.0), shape))
        self.hi.assign(np.reshape(pad(hi, self.m, 1.0), shape))
        self.lam.assign(np.reshape(pad(x0, self.m), shape))
        self.w.assign(pad(w0, self.n))
        self.phi0.assign(pad(w0, self.n))
        for name in ("lr", "momentum", "beta1", "beta2", "epsilon"):
            self.params[name].assign(getattr(spec, "learning_rate" if name == "lr" else name))
        for name, v in self.variables:
            if not name.startswith(("inner/", "phi0", "lambda")):
                v.assign(self.initial[name])
        if isinstance(self.outer.learning_rate, (tf.Variable, keras.Variable)):
            self.outer.learning_rate.assign(outer_lr)
        fresh(self.ho)

    def snapshot(self) -> dict[str, np.ndarray]:
        return {name: v.numpy().copy() for name, v in self.variables}


FRESH = {  # the history a HyperOptimizer and its method keep across runs, as a new instance has it
    "method": {"_zero_barrier": 0, "_previous": None, "_steps_done": 0, "_grad_reference": None, "_still": 0,
               "_stall_warned": False},
    "ho": {"_bounds": None},
}


def fresh(ho: far.HyperOptimizer) -> None:
    """Every case runs as on a new HyperOptimizer and method, with the traces of this one: what they
    remember of earlier runs (the last run; where present, the guard's reference scales of the
    first hyper-iteration and its stall counters) is set back to a new instance's values."""
    for owner, attributes in ((ho.hypergradient, FRESH["method"]), (ho, FRESH["ho"])):
        for attribute, value in attributes.items():
            if hasattr(owner, attribute):
                setattr(owner, attribute, type(value)() if isinstance(value, dict) else value)


def labelled_variables(ho: far.HyperOptimizer, phi0: tf.Variable) -> list[tuple[str, tf.Variable]]:
    """Every variable a run may change, labelled: ``ho.state()`` (global step, hyperparameters,
    inner variables, the inner optimizers' run state, the outer optimizers, the method's state)
    and Φ₀."""
    labelled = [("phi0", phi0)]

    def add(prefix: str, item: Any) -> None:
        if isinstance(item, keras.optimizers.Optimizer):
            for v in item.variables:
                labelled.append((f"{prefix}/{v.path.split('/')[-1]}", v))
        elif isinstance(item, dict):
            for key, value in item.items():
                add(f"{prefix}/{key}", value)
        elif isinstance(item, (list, tuple)):
            for i, value in enumerate(item):
                add(f"{prefix}/{i}", value)
        elif item is not None:
            labelled.append((prefix, item))

    state = ho.state()
    add("global_step", state["global_step"])
    add("lambda", state["hyperparameters"][0])
    add("inner/w", state["inner_variables"][0])
    add("inner_optimizer", state["inner_optimizers"])
    add("outer", state["outer_optimizers"])
    add("method", state["method"])
    return labelled


def pad(x: np.ndarray, size: int, fill: float = 0.0) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64), np.full(size - len(x), fill)])


def pad_problem(p: fo.QuadraticBilevel, m: int, n: int) -> fo.QuadraticBilevel:
    """``p`` embedded in dimensions (m, n): the extra coordinates have identity curvature and no
    coupling or linear term, so from 0 they stay exactly 0 (their eigenvalue 1 is within the
    problem's spectrum [1, condition] and changes no step-size limit)."""
    def block(M, size):
        out = np.eye(size)
        out[:M.shape[0], :M.shape[1]] = M
        return out

    def corner(M, rows, cols):
        out = np.zeros((rows, cols))
        out[:M.shape[0], :M.shape[1]] = M
        return out
    return fo.QuadraticBilevel(A=block(p.A, n), B=block(p.B, m), C=corner(p.C, m, n), a=pad(p.a, n),
                               b=pad(p.b, m), F=block(p.F, n), H=block(p.H, m), K=corner(p.K, m, n),
                               f_v=pad(p.f_v, n), h=pad(p.h, m))


RIGS: dict = {}


def rig_for(key: tuple, make: Callable[[], Rig]) -> Rig:
    """The rig of ``key``, made once per session (its traces are reused by every case)."""
    if key not in RIGS:
        RIGS[key] = make()
    return RIGS[key]


# -- outcomes and their judgement ------------------------------------------------------------------

class Outcome(NamedTuple):
    error: Optional[BaseException]
    value: Optional[float]  # what run returned (E)
    grads: Optional[np.ndarray]  # the hypergradient (direction) of λ
    warned: list  # RuntimeWarning messages
    before: dict
    after: dict


def execute(rig: Rig, T: int, apply: bool = True) -> Outcome:
    """One hyper-iteration (run T steps, hypergradient, outer update) with every variable read
    before and after."""
    before = rig.snapshot()
    value = grads = error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = float(rig.run(T, _skip_hyper_ts=not apply))
            grads = np.reshape(rig.ho.hypergradients()[0][0].numpy(), [-1])
        except Exception as exception:  # noqa: BLE001 (judged below: only FloatingPointError may be raised)
            error = exception
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return Outcome(error, value, grads, warned, before, rig.snapshot())


class Expected(NamedTuple):
    checks: dict  # name -> (expected array, absolute tolerance); names: 'hypergradient', 'E', or a variable label
    raise_allowed: bool
    why: str  # what grows (or not): printed with the verdict
    unchecked: str = ""  # why the values cannot be checked (the guard's properties still are)


def judge(method: str, outcome: Outcome, expected: Expected, describe: str, method_name: str,
          wrong: Optional[Callable[[], list]] = None) -> None:
    """Counts the outcome and fails the test unless it is right or loud (see the module docstring);
    ``wrong()`` adds mismatches of the caller's own (after a run that raised nothing)."""
    failures, categories = [], []
    nonfinite = sorted(name for name, v in outcome.after.items() if not np.all(np.isfinite(v)))
    if nonfinite:
        categories.append("NaN left")
        failures.append(f"NaN/Inf left in {nonfinite}")
    error = outcome.error
    if error is not None and not isinstance(error, FloatingPointError):
        categories.append("other exception")
        failures.append(f"raised {type(error).__name__}: {error}")
    elif error is not None:
        changed = sorted(name for name in outcome.before
                         if not np.array_equal(outcome.before[name], outcome.after[name], equal_nan=True))
        if changed:
            categories.append("raised, variables changed")
            failures.append(f"FloatingPointError but changed {changed}: "
                            + "; ".join(f"{n}: {outcome.before[n]} -> {outcome.after[n]}" for n in changed[:4]))
        if not expected.raise_allowed:
            categories.append("false alarm")
            failures.append(f"FloatingPointError although nothing grows ({expected.why}): {error}")
        if method_name not in str(error) or "hyper-iteration" not in str(error):
            categories.append("unnamed error")
            failures.append(f"the error does not name the method ({method_name!r}) and the hyper-iteration: {error}")
        if not failures:
            categories.append("raised")
    elif expected.unchecked:
        reason = "line search" if "line-search" in expected.unchecked else "ill-conditioned"
        categories.append(f"unchecked ({reason})")
    else:
        mismatches = []
        for name, (want, tolerance) in expected.checks.items():
            label = name.split(" (")[0]  # "lambda (the NumPy reference's)" compares λ with another value
            got = (outcome.grads if label == "hypergradient" else outcome.value if label == "E"
                   else outcome.after[label])
            got, want = np.reshape(np.asarray(got, np.float64), [-1]), np.reshape(np.asarray(want, np.float64), [-1])
            if not np.all(np.isfinite(want)):
                mismatches.append(f"{name}: the exact value overflows float64 ({want}): only a raise is right, "
                                  f"got {got}")
                continue
            if not np.isfinite(tolerance):
                mismatches.append(f"{name}: the method cannot reach {want} (no finite tolerance, e.g. its solver "
                                  f"does not contract): only a raise is right, got {got}")
                continue
            error_norm = fo.safe_norm(got - want) if np.all(np.isfinite(got)) else np.inf
            if not error_norm <= tolerance:
                mismatches.append(f"{name}: expected {np.array2string(want, precision=10)}, got "
                                  f"{np.array2string(got, precision=10)} (error {error_norm:.3g} > "
                                  f"tolerance {tolerance:.3g})")
        mismatches += wrong() if wrong is not None else []
        if mismatches:
            categories.append("wrong value, warned" if outcome.warned else "silent wrong value")
            failures.append(("wrong value with a RuntimeWarning only (" + "; ".join(outcome.warned)[:300] + "): "
                             if outcome.warned else "silent wrong value: ") + " | ".join(mismatches))
        elif not failures:
            categories.append("match")
    RESULTS[(method, " + ".join(categories))] += 1
    if failures:
        note = f"\n  values unchecked: {expected.unchecked}" if expected.unchecked else ""
        pytest.fail(f"{method}: {' || '.join(failures)}\n  case: {describe}\n  growth: {expected.why}{note}",
                    pytrace=False)


def relative_tolerance(*sizes: float) -> float:
    """EXACT times the size of the terms (at least the smallest positive double)."""
    return EXACT * max(sum(float(s) for s in sizes), 1e-300)


# -- drawing cases ---------------------------------------------------------------------------------

class Case(NamedTuple):
    method: str
    kind: str  # inner optimizer (or the estimator / variant)
    seed: int
    scalar: bool = False

    @property
    def id(self) -> str:
        return f"{self.method}-{self.kind}{'-scalar' if self.scalar else ''}-{self.seed}"


class Draw(NamedTuple):
    """A case's random problem and settings (of its own dimensions m, n)."""
    p: fo.QuadraticBilevel
    m: int
    n: int
    condition: float
    coupling: float
    spec: InnerOptimizerSpec
    rate: float  # the learning rate as a fraction of the stability limit (back-tracking: of 2/L)
    T: int
    x0: np.ndarray
    w0: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    box: str
    outer_lr: float

    def describe(self, case: Case, **extra: Any) -> str:
        spec = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.spec._asdict().items() if k in SPEC_FIELDS[self.spec.kind])
        more = "".join(f", {k}={v}" for k, v in extra.items())
        scalar = " (scalar λ)" if case.scalar else ""
        return (f"seed={case.seed}, method={case.method}, m={self.m}, n={self.n}{scalar}, "
                f"condition={self.condition:.4g}, coupling={self.coupling:.4g}, optimizer {spec} "
                f"(η = {self.rate:.4g} × stability limit), T={self.T}, box={self.box} [{self.lo}, {self.hi}], "
                f"λ0={self.x0}, w0={self.w0}, outer_lr={self.outer_lr:.6g}{more}\n"
                f"  rerun: python -m pytest -q --long 'tests/test_oracle_suite.py::{TEST_OF[case.method]}[{case.id}]'")


SPEC_FIELDS = {"gd": ("kind", "learning_rate"), "backtracking": ("kind", "learning_rate", "c", "tau"),
               "momentum": ("kind", "learning_rate", "momentum"), "nesterov": ("kind", "learning_rate", "momentum"),
               "adam": ("kind", "learning_rate", "beta1", "beta2", "epsilon")}


def stability_limit(kind: str, L: float, momentum: float = 0.0) -> float:
    """The largest stable constant learning rate on a quadratic of largest curvature L: 2/L (GD),
    2(1 + μ)/L (heavy ball), 2(1 + μ)/((1 + 2μ)L) (Nesterov)."""
    if kind == "momentum":
        return 2 * (1 + momentum) / L
    if kind == "nesterov":
        return 2 * (1 + momentum) / ((1 + 2 * momentum) * L)
    return 2 / L


def draw_fraction(rng: np.random.Generator, stable_only: bool = False, low: float = 0.02) -> float:
    """A learning rate as a fraction of the stability limit: stable (55%: low … 0.95),
    borderline (15%: 0.975 … 1.025), unstable (30%: 1.05 … 10)."""
    u = 0.0 if stable_only else rng.random()
    if u < 0.55:
        return float(10 ** rng.uniform(np.log10(low), np.log10(0.95)))
    if u < 0.7:
        return float(rng.uniform(0.975, 1.025))
    return float(10 ** rng.uniform(np.log10(1.05), 1.0))


def draw_spec(rng: np.random.Generator, kind: str, L: float, stable_only: bool = False,
              low: float = 0.02) -> tuple[InnerOptimizerSpec, float]:
    """An inner optimizer of ``kind`` with a random learning rate (see ``draw_fraction``)."""
    momentum = float(rng.uniform(0.0, 0.95)) if kind in ("momentum", "nesterov") else 0.0
    if kind == "adam":
        fraction = float(10 ** rng.uniform(-3, 0.5))
        spec = InnerOptimizerSpec("adam", fraction, beta1=float(rng.choice([0.0, 0.5, 0.9])),
                                  beta2=float(rng.choice([0.9, 0.999])), epsilon=float(10 ** rng.uniform(-6, -1)))
        return spec, fraction
    if kind == "backtracking":
        fraction = float(10 ** rng.uniform(-1, 2))  # the line search shrinks it
        return InnerOptimizerSpec("backtracking", fraction * 2 / L), fraction
    fraction = draw_fraction(rng, stable_only, low)
    return InnerOptimizerSpec(kind, fraction * stability_limit(kind, L, momentum), momentum=momentum), fraction


def draw_box(rng: np.random.Generator, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """No box, a wide one, or a tight one around x0 (likely active after the update)."""
    box = str(rng.choice(["none", "wide", "tight"]))
    if box == "none":
        return np.full(len(x0), -np.inf), np.full(len(x0), np.inf), box
    width = rng.uniform(1, 10, len(x0)) if box == "wide" else rng.uniform(0.0, 0.3, len(x0))
    return x0 - width * rng.uniform(0.2, 1, len(x0)), x0 + width * rng.uniform(0.2, 1, len(x0)), box


def draw(case: Case, rig: Rig, T: Callable[[np.random.Generator], int], max_condition: float = 1e3,
         stable_only: bool = False, low: float = 0.02) -> Draw:
    rng = np.random.default_rng(case.seed)
    m = 1 if case.scalar else int(rng.integers(1, rig.m + 1))
    n = int(rng.integers(1, rig.n + 1))
    condition = float(10 ** rng.uniform(0, np.log10(max_condition)))
    coupling = float(10 ** rng.uniform(-1, 1))
    p = fo.random_quadratic_bilevel(m, n, int(rng.integers(2**31)), condition=condition, coupling=coupling)
    L = float(np.linalg.eigvalsh(p.A).max())
    spec, fraction = draw_spec(rng, case.kind, L, stable_only, low)
    x0 = rng.normal(size=m) * rng.uniform(0.5, 2)
    w0 = np.zeros(n) if rng.random() < 0.5 else rng.normal(size=n)
    lo, hi, box = draw_box(rng, x0)
    return Draw(p, m, n, condition, coupling, spec, fraction, T(rng), x0, w0, lo, hi, box,
                float(np.float32(10 ** rng.uniform(-3, 0))))


def padded(draw_: Draw, x: np.ndarray, size: int) -> np.ndarray:
    return pad(np.reshape(x, [-1]), size)


def expected_update(d: Draw, rig: Rig, direction: np.ndarray, tolerance: float) -> tuple[np.ndarray, float]:
    """λ after one step of the outer SGD (momentum from zero: λ − lr·d) and the box, and its
    tolerance (the clip is 1-Lipschitz)."""
    new = np.clip(d.x0 - d.outer_lr * direction, d.lo, d.hi)
    roundoff = 1e-13 * (fo.safe_norm(d.x0) + d.outer_lr * fo.safe_norm(direction))
    return padded(d, new, rig.m), d.outer_lr * tolerance + roundoff


def growth_text(growth: float) -> str:
    return f"the exact run grows {growth:.3g}× (limit {GROWTH_LIMIT:g})"


# -- ReverseHG, truncated, ForwardHG, ImplicitHG: one hyper-iteration -------------------------------

TRUNCATE = 8  # K of the truncated rigs: T = 8 is K = T (exact), T > 8 truncates


def t_reverse(rng: np.random.Generator) -> int:
    """T = 8 (unrolled tapes: one trace), 17 … 40, or 100 … 400 (stored states: one trace for all;
    long enough for an unstable run to overflow)."""
    u = rng.random()
    return 8 if u < 0.25 else int(rng.integers(17, 41)) if u < 0.75 else int(rng.integers(100, 401))


def t_any(low: int, high: int) -> Callable[[np.random.Generator], int]:
    """T uniform in low … high (75%) or in 100 … 400 (25%)."""
    return lambda rng: int(rng.integers(low, high + 1)) if rng.random() < 0.75 else int(rng.integers(100, 401))


HYPERGRADIENT_METHODS = {  # name -> (make the method, inner optimizers, T, kinds with a scalar-λ rig)
    "reverse": (lambda: far.ReverseHG(), ("gd", "momentum", "nesterov", "adam", "backtracking"), t_reverse, ("gd",)),
    "truncated": (lambda: far.ReverseHG.truncated(TRUNCATE), ("gd", "momentum", "adam"), t_reverse, ()),
    "forward": (lambda: far.ForwardHG(), ("gd", "momentum", "adam", "backtracking"),
                t_any(1, 40), ("gd",)),
    "implicit_cg": (lambda: far.ImplicitHG("cg", tolerance=CG_TOLERANCE, warm_start=False), ("gd", "momentum", "adam"),
                    t_any(1, 60), ("gd",)),
    "implicit_neumann": (lambda: far.ImplicitHG("neumann", tolerance=SERIES_TOLERANCE, max_iter=SERIES_MAX_ITER,
                                                warm_start=False), ("gd", "momentum"),
                         t_any(1, 60), ()),
    "implicit_fixed_point": (lambda: far.ImplicitHG("fixed_point", tolerance=SERIES_TOLERANCE, max_iter=SERIES_MAX_ITER,
                                                    warm_start=False), ("gd", "momentum", "nesterov"),
                             t_any(1, 60), ()),
}


def step_matrices(d: Draw) -> tuple[np.ndarray, np.ndarray]:
    """(∂Φ/∂s, ∂Φ/∂λ) of one step of GD / heavy ball / Nesterov on the quadratic, state (w, m)."""
    A, C, n, lr, mu = d.p.A, d.p.C, d.n, d.spec.learning_rate, d.spec.momentum
    I = np.eye(n)
    if d.spec.kind == "gd":
        return I - lr * A, -lr * C.T
    scale = 1 + mu if d.spec.kind == "nesterov" else 1.0
    top = np.hstack([I - lr * scale * A, -lr * (mu ** 2 if d.spec.kind == "nesterov" else mu) * I])
    return np.vstack([top, np.hstack([A, mu * I])]), np.vstack([-lr * scale * C.T, C.T])


class ImplicitExpectation(NamedTuple):
    hypergradient: np.ndarray
    tolerance: float
    allowed: bool
    why: str
    run: Any  # far_ho2.oracles.QuadraticUnroll
    slow: bool  # a series solver that contracts but needs more than a quarter of max_iter


def implicit_expectation(method: str, d: Draw) -> ImplicitExpectation:
    """ImplicitHG's oracle: the implicit-function hypergradient at w_T, its tolerance (the
    solver's residual target times the error per unit of residual, plus round-off), whether a
    raise is allowed (the inner run grows, or the series solver does not contract) and why."""
    run = fo.unroll_quadratic(d.p.A, d.p.C, d.p.a, d.x0, d.w0, d.T, d.spec)
    hypergradient, sensitivity = fo.implicit_quadratic_hypergradient(d.p, d.x0, run.w)
    _, gx, gw = fo.quadratic_outer(d.p, d.x0, run.w)
    eigenvalues = np.linalg.eigvalsh(d.p.A)
    roundoff = EXACT * (fo.safe_norm(gx) + sensitivity)
    # ImplicitHG's stated condition: the inner loop must not move away from stationarity
    # (‖∇_w L(w_T)‖ ≤ 2‖∇_w L(w_0)‖); within 5 % of the threshold either outcome is accepted
    start, end = (fo.safe_norm(fo.quadratic_inner(d.p, d.x0, w)[2]) for w in (d.w0, run.w))
    unconverged = not end <= 1.9 * start
    why = growth_text(run.growth) + f", ‖∇_w L‖ {start:.3g} at w_0 → {end:.3g} at w_T"
    if method == "implicit_cg":
        return ImplicitExpectation(hypergradient, sensitivity * CG_TOLERANCE + roundoff,
                                   run.growth > GROWTH_LIMIT or unconverged, why, run, False)
    if method == "implicit_neumann":
        contraction = float(np.abs(1 - d.spec.learning_rate * eigenvalues).max())  # α = the inner learning rate
        tolerance = sensitivity * SERIES_TOLERANCE + roundoff
    else:
        J, B = step_matrices(d)
        contraction = float(np.abs(np.linalg.eigvals(J)).max())
        b_norm = fo.safe_norm(gw)
        with np.errstate(all="ignore"):
            inverse = fo.safe_norm(np.linalg.inv(np.eye(len(J)) - J.T), 2) if contraction < 1 else np.inf
        tolerance = fo.safe_norm(B, 2) * max(fo.safe_norm(J, 2), 1) * inverse * SERIES_TOLERANCE * b_norm + roundoff
    needed = np.log(SERIES_TOLERANCE) / np.log(contraction) if 0 < contraction < 1 else np.inf
    why += f", the solver contracts by {contraction:.6g} per iteration (≈{needed:.0f} iterations for its tolerance)"
    slow = contraction < 1 and needed > SERIES_MAX_ITER / 4
    return ImplicitExpectation(hypergradient, tolerance,
                               run.growth > GROWTH_LIMIT or contraction >= 1 or slow or unconverged, why, run, slow)



def test_hypergradient(case: Case):
    """One hyper-iteration of ReverseHG, ``ReverseHG.truncated(8)``, ForwardHG or ImplicitHG: the
    hypergradient, E, w_T in the inner variables, λ after the outer update on the box."""
    make, _, T, _ = HYPERGRADIENT_METHODS[case.method]
    m, n = (1, 3) if case.scalar else (M_MAX, N_MAX)
    rig = rig_for(("hypergradient", case.method, case.kind, case.scalar),
                  lambda: Rig(make(), case.kind, m, n, scalar=case.scalar))
    if case.kind == "backtracking":  # short runs: converged steps decide the line search within round-off
        T = lambda rng: 8 if rng.random() < 0.25 else int(rng.integers(17, 25))  # noqa: E731
    d = draw(case, rig, T)
    truncate = TRUNCATE if case.method == "truncated" else None
    if case.method.startswith("implicit"):
        expectation = implicit_expectation(case.method, d)
        for attempt in range(1, 100):  # a contracting series solver gets the iterations it needs: redraw
            if not expectation.slow:
                break
            d = draw(case._replace(seed=case.seed + attempt * 10**7), rig, T)
            expectation = implicit_expectation(case.method, d)
        _, tolerance, allowed, why, run, _ = expectation
    else:
        exact = fo.unrolled_quadratic_hypergradient(d.p, d.x0, d.w0, d.T, d.spec, truncate=truncate)
        run, tolerance = exact.run, relative_tolerance(exact.scale)
        allowed, why = run.growth > GROWTH_LIMIT, growth_text(run.growth)

    def compute(x0: np.ndarray, w0: np.ndarray, roundoff: Optional[np.random.Generator] = None) -> dict:
        if case.method.startswith("implicit"):
            w = fo.unroll_quadratic(d.p.A, d.p.C, d.p.a, x0, w0, d.T, d.spec, roundoff=roundoff).w
            g = fo.implicit_quadratic_hypergradient(d.p, x0, w)[0]
        else:
            exact = fo.unrolled_quadratic_hypergradient(d.p, x0, w0, d.T, d.spec, truncate=truncate,
                                                        roundoff=roundoff)
            g, w = exact.hypergradient, exact.run.w
        return {"hypergradient": g, "E": fo.quadratic_outer(d.p, x0, w)[0], "inner/w": w}

    values, spreads = compute(d.x0, d.w0), roundoff_spread(compute, d, case.seed)
    w_star = -np.linalg.solve(d.p.A, d.p.C.T @ d.x0 + d.p.a)
    checks = {"hypergradient": (padded(d, values["hypergradient"], rig.m), tolerance),
              "lambda": expected_update(d, rig, values["hypergradient"], tolerance),
              "E": (values["E"], relative_tolerance(abs(values["E"]), outer_terms(d.p, d.x0, run.w))),
              "inner/w": (padded(d, run.w, rig.n), relative_tolerance(fo.safe_norm(run.w), fo.safe_norm(d.w0),
                                                                       fo.safe_norm(w_star)))}
    unchecked = ill_conditioned(spreads, tolerance / EXACT)
    if run.margin < 1e-9:  # the line search decided within round-off: TF may choose another j
        unchecked = f"a line-search decision within round-off (relative Armijo margin {run.margin:.2g})"
    rig.load(d.p, d.x0, d.w0, d.spec, d.lo, d.hi, d.outer_lr)
    outcome = execute(rig, d.T)
    describe = d.describe(case, truncate=TRUNCATE) if truncate else d.describe(case)
    judge(case.method, outcome, Expected(with_roundoff(checks, spreads, d), allowed, why, unchecked), describe,
          rig.method.name)


PERTURBATIONS, SPREAD_FACTOR, ILL_CONDITIONED = 3, 100.0, 1e-3


def roundoff_spread(compute: Callable[..., dict], d: "Draw", seed: int) -> dict:
    """How far the oracle's quantities move when λ0 and w0 move by one unit in the last place and
    every step's state by a relative round-off (three random draws): the round-off amplification
    of the exact computation, which no float64 implementation can beat (long Adam runs near
    convergence are chaotic: a few ulps can change their hypergradient in the fifth digit, or
    entirely)."""
    rng = np.random.default_rng(seed + 12345)
    base = compute(d.x0, d.w0)
    spreads = {name: 0.0 for name in base}

    def perturbed(v: np.ndarray) -> np.ndarray:
        return v + np.finfo(np.float64).eps * rng.choice([-1.0, 1.0], np.shape(v)) * np.maximum(
            np.abs(v), 1e-3 * (1 + np.abs(v).max(initial=0.0)))
    for _ in range(PERTURBATIONS):
        other = compute(perturbed(d.x0), perturbed(d.w0), rng)
        for name in base:
            with np.errstate(all="ignore"):
                spreads[name] = max(spreads[name], fo.safe_norm(np.asarray(other[name]) - np.asarray(base[name])))
    return spreads


def with_roundoff(checks: dict, spreads: dict, d: "Draw") -> dict:
    """``checks`` with ``SPREAD_FACTOR`` times the oracle's round-off spread added to the
    tolerances (λ after the update: the outer learning rate times the hypergradient's)."""
    out = dict(checks)
    for name, (want, tolerance) in checks.items():
        spread = spreads.get(name, d.outer_lr * spreads.get("hypergradient", 0.0) if name == "lambda" else 0.0)
        out[name] = (want, tolerance + SPREAD_FACTOR * spread)
    return out


def ill_conditioned(spreads: dict, scale: float) -> str:
    """Why the values are unchecked ('' if they are checked): the hypergradient moves by more than
    ``ILL_CONDITIONED`` of its size under one-ulp perturbations of the inputs."""
    spread = spreads.get("hypergradient", 0.0)
    if np.isfinite(spread) and np.isfinite(scale) and spread > ILL_CONDITIONED * scale:
        return (f"ill-conditioned in float64: one-ulp perturbations of λ0 and w0 move the exact "
                f"hypergradient by {spread:.3g} (size {scale:.3g})")
    return ""


def outer_terms(p: fo.QuadraticBilevel, x: np.ndarray, w: np.ndarray) -> float:
    """The sum of the absolute values of the terms of f(x, w): the scale of its round-off."""
    with np.errstate(all="ignore"):
        return float(0.5 * np.abs(w) @ np.abs(p.F) @ np.abs(w) + 0.5 * np.abs(x) @ np.abs(p.H) @ np.abs(x)
                     + np.abs(x) @ np.abs(p.K) @ np.abs(w) + np.abs(p.f_v) @ np.abs(w) + np.abs(p.h) @ np.abs(x))


# -- BOME and Penalty: one iteration ---------------------------------------------------------------

BOME_ETA = 0.5
ITERATION_METHODS = {  # name -> (make, inner optimizers, kinds with a scalar-λ rig)
    "bome": (lambda kind: far.BOME(eta=BOME_ETA, phi="value" if kind.endswith("value") else "grad_norm"),
             ("gd", "momentum", "gd_value"), ("gd",)),
    "penalty": (lambda kind: far.Penalty(), ("gd", "momentum", "adam"), ("gd",)),
}


def test_iteration(case: Case):
    """One BOME or penalty iteration from a random (λ, w) and (penalty) a random γ, λ_g, ε, ν:
    the direction, the joint step or the kept state, the stage schedule, against NumPy."""
    make, _, _ = ITERATION_METHODS[case.method]
    kind = case.kind.replace("_value", "")
    m, n = (1, 3) if case.scalar else (M_MAX, N_MAX)
    rig = rig_for(("iteration", case.method, case.kind, case.scalar),
                  lambda: Rig(make(case.kind), kind, m, n, scalar=case.scalar, constrained=case.method != "bome"))
    rng = np.random.default_rng(case.seed + 10**9)
    d = draw(case._replace(kind=kind), rig, t_any(1, 30))
    if case.method == "bome":  # BOME and Penalty start from the values the inner variables hold: w0
        # BOME takes no constraint (test_bome_refuses_a_constrained_hyperparameter): no box
        d = d._replace(lo=np.full(d.m, -np.inf), hi=np.full(d.m, np.inf), box="none")
        phi = "value" if case.kind.endswith("value") else "grad_norm"
        step = oracles.bome_step(d.p, d.x0, d.w0, d.T, d.spec, BOME_ETA, phi, rig.method.delta)

        def compute(x0: np.ndarray, w0: np.ndarray, roundoff: Optional[np.random.Generator] = None) -> dict:
            s = oracles.bome_step(d.p, x0, w0, d.T, d.spec, BOME_ETA, phi, rig.method.delta, roundoff)
            return {"hypergradient": s.direction_x, "E": s.value, "inner/w": w0 - d.spec.learning_rate * s.direction_w}
        direction, tolerance = step.direction_x, relative_tolerance(step.scale)
        values = compute(d.x0, d.w0)
        checks = {"inner/w": (padded(d, values["inner/w"], rig.n),
                              relative_tolerance(fo.safe_norm(d.w0), d.spec.learning_rate * step.scale)),
                  "E": (step.value, relative_tolerance(abs(step.value), outer_terms(d.p, d.x0, d.w0)))}
        extra = dict(phi=phi, mu=step.mu, q=step.q)
        rig.load(d.p, d.x0, d.w0, d.spec, d.lo, d.hi, d.outer_lr)
    else:
        gamma, lambda_g = float(10 ** rng.uniform(-2, 2)), float(10 ** rng.uniform(-3, 0))
        nu = rng.normal(size=d.n) * rng.choice([0.0, 1.0])
        rate_scale = float(rng.choice([1.0, 10 ** rng.uniform(-1, 0)]))
        hessian = d.p.F + gamma * d.p.A @ d.p.A + lambda_g * d.p.A  # of h_w: its own stability limit
        spec, fraction = draw_spec(rng, kind, float(np.linalg.eigvalsh(hessian).max()))
        d = d._replace(spec=spec._replace(learning_rate=spec.learning_rate / rate_scale), rate=fraction)
        step = oracles.penalty_step(d.p, d.x0, d.w0, d.T, d.spec, nu, gamma, lambda_g, rate_scale, lo=d.lo, hi=d.hi)
        epsilon = float(np.sqrt(step.norm2) * 10 ** rng.uniform(-1, 1)) if np.isfinite(step.norm2) else 1.0

        def compute(x0: np.ndarray, w0: np.ndarray, roundoff: Optional[np.random.Generator] = None) -> dict:
            s = oracles.penalty_step(d.p, x0, w0, d.T, d.spec, nu, gamma, lambda_g, rate_scale, roundoff, d.lo, d.hi)
            out = {"hypergradient": s.direction, "E": s.value, "inner/w": s.w, "method/nu/0/0": gamma * s.lower}
            out.update({f"method/slots/0/{i}": slot for i, slot in enumerate(s.slots)})
            return out
        direction, tolerance = step.direction, relative_tolerance(step.scale)
        checks = penalty_checks(d, rig, step, gamma, lambda_g, epsilon, nu, rate_scale)
        extra = dict(gamma=gamma, lambda_g=lambda_g, epsilon=epsilon, nu=nu, rate_scale=rate_scale,
                     stage_passed=step.norm2 < epsilon ** 2)
        rig.load(d.p, d.x0, d.w0, d.spec, d.lo, d.hi, d.outer_lr)
        method = rig.method
        for variable, value in ((method.gamma, gamma), (method.lambda_g, lambda_g), (method.epsilon, epsilon),
                                (method.rate_scale, rate_scale)):
            variable.assign(value)
        method.nu[0][0].assign(pad(nu, rig.n))
    spreads = roundoff_spread(compute, d, case.seed)
    checks["hypergradient"] = (padded(d, direction, rig.m), tolerance)
    checks["lambda"] = expected_update(d, rig, direction, tolerance)
    outcome = execute(rig, d.T)
    growth = step.run.growth
    judge(case.method, outcome, Expected(with_roundoff(checks, spreads, d), growth > GROWTH_LIMIT, growth_text(growth),
                                         ill_conditioned(spreads, tolerance / EXACT)),
          d.describe(case, **extra), rig.method.name)


def penalty_checks(d: Draw, rig: Rig, step: Any, gamma: float, lambda_g: float, epsilon: float, nu: np.ndarray,
                   rate_scale: float) -> dict:
    """The penalty method's state after one iteration: w_T and the kept slots, and the stage
    schedule (when ‖∇h‖² < ε²: ν += γ∇_w g, γ ×1.1, λ_g, ε, the rates ×0.9)."""
    method, n = rig.method, rig.n
    w_tolerance = relative_tolerance(fo.safe_norm(step.w), fo.safe_norm(d.w0))
    checks = {"inner/w": (padded(d, step.w, n), w_tolerance),
              "E": (step.value, relative_tolerance(abs(step.value), outer_terms(d.p, d.x0, step.w)))}
    g = step.run.gradient_scale
    for i, slot in enumerate(step.slots):  # m (≤ T·max‖g‖), v (≤ max‖g‖²), then β₁ᵗ and β₂ᵗ
        size = fo.safe_norm(slot) if np.ndim(slot) else abs(slot)
        terms = [d.T * g, g * g, 0.0, 0.0][i]
        checks[f"method/slots/0/{i}"] = (pad(np.reshape(slot, [-1]), n) if np.ndim(slot) else slot,
                                         relative_tolerance(size, terms))
    if abs(step.norm2 - epsilon ** 2) <= 1e-6 * epsilon ** 2:  # the stage test within round-off: unchecked
        return checks
    passed = step.norm2 < epsilon ** 2
    factors = method.factors
    grown = gamma * factors["gamma"] if passed else gamma
    checks["method/gamma"] = (grown, 1e-15 * grown)
    checks["method/stage"] = (1.0 if passed else 0.0, 0.0)
    checks["method/lambda_g"] = (lambda_g * (factors["lambda_g"] if passed else 1), 1e-15 * lambda_g)
    checks["method/epsilon"] = (epsilon * (factors["epsilon"] if passed else 1), 1e-15 * epsilon)
    checks["method/rate_scale"] = (rate_scale * (factors["lr"] if passed else 1), 1e-15)
    new_nu = nu + gamma * step.lower if passed else nu
    checks["method/nu/0/0"] = (pad(new_nu, n), relative_tolerance(fo.safe_norm(nu), gamma * fo.safe_norm(step.lower)))
    outer_lr = d.outer_lr * (factors["outer_lr"] if passed else 1)
    checks["outer/0/learning_rate"] = (outer_lr, 1e-7 * outer_lr)  # a float32 variable
    return checks


# -- end to end: the bilevel solution over a box ---------------------------------------------------

def solution_problem(case: Case, max_condition: float) -> tuple:
    """(rng, a random problem of random dimensions, m, n, condition, coupling) for a solution case."""
    rng = np.random.default_rng(case.seed)
    m, n = int(rng.integers(1, M_MAX + 1)), int(rng.integers(1, N_MAX + 1))
    condition = float(10 ** rng.uniform(0, np.log10(max_condition)))
    coupling = float(10 ** rng.uniform(-0.5, 0.5))
    p = fo.random_quadratic_bilevel(m, n, int(rng.integers(2**31)), condition=condition, coupling=coupling)
    return rng, p, m, n, condition, coupling


def solution_box(rng: np.random.Generator, x_free: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """No box, or a box around the unconstrained solution that cuts it off in some coordinates."""
    m = len(x_free)
    box = str(rng.choice(["none", "active"]))
    if box == "none":
        return np.full(m, -np.inf), np.full(m, np.inf), box
    lo = x_free - rng.uniform(-0.5, 1.0, m)
    hi = np.maximum(x_free + rng.uniform(-0.5, 1.0, m), lo + 0.1)
    return lo, hi, box


class Iterations(NamedTuple):
    outcome: Outcome  # of the last iteration run (the failing one, if any)
    iterations: int


def iterate(rig: Rig, T: int, K: int) -> Iterations:
    """Up to K hyper-iterations; stops at the first exception (its outcome compares the
    variables before and after that iteration)."""
    outcome = None
    for k in range(K):
        outcome = execute(rig, T)
        if outcome.error is not None:
            return Iterations(outcome, k)
    return Iterations(outcome, K)


def solution_expected(rig: Rig, result: Iterations, x_star: np.ndarray, tolerance: float, allowed: bool,
                      why: str) -> Expected:
    """λ at λ* within ``tolerance`` (or a raise, where ``allowed``)."""
    return Expected({"lambda": (pad(x_star, rig.m), tolerance)}, allowed,
                    why + f"; stopped after {result.iterations} iterations")


def test_solution(case: Case):
    {"reverse_solution": reverse_solution, "penalty_solution": penalty_solution,
     "bome_solution": bome_solution}[case.method](case)


def reverse_solution(case: Case):
    """ReverseHG and a projected outer gradient descent with step 1/L on the T-step hyper-objective
    (exactly quadratic for GD and momentum): after K steps the error is at most
    (1 − μ/L)^K ‖λ_0 − λ*_T‖, λ*_T its box-constrained minimizer (active sets, KKT checked)."""
    rig = rig_for(("solution", case.method, case.kind),
                  lambda: Rig(far.ReverseHG(), case.kind, M_MAX, N_MAX, outer=keras.optimizers.SGD(0.1)))
    for attempt in itertools.count():  # a hyper-objective of condition ≤ 30 (K ≤ 700 steps)
        rng, p, m, n, condition, coupling = solution_problem(case._replace(seed=case.seed * 1000 + attempt), 1e2)
        spec, fraction = draw_spec(rng, case.kind, float(np.linalg.eigvalsh(p.A).max()), stable_only=True)
        T = t_reverse(rng)
        w0 = rng.normal(size=n)
        at_zero = fo.unroll_quadratic(p.A, p.C, p.a, np.zeros(m), w0, T, spec)
        Q, c = fo.quadratic_hyperobjective(p, at_zero.tangent, at_zero.w)
        curvature = np.linalg.eigvalsh(Q)
        if curvature.max() / curvature.min() <= 30:
            break
    x_free = np.linalg.solve(Q, -c)
    lo, hi, box = solution_box(rng, x_free)
    x_star = fo.box_minimizer(Q, c, lo, hi)
    assert fo.projected_gradient_residual(Q, c, lo, hi, x_star) <= 1e-9 * (1 + np.abs(c).max())
    x0 = np.clip(rng.normal(size=m) * 2, lo, hi)
    lr = float(np.float32(1 / curvature.max()))
    rate = float(np.abs(1 - lr * curvature).max())  # the projected step's contraction factor
    K = 1 if rate < 1e-10 else int(min(np.ceil(np.log(1e-10) / np.log(rate)), 800))
    rig.load(p, x0, w0, spec, lo, hi, lr)
    result = iterate(rig, T, K)
    tolerance = rate ** K * np.linalg.norm(x0 - x_star) + 1e-9 * (1 + np.linalg.norm(x_star))
    describe = (f"seed={case.seed}, attempt {attempt}, m={m}, n={n}, condition={condition:.4g}, "
                f"coupling={coupling:.4g}, "
                f"optimizer {spec}, T={T}, box={box} [{lo}, {hi}], λ0={x0}, w0={w0}, outer SGD lr={lr:.6g}, K={K}, "
                f"λ*={x_star}\n  rerun: python -m pytest -q --long 'tests/test_oracle_suite.py::test_solution[{case.id}]'")
    why = f"stable inner run, hyper-objective condition {curvature.max() / curvature.min():.3g}"
    judge(case.method, result.outcome, solution_expected(rig, result, x_star, tolerance, False, why), describe,
          rig.method.name)


FAST_SCHEDULE = dict(gamma=1.0, lambda_g=0.1, epsilon=0.1, gamma_factor=2.0, epsilon_factor=0.5, lr_factor=0.5,
                     outer_lr_factor=1.0, max_gamma=1.6e4)
PENALTY_T, PENALTY_K = 60, 400


def penalty_reference(p: fo.QuadraticBilevel, x0, w0, lo, hi, spec: InnerOptimizerSpec, outer_lr: float,
                      momentum: float = 0.9) -> tuple[np.ndarray, float]:
    """``PENALTY_K`` iterations of far_ho2's penalty method with ``FAST_SCHEDULE`` and SGD with
    momentum on λ, projected on the box, in NumPy: (the final λ, the largest ‖λ_k − λ_0‖)."""
    s = FAST_SCHEDULE
    x, w, nu, velocity = x0.copy(), w0.copy(), np.zeros_like(w0), np.zeros_like(x0)
    gamma, lambda_g, epsilon, rate = s["gamma"], s["lambda_g"], s["epsilon"], 1.0
    largest, least = 0.0, np.inf
    for _ in range(PENALTY_K):
        step = oracles.penalty_step(p, x, w, PENALTY_T, spec, nu, gamma, lambda_g, rate, lo=lo, hi=hi)
        if not np.all(np.isfinite(step.w)) or not np.isfinite(step.norm2):
            return x, np.inf
        if step.norm2 > np.sqrt(far.guard.DEFAULT_GROWTH_LIMIT) * max(least, (1e-4 * epsilon) ** 2):
            return x, np.inf  # the stage diverges after converging: far_ho2's Penalty raises (its _trusted)
        w = step.w
        velocity = momentum * velocity - outer_lr * step.direction
        x = np.clip(x + velocity, lo, hi)
        largest = max(largest, float(np.linalg.norm(x - x0)))
        if not step.norm2 < epsilon ** 2:
            least = min(least, step.norm2)
        else:
            least = np.inf
            nu = nu + gamma * step.lower
            lambda_g, epsilon = lambda_g * 0.9, epsilon * s["epsilon_factor"]  # λ_g: the default lambda_factor
            grown = min(gamma * s["gamma_factor"], s["max_gamma"])
            if grown > gamma:
                gamma, rate = grown, rate * s["lr_factor"]
    return x, largest


def penalty_solution(case: Case):
    """The penalty method (augmented Lagrangian, a fast γ schedule) from random (λ, w) to the
    box-constrained bilevel solution λ*: within ``PENALTY_SOLUTION`` after ``PENALTY_K``
    iterations of T = 60 (the NumPy reference of the same schedule decides whether the run is
    stable: if it grows, a raise is allowed)."""
    rig = rig_for(("solution", case.method, case.kind),
                  lambda: Rig(far.Penalty(**FAST_SCHEDULE), case.kind, M_MAX, N_MAX,
                              outer=keras.optimizers.SGD(0.1, momentum=0.9)))
    rng, p, m, n, condition, coupling = solution_problem(case, 3.0)
    Q, c = fo.quadratic_hyperobjective(p)
    lo, hi, box = solution_box(rng, np.linalg.solve(Q, -c))
    x_star = fo.box_minimizer(Q, c, lo, hi)
    x0, w0 = np.clip(rng.normal(size=m) * 2, lo, hi), rng.normal(size=n)
    limit = 1 / (np.linalg.norm(p.F, 2) + FAST_SCHEDULE["gamma"] * np.linalg.norm(p.A, 2) ** 2
                 + FAST_SCHEDULE["lambda_g"] * np.linalg.norm(p.A, 2))
    fraction = float(10 ** rng.uniform(-0.5, 0.5))  # up to 3× the stable rate at γ₀ (×2 its limit: unstable)
    spec = InnerOptimizerSpec("gd", fraction * limit)
    outer_lr = float(np.float32(0.3 / np.linalg.norm(Q, 2)))
    rig.load(p, x0, w0, spec, lo, hi, outer_lr)
    reference, largest = penalty_reference(p, x0, w0, lo, hi, spec, outer_lr)
    result = iterate(rig, PENALTY_T, PENALTY_K)
    tolerance = PENALTY_SOLUTION * max(1.0, np.linalg.norm(x_star))
    grows = largest > GROWTH_LIMIT * max(np.linalg.norm(x0 - x_star), 1e-3)
    why = (f"the NumPy reference of the same schedule ends at ‖λ − λ*‖ = "
           f"{fo.safe_norm(reference - x_star):.3g}, "
           f"largest ‖λ_k − λ_0‖ = {largest:.3g}")
    describe = (f"seed={case.seed}, m={m}, n={n}, condition={condition:.4g}, coupling={coupling:.4g}, inner GD "
                f"η = {spec.learning_rate:.6g} ({fraction:.3g} × 1/L(h_w) at γ₀), T={PENALTY_T}, K={PENALTY_K}, "
                f"Penalty({FAST_SCHEDULE}), outer SGD(lr={outer_lr:.6g}, momentum 0.9), box={box} [{lo}, {hi}], "
                f"λ0={x0}, w0={w0}, λ*={x_star}\n"
                f"  rerun: python -m pytest -q --long 'tests/test_oracle_suite.py::test_solution[{case.id}]'")
    final = np.reshape(rig.lam.numpy(), [-1])[:m]
    why += (f"; far_ho2 ends at γ = {float(rig.method.gamma.numpy()):.4g}, stage {int(rig.method.stage.numpy())}, "
            f"KKT residual {fo.projected_gradient_residual(Q, c, lo, hi, final):.3g}")
    judge(case.method, result.outcome, solution_expected(rig, result, x_star, tolerance, grows, why), describe,
          rig.method.name)


BOME_K = 800


def bome_solution(case: Case):
    """BOME (η = 0.5, T steps of GD at 1/L with (1 − 1/κ)^T ≤ 1e-4, steps 0.05/(1 + k/1000) for λ
    and w) from random (λ, w): after ``BOME_K`` iterations ‖λ − λ*‖ ≤ ``BOME_SOLUTION``·‖λ_0 − λ*‖
    (BOME is first order and approximate: with decaying steps its error keeps falling, slowly)."""
    phi = "value" if case.kind.endswith("value") else "grad_norm"
    schedule = lambda: keras.optimizers.schedules.InverseTimeDecay(0.05, decay_steps=1, decay_rate=1e-3)  # noqa: E731
    rig = rig_for(("solution", case.method, case.kind),
                  lambda: Rig(far.BOME(eta=BOME_ETA, phi=phi, inner_optimizer=keras.optimizers.SGD(schedule())),
                              "gd", M_MAX, N_MAX, outer=keras.optimizers.SGD(schedule()), constrained=False))
    rng, p, m, n, condition, coupling = solution_problem(case, 3.0)
    Q, c = fo.quadratic_hyperobjective(p)
    solution_box(rng, np.linalg.solve(Q, -c))  # drawn as for the other methods (the same stream), not used:
    lo, hi, box = np.full(m, -np.inf), np.full(m, np.inf), "none"  # BOME takes no constraint
    x_star = fo.box_minimizer(Q, c, lo, hi)
    x0, w0 = np.clip(rng.normal(size=m) * 2, lo, hi), rng.normal(size=n)
    eigenvalues = np.linalg.eigvalsh(p.A)
    contraction = 1 - eigenvalues.min() / eigenvalues.max()
    T = max(1, int(np.ceil(np.log(1e-4) / np.log(contraction)))) if contraction > 0 else 1
    spec = InnerOptimizerSpec("gd", 1 / eigenvalues.max())
    rig.load(p, x0, w0, spec, lo, hi, 0.05)
    def reference(roundoff: Optional[np.random.Generator] = None) -> np.ndarray:
        """The same iterations in NumPy (the steps' rates in float32, as Keras computes them)."""
        x, w = x0.copy(), w0.copy()
        for k in range(BOME_K):
            step = oracles.bome_step(p, x, w, T, spec, BOME_ETA, phi, rig.method.delta, roundoff)
            rate = float(np.float32(0.05) / (1 + np.float32(1e-3) * k))
            x, w = np.clip(x - rate * step.direction_x, lo, hi), w - rate * step.direction_w
        return x
    x = reference()
    rng = np.random.default_rng(case.seed)  # φ = value: q̂ = g(w) − g(ŵ) cancels, μ amplifies its round-off
    spread = max(fo.safe_norm(reference(rng) - x) for _ in range(2))
    result = iterate(rig, T, BOME_K)
    start = np.linalg.norm(x0 - x_star)
    why = (f"stable inner run; the NumPy reference of the same iterations ends at ‖λ − λ*‖ = "
           f"{np.linalg.norm(x - x_star):.3g} (start {start:.3g})")
    describe = (f"seed={case.seed}, φ={phi}, m={m}, n={n}, condition={condition:.4g}, coupling={coupling:.4g}, "
                f"inner GD η = {spec.learning_rate:.6g}, T={T}, K={BOME_K}, box={box} [{lo}, {hi}], λ0={x0}, "
                f"w0={w0}, "
                f"λ*={x_star}\n  rerun: python -m pytest -q --long 'tests/test_oracle_suite.py::test_solution[{case.id}]'")
    expected = solution_expected(rig, result, x_star, BOME_SOLUTION * start, False, why)
    expected.checks["lambda (the NumPy reference's)"] = (pad(x, rig.m),
                                                         1e-6 * (1 + np.linalg.norm(x)) + SPREAD_FACTOR * spread)
    judge(case.method, result.outcome, expected, describe, rig.method.name)


# -- StochasticHG: the Gaussian problem ------------------------------------------------------------

CHAINS, BURN_IN, N_SAMPLES = 32, 300, 12
STOCHASTIC_RIGS = [("pathwise", False, 3), ("pathwise", True, 2), ("score", False, 5), ("score", True, 3),
                   ("reversed", False, 1), ("reversed", True, 4)]  # (estimator, one λ per weight, d)


class StochasticRig:
    """K chains of L = ½‖Xw − y‖² + ½Σλ_j w_j² (summed over chains), E = the chains' mean of
    ½‖Xv w − yv‖², SGLD at step ε and temperature τ (variables); λ scalar or one per weight."""

    def __init__(self, estimator: str, per_weight: bool, d: int):
        self.d, self.per_weight = d, per_weight
        variable = lambda shape: tf.Variable(np.zeros(shape), trainable=False, dtype=tf.float64)  # noqa: E731
        self.X, self.Xv = variable((N_SAMPLES, d)), variable((N_SAMPLES, d))
        self.y, self.yv = variable(N_SAMPLES), variable(N_SAMPLES)
        shape = (d,) if per_weight else ()
        self.lo, self.hi = variable(shape), variable(shape)
        self.eps, self.tau = variable(()), variable(())
        self.lam = far.get_hyperparameter(f"oracle_lambda_{next(Rig.count)}", np.ones(shape),
                                          constraint=lambda v: tf.clip_by_value(v, self.lo, self.hi))
        self.w = tf.Variable(np.zeros((CHAINS, d)), name="w")
        inner = lambda: (0.5 * tf.reduce_sum((self.w @ tf.transpose(self.X) - self.y) ** 2)  # noqa: E731
                         + 0.5 * tf.reduce_sum(self.lam * self.w ** 2))
        outer = lambda: 0.5 * tf.reduce_sum((self.w @ tf.transpose(self.Xv) - self.yv) ** 2) / CHAINS  # noqa: E731
        self.method = far.StochasticHG(estimator, burn_in=BURN_IN, batches=SE_BATCHES)
        self.outer = keras.optimizers.SGD(0.1, momentum=0.5)
        self.ho = far.HyperOptimizer(self.method)
        self.sgld = far.SGLDOptimizer(self.eps, temperature=self.tau, seed=7)
        self.run = self.ho.minimize(outer, self.outer, inner, self.sgld, hyper_list=[self.lam], var_list=[self.w])
        self.phi0 = self.method.inner_problems[0].initial_values[0]
        self.variables = labelled_variables(self.ho, self.phi0)
        self.initial = {name: v.numpy().copy() for name, v in self.variables}

    snapshot = Rig.snapshot


def test_stochastic(case: Case):
    """StochasticHG on a random Gaussian problem (condition of A ≤ 4.2, ε·λ_max(A) stable in
    [0.4, 1] or unstable in [2.2, 6]) against ``far_ho2.oracles.gaussian_bilevel`` for the
    chain's own stationary law, within ``Z_SE`` standard errors; the outer update on the box."""
    estimator, per_weight, d = STOCHASTIC_RIGS[int(case.kind)]
    rig = rig_for(("stochastic", case.kind), lambda: StochasticRig(estimator, per_weight, d))
    rng = np.random.default_rng(case.seed)
    U, _ = np.linalg.qr(rng.normal(size=(N_SAMPLES, d)))
    V, _ = np.linalg.qr(rng.normal(size=(d, d)))
    X = (U * np.sqrt(rng.uniform(1, 4, d))) @ V.T  # XᵀX has eigenvalues in [1, 4]
    y, Xv, yv = rng.normal(size=N_SAMPLES), rng.normal(size=(N_SAMPLES, d)), rng.normal(size=N_SAMPLES)
    lam0 = rng.uniform(0.2, 1.0, d) if per_weight else float(rng.uniform(0.2, 1.0))
    A = X.T @ X + np.diag(np.broadcast_to(lam0, d))
    eigenvalues = np.linalg.eigvalsh(A)
    unstable = rng.random() < 0.25
    eps = float((rng.uniform(2.2, 6.0) if unstable else rng.uniform(0.4, 1.0)) / eigenvalues.max())
    tau = float(10 ** rng.uniform(-1, 0.5))
    batch = int(np.ceil(12 / (eps * eigenvalues.min())))  # ≥ 10 autocorrelation times per batch
    T = BURN_IN + SE_BATCHES * batch
    lo = np.full(np.shape(lam0), 0.05)
    hi = np.asarray(lam0) + rng.choice([0.01, 10.0])  # tight (often active) or wide
    outer_lr = float(np.float32(10 ** rng.uniform(-2, 0)))
    mu = np.linalg.solve(A, X.T @ y)
    for variable, value in ((rig.X, X), (rig.y, y), (rig.Xv, Xv), (rig.yv, yv), (rig.eps, eps), (rig.tau, tau),
                            (rig.lo, lo), (rig.hi, hi), (rig.lam, lam0), (rig.w, np.tile(mu, (CHAINS, 1))),
                            (rig.phi0, np.tile(mu, (CHAINS, 1)))):
        variable.assign(value)
    for name, v in rig.variables:
        if not name.startswith(("inner/", "phi0", "lambda")):
            v.assign(rig.initial[name])
    rig.outer.learning_rate.assign(outer_lr)
    fresh(rig.ho)
    kind = "one per weight" if per_weight else "scalar"
    describe = (f"seed={case.seed}, estimator={estimator}, d={d}, λ0={lam0} ({kind}), ε={eps:.6g} "
                f"(ε·λ_max(A) = {eps * eigenvalues.max():.3g}), τ={tau:.4g}, T={T} (burn-in {BURN_IN}), "
                f"{CHAINS} chains, box [{lo}, {hi}], outer_lr={outer_lr:.6g}\n"
                f"  rerun: python -m pytest -q --long 'tests/test_oracle_suite.py::test_stochastic[{case.id}]'")
    outcome = execute(rig, T)
    if unstable:
        why = f"ε·λ_max(A) = {eps * eigenvalues.max():.3g} > 2: the chain has no stationary law"
        judge("stochastic", outcome, Expected({"hypergradient": (np.full(np.size(lam0), np.nan), 0.0)}, True, why),
              describe, "StochasticHG")
        return
    oracle = fo.gaussian_bilevel(X, y, Xv, yv, lam0, tau, step=eps)
    target = np.reshape(oracle.score if estimator == "score" else oracle.pathwise, [-1])

    def wrong() -> list:  # per component, within Z_SE of its own standard error
        se, estimate = np.reshape(rig.method.standard_errors[0][0], [-1]), outcome.grads
        found = [f"component {j}: estimate {estimate[j]:.6g}, oracle {target[j]:.6g}, SE {se[j]:.3g} "
                 f"({abs(estimate[j] - target[j]) / se[j]:.2f} SEs > {Z_SE})"
                 for j in range(len(target)) if not abs(estimate[j] - target[j]) <= Z_SE * se[j]]
        return found + ([f"standard errors {se}"] if not np.all(se > 0) else [])

    checks = {}
    if outcome.error is None:  # the outer update of the estimate it returned, on the box
        new = np.clip(np.reshape(lam0, [-1]) - outer_lr * outcome.grads, np.reshape(lo, [-1]), np.reshape(hi, [-1]))
        checks["lambda"] = (new, 1e-12 * (1 + np.linalg.norm(new)))
    judge("stochastic", outcome, Expected(checks, False, "stable chain"), describe, "StochasticHG", wrong)


# -- the judge can fail ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, raise_allowed", [
    ("match", False), ("raised", True),  # right, loud
    ("false alarm", False), ("raised, variables changed", True), ("NaN left", False), ("other exception", True),
    ("silent wrong value", True), ("wrong value, warned", True), ("unnamed error", True)])
def test_the_judge_passes_right_or_loud_outcomes_only(kind: str, raise_allowed: bool):
    """Synthetic outcomes: only a match, or a named FloatingPointError that changed nothing where
    a raise is allowed, pass; every other outcome fails the case."""
    before = {"lambda": np.array([1.0, 2.0]), "inner/w": np.array([0.5])}
    after = {"lambda": np.array([0.9, 2.0]), "inner/w": np.array([0.25])}
    error = FloatingPointError("ReverseHG, hyper-iteration 0: the inner dynamics grew 1e9× at inner step 3 (w)")
    outcome = {"match": Outcome(None, 1.0, np.array([0.1, 0.0]), [], before, after),
               "raised": Outcome(error, None, None, [], before, dict(before)),
               "false alarm": Outcome(error, None, None, [], before, dict(before)),
               "raised, variables changed": Outcome(error, None, None, [], before, after),
               "NaN left": Outcome(None, 1.0, np.array([0.1, 0.0]), [], before,
                                   {**after, "inner/w": np.array([np.nan])}),
               "other exception": Outcome(ValueError("internal"), None, None, [], before, dict(before)),
               "silent wrong value": Outcome(None, 1.0, np.array([0.1, 1e-3]), [], before, after),
               "wrong value, warned": Outcome(None, 1.0, np.array([0.1, 1e-3]), ["did not converge"], before, after),
               "unnamed error": Outcome(FloatingPointError("overflow"), None, None, [], before, dict(before))}[kind]
    expected = Expected({"hypergradient": (np.array([0.1, 0.0]), 1e-9), "lambda": (np.array([0.9, 2.0]), 1e-9)},
                        raise_allowed, "synthetic")
    if kind in ("match", "raised"):
        judge("judge", outcome, expected, "synthetic", "ReverseHG")
        return
    with pytest.raises(pytest.fail.Exception, match={"false alarm": "although nothing grows",
                                                     "raised, variables changed": "but changed",
                                                     "NaN left": "NaN/Inf left", "other exception": "raised ValueError",
                                                     "silent wrong value": "silent wrong value",
                                                     "wrong value, warned": "RuntimeWarning only",
                                                     "unnamed error": "does not name"}[kind]):
        judge("judge", outcome, expected, "synthetic", "ReverseHG")


# -- collection --------------------------------------------------------------------------------------

TEST_OF = {**{m: "test_hypergradient" for m in HYPERGRADIENT_METHODS},
           **{m: "test_iteration" for m in ITERATION_METHODS},
           **{m: "test_solution" for m in ("reverse_solution", "penalty_solution", "bome_solution")},
           "stochastic": "test_stochastic"}
SOLUTION_KINDS = {"reverse_solution": ("gd", "momentum"), "penalty_solution": ("gd",),
                  "bome_solution": ("gd", "gd_value")}


def cases(method: str, kinds: tuple, scalar_kinds: tuple, count: int) -> list[Case]:
    """``count`` cases of ``method``, round-robin over the inner optimizers and a scalar-λ rig
    (every fifth case of the kinds that have one); seeds are fixed by the method's name."""
    base = sum(ord(ch) * 31 ** i for i, ch in enumerate(method)) % 100_000 * 1000
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        scalar = kind in scalar_kinds and i % 5 == 4
        out.append(Case(method, kind, base + i, scalar))
    return out


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    factor = LONG_FACTOR if metafunc.config.getoption("--long") else 1
    name = metafunc.function.__name__
    generated: list[Case] = []
    if name == "test_hypergradient":
        for method, (_, kinds, _, scalar_kinds) in HYPERGRADIENT_METHODS.items():
            generated += cases(method, kinds, scalar_kinds, SHORT[method] * factor)
    elif name == "test_iteration":
        for method, (_, kinds, scalar_kinds) in ITERATION_METHODS.items():
            generated += cases(method, kinds, scalar_kinds, SHORT[method] * factor)
    elif name == "test_solution":
        for method, kinds in SOLUTION_KINDS.items():
            generated += cases(method, kinds, (), SHORT[method] * factor)
    elif name == "test_stochastic":
        generated = [Case("stochastic", str(i % len(STOCHASTIC_RIGS)), 7000 + i)
                     for i in range(SHORT["stochastic"] * factor)]
    # cases of one rig run together: each rig is traced once, and its first case pays for it
    generated.sort(key=lambda c: (c.method, c.kind, c.scalar, c.seed))
    metafunc.parametrize("case", generated, ids=[c.id for c in generated])


@pytest.fixture(autouse=True)
def _seed_and_registry():
    """Overrides conftest's: the same, less ``tf.random.set_seed``, which makes every
    ``tf.function`` trace again (a second per case); the cases draw from NumPy generators of
    their own seeds and SGLD's noise from its explicit seed."""
    np.random.seed(0)
    far.clear_hyperparameters()
    yield
    far.clear_hyperparameters()


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    """After the module: the rigs are let go (another module's test may need no HyperOptimizer
    alive, e.g. FAR-HO's ``far.hypergradients()`` before any run), then the outcomes per method
    (matched, raised, failed by cause)."""
    yield
    RIGS.clear()
    gc.collect()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not RESULTS:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_sep("-", "oracle suite: outcomes per method")
        for method in sorted({m for m, _ in RESULTS} - {"judge"}):
            counts = {category: n for (m, category), n in RESULTS.items() if m == method}
            reporter.write_line(f"{method:22s} {sum(counts.values()):5d} cases: "
                                + ", ".join(f"{category} {n}" for category, n in sorted(counts.items())))


def test_bome_refuses_a_constrained_hyperparameter():
    """Projected after BOME's step, a box active at the solution stalls it away from λ* (the
    NumPy reference of seed 49107001 ended 0.40 from λ*, 0.64 at the start): an error instead."""
    with pytest.raises(ValueError, match=r"BOME cannot take hyperparameters with `constraint=` \(\['oracle_lambda"):
        Rig(far.BOME(), "gd", 2, 3)  # its variables are gathered (ho.state()) at construction: the error then
