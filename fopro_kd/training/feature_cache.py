"""Teacher feature cache: compute the frozen (optionally prompted) teacher's features once.

A distillation target T(FPG(v(x))) depends on the image x, the teacher's view v of it and the
prompt. When the teacher and the prompt are frozen and the view comes from a finite set, every
target can be computed once and looked up afterwards, which turns an EKD or FoPro-KD epoch into
about a BSM epoch (the teacher forward, and for the prompt its backward, leave the loop).

The finite view sets (``augment.teacher_view``):

- ``clean``: one view, the un-augmented image;
- ``flips``: four views, the clean image and its horizontal, vertical and double flips, indexed
  ``hflip + 2 * vflip`` as drawn by :class:`~fopro_kd.data.transforms.BatchAugment` for the
  student, so the teacher sees the student's flips.

The targets are exact (the same tensor an online teacher forward computes, up to float16
storage when ``train.cache_dtype: float16``) for every view in the set. When the student's
augmentation also scales, rotates or jitters colours, the teacher's view is the flipped clean
image, not the student's view: that is a choice of target, documented in the README.
Which configurations may cache is decided by :func:`fopro_kd.config.feature_cache_problem`.

Two tiers: a process-level memo (a federated site rebuilds its trainer every round) and, with
``train.feature_cache_dir``, files on the site's disk, so a second run on the same images and
teacher (another seed, another λ, a resumed run) skips the teacher passes (on HAM10000 with four
flip views ≈ 10-15 min on 2 cores). A file is named by a digest of the memo key, *all* the
image bytes and the teacher's weight record (file hash), written to a temporary name and
renamed, and read back only when its stored key, shape and dtype match: a half-written or stale
file is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fopro_kd.data.dataset import ImageSet
from fopro_kd.data.transforms import resize_batch, to_float_on
from fopro_kd.models.teacher import FrozenTeacher
from fopro_kd.prompt import FourierPrompt
from fopro_kd.training.teacher_view import teacher_targets

__all__ = [
    "TeacherFeatureCache",
    "VIEW_COUNTS",
    "apply_flip_view",
    "cache_bytes",
    "cached_features",
    "clear_feature_caches",
    "feature_file",
]

logger = logging.getLogger("fopro_kd.training")
FEATURE_FILE_FORMAT = 1
"""Version of the on-disk layout (``{"format", "key", "view_set", "features"}``); others are rebuilt."""

VIEW_COUNTS = {"clean": 1, "flips": 4}
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def apply_flip_view(x: Tensor, views: Tensor) -> Tensor:
    """Flip each image of ``x`` (N, C, H, W) by its view index (bit 0: horizontal, bit 1: vertical)."""
    views = views.to(x.device).view(-1, 1, 1, 1)
    x = torch.where((views % 2) == 1, x.flip(-1), x)
    return torch.where((views // 2) == 1, x.flip(-2), x)


def cache_bytes(num_images: int, num_views: int, feature_dim: int, dtype: str) -> int:
    """Bytes the cache will hold (what ``train.max_cache_gb`` bounds)."""
    return num_images * num_views * feature_dim * torch.empty(0, dtype=_DTYPES[dtype]).element_size()


def check_cache_size(num_images: int, view_set: str, feature_dim: int, dtype: str, max_gb: float) -> int:
    """The cache's size in bytes; ``ValueError`` (before any teacher forward) above ``max_gb``."""
    num_views = VIEW_COUNTS[view_set]
    nbytes = cache_bytes(num_images, num_views, feature_dim, dtype)
    if nbytes > max_gb * 1e9:
        raise ValueError(
            f"the teacher feature cache would hold {nbytes / 1e9:.2f} GB ({num_images} images x {num_views} views x "
            f"{feature_dim} features, {dtype}), above train.max_cache_gb = {max_gb}; raise train.max_cache_gb, set "
            "train.cache_dtype: float16 or augment.teacher_view: clean"
        )
    return nbytes


