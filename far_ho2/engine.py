"""One hyper-iteration: the step every door runs (``HyperOptimizer.run``, the Keras
``far.BilevelModel.train_step``, ``HyperRepresentation``), traced as one function:

    r_k   = method.hypergradient(problem_k, …)           each inner problem's outer direction
                                                          (or directions given: ``settle``)
    ok    = guard(r_k) ∧ method.health(r_k)               (``far_ho2.guard``)
    λ     ← P(λ − update(aggregate_k ∇_k))                the outer optimizers, the projections
    ok   &= guard(λ, the optimizers' slots)
    method.finish(r)                                      its own step: BOME's joint step on w,
                                                          the penalty's stage schedule
    ok   &= guard(w)
    every guarded variable ← its value before the step, unless ok

``update`` is the door's: ``HyperOptimizer`` applies each outer optimizer to its group of
hyperparameters (``aggregation_fn``, ``process_fn``), the Keras model its compiled optimizer.
On a meta-batch sharded across replicas (``far_ho2.sharding``) the step runs in each replica:
``ok`` is agreed between them, E is the meta-batch's mean, and under any strategy the restore
is unconditional (tf.distribute cannot synchronise mirrored variables inside a ``tf.cond``).

Why a traced step over variables, not a pure ``(state, batch) -> (result, state)`` function in
the manner of optax: every door holds its state in variables already (Keras optimizers and
models, ``tf.distribute``'s mirrored and replica-local variables, checkpoints), so a pure core
would copy that state in and out at every call; the mathematics stays in pure functions
(``reverse_hypergradient``, ``bome_direction``, …) and this step composes them, so that a door
cannot skip a part of it (a stage schedule, a joint step, the guard).
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

from far_ho2 import batches as batching
from far_ho2 import guard, sharding
from far_ho2.trajectory import all_healthy
from far_ho2.types import Health, RunResult

#: the phase a step failed in (``Status.phase``)
HEALTHY, RUN, UPDATE, METHOD_STEP = 0, 1, 2, 3

#: ``update(results) -> (moved, healthy)``: the door's outer update from the results, traced;
#: ``moved`` = max ‖Δλ‖∞, ``healthy`` whether λ and the optimizers' slots are healthy after it.
Update = Callable[[list], tuple[tf.Tensor, tf.Tensor]]


class Status(NamedTuple):
    """What a step reports besides the results (tensors)."""

    value: tf.Tensor  # E, the mean over the inner problems
    phase: tf.Tensor  # int32: HEALTHY, or where the step failed (RUN, UPDATE, METHOD_STEP)
    largest: tf.Tensor  # max ‖∇_λ‖∞ of the directions (float64)
    moved: tf.Tensor  # max ‖Δλ‖∞ of the update (float64; 0 without one)


def result_healthy(method: Any, result: RunResult) -> tf.Tensor:
    """Whether ``result``'s inner states stayed healthy (finite, within their growth bounds), E
    and every direction are finite, and the method's own test passes (in-graph)."""
    checks = [all_healthy(result.health), guard.all_finite(result.value), method.health(result)]
    checks += [guard.all_finite(g) for g in result.grads if g is not None]
    return tf.reduce_all(tf.stack(checks))


def largest_direction(results: Sequence[RunResult]) -> tf.Tensor:
    """max ‖∇_λ‖∞ over every direction of ``results`` (float64; 0 if none)."""
    return tf.reduce_max(tf.stack([tf.zeros((), tf.float64)] + [guard.max_abs(g) for r in results
                                                               for g in r.grads if g is not None]))


def plain_result(value: tf.Tensor, grads: list) -> RunResult:
    """A direction computed without an inner run (no inner states for the guard to check)."""
    empty = tf.zeros([0], tf.int32)
    return RunResult(value, grads, None, None, Health(empty - 1, tf.zeros([0], tf.bool), tf.zeros([0], tf.float64)))


def directions(method: Any, *, steps: Any, inner_data: Any, per_step: bool, outer_data: Any, previous: Any,
               online: Any, offset: Any, options: dict) -> list[RunResult]:
    """Every registered problem's ``RunResult`` (traced), with the method's growth limit; each
    inner optimizer begins a run first (e.g. an SGLD chain's counter: a new noise sequence)."""
    for reg in method.registrations:
        reg.problem.optimizer.begin_run()
    with guard.limit(method.growth_limit):
        return [method.hypergradient(reg.problem, reg.outer_objective, reg.hypers, steps=steps,
                                     inner_batches=batching.Batches(inner_data, per_step), outer_batch=outer_data,
                                     previous=None if previous is None else previous[k], online=online,
                                     offset=offset, options=options)
                for k, reg in enumerate(method.registrations)]


