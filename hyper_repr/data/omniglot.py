"""Omniglot (Lake et al., 2015) from local files, as rotation-augmented few-shot splits.

``data_dir`` holds any of these sources (nothing is downloaded):

    images_background[.zip], images_evaluation[.zip],              the official release, 105×105
    images_background_small1[.zip], images_background_small2[.zip]   its minimal splits
    omniglot_resized[.zip]                                           MAML's tree, already 28×28

each laid out as ``<source>/<Alphabet>/<character>/<drawing>.png`` (black ink on white), read
from the zip without extracting or from the extracted folder. A character found in several
sources (Greek and Latin are in both minimal splits) is taken once, from the first source in the
order above (a folder before its zip).

TensorFlow Datasets' ``omniglot`` (its splits train, test, small1 and small2: the four sources
above, in that order of precedence) is read by `hyper_repr.data.tfds_source`; it keeps the PNG
files' bytes, so that its catalog (`Catalog` of `EncodedImage`) gives the same arrays as these
files.

Each image becomes ink = 1 − pixel/255, area-resized to image_size × image_size × 1 and stored
as uint8 (255 = ink 1.0; episodes divide by 255). A character's drawings are ordered by their
pixels (descending lexicographic order of the uint8 ink images, row by row), an order of the
images themselves: TFDS does not keep the file names. Each character at 0°, 90°, 180° and 270°
(counterclockwise, exact `np.rot90`) is four classes. ExperimentManager rotated cumulatively
with scipy, so its ``rot_180``/``rot_270`` keys held 270°/180°; that mislabelling is not ported.

Characters are split before rotation, so the four rotations of a character share a split. The
split depends only on the sorted (alphabet, character) names and the seed, never on file-system
order: either by counts (1200/100/323 of the 1623 characters, the standard split) after a
``RandomState(seed)`` shuffle, or by held-out alphabets.

References:
    Lake, Salakhutdinov & Tenenbaum, Science 350(6266), 2015 (github.com/brendenlake/omniglot).
    Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400 (the ``omniglot_resized`` tree).
"""

import contextlib
import os
import pathlib
import zipfile
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from hyper_repr.data import cache
from hyper_repr.data.episodes import Split, Splits

SOURCES = ("images_background", "images_evaluation", "images_background_small1",
           "images_background_small2", "omniglot_resized")
STANDARD_SPLIT_SIZES = (1200, 100, 323)  # characters: train, val, test (1623 in all)
ROTATIONS = 4  # 0°, 90°, 180°, 270°
_CACHE_FORMAT = "omniglot-v2"  # change when the arrays change (decoding, order), to invalidate caches


class ImageFile(NamedTuple):
    """One drawing: a PNG file, or a member of a zip."""

    character: tuple[str, str]  # (alphabet, character)
    path: str  # the PNG file, or the zip holding it
    member: Optional[str]  # path inside the zip; None for a PNG file

    def where(self) -> str:
        """The file, for messages: ``path`` or ``"member" in path``."""
        return self.path if self.member is None else f"{self.member!r} in {self.path}"


class EncodedImage(NamedTuple):
    """One drawing's PNG bytes, read already (a TFDS example)."""

    character: tuple[str, str]  # (alphabet, character)
    data: bytes
    origin: str  # where it was read, for messages

    def where(self) -> str:
        """The example, for messages."""
        return self.origin


class Catalog(NamedTuple):
    """The de-duplicated drawings of a data source, character by character."""

    characters: tuple[tuple[str, str], ...]  # sorted (alphabet, character) names
    images: tuple[ImageFile | EncodedImage, ...]  # class-contiguous, in `characters` order
    class_starts: np.ndarray  # [n_characters + 1] boundaries of each character in `images`
    records: tuple[str, ...]  # names, sizes and mtimes of the source files (the cache key)


def catalog_of(sources: Iterable[Sequence[ImageFile | EncodedImage]], records: Sequence[str]) -> Catalog:
    """The `Catalog` of the drawings of ``sources`` (in precedence order): each character's
    drawings from the first source holding it, in that source's order; characters sorted."""
    by_character: dict[tuple[str, str], list[ImageFile | EncodedImage]] = {}
    for drawings in sources:
        found: dict[tuple[str, str], list[ImageFile | EncodedImage]] = {}
        for image in drawings:
            found.setdefault(image.character, []).append(image)
        for character, images in found.items():
            by_character.setdefault(character, images)
    characters = tuple(sorted(by_character))
    counts = [len(by_character[c]) for c in characters]
    return Catalog(characters, tuple(image for c in characters for image in by_character[c]),
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), tuple(records))


