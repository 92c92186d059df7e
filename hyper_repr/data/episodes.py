"""N-way, k-shot, q-query episodes drawn from a split, as a seeded `tf.data` pipeline.

An episode draws N classes of the split without replacement, then k support and q query images of
each class; labels are the positions 0..N−1 of the classes in the draw. Episode i of a stream is a
pure function of ``(seed, i)`` (stateless TF random ops), so streams are reproducible, resumable at
any episode, and independent of tf.data's parallelism.

The pipeline runs no Python: it gathers from the split's images held as one uint8 tensor (read
when the pipeline is built, so an h5 split is read then) and converts to float32 per episode.
Python functions in tf.data (``numpy_function``, ``from_generator``) can deadlock the interpreter
at exit while the pipeline is still prefetching (tensorflow/tensorflow#21277).

Support and query images are disjoint (k + q distinct images per class). ``legacy_sampling=True``
reproduces ExperimentManager's sampler, which draws the support and the query images of a class
independently, so a support image can reappear in the query set (about 75% of support images do
for 20-image Omniglot classes with q = 15).
"""

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf


class Split(NamedTuple):
    """The classes of one split, images stored class by class.

    ``images`` is any array-like of shape [n_images, H, W, C] and dtype uint8 that `np.asarray`
    reads (np.ndarray, read-only np.memmap, h5py.Dataset); value 255 is 1.0 in episodes
    (Omniglot ink, full RGB intensity). Class c is the images ``class_starts[c]`` to
    ``class_starts[c + 1] − 1``.
    """

    images: Any  # [n_images, H, W, C] uint8, class-contiguous
    class_starts: np.ndarray  # [n_classes + 1] int64, increasing, from 0 to n_images
    class_names: tuple[str, ...]  # [n_classes]


class Splits(NamedTuple):
    """The meta-training, meta-validation and meta-test splits of a dataset (disjoint classes)."""

    train: Split
    val: Split
    test: Split


class Episode(NamedTuple):
    """One N-way episode; with a meta-batch, every field has a leading [meta_batch_size] axis."""

    support_x: Any  # [N·k, H, W, C] float32 in [0, 1]
    support_y: Any  # [N·k] int32 in 0..N−1, k of each, class by class
    query_x: Any  # [N·q, H, W, C] float32 in [0, 1]
    query_y: Any  # [N·q] int32 in 0..N−1, q of each, class by class


def split_from_array(images: np.ndarray, class_names: Optional[Sequence[str]] = None) -> Split:
    """The split of an array of [n_classes, n_per_class, H, W, C] uint8 images.

    Args:
        images: the images of class c are ``images[c]``.
        class_names: one name per class. Defaults to ``"0"``, ``"1"``, ….

    Raises:
        ValueError: if ``images`` is not 5-D uint8 or ``class_names`` has the wrong length.
    """
    images = np.asarray(images)
    if images.ndim != 5 or images.dtype != np.uint8:
        raise ValueError(f"`images` must be a uint8 array [n_classes, n_per_class, H, W, C], got "
                         f"{images.dtype} {images.shape}.")
    n_classes, per_class = images.shape[:2]
    names = tuple(str(c) for c in range(n_classes)) if class_names is None else tuple(class_names)
    if len(names) != n_classes:
        raise ValueError(f"`class_names` has {len(names)} names for {n_classes} classes.")
    starts = np.arange(n_classes + 1, dtype=np.int64) * per_class
    return Split(images.reshape((-1,) + images.shape[2:]), starts, names)


