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
