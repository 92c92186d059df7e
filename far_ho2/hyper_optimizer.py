"""``HyperOptimizer``: FAR-HO's entry point, a thin stateful façade over a hypergradient method.

    run = far.HyperOptimizer().minimize(E, outer_optimizer, L, far.GradientDescentOptimizer(lr))
    for _ in range(hyper_iterations):
        run(T, inner_objective_feed_dicts=train_batch, outer_objective_feed_dicts=valid_batch)

One ``run`` is one hyper-iteration: ``compute_hypergradients`` (reset the inner state to Φ₀ — or,
for a method that keeps it, continue from the inner variables —, run T inner steps, compute the
outer direction) then ``apply_hypergradients`` (update the hyperparameters with the outer
optimizer, project them onto their constraints, let the method update its own state). The guard
(``far_ho2.guard``) checks each part; a failure raises ``far.DivergenceError`` and restores every
variable the hyper-iteration touched.
"""

import weakref
from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from far_ho2 import guard
from far_ho2.compiled import compiled
from far_ho2.hypergradients.base import OUTER_ADVICE, HyperGradient, Registration
from far_ho2.hypergradients.reverse import ReverseHG
from far_ho2.hyperparameters import apply_constraints, describe, flatten_hyperparameters, variable_name
from far_ho2.inner_problem import InnerProblem
from far_ho2.types import InnerOptimizer

_INSTANCES: list[weakref.ref] = []  # every HyperOptimizer, for FAR-HO's `far.hypergradients()`


def _removed(argument: str, value: Any, instead: str) -> None:
    if value is not None:
        raise TypeError(f"`{argument}` (FAR-HO, TF1) has no TF2 meaning: {instead}")


def _counter(global_step: Any) -> tf.Variable:
    """FAR-HO's ``global_step`` (a TF variable, incremented by every update), checked."""
    variable = global_step.value if isinstance(global_step, keras.Variable) else global_step
    if not isinstance(variable, tf.Variable) or not variable.dtype.is_integer:
        raise TypeError(f"`global_step` must be an integer tf.Variable (FAR-HO's global step, which "
                        f"every update increments), got {global_step!r}; or leave it out and read "
                        f"`HyperOptimizer.global_step`.")
    return variable


