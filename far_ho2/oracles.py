"""Exact hypergradients of small bilevel problems, in float64 NumPy, independent of TensorFlow:
the references every method of far_ho2 is tested against, shipped so users can test theirs.

* ``unrolled_ridge``: the hypergradient of T steps of gradient descent on ridge regression, in
  closed form (diagonalised gradient descent, generalised): with A = ZᵀZ + ρI, B = ZᵀY, r(λ) = 1 − ηλ,
  w_T = f(A) w_0 + g(A) B,  f(λ) = r^T,  g(λ) = (1 − r^T)/λ,  and derivatives through the
  eigendecomposition A = QΛQᵀ (Daleckii–Krein: D f(A)[dA] = Q (F ∘ QᵀdAQ) Qᵀ, F the divided
  differences of f). Z = XH, so the gradients cover a matrix hyperparameter H (Example 3.4 of
  Franceschi et al. 2018), ρ, η and w_0. T = None gives the exact bilevel solution (T → ∞).
* ``ridge_bilevel`` / ``ridge_per_feature``: the exact bilevel hypergradient of ridge regression
  with one regularization weight, or one per feature (implicit function theorem).
* ``quadratic_bilevel``: a strongly convex quadratic bilevel problem, its hypergradient and its
  solution x* (the benchmark of benchopt's bilevel suite).
* ``gaussian_bilevel``: ridge regression as a distribution, p(w|λ) ∝ exp(−L/τ) = N(μ, τA⁻¹): the
  expected outer loss and its gradient, for the Gibbs distribution and for the stationary law
  of its Langevin chain with step ε (both Gaussian), per estimator's target.
* ``numpy_unroll``: GD / momentum / Adam on a quadratic problem in NumPy, for finite differences.
* ``random_quadratic_bilevel``: random instances of ``quadratic_bilevel`` of given conditioning and
  coupling; ``unrolled_quadratic_hypergradient``: the exact hypergradient of T steps of GD, heavy
  ball, Nesterov, Adam or back-tracking GD on them (the tangent recursion, with the run's growth);
  ``implicit_quadratic_hypergradient``: the implicit-function hypergradient at any inner iterate;
  ``quadratic_hyperobjective`` and ``box_minimizer``: the hyper-objective as a quadratic and its
  exact minimizer over a box (active sets, KKT checked).
* ``central_difference``: the float64 central finite difference of a scalar function.
"""

from typing import Callable, NamedTuple, Optional

import numpy as np


