"""Stochastic bilevel optimization by Langevin sampling: the SGLD dynamics (noise replayed
exactly by the reverse pass), and StochasticHG's three estimators against closed forms — the
Gaussian problem (the Gibbs distribution and the stationary law of its discretized chain), the
τ → 0 limit, one hyperparameter per weight, and a double-well inner energy whose expectation is
computed by quadrature — each within a few of its own standard errors (float64); K chains stacked
on a leading axis (``chains=K``), whose pooled 'score' SE falls like 1/√K and matches the spread
of repeated estimates; and the chain diagnostics (effective samples, drift, one warning)."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
import oracles
from far_ho2.hypergradients import stochastic
from far_ho2.hypergradients.stochastic import DRIFT_LIMIT, ESTIMATORS, chain_statistics, visibly_not_mixed

EPS = 0.01  # SGLD step: ε·λ_max(A) ≈ 0.16, ε·λ_min(A) ≈ 0.026 on the Gaussian problem
CHAINS = 64  # independent chains, one inner problem holding them on a leading axis
Z = 4.0  # agreement within 4 standard errors (a real bug, e.g. a missing term, is 10-100 SEs off)


def gaussian_data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(12, 3)), rng.normal(size=12), rng.normal(size=(12, 3)), rng.normal(size=12)


def gaussian_chains(estimator, lam0, tau, *, steps, burn_in=500, seed=1, chains=CHAINS):
    """K chains of L(w, λ) = ½‖Xw − y‖² + ½λ‖w‖² (summed over chains), E = mean of ½‖Xv w − yv‖²;
    the chains start at the mean μ (the burn-in forgets it)."""
    far.clear_hyperparameters()
    X, y, Xv, yv = gaussian_data()
    lam = far.get_hyperparameter("lambda", np.asarray(lam0, np.float64))
    mu = np.linalg.solve(X.T @ X + np.diag(np.broadcast_to(lam0, 3)), X.T @ y)
    w = tf.Variable(np.tile(mu, (chains, 1)), name="w")
    inner = lambda: 0.5 * tf.reduce_sum((w @ X.T - y) ** 2) + 0.5 * tf.reduce_sum(lam * w ** 2)
    outer = lambda: 0.5 * tf.reduce_sum((w @ Xv.T - yv) ** 2) / chains
    method = far.StochasticHG(estimator, burn_in=burn_in)
    ho = far.HyperOptimizer(method)
    ho.minimize(outer, keras.optimizers.SGD(0.0), inner, far.SGLDOptimizer(EPS, temperature=tau, seed=seed),
                hyper_list=[lam])(steps, _skip_hyper_ts=True)
    return ho.hypergradients()[0][0].numpy(), method.standard_errors[0][0], method


@pytest.mark.parametrize("estimator", ["pathwise", "score", "reversed"])
def test_gaussian_problem_within_standard_errors_of_the_closed_forms(estimator):
    X, y, Xv, yv = gaussian_data()
    analytic = oracles.gaussian_bilevel(X, y, Xv, yv, 1.0, 1.0)  # p ∝ exp(−L/τ)
    chain = oracles.gaussian_bilevel(X, y, Xv, yv, 1.0, 1.0, step=EPS)  # the chain's stationary law
    target = chain.score if estimator == "score" else chain.pathwise  # what each estimator estimates
    short, short_se, _ = gaussian_chains(estimator, 1.0, 1.0, steps=1500)
    long, long_se, method = gaussian_chains(estimator, 1.0, 1.0, steps=6500)
    assert abs(long - target) < Z * long_se, (long, target, long_se)
    assert abs(long - analytic.pathwise) < Z * long_se + abs(target - analytic.pathwise)  # bias O(ε) apart
    assert abs(target - analytic.pathwise) < 0.05 * abs(analytic.pathwise)  # that O(ε) bias is small
    assert 1.5 < short_se / long_se < 2.7  # 4x the samples: about half the standard error (1/√M)
    stats = method.statistics[0]
    assert stats["samples"] == 6000 and abs(stats["drift"]) < 4 and stats["effective_samples"] > 100


def test_vanishing_temperature_tends_to_the_deterministic_hypergradient_linearly():
    """ridge_bilevel is the τ = 0 hypergradient; the Gaussian gap is −(τ/2)·tr(P A⁻²), P = XvᵀXv."""
    X, y, Xv, yv = gaussian_data()
    deterministic = oracles.ridge_bilevel(X, y, Xv, yv, 1.0)
    A_inv = np.linalg.inv(X.T @ X + np.eye(3))
    slope = -0.5 * np.trace(Xv.T @ Xv @ A_inv @ A_inv)
    for tau in (0.05, 0.1, 0.2):
        far.clear_hyperparameters()
        estimate, se, _ = gaussian_chains("pathwise", 1.0, tau, steps=4500)
        chain_gap = oracles.gaussian_bilevel(X, y, Xv, yv, 1.0, tau, step=EPS).pathwise - deterministic
        assert abs(chain_gap - slope * tau) < 0.01 * abs(slope * tau)  # linear in τ, up to the O(ε) bias
        assert abs((estimate - deterministic) - chain_gap) < Z * se, (tau, estimate, se)
        assert abs(estimate - deterministic) > 10 * se  # the gap is measured, not noise


@pytest.mark.parametrize("estimator", ["score", "reversed"])
def test_one_hyperparameter_per_weight(estimator):
    """One L2 weight λ_j per weight: the O(|w| + |λ|) estimators against the chain's closed form."""
    lam0 = np.array([0.5, 1.0, 2.0])
    X, y, Xv, yv = gaussian_data()
    target = oracles.gaussian_bilevel(X, y, Xv, yv, lam0, 1.0, step=EPS)
    estimate, se, _ = gaussian_chains(estimator, lam0, 1.0, steps=6500)
    expected = target.score if estimator == "score" else target.pathwise
    assert estimate.shape == (3,) and np.all(np.abs(estimate - expected) < Z * se), (estimate, expected, se)


