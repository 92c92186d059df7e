"""Hypergradient methods: one module per method, each a pure function and a FAR-HO façade."""

from far_ho2.hypergradients.base import HyperGrad, HyperGradient
from far_ho2.hypergradients.reverse import ReverseHG, reverse_hypergradient
from far_ho2.hypergradients.forward import ForwardHG, forward_hypergradient
from far_ho2.hypergradients.implicit import ImplicitHG, implicit_hypergradient
