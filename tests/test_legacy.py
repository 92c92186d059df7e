"""Drop-in fidelity for FAR-HO code: what a FAR-HO user writes (cases of the original repository's
tests and notebooks, ported with the migration table of docs/migration.md) works, or fails with a one-line
error that says what to write instead."""

import gc
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far
import oracles


def ridge_with_momentum():
    """FAR-HO's second notebook section: ForwardHG on the learning rate, the momentum and an L2
    weight of a small ridge problem (float64)."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(10, 3)), rng.normal(size=10)
    w = tf.Variable(np.zeros(3), name="w")
    lr, mu = far.get_hyperparameter("lr", np.float64(0.05)), far.get_hyperparameter("mu", np.float64(0.5))
    l2 = far.get_hyperparameter("l2", np.float64(0.1))
    inner = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(X, w) - y) ** 2) + l2 * tf.reduce_sum(w ** 2)
    outer = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(X, w) + y) ** 2)
    return w, (lr, mu, l2), inner, outer


def test_default_hyper_list_is_what_the_problem_depends_on_for_every_method():
    """Section 1's 1,400 example weights stay registered while section 2 runs: they are not
    section 2's hyperparameters (so ForwardHG runs 3 tangents, not 1,403). ImplicitHG cannot
    differentiate the learning rate and μ its optimizer reads: with the default ``hyper_list``
    that is an error too (it would leave them untuned without a word), as with an explicit one."""
    leftover = far.get_hyperparameter("example_weights", np.zeros(1400))
    for method in (far.ForwardHG(), far.ReverseHG(), far.ImplicitHG()):
        w, hypers, inner, outer = ridge_with_momentum()
        ho = far.HyperOptimizer(method)
        run = ho.minimize(outer, keras.optimizers.SGD(0.01), inner, far.MomentumOptimizer(hypers[0], hypers[1]))
        if isinstance(method, far.ImplicitHG):
            with pytest.raises(ValueError, match=r"ImplicitHG cannot differentiate \[.*'mu'.*default `hyper_list`"):
                run(5, _skip_hyper_ts=True)
            continue
        run(5, _skip_hyper_ts=True)
        names = {h.name for _, h in ho.hypergradients()}
        assert names == {h.name for h in hypers}, method.name
        assert leftover.name not in names


@pytest.mark.parametrize("method", [far.ForwardHG(), far.ReverseHG()], ids=["forward", "reverse"])
def test_an_unused_hyperparameter_in_hyper_list_is_the_same_error_for_every_method(method):
    w, hypers, inner, outer = ridge_with_momentum()
    unused = far.get_hyperparameter("unused", np.float64(1.0))
    run = far.HyperOptimizer(method).minimize(outer, keras.optimizers.SGD(0.01), inner,
                                              far.MomentumOptimizer(hypers[0], hypers[1]),
                                              hyper_list=list(hypers) + [unused])
    with pytest.raises(ValueError, match=r"Hyperparameter\(s\) \['unused'\] in `hyper_list`: neither"):
        run(3)


def test_a_tensor_computed_from_hyperparameters_warns_and_the_error_gives_the_remedy():
    """FAR-HO's tests/simple_setting.py: Adam's betas as tf.sigmoid of hyperparameters."""
    v1, v2 = tf.Variable([10.0, 3.0]), tf.Variable([[-1.0, -2.0], [1.0, -21.0]])
    lmbd = far.get_hyperparameter("lambda", initializer=tf.ones_initializer, shape=v2.shape)
    eta, beta1, beta2 = (far.get_hyperparameter(n, x) for n, x in (("eta", 0.001), ("beta1", 1.0), ("beta2", 2.0)))
    with pytest.warns(UserWarning, match=r"`beta1` is a concrete tensor.*Pass a callable instead"):
        frozen = far.AdamOptimizer(eta, tf.nn.sigmoid(beta1), tf.nn.sigmoid(beta2), epsilon=1e-4)
    cost = lambda: tf.reduce_mean(v1 ** 2) + tf.reduce_sum(lmbd * v2 ** 2)
    oo = lambda: tf.reduce_mean(v1 * v2)
    run = far.HyperOptimizer().minimize(oo, keras.optimizers.Adam(), cost, frozen, hyper_list=[lmbd, eta, beta1])
    with pytest.raises(ValueError, match=r"'beta1'.*`beta1`, `beta2` are concrete tensors.*pass a callable"):
        run(20)
    ho = far.HyperOptimizer()  # the remedy: callables, evaluated in every differentiated step
    ho.minimize(oo, keras.optimizers.Adam(), cost,
                far.AdamOptimizer(eta, lambda: tf.nn.sigmoid(beta1), lambda: tf.nn.sigmoid(beta2), epsilon=1e-4))(20)
    assert {h.name for _, h in ho.hypergradients()} == {h.name for h in (lmbd, eta, beta1, beta2)}
    assert float(beta1) != 1.0


def test_a_learned_initialisation_from_a_keras_model_is_learned_by_default():
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    init = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])  # its weights are Φ₀
    x, y = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32), np.ones((8, 2), np.float32)
    decay = far.get_hyperparameter("decay", 0.1)
    loss = lambda: tf.reduce_mean((net(x) - y) ** 2) + decay * tf.add_n([tf.reduce_sum(v ** 2) for v in net.weights])
    before = [v.numpy() for v in init.weights]
    ho = far.HyperOptimizer()
    ho.minimize(lambda: tf.reduce_mean((net(x) + y) ** 2), keras.optimizers.SGD(0.1), loss,
                far.GradientDescentOptimizer(0.1), init_dynamics_dict=list(zip(net.weights, init.weights)))(5)
    learned = {h.name for _, h in ho.hypergradients()}
    assert learned == {decay.name} | {v.value.name for v in init.weights}
    assert all(np.any(v.numpy() != b) for v, b in zip(init.weights, before))  # updated by the outer step


def test_online_suppliers_see_the_continued_step_count_and_say_so():
    w, hypers, inner_noisy, outer = ridge_with_momentum()
    batches = [np.float64(t) for t in range(5)]
    inner = lambda b: inner_noisy() + 0.0 * b
    run = far.HyperOptimizer(far.ForwardHG()).minimize(outer, keras.optimizers.SGD(0.0), inner,
                                                       far.MomentumOptimizer(hypers[0], hypers[1]))
    run(5, inner_objective_feed_dicts=lambda t: batches[t], online=True)
    with pytest.raises(IndexError, match=r"continue the count of steps .* `step % T`"):
        run(5, inner_objective_feed_dicts=lambda t: batches[t], online=True)
    run(5, inner_objective_feed_dicts=lambda t: batches[t % 5], online=True)  # the fix


def test_farho_names_exist_or_name_their_replacement():
    w, hypers, inner, outer = ridge_with_momentum()
    gc.collect()  # far.hypergradients() sees every live HyperOptimizer: earlier tests' may await collection
    with pytest.raises(ValueError, match="no HyperOptimizer has hypergradients yet: in TF2"):
        far.hypergradients()
    ho = far.HyperOptimizer()
    ho.minimize(outer, keras.optimizers.SGD(0.01), inner, far.MomentumOptimizer(hypers[0], hypers[1]))(
        5, _skip_hyper_ts=True)
    values = far.hypergradients()  # FAR-HO's function: the hypergradients of every HyperOptimizer
    assert [float(v) for v in values] == [float(g) for g, _ in ho.hypergradients()]
    assert [float(v) for v in far.utils.hypergradients("l2")] == [float(g) for g, h in ho.hypergradients()
                                                                  if h.name.startswith("l2")]
    assert far.utils.hyperparameters() == far.hyperparameters()
    assert float(far.utils.dot(tf.constant([1.0, 2.0]), tf.constant([3.0, 4.0]))) == 11.0
    assert far.utils.vectorize_all([tf.ones((2, 2)), tf.zeros(3)]).shape == (7,)
    assert far.utils.merge_dicts({"a": 1}, None, {"b": 2}) == {"a": 1, "b": 2}
    for name, replacement in (("HYPERPARAMETERS_COLLECTIONS", "hyper_list=network.trainable_variables"),
                              ("GraphKeys", "far.hyperparameters()")):
        with pytest.raises(far.utils.LegacyNameError, match=f"far.{name} .*{replacement}"):
            getattr(far, name)
    with pytest.raises(AttributeError, match="lagrangian_multipliers"):
        far.utils.lagrangian_multipliers()


def test_backtracking_gradient_descent_satisfies_armijo_and_its_hypergradient_is_exact():
    """FAR-HO's tests/test_backtracking.py problem (float64): w from 0, b from 1s,
    L = (w − 10.65158)²/2 + λw²/2 + Σb², E = (w − 2)²/2, η = 0.7831, T = 3."""
    def hypergradient(lmbd_value):
        far.clear_hyperparameters()
        lmbd = far.get_hyperparameter("lmbd", np.float64(lmbd_value))
        w, b = tf.Variable(np.zeros(1), name="w"), tf.Variable(np.ones(2), name="b")
        inner = lambda: ((w - 10.65158) ** 2 / 2 + lmbd * w ** 2 / 2 + tf.reduce_sum(b ** 2))[0]
        outer = lambda: ((w - 2.0) ** 2 / 2)[0]
        optimizer = far.BackTrackingGradientDescentOptimizer(0.7831)
        losses = []
        ho = far.HyperOptimizer(far.ReverseHg())
        value = ho.minimize(outer, keras.optimizers.SGD(0.01), inner, optimizer, var_list=[w, b], hyper_list=[lmbd])(
            3, _skip_hyper_ts=True, callback=lambda t, v: losses.append(v[0]))
        return float(value), float(ho.hypergradients()[0][0]), losses
    value, grad, losses = hypergradient(0.008921)
    assert all(b < a for a, b in zip(losses, losses[1:]))  # sufficient decrease at every step
    eps = 1e-6  # the number of back-tracking steps does not change within ±ε here
    expected = (hypergradient(0.008921 + eps)[0] - hypergradient(0.008921 - eps)[0]) / (2 * eps)
    assert grad == pytest.approx(expected, rel=1e-6)
    plain = far.GradientDescentOptimizer(0.7831)  # without the search, η = 0.7831 on b (curvature 2) diverges
    assert plain.params(0, tf.float64).learning_rate * 2 > 1


def test_removed_keywords_say_what_to_write_instead():
    w, hypers, inner, outer = ridge_with_momentum()
    with pytest.raises(TypeError, match="`collections` names TF1 graph collections"):
        far.get_hyperparameter("c", 1.0, collections=["x"])
    counter = tf.Variable(0, dtype=tf.int64)
    ho = far.HyperOptimizer()
    run = ho.minimize(outer, keras.optimizers.SGD(0.01), inner, far.GradientDescentOptimizer(0.05, use_locking=True),
                      global_step=counter)
    run(range(4))  # FAR-HO's iterable of steps
    run(tf.constant(4))
    assert int(counter) == ho.global_step == 2  # FAR-HO's global step, incremented by every update
    for kwargs, message in ((dict(session=object()), "without sessions"),
                            (dict(initializer_feed_dict={}), "init_dynamics_dict"),
                            (dict(optimization_step_feed_dict={}), "learning rate")):
        with pytest.raises(TypeError, match=message):
            run(3, **kwargs)
    with pytest.raises(ValueError, match="generator.*known before"):
        run(t for t in range(3))
    with pytest.raises(ValueError, match="truncated"):
        run((5, 3))
    with pytest.raises(TypeError, match="linear_system_solver='cg'"):
        far.ImplicitHG(linear_system_solver_gen=lambda *a: None)
    with pytest.raises(TypeError, match="TF1 `minimize` options"):
        far.HyperOptimizer().inner_problem(inner, far.GradientDescentOptimizer(0.1), gate_gradients=1)


def test_misleading_situations_get_errors_that_say_what_happened():
    w, hypers, inner, outer = ridge_with_momentum()
    ho = far.HyperOptimizer()
    ho.minimize(outer, keras.optimizers.SGD(0.01), inner, far.GradientDescentOptimizer(hypers[0]))
    with pytest.raises(ValueError, match="not built as graph tensors; call `run"):
        ho.hypergradient.hgrads_hvars()
    with pytest.raises(TypeError, match=r"callback\(step, feed_dict, session\) has no TF2 meaning"):
        ho.run(3, callback=lambda step, fd, ss: None)
    hypers[0].assign(50.0)  # the inner run diverges
    before = w.numpy().copy()
    with pytest.raises(FloatingPointError, match="diverged"):
        ho.run(300)
    np.testing.assert_array_equal(w.numpy(), before)  # the inner variables are kept, as λ
    with pytest.raises(ValueError, match="last run failed .*diverged"):
        ho.hypergradients()
    a, b = tf.Variable(np.zeros(3)), tf.Variable(np.zeros(2))
    with pytest.raises(ValueError, match=r"'Variable' \(shape \(2,\), float64\), which is not in `var_list` "
                                         r"\['Variable' \(shape \(3,\), float64\)\]"):
        far.InnerProblem(lambda: tf.reduce_sum(a ** 2), far.GradientDescentOptimizer(0.1), var_list=[a],
                         init_dynamics_dict=[(b, np.zeros(2))])
    w.assign([np.nan, 0.0, 0.0])  # weights left NaN by some other computation
    with pytest.raises(FloatingPointError, match="initial state of the inner problem is not finite"):
        far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.01), inner, far.GradientDescentOptimizer(0.01),
                                      hyper_list=[hypers[2]])(3)


def test_reinitialize_draws_new_weights_from_the_initializers():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    for v in model.weights:
        v.assign(tf.fill(v.shape, 7.0))  # "trained"
    far.reinitialize(model)
    kernels = [v.numpy() for v in model.weights if v.name == "kernel"]
    assert all(np.all(k != 7.0) and np.abs(k).max() < 2 for k in kernels)
    assert all(np.all(v.numpy() == 0) for v in model.weights if v.name == "bias")


def test_datasets_and_iterators_are_suppliers_replayed_exactly():
    """One element per inner step (successive runs read successive elements); the reverse pass
    replays each step's element: the same hypergradient as a callable giving the same batches."""
    data = oracles.ridge_data(n=12, d=5, c=1, seed=0)
    X, y = data.X, data.Y[:, 0]
    rows = np.random.default_rng(1).choice(12, size=(12, 4))
    batches = [(X[r], y[r]) for r in rows]  # 12 different mini-batches

    def problem():
        far.clear_hyperparameters()
        rho = far.get_hyperparameter("rho", np.float64(0.5))
        w = tf.Variable(np.zeros(5), name="w")
        inner = lambda b: 0.5 * tf.reduce_sum((tf.linalg.matvec(b[0], w) - b[1]) ** 2) + rho * tf.reduce_sum(w ** 2)
        outer = lambda: 0.5 * tf.reduce_sum((tf.linalg.matvec(data.Xv, w) - data.Yv[:, 0]) ** 2)
        return far.HyperOptimizer(), inner, outer

    results = []
    for supplier in (lambda: (lambda t: batches[t]), lambda: tf.data.Dataset.from_tensor_slices(
            (np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches]))), lambda: iter(batches)):
        ho, inner, outer = problem()
        run = ho.minimize(outer, keras.optimizers.SGD(0.0), inner, far.GradientDescentOptimizer(0.05))
        feed = supplier()
        run(6, feed, _skip_hyper_ts=True)
        first = float(ho.hypergradients()[0][0])
        run(6, (lambda t: batches[t + 6]) if callable(feed) else feed, _skip_hyper_ts=True)  # the next 6
        results.append((first, float(ho.hypergradients()[0][0])))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-12)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-12)
    assert results[0][0] != results[0][1]
    ho, inner, outer = problem()
    run = ho.minimize(outer, keras.optimizers.SGD(0.0), inner, far.GradientDescentOptimizer(0.05))
    with pytest.raises(ValueError, match=r"ran out of elements; repeat it"):
        run(13, tf.data.Dataset.from_tensor_slices((np.stack([b[0] for b in batches]),
                                                    np.stack([b[1] for b in batches]))))