def double_well(start):
    """θ ∈ R per chain, L = (θ² − 1)² + λθ (two wells, at θ ≈ ±1), E = ½(θ − 2)²."""
    lam = far.get_hyperparameter("lambda", np.float64(0.2))
    w = tf.Variable(np.asarray(start, np.float64), name="theta")
    inner = lambda: tf.reduce_sum((w ** 2 - 1) ** 2 + lam * w)
    outer = lambda: tf.reduce_mean(0.5 * (w - 2) ** 2)
    return lam, w, inner, outer


def test_two_inner_minimizers_the_expectation_is_right_where_reverse_mode_follows_one_well():
    tau = 1.0
    grid = np.linspace(-5.0, 5.0, 400_001)  # quadrature of F(λ) = ∫E p, p ∝ exp(−L/τ): exact to ~1e-12
    L = (grid ** 2 - 1) ** 2 + 0.2 * grid
    p = np.exp(-(L - L.min()) / tau)
    p /= p.sum()
    E = 0.5 * (grid - 2) ** 2
    expected = -(np.sum(p * E * grid) - np.sum(p * E) * np.sum(p * grid)) / tau  # −Cov_p(E, ∂L/∂λ)/τ
    lam, w, inner, outer = double_well(np.where(np.arange(CHAINS) % 2 == 0, -1.0, 1.0))
    method = far.StochasticHG("score", burn_in=1000)
    ho = far.HyperOptimizer(method)
    ho.minimize(outer, keras.optimizers.SGD(0.0), inner, far.SGLDOptimizer(EPS, temperature=tau, seed=3),
                hyper_list=[lam])(20_000, _skip_hyper_ts=True)
    estimate, se = float(ho.hypergradients()[0][0]), float(method.standard_errors[0][0])
    assert abs(estimate - expected) < Z * se, (estimate, expected, se)
    for start in (-1.0, 1.0):  # deterministic reverse mode from either well: that well's derivative
        far.clear_hyperparameters()
        lam, w, inner, outer = double_well([start])
        reverse = far.HyperOptimizer(far.ReverseHG())
        reverse.minimize(outer, keras.optimizers.SGD(0.0), inner, far.GradientDescentOptimizer(0.05),
                         hyper_list=[lam])(300, _skip_hyper_ts=True)
        well = float(w.numpy()[0])
        assert abs(well - start) < 0.1  # it stayed in its well
        # at the well's minimum w*(λ): dE/dλ = (w* − 2)·dw*/dλ = −(w* − 2)/L''(w*)
        np.testing.assert_allclose(float(reverse.hypergradients()[0][0]), -(well - 2) / (12 * well ** 2 - 4),
                                   rtol=1e-6)
        assert abs(float(reverse.hypergradients()[0][0]) - expected) > 8 * se