def check_episode_size(split: Split, *, ways: int, shots: int, queries: int,
                       legacy_sampling: bool = False, split_name: str = "the split",
                       names: Optional[Mapping[str, str]] = None) -> None:
    """Raises a ValueError unless every N-way episode of ``split`` can be drawn.

    Disjoint sampling needs k + q images in every class, legacy sampling max(k, q).

    ``split``, ``ways``, ``shots``, ``queries`` and ``legacy_sampling`` are as in `episode_dataset`.

    Args:
        split_name: what the messages call the split. Defaults to `"the split"`.
        names: what the messages call ``ways``, ``shots`` and ``queries`` (e.g. a launcher's
            flags). Defaults to `None`: the argument names.

    Raises:
        ValueError: naming the argument (``ways``, ``shots``, ``queries``) and the limit.
    """
    names = {k: f"`{k}`" for k in ("ways", "shots", "queries")} | dict(names or {})
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{names[name]} must be a positive int, got {value!r}.")
    counts = np.diff(split.class_starts)
    if ways > len(counts):
        raise ValueError(f"{names['ways']}={ways} exceeds the {len(counts)} classes of "
                         f"{split_name}; use at most {len(counts)} ways.")
    needed = max(shots, queries) if legacy_sampling else shots + queries
    smallest = int(np.argmin(counts))
    if counts[smallest] < needed:
        rule = "max(shots, queries)" if legacy_sampling else "shots + queries"
        raise ValueError(f"Class {split.class_names[smallest]!r} of {split_name} has "
                         f"{counts[smallest]} images, fewer than {rule} = {needed} "
                         f"({names['shots']}={shots}, {names['queries']}={queries}); lower "
                         f"{names['shots']} or {names['queries']}.")


