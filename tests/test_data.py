"""Tests of hyper_repr.data: Omniglot and MiniImagenet loaders, the cache, episodes."""

import os
import pathlib
import re
import warnings
import zipfile

import h5py
import numpy as np
import pytest
import tensorflow as tf

from hyper_repr.data import (default_cache_dir, episode_dataset, evaluation_episodes,
                             image_batches, load_mini_imagenet, load_omniglot, split_from_array)
from hyper_repr.data import mini_imagenet, omniglot
from hyper_repr.data.episodes import Split, random_shift

REAL_OMNIGLOT = pathlib.Path(__file__).parent.parent / "data" / "omniglot"
CHARACTERS = [(a, f"character{c:02d}") for a in ("Alpha", "Beta", "Gamma") for c in (1, 2)]
DRAWINGS = 3


@pytest.fixture(autouse=True)
def private_default_cache(tmp_path, monkeypatch):
    """Keeps loads without `cache_dir` out of the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


# ---------------------------------------------------------------- synthetic Omniglot folders

def drawing(size: int, variant: int) -> np.ndarray:
    """White image with a black bar: rows [0, size/2), columns [variant, variant + 7)·size/28."""
    scale = size // 28
    pixels = np.full((size, size, 1), 255, np.uint8)
    pixels[:14 * scale, variant * scale:(variant + 7) * scale] = 0
    return pixels


def expected_ink(variant: int) -> np.ndarray:
    """`drawing(·, variant)` at 28×28 as uint8 ink (area-resizing whole 4×4 blocks is exact)."""
    return 255 - drawing(28, variant)


def write_omniglot(data_dir, source, characters=CHARACTERS, *, zipped, size=112, offset=0,
                   reverse=False, renumber=False):
    """Writes ``source`` in the official layout; drawing d of each character is variant d+offset,
    in the file numbered d (``renumber``: DRAWINGS − 1 − d)."""
    number = (lambda d: DRAWINGS - 1 - d) if renumber else (lambda d: d)
    entries = [(f"{source}/{a}/{c}/{c}_{number(d):02d}.png",
                tf.io.encode_png(drawing(size, d + offset)).numpy())
               for a, c in characters for d in range(DRAWINGS)]
    entries = entries[::-1] if reverse else entries
    data_dir.mkdir(parents=True, exist_ok=True)
    if zipped:
        with zipfile.ZipFile(data_dir / f"{source}.zip", "w") as archive:
            for name, data in entries:
                archive.writestr(name, data)
    for name, data in entries if not zipped else []:
        (data_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (data_dir / name).write_bytes(data)


def load(data_dir, cache_dir, **kwargs):
    kwargs.setdefault("split_sizes", (2, 2, 2))
    return load_omniglot(data_dir, cache_dir=cache_dir, **kwargs)


def all_classes(splits):
    return [name for split in splits for name in split.class_names]


LAYOUTS = {"zip": ("images_background", True, 112), "tree": ("images_evaluation", False, 112),
           "resized": ("omniglot_resized", False, 28)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_omniglot_layouts_give_rotated_ink_images(layout, tmp_path):
    source, zipped, size = LAYOUTS[layout]
    write_omniglot(tmp_path / "data", source, zipped=zipped, size=size)
    splits = load(tmp_path / "data", tmp_path / "cache")
    assert len(all_classes(splits)) == 4 * len(CHARACTERS)
    for split in splits:
        assert split.images.shape == (len(split.class_names) * DRAWINGS, 28, 28, 1)
        assert split.images.dtype == np.uint8
        np.testing.assert_array_equal(np.diff(split.class_starts), DRAWINGS)
        for c in range(0, len(split.class_names), 4):
            upright = split.images[split.class_starts[c]:split.class_starts[c + 1]]
            np.testing.assert_array_equal(upright, [expected_ink(d) for d in range(DRAWINGS)])
            for r, name in enumerate(split.class_names[c:c + 4]):
                assert name.endswith(f"/rot{90 * r:03d}")  # rot180 is 180°, not the legacy 270°
                rotated = split.images[split.class_starts[c + r]:split.class_starts[c + r + 1]]
                np.testing.assert_array_equal(rotated, np.rot90(upright, r, axes=(1, 2)))


def test_omniglot_episodes_have_ink_one_on_white_zero(tmp_path):
    write_omniglot(tmp_path / "data", "images_background", zipped=True)
    splits = load(tmp_path / "data", tmp_path / "cache")
    episode = next(iter(episode_dataset(splits.train, ways=2, shots=1, queries=2, seed=0)))
    pixels = episode.support_x.numpy()
    assert pixels.dtype == np.float32
    assert set(np.unique(pixels)) == {0.0, 1.0}  # bar is ink 1, background 0
    assert pixels.mean() < 0.5  # the bar covers 1/8 of each drawing


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "tree"])
def test_omniglot_split_is_independent_of_file_order_and_names(zipped, tmp_path):
    """The same drawings give the same splits, whatever the order and the numbers of their files
    (TFDS keeps neither): a character's drawings are in the order of their pixels."""
    write_omniglot(tmp_path / "forward", "images_background", zipped=zipped)
    write_omniglot(tmp_path / "reverse", "images_background", zipped=zipped, reverse=True)
    write_omniglot(tmp_path / "renumbered", "images_background", zipped=zipped, renumber=True)
    forward = load(tmp_path / "forward", tmp_path / "cache", seed=3)
    for other in ("reverse", "renumbered"):
        for a, b in zip(forward, load(tmp_path / other, tmp_path / "cache", seed=3)):
            assert a.class_names == b.class_names
            np.testing.assert_array_equal(a.images, b.images)
    others = [load(tmp_path / "forward", tmp_path / "cache", seed=s) for s in range(4, 9)]
    assert any(o.test.class_names != forward.test.class_names for o in others)


