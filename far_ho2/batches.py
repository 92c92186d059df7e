"""Batch suppliers: FAR-HO's feed dicts, as batches given to the objectives.

A supplier is a batch (any nest of arrays or tensors), a callable ``step -> batch``, or a stream
of batches: a ``tf.data.Dataset`` or an iterator (one element per inner step, or per
hyper-iteration for the outer supplier; a dataset's iterator is kept across runs, so that
successive runs read successive elements). The inner supplier is called with the inner step t
(t = 0..T−1, continuing across ``online`` runs), the outer supplier with the hyper-iteration
(``global_step``). Callable and stream inner suppliers are read once per step before the
compiled loop and stacked, so the reverse pass replays exactly the batch of every step (FAR-HO
replayed step t with the batch of step t−1; see the migration guide).
"""

import inspect
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np
import tensorflow as tf


class Batches(NamedTuple):
    """The inner batches of one run: ``data`` is one batch used at every step, or (``per_step``)
    the batches of all steps stacked on a leading axis; ``None`` for objectives without a batch."""

    data: Any
    per_step: bool

    def at(self, t: tf.Tensor) -> Any:
        """The batch of step ``t`` (relative to the start of the run)."""
        if self.per_step:
            return tf.nest.map_structure(lambda x: tf.gather(x, t), self.data)
        return self.data


def check_steps(T: Any) -> int:
    """T as a positive int: an int, a 0-d integer tensor or array, or ``range(T)`` (FAR-HO's
    iterable of step indices); a clear error otherwise."""
    if isinstance(T, range) and T.start == 0 and T.step == 1:
        T = len(T)
    elif isinstance(T, (tf.Tensor, tf.Variable, np.ndarray)) and T.shape == () and T.dtype.is_integer:
        T = int(T.numpy() if hasattr(T, "numpy") else T)
    elif isinstance(T, (tuple, list)) and len(T) == 2:
        raise ValueError(f"`T` = {T!r}: FAR-HO's (forward_T, reverse_T) pair is "
                         f"far.ReverseHG.truncated(reverse_T) run for forward_T steps.")
    elif inspect.isgenerator(T) or isinstance(T, Iterator):
        raise ValueError("`T` is a generator: far_ho2 compiles the inner run, so the number of steps "
                         "must be known before it starts; pass an int (for a stopping condition, run "
                         "chunks of T steps with `online=True` and test it between them).")
    if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"`T` (the number of inner steps) must be a positive int, got {T!r}.")
    return int(T)


class Streams:
    """The iterators of the streams (datasets, iterators) given as suppliers, kept across runs:
    ``supplier(s)`` is ``s`` itself, or for a stream a callable returning its next element."""

    def __init__(self):
        self._open: dict[int, tuple[Any, Iterator]] = {}

    def supplier(self, supplier: Any, argument: str) -> Any:
        if isinstance(supplier, tf.data.Dataset):
            if id(supplier) not in self._open:  # the dataset is kept alive with its iterator
                self._open[id(supplier)] = (supplier, iter(supplier))
            iterator = self._open[id(supplier)][1]
        elif isinstance(supplier, Iterator):
            iterator = supplier
        else:
            return supplier

        def next_element(_step: int) -> Any:
            try:
                return next(iterator)
            except StopIteration:
                raise ValueError(f"`{argument}` ran out of elements; repeat it (`dataset.repeat()`) "
                                 f"or run fewer steps.") from None
        return next_element


def first_batch(batches: Batches) -> Any:
    """The batch of the first step."""
    return tf.nest.map_structure(lambda x: x[0], batches.data) if batches.per_step else batches.data


def _to_tensors(batch: Any, argument: str) -> Any:
    def convert(x):
        if isinstance(x, (tf.Tensor, tf.Variable)):
            return x
        array = np.asarray(x)
        if array.dtype == object:
            raise TypeError(f"`{argument}` gave a batch element that is not an array: {type(x).__name__}.")
        return tf.convert_to_tensor(array)
    return tf.nest.map_structure(convert, batch)


def _batch_of_step(supplier: Callable, step: int, offset: int) -> Any:
    try:
        return supplier(step)
    except (IndexError, KeyError) as error:
        if offset == 0:
            raise
        raise type(error)(f"`inner_objective_feed_dicts` failed at step {step}: {error!r}. Online runs "
                          f"continue the count of steps across runs (FAR-HO restarted it at 0 in every "
                          f"run): index per-run batches with `step % T`.") from error


