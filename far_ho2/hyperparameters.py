"""Hyperparameters: non-trainable variables that the outer problem optimizes.

``get_hyperparameter`` mirrors FAR-HO (and ``tf.get_variable``): it creates a non-trainable
``tf.Variable`` and registers it, so ``hyperparameters()`` lists it and ``HyperOptimizer`` finds it
when no ``hyper_list`` is given. Non-trainable, it is never part of the default inner
``var_list``. The registry holds weak references: a hyperparameter nobody uses any more leaves it.
"""

import gc
import re
import warnings
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

_REGISTRY: list[weakref.ref] = []


def _register(variable: tf.Variable) -> None:
    _REGISTRY.append(weakref.ref(variable))


def hyperparameters(scope: Optional[str] = None) -> list[tf.Variable]:
    """The registered hyperparameters, in creation order; those whose name starts with ``scope``
    if it is given. Components of a ``scalar=True`` hyperparameter are listed one by one."""
    alive = [ref() for ref in _REGISTRY]
    _REGISTRY[:] = [ref for ref, v in zip(_REGISTRY, alive) if v is not None]
    return [v for v in alive if v is not None and (scope is None or v.name.startswith(scope))]


def clear_hyperparameters() -> None:
    """Empties the registry (the variables live on): what ``tf.reset_default_graph()`` did to
    FAR-HO's collections; later defaults (``hyper_list=None``) see only newer hyperparameters."""
    _REGISTRY.clear()


class HyperparameterComponents:
    """A hyperparameter made of one scalar variable per element (``scalar=True``).

    It reads as a tensor of the full shape wherever TensorFlow expects one (``tf.convert_to_tensor``,
    arithmetic, indexing), always from the current values of its ``components``. Each component is a
    separate hyperparameter with its own hypergradient, as FAR-HO's ``ForwardHG`` requires.
    """

    def __init__(self, name: str, components: list[tf.Variable], shape: Sequence[int]):
        self.name, self.components, self.shape = name, components, tuple(shape)
        self.dtype = components[0].dtype

    def value(self) -> tf.Tensor:
        """The stacked tensor, ``shape``-shaped."""
        return tf.reshape(tf.stack(self.components), self.shape)

    def __tf_tensor__(self, dtype=None, name=None) -> tf.Tensor:
        value = self.value()
        return value if dtype is None else tf.cast(value, dtype)

    def numpy(self) -> np.ndarray:
        return self.value().numpy()

    def __repr__(self) -> str:
        return f"<HyperparameterComponents {self.name!r} shape={self.shape} value={self.numpy()}>"


def _delegate(method: str) -> Callable:
    def forward(self, *args):
        return getattr(self.value(), method)(*args)
    forward.__name__ = method
    return forward


for _method in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
                "__rtruediv__", "__pow__", "__rpow__", "__matmul__", "__rmatmul__", "__neg__",
                "__abs__", "__getitem__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(HyperparameterComponents, _method, _delegate(_method))


def _initial_value(name: str, initializer: Any, shape, dtype) -> tf.Tensor:
    """The initial value from FAR-HO's accepted initializers: None (Glorot uniform, as
    ``tf.get_variable``), an initializer class or instance, a number, an array or a tensor."""
    if isinstance(initializer, type):
        initializer = initializer()
    if initializer is None or callable(initializer):
        if shape is None:
            raise ValueError(f"get_hyperparameter({name!r}): `shape` is required when `initializer` "
                             f"is {'None' if initializer is None else 'an initializer'}.")
        initializer = initializer or keras.initializers.GlorotUniform()
        return tf.convert_to_tensor(initializer(shape=tf.TensorShape(shape), dtype=dtype or tf.float32))
    value = tf.convert_to_tensor(initializer)
    if dtype is None and not value.dtype.is_floating:
        dtype = tf.float32  # an int initializer (e.g. 1) makes a float32 hyperparameter
    if dtype is not None and value.dtype != tf.as_dtype(dtype):
        value = tf.cast(value, dtype)
    if shape is not None and tuple(value.shape) != tuple(shape):
        if value.shape.rank != 0:
            raise ValueError(f"get_hyperparameter({name!r}): `initializer` has shape "
                             f"{tuple(value.shape)} but `shape` is {tuple(shape)}.")
        value = tf.fill(shape, value)
    return value


