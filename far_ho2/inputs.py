"""What the inner objective receives at each step of a run, prepared once before the loop.

An inner problem with ``features=`` (a λ-dependent map x = φ_λ(batch), e.g. a representation
network h_λ) and a batch that is the same at every step gets x evaluated once per run instead of
once per step; the methods then differentiate the steps with respect to x as an extra source and
pull the result back to λ once:

    ∇_λ = (∂x/∂λ)ᵀ Σ_t ∂Φ_t/∂x        (reverse),        ∂x/∂λ · e_j   (forward, per direction)

Every method does this before its loop, through ``prepare``.
"""

from typing import Any, NamedTuple, Optional, Sequence

import tensorflow as tf

from far_ho2.batches import Batches


def floating(structure: Any) -> list[tf.Tensor]:
    """The floating-point tensors of a nest (what can be differentiated)."""
    return [x for x in tf.nest.flatten(structure) if isinstance(x, tf.Tensor) and x.dtype.is_floating]


class InnerInputs(NamedTuple):
    """The objective's inputs of a run: ``at(t)`` for step t; ``sources`` are the hoisted
    features x (empty when nothing is hoisted)."""

    problem: Any  # the inner problem (``inputs(batch)`` maps a batch to what the objective receives)
    batches: Batches
    fixed: Any  # x, the hoisted inputs, or None
    sources: list  # the floating tensors of x
    tape: Optional[tf.GradientTape]  # x(λ) recorded, for ``pull_back``

    @property
    def hoisted(self) -> bool:
        return self.tape is not None

    def at(self, t: Any) -> Any:
        """The inputs of step t."""
        return self.fixed if self.hoisted else self.problem.inputs(self.batches.at(t))

    def pull_back(self, cotangents: Sequence[tf.Tensor], hypers: Sequence[tf.Variable]) -> list:
        """(∂x/∂λ)ᵀ · ``cotangents`` per hyperparameter (None where x does not read it); [None, ...]
        when nothing is hoisted."""
        if not self.hoisted:
            return [None] * len(hypers)
        return self.tape.gradient(self.sources, list(hypers), output_gradients=list(cotangents))

    def tangents(self, hypers: Sequence[tf.Variable], tangent: Sequence[tf.Tensor]) -> list:
        """∂x/∂λ · ``tangent`` for the sources (None where unconnected), recomputing x forward."""
        with tf.autodiff.ForwardAccumulator(list(hypers), list(tangent)) as accumulator:
            x = floating(self.problem.inputs(self.batches.data))
        return [accumulator.jvp(xi) for xi in x]


def prepare(problem: Any, batches: Batches, hypers: Sequence[tf.Variable], *, pull_backs: int = 1) -> InnerInputs:
    """The inputs of a run of ``problem`` on ``batches``: its features hoisted out of the loop
    (evaluated once, recorded for the hyperparameters ``hypers``) when it has ``features`` and
    the batch is the same at every step; ``pull_back`` may then be called ``pull_backs`` times."""
    if problem.features is None or batches.per_step:
        return InnerInputs(problem, batches, None, [], None)
    with tf.GradientTape(watch_accessed_variables=False, persistent=pull_backs > 1) as tape:
        tape.watch(list(hypers))
        with tf.name_scope("features"):
            fixed = problem.inputs(batches.data)
    return InnerInputs(problem, batches, fixed, floating(fixed), tape)
