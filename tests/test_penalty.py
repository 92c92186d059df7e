"""The penalty method of Mehra & Hamm (ACML 2021) against problems with known solutions: the
strongly convex quadratic bilevel problem (augmented Lagrangian to 1e-7; the plain penalty's
O(1/γ) bias against its closed-form stationary point), the SMD20 / SMD21 test functions of the
official code in 20 dimensions, the ridge-regression hypergradient as γ grows; persistence,
kill-and-resume, and bad input (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
import oracles
from oracles import relative_error


def fast_schedule(**options):
    """γ doubling from 1 up to 1.6·10⁴ (then held: the augmented Lagrangian converges at a finite
    γ), ε halving, the inner rate shrinking like 1/γ, the outer rate kept."""
    return far.Penalty(**{**dict(gamma=1.0, lambda_g=0.1, epsilon=0.1, gamma_factor=2.0, epsilon_factor=0.5,
                                 lr_factor=0.5, outer_lr_factor=1.0, max_gamma=1.6e4), **options})


def test_augmented_lagrangian_reaches_the_quadratic_solution_once_gamma_is_large():
    method = fast_schedule()
    p, x, z, ho, run = oracles.quadratic_run(method, keras.optimizers.SGD(0.2, momentum=0.9),
                                             far.GradientDescentOptimizer(0.1))
    for _ in range(400):
        run(60)
    assert float(method.gamma) >= 1e4
    assert np.abs(x.numpy() - oracles.quadratic_solution(p)).max() < 1e-7  # 1e-12 reached in ~600 runs
    assert method.diagnostics[0]["constraint"] < 1e-9  # ‖∇_z g‖: z is the lower-level solution


def plain_penalty_point(p, gamma, lambda_g):
    """The stationary point of the plain penalty at fixed γ and λ_g (ν = 0): ∇_x h_x = 0 and
    ∇_z h_z = 0 with h_x = f + (γ/2)‖∇_z g‖², h_z = h_x + λ_g g, ∇_z g = Az + Cᵀx + a: linear."""
    A, B, C, a, b, F, H, K, f_v, h = p
    top = np.hstack([H + gamma * C @ C.T, K + gamma * C @ A])
    bottom = np.hstack([K.T + (gamma + lambda_g) * A @ C.T, F + gamma * A @ A + lambda_g * A])
    rhs = -np.concatenate([h + gamma * C @ a, f_v + (gamma + lambda_g) * A @ a])
    solution = np.linalg.solve(np.vstack([top, bottom]), rhs)
    return solution[:3]


def test_plain_penalty_is_biased_like_one_over_gamma():
    """ν = 0 and γ fixed (no stage): the iterates converge to the plain penalty's own stationary
    point, whose distance to x* is c/γ (c ≈ 0.59 here from γ = 3 on)."""
    p = oracles.quadratic_bilevel(seed=0)
    x_star = oracles.quadratic_solution(p)
    biases = []
    for gamma in (3.0, 10.0, 30.0):
        far.clear_hyperparameters()
        method = far.Penalty(gamma=gamma, lambda_g=0.0, epsilon=0.0, lagrangian=False)
        outer_lr = 1.5 / (gamma * np.linalg.norm(p.C, 2) ** 2 + 1)  # the steps shrink like 1/γ
        inner_lr = 1.0 / (gamma * np.linalg.norm(p.A, 2) ** 2 + np.linalg.norm(p.F, 2))
        p, x, z, ho, run = oracles.quadratic_run(method, keras.optimizers.SGD(outer_lr, momentum=0.9),
                                                 far.GradientDescentOptimizer(inner_lr))
        for _ in range(400):
            run(20)
        expected = plain_penalty_point(p, gamma, 0.0)
        assert np.abs(x.numpy() - expected).max() < 1e-9  # converged to the penalty's own solution (~1e-11)
        biases.append(np.linalg.norm(expected - x_star))
    ratios = [biases[0] / biases[1], biases[1] / biases[2]]
    np.testing.assert_allclose(ratios, [10 / 3, 3.0], rtol=0.1)  # bias ∝ 1/γ (3.19 and 2.96 exactly)


def smd(kind: str):
    """The official code's SMD20 / SMD21 in 20 dimensions: SMD20 f = Σv² + Σu² − 1,
    g = Σ(1 − u − v)² (solution u = v = 0.5); SMD21 f = Σv² − Σ(u − v)², g = Σ(u − v)²
    (solution u = v = 0)."""
    u = far.get_hyperparameter("u", np.full(20, 2.0 if kind == "smd20" else 1.0))
    v = tf.Variable(np.zeros(20), name="v")
    if kind == "smd20":
        return u, v, 0.5, (lambda: tf.reduce_sum(v ** 2) + tf.reduce_sum(u ** 2) - 1.0), \
            (lambda: tf.reduce_sum((1.0 - u - v) ** 2))
    return u, v, 0.0, (lambda: tf.reduce_sum(v ** 2) - tf.reduce_sum((u - v) ** 2)), \
        (lambda: tf.reduce_sum((u - v) ** 2))


@pytest.mark.parametrize("kind", ["smd20", "smd21"])
def test_smd_test_functions_reach_their_optimum(kind):
    u, v, optimum, f, g = smd(kind)
    method = fast_schedule()
    run = far.HyperOptimizer(method).minimize(f, keras.optimizers.SGD(0.1, momentum=0.9), g,
                                              far.GradientDescentOptimizer(0.1), hyper_list=[u], var_list=[v])
    for _ in range(420):
        run(30)
    assert max(np.abs(u.numpy() - optimum).max(), np.abs(v.numpy() - optimum).max()) < 1e-7


def test_hypergradient_estimate_tends_to_the_implicit_one_as_gamma_grows():
    """Ridge regression at fixed λ: ∇_λ h_λ at the surrogate's minimizer against the exact
    ∇F(λ) (and ImplicitHG's), for growing γ (plain penalty, λ_g = 0: the error is O(1/γ))."""
    X, Y, Xv, Yv = oracles.ridge_data(n=12, d=5, c=1, seed=0)
    y, yv, lam0 = Y[:, 0], Yv[:, 0], 1.0
    exact = oracles.ridge_bilevel(X, y, Xv, yv, lam0)
    curvature = np.linalg.norm(X.T @ X + lam0 * np.eye(5), 2)
    errors = []
    for gamma in (1e2, 1e4, 1e6):
        far.clear_hyperparameters()
        lam = far.get_hyperparameter("lambda", np.float64(lam0))
        w = tf.Variable(np.linalg.solve(X.T @ X + lam0 * np.eye(5), X.T @ y), name="w")
        inner = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(X, w) - y) ** 2) + 0.5 * lam * tf.reduce_sum(w ** 2)
        outer = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(Xv, w) - yv) ** 2)
        ho = far.HyperOptimizer(far.Penalty(gamma=gamma, lambda_g=0.0, epsilon=0.0, lagrangian=False))
        ho.minimize(outer, keras.optimizers.SGD(0.0), inner,
                    far.GradientDescentOptimizer(1.0 / (gamma * curvature ** 2 + curvature)), hyper_list=[lam])(3000)
        errors.append(relative_error(float(ho.hypergradients()[0][0]), exact))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4, errors
    w.assign(np.linalg.solve(X.T @ X + lam0 * np.eye(5), X.T @ y))  # at w*, as the penalty runs started
    implicit = far.HyperOptimizer(far.ImplicitHG())
    implicit.minimize(outer, keras.optimizers.SGD(0.0), inner, far.GradientDescentOptimizer(0.01), hyper_list=[lam])(1)
    assert relative_error(float(implicit.hypergradients()[0][0]), exact) < 1e-8


