"""Launchers, one per paper experiment: ``python -m flags.<name>`` from the repository root."""

import far_ho2.cpu_kernels  # noqa: F401  (first: before the launchers load TensorFlow)
