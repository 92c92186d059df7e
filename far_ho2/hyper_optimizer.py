"""``HyperOptimizer``: FAR-HO's entry point, a thin stateful façade over a hypergradient method.

    run = far.HyperOptimizer().minimize(E, outer_optimizer, L, far.GradientDescentOptimizer(lr))
    for _ in range(hyper_iterations):
        run(T, inner_objective_feed_dicts=train_batch, outer_objective_feed_dicts=valid_batch)

One ``run`` is one hyper-iteration: reset the inner state to Φ₀, run T inner steps, compute the
hypergradient, update the hyperparameters with the outer optimizer, project them onto their
constraints.
"""

from typing import Any, Callable, Optional, Sequence

import keras
import tensorflow as tf

from far_ho2.compiled import compiled
from far_ho2.hypergradients.base import HyperGradient
from far_ho2.hypergradients.reverse import ReverseHG
from far_ho2.hyperparameters import apply_constraints, flatten_hyperparameters
from far_ho2.inner_problem import InnerProblem
from far_ho2.optimizer import Optimizer


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
        self._groups: list[tuple[Any, list]] = []  # (outer optimizer, its hyperparameters)
        self._finalized: Optional[tuple] = None
        self._updates: dict = {}  # compiled outer updates, per (optimizer, variables)
        self.global_step = 0

    @property
    def hypergradient(self) -> HyperGradient:
        return self._hypergradient

    @property
    def inner_objectives(self) -> list[Callable]:
        return self._hypergradient.inner_objectives

    def inner_problem(self, inner_objective: Callable, inner_objective_optimizer: Optimizer,
                      var_list: Optional[Sequence] = None, init_dynamics_dict: Any = None,
                      features: Optional[Callable] = None) -> InnerProblem:
        """An inner problem  min_w L  (see ``InnerProblem``); call once per episode of a
        meta-batch, each followed by ``outer_problem``."""
        return InnerProblem(inner_objective, inner_objective_optimizer, var_list, init_dynamics_dict,
                            features)

    def outer_problem(self, outer_objective: Callable, optim_dict: InnerProblem,
                      outer_objective_optimizer: Any, hyper_list: Optional[Sequence] = None) -> "HyperOptimizer":
        """Registers E (a callable taking the outer batch, or nothing) for ``optim_dict``, its
        hyperparameters updated by ``outer_objective_optimizer`` (a Keras optimizer or a far
        optimizer). ``hyper_list`` defaults to the registered hyperparameters E depends on."""
        if self._finalized is not None:
            raise ValueError("`outer_problem` after `finalize`: register every problem first.")
        if not callable(getattr(outer_objective_optimizer, "apply_gradients", None)):
            raise TypeError("`outer_objective_optimizer` must have `apply_gradients` (a Keras "
                            f"optimizer or a far optimizer), got {type(outer_objective_optimizer).__name__}.")
        hypers = self._hypergradient.compute_gradients(outer_objective, optim_dict, hyper_list)
        for optimizer, group in self._groups:
            if optimizer is outer_objective_optimizer:
                ids = {id(h) for h in flatten_hyperparameters(group)}
                group.extend(h for h in hypers if id(flatten_hyperparameters([h])[0]) not in ids)
                break
        else:
            self._groups.append((outer_objective_optimizer, list(hypers)))
        return self

    def finalize(self, aggregation_fn: Optional[Callable] = None,
                 process_fn: Optional[Callable] = None) -> Callable:
        """Ends the set-up. ``aggregation_fn`` combines one hyperparameter's hypergradients from
        several inner problems (default: mean); ``process_fn`` transforms each result (e.g.
        clipping). Returns ``run``."""
        if self._finalized is not None:
            raise ValueError("HyperOptimizer.finalize has already been called on this object.")
        if not self._groups:
            raise ValueError("Nothing to finalize: call `inner_problem` and `outer_problem` first.")
        self._finalized = (aggregation_fn, process_fn)
        return self.run

    def minimize(self, outer_objective: Callable, outer_objective_optimizer: Any,
                 inner_objective: Callable, inner_objective_optimizer: Optimizer,
                 hyper_list: Optional[Sequence] = None, var_list: Optional[Sequence] = None,
                 init_dynamics_dict: Any = None, aggregation_fn: Optional[Callable] = None,
                 process_fn: Optional[Callable] = None, *, features: Optional[Callable] = None) -> Callable:
        """``inner_problem``, ``outer_problem`` and ``finalize`` in one call (note FAR-HO's
        argument order: outer first). Returns ``run``."""
        problem = self.inner_problem(inner_objective, inner_objective_optimizer, var_list,
                                     init_dynamics_dict, features)
        self.outer_problem(outer_objective, problem, outer_objective_optimizer, hyper_list)
        return self.finalize(aggregation_fn, process_fn)

    def run(self, T: int, inner_objective_feed_dicts: Any = None, outer_objective_feed_dicts: Any = None,
            online: Any = False, callback: Optional[Callable] = None, _skip_hyper_ts: bool = False,
            _only_hyper_ts: bool = False) -> Optional[tf.Tensor]:
        """One hyper-iteration.

        Args:
            T: the number of inner steps.
            inner_objective_feed_dicts: the inner batch, or a callable ``step -> batch``.
            outer_objective_feed_dicts: the outer batch, or a callable ``global_step -> batch``.
            online: continue the inner state of the previous run instead of restarting from Φ₀
                (real-time / truncated online modes; ``'wr'`` for ForwardHG's warm restart).
            callback: ``callback(step, inner_objective_values)`` for every inner step.
            _skip_hyper_ts: compute the hypergradients without updating (see ``hypergradients``).
            _only_hyper_ts: update with the hypergradients already computed.

        Returns:
            The outer objective at the end of the inner run (the mean over inner problems),
            before the update; ``None`` with ``_only_hyper_ts``.
        """
        if self._finalized is None:
            raise ValueError("Call `minimize` (or `finalize`) before `run`.")
        value = None
        if not _only_hyper_ts:
            results = self._hypergradient.run(T, inner_objective_feed_dicts, outer_objective_feed_dicts,
                                              self.global_step, online, callback)
            value = (results[0].value if len(results) == 1 else  # no eager ops when there is one
                     tf.reduce_mean(tf.stack([r.value for r in results])))
        if not _skip_hyper_ts:
            aggregation_fn, process_fn = self._finalized
            for optimizer, group in self._groups:
                self._update(optimizer, self._hypergradient.hgrads_hvars(group, aggregation_fn, process_fn))
            self.global_step += 1
        return value

    def _update(self, optimizer: Any, pairs: list) -> None:
        """λ ← P(λ − step): the outer optimizer's update, then the constraints' projections. A
        Keras optimizer's update is compiled after its first (eager, slot-building) call: eager
        Keras updates cost tens of milliseconds for a network's variables."""
        grads, variables = [g for g, _ in pairs], [v for _, v in pairs]
        key = (id(optimizer), tuple(id(v) for v in variables))
        if key in self._updates:
            self._updates[key](grads)
            return
        optimizer.apply_gradients(pairs)
        apply_constraints(flatten_hyperparameters(variables))
        if isinstance(optimizer, keras.optimizers.Optimizer):
            def update(grads):
                optimizer.apply_gradients(zip(grads, variables))
                apply_constraints(flatten_hyperparameters(variables))
            self._updates[key] = compiled(update)

    def hypergradients(self) -> list[tuple[tf.Tensor, Any]]:
        """The last run's ``[(hypergradient, hyperparameter), ...]``, aggregated and processed."""
        aggregation_fn, process_fn = self._finalized or (None, None)
        return [pair for _, group in self._groups
                for pair in self._hypergradient.hgrads_hvars(group, aggregation_fn, process_fn)]