def test_inner_state_persists_across_runs():
    """At fixed λ and without stages, two runs of T steps are one run of 2T steps: the inner
    variables and the inner optimizer's slots (Adam's moments) are kept."""
    results = []
    for chunks in ((10, 10), (20,)):
        far.clear_hyperparameters()
        method = far.Penalty(gamma=5.0, epsilon=0.0)
        p, x, z, ho, run = oracles.quadratic_run(method, keras.optimizers.SGD(0.0), far.AdamOptimizer(0.05))
        for T in chunks:
            run(T)
        results.append((z.numpy(), [s.numpy() for s in method.slots[0]]))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_array_equal(a, b)


def checkpointed_run(directory, iterations, resume):
    far.clear_hyperparameters()
    outer_optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    method = far.Penalty(gamma=1.0, epsilon=0.5, gamma_factor=1.5, epsilon_factor=0.7, lr_factor=0.7)
    p, x, z, ho, run = oracles.quadratic_run(method, outer_optimizer, far.AdamOptimizer(0.05))
    oracles.run_checkpointed(ho, run, 10, iterations, directory, resume)
    method = ho.hypergradient
    return (np.concatenate([x.numpy(), z.numpy(), np.concatenate([n.numpy() for n in method.nu[0]])]),
            (float(method.gamma), int(method.stage), float(method.epsilon), float(outer_optimizer.learning_rate),
             ho.global_step))


def test_kill_and_resume_continues_exactly(tmp_path):
    whole, schedule = checkpointed_run(str(tmp_path / "whole"), 60, resume=False)
    _, first_half = checkpointed_run(str(tmp_path / "resumed"), 25, resume=False)
    resumed, resumed_schedule = checkpointed_run(str(tmp_path / "resumed"), 35, resume=True)
    assert 1 <= first_half[1] < schedule[1]  # stages passed in both halves: γ, ν, ε and both rates changed
    np.testing.assert_array_equal(resumed, whole)
    assert resumed_schedule == schedule


def test_a_diverging_stage_and_bad_arguments_name_the_method():
    method = far.Penalty(gamma=1.0, epsilon=0.1, gamma_factor=2.0, epsilon_factor=0.5, lr_factor=1.0,
                         outer_lr_factor=1.0)  # the steps do not shrink as γ grows: a stage diverges
    p, x, z, ho, run = oracles.quadratic_run(method, keras.optimizers.SGD(0.2, momentum=0.9),
                                             far.GradientDescentOptimizer(0.1))
    with pytest.raises(FloatingPointError, match=r"Penalty, hyper-iteration \d+ \(stage \d+, γ = .*\): .*diverged"):
        for _ in range(2000):
            run(20)
    assert np.all(np.isfinite(z.numpy())) and np.all(np.isfinite(x.numpy()))  # not updated
    far.clear_hyperparameters()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)  # a rate the stages cannot scale
    with pytest.raises(ValueError, match="outer_lr_factor.*Keras optimizer with a constant learning rate"):
        oracles.quadratic_run(far.Penalty(), keras.optimizers.SGD(schedule), far.GradientDescentOptimizer(0.1))
    for kwargs, name in ((dict(gamma=-1.0), "gamma"), (dict(gamma_factor=0.5), "gamma_factor"),
                         (dict(max_gamma=1e-3), "max_gamma")):
        with pytest.raises(ValueError, match=name):
            far.Penalty(**kwargs)
