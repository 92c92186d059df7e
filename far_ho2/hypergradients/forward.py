"""Forward-mode hypergradient through the unrolled dynamics (FAR-HO's ``ForwardHG``), with
real-time (RTHO) and warm-restart online modes: ``forward_hypergradient`` and ``ForwardHG``."""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from far_ho2 import autodiff
from far_ho2.batches import Batches
from far_ho2.hypergradients.base import HyperGrad, HyperGradient
from far_ho2.inner_problem import InnerProblem
from far_ho2.unroll import empty_trajectory, mark_nonfinite


class Direction(NamedTuple):
    """One scalar component λ_j: ``hyper`` indexes the hyperparameter, ``tangent`` is the one-hot
    tangent of every hyperparameter (zeros except a 1 at the component)."""

    hyper: int
    index: tuple
    tangent: list


def directions(hypers: Sequence[tf.Variable]) -> list[Direction]:
    """The m scalar components of the hyperparameters, in order."""
    out = []
    for i, h in enumerate(hypers):
        for index in np.ndindex(*h.shape):
            one_hot = np.zeros(h.shape, h.dtype.as_numpy_dtype)
            one_hot[index] = 1
            tangent = [tf.zeros(g.shape, g.dtype) for g in hypers]
            tangent[i] = tf.constant(one_hot)
            out.append(Direction(i, index, tangent))
    return out


def _jvps(accumulator: tf.autodiff.ForwardAccumulator, targets: Sequence[tf.Tensor],
          connected: list, j: int) -> list[tf.Tensor]:
    tangents = [accumulator.jvp(x) for x in targets]
    connected[j] = connected[j] or any(z is not None for z in tangents)
    return [tf.zeros_like(x) if z is None else z for x, z in zip(targets, tangents)]


