"""Hypergradient by the implicit function theorem at the end of the inner run (FAR-HO's
``ImplicitHG``, HOAG): ``implicit_hypergradient`` and ``ImplicitHG``, with a pluggable
matrix-free linear solver (conjugate gradient, Neumann series, fixed-point iteration)."""

import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from far_ho2 import autodiff
from far_ho2 import inputs as inputs_lib
from far_ho2 import linear_solve, sharding
from far_ho2.batches import Batches
from far_ho2.hypergradients.base import HyperGradient
from far_ho2.inner_problem import InnerProblem
from far_ho2.registry import Setting
from far_ho2.trajectory import empty_trajectory, run_steps
from far_ho2.types import RunResult

SOLVERS = ("cg", "neumann", "fixed_point")


DIVERGING = 2.0  # ‖∇_w L(w_T)‖ above this many times ‖∇_w L(w_0)‖: the inner loop is not converging


class ImplicitCarry(NamedTuple):
    q: list  # the solution of the linear system (the next run's warm start)
    residual: tf.Tensor  # its relative residual
    iterations: tf.Tensor  # the solver's iterations
    curvature: tf.Tensor  # CG: [min, max] Rayleigh quotient of its directions ([nan, nan] otherwise)
    stationarity: tf.Tensor  # [‖∇_w L(w_0)‖, ‖∇_w L(w_T)‖, |L(w_T)|] on the last step's batch


def implicit_hypergradient(problem: InnerProblem, outer_objective: Callable,
                           hypers: Sequence[tf.Variable], *, steps: Any, inner_batches: Batches,
                           outer_batch: Any = None, solver: Union[str, Callable] = "cg",
                           max_iter: int = 100, tol: Any = 1e-10, alpha: Any = None,
                           initial_state: Any = None, warm_start: Optional[list] = None,
                           offset: Any = 0) -> RunResult:
    """Hypergradient at w_T ≈ w*(λ) by the implicit function theorem:

        ∇²_w L · q = ∂E/∂w,        ∇F(λ) ≈ ∂E/∂λ − (∇²_{λw} L) q          (CG, Neumann)
        q = A_Tᵀ q + ∂E/∂s_T,      ∇F(λ) ≈ ∂E/∂λ + B_Tᵀ q                  (fixed point)

    with A_T = ∂Φ/∂s, B_T = ∂Φ/∂λ at s_T (Grazzi et al. 2020; for gradient descent both are
    the same system, η∇²_w L). Matrix-free: Hessian-vector products forward-over-reverse, or
    vector-Jacobian products of Φ. Memory O(|s| + |λ|), independent of T; exact as T → ∞ and
    the solver converges, biased otherwise. Optimizer hyperparameters (learning rate, momentum)
    and Φ₀ do not move the solution w*, so they get no hypergradient (with the fixed-point
    solver, only the ∂Φ/∂λ term at s_T, which vanishes at w*).

    ``problem``, ``outer_objective``, ``hypers``, ``steps``, ``inner_batches``, ``outer_batch``,
    ``initial_state`` and ``offset`` are as in ``reverse_hypergradient``. The system uses the last
    step's batch.

    Args:
        solver: 'cg' (conjugate gradient; needs ∇²_w L positive definite), 'neumann', or
            'fixed_point'; or a callable ``solve(matvec, b, x0, *, max_iter, tol)`` returning a
            ``linear_solve.SolveResult`` for the Hessian system.
        max_iter: the solver's iteration limit.
        tol: the relative residual at which the solver stops.
        alpha: the Neumann step α (< 2/‖∇²L‖). Defaults to the inner learning rate.
        warm_start: the solver's initial guess (the previous run's q).

    The inner loop must converge: ``carry.stationarity`` holds ‖∇_w L‖ at w_0 and at w_T (on the
    last step's batch); to first order the hypergradient's error is proportional to
    ‖∇_w L(w_T)‖ (w_T − w* ≈ (∇²_w L)⁻¹ ∇_w L(w_T)).

    Returns:
        ``RunResult`` whose ``carry`` is an ``ImplicitCarry``.

    References:
        Pedregosa, ICML 2016 (HOAG), arXiv:1602.02355.
        Grazzi, Franceschi, Pontil, Salzo, ICML 2020, arXiv:2006.16218.
        Lorraine, Vicol, Duvenaud, AISTATS 2020, arXiv:1911.02590.
    """
    hypers = list(hypers)
    connected = [False] * len(hypers)
    steps = tf.convert_to_tensor(steps, tf.int32)
    inputs = inputs_lib.prepare(problem, inner_batches, hypers)
    x_sources, inputs_at = inputs.sources, inputs.at

    def last_inputs():
        return inputs_at(steps - 1)

    s0 = problem.initial_state() if initial_state is None else initial_state
    problem.load(s0.w)
    start_gradient = _norm(problem.gradient(last_inputs())[0])
    trajectory = run_steps(problem, empty_trajectory(s0, steps), inputs_at, 0, steps, offset)
    s_T = trajectory.final
    end_gradient, end_loss = problem.gradient(last_inputs())
    stationarity = tf.stack([start_gradient, _norm(end_gradient), tf.abs(tf.cast(sharding.total(end_loss), start_gradient.dtype))])
    outer = autodiff.outer_gradient(problem, outer_objective, outer_batch, hypers)
    total = autodiff.accumulate(autodiff.zeros_for_none([None] * len(hypers), hypers),
                                outer.hypers, connected)
    if solver == "fixed_point":
        def transpose_jacobian(v):
            return tf.nest.flatten(autodiff.transition_vjp(
                problem, s_T, last_inputs, steps + offset, tf.nest.pack_sequence_as(s0, v), []).state)
        b = tf.nest.flatten(autodiff.state_cotangent(s_T, outer.weights))
        result = linear_solve.solve_fixed_point(transpose_jacobian, b, warm_start, max_iter=max_iter, tol=tol)
        terms = autodiff.transition_vjp(problem, s_T, last_inputs, steps + offset,
                                        tf.nest.pack_sequence_as(s0, result.x), hypers, x_sources)
        hyper_terms, x_terms = terms.hypers, terms.extra
    else:
        def hessian(v):
            return autodiff.hessian_vector_product(problem, last_inputs(), v)
        if solver == "cg":
            result = linear_solve.solve_cg(hessian, outer.weights, warm_start, max_iter=max_iter, tol=tol)
        elif solver == "neumann":
            if alpha is None:
                alpha = problem.optimizer.params(steps + offset, problem.dtype).learning_rate
            result = linear_solve.solve_neumann(hessian, outer.weights, alpha=alpha, max_iter=max_iter, tol=tol)
        else:
            result = solver(hessian, outer.weights, warm_start, max_iter=max_iter, tol=tol)
        terms = autodiff.mixed_vjp(problem, last_inputs, result.x, hypers, x_sources)
        hyper_terms = [None if g is None else -g for g in terms.hypers]
        x_terms = [tf.zeros_like(x) if g is None else -g for g, x in zip(terms.extra, x_sources)]
    total = autodiff.accumulate(total, hyper_terms, connected)
    total = autodiff.accumulate(total, inputs.pull_back(x_terms, hypers), connected)
    curvature = result.curvature if result.curvature is not None else tf.fill([2], tf.constant(float("nan"), s_T.w[0].dtype))
    return RunResult(outer.value, [g if c else None for g, c in zip(total, connected)], s_T,
                     trajectory.losses.stack(), trajectory.health,
                     carry=ImplicitCarry(result.x, result.residual, result.iterations, curvature, stationarity))