def sgld_ridge(seed=5):
    """Ridge regression with SGLD inner dynamics, λ and the step ε both hyperparameters."""
    data = oracles.ridge_data(n=12, d=4, c=1, seed=0)
    lam = far.get_hyperparameter("lambda", np.float64(0.5))
    eps = far.get_hyperparameter("eps", np.float64(0.02))
    w = tf.Variable(np.zeros(4), name="w")
    inner = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(data.X, w) - data.Y[:, 0]) ** 2) + 0.5 * lam * tf.reduce_sum(w ** 2)
    outer = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(data.Xv, w) - data.Yv[:, 0]) ** 2)
    return lam, eps, w, inner, outer, far.SGLDOptimizer(lambda: eps, temperature=0.3, seed=seed)


@pytest.mark.parametrize("method", [far.ReverseHG(unroll=0), far.ReverseHG(checkpoint_every=4), far.ReverseHG(unroll=30),
                                    far.ForwardHG()],
                         ids=["stored_states", "checkpointed", "unrolled_tapes", "forward"])
def test_reverse_passes_replay_the_noise_of_the_chain(method):
    """The reverse pass recomputes steps from stored states (or checkpoints): with noise drawn as
    a function of (seed, run, step) it sees the forward pass's noise, and every method gives the
    pathwise derivative of the same chain — equal to float64 central differences of its run."""
    lam, eps, w, inner, outer, sgld = sgld_ridge()
    ho = far.HyperOptimizer(method)
    ho.minimize(outer, keras.optimizers.SGD(0.0), inner, sgld, hyper_list=[lam, eps])(30, _skip_hyper_ts=True)
    got = [float(g) for g, _ in ho.hypergradients()]
    problem = far.InnerProblem(inner, sgld, var_list=[w], init_dynamics_dict=[(w, np.zeros(4))])

    def replay(variable, value):  # run 1 again: the same noise, at another hyperparameter value
        original = variable.numpy()
        variable.assign(value)
        sgld.runs.assign(0)  # `run` counts one more: run 1
        problem.run(30)
        variable.assign(original)
        return float(outer())
    h = 1e-6
    for variable, grad in zip((lam, eps), got):
        x = float(variable.numpy())
        assert grad == pytest.approx((replay(variable, x + h) - replay(variable, x - h)) / (2 * h), rel=1e-6)
    sgld.runs.assign(0)
    problem.run(30)
    first = w.numpy().copy()
    problem.run(30)  # the next run draws other noise
    assert not np.allclose(w.numpy(), first)


def not_mixing_problem():
    """(λ, L, E): chains started far from the distribution (w = 20); 400 SGLD steps of 0.002
    without burn-in do not mix."""
    X, y, Xv, yv = gaussian_data()
    lam = far.get_hyperparameter("lambda", np.float64(1.0))
    w = tf.Variable(np.full((CHAINS, 3), 20.0), name="w")
    inner = lambda: 0.5 * tf.reduce_sum((w @ X.T - y) ** 2) + 0.5 * lam * tf.reduce_sum(w ** 2)
    outer = lambda: 0.5 * tf.reduce_sum((w @ Xv.T - yv) ** 2) / CHAINS
    return lam, inner, outer


def test_diagnostics_warn_when_the_chain_has_not_mixed_and_bad_input_is_named():
    lam, inner, outer = not_mixing_problem()
    run = far.HyperOptimizer(far.StochasticHG("score")).minimize(
        outer, keras.optimizers.SGD(0.0), inner, far.SGLDOptimizer(0.002, seed=1), hyper_list=[lam])
    with pytest.warns(RuntimeWarning, match=r"has visibly not mixed .* standard errors between the first and"):
        run(400, _skip_hyper_ts=True)
    with pytest.raises(TypeError, match="must be a far.SGLDOptimizer"):
        far.HyperOptimizer(far.StochasticHG()).minimize(outer, keras.optimizers.SGD(0.0), inner,
                                                        far.GradientDescentOptimizer(0.01), hyper_list=[lam])(10)
    with pytest.raises(ValueError, match=r"`T` = 50 leaves no sample after `burn_in` = 50"):
        far.HyperOptimizer(far.StochasticHG(burn_in=50)).minimize(
            outer, keras.optimizers.SGD(0.0), inner, far.SGLDOptimizer(0.01), hyper_list=[lam])(50)
    with pytest.raises(ValueError, match="estimator"):
        far.StochasticHG("first_order")
    eps = far.get_hyperparameter("eps", np.float64(0.01))
    with pytest.raises(ValueError, match="cannot differentiate .*'eps'.*use 'pathwise'"):
        far.HyperOptimizer(far.StochasticHG("score")).minimize(
            outer, keras.optimizers.SGD(0.0), inner, far.SGLDOptimizer(lambda: eps), hyper_list=[lam, eps])(10)