def test_dtype_clash_python_if_and_duplicate_names_are_explained():
    w, hypers, inner, outer = ridge_with_momentum()
    rho32 = far.get_hyperparameter("rho32", 0.5)  # float32, in a float64 objective
    run = far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1),
                                        lambda: inner() + rho32 * tf.reduce_sum(w ** 2),
                                        far.GradientDescentOptimizer(0.01))
    with pytest.raises(TypeError, match=r"'rho32' is float32, the inner variables float64.*dtype=tf.float64"):
        run(3)
    far.clear_hyperparameters()
    w, hypers, inner, outer = ridge_with_momentum()

    def with_python_if():
        loss = inner()
        if loss > 0:  # a Python `if` on a tensor: fine eagerly, not in a traced function
            return loss
        return -loss
    run = far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), with_python_if,
                                        far.GradientDescentOptimizer(0.01), hyper_list=[hypers[2]])
    with pytest.raises(TypeError, match=r"uses a tensor as a Python bool .*`if loss > 0:.*without AutoGraph.*"
                                        r"write `tf.cond\(pred, true_fn, false_fn\)`"):
        run(3)
    with pytest.warns(UserWarning, match="'l2' already exists"):
        far.get_hyperparameter("l2", 1.0)


def test_a_float64_model_prints_no_onednn_warnings():
    script = textwrap.dedent("""
        import far_ho2 as far, keras, numpy as np, tensorflow as tf
        keras.backend.set_floatx("float64")
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
        x, y = np.random.randn(16, 4), np.random.randn(16, 1)
        lr = far.get_hyperparameter("lr", np.float64(0.1))
        loss = lambda: tf.reduce_mean((model(x) - y) ** 2)
        for unroll in (16, 0):
            far.HyperOptimizer(far.ReverseHG(unroll=unroll)).minimize(
                loss, keras.optimizers.SGD(0.01), loss, far.GradientDescentOptimizer(lr))(20)
        print("ran")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ran" in out.stdout, out.stderr[-2000:]
    assert "Not handling type DT_DOUBLE" not in out.stderr
