"""``HyperGradient``: what every hypergradient method shares (FAR-HO's base class).

A method registers inner problems with their outer objectives (``compute_gradients``) and
implements ``hypergradient``: one problem's result (its outer direction), a traced function.
One hyper-iteration is ``far_ho2.engine.step``, which every door runs; around it this class
prepares a run (suppliers, the default ``hyper_list`` and the errors for hyperparameters a method
cannot differentiate, ``dependencies``), explains a failed one (the guard's one-line message)
and concludes a healthy one (the method's ``report``, the last run for online modes). A method's
hooks into the step: ``health`` (its own test of a result, in-graph) with ``failure`` (its words),
``finish`` (its own step after the outer update: a joint step on w, a stage schedule, in-graph),
and ``report`` (diagnostics and warnings after a healthy step, in Python).
"""

import inspect
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from far_ho2 import batches as batching
from far_ho2 import dependencies, engine, guard
from far_ho2.compiled import compiled
from far_ho2.hyperparameters import (describe, describe_all, flatten_hyperparameters, hyperparameter_pairs,
                                     hyperparameters)
from far_ho2.inner_problem import InnerProblem
from far_ho2.trajectory import divergence
from far_ho2.types import Previous, RunResult


OUTER_ADVICE = ("lower the outer learning rate, bound the hyperparameters with `constraint=`, or raise "
                "`growth_limit` if such values are legitimate")
STALL_ITERATIONS = 50  # hyper-iterations with λ unmoved before a method may warn (``report``)


class Prepared(NamedTuple):
    """A run ready for its traced step (``HyperGradient.prepare``)."""

    T: int
    inner: batching.Batches  # the inner batches
    outer: Any  # the outer batch
    offset: int  # the first step's index in the stream of steps (online runs)
    online: Any  # False, or the online mode of a run continuing the last one
    previous: Optional[list]  # the last run, per problem, when continued or warm-started
    global_step: int


class Registration:
    """An inner problem, its outer objective, and its hyperparameters (resolved on the first
    run: the default ``hyper_list`` needs the objectives evaluated on a batch)."""

    def __init__(self, problem: InnerProblem, outer_objective: Callable, candidates: list, explicit: bool):
        self.problem, self.outer_objective = problem, outer_objective
        self.candidates = candidates  # (tf.Variable, what the user passed) pairs
        self.explicit = explicit  # hyper_list was given (else: the registered hyperparameters)
        self.outer_takes_batch = batching.takes_batch(outer_objective, "outer_objective")
        self.hypers: Optional[list[tf.Variable]] = None  # resolved
        self.originals: list = []  # what the user passed, per resolved hyperparameter


def _mean(hypergradients: list) -> tf.Tensor:
    return tf.reduce_mean(tf.stack(hypergradients), axis=0)


def check_callback(callback: Optional[Callable]) -> None:
    """A clear error for a callback that cannot take ``(step, inner_objective_values)``."""
    if callback is None:
        return
    if not callable(callback):
        raise TypeError(f"`callback` must be a callable (step, inner_objective_values), got "
                        f"{type(callback).__name__}.")
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(0, [0.0])
    except TypeError:
        raise TypeError(f"`callback{signature}` cannot be called as callback(step, "
                        f"inner_objective_values): far_ho2 calls it after the compiled run with the "
                        f"step and the inner objectives' values (FAR-HO's callback(step, feed_dict, "
                        f"session) has no TF2 meaning: write `lambda step, values: ...`).") from None