def forward_hypergradient(problem: InnerProblem, outer_objective: Callable,
                          hypers: Sequence[tf.Variable], *, steps: Any, inner_batches: Batches,
                          outer_batch: Any = None, initial_state: Any = None,
                          initial_tangents: Optional[list] = None, offset: Any = 0) -> HyperGrad:
    """Hypergradient of E(w_T(λ), λ) by forward mode: for every scalar component λ_j, the
    tangent Z_t = ds_t/dλ_j follows the dynamics,

        Z_0 = ∂Φ₀/∂λ_j,    Z_{t+1} = A_t Z_t + B_t e_j   (A_t = ∂Φ_t/∂s_t, B_t = ∂Φ_t/∂λ),
        ∂_{λ_j} E = ∂E/∂λ_j + ⟨∂E/∂s_T, Z_T⟩,

    one ``tf.autodiff.ForwardAccumulator`` per step and component (forward-over-reverse through
    the inner gradient). Cost: m = Σ_i size(λ_i) Jacobian-vector products per step and m
    tangents of the state in memory, O(m·|s|) and constant in T: use it for a few scalar
    hyperparameters (learning rate, momentum, a regulariser), reverse mode for many.

    Args:
        problem, outer_objective, hypers, steps, inner_batches, outer_batch, offset: as
            ``reverse_hypergradient``.
        initial_state: s_0 when continuing a previous run (online); a constant.
        initial_tangents: Z_0 per component when continuing (RTHO); with ``initial_state`` and
            without it, Z_0 = 0 (warm restart).

    Returns:
        ``HyperGrad`` whose ``carry`` is Z_T (one list of state tangents per component).

    References:
        Franceschi, Donini, Frasconi, Pontil, ICML 2017, arXiv:1703.01785 (Forward-HG, RTHO).
        Williams & Zipser, 1989 (real-time recurrent learning).
    """
    hypers = list(hypers)
    dirs = directions(hypers)
    connected = [False] * len(dirs)
    steps = tf.convert_to_tensor(steps, tf.int32)
    hoisted = problem.features is not None and not inner_batches.per_step
    fixed_inputs = problem.inputs(inner_batches.data) if hoisted else None
    x_sources = autodiff.floating(fixed_inputs) if hoisted else []
    x_tangents = []  # dx/dλ_j of hoisted features, per component
    for j, d in enumerate(dirs):
        if hoisted:
            with tf.autodiff.ForwardAccumulator(hypers, d.tangent) as acc:
                x = autodiff.floating(problem.inputs(inner_batches.data))
            x_tangents.append(_jvps(acc, x, connected, j))

    if initial_state is None:
        z0, flat_s = [], None
        for j, d in enumerate(dirs):
            with tf.autodiff.ForwardAccumulator(hypers, d.tangent) as acc:
                s0 = problem.initial_state()
            flat_s = tf.nest.flatten(s0)
            z0.append(_jvps(acc, flat_s, connected, j))
    else:
        s0, flat_s = initial_state, tf.nest.flatten(initial_state)
        z0 = initial_tangents or [[tf.zeros_like(x) for x in flat_s] for _ in dirs]

    def inputs_at(t):
        return fixed_inputs if hoisted else problem.inputs(inner_batches.at(t))

    def body(t, flat, z, losses, first_bad):
        s = tf.nest.pack_sequence_as(s0, flat)
        problem.load(s.w)
        sources = problem.state_sources(s) + hypers + x_sources
        new_z = []
        for j, d in enumerate(dirs):
            x_tangent = x_tangents[j] if hoisted else []
            with tf.autodiff.ForwardAccumulator(sources, z[j] + d.tangent + x_tangent) as acc:
                new, loss = problem.transition(s, inputs_at(t), t + offset)
            new_z.append(_jvps(acc, tf.nest.flatten(new), connected, j))
        new_flat = tf.nest.flatten(new)
        return t + 1, new_flat, new_z, losses.write(t, loss), mark_nonfinite(first_bad, t, new_flat)

    trajectory = empty_trajectory(s0, steps)
    _, flat, z, losses, first_bad = tf.while_loop(
        lambda t, *_: t < steps, body,
        (tf.constant(0), flat_s, z0, trajectory.losses, trajectory.first_nonfinite))
    final = tf.nest.pack_sequence_as(s0, flat)
    problem.load(final.w)
    outer = autodiff.outer_gradient(problem, outer_objective, outer_batch, hypers)
    grads = [None if g is None else tf.convert_to_tensor(g) for g in outer.hypers]
    for j, d in enumerate(dirs):
        total = tf.add_n([tf.reduce_sum(a * zw) for a, zw in zip(outer.weights, z[j][:len(outer.weights)])])
        if connected[j]:
            base = grads[d.hyper] if grads[d.hyper] is not None else tf.zeros(hypers[d.hyper].shape, total.dtype)
            grads[d.hyper] = tf.tensor_scatter_nd_add(base, [list(d.index)], [total]) if d.index else base + total
    return HyperGrad(outer.value, grads, final, losses.stack(), first_bad, carry=z)


class ForwardHG(HyperGradient):
    """Forward-mode hypergradient (FAR-HO's ``ForwardHG``).

    Works with scalar hyperparameters (``get_hyperparameter(..., scalar=True)`` components, as
    FAR-HO required) and with small vector ones: its cost grows linearly with the number of
    scalar components m (m JVPs per inner step, m state tangents in memory), not with T.

    ``run(T, ..., online=True)`` is real-time hyperparameter optimization (RTHO): the inner
    state and the tangents Z carry over from the previous run, so the hyperparameters are
    updated every T steps of one long inner run. ``online='wr'`` (warm restart) carries the
    state over but resets Z to 0.
    """

    online_modes = (True, "wr")

    def __init__(self, name: str = "ForwardHG"):
        super().__init__(name)

    def _hypergradient(self, problem, outer_objective, hypers, *, steps, inner_batches, outer_batch,
                       previous, online, offset, options) -> HyperGrad:
        return forward_hypergradient(
            problem, outer_objective, hypers, steps=steps, inner_batches=inner_batches,
            outer_batch=outer_batch, initial_state=previous.state if previous else None,
            initial_tangents=previous.carry if previous and online is True else None, offset=offset)
