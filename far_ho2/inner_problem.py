"""The inner problem  min_w L(w, λ),  solved by T steps of an optimizer's dynamics Φ.

Objectives are Python callables that read variables (Keras models, inner variables,
hyperparameters), as FAR-HO users wrote graph tensors. The hypergradient methods see the inner
problem as the transition

    s_{t+1} = Φ(s_t, ∇_w L_t(w_t, λ), η(λ)),       s_0 = Φ₀(λ)

and evaluate it at any stored state s_t by loading w_t into the inner variables, as FAR-HO fed
stored states through ``feed_dict``; under a tape that watches the variables, derivatives with
respect to the variables are derivatives with respect to w_t. A method may step along another
objective than L (``transition(..., objective=)``, e.g. a penalty method's surrogate).
"""

from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import keras
import tensorflow as tf

from far_ho2 import batches as batching
from far_ho2 import dependencies
from far_ho2 import inputs as inputs_lib
from far_ho2 import trajectory as trajectories
from far_ho2.compiled import compiled
from far_ho2.hyperparameters import (HyperparameterComponents, as_tf_variable, describe, hyperparameters,
                                     variable_name)
from far_ho2.types import InnerOptimizer, Objective


def _init_pairs(init_dynamics_dict: Any) -> list[tuple[tf.Variable, Any]]:
    """``init_dynamics_dict`` as ``[(variable, initial), ...]``: it may be such pairs, or a dict
    keyed by ``variable.ref()`` (TF2 variables are not hashable)."""
    if init_dynamics_dict is None:
        return []
    if isinstance(init_dynamics_dict, dict):
        items = []
        for key, value in init_dynamics_dict.items():
            if not hasattr(key, "deref"):
                raise TypeError("`init_dynamics_dict` keys must be `variable.ref()` (TF2 variables "
                                f"are not hashable), got {type(key).__name__}; or pass a list of "
                                "(variable, initial_value) pairs.")
            items.append((key.deref(), value))
    else:
        items = list(init_dynamics_dict)
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in items):
            raise TypeError("`init_dynamics_dict` must be a list of (variable, initial_value) pairs "
                            "or a dict {variable.ref(): initial_value}.")
    return [(as_tf_variable(v, "init_dynamics_dict"), init) for v, init in items]


