"""The types the modules share: what the loops and the tape plumbing use of an inner problem
and of its optimizer (protocols, so that ``trajectory`` and ``autodiff`` need not import the
façades), and what a method returns for one inner problem. No logic."""

from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import tensorflow as tf

from far_ho2.dynamics import Dynamics

#: ``objective(inputs) -> scalar`` at the weights the inner variables hold: what a transition
#: descends instead of L (e.g. a penalty method's surrogate); a line search evaluates it too.
Objective = Callable[[Any], tf.Tensor]


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

    def transition(self, state: NamedTuple, inputs: Any, step: Any, objective: Optional[Objective] = None,
                   rate_scale: Optional[tf.Tensor] = None, search: bool = True) -> tuple[NamedTuple, tf.Tensor]:
        """(s', L_t): one step of Φ from ``state``, whose weights the variables hold."""

    def state_sources(self, state: NamedTuple) -> list:
        """What to watch to differentiate with respect to ``state``."""

    def state_names(self, state: NamedTuple) -> list[str]:
        """Readable names of the flattened state components."""


class Health(NamedTuple):
    """Per flattened state component of a run, for the guard (``far_ho2.guard``)."""

    first_bad: tf.Tensor  # int32: the first step t whose s_{t+1} is unhealthy (−1: none; −2: s_0 non-finite)
    grew: tf.Tensor  # bool: it was finite then, beyond its bound (else: non-finite)
    bound: tf.Tensor  # float64: the largest ‖·‖∞ accepted (the weights' G·max(‖w_0‖∞, 1); ∞)


class RunResult(NamedTuple):
    """One inner problem's result of a run of a hypergradient method."""

    value: tf.Tensor  # E(w_T, λ)
    grads: list  # ∇_λ E per hyperparameter (the outer direction); None where E does not depend on it
    final_state: NamedTuple  # s_T
    inner_losses: tf.Tensor  # L_t(w_t), t = 0 … T−1
    health: Health  # per state component, the first step making it non-finite or too large
    carry: Any = None  # what the method keeps or reports (forward tangents Z, a solver's residual, ...)


class Previous(NamedTuple):
    """A problem's last run, for online runs and warm starts."""

    state: NamedTuple  # s_T
    carry: Any  # RunResult.carry