def apply(method: Any, results: list[RunResult], update: Update, inner_bounds: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The outer update, then the method's own step, each checked: (phase, moved)."""
    moved, update_healthy = update(results)
    method_healthy = method.finish(results)
    inner = [v for reg in method.registrations for v in reg.problem.var_list]
    if method.persistent:  # a method that moves w itself: w within its bounds afterwards
        method_healthy &= tf.reduce_all(tf.stack([guard.healthy(v, inner_bounds[i]) for i, v in enumerate(inner)]))
    update_healthy, method_healthy = sharding.agree(update_healthy), sharding.agree(method_healthy)
    phase = tf.where(update_healthy, tf.where(method_healthy, HEALTHY, METHOD_STEP), UPDATE)
    return phase, moved


def step(method: Any, *, steps: Any, inner_data: Any, per_step: bool, outer_data: Any, previous: Any, online: Any,
         offset: Any, options: dict, grad_bound: tf.Tensor, update: Optional[Update], inner_bounds: tf.Tensor,
         guarded: Sequence[tf.Variable]) -> tuple[list[RunResult], Status]:
    """One hyper-iteration (see the module docstring), traced; without ``update``, the directions
    only (FAR-HO's ``compute_hypergradients``). ``guarded`` are the variables a failed step
    restores, ``grad_bound`` the growth bound of the directions, ``inner_bounds`` those of the
    inner variables (for a method's own step)."""
    before = [tf.identity(v) for v in guarded]
    results = directions(method, steps=steps, inner_data=inner_data, per_step=per_step, outer_data=outer_data,
                         previous=previous, online=online, offset=offset, options=options)
    return results, settle(method, results, before, grad_bound=grad_bound, update=update,
                           inner_bounds=inner_bounds, guarded=guarded)


def settle(method: Any, results: list[RunResult], before: Sequence[tf.Tensor], *, grad_bound: tf.Tensor,
           update: Optional[Update], inner_bounds: tf.Tensor, guarded: Sequence[tf.Variable]) -> Status:
    """``step`` after its directions, for ``results`` computed from the values ``before`` of
    ``guarded``: the guard, the update, the method's own step, the restore (traced)."""
    with tf.name_scope("guard"):
        largest = sharding.maximum(largest_direction(results))
        healthy = sharding.agree(tf.reduce_all(tf.stack([result_healthy(method, r) for r in results]
                                                        + [largest <= grad_bound])))
    phase, moved = tf.where(healthy, HEALTHY, RUN), tf.zeros((), tf.float64)
    if update is not None:
        with tf.name_scope("update"):
            applied, moved = apply(method, results, update, inner_bounds)
        phase = tf.where(healthy, applied, phase)
    with tf.name_scope("guard"):
        restore(guarded, before, tf.equal(phase, HEALTHY))
    return Status(_value(results), phase, largest, moved)


def apply_step(method: Any, results: list[RunResult], update: Update, inner_bounds: tf.Tensor,
               guarded: Sequence[tf.Variable]) -> Status:
    """The update part of ``step`` alone, for results computed before (FAR-HO's
    ``apply_hypergradients``), traced."""
    before = [tf.identity(v) for v in guarded]
    phase, moved = apply(method, results, update, inner_bounds)
    restore(guarded, before, tf.equal(phase, HEALTHY))
    return Status(_value(results), phase, sharding.maximum(largest_direction(results)), moved)


def _value(results: Sequence[RunResult]) -> tf.Tensor:
    """E, the mean over the inner problems (and over the replicas of a sharded meta-batch)."""
    value = results[0].value if len(results) == 1 else tf.reduce_mean(tf.stack([r.value for r in results]))
    replicas = sharding.replicas()
    return value if replicas == 1 else sharding.total(value) / replicas


def restore(variables: Sequence[tf.Variable], values: Sequence[tf.Tensor], healthy: tf.Tensor) -> None:
    """Every variable back to its value in ``values`` unless ``healthy`` (in-graph). Under a
    strategy (of one replica too), by unconditional assignments (a mirrored variable's assignment
    synchronises the replicas, which tf.distribute cannot do inside a ``tf.cond``)."""
    if tf.distribute.has_strategy():
        for v, value in zip(variables, values):
            v.assign(tf.where(healthy, v.read_value(), value))
        return

    def back() -> tf.Tensor:
        for v, value in zip(variables, values):
            v.assign(value)
        return tf.constant(True)
    tf.cond(healthy, lambda: tf.constant(True), back)