class TeacherFeatureCache:
    """Features of ``teacher`` (after the frozen ``prompt``) on every image and view of ``data``.

    Parameters
    ----------
    teacher, prompt, domain : the teacher's view of a batch, as in the online path
        (:func:`~fopro_kd.training.teacher_view.teacher_targets`); ``prompt`` None for EKD.
    data : the site's training images (uint8), looked up by their index in ``data``.
    view_set : ``clean`` or ``flips`` (see the module docstring).
    dtype : ``float32`` or ``float16`` storage.
    max_gb : refuse (``ValueError``, before any teacher forward) a cache larger than this.
    pre_size : ``augment.teacher_view: student``: each view is first resized to the student's input size
        (after the flip, as the student's view is made), then by the teacher to its own.
    """

    def __init__(
        self,
        teacher: FrozenTeacher,
        data: ImageSet,
        batch_size: int,
        device: torch.device,
        prompt: FourierPrompt | None = None,
        domain: str = "raw",
        view_set: str = "clean",
        dtype: str = "float32",
        max_gb: float = 4.0,
        pre_size: int | None = None,
    ) -> None:
        if view_set not in VIEW_COUNTS:
            raise ValueError(f"teacher feature cache: view set must be one of {sorted(VIEW_COUNTS)}, got {view_set!r}")
        self.view_set = view_set
        check_cache_size(len(data), view_set, teacher.feature_dim, dtype, max_gb)
        features = torch.zeros(VIEW_COUNTS[view_set], len(data), teacher.feature_dim, dtype=_DTYPES[dtype])
        for start in range(0, len(data), batch_size):
            x = to_float_on(data.images[start : start + batch_size], device)
            for view in range(features.shape[0]):
                xv = apply_flip_view(x, torch.full((x.shape[0],), view)) if view else x
                if pre_size is not None:  # teacher_view 'student': the student's resolution, flipped first as online
                    xv = resize_batch(xv, pre_size)
                feats = teacher_targets(teacher, xv, prompt, domain).float().cpu()
                features[view, start : start + x.shape[0]] = feats.to(features.dtype)
        self.features: Tensor = features

    @classmethod
    def from_features(cls, features: Tensor, view_set: str) -> TeacherFeatureCache:
        """A cache around already computed ``features`` (views, images, dim), e.g. read from disk."""
        cache = cls.__new__(cls)
        cache.view_set, cache.features = view_set, features
        return cache

    @property
    def num_views(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.features.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes held (what ``train.max_cache_gb`` and the memo's bound count)."""
        return self.features.numel() * self.features.element_size()

    def lookup(self, indices: Tensor, views: Tensor | None = None) -> Tensor:
        """float32 targets of images ``indices`` in views ``views`` (None: view 0)."""
        indices = indices.cpu()
        if views is None or self.num_views == 1:
            return self.features[0].index_select(0, indices).float()
        return self.features[views.cpu().long(), indices].float()


# Process-level memo: a federated site builds a new trainer every round, but while its prompt,
# teacher and data are unchanged its cache is the same tensor. A simulation actor serves several
# sites (and a SuperNode process one): keep the most recent caches up to a byte bound.
_MEMO: OrderedDict[str, TeacherFeatureCache] = OrderedDict()
_MEMO_LOCK = threading.Lock()


def cache_key(teacher_key: tuple, prompt: FourierPrompt | None, data: ImageSet, *settings: object) -> str:
    """Digest of everything a cached target depends on: teacher, prompt parameters, images, settings."""
    digest = hashlib.sha256(repr((teacher_key, settings, len(data), tuple(data.images.shape))).encode())
    digest.update("\n".join(data.ids).encode())
    digest.update(data.images[:, :, ::7, ::7].contiguous().numpy().tobytes())  # a strided sample of the pixels
    if prompt is not None:
        for name, value in sorted(prompt.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def feature_file(directory: str | Path, key: str, data: ImageSet, teacher_record: str) -> Path:
    """Where the cache for ``key`` lives under ``directory``: a digest of the key, every image byte and the teacher.

    The memo key samples the pixels (it is computed every federated round); a file outlives the
    process, so its name covers all of them, and the teacher's weight record (with the file's
    SHA-256) so replaced weights under the same path never reuse old targets.
    """
    digest = hashlib.sha256(key.encode())
    digest.update(teacher_record.encode())
    digest.update(memoryview(data.images.contiguous().numpy()).cast("B"))
    return Path(directory).expanduser() / f"teacher-features-{digest.hexdigest()[:32]}.pt"


def _read_feature_file(path: Path, key: str) -> TeacherFeatureCache | None:
    """The stored cache when ``path`` holds exactly this key (it covers views, dtype, images and
    teacher) in a well-formed layout; else ``None`` (rebuild)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        features, view_set = stored["features"], stored["view_set"]
        if (stored.get("format") == FEATURE_FILE_FORMAT and stored.get("key") == key and features.ndim == 3
                and features.shape[0] == VIEW_COUNTS.get(view_set)):
            return TeacherFeatureCache.from_features(features, view_set)
        logger.warning("teacher feature file %s does not match this run; rebuilding it", path)
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is rebuilt, never fatal
        logger.warning("teacher feature file %s is unreadable (%s); rebuilding it", path, exc)
    return None


def _write_feature_file(path: Path, key: str, cache: TeacherFeatureCache) -> None:
    """Atomic write (temporary name, fsync, rename): a crash leaves no file that looks valid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        torch.save({"format": FEATURE_FILE_FORMAT, "key": key, "view_set": cache.view_set,
                    "features": cache.features}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def cached_features(
    key: str,
    build: Callable[[], TeacherFeatureCache],
    max_bytes: float,
    locate: Callable[[], Path] | None = None,
) -> TeacherFeatureCache:
    """The memoised cache for ``key``, built with ``build`` on a miss; least recent entries leave first.

    With ``locate`` (returning :func:`feature_file`'s path) a memo miss first tries that file and
    a build is written there. It is called on a miss only: the file name hashes every image
    byte, which a federated site's memo hit every round should not pay.
    """
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is not None:
            _MEMO.move_to_end(key)
            return hit
    cache = None
    file = None if locate is None else locate()
    if file is not None and file.is_file():
        cache = _read_feature_file(file, key)
        if cache is not None:
            logger.info("teacher features read from %s (%.0f MB)", file, cache.nbytes / 1e6)
    if cache is None:
        cache = build()
        if file is not None:
            _write_feature_file(file, key, cache)
            logger.info("teacher features written to %s (%.0f MB)", file, cache.nbytes / 1e6)
    with _MEMO_LOCK:
        _MEMO[key] = cache
        while len(_MEMO) > 1 and sum(c.nbytes for c in _MEMO.values()) > max_bytes:
            _MEMO.popitem(last=False)
    return cache


def clear_feature_caches() -> None:
    with _MEMO_LOCK:
        _MEMO.clear()