def test_a_chain_that_has_not_mixed_warns_once_then_is_counted_and_summed_up(monkeypatch):
    monkeypatch.setattr(stochastic, "SUMMARY_EVERY", 3)
    lam, inner, outer = not_mixing_problem()
    method = far.StochasticHG("score")
    ho_run = far.HyperOptimizer(method).minimize(outer, keras.optimizers.SGD(0.0), inner,
                                                 far.SGLDOptimizer(0.002, seed=1), hyper_list=[lam])
    run = lambda: ho_run(400, _skip_hyper_ts=True)  # noqa: E731
    with pytest.warns(RuntimeWarning, match=r"not mixed at hyper-iteration 0: .* moved by -?\d+\.\d standard "
                                            r"errors .*, and \d+ of 400 samples are effective.* `not_mixed_runs`"):
        run()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()  # counted, silent
        assert not caught
        run()  # the third run: the summary of the runs not reported
    assert len(caught) == 1 and str(caught[0].message).startswith("StochasticHG: 2 more chains had not mixed")
    assert "(3 of 3 runs so far)" in str(caught[0].message)
    assert method.not_mixed_runs == method.runs == 3


def test_chain_statistics_effective_samples_at_most_the_samples_and_a_calibrated_drift():
    """On AR(1) traces x_t = φx_{t−1} + √(1 − φ²)ξ_t (τ = (1 + φ)/(1 − φ)): anti-correlated ones
    have M effective samples, not more (a lag-1 formula clipped at ρ = −0.99 gave 199·M); the
    drift of stationary squared traces (skewed, τ ≈ 10) exceeds DRIFT_LIMIT on 0.5 % of them
    (the batch-means test it replaces: 4.6 %), and a chain that starts off its law is flagged (a
    transient raises |z|, or τ̂ and so lowers the effective samples)."""
    rng = np.random.default_rng(0)

    def ar1(phi, runs, m):
        x = np.empty((runs, m))
        x[:, 0] = rng.normal(size=runs)
        for t in range(1, m):
            x[:, t] = phi * x[:, t - 1] + np.sqrt(1 - phi ** 2) * rng.normal(size=runs)
        return x
    statistics = tf.function(lambda trace, chains: chain_statistics(trace, chains))
    for phi, chains in ((-0.99, 1), (-0.9, 4), (0.0, 1), (0.9, 1)):
        s = statistics(tf.constant(ar1(phi, 1, 4000)[0]), chains)
        assert float(s.samples) == 4000 * chains and float(s.effective_samples) <= float(s.samples)
        assert abs(float(s.autocorrelation) - phi) < 0.05
        expected = chains * 4000 * min((1 - phi) / (1 + phi), 1.0)
        assert abs(float(s.effective_samples) / expected - 1) < 0.3, (phi, float(s.effective_samples), expected)
    stationary = ar1(0.9, 400, 400) ** 2  # squares: ρ_s = 0.81^s
    drift = np.array([float(statistics(tf.constant(x), 1).drift) for x in stationary])
    assert np.mean(np.abs(drift) > DRIFT_LIMIT) <= 0.015 and 0.8 < drift.std() < 1.5
    transient = stationary[:50] + 10 * np.sqrt(2) * np.exp(-np.arange(400) / 50)  # 10 sd, decaying
    for x in transient:
        assert visibly_not_mixed({k: float(v) for k, v in statistics(tf.constant(x), 1)._asdict().items()}, True)