def test_omniglot_deduplicates_characters_across_sources(tmp_path):
    greek = [("Greek", "character01"), ("Greek", "character02")]
    write_omniglot(tmp_path, "images_background_small1", CHARACTERS[:2] + greek, zipped=True)
    write_omniglot(tmp_path, "images_background_small2", greek + CHARACTERS[2:4], zipped=True,
                   offset=10)
    write_omniglot(tmp_path, "images_background_small2", greek, zipped=False, offset=5)
    found = omniglot.catalog(tmp_path)
    assert found.characters == tuple(sorted(CHARACTERS[:4] + greek))
    splits = load(tmp_path, tmp_path / "cache", split_sizes=(6, 0, 0))
    first = splits.train.class_names.index("Greek/character01/rot000")
    start = splits.train.class_starts[first]
    # small1 comes first, so its drawings (variants 0..2) are kept, not small2's (5.., 10..).
    np.testing.assert_array_equal(splits.train.images[start:start + DRAWINGS],
                                  [expected_ink(d) for d in range(DRAWINGS)])


def test_omniglot_cache_skips_decoding_until_sources_or_size_change(tmp_path, monkeypatch):
    write_omniglot(tmp_path / "data", "images_background", zipped=True)
    calls = []
    decode = omniglot.decode_png
    monkeypatch.setattr(omniglot, "decode_png", lambda *a: calls.append(1) or decode(*a))
    first = load(tmp_path / "data", tmp_path / "cache")
    n_images = len(CHARACTERS) * DRAWINGS
    assert len(calls) == n_images
    assert len(list((tmp_path / "cache").glob("omniglot-*.npy"))) == 1
    second = load(tmp_path / "data", tmp_path / "cache")
    assert len(calls) == n_images  # read from the cache
    np.testing.assert_array_equal(first.train.images, second.train.images)
    load(tmp_path / "data", tmp_path / "cache", image_size=14)
    assert len(calls) == 2 * n_images
    assert len(list((tmp_path / "cache").glob("omniglot-*.npy"))) == 2  # a new key, not a rebuild
    archive = tmp_path / "data" / "images_background.zip"
    os.utime(archive, ns=(1, archive.stat().st_mtime_ns + 10**9))
    load(tmp_path / "data", tmp_path / "cache")
    assert len(calls) == 3 * n_images
    assert sorted(os.listdir(tmp_path / "data")) == ["images_background.zip"]  # nothing written


def test_default_cache_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "far_ho2"
    write_omniglot(tmp_path / "data", "images_background", zipped=True)
    load_omniglot(tmp_path / "data", split_sizes=(2, 2, 2))
    assert len(list((tmp_path / "xdg" / "far_ho2").glob("omniglot-*.npy"))) == 1