def episode_indices(class_starts: np.ndarray, key: tf.Tensor, *, ways: int, shots: int,
                    queries: int, legacy_sampling: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Image indices of one episode: support [N·k] and query [N·q], class by class.

    With u ~ U(0, 1) drawn by stateless ops from ``key``:

        classes = argsort(u over the classes)[:N]            an ordered N-subset, uniformly
        drawn_c = argsort(u over the images of class c)[:m]   m distinct images, uniformly

    with m = k + q split into k support and q query images (disjoint), or, with
    ``legacy_sampling``, two independent draws of m = k and m = q.

    Args:
        class_starts: [n_classes + 1] class boundaries of the split (see `Split`).
        key: [2] int64 seed of the stateless random ops.

    Returns:
        ``(support, query)``: int64 indices into ``Split.images``; entries ``c·k .. c·k + k − 1``
        of ``support`` (``c·q ..`` of ``query``) are images of the c-th drawn class.
    """
    class_starts = np.asarray(class_starts, np.int64)
    counts = np.diff(class_starts)
    class_key, support_key, query_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    u = tf.random.stateless_uniform([len(counts)], seed=class_key)
    classes = tf.argsort(u)[:ways]
    starts = tf.gather(tf.constant(class_starts[:-1]), classes)
    in_class = tf.range(counts.max()) < tf.gather(tf.constant(counts), classes)[:, None]

    def draw(draw_key, m):
        u = tf.random.stateless_uniform([ways, counts.max()], seed=draw_key)
        drawn = tf.argsort(tf.where(in_class, u, 2.0), axis=1)[:, :m]  # 2.0 sorts out-of-class last
        return starts[:, None] + tf.cast(drawn, tf.int64)

    if legacy_sampling:
        support, query = draw(support_key, shots), draw(query_key, queries)
    else:
        drawn = draw(support_key, shots + queries)
        support, query = drawn[:, :shots], drawn[:, shots:]
    return tf.reshape(support, [-1]), tf.reshape(query, [-1])


def episode_dataset(split: Split, *, ways: int, shots: int, queries: int, seed: int,
                    meta_batch_size: Optional[int] = None, legacy_sampling: bool = False,
                    first_episode: int = 0, shift: int = 0) -> tf.data.Dataset:
    """Endless stream of episodes ``first_episode, first_episode + 1, …`` of the stream ``seed``.

    Episodes are built in parallel (deterministic order) and prefetched. The pipeline holds the
    split's images as one uint8 tensor (e.g. 0.8 GB for MiniImagenet's training split).

    Args:
        split: the classes to draw from.
        ways: N, classes per episode.
        shots: k, support images per class.
        queries: q, query images per class.
        seed: the stream; the same seed gives the same episodes.
        meta_batch_size: stack this many consecutive episodes on a leading axis. Defaults to
            `None` (single episodes, no leading axis).
        legacy_sampling: draw support and query independently, as FAR-HO / hyper-representation
            did (see the module docstring). Defaults to `False` (disjoint).
        first_episode: index of the first episode, e.g. ``iteration · meta_batch_size`` to
            resume meta-training without replaying earlier episodes. Defaults to `0`.
        shift: augmentation: translate every image by a random (dy, dx) ∈ [−shift, shift]²
            pixels, drawn from the episode's key (see `random_shift`). Defaults to `0` (none).

    Returns:
        A `tf.data.Dataset` of `Episode` tuples of float32 images and int32 labels.

    Raises:
        ValueError: if an episode cannot be drawn (see `check_episode_size`) or
            ``meta_batch_size`` is not a positive int.

    Example:
        >>> for support_x, support_y, query_x, query_y in episode_dataset(
        ...         splits.train, ways=5, shots=1, queries=15, seed=0, meta_batch_size=4).take(2):
        ...     print(support_x.shape)  # (4, 5, 28, 28, 1)
    """
    indices = tf.data.Dataset.counter(start=first_episode)
    return _episodes(split, indices, ways=ways, shots=shots, queries=queries, seed=seed,
                     meta_batch_size=meta_batch_size, legacy_sampling=legacy_sampling,
                     drop_remainder=True, shift=shift)


def evaluation_episodes(split: Split, *, ways: int, shots: int, queries: int,
                        num_episodes: int = 600, seed: int = 0,
                        meta_batch_size: Optional[int] = None,
                        legacy_sampling: bool = False) -> tf.data.Dataset:
    """The fixed evaluation set: episodes 0..num_episodes − 1 of the stream ``seed``.

    The same arguments give the same episodes in every call and every run, so scores are
    comparable (hyper-representation's ``main.py`` drew new evaluation episodes each time).
    These are the first episodes of ``episode_dataset(split, seed=seed, …)``.

    Args:
        num_episodes: number of episodes. Defaults to `600` (hyper-representation's default).
        seed: the stream. Defaults to `0`.
        meta_batch_size: stack this many episodes on a leading axis; the last batch is smaller
            when it does not divide ``num_episodes``. Defaults to `None` (single episodes).

    ``ways``, ``shots``, ``queries`` and ``legacy_sampling`` are as in `episode_dataset`.

    Returns:
        A finite `tf.data.Dataset` of `Episode` tuples.

    Raises:
        ValueError: as `episode_dataset`, or if ``num_episodes`` is not a positive int.
    """
    if not isinstance(num_episodes, (int, np.integer)) or num_episodes < 1:
        raise ValueError(f"`num_episodes` must be a positive int, got {num_episodes!r}.")
    indices = tf.data.Dataset.range(num_episodes)
    return _episodes(split, indices, ways=ways, shots=shots, queries=queries, seed=seed,
                     meta_batch_size=meta_batch_size, legacy_sampling=legacy_sampling,
                     drop_remainder=False)


def image_batches(split: Split, *, batch_size: int, seed: int,
                  first_batch: int = 0) -> tf.data.Dataset:
    """Endless stream of batches ``first_batch, first_batch + 1, …`` of ``batch_size`` distinct
    images of ``split`` drawn uniformly, with their class numbers as labels (the 'multiclass'
    multitask training of hyper_repr.model). Batch i is a pure function of ``(seed, i)``:

        u ~ U(0, 1)^n_images (stateless, key (seed, i)),   batch = sort(argsort(u)[:batch_size])

    Args:
        split: the classes to draw from.
        batch_size: images per batch (at most the split's image count).
        seed: the stream.
        first_batch: index of the first batch (to resume). Defaults to `0`.

    Returns:
        A `tf.data.Dataset` of (images [batch_size, H, W, C] float32 in [0, 1], labels
        [batch_size] int32).

    Raises:
        ValueError: if ``batch_size`` is not a positive int at most the number of images.
    """
    count = int(split.class_starts[-1])
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or not 0 < batch_size <= count):
        raise ValueError(f"`batch_size` must be a positive int ≤ {count} (the images of the split), "
                         f"got {batch_size!r}.")
    images = tf.convert_to_tensor(np.asarray(split.images))
    class_starts = tf.constant(np.asarray(split.class_starts, np.int64)[1:-1])

    def to_batch(index):
        u = tf.random.stateless_uniform([count], seed=tf.stack([tf.constant(seed, tf.int64), index]))
        drawn = tf.sort(tf.cast(tf.argsort(u)[:batch_size], tf.int64))
        labels = tf.searchsorted(class_starts, drawn, side="right", out_type=tf.int32)
        return _pixels(images, drawn), labels

    batches = tf.data.Dataset.counter(start=first_batch).map(
        to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(tf.data.AUTOTUNE)


def _episodes(split: Split, indices: tf.data.Dataset, *, ways: int, shots: int, queries: int,
              seed: int, meta_batch_size: Optional[int], legacy_sampling: bool,
              drop_remainder: bool, shift: int = 0) -> tf.data.Dataset:
    """Maps episode indices to episodes, then batches (``drop_remainder`` gives a static
    meta-batch axis) and prefetches."""
    check_episode_size(split, ways=ways, shots=shots, queries=queries,
                       legacy_sampling=legacy_sampling)
    if meta_batch_size is not None and (not isinstance(meta_batch_size, (int, np.integer))
                                        or meta_batch_size < 1):
        raise ValueError(f"`meta_batch_size` must be a positive int or None, "
                         f"got {meta_batch_size!r}.")
    if not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an int, got {seed!r}.")
    if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)) or shift < 0:
        raise ValueError(f"`shift` must be a non-negative int, got {shift!r}.")

    images = tf.convert_to_tensor(np.asarray(split.images))  # reads an h5 split here
    support_y = tf.repeat(tf.range(ways, dtype=tf.int32), shots)
    query_y = tf.repeat(tf.range(ways, dtype=tf.int32), queries)

    def to_episode(index):
        key = tf.stack([tf.constant(seed, tf.int64), index])
        support, query = episode_indices(split.class_starts, key, ways=ways, shots=shots,
                                         queries=queries, legacy_sampling=legacy_sampling)
        support_x, query_x = _pixels(images, support), _pixels(images, query)
        if shift:
            support_key, query_key = tf.unstack(tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(key, 1), 2))
            support_x = random_shift(support_x, shift, support_key)
            query_x = random_shift(query_x, shift, query_key)
        return Episode(support_x, support_y, query_x, query_y)

    episodes = indices.map(to_episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if meta_batch_size is not None:
        episodes = episodes.batch(meta_batch_size, drop_remainder=drop_remainder)
    return episodes.prefetch(tf.data.AUTOTUNE)


def random_shift(images: tf.Tensor, shift: int, key: tf.Tensor) -> tf.Tensor:
    """Each image of ``images`` [n, H, W, C] translated by its own (dy, dx) ~ U{−s … s}², drawn
    from the stateless ``key``; pixels shifted in are 0 (background):

        out[i, y, x] = padded[i, y + s + dy_i, x + s + dx_i],   padded = images with s zeros around
    """
    n, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
    offsets = tf.random.stateless_uniform([n, 2], seed=key, minval=0, maxval=2 * shift + 1,
                                          dtype=tf.int32)
    padded = tf.pad(images, [[0, 0], [shift, shift], [shift, shift], [0, 0]])
    rows = offsets[:, :1] + tf.range(height)[None]  # [n, H] rows of padded
    cols = offsets[:, 1:] + tf.range(width)[None]  # [n, W]
    return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def _pixels(images: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    """``images[indices]`` as float32 in [0, 1]."""
    return tf.cast(tf.gather(images, indices), tf.float32) / 255.0
