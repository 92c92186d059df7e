"""BOME (Liu et al., NeurIPS 2022) against problems with known solutions: the official code's toy
with a non-singleton lower level, a lower level with a line of minimizers (where the implicit
function theorem does not apply), the strongly convex quadratic bilevel problem; the
dynamic-barrier invariants at every step, kill-and-resume, and bad input (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
import oracles


def lls(phi: str, T: int):
    """The official code's toy/toy_lls.py: outer w (scalar), inner x ∈ R²,
    f = ½(w − x₂)² + ½(x₁ − 1)²,  g = ½x₁² − w x₁  (lower-level solutions {x₁ = w, x₂ free});
    the optimistic solution is w = x₁ = x₂ = 1 (f = 0). All step sizes 0.5, η = 0.5, from 0."""
    w = far.get_hyperparameter("w", np.float64(0.0))
    x = tf.Variable(np.zeros(2), name="x")
    f = lambda: 0.5 * (w - x[1]) ** 2 + 0.5 * (x[0] - 1) ** 2
    g = lambda: 0.5 * x[0] ** 2 - w * x[0]
    method = far.BOME(eta=0.5, phi=phi)
    ho = far.HyperOptimizer(method)
    run = ho.minimize(f, far.GradientDescentOptimizer(0.5), g, far.GradientDescentOptimizer(0.5),
                      hyper_list=[w], var_list=[x])
    return w, x, method, ho, run


@pytest.mark.parametrize("phi, tolerance", [("grad_norm", 1e-8), ("value", 1e-4)])
@pytest.mark.parametrize("T", [1, pytest.param(10, marks=pytest.mark.long)])
def test_lls_toy_reaches_the_optimistic_solution_with_the_barrier_invariants(phi, tolerance, T):
    w, x, method, ho, run = lls(phi, T)
    for _ in range(2000):
        run(T)
        d = method.diagnostics[0]
        assert d["mu"] >= 0
        # ⟨d, ∇q̂⟩ ≥ φ, up to the denominator guard δ: for μ > 0 the gap is ⟨∇f,∇q̂⟩·δ/(‖∇q̂‖² + δ)
        # (grad_norm) or (φ − ⟨∇f,∇q̂⟩)·δ/(‖∇q̂‖² + δ) (value)
        guard = ((abs(d["grad_dot"]) + abs(d["phi"])) * method.delta / (d["grad_q_norm"] ** 2 + method.delta)
                 if d["mu"] > 0 else 0.0)
        assert d["barrier"] >= d["phi"] - guard - 1e-12 * (1 + abs(d["phi"]))
    error = np.abs(np.array([float(w), *x.numpy()]) - 1.0).max()
    assert error < tolerance  # the official settings reach ~1e-15 (grad_norm) and ~1e-5 (value)


def line_of_minimizers():
    """λ ∈ R, w ∈ R²: g = ½(w₁ + w₂ − λ)² is minimized on the line w₁ + w₂ = λ;
    f = ½‖(λ, w₁, w₂) − (a, b, c)‖². The optimistic solution is the projection of (a, b, c) onto
    the plane w₁ + w₂ − λ = 0 (normal n = (−1, 1, 1)): (a, b, c) − (n·(a, b, c)/3) n."""
    target = np.array([1.0, 2.0, -0.5])
    n = np.array([-1.0, 1.0, 1.0])
    solution = target - (n @ target / 3) * n
    lam = far.get_hyperparameter("lambda", np.float64(0.0))
    w = tf.Variable(np.zeros(2), name="w")
    f = lambda: 0.5 * ((lam - target[0]) ** 2 + (w[0] - target[1]) ** 2 + (w[1] - target[2]) ** 2)
    g = lambda: 0.5 * (w[0] + w[1] - lam) ** 2
    return lam, w, f, g, solution


def test_a_line_of_lower_level_minimizers_bome_converges_where_implicit_fails():
    lam, w, f, g, solution = line_of_minimizers()
    ho = far.HyperOptimizer(far.BOME(eta=0.5))
    run = ho.minimize(f, far.GradientDescentOptimizer(0.3), g, far.GradientDescentOptimizer(0.3),
                      hyper_list=[lam], var_list=[w])
    for _ in range(1500):
        run(10)
    got = np.array([float(lam), *w.numpy()])
    np.testing.assert_allclose(got, solution, atol=1e-3)
    # The implicit function theorem needs ∇²_w g invertible: here it is [[1, 1], [1, 1]], and
    # conjugate gradient cannot solve the system: an error, nothing updated.
    far.clear_hyperparameters()
    lam, w, f, g, solution = line_of_minimizers()
    with pytest.raises(far.DivergenceError, match="singular or not positive definite.*several minimizers"):
        far.HyperOptimizer(far.ImplicitHG()).minimize(f, keras.optimizers.SGD(0.0), g,
                                                      far.GradientDescentOptimizer(0.3),
                                                      hyper_list=[lam], var_list=[w])(50)


@pytest.mark.long
def test_quadratic_bilevel_problem_converges_towards_the_solution_with_a_decaying_step():
    """BOME is first order and approximate: with a fixed step its iterates settle in an
    oscillation of the step's size; with ξ_k = ξ/(1 + k/1000) the error keeps falling."""
    step = lambda: keras.optimizers.schedules.InverseTimeDecay(0.05, decay_steps=1, decay_rate=1e-3)
    p, x, z, ho, run = oracles.quadratic_run(far.BOME(eta=0.5, inner_optimizer=keras.optimizers.SGD(step())),
                                             keras.optimizers.SGD(step()), far.GradientDescentOptimizer(0.3))
    errors = []
    for k in range(40_000):
        run(10)
        if k % 10_000 == 9_999:
            errors.append(np.abs(x.numpy() - oracles.quadratic_solution(p)).max())
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 5e-3, errors


