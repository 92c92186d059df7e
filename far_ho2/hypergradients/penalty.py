"""The penalty method of Mehra & Hamm ("Penalty Method for Inversion-Free Deep Bilevel
Optimization", ACML 2021): the lower level is replaced by its stationarity condition ∇_w g = 0,
enforced by an augmented-Lagrangian penalty whose weight γ grows in stages:
``penalty_direction`` and its façade ``Penalty``.

No Hessian is inverted and no trajectory is differentiated: each inner step costs a
Hessian-vector product (double back-propagation of the surrogate), the outer step one mixed
product. The inner variables are kept across runs (warm-started), with the inner optimizer's
state.
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from far_ho2 import batches as batching
from far_ho2 import inputs as inputs_lib
from far_ho2 import sharding
from far_ho2.batches import Batches
from far_ho2.hypergradients.base import HyperGradient
from far_ho2.hyperparameters import projected_gradient
from far_ho2.inner_problem import InnerProblem
from far_ho2.registry import Setting
from far_ho2.trajectory import empty_trajectory, run_steps
from far_ho2.types import RunResult


class PenaltyCarry(NamedTuple):
    """What the stage test and the multiplier update need of a run."""

    grad_h_norm2: tf.Tensor  # ‖G_λ‖² + ‖∇_w h_w‖² at (λ_k, w_T), G_λ the projected gradient of h_λ
    lower_gradient: list  # ∇_w g(λ_k, w_T), per inner variable
    lower_gradient_norm: tf.Tensor  # ‖∇_w g(λ_k, w_T)‖, the constraint's residual
    surrogate: tf.Tensor  # h_w(λ_k, w_T)
    surrogate_outer: tf.Tensor  # f(λ_k, w_T), the outer objective at the method's own w


def surrogates(problem: InnerProblem, outer_objective: Callable, outer_batch: Any, inputs: Any,
               nu: Sequence[tf.Tensor], gamma: tf.Tensor, lambda_g: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, list]:
    """(h_λ, h_w, f, ∇_w g) at the weights the inner variables hold:

        h_λ = f + νᵀ∇_w g + (γ/2)‖∇_w g‖²,        h_w = h_λ + λ_g·g

    (call under a tape to differentiate them: ∇_w g is built with a tape of its own). On a meta-batch
    sharded across R replicas (``far_ho2.sharding``) they are this replica's terms of the meta-batch's
    sums: f^(r)/R in h, so that ∇_w h is the meta-batch's on its problems; f is returned as f^(r)."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(problem.var_list)
        g = problem.loss(inputs)
    lower = [tf.convert_to_tensor(x) for x in tape.gradient(g, problem.var_list)]
    f = batching.scalar_objective(outer_objective, outer_batch)
    h_upper = (f / sharding.replicas() + tf.add_n([tf.reduce_sum(n * d) for n, d in zip(nu, lower)])
               + 0.5 * gamma * tf.add_n([tf.reduce_sum(d * d) for d in lower]))
    return h_upper, h_upper + lambda_g * g, f, lower


DIVERGENCE_FLOOR = 1e-4  # the stage divergence test's floor, as a fraction of ε (see Penalty.health)
MAX_HALVINGS = 60  # Armijo halvings per step of ``lower_solution``


