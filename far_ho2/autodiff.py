"""Tape plumbing shared by the hypergradient methods: vector-Jacobian products of the transition
Φ and of the outer objective E, Hessian-vector products, with the inner variables standing for
the weights w (typed against ``types.Problem``: what these functions use of a problem)."""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

from far_ho2 import batches as batching
from far_ho2.types import Problem


def zeros_for_none(grads: Sequence[Optional[tf.Tensor]], sources: Sequence[Any]) -> list[tf.Tensor]:
    """``grads`` with ``None`` (unconnected) replaced by zeros shaped like the source."""
    return [tf.zeros(s.shape, s.dtype) if g is None else tf.convert_to_tensor(g)
            for g, s in zip(grads, sources)]


class TransitionVJP(NamedTuple):
    state: NamedTuple  # α_t = α_{t+1}ᵀ ∂Φ/∂s_t
    hypers: list  # α_{t+1}ᵀ ∂Φ/∂λ (None where Φ does not depend on λ)
    extra: list  # α_{t+1}ᵀ ∂Φ/∂x for the extra sources x (None where unconnected)


class RecordedTransition(NamedTuple):
    tape: tf.GradientTape  # recorded s_{t+1} = Φ(s_t, λ, x), watching w_t (the variables), slots, λ, x
    state: NamedTuple  # s_t
    new_state: NamedTuple  # s_{t+1}
    loss: tf.Tensor  # L_t(w_t)


def record_transition(problem: Problem, state: NamedTuple, inputs: Callable[[], Any], step: Any,
                      hypers: Sequence[tf.Variable], extra: Sequence[tf.Tensor] = ()) -> RecordedTransition:
    """One step  s_{t+1} = Φ(s_t, λ, x)  from s_t, recorded for ``pull_back``; ``inputs()`` gives
    the objective's inputs, evaluated under the tape (features may read λ)."""
    problem.load(state.w)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(problem.var_list)
        tape.watch(tf.nest.flatten(state)[len(problem.var_list):])
        tape.watch(list(hypers))
        tape.watch(list(extra))
        new_state, loss = problem.transition(state, inputs(), step)
    return RecordedTransition(tape, state, new_state, loss)


def pull_back(problem: Problem, recorded: RecordedTransition, cotangent: NamedTuple,
              hypers: Sequence[tf.Variable], extra: Sequence[tf.Tensor] = ()) -> TransitionVJP:
    """The vector-Jacobian products of a recorded step with cotangent α_{t+1}."""
    sources = problem.state_sources(recorded.state)
    grads = recorded.tape.gradient(tf.nest.flatten(recorded.new_state), sources + list(hypers) + list(extra),
                                   output_gradients=tf.nest.flatten(cotangent))
    n_s, n_h = len(sources), len(hypers)
    alpha = tf.nest.pack_sequence_as(recorded.state, zeros_for_none(grads[:n_s], sources))
    return TransitionVJP(alpha, grads[n_s:n_s + n_h], grads[n_s + n_h:])


def transition_vjp(problem: Problem, state: NamedTuple, inputs: Callable[[], Any], step: Any,
                   cotangent: NamedTuple, hypers: Sequence[tf.Variable],
                   extra: Sequence[tf.Tensor] = ()) -> TransitionVJP:
    """The vector-Jacobian products of  s_{t+1} = Φ(s_t, λ, x)  at s_t with cotangent α_{t+1}
    (the step recomputed from s_t, then pulled back)."""
    return pull_back(problem, record_transition(problem, state, inputs, step, hypers, extra), cotangent,
                     hypers, extra)


class OuterGradient(NamedTuple):
    value: tf.Tensor  # E(w_T, λ) (or another scalar objective)
    weights: list[tf.Tensor]  # ∂E/∂w_T
    hypers: list  # ∂E/∂λ, the direct term (None where E does not read λ)


def value_and_gradients(problem: Problem, value: Callable[[], tf.Tensor],
                        hypers: Sequence[tf.Variable]) -> OuterGradient:
    """A scalar ``value()`` and its gradients with respect to the weights the inner variables
    hold and to λ."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(problem.var_list)
        tape.watch(list(hypers))
        result = value()
    grads = tape.gradient(result, list(problem.var_list) + list(hypers))
    n_w = len(problem.var_list)
    return OuterGradient(result, zeros_for_none(grads[:n_w], problem.var_list), grads[n_w:])


def outer_gradient(problem: Problem, outer_objective: Callable, batch: Any,
                   hypers: Sequence[tf.Variable]) -> OuterGradient:
    """E and its gradients at the weights the inner variables hold."""
    return value_and_gradients(problem, lambda: batching.scalar_objective(outer_objective, batch), hypers)


def dot(a: Sequence[Optional[tf.Tensor]], b: Sequence[Optional[tf.Tensor]]) -> tf.Tensor:
    """Σ_i ⟨a_i, b_i⟩ over the pairs where both are given (a scalar; 0 if none)."""
    terms = [tf.reduce_sum(x * y) for x, y in zip(a, b) if x is not None and y is not None]
    return tf.add_n(terms) if terms else tf.constant(0.0)


def state_cotangent(state: NamedTuple, weights: Sequence[tf.Tensor]) -> NamedTuple:
    """The cotangent (∂E/∂w, 0, ..., 0) of a state whose slots E does not read."""
    flat = tf.nest.flatten(state)
    rest = [tf.zeros_like(x) for x in flat[len(weights):]]
    return tf.nest.pack_sequence_as(state, list(weights) + rest)


def accumulate(total: list, grads: Sequence[Optional[tf.Tensor]], connected: list) -> list:
    """``total + grads`` (skipping ``None``), marking ``connected`` where a term exists; ``total``
    entries are tensors. ``connected`` is filled at trace time: it is static."""
    out = []
    for i, (acc, g) in enumerate(zip(total, grads)):
        if g is None:
            out.append(acc)
        else:
            connected[i] = True
            out.append(acc + tf.convert_to_tensor(g))
    return out


def hessian_vector_product(problem: Problem, inputs: Any, v: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """∇²_w L(w, λ) · v at the weights the variables hold, forward-over-reverse (a JVP of the
    gradient: about the cost of two gradients, no Hessian formed)."""
    with tf.autodiff.ForwardAccumulator(problem.var_list, list(v)) as accumulator:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(problem.var_list)
            loss = problem.loss(inputs)
        grads = tape.gradient(loss, problem.var_list)
    return [accumulator.jvp(g, unconnected_gradients=tf.UnconnectedGradients.ZERO) for g in grads]


def mixed_vjp(problem: Problem, inputs: Callable[[], Any], q: Sequence[tf.Tensor],
              hypers: Sequence[tf.Variable], extra: Sequence[tf.Tensor] = ()) -> TransitionVJP:
    """∂/∂λ ⟨∇_w L(w, λ), q⟩ = (∇²_{λw} L) q (and the same for the extra sources x), q fixed."""
    with tf.GradientTape(watch_accessed_variables=False) as outer_tape:
        outer_tape.watch(list(hypers))
        outer_tape.watch(list(extra))
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(problem.var_list)
            loss = problem.loss(inputs())
        grads = tape.gradient(loss, problem.var_list)
        inner_product = tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g) * tf.stop_gradient(qi))
                                  for g, qi in zip(grads, q)])
    terms = outer_tape.gradient(inner_product, list(hypers) + list(extra))
    return TransitionVJP(None, terms[:len(hypers)], terms[len(hypers):])
