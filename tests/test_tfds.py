"""TensorFlow Datasets as a data source, offline, on real images: flags.omniglot with
--data_source=tfds and flags.hyper_cleaning with a TFDS --data name give, for the same images, the
same arrays, episodes and results as the folder / .npz paths.

The TFDS data are prepared here by builders of this module named after TFDS's own (``omniglot``
3.0.0, ``mnist`` 3.0.1: TFDS's versions), with TFDS's features, and unregistered: so
``tfds.builder(name, data_dir=...)``, what the loaders call, returns TFDS's own registered
builder, reading these files as it reads the files its ``download_and_prepare`` writes. The
Omniglot builder stores the bundled zips' PNG files as TFDS's stores the downloaded ones (the file's
bytes), with its example keys; the MNIST one stores the bundled 8×8 digits, enlarged to 28×28, in
the order of the .npz they are compared with (``disable_shuffling``; TFDS's own MNIST is in the
order its preparation left it, which its .npz twin would have to follow).
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags

from far_ho2.launch import cli, workdir
from flags import common, few_shot, hyper_cleaning, omniglot
from hyper_repr import data, train
from hyper_repr.data import tfds_source

ZIPS = {"small1": "images_background_small1.zip", "small2": "images_background_small2.zip"}
TINY = ["--ways=3", "--shots=1", "--queries=2", "--T=1", "--meta_batch_size=2", "--hyper_iterations=2",
        "--eval_every=2", "--eval_episodes=4", "--test_episodes=4", "--eval_batch_size=2", "--dtype=float64",
        "--verbose=0"]
CLEANING = ["--n_train=60", "--n_val=30", "--n_test=50", "--T=5", "--hyper_iterations=3", "--retrain_steps=20"]


def bundled_drawings(split: str):
    """(alphabet, character folder, file name, PNG bytes) of the bundled zip of ``split``."""
    with zipfile.ZipFile(omniglot.DATA_DIR / ZIPS[split]) as archive:
        for member in sorted(archive.namelist()):
            parts = member.split("/")
            if len(parts) == 4 and parts[3].endswith(".png"):
                yield parts[1], parts[2], parts[3], archive.read(member)


class Omniglot(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS's omniglot (its version, features, keys and stored bytes) prepared from the bundled
    zips: the splits small1 and small2."""

    VERSION = tfds.core.Version("3.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        alphabets = sorted({alphabet for split in ZIPS for alphabet, *_ in bundled_drawings(split)})
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(105, 105, 3), encoding_format="png"),
            "alphabet": tfds.features.ClassLabel(names=alphabets),
            "alphabet_char_id": np.int64,
            "label": tfds.features.ClassLabel(num_classes=1623)}), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ZIPS}

    def _generate_examples(self, split):
        for alphabet, character, name, png in bundled_drawings(split):
            number = int(character[len("character"):]) - 1
            yield f"{alphabet}_{number}_{name}", {"image": png, "alphabet": alphabet, "alphabet_char_id": number,
                                                  "label": int(name.split("_")[0]) - 1}


def digits_as_mnist(path) -> dict[str, np.ndarray]:
    """The bundled digits as a Keras-format MNIST .npz at ``path``: 8×8 pixels 0..16 as 3×3
    blocks of 0..255, padded to 28×28 uint8; test every third image (``hyper_cleaning``'s split)."""
    with np.load(hyper_cleaning.DIGITS) as npz:
        images, labels = npz["images"], npz["labels"]
    x = np.pad(np.round(np.kron(images, np.ones((3, 3))) * 255 / 16), ((0, 0), (2, 2), (2, 2))).astype(np.uint8)
    test = np.arange(len(x)) % hyper_cleaning.DIGITS_TEST_EVERY == 0
    arrays = dict(x_train=x[~test], y_train=labels[~test], x_test=x[test], y_test=labels[test])
    np.savez(path, **arrays)
    return arrays


