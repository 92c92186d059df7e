"""FAR-HO's ``far.utils`` helpers that have a TF2 meaning; the graph-collection ones raise an
error that names the TF2 replacement."""

import itertools
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

from far_ho2.hyperparameters import hyperparameters  # noqa: F401  (FAR-HO's far.utils.hyperparameters)


def hypergradients(scope: Optional[str] = None) -> list:
    """The hypergradients of the last run of every live ``HyperOptimizer`` (FAR-HO's collection)."""
    from far_ho2.hyper_optimizer import all_hypergradients  # noqa: PLC0415 (it imports this module's package)
    return all_hypergradients(scope)


def as_list(obj: Any) -> list:
    """``obj`` if it is a list, else ``[obj]``."""
    return obj if isinstance(obj, list) else [obj]


def as_tuple_or_list(obj: Any) -> Any:
    """``obj`` if it is a tuple or a list, else ``[obj]``."""
    return obj if isinstance(obj, (list, tuple)) else [obj]


def flatten_list(lists: Any) -> list:
    """The concatenation of a list of lists."""
    return list(itertools.chain(*lists))


def merge_dicts(*dicts: Optional[dict]) -> dict:
    """The union of the dicts (later keys win); ``None`` counts as empty."""
    merged: dict = {}
    for d in dicts:
        merged.update(d or {})
    return merged


def maybe_call(obj: Any, *args: Any, **kwargs: Any) -> Any:
    """``obj(*args, **kwargs)`` if ``obj`` is callable, else ``obj``."""
    return obj(*args, **kwargs) if callable(obj) else obj


def maybe_eval(a: Any, ss: Any = None) -> Any:
    """The value of a tensor or variable as NumPy (TF2 needs no session: ``ss`` is ignored)."""
    return a.numpy() if hasattr(a, "numpy") else a


def vectorize_all(var_list: list) -> tf.Tensor:
    """The concatenation of the tensors of ``var_list``, each flattened (row-major)."""
    return tf.concat([tf.reshape(v, [-1]) for v in var_list], 0)


def dot(a: Any, b: Any) -> tf.Tensor:
    """⟨vec(a), vec(b)⟩."""
    return tf.reduce_sum(a * b)


def reduce_all_sums(first: list, second: list) -> tf.Tensor:
    """Σ_i ⟨first_i, second_i⟩."""
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(first, second)])


def maybe_add(a: Any, b: Any) -> Any:
    """``a`` if ``b`` is None, else ``a + b``."""
    return a if b is None else a + b


def val_or_zero(a: Any, b: Any) -> Any:
    """``a`` if it is not None, else zeros like ``b``."""
    return a if a is not None else tf.zeros_like(b)


def isinteger(num: Any) -> bool:
    return isinstance(num, (int, np.integer)) and not isinstance(num, bool)


def solve_int_or_generator(int_or_generator: Any) -> Any:
    """``range(n)`` for an int, else the argument."""
    return range(int_or_generator) if isinteger(int_or_generator) else int_or_generator


LEGACY_NAMES = {
    "HYPERPARAMETERS_COLLECTIONS": "it was passed as `variables_collections=` to tf.contrib layers, "
                                   "which TF2 does not have: build the network with Keras and pass "
                                   "`hyper_list=network.trainable_variables`",
    "GraphKeys": "TF2 has no graph collections: `far.hyperparameters()` lists the hyperparameters, "
                 "`ho.hypergradients()` the hypergradients",
    "lagrangian_multipliers": "ReverseHG keeps its multipliers α_t inside the compiled reverse pass; "
                              "nothing stores them between runs",
    "remove_from_collection": "TF2 has no graph collections: pass `hyper_list=` to choose the "
                              "hyperparameters",
}


class LegacyNameError(AttributeError):
    """A FAR-HO name that has no TF2 meaning; the message names what to use instead."""


def legacy_name_error(module: str, name: str) -> LegacyNameError:
    return LegacyNameError(f"{module}.{name} (FAR-HO, TF1) has no TF2 equivalent: {LEGACY_NAMES[name]}.")


def __getattr__(name: str) -> Callable:
    if name in LEGACY_NAMES:
        raise legacy_name_error("far.utils", name)
    raise AttributeError(f"module 'far_ho2.utils' has no attribute {name!r}")
