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
``train.feature_cache_dir``, a per-image **store** on the site's disk: one file per teacher,
prompt and view setting (not per image set) that maps each image's content digest (SHA-256 of
its bytes) to its features in every view. A run looks its images up and runs the teacher only
on those the store lacks, then writes the union back. So another seed or λ on the same split
skips the teacher entirely, and so does every fold of a k-fold protocol after the first pass
over the data, or a federated site whose images a pooled run has seen (HAM10000, four flip
views: ≈ 10-15 min of teacher passes per image set on 2 cores). The store's name digests its
settings key and the teacher's weight record (file hash); it is written to a temporary name
and renamed, and read back only when its stored key, digests, shape and dtype agree: a
half-written or stale store is rebuilt, never used. Features are a function of the image
content, the frozen teacher and prompt and the view, so a stored entry is the exact target.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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
    "FeatureStore",
    "cached_features",
    "clear_feature_caches",
    "settings_key",
    "store_file",
]

logger = logging.getLogger("fopro_kd.training")
STORE_FORMAT = 2
"""Version of the on-disk store (``{"format", "key", "view_set", "digests", "features"}``); others are rebuilt."""

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
        # the one teacher pass of a run (minutes on CPU for HAM10000): said before, so a log does not look stuck
        logger.info("teacher features: computing %d images x %d view(s)%s", len(data), features.shape[0],
                    "" if prompt is None else " through the frozen prompt")
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


def settings_key(teacher_key: tuple, prompt: FourierPrompt | None, *settings: object) -> str:
    """Digest of what a target depends on besides the image: teacher, prompt parameters, view settings."""
    digest = hashlib.sha256(repr((teacher_key, settings)).encode())
    if prompt is not None:
        for name, value in sorted(prompt.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(teacher_key: tuple, prompt: FourierPrompt | None, data: ImageSet, *settings: object) -> str:
    """The memo key: :func:`settings_key` and the image set (ids, shape and a strided sample of the pixels)."""
    digest = hashlib.sha256(settings_key(teacher_key, prompt, *settings).encode())
    digest.update(repr((len(data), tuple(data.images.shape))).encode())
    digest.update("\n".join(data.ids).encode())
    digest.update(data.images[:, :, ::7, ::7].contiguous().numpy().tobytes())  # a strided sample of the pixels
    return digest.hexdigest()


def image_digests(data: ImageSet) -> list[str]:
    """SHA-256 of each image's bytes and shape: what a stored feature is looked up by."""
    images = data.images.contiguous().numpy()
    return [hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest() for image in images]


def store_file(directory: str | Path, key: str, teacher_record: str) -> Path:
    """Where the store for settings ``key`` lives under ``directory``, named with the teacher's weight record too,
    so replaced weights under the same path never reuse old targets."""
    digest = hashlib.sha256(key.encode())
    digest.update(teacher_record.encode())
    return Path(directory).expanduser() / f"teacher-store-{digest.hexdigest()[:32]}.pt"


@dataclass
class FeatureStore:
    """The disk tier of one setting: ``path`` holds features by image digest; ``build`` computes a subset's."""

    path: Path
    key: str
    view_set: str
    build: Callable[[ImageSet], TeacherFeatureCache]

    def _read(self) -> tuple[list[str], Tensor] | None:
        if not self.path.is_file():
            return None
        try:
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            digests, features = list(stored["digests"]), stored["features"]
            if (stored.get("format") == STORE_FORMAT and stored.get("key") == self.key
                    and stored.get("view_set") == self.view_set and features.ndim == 3
                    and features.shape[0] == VIEW_COUNTS[self.view_set] and features.shape[1] == len(digests)):
                return digests, features
            logger.warning("teacher feature store %s does not match this run; rebuilding it", self.path)
        except Exception as exc:  # noqa: BLE001 - a damaged store is rebuilt, never fatal
            logger.warning("teacher feature store %s is unreadable (%s); rebuilding it", self.path, exc)
        return None

    def _write(self, digests: list[str], features: Tensor) -> None:
        """Atomic write (temporary name, fsync, rename): a crash leaves no store that looks valid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as handle:
            torch.save({"format": STORE_FORMAT, "key": self.key, "view_set": self.view_set, "digests": digests,
                        "features": features}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def features_of(self, data: ImageSet) -> TeacherFeatureCache:
        """``data``'s cache: stored entries looked up, the teacher run on the others only, the union written back."""
        digests = image_digests(data)
        stored = self._read()
        known = {} if stored is None else {d: i for i, d in enumerate(stored[0])}
        missing = [i for i, d in enumerate(digests) if d not in known]
        found = [i for i, d in enumerate(digests) if d in known]
        new = self.build(data.subset(missing)) if missing else None
        reference = new.features if new is not None else stored[1]
        features = torch.empty(reference.shape[0], len(data), reference.shape[2], dtype=reference.dtype)
        if found:
            features[:, torch.as_tensor(found)] = stored[1][:, torch.as_tensor([known[digests[i]] for i in found])]
        if new is not None:
            features[:, torch.as_tensor(missing)] = new.features
            fresh = {digests[i]: k for k, i in enumerate(missing)}  # a repeated image is added once
            keep = list(fresh.values())
            old_digests, old_features = stored if stored is not None else ([], new.features[:, :0])
            self._write(old_digests + list(fresh), torch.cat([old_features, new.features[:, keep]], dim=1))
        logger.info("teacher features: %d of %d images from the store %s, %d computed", len(found), len(data),
                    self.path, len(missing))
        return TeacherFeatureCache.from_features(features, self.view_set)


def cached_features(
    key: str,
    build: Callable[[], TeacherFeatureCache],
    max_bytes: float,
    store: Callable[[], tuple[FeatureStore, ImageSet]] | None = None,
) -> TeacherFeatureCache:
    """The memoised cache for ``key``, built with ``build`` on a miss; least recent entries leave first.

    With ``store`` (returning the :class:`FeatureStore` and the images) a memo miss goes through
    the disk store instead of ``build``. It is called on a miss only: digesting every image is
    work a federated site's memo hit every round should not pay.
    """
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is not None:
            _MEMO.move_to_end(key)
            return hit
    if store is not None:
        disk, data = store()
        cache = disk.features_of(data)
    else:
        cache = build()
    with _MEMO_LOCK:
        _MEMO[key] = cache
        while len(_MEMO) > 1 and sum(c.nbytes for c in _MEMO.values()) > max_bytes:
            _MEMO.popitem(last=False)
    return cache


def clear_feature_caches() -> None:
    with _MEMO_LOCK:
        _MEMO.clear()
