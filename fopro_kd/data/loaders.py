"""Loaders for the supported on-disk formats; each returns decoded uint8 :class:`ImageSet` s.

Formats: HAM10000 (metadata CSV + JPEG folder), the ISIC-2019-LT split CSVs of the FoPro-KD
paper, a torchvision ``ImageFolder`` tree, MedMNIST ``.npz`` files, and a split file
(``image_id,split``) that fixes train/val/test of any of them. A hospital's data rarely
matches a format exactly, so every problem (missing column, unknown label, missing or
unreadable image) is reported with the file, the row or value, and how to fix it; missing
images are counted and reported instead of stopping the run, unless none are left.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import decode_images
from .dataset import ImageSet

__all__ = [
    "HAM10000_CLASSES",
    "ISIC2019_LT_CLASSES",
    "IMAGE_EXTENSIONS",
    "SPLIT_NAMES",
    "apply_split_file",
    "load_ham10000",
    "load_imagefolder",
    "load_isic2019_lt",
    "load_medmnist_npz",
    "read_split_file",
]

logger = logging.getLogger("fopro_kd.data")

HAM10000_CLASSES: list[str] = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
"""HAM10000 ``dx`` values in label order: alphabetical, which is also DermaMNIST's order."""

ISIC2019_LT_CLASSES: list[str] = ["NV", "MEL", "BCC", "BKL", "AK", "SCC", "VASC", "DF"]
"""ISIC-2019-LT labels 0..7 (the ``finding`` column, re-indexed by frequency)."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


# --------------------------------------------------------------------------- helpers


def _read_csv(path: Path, required: Sequence[str], what: str) -> list[dict[str, str]]:
    """Read a CSV into dict rows, checking that the required columns exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; found columns {columns}. The {what} needs the columns "
                f"{list(required)}."
            )
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return rows


