"""Shared test set-up: quiet TensorFlow, fixed seeds; helpers used by several test modules."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import far_ho2.cpu_kernels  # noqa: E402,F401  (before TensorFlow loads, as for users)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    tf.random.set_seed(0)


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius over all entries)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
