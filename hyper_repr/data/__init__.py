"""Few-shot data for hyper-representation: Omniglot (files, or TensorFlow Datasets' omniglot)
and MiniImagenet splits, episodes.

    splits = load_omniglot("data/omniglot", test_alphabets=["Sanskrit", "Tagalog"])
    splits = load_omniglot_tfds(splits=["small1", "small2"], test_alphabets=["Sanskrit", "Tagalog"])
    train = episode_dataset(splits.train, ways=5, shots=1, queries=15, seed=0, meta_batch_size=4)
    test = evaluation_episodes(splits.test, ways=5, shots=1, queries=15, num_episodes=600)

Splits keep uint8 images (255 = 1.0: Omniglot ink, full RGB intensity); episodes are float32.
"""

from hyper_repr.data.cache import default_cache_dir
from hyper_repr.data.episodes import (Episode, Split, Splits, episode_dataset,
                                      evaluation_episodes, image_batches, split_from_array)
from hyper_repr.data.mini_imagenet import load_mini_imagenet
from hyper_repr.data.omniglot import STANDARD_SPLIT_SIZES, load_omniglot
from hyper_repr.data.tfds_source import load_omniglot_tfds

__all__ = [
    "Episode",
    "STANDARD_SPLIT_SIZES",
    "Split",
    "Splits",
    "default_cache_dir",
    "episode_dataset",
    "evaluation_episodes",
    "image_batches",
    "load_mini_imagenet",
    "load_omniglot",
    "load_omniglot_tfds",
    "split_from_array",
]