class HyperOptimizer:
    """Gradient-based hyperparameter optimization (FAR-HO's ``HyperOptimizer``).

    Args:
        hypergradient: the method, a ``HyperGradient``. Defaults to ``far.ReverseHG()``.
    """

    def __init__(self, hypergradient: Optional[HyperGradient] = None):
        if hypergradient is not None and not isinstance(hypergradient, HyperGradient):
            raise TypeError("`hypergradient` must be a far_ho2 HyperGradient (far.ReverseHG(), "
                            f"far.ForwardHG(), far.ImplicitHG(), ...), got {type(hypergradient).__name__}.")
        self._hypergradient = hypergradient or ReverseHG()
        self._outer: list[tuple[Any, Registration]] = []  # (outer optimizer, problem)
        self._finalized: Optional[tuple] = None
        self._updates: dict = {}  # compiled outer updates, per (optimizer, variables)
        self._snapshot: Optional[guard.Snapshot] = None  # what a failed hyper-iteration restores
        self._before: Optional[list] = None  # its values before the last compute_hypergradients
        self._bounds: dict = {}  # id(hyperparameter or inner variable) -> its growth bound
        self._inner_check: Optional[Callable] = None
        self._global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        _INSTANCES.append(weakref.ref(self))

    @property
    def hypergradient(self) -> HyperGradient:
        return self._hypergradient

    @property
    def inner_objectives(self) -> list[Callable]:
        return self._hypergradient.inner_objectives

    @property
    def global_step(self) -> int:
        """The number of updates so far (FAR-HO's global step)."""
        return int(self._global_step.numpy())

    @global_step.setter
    def global_step(self, value: int) -> None:
        self._global_step.assign(value)

    # -- set-up ---------------------------------------------------------------------------------

    def inner_problem(self, inner_objective: Callable, inner_objective_optimizer: InnerOptimizer,
                      var_list: Optional[Sequence] = None, init_dynamics_dict: Any = None,
                      features: Optional[Callable] = None, **minimize_kwargs: Any) -> InnerProblem:
        """An inner problem  min_w L  (see ``InnerProblem``); call once per episode of a
        meta-batch, each followed by ``outer_problem``. FAR-HO's ``**minimize_kwargs``
        (``tf.train.Optimizer.minimize``'s) have no TF2 meaning."""
        for argument, value in minimize_kwargs.items():
            _removed(argument, value, "far_ho2 optimizers take no TF1 `minimize` options; remove it.")
        return InnerProblem(inner_objective, inner_objective_optimizer, var_list, init_dynamics_dict,
                            features)

    def outer_problem(self, outer_objective: Callable, optim_dict: InnerProblem, outer_objective_optimizer: Any,
                      hyper_list: Optional[Sequence] = None, global_step: Any = None) -> "HyperOptimizer":
        """Registers E (a callable taking the outer batch, or nothing) for ``optim_dict``, its
        hyperparameters updated by ``outer_objective_optimizer`` (a Keras optimizer or a far
        optimizer). ``hyper_list`` defaults to the registered hyperparameters the problem depends
        on (and the variables of a learned initialisation). ``global_step``, a TF integer
        variable, becomes the counter every update increments (FAR-HO's)."""
        if self._finalized is not None:
            raise ValueError("`outer_problem` after `finalize`: register every problem first.")
        if not callable(getattr(outer_objective_optimizer, "apply_gradients", None)):
            raise TypeError("`outer_objective_optimizer` must have `apply_gradients` (a Keras "
                            f"optimizer or a far optimizer), got {type(outer_objective_optimizer).__name__}.")
        if global_step is not None:
            self._global_step = _counter(global_step)
        self._hypergradient.compute_gradients(outer_objective, optim_dict, hyper_list)
        self._outer.append((outer_objective_optimizer, self._hypergradient.registrations[-1]))
        return self

    def finalize(self, aggregation_fn: Optional[Callable] = None,
                 process_fn: Optional[Callable] = None) -> Callable:
        """Ends the set-up. ``aggregation_fn`` combines one hyperparameter's hypergradients from
        several inner problems (default: mean); ``process_fn`` transforms each result (e.g.
        clipping). Returns ``run``."""
        if self._finalized is not None:
            raise ValueError("HyperOptimizer.finalize has already been called on this object.")
        if not self._outer:
            raise ValueError("Nothing to finalize: call `inner_problem` and `outer_problem` first.")
        self._finalized = (aggregation_fn, process_fn)
        optimizers: list = []
        for optimizer, _ in self._outer:
            if not any(optimizer is o for o in optimizers):
                optimizers.append(optimizer)
        self._hypergradient.use_outer_optimizers(optimizers)
        return self.run

    def minimize(self, outer_objective: Callable, outer_objective_optimizer: Any,
                 inner_objective: Callable, inner_objective_optimizer: InnerOptimizer,
                 hyper_list: Optional[Sequence] = None, var_list: Optional[Sequence] = None,
                 init_dynamics_dict: Any = None, global_step: Any = None,
                 aggregation_fn: Optional[Callable] = None, process_fn: Optional[Callable] = None, *,
                 features: Optional[Callable] = None) -> Callable:
        """``inner_problem``, ``outer_problem`` and ``finalize`` in one call (FAR-HO's arguments,
        in its order: outer first). Returns ``run``."""
        problem = self.inner_problem(inner_objective, inner_objective_optimizer, var_list,
                                     init_dynamics_dict, features)
        self.outer_problem(outer_objective, problem, outer_objective_optimizer, hyper_list, global_step)
        return self.finalize(aggregation_fn, process_fn)

    # -- running --------------------------------------------------------------------------------

    def run(self, T: Any, inner_objective_feed_dicts: Any = None, outer_objective_feed_dicts: Any = None,
            initializer_feed_dict: Any = None, optimization_step_feed_dict: Any = None, session: Any = None,
            online: Any = False, _skip_hyper_ts: bool = False, _only_hyper_ts: bool = False,
            callback: Optional[Callable] = None) -> Optional[tf.Tensor]:
        """One hyper-iteration (FAR-HO's arguments, in its order): ``compute_hypergradients``,
        then ``apply_hypergradients``.

        Args:
            T: the number of inner steps (an int, or ``range(T)``).
            inner_objective_feed_dicts: the inner batch, a callable ``step -> batch``, or a
                stream (``tf.data.Dataset``, iterator) giving one batch per step.
            outer_objective_feed_dicts: the outer batch, a callable ``global_step -> batch``, or
                a stream giving one batch per hyper-iteration.
            initializer_feed_dict, optimization_step_feed_dict, session: FAR-HO's; no TF2 meaning
                (an error says what to write instead).
            online: continue the inner state of the previous run instead of restarting from Φ₀
                (real-time / truncated online modes; ``'wr'`` for ForwardHG's warm restart).
            _skip_hyper_ts: compute the hypergradients without updating (FAR-HO's spelling of
                ``compute_hypergradients``).
            _only_hyper_ts: update with the hypergradients already computed (FAR-HO's spelling of
                ``apply_hypergradients``).
            callback: ``callback(step, inner_objective_values)`` for every inner step.

        Returns:
            The outer objective at the end of the inner run (the mean over inner problems),
            before the update; ``None`` with ``_only_hyper_ts``.
        """
        _removed("initializer_feed_dict", initializer_feed_dict,
                 "Φ₀ reads what it needs: pass callables in `init_dynamics_dict`.")
        _removed("optimization_step_feed_dict", optimization_step_feed_dict,
                 "the outer update reads variables: change the outer optimizer's learning rate, "
                 "or its schedule, instead of feeding it.")
        _removed("session", session, "TF2 runs eagerly, without sessions; remove it.")
        value = None
        if not _only_hyper_ts:
            value = self.compute_hypergradients(T, inner_objective_feed_dicts, outer_objective_feed_dicts,
                                                online=online, callback=callback)
        if not _skip_hyper_ts:
            self.apply_hypergradients()
        return value

    def compute_hypergradients(self, T: Any, inner_objective_feed_dicts: Any = None,
                               outer_objective_feed_dicts: Any = None, *, online: Any = False,
                               callback: Optional[Callable] = None) -> tf.Tensor:
        """The outer directions of one hyper-iteration, without applying them (see ``run`` for
        the arguments; ``hypergradients()`` returns them). Returns E at the end of the inner run
        (the mean over the inner problems)."""
        if self._finalized is None:
            raise ValueError("Call `minimize` (or `finalize`) before `run`.")
        try:
            results = self._hypergradient.run(T, inner_objective_feed_dicts, outer_objective_feed_dicts,
                                              self.global_step, online, callback, before_compute=self._take_snapshot)
        except guard.DivergenceError:
            self._restore()
            raise
        return (results[0].value if len(results) == 1 else  # no eager ops when there is one
                tf.reduce_mean(tf.stack([r.value for r in results])))

    def apply_hypergradients(self) -> None:
        """Updates the hyperparameters with the outer directions of the last
        ``compute_hypergradients``, projects them onto their constraints, lets the method update
        its own state (``HyperGradient.after_update``), and counts the update."""
        if self._finalized is None:
            raise ValueError("Call `minimize` (or `finalize`) before `run`.")
        aggregation_fn, process_fn = self._finalized
        if self._before is None:  # not right after compute_hypergradients: what this update changes
            self._take_snapshot()
        moved = 0.0
        for optimizer, group in self._groups():
            healthy, change = self._update(optimizer, self._hypergradient.hgrads_hvars(group, aggregation_fn, process_fn))
            if not healthy:
                message = self._update_failure(optimizer, group)
                self._restore()
                raise guard.DivergenceError(message)
            moved = max(moved, change)
        self._hypergradient.after_update()
        if self._hypergradient.persistent and not self._inner_healthy():
            message = self._inner_failure()
            self._restore()
            raise guard.DivergenceError(message)
        self._before = None
        self._hypergradient.after_step(moved, self.global_step)
        self._global_step.assign_add(1)

    # -- the guard --------------------------------------------------------------------------------

    def _guarded(self) -> list[tf.Variable]:
        """Every variable a hyper-iteration may change: the inner variables and their optimizers'
        run state, the hyperparameters, the outer optimizers' variables, the method's state."""
        registrations = self._hypergradient.registrations
        variables = [v for reg in registrations for v in reg.problem.var_list]
        variables += [v for reg in registrations for v in reg.problem.optimizer.run_variables]
        variables += flatten_hyperparameters([h for _, group in self._groups() for h in group])
        for optimizer in self._optimizers():
            variables += _variables_of(optimizer)
        variables += _variables_of(self._hypergradient.state_variables())
        unique: dict = {}
        for v in variables:
            unique.setdefault(id(v), v)
        return list(unique.values())

    def _optimizers(self) -> list:
        optimizers: list = []
        for optimizer, _ in self._outer:
            if not any(optimizer is o for o in optimizers):
                optimizers.append(optimizer)
        return optimizers

    def _take_snapshot(self) -> None:
        """Called once the problems are resolved, before the compiled run: on the first call, the
        outer optimizers are built (their slots exist before the first update) and the growth
        bounds of the hyperparameters and inner variables fixed; every call saves the values."""
        if self._snapshot is None:
            for optimizer, group in self._groups():
                variables = flatten_hyperparameters(group)
                if isinstance(optimizer, keras.optimizers.Optimizer):
                    if not optimizer.built:
                        optimizer.build(variables)
                elif hasattr(optimizer, "build"):
                    optimizer.build(variables)
            limit = self._hypergradient.growth_limit
            bounded = flatten_hyperparameters([h for _, group in self._groups() for h in group])
            bounded += [v for reg in self._hypergradient.registrations for v in reg.problem.var_list]
            self._bounds = {id(v): float(guard.bound(v, limit).numpy()) for v in bounded}
            self._snapshot = guard.Snapshot(self._guarded())
        self._before = self._snapshot.take()

    def _restore(self) -> None:
        if self._snapshot is not None and self._before is not None:
            self._snapshot.restore(self._before)
        self._before = None

    def _inner_healthy(self) -> bool:
        """Whether the inner variables are finite and within their bounds (after a method's own
        step on them)."""
        variables = [v for reg in self._hypergradient.registrations for v in reg.problem.var_list]
        if self._inner_check is None:
            self._inner_check = compiled(lambda bounds: tf.reduce_all(tf.stack(
                [guard.healthy(v, bounds[i]) for i, v in enumerate(variables)])))
        return bool(self._inner_check(tf.constant([self._bounds[id(v)] for v in variables], tf.float64)).numpy())

    def _inner_failure(self) -> str:
        method = self._hypergradient
        for reg in method.registrations:
            for v in reg.problem.var_list:
                value = v.numpy()
                if not np.all(np.isfinite(value)) or np.max(np.abs(value), initial=0.0) > self._bounds[id(v)]:
                    what = ("became NaN/Inf" if not np.all(np.isfinite(value)) else
                            f"grew to ‖·‖∞ = {np.max(np.abs(value)):.3g}, beyond growth_limit × max(‖its first "
                            f"value‖∞, 1) = {self._bounds[id(v)]:.3g}")
                    return (f"{method._failure_context(self.global_step)}: the method's own step on the inner "
                            f"variables: {describe(v)} {what}: lower its step size; {guard.UNCHANGED}")
        return f"{method._failure_context(self.global_step)}: the method's own step failed; {guard.UNCHANGED}"

    def _update_failure(self, optimizer: Any, group: list) -> str:
        """Why an outer update was rejected: a non-finite hypergradient, or else the update
        itself (the hyperparameters or the optimizer's slots)."""
        method = self._hypergradient
        name = type(optimizer).__name__
        aggregation_fn, process_fn = self._finalized
        for g, h in method.hgrads_hvars(group, aggregation_fn, process_fn):
            variable = flatten_hyperparameters([h])[0]
            if not np.all(np.isfinite(np.asarray(g))):
                return (f"{method._failure_context(self.global_step)}: the hypergradient with respect to "
                        f"{describe(variable)} is not finite; {guard.UNCHANGED}")
        names = ", ".join(describe(v) for v in flatten_hyperparameters(group))
        return (f"{method._failure_context(self.global_step)}: the outer update by {name} would make "
                f"{names} non-finite or grow beyond growth_limit × max(‖its first value‖∞, 1): "
                f"{method.diverged_hint or OUTER_ADVICE}; {guard.UNCHANGED}")

    def _groups(self) -> list[tuple[Any, list]]:
        """(outer optimizer, the hyperparameters it updates), once the problems are resolved."""
        groups: list[tuple[Any, list]] = []
        for optimizer, reg in self._outer:
            hypers = reg.originals if reg.hypers is not None else []
            for other, group in groups:
                if other is optimizer:
                    ids = {id(h) for h in flatten_hyperparameters(group)}
                    group.extend(h for h in hypers if id(flatten_hyperparameters([h])[0]) not in ids)
                    break
            else:
                groups.append((optimizer, list(hypers)))
        return groups

    def _update(self, optimizer: Any, pairs: list) -> tuple[bool, float]:
        """λ ← P(λ − step): the outer optimizer's update, then the constraints' projections; then
        whether the hyperparameters and the optimizer's variables are healthy (finite, λ within
        its growth bound) and max ‖Δλ‖∞. A Keras optimizer's update is compiled after its first
        (eager) call."""
        if not pairs:
            return True, 0.0
        grads, variables = [g for g, _ in pairs], [v for _, v in pairs]
        flat = flatten_hyperparameters(variables)
        bounds = tf.constant([self._bounds.get(id(v), np.inf) for v in flat], tf.float64)
        slots = _variables_of(optimizer)

        def update(grads, bounds):
            before = [tf.identity(v) for v in flat]
            optimizer.apply_gradients(zip(grads, variables))
            apply_constraints(flat)
            healthy = tf.reduce_all(tf.stack([guard.healthy(v, bounds[i]) for i, v in enumerate(flat)]
                                             + [tf.reduce_all(tf.math.is_finite(s)) for s in slots
                                                if s.dtype.is_floating]))
            change = tf.reduce_max(tf.stack([guard.max_abs(v - b) for v, b in zip(flat, before)]))
            return tf.stack([tf.cast(healthy, tf.float64), change])

        key = (id(optimizer), tuple(id(v) for v in variables))
        if key in self._updates:
            status = self._updates[key](grads, bounds)
        else:
            status = update(grads, bounds)  # eagerly: a Keras optimizer may still create variables
            if isinstance(optimizer, keras.optimizers.Optimizer):
                self._updates[key] = compiled(update, float64=any(v.dtype == tf.float64 for v in flat))
        healthy, change = status.numpy()
        return bool(healthy), float(change)

    # -- results and state ------------------------------------------------------------------------

    def hypergradients(self) -> list[tuple[tf.Tensor, Any]]:
        """The last run's ``[(hypergradient, hyperparameter), ...]``, aggregated and processed."""
        aggregation_fn, process_fn = self._finalized or (None, None)
        return [pair for _, group in self._groups()
                for pair in self._hypergradient.hgrads_hvars(group, aggregation_fn, process_fn)]

    def state(self) -> dict:
        """What a ``tf.train.Checkpoint(**ho.state())`` must hold to resume exactly: the global
        step, the hyperparameters, the inner variables, the inner optimizers' run state (an
        SGLD chain's run counter), the outer optimizers (built) and the method's own state.
        Available from the start when every ``var_list`` and ``hyper_list`` is given, else after
        the first run (the defaults are found then)."""
        registrations = self._hypergradient.registrations
        known = all(reg.hypers is not None or (reg.explicit and reg.problem.resolved) for reg in registrations)
        if not known or not self._hypergradient.ensure_built():
            raise ValueError("HyperOptimizer.state(): the problems are not resolved yet; pass `var_list` and "
                             "`hyper_list`, or call it after the first run (the defaults are found then).")
        hypers = {id(reg): [v for v, _ in reg.candidates] if reg.hypers is None else reg.hypers
                  for reg in registrations}
        seen: list = []
        optimizers: list = []
        for optimizer, _ in self._outer:
            if any(optimizer is o for o in seen):
                continue
            seen.append(optimizer)
            variables = flatten_hyperparameters([h for o, reg in self._outer if o is optimizer for h in hypers[id(reg)]])
            if isinstance(optimizer, keras.optimizers.Optimizer):
                if not optimizer.built:
                    optimizer.build(variables)
                optimizers.append(optimizer)
            else:
                optimizer.build(variables)
                optimizers.append(list(optimizer.variables))
        return {"global_step": self._global_step,
                "hyperparameters": flatten_hyperparameters([h for group in hypers.values() for h in group]),
                "inner_variables": [v for reg in registrations for v in reg.problem.var_list],
                "inner_optimizers": [v for reg in registrations for v in reg.problem.optimizer.run_variables],
                "outer_optimizers": optimizers,
                "method": self._hypergradient.state_variables()}


