"""FAR-HO's inner optimizers: façades over the pure dynamics of ``far_ho2.dynamics``.

Each parameter (learning rate, momentum, betas, epsilon) is a number, a hyperparameter variable,
or a callable returning a tensor: ``lambda: tf.sigmoid(beta)`` for a function of hyperparameters,
or ``step -> value`` (one argument, e.g. a ``keras.optimizers.schedules.LearningRateSchedule``)
for a schedule. Callables are evaluated inside every differentiated step, so the hypergradient
reaches the hyperparameters they read. (A tensor computed once from a variable in eager mode is
a constant; that is why functions of hyperparameters are callables.)

The same objects are valid *outer* optimizers: ``apply_gradients`` updates the hyperparameters
in place, like a Keras optimizer.
"""

import inspect
import math
from typing import Any, Callable, Iterable, NamedTuple, Optional

import keras
import tensorflow as tf

from far_ho2 import dynamics as dyn
from far_ho2.hyperparameters import HyperparameterComponents, as_tf_variable


def _takes_step(spec: Callable) -> bool:
    if isinstance(spec, keras.optimizers.schedules.LearningRateSchedule):
        return True
    try:
        params = inspect.signature(spec).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in params)


def _is_value(spec: Any) -> bool:
    return isinstance(spec, (tf.Variable, keras.Variable, HyperparameterComponents, tf.Tensor))


class Optimizer:
    """Base class of the differentiable inner optimizers (FAR-HO's ``far.Optimizer``).

    Subclasses set ``dynamics`` (a pure ``Dynamics``) and ``hypers_type`` (its hyperparameter
    NamedTuple, whose fields are the constructor's parameters).
    """

    dynamics: dyn.Dynamics
    hypers_type: type

    def __init__(self, name: str, bounds: dict, **params: Any):
        self.name = name
        self._params = params
        for field, spec in params.items():
            if callable(spec) and not _is_value(spec):
                continue
            if isinstance(spec, (int, float)) and not isinstance(spec, bool):
                low, high = bounds[field]
                if not (math.isfinite(spec) and low <= spec < high):
                    raise ValueError(f"{type(self).__name__}: `{field}` must be in [{low}, {high}), "
                                     f"got {spec!r}.")
            elif not _is_value(spec):
                raise TypeError(f"{type(self).__name__}: `{field}` must be a number, a "
                                f"hyperparameter variable or a callable, got {type(spec).__name__}.")
        self._steps = {f: callable(s) and not _is_value(s) and _takes_step(s) for f, s in params.items()}
        self._outer_states: dict[int, NamedTuple] = {}
        self._outer_iterations = 0

    @property
    def learning_rate(self) -> Any:
        return self._params["learning_rate"]

    def hypers(self, step: Any, dtype: tf.DType) -> NamedTuple:
        """The optimizer's parameters at inner step ``step`` as tensors of ``dtype``; evaluated
        inside a tape, they are differentiable in the hyperparameters they read."""
        values = {}
        for field, spec in self._params.items():
            if isinstance(spec, (tf.Variable, keras.Variable)):
                value = as_tf_variable(spec, field)
            elif isinstance(spec, HyperparameterComponents):
                value = spec.value()
            elif callable(spec) and not _is_value(spec):
                value = spec(step) if self._steps[field] else spec()
            else:
                value = spec
            if isinstance(value, (int, float)):  # no float32 detour for float64 problems
                value = tf.constant(value, dtype)
            value = tf.convert_to_tensor(value)
            values[field] = value if value.dtype == dtype else tf.cast(value, dtype)
        return self.hypers_type(**values)

    def minimize(self, loss: Callable, var_list: Optional[Iterable] = None,
                 init_dynamics_dict: Any = None, features: Optional[Callable] = None):
        """The inner problem ``min_w loss`` solved by this optimizer (FAR-HO's ``OptimizerDict``)."""
        from far_ho2.inner_problem import InnerProblem
        return InnerProblem(loss, self, var_list, init_dynamics_dict, features)

    def apply_gradients(self, grads_and_vars: Iterable) -> None:
        """One update ``λ ← Φ(λ, ∇λ)`` of the given variables: this optimizer as outer optimizer."""
        self._outer_iterations += 1
        for grad, var in grads_and_vars:
            var = as_tf_variable(var, "grads_and_vars")
            state = self._outer_states.get(id(var)) or self.dynamics.init([var.read_value()])
            state = state._replace(w=[var.read_value()])
            state = self.dynamics.step(state, [tf.convert_to_tensor(grad, var.dtype)],
                                       self.hypers(self._outer_iterations - 1, var.dtype))
            var.assign(state.w[0])
            self._outer_states[id(var)] = state

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{type(self).__name__}({params})"


_NONNEG, _UNIT = (0.0, math.inf), (0.0, 1.0)


class GradientDescentOptimizer(Optimizer):
    """Gradient descent, ``w' = w − η·∇L`` (``far_ho2.dynamics.gradient_descent``)."""

    hypers_type = dyn.GradientDescentHypers

    def __init__(self, learning_rate: Any, name: str = "GradientDescent"):
        self.dynamics = dyn.gradient_descent()
        super().__init__(name, {"learning_rate": _NONNEG}, learning_rate=learning_rate)


class MomentumOptimizer(Optimizer):
    """Heavy-ball momentum ``m' = μm + ∇L, w' = w − ηm'`` (``far_ho2.dynamics.momentum``)."""

    hypers_type = dyn.MomentumHypers

    def __init__(self, learning_rate: Any, momentum: Any, use_nesterov: bool = False,
                 name: str = "Momentum"):
        self.use_nesterov = use_nesterov
        self.dynamics = dyn.momentum(nesterov=use_nesterov)
        super().__init__(name, {"learning_rate": _NONNEG, "momentum": _UNIT},
                         learning_rate=learning_rate, momentum=momentum)


class AdamOptimizer(Optimizer):
    """FAR-HO's Adam: ε inside the square root (``far_ho2.dynamics.adam``); default ε = 1e-5."""

    hypers_type = dyn.AdamHypers

    def __init__(self, learning_rate: Any = 0.001, beta1: Any = 0.9, beta2: Any = 0.999,
                 epsilon: Any = 1e-5, name: str = "Adam"):
        self.dynamics = dyn.adam()
        super().__init__(name, {"learning_rate": _NONNEG, "beta1": _UNIT, "beta2": _UNIT,
                                "epsilon": _NONNEG},
                         learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon)