def _name_taken(name: str) -> bool:
    """Whether a live hyperparameter (or component) has the name ``name``."""
    return any(variable_name(v) == name or variable_name(v).startswith(f"{name}_components/")
               for v in hyperparameters())


def get_hyperparameter(name: str, initializer: Any = None, shape: Optional[Sequence[int]] = None,
                       dtype: Optional[tf.DType] = None, collections: Any = None, scalar: bool = False,
                       constraint: Optional[Callable] = None) -> "tf.Variable | HyperparameterComponents":
    """Creates a hyperparameter λ: a registered, non-trainable ``tf.Variable`` (FAR-HO's
    arguments, in FAR-HO's order).

    Args:
        name: name of the variable (components are named ``<name>_components/<i_j...>``). A
            second hyperparameter with the name of a live one gets a warning (TF2 variables are
            not looked up by name: it is another variable).
        initializer: initial value (number, array, tensor), or an initializer (class or instance,
            called with ``shape`` and ``dtype``). Defaults to Glorot uniform, as ``tf.get_variable``.
        shape: shape; needed for initializers, broadcasts a scalar value.
        dtype: dtype. Defaults to the initial value's (a Python float gives float32).
        collections: FAR-HO's TF1 graph collections; TF2 has none, so only `None` is accepted
            (``hyperparameters()`` lists every hyperparameter).
        scalar: build one scalar hyperparameter per element and return them as a
            ``HyperparameterComponents`` that reads as a tensor of ``shape`` (FAR-HO's
            ``ForwardHG`` path).
        constraint: a projection ``λ -> P(λ)`` applied after every outer update, e.g.
            ``lambda lr: tf.clip_by_value(lr, 1e-5, 1.)``. With ``scalar=True`` it is applied to
            each component.

    Returns:
        The variable, or a ``HyperparameterComponents``.

    Example:
        >>> lr = far.get_hyperparameter('lr', 0.01)
        >>> weights = far.get_hyperparameter('weights', tf.zeros(100), scalar=False)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"get_hyperparameter: `name` must be a non-empty string, got {name!r}.")
    if collections is not None:
        raise TypeError(f"get_hyperparameter({name!r}): `collections` names TF1 graph collections, "
                        f"which TF2 does not have; remove the argument: far.hyperparameters() lists "
                        f"every hyperparameter, and `hyper_list=` selects them.")
    if _name_taken(name):
        gc.collect()  # one held only by garbage (an old problem's cycles) is not alive
        if _name_taken(name):
            warnings.warn(f"get_hyperparameter({name!r}): a hyperparameter named {name!r} already exists; "
                          f"this creates another variable of the same name (TF2 does not look variables up "
                          f"by name), and lists and messages will show {name!r} twice. Reuse the first one "
                          f"or choose another name.", UserWarning, stacklevel=2)
    value = _initial_value(name, initializer, shape, dtype)
    if not value.dtype.is_floating:
        raise TypeError(f"get_hyperparameter({name!r}): hyperparameters must be floating point, got "
                        f"dtype {value.dtype.name}; pass `dtype=tf.float32` or a float initializer.")
    if not scalar:
        variable = tf.Variable(value, trainable=False, name=name, constraint=constraint)
        _register(variable)
        return variable
    array = value.numpy()
    components = []
    for index in np.ndindex(*array.shape):
        suffix = "_".join(str(i) for i in index) or "0"
        component = tf.Variable(array[index], trainable=False, constraint=constraint,
                                name=f"{name}_components/{suffix}")
        _register(component)
        components.append(component)
    return HyperparameterComponents(name, components, array.shape)


def as_tf_variable(variable: Any, argument: str) -> tf.Variable:
    """The ``tf.Variable`` behind a ``tf.Variable`` or a ``keras.Variable``; a clear error otherwise."""
    if isinstance(variable, tf.Variable):
        return variable
    if isinstance(variable, keras.Variable) and isinstance(getattr(variable, "value", None), tf.Variable):
        return variable.value
    raise TypeError(f"`{argument}` must contain variables (tf.Variable or keras.Variable), got "
                    f"{type(variable).__name__}: {_short(variable)}. To use a function of "
                    f"hyperparameters, list the hyperparameter variables and compute the function "
                    f"inside the objective or pass it as a callable.")


def hyperparameter_pairs(hyper_list: Iterable[Any], argument: str = "hyper_list") -> list[tuple[tf.Variable, Any]]:
    """``hyper_list`` flattened to ``(tf.Variable, what the user passed)`` pairs: components
    replace ``scalar=True`` hyperparameters, a ``keras.Variable`` is paired with its
    ``tf.Variable``, duplicates are dropped."""
    if isinstance(hyper_list, (tf.Variable, keras.Variable, HyperparameterComponents)):
        hyper_list = [hyper_list]
    pairs, seen = [], set()
    for h in hyper_list:
        for original in (h.components if isinstance(h, HyperparameterComponents) else [h]):
            v = as_tf_variable(original, argument)
            if id(v) not in seen:
                seen.add(id(v))
                pairs.append((v, original))
    return pairs


def flatten_hyperparameters(hyper_list: Iterable[Any], argument: str = "hyper_list") -> list[tf.Variable]:
    """``hyper_list`` as a flat list of ``tf.Variable`` (see ``hyperparameter_pairs``)."""
    return [v for v, _ in hyperparameter_pairs(hyper_list, argument)]


def projected_gradient(hyper: tf.Variable, gradient: Optional[tf.Tensor]) -> Optional[tf.Tensor]:
    """G(λ) = λ − P(λ − ∇), the projected-gradient mapping (step 1) of a hyperparameter whose
    ``constraint`` P is the Euclidean projection onto a closed convex set (∇ itself without a
    constraint): G = 0 exactly at the points satisfying the constrained first-order (KKT)
    conditions, where the raw gradient need not vanish; on a box it is ∇ without the
    components that push an active bound outward."""
    constraint = getattr(hyper, "constraint", None)
    if constraint is None or gradient is None:
        return gradient
    value = tf.convert_to_tensor(hyper)
    return value - tf.convert_to_tensor(constraint(value - tf.cast(gradient, value.dtype)))


def apply_constraints(variables: Iterable[tf.Variable]) -> None:
    """``λ ← P(λ)`` for every variable that has a ``constraint``."""
    for v in variables:
        if getattr(v, "constraint", None) is not None:
            v.assign(v.constraint(v))


def variable_name(variable: tf.Variable) -> str:
    """A readable name (``'lr'`` for ``'lr:0'``)."""
    return re.sub(r":\d+$", "", variable.name)


def describe_all(variables: Iterable[tf.Variable]) -> str:
    """``"['a', 'b']"``: the ``describe`` of each variable, as a list."""
    return f"[{', '.join(describe(v) for v in variables)}]"


def describe(variable: tf.Variable) -> str:
    """The variable's name, with its shape and dtype when the name alone says little (TF's
    default ``'Variable'``): ``"'Variable' (shape (3,), float64)"``."""
    name = variable_name(variable)
    if re.fullmatch(r"Variable(_\d+)?", name):
        return f"{name!r} (shape {tuple(variable.shape)}, {variable.dtype.name})"
    return repr(name)


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) < 80 else text[:77] + "..."
