"""Forward-mode hypergradient through the unrolled dynamics (FAR-HO's ``ForwardHG``), with
real-time (RTHO) and warm-restart online modes: ``forward_hypergradient`` and ``ForwardHG``."""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from far_ho2 import autodiff
from far_ho2 import inputs as inputs_lib
from far_ho2.batches import Batches
from far_ho2.hypergradients.base import HyperGradient
from far_ho2.inner_problem import InnerProblem
from far_ho2.inputs import InnerInputs
from far_ho2.trajectory import empty_trajectory, mark_unhealthy
from far_ho2.types import Problem, RunResult


class Component(NamedTuple):
    """One scalar component λ_j: ``hyper`` indexes the hyperparameter, ``tangent`` is the one-hot
    tangent of every hyperparameter (zeros except a 1 at the component)."""

    hyper: int
    index: tuple
    tangent: list


def components(hypers: Sequence[tf.Variable]) -> list[Component]:
    """The m scalar components of the hyperparameters, in order."""
    out = []
    for i, h in enumerate(hypers):
        for index in np.ndindex(*h.shape):
            one_hot = np.zeros(h.shape, h.dtype.as_numpy_dtype)
            one_hot[index] = 1
            tangent = [tf.zeros(g.shape, g.dtype) for g in hypers]
            tangent[i] = tf.constant(one_hot)
            out.append(Component(i, index, tangent))
    return out


def _jvps(accumulator: tf.autodiff.ForwardAccumulator, targets: Sequence[tf.Tensor],
          connected: list, j: int) -> list[tf.Tensor]:
    tangents = [accumulator.jvp(x) for x in targets]
    connected[j] = connected[j] or any(z is not None for z in tangents)
    return [tf.zeros_like(x) if z is None else z for x, z in zip(targets, tangents)]


class Tangents(NamedTuple):
    """What forward mode carries through a run besides the state: the scalar components λ_j,
    the tangents ∂x/∂λ_j of the hoisted inputs, and which components reached the state (filled
    at trace time: static)."""

    components: list  # Component per scalar component λ_j
    inputs: InnerInputs
    x_tangents: list  # per component, ∂x/∂λ_j of the hoisted inputs ([] when nothing is hoisted)
    connected: list  # per component


def prepare_tangents(problem: Problem, hypers: Sequence[tf.Variable], inner_batches: Batches) -> Tangents:
    """The components of ``hypers`` and the tangents of the inputs of a run on ``inner_batches``."""
    dirs = components(hypers)
    inputs = inputs_lib.prepare(problem, inner_batches, [])
    connected = [False] * len(dirs)
    x_tangents = []
    for j, d in enumerate(dirs):
        if inputs.hoisted:
            with tf.autodiff.ForwardAccumulator(list(hypers), d.tangent) as acc:
                x = inputs_lib.floating(problem.inputs(inner_batches.data))
            x_tangents.append(_jvps(acc, x, connected, j))
        else:
            x_tangents.append([])
    return Tangents(dirs, inputs, x_tangents, connected)


def start_tangents(problem: Any, tangents: Tangents, hypers: Sequence[tf.Variable]) -> tuple[NamedTuple, list]:
    """(s_0, Z_0):  s_0 = Φ₀(λ),  Z_0 = ∂Φ₀/∂λ_j per component."""
    z0, s0 = [], None
    for j, d in enumerate(tangents.components):
        with tf.autodiff.ForwardAccumulator(list(hypers), d.tangent) as acc:
            s0 = problem.initial_state()
        z0.append(_jvps(acc, tf.nest.flatten(s0), tangents.connected, j))
    return s0, z0


def forward_step(problem: Problem, tangents: Tangents, hypers: Sequence[tf.Variable], state: NamedTuple,
                 z: list, t: Any, step: Any) -> tuple[NamedTuple, list, tf.Tensor]:
    """(s_{t+1}, Z_{t+1}, L_t):  s_{t+1} = Φ_t(s_t, λ),  Z_{t+1} = A_t Z_t + B_t e_j (+ ∂Φ_t/∂x·∂x/∂λ_j),
    one forward-over-reverse JVP of the step per component."""
    problem.load(state.w)
    sources = problem.state_sources(state) + list(hypers) + tangents.inputs.sources
    scale = problem.search_scale(tangents.inputs.at(t), step)  # a line search runs outside the accumulators
    new_z, new, loss = [], None, None
    for j, d in enumerate(tangents.components):
        with tf.autodiff.ForwardAccumulator(sources, z[j] + d.tangent + tangents.x_tangents[j]) as acc:
            new, loss = problem.transition(state, tangents.inputs.at(t), step, rate_scale=scale, search=scale is None)
        new_z.append(_jvps(acc, tf.nest.flatten(new), tangents.connected, j))
    return new, new_z, loss


