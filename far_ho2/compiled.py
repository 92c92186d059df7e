"""``compiled(fn)``: a ``tf.function`` with a cheap dispatch for calls repeated with inputs of
the same shapes (one per hyper-iteration).

``tf.function`` canonicalises the whole nest of inputs and searches its cache at every call,
about 5-10 ms for the nested batches and states of a hypergradient: as much as the computation of
a small problem. Here each input signature (shapes and dtypes of the flattened inputs, and the
non-tensor leaves) is traced once and its concrete function called directly, with the flat list
of its tensor inputs when they match (TF's ``_call_flat``, checked once per signature; the
public call, which binds the nested arguments again, costs another 0.3 ms: 10 % of a T = 1
hypergradient of the §5.1 problem).

The functions are traced without AutoGraph: the library's loops are explicit ``tf.while_loop``s,
and AutoGraph re-converted every Python function it met on every trace (TF 2.21), which made
tracing the 16 unrolled steps of ``ReverseHG`` 4x slower (8 s instead of 2 s). Objectives are
therefore traced as written, like FAR-HO's graphs: tensor-dependent control flow in them is
written with ``tf.cond`` / ``tf.where``, not a Python ``if`` on a tensor.
"""

from typing import Any, Callable, Optional

import tensorflow as tf


def _signature(leaf: Any) -> Any:
    if isinstance(leaf, (tf.Tensor, tf.Variable)):
        return tuple(leaf.shape), leaf.dtype
    return leaf if leaf is None or isinstance(leaf, (bool, int, float, str)) else type(leaf)


def _flat_caller(concrete: Any, tensors: list) -> Optional[Callable]:
    """``concrete``'s direct entry for the flat list of tensor inputs, when its inputs are
    exactly ``tensors`` (same count, dtypes and shapes), else None (the public call then binds
    the nested arguments on every call: about 0.3 ms)."""
    call_flat = getattr(concrete, "_call_flat", None)
    inputs = concrete.inputs[:len(concrete.inputs) - len(concrete.captured_inputs)]
    if call_flat is None or len(inputs) != len(tensors) or any(
            i.dtype != t.dtype or not i.shape.is_compatible_with(t.shape) for i, t in zip(inputs, tensors)):
        return None
    captured = concrete.captured_inputs
    return lambda flat: call_flat(flat, captured)


def compiled(fn: Callable, jit_compile: bool = False) -> Callable:
    """``fn`` compiled with ``tf.function`` (by XLA with ``jit_compile``), one concrete function
    per input signature."""
    function = tf.function(fn, autograph=False, jit_compile=jit_compile or None)
    concrete: dict = {}

    def call(*args: Any) -> Any:
        if not tf.executing_eagerly() or tf.config.functions_run_eagerly():
            return function(*args)
        leaves = tf.nest.flatten(args)
        key = tuple(_signature(leaf) for leaf in leaves)
        if key not in concrete:
            traced = function.get_concrete_function(*args)
            tensors = [leaf for leaf in leaves if isinstance(leaf, tf.Tensor)]
            plain = not any(isinstance(leaf, tf.Variable) or isinstance(leaf, tf.__internal__.CompositeTensor)
                            for leaf in leaves)
            concrete[key] = (traced, _flat_caller(traced, tensors) if plain else None)
        traced, flat_call = concrete[key]
        if flat_call is None:
            return traced(*args)
        return flat_call([leaf for leaf in leaves if isinstance(leaf, tf.Tensor)])

    return call
