"""Meta-batches across devices and machines with ``tf.distribute``.

A batched inner problem holds a meta-batch of B independent problems on a leading axis (inner
variables ``[B, ...]``, the objective Σ_j L_j, the outer objective the mean of the problems'
E_j): its hypergradient is the mean of the problems' hypergradients, so the meta-batch splits
across the R replicas of a ``tf.distribute.Strategy`` (``MirroredStrategy``: the GPUs of a
machine; ``MultiWorkerMirroredStrategy``: several machines), replica r solving its share of
B/R problems:

    E = (1/B) Σ_j E_j = (1/R) Σ_r E^(r),        ∇_λ E = (1/R) Σ_r ∇_λ E^(r),
    E^(r) = (R/B) Σ_{j ∈ r} E_j                  (what one device computes for its B/R problems)

Each replica runs the method on its share (``hypergradient``); ``share`` divides its result by
R, and all-reduces E and whether every replica's result is finite (one all-reduce of three
scalars). The divided hypergradients are the replica's terms of a sum, which is what a Keras
optimizer all-reduces under a strategy (by SUM) before its update (``apply_gradients``): one
all-reduce of the hypergradients per hyper-iteration, and the update of one device holding the
whole meta-batch. R must divide B (``replica_batch_size`` says so in a clear error; tf.distribute
would split an indivisible meta-batch unevenly, down to empty shares).

Each replica's inner variables are its own scratch state, not mirrored: create them (and an
``SGLDOptimizer``, whose run counter each replica advances) inside ``local_variables()``.

    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        lam = tf.Variable(...)                               # λ: mirrored
        outer_optimizer = keras.optimizers.Adam(1e-2)
        outer_optimizer.build([lam])                          # its slots: mirrored too
        with far.distribute.local_variables():
            w = tf.Variable(tf.zeros([0, d]), shape=[None, d])   # [B/R, d] on each replica
    problem = far.InnerProblem(L, far.GradientDescentOptimizer(0.1), var_list=[w],
                               init_dynamics_dict=[(w, lambda: tf.zeros_like(w))])
    method = far.ReverseHG()
    far.distribute.replica_batch_size(B, strategy)           # a clear error unless R divides B

    @tf.function
    def hyper_iteration(batch):                              # a distributed meta-batch
        def replica(batch):                                  # its share of B/R problems
            w.assign(tf.zeros([tf.shape(batch[0])[0], d]))
            share = far.distribute.hypergradient(method, problem, E, [lam], steps=T,
                                                 inner_batches=far.Batches(batch, False),
                                                 outer_batch=batch)
            far.distribute.apply_gradients(outer_optimizer, share.grads, [lam], share.finite)
            return share.value
        return strategy.run(replica, args=(batch,))

    for batch in strategy.experimental_distribute_dataset(meta_batches):   # batches of B
        hyper_iteration(batch)

Without a strategy the same code runs on one device (R = 1).
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

from far_ho2 import engine
from far_ho2.sharding import local_variables
from far_ho2.hypergradients.base import HyperGradient
from far_ho2.inner_problem import InnerProblem

__all__ = ["Share", "apply_gradients", "hypergradient", "local_variables", "replica_batch_size", "share"]


def replica_batch_size(batch_size: int, strategy: Optional[tf.distribute.Strategy] = None,
                       name: str = "`batch_size`") -> int:
    """B/R, the problems of each replica when the R replicas of ``strategy`` (default: the
    current one) share a meta-batch of B = ``batch_size``.

    Raises:
        ValueError: naming the meta-batch as ``name`` unless R divides B.
    """
    replicas = (strategy or tf.distribute.get_strategy()).num_replicas_in_sync
    if batch_size < 1 or batch_size % replicas:
        raise ValueError(f"{name}={batch_size} does not split across the {replicas} replicas of the strategy: "
                         f"each replica fits the same number of problems, so use a multiple of {replicas}.")
    return batch_size // replicas


class Share(NamedTuple):
    """A replica's part of the hypergradient of a meta-batch."""

    value: tf.Tensor  # E, the mean over the whole meta-batch (the same on every replica)
    grads: list  # ∇E^(r)/R: their sum over the replicas is ∇E; None where E^(r) does not depend on λ
    finite: tf.Tensor  # whether every replica's E, ∇E and inner states are finite


