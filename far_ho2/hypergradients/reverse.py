"""Reverse-mode hypergradient through the unrolled dynamics (Algorithm 1 of Franceschi et al.,
ICML 2018): ``reverse_hypergradient`` and its FAR-HO façade ``ReverseHG`` (with ``.truncated``)."""

from collections import deque
from typing import Any, Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

from far_ho2 import autodiff
from far_ho2 import inputs as inputs_lib
from far_ho2.batches import Batches
from far_ho2.hypergradients.base import HyperGradient
from far_ho2.inner_problem import InnerProblem
from far_ho2.registry import Setting
from far_ho2.trajectory import Trajectory, empty_trajectory, mark_unhealthy, run_steps, store, stored_state
from far_ho2.types import Health, RunResult


UNROLL = 16  # ReverseHG unrolls runs of at most this many steps


class _Forward(NamedTuple):
    """A forward pass, and how to run the matching reverse pass."""

    final: NamedTuple  # s_T
    losses: tf.Tensor  # L_t(w_t), t = 0 … T−1
    health: Health  # per state component, the first step making it non-finite or too large
    backward: Callable  # (α_T, Σ∂/∂λ, Σ∂/∂x) -> (α_{T−K}, Σ∂/∂λ, Σ∂/∂x) through the last K steps
    reached_start: tf.Tensor  # 1 if K = T (α_0 reaches Φ₀), else 0


