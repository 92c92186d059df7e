"""Launchers, one per paper experiment: ``python -m flags.<name>`` from the repository root.

TensorFlow's start-up notices are kept out of the launchers' output: TensorFlow and Keras are
imported here with the process's stderr captured, and every line of it is written back but the
notices in ``NOISE`` (the oneDNN banner, twice, and the CPU-feature notice, which TensorFlow
prints before its logging is set up, whatever ``TF_CPP_MIN_LOG_LEVEL`` says); its warnings and
errors still show.
"""

import os
import re
import sys
import tempfile

NOISE = re.compile(r"All log messages before absl::InitializeLog|oneDNN custom operations are on|"
                   r"cpu_feature_guard|To enable the following instructions|rebuild TensorFlow with the")


def _import_tensorflow_quietly() -> None:
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import far_ho2.cpu_kernels  # noqa: F401,PLC0415  (oneDNN kernels: before TensorFlow loads)
            import keras  # noqa: F401,PLC0415
            import tensorflow  # noqa: F401,PLC0415
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            sys.stderr.write("".join(line for line in captured.read().decode(errors="replace").splitlines(True)
                                     if not NOISE.search(line)))


_import_tensorflow_quietly()