def reinitialize(model: keras.Model) -> None:
    """Draws every weight of a Keras model again from its layers' initializers: the TF2
    counterpart of running ``tf.global_variables_initializer()`` before a new FAR-HO problem
    (a new ``HyperOptimizer`` starts the inner variables from the values they hold). Works for
    models ``keras.models.clone_model`` can clone (Sequential and functional ones)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}; for variables, "
                        f"assign their initial values directly.")
    model.set_weights(keras.models.clone_model(model).get_weights())


class InnerProblem:
    """One inner problem (FAR-HO's ``OptimizerDict``): an objective, an optimizer, the inner
    variables ``var_list`` and their initial values Φ₀.

    Args:
        objective: the inner objective L: a callable taking the batch, or nothing, and returning
            a scalar. It reads the inner variables (and maybe hyperparameters).
        optimizer: a ``far_ho2.Optimizer`` (its dynamics Φ).
        var_list: the inner variables w. Defaults to the trainable variables ``objective`` reads
            (found on the first ``run``), less the hyperparameters.
        init_dynamics_dict: Φ₀ for some variables: ``[(variable, initial), ...]`` or
            ``{variable.ref(): initial}``; ``initial`` is a tensor, a hyperparameter variable (a
            learned initialisation), another model's weight or a callable returning a tensor.
            Other variables start every run from their values when the problem was created (or
            first run).
        features: optional callable ``batch -> inputs``: the objective receives ``inputs`` instead
            of the batch. It may read hyperparameters (a representation h_λ) but not the inner
            variables; for a batch that is the same at every step it is evaluated and
            differentiated once per run instead of once per step.
    """

    def __init__(self, objective: Callable, optimizer: InnerOptimizer, var_list: Optional[Iterable] = None,
                 init_dynamics_dict: Any = None, features: Optional[Callable] = None):
        if not isinstance(optimizer, InnerOptimizer):
            raise TypeError("`inner_objective_optimizer` must be a far_ho2 optimizer "
                            "(far.GradientDescentOptimizer, far.MomentumOptimizer, "
                            f"far.AdamOptimizer), got {type(optimizer).__name__}: Keras "
                            "optimizers update in place and cannot be differentiated.")
        self.takes_batch = batching.takes_batch(objective, "inner_objective")
        if features is not None and not callable(features):
            raise TypeError(f"`features` must be a callable batch -> inputs, got {type(features).__name__}.")
        self.objective, self.optimizer, self.features = objective, optimizer, features
        self.dynamics = optimizer.dynamics
        self._init = _init_pairs(init_dynamics_dict)
        self.var_list: Optional[list[tf.Variable]] = None
        self._initial_values: list[Any] = []
        self._compiled: dict = {}
        self._streams = batching.Streams()
        if var_list is not None:
            self._set_var_list(var_list)

    # -- setting up -------------------------------------------------------------------------

    @property
    def resolved(self) -> bool:
        return self.var_list is not None

    def resolve(self, batch: Any, exclude: Sequence[tf.Variable]) -> None:
        """Finds the default ``var_list`` by evaluating the objective once (eagerly) on ``batch``."""
        if self.resolved:
            return
        excluded = {id(v) for v in exclude}
        with tf.GradientTape() as tape:
            try:
                batching.call_objective(self.objective, self.inputs(batch))
            except (TypeError, ValueError, tf.errors.InvalidArgumentError) as error:
                dependencies.explain_dtype_error(error, exclude, tape.watched_variables())
                raise
        read = [v for v in tape.watched_variables() if id(v) not in excluded]
        if not read:
            raise ValueError("`var_list` is empty: the inner objective reads no trainable variable "
                             "other than hyperparameters. Pass `var_list` explicitly.")
        self._set_var_list(read)

    def _set_var_list(self, var_list: Iterable) -> None:
        if isinstance(var_list, (tf.Variable, keras.Variable)):
            var_list = [var_list]
        var_list = [as_tf_variable(v, "var_list") for v in var_list]
        if not var_list:
            raise ValueError("`var_list` is empty: the inner problem needs at least one variable.")
        dtypes = {v.dtype for v in var_list}
        if len(dtypes) > 1 or not var_list[0].dtype.is_floating:
            raise TypeError(f"`var_list` variables must share one floating dtype, got "
                            f"{sorted(d.name for d in dtypes)}.")
        positions = {id(v): i for i, v in enumerate(var_list)}
        initial: list[Any] = [None] * len(var_list)
        for v, init in self._init:
            if id(v) not in positions:
                raise ValueError(f"`init_dynamics_dict` sets variable {describe(v)}, which is not in "
                                 f"`var_list` [{', '.join(describe(x) for x in var_list)}].")
            if isinstance(init, (tf.Variable, keras.Variable)):
                init = as_tf_variable(init, "init_dynamics_dict")
            elif isinstance(init, HyperparameterComponents):
                init = init.value
            elif not callable(init):
                init = tf.convert_to_tensor(init, v.dtype)
            if hasattr(init, "shape") and tuple(init.shape) != tuple(v.shape):
                raise ValueError(f"`init_dynamics_dict`: the initial value of {describe(v)} has shape "
                                 f"{tuple(init.shape)}, the variable {tuple(v.shape)}.")
            initial[positions[id(v)]] = init
        for i, v in enumerate(var_list):
            if initial[i] is None:  # Φ₀ = the value now, kept in a private variable
                initial[i] = tf.Variable(v.read_value(), trainable=False, name=f"{variable_name(v)}_init")
        self.var_list, self._initial_values = var_list, initial

    @property
    def initial_values(self) -> list[Any]:
        """What Φ₀ reads, per inner variable: a variable (the value at set-up, a hyperparameter
        or another model's weight), a tensor, or a callable."""
        return list(self._initial_values)

    def run(self, T: Any, inner_objective_feed_dicts: Any = None) -> tf.Tensor:
        """Solves the inner problem alone: resets the variables to Φ₀ and runs T steps of Φ
        (compiled), leaving w_T in the variables; no hypergradient (e.g. to evaluate
        hyperparameters). Returns the inner objective's values L_0 … L_{T−1}. If the run
        diverges, the variables keep their values and a ``FloatingPointError`` names the step."""
        T = batching.check_steps(T)
        supplier = self._streams.supplier(inner_objective_feed_dicts, "inner_objective_feed_dicts")
        batching.check_supplier(self.takes_batch, supplier, "inner_objective", "inner_objective_feed_dicts")
        batches = batching.inner_batches(supplier, T)
        self.resolve(batching.first_batch(batches), hyperparameters())
        self.optimizer.begin_run()
        if batches.per_step not in self._compiled:
            self._compiled[batches.per_step] = compiled(
                lambda steps, data: self._run(steps, batching.Batches(data, batches.per_step)),
                float64=self.dtype == tf.float64)
        trajectory = self._compiled[batches.per_step](tf.constant(T), batches.data)
        trajectories.raise_if_diverged(self, trajectory.final, trajectory.health)
        return trajectory.losses

    def _run(self, steps: tf.Tensor, batches: batching.Batches) -> trajectories.Trajectory:
        before = [v.read_value() for v in self.var_list]
        s0 = self.initial_state()
        inputs = inputs_lib.prepare(self, batches, [])
        trajectory = trajectories.run_steps(self, trajectories.empty_trajectory(s0, steps), inputs.at, 0, steps)
        self.keep_if_healthy(before, trajectories.all_healthy(trajectory.health))
        return trajectory._replace(losses=trajectory.losses.stack())

    def keep_if_healthy(self, before: Sequence[tf.Tensor], healthy: tf.Tensor) -> None:
        """Inside compiled code: the variables get back ``before`` unless ``healthy``."""
        for v, old in zip(self.var_list, before):
            v.assign(tf.where(healthy, v.read_value(), old))

    # -- the transition, used by the hypergradient methods inside compiled code --------------------

    @property
    def dtype(self) -> tf.DType:
        return self.var_list[0].dtype

    def initial_weights(self) -> list[tf.Tensor]:
        """w₀ = Φ₀(λ), differentiable in the hyperparameters it reads."""
        values = []
        for v, init in zip(self.var_list, self._initial_values):
            value = tf.convert_to_tensor(init() if callable(init) else init)
            if value.dtype != v.dtype:
                value = tf.cast(value, v.dtype)
            if not value.shape.is_compatible_with(v.shape):
                raise ValueError(f"`init_dynamics_dict`: the initial value of {describe(v)} has shape "
                                 f"{value.shape}, the variable {tuple(v.shape)}.")
            values.append(value)
        return values

    def initial_state(self) -> NamedTuple:
        """s₀ = Φ₀(λ): the initial weights and the optimizer's initial slots."""
        return self.dynamics.init(self.initial_weights())

    def current_state(self) -> NamedTuple:
        """The state whose weights the variables hold now, with fresh optimizer slots."""
        return self.dynamics.init([v.read_value() for v in self.var_list])

    def load(self, weights: Sequence[tf.Tensor]) -> None:
        """Writes w into the inner variables."""
        for v, w in zip(self.var_list, weights):
            v.assign(w)

    def inputs(self, batch: Any) -> Any:
        """What the objective receives: ``features(batch)``, or the batch."""
        if self.features is None or batch is None:
            return batch
        return self.features(batch)

    def loss(self, inputs: Any) -> tf.Tensor:
        """L(w, λ) at the weights held by the variables (summed if the objective is a tensor)."""
        return batching.scalar_objective(self.objective, inputs)

    def gradient(self, inputs: Any, objective: Optional[Objective] = None) -> tuple[list[tf.Tensor], tf.Tensor]:
        """(∇_w L, L) at the weights the variables hold (of ``objective`` instead of L if given)."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.var_list)
            loss = (objective or self.loss)(inputs)
        grads = tape.gradient(loss, self.var_list)
        for v, g in zip(self.var_list, grads):
            if g is None:
                raise ValueError(f"The inner objective does not depend on {describe(v)}, which is "
                                 f"in `var_list`; remove it from `var_list`.")
        return [tf.convert_to_tensor(g) for g in grads], loss  # densify IndexedSlices

    def _value_at(self, objective: Objective, weights: Sequence[tf.Tensor], inputs: Any) -> tf.Tensor:
        """``objective`` at other weights w', not differentiated; the variables keep their values."""
        current = [v.read_value() for v in self.var_list]
        self.load([tf.stop_gradient(w) for w in weights])
        value = tf.stop_gradient(objective(inputs))
        self.load(current)
        return value

    def transition(self, state: NamedTuple, inputs: Any, step: Any, objective: Optional[Objective] = None,
                   rate_scale: Optional[tf.Tensor] = None, search: bool = True) -> tuple[NamedTuple, tf.Tensor]:
        """(s', L_t):  s' = Φ(s, ∇_w L_t(w, λ), η(λ)) with w read from the variables, which must
        hold ``state.w``; differentiable in the variables, the slots and the hyperparameters.
        ``objective(inputs)`` replaces L_t (in the step and in a line search's evaluations);
        ``rate_scale`` multiplies the optimizer's learning rate η; ``search=False`` skips the
        optimizer's line search (its factor then comes in ``rate_scale``, see ``search_scale``)."""
        w = [tf.convert_to_tensor(v) for v in self.var_list]
        objective = objective or self.loss
        grads, loss = self.gradient(inputs, objective)
        params = self.optimizer.params(step, self.dtype)
        if rate_scale is not None:
            params = params._replace(learning_rate=params.learning_rate * tf.cast(rate_scale, self.dtype))
        if search:
            params = self.optimizer.adapt(params, w, loss, grads, lambda other: self._value_at(objective, other, inputs))
        return self.dynamics.step(state._replace(w=w), grads, params), loss

    def search_scale(self, inputs: Any, step: Any) -> Optional[tf.Tensor]:
        """The factor the optimizer's line search puts on η at the weights the variables hold,
        not differentiated (None for an optimizer without one): forward mode runs the search
        before its accumulators (a search assigns the variables inside a loop, which
        ``tf.autodiff.ForwardAccumulator`` cannot follow) and gives this factor to
        ``transition(..., rate_scale=, search=False)``."""
        if not getattr(self.optimizer, "searches", False):
            return None
        w = [tf.convert_to_tensor(v) for v in self.var_list]
        grads, loss = self.gradient(inputs)
        params = self.optimizer.params(step, self.dtype)
        adapted = self.optimizer.adapt(params, w, loss, grads, lambda other: self._value_at(self.loss, other, inputs))
        return tf.stop_gradient(adapted.learning_rate / params.learning_rate)

    def state_sources(self, state: NamedTuple) -> list:
        """What to watch to differentiate with respect to the state: the inner variables in place
        of w (they hold it), then the slot tensors."""
        return list(self.var_list) + tf.nest.flatten(state)[len(self.var_list):]

    def state_names(self, state: NamedTuple) -> list[str]:
        """Readable names of the flattened state components, for error messages."""
        names = []
        for field, value in zip(state._fields, state):
            if isinstance(value, (list, tuple)):
                names += [f"{field} of {describe(v)}" for v in self.var_list]
            else:
                names.append(field)
        return names
