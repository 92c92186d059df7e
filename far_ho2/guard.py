"""The guard: a hyper-iteration whose numbers cannot be trusted raises one error and changes
nothing.

Every method runs under it (``HyperGradient.run`` and ``HyperOptimizer``). A quantity x is
*unhealthy* when it is not finite or when it grows without bound, by the relative-growth test

    ‖x‖∞ > G · max(‖x_ref‖∞, 1)          (G = ``growth_limit``, 1e8 by default)

with the reference x_ref and the quantities:

* the inner weights w_t at every inner step, against w at the start of the run (Φ₀, or the
  kept w of a method that warm-starts);
* E at the end of the inner run and the method's own scalars: finiteness only;
* the hypergradient (outer direction), against the first hyper-iteration's;
* the hyperparameters after the outer update, against their values at the first
  hyper-iteration; the outer optimizer's slots: finiteness. The update is checked before the
  hyper-iteration ends and undone if unhealthy, as is a method's own step on w (BOME's).

Divergence is geometric, so any G catches it before the numbers overflow; G only sets how early,
and how far a legitimate quantity may move from its scale (a weight initialised at 0 may reach
1e8). ``growth_limit=None`` keeps the finiteness tests only.

On failure a ``DivergenceError`` (a ``FloatingPointError``) names the method, the
hyper-iteration, the inner step and what grew, and every variable — inner variables,
hyperparameters, the outer optimizer's slots and the method's own state — holds the value it had
before the hyper-iteration (``far_ho2.engine.step`` restores them).
"""

import contextlib
import threading
from typing import Any, Iterator, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf


DEFAULT_GROWTH_LIMIT = 1e8
UNCHANGED = ("every variable (inner variables, hyperparameters, optimizer slots, the method's state) "
             "keeps its value from before this hyper-iteration.")


class DivergenceError(FloatingPointError):
    """A hyper-iteration whose inner states, outer objective, hypergradient or outer update
    became non-finite or grew without bound (see the module docstring); nothing was changed."""


def check_growth_limit(value: Optional[float]) -> Optional[float]:
    """``value`` as a growth limit G (> 1, finite), or None; a clear error otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 < value < np.inf:
        raise ValueError(f"`growth_limit` must be a finite number > 1 (or None: finiteness tests only), "
                         f"got {value!r}.")
    return float(value)


_LIMIT = threading.local()


@contextlib.contextmanager
def limit(value: Optional[float]) -> Iterator[None]:
    """G for the loops traced inside the block (``current_limit``)."""
    previous = getattr(_LIMIT, "value", DEFAULT_GROWTH_LIMIT)
    _LIMIT.value = value
    try:
        yield
    finally:
        _LIMIT.value = previous


def current_limit() -> Optional[float]:
    """G of the method being traced (``DEFAULT_GROWTH_LIMIT`` outside a method's run)."""
    return getattr(_LIMIT, "value", DEFAULT_GROWTH_LIMIT)


def max_abs(x: tf.Tensor) -> tf.Tensor:
    """‖x‖∞ as float64 (0 for an empty tensor); one pass over x."""
    x = tf.convert_to_tensor(x)
    size = x.shape.num_elements()  # None: known only when the graph runs
    if size == 0:
        return tf.zeros((), tf.float64)
    largest = tf.cast(tf.reduce_max(tf.abs(x)), tf.float64)
    return largest if size else tf.where(tf.size(x) > 0, largest, 0.0)


def all_finite(x: tf.Tensor) -> tf.Tensor:
    """Whether every element of x is finite: Σ 0·x is NaN exactly when some x_i is NaN or ±∞
    (one vectorised pass over x, where a boolean ``reduce_all(is_finite(x))`` takes several)."""
    x = tf.convert_to_tensor(x)
    return tf.math.is_finite(tf.reduce_sum(x * tf.zeros((), x.dtype)))


def bound(reference: tf.Tensor, growth_limit: Optional[float]) -> tf.Tensor:
    """G · max(‖x_ref‖∞, 1): the largest ‖x‖∞ the growth test accepts (inf without a limit)."""
    if growth_limit is None:
        return tf.constant(np.inf, tf.float64)
    return growth_limit * tf.maximum(max_abs(reference), 1.0)


def healthy(x: tf.Tensor, largest: tf.Tensor) -> tf.Tensor:
    """Whether x is finite and ‖x‖∞ ≤ ``largest``."""
    return all_finite(x) & (max_abs(x) <= largest)


def check_update(hypers: Sequence[tf.Variable], before: Sequence[tf.Tensor], bounds: Any,
                 optimizers: Sequence[Any]) -> tuple[tf.Tensor, tf.Tensor]:
    """After an outer update (traced): (max_i ‖λ_i − λ_i before‖∞ as float64, whether every λ_i is
    finite with ‖λ_i‖∞ ≤ ``bounds[i]`` and every floating variable of the ``optimizers`` finite)."""
    slots = [v for optimizer in optimizers for v in variables_of(optimizer) if v.dtype.is_floating]
    ok = tf.reduce_all(tf.stack([healthy(v, bounds[i]) for i, v in enumerate(hypers)] + [all_finite(v) for v in slots]))
    moved = tf.reduce_max(tf.stack([tf.zeros((), tf.float64)] + [max_abs(v - b) for v, b in zip(hypers, before)]))
    return moved, ok


def variables_of(obj: Any) -> list[tf.Variable]:
    """The tf.Variables of a method's state or an optimizer (nested dicts and lists, Keras
    variables and optimizers, far optimizers): what a failed step must restore."""
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in variables_of(value)]
    if isinstance(obj, (list, tuple)):
        return [v for value in obj for v in variables_of(value)]
    if isinstance(obj, keras.Variable):
        return [obj.value]
    if isinstance(obj, tf.Variable):
        return [obj]
    if obj is not None and hasattr(obj, "variables"):
        return variables_of(list(obj.variables))
    return []
