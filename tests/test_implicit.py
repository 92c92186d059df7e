"""ImplicitHG with each linear solver against the exact bilevel hypergradients of ridge regression
(one regulariser, one per feature) and of a quadratic bilevel problem, FAR-HO's implicit notebook,
and the solver's reporting."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
import oracles
from oracles import relative_error

SOLVERS = ["cg", "neumann", "fixed_point"]


class Problem:
    """A strongly convex inner problem started at its minimiser w*(λ) (computed in NumPy), so
    that the implicit function theorem is exact; ``expected`` is the exact ∇F(λ)."""

    def __init__(self, kind: str, seed: int = 0):
        rng = np.random.default_rng(seed)
        if kind == "quadratic":  # the quadratic bilevel problem (far_ho2.oracles): hyperparameter x, inner z
            p = oracles.quadratic_bilevel(seed=seed)
            x0 = rng.normal(size=3)
            self.hyper = far.get_hyperparameter("x", x0)
            self.w = tf.Variable(-np.linalg.solve(p.A, p.C.T @ x0 + p.a), name="z")
            self.inner, self.outer = oracles.quadratic_objectives(p, self.hyper, self.w)
            self.expected = oracles.quadratic_hypergradient(p, x0)
            self.curvature = np.linalg.eigvalsh(p.A)
            return
        X, Y, Xv, Yv = oracles.ridge_data(n=12, d=5, c=1, seed=seed)
        y, yv = Y[:, 0], Yv[:, 0]
        lam0 = 0.3 if kind == "ridge" else np.linspace(0.1, 0.5, 5)  # §5.1 / §5.2
        A = X.T @ X + np.diag(np.broadcast_to(lam0, 5))
        self.hyper = far.get_hyperparameter("lambda", np.float64(lam0) if kind == "ridge" else lam0)
        self.w = tf.Variable(np.linalg.solve(A, X.T @ y), name="w")
        self.inner = lambda: (0.5 * tf.reduce_sum((tf.linalg.matvec(X, self.w) - y) ** 2)
                              + 0.5 * tf.reduce_sum(self.hyper * self.w ** 2))
        self.outer = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(Xv, self.w) - yv) ** 2)
        self.expected = (oracles.ridge_bilevel(X, y, Xv, yv, lam0) if kind == "ridge"
                         else oracles.ridge_per_feature(X, y, Xv, yv, lam0))
        self.curvature = np.linalg.eigvalsh(A)

    def hypergradient(self, method: far.ImplicitHG, steps: int = 1) -> np.ndarray:
        eta = 1.0 / self.curvature.max()  # a contraction: the fixed-point and Neumann maps converge
        ho = far.HyperOptimizer(method)
        ho.minimize(self.outer, keras.optimizers.SGD(0.0), self.inner, far.GradientDescentOptimizer(eta),
                    hyper_list=[self.hyper])(steps, _skip_hyper_ts=True)
        return oracles.hypergradients(ho)[0]


@pytest.mark.parametrize("kind", ["ridge", "per_feature", "quadratic"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_implicit_hypergradient_is_exact_at_the_inner_solution(solver, kind):
    problem = Problem(kind)
    got = problem.hypergradient(far.ImplicitHG(solver, tolerance=1e-13, max_iter=5000))
    assert relative_error(got, problem.expected) < 1e-8  # the solver stops at residual 1e-13


@pytest.mark.parametrize("solver, iterations", [("cg", [1, 2, 3, 5]), ("neumann", [5, 20, 80, 320]),
                                                ("fixed_point", [5, 20, 80, 320])])
def test_error_decreases_as_the_solver_iterates(solver, iterations):
    errors = []
    for k in iterations:
        problem = Problem("per_feature", seed=1)
        errors.append(relative_error(problem.hypergradient(far.ImplicitHG(solver, tolerance=0.0, max_iter=k)),
                                     problem.expected))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6 and errors[0] > 1e-3, errors  # from coarse to converged


def test_legacy_farho_implicit_notebook():
    """FAR-HO tests/on implicitHG.ipynb (T3): reverse at T = 100 and 1000 and implicit at
    T = 1000 all give [0, 0.2829068, 36.6, 51.6605] (float32)."""
    for method, steps in [(far.ReverseHG(), 100), (far.ReverseHG(), 1000), (far.ImplicitHG(), 1000)]:
        np.testing.assert_allclose(oracles.legacy_t3(method, steps), oracles.T3_PUBLISHED, rtol=1e-5, atol=1e-6)


def test_unconverged_solver_warns_and_reports_its_residual():
    problem = Problem("per_feature")
    method = far.ImplicitHG("cg", tolerance=1e-12, max_iter=1)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        problem.hypergradient(method)
    (residual, iterations), = method.residuals
    assert iterations == 1 and residual > 1e-12


def test_warm_start_reuses_the_previous_solution():
    problem = Problem("per_feature")
    method = far.ImplicitHG("cg", tolerance=1e-10)
    ho = far.HyperOptimizer(method)
    run = ho.minimize(problem.outer, keras.optimizers.SGD(0.0), problem.inner,
                      far.GradientDescentOptimizer(0.01), hyper_list=[problem.hyper])
    run(1, _skip_hyper_ts=True)
    first = method.residuals[0][1]
    run(1, _skip_hyper_ts=True)  # same λ: the previous q already solves the system
    assert first >= 3 and method.residuals[0][1] == 0


def test_learning_rate_is_not_an_implicit_hyperparameter():
    problem = Problem("ridge")
    eta = far.get_hyperparameter("eta", np.float64(0.01))
    run = far.HyperOptimizer(far.ImplicitHG()).minimize(
        problem.outer, keras.optimizers.SGD(0.0), problem.inner, far.GradientDescentOptimizer(eta),
        hyper_list=[problem.hyper, eta])
    with pytest.raises(ValueError, match="ImplicitHG differentiates the inner solution"):
        run(3)
    with pytest.raises(ValueError, match="linear_system_solver"):
        far.ImplicitHG("lu")


def test_hoag_tolerance_schedule_loosens_the_first_solves():
    """With HOAG's schedule (0.1·0.9^k) the first hyper-iteration stops CG at 10% residual."""
    problem = Problem("per_feature")
    method = far.ImplicitHG("cg", tolerance=far.hypergradients.implicit.hoag_tolerance)
    problem.hypergradient(method)
    (residual, iterations), = method.residuals
    assert residual <= 0.1 and iterations < 5