def test_unwritable_cache_warns_and_loads_in_memory(tmp_path):
    write_omniglot(tmp_path / "data", "images_background", zipped=True)
    (tmp_path / "not_a_folder").write_text("")
    with pytest.warns(UserWarning, match="cache_dir"):
        splits = load(tmp_path / "data", tmp_path / "not_a_folder")
    assert len(all_classes(splits)) == 4 * len(CHARACTERS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(tmp_path / "data", None, use_cache=False).train.images.shape[0] > 0


def test_omniglot_missing_or_unrecognised_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        load_omniglot(tmp_path / "absent")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="images_background.*omniglot_resized"):
        load_omniglot(tmp_path)
    (tmp_path / "omniglot_resized").mkdir()
    with pytest.raises(ValueError, match="omniglot_resized.*holds no PNG"):
        load_omniglot(tmp_path)


def test_omniglot_corrupt_image_is_named(tmp_path):
    write_omniglot(tmp_path / "zip", "images_background", zipped=True)
    with zipfile.ZipFile(tmp_path / "zip" / "images_background.zip", "a") as archive:
        archive.writestr("images_background/Beta/character01/broken.png", b"not a png")
    with pytest.raises(ValueError, match="'images_background/Beta/character01/broken.png' in "
                                         + re.escape(str(tmp_path / "zip"))):
        load(tmp_path / "zip", tmp_path / "cache", split_sizes=None, test_alphabets=["Beta"])
    write_omniglot(tmp_path / "tree", "images_background", zipped=False)
    broken = tmp_path / "tree" / "images_background" / "Beta" / "character01" / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        load(tmp_path / "tree", tmp_path / "cache", split_sizes=None, test_alphabets=["Beta"])
    assert not list((tmp_path / "cache").glob("*partial*"))  # no partial cache file left


def test_omniglot_split_arguments_are_checked(tmp_path):
    write_omniglot(tmp_path, "images_background", zipped=True)
    with pytest.raises(ValueError, match=f"Found {len(CHARACTERS)} Omniglot characters"):
        load_omniglot(tmp_path, cache_dir=tmp_path / "cache")  # standard 1200/100/323
    with pytest.raises(ValueError, match=r"`test_alphabets`.*\['Delta'\]"):
        load_omniglot(tmp_path, test_alphabets=["Delta"], cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="both"):
        load_omniglot(tmp_path, test_alphabets=["Beta"], val_alphabets=["Beta"])
    with pytest.raises(ValueError, match="not both"):
        load_omniglot(tmp_path, split_sizes=(6, 0, 0), test_alphabets=["Beta"])
    with pytest.raises(ValueError, match=r"write \['Beta'\]"):
        load_omniglot(tmp_path, test_alphabets="Beta")
    with pytest.raises(ValueError, match="val_characters` needs `test_alphabets"):
        load_omniglot(tmp_path, val_characters=2)
    with pytest.raises(ValueError, match="either `val_alphabets` or `val_characters`"):
        load_omniglot(tmp_path, test_alphabets=["Beta"], val_alphabets=["Alpha"], val_characters=1)
    with pytest.raises(ValueError, match=r"`val_characters` must be an int in 1 … \d+"):
        load_omniglot(tmp_path, test_alphabets=["Beta"], val_characters=100)


# ---------------------------------------------------------------- bundled Omniglot data

@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    return load_omniglot(REAL_OMNIGLOT, test_alphabets=["Sanskrit", "Tagalog"],
                         val_alphabets=["Korean"], cache_dir=cache_dir), cache_dir


def characters_of(split):
    return {name.rsplit("/", 1)[0] for name in split.class_names}


def test_bundled_omniglot_has_242_characters_and_968_classes(bundled):
    splits, _ = bundled
    assert len(omniglot.catalog(REAL_OMNIGLOT).characters) == 242
    assert len(all_classes(splits)) == 968
    assert len(set().union(*map(characters_of, splits))) == 242
    assert all(np.all(np.diff(split.class_starts) == 20) for split in splits)
    assert splits.train.images.mean() < 0.25 * 255  # ink is the minority: ink = 1 − pixel


