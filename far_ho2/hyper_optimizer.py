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
import tensorflow as tf

from far_ho2 import engine, guard
from far_ho2.compiled import compiled
from far_ho2.hypergradients.base import OUTER_ADVICE, HyperGradient, Registration, check_callback
from far_ho2.hypergradients.reverse import ReverseHG
from far_ho2.hyperparameters import apply_constraints, describe, describe_all, flatten_hyperparameters, variable_name
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
        self._bounds: Optional[tuple] = None  # the growth bounds of (the hyperparameters, the inner variables)
        self._steps: dict = {}  # compiled hyper-iterations, per batch layout and online mode
        self._apply: Optional[Callable] = None  # compiled update of computed directions
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
            initializer_feed_dict: FAR-HO's; no TF2 meaning (an error says what to write instead).
            optimization_step_feed_dict: FAR-HO's; no TF2 meaning (an error says what to write
                instead).
            session: FAR-HO's; no TF2 meaning (an error says to drop it).
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
        if _only_hyper_ts:
            self.apply_hypergradients()
            return None
        if _skip_hyper_ts:
            return self.compute_hypergradients(T, inner_objective_feed_dicts, outer_objective_feed_dicts,
                                               online=online, callback=callback)
        check_callback(callback)
        self._check_finalized()
        method = self._hypergradient
        prepared = method.prepare(T, inner_objective_feed_dicts, outer_objective_feed_dicts, self.global_step, online)
        self._setup()
        arguments = method.step_arguments(prepared)
        results, status = self._step_function(prepared)(
            *(arguments[k] for k in ("steps", "inner_data", "outer_data", "previous", "offset", "options",
                                     "grad_bound")), self._bound_tensors())
        method.conclude(prepared, results, status, moved=float(status.moved.numpy()), callback=callback,
                        describe_update=lambda: self._update_failure(status))
        self._global_step.assign_add(1)
        return status.value

    def compute_hypergradients(self, T: Any, inner_objective_feed_dicts: Any = None,
                               outer_objective_feed_dicts: Any = None, *, online: Any = False,
                               callback: Optional[Callable] = None) -> tf.Tensor:
        """The outer directions of one hyper-iteration, without applying them (see ``run`` for
        the arguments; ``hypergradients()`` returns them). Returns E at the end of the inner run
        (the mean over the inner problems)."""
        self._check_finalized()
        results = self._hypergradient.run(T, inner_objective_feed_dicts, outer_objective_feed_dicts,
                                          self.global_step, online, callback)
        return (results[0].value if len(results) == 1 else  # no eager ops when there is one
                tf.reduce_mean(tf.stack([r.value for r in results])))

    def apply_hypergradients(self) -> None:
        """Updates the hyperparameters with the outer directions of the last
        ``compute_hypergradients``, projects them onto their constraints, lets the method take
        its own step (``HyperGradient.finish``), and counts the update (``engine.apply_step``)."""
        self._check_finalized()
        method = self._hypergradient
        results = method._require_results()
        self._setup()
        if self._apply is None:
            guarded = self._guarded()

            def apply(results, bounds):
                return engine.apply_step(method, results, lambda r: self._update(r, bounds), bounds[1], guarded)
            self._apply = compiled(apply, float64=method.float64)
        status = self._apply(results, self._bound_tensors())
        if int(status.phase.numpy()) != engine.HEALTHY:
            method._results = None
            message = f"{method._failure_context(self.global_step)}: {self._update_failure(status)}; {guard.UNCHANGED}"
            method._failure = message
            raise guard.DivergenceError(message)
        method.report(results, float(status.moved.numpy()), self.global_step)
        self._global_step.assign_add(1)

    def _check_finalized(self) -> None:
        if self._finalized is None:
            raise ValueError("Call `minimize` (or `finalize`) before `run`.")

    # -- the step and its guard (far_ho2.engine) --------------------------------------------------

    def _step_function(self, prepared: Any) -> Callable:
        """The compiled hyper-iteration (``engine.step`` with the outer update), one per batch
        layout and online mode."""
        key = (prepared.inner.per_step, prepared.online, prepared.previous is not None)
        if key not in self._steps:
            method, guarded = self._hypergradient, self._guarded()

            def step(steps, inner_data, outer_data, previous, offset, options, grad_bound, bounds):
                return engine.step(method, steps=steps, inner_data=inner_data, per_step=key[0], outer_data=outer_data,
                                   previous=previous, online=key[1], offset=offset, options=options,
                                   grad_bound=grad_bound, update=lambda r: self._update(r, bounds),
                                   inner_bounds=bounds[1], guarded=guarded)
            self._steps[key] = compiled(step, method.jit_compile, float64=method.float64,
                                        grappler_off=method.grappler_off)
        return self._steps[key]

    def _update(self, results: list, bounds: tuple) -> tuple[tf.Tensor, tf.Tensor]:
        """The door's outer update, traced (``engine.Update``): each outer optimizer on its
        group's aggregated, processed directions, then the projections; (max ‖Δλ‖∞, whether the
        hyperparameters are within their growth bounds and every optimizer variable finite)."""
        aggregation_fn, process_fn = self._finalized
        hypers = flatten_hyperparameters([h for _, group in self._groups() for h in group])
        before = [tf.identity(v) for v in hypers]
        for optimizer, group in self._groups():
            pairs = self._hypergradient.pairs(results, group, aggregation_fn, process_fn)
            if pairs:
                optimizer.apply_gradients(pairs)
                apply_constraints(flatten_hyperparameters([v for _, v in pairs]))
        return guard.check_update(hypers, before, bounds[0], self._optimizers())

    def _setup(self) -> None:
        """Once the problems are resolved (after the first ``prepare``): the outer optimizers
        built (their slots exist before the first traced update) and the growth bounds of the
        hyperparameters and inner variables fixed at their first values."""
        if self._bounds is not None:
            return
        for optimizer, group in self._groups():
            variables = flatten_hyperparameters(group)
            if isinstance(optimizer, keras.optimizers.Optimizer):
                if not optimizer.built:
                    optimizer.build(variables)
            elif hasattr(optimizer, "build"):
                optimizer.build(variables)
        limit = self._hypergradient.growth_limit
        hypers = flatten_hyperparameters([h for _, group in self._groups() for h in group])
        inner = [v for reg in self._hypergradient.registrations for v in reg.problem.var_list]
        self._bounds = tuple([float(guard.bound(v, limit).numpy()) for v in variables] for variables in (hypers, inner))

    def _bound_tensors(self) -> tuple[tf.Tensor, tf.Tensor]:
        return tuple(tf.constant(b + [0.0], tf.float64) for b in self._bounds)

    def _guarded(self) -> list[tf.Variable]:
        """Every variable a hyper-iteration may change: the inner variables and their optimizers'
        run state, the hyperparameters, the outer optimizers' variables, the method's state."""
        registrations = self._hypergradient.registrations
        variables = [v for reg in registrations for v in reg.problem.var_list]
        variables += [v for reg in registrations for v in reg.problem.optimizer.run_variables]
        variables += flatten_hyperparameters([h for _, group in self._groups() for h in group])
        for optimizer in self._optimizers():
            variables += guard.variables_of(optimizer)
        variables += guard.variables_of(self._hypergradient.state_variables())
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

    def _update_failure(self, status: Any) -> str:
        """Why the update part of a step failed (the step restored everything)."""
        method = self._hypergradient
        if int(status.phase.numpy()) == engine.METHOD_STEP:
            inner = describe_all(v for reg in method.registrations for v in reg.problem.var_list)
            return (f"the method's own step on the inner variables {inner} made them non-finite or grow beyond "
                    f"growth_limit × max(‖their first value‖∞, 1): lower its step size")
        names = ", ".join(describe(v) for v in flatten_hyperparameters([h for _, g in self._groups() for h in g]))
        optimizers = ", ".join(type(o).__name__ for o in self._optimizers())
        return (f"the outer update by {optimizers} would make {names} (or its slots) non-finite or grow beyond "
                f"growth_limit × max(‖its first value‖∞, 1): {method.diverged_hint or OUTER_ADVICE}")

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