def contract(tangents: Tangents, hypers: Sequence[tf.Variable], outer: autodiff.OuterGradient, z: list) -> list:
    """∂_{λ_j} E = ∂E/∂λ_j + ⟨∂E/∂w, Z_w⟩ per component, gathered per hyperparameter (None where
    nothing depends on it)."""
    grads = [None if g is None else tf.convert_to_tensor(g) for g in outer.hypers]
    for j, d in enumerate(tangents.components):
        total = tf.add_n([tf.reduce_sum(a * zw) for a, zw in zip(outer.weights, z[j][:len(outer.weights)])])
        if tangents.connected[j]:
            base = grads[d.hyper] if grads[d.hyper] is not None else tf.zeros(hypers[d.hyper].shape, total.dtype)
            grads[d.hyper] = tf.tensor_scatter_nd_add(base, [list(d.index)], [total]) if d.index else base + total
    return grads


def forward_hypergradient(problem: InnerProblem, outer_objective: Callable,
                          hypers: Sequence[tf.Variable], *, steps: Any, inner_batches: Batches,
                          outer_batch: Any = None, initial_state: Any = None,
                          initial_tangents: Optional[list] = None, offset: Any = 0) -> RunResult:
    """Hypergradient of E(w_T(λ), λ) by forward mode: for every scalar component λ_j, the
    tangent Z_t = ds_t/dλ_j follows the dynamics,

        Z_0 = ∂Φ₀/∂λ_j,    Z_{t+1} = A_t Z_t + B_t e_j   (A_t = ∂Φ_t/∂s_t, B_t = ∂Φ_t/∂λ),
        ∂_{λ_j} E = ∂E/∂λ_j + ⟨∂E/∂s_T, Z_T⟩,

    one ``tf.autodiff.ForwardAccumulator`` per step and component (forward-over-reverse through
    the inner gradient). Cost: m = Σ_i size(λ_i) Jacobian-vector products per step and m
    tangents of the state in memory, O(m·|s|) and constant in T: use it for a few scalar
    hyperparameters (learning rate, momentum, a regulariser), reverse mode for many.

    ``problem``, ``outer_objective``, ``hypers``, ``steps``, ``inner_batches``, ``outer_batch``
    and ``offset`` are as in ``reverse_hypergradient``.

    Args:
        initial_state: s_0 when continuing a previous run (online); a constant.
        initial_tangents: Z_0 per component when continuing (RTHO); with ``initial_state`` and
            without it, Z_0 = 0 (warm restart).

    Returns:
        ``RunResult`` whose ``carry`` is Z_T (one list of state tangents per component).

    References:
        Franceschi, Donini, Frasconi, Pontil, ICML 2017, arXiv:1703.01785 (Forward-HG, RTHO).
        Williams & Zipser, 1989 (real-time recurrent learning).
    """
    hypers = list(hypers)
    steps = tf.convert_to_tensor(steps, tf.int32)
    tangents = prepare_tangents(problem, hypers, inner_batches)
    if initial_state is None:
        s0, z0 = start_tangents(problem, tangents, hypers)
    else:
        s0 = initial_state
        z0 = initial_tangents or [[tf.zeros_like(x) for x in tf.nest.flatten(s0)] for _ in tangents.components]

    def body(t, flat, z, losses, health):
        new, new_z, loss = forward_step(problem, tangents, hypers, tf.nest.pack_sequence_as(s0, flat), z, t,
                                        t + offset)
        new_flat = tf.nest.flatten(new)
        return t + 1, new_flat, new_z, losses.write(t, loss), mark_unhealthy(health, t, new_flat)

    trajectory = empty_trajectory(s0, steps)
    _, flat, z, losses, health = tf.while_loop(
        lambda t, *_: t < steps, body,
        (tf.constant(0), tf.nest.flatten(s0), z0, trajectory.losses, trajectory.health))
    final = tf.nest.pack_sequence_as(s0, flat)
    problem.load(final.w)
    outer = autodiff.outer_gradient(problem, outer_objective, outer_batch, hypers)
    return RunResult(outer.value, contract(tangents, hypers, outer, z), final, losses.stack(), health, carry=z)


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

    def _settings(self) -> dict:
        return {}

    def hypergradient(self, problem, outer_objective, hypers, *, steps, inner_batches, outer_batch=None,
                      previous=None, online=False, offset=0, options=None) -> RunResult:
        return forward_hypergradient(
            problem, outer_objective, hypers, steps=steps, inner_batches=inner_batches,
            outer_batch=outer_batch, initial_state=previous.state if previous else None,
            initial_tangents=previous.carry if previous and online is True else None, offset=offset)
