"""The test oracles every hypergradient method is checked against: small TensorFlow bilevel
problems whose hypergradients are known exactly (closed forms of ``far_ho2.oracles``, in float64)
or were published by FAR-HO (float32 notebooks)."""

from typing import Any, Callable, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf

import far_ho2 as far
from far_ho2.oracles import (QuadraticBilevel, central_difference, gaussian_bilevel, numpy_unroll,  # noqa: F401
                             quadratic_bilevel, quadratic_hypergradient, quadratic_inner, quadratic_outer,
                             quadratic_solution, ridge_bilevel, ridge_data, ridge_per_feature, safe_norm,
                             unroll_quadratic, unrolled_ridge)

T, ETA, RHO = 20, 0.02, 0.3
EXACT = 1e-8  # float64 closed form vs float64 autodiff: agreement is at round-off (~1e-13)
FD = 1e-6  # central differences in float64 with eps=1e-6 carry ~1e-9 relative error


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius over all entries)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def hypergradients(ho: far.HyperOptimizer) -> list[np.ndarray]:
    """The last run's hypergradients, in ``hyper_list`` order, as arrays."""
    return [g.numpy() for g, _ in ho.hypergradients()]


class Ridge:
    """The paper's Example 3.4 in float64: features X H, ridge weights w, hyperparameters H (a
    matrix), log ρ and η; E reads H directly as well (it uses Xv H)."""

    def __init__(self, seed=0, with_batches=False, features=False):
        self.data = ridge_data(seed=seed)
        rng = np.random.default_rng(seed + 100)
        self.H0 = np.eye(5) + 0.1 * rng.normal(size=(5, 5))
        self.H = far.get_hyperparameter("H", self.H0)
        self.log_rho = far.get_hyperparameter("log_rho", np.log(RHO))
        self.eta = far.get_hyperparameter("eta", np.float64(ETA))
        self.w = tf.Variable(np.zeros((5, 2)), name="w")
        self.hypers = [self.H, self.log_rho, self.eta]
        X, Y, Xv, Yv = (tf.constant(a) for a in self.data)
        penalty = lambda: 0.5 * tf.exp(self.log_rho) * tf.reduce_sum(self.w ** 2)
        if features:  # the batch's X H is computed once per run, not once per step
            self.features = lambda batch: (batch[0] @ self.H, batch[1])
            self.inner = lambda f: 0.5 * tf.reduce_sum((f[0] @ self.w - f[1]) ** 2) + penalty()
        else:
            self.features = None
            self.inner = (lambda b: 0.5 * tf.reduce_sum((b[0] @ self.H @ self.w - b[1]) ** 2) + penalty()
                          ) if with_batches else (
                          lambda: 0.5 * tf.reduce_sum((X @ self.H @ self.w - Y) ** 2) + penalty())
        self.outer = lambda: 0.5 * tf.reduce_sum((Xv @ self.H @ self.w - Yv) ** 2)

    def hypergradients(self, method, steps=T, **run_kwargs):
        ho = far.HyperOptimizer(method)
        run = ho.minimize(self.outer, keras.optimizers.SGD(0.0), self.inner,
                          far.GradientDescentOptimizer(self.eta), hyper_list=self.hypers,
                          features=self.features)
        run(steps, _skip_hyper_ts=True, **run_kwargs)
        return ho, hypergradients(ho)

    def expected(self, steps=T, w0=None):
        exact = unrolled_ridge(self.data, self.H0, RHO, ETA, steps, w0)
        return [exact.H, RHO * exact.rho, exact.eta]  # d/dlog ρ = ρ d/dρ



def quadratic_objectives(p: QuadraticBilevel, x, z):
    """The inner and outer objectives of the quadratic bilevel problem ``p`` on the
    hyperparameter x and the inner variable z (TensorFlow, reading the variables)."""
    A, B, C, a, b, F, H, K, f_v, h = (tf.constant(m) for m in p)
    quad = lambda M, u, v: tf.tensordot(u, tf.linalg.matvec(M, v), 1)
    inner = lambda: (0.5 * quad(A, z, z) + 0.5 * quad(B, x, x) + quad(C, x, z) + tf.tensordot(a, z, 1)
                     + tf.tensordot(b, x, 1))
    outer = lambda: (0.5 * quad(F, z, z) + 0.5 * quad(H, x, x) + quad(K, x, z) + tf.tensordot(f_v, z, 1)
                     + tf.tensordot(h, x, 1))
    return inner, outer


# FAR-HO tests/check forward.ipynb (T1): hypergradients [λ0, λ1, λ2, η, μ] after 10 momentum steps.
T1_REVERSE = [-0.018393531, 0.055180617, 0.0036787055, 0.53872281, -0.076542258]
T1_FORWARD = [-0.018393533, 0.055180617, 0.003678706, 0.53872269, -0.076542266]


