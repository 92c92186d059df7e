"""Small helpers the launchers share besides ``far_ho2.launch`` (their output folder, callbacks
and command line): a file-flag check, the TensorFlow Datasets flags, seeding, PNG plots and
plain-text tables."""

import contextlib
import csv
import dataclasses
import os
import pathlib
import sys
import zipfile
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
from absl import flags

from far_ho2.launch import cli
from far_ho2.launch.cli import LaunchError, setting


def check_file(path: str, flag: str) -> pathlib.Path:
    """``path`` as a Path, or a ``LaunchError`` naming ``--flag`` if it is not an existing file."""
    if not path:
        raise LaunchError(f"--{flag} is required.")
    if not os.path.isfile(path):
        raise LaunchError(f"--{flag}={path}: no such file.")
    return pathlib.Path(path)


@dataclasses.dataclass(frozen=True)
class Tfds:
    """Where the launchers that read TensorFlow Datasets find them (``hyper_repr.data.tfds_source``):
    the same flags, with the same meaning, in each of them."""

    tfds_data_dir: Optional[str] = setting(None, "TensorFlow Datasets data_dir holding the prepared dataset "
                                           "(default: TFDS's, $TFDS_DATA_DIR or ~/tensorflow_datasets).")
    tfds_download: bool = setting(False, "Let TFDS download and prepare the dataset into --tfds_data_dir when it "
                                  "is not prepared there (needs a network).")


# the arguments of hyper_repr.data.tfds_source that the Tfds flags give, for its messages
TFDS_NAMES = {"data_dir": "tfds_data_dir", "download": "tfds_download"}
TFDS_FLAGS = tuple(cli.flag_names(Tfds).values())


def define_tfds_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """--tfds_data_dir and --tfds_download (``Tfds``), defined in ``flag_values``."""
    return cli.define_flags(Tfds, flag_values=flag_values)


def tfds_from_flags(holders: Mapping[str, flags.FlagHolder]) -> Tfds:
    """The ``Tfds`` settings of the parsed flags."""
    return Tfds(**cli.config_values(Tfds, holders))


def check_not_given(holders: Mapping[str, flags.FlagHolder], names: Sequence[str], reason: str) -> None:
    """A ``LaunchError`` naming the first of the flags ``names`` given on the command line, which
    do not apply to ``reason`` (e.g. ``"--data_source=folder"``)."""
    for name in names:
        if holders[name].present:
            raise LaunchError(f"--{name} applies to TensorFlow Datasets data, not to {reason}.")


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
