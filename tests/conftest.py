"""Shared test set-up: quiet TensorFlow, fixed seeds, an empty hyperparameter registry for every
test (so that one test's hyperparameters are not another's default ``hyper_list``), and the
``long`` marker: tests of many thousands of iterations run with ``--long`` only (each has a
short version that always runs). Helpers shared by test modules live in ``oracles.py``."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import far_ho2  # noqa: E402  (before TensorFlow loads, as for users: its CPU kernels)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="also run the tests marked `long`")


def pytest_configure(config):
    config.addinivalue_line("markers", "long: a long end-to-end run (minutes); needs --long")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long; run with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_registry():
    np.random.seed(0)
    tf.random.set_seed(0)
    far_ho2.clear_hyperparameters()
    yield
    far_ho2.clear_hyperparameters()
