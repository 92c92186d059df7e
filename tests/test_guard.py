"""The guard (``far_ho2.guard``) and the cases that once returned wrong numbers without a word,
each against an exact answer (float64, problems of our own): a hyper-iteration is right, or it
raises ``far.DivergenceError`` and leaves every variable as it was, never NaN."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
import oracles


def every_value(ho: far.HyperOptimizer, optimizer) -> list[np.ndarray]:
    """The inner variables, the hyperparameters and the outer optimizer's variables."""
    state = ho.state()
    variables = state["inner_variables"] + state["hyperparameters"]
    variables += [v.value if isinstance(v, keras.Variable) else v for v in optimizer.variables]
    return [np.array(v.numpy()) for v in variables]


def assert_unchanged(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert np.all(np.isfinite(b)), "a NaN or Inf was left in a variable"
        np.testing.assert_array_equal(a, b)


def ridge(seed: int, n: int = 30, d: int = 8):
    rng = np.random.default_rng(seed)
    X, Xv = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    theta = rng.normal(size=d)
    y, yv = X @ theta + 0.3 * rng.normal(size=n), Xv @ theta + 0.3 * rng.normal(size=n)
    return X, y, Xv, yv


def run_until_error(run, T: int, iterations: int, ho: far.HyperOptimizer, optimizer):
    """Runs hyper-iterations until the guard stops one: (the error, the values before it, after
    it). Without an explicit ``var_list`` and ``hyper_list`` the first run, which finds them,
    must pass."""
    try:
        ho.state()
    except ValueError:
        run(T)
    for _ in range(iterations):
        before = every_value(ho, optimizer)
        try:
            run(T)
        except far.DivergenceError as error:
            return error, before, every_value(ho, optimizer)
    raise AssertionError(f"no DivergenceError in {iterations} hyper-iterations")


# -- the implicit method on a ridge problem whose hyperparameters steepen the inner problem ----------

def steepening_ridge(method: far.HyperGradient, learning_rate: float = 0.45):
    """Ridge regression with log ρ and a log weight per feature; E rewards small weights, so the
    outer optimizer raises ρ until gradient descent at ``learning_rate`` is unstable (its
    curvature, the largest eigenvalue of XᵀX/n + ρ·diag(e^{λ}), passes 2/η)."""
    X, y, _, _ = ridge(seed=11)
    n, d = X.shape
    X, y = tf.constant(X), tf.constant(y)
    w = tf.Variable(tf.zeros(d, tf.float64), name="w")
    log_rho = far.get_hyperparameter("log_rho", np.float64(0.0))
    log_feature = far.get_hyperparameter("log_feature", np.zeros(d))
    inner = lambda: (0.5 * tf.reduce_sum((tf.linalg.matvec(X, w) - y) ** 2) / n  # noqa: E731
                     + 0.5 * tf.exp(log_rho) * tf.reduce_sum(tf.exp(log_feature) * w ** 2))
    outer = lambda: 0.5 * tf.reduce_sum(w ** 2) + 0.01 * tf.reduce_sum(w)  # noqa: E731
    optimizer = keras.optimizers.Adam(0.2)
    ho = far.HyperOptimizer(method)
    run = ho.minimize(outer, optimizer, inner, far.GradientDescentOptimizer(learning_rate))
    return ho, run, optimizer, log_rho


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_finiteness_and_size_checks_are_exact_at_the_edges(dtype):
    """``all_finite`` (Σ 0·x is NaN exactly when some x_i is NaN or ±∞) and ``max_abs``, eagerly, in
    a graph and compiled by XLA: huge finite values are finite (0·x = 0, no overflow), a single NaN, +∞ or −∞
    anywhere is not, an empty tensor is finite with ‖x‖∞ = 0."""
    from far_ho2 import guard

    huge = np.finfo(dtype).max
    x = np.full((37, 11), huge, dtype)
    x[::2] *= -1
    for check in (lambda v: guard.all_finite(v), tf.function(lambda v: guard.all_finite(v)),
                  tf.function(lambda v: guard.all_finite(v), jit_compile=True)):  # Grappler, XLA: 0·x not folded
        assert bool(check(tf.constant(x)))
        for position in [(0, 0), (17, 5), (36, 10)]:
            for bad in (np.nan, np.inf, -np.inf):
                y = x.copy()
                y[position] = bad
                assert not bool(check(tf.constant(y)))
        assert bool(check(tf.zeros([0, 3], dtype)))
    assert float(guard.max_abs(tf.constant(np.array([-3.0, 2.0], dtype)))) == 3.0
    assert guard.max_abs(tf.constant(x)).dtype == tf.float64 and float(guard.max_abs(tf.constant(x))) == float(huge)
    assert float(guard.max_abs(tf.zeros([0], dtype))) == 0.0
    unknown = tf.function(lambda v: guard.max_abs(v), input_signature=[tf.TensorSpec(None, dtype)])
    assert float(unknown(tf.zeros([0], dtype))) == 0.0 and float(unknown(tf.constant([[-5.0]], dtype))) == 5.0


def test_hyperparameters_that_make_the_inner_loop_unstable_stop_with_one_error_and_nothing_changed():
    """Each hyper-iteration's implicit hypergradient is the exact one (∇_ρ F by the implicit
    function theorem at w*(λ), in NumPy) until ρ makes gradient descent unstable; that
    hyper-iteration raises instead of returning the hypergradient of a diverging w_T. (ReverseHG
    differentiates the unstable steps themselves, so its hypergradient steers ρ away from them.)"""
    ho, run, optimizer, log_rho = steepening_ridge(far.ImplicitHG("cg"))
    X, y, _, _ = ridge(seed=11)
    n = len(y)
    log_feature = [h for h in far.hyperparameters() if h.name.startswith("log_feature")][0]
    exact_steps = 0
    for _ in range(50):
        before = None if exact_steps == 0 else every_value(ho, optimizer)
        scale = np.exp(float(log_rho)) * np.exp(log_feature.numpy())
        A = X.T @ X / n + np.diag(scale)
        try:
            run(150)
        except far.DivergenceError as error:
            message = str(error)
            break
        w_star = np.linalg.solve(A, X.T @ y / n)
        exact = -np.linalg.solve(A, w_star + 0.01) @ (scale * w_star)  # ∇_{log ρ} F
        hypergradient = {h.name: g.numpy() for g, h in ho.hypergradients()}["log_rho:0"]
        assert hypergradient == pytest.approx(exact, rel=1e-6)
        exact_steps += 1
    else:
        raise AssertionError("ρ never made the inner loop unstable")
    assert exact_steps >= 2 and 0.45 * np.linalg.eigvalsh(A).max() > 2  # it failed where GD is unstable
    assert message.startswith(f"ImplicitHG, hyper-iteration {ho.global_step}: the inner loop does not converge")
    assert "keeps its value from before this hyper-iteration" in message
    assert_unchanged(before, every_value(ho, optimizer))
    with pytest.raises(far.DivergenceError) as again:  # the same diagnosis again, not "inner step 0"
        run(150)
    assert str(again.value) == message
    assert_unchanged(before, every_value(ho, optimizer))


def test_hyperparameters_set_to_nan_outside_are_named():
    ho, run, optimizer, log_rho = steepening_ridge(far.ImplicitHG("cg"))
    run(50)
    log_rho.assign(np.nan)
    with pytest.raises(far.DivergenceError, match=r"hyperparameter\(s\) \['log_rho'.*held NaN/Inf before the run"):
        run(50)


def test_an_overflowing_outer_update_is_undone_slots_included():
    """float32: a hypergradient of 1e25 makes Adam's second moment overflow (g² > 3.4e38) on the
    first update, before any reference exists: the update is undone, Adam's slots and
    iteration count included."""
    w = tf.Variable([1.0, 2.0], name="w")
    scale = far.get_hyperparameter("scale", 1.0)
    ho = far.HyperOptimizer(far.ReverseHG())
    optimizer = keras.optimizers.Adam(0.1)
    run = ho.minimize(lambda: 1e25 * scale * tf.reduce_sum(w), optimizer,
                      lambda: tf.reduce_sum((w - 1.0) ** 2), far.GradientDescentOptimizer(0.1),
                      hyper_list=[scale], var_list=[w])
    ho.compute_hypergradients(3)  # the directions alone: the update, applied apart, restores what it changed
    before = every_value(ho, optimizer)
    with pytest.raises(far.DivergenceError, match=r"outer update by Adam would make 'scale' \(or its slots\) non-finite"):
        ho.apply_hypergradients()
    assert_unchanged(before, every_value(ho, optimizer))
    assert ho.global_step == 0
    with pytest.raises(far.DivergenceError):
        run(3)


def test_growth_limit_is_adjustable_and_checked():
    method = far.ReverseHG()
    assert method.growth_limit == far.guard.DEFAULT_GROWTH_LIMIT
    method.growth_limit = None
    for bad in (1.0, 0.5, np.inf, "big", True):
        with pytest.raises(ValueError, match="growth_limit"):
            method.growth_limit = bad
    # w grows ×1.5 per step from 1: 1.5^40 ≈ 1.1e7 is within G = 1e8, beyond G = 1e6
    rho = far.get_hyperparameter("rho", np.float64(0.0))
    for limit, fails in ((1e8, False), (1e6, True), (None, False)):
        w = tf.Variable([1.0], dtype=tf.float64, name="w")
        ho = far.HyperOptimizer(far.ReverseHG())
        ho.hypergradient.growth_limit = limit
        run = ho.minimize(lambda: tf.reduce_sum(w ** 2), keras.optimizers.SGD(0.0),
                          lambda: -1.25 * tf.reduce_sum(w ** 2) + rho * tf.reduce_sum(w), far.GradientDescentOptimizer(0.2),
                          hyper_list=[rho])
        if fails:
            with pytest.raises(far.DivergenceError, match=r"w of 'w' grew beyond the guard's bound 1e\+06 .* at inner step 34"):
                run(40)
        else:
            run(40)


def test_a_joint_step_that_diverges_is_undone():
    """BOME moves w itself after the outer update; a step size far beyond the stable range makes
    w grow without bound: the guard undoes the whole hyper-iteration."""
    w = tf.Variable(np.array([0.5, -0.5]), name="w")
    lam = far.get_hyperparameter("lam", np.float64(0.3))
    optimizer = keras.optimizers.SGD(0.01)
    ho = far.HyperOptimizer(far.BOME(inner_learning_rate=1e9))
    run = ho.minimize(lambda: tf.reduce_sum((w - 1.0) ** 2), optimizer,
                      lambda: tf.reduce_sum((w - lam) ** 2), far.GradientDescentOptimizer(0.1),
                      hyper_list=[lam], var_list=[w])
    error, before, after = run_until_error(run, 5, 5, ho, optimizer)
    assert "the method's own step on the inner variables ['w'] made them non-finite or grow" in str(error)
    assert_unchanged(before, after)


# -- the penalty method ---------------------------------------------------------------------------

def boxed_quadratic():
    """Upper level u ∈ [−0.2, 0.3]², lower level v ∈ R³:

        f(u, v) = ½‖v − a‖² + ½·0.1‖u‖²,    g(u, v) = ½‖v − Bu‖²    ⇒    v*(u) = Bu,
        F(u) = ½‖Bu − a‖² + 0.05‖u‖²,  minimized over the box.

    The solution is found by enumerating the active sets of the 2-D box: the minimizer of F with
    the active coordinates fixed at their bound, kept if it is feasible and satisfies KKT."""
    B = np.array([[1.0, 0.5], [-0.3, 1.2], [0.4, -0.7]])
    a = np.array([2.0, -1.0, 0.5])
    low, high = np.array([-0.2, -0.2]), np.array([0.3, 0.3])
    H, c = B.T @ B + 0.1 * np.eye(2), B.T @ a  # F(u) = ½uᵀHu − cᵀu + const
    best = None
    for fixed in np.ndindex(3, 3):  # per coordinate: free, at low, at high
        u = np.zeros(2)
        free = [i for i in range(2) if fixed[i] == 0]
        for i in range(2):
            u[i] = (0, low[i], high[i])[fixed[i]]
        if free:
            rest = [i for i in range(2) if i not in free]
            u[free] = np.linalg.solve(H[np.ix_(free, free)], c[free] - H[np.ix_(free, rest)] @ u[rest])
        gradient = H @ u - c
        feasible = np.all(u >= low - 1e-12) and np.all(u <= high + 1e-12)
        kkt = all((fixed[i] == 0) or (fixed[i] == 1 and gradient[i] >= 0) or (fixed[i] == 2 and gradient[i] <= 0)
                  for i in range(2))
        if feasible and kkt:
            best = u
    assert best is not None
    return B, a, low, high, best


def boxed_penalty(inner_optimizer, outer_rate: float, **schedule):
    """The penalty method on ``boxed_quadratic``, u ∈ box by a projection: (run, method, u, v,
    the solution u*, B)."""
    B, a, low, high, u_star = boxed_quadratic()
    u = far.get_hyperparameter("u", np.zeros(2), constraint=lambda x: tf.clip_by_value(x, low, high))
    v = tf.Variable(np.zeros(3), name="v")
    Bt, at = tf.constant(B), tf.constant(a)
    f = lambda: 0.5 * tf.reduce_sum((v - at) ** 2) + 0.05 * tf.reduce_sum(u ** 2)  # noqa: E731
    g = lambda: 0.5 * tf.reduce_sum((v - tf.linalg.matvec(Bt, u)) ** 2)  # noqa: E731
    method = far.Penalty(**{**dict(gamma=1.0, lambda_g=0.1, epsilon=0.1, gamma_factor=2.0, epsilon_factor=0.5,
                                   outer_lr_factor=1.0), **schedule})
    run = far.HyperOptimizer(method).minimize(f, keras.optimizers.SGD(outer_rate, momentum=0.9), g, inner_optimizer)
    return run, method, u, v, u_star, B


def test_penalty_reaches_a_box_constrained_optimum():
    run, method, u, v, u_star, B = boxed_penalty(far.GradientDescentOptimizer(0.3), 0.1, lr_factor=0.5,
                                                 max_gamma=1e4)
    assert np.any(np.abs(u_star) == 0.2) or np.any(u_star == 0.3)  # a constraint is active at the optimum
    for _ in range(300):
        run(30)
    assert int(method.stage) > 10  # the projected stage test passes where the raw gradient does not vanish
    np.testing.assert_allclose(u.numpy(), u_star, atol=1e-6)
    np.testing.assert_allclose(v.numpy(), B @ u_star, atol=1e-6)


def test_penalty_line_search_searches_the_surrogate_it_steps_on():
    """With back-tracking gradient descent the steps on w descend h_w (Armijo on h_w): within a
    run the recorded surrogate never increases, and the run still reaches the solution."""
    run, method, u, v, u_star, B = boxed_penalty(far.BackTrackingGradientDescentOptimizer(100.0, c=0.5, tau=0.5),
                                                 0.05, lr_factor=1.0, max_gamma=1e3)  # the first try overshoots
    for _ in range(300):
        run(20)
        losses = method.results[0].inner_losses.numpy()
        assert np.all(np.diff(losses) <= 1e-12 * np.maximum(1.0, np.abs(losses[:-1]))), losses
    np.testing.assert_allclose(u.numpy(), u_star, atol=1e-5)


def test_penalty_with_a_fixed_outer_rate_that_runs_away_is_stopped():
    """outer_lr_factor=1 with plain SGD: as γ grows the outer step leaves its stable range and λ
    oscillates with a growing amplitude; the guard stops it, λ finite and as before."""
    lam = far.get_hyperparameter("lam", np.float64(0.0))
    w = tf.Variable(np.float64(0.0), name="w")
    optimizer = keras.optimizers.SGD(0.1)
    ho = far.HyperOptimizer(far.Penalty(outer_lr_factor=1.0))
    run = ho.minimize(lambda: 0.5 * (w - 1) ** 2 + 0.1 * lam ** 2, optimizer, lambda: 0.5 * (2 * w - lam) ** 2,
                      far.GradientDescentOptimizer(0.1))
    error, before, after = run_until_error(run, 20, 3000, ho, optimizer)
    assert "Penalty, hyper-iteration" in str(error) and "the stage diverged" in str(error)
    assert_unchanged(before, after)


def numpy_descent(w: np.ndarray, gradient, learning_rate: float, steps: int) -> np.ndarray:
    for _ in range(steps):
        w = w - learning_rate * gradient(w)
    return w


@pytest.mark.parametrize("name", ["penalty", "bome"])
def test_first_order_methods_report_e_at_an_inner_solution(name):
    """The value ``run`` returns is E(λ, ŵ) at an inner solution ŵ from the method's own w (w_T
    for the penalty method: T Armijo gradient steps on g; w_k for BOME: T steps of the inner
    optimizer), computed here in NumPy, not f at the method's w, which does not solve the lower
    level (and is reported as such in the carry)."""
    X, y, Xv, yv = ridge(seed=5, n=20, d=4)
    n = len(y)
    w = tf.Variable(np.ones(4), name="w")
    rho = far.get_hyperparameter("rho", np.float64(0.5))
    inner = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(X, w) - y) ** 2) / n + 0.5 * rho * tf.reduce_sum(w ** 2)  # noqa: E731
    outer = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(Xv, w) - yv) ** 2) / n  # noqa: E731
    method = far.Penalty() if name == "penalty" else far.BOME()
    ho = far.HyperOptimizer(method)
    run = ho.minimize(outer, keras.optimizers.SGD(0.0), inner, far.GradientDescentOptimizer(0.05))
    T = 7
    start = w.numpy().copy()
    value = float(run(T))
    result = method.results[0]
    own_w = (result.final_state.w[0].numpy() if name == "penalty" else start)
    gradient = lambda v: X.T @ (X @ v - y) / n + 0.5 * v  # noqa: E731
    if name == "penalty":  # gradient descent on g with an Armijo step (the inner rate is sized for h_w)
        loss = lambda v: 0.5 * np.sum((X @ v - y) ** 2) / n + 0.25 * v @ v  # noqa: E731
        w_hat = oracles.armijo_descent(loss, gradient, own_w, 0.05, T)
    else:  # BOME: ŵ = T steps of the inner optimizer
        w_hat = numpy_descent(own_w, gradient, 0.05, T)
    E = lambda v: 0.5 * np.sum((Xv @ v - yv) ** 2) / n  # noqa: E731
    assert value == pytest.approx(E(w_hat), rel=1e-12)
    reported_at_own = float(result.carry.surrogate_outer if name == "penalty" else result.carry.outer_at_w)
    assert reported_at_own == pytest.approx(E(own_w), rel=1e-12)
    assert abs(E(w_hat) - E(own_w)) > 1e-3  # the two differ here: the method's w is not a solution


