"""The types the modules share: what the loops and the tape plumbing use of an inner problem
and of its optimizer (protocols, so that ``trajectory`` and ``autodiff`` need not import the
façades), and what a method returns for one inner problem. No logic."""

from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import tensorflow as tf

from far_ho2.dynamics import Dynamics

#: ``direction(inputs) -> (gradients, loss)`` at the weights the inner variables hold: what a
#: transition steps along instead of ∇_w L (e.g. the gradient of a penalty method's surrogate).
Direction = Callable[[Any], tuple[list[tf.Tensor], tf.Tensor]]


@runtime_checkable
class InnerOptimizer(Protocol):
    """A differentiable inner optimizer: its dynamics Φ and its parameters at a step."""

    dynamics: Dynamics

    def params(self, step: Any, dtype: tf.DType) -> NamedTuple:
        """The parameters (learning rate, ...) of inner step ``step``, as tensors of ``dtype``."""


class Problem(Protocol):
    """What the loops (``trajectory``) and the tape plumbing (``autodiff``) use of an inner
    problem: the inner variables hold the weights w of the state being differentiated."""

    var_list: list[tf.Variable]

    def load(self, weights: Sequence[tf.Tensor]) -> None:
        """Writes w into the inner variables."""

    def loss(self, inputs: Any) -> tf.Tensor:
        """L(w, λ) at the weights the variables hold."""

    def transition(self, state: NamedTuple, inputs: Any, step: Any, direction: Optional[Direction] = None,
                   rate_scale: Optional[tf.Tensor] = None) -> tuple[NamedTuple, tf.Tensor]:
        """(s', L_t): one step of Φ from ``state``, whose weights the variables hold."""

    def state_sources(self, state: NamedTuple) -> list:
        """What to watch to differentiate with respect to ``state``."""

    def state_names(self, state: NamedTuple) -> list[str]:
        """Readable names of the flattened state components."""


class RunResult(NamedTuple):
    """One inner problem's result of a run of a hypergradient method."""

    value: tf.Tensor  # E(w_T, λ)
    grads: list  # ∇_λ E per hyperparameter (the outer direction); None where E does not depend on it
    final_state: NamedTuple  # s_T
    inner_losses: tf.Tensor  # L_t(w_t), t = 0 … T−1
    first_nonfinite: tf.Tensor  # per state component, the first step making it non-finite (−1: none)
    carry: Any = None  # what the method keeps or reports (forward tangents Z, a solver's residual, ...)


class Previous(NamedTuple):
    """A problem's last run, for online runs and warm starts."""

    state: NamedTuple  # s_T
    carry: Any  # RunResult.carry