def test_bundled_omniglot_alphabet_split_is_disjoint(bundled):
    splits, _ = bundled
    alphabets = [{c.split("/")[0] for c in characters_of(split)} for split in splits]
    assert alphabets[1] == {"Korean"} and alphabets[2] == {"Sanskrit", "Tagalog"}
    assert alphabets[0] == {"Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Latin"}
    train, val, test = map(characters_of, splits)
    assert not (train & val or train & test or val & test)
    with pytest.raises(ValueError, match=r"has 20 images, fewer than shots \+ queries = 21"):
        episode_dataset(splits.test, ways=5, shots=5, queries=16, seed=0)


def test_bundled_omniglot_validation_characters_come_from_training_alphabets(bundled):
    _, cache_dir = bundled
    load = lambda seed: load_omniglot(REAL_OMNIGLOT, test_alphabets=["Sanskrit", "Tagalog"],  # noqa: E731
                                      val_characters=24, seed=seed, cache_dir=cache_dir)
    splits = load(0)
    train, val, test = map(characters_of, splits)
    assert len(val) == 24 and len(train) == 242 - 24 - len(test)
    assert not (train & val or train & test or val & test)
    alphabets = lambda names: {c.split("/")[0] for c in names}  # noqa: E731
    assert alphabets(val) <= alphabets(train) and alphabets(test) == {"Sanskrit", "Tagalog"}
    assert len(alphabets(train)) == 6
    assert characters_of(load(0).val) == val and characters_of(load(1).val) != val


def test_bundled_omniglot_count_split(bundled):
    _, cache_dir = bundled
    with pytest.raises(ValueError, match="Found 242 Omniglot characters"):
        load_omniglot(REAL_OMNIGLOT, cache_dir=cache_dir)
    splits = load_omniglot(REAL_OMNIGLOT, split_sizes=(200, 20, 22), cache_dir=cache_dir)
    assert [len(characters_of(s)) for s in splits] == [200, 20, 22]
    train, val, test = map(characters_of, splits)
    assert not (train & val or train & test or val & test)


# ---------------------------------------------------------------- episodes

def labelled_split(n_classes=6, per_class=20):
    """Image (c, i) is 1×2×1 with pixels (c, i), so episodes reveal which images they hold."""
    c, i = np.meshgrid(np.arange(n_classes), np.arange(per_class), indexing="ij")
    return split_from_array(np.stack([c, i], -1)[:, :, None, :, None].astype(np.uint8))


def identities(x):
    """[n, 2] (class, index) of episode images made by `labelled_split`."""
    return np.round(np.asarray(x)[..., 0, :, 0] * 255).astype(int)


def test_image_batches_are_distinct_images_labelled_by_class_and_resumable():
    """The 'classic' stream: batch i of (seed, i), distinct images, labels their classes."""
    split = labelled_split(n_classes=5, per_class=4)
    stream = [(identities(x), y.numpy()) for x, y in image_batches(split, batch_size=7, seed=3).take(4)]
    for images, labels in stream:
        assert len({tuple(i) for i in images}) == 7  # without replacement
        np.testing.assert_array_equal(labels, images[:, 0])  # the class of each image
    assert len({tuple(map(tuple, images)) for images, _ in stream}) == 4  # batches differ
    resumed = next(iter(image_batches(split, batch_size=7, seed=3, first_batch=2)))
    np.testing.assert_array_equal(identities(resumed[0]), stream[2][0])
    other = next(iter(image_batches(split, batch_size=7, seed=4)))
    assert not np.array_equal(identities(other[0]), stream[0][0])
    with pytest.raises(ValueError, match="`batch_size` must be a positive int ≤ 20"):
        image_batches(split, batch_size=21, seed=0)


