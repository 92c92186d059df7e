"""FAR-HO's inner optimizers: façades over the pure dynamics of ``far_ho2.dynamics``.

Each parameter (learning rate, momentum, betas, epsilon) is a number, a hyperparameter variable,
or a callable returning a tensor: ``lambda: tf.sigmoid(beta)`` for a function of hyperparameters,
or ``step -> value`` (one argument, e.g. a ``keras.optimizers.schedules.LearningRateSchedule``)
for a schedule. Callables are evaluated inside every differentiated step, so the hypergradient
reaches the hyperparameters they read. (A tensor computed once from a variable in eager mode is
a constant; that is why functions of hyperparameters are callables, and why a concrete tensor
given while hyperparameters exist gets a warning.)

The same objects are valid *outer* optimizers: ``apply_gradients`` updates the hyperparameters
in place, like a Keras optimizer, keeping its slots (momenta) in variables (``variables``) that
a ``tf.train.Checkpoint`` can save once ``build`` has created them.
"""

import inspect
import math
import warnings
from typing import Any, Callable, Iterable, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf

from far_ho2 import dynamics as dyn
from far_ho2.hyperparameters import HyperparameterComponents, as_tf_variable, hyperparameters
from far_ho2.inner_problem import InnerProblem


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


def _is_concrete_tensor(spec: Any) -> bool:
    return isinstance(spec, tf.Tensor) and not isinstance(spec, tf.Variable) and hasattr(spec, "numpy")


class Optimizer:
    """Base class of the differentiable inner optimizers (FAR-HO's ``far.Optimizer``).

    Subclasses set ``dynamics`` (a pure ``Dynamics``) and ``params_type`` (its parameters'
    NamedTuple, whose fields are the constructor's parameters).
    """

    dynamics: dyn.Dynamics
    params_type: type

    def __init__(self, name: str, bounds: dict, **params: Any):
        self.name = name
        self._params = params
        for field, spec in params.items():
            if callable(spec) and not _is_value(spec):
                continue
            if isinstance(spec, (int, float, np.floating)) and not isinstance(spec, bool):
                low, high = bounds[field]
                if not (math.isfinite(spec) and low <= spec < high):
                    raise ValueError(f"{type(self).__name__}: `{field}` must be in [{low}, {high}), "
                                     f"got {spec!r}.")
            elif not _is_value(spec):
                raise TypeError(f"{type(self).__name__}: `{field}` must be a number, a "
                                f"hyperparameter variable or a callable, got {type(spec).__name__}.")
        #: parameters given as concrete tensors while hyperparameters exist (maybe frozen functions of them)
        self.frozen = [f for f, s in params.items() if _is_concrete_tensor(s)] if hyperparameters() else []
        for field in self.frozen:
            warnings.warn(
                f"{type(self).__name__}: `{field}` is a concrete tensor "
                f"({np.asarray(params[field]).tolist()}), evaluated once: if it was computed from "
                f"hyperparameters, it stays frozen at this value and they get no hypergradient "
                f"through it. Pass a callable instead, e.g. `{field}=lambda: tf.nn.sigmoid(beta)`.",
                UserWarning, stacklevel=3)
        self._steps = {f: callable(s) and not _is_value(s) and _takes_step(s) for f, s in params.items()}
        self._slots: list[list[tf.Variable]] = []  # outer use: the slots of each updated variable
        self._slot_index: dict[int, int] = {}
        self._iterations: Optional[tf.Variable] = None  # outer use: created by `build` (not inside tf.function)

    @property
    def learning_rate(self) -> Any:
        return self._params["learning_rate"]

    def params(self, step: Any, dtype: tf.DType) -> NamedTuple:
        """The optimizer's parameters at inner step ``step`` as tensors of ``dtype``; evaluated
        inside a tape, they are differentiable in the hyperparameters they read."""
        return self.params_type(**self._values(step, dtype))

    def _values(self, step: Any, dtype: tf.DType) -> dict:
        """The constructor's parameters at ``step``, as tensors of ``dtype``."""
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
        return values

    #: whether ``adapt`` searches (evaluates the objective elsewhere than at w).
    searches: bool = False

    def adapt(self, params: NamedTuple, weights: list, loss: tf.Tensor, grads: list,
              loss_at: Callable[[list], tf.Tensor]) -> NamedTuple:
        """The parameters of one step once the objective has been looked at: ``loss`` = L(w),
        ``grads`` = ∇_w L(w) at ``weights`` = w, and ``loss_at(w')`` = L(w') (not
        differentiated). The identity here; a line search overrides it."""
        return params

    def begin_run(self) -> None:
        """Called once before each run of the dynamics (a hyper-iteration), outside compiled
        code; nothing here (a stochastic optimizer counts its runs)."""

    @property
    def run_variables(self) -> list[tf.Variable]:
        """The state ``begin_run`` changes, to checkpoint with the inner variables (none here)."""
        return []

    def minimize(self, loss: Callable, var_list: Optional[Iterable] = None,
                 init_dynamics_dict: Any = None, features: Optional[Callable] = None) -> InnerProblem:
        """The inner problem ``min_w loss`` solved by this optimizer (FAR-HO's ``OptimizerDict``)."""
        return InnerProblem(loss, self, var_list, init_dynamics_dict, features)

    # -- as an outer optimizer --------------------------------------------------------------------

    @property
    def iterations(self) -> tf.Variable:
        """The number of outer updates (a variable, created by ``build``)."""
        if self._iterations is None:
            self._iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{self.name}_iterations")
        return self._iterations

    @property
    def variables(self) -> list[tf.Variable]:
        """The outer-use state: the iteration count and the slots of every updated variable."""
        return [self.iterations] + [v for slots in self._slots for v in slots]

    def build(self, var_list: Iterable) -> None:
        """Creates the slots of ``var_list`` (zeros, as at the first update), so that a checkpoint
        can restore them before any update."""
        self.iterations  # noqa: B018  (created now, outside any tf.function)
        for var in var_list:
            var = as_tf_variable(var, "var_list")
            if id(var) not in self._slot_index:
                state = self.dynamics.init([var.read_value()])
                self._slot_index[id(var)] = len(self._slots)
                self._slots.append([tf.Variable(x, trainable=False, name=f"{self.name}_slot")
                                    for x in tf.nest.flatten(state)[1:]])

    def apply_gradients(self, grads_and_vars: Iterable) -> None:
        """One update ``λ ← Φ(λ, ∇λ)`` of the given variables: this optimizer as outer optimizer."""
        pairs = [(grad, as_tf_variable(var, "grads_and_vars")) for grad, var in grads_and_vars]
        self.build([var for _, var in pairs])
        params: dict = {}  # per dtype
        for grad, var in pairs:
            slots = self._slots[self._slot_index[id(var)]]
            template = self.dynamics.init([var.read_value()])
            state = tf.nest.pack_sequence_as(template, [var.read_value()] + [s.read_value() for s in slots])
            if var.dtype not in params:
                params[var.dtype] = self.params(self.iterations, var.dtype)
            state = self.dynamics.step(state, [tf.convert_to_tensor(grad, var.dtype)], params[var.dtype])
            flat = tf.nest.flatten(state)
            var.assign(flat[0])
            for slot, value in zip(slots, flat[1:]):
                slot.assign(value)
        self.iterations.assign_add(1)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{type(self).__name__}({params})"


