"""MiniImagenet (Vinyals et al., 2016) in the Ravi & Larochelle split, from local files.

``data_dir`` holds one of two layouts:

    train.h5, val.h5, test.h5        dataset ``X``: uint8 [n, 84, 84, 3], classes in contiguous
                                      blocks of 600 images (class = index // 600), as distributed
                                      for hyper-representation (no class names: "train/000", …)
    train.csv, val.csv, test.csv     header ``filename,label``; images ``images/<filename>`` of
    + images/                         any size and format `tf.io.decode_image` reads, resized to
                                      84 × 84 × 3 (bilinear, antialiased); classes sorted by label

The h5 files are read lazily: a split's ``images`` is the open ``h5py.Dataset``, read (as uint8)
only when an episode pipeline is built on it. CSV images are decoded once into a memory-mapped
uint8 cache file (see `hyper_repr.data.cache`), keyed by the CSV and the images' names, sizes and
mtimes. Images stay uint8 and become float32 in [0, 1] per episode.

References:
    Vinyals et al., NeurIPS 2016, arXiv:1606.04080; Ravi & Larochelle, ICLR 2017 (the split).
"""

import csv
import os
import pathlib
from typing import Optional, Sequence

import h5py
import numpy as np
import tensorflow as tf

from hyper_repr.data import cache
from hyper_repr.data.episodes import Split, Splits

SPLITS = ("train", "val", "test")
IMAGES_PER_CLASS = 600
_CACHE_FORMAT = "mini_imagenet-v1"  # change when the decoding changes, to invalidate caches


