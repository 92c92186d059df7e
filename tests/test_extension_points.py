"""The extension points new methods build on, each on its own: computing the outer direction
without applying it, methods that keep the inner variables and update them after the outer
step, transitions along another direction or with a scaled rate, the shared hoisting of
λ-dependent inputs, and the protocol the loops and the tape plumbing are written against (no
import cycles)."""

import ast
import pathlib
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
import oracles
from far_ho2 import autodiff
from far_ho2 import inputs as inputs_lib
from far_ho2 import trajectory
from far_ho2.batches import Batches
from far_ho2.dynamics import gradient_descent

PACKAGE = pathlib.Path(far.__file__).parent


def ridge(seed=0):
    data = oracles.ridge_data(n=12, d=5, c=1, seed=seed)
    rho = far.get_hyperparameter("rho", np.float64(0.3))
    w = tf.Variable(np.zeros(5), name="w")
    inner = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(data.X, w) - data.Y[:, 0]) ** 2) + rho * tf.reduce_sum(w ** 2)
    outer = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(data.Xv, w) - data.Yv[:, 0]) ** 2)
    return rho, w, inner, outer


def test_compute_then_apply_is_run_and_the_legacy_spellings_are_the_same_calls():
    finals = []
    for mode in ("run", "separate", "legacy"):
        far.clear_hyperparameters()
        rho, w, inner, outer = ridge()
        ho = far.HyperOptimizer()
        run = ho.minimize(outer, keras.optimizers.SGD(0.1), inner, far.GradientDescentOptimizer(0.02))
        for _ in range(3):
            if mode == "run":
                run(10)
            elif mode == "separate":
                ho.compute_hypergradients(10)
                before = float(rho)
                ho.apply_hypergradients()
                assert float(rho) != before
            else:
                run(10, _skip_hyper_ts=True)
                run(10, _only_hyper_ts=True)
        finals.append((float(rho), ho.global_step))
    assert finals[0] == finals[1] == finals[2]


class _OneStep(far.HyperGradient):
    """A persistent toy method: the direction is ∂E/∂λ at the current w (no inner steps), and
    after the outer update it moves w by −0.5·∂E/∂w itself (``finish``, traced)."""

    persistent = True
    online_modes = ()

    def __init__(self):
        super().__init__("OneStep")
        self.updates = []

    def hypergradient(self, problem, outer_objective, hypers, *, steps, inner_batches, outer_batch=None,
                      previous=None, online=False, offset=0, options=None):
        outer = autodiff.outer_gradient(problem, outer_objective, outer_batch, hypers)
        state = problem.current_state()
        return far.RunResult(outer.value, outer.hypers, state, tf.zeros([steps], problem.dtype),
                             trajectory.empty_trajectory(state, steps).health, carry=outer.weights)

    def finish(self, results):
        for v, g in zip(self.inner_problems[0].var_list, results[0].carry):
            v.assign_sub(0.5 * g)
        return tf.constant(True)

    def report(self, results, moved, global_step):
        super().report(results, moved, global_step)
        if moved is not None:
            self.updates.append(float(tf.reduce_sum(self.inner_problems[0].var_list[0])))


def test_a_persistent_method_keeps_the_inner_variables_and_updates_them_after_the_outer_step():
    method = _OneStep()
    theta = far.get_hyperparameter("theta", np.float64(1.0))
    w = tf.Variable(np.array([2.0, -1.0]), name="w")
    outer = lambda: 0.5 * tf.reduce_sum((w - theta) ** 2)
    ho = far.HyperOptimizer(method)
    run = ho.minimize(outer, keras.optimizers.SGD(0.125), lambda: tf.reduce_sum(w ** 2),  # exact in float32
                      far.GradientDescentOptimizer(0.1), hyper_list=[theta])
    run(1)
    # E = ½‖w − θ‖²: ∂E/∂θ = −Σ(w − θ) = −(1 − 2) = 1, so θ ← 1 − 0.125; then w ← w − 0.5(w − θ_old)
    assert float(theta) == 0.875
    np.testing.assert_allclose(w.numpy(), [2.0 - 0.5 * 1.0, -1.0 + 0.5 * 2.0], rtol=1e-15)
    assert method.updates == [1.5]  # reported once, after the outer update and the method's own step
    ho.compute_hypergradients(1)  # computing alone neither moves w nor reports an update
    np.testing.assert_allclose(w.numpy(), [1.5, 0.0], rtol=1e-15)
    assert method.updates == [1.5]
    with pytest.raises(ValueError, match="online"):
        run(1, online=True)