def _replica_context() -> tf.distribute.ReplicaContext:
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError("far.distribute runs in a replica context: inside `strategy.run` (or a Keras "
                           "`train_step`), or without a strategy; not directly under `strategy.scope()`.")
    return context


def share(value: tf.Tensor, grads: Sequence[Optional[tf.Tensor]], finite: Any, batch_size: Any) -> Share:
    """This replica's result, E^(r) = ``value`` and ∇E^(r) = ``grads`` (means over its problems;
    ``finite`` whether they are usable), as its part of the meta-batch's: E all-reduced, ∇E^(r)/R,
    and whether every replica's result is finite. One all-reduce of three scalars; an
    InvalidArgumentError if the replicas' shares (``batch_size`` problems here) differ in size."""
    context = _replica_context()
    replicas = context.num_replicas_in_sync
    size = tf.cast(batch_size, value.dtype)
    total, mean, failures = context.all_reduce(
        tf.distribute.ReduceOp.SUM, [size, value / replicas, tf.cast(tf.logical_not(finite), value.dtype)])
    share = Share(mean, [None if g is None else g / replicas for g in grads], tf.equal(failures, 0))
    if replicas == 1:
        return share  # one share: nothing to compare (and no assert for Grappler's loop optimizer to warn about)
    check = tf.debugging.assert_equal(total, size * replicas, message=(
        f"far.distribute: the {replicas} replicas hold meta-batch shares of different sizes; the meta-batch "
        f"must be a multiple of {replicas} (far.distribute.replica_batch_size)"))
    with tf.control_dependencies([check]):
        return share._replace(value=tf.identity(mean))


def hypergradient(method: HyperGradient, problem: InnerProblem, outer_objective: Callable, hypers: list,
                  **arguments: Any) -> Share:
    """``method.hypergradient(problem, outer_objective, hypers, **arguments)`` on this replica's
    share of the meta-batch (held by ``problem``; its size is the leading dimension of the first
    inner variable), as ``share`` combines it. Call it inside ``strategy.run``, traced (in a
    ``tf.function``); ``finite`` covers the inner states, E, ∇E and the method's own checked
    quantities."""
    result = method.hypergradient(problem, outer_objective, hypers, **arguments)
    return share(result.value, result.grads, engine.result_healthy(method, result),
                 tf.shape(problem.var_list[0])[0])


def apply_gradients(optimizer: Any, grads: Sequence[Optional[tf.Tensor]], variables: Sequence[Any],
                    finite: Any) -> None:
    """``optimizer.apply_gradients(zip(grads, variables))`` from every replica if ``finite``
    (the same on every replica, as ``Share.finite``); otherwise nothing changes (the optimizer's
    step counter included). ``optimizer`` is a Keras optimizer: under a strategy it sums
    ``grads`` over the replicas (an all-reduce) before its update, so ``grads`` are the
    replica's terms of the sum (``Share.grads``). Build it first, in the strategy's scope
    (``optimizer.build(variables)``): its slots cannot be created in a replica.

    tf.distribute cannot synchronise inside a ``tf.cond`` of a replica, so the condition is
    taken in cross-replica context (``merge_call``) and the update runs from there on every
    replica (``call_for_each_replica``), as Keras's ``LossScaleOptimizer`` skips non-finite
    steps; without a strategy (or where no merge call is needed: XLA on GPUs) it is a plain
    ``tf.cond``."""
    if not getattr(optimizer, "built", True):
        raise ValueError("far.distribute.apply_gradients: the optimizer is not built; call "
                         "`optimizer.build(variables)` under `strategy.scope()` first.")
    grads = list(grads)

    def update() -> tf.Tensor:
        optimizer.apply_gradients(zip(grads, variables))
        return tf.constant(True)

    def skip() -> tf.Tensor:
        return tf.constant(False)

    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(finite, update, skip)
        return

    def cross_replica(strategy: tf.distribute.Strategy, grads: list, finite: Any) -> None:
        def replicated() -> tf.Tensor:
            strategy.extended.call_for_each_replica(
                lambda g: optimizer.apply_gradients(zip(g, variables)), args=(grads,))
            return tf.constant(True)
        tf.cond(strategy.experimental_local_results(finite)[0], replicated, skip)

    _replica_context().merge_call(cross_replica, args=(grads, finite))
