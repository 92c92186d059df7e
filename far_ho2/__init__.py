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
from far_ho2 import dynamics, linear_solve, oracles
from far_ho2.batches import Batches
from far_ho2.hyper_optimizer import HyperOptimizer
from far_ho2.hypergradients import (ForwardHG, HyperGrad, HyperGradient, ImplicitHG, ReverseHG,
                                    forward_hypergradient, implicit_hypergradient,
                                    reverse_hypergradient)
from far_ho2.hyperparameters import HyperparameterComponents, get_hyperparameter, hyperparameters
from far_ho2.inner_problem import InnerProblem
from far_ho2.optimizer import AdamOptimizer, GradientDescentOptimizer, MomentumOptimizer, Optimizer

OptimizerDict = InnerProblem  # FAR-HO's name for what `Optimizer.minimize` returns
ReverseHg = ReverseHG  # FAR-HO's deprecated spelling

__version__ = "0.1.0"

__all__ = [
    "AdamOptimizer", "Batches", "ForwardHG", "GradientDescentOptimizer", "HyperGrad",
    "HyperGradient", "HyperOptimizer", "HyperparameterComponents", "ImplicitHG", "InnerProblem",
    "MomentumOptimizer", "Optimizer", "OptimizerDict", "ReverseHG", "ReverseHg", "dynamics",
    "forward_hypergradient", "get_hyperparameter", "hyperparameters", "implicit_hypergradient",
    "linear_solve", "oracles", "reverse_hypergradient",
]
