"""far_ho2: gradient-based bilevel optimization (hyperparameter optimization and meta-learning
by hypergradients) in TensorFlow 2 / Keras; a TF2 port of FAR-HO (Franceschi et al., ICML 2017
and 2018).

    import far_ho2 as far
    lr = far.get_hyperparameter('lr', 0.1)
    run = far.HyperOptimizer().minimize(E, keras.optimizers.Adam(1e-2), L,
                                        far.GradientDescentOptimizer(lr))
    run(T, inner_objective_feed_dicts=train_batch, outer_objective_feed_dicts=valid_batch)
"""

from far_ho2 import cpu_kernels  # noqa: F401  (first: before anything loads TensorFlow)
from far_ho2 import distribute, dynamics, guard, linear_solve, oracles, registry, utils
from far_ho2 import hypergradients  # noqa: F401  (callable, as FAR-HO's far.hypergradients())
from far_ho2.batches import Batches
from far_ho2.bilevel_model import BilevelModel
from far_ho2.guard import DivergenceError
from far_ho2.hyper_optimizer import HyperOptimizer
from far_ho2.hypergradients import (BOME, ForwardHG, HyperGradient, ImplicitHG, Penalty, ReverseHG, StochasticHG, forward_hypergradient,
                                    implicit_hypergradient, reverse_hypergradient)
from far_ho2.hyperparameters import (HyperparameterComponents, clear_hyperparameters, get_hyperparameter,
                                     hyperparameters)
from far_ho2.inner_problem import InnerProblem, reinitialize
from far_ho2.optimizer import (AdamOptimizer, BackTrackingGradientDescentOptimizer, GradientDescentOptimizer,
                               MomentumOptimizer, Optimizer, SGLDOptimizer)
from far_ho2.registry import Setting, from_config, make_method, methods, register_method
from far_ho2.types import RunResult

OptimizerDict = InnerProblem  # FAR-HO's name for what `Optimizer.minimize` returns
ReverseHg = ReverseHG  # FAR-HO's deprecated spelling

__version__ = "0.1.0"

__all__ = [
    "AdamOptimizer", "BOME", "BackTrackingGradientDescentOptimizer", "Batches", "BilevelModel", "DivergenceError", "ForwardHG",
    "GradientDescentOptimizer", "HyperGradient", "HyperOptimizer", "HyperparameterComponents",
    "ImplicitHG", "InnerProblem", "MomentumOptimizer", "Optimizer", "OptimizerDict", "Penalty", "ReverseHG",
    "ReverseHg", "RunResult", "SGLDOptimizer", "Setting", "StochasticHG", "clear_hyperparameters", "distribute", "dynamics",
    "forward_hypergradient", "from_config", "get_hyperparameter", "guard", "hypergradients", "hyperparameters",
    "implicit_hypergradient", "linear_solve", "make_method", "methods", "oracles", "register_method", "registry",
    "reinitialize", "reverse_hypergradient", "utils",
]


def __getattr__(name: str):
    """FAR-HO names without a TF2 meaning: an error naming the replacement."""
    if name in utils.LEGACY_NAMES:
        raise utils.legacy_name_error("far", name)
    raise AttributeError(f"module 'far_ho2' has no attribute {name!r}")
