"""Few-shot Omniglot by hyper-representation (Franceschi et al., ICML 2018, §5.2, Table 2).

Meta-trains the Omniglot network (4 strided conv-64 layers, 256 features) as the representation
of N-way k-shot logistic heads fitted by T steps of gradient descent, then meta-tests the
best-validation weights next to two baselines (heads on raw pixels, on the untrained network).
Every setting is a flag (``flags.few_shot``), with the paper's value as default.

Data: with ``--data_source=folder`` (the default), the Omniglot files in ``--data_dir`` (default
the repository's data/omniglot: any sources ``hyper_repr.data.load_omniglot`` reads); with
``--data_source=tfds``, TensorFlow Datasets' ``omniglot`` prepared in ``--tfds_data_dir``
(``--tfds_splits``: which of its splits train, test, small1, small2; default all;
``--tfds_download`` lets TFDS download it; see docs/data.md). The same images give the same
splits, episodes and results from either source. ``--split=standard`` is the paper's random
1200/100/323-character split (seed 0, as the original); ``--split=alphabets`` holds out
``--test_alphabets`` for test and ``--val_alphabets`` (or, with ``--val_characters=n``, n
characters drawn from the other alphabets) for validation; ``--split=auto`` (the default) is
``standard`` when the folder holds all 1623 characters, else ``alphabets`` (e.g. the bundled 242
characters).

    python -m flags.omniglot --logdir /tmp/omniglot --time_budget 300 --test_shots 1,5
    python -m flags.omniglot --logdir /tmp/omniglot_tfds --data_source tfds --tfds_data_dir ~/tensorflow_datasets
    python -m flags.omniglot --logdir runs/omniglot_20way_5shot --data_dir DIR --ways 20 --shots 5
    python -m flags.omniglot --logdir /tmp/omniglot --mode test   # test best.keras again
    python -m flags.omniglot --logdir /tmp/omniglot --mode test --test_ways 20   # 20-way

(``--mode test`` keeps the run's own settings but the test flags given, and appends its results
to the logdir's test_results.json; see ``flags.few_shot``.)
"""

import dataclasses
import functools
import pathlib
from typing import Any, Mapping, Optional, Sequence

from absl import flags

from far_ho2.launch import cli
from flags import common, few_shot
from hyper_repr import data
from hyper_repr.data import omniglot, tfds_source

DATA_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "omniglot"
PRESET = dataclasses.replace(few_shot.PRESET, network="omniglot")
SPLITS = ("auto", "standard", "alphabets")
DATA_SOURCES = ("folder", "tfds")
# the flags of the data, load_splits's arguments
LOAD_FLAGS = ("data_dir", "data_source", "tfds_data_dir", "tfds_splits", "tfds_download", "split", "test_alphabets",
              "val_alphabets", "val_characters")
# the arguments named in the messages of the TFDS source and of the split -> their flags
TFDS_NAMES = {**common.TFDS_NAMES, "splits": "tfds_splits",
              **{name: name for name in ("test_alphabets", "val_alphabets", "val_characters")}}


def load_splits(data_dir: Any = DATA_DIR, *, data_source: str = "folder", tfds_data_dir: Optional[str] = None,
                tfds_splits: Sequence[str] = (), tfds_download: bool = False, split: str = "auto",
                test_alphabets: Sequence[str] = ("Sanskrit", "Tagalog"),
                val_alphabets: Sequence[str] = ("Early_Aramaic",),
                val_characters: int = 0) -> data.Splits:
    """The Omniglot splits of ``data_dir`` (``data_source="folder"``) or of TFDS's ``omniglot``
    in ``tfds_data_dir`` (``"tfds"``: its ``tfds_splits``, all if empty; downloaded if
    ``tfds_download``); see the module docstring for ``split``. The arguments are the flags.

    Raises:
        FileNotFoundError: if ``data_dir`` holds no Omniglot data, or TFDS omniglot is not prepared.
        ValueError: for an unknown ``data_source``, ``split``, alphabet or TFDS split, or a corrupt file.
    """
    if data_source not in DATA_SOURCES:
        raise ValueError(f"--data_source must be one of {DATA_SOURCES}, got {data_source!r}.")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}.")
    if data_source == "folder":
        found = omniglot.catalog(pathlib.Path(data_dir))
    else:
        found = tfds_source.omniglot_catalog(tfds_data_dir, splits=list(tfds_splits) or None, download=tfds_download)
    if split == "auto":
        split = "standard" if len(found.characters) == sum(data.STANDARD_SPLIT_SIZES) else "alphabets"
    if split == "standard":
        return omniglot.load_catalog(found)
    validation = (dict(val_characters=val_characters) if val_characters
                  else dict(val_alphabets=list(val_alphabets)))
    return omniglot.load_catalog(found, test_alphabets=list(test_alphabets), **validation)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """The launcher's flags, defined in ``flag_values``: the few-shot ones, the data source and
    the split."""
    holders = few_shot.define_flags(PRESET, data_dir=str(DATA_DIR), flag_values=flag_values)
    holders.update(common.define_tfds_flags(flag_values))
    into = {"flag_values": flag_values}
    holders.update(
        data_source=flags.DEFINE_enum("data_source", "folder", list(DATA_SOURCES), "Where the images are: "
                                      "folder: the Omniglot files in --data_dir; tfds: TensorFlow Datasets' "
                                      "omniglot in --tfds_data_dir.", **into),
        tfds_splits=flags.DEFINE_list("tfds_splits", [], "With --data_source=tfds: the splits of TFDS omniglot "
                                      "to read, of train, test, small1, small2 (default: all it has).", **into),
        split=flags.DEFINE_enum("split", "auto", list(SPLITS), "Character split (see the module "
                                "docstring).", **into),
        test_alphabets=flags.DEFINE_list("test_alphabets", ["Sanskrit", "Tagalog"], "Test "
                                         "alphabets of --split=alphabets.", **into),
        val_alphabets=flags.DEFINE_list("val_alphabets", ["Early_Aramaic"], "Validation "
                                        "alphabets of --split=alphabets.", **into),
        val_characters=flags.DEFINE_integer("val_characters", 0, "If > 0, --split=alphabets "
                                            "validates on this many characters drawn from the "
                                            "training alphabets instead of --val_alphabets.",
                                            lower_bound=0, **into))
    return holders


def load_from_flags(values: Mapping[str, Any], holders: Mapping[str, flags.FlagHolder]) -> data.Splits:
    """The splits of the flags (``few_shot.launch``'s ``load_splits``: ``values`` the flags'
    values, ``~`` expanded), the TFDS source's errors in its flags.

    Raises:
        cli.LaunchError: for TFDS flags with --data_source=folder, --data_dir with
            --data_source=tfds, or TFDS data that cannot be read.
    """
    arguments = {name: values[name] for name in LOAD_FLAGS}
    if values["data_source"] == "folder":
        common.check_not_given(holders, common.TFDS_FLAGS + ("tfds_splits",), "--data_source=folder")
        return load_splits(**arguments)
    if holders["data_dir"].present:
        raise cli.LaunchError("--data_dir is the folder of --data_source=folder; TensorFlow Datasets data is in "
                              "--tfds_data_dir.")
    with cli.user_errors(TFDS_NAMES, prefix="--data_source=tfds: "):
        return load_splits(**arguments)


_FLAGS: dict = {}

if __name__ == "__main__":
    _FLAGS.update(define_flags())
    cli.run(functools.partial(few_shot.launch, _FLAGS, PRESET, lambda values: load_from_flags(values, _FLAGS)),
            few_shot.FLAG_NAMES)
