"""``compiled(fn)``: a ``tf.function`` with a cheap dispatch for calls repeated with inputs of
the same shapes (one per hyper-iteration).

``tf.function`` canonicalises the whole nest of inputs and searches its cache at every call,
which for the nested batches and states of a hypergradient costs as much as the computation of
a small problem. Here each input signature (shapes and dtypes of the flattened inputs, and the
non-tensor leaves) is traced once and its concrete function called directly, with the flat list
of its tensor inputs when they match (TF's ``_call_flat``, checked once per signature; the
public call binds the nested arguments again at every call).

The functions are traced without AutoGraph: the library's loops are explicit ``tf.while_loop``s,
and AutoGraph re-converts every Python function it meets on every trace, which made tracing the
unrolled steps of ``ReverseHG`` several times slower. Objectives are therefore traced as written,
like FAR-HO's graphs: tensor-dependent control flow in them is written with ``tf.cond`` /
``tf.where``, not a Python ``if`` on a tensor (an error says so).

A function with float64 inputs is first run (when TensorFlow optimises its graph) with Grappler's
remapper off: with oneDNN on, the remapper handles float32 and bfloat16 only and logs "Not
handling type DT_DOUBLE" for every float64 operation it meets. A method may name other Grappler
passes to switch off (``grappler_off``), for the same first run: see ``without_grappler``.
"""

import contextlib
import os
import traceback
from typing import Any, Callable, Iterator, Optional, Sequence

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


PYTHON_CONTROL_FLOW = ("far_ho2 traces objectives as written, without AutoGraph, and a tensor cannot be a Python "
                       "bool there: write `tf.cond(pred, true_fn, false_fn)` or `tf.where(pred, a, b)` for an "
                       "`if`, `tf.while_loop` for a `while`")


def _user_line(error: BaseException) -> str:
    """``file:line: `code``` of the innermost frame of ``error`` outside TensorFlow, Keras and
    far_ho2 (the user's line that used a tensor as a bool), or ''."""
    library = (os.path.dirname(tf.__file__), os.path.dirname(os.path.dirname(__file__)) + os.sep + "far_ho2",
               os.sep + "keras" + os.sep, os.sep + "tensorflow" + os.sep)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not any(part in f.filename for part in library)]
    if not frames:
        return ""
    frame = frames[-1]
    return f" ({frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`)"


def control_flow_error(error: BaseException, what: str = "an objective (or a function it calls)") -> TypeError:
    """The error for ``what`` using a tensor as a Python bool (an ``if`` / ``while`` on a tensor)."""
    return TypeError(f"{what} uses a tensor as a Python bool{_user_line(error)}: {PYTHON_CONTROL_FLOW}.")


@contextlib.contextmanager
def without_grappler(passes: Sequence[str]) -> Iterator[None]:
    """Grappler's ``passes`` (``tf.config.optimizer.set_experimental_options`` names) off inside
    the block: a function first run there (when its graph is optimised) is optimised without them."""
    if not passes:
        yield
        return
    options = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({**options, **{name: False for name in passes}})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options(options)


def _trace(function: Any, args: tuple) -> Any:
    try:
        return function.get_concrete_function(*args)
    except tf.errors.OperatorNotAllowedInGraphError as error:
        raise control_flow_error(error) from None


def compiled(fn: Callable, jit_compile: bool = False, float64: bool = False,
             grappler_off: Sequence[str] = ()) -> Callable:
    """``fn`` compiled with ``tf.function`` (by XLA with ``jit_compile``), one concrete function
    per input signature; ``float64``: it computes in float64 (as when an input is float64);
    ``grappler_off``: Grappler passes its graphs are optimised without."""
    function = tf.function(fn, autograph=False, jit_compile=jit_compile or None)
    concrete: dict = {}

    def call(*args: Any) -> Any:
        if not tf.executing_eagerly() or tf.config.functions_run_eagerly():
            return function(*args)
        leaves = tf.nest.flatten(args)
        key = tuple(_signature(leaf) for leaf in leaves)
        first = key not in concrete
        if first:
            traced = _trace(function, args)
            tensors = [leaf for leaf in leaves if isinstance(leaf, tf.Tensor)]
            plain = not any(isinstance(leaf, tf.Variable) or isinstance(leaf, tf.__internal__.CompositeTensor)
                            for leaf in leaves)
            concrete[key] = (traced, _flat_caller(traced, tensors) if plain else None)
        traced, flat_call = concrete[key]
        doubles = float64 or any(getattr(leaf, "dtype", None) == tf.float64 for leaf in leaves)
        with without_grappler([*grappler_off, *(["remapping"] if doubles else [])] if first else []):
            if flat_call is None:
                return traced(*args)
            return flat_call([leaf for leaf in leaves if isinstance(leaf, tf.Tensor)])

    return call