def reverse_hypergradient(problem: InnerProblem, outer_objective: Callable,
                          hypers: Sequence[tf.Variable], *, steps: Any, inner_batches: Batches,
                          outer_batch: Any = None, truncate: Optional[int] = None,
                          checkpoint_every: Optional[int] = None, unrolled: bool = False,
                          initial_state: Any = None, offset: Any = 0) -> RunResult:
    """Hypergradient of E(w_T(λ), λ) by reverse mode through T steps of  s_{t+1} = Φ_t(s_t, λ):

        α_T = ∂E/∂s_T,     α_t = α_{t+1}ᵀ ∂Φ_t/∂s_t,
        ∇_λ = ∂E/∂λ + Σ_{t=T−K}^{T−1} α_{t+1}ᵀ ∂Φ_t/∂λ  (+ α_0ᵀ ∂Φ₀/∂λ when K = T)

    A compiled loop stores the states s_{T−K} … s_T (one state per step, not the activations) and
    the reverse loop loads each s_t back and differentiates one step again, replaying its batch:
    memory O(K·|s|), time about three forward passes, a trace time independent of T. With
    ``checkpoint_every`` = k it stores one state every k steps and recomputes each segment from
    its checkpoint: memory O((K/k + k)·|s|) (least at k ≈ √K) for one more forward pass. With
    ``unrolled`` (``steps`` a Python int, no ``checkpoint_every``), the T steps are unrolled into
    the graph and each step's tape is kept for the reverse pass, as one tape through the loop
    would: no step is recomputed, for the memory of K steps' activations and a trace time that
    grows with T (``ReverseHG`` does this for short runs).

    Args:
        problem: the inner problem (its variables, objective, dynamics Φ and Φ₀).
        outer_objective: E, reading the inner variables (and maybe λ directly).
        hypers: the hyperparameter variables λ.
        steps: T, an int32 tensor or a Python int (a Python int gives the stored trajectory a
            static size, as XLA needs).
        inner_batches: the batches of the T steps.
        outer_batch: the batch of E.
        truncate: K; back-propagate through the last K steps only (Shaban et al., 2019,
            arXiv:1810.10667). Defaults to `None` (K = T).
        checkpoint_every: k; store every k-th state and recompute the others. Defaults to `None`
            (store them all).
        unrolled: unroll the steps into the graph (``steps`` a Python int, no
            ``checkpoint_every``). Defaults to `False`.
        initial_state: s_0 when it does not come from Φ₀ (an online run continuing a previous
            one); it is then a constant.
        offset: the index of the first step in the stream of steps (online runs), given to
            schedules.

    Returns:
        ``RunResult``; ``grads[i]`` is ``None`` when nothing depends on ``hypers[i]``.

    References:
        Franceschi, Frasconi, Salzo, Grazzi, Pontil, ICML 2018, arXiv:1806.04910.
        Franceschi, Donini, Frasconi, Pontil, ICML 2017, arXiv:1703.01785.
    """
    hypers = list(hypers)
    connected = [False] * len(hypers)
    with tf.GradientTape(watch_accessed_variables=False) as init_tape:
        init_tape.watch(hypers)
        s0 = problem.initial_state() if initial_state is None else initial_state
    inputs = inputs_lib.prepare(problem, inner_batches, hypers)
    x_sources, inputs_at = inputs.sources, inputs.at

    x_connected = [False] * len(x_sources)

    def accumulate(vjp: autodiff.TransitionVJP, total: list, total_x: list) -> tuple:
        return (tf.nest.flatten(vjp.state), autodiff.accumulate(total, vjp.hypers, connected),
                autodiff.accumulate(total_x, vjp.extra, x_connected))

    if unrolled and (not isinstance(steps, int) or checkpoint_every is not None):
        raise ValueError("`unrolled` needs `steps` a Python int and no `checkpoint_every`.")
    with tf.name_scope("inner_run"):  # the scopes name the parts in TensorFlow's profiler
        if unrolled:
            forward = _taped_forward(problem, s0, inputs_at, steps, truncate, offset, hypers, x_sources, accumulate)
        else:
            forward = _stored_forward(problem, s0, inputs_at, steps, truncate, checkpoint_every, offset, hypers,
                                      x_sources, accumulate)
    problem.load(forward.final.w)
    with tf.name_scope("outer"):
        outer = autodiff.outer_gradient(problem, outer_objective, outer_batch, hypers)
    alpha = autodiff.state_cotangent(forward.final, outer.weights)
    total = autodiff.accumulate(autodiff.zeros_for_none([None] * len(hypers), hypers),
                                outer.hypers, connected)
    with tf.name_scope("reverse_pass"):
        alpha_flat, total, total_x = forward.backward(tf.nest.flatten(alpha), total,
                                                      [tf.zeros_like(x) for x in x_sources])
    cotangents = [a * tf.cast(forward.reached_start, a.dtype) for a in alpha_flat]
    total = autodiff.accumulate(total, init_tape.gradient(tf.nest.flatten(s0), hypers, output_gradients=cotangents),
                                connected)
    total = autodiff.accumulate(total, inputs.pull_back(total_x, hypers), connected)
    problem.load(forward.final.w)
    return RunResult(outer.value, [g if c else None for g, c in zip(total, connected)],
                     forward.final, forward.losses, forward.health)


def _taped_forward(problem: InnerProblem, s0: NamedTuple, inputs_at: Callable, steps: int,
                   truncate: Optional[int], offset: Any, hypers: list, x_sources: list,
                   accumulate: Callable) -> _Forward:
    """The T steps unrolled in the graph, the tapes of the last K kept for the reverse pass."""
    first = steps - min(truncate or steps, steps)
    state, losses, recorded = s0, [], []
    health = empty_trajectory(s0, steps).health
    for t in range(steps):
        if t < first:
            problem.load(state.w)
            new, loss = problem.transition(state, inputs_at(t), t + offset)
        else:
            recorded.append(autodiff.record_transition(problem, state, lambda t=t: inputs_at(t), t + offset,
                                                       hypers, x_sources))
            new, loss = recorded[-1].new_state, recorded[-1].loss
        health = mark_unhealthy(health, t, tf.nest.flatten(new))
        state = new
        losses.append(loss)

    def backward(alpha_flat, total, total_x):
        for step in reversed(recorded):
            vjp = autodiff.pull_back(problem, step, tf.nest.pack_sequence_as(s0, alpha_flat), hypers, x_sources)
            alpha_flat, total, total_x = accumulate(vjp, total, total_x)
        return alpha_flat, total, total_x

    return _Forward(state, tf.stack(losses), health, backward, tf.constant(first == 0))