def prepare_mnist(data_dir, arrays: dict[str, np.ndarray]) -> None:
    """TFDS's mnist (its version and features) of ``arrays``, in their order, in ``data_dir``."""
    class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.builder_cls("mnist").VERSION

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)), "label": tfds.features.ClassLabel(num_classes=10)}),
                supervised_keys=("image", "label"), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in ("train", "test")}

        def _generate_examples(self, split):
            for i, (image, label) in enumerate(zip(arrays[f"x_{split}"], arrays[f"y_{split}"])):
                yield i, {"image": image[..., None], "label": label}
    Mnist(data_dir=str(data_dir)).download_and_prepare()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The TFDS data_dir of the bundled Omniglot and of the digits as MNIST, the MNIST .npz,
    and a private decoded-image cache."""
    root = tmp_path_factory.mktemp("tfds")
    Omniglot(data_dir=str(root / "tfds")).download_and_prepare()
    arrays = digits_as_mnist(root / "mnist.npz")
    prepare_mnist(root / "tfds", arrays)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
        yield root


def parse(module, *args: str) -> dict[str, flags.FlagHolder]:
    """The flags of launcher ``module`` parsed from ``args``, in a FlagValues of their own."""
    values = flags.FlagValues()
    holders = module.define_flags(flag_values=values)
    values(["launcher", *args])
    return holders


def assert_same_splits(a: data.Splits, b: data.Splits) -> None:
    for x, y in zip(a, b):
        assert x.class_names == y.class_names
        np.testing.assert_array_equal(x.class_starts, y.class_starts)
        assert x.images.dtype == y.images.dtype == np.uint8
        np.testing.assert_array_equal(x.images, y.images)


def test_tfds_omniglot_gives_the_folder_images_splits_and_episodes(prepared, tmp_path):
    tfds_dir = prepared / "tfds"
    assert type(tfds_source.prepared_builder("omniglot", tfds_dir)) is tfds.builder_cls("omniglot")
    folder = omniglot.load_splits(omniglot.DATA_DIR)  # the bundled recipe's split: --split=auto
    from_tfds = omniglot.load_splits(data_source="tfds", tfds_data_dir=str(tfds_dir))
    assert_same_splits(folder, from_tfds)
    assert len(folder.train.class_names) + len(folder.val.class_names) + len(folder.test.class_names) == 4 * 242
    assert {name.split("/")[0] for name in from_tfds.test.class_names} == {"Sanskrit", "Tagalog"}
    for make in (lambda s: data.episode_dataset(s.train, ways=5, shots=1, queries=15, seed=3, meta_batch_size=2),
                 lambda s: data.evaluation_episodes(s.test, ways=5, shots=5, queries=15, num_episodes=3)):
        for a, b in zip(make(folder).take(3), make(from_tfds).take(3)):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert_same_splits(omniglot.load_splits(omniglot.DATA_DIR, val_characters=10),
                       omniglot.load_splits(data_source="tfds", tfds_data_dir=str(tfds_dir), val_characters=10))

    # one split: small2 alone, as the folder of its zip alone (Greek and Latin from small2 then)
    (tmp_path / "small2").mkdir()
    shutil.copy(omniglot.DATA_DIR / ZIPS["small2"], tmp_path / "small2")
    assert_same_splits(omniglot.load_splits(tmp_path / "small2", test_alphabets=["Tagalog"], val_alphabets=["Greek"]),
                       omniglot.load_splits(data_source="tfds", tfds_data_dir=str(tfds_dir), tfds_splits=["small2"],
                                            test_alphabets=["Tagalog"], val_alphabets=["Greek"]))


def test_omniglot_launcher_on_tfds_gives_the_folder_run(prepared, tmp_path):
    """flags.omniglot, flags to results: a tiny float64 run on each source, the same numbers."""
    results = {}
    for name, source in (("folder", []), ("tfds", ["--data_source=tfds", f"--tfds_data_dir={prepared / 'tfds'}"])):
        holders = parse(omniglot, f"--logdir={tmp_path / name}", *TINY, *source)
        few_shot.launch(holders, omniglot.PRESET, lambda values: omniglot.load_from_flags(values, holders))
        results[name] = json.loads((tmp_path / name / workdir.RESULTS).read_text())
        results[name]["rows"] = [{k: v for k, v in row.items() if "seconds" not in k}
                                 for row in train.read_metrics(tmp_path / name)]
    folder, from_tfds = results["folder"], results["tfds"]
    assert folder["config"]["dtype"] == "float64" and folder["iterations"] == 2 and len(folder["rows"]) == 1
    for key in ("test", "rows", "learning_rate", "best_val_accuracy", "config"):
        assert folder[key] == from_tfds[key], key
    assert from_tfds["flags"]["data_source"] == "tfds"


def test_omniglot_launcher_tfds_errors_name_the_flags(prepared, tmp_path):
    tfds_dir, empty = prepared / "tfds", tmp_path / "empty"
    cases = {
        (f"--tfds_data_dir={tfds_dir}",): "--tfds_data_dir applies to TensorFlow Datasets data, not to "
                                          "--data_source=folder",
        ("--tfds_splits=small1",): "--tfds_splits applies to",
        ("--data_source=tfds", "--data_dir=data"): "--data_dir is the folder of --data_source=folder",
        ("--data_source=tfds", f"--tfds_data_dir={empty}"): f"--data_source=tfds: TFDS 'omniglot' is not prepared in "
                                                            f"'{empty}/omniglot/3.0.0'.*--tfds_data_dir.*--tfds_download",
        ("--data_source=tfds", f"--tfds_data_dir={tfds_dir}", "--tfds_splits=train"):
            r"--tfds_splits names splits \['train'\] .* it has \['small1', 'small2'\]",
        ("--data_source=tfds", f"--tfds_data_dir={tfds_dir}", "--test_alphabets=Klingon"):
            r"--test_alphabets names unknown alphabets \['Klingon'\]"}
    for args, message in cases.items():
        holders = parse(omniglot, f"--logdir={tmp_path / 'run'}", *args)
        with pytest.raises(cli.LaunchError, match=message):
            few_shot.launch(holders, omniglot.PRESET, lambda values: omniglot.load_from_flags(values, holders))
    assert not empty.exists() and not (tmp_path / "run").exists()  # nothing written, nothing downloaded


def test_hyper_cleaning_on_tfds_gives_the_npz_data_and_run(prepared, tmp_path):
    npz, tfds_dir = str(prepared / "mnist.npz"), str(prepared / "tfds")
    sizes = dict(n_train=60, n_val=30, n_test=50)
    from_npz = hyper_cleaning.load_data(hyper_cleaning.Config(data=npz, **sizes))
    from_tfds = hyper_cleaning.load_data(hyper_cleaning.Config(data="mnist", **sizes),
                                         common.Tfds(tfds_data_dir=tfds_dir))
    for name, x, y in zip(from_npz._fields, from_npz, from_tfds):
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert from_npz.x_train.shape == (60, 784) and from_npz.corrupted.sum() == 20 and from_npz.x_test.max() == 1

    results = {}
    for name, source in (("npz", [f"--data={npz}"]), ("tfds", ["--data=mnist", f"--tfds_data_dir={tfds_dir}"])):
        holders = parse(hyper_cleaning, f"--logdir={tmp_path / name}", *CLEANING, *source)
        hyper_cleaning.launch(holders)
        results[name] = json.loads((tmp_path / name / workdir.RESULTS).read_text())
        results[name]["rows"] = (tmp_path / name / workdir.METRICS).read_text().splitlines()
    timeless = lambda r: {k: v for k, v in r["metrics"].items() if k != "elapsed"}  # noqa: E731
    assert timeless(results["npz"]) == timeless(results["tfds"])
    assert results["npz"]["metrics"]["hyper_iterations_done"] == 3 and len(results["npz"]["rows"]) == 4
    header = results["npz"]["rows"][0].split(",")
    untimed = lambda rows: [[v for k, v in zip(header, row.split(",")) if "seconds" not in k]  # noqa: E731
                            for row in rows]
    assert untimed(results["npz"]["rows"]) == untimed(results["tfds"]["rows"])
    assert {k: v for k, v in results["npz"]["config"].items() if k != "data"} == \
        {k: v for k, v in results["tfds"]["config"].items() if k != "data"}


def test_hyper_cleaning_data_flag_tells_files_from_tfds_names(prepared, tmp_path):
    tfds_dir, empty = str(prepared / "tfds"), tmp_path / "empty"
    cases = {
        ("--data=mnst",): "--data=mnst: no such file, and no TensorFlow Datasets dataset of that name",
        (f"--data={tmp_path / 'missing.npz'}",): r"--data=.*missing.npz: no such file\.",
        ("--data=mnist", f"--tfds_data_dir={empty}"): f"--data=mnist: TFDS 'mnist' is not prepared in '{empty}/mnist/"
                                                      f".*--tfds_data_dir.*--tfds_download",
        ("--data=omniglot", f"--tfds_data_dir={tfds_dir}"): "--data=omniglot: hyper-cleaning reads the uint8 'image' "
                                                            "and 10-class 'label'",
        (f"--tfds_data_dir={tfds_dir}",): "--tfds_data_dir applies to TensorFlow Datasets data, not to the bundled "
                                          "digits",
        (f"--data={prepared / 'mnist.npz'}", "--tfds_download"): "--tfds_download applies to TensorFlow Datasets data, "
                                                                 "not to --data=.*mnist.npz"}
    for args, message in cases.items():
        with pytest.raises(cli.LaunchError, match=message):
            hyper_cleaning.launch(parse(hyper_cleaning, f"--logdir={tmp_path / 'run'}", *args))
    assert not empty.exists() and not (tmp_path / "run").exists()  # nothing written, nothing downloaded
    assert hyper_cleaning.is_npz_path("x.npz") and not hyper_cleaning.is_npz_path("mnist")
    (tmp_path / "mnist").write_bytes(b"")  # a file is a file, whatever its name
    assert hyper_cleaning.is_npz_path(str(tmp_path / "mnist"))


def test_catalogue_names_resolve_and_load_with_mocked_tfds():
    """mnist, fashion_mnist and kmnist: TFDS's own builders and metadata, random examples
    (``tfds.testing.mock_data``, whose download_and_prepare does nothing): not prepared, they are an
    error; with --tfds_download they are downloaded once (by TFDS's machinery), then read."""
    downloads = []
    with tfds.testing.mock_data(num_examples=7), mock.patch.object(
            tfds.core.DatasetBuilder, "download_and_prepare", lambda builder, *_, **__: downloads.append(builder.name)):
        for name in ("mnist", "fashion_mnist", "kmnist"):
            with pytest.raises(cli.LaunchError, match=f"--data={name}: TFDS '{name}' is not prepared"):
                hyper_cleaning.read_tfds(name)
            arrays = hyper_cleaning.read_tfds(name, common.Tfds(tfds_download=True))
            assert {k: v.shape for k, v in arrays.items()} == {"x_train": (7, 784), "y_train": (7,),
                                                               "x_test": (7, 784), "y_test": (7,)}
            assert arrays["x_train"].dtype == np.float32 and 0 <= arrays["x_train"].min() < arrays["x_train"].max() <= 1
            assert set(arrays["y_train"]) <= set(range(10))
    assert downloads == ["mnist", "fashion_mnist", "kmnist"]


def test_tensorflow_datasets_is_imported_only_for_tfds_data():
    code = ("import sys, far_ho2, hyper_repr, hyper_repr.data, flags.omniglot, flags.hyper_cleaning, "
            "flags.miniimagenet, flags.effect_of_T; print('tensorflow_datasets' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=omniglot.DATA_DIR.parents[1], capture_output=True,
                            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
