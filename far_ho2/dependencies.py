"""Which hyperparameters an inner problem and its outer objective depend on, and through what.

Evaluated once, eagerly, before a method's first run, on the first inner batch and the outer
batch: λ reaches the hypergradient through the inner objective's gradient ∇_w L(w, λ) (the
dynamics' input) or E(w, λ) directly ("objectives"), through the optimizer's parameters η(λ)
("optimizer"), or through the initial weights Φ₀(λ) ("initialization"). A structural test
(is the gradient ``None``?), so it does not depend on the values. Every method takes the same
default ``hyper_list`` (the registered hyperparameters the problem depends on, and the variables
Φ₀ reads: a learned initialisation) and gives the same error for a hyperparameter it cannot
differentiate.
"""

from typing import Any, Callable, NamedTuple, Sequence

import tensorflow as tf

from far_ho2 import batches as batching
from far_ho2.compiled import control_flow_error
from far_ho2.hyperparameters import describe


class Dependencies(NamedTuple):
    objectives: set  # ids of the hyperparameters ∇_w L or E depend on
    optimizer: set  # ... that the optimizer's parameters depend on
    initialization: set  # ... that Φ₀ depends on
    init_variables: list  # trainable variables Φ₀ reads besides the inner variables


def _total(values: Sequence[Any]) -> tf.Tensor:
    """Σ of the floating tensors of ``values`` (0 if none): one target to test connections."""
    tensors = [tf.convert_to_tensor(v) for v in values if v is not None]
    sums = [tf.reduce_sum(tf.cast(t, tf.float64)) for t in tensors if t.dtype.is_floating]
    return tf.add_n(sums) if sums else tf.constant(0.0, tf.float64)


def _connected(tape: tf.GradientTape, target: tf.Tensor, sources: Sequence[tf.Variable]) -> set:
    grads = tape.gradient(target, [_watchable(s) for s in sources])
    return {id(s) for s, g in zip(sources, grads) if g is not None}


def _watchable(variable: tf.Variable) -> tf.Variable:
    """What a tape watches for ``variable``: under ``tf.distribute`` (read here, outside a
    replica), the first replica's copy, which such a read reads."""
    return variable.values[0] if isinstance(variable, tf.distribute.DistributedValues) else variable


def explain_dtype_error(error: Exception, candidates: Sequence[tf.Variable], var_list: Sequence[tf.Variable]) -> None:
    """Raises a ``TypeError`` naming the hyperparameter whose dtype differs from the inner
    variables' (``var_list``: the inner variables, or those an objective read before failing)
    when ``error`` is the dtype clash it causes inside an objective."""
    text = str(error)
    candidate_ids = {id(c) for c in candidates}
    inner = [v for v in var_list if id(v) not in candidate_ids]
    if not inner or not any(key in text for key in ("dtype", "must be the same type", "expected to be a")):
        return
    dtype = inner[0].dtype
    mixed = [h for h in candidates if h.dtype != dtype]
    if mixed:
        names = ", ".join(f"{describe(h)} is {h.dtype.name}" for h in mixed)
        raise TypeError(f"The objectives mix dtypes: {names}, the inner variables {dtype.name} "
                        f"({text.splitlines()[0][:160]}). Create the hyperparameter with "
                        f"`dtype=tf.{dtype.name}` (far.get_hyperparameter(name, value, "
                        f"dtype=tf.{dtype.name})) or cast it in the objective.") from error


def analyse(problem: Any, outer_objective: Callable, candidates: Sequence[tf.Variable],
            inner_batch: Any, outer_batch: Any) -> Dependencies:
    """The dependencies of ``problem`` (resolved: its ``var_list`` is known) and its outer
    objective on ``candidates``, evaluated eagerly at the current values of the variables."""
    candidates, var_list = list(candidates), list(problem.var_list)
    try:
        with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
            tape.watch([_watchable(c) for c in candidates])
            with tf.GradientTape(watch_accessed_variables=False) as inner_tape:
                inner_tape.watch([_watchable(v) for v in var_list])
                loss = problem.loss(problem.inputs(inner_batch))
            gradient = _total(inner_tape.gradient(loss, [_watchable(v) for v in var_list]))
            outer = batching.scalar_objective(outer_objective, outer_batch)
            params = _total(problem.optimizer.params(0, problem.dtype))
        with tf.GradientTape() as init_tape:  # also watches the trainable variables Φ₀ reads
            init_tape.watch([_watchable(c) for c in candidates])
            initial = _total(problem.initial_weights())
    except (TypeError, ValueError, tf.errors.InvalidArgumentError) as error:
        explain_dtype_error(error, candidates, var_list)
        raise
    objectives = _connected(tape, gradient, candidates) | _connected(tape, outer, candidates)
    optimizer = _connected(tape, params, candidates)
    del tape
    inner_ids, candidate_ids = {id(v) for v in var_list}, {id(c) for c in candidates}
    read = [v for v in init_tape.watched_variables()
            if v.trainable and id(v) not in inner_ids and id(v) not in candidate_ids]
    initialization = _connected(init_tape, initial, candidates + read)
    return Dependencies(objectives, optimizer, initialization & candidate_ids,
                        [v for v in read if id(v) in initialization])


def check_traceable(problem: Any, outer_objective: Callable, inner_batch: Any, outer_batch: Any) -> None:
    """A ``TypeError`` naming the line when an objective uses a tensor as a Python bool (an
    ``if`` or ``while`` on a tensor): the eager analysis above takes one branch at the current
    values and cannot see the dependencies of the other, so it is called before saying that a
    hyperparameter affects nothing."""
    for what, objective, batch in (("the inner objective", lambda b: problem.loss(problem.inputs(b)), inner_batch),
                                   ("the outer objective", lambda b: batching.scalar_objective(outer_objective, b),
                                    outer_batch)):
        try:
            tf.function(objective, autograph=False).get_concrete_function(batch)
        except tf.errors.OperatorNotAllowedInGraphError as error:
            raise control_flow_error(error, what) from None