_NONNEG, _UNIT = (0.0, math.inf), (0.0, 1.0)


class GradientDescentOptimizer(Optimizer):
    """Gradient descent, ``w' = w − η·∇L`` (``far_ho2.dynamics.gradient_descent``).
    ``use_locking`` (FAR-HO's, from ``tf.train``) is accepted and has no effect in TF2."""

    params_type = dyn.GradientDescentParams

    def __init__(self, learning_rate: Any, use_locking: bool = False, name: str = "GradientDescent"):
        self.dynamics = dyn.gradient_descent()
        super().__init__(name, {"learning_rate": _NONNEG}, learning_rate=learning_rate)


class BackTrackingGradientDescentOptimizer(GradientDescentOptimizer):
    """Gradient descent with an Armijo back-tracking line search (FAR-HO's optimizer of the
    same name): at each step the rate is  η_t = η·τ^j  for the least j ≥ 0 with

        L(w − η τ^j ∇L) ≤ L(w) − c·η τ^j ‖∇L‖²       (j ≤ ``max_backtracks``)

    and  w' = w − η_t ∇L(w).  j is found without differentiation and held constant, so the
    hypergradient flows through w, ∇L and η (∂η_t/∂η = τ^j), as FAR-HO's graph did. The search
    costs up to j + 1 more evaluations of L per step, and the reverse pass repeats them.

    FAR-HO's ``minimize`` took ``loss(var_list)``; here, as for the other optimizers, the
    objective reads the variables: write ``lambda: loss(var_list)``.

    Args:
        learning_rate: η, the first rate tried.
        c: the sufficient-decrease constant, in (0, 1). Defaults to `0.5`.
        tau: τ, the shrink factor, in (0, 1). Defaults to `0.5`.
        use_locking: accepted for FAR-HO compatibility; no effect.
        name: a name.
        max_backtracks: the most shrinks per step (FAR-HO had no limit). Defaults to `30`.
    """

    searches = True

    def __init__(self, learning_rate: Any, c: float = 0.5, tau: float = 0.5, use_locking: bool = False,
                 name: str = "GradientDescent", *, max_backtracks: int = 30):
        super().__init__(learning_rate, use_locking, name)
        for argument, value in (("c", c), ("tau", tau)):
            if not 0 < value < 1:
                raise ValueError(f"BackTrackingGradientDescentOptimizer: `{argument}` must be in "
                                 f"(0, 1), got {value!r}.")
        if isinstance(max_backtracks, bool) or not isinstance(max_backtracks, int) or max_backtracks < 0:
            raise ValueError(f"`max_backtracks` must be a non-negative int, got {max_backtracks!r}.")
        self.c, self.tau, self.max_backtracks = c, tau, max_backtracks

    def adapt(self, params: NamedTuple, weights: list, loss: tf.Tensor, grads: list,
              loss_at: Callable[[list], tf.Tensor]) -> NamedTuple:
        dtype = loss.dtype
        squared_norm = tf.stop_gradient(tf.add_n([tf.reduce_sum(g * g) for g in grads]))
        eta, c, tau = tf.stop_gradient(params.learning_rate), tf.constant(self.c, dtype), tf.constant(self.tau, dtype)
        weights, grads, loss = ([tf.stop_gradient(x) for x in weights], [tf.stop_gradient(g) for g in grads],
                                tf.stop_gradient(loss))

        def body(j, scale, accepted):
            rate = eta * scale
            trial = loss_at([w - rate * g for w, g in zip(weights, grads)])
            accepted = trial <= loss - c * rate * squared_norm  # False for a NaN trial: shrink
            return j + 1, tf.where(accepted, scale, scale * tau), accepted

        _, scale, _ = tf.while_loop(lambda j, scale, accepted: (j < self.max_backtracks) & ~accepted, body,
                                    (tf.constant(0), tf.ones((), dtype), tf.constant(False)))
        return params._replace(learning_rate=params.learning_rate * tf.stop_gradient(scale))


