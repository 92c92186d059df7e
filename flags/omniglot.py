"""Few-shot Omniglot by hyper-representation (Franceschi et al., ICML 2018, §5.2, Table 2).

Meta-trains the Omniglot network (4 strided conv-64 layers, 256 features) as the representation
of N-way k-shot logistic heads fitted by T steps of gradient descent, then meta-tests the
best-validation weights next to two baselines (heads on raw pixels, on the untrained network).
Every setting is a flag (``flags.few_shot``), with the paper's value as default.

Data (``--data_dir``, default the repository's data/omniglot): any Omniglot sources
``hyper_repr.data.load_omniglot`` reads. ``--split=standard`` is the paper's random
1200/100/323-character split (seed 0, as the original); ``--split=alphabets`` holds out
``--test_alphabets`` for test and ``--val_alphabets`` (or, with ``--val_characters=n``, n
characters drawn from the other alphabets) for validation; ``--split=auto`` (the default) is
``standard`` when the folder holds all 1623 characters, else ``alphabets`` (e.g. the bundled 242
characters).

    python -m flags.omniglot --logdir /tmp/omniglot --time_budget 300 --test_shots 1,5
    python -m flags.omniglot --logdir runs/omniglot_20way_5shot --data_dir DIR --ways 20 --shots 5
    python -m flags.omniglot --logdir /tmp/omniglot --mode test   # test best.keras again
    python -m flags.omniglot --logdir /tmp/omniglot --mode test --test_ways 20   # 20-way

(``--mode test`` keeps the run's own settings but the test flags given, and appends its results
to the logdir's test_results.json; see ``flags.few_shot``.)
"""

import dataclasses
import functools
import pathlib
from typing import Any, Mapping, Sequence

from absl import flags

from far_ho2.launch import cli
from flags import few_shot
from hyper_repr import data
from hyper_repr.data import omniglot

DATA_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "omniglot"
PRESET = dataclasses.replace(few_shot.PRESET, network="omniglot")
SPLITS = ("auto", "standard", "alphabets")


def load_splits(data_dir: Any, *, split: str = "auto",
                test_alphabets: Sequence[str] = ("Sanskrit", "Tagalog"),
                val_alphabets: Sequence[str] = ("Early_Aramaic",),
                val_characters: int = 0) -> data.Splits:
    """The Omniglot splits of ``data_dir`` (see the module docstring for ``split``).

    Raises:
        FileNotFoundError: if ``data_dir`` holds no Omniglot data.
        ValueError: for an unknown ``split`` or alphabet, or a corrupt file.
    """
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}.")
    if split == "auto":
        characters = len(omniglot.catalog(pathlib.Path(data_dir)).characters)
        split = "standard" if characters == sum(data.STANDARD_SPLIT_SIZES) else "alphabets"
    if split == "standard":
        return data.load_omniglot(data_dir)
    validation = (dict(val_characters=val_characters) if val_characters
                  else dict(val_alphabets=list(val_alphabets)))
    return data.load_omniglot(data_dir, test_alphabets=list(test_alphabets), **validation)


def define_flags() -> dict:
    """The launcher's flags: the few-shot ones and the split."""
    holders = few_shot.define_flags(PRESET, data_dir=str(DATA_DIR))
    holders.update(
        split=flags.DEFINE_enum("split", "auto", list(SPLITS), "Character split (see the module "
                                "docstring)."),
        test_alphabets=flags.DEFINE_list("test_alphabets", ["Sanskrit", "Tagalog"], "Test "
                                         "alphabets of --split=alphabets."),
        val_alphabets=flags.DEFINE_list("val_alphabets", ["Early_Aramaic"], "Validation "
                                        "alphabets of --split=alphabets."),
        val_characters=flags.DEFINE_integer("val_characters", 0, "If > 0, --split=alphabets "
                                            "validates on this many characters drawn from the "
                                            "training alphabets instead of --val_alphabets.",
                                            lower_bound=0))
    return holders


def _load(values: Mapping[str, Any]) -> data.Splits:
    return load_splits(values["data_dir"], split=values["split"],
                       test_alphabets=values["test_alphabets"],
                       val_alphabets=values["val_alphabets"],
                       val_characters=values["val_characters"])


_FLAGS: dict = {}

if __name__ == "__main__":
    _FLAGS.update(define_flags())
    cli.run(functools.partial(few_shot.launch, _FLAGS, PRESET, _load), few_shot.FLAG_NAMES)