def test_episode_shapes_labels_and_disjointness():
    ways, shots, queries = 4, 3, 5
    stream = episode_dataset(labelled_split(), ways=ways, shots=shots, queries=queries, seed=1)
    for episode in stream.take(20):
        assert episode.support_x.shape == (ways * shots, 1, 2, 1)
        assert episode.query_x.shape == (ways * queries, 1, 2, 1)
        assert episode.support_y.dtype == episode.query_y.dtype == tf.int32
        np.testing.assert_array_equal(np.bincount(episode.support_y, minlength=ways), shots)
        np.testing.assert_array_equal(np.bincount(episode.query_y, minlength=ways), queries)
        support, query = identities(episode.support_x), identities(episode.query_x)
        for label in range(ways):  # one class per label, the same in support and query
            classes = {*support[episode.support_y == label, 0],
                       *query[episode.query_y == label, 0]}
            assert len(classes) == 1
        assert len({*support[:, 0]}) == ways
        assert not {*map(tuple, support)} & {*map(tuple, query)}
        assert len({*map(tuple, query)}) == ways * queries


def test_legacy_sampling_lets_support_reappear_in_query():
    overlaps, split = 0, labelled_split()
    for episode in episode_dataset(split, ways=5, shots=5, queries=18, seed=0,
                                   legacy_sampling=True).take(10):
        support, query = identities(episode.support_x), identities(episode.query_x)
        overlaps += len({*map(tuple, support)} & {*map(tuple, query)})
        assert len({*map(tuple, support)}) == 25  # no repeats within the support set
    assert overlaps > 0
    with pytest.raises(ValueError, match="shots \\+ queries = 23"):
        episode_dataset(split, ways=5, shots=5, queries=18, seed=0)


def test_episodes_are_deterministic_and_meta_batches_stack_consecutive_episodes():
    split = labelled_split()
    args = dict(ways=3, shots=2, queries=4)
    single = [tuple(map(np.asarray, e)) for e in episode_dataset(split, seed=7, **args).take(6)]
    again = [tuple(map(np.asarray, e)) for e in episode_dataset(split, seed=7, **args).take(6)]
    other = [tuple(map(np.asarray, e)) for e in episode_dataset(split, seed=8, **args).take(6)]
    np.testing.assert_equal(single, again)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(single, other))
    batches = list(episode_dataset(split, seed=7, meta_batch_size=3, **args).take(2))
    assert batches[0].support_x.shape == (3, 6, 1, 2, 1)
    for b, batch in enumerate(batches):
        for field, value in enumerate(batch):
            expected = np.stack([e[field] for e in single[3 * b:3 * b + 3]])
            np.testing.assert_array_equal(value, expected)
    resumed = next(iter(episode_dataset(split, seed=7, first_episode=4, **args)))
    np.testing.assert_array_equal(resumed.query_x, single[4][2])


def test_random_shift_translates_each_image_within_the_bound():
    rng = np.random.default_rng(0)
    images = (rng.random((40, 7, 9, 1)) < 0.3).astype(np.float32)
    key = tf.constant([3, 4], tf.int64)
    shifted = random_shift(tf.constant(images), 2, key).numpy()
    np.testing.assert_array_equal(shifted, random_shift(tf.constant(images), 2, key).numpy())
    padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)])
    offsets = []
    for image, out in zip(padded, shifted):  # out is a 7×9 window of the zero-padded image
        windows = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(image[dy:dy + 7, dx:dx + 9], out)]
        assert windows, "not a translated copy"
        offsets.append(windows[0])
    assert len(set(offsets)) > 5  # each image draws its own offset
    with pytest.raises(ValueError, match="shift"):
        episode_dataset(labelled_split(), ways=2, shots=1, queries=1, seed=0, shift=-1)


def test_shifted_episodes_keep_labels_and_images_of_the_same_episode():
    pixels = np.random.default_rng(1).random((4, 6, 8, 8, 1)) * 255
    split = split_from_array(pixels.astype(np.uint8))
    args = dict(ways=3, shots=2, queries=2, seed=4)
    plain = list(episode_dataset(split, **args).take(3))
    shifted = list(episode_dataset(split, shift=2, **args).take(3))
    again = list(episode_dataset(split, shift=2, **args).take(3))
    for p, s_, a in zip(plain, shifted, again):
        np.testing.assert_array_equal(p.support_y, s_.support_y)
        np.testing.assert_array_equal(p.query_y, s_.query_y)
        np.testing.assert_array_equal(s_.query_x, a.query_x)  # deterministic for the seed
        assert s_.support_x.shape == p.support_x.shape and s_.support_x.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(s_.query_x)) and float(tf.reduce_max(s_.query_x)) <= 1.0
        # each query image is the same image, moved
        for x_plain, x_shifted in zip(np.asarray(p.query_x), np.asarray(s_.query_x)):
            padded = np.pad(x_plain, [(2, 2), (2, 2), (0, 0)])
            assert any(np.array_equal(padded[dy:dy + 8, dx:dx + 8], x_shifted)
                       for dy in range(5) for dx in range(5))
    assert any(not np.array_equal(p.query_x, s_.query_x) for p, s_ in zip(plain, shifted))


