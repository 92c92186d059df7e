"""far_ho2.cpu_kernels: oneDNN on by default on x86 when TensorFlow is not loaded yet, the user's
choice kept, nothing changed once TensorFlow is loaded or on other CPUs."""

import os
import platform
import runpy
import sys

import pytest

import far_ho2.cpu_kernels

VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def _run(monkeypatch, *, machine: str, tensorflow_loaded: bool, preset=None):
    """Executes the module again as at a first import, in the given situation; returns the variable."""
    monkeypatch.setattr(platform, "machine", lambda: machine)
    if not tensorflow_loaded:
        monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow", object()))
    if preset is None:
        monkeypatch.delenv(VARIABLE, raising=False)
    else:
        monkeypatch.setenv(VARIABLE, preset)
    runpy.run_path(far_ho2.cpu_kernels.__file__)
    return os.environ.get(VARIABLE)


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_turns_onednn_on_before_tensorflow_loads(monkeypatch, machine):
    assert _run(monkeypatch, machine=machine, tensorflow_loaded=False) == "1"


def test_keeps_the_users_choice(monkeypatch):
    assert _run(monkeypatch, machine="x86_64", tensorflow_loaded=False, preset="0") == "0"


def test_changes_nothing_once_tensorflow_is_loaded(monkeypatch):
    assert _run(monkeypatch, machine="x86_64", tensorflow_loaded=True) is None


def test_changes_nothing_on_other_cpus(monkeypatch):
    assert _run(monkeypatch, machine="aarch64", tensorflow_loaded=False) is None