def central_difference(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """∂f/∂x by central differences, one coordinate at a time (float64)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


class RidgeData(NamedTuple):
    X: np.ndarray  # training inputs (n × d)
    Y: np.ndarray  # training targets (n × c)
    Xv: np.ndarray  # validation inputs
    Yv: np.ndarray  # validation targets


def ridge_data(n: int = 12, d: int = 5, c: int = 2, seed: int = 0) -> RidgeData:
    rng = np.random.default_rng(seed)
    return RidgeData(rng.normal(size=(n, d)), rng.normal(size=(n, c)),
                     rng.normal(size=(n, d)), rng.normal(size=(n, c)))


class RidgeHypergradient(NamedTuple):
    value: float  # E(w_T) = ½‖Xv H w_T − Yv‖²
    w: np.ndarray  # w_T
    H: np.ndarray  # dE/dH
    rho: float  # dE/dρ
    eta: float  # dE/dη (0 for T = None)
    w0: np.ndarray  # dE/dw_0


def _divided_differences(lam: np.ndarray, f: np.ndarray, df: np.ndarray) -> np.ndarray:
    diff = lam[:, None] - lam[None, :]
    close = np.abs(diff) < 1e-9 * max(1.0, np.abs(lam).max())
    safe = np.where(close, 1.0, diff)
    return np.where(close, (df[:, None] + df[None, :]) / 2, (f[:, None] - f[None, :]) / safe)


def unrolled_ridge(data: RidgeData, H: np.ndarray, rho: float, eta: float, T: Optional[int],
                   w0: Optional[np.ndarray] = None) -> RidgeHypergradient:
    """Closed-form hypergradient of E(w_T) = ½‖Xv H w_T − Yv‖² where w_T is T steps of
    w ← w − η∇L(w), L(w) = ½‖X H w − Y‖² + (ρ/2)‖w‖², from w_0 (default 0); T=None: w_T = w*."""
    Z, Zv = data.X @ H, data.Xv @ H
    d = H.shape[1]
    w0 = np.zeros((d, data.Y.shape[1])) if w0 is None else w0
    A, B = Z.T @ Z + rho * np.eye(d), Z.T @ data.Y
    lam, Q = np.linalg.eigh(A)
    if T is None:
        f, df = np.zeros_like(lam), np.zeros_like(lam)
        g, dg = 1 / lam, -1 / lam**2
        f_eta = g_eta = np.zeros_like(lam)
    else:
        r = 1 - eta * lam
        f, df = r**T, -eta * T * r**(T - 1)
        g = (1 - r**T) / lam
        dg = (eta * T * r**(T - 1) * lam - (1 - r**T)) / lam**2
        f_eta, g_eta = -T * lam * r**(T - 1), T * r**(T - 1)
    fA, gA = (Q * f) @ Q.T, (Q * g) @ Q.T
    w = fA @ w0 + gA @ B
    residual = Zv @ w - data.Yv
    G = Zv.T @ residual  # ∂E/∂w_T
    Qt_G = Q.T @ G
    A_bar = Q @ (_divided_differences(lam, f, df) * (Qt_G @ (Q.T @ w0).T)
                 + _divided_differences(lam, g, dg) * (Qt_G @ (Q.T @ B).T)) @ Q.T
    B_bar = gA @ G
    Z_bar = Z @ (A_bar + A_bar.T) + data.Y @ B_bar.T
    H_bar = data.X.T @ Z_bar + data.Xv.T @ residual @ w.T  # through Z = XH, and E's Zv = Xv H
    eta_bar = np.sum(Qt_G * (f_eta[:, None] * (Q.T @ w0) + g_eta[:, None] * (Q.T @ B)))
    return RidgeHypergradient(0.5 * np.sum(residual**2), w, H_bar, float(np.trace(A_bar)),
                              float(eta_bar), fA @ G)


def ridge_bilevel(X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray, lam: float) -> float:
    """∇F(λ) = −w*ᵀ A⁻¹ Xvᵀ(Xv w* − yv), A = XᵀX + λI, w* = A⁻¹Xᵀy."""
    A = X.T @ X + lam * np.eye(X.shape[1])
    w = np.linalg.solve(A, X.T @ y)
    return float(-w @ np.linalg.solve(A, Xv.T @ (Xv @ w - yv)))


def ridge_per_feature(X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray,
                      lam: np.ndarray) -> np.ndarray:
    """∇F(λ) = −(A⁻¹∇_w f(w*)) ⊙ w*, A = XᵀX + diag(λ)."""
    A = X.T @ X + np.diag(lam)
    w = np.linalg.solve(A, X.T @ y)
    return -np.linalg.solve(A, Xv.T @ (Xv @ w - yv)) * w


class QuadraticBilevel(NamedTuple):
    """g(x,z) = ½zᵀAz + ½xᵀBx + xᵀCz + aᵀz + bᵀx,  f(x,z) = ½zᵀFz + ½xᵀHx + xᵀKz + f_vᵀz + hᵀx."""
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    a: np.ndarray
    b: np.ndarray
    F: np.ndarray
    H: np.ndarray
    K: np.ndarray
    f_v: np.ndarray
    h: np.ndarray


def quadratic_bilevel(dx: int = 3, dz: int = 4, seed: int = 0) -> QuadraticBilevel:
    rng = np.random.default_rng(seed)

    def spd(n, low):
        M = rng.normal(size=(n, n))
        return M @ M.T / n + low * np.eye(n)
    return QuadraticBilevel(spd(dz, 1.0), spd(dx, 0.5), rng.normal(size=(dx, dz)) / 2,
                            rng.normal(size=dz), rng.normal(size=dx), spd(dz, 0.5), spd(dx, 0.5),
                            rng.normal(size=(dx, dz)) / 2, rng.normal(size=dz), rng.normal(size=dx))


def quadratic_hypergradient(p: QuadraticBilevel, x: np.ndarray) -> np.ndarray:
    """∇Φ(x) = Hx + K z* + h − C A⁻¹(F z* + Kᵀx + f_v),  z* = −A⁻¹(Cᵀx + a)."""
    z = -np.linalg.solve(p.A, p.C.T @ x + p.a)
    return p.H @ x + p.K @ z + p.h - p.C @ np.linalg.solve(p.A, p.F @ z + p.K.T @ x + p.f_v)


def quadratic_solution(p: QuadraticBilevel) -> np.ndarray:
    """x* = argmin Φ: ∇Φ is affine, ∇Φ(x) = Mx + ∇Φ(0), so x* = −M⁻¹∇Φ(0)."""
    base = quadratic_hypergradient(p, np.zeros(p.B.shape[0]))
    M = np.stack([quadratic_hypergradient(p, e) - base for e in np.eye(p.B.shape[0])], axis=1)
    return np.linalg.solve(M, -base)


class GaussianHypergradient(NamedTuple):
    value: float  # F = E_q[E], q the Gibbs distribution (ε = 0) or the chain's stationary law
    pathwise: np.ndarray  # dF/dλ: what differentiating the chain estimates
    score: np.ndarray  # E_q[∂E/∂λ] − Cov_q(E, ∂L/∂λ)/τ: what the covariance identity estimates on q


def gaussian_bilevel(X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray, lam: np.ndarray,
                     tau: float, step: float = 0.0) -> GaussianHypergradient:
    """L(w, λ) = ½‖Xw − y‖² + ½ Σ_j λ_j w_j²  (λ a scalar, or one per weight),  E(w) = ½‖Xv w − yv‖²,
    p(w|λ) ∝ exp(−L/τ) = N(μ, τA⁻¹),  A = XᵀX + diag(λ),  μ = A⁻¹Xᵀy.

    The Langevin chain  w' = w − ε∇L + √(2ετ)ξ  is linear-Gaussian: its stationary law is
    N(μ, Σ_ε), Σ_ε = τ G⁻¹ with G = A − (ε/2)A² (the fixed point of Σ = (I − εA)Σ(I − εA) + 2ετI).
    With P = XvᵀXv, r = Xvᵀyv:

        F = ½‖Xv μ − yv‖² + ½ tr(P Σ_ε)
        dF/dλ_j = −μ_j (A⁻¹(Pμ − r))_j + ½ tr(P dΣ_ε/dλ_j),   dΣ_ε/dλ_j = −τ G⁻¹ (E_j − (ε/2)(E_j A + A E_j)) G⁻¹
        Cov_q(E, ½w_j²) = ½ (Σ_ε P Σ_ε)_jj + μ_j (Σ_ε (Pμ − r))_j        (E_j = e_j e_jᵀ; ∂L/∂λ_j = ½w_j²)

    At ε = 0, ``pathwise`` = ``score`` = the exact ∇F; for a scalar λ the sums over j are taken.
    """
    d = X.shape[1]
    scalar = np.ndim(lam) == 0
    lam_vec = np.full(d, float(lam)) if scalar else np.asarray(lam, np.float64)
    A = X.T @ X + np.diag(lam_vec)
    mu = np.linalg.solve(A, X.T @ y)
    P, r = Xv.T @ Xv, Xv.T @ yv
    G = A - 0.5 * step * A @ A
    Sigma = tau * np.linalg.inv(G)
    residual = P @ mu - r
    value = 0.5 * np.sum((Xv @ mu - yv) ** 2) + 0.5 * np.trace(P @ Sigma)
    mean_term = -mu * np.linalg.solve(A, residual)
    noise_term, covariance = np.zeros(d), np.zeros(d)
    G_inv = np.linalg.inv(G)
    SPS = Sigma @ P @ Sigma
    for j in range(d):
        E = np.zeros((d, d))
        E[j, j] = 1.0
        dSigma = -tau * G_inv @ (E - 0.5 * step * (E @ A + A @ E)) @ G_inv
        noise_term[j] = 0.5 * np.trace(P @ dSigma)
        covariance[j] = 0.5 * SPS[j, j] + mu[j] * (Sigma @ residual)[j]
    pathwise, score = mean_term + noise_term, -covariance / tau
    if scalar:
        pathwise, score = np.sum(pathwise), np.sum(score)
    return GaussianHypergradient(float(value), pathwise, score)


def numpy_unroll(grad: Callable[[np.ndarray, int], np.ndarray], w0: np.ndarray, T: int,
                 optimizer: str, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-5) -> np.ndarray:
    """w_T of T steps of FAR-HO's GD / momentum / Adam (ε inside the root) in NumPy;
    ``grad(w, t)`` is ∇L_t(w)."""
    w, m, v = np.array(w0, dtype=np.float64), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(T):
        g = grad(w, t)
        if optimizer == "gd":
            w = w - lr * g
        elif optimizer == "momentum":
            m = momentum * m + g
            w = w - lr * (g + momentum * m if nesterov else m)
        elif optimizer == "adam":
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            lr_t = lr * np.sqrt(1 - beta2**(t + 1)) / (1 - beta1**(t + 1))
            w = w - lr_t * m / np.sqrt(v + epsilon**2)
        else:
            raise ValueError(optimizer)
    return w


# -- randomized quadratic bilevel problems: the oracles of the randomized suite ----------------------

def safe_norm(x: np.ndarray, ord: Optional[int] = None) -> float:
    """``np.linalg.norm`` without overflow for huge finite entries (scaled by the largest one),
    and inf for an array holding NaN or inf."""
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
        return np.inf
    largest = np.abs(x).max() if x.size else 0.0
    return 0.0 if largest == 0 else float(largest * np.linalg.norm(x / largest, ord))


def random_quadratic_bilevel(m: int, n: int, seed: int = 0, *, condition: float = 10.0,
                             coupling: float = 1.0) -> QuadraticBilevel:
    """A random instance of ``QuadraticBilevel`` (x ∈ R^m, z ∈ R^n) with controlled difficulty:
    the inner Hessian A has eigenvalues log-uniform in [1, ``condition``] (both ends included when
    n ≥ 2, so L_max = ``condition``), the coupling C has entries of size ``coupling``/√n, and the
    outer objective is jointly convex in (x, z) with curvature at least 0.1, so that the
    hyper-objective Φ(x) = f(x, z*(x)) is strongly convex (one bilevel solution, also over a box)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigenvalues = condition ** np.sort(rng.uniform(size=n))
    if n >= 2:
        eigenvalues[0], eigenvalues[-1] = 1.0, condition
    A = (Q * eigenvalues) @ Q.T
    R = rng.normal(size=(m + n, m + n))
    S = R @ R.T / (m + n) + 0.1 * np.eye(m + n)  # [[H, K], [Kᵀ, F]] ≻ 0
    M = rng.normal(size=(m, m))
    return QuadraticBilevel(A=(A + A.T) / 2, B=M @ M.T / m + 0.1 * np.eye(m),
                            C=coupling * rng.normal(size=(m, n)) / np.sqrt(n), a=rng.normal(size=n),
                            b=rng.normal(size=m), F=S[m:, m:], H=S[:m, :m], K=S[:m, m:], f_v=rng.normal(size=n),
                            h=rng.normal(size=m))


def quadratic_inner(p: QuadraticBilevel, x: np.ndarray, z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(g, ∇_x g, ∇_z g) of the inner objective at (x, z) (inf or NaN where they overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):
        value = 0.5 * z @ p.A @ z + 0.5 * x @ p.B @ x + x @ p.C @ z + p.a @ z + p.b @ x
        return float(value), p.B @ x + p.C @ z + p.b, p.A @ z + p.C.T @ x + p.a


def quadratic_outer(p: QuadraticBilevel, x: np.ndarray, z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(f, ∇_x f, ∇_z f) of the outer objective at (x, z) (inf or NaN where they overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):
        value = 0.5 * z @ p.F @ z + 0.5 * x @ p.H @ x + x @ p.K @ z + p.f_v @ z + p.h @ x
        return float(value), p.H @ x + p.K @ z + p.h, p.F @ z + p.K.T @ x + p.f_v


class InnerOptimizerSpec(NamedTuple):
    """An inner optimizer of far_ho2 with constant parameters: ``kind`` is 'gd', 'momentum',
    'nesterov', 'adam' (ε inside the root) or 'backtracking' (Armijo, j held constant)."""
    kind: str
    learning_rate: float
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-5
    c: float = 0.5
    tau: float = 0.5
    max_backtracks: int = 30


class QuadraticUnroll(NamedTuple):
    w: np.ndarray  # w_T
    slots: tuple  # the optimizer's final slots: () / (m,) / (m, v, β₁ᵀ, β₂ᵀ)
    tangent: np.ndarray  # dw_T/dx (n × m) through the last `truncate` steps (w_{T−K} constant)
    rates: np.ndarray  # the learning rate of every step (the line search's η τ^{j_t})
    growth: float  # max over t of ‖w_t − w*‖/‖w_0 − w*‖ and ‖Z_t − Z*‖/‖Z*‖ (at most 1 for GD that contracts)
    margin: float  # the line search's smallest relative Armijo margin over the steps where ‖∇L‖ is
    #                more than 1e-8 of its largest value (inf for the other optimizers)
    gradient_scale: float  # max over t of ‖∇L(w_t)‖


def unroll_quadratic(hessian: np.ndarray, coupling: np.ndarray, linear: np.ndarray, x: np.ndarray,
                     w0: np.ndarray, T: int, spec: InnerOptimizerSpec, truncate: Optional[int] = None,
                     roundoff: Optional[np.random.Generator] = None) -> QuadraticUnroll:
    """T steps of far_ho2's inner optimizer ``spec`` on  L(w) = ½wᵀ·hessian·w + xᵀ·coupling·w +
    linearᵀw  (plus terms in x only) from w_0, and the exact derivative Z_T = dw_T/dx by the
    forward (tangent) recursion Z_{t+1} = ∂Φ/∂s·Z_t + ∂Φ/∂x in float64 NumPy (no finite
    differences). ``truncate`` = K starts the recursion at step T − K with Z = 0 (truncated
    reverse mode's target). Momentum: m' = μm + g, w' = w − η m' (Nesterov: w' = w − η(g + μm'));
    Adam: as ``far_ho2.dynamics.adam``; back-tracking: the step's rate η τ^j is replayed and held
    constant in Z, as ``BackTrackingGradientDescentOptimizer`` does. ``roundoff`` (a generator)
    multiplies every entry of the state and of Z by 1 + u·ξ (u the unit round-off, ξ ~ N(0, 1))
    after each step: a model of float64 round-off, to measure how much the run amplifies it."""
    n, m = len(w0), len(x)
    w = np.array(w0, np.float64)
    mom, v = np.zeros(n), np.zeros(n)
    b1p = b2p = 1.0
    Z, Zm, Zv = np.zeros((n, m)), np.zeros((n, m)), np.zeros((n, m))
    start = T - min(truncate or T, T)
    bias = coupling.T @ x + linear
    w_star = -np.linalg.solve(hessian, bias)
    Z_star = -np.linalg.solve(hessian, coupling.T)
    w_scale = max(safe_norm(w - w_star), 1e-12 * (1 + safe_norm(w_star)))
    Z_scale = max(safe_norm(Z_star), 1e-300)
    growth, margin, rates, gradient_scale = 0.0, np.inf, [], 0.0
    loss = lambda u: 0.5 * u @ hessian @ u + bias @ u  # noqa: E731
    with np.errstate(over="ignore", invalid="ignore"):  # an unstable run overflows: inf, then NaN
        for t in range(T):
            if t == start:
                Z, Zm, Zv = np.zeros((n, m)), np.zeros((n, m)), np.zeros((n, m))
            g = hessian @ w + bias
            dg = hessian @ Z + coupling.T
            gradient_scale = max(gradient_scale, safe_norm(g))
            kind, lr = spec.kind, spec.learning_rate
            if kind in ("gd", "backtracking"):
                if kind == "backtracking":
                    value, norm2, scale = loss(w), g @ g, 1.0
                    for _ in range(spec.max_backtracks):
                        trial, threshold = loss(w - lr * scale * g), value - spec.c * lr * scale * norm2
                        if norm2 > (1e-8 * gradient_scale) ** 2:  # a step that still moves w
                            size = max(abs(value) + abs(trial) + lr * scale * norm2, 1e-300)
                            margin = min(margin, abs(threshold - trial) / size)
                        if trial <= threshold:
                            break
                        scale *= spec.tau
                    lr = lr * scale  # τ^max_backtracks when no trial is accepted, as far_ho2's search
                w, Z = w - lr * g, Z - lr * dg
            elif kind in ("momentum", "nesterov"):
                mu = spec.momentum
                mom, Zm = mu * mom + g, mu * Zm + dg
                if kind == "nesterov":
                    w, Z = w - lr * (g + mu * mom), Z - lr * (dg + mu * Zm)
                else:
                    w, Z = w - lr * mom, Z - lr * Zm
            elif kind == "adam":
                b1, b2, eps2 = spec.beta1, spec.beta2, spec.epsilon ** 2
                mom, Zm = b1 * mom + (1 - b1) * g, b1 * Zm + (1 - b1) * dg
                v, Zv = b2 * v + (1 - b2) * g * g, b2 * Zv + 2 * (1 - b2) * g[:, None] * dg
                b1p, b2p = b1p * b1, b2p * b2
                lr = spec.learning_rate * np.sqrt(1 - b2p) / (1 - b1p)
                root = np.sqrt(v + eps2)
                w = w - lr * mom / root
                Z = Z - lr * (Zm / root[:, None] - (mom / (2 * root ** 3))[:, None] * Zv)
            else:
                raise ValueError(f"unknown optimizer kind {kind!r}")
            rates.append(lr)
            if roundoff is not None:
                jitter = lambda v: v * (1 + np.finfo(np.float64).eps / 2 * roundoff.normal(size=np.shape(v)))  # noqa: E731
                w, Z, mom, v, Zm, Zv = (jitter(u) for u in (w, Z, mom, v, Zm, Zv))
            now = max(safe_norm(w - w_star) / w_scale, safe_norm(Z - Z_star) / Z_scale if t >= start else 0.0)
            growth = max(growth, now) if np.isfinite(now) else np.inf
    slots = {"gd": (), "backtracking": (), "momentum": (mom,), "nesterov": (mom,)}.get(spec.kind, (mom, v, b1p, b2p))
    return QuadraticUnroll(w, slots, Z, np.array(rates), float(growth), float(margin), gradient_scale)


class QuadraticHypergradient(NamedTuple):
    value: float  # f(x, w_T)
    hypergradient: np.ndarray  # ∇_x f + Z_Tᵀ ∇_w f at (x, w_T)
    scale: float  # ‖∇_x f‖ + ‖Z_T‖₂‖∇_w f‖: the size of the terms summed (for relative tolerances)
    run: QuadraticUnroll


def unrolled_quadratic_hypergradient(p: QuadraticBilevel, x: np.ndarray, w0: np.ndarray, T: int,
                                     spec: InnerOptimizerSpec, truncate: Optional[int] = None,
                                     roundoff: Optional[np.random.Generator] = None) -> QuadraticHypergradient:
    """The exact hypergradient of E = f(x, w_T(x)) for T steps of ``spec`` on the inner objective
    g of ``p`` from the constant w_0 (``truncate`` = K: w_{T−K} held constant): the target of
    ReverseHG, ``ReverseHG.truncated(K)`` and ForwardHG (``roundoff``: see ``unroll_quadratic``)."""
    run = unroll_quadratic(p.A, p.C, p.a, x, w0, T, spec, truncate, roundoff)
    value, gx, gw = quadratic_outer(p, x, run.w)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = safe_norm(gx) + safe_norm(run.tangent, 2) * safe_norm(gw)
        return QuadraticHypergradient(value, gx + run.tangent.T @ gw, float(scale), run)


def implicit_quadratic_hypergradient(p: QuadraticBilevel, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """(∇_x f − C A⁻¹ ∇_w f at (x, w), ‖C‖₂‖A⁻¹‖₂‖∇_w f‖): the implicit-function hypergradient at
    the inner iterate w (exact for any w, the Hessian A being constant), and the bound on its
    error per unit of relative residual of the linear system A q = ∇_w f."""
    _, gx, gw = quadratic_outer(p, x, w)
    sensitivity = safe_norm(p.C, 2) * safe_norm(np.linalg.inv(p.A), 2) * safe_norm(gw)
    return gx - p.C @ np.linalg.solve(p.A, gw), float(sensitivity)


def quadratic_hyperobjective(p: QuadraticBilevel, tangent: Optional[np.ndarray] = None,
                             offset: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(Q, c) with Φ(x) = f(x, z(x)) = ½xᵀQx + cᵀx + const, for z(x) = tangent·x + offset (an
    affine inner solution map: by default z*(x) = −A⁻¹(Cᵀx + a); for T steps of gradient
    descent or momentum, w_T(x) is affine too: tangent = Z_T, offset = w_T(0))."""
    if tangent is None:
        tangent, offset = -np.linalg.solve(p.A, p.C.T), -np.linalg.solve(p.A, p.a)
    P, r = tangent, offset
    Q = p.H + P.T @ p.F @ P + p.K @ P + P.T @ p.K.T
    c = P.T @ p.F @ r + p.K @ r + P.T @ p.f_v + p.h
    return (Q + Q.T) / 2, c


def projected_gradient_residual(Q: np.ndarray, c: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                                x: np.ndarray) -> float:
    """‖x − clip(x − (Qx + c), lo, hi)‖: zero exactly at the KKT points of min ½xᵀQx + cᵀx over
    the box [lo, hi]."""
    return safe_norm(x - np.clip(x - (Q @ x + c), lo, hi))


def box_minimizer(Q: np.ndarray, c: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The minimizer of the strictly convex ½xᵀQx + cᵀx over the box lo ≤ x ≤ hi (infinite bounds
    allowed), by enumerating the 3^m active sets (each coordinate free, at its lower or at its
    upper bound) and keeping the one that satisfies the KKT conditions: the free coordinates
    solve their linear system inside the box, and the gradient is ≥ 0 at lower bounds and ≤ 0
    at upper ones. Raises if none does (Q not positive definite)."""
    m = len(c)
    scale = 1.0 + np.abs(c).max() + np.abs(Q).max()
    best, best_residual = None, np.inf
    for assignment in np.ndindex(*(3,) * m):
        state = np.array(assignment)
        if np.any((state == 1) & ~np.isfinite(lo)) or np.any((state == 2) & ~np.isfinite(hi)):
            continue
        x = np.where(state == 1, lo, np.where(state == 2, hi, 0.0))
        free = state == 0
        if free.any():
            rhs = -(c[free] + Q[np.ix_(free, ~free)] @ x[~free])
            x[free] = np.linalg.solve(Q[np.ix_(free, free)], rhs)
        slack = 1e-10 * scale * (1 + np.abs(x).max())
        grad = Q @ x + c
        feasible = np.all(x >= lo - slack) and np.all(x <= hi + slack)
        signs = np.all(grad[state == 1] >= -slack) and np.all(grad[state == 2] <= slack)
        if feasible and signs:
            x = np.clip(x, lo, hi)
            residual = projected_gradient_residual(Q, c, lo, hi, x)
            if residual < best_residual:
                best, best_residual = x, residual
    if best is None or best_residual > 1e-8 * scale * (1 + np.abs(best).max()):
        raise ValueError(f"no KKT point found (best residual {best_residual:.3g}): is Q positive definite?")
    return best