def inner_batches(supplier: Any, steps: int, offset: int = 0) -> Batches:
    """The batches of steps ``offset .. offset+steps−1`` from an inner supplier (a stream is
    first turned into a callable by ``Streams.supplier``)."""
    if supplier is None:
        return Batches(None, False)
    if not callable(supplier):
        return Batches(_to_tensors(supplier, "inner_objective_feed_dicts"), False)
    batches = [_to_tensors(_batch_of_step(supplier, offset + t, offset), "inner_objective_feed_dicts")
               for t in range(steps)]
    try:
        for b in batches[1:]:
            tf.nest.assert_same_structure(batches[0], b)
        stacked = tf.nest.map_structure(lambda *xs: tf.stack(xs), *batches)
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as e:
        shapes = [tf.nest.map_structure(lambda x: tuple(x.shape), b) for b in batches]
        first_bad = next(t for t, s in enumerate(shapes) if s != shapes[0])
        raise ValueError(f"`inner_objective_feed_dicts` returned batches of different structures or "
                         f"shapes at steps {offset} and {offset + first_bad}: {shapes[0]} vs "
                         f"{shapes[first_bad]}. Every step's batch must have the same shapes.") from e
    return Batches(stacked, True)


def outer_batch(supplier: Any, global_step: int) -> Any:
    """The outer batch of hyper-iteration ``global_step``."""
    if supplier is None:
        return None
    batch = supplier(global_step) if callable(supplier) else supplier
    return _to_tensors(batch, "outer_objective_feed_dicts")


def takes_batch(objective: Callable, argument: str) -> Optional[bool]:
    """Whether ``objective`` takes the batch: True (one required argument), False (none), None
    (an optional argument: it takes the batch when one is given)."""
    if not callable(objective):
        raise TypeError(f"`{argument}` must be a callable returning a scalar tensor (TF2 has no "
                        f"graph tensors to pass), got {type(objective).__name__}. Write "
                        f"`lambda: loss` as `lambda batch: loss(batch)` or `lambda: loss()`; see "
                        f"docs/migration.md.")
    try:
        params = inspect.signature(objective).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) > 1:
        raise TypeError(f"`{argument}` must take the batch or nothing, but it requires "
                        f"{len(required)} arguments: {[p.name for p in required]}.")
    if required:
        return True
    if positional or any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return False


def check_supplier(takes: Optional[bool], supplier: Any, argument: str, supplier_argument: str) -> None:
    """A clear error when a batch would be silently ignored, or is missing; ``takes`` is
    ``takes_batch`` of the objective named ``argument``."""
    if takes is False and supplier is not None:
        raise TypeError(f"`{supplier_argument}` was given, but `{argument}` takes no argument, so "
                        f"the batch would be ignored; define it as `lambda batch: ...`.")
    if takes is True and supplier is None:
        raise TypeError(f"`{argument}` takes a batch, but `{supplier_argument}` was not given.")


def call_objective(objective: Callable, batch: Any) -> tf.Tensor:
    """``objective(batch)``, or ``objective()`` when there is no batch."""
    return objective() if batch is None else objective(batch)


def _floating_value(objective: Callable, batch: Any) -> tf.Tensor:
    value = tf.convert_to_tensor(call_objective(objective, batch))
    if not value.dtype.is_floating:
        raise TypeError(f"An objective returned a {value.dtype.name} tensor; objectives must be "
                        f"floating point.")
    return value


def scalar_objective(objective: Callable, batch: Any) -> tf.Tensor:
    """The objective's value; a non-scalar tensor is summed, as ``tf.gradients`` (FAR-HO) and
    ``GradientTape.gradient`` do with non-scalar targets."""
    value = _floating_value(objective, batch)
    return value if value.shape.rank == 0 else tf.reduce_sum(value)


def chain_values(objective: Callable, batch: Any, chains: int, argument: str) -> tf.Tensor:
    """The objective's values of ``chains`` = K independent problems stacked on a leading axis,
    a [K] vector (one value per chain); a one-line error for another shape."""
    value = _floating_value(objective, batch)
    if not value.shape.is_compatible_with([chains]):
        raise ValueError(f"`{argument}` must return one value per chain (`chains={chains}`), a vector of "
                         f"shape ({chains},); got shape {tuple(value.shape)}.")
    return tf.ensure_shape(value, [chains])
