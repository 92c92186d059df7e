"""Running the inner dynamics  s_{t+1} = Φ(s_t, λ)  inside a compiled ``tf.while_loop``,
optionally storing the states (Algorithm 1 stores s_0 … s_T, one state per step, never the
activations), recording L_t and the first step at which each state component stops being finite."""

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    from far_ho2.inner_problem import InnerProblem


class Trajectory(NamedTuple):
    final: NamedTuple  # s_stop
    stored: list  # per flat state component, a TensorArray of s_start … s_stop (or [])
    losses: tf.TensorArray  # L_t(w_t) for every step run so far
    first_nonfinite: tf.Tensor  # per flat state component: first step t whose s_{t+1} is non-finite, −1


def empty_trajectory(state: NamedTuple, steps: tf.Tensor) -> Trajectory:
    """The bookkeeping of a run of ``steps`` steps that has not started."""
    n = len(tf.nest.flatten(state))
    return Trajectory(state, [], tf.TensorArray(tf.nest.flatten(state)[0].dtype, size=steps),
                      tf.fill([n], tf.constant(-1, tf.int32)))


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
    return tf.where((first_bad < 0) & ~finite, tf.cast(t, tf.int32), first_bad)


def unroll(problem: "InnerProblem", trajectory: Trajectory, inputs_at: Callable[[tf.Tensor], Any],
           start: Any, stop: Any, offset: Any = 0, keep: bool = False) -> Trajectory:
    """Runs steps t = start … stop−1 from ``trajectory.final``; with ``keep``, s_{t+1} is written
    to ``trajectory.stored`` at index t + 1 − start (index 0 holds s_start, see ``store``)."""
    start = tf.convert_to_tensor(start, tf.int32)
    stop = tf.convert_to_tensor(stop, tf.int32)

    def body(t, flat, stored, losses, first_bad):
        s = tf.nest.pack_sequence_as(trajectory.final, flat)
        problem.load(s.w)
        new, loss = problem.transition(s, inputs_at(t), t + offset)
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


def raise_if_diverged(problem: "InnerProblem", final_state: NamedTuple, first_nonfinite: tf.Tensor,
                      offset: int = 0, where: str = "") -> None:
    """A ``FloatingPointError`` naming the first step and state component that became NaN/Inf."""
    bad = first_nonfinite.numpy()
    if (bad >= 0).any():
        i = int(np.argmin(np.where(bad >= 0, bad, np.iinfo(np.int32).max)))
        raise FloatingPointError(
            f"The inner dynamics{where} diverged: the state became NaN/Inf at inner step "
            f"{offset + bad[i]} ({problem.state_names(final_state)[i]}). Lower the inner learning "
            f"rate or check the inner objective; the hyperparameters were not updated.")
