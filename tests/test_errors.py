"""Bad input gets a clear error naming the problem and the argument; nothing is updated."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import far_ho2 as far


def problem(lr=0.1):
    x = tf.constant(np.random.default_rng(0).normal(size=(6, 3)))
    w = tf.Variable(np.zeros(3), name="w")
    rho = far.get_hyperparameter("rho", np.float64(0.1))
    inner = lambda: tf.reduce_sum((tf.linalg.matvec(x, w) - 1.0) ** 2) + rho * tf.reduce_sum(w ** 2)
    outer = lambda: tf.reduce_sum((tf.linalg.matvec(x, w) + 1.0) ** 2)
    return w, rho, inner, outer, far.GradientDescentOptimizer(lr)


def test_hyperparameter_nothing_depends_on_is_named():
    w, rho, inner, outer, opt = problem()
    unused = far.get_hyperparameter("unused_decay", np.float64(1.0))
    run = far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), inner, opt, hyper_list=[rho, unused])
    with pytest.raises(ValueError, match="unused_decay"):
        run(5)


def test_default_hyper_list_ignores_unrelated_hyperparameters():
    w, rho, inner, outer, opt = problem()
    unrelated = far.get_hyperparameter("someone_elses", np.float64(1.0))
    ho = far.HyperOptimizer()
    ho.minimize(outer, keras.optimizers.SGD(0.1), inner, opt)(5)
    assert [h.name for _, h in ho.hypergradients()] == [rho.name]
    assert float(unrelated) == 1.0


@pytest.mark.parametrize("learning_rate, T, jit_compile", [(50.0, 400, False), (1e100, 8, False),
                                                          (50.0, 400, True)],
                         ids=["stored_states", "unrolled_tapes", "xla_stored_states"])
def test_diverging_inner_loop_names_the_step_and_keeps_hyperparameters(learning_rate, T, jit_compile):
    w, rho, inner, outer, _ = problem()
    run = far.HyperOptimizer(far.ReverseHG(jit_compile=jit_compile)).minimize(
        outer, keras.optimizers.SGD(0.1), inner, far.GradientDescentOptimizer(learning_rate), hyper_list=[rho])
    with pytest.raises(far.DivergenceError, match=r"ReverseHG, hyper-iteration 0: the inner dynamics diverged: "
                                                  r"w of 'w' (grew beyond|became NaN/Inf).* at inner step \d+"):
        run(T)
    assert float(rho) == pytest.approx(0.1)


@pytest.mark.parametrize("var_list, error, message", [
    ([], ValueError, "var_list"),
    ([tf.constant(1.0)], TypeError, "var_list"),
])
def test_bad_var_list(var_list, error, message):
    w, rho, inner, outer, opt = problem()
    with pytest.raises(error, match=message):
        far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), inner, opt, hyper_list=[rho],
                                      var_list=var_list)


def test_objective_reading_no_inner_variable():
    rho = far.get_hyperparameter("rho", np.float64(0.1))
    run = far.HyperOptimizer().minimize(lambda: rho ** 2, keras.optimizers.SGD(0.1), lambda: rho ** 2,
                                        far.GradientDescentOptimizer(0.1), hyper_list=[rho])
    with pytest.raises(ValueError, match="var_list"):
        run(3)


def test_var_list_variable_the_objective_ignores():
    w, rho, inner, outer, opt = problem()
    stray = tf.Variable(np.zeros(2), name="stray")
    run = far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), inner, opt, hyper_list=[rho],
                                        var_list=[w, stray])
    with pytest.raises(ValueError, match="stray"):
        run(3)


def test_variable_both_inner_and_hyperparameter():
    w, rho, inner, outer, opt = problem()
    run = far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), inner, opt, hyper_list=[rho, w],
                                        var_list=[w])
    with pytest.raises(ValueError, match="both inner variables"):
        run(3)


def test_initial_dynamics_shape_mismatch():
    w, rho, inner, outer, opt = problem()
    with pytest.raises(ValueError, match="shape"):
        far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), inner, opt, hyper_list=[rho],
                                      var_list=[w], init_dynamics_dict=[(w, np.zeros(4))])
    with pytest.raises(TypeError, match="ref"):
        far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), inner, opt, hyper_list=[rho],
                                      init_dynamics_dict={"w": np.zeros(3)})


@pytest.mark.parametrize("T", [0, -3, 2.5, True])
def test_bad_number_of_steps(T):
    w, rho, inner, outer, opt = problem()
    run = far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), inner, opt, hyper_list=[rho])
    with pytest.raises(ValueError, match="`T`"):
        run(T)


def test_objectives_and_optimizers_of_the_wrong_kind():
    w, rho, inner, outer, opt = problem()
    with pytest.raises(TypeError, match="inner_objective_optimizer"):
        far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), inner, keras.optimizers.SGD(0.1))
    with pytest.raises(TypeError, match="inner_objective"):
        far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), tf.constant(1.0), opt)
    with pytest.raises(TypeError, match="outer_objective_optimizer"):
        far.HyperOptimizer().minimize(outer, "adam", inner, opt)
    with pytest.raises(TypeError, match="hypergradient"):
        far.HyperOptimizer("reverse")


def test_supplier_mismatches():
    w, rho, inner, outer, opt = problem()
    run = far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), inner, opt, hyper_list=[rho])
    with pytest.raises(TypeError, match="would be ignored"):
        run(3, inner_objective_feed_dicts=np.ones(3))
    run2 = far.HyperOptimizer().minimize(outer, keras.optimizers.SGD(0.1), lambda b: inner(), opt, hyper_list=[rho])
    with pytest.raises(TypeError, match="inner_objective_feed_dicts"):
        run2(3)
    with pytest.raises(ValueError, match="steps 0 and 2"):
        run2(3, inner_objective_feed_dicts=lambda t: np.ones(3 if t < 2 else 4))


def test_non_scalar_objectives_are_summed_and_integer_ones_rejected():
    w, rho, inner, outer, opt = problem()
    ho = far.HyperOptimizer()
    value = ho.minimize(lambda: tf.stack([outer(), outer()]), keras.optimizers.SGD(0.1), inner, opt,
                        hyper_list=[rho])(3, _skip_hyper_ts=True)
    assert float(value) == pytest.approx(2 * float(outer()))
    run = far.HyperOptimizer().minimize(lambda: tf.constant(1), keras.optimizers.SGD(0.1), inner, opt,
                                        hyper_list=[rho])
    with pytest.raises(TypeError, match="floating"):
        run(3)


def test_lifecycle_errors():
    w, rho, inner, outer, opt = problem()
    ho = far.HyperOptimizer()
    with pytest.raises(ValueError, match="minimize"):
        ho.run(3)
    ho.minimize(outer, keras.optimizers.SGD(0.1), inner, opt, hyper_list=[rho])
    with pytest.raises(ValueError, match="already"):
        ho.finalize()
    with pytest.raises(ValueError, match="truncate"):
        far.ReverseHG.truncated(0)
    for unroll in (-1, 2.0, True):
        with pytest.raises(ValueError, match="unroll"):
            far.ReverseHG(unroll=unroll)
    with pytest.raises(ValueError, match="jit_compile"):
        far.ReverseHG(jit_compile="auto")
    with pytest.raises(ValueError, match="online"):
        ho.run(3, online="wr")  # warm restart is ForwardHG's
