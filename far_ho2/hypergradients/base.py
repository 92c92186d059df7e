"""``HyperGradient``: what every hypergradient method shares (FAR-HO's base class).

A method registers inner problems with their outer objectives (``compute_gradients``), computes
their hypergradients in one compiled function per ``run``, and hands them out aggregated over
the problems (``hgrads_hvars``). Subclasses implement ``_hypergradient`` only: one problem's
hypergradient, traced inside ``tf.function``. The checks live here: hyperparameters nothing
depends on, non-finite inner states or hypergradients (with the step), malformed arguments.
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from far_ho2 import batches as batching
from far_ho2.hyperparameters import (flatten_hyperparameters, hyperparameter_pairs,
                                     hyperparameters, variable_name)
from far_ho2.compiled import compiled
from far_ho2.inner_problem import InnerProblem
from far_ho2.unroll import raise_if_diverged


class HyperGrad(NamedTuple):
    """One inner problem's result."""

    value: tf.Tensor  # E(w_T, λ)
    grads: list  # ∇_λ E per hyperparameter; None where E does not depend on it
    final_state: NamedTuple  # s_T
    inner_losses: tf.Tensor  # L_t(w_t), t = 0 … T−1
    first_nonfinite: tf.Tensor  # per state component, the first step making it non-finite (−1: none)
    carry: Any = None  # what the method keeps for the next run (forward tangents Z, a warm start)


class Previous(NamedTuple):
    """A problem's last run, for online runs and warm starts."""

    state: NamedTuple  # s_T
    carry: Any  # HyperGrad.carry


class _Registered(NamedTuple):
    problem: InnerProblem
    outer_objective: Callable
    hypers: list  # tf.Variable
    originals: list  # what the user passed, per hyper (a keras.Variable stays one)
    explicit: bool  # hyper_list was given (else: the registered hyperparameters)
    outer_takes_batch: Optional[bool]  # batches.takes_batch(outer_objective)


def _all_finite(result: HyperGrad) -> tf.Tensor:
    """Whether the inner states, E and every hypergradient of ``result`` are finite (in-graph)."""
    checks = [tf.reduce_all(result.first_nonfinite < 0), tf.reduce_all(tf.math.is_finite(result.value))]
    checks += [tf.reduce_all(tf.math.is_finite(g)) for g in result.grads if g is not None]
    return tf.reduce_all(tf.stack(checks))


def _mean(hypergradients: list) -> tf.Tensor:
    return tf.reduce_mean(tf.stack(hypergradients), axis=0)