def test_a_transition_descending_another_objective_or_with_a_scaled_rate():
    rho, w, inner, outer = ridge()
    problem = far.InnerProblem(inner, far.GradientDescentOptimizer(0.02), var_list=[w])
    w.assign(np.arange(5.0))
    state = problem.current_state()
    plain, _ = problem.transition(state, None, 0)
    doubled = lambda inputs: 2 * problem.loss(inputs)  # noqa: E731
    along, _ = problem.transition(state, None, 0, objective=doubled)
    scaled, _ = problem.transition(state, None, 0, rate_scale=tf.constant(2.0, tf.float64))
    w0 = np.arange(5.0)
    np.testing.assert_allclose(along.w[0] - w0, 2 * (plain.w[0] - w0), rtol=1e-14)
    np.testing.assert_allclose(scaled.w[0], along.w[0], rtol=1e-14)


def test_hoisted_inputs_pull_back_and_tangents_are_adjoint():
    """x = φ_λ(batch) hoisted once: ⟨(∂x/∂λ)ᵀc, t⟩ = ⟨c, ∂x/∂λ·t⟩, and both match differences."""
    H = far.get_hyperparameter("H", np.random.default_rng(0).normal(size=(3, 3)))
    w = tf.Variable(np.zeros(3))
    batch = (tf.constant(np.random.default_rng(1).normal(size=(4, 3))), tf.constant(np.ones(4)))
    problem = far.InnerProblem(lambda x: tf.reduce_sum((tf.linalg.matvec(x[0], w) - x[1]) ** 2),
                               far.GradientDescentOptimizer(0.1), var_list=[w],
                               features=lambda b: (tf.tanh(b[0] @ H), b[1]))
    prepared = inputs_lib.prepare(problem, Batches(batch, False), [H])
    assert prepared.hoisted and len(prepared.sources) == 2
    rng = np.random.default_rng(2)
    c = [tf.constant(rng.normal(size=x.shape)) for x in prepared.sources]
    t = tf.constant(rng.normal(size=(3, 3)))
    (pulled,) = prepared.pull_back(c, [H])
    tangents = prepared.tangents([H], [t])
    lhs = float(tf.reduce_sum(pulled * t))
    rhs = sum(float(tf.reduce_sum(ci * ti)) for ci, ti in zip(c, tangents) if ti is not None)
    assert lhs == pytest.approx(rhs, rel=1e-12)
    eps, H0 = 1e-6, H.numpy()
    values = []
    for sign in (1, -1):
        H.assign(H0 + sign * eps * t.numpy())
        values.append(sum(float(tf.reduce_sum(ci * xi)) for ci, xi in zip(c, inputs_lib.floating(problem.inputs(batch)))))
    H.assign(H0)
    assert lhs == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-7)  # float64 FD error ~1e-10
    assert not inputs_lib.prepare(problem, Batches(tf.nest.map_structure(lambda x: tf.stack([x, x]), batch), True),
                                  [H]).hoisted  # per-step batches are not hoisted


class _State(NamedTuple):
    w: list


class _Quadratic:
    """A problem that is not an InnerProblem, only what ``types.Problem`` asks: the loops run it."""

    def __init__(self):
        self.var_list = [tf.Variable(np.array([4.0]))]

    def load(self, weights):
        self.var_list[0].assign(weights[0])

    def loss(self, inputs):
        return 0.5 * tf.reduce_sum(self.var_list[0] ** 2)

    def transition(self, state, inputs, step, direction=None, rate_scale=None):
        new = gradient_descent().step(state, [tf.convert_to_tensor(self.var_list[0])], far.dynamics.GradientDescentParams(
            tf.constant(0.25, tf.float64)))
        return new, self.loss(inputs)

    def state_sources(self, state):
        return list(self.var_list)

    def state_names(self, state):
        return ["w"]


def test_the_loops_are_written_against_the_problem_protocol_and_the_modules_have_no_import_cycles():
    problem = _Quadratic()
    start = _State([tf.constant([4.0], tf.float64)])
    run = trajectory.run_steps(problem, trajectory.empty_trajectory(start, 3), lambda t: None, 0, 3)
    np.testing.assert_allclose(run.final.w[0].numpy(), [4.0 * 0.75 ** 3])
    imports = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        imports[module] = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module
                           and node.module.startswith("far_ho2.")}  # module-level imports only
        imports[module] |= {f"far_ho2.{a.name}" for node in tree.body if isinstance(node, ast.ImportFrom)
                            and node.module == "far_ho2" for a in node.names}
    for module in ("far_ho2.trajectory", "far_ho2.autodiff", "far_ho2.inputs", "far_ho2.types"):
        assert not imports[module] & {"far_ho2.inner_problem", "far_ho2.optimizer"}, module
    assert "far_ho2.optimizer" not in imports["far_ho2.inner_problem"]

    def cycle_from(module, path):
        for target in imports.get(module, ()):
            if target in path:
                return path[path.index(target):] + [target]
            found = cycle_from(target, path + [target])
            if found:
                return found
        return None
    for module in imports:
        if module != "far_ho2":  # the package imports everything, nothing imports it back
            assert cycle_from(module, [module]) is None, cycle_from(module, [module])