def quadratic_run(method: far.HyperGradient, outer_optimizer, inner_optimizer):
    """The quadratic bilevel problem (seed 0) set up for ``method``: (problem, x, z, ho, run)."""
    p = quadratic_bilevel(seed=0)
    x = far.get_hyperparameter("x", np.zeros(3))
    z = tf.Variable(np.zeros(4), name="z")
    inner, outer = quadratic_objectives(p, x, z)
    ho = far.HyperOptimizer(method)
    run = ho.minimize(outer, outer_optimizer, inner, inner_optimizer, hyper_list=[x], var_list=[z])
    return p, x, z, ho, run


def run_checkpointed(ho: far.HyperOptimizer, run, T: int, iterations: int, directory, resume: bool) -> None:
    """``iterations`` runs of T steps, from the latest checkpoint in ``directory`` if ``resume``,
    then a checkpoint of ``ho.state()`` there."""
    checkpoint = tf.train.Checkpoint(**ho.state())
    if resume:
        checkpoint.restore(tf.train.latest_checkpoint(directory)).assert_existing_objects_matched()
    for _ in range(iterations):
        run(T)
    checkpoint.save(f"{directory}/ckpt")


def legacy_t1(method: far.HyperGradient) -> list[float]:
    """The T1 problem: cost = mean(v1²) + Σ λ·v2² with λ = three scalar hyperparameters,
    momentum (η = .1, μ = .5, both hyperparameters), E = mean(v1·v2), T = 10 (float32)."""
    v1 = tf.Variable([[1., -1., 1.], [2., 10., 2.]])
    v2 = tf.Variable([-1., 1., 0.2])
    lmbd = far.get_hyperparameter("lambda", initializer=tf.ones_initializer, shape=v2.shape, scalar=True)
    cost = lambda: tf.reduce_mean(v1 ** 2) + tf.reduce_sum(lmbd * v2 ** 2)
    eta, mu = far.get_hyperparameter("eta", 0.1), far.get_hyperparameter("mu", .5)
    ho = far.HyperOptimizer(method)
    run = ho.minimize(lambda: tf.reduce_mean(v1 * v2), keras.optimizers.Adam(.01), cost,
                      far.MomentumOptimizer(eta, mu), hyper_list=[lmbd, eta, mu])
    run(10, _skip_hyper_ts=True)
    return [float(g) for g in hypergradients(ho)]


# FAR-HO tests/on implicitHG.ipynb (T3): reverse at T = 100 and 1000 and implicit at T = 1000.
T3_PUBLISHED = [0.0, 0.2829068, 36.6, 51.6605]


def legacy_t3(method: far.HyperGradient, steps: int) -> np.ndarray:
    """The T3 problem: w_0 = [1, 2, −1, −5], hyperparameter e = [3, 1.1, 1, .1],
    L = Σ e·w² + (w − [0, −1, 12, 18])², E = Σ (w − [.1, −1.1, 12.1, 18.1])², GD with η = .1."""
    w = tf.Variable([1., 2., -1., -5.])
    e = far.get_hyperparameter("e", initializer=[3., 1.1, 1., 0.1])
    io = lambda: e * w ** 2 + (w - [0., -1., 12., 18.]) ** 2  # a vector, summed as in TF1
    oo = lambda: (w - [0.1, -1.1, 12.1, 18.1]) ** 2
    ho = far.HyperOptimizer(method)
    ho.minimize(oo, far.GradientDescentOptimizer(0.1), io, far.GradientDescentOptimizer(0.1),
                hyper_list=[e])(steps, _skip_hyper_ts=True)
    return hypergradients(ho)[0]


# -- one iteration of BOME and of the penalty method on the quadratic problem, in float64 NumPy ------

class BomeStep(NamedTuple):
    direction_x: np.ndarray  # d_λ = ∇_λ f + μ ∇_λ q̂
    direction_w: np.ndarray  # d_w = ∇_w f + μ ∇_w q̂
    mu: float
    q: float  # q̂ = g(λ, w) − g(λ, ŵ)
    value: float  # f(λ, ŵ)
    scale: float  # the size of the terms summed: ‖∇f‖ + μ‖∇q̂‖
    run: Any  # the T steps giving ŵ (far_ho2.oracles.QuadraticUnroll)


