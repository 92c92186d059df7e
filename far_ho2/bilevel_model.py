"""``BilevelModel``: any bilevel problem as a Keras model, trained by ``fit``.

    min_λ E(w_T(λ), λ),    w_T = T steps of an inner optimizer on L(w, λ)

Each element of the dataset given to ``fit`` is one hyper-iteration's data, ``(inner_batch,
outer_batch)``; ``train_step`` runs ``far_ho2.engine.step`` on it, the same traced step as
``HyperOptimizer.run`` (the method's directions, the guard, the compiled optimizer's update of
λ, the method's own step), so a hyperparameter trained by ``fit`` follows the same path as by
``HyperOptimizer``. Keras does the rest: callbacks, ``BackupAndRestore``, ``CSVLogger``,
TensorBoard, ``evaluate`` (E on an outer batch at the inner solution of an inner batch).

    net = keras.Sequential([...])                         # w: the inner variables
    decay = keras.Variable(-3.0, name="log_decay")        # λ (Keras variables are saved with the model)
    model = far.BilevelModel(
        inner_objective=lambda b: loss(net(b[0]), b[1]) + exp(decay) * l2(net),
        outer_objective=lambda b: loss(net(b[0]), b[1]),
        inner_optimizer=far.GradientDescentOptimizer(0.1), steps=50,
        inner_variables=net, hyperparameters=[decay])
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    model.fit(tf.data.Dataset.from_tensors((train, valid)).repeat(), steps_per_epoch=100)

A failed hyper-iteration (the guard's, ``far_ho2.guard``) changes nothing and stops ``fit`` with a
``far.DivergenceError`` naming the hyper-iteration and the part that failed.

Saving: the weights (λ, the Keras inner variables, Φ₀, the optimizer's slots) with
``save_weights`` or ``BackupAndRestore``, loaded into the model built again in code (after
``compile`` and ``resolve``); its objectives are callables, so it is not a ``.keras`` file
(``get_config`` says so), unlike a subclass with a config (``hyper_repr.HyperRepresentation``).

A subclass specialises the step, not rewrites it: ``_prepare_step`` sets the inner problem up for
each element (e.g. new inner variables' values, ``HyperGradient.restart``), ``_outer_pairs``
processes the directions the optimizer applies (e.g. clipping the meta-batch's), ``_diverged``
says what ``fit`` does after a failed step; ``hyper_repr.HyperRepresentation`` is one.

Under ``tf.distribute`` (the model built in ``strategy.scope()``), ``fit`` splits a meta-batch:
each element holds B independent problems on a leading axis, L = Σ_j L_j and E = mean_j E_j;
replica r solves B/R of them with its own inner variables (``far.distribute.local_variables``,
Φ₀ given by ``init_dynamics_dict``), every method computes the meta-batch's quantities where
its step couples the problems (``far_ho2.sharding``), and the compiled optimizer's all-reduce
sums the replicas' directions: the hyperparameters follow the one-device run (tests/test_doors.py).

    with strategy.scope():
        lam = tf.Variable(...)
        with far.distribute.local_variables():
            w = tf.Variable(tf.zeros([B // strategy.num_replicas_in_sync, d]))
        model = far.BilevelModel(L, E, far.GradientDescentOptimizer(0.1), steps=T, inner_variables=[w],
                                 hyperparameters=[lam], init_dynamics_dict=[(w, lambda: tf.zeros_like(w))])
        model.compile(optimizer=keras.optimizers.Adam(0.05))
    model.fit(meta_batches, steps_per_epoch=100)
"""

from typing import Any, Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from far_ho2 import batches as batching
from far_ho2 import distribute, engine, guard, sharding
from far_ho2 import inputs as inputs_lib
from far_ho2.compiled import without_grappler
from far_ho2.hypergradients.base import HyperGradient
from far_ho2.hypergradients.reverse import ReverseHG
from far_ho2.hyperparameters import apply_constraints, flatten_hyperparameters
from far_ho2.inner_problem import InnerProblem
from far_ho2.trajectory import empty_trajectory, run_steps
from far_ho2.types import InnerOptimizer

PHASES = {engine.RUN: "the run (inner states, E or the hypergradient)", engine.UPDATE: "the outer update",
          engine.METHOD_STEP: "the method's own step on the inner variables"}


