"""Trajectories of the inner dynamics  s_{t+1} = Φ(s_t, λ): ``run_steps`` runs steps inside a
``tf.while_loop`` (compiled, one trace for any number of steps), optionally storing the states
(Algorithm 1 stores s_0 … s_T, one state per step, never the activations), recording L_t and,
for the guard (``far_ho2.guard``), the first step at which each state component stops being
finite or, for the weights, grows beyond the guard's bound ``Health``)."""

from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf

from far_ho2 import guard
from far_ho2.types import Health, Objective, Problem


class Trajectory(NamedTuple):
    final: NamedTuple  # s_stop
    stored: list  # per flat state component, a TensorArray of s_start … s_stop (or [])
    losses: tf.TensorArray  # L_t(w_t) for every step run so far
    health: Health  # per flat state component: the first step t whose s_{t+1} is unhealthy


INITIAL = -2  # ``Health.first_bad`` of a component already non-finite in s_0


def empty_trajectory(state: NamedTuple, steps: tf.Tensor) -> Trajectory:
    """The bookkeeping of a run of ``steps`` steps from s_0 = ``state`` that has not started:
    components of s_0 that are not finite are marked ``INITIAL``; the weights' growth bound is
    G·max(‖w_0‖∞, 1) (G = ``guard.current_limit()``), the other components' ∞."""
    flat = tf.nest.flatten(state)
    finite = tf.stack([guard.all_finite(x) for x in flat])
    n_weights = len(state.w)
    limit = guard.current_limit()
    bounds = tf.stack([guard.bound(x, limit) if i < n_weights else tf.constant(np.inf, tf.float64)
                       for i, x in enumerate(flat)])
    health = Health(tf.where(finite, tf.constant(-1, tf.int32), tf.constant(INITIAL, tf.int32)),
                    tf.zeros([len(flat)], tf.bool), bounds)
    return Trajectory(state, [], tf.TensorArray(flat[0].dtype, size=steps), health)


def all_healthy(health: Health) -> tf.Tensor:
    """Whether no state component of a run became (or started) non-finite or grew too much."""
    return tf.reduce_all(tf.equal(health.first_bad, -1))


def store(state: NamedTuple, size: tf.Tensor) -> list:
    """TensorArrays for ``size`` states, with ``state`` written at index 0."""
    return [tf.TensorArray(x.dtype, size=size, element_shape=x.shape).write(0, x)
            for x in tf.nest.flatten(state)]


def stored_state(trajectory: Trajectory, index: Any) -> NamedTuple:
    """The state at ``index`` of the stored arrays."""
    return tf.nest.pack_sequence_as(trajectory.final, [ta.read(index) for ta in trajectory.stored])


def mark_unhealthy(health: Health, t: Any, new_flat: list) -> Health:
    """``health`` with step t recorded for the components of s_{t+1} that are first NaN/Inf, or
    beyond their growth bound, now."""
    finite = tf.stack([guard.all_finite(x) for x in new_flat])
    within = tf.stack([guard.max_abs(x) for x in new_flat]) <= health.bound
    first = tf.equal(health.first_bad, -1) & ~(finite & within)
    return Health(tf.where(first, tf.cast(t, tf.int32), health.first_bad),
                  tf.where(first, finite, health.grew), health.bound)


def run_steps(problem: Problem, trajectory: Trajectory, inputs_at: Callable[[tf.Tensor], Any],
              start: Any, stop: Any, offset: Any = 0, keep: bool = False,
              objective: Optional[Objective] = None, rate_scale: Optional[tf.Tensor] = None) -> Trajectory:
    """Runs steps t = start … stop−1 from ``trajectory.final`` in a ``tf.while_loop``; with
    ``keep``, s_{t+1} is written to ``trajectory.stored`` at index t + 1 − start (index 0 holds
    s_start, see ``store``). ``objective`` replaces L_t in the transition and ``rate_scale``
    multiplies its learning rate (see ``InnerProblem.transition``); ``offset`` is added to t for
    the optimizer's schedules."""
    start = tf.convert_to_tensor(start, tf.int32)
    stop = tf.convert_to_tensor(stop, tf.int32)

    def body(t, flat, stored, losses, health):
        s = tf.nest.pack_sequence_as(trajectory.final, flat)
        problem.load(s.w)
        new, loss = problem.transition(s, inputs_at(t), t + offset, objective, rate_scale)
        new_flat = tf.nest.flatten(new)
        health = mark_unhealthy(health, t, new_flat)
        if keep:
            stored = [ta.write(t + 1 - start, x) for ta, x in zip(stored, new_flat)]
        return t + 1, new_flat, stored, losses.write(t, loss), health

    flat = tf.nest.flatten(trajectory.final)
    _, flat, stored, losses, health = tf.while_loop(
        lambda t, *_: t < stop, body,
        (start, flat, list(trajectory.stored), trajectory.losses, trajectory.health))
    final = tf.nest.pack_sequence_as(trajectory.final, flat)
    problem.load(final.w)
    return Trajectory(final, stored, losses, health)


GROWTH_ADVICE = ("lower the inner learning rate (or bound the hyperparameters that steepen the inner "
                 "problem), or raise `growth_limit` if such values are legitimate")
NONFINITE_ADVICE = "lower the inner learning rate or check the inner objective"


def divergence(problem: Problem, final_state: NamedTuple, health: Health, offset: int = 0,
               where: str = "", advice: Optional[str] = None) -> Optional[str]:
    """What went wrong in a run, in words (None if nothing): the first step and state component
    that became NaN/Inf or grew beyond its bound, or the component of s_0 that already was;
    then ``advice`` (or the default advice for growth / NaN)."""
    bad = health.first_bad.numpy()
    names = problem.state_names(final_state)
    if (bad == INITIAL).any():
        name = names[int(np.argmax(bad == INITIAL))]
        return (f"the initial state of the inner problem{where} is not finite ({name} holds NaN/Inf "
                f"before the first step): the inner variables or `init_dynamics_dict` hold non-finite "
                f"values (left by another computation?). Assign finite values (e.g. far.reinitialize(model))")
    if not (bad >= 0).any():
        return None
    i = int(np.argmin(np.where(bad >= 0, bad, np.iinfo(np.int32).max)))
    step = offset + int(bad[i])
    if health.grew.numpy()[i]:
        largest = float(health.bound.numpy()[i])
        return (f"the inner dynamics{where} diverged: {names[i]} grew beyond the guard's bound "
                f"{largest:.3g} (growth_limit × max(‖w_0‖∞, 1)) at inner step {step}: {advice or GROWTH_ADVICE}")
    return (f"the inner dynamics{where} diverged: {names[i]} became NaN/Inf at inner step {step}: "
            f"{advice or NONFINITE_ADVICE}")


def raise_if_diverged(problem: Problem, final_state: NamedTuple, health: Health, offset: int = 0,
                      where: str = "") -> None:
    """A ``guard.DivergenceError`` saying what ``divergence`` found, if anything."""
    message = divergence(problem, final_state, health, offset, where)
    if message is not None:
        raise guard.DivergenceError(f"{message[0].upper()}{message[1:]}; the inner variables keep their values.")