def _singular(low: float, high: float, dtype: tf.DType) -> bool:
    """Whether CG's curvature range [low, high] says the Hessian is singular or indefinite."""
    return bool(high > 0 and low <= np.sqrt(np.finfo(dtype.as_numpy_dtype).eps) * high)


def _norm(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """‖w-part‖ over a sharded meta-batch (``far_ho2.sharding``)."""
    return tf.sqrt(sharding.squared_norm(tensors))


def hoag_tolerance(global_step: int) -> float:
    """HOAG's decreasing tolerance schedule: 0.1 · 0.9^k at hyper-iteration k (Pedregosa 2016)."""
    return 0.1 * 0.9 ** global_step


def default_tolerance(dtype: tf.DType) -> float:
    """A tolerance the solver can reach in ``dtype``: about the square root of its precision."""
    return 1e-10 if dtype == tf.float64 else 1e-6


class ImplicitHG(HyperGradient):
    """Implicit-differentiation hypergradient (FAR-HO's ``ImplicitHG``, HOAG).

    Args (FAR-HO's first three, in its order):
        linear_system_solver: 'cg' (default, as FAR-HO and HOAG; also for `None`), 'neumann',
            'fixed_point', or a callable ``solve(matvec, b, x0, *, max_iter, tol) ->
            linear_solve.SolveResult``.
        tolerance: the solver's relative residual target: a number, or a function of the
            hyper-iteration k such as ``hoag_tolerance`` (HOAG's 0.1·0.9^k, loose at first and
            tightening as λ converges). Defaults to a tight 1e-6 (float32) or 1e-10 (float64):
            FAR-HO's scipy CG applied its tolerance to the gradient of ‖∇²L q − ∂E/∂w‖, which
            in practice ran CG to machine precision, and so does the default here.
        name: a name.
        max_iter: the solver's iteration limit. Defaults to 100 (FAR-HO's).
        alpha: the Neumann step. Defaults to the inner learning rate.
        warm_start: start the solver from the previous hyper-iteration's solution (HOAG).
        linear_system_solver_gen: FAR-HO's generator of scipy solvers, which has no TF2
            equivalent: an error says to use ``linear_system_solver``.

    ``run(..., online=True)`` starts the inner run from the previous run's final state (HOAG's
    warm start of the inner problem). After each run ``residuals`` holds every problem's
    (relative residual, iterations); a warning says when the solver stopped above tolerance.
    The hypergradient assumes w_T ≈ w*(λ): a run whose inner loop moves away from stationarity,
    ‖∇_w L(w_T)‖ > ``DIVERGING``·‖∇_w L(w_0)‖ + √ε_dtype·(1 + |L(w_T)|) (an inner learning rate
    beyond the stable range at these hyperparameters), fails as a diverged one (``far.DivergenceError``), before the growth
    test would.
    """

    online_modes = (True,)
    differentiates_dynamics = False
    unconnected_hint = (" ImplicitHG differentiates the inner solution w*(λ) only: optimizer "
                        "hyperparameters (learning rate, momentum) and the initialisation Φ₀ do not "
                        "move it; use ReverseHG or ForwardHG for them.")

    settings = (
        Setting("linear_system_solver", str, "cg", "the linear solver of the Hessian system.", choices=SOLVERS,
                flag="implicit_solver"),
        Setting("max_iter", int, 100, "the solver's iterations at most.", low=1, flag="implicit_iterations"),
        Setting("warm_start", bool, True, "start the solver from the last hyper-iteration's solution."))

    def __init__(self, linear_system_solver: Union[str, Callable, None] = "cg",
                 tolerance: Union[float, Callable[[int], float], None] = None, name: str = "ImplicitHG", *,
                 max_iter: int = 100, alpha: Optional[float] = None, warm_start: bool = True,
                 linear_system_solver_gen: Any = None):
        super().__init__(name)
        if linear_system_solver_gen is not None:
            raise TypeError("ImplicitHG: `linear_system_solver_gen` (FAR-HO's generator of scipy "
                            "optimizer interfaces) has no TF2 equivalent; pass `linear_system_solver="
                            "'cg'` (or 'neumann', 'fixed_point', or a callable solve(matvec, b, x0, *, "
                            "max_iter, tol) returning a far_ho2.linear_solve.SolveResult).")
        linear_system_solver = "cg" if linear_system_solver is None else linear_system_solver
        if not callable(linear_system_solver) and linear_system_solver not in SOLVERS:
            raise ValueError(f"`linear_system_solver` must be one of {SOLVERS} or a callable, got "
                             f"{linear_system_solver!r}.")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"`max_iter` must be a positive int, got {max_iter!r}.")
        if tolerance is not None and not callable(tolerance) and not tolerance >= 0:
            raise ValueError(f"`tolerance` must be a non-negative number or a callable, got {tolerance!r}.")
        self.solver, self.max_iter, self.alpha = linear_system_solver, max_iter, alpha
        self.tolerance = tolerance
        self.uses_previous = warm_start
        self.residuals: list[tuple[float, int]] = []

    def _settings(self) -> dict:
        if callable(self.solver) or callable(self.tolerance):
            raise ValueError("An ImplicitHG with a callable solver or tolerance cannot be saved as a config: give "
                             "`linear_system_solver` as a name and `tolerance` as a number.")
        return {"linear_system_solver": self.solver, "tolerance": self.tolerance, "max_iter": self.max_iter,
                "alpha": self.alpha, "warm_start": self.uses_previous}

    def _tolerance(self, global_step: Any, dtype: Optional[tf.DType] = None) -> Any:
        """The residual target at hyper-iteration ``global_step`` (an int, or a tensor in a
        traced step)."""
        if self.tolerance is None:
            return default_tolerance(dtype or self.inner_problems[0].dtype)
        return self.tolerance(global_step) if callable(self.tolerance) else self.tolerance

    def _options(self, global_step: Any) -> dict:
        return {"tolerance": tf.cast(self._tolerance(global_step), tf.float64)}

    def hypergradient(self, problem, outer_objective, hypers, *, steps, inner_batches, outer_batch=None,
                      previous=None, online=False, offset=0, options=None) -> RunResult:
        return implicit_hypergradient(
            problem, outer_objective, hypers, steps=steps, inner_batches=inner_batches,
            outer_batch=outer_batch, solver=self.solver, max_iter=self.max_iter,
            tol=options["tolerance"] if options else self._tolerance(0, problem.dtype), alpha=self.alpha,
            initial_state=previous.state if previous is not None and online else None,
            warm_start=previous.carry.q if previous is not None and self.uses_previous else None,
            offset=offset)

    def health(self, result: RunResult) -> tf.Tensor:
        """The inner loop converging and the linear solve making progress (see the class
        docstring)."""
        start, end, loss = tf.unstack(result.carry.stationarity)
        converging = end <= DIVERGING * start + np.sqrt(np.finfo(start.dtype.as_numpy_dtype).eps) * (1 + loss)
        return converging & (tf.cast(result.carry.residual, tf.float64) < 1)

    def failure(self, result: RunResult) -> Optional[str]:
        start, end, loss = result.carry.stationarity.numpy()
        if not end <= DIVERGING * start + np.sqrt(np.finfo(result.carry.stationarity.dtype.as_numpy_dtype).eps) * (1 + loss):
            return (f"the inner loop does not converge: ‖∇_w L‖ grew from {start:.3g} at w_0 to {end:.3g} at w_T, "
                    f"and the implicit hypergradient needs w_T ≈ w*(λ): lower the inner learning rate (it is beyond "
                    f"the stable range at these hyperparameters), or bound the hyperparameters that steepen L")
        residual, iterations = float(result.carry.residual.numpy()), int(result.carry.iterations.numpy())
        low, high = result.carry.curvature.numpy()
        if not residual < 1 and _singular(low, high, result.carry.curvature.dtype):
            return (f"the Hessian ∇²_w L is singular or not positive definite (conjugate gradient met curvature "
                    f"{low:.3g} against {high:.3g}, and its relative residual is {residual:.3g} after {iterations} "
                    f"iterations): the inner problem may have several minimizers, where the implicit function "
                    f"theorem does not apply and the hypergradient is not defined. Use a method for such problems "
                    f"(far.BOME, far.ReverseHG)")
        if not residual < 1:
            hint = {"neumann": " (the Neumann series needs 0 < α < 2/‖∇²_w L‖: lower `alpha`, which defaults to the "
                               "inner learning rate)",
                    "fixed_point": " (the fixed-point iteration needs a contraction: the inner step at w_T must be "
                                   "stable; lower the inner learning rate)",
                    "cg": " (conjugate gradient needs ∇²_w L positive definite and finite products)"}
            return (f"the linear system did not converge: relative residual {residual:.3g} ≥ 1 after {iterations} "
                    f"iterations of '{self.solver}'{hint.get(self.solver, '') if isinstance(self.solver, str) else ''}, "
                    f"so the hypergradient is no approximation")
        return None

    def report(self, results: list[RunResult], moved: Optional[float], global_step: int) -> None:
        """The residuals; warnings for a singular Hessian or a solve that stopped above tolerance."""
        super().report(results, moved, global_step)
        self.residuals = [(float(r.carry.residual), int(r.carry.iterations)) for r in results]
        tol = float(self._tolerance(global_step))
        for k, (r, (residual, iterations)) in enumerate(zip(results, self.residuals)):
            low, high = r.carry.curvature.numpy()
            if _singular(low, high, r.carry.curvature.dtype):
                warnings.warn(f"{self.name}: the Hessian ∇²_w L of inner problem {k} is singular or not "
                              f"positive definite (conjugate gradient met curvature {low:.3g} against "
                              f"{high:.3g}): the inner problem may have several minimizers, where the "
                              f"implicit function theorem does not apply and the hypergradient is not "
                              f"defined. Use a method for such problems (far.BOME, far.ReverseHG).",
                              RuntimeWarning, stacklevel=3)
            if tol > 0 and residual > tol:
                warnings.warn(f"{self.name}: the linear system of inner problem {k} did not converge: "
                              f"relative residual {residual:.3g} > tolerance {tol:.3g} after "
                              f"{iterations} iterations of '{self.solver}'. The hypergradient is "
                              f"approximate: raise `max_iter`, or run more inner steps T.",
                              RuntimeWarning, stacklevel=3)