def test_bome_warns_when_its_barrier_keeps_lambda_still():
    """f does not read λ and the barrier is inactive (η = 0): λ's direction is exactly 0 at every
    iteration while w moves; after 50 such iterations one warning says why."""
    w = tf.Variable(np.array([0.0, 0.0]), name="w")
    lam = far.get_hyperparameter("lam", np.array([0.5, 0.5]))
    ho = far.HyperOptimizer(far.BOME(eta=0.0))
    run = ho.minimize(lambda: tf.reduce_sum((w - 1.0) ** 2), keras.optimizers.Adam(0.1),
                      lambda: tf.reduce_sum(lam * (w - 2.0) ** 2), far.GradientDescentOptimizer(0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(80):
            run(3)
    stall = [str(c.message) for c in caught if "have not moved" in str(c.message)]
    assert len(stall) == 1 and "BOME, hyper-iteration 49" in stall[0] and "μ = 0" in stall[0]
    np.testing.assert_array_equal(lam.numpy(), [0.5, 0.5])


def test_penalty_warns_when_a_stage_never_advances_and_lambda_is_still():
    """λ held at its bound by the projection, ε too small for the stage test ever to pass: one
    warning after 50 iterations, naming the stage test's numbers."""
    lam = far.get_hyperparameter("lam", np.float64(0.0), constraint=lambda x: tf.minimum(x, 0.0))
    w = tf.Variable(np.float64(0.0), name="w")
    ho = far.HyperOptimizer(far.Penalty(epsilon=1e-300))
    run = ho.minimize(lambda: 0.5 * (w - 3.0) ** 2, keras.optimizers.SGD(0.1), lambda: 0.5 * (w - lam) ** 2,
                      far.GradientDescentOptimizer(0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(60):
            run(5)
    stall = [str(c.message) for c in caught if "have not moved" in str(c.message)]
    assert len(stall) == 1 and "stage 0 has not passed its test" in stall[0]


# -- what the defaults and the diagnoses say -------------------------------------------------------

@pytest.mark.parametrize("method", [lambda: far.ImplicitHG(), lambda: far.BOME(), lambda: far.Penalty()],
                         ids=["implicit", "bome", "penalty"])
def test_an_inner_learning_rate_in_the_default_hyper_list_is_an_error(method):
    w = tf.Variable(np.array([1.0, -1.0]), name="w")
    rho = far.get_hyperparameter("rho", np.float64(0.1))
    lr = far.get_hyperparameter("lr", np.float64(0.1))
    ho = far.HyperOptimizer(method())
    run = ho.minimize(lambda: tf.reduce_sum((w - 1.0) ** 2), keras.optimizers.SGD(0.1),
                      lambda: tf.reduce_sum(w ** 2) + rho * tf.reduce_sum(w), far.GradientDescentOptimizer(lr))
    with pytest.raises(ValueError, match=r"cannot differentiate \['lr'.*default `hyper_list`"):
        run(3)


def test_a_python_if_on_a_tensor_is_named_with_its_line():
    """The eager analysis takes the branch of the current value (ρ = 0 skips the term reading ρ);
    the error names the `if`, not 'None of the hyperparameters affects this problem'."""
    w = tf.Variable(np.ones(2), name="w")
    rho = far.get_hyperparameter("rho", np.float64(0.0))

    def inner():
        loss = tf.reduce_sum((w - 2.0) ** 2)
        if rho > 0:
            loss += rho * tf.reduce_sum(w ** 2)
        return loss

    run = far.HyperOptimizer().minimize(lambda: tf.reduce_sum((w - 1.0) ** 2), keras.optimizers.SGD(0.1), inner,
                                        far.GradientDescentOptimizer(0.1))
    with pytest.raises(TypeError, match=r"the inner objective uses a tensor as a Python bool \(.*test_guard.py:\d+: "
                                        r"`if rho > 0:`\).*tf.cond.*tf.while_loop"):
        run(3)
