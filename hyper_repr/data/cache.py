"""On-disk cache of decoded image arrays, keyed by a fingerprint of the source files.

A cached array is one ``.npy`` file named ``<dataset>-<fingerprint>.npy``, opened memory-mapped
(read-only), so a second load decodes nothing and reads pages only when episodes touch them. The
fingerprint hashes the names, sizes and modification times of the source files and the loader's
options (image size, format version): changing any of them selects a new file. Files are written
to a temporary name and renamed, so an interrupted or concurrent build never leaves a partial
cache under the final name.
"""

import hashlib
import os
import pathlib
import warnings
from typing import Callable, Iterable, Optional

import numpy as np

PathLike = str | os.PathLike


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/far_ho2``, or ``~/.cache/far_ho2`` when ``XDG_CACHE_HOME`` is unset.

    The cache lives outside the data folder, so read-only data folders can be cached.
    """
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "far_ho2"


def file_record(path: PathLike, name: Optional[str] = None) -> str:
    """``"<name>|<size in bytes>|<mtime in ns>"`` of a file (``name`` defaults to its path).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    stat = os.stat(path)
    return f"{name if name is not None else os.fspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def fingerprint(records: Iterable[str]) -> str:
    """First 20 hex digits of the SHA-256 of ``records``, one per line, in the given order."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.encode("utf-8") + b"\n")
    return digest.hexdigest()[:20]


def cache_file(dataset: str, key: str, *, use_cache: bool,
               cache_dir: Optional[PathLike]) -> Optional[pathlib.Path]:
    """``<cache_dir>/<dataset>-<key>.npy``; ``None`` when ``use_cache`` is False.

    Args:
        dataset: short name of the dataset and split, e.g. ``"omniglot"``.
        key: fingerprint of the sources and options (see `fingerprint`).
        use_cache: whether to cache at all.
        cache_dir: folder of the cache files. Defaults to `default_cache_dir()`.
    """
    if not use_cache:
        return None
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{dataset}-{key}.npy"


def cached_array(path: Optional[pathlib.Path], shape: tuple[int, ...], dtype: np.dtype,
                 fill: Callable[[np.ndarray], None]) -> np.ndarray:
    """The array ``fill`` writes, read from ``path`` when cached there, else built and cached.

    A cached file of another shape or dtype, or one that cannot be read, is rebuilt. If ``path``
    cannot be written (read-only folder), the array is built in memory and a warning says so.

    Args:
        path: cache file (see `cache_file`), or ``None`` to build in memory without caching.
        shape: shape of the array.
        dtype: dtype of the array.
        fill: ``fill(out)`` writes every element of ``out`` (an array of ``shape`` and ``dtype``).

    Returns:
        A read-only memory map of ``path``, or an in-memory array when not cached.
    """
    if path is None:
        return _filled(np.empty(shape, dtype), fill)
    if path.exists():
        try:
            cached = np.load(path, mmap_mode="r")
            if cached.shape == tuple(shape) and cached.dtype == dtype:
                return cached
        except (OSError, ValueError):
            pass
        warnings.warn(f"Rebuilding the unreadable or stale cache file {path}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=tuple(shape))
    except OSError as error:
        warnings.warn(f"Cannot write the cache file {path} ({error}); decoding in memory. Pass "
                      f"`cache_dir` a writable folder to cache the decoded images.")
        return _filled(np.empty(shape, dtype), fill)
    try:
        _filled(out, fill).flush()
        del out
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def _filled(out: np.ndarray, fill: Callable[[np.ndarray], None]) -> np.ndarray:
    fill(out)
    return out
