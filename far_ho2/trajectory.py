"""Trajectories of the inner dynamics  s_{t+1} = Φ(s_t, λ): ``run_steps`` runs steps inside a
``tf.while_loop`` (compiled, one trace for any number of steps), optionally storing the states
(Algorithm 1 stores s_0 … s_T, one state per step, never the activations), recording L_t and the
first step at which each state component stops being finite."""

from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf

from far_ho2.types import Direction, Problem


class Trajectory(NamedTuple):
    final: NamedTuple  # s_stop
    stored: list  # per flat state component, a TensorArray of s_start … s_stop (or [])
    losses: tf.TensorArray  # L_t(w_t) for every step run so far
    first_nonfinite: tf.Tensor  # per flat state component: first step t whose s_{t+1} is non-finite, −1


INITIAL = -2  # ``first_nonfinite`` of a component already non-finite in s_0


def empty_trajectory(state: NamedTuple, steps: tf.Tensor) -> Trajectory:
    """The bookkeeping of a run of ``steps`` steps from s_0 = ``state`` that has not started;
    components of s_0 that are not finite are marked ``INITIAL``."""
    flat = tf.nest.flatten(state)
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(x)) for x in flat])
    return Trajectory(state, [], tf.TensorArray(flat[0].dtype, size=steps),
                      tf.where(finite, tf.constant(-1, tf.int32), tf.constant(INITIAL, tf.int32)))


def all_finite(first_nonfinite: tf.Tensor) -> tf.Tensor:
    """Whether no state component of a run became (or started) non-finite."""
    return tf.reduce_all(tf.equal(first_nonfinite, -1))


def store(state: NamedTuple, size: tf.Tensor) -> list:
    """TensorArrays for ``size`` states, with ``state`` written at index 0."""
    return [tf.TensorArray(x.dtype, size=size, element_shape=x.shape).write(0, x)
            for x in tf.nest.flatten(state)]


def stored_state(trajectory: Trajectory, index: Any) -> NamedTuple:
    """The state at ``index`` of the stored arrays."""
    return tf.nest.pack_sequence_as(trajectory.final, [ta.read(index) for ta in trajectory.stored])


def mark_nonfinite(first_bad: tf.Tensor, t: Any, new_flat: list) -> tf.Tensor:
    """``first_bad`` with step t recorded for the components of s_{t+1} that are NaN/Inf first now."""
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(x)) for x in new_flat])
    return tf.where(tf.equal(first_bad, -1) & ~finite, tf.cast(t, tf.int32), first_bad)


def run_steps(problem: Problem, trajectory: Trajectory, inputs_at: Callable[[tf.Tensor], Any],
              start: Any, stop: Any, offset: Any = 0, keep: bool = False,
              direction: Optional[Direction] = None, rate_scale: Optional[tf.Tensor] = None) -> Trajectory:
    """Runs steps t = start … stop−1 from ``trajectory.final`` in a ``tf.while_loop``; with
    ``keep``, s_{t+1} is written to ``trajectory.stored`` at index t + 1 − start (index 0 holds
    s_start, see ``store``). ``direction`` replaces ∇_w L_t in the transition and ``rate_scale``
    multiplies its learning rate (see ``InnerProblem.transition``); ``offset`` is added to t for
    the optimizer's schedules."""
    start = tf.convert_to_tensor(start, tf.int32)
    stop = tf.convert_to_tensor(stop, tf.int32)

    def body(t, flat, stored, losses, first_bad):
        s = tf.nest.pack_sequence_as(trajectory.final, flat)
        problem.load(s.w)
        new, loss = problem.transition(s, inputs_at(t), t + offset, direction, rate_scale)
        new_flat = tf.nest.flatten(new)
        first_bad = mark_nonfinite(first_bad, t, new_flat)
        if keep:
            stored = [ta.write(t + 1 - start, x) for ta, x in zip(stored, new_flat)]
        return t + 1, new_flat, stored, losses.write(t, loss), first_bad

    flat = tf.nest.flatten(trajectory.final)
    _, flat, stored, losses, first_bad = tf.while_loop(
        lambda t, *_: t < stop, body,
        (start, flat, list(trajectory.stored), trajectory.losses, trajectory.first_nonfinite))
    final = tf.nest.pack_sequence_as(trajectory.final, flat)
    problem.load(final.w)
    return Trajectory(final, stored, losses, first_bad)


def raise_if_diverged(problem: Problem, final_state: NamedTuple, first_nonfinite: tf.Tensor,
                      offset: int = 0, where: str = "", method: str = "") -> None:
    """A ``FloatingPointError`` naming the first step and state component that became NaN/Inf
    (or the component of s_0 that already was)."""
    bad = first_nonfinite.numpy()
    names = problem.state_names(final_state)
    if (bad == INITIAL).any():
        name = names[int(np.argmax(bad == INITIAL))]
        raise FloatingPointError(
            f"{method}The initial state of the inner problem{where} is not finite ({name} holds "
            f"NaN/Inf before the first step): the inner variables or `init_dynamics_dict` hold "
            f"non-finite values (left by another computation?). Assign finite values (e.g. "
            f"far.reinitialize(model)); the hyperparameters were not updated.")
    if (bad >= 0).any():
        i = int(np.argmin(np.where(bad >= 0, bad, np.iinfo(np.int32).max)))
        raise FloatingPointError(
            f"{method}The inner dynamics{where} diverged: the state became NaN/Inf at inner step "
            f"{offset + bad[i]} ({names[i]}). Lower the inner learning rate or check the inner "
            f"objective; the hyperparameters and the inner variables were not updated.")