def h5_split(path: pathlib.Path, *, image_size: int, images_per_class: int) -> Split:
    """The split in ``path``, not read yet: ``images`` is the open ``h5py.Dataset`` ``X``.

    Raises:
        FileNotFoundError: if ``path`` is missing.
        ValueError: if ``path`` is not HDF5, or ``X`` is missing, not uint8
            [n, image_size, image_size, 3], or n is not a positive multiple of
            ``images_per_class``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"The MiniImagenet file {os.fspath(path)!r} is missing (the h5 "
                                f"layout needs {', '.join(s + '.h5' for s in SPLITS)}).")
    try:
        images = h5py.File(path, "r").get("X")
    except OSError as error:
        raise ValueError(f"Cannot read {os.fspath(path)!r} as HDF5: {error}.") from None
    expected = (image_size, image_size, 3)
    if not isinstance(images, h5py.Dataset):
        raise ValueError(f"{os.fspath(path)!r} has no dataset 'X' of images.")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"Dataset 'X' in {os.fspath(path)!r} must be uint8 [n, "
                         f"{', '.join(map(str, expected))}], got {images.dtype} {images.shape}.")
    n_classes, remainder = divmod(images.shape[0], images_per_class)
    if n_classes == 0 or remainder:
        raise ValueError(f"Dataset 'X' in {os.fspath(path)!r} has {images.shape[0]} images, not a "
                         f"positive multiple of `images_per_class`={images_per_class}.")
    names = tuple(f"{path.stem}/{c:03d}" for c in range(n_classes))
    return Split(images, np.arange(n_classes + 1, dtype=np.int64) * images_per_class, names)


def read_csv(path: pathlib.Path) -> list[tuple[str, str]]:
    """The ``(filename, label)`` rows of a split CSV, sorted by label (stable).

    Raises:
        FileNotFoundError: if ``path`` is missing.
        ValueError: if the header is not ``filename,label``, a row has not two fields, or there
            are no rows.
    """
    if not path.is_file():
        raise FileNotFoundError(f"The MiniImagenet split file {os.fspath(path)!r} is missing (the "
                                f"CSV layout needs {', '.join(s + '.csv' for s in SPLITS)} and "
                                f"images/).")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [field.strip() for field in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{os.fspath(path)!r} must start with the header 'filename,label', got "
                         f"{rows[0] if rows else 'an empty file'}.")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise ValueError(f"Line {line} of {os.fspath(path)!r} has {len(row)} fields, "
                             f"expected 2 (filename,label): {row}.")
    if len(rows) == 1:
        raise ValueError(f"{os.fspath(path)!r} lists no images.")
    return sorted(((name.strip(), label.strip()) for name, label in rows[1:]),
                  key=lambda row: row[1])


def decode_image(path: pathlib.Path, image_size: int) -> np.ndarray:
    """``path`` as uint8 [image_size, image_size, 3], resized bilinearly with antialiasing.

    Raises:
        ValueError: naming ``path`` if it cannot be decoded.
    """
    try:
        pixels = tf.io.decode_image(path.read_bytes(), channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        raise ValueError(f"Cannot decode the MiniImagenet image {os.fspath(path)!r}: corrupt, or "
                         f"not a JPEG, PNG, GIF, BMP or WebP file.") from None
    resized = tf.image.resize(pixels, (image_size, image_size), antialias=True)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def csv_split(csv_path: pathlib.Path, image_dir: pathlib.Path, *, image_size: int,
              use_cache: bool, cache_dir: Optional[cache.PathLike]) -> Split:
    """The split listed in ``csv_path``, decoded once into a memory-mapped cache.

    Raises:
        FileNotFoundError: if the CSV or an image it names is missing (naming both).
        ValueError: as `read_csv` and `decode_image`.
    """
    rows = read_csv(csv_path)
    files = [image_dir / name for name, _ in rows]
    records = [_CACHE_FORMAT, f"image_size={image_size}",
               cache.file_record(csv_path, csv_path.name)]
    for (name, _), file in zip(rows, files):
        try:
            records.append(cache.file_record(file, name))
        except FileNotFoundError:
            raise FileNotFoundError(f"The image {os.fspath(file)!r} named in "
                                    f"{os.fspath(csv_path)!r} is missing.") from None
    path = cache.cache_file(f"mini_imagenet_{csv_path.stem}", cache.fingerprint(records),
                            use_cache=use_cache, cache_dir=cache_dir)
    images = cache.cached_array(path, (len(files), image_size, image_size, 3), np.uint8,
                                lambda out: _decode_all(files, image_size, out))
    names, counts = np.unique([label for _, label in rows], return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Split(images, starts, tuple(str(name) for name in names))


def _decode_all(files: Sequence[pathlib.Path], image_size: int, out: np.ndarray) -> None:
    for i, file in enumerate(files):
        out[i] = decode_image(file, image_size)


def load_mini_imagenet(data_dir: cache.PathLike, *, image_size: int = 84,
                       images_per_class: int = IMAGES_PER_CLASS, use_cache: bool = True,
                       cache_dir: Optional[cache.PathLike] = None) -> Splits:
    """MiniImagenet train, val and test splits (see the module docstring for the layouts).

    The h5 layout is used when any ``<split>.h5`` exists, else the CSV layout.

    Args:
        data_dir: folder holding one of the layouts.
        image_size: side of the square images; h5 files must already have it. Defaults to `84`.
        images_per_class: size of the class blocks in h5 files. Defaults to `600`.
        use_cache: cache the decoded CSV images. Defaults to `True`.
        cache_dir: folder of the cache. Defaults to `None`: `cache.default_cache_dir()`.

    Returns:
        `Splits` of uint8 [n_images, image_size, image_size, 3] images.

    Raises:
        FileNotFoundError: if ``data_dir``, a split file or an image is missing, or ``data_dir``
            holds neither layout.
        ValueError: for a malformed h5 or CSV file or a corrupt image (naming the file).

    Example:
        >>> splits = load_mini_imagenet("datasets/mini_imagenet")
        >>> len(splits.train.class_names)  # 64
    """
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"The MiniImagenet folder `data_dir`={os.fspath(data_dir)!r} does "
                                f"not exist or is not a folder.")
    for name, value in (("image_size", image_size), ("images_per_class", images_per_class)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if any((data_dir / f"{split}.h5").exists() for split in SPLITS):
        return Splits(*(h5_split(data_dir / f"{split}.h5", image_size=image_size,
                                 images_per_class=images_per_class) for split in SPLITS))
    if any((data_dir / f"{split}.csv").exists() for split in SPLITS):
        image_dir = data_dir / "images"
        if not image_dir.is_dir():
            raise FileNotFoundError(f"The MiniImagenet image folder {os.fspath(image_dir)!r} is "
                                    f"missing (the CSV layout reads images/<filename>).")
        return Splits(*(csv_split(data_dir / f"{split}.csv", image_dir, image_size=image_size,
                                  use_cache=use_cache, cache_dir=cache_dir) for split in SPLITS))
    raise FileNotFoundError(f"No MiniImagenet data in {os.fspath(data_dir)!r}: expected "
                            f"train.h5, val.h5 and test.h5 (dataset 'X', uint8 [n, 84, 84, 3]), "
                            f"or train.csv, val.csv, test.csv (filename,label) and images/.")