class MomentumOptimizer(Optimizer):
    """Heavy-ball momentum ``m' = μm + ∇L, w' = w − ηm'`` (``far_ho2.dynamics.momentum``), in
    FAR-HO's argument order; ``use_nesterov=True`` is Nesterov's variant (FAR-HO had none)."""

    params_type = dyn.MomentumParams

    def __init__(self, learning_rate: Any, momentum: Any, use_locking: bool = False,
                 name: str = "Momentum", use_nesterov: bool = False):
        self.use_nesterov = use_nesterov
        self.dynamics = dyn.momentum(nesterov=use_nesterov)
        super().__init__(name, {"learning_rate": _NONNEG, "momentum": _UNIT},
                         learning_rate=learning_rate, momentum=momentum)


class AdamOptimizer(Optimizer):
    """FAR-HO's Adam: ε inside the square root (``far_ho2.dynamics.adam``); default ε = 1e-5."""

    params_type = dyn.AdamParams

    def __init__(self, learning_rate: Any = 0.001, beta1: Any = 0.9, beta2: Any = 0.999,
                 epsilon: Any = 1e-5, use_locking: bool = False, name: str = "Adam"):
        self.dynamics = dyn.adam()
        super().__init__(name, {"learning_rate": _NONNEG, "beta1": _UNIT, "beta2": _UNIT,
                                "epsilon": _NONNEG},
                         learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon)


class SGLDOptimizer(Optimizer):
    """Stochastic gradient Langevin dynamics (``far_ho2.dynamics.langevin``): the inner problem
    becomes the distribution p(w | λ) ∝ exp(−L(w, λ)/τ), and T steps are a Markov chain

        w' = w − ε ∇_w L(w, λ) + √(2ετ)·ξ

    whose noise ξ is a deterministic function of (``seed``, run, step): run r's step t always
    draws the same ξ, so a reverse pass that recomputes steps sees the noise of the forward
    pass, and ReverseHG / ForwardHG through a chain give the exact pathwise derivative for that
    noise. ``runs`` counts the runs (a variable: checkpoint it to resume the same noise
    sequence; assign it to replay a run).

    Args:
        learning_rate: ε, the step size (a number, a hyperparameter or a callable, as for the
            other optimizers).
        temperature: τ. Defaults to `1.0`.
        seed: the noise's seed. Defaults to `0`.
        name: a name.

    References:
        Welling, Teh. Bayesian Learning via Stochastic Gradient Langevin Dynamics. ICML 2011.
    """

    params_type = dyn.LangevinParams

    def __init__(self, learning_rate: Any, temperature: Any = 1.0, seed: int = 0, name: str = "SGLD"):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"SGLDOptimizer: `seed` must be an int, got {seed!r}.")
        self.dynamics = dyn.langevin()
        self.seed = int(seed)
        super().__init__(name, {"learning_rate": _NONNEG, "temperature": _NONNEG},
                         learning_rate=learning_rate, temperature=temperature)
        self.runs = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}_runs",  # one count for all replicas
                                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def params(self, step: Any, dtype: tf.DType) -> dyn.LangevinParams:
        run_seed = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 0], tf.int64), self.runs)
        seed = tf.random.experimental.stateless_fold_in(run_seed, tf.cast(step, tf.int64))
        return dyn.LangevinParams(**self._values(step, dtype), seed=seed)

    def begin_run(self) -> None:
        self.runs.assign_add(1)

    @property
    def run_variables(self) -> list[tf.Variable]:
        return [self.runs]