class HyperGradient:
    """Base class of the hypergradient methods (``ReverseHG``, ``ForwardHG``, ``ImplicitHG``...)."""

    #: ``run``'s ``online`` values this method accepts besides False.
    online_modes: tuple = (True,)
    #: whether ``_hypergradient`` receives the last run even when not online (warm starts).
    uses_previous: bool = False
    #: what the error for a hyperparameter nothing depends on adds for this method.
    unconnected_hint: str = ""

    def __init__(self, name: str, jit_compile: bool = False):
        if not isinstance(jit_compile, bool):
            raise ValueError(f"`jit_compile` must be True or False, got {jit_compile!r}.")
        self.name, self.jit_compile = name, jit_compile
        self._registered: list[_Registered] = []
        self._results: Optional[list[HyperGrad]] = None
        self._previous: Optional[list[Previous]] = None  # the last run, per problem
        self._steps_done = 0
        self._functions: dict = {}
        self._unconnected: set = set()  # registered by default, but nothing depends on them

    # -- set-up -----------------------------------------------------------------------------

    def compute_gradients(self, outer_objective: Callable, optimizer_dict: InnerProblem,
                          hyper_list: Optional[Sequence] = None) -> list[tf.Variable]:
        """Registers the hypergradient of ``outer_objective`` through ``optimizer_dict``'s
        dynamics with respect to ``hyper_list`` (default: the registered hyperparameters it
        depends on). Returns the hyperparameter variables."""
        if not isinstance(optimizer_dict, InnerProblem):
            raise TypeError("`optimizer_dict` must be the InnerProblem returned by "
                            f"`HyperOptimizer.inner_problem`, got {type(optimizer_dict).__name__}.")
        outer_takes_batch = batching.takes_batch(outer_objective, "outer_objective")
        explicit = hyper_list is not None
        pairs = hyperparameter_pairs(hyper_list if explicit else hyperparameters())
        if not pairs:
            raise ValueError("`hyper_list` is empty." if explicit else
                             "No hyperparameters: create them with `far.get_hyperparameter` or pass "
                             "`hyper_list`.")
        self._registered.append(_Registered(optimizer_dict, outer_objective, [v for v, _ in pairs],
                                            [o for _, o in pairs], explicit, outer_takes_batch))
        self._functions.clear()
        return [o for _, o in pairs]

    @property
    def inner_problems(self) -> list[InnerProblem]:
        return [r.problem for r in self._registered]

    @property
    def inner_objectives(self) -> list[Callable]:
        return [r.problem.objective for r in self._registered]

    # -- the method ---------------------------------------------------------------------------

    def _hypergradient(self, problem: InnerProblem, outer_objective: Callable, hypers: list, *,
                       steps: Any, inner_batches: batching.Batches, outer_batch: Any,
                       previous: Optional[Previous], online: Any, offset: tf.Tensor,
                       options: dict) -> HyperGrad:
        """One problem's hypergradient, traced inside ``tf.function``. ``previous`` is the last
        run (given when ``online`` or ``uses_previous``); ``online`` is False, True or a mode of
        ``online_modes``; ``options`` are the tensors of ``_options``."""
        raise NotImplementedError

    def _steps(self, T: int) -> Any:
        """T as ``_hypergradient`` receives it: an int32 tensor (one trace serves every T), or
        the Python int (one trace per T) where the method unrolls the steps into the graph or XLA
        compiles it (XLA needs the sizes of the stored trajectories)."""
        return T if self.jit_compile else tf.constant(T)

    def _options(self, global_step: int) -> dict:
        """Per-run tensors given to ``_hypergradient`` (e.g. a tolerance schedule's value)."""
        return {}

    def _compiled(self, per_step: bool, online: Any, with_previous: bool) -> Callable:
        key = (per_step, online, with_previous)
        if key not in self._functions:
            def compute(steps, inner_data, outer_data, previous, offset, options):
                results = []
                for k, reg in enumerate(self._registered):
                    result = self._hypergradient(
                        reg.problem, reg.outer_objective, reg.hypers, steps=steps,
                        inner_batches=batching.Batches(inner_data, per_step), outer_batch=outer_data,
                        previous=previous[k] if with_previous else None, online=online, offset=offset,
                        options=options)
                    results.append(self._check_connected(reg, result))
                return results, tf.reduce_all(tf.stack([_all_finite(r) for r in results]))
            self._functions[key] = compiled(compute, self.jit_compile)
        return self._functions[key]

    def _check_connected(self, reg: _Registered, result: HyperGrad) -> HyperGrad:
        unconnected = [h for h, g in zip(reg.hypers, result.grads) if g is None]
        self._unconnected.update(id(h) for h in unconnected)
        if reg.explicit and unconnected:
            raise ValueError(f"Hyperparameter(s) {[variable_name(h) for h in unconnected]} in "
                             f"`hyper_list`: neither the inner objective, the optimizer, the initial "
                             f"dynamics nor the outer objective depend on them. Remove them from "
                             f"`hyper_list` or use them.{self.unconnected_hint}")
        if len(unconnected) == len(reg.hypers):
            raise ValueError("None of the registered hyperparameters "
                             f"{[variable_name(h) for h in reg.hypers]} affects this problem; pass "
                             f"`hyper_list`.")
        return result

    # -- running ----------------------------------------------------------------------------

    def run(self, T: int, inner_objective_feed_dicts: Any = None, outer_objective_feed_dicts: Any = None,
            global_step: int = 0, online: Any = False, callback: Optional[Callable] = None) -> list[HyperGrad]:
        """One hyper-iteration's hypergradients: T inner steps from Φ₀ (or, ``online``, from the
        last run's state), then the hypergradient of every registered problem.

        ``callback(step, inner_objective_values)`` is called for every inner step after the
        compiled run, with the inner objectives' values L_t (one per problem).
        """
        T = batching.check_steps(T)
        if not self._registered:
            raise ValueError(f"{self.name} has no problem: call `HyperOptimizer.minimize` (or "
                             f"`compute_gradients`) first.")
        if online is not False and online not in self.online_modes:
            raise ValueError(f"{self.name}: `online` must be False or one of {self.online_modes}, "
                             f"got {online!r}.")
        continuing = online is not False and self._previous is not None
        offset = self._steps_done if continuing else 0
        for reg in self._registered:
            batching.check_supplier(reg.problem.takes_batch, inner_objective_feed_dicts, "inner_objective",
                                    "inner_objective_feed_dicts")
            batching.check_supplier(reg.outer_takes_batch, outer_objective_feed_dicts, "outer_objective",
                                    "outer_objective_feed_dicts")
        inner = batching.inner_batches(inner_objective_feed_dicts, T, offset)
        outer = batching.outer_batch(outer_objective_feed_dicts, global_step)
        self._resolve(inner)
        with_previous = self._previous is not None and (continuing or self.uses_previous)
        compute = self._compiled(inner.per_step, online if continuing else False, with_previous)
        results, finite = compute(self._steps(T), inner.data, outer,
                                  self._previous if with_previous else None, tf.constant(offset),
                                  self._options(global_step))
        if not finite.numpy():  # one flag to read; the details only when something is wrong
            self._check_finite(results, offset)
        self._after_run(results, global_step)
        self._results = results
        self._previous = [Previous(r.final_state, r.carry) for r in results]
        self._steps_done = offset + T
        if callback is not None:
            losses = np.stack([r.inner_losses.numpy() for r in results], axis=1)
            for t in range(T):
                callback(offset + t, list(losses[t]))
        return results

    def _after_run(self, results: list[HyperGrad], global_step: int) -> None:
        """A hook for methods to report on a run (e.g. a linear solver's residual)."""

    def _resolve(self, inner: batching.Batches) -> None:
        every_hyper = [h for reg in self._registered for h in reg.hypers]
        first = batching.first_batch(inner)
        for reg in self._registered:
            reg.problem.resolve(first, every_hyper)
            hyper_ids = {id(h) for h in reg.hypers}
            overlap = [variable_name(v) for v in reg.problem.var_list if id(v) in hyper_ids]
            if overlap:
                raise ValueError(f"{overlap} are both inner variables (`var_list`) and "
                                 f"hyperparameters (`hyper_list`); a variable can be only one.")

    def _check_finite(self, results: list[HyperGrad], offset: int) -> None:
        for k, (reg, r) in enumerate(zip(self._registered, results)):
            where = f" of inner problem {k}" if len(results) > 1 else ""
            raise_if_diverged(reg.problem, r.final_state, r.first_nonfinite, offset, where)
            if not np.isfinite(r.value.numpy()):
                raise FloatingPointError(f"The outer objective{where} is {r.value.numpy()} at the end "
                                         f"of the inner run; the hyperparameters were not updated.")
            for h, g in zip(reg.hypers, r.grads):
                if g is not None and not np.all(np.isfinite(g.numpy())):
                    raise FloatingPointError(
                        f"The hypergradient{where} with respect to {variable_name(h)!r} is not "
                        f"finite; the hyperparameters were not updated.")

    # -- results ------------------------------------------------------------------------------

    def hgrads_hvars(self, hyper_list: Optional[Sequence] = None,
                     aggregation_fn: Optional[Callable] = None,
                     process_fn: Optional[Callable] = None) -> list[tuple[tf.Tensor, Any]]:
        """``[(hypergradient, hyperparameter), ...]`` of the last run, ready for
        ``optimizer.apply_gradients``: the hypergradients of one hyperparameter from several
        inner problems are combined by ``aggregation_fn`` (default: their mean), then
        ``process_fn`` (e.g. clipping) is applied."""
        if self._results is None:
            raise ValueError(f"{self.name} has not run yet: call `run` first.")
        collected: dict[int, list] = {}
        variables: dict[int, Any] = {}
        for reg, result in zip(self._registered, self._results):
            for h, original, g in zip(reg.hypers, reg.originals, result.grads):
                if g is not None:
                    collected.setdefault(id(h), []).append(g)
                    variables.setdefault(id(h), original)
        if hyper_list is None:
            wanted = list(collected)
        else:
            wanted = [id(h) for h in flatten_hyperparameters(hyper_list) if id(h) not in self._unconnected]
            missing = [i for i in wanted if i not in collected]
            if missing:
                names = [variable_name(h) for h in flatten_hyperparameters(hyper_list) if id(h) in missing]
                raise ValueError(f"No hypergradient for {names}: they are not hyperparameters of "
                                 f"any problem of {self.name}, or nothing depends on them.")
        aggregate = aggregation_fn or _mean
        pairs = []
        for i in wanted:
            hg = collected[i][0] if len(collected[i]) == 1 else aggregate(collected[i])
            pairs.append((process_fn(hg) if process_fn is not None else hg, variables[i]))
        return pairs
