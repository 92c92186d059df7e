"""Sums over a meta-batch sharded across the replicas of a ``tf.distribute.Strategy``.

A meta-batch of B independent problems (inner variables with a leading [B] axis, inner
objective L = Σ_j L_j, outer objective E = (1/B) Σ_j E_j) split across R replicas: replica r
holds B/R problems, its inner variables w^(r) and objectives L^(r) = Σ_{j∈r} L_j and
E^(r) = (R/B) Σ_{j∈r} E_j (the mean over its share). The meta-batch's quantities are then

    L = Σ_r L^(r),    E = (1/R) Σ_r E^(r),
    ∇_{w^(r)} L = ∇_{w^(r)} L^(r),    ∇_{w^(r)} E = (1/R) ∇_{w^(r)} E^(r),
    ∇_λ L = Σ_r ∇_λ L^(r),            ∇_λ E = (1/R) Σ_r ∇_λ E^(r),
    ⟨a, b⟩ over w = Σ_r ⟨a^(r), b^(r)⟩.

A method whose step couples the problems (an inner product over all of w, a norm of ∇_λ) takes
these sums with ``total``: every replica then computes the meta-batch's quantity, and the same
code on one device (R = 1) is unchanged. Noise drawn by ``normal`` for the replica's rows is the
slice of the meta-batch's, so a split run draws what the single-device run draws.

Outside a replica context, or with one replica, every function is the identity.
"""

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import tensorflow as tf


def _context() -> Optional[tf.distribute.ReplicaContext]:
    """The replica context of a strategy of several replicas, or None."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def replicas() -> int:
    """R, the replicas sharing the meta-batch (1 outside a replica context)."""
    context = _context()
    return 1 if context is None else context.num_replicas_in_sync


def first_row(rows: Any) -> Any:
    """r·``rows``: the meta-batch index of the first of this replica's ``rows`` rows (replica r
    holds the rows [r·n, (r+1)·n), as ``experimental_distribute_dataset`` splits a batch)."""
    context = _context()
    return 0 if context is None else tf.cast(context.replica_id_in_sync_group, tf.int32) * rows


def total(values: Any) -> Any:
    """Σ_r of a tensor, or of each tensor of a list (None stays None), over the replicas: one
    all-reduce."""
    context = _context()
    if context is None:
        return values
    if isinstance(values, (list, tuple)):
        present = [i for i, v in enumerate(values) if v is not None]
        if not present:
            return list(values)
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.convert_to_tensor(values[i]) for i in present])
        out = list(values)
        for i, s in zip(present, summed):
            out[i] = s
        return out
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def maximum(value: tf.Tensor) -> tf.Tensor:
    """max_r over the replicas."""
    context = _context()
    return value if context is None else tf.reduce_max(context.all_gather(tf.reshape(value, [1]), axis=0))


def agree(flag: tf.Tensor) -> tf.Tensor:
    """Whether ``flag`` holds on every replica (the same answer on each)."""
    context = _context()
    if context is None:
        return flag
    failures = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(flag), tf.float32))
    return tf.equal(failures, 0.0)


def squared_norm(weights: Sequence[Optional[tf.Tensor]], hypers: Sequence[Optional[tf.Tensor]] = ()) -> tf.Tensor:
    """‖(w-part, λ-part)‖² of a direction: Σ_r ‖w-part^(r)‖² + ‖λ-part‖² (the λ-part already the
    meta-batch's, the same on every replica)."""
    local = [tf.reduce_sum(tf.square(x)) for x in weights if x is not None]
    parts = [total(tf.add_n(local))] if local else []
    parts += [tf.reduce_sum(tf.square(x)) for x in hypers if x is not None]
    return tf.add_n(parts) if parts else tf.zeros((), tf.float64)


def normal(shape: tf.Tensor, seed: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """``tf.random.stateless_normal(shape, seed)`` for this replica's rows of the meta-batch:
    replica r's slice [r·n, (r+1)·n) of the draw of shape [R·n, …] (n = ``shape[0]``), so that
    each problem's noise does not depend on how the meta-batch is split."""
    context = _context()
    if context is None:
        return tf.random.stateless_normal(shape, seed, dtype=dtype)
    shape = tf.convert_to_tensor(shape, tf.int32)
    rows, count = shape[0], context.num_replicas_in_sync
    whole = tf.random.stateless_normal(tf.concat([[rows * count], shape[1:]], 0), seed, dtype=dtype)
    start = tf.cast(context.replica_id_in_sync_group, tf.int32) * rows
    return whole[start:start + rows]


@contextlib.contextmanager
def local_variables() -> Iterator[None]:
    """Variables created inside are each replica's own (``synchronization=ON_READ``): a replica
    reads and writes its copy without synchronisation, and the copies may differ in value and
    shape (e.g. the inner variables of its share of a meta-batch). Outside a replica function
    they read as the first replica's copy (``aggregation=ONLY_FIRST_REPLICA``). tf.distribute
    makes them non-trainable: give inner variables as ``var_list``. Without a strategy they are
    ordinary variables."""
    def creator(next_creator: Callable, **kwargs: Any) -> tf.Variable:
        kwargs.update(synchronization=tf.VariableSynchronization.ON_READ,
                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, trainable=False)
        return next_creator(**kwargs)
    with tf.variable_creator_scope(creator):
        yield