class HyperGradient:
    """Base class of the hypergradient methods (``ReverseHG``, ``ForwardHG``, ``ImplicitHG``...)."""

    #: ``run``'s ``online`` values this method accepts besides False.
    online_modes: tuple = (True,)
    #: whether ``hypergradient`` receives the last run even when not online (warm starts).
    uses_previous: bool = False
    #: whether λ reaching the problem only through the optimizer's parameters or Φ₀ gets a
    #: hypergradient (methods that differentiate the solution w*(λ) only cannot).
    differentiates_dynamics: bool = True
    #: what the error for a hyperparameter this method cannot differentiate adds.
    unconnected_hint: str = ""
    #: whether every run starts from the inner variables' current values (kept across runs)
    #: instead of from Φ₀.
    persistent: bool = False
    #: Grappler passes the compiled run is optimised without (``compiled.without_grappler``); a
    #: Keras ``train_step`` that calls ``hypergradient`` should be first run without them too.
    grappler_off: tuple = ()
    #: the method's settings (``far_ho2.registry.Setting``): what ``far.make_method`` and the
    #: launchers' flags offer, passed to ``from_settings``.
    settings: tuple = ()

    def __init__(self, name: str, jit_compile: bool = False):
        if not isinstance(jit_compile, bool):
            raise ValueError(f"`jit_compile` must be True or False, got {jit_compile!r}.")
        self.name, self.jit_compile = name, jit_compile
        self._registered: list[Registration] = []
        self._results: Optional[list[RunResult]] = None
        self._previous: Optional[list[Previous]] = None  # the last run, per problem
        self._steps_done = 0
        self._functions: dict = {}
        self._failure: Optional[str] = None  # why the last run gave no hypergradients
        self._growth_limit: Optional[float] = guard.DEFAULT_GROWTH_LIMIT
        self._grad_reference: Optional[float] = None  # ‖∇_λ‖∞ of the first healthy run
        self._still, self._stall_warned = 0, False  # hyper-iterations in a row λ did not move
        self._streams = batching.Streams()
        self._built = False

    # -- set-up -----------------------------------------------------------------------------

    @property
    def growth_limit(self) -> Optional[float]:
        """G of the guard's relative-growth test (``far_ho2.guard``): a run fails when the inner
        weights exceed G·max(‖w_0‖∞, 1), the hypergradient G·max(‖first one‖∞, 1), or (in
        ``HyperOptimizer``) a hyperparameter G·max(‖its first value‖∞, 1). Defaults to
        `1e8`; None keeps the finiteness tests only."""
        return self._growth_limit

    @growth_limit.setter
    def growth_limit(self, value: Optional[float]) -> None:
        self._growth_limit = guard.check_growth_limit(value)
        self._functions.clear()

    def compute_gradients(self, outer_objective: Callable, optimizer_dict: InnerProblem,
                          hyper_list: Optional[Sequence] = None) -> list:
        """Registers the hypergradient of ``outer_objective`` through ``optimizer_dict``'s
        dynamics with respect to ``hyper_list`` (default: the registered hyperparameters the
        problem depends on, and the variables of a learned initialisation, found on the first
        run). Returns the hyperparameters given (or every registered one)."""
        if not isinstance(optimizer_dict, InnerProblem):
            raise TypeError("`optimizer_dict` must be the InnerProblem returned by "
                            f"`HyperOptimizer.inner_problem`, got {type(optimizer_dict).__name__}.")
        explicit = hyper_list is not None
        pairs = hyperparameter_pairs(hyper_list if explicit else hyperparameters())
        if explicit and not pairs:
            raise ValueError("`hyper_list` is empty.")
        self._registered.append(Registration(optimizer_dict, outer_objective, pairs, explicit))
        self._functions.clear()
        return [o for _, o in pairs]

    @property
    def registrations(self) -> list[Registration]:
        return list(self._registered)

    @property
    def inner_problems(self) -> list[InnerProblem]:
        return [r.problem for r in self._registered]

    @property
    def inner_objectives(self) -> list[Callable]:
        return [r.problem.objective for r in self._registered]

    # -- the method ---------------------------------------------------------------------------

    def hypergradient(self, problem: InnerProblem, outer_objective: Callable, hypers: list, *,
                      steps: Any, inner_batches: batching.Batches, outer_batch: Any = None,
                      previous: Optional[Previous] = None, online: Any = False, offset: Any = 0,
                      options: Optional[dict] = None) -> RunResult:
        """One problem's result, traced inside ``tf.function``: T = ``steps`` inner steps, then
        E and its hypergradient (the outer direction) with respect to ``hypers``. ``previous``
        is the last run (given when ``online`` or ``uses_previous``); ``online`` is False, True
        or a mode of ``online_modes``; ``options`` are the tensors of ``_options``. The inner
        variables hold the final weights afterwards."""
        raise NotImplementedError

    def _steps(self, T: int) -> Any:
        """T as ``hypergradient`` receives it: an int32 tensor (one trace serves every T), or
        the Python int (one trace per T) where the method unrolls the steps into the graph or XLA
        compiles it (XLA needs the sizes of the stored trajectories)."""
        return T if self.jit_compile else tf.constant(T)

    def _options(self, global_step: int) -> dict:
        """Per-run tensors given to ``hypergradient`` (e.g. a tolerance schedule's value)."""
        return {}

    def _build(self) -> None:
        """Creates the method's own state (variables), once every problem is resolved."""

    # -- the method's hooks into the step (far_ho2.engine) ----------------------------------------

    def health(self, result: RunResult) -> tf.Tensor:
        """The method's own test of ``result`` (in-graph; e.g. its diagnostics finite, an inner
        loop that converges): a run where it fails fails like a diverged one (True here)."""
        return tf.constant(True)

    def failure(self, result: RunResult) -> Optional[str]:
        """Why ``health`` fails for ``result``, in words (eagerly, after a failed run; None here)."""
        return None

    def finish(self, results: list[RunResult]) -> tf.Tensor:
        """The method's own step after the outer update (in-graph): a joint step on w, a stage
        schedule; whether what it computed is healthy (nothing here: True)."""
        return tf.constant(True)

    def report(self, results: list[RunResult], moved: Optional[float], global_step: int) -> None:
        """After a healthy hyper-iteration (in Python), with max ‖Δλ‖∞ of its update (None when
        the directions were only computed): diagnostics and warnings. Here, after
        ``STALL_ITERATIONS`` updates in a row that did not move λ at all, a warning (once) if the
        method says why that is not convergence (``_stall_reason``)."""
        if moved is None:
            return
        self._still = self._still + 1 if moved == 0 else 0
        if self._still == 1:
            self._stall_start()
        if self._still == STALL_ITERATIONS and not self._stall_warned:
            reason = self._stall_reason()
            if reason is not None:
                self._stall_warned = True
                warnings.warn(f"{self.name}, hyper-iteration {global_step}: the hyperparameters have not moved "
                              f"for {STALL_ITERATIONS} hyper-iterations: {reason}", RuntimeWarning, stacklevel=4)

    def _stall_start(self) -> None:
        """Called when λ first stays still: a method notes what it needs for ``_stall_reason``."""

    def _stall_reason(self) -> Optional[str]:
        """Why λ standing still for ``STALL_ITERATIONS`` is a failure, not convergence (None:
        it may be convergence; no warning)."""
        return None

    # -- running ----------------------------------------------------------------------------

    def prepare(self, T: Any, inner_objective_feed_dicts: Any, outer_objective_feed_dicts: Any, global_step: int,
                online: Any = False) -> "Prepared":
        """What a run needs before its traced step: the batches from the suppliers, the problems
        resolved (default ``var_list`` and ``hyper_list``, their errors), the last run when it
        continues (``online``) or warm-starts."""
        T = batching.check_steps(T)
        if not self._registered:
            raise ValueError(f"{self.name} has no problem: call `HyperOptimizer.minimize` (or "
                             f"`compute_gradients`) first.")
        if online is not False and online not in self.online_modes:
            raise ValueError(f"{self.name}: `online` must be False or one of {self.online_modes}, "
                             f"got {online!r}.")
        inner_supplier = self._streams.supplier(inner_objective_feed_dicts, "inner_objective_feed_dicts")
        outer_supplier = self._streams.supplier(outer_objective_feed_dicts, "outer_objective_feed_dicts")
        continuing = online is not False and self._previous is not None
        offset = self._steps_done if continuing else 0
        for reg in self._registered:
            batching.check_supplier(reg.problem.takes_batch, inner_supplier, "inner_objective",
                                    "inner_objective_feed_dicts")
            batching.check_supplier(reg.outer_takes_batch, outer_supplier, "outer_objective",
                                    "outer_objective_feed_dicts")
        inner = batching.inner_batches(inner_supplier, T, offset)
        outer = batching.outer_batch(outer_supplier, global_step)
        self._resolve(inner, outer)
        with_previous = self._previous is not None and (continuing or self.uses_previous)
        self._failure = None
        return Prepared(T, inner, outer, offset, online if continuing else False,
                        self._previous if with_previous else None, global_step)

    def step_arguments(self, prepared: "Prepared") -> dict:
        """The tensors and settings of ``engine.step`` for a prepared run."""
        return dict(steps=self._steps(prepared.T), inner_data=prepared.inner.data, per_step=prepared.inner.per_step,
                    outer_data=prepared.outer, previous=prepared.previous, online=prepared.online,
                    offset=tf.constant(prepared.offset), options=self._options(prepared.global_step),
                    grad_bound=tf.constant(self._grad_bound(), tf.float64))

    def conclude(self, prepared: "Prepared", results: list[RunResult], status: engine.Status,
                 moved: Optional[float] = None, callback: Optional[Callable] = None,
                 describe_update: Optional[Callable[[], str]] = None) -> None:
        """After the step: the guard's one-line ``far.DivergenceError`` if it failed (the step
        restored every variable), else the method's ``report``, the last run kept for online
        modes and warm starts, and ``callback`` for every inner step."""
        phase, largest = int(status.phase.numpy()), float(status.largest.numpy())
        if phase != engine.HEALTHY:
            self._results = None
            what = (self._what_failed(results, prepared.offset, largest) if phase == engine.RUN else
                    describe_update() if describe_update is not None else "the outer update failed")
            self._failure = f"{self._failure_context(prepared.global_step)}: {what}; {guard.UNCHANGED}"
            raise guard.DivergenceError(self._failure)
        if self._grad_reference is None:
            self._grad_reference = largest
        self.report(results, moved, prepared.global_step)
        self._results = results
        self._previous = [Previous(r.final_state, r.carry) for r in results]
        self._steps_done = prepared.offset + prepared.T
        if callback is not None:
            losses = np.stack([r.inner_losses.numpy() for r in results], axis=1)
            for t in range(prepared.T):
                callback(prepared.offset + t, list(losses[t]))

    def _compute(self, prepared: "Prepared") -> Callable:
        """The compiled directions-only step of ``run`` (one per batch layout and online mode)."""
        key = (prepared.inner.per_step, prepared.online, prepared.previous is not None)
        if key not in self._functions:
            inner = [v for reg in self._registered for v in reg.problem.var_list + reg.problem.optimizer.run_variables]

            def compute(steps, inner_data, outer_data, previous, offset, options, grad_bound):
                return engine.step(self, steps=steps, inner_data=inner_data, per_step=key[0], outer_data=outer_data,
                                   previous=previous, online=key[1], offset=offset, options=options,
                                   grad_bound=grad_bound, update=None, inner_bounds=tf.zeros([0], tf.float64),
                                   guarded=inner)
            self._functions[key] = compiled(compute, self.jit_compile, float64=self.float64,
                                            grappler_off=self.grappler_off)
        return self._functions[key]

    @property
    def float64(self) -> bool:
        """Whether a registered problem computes in float64."""
        return any(r.problem.dtype == tf.float64 for r in self._registered)

    def run(self, T: Any, inner_objective_feed_dicts: Any = None, outer_objective_feed_dicts: Any = None,
            global_step: int = 0, online: Any = False, callback: Optional[Callable] = None) -> list[RunResult]:
        """One hyper-iteration's directions without an update (``engine.step``): T inner steps
        from Φ₀ (or, ``online``, from the last run's state; for a ``persistent`` method, from the
        inner variables' values), then the hypergradient of every registered problem.

        ``callback(step, inner_objective_values)`` is called for every inner step after the
        compiled run, with the inner objectives' values L_t (one per problem).

        Raises:
            far.DivergenceError: the guard's (``far_ho2.guard``); the inner variables keep their
                values.
        """
        check_callback(callback)
        prepared = self.prepare(T, inner_objective_feed_dicts, outer_objective_feed_dicts, global_step, online)
        arguments = self.step_arguments(prepared)
        results, status = self._compute(prepared)(*(arguments[k] for k in (
            "steps", "inner_data", "outer_data", "previous", "offset", "options", "grad_bound")))
        self.conclude(prepared, results, status, callback=callback)
        return results

    def restart(self) -> None:
        """The inner problems start afresh (new inner variables' values on new data, e.g. the
        episodes of a meta-learner): the method's state tied to w returns to its start
        (in-graph; nothing here)."""

    def resolve_as_given(self) -> None:
        """Every registered problem taken as given, without ``_resolve``'s eager analysis on a
        batch: for a door that checks its problems itself (``hyper_repr.HyperRepresentation``).

        Raises:
            ValueError: for a problem registered without ``var_list`` or ``hyper_list``.
        """
        for reg in self._registered:
            if not (reg.problem.resolved and reg.explicit):
                raise ValueError(f"{self.name}.resolve_as_given: give every problem's `var_list` and `hyper_list`.")
            reg.hypers, reg.originals = [v for v, _ in reg.candidates], [o for _, o in reg.candidates]
        self.ensure_built()

    def use_outer_optimizers(self, optimizers: Sequence[Any]) -> None:
        """Called by ``HyperOptimizer.finalize`` with the outer optimizers (nothing here; a method
        that adapts their step sizes keeps them)."""

    def state_variables(self) -> dict:
        """The method's own state, as trackables for a ``tf.train.Checkpoint`` (nothing here)."""
        return {}

    @classmethod
    def from_settings(cls, **settings: Any) -> "HyperGradient":
        """The method with the values of its ``settings`` (``far.make_method``): here
        ``cls(**settings)``; a class whose settings are not its arguments maps them."""
        return cls(**settings)

    def get_config(self) -> dict:
        """The method's arguments as JSON-able values, ``{"class_name": ..., **arguments}``:
        ``far.from_config`` makes the same method again (its state, e.g. a penalty's γ, lives
        in ``state_variables``)."""
        return {"class_name": type(self).__name__, "name": self.name, **self._settings()}

    @classmethod
    def from_config(cls, config: dict) -> "HyperGradient":
        """The method of ``get_config()`` without its ``class_name``: ``cls(**config)``."""
        return cls(**config)

    def _settings(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} cannot be saved as a config.")

    def _resolve(self, inner: batching.Batches, outer: Any) -> None:
        """On the first run: the default ``var_list`` of every problem, then its hyperparameters
        (``dependencies.analyse``) and the errors for those it cannot use."""
        if self._registered and all(r.hypers is not None for r in self._registered):
            return
        every_candidate = [v for reg in self._registered for v, _ in reg.candidates]
        first = batching.first_batch(inner)
        for reg in self._registered:
            if reg.hypers is not None:
                continue
            reg.problem.resolve(first, every_candidate)
            self._resolve_hyperparameters(reg, dependencies.analyse(
                reg.problem, reg.outer_objective, [v for v, _ in reg.candidates], first, outer),
                lambda reg=reg: dependencies.check_traceable(reg.problem, reg.outer_objective, first, outer))
        self.ensure_built()

    def ensure_built(self) -> bool:
        """Creates the method's own state once every problem's ``var_list`` is known; whether it
        is built."""
        if not self._built and self._registered and all(r.problem.resolved for r in self._registered):
            self._build()
            self._built = True
        return self._built

    def _resolve_hyperparameters(self, reg: Registration, found: dependencies.Dependencies,
                                 check_traceable: Callable[[], None]) -> None:
        """``reg``'s hyperparameters from what it depends on (``found``), or the error for those
        the method cannot use; ``check_traceable()`` raises first where a Python ``if`` on a
        tensor may have hidden a dependency from the eager analysis."""
        usable = found.objectives | (found.optimizer | found.initialization if self.differentiates_dynamics else set())
        only_dynamics = [v for v, _ in reg.candidates
                         if id(v) not in usable and id(v) in found.optimizer | found.initialization]
        unused = [v for v, _ in reg.candidates if id(v) not in usable and id(v) not in
                  found.optimizer | found.initialization]
        frozen = reg.problem.optimizer.frozen if hasattr(reg.problem.optimizer, "frozen") else []
        frozen_hint = (f" The optimizer's {', '.join(f'`{f}`' for f in frozen)} "
                       f"{'is a concrete tensor' if len(frozen) == 1 else 'are concrete tensors'}: if "
                       f"computed from a hyperparameter, pass a callable instead, e.g. "
                       f"`lambda: tf.nn.sigmoid(beta)`." if frozen else "")
        if only_dynamics:
            given = "" if reg.explicit else (" (the registered hyperparameters are the default `hyper_list`: pass "
                                             "`hyper_list` without them to keep them fixed)")
            raise ValueError(f"{self.name} cannot differentiate {describe_all(only_dynamics)}: "
                             f"only the optimizer's parameters or the initial dynamics read "
                             f"{'it' if len(only_dynamics) == 1 else 'them'}.{self.unconnected_hint}{given}")
        if reg.explicit and unused:
            check_traceable()
            raise ValueError(f"Hyperparameter(s) {describe_all(unused)} in `hyper_list`: "
                             f"neither the inner objective, the optimizer, the initial dynamics nor "
                             f"the outer objective depend on them. Remove them from `hyper_list` or "
                             f"use them.{frozen_hint}")
        pairs = [(v, o) for v, o in reg.candidates if id(v) in usable]
        if not reg.explicit:
            known = {id(v) for v, _ in pairs} | {id(v) for v in reg.problem.var_list}
            pairs += [(v, v) for v in found.init_variables if id(v) not in known]  # learned Φ₀
        if not pairs:
            check_traceable()
            names = describe_all(v for v, _ in reg.candidates)
            raise ValueError(f"None of the registered hyperparameters {names} affects this problem "
                             f"in a way {self.name} differentiates; pass `hyper_list`.{frozen_hint}")
        hyper_ids = {id(v) for v, _ in pairs}
        overlap = [v for v in reg.problem.var_list if id(v) in hyper_ids]
        if overlap:
            raise ValueError(f"{describe_all(overlap)} are both inner variables (`var_list`) and hyperparameters "
                             f"(`hyper_list`); a variable can be only one.")
        reg.hypers, reg.originals = [v for v, _ in pairs], [o for _, o in pairs]

    def _failure_context(self, global_step: int) -> str:
        """What starts the message of a failed run (the method and the hyper-iteration)."""
        return f"{self.name}, hyper-iteration {global_step}"

    #: advice for a diverged inner run or a non-finite diagnostic (None: the default advice).
    diverged_hint: Optional[str] = None

    def _grad_bound(self) -> float:
        """The largest ‖∇_λ‖∞ the growth test accepts: G·max(the first run's, 1)."""
        if self.growth_limit is None or self._grad_reference is None:
            return np.inf
        return self.growth_limit * max(self._grad_reference, 1.0)

    def _what_failed(self, results: list[RunResult], offset: int, largest: float) -> str:
        several = len(results) > 1
        for reg in self._registered:
            bad = [h for h in reg.hypers if not np.all(np.isfinite(h.numpy()))]
            if bad:
                return (f"the hyperparameter(s) {describe_all(bad)} held NaN/Inf before the run (assigned outside "
                        f"far_ho2?): assign finite values")
        for k, r in enumerate(results):
            reason = self.failure(r)
            if reason is not None:
                return f"{reason}{' (inner problem %d)' % k if several else ''}"
        for k, (reg, r) in enumerate(zip(self._registered, results)):
            where = f" of inner problem {k}" if several else ""
            message = divergence(reg.problem, r.final_state, r.health, offset, where, self.diverged_hint)
            if message is not None:
                return message
            if not np.isfinite(r.value.numpy()):
                return f"the outer objective{where} is {r.value.numpy()} at the end of the inner run"
            for h, g in zip(reg.hypers, r.grads):
                if g is not None and not np.all(np.isfinite(g.numpy())):
                    return f"the hypergradient{where} with respect to {describe(h)} is not finite"
        for reg, r in zip(self._registered, results):
            for h, g in zip(reg.hypers, r.grads):
                if g is not None and np.max(np.abs(g.numpy()), initial=0.0) >= largest > self._grad_bound():
                    return (f"the hypergradient with respect to {describe(h)} grew without bound: ‖·‖∞ = "
                            f"{largest:.3g}, beyond growth_limit × max(the first hyper-iteration's "
                            f"{self._grad_reference:.3g}, 1) = {self._grad_bound():.3g}: "
                            f"{self.diverged_hint or OUTER_ADVICE}")
        return "a quantity of the method is not finite"

    # -- results ------------------------------------------------------------------------------

    @property
    def results(self) -> Optional[list[RunResult]]:
        """The last run's results, one per problem (None before a run, or after a failed one)."""
        return self._results

    def _require_results(self) -> list[RunResult]:
        if self._results is not None:
            return self._results
        if self._failure is not None:
            raise ValueError(f"{self.name} has no hypergradients: its last run failed ({self._failure})")
        raise ValueError(f"{self.name} has no hypergradients yet: in TF2 they are computed by running "
                         f"the inner problem, not built as graph tensors; call `run(T, ..., "
                         f"_skip_hyper_ts=True)` (or `HyperOptimizer.compute_hypergradients(T, ...)`) "
                         f"first.")

    def hgrads_hvars(self, hyper_list: Optional[Sequence] = None,
                     aggregation_fn: Optional[Callable] = None,
                     process_fn: Optional[Callable] = None) -> list[tuple[tf.Tensor, Any]]:
        """``[(hypergradient, hyperparameter), ...]`` of the last run, ready for
        ``optimizer.apply_gradients`` (see ``pairs``)."""
        return self.pairs(self._require_results(), hyper_list, aggregation_fn, process_fn)

    def pairs(self, results: list[RunResult], hyper_list: Optional[Sequence] = None,
              aggregation_fn: Optional[Callable] = None,
              process_fn: Optional[Callable] = None) -> list[tuple[tf.Tensor, Any]]:
        """``[(direction, hyperparameter), ...]`` of ``results`` (eager or traced): the directions
        of one hyperparameter from several inner problems are combined by ``aggregation_fn``
        (default: their mean), then ``process_fn`` (e.g. clipping) is applied."""
        collected: dict[int, list] = {}
        variables: dict[int, Any] = {}
        for reg, result in zip(self._registered, results):
            for h, original, g in zip(reg.hypers, reg.originals, result.grads):
                if g is not None:
                    collected.setdefault(id(h), []).append(g)
                    variables.setdefault(id(h), original)
        if hyper_list is None:
            wanted = list(collected)
        else:
            resolved = {id(h) for reg in self._registered for h in reg.hypers}
            wanted = [id(h) for h in flatten_hyperparameters(hyper_list) if id(h) in resolved]
            missing = [h for h in flatten_hyperparameters(hyper_list) if id(h) not in resolved]
            if missing:
                raise ValueError(f"No hypergradient for {describe_all(missing)}: they are "
                                 f"not hyperparameters of any problem of {self.name}, or nothing "
                                 f"depends on them.")
        aggregate = aggregation_fn or _mean
        pairs = []
        for i in wanted:
            if i not in collected:
                continue
            hg = collected[i][0] if len(collected[i]) == 1 else aggregate(collected[i])
            pairs.append((process_fn(hg) if process_fn is not None else hg, variables[i]))
        return pairs
