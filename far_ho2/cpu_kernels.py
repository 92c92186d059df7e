"""TensorFlow's CPU kernels: oneDNN wherever TensorFlow has not been loaded yet and the user has
not chosen.

On Linux, TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX-512 VNNI or
BF16, AVX-VNNI or AMX; on the other x86 CPUs (AVX2 only, e.g. many AMD EPYC) it runs its Eigen
kernels, which were slower for far_ho2's workloads on such a CPU (docs/index.md gives the
measurements; ``benchmarks/`` measures them). The package imports this module before
anything imports TensorFlow, so ``import far_ho2`` first turns them on; after ``import
tensorflow`` it is too late (TensorFlow reads the setting when it loads): export
``TF_ENABLE_ONEDNN_OPTS=1`` instead. ``TF_ENABLE_ONEDNN_OPTS=0`` keeps them off (results then
differ from oneDNN's in float32 round-off only).
"""

import os
import platform
import sys

if "tensorflow" not in sys.modules and platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