def test_quadratic_bilevel_problem_short():
    """The short version of the test above: the error falls below 5 % of its start in 600 steps."""
    step = lambda: keras.optimizers.schedules.InverseTimeDecay(0.05, decay_steps=1, decay_rate=1e-3)
    p, x, z, ho, run = oracles.quadratic_run(far.BOME(eta=0.5, inner_optimizer=keras.optimizers.SGD(step())),
                                             keras.optimizers.SGD(step()), far.GradientDescentOptimizer(0.3))
    start = np.abs(x.numpy() - oracles.quadratic_solution(p)).max()
    for _ in range(600):
        run(10)
    assert np.abs(x.numpy() - oracles.quadratic_solution(p)).max() < 0.2 * start


def test_joint_step_and_persistence():
    """A run computes d at (λ_k, w_k) without moving w; applying moves λ by the outer optimizer
    and w by ξ_w d_w; the next run starts from that w, not from Φ₀."""
    w, x, method, ho, run = lls("grad_norm", 1)
    run(1)  # the first step from 0
    x1, w1 = x.numpy().copy(), float(w)
    ho.compute_hypergradients(1)
    np.testing.assert_array_equal(x.numpy(), x1)  # computing does not move w
    (d_lambda, _), = ho.hypergradients()
    d_w = method.results[0].carry.inner_direction[0].numpy()
    ho.apply_hypergradients()
    np.testing.assert_allclose(x.numpy(), x1 - 0.5 * d_w, rtol=1e-15)
    assert float(w) == pytest.approx(w1 - 0.5 * float(d_lambda), rel=1e-15)
    assert ho.global_step == 2


