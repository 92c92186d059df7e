"""Few-shot MiniImagenet by hyper-representation (Franceschi et al., ICML 2018, §5.2, Table 2).

Meta-trains the C4L network (4 conv-32 layers with max-pooling, 800 features; ``--network=rn``
for the residual network) as the representation of N-way k-shot logistic heads fitted by T steps
of gradient descent, then meta-tests the best-validation weights next to two baselines (heads on
raw pixels, on the untrained network). Every setting is a flag (``flags.few_shot``), with the
paper's value, or the author's guidance (FAR-HO issue #3), as default.

Data (``--data_dir``): the Ravi & Larochelle split as ``hyper_repr.data.load_mini_imagenet``
reads it: train.h5, val.h5, test.h5 (dataset ``X``, uint8 [n, 84, 84, 3], classes in blocks of
600 images), or train.csv, val.csv, test.csv and images/.

    python -m flags.miniimagenet --logdir runs/mini_5way_1shot --data_dir DIR
    python -m flags.miniimagenet --logdir runs/mini_rn --data_dir DIR --network rn
    python -m flags.miniimagenet --logdir runs/mini_5way_1shot --data_dir DIR --mode test --test_T 4

(``--mode test`` appends to the logdir's test_results.json; see ``flags.few_shot``.)
"""

import dataclasses
import functools
import pathlib
from typing import Any, Mapping

from absl import flags

from far_ho2.launch import cli
from flags import few_shot
from hyper_repr import data

DATA_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "mini_imagenet"
# C4L, the network of the paper's MiniImagenet results, trained for "around 100k or more"
# hyper-iterations (the paper's author in FAR-HO issue #3).
PRESET = dataclasses.replace(few_shot.PRESET, network="c4l", iterations=100_000)


def define_flags() -> dict:
    """The launcher's flags: the few-shot ones and the image format."""
    holders = few_shot.define_flags(PRESET, data_dir=str(DATA_DIR))
    holders.update(
        image_size=flags.DEFINE_integer("image_size", 84, "Side of the images (h5 files must "
                                        "have it; CSV images are resized to it).", lower_bound=1),
        images_per_class=flags.DEFINE_integer("images_per_class", 600, "Images per class block "
                                              "of the h5 files.", lower_bound=1))
    return holders


def _load(values: Mapping[str, Any]) -> data.Splits:
    return data.load_mini_imagenet(values["data_dir"], image_size=values["image_size"],
                                   images_per_class=values["images_per_class"])


_FLAGS: dict = {}

if __name__ == "__main__":
    _FLAGS.update(define_flags())
    cli.run(functools.partial(few_shot.launch, _FLAGS, PRESET, _load), few_shot.FLAG_NAMES)
