"""``compiled(fn)``: a ``tf.function`` with a cheap dispatch for calls repeated with inputs of
the same shapes (one per hyper-iteration).

``tf.function`` canonicalises the whole nest of inputs and searches its cache at every call,
about 5-10 ms for the nested batches and states of a hypergradient: as much as the computation of
a small problem. Here each input signature (shapes and dtypes of the flattened inputs, and the
non-tensor leaves) is traced once and its concrete function called directly.

The functions are traced without AutoGraph: the library's loops are explicit ``tf.while_loop``s,
and AutoGraph re-converted every Python function it met on every trace (TF 2.21), which made
tracing the 16 unrolled steps of ``ReverseHG`` 4x slower (8 s instead of 2 s). Objectives are
therefore traced as written, like FAR-HO's graphs: tensor-dependent control flow in them is
written with ``tf.cond`` / ``tf.where``, not a Python ``if`` on a tensor.
"""

from typing import Any, Callable

import tensorflow as tf


def _signature(leaf: Any) -> Any:
    if isinstance(leaf, (tf.Tensor, tf.Variable)):
        return tuple(leaf.shape), leaf.dtype
    return leaf if leaf is None or isinstance(leaf, (bool, int, float, str)) else type(leaf)


def compiled(fn: Callable) -> Callable:
    """``fn`` compiled with ``tf.function``, one concrete function per input signature."""
    function = tf.function(fn, autograph=False)
    concrete: dict = {}

    def call(*args: Any) -> Any:
        if not tf.executing_eagerly() or tf.config.functions_run_eagerly():
            return function(*args)
        key = tuple(_signature(leaf) for leaf in tf.nest.flatten(args))
        if key not in concrete:
            concrete[key] = function.get_concrete_function(*args)
        return concrete[key](*args)

    return call