def _image_dir(root: Path) -> Path:
    """``root/images`` when it exists (a dataset folder was given), else ``root`` itself."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return root / "images" if (root / "images").is_dir() else root


def _list_files(folder: Path) -> set[str]:
    """File names in ``folder`` (one directory listing instead of one ``stat`` per image)."""
    with os.scandir(folder) as entries:
        return {e.name for e in entries if e.is_file()}


def _decode_rows(
    paths: list[Path],
    labels: list[int],
    ids: list[str],
    groups: list[str] | None,
    class_names: list[str],
    image_size: int,
    cache_dir: str | Path | None,
    max_unreadable_fraction: float,
    source: str,
) -> ImageSet:
    """Decode the files and build an :class:`ImageSet` without the unreadable rows."""
    images, unreadable = decode_images(paths, image_size, cache_dir, max_unreadable_fraction, source)
    labels_t = torch.tensor(labels, dtype=torch.int64)
    if unreadable:
        keep = np.setdiff1d(np.arange(len(paths)), np.asarray(unreadable, dtype=np.int64))
        keep_t = torch.from_numpy(keep)
        images = images.index_select(0, keep_t).contiguous()
        labels_t = labels_t.index_select(0, keep_t)
        ids = [ids[i] for i in keep.tolist()]
        groups = None if groups is None else [groups[i] for i in keep.tolist()]
    return ImageSet(images=images, labels=labels_t, class_names=list(class_names), ids=ids, groups=groups)


def _report_missing(source: str, missing: list[str], total: int, folder: Path) -> None:
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        logger.warning("%s: %d of %d listed images are missing from %s (skipped): %s",
                       source, len(missing), total, folder, shown)


# --------------------------------------------------------------------------- HAM10000


def _default_ham_csv(root: Path, image_dir: Path) -> Path:
    candidates = [root / "HAM10000_metadata.csv", image_dir / "HAM10000_metadata.csv",
                  image_dir.parent / "HAM10000_metadata.csv"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"HAM10000 metadata CSV not found; looked for {[str(c) for c in dict.fromkeys(candidates)]}. "
        f"Set data.metadata_csv to the CSV's path."
    )


def load_ham10000(
    root: Path,
    metadata_csv: Path | None,
    image_size: int,
    cache_dir: str | Path | None,
    max_unreadable_fraction: float,
) -> ImageSet:
    """Load HAM10000 (or any subset of its metadata CSV) as one :class:`ImageSet`.

    Parameters
    ----------
    root : folder of ``<image_id>.jpg`` files, or the dataset folder holding ``images/``.
    metadata_csv : CSV with columns ``image_id``, ``dx`` (label) and ``lesion_id`` (group);
        ``None`` looks for ``HAM10000_metadata.csv`` in ``root`` and beside the image folder.
    image_size, cache_dir, max_unreadable_fraction : see :func:`~fopro_kd.data.cache.decode_images`.

    Returns
    -------
    ImageSet
        Labels in :data:`HAM10000_CLASSES` order (alphabetical = DermaMNIST order),
        ``groups`` = ``lesion_id`` so that splits never separate images of one lesion.
    """
    root = Path(root)
    image_dir = _image_dir(root)
    csv_path = Path(metadata_csv) if metadata_csv is not None else _default_ham_csv(root, image_dir)
    rows = _read_csv(csv_path, ("image_id", "dx", "lesion_id"), "HAM10000 metadata CSV")
    index = {name: i for i, name in enumerate(HAM10000_CLASSES)}
    present = _list_files(image_dir)
    paths, labels, ids, groups, missing, seen = [], [], [], [], [], set()
    for line, row in enumerate(rows, start=2):
        image_id, dx = row["image_id"], row["dx"]
        if dx not in index:
            raise ValueError(
                f"{csv_path}, line {line}: dx={dx!r} is not a HAM10000 class; expected one of {HAM10000_CLASSES}"
            )
        if image_id in seen:
            raise ValueError(f"{csv_path}, line {line}: image_id {image_id!r} is listed twice")
        seen.add(image_id)
        if f"{image_id}.jpg" not in present:
            missing.append(image_id)
            continue
        paths.append(image_dir / f"{image_id}.jpg")
        labels.append(index[dx])
        ids.append(image_id)
        groups.append(row["lesion_id"] or image_id)
    if not paths:
        raise FileNotFoundError(
            f"none of the {len(rows)} images listed in {csv_path} were found in {image_dir} (expected "
            f"<image_id>.jpg files); check data.root"
        )
    _report_missing("ham10000", missing, len(rows), image_dir)
    return _decode_rows(paths, labels, ids, groups, HAM10000_CLASSES, image_size, cache_dir,
                        max_unreadable_fraction, "ham10000")


# --------------------------------------------------------------------------- ISIC-2019-LT


def load_isic2019_lt(
    root: Path,
    train_csv: Path,
    val_csv: Path,
    test_csv: Path,
    image_size: int,
    cache_dir: str | Path | None,
    max_unreadable_fraction: float,
) -> dict[str, ImageSet]:
    """Load the ISIC-2019-LT protocol: one CSV per split with columns ``image`` and ``finding``.

    Images are ``<root>/<image>.jpg`` (or ``<root>/images/<image>.jpg``). Ids whose image is
    missing are counted, reported per split and skipped, so a partial copy of ISIC 2019 (for
    example only its HAM10000 part) still loads.

    Returns
    -------
    dict
        ``{"train", "val", "test"} -> ImageSet`` with classes :data:`ISIC2019_LT_CLASSES`.
    """
    image_dir = _image_dir(Path(root))
    present = _list_files(image_dir)
    out: dict[str, ImageSet] = {}
    for split, csv_path in (("train", train_csv), ("val", val_csv), ("test", test_csv)):
        csv_path = Path(csv_path)
        rows = _read_csv(csv_path, ("image", "finding"), f"ISIC-2019-LT {split} CSV")
        paths, labels, ids, missing = [], [], [], []
        for line, row in enumerate(rows, start=2):
            value = row["finding"]
            try:
                label = int(float(value))
                if label != float(value):
                    raise ValueError
            except ValueError:
                label = -1
            if not 0 <= label < len(ISIC2019_LT_CLASSES):
                raise ValueError(
                    f"{csv_path}, line {line}: finding={value!r} is not a label in 0..{len(ISIC2019_LT_CLASSES) - 1} "
                    f"({', '.join(f'{i}={c}' for i, c in enumerate(ISIC2019_LT_CLASSES))})"
                )
            if f"{row['image']}.jpg" not in present:
                missing.append(row["image"])
                continue
            paths.append(image_dir / f"{row['image']}.jpg")
            labels.append(label)
            ids.append(row["image"])
        if not paths:
            raise FileNotFoundError(
                f"none of the {len(rows)} images listed in {csv_path} were found in {image_dir} (expected "
                f"<image>.jpg files); check data.root"
            )
        _report_missing(f"isic2019_lt {split}", missing, len(rows), image_dir)
        out[split] = _decode_rows(paths, labels, ids, None, ISIC2019_LT_CLASSES, image_size, cache_dir,
                                  max_unreadable_fraction, f"isic2019_lt-{split}")
    return out


# --------------------------------------------------------------------------- ImageFolder


def load_imagefolder(
    root: Path,
    image_size: int,
    cache_dir: str | Path | None,
    max_unreadable_fraction: float,
) -> ImageSet:
    """Load a torchvision ``ImageFolder`` tree ``root/<class>/<image>.{jpg,jpeg,png,bmp}``.

    Class names are the sorted sub-folder names (as torchvision does). An empty class folder
    is kept as a class and reported, so every hospital can share the same class list even
    when it lacks a class. Ids are ``<class>/<file stem>``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root not found: {root} (check data.root)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected the layout root/<class>/<image>.jpg")
    paths, labels, ids, empty = [], [], [], []
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            empty.append(name)
        for path in files:
            paths.append(path)
            labels.append(label)
            ids.append(f"{name}/{path.stem}")
    if not paths:
        raise ValueError(
            f"{root}: no images with extensions {IMAGE_EXTENSIONS} in any class folder ({classes}); expected the "
            f"layout root/<class>/<image>.jpg"
        )
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{root}: files with the same name but different extensions: {dup}; keep one of each")
    if empty:
        logger.warning("imagefolder %s: class folder(s) without images: %s", root, empty)
    return _decode_rows(paths, labels, ids, None, classes, image_size, cache_dir, max_unreadable_fraction,
                        f"imagefolder-{root.name}")