def test_evaluation_episodes_are_fixed():
    split = labelled_split()
    args = dict(ways=3, shots=1, queries=2, num_episodes=7, seed=5)
    first = [np.asarray(e.query_x) for e in evaluation_episodes(split, **args)]
    second = [np.asarray(e.query_x) for e in evaluation_episodes(split, **args)]
    assert len(first) == 7
    np.testing.assert_array_equal(first, second)
    stream = episode_dataset(split, ways=3, shots=1, queries=2, seed=5).take(7)
    np.testing.assert_array_equal(first, [np.asarray(e.query_x) for e in stream])
    batches = [b.query_y.shape[0] for b in evaluation_episodes(split, meta_batch_size=3, **args)]
    assert batches == [3, 3, 1]


def test_episodes_from_classes_of_different_sizes():
    images = np.arange(9, dtype=np.uint8).reshape(9, 1, 1, 1)
    split = Split(images, np.array([0, 2, 5, 9]), ("a", "b", "c"))
    episode = next(iter(episode_dataset(split, ways=3, shots=1, queries=1, seed=0)))
    found = np.round(np.concatenate([episode.support_x, episode.query_x]).ravel() * 255)
    classes = np.searchsorted(split.class_starts, found, side="right") - 1
    assert sorted(classes) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="Class .a. of the split has 2 images.*`shots`=2"):
        episode_dataset(split, ways=2, shots=2, queries=1, seed=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ways=7), "`ways`=7 exceeds the 6 classes"),
    (dict(shots=0), "`shots` must be a positive int"),
    (dict(queries=21, legacy_sampling=True), r"max\(shots, queries\) = 21"),
    (dict(meta_batch_size=0), "`meta_batch_size` must be"),
])
def test_episode_arguments_are_checked(kwargs, message):
    args = dict(ways=5, shots=1, queries=15, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        episode_dataset(labelled_split(), **args)
    with pytest.raises(ValueError, match="`num_episodes`"):
        evaluation_episodes(labelled_split(), ways=2, shots=1, queries=1, num_episodes=0)


# ---------------------------------------------------------------- MiniImagenet

def write_h5(data_dir, per_class=4, classes=(5, 3, 3), **overrides):
    """Image i of the h5 file of a split is filled with its class i // per_class."""
    data_dir.mkdir(exist_ok=True)
    for split, n in zip(("train", "val", "test"), classes):
        values = np.repeat(np.arange(n, dtype=np.uint8), per_class)
        images = np.broadcast_to(values[:, None, None, None], (n * per_class, 84, 84, 3))
        with h5py.File(data_dir / f"{split}.h5", "w") as f:
            f["X"] = overrides.get(split, images)


def test_mini_imagenet_h5_is_lazy_and_class_contiguous(tmp_path):
    write_h5(tmp_path)
    splits = load_mini_imagenet(tmp_path, images_per_class=4)
    assert isinstance(splits.train.images, h5py.Dataset)  # not read into memory
    assert [len(s.class_names) for s in splits] == [5, 3, 3]
    assert splits.val.class_names[2] == "val/002"
    for episode in episode_dataset(splits.train, ways=3, shots=1, queries=3, seed=0).take(3):
        assert episode.support_x.shape == (3, 84, 84, 3) and episode.support_x.dtype == tf.float32
        classes = np.round(episode.query_x.numpy().reshape(9, -1) * 255)
        assert np.all(classes == classes[:, :1])  # each image is one class' constant
        support_classes = np.round(episode.support_x.numpy()[:, 0, 0, 0] * 255)
        np.testing.assert_array_equal(classes[:, 0], np.repeat(support_classes, 3))


@pytest.mark.parametrize("overrides, message", [
    (dict(val=np.zeros((8, 84, 84, 3), np.float32)), "uint8"),
    (dict(test=np.zeros((8, 32, 32, 3), np.uint8)), r"\(8, 32, 32, 3\)"),
    (dict(train=np.zeros((6, 84, 84, 3), np.uint8)), "6 images, not a positive multiple"),
])
def test_mini_imagenet_bad_h5_raises_naming_the_file(overrides, message, tmp_path):
    write_h5(tmp_path, **overrides)
    split = next(iter(overrides))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / f"{split}.h5")) + ".*" + message):
        load_mini_imagenet(tmp_path, images_per_class=4)