def _variables_of(obj: Any) -> list[tf.Variable]:
    """The tf.Variables of a method's state or an optimizer (nested dicts and lists, Keras
    variables and optimizers, far optimizers)."""
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in _variables_of(value)]
    if isinstance(obj, (list, tuple)):
        return [v for value in obj for v in _variables_of(value)]
    if isinstance(obj, keras.Variable):
        return [obj.value]
    if isinstance(obj, tf.Variable):
        return [obj]
    if isinstance(obj, keras.optimizers.Optimizer) or hasattr(obj, "variables"):
        return _variables_of(list(obj.variables))
    return []


def all_hypergradients(scope: Optional[str] = None) -> list[tf.Tensor]:
    """FAR-HO's ``far.hypergradients(scope)``: the hypergradients of the last run of every live
    ``HyperOptimizer`` (in creation order), for the hyperparameters whose name starts with
    ``scope``; ``ho.hypergradients()`` gives them with their hyperparameters."""
    alive = [ref() for ref in _INSTANCES]
    _INSTANCES[:] = [ref for ref, ho in zip(_INSTANCES, alive) if ho is not None]
    ran = [ho for ho in alive if ho is not None and ho.hypergradient.results is not None]
    if not ran:
        raise ValueError("far.hypergradients(): no HyperOptimizer has hypergradients yet: in TF2 they "
                         "are computed by running, not built as graph tensors; call `run(T, ..., "
                         "_skip_hyper_ts=True)` first (then `ho.hypergradients()` pairs them with "
                         "their hyperparameters).")
    return [g for ho in ran for g, h in ho.hypergradients()
            if scope is None or variable_name(flatten_hyperparameters([h])[0]).startswith(scope)]
