"""Hypergradient methods: one module per method, each a pure function and a FAR-HO façade.

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


__all__ = ["BOME", "ForwardHG", "HyperGradient", "ImplicitHG", "Penalty", "ReverseHG", "StochasticHG",
           "bome_direction", "forward_hypergradient", "from_config", "implicit_hypergradient", "penalty_direction",
           "reverse_hypergradient", "stochastic_hypergradient"]

METHODS = {cls.__name__: cls for cls in (BOME, ForwardHG, ImplicitHG, Penalty, ReverseHG, StochasticHG)}


def from_config(config: dict) -> HyperGradient:
    """The method a ``HyperGradient.get_config()`` describes."""
    config = dict(config)
    name = config.pop("class_name", None)
    if name not in METHODS:
        raise ValueError(f"Unknown hypergradient method {name!r}; known: {sorted(METHODS)}.")
    if name == "BOME" and config.get("inner_optimizer") is not None:
        import keras  # noqa: PLC0415 (only BOME's inner optimizer needs it)
        config["inner_optimizer"] = keras.optimizers.deserialize(config["inner_optimizer"])
    return METHODS[name](**config)


class _CallablePackage(types.ModuleType):
    def __call__(self, scope: Optional[str] = None) -> list:
        from far_ho2.hyper_optimizer import all_hypergradients  # noqa: PLC0415 (it imports this package)
        return all_hypergradients(scope)


sys.modules[__name__].__class__ = _CallablePackage