def find_sources(data_dir: pathlib.Path) -> list[pathlib.Path]:
    """The Omniglot folders and zips in ``data_dir``, in precedence order (see module docstring).

    Raises:
        FileNotFoundError: if ``data_dir`` is not a folder, or holds none of the sources.
    """
    if not data_dir.is_dir():
        raise FileNotFoundError(f"The Omniglot folder `data_dir`={os.fspath(data_dir)!r} does not "
                                f"exist or is not a folder.")
    candidates = [data_dir / f"{name}{suffix}" for name in SOURCES for suffix in ("", ".zip")]
    sources = [path for path in candidates
               if path.is_dir() or path.suffix == ".zip" and path.is_file()]
    if not sources:
        expected = ", ".join(f"{name}[.zip]" for name in SOURCES)
        raise FileNotFoundError(f"No Omniglot data in {os.fspath(data_dir)!r}: expected one or "
                                f"more of {expected}, each laid out as "
                                f"<source>/<Alphabet>/<character>/<drawing>.png.")
    return sources


def list_source(source: pathlib.Path, data_dir: pathlib.Path) -> tuple[list[ImageFile], list[str]]:
    """The drawings of one source, and the records of its files (see `cache.file_record`).

    Raises:
        ValueError: if ``source`` is a corrupt zip or holds no PNG in the expected layout.
    """
    if source.is_dir():
        files = sorted(source.glob("*/*/*.png"))
        images = [ImageFile((f.parent.parent.name, f.parent.name), os.fspath(f), None)
                  for f in files]
        records = [cache.file_record(f, os.fspath(f.relative_to(data_dir))) for f in files]
    else:
        try:
            with zipfile.ZipFile(source) as archive:
                members = sorted(archive.namelist())
        except zipfile.BadZipFile as error:
            raise ValueError(f"Cannot read the Omniglot zip {os.fspath(source)!r}: "
                             f"{error}.") from None
        parts = [(m, m.split("/")) for m in members]
        images = [ImageFile((p[1], p[2]), os.fspath(source), m) for m, p in parts
                  if len(p) == 4 and p[3].endswith(".png")]
        records = [cache.file_record(source, source.name)]
    if not images:
        layout = f"{source.name.removesuffix('.zip')}/<Alphabet>/<character>/<drawing>.png"
        raise ValueError(f"The Omniglot source {os.fspath(source)!r} holds no PNG laid out as "
                         f"{layout}.")
    return images, records


def catalog(data_dir: pathlib.Path) -> Catalog:
    """The drawings in ``data_dir``, each character taken from the first source holding it.

    Raises:
        FileNotFoundError, ValueError: as `find_sources` and `list_source`.
    """
    listed = [list_source(source, data_dir) for source in find_sources(data_dir)]
    return catalog_of([images for images, _ in listed], [r for _, records in listed for r in records])


def decode_png(data: bytes, image_size: int, where: str) -> np.ndarray:
    """Ink image [image_size, image_size, 1] uint8 = round(255·area_resize(1 − pixel/255)).

    Raises:
        ValueError: naming ``where`` if ``data`` is not a PNG image.
    """
    try:
        pixels = tf.io.decode_png(data, channels=1)
    except tf.errors.InvalidArgumentError:
        raise ValueError(f"Cannot decode the Omniglot image {where}: corrupt, or not a PNG "
                         f"file.") from None
    ink = 1.0 - tf.cast(pixels, tf.float32) / 255.0
    resized = tf.image.resize(ink, (image_size, image_size), method="area")
    return np.round(resized.numpy() * 255.0).astype(np.uint8)


def decode_images(images: Sequence[ImageFile | EncodedImage], image_size: int, out: np.ndarray) -> None:
    """Writes `decode_png` of ``images[i]`` to ``out[i]``, opening each zip once.

    Raises:
        ValueError: naming the file (and the path inside the zip) of a corrupt image.
    """
    with contextlib.ExitStack() as stack:
        archives: dict[str, zipfile.ZipFile] = {}
        for i, image in enumerate(images):
            if isinstance(image, EncodedImage):
                data = image.data
            elif image.member is None:
                data = pathlib.Path(image.path).read_bytes()
            else:
                if image.path not in archives:
                    archives[image.path] = stack.enter_context(zipfile.ZipFile(image.path))
                try:
                    data = archives[image.path].read(image.member)
                except (zipfile.BadZipFile, OSError) as error:
                    raise ValueError(f"Cannot read the Omniglot image {image.where()}: "
                                     f"{error}.") from None
            out[i] = decode_png(data, image_size, image.where())


