"""Small helpers the launchers share besides ``far_ho2.launch`` (their output folder, callbacks
and command line): a file-flag check, seeding, PNG plots and plain-text tables."""

import contextlib
import csv
import os
import pathlib
import sys
import zipfile
from typing import Iterator

import numpy as np

from far_ho2.launch.cli import LaunchError


def check_file(path: str, flag: str) -> pathlib.Path:
    """``path`` as a Path, or a ``LaunchError`` naming ``--flag`` if it is not an existing file."""
    if not path:
        raise LaunchError(f"--{flag} is required.")
    if not os.path.isfile(path):
        raise LaunchError(f"--{flag}={path}: no such file.")
    return pathlib.Path(path)


@contextlib.contextmanager
def open_npz(path: str, flag: str) -> Iterator[np.lib.npyio.NpzFile]:
    """The .npz archive of ``--flag=path``; a ``LaunchError`` naming the flag if it is missing or
    not an .npz archive (NumPy's own message would advise ``allow_pickle``)."""
    file = check_file(path, flag)
    try:
        npz = np.load(file)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise LaunchError(f"--{flag}={path} is not a NumPy .npz archive (corrupt, truncated or another "
                          f"format: {type(error).__name__}).") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise LaunchError(f"--{flag}={path} holds a single array, not a NumPy .npz archive of named arrays.")
    with npz:
        yield npz


def set_seed(seed: int) -> None:
    """Seeds Python's, NumPy's, TensorFlow's and Keras's generators."""
    import keras  # noqa: PLC0415 (kept local: importing Keras is slow)
    keras.utils.set_random_seed(seed)


# -- plots and tables --------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot with the Agg backend (no display needed)."""
    import matplotlib  # noqa: PLC0415 (only launchers that plot pay for the import)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    """Writes ``rows`` (dicts sharing keys) as CSV."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict]) -> str:
    """``rows`` as an aligned plain-text table (floats with 4 significant digits)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    header = list(rows[0])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_table(title: str, rows: list[dict]) -> None:
    """Prints a table to stdout (the launcher's result, not a log line)."""
    sys.stdout.write(f"{title}\n{format_table(rows)}\n")
    sys.stdout.flush()
