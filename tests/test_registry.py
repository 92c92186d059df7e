"""The method registry (far_ho2.registry): a toy method declared and registered in this file runs
through every door (``far.make_method``, ``far.HyperOptimizer``, ``far.BilevelModel.fit``, the
hyper-cleaning launcher's flags); the launchers' errors for another method's flag and for a
value out of range; ``far.from_config`` of every registered method."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import far_ho2 as far
from flags import few_shot
from flags import hyper_cleaning
from flags import miniimagenet
from flags import omniglot
from far_ho2.launch import cli
from hyper_repr import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
ETA, T, TARGET = 0.3, 4, np.array([1.0, -2.0, 0.5])
OUTER_LR = 0.125  # exact in float32, the dtype of a Keras optimizer's learning rate


class ScaledReverse(far.HyperGradient):
    """A toy method: s times reverse mode's hypergradient, s = ``scale``."""

    settings = (far.Setting("scale", float, 1.0, "s, the factor of reverse mode's hypergradient.", low=0.0),)

    def __init__(self, scale: float = 1.0, name: str = "ScaledReverse"):
        super().__init__(name)
        self.scale = float(scale)

    def _settings(self) -> dict:
        return {"scale": self.scale}

    def hypergradient(self, problem, outer_objective, hypers, *, steps, inner_batches, outer_batch=None,
                      previous=None, online=False, offset=0, options=None) -> far.RunResult:
        result = far.reverse_hypergradient(problem, outer_objective, hypers, steps=steps, inner_batches=inner_batches,
                                           outer_batch=outer_batch, offset=offset,
                                           initial_state=previous.state if previous else None)
        return result._replace(grads=[None if g is None else self.scale * g for g in result.grads])


@pytest.fixture
def toy(monkeypatch):
    """The toy registered as "toy" for one test (the registry as it was afterwards)."""
    monkeypatch.setattr(far.registry, "_METHODS", dict(far.registry._METHODS))
    far.register_method("toy", ScaledReverse)


def quadratic_problem():
    """L(w, λ) = ½‖w − λ‖², E(w) = ½‖w − c‖² (float64), w_0 = 0: T steps of GD at rate η give
    w_T = (1 − (1 − η)^T) λ, so ∇_λ E = (1 − (1 − η)^T)(w_T − c)."""
    w = tf.Variable(np.zeros(3), name="w")
    lam = tf.Variable(np.array([0.5, 1.0, -1.0]), name="lam")

    def inner(batch):
        return 0.5 * tf.reduce_sum((w - lam) ** 2)

    def outer(batch):
        return 0.5 * tf.reduce_sum((w - batch) ** 2)

    return w, lam, inner, outer


def closed_form(lam: np.ndarray, scale: float) -> np.ndarray:
    """s ∇_λ E of ``quadratic_problem``."""
    shrink = 1 - (1 - ETA) ** T
    return scale * shrink * (shrink * lam - TARGET)


def test_the_toy_hypergradient_is_the_closed_form_through_hyper_optimizer_and_keras_fit(toy):
    method = far.make_method("toy", scale=2.5)
    assert isinstance(method, ScaledReverse) and method.scale == 2.5
    w, lam, inner, outer = quadratic_problem()
    start = lam.numpy().copy()
    run = far.HyperOptimizer(method).minimize(outer, keras.optimizers.SGD(OUTER_LR), inner,
                                             far.GradientDescentOptimizer(ETA), hyper_list=[lam], var_list=[w])
    run(T, inner_objective_feed_dicts=tf.constant(0.0), outer_objective_feed_dicts=tf.constant(TARGET))
    np.testing.assert_allclose(method.results[0].grads[0].numpy(), closed_form(start, 2.5), rtol=1e-12)  # round-off
    np.testing.assert_allclose(lam.numpy(), start - OUTER_LR * closed_form(start, 2.5), rtol=1e-12)
    by_hyper_optimizer = lam.numpy()

    w, lam, inner, outer = quadratic_problem()
    model = far.BilevelModel(inner, outer, far.GradientDescentOptimizer(ETA), steps=T,
                             hypergradient=far.make_method("toy", scale=2.5), inner_variables=[w], hyperparameters=[lam])
    model.compile(optimizer=keras.optimizers.SGD(OUTER_LR))
    data = tf.data.Dataset.from_tensors((tf.constant(0.0), tf.constant(TARGET))).repeat()
    model.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
    np.testing.assert_allclose(lam.numpy(), by_hyper_optimizer, rtol=1e-12)  # the same step