def sort_drawings(images: np.ndarray, class_starts: np.ndarray) -> None:
    """Orders each character's drawings in ``images`` (in place) by their pixels: descending
    lexicographic order of the bytes of each image (row-major), so that the same images give the
    same array whatever order they were read in; equal images are interchangeable."""
    for start, stop in zip(class_starts[:-1], class_starts[1:]):
        drawings = images[start:stop]
        order = sorted(range(len(drawings)), key=lambda i: drawings[i].tobytes(), reverse=True)
        drawings[:] = drawings[order]


def split_characters(characters: Sequence[tuple[str, str]], *,
                     split_sizes: Optional[Sequence[int]] = None,
                     test_alphabets: Optional[Iterable[str]] = None,
                     val_alphabets: Optional[Iterable[str]] = None,
                     val_characters: Optional[int] = None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train, val and test indices into ``characters`` (each sorted).

    With ``test_alphabets`` or ``val_alphabets``, the characters of those alphabets are test
    (val), the rest train; ``val_characters`` instead of ``val_alphabets`` draws that many
    validation characters from the training alphabets (``RandomState(seed)``), so that every
    alphabet not held out for test is seen in training. Otherwise
    ``np.random.RandomState(seed).permutation`` of the sorted characters is cut into
    ``split_sizes`` (default `STANDARD_SPLIT_SIZES`).

    Args:
        characters: sorted (alphabet, character) names.
        split_sizes: numbers of train, val and test characters, summing to ``len(characters)``.
        test_alphabets: alphabets held out for meta-testing.
        val_alphabets: alphabets held out for meta-validation.
        val_characters: validation characters drawn from the non-test alphabets.
        seed: seed of the shuffle and of the ``val_characters`` draw.

    Raises:
        ValueError: if the sizes do not sum to the number of characters (the message gives it),
            an alphabet is unknown or in both lists, or sizes and alphabets are both given.
    """
    alphabets = np.array([a for a, _ in characters])
    if val_characters is not None and test_alphabets is None:
        raise ValueError("`val_characters` needs `test_alphabets`; otherwise use `split_sizes`.")
    if test_alphabets is not None or val_alphabets is not None:
        if split_sizes is not None:
            raise ValueError("Give either `split_sizes` or `test_alphabets`/`val_alphabets`, "
                             "not both.")
        test = _alphabet_mask(alphabets, test_alphabets, "test_alphabets")
        val = _alphabet_mask(alphabets, val_alphabets, "val_alphabets")
        if np.any(test & val):
            both = sorted(set(alphabets[test & val].tolist()))
            raise ValueError(f"Alphabets {both} are in both `test_alphabets` and `val_alphabets`.")
        if val_characters is not None:
            if val_alphabets is not None:
                raise ValueError("Give either `val_alphabets` or `val_characters`, not both.")
            rest = np.flatnonzero(~test)
            if not isinstance(val_characters, (int, np.integer)) or not 0 < val_characters < len(rest):
                raise ValueError(f"`val_characters` must be an int in 1 … {len(rest) - 1} (the "
                                 f"{len(rest)} non-test characters), got {val_characters!r}.")
            val[np.random.RandomState(seed).choice(rest, val_characters, replace=False)] = True
        return np.flatnonzero(~test & ~val), np.flatnonzero(val), np.flatnonzero(test)
    sizes = tuple(STANDARD_SPLIT_SIZES if split_sizes is None else split_sizes)
    if len(sizes) != 3 or any(not isinstance(s, (int, np.integer)) or s < 0 for s in sizes):
        raise ValueError(f"`split_sizes` must be three non-negative ints (train, val, test), "
                         f"got {split_sizes!r}.")
    if sum(sizes) != len(characters):
        raise ValueError(f"Found {len(characters)} Omniglot characters, but `split_sizes`={sizes} "
                         f"sums to {sum(sizes)}. Give sizes summing to {len(characters)}, or "
                         f"hold out alphabets with `test_alphabets`/`val_alphabets`.")
    order = np.random.RandomState(seed).permutation(len(characters))
    cuts = np.cumsum(sizes)[:2]
    return tuple(np.sort(part) for part in np.split(order, cuts))


def _alphabet_mask(alphabets: np.ndarray, names: Optional[Iterable[str]],
                   argument: str) -> np.ndarray:
    if names is None:
        return np.zeros(len(alphabets), bool)
    if isinstance(names, str):
        raise ValueError(f"`{argument}` must be a list of alphabet names, got the string "
                         f"{names!r}; write [{names!r}].")
    unknown = sorted(set(names) - set(alphabets))
    if unknown:
        raise ValueError(f"`{argument}` names unknown alphabets {unknown}; the data has "
                         f"{sorted(set(alphabets.tolist()))}.")
    return np.isin(alphabets, list(names))


def rotated_split(images: np.ndarray, class_starts: np.ndarray,
                  characters: Sequence[tuple[str, str]], selected: np.ndarray) -> Split:
    """The split of characters ``selected``, each at 0°, 90°, 180° and 270° (4 classes).

    Class 4·i + r is ``characters[selected[i]]`` rotated by 90·r° counterclockwise, named
    ``"<alphabet>/<character>/rot<90·r>"``.
    """
    blocks, names, counts = [], [], []
    for c in selected:
        drawings = images[class_starts[c]:class_starts[c + 1]]
        for r in range(ROTATIONS):
            blocks.append(np.rot90(drawings, r, axes=(1, 2)))
            names.append(f"{characters[c][0]}/{characters[c][1]}/rot{90 * r:03d}")
            counts.append(len(drawings))
    shape = (0,) + tuple(images.shape[1:])
    rotated = np.concatenate(blocks) if blocks else np.zeros(shape, np.uint8)
    return Split(rotated, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), tuple(names))


def load_omniglot(data_dir: cache.PathLike, **options: Any) -> Splits:
    """Omniglot train, val and test splits of rotation classes from the files in ``data_dir``
    (see the module docstring); ``options`` are those of `load_catalog`.

    Raises:
        FileNotFoundError: if ``data_dir`` is missing or holds no Omniglot source.
        ValueError: for a corrupt image or zip (naming it), or a split that does not fit.

    Example:
        >>> splits = load_omniglot("data/omniglot", test_alphabets=["Sanskrit", "Tagalog"],
        ...                        val_alphabets=["Korean"])
        >>> len(splits.test.class_names)  # 4 rotations × Sanskrit and Tagalog characters
    """
    return load_catalog(catalog(pathlib.Path(data_dir)), **options)


def load_catalog(found: Catalog, *, split_sizes: Optional[Sequence[int]] = None,
                 test_alphabets: Optional[Iterable[str]] = None,
                 val_alphabets: Optional[Iterable[str]] = None,
                 val_characters: Optional[int] = None, seed: int = 0, image_size: int = 28,
                 use_cache: bool = True, cache_dir: Optional[cache.PathLike] = None) -> Splits:
    """Omniglot train, val and test splits of rotation classes of the drawings of ``found`` (a
    data folder's `catalog`, or TFDS's: `hyper_repr.data.tfds_source`).

    Decoded images are cached (see `hyper_repr.data.cache`), keyed by the source files and
    ``image_size``; the split is recomputed at every load, so it is not part of the key.

    Args:
        found: the drawings.
        split_sizes: train, val and test character counts. Defaults to `None`:
            `STANDARD_SPLIT_SIZES`, unless alphabets are held out.
        test_alphabets: alphabets held out for test (the rest is train). Defaults to `None`.
        val_alphabets: alphabets held out for validation. Defaults to `None`.
        val_characters: with ``test_alphabets``, this many validation characters drawn from the
            other alphabets instead of ``val_alphabets``. Defaults to `None`.
        seed: seed of the count split and of the ``val_characters`` draw. Defaults to `0`.
        image_size: side of the square images. Defaults to `28`.
        use_cache: read and write the decoded-image cache. Defaults to `True`.
        cache_dir: folder of the cache. Defaults to `None`: `cache.default_cache_dir()`.

    Returns:
        `Splits` of uint8 [n_images, image_size, image_size, 1] ink images (255 = ink).

    Raises:
        ValueError: for a corrupt image (naming it), or a split that does not fit.
    """
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"`image_size` must be a positive int, got {image_size!r}.")
    parts = split_characters(found.characters, split_sizes=split_sizes,
                             test_alphabets=test_alphabets, val_alphabets=val_alphabets,
                             val_characters=val_characters, seed=seed)

    def fill(out: np.ndarray) -> None:
        decode_images(found.images, image_size, out)
        sort_drawings(out, found.class_starts)
    key = cache.fingerprint(found.records + (_CACHE_FORMAT, f"image_size={image_size}"))
    path = cache.cache_file("omniglot", key, use_cache=use_cache, cache_dir=cache_dir)
    images = cache.cached_array(path, (len(found.images), image_size, image_size, 1), np.uint8, fill)
    return Splits(*(rotated_split(images, found.class_starts, found.characters, part)
                    for part in parts))