def _stored_forward(problem: InnerProblem, s0: NamedTuple, inputs_at: Callable, steps: Any,
                    truncate: Optional[int], checkpoint_every: Optional[int], offset: Any, hypers: list,
                    x_sources: list, accumulate: Callable) -> _Forward:
    """The T steps in compiled loops storing states (or checkpoints); the reverse pass
    recomputes each step from its stored state."""
    steps = tf.convert_to_tensor(steps, tf.int32)
    kept = steps if truncate is None else tf.minimum(tf.constant(truncate, tf.int32), steps)
    first = steps - kept
    segment = kept if checkpoint_every is None else tf.minimum(tf.constant(checkpoint_every, tf.int32), kept)
    n_segments = (kept + segment - 1) // segment
    last_start = first + (n_segments - 1) * segment

    # s_0 … s_{T−K} unstored, a checkpoint at each segment start, the last segment stored.
    trajectory = run_steps(problem, empty_trajectory(s0, steps), inputs_at, 0, first, offset)
    checkpoints = [tf.TensorArray(x.dtype, size=n_segments, element_shape=x.shape)
                   for x in tf.nest.flatten(trajectory.final)]  # the last segment's stays unused

    def forward_segment(i, flat, checkpoints, losses, health):
        start = first + i * segment
        checkpoints = [ta.write(i, x) for ta, x in zip(checkpoints, flat)]
        part = run_steps(problem, Trajectory(tf.nest.pack_sequence_as(s0, flat), [], losses, health),
                      inputs_at, start, start + segment, offset)
        return i + 1, tf.nest.flatten(part.final), checkpoints, part.losses, part.health

    _, flat, checkpoints, losses, health = tf.while_loop(
        lambda i, *_: i < n_segments - 1, forward_segment,
        (tf.constant(0), tf.nest.flatten(trajectory.final), checkpoints, trajectory.losses,
         trajectory.health))
    last = Trajectory(tf.nest.pack_sequence_as(s0, flat), store(tf.nest.pack_sequence_as(s0, flat),
                      steps - last_start + 1), losses, health)
    trajectory = run_steps(problem, last, inputs_at, last_start, steps, offset, keep=True)

    def reverse_segment(states, start, stop, alpha_flat, total, total_x):
        def body(t, alpha_flat, total, total_x):
            vjp = autodiff.transition_vjp(problem, stored_state(states, t - start), lambda: inputs_at(t),
                                          t + offset, tf.nest.pack_sequence_as(s0, alpha_flat),
                                          hypers, x_sources)
            return (t - 1,) + accumulate(vjp, total, total_x)
        _, alpha_flat, total, total_x = tf.while_loop(lambda t, *_: t >= start, body,
                                                      (stop - 1, alpha_flat, total, total_x))
        return alpha_flat, total, total_x

    def recomputed_segment(i, alpha_flat, total, total_x):
        start = first + i * segment
        s_start = tf.nest.pack_sequence_as(s0, [ta.read(i) for ta in checkpoints])
        scratch = empty_trajectory(s_start, steps)._replace(stored=store(s_start, segment + 1))
        states = run_steps(problem, scratch, inputs_at, start, start + segment, offset, keep=True)
        return (i - 1,) + reverse_segment(states, start, start + segment, alpha_flat, total, total_x)

    def backward(alpha_flat, total, total_x):
        alpha_flat, total, total_x = reverse_segment(trajectory, last_start, steps, alpha_flat, total, total_x)
        _, alpha_flat, total, total_x = tf.while_loop(
            lambda i, *_: i >= 0, recomputed_segment, (n_segments - 2, alpha_flat, total, total_x))
        return alpha_flat, total, total_x

    return _Forward(trajectory.final, trajectory.losses.stack(), trajectory.health, backward,
                    tf.equal(first, 0))