def bome_step(p: QuadraticBilevel, x: np.ndarray, w: np.ndarray, T: int, spec: Any, eta: float, phi: str,
              delta: float, roundoff: Optional[np.random.Generator] = None) -> BomeStep:
    """One BOME iteration at (λ, w) as ``far_ho2.hypergradients.bome.bome_direction`` defines it:
    ŵ = T steps of the inner optimizer from w (fresh slots), then μ and d."""
    run = unroll_quadratic(p.A, p.C, p.a, x, w, T, spec, roundoff=roundoff)
    with np.errstate(over="ignore", invalid="ignore"):
        g_k, gx_k, gw_k = quadratic_inner(p, x, w)
        g_hat, gx_hat, _ = quadratic_inner(p, x, run.w)
        f, fx, fw = quadratic_outer(p, x, w)
        q_x, q_w, q = gx_k - gx_hat, gw_k, g_k - g_hat
        norm2 = q_x @ q_x + q_w @ q_w
        dot = fx @ q_x + fw @ q_w
        if phi == "grad_norm":  # as the official code: relu(η − ⟨∇f, ∇q̂⟩/(‖∇q̂‖² + δ))
            mu = max(eta - dot / (norm2 + delta), 0.0)
        else:
            mu = max((eta * q - dot) / (norm2 + delta), 0.0)
        scale = np.sqrt(fx @ fx + fw @ fw) + mu * np.sqrt(norm2)
        value = quadratic_outer(p, x, run.w)[0]
    return BomeStep(fx + mu * q_x, fw + mu * q_w, float(mu), float(q), value, float(scale), run)


def armijo_descent(loss: Callable[[np.ndarray], float], gradient: Callable[[np.ndarray], np.ndarray],
                   w: np.ndarray, rate: float, steps: int, halvings: int = 60) -> np.ndarray:
    """``far_ho2.hypergradients.penalty.lower_solution`` in NumPy: T steps of gradient descent
    whose rate doubles, then halves until g(w − r∇g) ≤ g(w) − ½r‖∇g‖²."""
    for _ in range(steps):
        g, value = gradient(w), loss(w)
        rate, j = 2 * rate, 0
        while j < halvings and not loss(w - rate * g) <= value - 0.5 * rate * (g @ g):
            rate, j = rate / 2, j + 1
        w = w - rate * g
    return w


class PenaltyStep(NamedTuple):
    direction: np.ndarray  # ∇_λ h_λ at (λ, w_T)
    w: np.ndarray  # w_T
    slots: tuple  # the inner optimizer's slots after the T steps
    lower: np.ndarray  # ∇_w g(λ, w_T)
    norm2: float  # ‖G_λ‖² + ‖∇_w h_w‖², the stage test's statistic (G_λ the projected gradient)
    value: float  # f(λ, ŵ), ŵ = T steps of ``armijo_descent`` on g from w_T
    scale: float  # the size of the terms of the direction
    run: Any  # far_ho2.oracles.QuadraticUnroll of the T steps on h_w


def penalty_step(p: QuadraticBilevel, x: np.ndarray, w: np.ndarray, T: int, spec: Any, nu: np.ndarray,
                 gamma: float, lambda_g: float, rate_scale: float,
                 roundoff: Optional[np.random.Generator] = None, lo: Any = -np.inf, hi: Any = np.inf) -> PenaltyStep:
    """One iteration of ``far_ho2.Penalty`` from w (fresh optimizer slots): T steps of the inner
    optimizer (rate × ``rate_scale``) on h_w = f + νᵀ∇_w g + (γ/2)‖∇_w g‖² + λ_g g, a quadratic
    in w with Hessian F + γA² + λ_g A, then the direction ∇_λ h_λ = ∇_λ f + Cν + γ C ∇_w g; the
    stage statistic uses λ's projected gradient λ − clip(λ − ∇_λ h_λ, lo, hi) on a box."""
    A, C = p.A, p.C
    hessian = p.F + gamma * A @ A + lambda_g * A
    coupling = p.K + gamma * C @ A + lambda_g * C
    linear = p.f_v + A @ nu + gamma * A @ p.a + lambda_g * p.a
    run = unroll_quadratic((hessian + hessian.T) / 2, coupling, linear, x, w, T,
                           spec._replace(learning_rate=spec.learning_rate * rate_scale), roundoff=roundoff)
    with np.errstate(over="ignore", invalid="ignore"):
        _, fx, _ = quadratic_outer(p, x, run.w)
        _, _, lower = quadratic_inner(p, x, run.w)
        w_hat = armijo_descent(lambda z: quadratic_inner(p, x, z)[0], lambda z: quadratic_inner(p, x, z)[2],
                               run.w, spec.learning_rate, T)
        f = quadratic_outer(p, x, w_hat)[0]
        direction = fx + C @ nu + gamma * C @ lower
        surrogate_w = hessian @ run.w + coupling.T @ x + linear
        scale = safe_norm(fx) + safe_norm(C @ nu) + gamma * safe_norm(C, 2) * safe_norm(lower)
        projected = x - np.clip(x - direction, lo, hi)
        norm2 = projected @ projected + surrogate_w @ surrogate_w
    return PenaltyStep(direction, run.w, run.slots, lower, float(norm2), f, float(scale), run)