def test_the_toy_runs_from_the_hyper_cleaning_flags(toy, tmp_path):
    """Registered after the launcher was imported: its flags exist once the launcher defines
    them, and a run records its setting."""
    values = flags.FlagValues()
    holders = hyper_cleaning.define_flags(values)
    assert "toy" in values["method"].parser.enum_values and values["toy_scale"].default == 1.0
    assert "toy: s, the factor" in values["toy_scale"].help
    values(["launcher", f"--logdir={tmp_path}", "--method=toy", "--toy_scale=2", "--n_train=40", "--n_val=20",
            "--T=3", "--hyper_iterations=2", "--retrain_steps=10"])
    config = hyper_cleaning.config_from_flags(holders)
    assert (config.method, config.method_settings) == ("toy", {"scale": 2.0})
    hyper_cleaning.check_config(config)
    results = hyper_cleaning.run_experiment(config, tmp_path)
    assert results["metrics"]["hyper_iterations_done"] == 2 and 0 <= results["metrics"]["f1"] <= 1
    assert json.loads((tmp_path / "config.json").read_text())["method_settings"] == {"scale": 2.0}
    values.unparse_flags()
    values(["launcher", f"--logdir={tmp_path}", "--method=toy", "--toy_scale=-1"])
    with pytest.raises(ValueError, match=r"^--toy_scale must be a float ≥ 0, got -1.0.$"):
        hyper_cleaning.config_from_flags(holders)


def test_a_setting_out_of_its_range_is_named_by_its_flag():
    few = flags.FlagValues()
    holders = few_shot.define_flags(omniglot.PRESET, data_dir="data", flag_values=few)
    few(["launcher", "--logdir=out", "--method=bome", "--bome_momentum=1.5"])
    with pytest.raises(cli.LaunchError, match=r"^--bome_momentum must be a float in \[0, 1\), got 1.5.$"):
        few_shot.config_from_flags(holders, omniglot.PRESET)
    cleaning = flags.FlagValues()
    holders = hyper_cleaning.define_flags(cleaning)
    cleaning(["launcher", "--logdir=out", "--method=implicit", "--implicit_iterations=0"])
    with pytest.raises(ValueError, match=r"^--implicit_iterations must be an int ≥ 1, got 0.$"):
        hyper_cleaning.config_from_flags(holders)
    cleaning.unparse_flags()
    cleaning(["launcher", "--logdir=out", "--method=reverse", "--truncate=5"])  # in range, and the default method
    assert hyper_cleaning.config_from_flags(holders).method_settings == {"truncate": 5}


