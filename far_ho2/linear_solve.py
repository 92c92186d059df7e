"""Matrix-free solvers of the linear systems of implicit differentiation, on lists of tensors.

Every solver takes the operator as a function (a Hessian-vector product, or the transposed
Jacobian of the dynamics), runs in a ``tf.while_loop`` (so it compiles), stops when the relative
residual ‖b − Mx‖/‖b‖ falls to ``tol`` or after ``max_iter`` iterations, and reports both.
"""

from typing import Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

Tensors = list[tf.Tensor]


class SolveResult(NamedTuple):
    x: Tensors  # the solution
    residual: tf.Tensor  # relative residual ‖b − Mx‖ / ‖b‖ (‖x − (Aᵀx + b)‖ / ‖b‖ for fixed point)
    iterations: tf.Tensor  # iterations run
    curvature: tf.Tensor = None  # CG: [min, max] of pᵀMp/pᵀp over its search directions p


def _dot(a: Sequence[tf.Tensor], b: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])


def _axpy(alpha: tf.Tensor, x: Sequence[tf.Tensor], y: Sequence[tf.Tensor]) -> Tensors:
    return [alpha * a + b for a, b in zip(x, y)]


def _norm(a: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.sqrt(_dot(a, a))


def _safe_divide(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return tf.math.divide_no_nan(a, b)


def solve_cg(matvec: Callable[[Tensors], Tensors], b: Tensors, x0: Optional[Tensors] = None, *,
             max_iter: int = 100, tol: float = 1e-10) -> SolveResult:
    """Conjugate gradient for M x = b with M symmetric positive definite (Hestenes & Stiefel):

        r_0 = b − M x_0,  p_0 = r_0;   α_k = r_kᵀr_k / p_kᵀMp_k,  x_{k+1} = x_k + α_k p_k,
        r_{k+1} = r_k − α_k M p_k,     p_{k+1} = r_{k+1} + (r_{k+1}ᵀr_{k+1} / r_kᵀr_k) p_k.

    Exact in at most dim(x) iterations in exact arithmetic; one matvec per iteration.
    ``x0`` is a warm start (HOAG reuses the previous solution). The Rayleigh quotients pᵀMp/pᵀp
    of the search directions lie in M's spectrum: their range is reported, and a minimum near 0
    (or below) says M is singular or indefinite.
    """
    x = [tf.zeros_like(v) for v in b] if x0 is None else list(x0)
    r = [bi - mi for bi, mi in zip(b, matvec(x))]
    b_norm = _norm(b)
    tol = tf.cast(tol, b_norm.dtype)
    rr = _dot(r, r)

    def body(k, x, r, p, rr, curvature):
        mp = matvec(p)
        pmp = _dot(p, mp)
        quotient = _safe_divide(pmp, _dot(p, p))
        curvature = tf.stack([tf.minimum(curvature[0], quotient), tf.maximum(curvature[1], quotient)])
        alpha = _safe_divide(rr, pmp)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, mp, r)
        rr_new = _dot(r, r)
        p = _axpy(_safe_divide(rr_new, rr), p, r)
        return k + 1, x, r, p, rr_new, curvature

    inf = tf.constant(float("inf"), b_norm.dtype)
    k, x, r, _, rr, curvature = tf.while_loop(
        lambda k, x, r, p, rr, curvature: (k < max_iter) & (tf.sqrt(rr) > tol * b_norm), body,
        (tf.constant(0), x, r, list(r), rr, tf.stack([inf, -inf])))
    return SolveResult(x, _safe_divide(tf.sqrt(rr), b_norm), k, curvature)


def solve_neumann(matvec: Callable[[Tensors], Tensors], b: Tensors, *, alpha: tf.Tensor,
                  max_iter: int = 100, tol: float = 0.0) -> SolveResult:
    """Truncated Neumann series for M x = b (Lorraine, Vicol & Duvenaud, AISTATS 2020):

        x_K = α Σ_{j=0}^{K−1} (I − αM)^j b,   whose residual b − M x_K = (I − αM)^K b

    converges when 0 < α < 2/‖M‖; the residual costs nothing (it is the next term).
    """
    alpha = tf.cast(alpha, b[0].dtype)
    b_norm = _norm(b)
    tol = tf.cast(tol, b_norm.dtype)

    def body(k, term, total):
        total = [t + v for t, v in zip(total, term)]
        term = [v - alpha * mv for v, mv in zip(term, matvec(term))]
        return k + 1, term, total

    k, term, total = tf.while_loop(
        lambda k, term, total: (k < max_iter) & (_norm(term) > tol * b_norm), body,
        (tf.constant(0), list(b), [tf.zeros_like(v) for v in b]))
    return SolveResult([alpha * t for t in total], _safe_divide(_norm(term), b_norm), k)


def solve_fixed_point(transpose_jacobian: Callable[[Tensors], Tensors], b: Tensors,
                      x0: Optional[Tensors] = None, *, max_iter: int = 100,
                      tol: float = 1e-10) -> SolveResult:
    """Fixed-point iteration for x = Aᵀx + b, i.e. (I − Aᵀ) x = b (Grazzi et al., ICML 2020),

        x_{k+1} = Aᵀ x_k + b,

    with A = ∂Φ/∂s the Jacobian of the inner dynamics at its fixed point; converges linearly
    when Φ is a contraction (spectral radius of A below 1). One vector-Jacobian product of Φ
    per iteration; the residual ‖x_{k+1} − x_k‖ comes for free.
    """
    x = [tf.zeros_like(v) for v in b] if x0 is None else list(x0)
    b_norm = _norm(b)
    tol = tf.cast(tol, b_norm.dtype)

    def body(k, x, _):
        new = [a + bi for a, bi in zip(transpose_jacobian(x), b)]
        return k + 1, new, _norm([n - o for n, o in zip(new, x)])

    k, x, step = tf.while_loop(
        lambda k, x, step: (k < max_iter) & (step > tol * b_norm), body,
        (tf.constant(0), x, tf.constant(float("inf"), b_norm.dtype)))
    return SolveResult(x, _safe_divide(step, b_norm), k)