@pytest.mark.parametrize("estimator", ["pathwise", "score", "reversed"])
def test_hoisted_features_give_the_estimate_of_features_evaluated_at_every_step(estimator):
    """x = X·H as ``features=`` (evaluated once per run, pulled back to H after the chain) or
    inside the objective: the same chain (same noise), the same estimate up to round-off."""
    X, y, Xv, yv = gaussian_data()
    results = []
    for hoisted in (True, False):
        far.clear_hyperparameters()
        H = far.get_hyperparameter("H", np.eye(3) + 0.1 * np.random.default_rng(2).normal(size=(3, 3)))
        w = tf.Variable(np.zeros((4, 3)), name="w")
        penalty = lambda: 0.5 * tf.reduce_sum(w ** 2)
        if hoisted:
            inner = lambda f: 0.5 * tf.reduce_sum((w @ tf.transpose(f[0]) - f[1]) ** 2) + penalty()
            features = lambda b: (b[0] @ H, b[1])
        else:
            inner = lambda b: 0.5 * tf.reduce_sum((w @ tf.transpose(b[0] @ H) - b[1]) ** 2) + penalty()
            features = None
        outer = lambda: 0.5 * tf.reduce_sum((w @ tf.transpose(Xv @ H) - yv) ** 2) / 4
        method = far.StochasticHG(estimator, burn_in=20, batches=4)
        ho = far.HyperOptimizer(method)
        ho.minimize(outer, keras.optimizers.SGD(0.0), inner, far.SGLDOptimizer(EPS, temperature=0.5, seed=4),
                    hyper_list=[H], features=features)(120, (tf.constant(X), tf.constant(y)), _skip_hyper_ts=True)
        results.append((ho.hypergradients()[0][0].numpy(), method.standard_errors[0][0]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-9)  # round-off apart
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)
    assert np.all(results[0][1] > 0)


# -- chains stacked on a leading axis, declared with ``chains=K`` -----------------------------------

def stacked_chains(estimator, chains, *, steps, burn_in, declared=True, seed=1, step=EPS):
    """K chains of the Gaussian problem as one inner problem (w [K, 3]), started at μ; declared:
    the objectives return the K chains' L_k and E_k, else the scalar idiom (Σ_k L_k, mean_k E_k).
    Returns (once, method): ``once()`` is one more run (new noise), giving (estimate, SE, F̂)."""
    far.clear_hyperparameters()
    X, y, Xv, yv = gaussian_data()
    lam = far.get_hyperparameter("lambda", np.float64(1.0))
    w = tf.Variable(np.tile(np.linalg.solve(X.T @ X + np.eye(3), X.T @ y), (chains, 1)), name="w")
    per_chain_inner = lambda: (0.5 * tf.reduce_sum((w @ X.T - y) ** 2, axis=1)
                               + 0.5 * lam * tf.reduce_sum(w ** 2, axis=1))
    per_chain_outer = lambda: 0.5 * tf.reduce_sum((w @ Xv.T - yv) ** 2, axis=1)
    inner, outer = ((per_chain_inner, per_chain_outer) if declared else
                    (lambda: tf.reduce_sum(per_chain_inner()), lambda: tf.reduce_mean(per_chain_outer())))
    method = far.StochasticHG(estimator, burn_in=burn_in, chains=chains if declared else None)
    ho = far.HyperOptimizer(method)
    run = ho.minimize(outer, keras.optimizers.SGD(0.0), inner, far.SGLDOptimizer(step, seed=seed), hyper_list=[lam])

    def once():
        value = run(steps, _skip_hyper_ts=True)
        return float(ho.hypergradients()[0][0]), float(method.standard_errors[0][0]), float(value)
    return once, method


POOLED_STEP = 0.05  # ε·λ_min(A) ≈ 0.13: short chains mix; the oracle is exact for the chain at any ε


def pooled_score_over_chains(runs, *, steps=400, burn_in=50):
    """Per K: the estimates and reported SEs of 'score' over ``runs[K]`` runs of K chains."""
    results = {}
    for chains, count in runs.items():
        once, _ = stacked_chains("score", chains, steps=steps, burn_in=burn_in, step=POOLED_STEP)
        results[chains] = np.array([once()[:2] for _ in range(count)]).T
    return results