class ReverseHG(HyperGradient):
    """Reverse-mode hypergradient (FAR-HO's ``ReverseHG``), optionally truncated.

    Args:
        history: FAR-HO's state store, accepted for compatibility: a ``deque(maxlen=K + 1)``
            means truncation to K steps, as ``ReverseHG.truncated(K)``.
        name: a name.
        truncate: K, back-propagate through the last K steps only. Defaults to `None` (all).
        checkpoint_every: k, store one state every k steps and recompute the others in the
            reverse pass (memory O(T/k + k) states instead of O(T), one more forward pass; for
            long horizons). Defaults to `None` (store every state).
        unroll: runs of at most this many steps (without ``checkpoint_every``) are unrolled into
            the graph and keep every step's tape for the reverse pass: no step is recomputed
            (faster; docs/results/hypergradients.md measures by how much), for the memory of the activations of the
            steps and one trace per T (its time grows with T). Longer runs use compiled loops
            that store one state per step. 0 never unrolls. Defaults to 16.
        jit_compile: compile the inner run and the hypergradient with XLA, which fuses the
            element-wise work of each step, at the price of a compilation per T; the objectives
            must be made of operations XLA supports (docs/results/hypergradients.md compares its speed on CPU).
            Defaults to `False`.

    ``run(..., online=True)`` continues the inner state of the previous run (FAR-HO's TRHO):
    each run back-propagates through its own T steps (all of them, unlike FAR-HO, which
    skipped the first transition of every chunk).
    """

    settings = (Setting("truncate", int, 0, "back-propagate through the last K inner steps only (0: all T).", low=0,
                        flag="truncate"),)

    def __init__(self, history: Any = None, name: str = "ReverseHG", truncate: Optional[int] = None,
                 checkpoint_every: Optional[int] = None, unroll: int = UNROLL,
                 jit_compile: bool = False):
        super().__init__(name, jit_compile)
        if isinstance(history, deque) and history.maxlen is not None and truncate is None:
            truncate = history.maxlen - 1
        for argument, value in (("truncate", truncate), ("checkpoint_every", checkpoint_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{argument}` must be a positive int or None, got {value!r}.")
        if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 0:
            raise ValueError(f"`unroll` must be a non-negative int, got {unroll!r}.")
        self.truncate, self.checkpoint_every, self.unroll = truncate, checkpoint_every, unroll

    @classmethod
    def from_settings(cls, truncate: int = 0, **settings: Any) -> "ReverseHG":
        """``cls(truncate=K, **settings)``; K = 0 back-propagates through every step."""
        return cls(truncate=truncate or None, **settings)

    def _settings(self) -> dict:
        return {"truncate": self.truncate, "checkpoint_every": self.checkpoint_every, "unroll": self.unroll,
                "jit_compile": self.jit_compile}

    @staticmethod
    def truncated(reverse_iterations: int, name: str = "TruncatedReverseHG") -> "ReverseHG":
        """Reverse mode through the last ``reverse_iterations`` steps only (K-RMD)."""
        return ReverseHG(name=name, truncate=reverse_iterations)

    def _unrolls(self, T: int) -> bool:
        return T <= self.unroll and self.checkpoint_every is None

    def _steps(self, T: int) -> Any:
        return T if self._unrolls(T) else super()._steps(T)

    def hypergradient(self, problem, outer_objective, hypers, *, steps, inner_batches, outer_batch=None,
                      previous=None, online=False, offset=0, options=None) -> RunResult:
        return reverse_hypergradient(problem, outer_objective, hypers, steps=steps,
                                     inner_batches=inner_batches, outer_batch=outer_batch,
                                     truncate=self.truncate, checkpoint_every=self.checkpoint_every,
                                     unrolled=isinstance(steps, int) and self._unrolls(steps),
                                     initial_state=previous.state if previous else None, offset=offset)
