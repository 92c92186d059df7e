"""Data from TensorFlow Datasets (TFDS): a prepared dataset of a TFDS ``data_dir``, and Omniglot
from TFDS's ``omniglot``.

``tensorflow_datasets`` is imported only when TFDS data is read (``pip install "far_ho2[tfds]"``).
Nothing is downloaded unless ``download=True``: then TFDS's own ``download_and_prepare`` fetches
and prepares a dataset missing from ``data_dir`` (it needs a network; see docs/data.md to prepare
``omniglot`` from its four zips offline).

TFDS's ``omniglot`` (version 3) has the splits train (images_background), test
(images_evaluation), small1 and small2 (images_background_small1/2), and per example the PNG file
as released (105×105, stored as read), ``alphabet`` (a class label named by the alphabet's
folder), ``alphabet_char_id`` (the character's folder number − 1) and ``label``. The splits are
read as the folder sources of the same names (`hyper_repr.data.omniglot`): a character from the
first split holding it in that order, named ``(alphabet, "characterNN")``, its PNG bytes decoded
by the same function, its drawings in the same pixel order. So the same images give the same
`Splits`, bit for bit.
"""

import os
import pathlib
from types import ModuleType
from typing import Any, Optional, Sequence

from hyper_repr.data import cache, omniglot
from hyper_repr.data.episodes import Splits

OMNIGLOT = "omniglot"
OMNIGLOT_SPLITS = ("train", "test", "small1", "small2")  # precedence: the folder sources' order
_READ_BATCH = 1024  # examples per read of the TFDS files


class TfdsUnavailable(ValueError):
    """tensorflow-datasets (or a package it needs) is not installed."""


def import_tfds() -> ModuleType:
    """The ``tensorflow_datasets`` module.

    Raises:
        TfdsUnavailable: naming the missing package and the install extra.
    """
    try:
        import tensorflow_datasets  # noqa: PLC0415 (only TFDS data pays for the import)
    except ImportError as error:
        raise TfdsUnavailable(f"Reading TensorFlow Datasets needs the packages tensorflow-datasets and "
                              f"importlib_resources: pip install \"far_ho2[tfds]\" ({error}).") from None
    return tensorflow_datasets


def is_dataset_name(name: str) -> bool:
    """Whether TFDS knows ``name`` (``"mnist"``, ``"mnist:3.0.1"``, ``"name/config"``): a
    registered builder."""
    tfds = import_tfds()
    try:
        tfds.builder_cls(name.split(":")[0].split("/")[0])
    except (tfds.core.registered.DatasetNotFoundError, ValueError):
        return False
    return True


def prepared_builder(name: str, data_dir: Optional[cache.PathLike] = None, *,
                     download: bool = False) -> Any:
    """TFDS's builder of ``name`` on the data prepared in ``data_dir``; with ``download``,
    ``download_and_prepare`` first if it is not prepared there.

    Args:
        name: a TFDS name (``"omniglot"``, ``"mnist:3.0.1"``).
        data_dir: the TFDS data_dir (``~`` expanded). Defaults to `None`: TFDS's
            ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
        download: let TFDS download and prepare a dataset not prepared (needs a network).
            Defaults to `False`.

    Returns:
        A prepared ``tfds.core.DatasetBuilder``.

    Raises:
        FileNotFoundError: if the dataset is not prepared in ``data_dir`` and not ``download``.
        ValueError: for a name TFDS does not know.
    """
    tfds = import_tfds()
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.path.expanduser(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"TensorFlow Datasets has no dataset {name!r}.") from None
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"TFDS {name!r} is not prepared in {os.fspath(builder.data_dir)!r}: prepare it there (docs/data.md), "
                f"give the `data_dir` holding it, or let TFDS download it with `download=True`.")
        builder.download_and_prepare()
    return builder


def read_split(builder: Any, split: str, **as_dataset: Any) -> Any:
    """The examples of ``split`` as NumPy batches of ``_READ_BATCH``, in the files' order (the
    order TFDS prepared them in, the same at every read); ``as_dataset`` as TFDS's."""
    tfds = import_tfds()
    return tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False, **as_dataset).batch(_READ_BATCH))


def omniglot_catalog(data_dir: Optional[cache.PathLike] = None, *, splits: Optional[Sequence[str]] = None,
                     download: bool = False) -> omniglot.Catalog:
    """The drawings of TFDS's ``omniglot`` in ``data_dir`` (see the module docstring).

    Args:
        data_dir: the TFDS data_dir. Defaults to `None`: TFDS's.
        splits: the TFDS splits to read. Defaults to `None`: all the prepared ones.
        download: as `prepared_builder`. Defaults to `False`.

    Raises:
        FileNotFoundError: if ``omniglot`` is not prepared in ``data_dir`` and not ``download``.
        ValueError: for a split the dataset does not have.
    """
    builder = prepared_builder(OMNIGLOT, data_dir, download=download)
    prepared = [s for s in OMNIGLOT_SPLITS if s in builder.info.splits]
    wanted = prepared if not splits else list(splits)
    unknown = sorted(set(wanted) - set(prepared))
    if unknown:
        raise ValueError(f"`splits` names splits {unknown} that TFDS omniglot in {os.fspath(builder.data_dir)!r} "
                         f"does not have; it has {prepared}.")
    alphabets = builder.info.features["alphabet"].names
    sources, records = [], []
    for split in (s for s in OMNIGLOT_SPLITS if s in wanted):
        drawings: list[omniglot.EncodedImage] = []
        for batch in read_split(builder, split, decoders={"image": import_tfds().decode.SkipDecoding()}):
            for image, alphabet, number in zip(batch["image"], batch["alphabet"], batch["alphabet_char_id"]):
                character = (alphabets[alphabet], f"character{number + 1:02d}")
                origin = f"TFDS omniglot {split} example {len(drawings)} in {os.fspath(builder.data_dir)}"
                drawings.append(omniglot.EncodedImage(character, image, origin))
        sources.append(drawings)
        records += [cache.file_record(path, pathlib.Path(path).name)
                    for path in builder.info.splits[split].filepaths]
    return omniglot.catalog_of(sources, records)


def load_omniglot_tfds(data_dir: Optional[cache.PathLike] = None, *, splits: Optional[Sequence[str]] = None,
                       download: bool = False, **options: Any) -> Splits:
    """Omniglot splits of rotation classes from TFDS's ``omniglot`` (`omniglot_catalog`; its
    arguments), the same as `hyper_repr.data.load_omniglot` gives for the same images;
    ``options`` are those of `hyper_repr.data.omniglot.load_catalog`.

    Raises:
        FileNotFoundError, ValueError: as `omniglot_catalog` and ``load_catalog``.

    Example:
        >>> splits = load_omniglot_tfds(splits=["small1", "small2"], test_alphabets=["Sanskrit", "Tagalog"],
        ...                             val_alphabets=["Early_Aramaic"])
    """
    return omniglot.load_catalog(omniglot_catalog(data_dir, splits=splits, download=download), **options)