def check_pooled_score(results, ratio_tolerance, honesty):
    """SE(K)/SE(4) ≈ √(4/K), each K's SE the root mean square over its runs (SE² is unbiased for
    the variance; one SE from 4 chains has 3 degrees of freedom); the mean of each K's runs
    within Z of their SE of the exact value; the spread of the estimates about it, over all runs
    in units of their K's SE, within ``honesty`` of 1."""
    X, y, Xv, yv = gaussian_data()
    exact = oracles.gaussian_bilevel(X, y, Xv, yv, 1.0, 1.0, step=POOLED_STEP).score  # the chain's law
    se = {k: np.sqrt(np.mean(errors ** 2)) for k, (_, errors) in results.items()}
    for chains, (estimates, _) in results.items():
        np.testing.assert_allclose(se[chains] / se[4], np.sqrt(4 / chains), rtol=ratio_tolerance)
        assert abs(estimates.mean() - exact) < Z * se[chains] / np.sqrt(len(estimates)), (chains, estimates, exact)
    spread = np.sqrt(np.mean(np.concatenate([((e - exact) / se[k]) ** 2 for k, (e, _) in results.items()])))
    assert honesty[0] < spread < honesty[1], spread


def test_score_pools_stacked_chains_its_standard_error_falls_like_one_over_root_k():
    """Declared chains: only each chain's own Cov(E_k, ∂L_k/∂λ) enters and the SEs come from the
    spread across chains, so they fall like 1/√K. Over 200 runs each: SEs 0.210, 0.105, 0.054 at
    K = 4, 16, 64 against root-mean-square errors 0.206, 0.107, 0.053 (summed objectives, whose
    cross-chain products are pure noise: SEs 0.23, 0.18, 0.17)."""
    check_pooled_score(pooled_score_over_chains({4: 128, 16: 24, 64: 8}), ratio_tolerance=0.3, honesty=(0.75, 1.3))


@pytest.mark.long
def test_score_pools_stacked_chains_long():
    check_pooled_score(pooled_score_over_chains({4: 1000, 16: 200, 64: 50}), ratio_tolerance=0.1,
                       honesty=(0.92, 1.08))


@pytest.mark.parametrize("estimator", ["pathwise", "reversed", "score"])
def test_declared_chains_estimate_the_scalar_idioms_objective(estimator):
    """The same chains (same noise) with per-chain objectives or summed (L) and averaged (E) ones:
    'pathwise' and 'reversed' give the same estimate and SEs to round-off (their per-sample
    estimate is linear in the chains' terms, their SEs batch means either way); 'score' the same
    F̂, and with one chain the same estimate and SE."""
    chains = 1 if estimator == "score" else 8
    declared, summed = (stacked_chains(estimator, chains, steps=200, burn_in=50, declared=d)[0]()
                        for d in (True, False))
    np.testing.assert_allclose(declared, summed, rtol=1e-10)
    if estimator == "score":
        declared, summed = (stacked_chains("score", 8, steps=200, burn_in=50, declared=d)[0]() for d in (True, False))
        np.testing.assert_allclose(declared[2], summed[2], rtol=1e-12)


def test_declared_chains_bad_shapes_are_one_line_errors():
    X, y, Xv, yv = gaussian_data()
    lam = far.get_hyperparameter("lambda", np.float64(1.0))
    w = tf.Variable(np.zeros((4, 3)), name="w")
    per_chain = lambda: 0.5 * tf.reduce_sum((w @ X.T - y) ** 2, axis=1) + 0.5 * lam * tf.reduce_sum(w ** 2, axis=1)
    summed = lambda: tf.reduce_sum(per_chain())
    for inner, outer, message in (
            (summed, per_chain, r"^`inner_objective` must return one value per chain \(`chains=4`\), a vector of "
                                r"shape \(4,\); got shape \(\)\.$"),
            (per_chain, lambda: w @ Xv.T, r"^`outer_objective` must return .* got shape \(4, 12\)\.$")):
        for estimator in ESTIMATORS:
            run = far.HyperOptimizer(far.StochasticHG(estimator, chains=4)).minimize(
                outer, keras.optimizers.SGD(0.0), inner, far.SGLDOptimizer(EPS), hyper_list=[lam])
            with pytest.raises(ValueError, match=message):
                run(10, _skip_hyper_ts=True)
    with pytest.raises(ValueError, match=r"`chains` must be None or an int ≥ 1, got 0"):
        far.StochasticHG("score", chains=0)