@pytest.mark.parametrize("launcher", ["omniglot", "miniimagenet", "hyper_cleaning"])
def test_every_launcher_refuses_a_setting_of_another_method(launcher, tmp_path):
    """``--method=bome --truncate=3``: one line naming both, exit code 1, nothing written."""
    process = subprocess.run([sys.executable, "-m", f"flags.{launcher}", f"--logdir={tmp_path / 'run'}",
                              "--method=bome", "--truncate=3"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    assert process.returncode == 1, process.stderr[-2000:]
    assert "--truncate is a setting of --method=reverse; this run uses --method=bome." in process.stderr
    assert "Traceback" not in process.stderr and not (tmp_path / "run").exists()


def test_another_methods_setting_left_at_its_default_is_no_error():
    """Only a flag given on the command line is refused: the defaults of every method's flags
    are always there."""
    for launcher in (omniglot, miniimagenet):
        values = flags.FlagValues()
        holders = few_shot.define_flags(launcher.PRESET, data_dir="data", flag_values=values)
        values(["launcher", "--logdir=out", "--method=penalty", "--penalty_gamma=0.5"])
        config = few_shot.config_from_flags(holders, launcher.PRESET)
        assert config.method_settings == {"gamma": 0.5, "lambda_g": 0.01, "epsilon": 0.0, "nu": 0.0}


def test_the_flags_default_to_each_experiments_defaults():
    """A method chosen by --method alone is the method the experiment builds from its defaults."""
    cleaning = flags.FlagValues()
    cleaning_holders = hyper_cleaning.define_flags(cleaning)
    few = flags.FlagValues()
    few_holders = few_shot.define_flags(omniglot.PRESET, data_dir="data", flag_values=few)
    for name in far.methods():
        cleaning.unparse_flags()
        cleaning(["launcher", "--logdir=out", f"--method={name}"])
        assert hyper_cleaning.resolved(hyper_cleaning.config_from_flags(cleaning_holders)) == hyper_cleaning.resolved(
            hyper_cleaning.Config(method=name)), name
        few.unparse_flags()
        few(["launcher", "--logdir=out", f"--method={name}"])
        config = few_shot.config_from_flags(few_holders, omniglot.PRESET)
        assert config.method_settings == train.method_settings(dataclasses.replace(omniglot.PRESET, method=name))
    assert hyper_cleaning.resolved(hyper_cleaning.Config(method="bome")).method_settings["momentum"] == 0.9
    assert train.method_settings(train.Config(method="penalty"))["epsilon"] == 0.0  # γ held in meta-learning


def test_from_config_round_trips_every_registered_method(toy):
    assert set(far.methods()) == {"reverse", "forward", "implicit", "bome", "penalty", "stochastic", "toy"}
    examples = [far.make_method(name) for name in far.methods()] + [
        far.make_method("toy", scale=0.5), far.make_method("reverse", truncate=3),
        far.make_method("bome", eta=0.1, phi="value", inner_learning_rate=0.5, momentum=0.9),
        far.make_method("implicit", linear_system_solver="neumann", max_iter=7, warm_start=False)]
    for method in examples:
        config = json.loads(json.dumps(method.get_config()))  # JSON-able
        again = far.from_config(config)
        assert type(again) is type(method) and again.get_config() == config, config
    bome = far.from_config(json.loads(json.dumps(examples[-2].get_config())))
    assert bome.inner_optimizer.get_config()["momentum"] == 0.9  # a Keras optimizer again
    assert far.make_method("reverse", truncate=3).truncate == 3 and far.make_method("reverse").truncate is None


def test_make_method_errors_name_the_method_and_the_setting():
    with pytest.raises(ValueError, match=r"Unknown method 'sgd'; registered: \['reverse', 'forward', 'implicit', "
                                         r"'bome', 'penalty', 'stochastic'\]"):
        far.make_method("sgd")
    with pytest.raises(ValueError, match=r"Method 'bome' has no setting 'truncate'; its settings: \['eta', 'phi'"):
        far.make_method("bome", truncate=3)
    with pytest.raises(ValueError, match=r"penalty: `gamma` must be a float ≥ 0, got -1"):
        far.make_method("penalty", gamma=-1)
    with pytest.raises(ValueError, match=r"implicit: `linear_system_solver` must be one of \('cg', 'neumann', "):
        far.make_method("implicit", linear_system_solver="lu")
    with pytest.raises(ValueError, match="`temperature` is a setting of the inner optimizer stochastic needs"):
        far.make_method("stochastic", temperature=0.1)
    with pytest.raises(ValueError, match="BOME: `momentum` > 0 needs `inner_learning_rate`"):
        far.make_method("bome", momentum=0.9)
    with pytest.raises(ValueError, match=r"'reverse' is already ReverseHG"):
        far.register_method("reverse", ScaledReverse)
    with pytest.raises(TypeError, match="must be a far_ho2 HyperGradient subclass"):
        far.register_method("adam", keras.optimizers.Adam)


def test_a_method_whose_flag_is_taken_is_refused(monkeypatch):
    monkeypatch.setattr(far.registry, "_METHODS", dict(far.registry._METHODS))

    class Truncating(ScaledReverse):
        settings = (far.Setting("truncate", int, 0, "K.", low=0, flag="truncate"),)

    with pytest.raises(ValueError, match=r"the flag --truncate of 'other' is already a setting of 'reverse'"):
        far.register_method("other", Truncating)
    assert "other" not in far.methods()
