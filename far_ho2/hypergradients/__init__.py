"""Hypergradient methods: one module per method, each a pure function and a FAR-HO façade, each
registered by name (``far_ho2.registry``) with the settings its class declares.

The package is also callable, as FAR-HO's function of the same name was: ``far.hypergradients()``
returns the hypergradients of the last run of every live ``HyperOptimizer`` (see
``far_ho2.hyper_optimizer.all_hypergradients``).
"""

import sys
import types
from typing import Optional

from far_ho2.hypergradients.base import HyperGradient
from far_ho2.hypergradients.reverse import ReverseHG, reverse_hypergradient
from far_ho2.hypergradients.forward import ForwardHG, forward_hypergradient
from far_ho2.hypergradients.implicit import ImplicitHG, implicit_hypergradient
from far_ho2.hypergradients.bome import BOME, bome_direction
from far_ho2.hypergradients.penalty import Penalty, penalty_direction
from far_ho2.hypergradients.stochastic import StochasticHG, stochastic_hypergradient
from far_ho2.registry import from_config, register_method


__all__ = ["BOME", "ForwardHG", "HyperGradient", "ImplicitHG", "Penalty", "ReverseHG", "StochasticHG",
           "bome_direction", "forward_hypergradient", "from_config", "implicit_hypergradient", "penalty_direction",
           "reverse_hypergradient", "stochastic_hypergradient"]

register_method("reverse", ReverseHG)
register_method("forward", ForwardHG)
register_method("implicit", ImplicitHG)
register_method("bome", BOME)
register_method("penalty", Penalty)
register_method("stochastic", StochasticHG)

class _CallablePackage(types.ModuleType):
    def __call__(self, scope: Optional[str] = None) -> list:
        from far_ho2.hyper_optimizer import all_hypergradients  # noqa: PLC0415 (it imports this package)
        return all_hypergradients(scope)


sys.modules[__name__].__class__ = _CallablePackage
