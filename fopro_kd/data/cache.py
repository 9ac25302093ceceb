"""Decode image files once, resize them, and cache the uint8 result on disk.

Why: on 2 CPU cores decoding 10,000 JPEGs takes longer than a training epoch of a small
model. Every loader therefore decodes each file exactly once per (file list, size) and
stores the resulting ``(N, 3, S, S)`` uint8 array as a ``.npy`` file. The cache key covers
each file's path, size and modification time, so replacing or touching an image
invalidates the entry; nothing has to be cleared by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["decode_images", "default_cache_dir", "decode_one"]

logger = logging.getLogger("fopro_kd.data")

_CACHE_ENV = "FOPRO_KD_CACHE"
_CACHE_VERSION = 1  # bump when decoding changes, so stale entries are never reused
_DECODE_WORKERS = 2


def default_cache_dir() -> Path:
    """``$FOPRO_KD_CACHE`` when set, else ``~/.cache/fopro-kd``."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fopro-kd"


def decode_one(path: Path, image_size: int) -> np.ndarray:
    """Decode one image file to a (3, S, S) uint8 array (RGB, bilinear with antialiasing).

    Images are resized to a square without cropping, as DermaMNIST does: dermoscopy
    lesions are roughly centred and a crop would cut some of them.
    """
    with Image.open(path) as img:
        if img.format == "JPEG":
            # decode directly at a reduced scale (1/2, 1/4, 1/8) that is still >= the target size
            img.draft("RGB", (image_size, image_size))
        rgb = img.convert("RGB")
        if rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _cache_key(paths: Sequence[Path], image_size: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"fopro-kd-cache-v{_CACHE_VERSION}|{image_size}|{len(paths)}\n".encode())
    for path in paths:
        try:
            st = os.stat(path)
            digest.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{os.path.abspath(path)}|missing\n".encode())
    return digest.hexdigest()


def _cache_paths(cache_dir: Path, source: str, image_size: int, key: str) -> tuple[Path, Path]:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("_")[:40] or "images"
    stem = f"{slug}-{image_size}px-{key[:24]}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.unreadable.json"


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cache(array_path: Path, meta_path: Path, n: int, image_size: int) -> tuple[torch.Tensor, list[int]] | None:
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    try:
        unreadable = [int(i) for i in json.loads(meta_path.read_text())["unreadable"]]
        mapped = np.load(array_path, mmap_mode="r", allow_pickle=False)
        if mapped.shape != (n, 3, image_size, image_size) or mapped.dtype != np.uint8:
            raise ValueError(f"unexpected shape {mapped.shape} / dtype {mapped.dtype}")
        images = torch.from_numpy(np.array(mapped))  # a private, writable copy
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unusable cache entry %s (%s); decoding again", array_path, exc)
        return None
    return images, unreadable


def _write_cache(array_path: Path, meta_path: Path, images: np.ndarray, unreadable: list[int]) -> None:
    try:
        array_path.parent.mkdir(parents=True, exist_ok=True)
        # the sidecar first: an array without its sidecar is never considered a hit
        _atomic_write(meta_path, lambda h: h.write(json.dumps({"unreadable": unreadable}).encode()))
        _atomic_write(array_path, lambda h: np.save(h, images, allow_pickle=False))
    except OSError as exc:
        logger.warning("could not write the image cache %s (%s); continuing without it", array_path, exc)


def _decode_all(paths: Sequence[Path], image_size: int) -> tuple[np.ndarray, list[int], dict[int, str]]:
    out = np.zeros((len(paths), 3, image_size, image_size), dtype=np.uint8)
    errors: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            out[i] = decode_one(paths[i], image_size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "unreadable"
            errors[i] = f"{type(exc).__name__}: {exc}"

    # PIL releases the GIL while decoding and resizing, so threads use both cores
    with ThreadPoolExecutor(max_workers=_DECODE_WORKERS) as pool:
        list(pool.map(work, range(len(paths))))
    return out, sorted(errors), errors


def decode_images(
    paths: Sequence[Path],
    image_size: int,
    cache_dir: str | Path | None,
    max_unreadable_fraction: float,
    source: str,
) -> tuple[torch.Tensor, list[int]]:
    """Decode and resize image files to a uint8 (N, 3, S, S) tensor, through the disk cache.

    Parameters
    ----------
    paths : image files, in the order of the returned rows.
    image_size : square side ``S`` of the result.
    cache_dir : cache folder; ``None`` = :func:`default_cache_dir` (``$FOPRO_KD_CACHE`` or
        ``~/.cache/fopro-kd``).
    max_unreadable_fraction : fail when more than this fraction of the files cannot be
        decoded (``data.max_unreadable_fraction``).
    source : short name of the data source, used in the cache file name and in messages.

    Returns
    -------
    images : uint8 tensor (N, 3, S, S), contiguous; rows of unreadable files are zeros.
    unreadable : indices of the files that could not be decoded (callers drop these rows).

    Raises
    ------
    ValueError
        If the unreadable fraction exceeds ``max_unreadable_fraction`` (the message names
        the first files).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    paths = [Path(p) for p in paths]
    n = len(paths)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _cache_key(paths, image_size)
    array_path, meta_path = _cache_paths(root, source, image_size, key)

    cached = _load_cache(array_path, meta_path, n, image_size) if n else None
    if cached is not None:
        images, unreadable = cached
        reasons: dict[int, str] = {}
        logger.info("%s: loaded %d decoded images from cache %s", source, n, array_path)
    else:
        array, unreadable, reasons = _decode_all(paths, image_size)
        if n:
            _write_cache(array_path, meta_path, array, unreadable)
        images = torch.from_numpy(array)

    if unreadable:
        fraction = len(unreadable) / n
        shown = ", ".join(
            f"{paths[i].name}" + (f" ({reasons[i]})" if i in reasons else "") for i in unreadable[:5]
        )
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        if fraction > max_unreadable_fraction:
            raise ValueError(
                f"{source}: {len(unreadable)} of {n} images ({fraction:.1%}) could not be decoded, more than "
                f"data.max_unreadable_fraction={max_unreadable_fraction}: {shown}{more}. Replace or remove these "
                f"files, or raise data.max_unreadable_fraction to skip them."
            )
        logger.warning(
            "%s: skipping %d unreadable image(s) (%.1f%%, allowed by data.max_unreadable_fraction=%s): %s%s",
            source, len(unreadable), 100 * fraction, max_unreadable_fraction, shown, more,
        )
    return images.contiguous(), list(unreadable)