def lower_solution(problem: InnerProblem, inputs_at: Callable[[tf.Tensor], Any], steps: tf.Tensor,
                   rate: tf.Tensor) -> None:
    """ŵ ≈ argmin_w g(λ, w): T steps of gradient descent on g from the weights the variables hold
    (left in them), with an Armijo step size that starts at ``rate`` and adapts to g's curvature,

        r ← 2r;   r ← r/2 until g(w − r∇g) ≤ g(w) − ½ r‖∇g‖²;   w ← w − r∇g,

    so g decreases at every step whatever the scale of the inner optimizer's rate (which is
    sized for the surrogate h_w, not g). Not differentiated: for reporting E at an inner
    solution."""
    def body(t, r):
        inputs = inputs_at(t)
        grads, loss = problem.gradient(inputs)
        grads, loss = [tf.stop_gradient(g) for g in grads], tf.stop_gradient(loss)
        w = [v.read_value() for v in problem.var_list]
        norm2 = tf.add_n([tf.reduce_sum(g * g) for g in grads])

        def shrink(j, r):
            return j + 1, r / 2

        def rejected(j, r):
            trial = problem._value_at(problem.loss, [x - r * g for x, g in zip(w, grads)], inputs)
            return (j < MAX_HALVINGS) & ~(trial <= loss - 0.5 * r * norm2)

        _, r = tf.while_loop(rejected, shrink, (tf.constant(0), 2 * r))
        problem.load([x - r * g for x, g in zip(w, grads)])
        return t + 1, r

    tf.while_loop(lambda t, r: t < steps, body, (tf.constant(0), tf.cast(rate, problem.dtype)))


def penalty_direction(problem: InnerProblem, outer_objective: Callable, hypers: Sequence[tf.Variable], *,
                      steps: Any, inner_batches: Batches, outer_batch: Any = None, initial_state: NamedTuple,
                      nu: Sequence[tf.Tensor], gamma: Any, lambda_g: Any, rate_scale: Any = 1.0,
                      offset: Any = 0) -> RunResult:
    """One iteration of the penalty method from s_0 = ``initial_state`` (the current w and the
    inner optimizer's kept slots):

        T steps   w ← Φ(w, ∇_w h_w(λ, w))    (the inner optimizer's rate times ``rate_scale``;
                                              a line search evaluates h_w)
        direction ∇_λ h_λ(λ, w_T)

    which, as γ → ∞ (and with the multiplier ν), tends to the implicit hypergradient
    ∇_λ f − ∇²_{λw} g (∇²_{ww} g)⁻¹ ∇_w f: stationarity of h_w in w gives ν + γ∇_w g ≈
    −(∇²_{ww} g)⁻¹ ∇_w f. The method's w_T does not solve the lower level (∇_w g(w_T) = O(1/γ)
    for the plain penalty), so the value reported is E at an inner solution, E(λ, ŵ), with ŵ =
    ``lower_solution`` from w_T (T steps). The inner variables hold w_T afterwards.

    Returns:
        ``RunResult``: ``value`` is f(λ, ŵ), ``grads`` ∇_λ h_λ, ``inner_losses`` h_w along the
        steps, ``carry`` a ``PenaltyCarry`` (with f(λ, w_T) as ``surrogate_outer``).

    References:
        Mehra, Hamm. Penalty Method for Inversion-Free Deep Bilevel Optimization. ACML 2021,
        arXiv:1911.03432; official code github.com/hammlab/bilevel-penalty.
    """
    hypers, dtype = list(hypers), problem.dtype
    gamma, lambda_g = tf.cast(gamma, dtype), tf.cast(lambda_g, dtype)
    nu = [tf.convert_to_tensor(n) for n in nu]
    steps = tf.convert_to_tensor(steps, tf.int32)
    inputs = inputs_lib.prepare(problem, inner_batches, [])

    def lower_surrogate(step_inputs):
        return surrogates(problem, outer_objective, outer_batch, step_inputs, nu, gamma, lambda_g)[1]

    trajectory = run_steps(problem, empty_trajectory(initial_state, steps), inputs.at, 0, steps, offset,
                           objective=lower_surrogate, rate_scale=rate_scale)
    with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
        tape.watch(problem.var_list)
        tape.watch(hypers)
        h_upper, h_lower, f, lower = surrogates(problem, outer_objective, outer_batch,
                                                problem.inputs(inner_batches.at(steps - 1)), nu, gamma, lambda_g)
    grads = sharding.total(tape.gradient(h_upper, hypers))  # the meta-batch's, on every replica
    lower_direction = [tf.convert_to_tensor(d) for d in tape.gradient(h_lower, problem.var_list)]
    del tape
    stationarity = [tf.cast(projected_gradient(h, g), dtype) for h, g in zip(hypers, grads) if g is not None]
    norm2 = sharding.squared_norm(lower_direction, stationarity)
    residual = tf.sqrt(sharding.squared_norm(lower))
    w_T = [v.read_value() for v in problem.var_list]
    lower_solution(problem, inputs.at, steps, problem.optimizer.params(offset, dtype).learning_rate)
    value = tf.stop_gradient(batching.scalar_objective(outer_objective, outer_batch))
    problem.load(w_T)
    carry = PenaltyCarry(norm2, lower, residual, h_lower, f)
    return RunResult(value, grads, trajectory.final, trajectory.losses.stack(), trajectory.health, carry=carry)