def checkpointed_run(directory, iterations, resume):
    """The LLS problem with a Keras momentum optimizer for w's step: run, then save everything."""
    far.clear_hyperparameters()
    w = far.get_hyperparameter("w", np.float64(0.0))
    x = tf.Variable(np.zeros(2), name="x")
    f = lambda: 0.5 * (w - x[1]) ** 2 + 0.5 * (x[0] - 1) ** 2
    g = lambda: 0.5 * x[0] ** 2 - w * x[0]
    ho = far.HyperOptimizer(far.BOME(inner_optimizer=keras.optimizers.SGD(0.1, momentum=0.9)))
    run = ho.minimize(f, keras.optimizers.SGD(0.1, momentum=0.9), g, far.GradientDescentOptimizer(0.5),
                      hyper_list=[w], var_list=[x])
    oracles.run_checkpointed(ho, run, 3, iterations, directory, resume)
    return np.array([float(w), *x.numpy()]), ho.global_step


def test_kill_and_resume_continues_exactly(tmp_path):
    whole, steps = checkpointed_run(str(tmp_path / "whole"), 12, resume=False)
    checkpointed_run(str(tmp_path / "resumed"), 5, resume=False)
    resumed, resumed_steps = checkpointed_run(str(tmp_path / "resumed"), 7, resume=True)
    np.testing.assert_array_equal(resumed, whole)  # the same float64 operations on the same state
    assert steps == resumed_steps == 12


def test_a_constant_lower_level_and_a_nan_surrogate_name_the_method_iteration_and_quantity():
    w = far.get_hyperparameter("w", np.float64(0.0))
    x = tf.Variable(np.zeros(2), name="x")
    f = lambda: 0.5 * (w - x[1]) ** 2 + 0.5 * (x[0] - 1) ** 2
    constant = lambda: 0.0 * tf.reduce_sum(x) + w ** 2  # g does not vary with the inner variables
    run = far.HyperOptimizer(far.BOME()).minimize(f, far.GradientDescentOptimizer(0.5), constant,
                                                  far.GradientDescentOptimizer(0.5), hyper_list=[w], var_list=[x])
    with pytest.raises(ValueError, match=r"BOME, hyper-iteration \d+: ∇q̂ = 0 .* constant in w"):
        for _ in range(5):
            run(1)
    far.clear_hyperparameters()
    w = far.get_hyperparameter("w", np.float64(0.0))
    y = tf.Variable(np.zeros(2), name="y")
    f = lambda: 0.5 * (w - y[1]) ** 2 + 0.5 * (y[0] - 1) ** 2
    g = lambda: 0.5 * y[0] ** 2 - w * y[0] + tf.math.log(w - 1.0)  # NaN at w = 0
    run = far.HyperOptimizer(far.BOME()).minimize(f, far.GradientDescentOptimizer(0.5), g,
                                                  far.GradientDescentOptimizer(0.5), hyper_list=[w], var_list=[y])
    with pytest.raises(FloatingPointError, match=r"BOME, hyper-iteration 0: q̂ is nan"):
        run(1)
    np.testing.assert_array_equal(y.numpy(), [0.0, 0.0])  # nothing was updated
    assert float(w) == 0.0


def test_optimizer_hyperparameters_and_bad_arguments_are_refused():
    w, x, method, ho, run = lls("grad_norm", 1)
    lr = far.get_hyperparameter("lr", np.float64(0.5))
    g = lambda: 0.5 * x[0] ** 2 - w * x[0]
    run = far.HyperOptimizer(far.BOME()).minimize(lambda: (x[0] - 1) ** 2, far.GradientDescentOptimizer(0.5), g,
                                                  far.GradientDescentOptimizer(lr), hyper_list=[w, lr], var_list=[x])
    with pytest.raises(ValueError, match="BOME cannot differentiate .*'lr'.* BOME differentiates no inner trajectory"):
        run(1)
    with pytest.raises(ValueError, match="phi"):
        far.BOME(phi="gradient")
    with pytest.raises(ValueError, match="not both"):
        far.BOME(inner_learning_rate=0.1, inner_optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="online"):
        ho.run(1, online=True)