def _variables(variables: Any) -> list:
    """The variables of a Keras layer (its trainable weights), of one variable or of a list, as
    given (a Keras variable keeps its ``constraint``, applied after each update)."""
    if isinstance(variables, keras.layers.Layer):
        return list(variables.trainable_weights)
    return [variables] if isinstance(variables, (tf.Variable, keras.Variable)) else list(variables)


def _tf_variables(variables: Any) -> list[tf.Variable]:
    """The ``tf.Variable``s of ``_variables``."""
    return [v.value if isinstance(v, keras.Variable) else v for v in _variables(variables)]


class _Stop(keras.callbacks.Callback):
    """Hands a failed hyper-iteration (the step restored every variable in-graph) to the model's
    ``_diverged``."""

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        phase = int(self.model._phase.numpy())
        if phase != engine.HEALTHY:
            self.model._diverged(phase)


class BilevelModel(keras.Model):
    """A bilevel problem as a Keras model (see the module docstring).

    Args:
        inner_objective: L, a callable taking the inner batch and returning a scalar; it reads
            the inner variables and hyperparameters.
        outer_objective: E, a callable taking the outer batch.
        inner_optimizer: a far_ho2 optimizer (its dynamics Φ).
        steps: T, inner steps per hyper-iteration.
        hypergradient: the method. Defaults to ``far.ReverseHG()``.
        inner_variables: w: a Keras layer or model (its trainable weights) or variables. Defaults
            to the trainable variables L reads.
        hyperparameters: λ: Keras variables, a Keras layer (its trainable weights) or
            ``far.get_hyperparameter`` variables. Defaults to the registered hyperparameters the
            problem depends on. A Keras layer or Keras variables are saved with the model
            (``.keras``, ``BackupAndRestore``); tf.Variables are not.
        init_dynamics_dict: Φ₀, as in ``HyperOptimizer.inner_problem``. With
            ``inner_variables`` and no ``init_dynamics_dict``, Φ₀ (the values the inner variables
            start every hyper-iteration from: theirs now) is held by the model's non-trainable
            weights ``initial_weights``, saved with it, so that a resumed ``fit`` starts the inner
            problem from the same Φ₀.
        features: a λ-dependent map of the inner batch evaluated once per run, as in
            ``HyperOptimizer.inner_problem``.
        per_step: each element's inner batch has a leading axis of T batches, one per inner
            step. Defaults to `False` (one batch for every step).
        name: the model's name.
    """

    def __init__(self, inner_objective: Callable, outer_objective: Callable, inner_optimizer: InnerOptimizer, *,
                 steps: int, hypergradient: Optional[HyperGradient] = None, inner_variables: Any = None,
                 hyperparameters: Any = None, init_dynamics_dict: Any = None, features: Optional[Callable] = None,
                 per_step: bool = False, name: str = "bilevel_model", **kwargs: Any):
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
        if hypergradient is not None and not isinstance(hypergradient, HyperGradient):
            raise TypeError(f"`hypergradient` must be a far_ho2 method (far.ReverseHG(), far.BOME(), ...), "
                            f"got {type(hypergradient).__name__}.")
        if hypergradient is not None and hypergradient.registrations:
            raise ValueError(f"`hypergradient`: this {hypergradient.name} serves another problem already (a method "
                             f"holds its problem's state, e.g. the penalty's stages); give each model its own.")
        super().__init__(name=name, **kwargs)
        self.method = hypergradient or ReverseHG()
        self.steps, self.per_step = int(steps), bool(per_step)
        self.inner_layer = inner_variables if isinstance(inner_variables, keras.layers.Layer) else None
        self.hyper_layer = hyperparameters if isinstance(hyperparameters, keras.layers.Layer) else None
        # Keras variables given in lists: tracked, so that they are saved with the model
        self.keras_variables = [v for given in (inner_variables, hyperparameters) if isinstance(given, (list, tuple))
                                for v in given if isinstance(v, keras.Variable)]
        var_list = None if inner_variables is None else _tf_variables(inner_variables)
        hyper_list = None if hyperparameters is None else _variables(hyperparameters)
        local = [v for v in var_list or [] if getattr(v, "synchronization", None) == tf.VariableSynchronization.ON_READ]
        if local and init_dynamics_dict is None:
            raise ValueError(f"BilevelModel: the inner variables {[v.name for v in local]} are each replica's own "
                             f"(far.distribute.local_variables): give their Φ₀ as `init_dynamics_dict`, e.g. "
                             f"[(w, lambda: tf.zeros_like(w))].")
        if var_list is not None and init_dynamics_dict is None:  # Φ₀ as the model's weights: saved with it
            self.initial_weights = [self.add_weight(shape=v.shape, dtype=v.dtype.name, trainable=False,
                                                    initializer=keras.initializers.Constant(v.numpy()),
                                                    name=f"initial_{v.name.split(':')[0].split('/')[-1]}")
                                    for v in var_list]
            init_dynamics_dict = [(v, w.value) for v, w in zip(var_list, self.initial_weights)]
        self.__dict__["_problem"] = InnerProblem(inner_objective, inner_optimizer, var_list, init_dynamics_dict,
                                                 features)  # not tracked: Φ₀'s copies are scratch state
        self.method.compute_gradients(outer_objective, self._problem, hyper_list)
        self.__dict__["_ready"] = None  # (bounds, guarded) once the problem is resolved
        self._reference = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="guard_reference",
                                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # the last step's phase (0: healthy), for fit's stop rule; not a log (a user's CSV, progress
        # bar and history show E only) and not saved (a run's checkpoints stay as they were)
        self.__dict__["_phase"] = tf.Variable(engine.HEALTHY, dtype=tf.int32, trainable=False, name="step_phase",
                                              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.loss_tracker = keras.metrics.Mean(name="loss", dtype="float64")  # E of a float64 problem, unrounded

    @property
    def metrics(self) -> list:
        return [self.loss_tracker]

    # -- set-up -----------------------------------------------------------------------------------

    def _resolve(self, element: Callable[[], Any]) -> None:
        """On the first ``fit`` or ``evaluate`` after ``compile``: the default inner variables and
        hyperparameters, found eagerly on one element (``element()``, as ``HyperOptimizer`` does
        on its first run) unless known, the optimizer built, the guard's bounds and the guarded
        variables fixed."""
        if self._ready is not None:
            return
        with self.distribute_strategy.scope():  # the method's and the optimizer's variables: mirrored
            if any(reg.hypers is None for reg in self.method.registrations):
                self._resolve_method(element())
            self._resolve_guard()

    def _resolve_method(self, element: Any) -> None:
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas > 1:  # resolved eagerly on the first replica's share (its inner variables' shape)
            size = distribute.replica_batch_size(tf.nest.flatten(element)[0].shape[0], self.distribute_strategy,
                                                 "the meta-batch size of `x`'s elements")
            element = tf.nest.map_structure(lambda t: t[:size], element)
        inner, outer = element
        self.method._resolve(batching.Batches(inner, self.per_step), outer)

    def _resolve_guard(self) -> None:
        hypers = self.hyperparameters
        if getattr(self, "optimizer", None) is None:
            raise ValueError("BilevelModel: call `compile(optimizer=...)` first (the outer optimizer of λ).")
        if not self.optimizer.built:
            self.optimizer.build(hypers)
        self.method.use_outer_optimizers([self.optimizer])  # e.g. the penalty's stages shrink its rate
        limit = self.method.growth_limit
        bounds = tuple(tf.constant([float(guard.bound(v, limit).numpy()) for v in variables] + [0.0], tf.float64)
                       for variables in (hypers, self._problem.var_list))
        guarded = list(self._problem.var_list) + list(hypers) + list(self._problem.optimizer.run_variables)
        guarded += guard.variables_of([self.optimizer, self.method.state_variables()])
        unique: dict = {}
        for v in guarded:
            unique.setdefault(id(v), v)
        self.__dict__["_ready"] = (bounds, list(unique.values()))
        self.built = True  # every variable exists: the inner ones, λ, the optimizer's slots

    def compile(self, optimizer: Any = "rmsprop", **kwargs: Any) -> None:
        """``keras.Model.compile``: the optimizer of λ (the guard is fixed again for it at the
        next ``fit``)."""
        super().compile(optimizer=optimizer, **kwargs)
        self.__dict__["_ready"] = None

    def make_train_function(self, force: bool = False) -> Any:
        """Keras's training function, run without the Grappler passes the method names in
        ``grappler_off`` (they apply when a call optimises a new graph)."""
        existing = self.train_function
        super().make_train_function(force)
        passes = self.method.grappler_off
        if passes and self.train_function is not existing:
            function = self.train_function

            def train_function(iterator: Any) -> Any:
                with without_grappler(passes):
                    return function(iterator)
            self.train_function = train_function
        return self.train_function

    @property
    def hyperparameters(self) -> list[tf.Variable]:
        """λ, the variables the compiled optimizer updates (known after the first ``fit``)."""
        registration = self.method.registrations[0]
        if registration.hypers is None:
            raise ValueError("BilevelModel.hyperparameters: not resolved yet; pass `hyperparameters=`, or read "
                             "it after the first `fit`.")
        return flatten_hyperparameters(registration.originals)

    def resolve(self, data: tf.data.Dataset) -> None:
        """Finds the problem's variables on one element of ``data`` and builds the optimizer, as
        the first ``fit`` does (after ``compile``): then every variable exists, e.g. for a
        checkpoint to be restored into before ``fit``."""
        self._resolve(lambda: next(iter(data)))

    def fit(self, x: Any = None, *args: Any, **kwargs: Any) -> keras.callbacks.History:
        """``keras.Model.fit`` on a dataset whose elements are ``(inner_batch, outer_batch)``, one
        per hyper-iteration; stops with ``far.DivergenceError`` after a failed one."""
        if not isinstance(x, tf.data.Dataset):
            raise TypeError(f"BilevelModel.fit: `x` must be a tf.data.Dataset of (inner_batch, outer_batch) "
                            f"elements, one per hyper-iteration; got {type(x).__name__}.")
        self._resolve(lambda: next(iter(x)))
        callbacks = list(kwargs.pop("callbacks", None) or []) + [_Stop()]
        kwargs.setdefault("shuffle", False)  # a dataset is not shuffled by fit
        return super().fit(x, *args, callbacks=callbacks, **kwargs)

    def load_weights(self, filepath: Any, *args: Any, **kwargs: Any) -> None:
        """``keras.Model.load_weights``, into a model whose variables all exist: after ``compile``
        and ``resolve`` (or a ``fit``)."""
        if not self.built:
            raise ValueError("BilevelModel.load_weights: the model's variables do not exist yet; call "
                             "`compile(optimizer=...)` and `resolve(dataset)` first (as the first `fit` would).")
        super().load_weights(filepath, *args, **kwargs)

    def get_config(self) -> dict:
        """A ``BilevelModel`` holds Python callables (its objectives, the problem's variables), which
        a ``.keras`` file cannot hold: it saves its weights (``save_weights``, ``BackupAndRestore``,
        ``tf.train.Checkpoint``); a subclass that can rebuild itself from a config (as
        ``hyper_repr.HyperRepresentation``) overrides this and saves as ``.keras``."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be saved as a .keras file: its objectives are Python callables. Save its "
            f"weights (`save_weights('model.weights.h5')`, BackupAndRestore) and, to load them, build the model "
            f"in code, `compile`, `resolve(dataset)`, then `load_weights`.")

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        """Nothing to build: every variable exists before ``fit`` (Keras would trace ``call``)."""

    def call(self, inputs: Any, training: bool = False) -> Any:
        """The outer objective on a batch, at the inner variables' current values."""
        return batching.scalar_objective(self.method.registrations[0].outer_objective, inputs)

    # -- one hyper-iteration --------------------------------------------------------------------

    def _diverged(self, phase: int) -> None:
        """After a failed hyper-iteration (``phase``: where it failed), which changed nothing:
        ``fit`` stops with ``far.DivergenceError``."""
        self.stop_training = True
        raise guard.DivergenceError(self._failure(phase))

    def _failure(self, phase: int) -> str:
        """The one line that says a hyper-iteration failed in ``phase`` and changed nothing."""
        return (f"{self.method.name}, hyper-iteration {int(self.optimizer.iterations.numpy())}: {PHASES[phase]} "
                f"became non-finite or grew beyond the guard's bounds (far_ho2.guard; HyperOptimizer.run names "
                f"the inner step and the variable); {guard.UNCHANGED}")

    def _prepare_step(self, data: Any) -> tuple[Any, Any]:
        """(inner batch, outer batch) of a hyper-iteration's element, traced at the start of the
        step: a subclass may set its inner problem up here (e.g. new inner variables' values)."""
        inner, outer = data
        return inner, outer

    def _outer_pairs(self, pairs: list) -> list:
        """The (direction, λ) pairs the compiled optimizer applies, each direction this replica's
        term of their sum over the replicas (as given here; a subclass may process them)."""
        return pairs

    def _step_arguments(self) -> dict:
        """``engine.step``'s guard and update arguments (``engine.settle``'s), traced."""
        bounds, guarded = self._ready
        limit = self.method.growth_limit
        grad_bound = (tf.constant(np.inf, tf.float64) if limit is None else
                      tf.where(self._reference < 0, tf.constant(np.inf, tf.float64),
                               limit * tf.maximum(self._reference, 1.0)))
        return dict(grad_bound=grad_bound, update=lambda results: self._update(results, bounds[0]),
                    inner_bounds=bounds[1], guarded=guarded)

    def _update(self, results: list, bounds: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The compiled optimizer's update of λ from the directions, then the projections
        (``engine.Update``)."""
        hypers = self.hyperparameters
        before = [tf.identity(v) for v in hypers]
        # the tf.Variables found at construction (in a replica, a Keras variable reads as its local copy,
        # whose slots the Keras optimizer does not know)
        registration = self.method.registrations[0]
        variables = {id(o): h for o, h in zip(registration.originals, registration.hypers)}
        pairs = [(g, variables[id(v)]) for g, v in self.method.pairs(results)]
        replicas = sharding.replicas()
        if replicas > 1:  # each replica's term of the sum the optimizer all-reduces (far_ho2.sharding)
            pairs = [(g / replicas, v) for g, v in pairs]
        self.optimizer.apply_gradients(self._outer_pairs(pairs))
        apply_constraints(registration.originals)  # Keras variables' too
        return guard.check_update(hypers, before, bounds, [self.optimizer])

    @tf.autograph.experimental.do_not_convert  # far_ho2's code is written for tracing as is
    def train_step(self, data: Any) -> dict:
        """One hyper-iteration, ``far_ho2.engine.step``: the directions at the current λ, the
        guard, the update of λ by the compiled optimizer, the method's own step; logs E (before
        the update)."""
        inner, outer = self._prepare_step(data)
        _, status = engine.step(
            self.method, steps=self.method._steps(self.steps), inner_data=inner, per_step=self.per_step,
            outer_data=outer, previous=None, online=False, offset=tf.constant(0),
            options=self.method._options(self.optimizer.iterations), **self._step_arguments())
        return self._logs(status)

    def _logs(self, status: engine.Status) -> dict:
        """A step's logs: E before the update (NaN after a failed step); the step's phase kept
        for ``fit``'s stop rule, and the guard's reference direction set by the first healthy step."""
        healthy = tf.equal(status.phase, engine.HEALTHY)
        self._reference.assign(tf.where(healthy & (self._reference < 0), status.largest, self._reference))
        self.loss_tracker.update_state(tf.where(healthy, tf.cast(status.value, tf.float64), np.nan))
        self._phase.assign(status.phase)
        return {"loss": self.loss_tracker.result()}

    @tf.autograph.experimental.do_not_convert
    def test_step(self, data: Any) -> dict:
        """E on the outer batch at w_T from Φ₀ on the inner batch (``InnerProblem``'s T steps,
        not differentiated); the inner variables keep w_T afterwards, as after a hyper-iteration."""
        inner, outer = data
        problem = self._problem
        batches = batching.Batches(inner, self.per_step)
        prepared = inputs_lib.prepare(problem, batches, [])
        run_steps(problem, empty_trajectory(problem.initial_state(), self.steps), prepared.at, 0, self.steps)
        # call, not self(...): Keras's __call__ would cast a float64 batch to the model's float32
        self.loss_tracker.update_state(tf.cast(self.call(outer), tf.float64))
        return {"loss": self.loss_tracker.result()}

    def evaluate(self, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``keras.Model.evaluate`` on ``(inner_batch, outer_batch)`` elements: E after T inner
        steps from Φ₀ on each inner batch."""
        if isinstance(x, tf.data.Dataset):
            self._resolve(lambda: next(iter(x)))
        return super().evaluate(x, *args, **kwargs)