# --------------------------------------------------------------------------- MedMNIST


def _resize_uint8(images: np.ndarray, image_size: int) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.shape[-1] == image_size and x.shape[-2] == image_size:
        return x.contiguous()
    out = torch.empty((x.shape[0], 3, image_size, image_size), dtype=torch.uint8)
    antialias = image_size < x.shape[-1]
    for start in range(0, x.shape[0], 1024):  # chunks bound the float32 working memory
        chunk = x[start:start + 1024].float()
        chunk = F.interpolate(chunk, size=(image_size, image_size), mode="bilinear", align_corners=False,
                              antialias=antialias)
        out[start:start + 1024] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_medmnist_npz(path: Path, image_size: int) -> dict[str, ImageSet]:
    """Load a MedMNIST ``.npz`` (``{train,val,test}_{images,labels}``) with its predefined splits.

    Grayscale ``(N, H, W)`` images are replicated to 3 channels, ``(N, H, W, 3)`` are RGB;
    labels ``(N, 1)`` or ``(N,)``. Multi-label files (e.g. ChestMNIST) are rejected since
    the tasks here are single-label. Class names are ``"0".."C-1"`` with ``C`` the largest
    label + 1 over all splits. Ids are ``<split>_<index>``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {path} (check data.npz_file)")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {}
        for split in SPLIT_NAMES:
            for kind in ("images", "labels"):
                key = f"{split}_{kind}"
                if key not in npz.files:
                    raise ValueError(f"{path}: missing array {key!r}; found {sorted(npz.files)}")
                arrays[key] = npz[key]
    labels: dict[str, np.ndarray] = {}
    for split in SPLIT_NAMES:
        lab = arrays[f"{split}_labels"]
        if lab.ndim == 2 and lab.shape[1] == 1:
            lab = lab[:, 0]
        if lab.ndim != 1:
            raise ValueError(
                f"{path}: {split}_labels has shape {lab.shape}; expected (N,) or (N, 1) single-label targets "
                f"(multi-label MedMNIST sets are not supported)"
            )
        if lab.size and (lab.min() < 0 or not np.issubdtype(lab.dtype, np.integer)):
            raise ValueError(f"{path}: {split}_labels must be non-negative integers, got dtype {lab.dtype}, "
                             f"min {lab.min()}")
        labels[split] = lab.astype(np.int64)
    num_classes = int(max(int(lab.max()) if lab.size else -1 for lab in labels.values())) + 1
    class_names = [str(i) for i in range(num_classes)]
    out: dict[str, ImageSet] = {}
    for split in SPLIT_NAMES:
        images = arrays[f"{split}_images"]
        if images.ndim == 3:
            images = np.repeat(images[:, None], 3, axis=1)
        elif images.ndim == 4 and images.shape[-1] == 3:
            images = images.transpose(0, 3, 1, 2)
        else:
            raise ValueError(f"{path}: {split}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 3)")
        if images.dtype != np.uint8:
            raise ValueError(f"{path}: {split}_images must be uint8, got {images.dtype}")
        if images.shape[0] != labels[split].shape[0]:
            raise ValueError(f"{path}: {split}_images has {images.shape[0]} images but {split}_labels has "
                             f"{labels[split].shape[0]} labels")
        out[split] = ImageSet(
            images=_resize_uint8(images, image_size),
            labels=torch.from_numpy(labels[split]),
            class_names=list(class_names),
            ids=[f"{split}_{i}" for i in range(images.shape[0])],
        )
    return out


# --------------------------------------------------------------------------- split files


def read_split_file(path: Path) -> dict[str, str]:
    """Read a split file: a CSV with columns ``image_id`` and ``split`` (train / val / test).

    Returns
    -------
    dict
        ``image_id -> split``.
    """
    path = Path(path)
    rows = _read_csv(path, ("image_id", "split"), "split file")
    mapping: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        image_id, split = row["image_id"], row["split"].lower()
        if not image_id:
            raise ValueError(f"{path}, line {line}: empty image_id")
        if split not in SPLIT_NAMES:
            raise ValueError(f"{path}, line {line}: split={row['split']!r} is not one of {list(SPLIT_NAMES)}")
        if image_id in mapping:
            raise ValueError(f"{path}, line {line}: image_id {image_id!r} is listed twice")
        mapping[image_id] = split
    if not mapping:
        raise ValueError(f"{path}: the split file has no rows")
    return mapping


def apply_split_file(data: ImageSet, split_map: dict[str, str], source: str) -> dict[str, ImageSet]:
    """Split ``data`` by a split file's ``image_id -> split`` mapping.

    Images not named in the file are dropped, and ids in the file that are not in ``data``
    are ignored; both are counted in a log message, since either usually means the file
    belongs to another copy of the data.

    Raises
    ------
    ValueError
        If a split ends up empty.
    """
    buckets: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    unlisted = 0
    for i, image_id in enumerate(data.ids):
        split = split_map.get(image_id)
        if split is None:
            unlisted += 1
        else:
            buckets[split].append(i)
    known = set(data.ids)
    absent = sum(1 for image_id in split_map if image_id not in known)
    if unlisted:
        logger.warning("%s: %d of %d images are not in the split file and are dropped", source, unlisted, len(data))
    if absent:
        logger.warning("%s: %d ids of the split file are not in the data (missing images?)", source, absent)
    for name, idx in buckets.items():
        if not idx:
            raise ValueError(
                f"{source}: split {name!r} is empty after applying the split file ({len(split_map)} ids, "
                f"{len(split_map) - absent} found in the data); check that its image_id values match the data's ids"
            )
    return {name: data.subset(np.asarray(idx, dtype=np.int64)) for name, idx in buckets.items()}