def test_mini_imagenet_missing_h5_or_dataset_raises(tmp_path):
    write_h5(tmp_path)
    with h5py.File(tmp_path / "test.h5", "w") as f:
        f["Y"] = np.zeros(3)
    with pytest.raises(ValueError, match="test.h5.*no dataset 'X'"):
        load_mini_imagenet(tmp_path, images_per_class=4)
    (tmp_path / "val.h5").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "val.h5"))):
        load_mini_imagenet(tmp_path, images_per_class=4)


COLORS = {"n01": (200, 30, 30), "n02": (30, 200, 30), "n03": (30, 30, 200)}


def write_csv_layout(data_dir):
    """Three splits of the labels in COLORS, 3 JPEGs per label, of assorted sizes."""
    (data_dir / "images").mkdir(parents=True)
    for split in ("train", "val", "test"):
        rows = ["filename,label"]
        for label in sorted(COLORS, reverse=True):  # CSV order need not be sorted
            for i, (height, width) in enumerate([(50, 40), (100, 120), (84, 84)]):
                name = f"{label}_{split}_{i}.jpg"
                pixels = np.broadcast_to(np.uint8(COLORS[label]), (height, width, 3))
                (data_dir / "images" / name).write_bytes(tf.io.encode_jpeg(pixels).numpy())
                rows.append(f"{name},{label}")
        (data_dir / f"{split}.csv").write_text("\n".join(rows) + "\n")


def test_mini_imagenet_csv_layout_is_decoded_resized_and_cached(tmp_path, monkeypatch):
    write_csv_layout(tmp_path / "data")
    calls = []
    decode = mini_imagenet.decode_image
    monkeypatch.setattr(mini_imagenet, "decode_image", lambda *a: calls.append(1) or decode(*a))
    splits = load_mini_imagenet(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert len(calls) == 27
    for split in splits:
        assert split.class_names == ("n01", "n02", "n03")
        assert split.images.shape == (9, 84, 84, 3) and split.images.dtype == np.uint8
        for c, name in enumerate(split.class_names):
            block = split.images[split.class_starts[c]:split.class_starts[c + 1]]
            np.testing.assert_allclose(block.mean(axis=(1, 2)), [COLORS[name]] * 3, atol=6)  # JPEG
    again = load_mini_imagenet(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert len(calls) == 27  # read from the cache
    np.testing.assert_array_equal(again.test.images, splits.test.images)
    episode = next(iter(episode_dataset(again.train, ways=3, shots=1, queries=2, seed=0)))
    assert episode.query_x.shape == (6, 84, 84, 3)


def test_mini_imagenet_csv_errors_name_the_file(tmp_path):
    write_csv_layout(tmp_path)
    cache_dir = tmp_path / "cache"
    missing = tmp_path / "images" / "n02_val_1.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*val.csv"):
        load_mini_imagenet(tmp_path, cache_dir=cache_dir)
    missing.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        load_mini_imagenet(tmp_path, cache_dir=cache_dir)
    missing.write_bytes(tf.io.encode_jpeg(np.zeros((9, 9, 3), np.uint8)).numpy())
    (tmp_path / "test.csv").write_text("file,class\na.jpg,n01\n")
    with pytest.raises(ValueError, match="test.csv.*'filename,label'"):
        load_mini_imagenet(tmp_path, use_cache=False)
    os.rename(tmp_path / "images", tmp_path / "pictures")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "images"))):
        load_mini_imagenet(tmp_path)


def test_mini_imagenet_missing_folder_or_layout_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        load_mini_imagenet(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="train.h5.*train.csv"):
        load_mini_imagenet(tmp_path)