class Penalty(HyperGradient):
    """The penalty method of Mehra & Hamm (ACML 2021), augmented Lagrangian by default: each
    ``run(T, ...)`` is T inner steps on the lower surrogate h_w from the current w (the inner
    variables and the inner optimizer's state are kept across runs), then the outer direction
    ∇_λ h_λ for the outer optimizer (see ``penalty_direction``). After each update the stage
    test of the official code, on squared gradient norms,

        ‖G_λ‖² + ‖∇_w h_w‖² < ε²   ⇒   γ ← c_γ γ,  λ_g ← c_λ λ_g,  ε ← c_ε ε,
                                       ν ← ν + γ ∇_w g,  step sizes ← c_lr · step sizes

    where ∇_w g and γ are those of the run that passed (the official code compares ε² with the
    sum of the squares of squared norms, i.e. fourth powers, which stops tightening early, and
    updates ν with the new γ, which overshoots the multiplier by c_γ: harmless at c_γ = 1.1, a
    non-converging oscillation of ν at c_γ = 2), and G_λ = λ − P(λ − ∇_λ h_λ) is the projected
    gradient of a hyperparameter with a ``constraint=`` P (∇_λ h_λ without one): at a solution
    on the boundary of the feasible set ∇_λ h_λ does not vanish, G_λ does. ``constraint=`` must
    be the Euclidean projection onto a closed convex set (e.g. ``tf.clip_by_value`` for a box;
    a ``scalar=True`` hyperparameter's is applied per component). The step sizes
    must shrink as γ grows: the surrogates' curvature grows like γ‖∇²g‖², and fixed steps
    diverge once it leaves their stable range (the guard, ``far_ho2.guard``, then stops the run
    with advice on the step sizes). The inner optimizer's learning rate is scaled
    by the method; the outer optimizer's, a Keras optimizer with a constant learning rate, is
    multiplied in place (with ``lr_factor=1`` any outer optimizer works). ``HyperOptimizer.run``
    returns E at an inner solution ŵ (see ``penalty_direction``), not f at the method's w; a
    warning says when λ stands still for ``STALL_ITERATIONS`` hyper-iterations while the stage
    test fails, and a stage whose statistic grows far beyond its least value (``health``)
    fails as a diverged run.

    ``state_variables()`` holds γ, λ_g, ε, the stage, the step-size scale, ν and the inner
    optimizer's slots (checkpointable); ``diagnostics`` the last run's γ, stage, ‖∇_w g‖ (the
    constraint residual) and the squared gradient norm of the stage test.

    Args:
        gamma: γ₀, the initial penalty weight. Defaults to `1e-2` (the official MNIST setting).
        lambda_g: λ_g₀, the weight of g in the lower surrogate (it steers w towards minima
            rather than any stationary point of g). Defaults to `1e-2`.
        epsilon: ε₀, the stage tolerance (0: γ never grows). Defaults to `1e-2`.
        nu: ν₀, the multiplier's initial value (a number, broadcast to every inner variable).
            Defaults to `0.0`.
        lagrangian: update ν (the augmented Lagrangian); False keeps ν = ν₀ (with ν₀ = 0 the
            plain penalty, whose solution is biased by O(1/γ)). Defaults to `True`.
        gamma_factor: c_γ. Defaults to `1.1` (the official code's).
        lambda_factor: c_λ. Defaults to `0.9` (the official code's).
        epsilon_factor: c_ε. Defaults to `0.9` (the official code's).
        lr_factor: c_lr, the inner optimizer's rate. Defaults to `0.9` (the official code's).
        outer_lr_factor: the outer optimizer's c_lr. Defaults to `lr_factor` (the official
            code shrinks both). 1 keeps the outer rate: then the outer step must stay stable as the
            surrogate's curvature in λ grows with γ, which a fixed rate does not ensure (on a 1-D
            quadratic λ ran away at γ ≈ 9 with SGD(0.1)); the guard then stops the run.
        max_gamma: γ stops growing here (the stages go on updating ν and ε, and the step sizes
            stop shrinking): the augmented Lagrangian converges at a finite γ. Defaults to
            `None` (no limit, as the official code).
        name: a name.

    Raises (at ``run``): a ``ValueError`` for a hyperparameter only the optimizer or Φ₀ read, or
    an outer optimizer whose learning rate cannot be scaled; a ``FloatingPointError`` naming the
    iteration, the stage and γ when a stage diverges.

    References:
        Mehra, Hamm, ACML 2021, arXiv:1911.03432; official code github.com/hammlab/bilevel-penalty.
    """

    online_modes = ()
    differentiates_dynamics = False
    persistent = True
    diverged_hint = ("the stage diverged: its step sizes are too large for γ (the surrogates' curvature grows like "
                     "γ‖∇²_w g‖²); lower the learning rates, or `lr_factor` / `outer_lr_factor` (below 1 they shrink "
                     "the steps at every stage), or `gamma_factor`")

    unconnected_hint = (" The penalty method differentiates no inner trajectory: optimizer "
                        "hyperparameters (learning rate, momentum) and the initialisation Φ₀ get no "
                        "direction; use ReverseHG or ForwardHG for them.")

    settings = (
        Setting("gamma", float, 1e-2, "γ₀, the initial weight of (γ/2)‖∇_w L‖² in w's surrogate.", low=0.0),
        Setting("lambda_g", float, 1e-2, "λ_g₀, the weight of L itself in w's surrogate.", low=0.0),
        Setting("epsilon", float, 1e-2, "ε₀, the stage tolerance (0: γ held).", low=0.0),
        Setting("nu", float, 0.0, "ν₀, the Lagrange multiplier's initial value."))

    def __init__(self, gamma: float = 1e-2, lambda_g: float = 1e-2, epsilon: float = 1e-2, nu: float = 0.0,
                 lagrangian: bool = True, gamma_factor: float = 1.1, lambda_factor: float = 0.9,
                 epsilon_factor: float = 0.9, lr_factor: float = 0.9, outer_lr_factor: Optional[float] = None,
                 max_gamma: Optional[float] = None, name: str = "Penalty"):
        super().__init__(name)
        for argument, value, low in (("gamma", gamma, 0.0), ("lambda_g", lambda_g, 0.0), ("epsilon", epsilon, 0.0),
                                     ("gamma_factor", gamma_factor, 1.0), ("lambda_factor", lambda_factor, 0.0),
                                     ("epsilon_factor", epsilon_factor, 0.0), ("lr_factor", lr_factor, 0.0),
                                     ("outer_lr_factor", lr_factor if outer_lr_factor is None else outer_lr_factor, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low or not np.isfinite(value):
                raise ValueError(f"Penalty: `{argument}` must be a finite number ≥ {low}, got {value!r}.")
        if max_gamma is not None and not (isinstance(max_gamma, (int, float)) and max_gamma >= gamma):
            raise ValueError(f"Penalty: `max_gamma` must be a number ≥ `gamma`, got {max_gamma!r}.")
        if not isinstance(nu, (int, float)) or isinstance(nu, bool):
            raise ValueError(f"Penalty: `nu` must be a number, got {nu!r}.")
        self.initial = dict(gamma=float(gamma), lambda_g=float(lambda_g), epsilon=float(epsilon), nu=float(nu))
        self.lagrangian, self.max_gamma = bool(lagrangian), max_gamma
        self.factors = dict(gamma=float(gamma_factor), lambda_g=float(lambda_factor),
                            epsilon=float(epsilon_factor), lr=float(lr_factor),
                            outer_lr=float(lr_factor if outer_lr_factor is None else outer_lr_factor))
        # under tf.distribute: mirrored, each replica computing the same value (far_ho2.sharding)
        def scalar(value: Any, dtype: tf.DType, name: str) -> tf.Variable:
            return tf.Variable(value, dtype=dtype, trainable=False, name=name,
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.gamma = scalar(gamma, tf.float64, "gamma")
        self.lambda_g = scalar(lambda_g, tf.float64, "lambda_g")
        self.epsilon = scalar(epsilon, tf.float64, "epsilon")
        self.stage = scalar(0, tf.int64, "stage")
        self.rate_scale = scalar(1.0, tf.float64, "rate_scale")
        self.iterations = scalar(0, tf.int64, "iterations")
        # the least stage statistic since the last pass (−1: none yet): the stage's divergence test
        self.least = scalar(-1.0, tf.float64, "least_statistic")
        self.nu: list[list[tf.Variable]] = []  # per problem, per inner variable
        self.slots: list[list[tf.Variable]] = []  # per problem, the inner optimizer's kept state
        self.outer_optimizers: list = []  # their learning rates shrink with the stages
        self.diagnostics: list[dict] = []

    # -- set-up -----------------------------------------------------------------------------------

    def _build(self) -> None:
        with sharding.local_variables():  # shaped as w: under tf.distribute, each replica's own
            for problem in self.inner_problems:
                self.nu.append([tf.Variable(self._initial_nu(v), shape=v.shape, trainable=False, name="nu")
                                for v in problem.var_list])
                state = problem.current_state()
                self.slots.append([tf.Variable(x, trainable=False, name="inner_slot")
                                   for x in tf.nest.flatten(state)[len(problem.var_list):]])

    def _initial_nu(self, variable: tf.Variable) -> tf.Tensor:
        """ν₀ shaped as ``variable``'s value."""
        return tf.fill(tf.shape(variable), tf.constant(self.initial["nu"], variable.dtype))

    def restart(self) -> None:
        """ν ← ν₀ and the inner optimizer's fresh slots, shaped as the inner variables now: a
        multiplier belongs to the problems it was measured on (the stages go on)."""
        for problem, nus, slots in zip(self.inner_problems, self.nu, self.slots):
            for n, v in zip(nus, problem.var_list):
                n.assign(self._initial_nu(v))
            for slot, value in zip(slots, tf.nest.flatten(problem.current_state())[len(problem.var_list):]):
                slot.assign(value)

    def use_outer_optimizers(self, optimizers: Sequence[Any]) -> None:
        """The outer optimizers, whose learning rates the stages shrink; a clear error for one
        whose rate cannot be scaled, unless ``lr_factor`` is 1."""
        self.outer_optimizers = list(optimizers)
        if self.factors["outer_lr"] == 1.0:
            return
        for optimizer in self.outer_optimizers:
            rate = getattr(optimizer, "learning_rate", None) if isinstance(optimizer, keras.optimizers.Optimizer) else None
            if not isinstance(rate, (tf.Variable, keras.Variable)):
                raise ValueError(f"{self.name}: the stages shrink the outer optimizer's learning rate "
                                 f"(`outer_lr_factor`={self.factors['outer_lr']}), which needs a Keras optimizer "
                                 f"with a constant learning rate; got {type(optimizer).__name__} with learning "
                                 f"rate {rate!r}. Pass such an optimizer, or `outer_lr_factor=1`.")

    def state_variables(self) -> dict:
        return {"gamma": self.gamma, "lambda_g": self.lambda_g, "epsilon": self.epsilon, "stage": self.stage,
                "rate_scale": self.rate_scale, "iterations": self.iterations, "least": self.least, "nu": self.nu,
                "slots": self.slots}

    # -- the method -------------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {"gamma": self.initial["gamma"], "lambda_g": self.initial["lambda_g"],
                "epsilon": self.initial["epsilon"], "nu": self.initial["nu"], "lagrangian": self.lagrangian,
                "gamma_factor": self.factors["gamma"], "lambda_factor": self.factors["lambda_g"],
                "epsilon_factor": self.factors["epsilon"], "lr_factor": self.factors["lr"],
                "outer_lr_factor": self.factors["outer_lr"], "max_gamma": self.max_gamma}

    def hypergradient(self, problem, outer_objective, hypers, *, steps, inner_batches, outer_batch=None,
                      previous=None, online=False, offset=0, options=None) -> RunResult:
        """For a registered problem, from its kept state and multiplier; for another one (called
        from a user's compiled code, e.g. a Keras ``train_step``), from the weights the inner
        variables hold with fresh optimizer slots and ν = ν₀, at the current γ."""
        known = [k for k, p in enumerate(self.inner_problems) if p is problem and k < len(self.nu)]
        if known:
            k = known[0]
            template = problem.current_state()
            state = tf.nest.pack_sequence_as(template, [v.read_value() for v in problem.var_list]
                                             + [s.read_value() for s in self.slots[k]])
            nu = [n.read_value() for n in self.nu[k]]
        else:
            state = problem.current_state()
            nu = [tf.fill(tf.shape(v), tf.constant(self.initial["nu"], v.dtype)) for v in problem.var_list]
        return penalty_direction(problem, outer_objective, hypers, steps=steps, inner_batches=inner_batches,
                                 outer_batch=outer_batch, initial_state=state, nu=nu, gamma=self.gamma.read_value(),
                                 lambda_g=self.lambda_g.read_value(), rate_scale=self.rate_scale.read_value(),
                                 offset=offset)

    def health(self, result: RunResult) -> tf.Tensor:
        """The surrogate, the constraint residual and the stage statistic finite, and the stage
        not diverging: its statistic ‖G_λ‖² + ‖∇_w h_w‖² at most √G·max(its least value since
        the last pass, (10⁻⁴ε)²) (G = ``growth_limit``: the statistic is a squared norm, so its
        gradients may grow G^¼ times, 100 at the default). Beyond, the steps are no longer stable
        at this γ (e.g. a fixed outer rate, ``outer_lr_factor=1``, as γ grows), a drift that a
        constraint on λ can hide from the growth tests (measured: λ converged to 10⁻⁸, then
        drifted 0.03 away in 300 hyper-iterations, the statistic ×1.065 each)."""
        carry = result.carry
        finite = tf.reduce_all(tf.math.is_finite(tf.stack([tf.cast(x, tf.float64) for x in (
            carry.surrogate, carry.lower_gradient_norm, carry.grad_h_norm2)])))
        return finite & (tf.cast(carry.grad_h_norm2, tf.float64) <= self._bound())

    def failure(self, result: RunResult) -> Optional[str]:
        carry = result.carry
        for symbol, value in (("h_w", carry.surrogate), ("‖∇_w g‖", carry.lower_gradient_norm),
                              ("‖∇h‖²", carry.grad_h_norm2)):
            if not np.isfinite(float(value.numpy())):
                return f"{symbol} is {float(value.numpy())}: {self.diverged_hint}"
        if self.health(result).numpy():
            return None
        return (f"the stage statistic ‖G_λ‖² + ‖∇_w h_w‖² grew to {float(carry.grad_h_norm2.numpy()):.3g}, "
                f"beyond √growth_limit × max(its least value since the last stage, (1e-4·ε)²) = "
                f"{float(self._bound().numpy()):.3g}: {self.diverged_hint}")

    def _bound(self) -> tf.Tensor:
        """The largest stage statistic the divergence test accepts (see ``health``)."""
        limit = np.sqrt(self.growth_limit) if self.growth_limit is not None else np.inf
        floor = tf.square(DIVERGENCE_FLOOR * self.epsilon)
        return tf.where(self.least < 0, tf.constant(np.inf, tf.float64), limit * tf.maximum(self.least, floor))

    def finish(self, results: list[RunResult]) -> tf.Tensor:
        """The inner optimizer's slots kept; the stage test and, on a pass, the schedule (see the
        class docstring), in-graph."""
        for slots, result in zip(self.slots, results):
            for slot, value in zip(slots, tf.nest.flatten(result.final_state)[len(result.final_state.w):]):
                slot.assign(value)
        self.iterations.assign_add(1)
        total = tf.add_n([tf.cast(r.carry.grad_h_norm2, tf.float64) for r in results])
        passed = total < tf.square(self.epsilon)
        self.least.assign(tf.where(passed, tf.constant(-1.0, tf.float64),
                                   tf.where(self.least < 0, total, tf.minimum(self.least, total))))
        if self.lagrangian:  # with the γ ∇_w g was measured at (see the class docstring)
            for nus, result in zip(self.nu, results):
                for n, d in zip(nus, result.carry.lower_gradient):
                    n.assign(tf.where(passed, n + tf.cast(self.gamma, n.dtype) * d, n))
        grown = tf.minimum(self.gamma * self.factors["gamma"], self.max_gamma or np.inf)
        grows = passed & (grown > self.gamma)
        self.stage.assign_add(tf.cast(passed, tf.int64))
        self.lambda_g.assign(tf.where(passed, self.lambda_g * self.factors["lambda_g"], self.lambda_g))
        self.epsilon.assign(tf.where(passed, self.epsilon * self.factors["epsilon"], self.epsilon))
        self.gamma.assign(tf.where(grows, grown, self.gamma))
        self.rate_scale.assign(tf.where(grows, self.rate_scale * self.factors["lr"], self.rate_scale))
        if self.factors["outer_lr"] != 1.0:
            for optimizer in self.outer_optimizers:
                rate = optimizer.learning_rate
                rate.assign(tf.where(grows, rate * tf.cast(self.factors["outer_lr"], rate.dtype), rate))
        return tf.constant(True)

    def report(self, results: list[RunResult], moved: Optional[float], global_step: int) -> None:
        self.diagnostics = [{"gamma": float(self.gamma.numpy()), "stage": int(self.stage.numpy()),
                             "constraint": float(r.carry.lower_gradient_norm.numpy()),
                             "gradient_norm2": float(r.carry.grad_h_norm2.numpy())} for r in results]
        super().report(results, moved, global_step)

    def _stall_start(self) -> None:
        self._stage_when_still = int(self.stage.numpy())

    def _stall_reason(self) -> Optional[str]:
        if int(self.stage.numpy()) != self._stage_when_still:
            return None
        gradient = max(d["gradient_norm2"] for d in self.diagnostics)
        return (f"stage {int(self.stage.numpy())} has not passed its test meanwhile (‖G_λ‖² + ‖∇_w h_w‖² = "
                f"{gradient:.3g} ≥ ε² = {float(self.epsilon.numpy()) ** 2:.3g}), so γ stays {float(self.gamma.numpy()):.4g} "
                f"and λ is not the bilevel solution. Is a `constraint=` not a projection (the test uses λ − P(λ − ∇h))? "
                f"Otherwise raise `epsilon` or the inner learning rate (w does not settle on the surrogate).")

    def _failure_context(self, global_step: int) -> str:
        return (f"{self.name}, hyper-iteration {global_step} (stage {int(self.stage.numpy())}, "
                f"γ = {float(self.gamma.numpy()):.4g})")
