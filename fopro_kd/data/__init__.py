"""Data: loaders for every supported format, group-aware splits, batch transforms and batching.

:func:`build_splits` turns a validated :class:`~fopro_kd.config.Config` into the
train / val / test :class:`DatasetSplits` of one task, whatever the source format, so the
training code never branches on the data kind.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..config import Config, ConfigError
from .batches import BatchLoader, iterate_batches
from .dataset import DatasetSplits, ImageSet
from .loaders import (
    apply_split_file,
    load_ham10000,
    load_imagefolder,
    load_isic2019_lt,
    load_medmnist_npz,
    read_split_file,
)
from .splits import (
    balanced_group_split,
    check_splits,
    concat_imagesets,
    kfold_group_split,
    long_tail_subsample,
    stratified_group_split,
)
from .synthetic import SCANNER_STYLES, long_tail_counts, make_synthetic_imageset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, BatchAugment, normalize, resize_batch, to_float, to_float_on

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SCANNER_STYLES",
    "BatchAugment",
    "BatchLoader",
    "DatasetSplits",
    "ImageSet",
    "build_splits",
    "iterate_batches",
    "long_tail_counts",
    "make_synthetic_imageset",
    "normalize",
    "resize_batch",
    "to_float",
    "to_float_on",
]

logger = logging.getLogger("fopro_kd.data")


def _derived_seed(seed: int, purpose: str) -> int:
    """A seed for ``purpose`` that differs from ``seed`` and from other purposes' seeds."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:4], "little")


def _required_path(value: str | None, field: str, kind: str, base: Path | None = None) -> Path:
    if not value:
        raise FileNotFoundError(f"{field} must be set for data.kind={kind!r}")
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.exists():
        raise FileNotFoundError(f"{field} = {value!r}: path not found ({path})")
    return path


def _synthetic(cfg: Config) -> dict[str, ImageSet]:
    d = cfg.data
    counts = long_tail_counts(d.max_per_class, d.num_classes, d.imbalance_factor)
    common = dict(image_size=d.image_size, domain="hospital", style=d.site_style)
    return {
        "train": make_synthetic_imageset(counts, seed=d.synthetic_seed, id_prefix="train", **common),
        "val": make_synthetic_imageset([cfg.split.val_per_class] * d.num_classes,
                                       seed=_derived_seed(d.synthetic_seed, "val"), id_prefix="val", **common),
        "test": make_synthetic_imageset([cfg.split.test_per_class] * d.num_classes,
                                        seed=_derived_seed(d.synthetic_seed, "test"), id_prefix="test", **common),
    }


def _rename_classes(parts: dict[str, ImageSet], names: list[str], kind: str) -> dict[str, ImageSet]:
    """Give the classes the human names of ``data.class_names`` (label index i -> ``names[i]``).

    MedMNIST files and ImageFolder trees with numbered folders carry only indices, so every
    table and plot would say ``"0"``, ``"1"``. The number of names must equal the number of
    classes the files define: a shorter or longer list means the names belong to another data
    set (or the index order is misunderstood), and is refused naming the field.
    """
    found = parts["train"].class_names
    if len(names) != len(found):
        raise ConfigError(
            f"'data.class_names' lists {len(names)} names {list(names)} but the {kind} data has {len(found)} classes "
            f"(labels 0..{len(found) - 1}, currently named {found}); give exactly one name per label index, in index order"
        )
    logger.info("data.class_names: %s", ", ".join(f"{old} -> {new}" for old, new in zip(found, names)))
    renamed = {}
    for split, part in parts.items():
        renamed[split] = ImageSet(images=part.images, labels=part.labels, class_names=list(names), ids=part.ids,
                                  groups=part.groups, sites=part.sites)
    return renamed


def _split_pool(pool: ImageSet, cfg: Config) -> dict[str, ImageSet]:
    """Split one pool of images by ``cfg.split.mode`` (a split file is handled by the caller)."""
    s = cfg.split
    if s.mode == "balanced":
        idx = balanced_group_split(pool, s.val_per_class, s.test_per_class, s.max_holdout_fraction, s.seed)
    elif s.mode == "stratified":
        idx = stratified_group_split(pool, s.val_fraction, s.test_fraction, s.seed)
    elif s.mode == "kfold":
        idx = kfold_group_split(pool, s.folds, s.fold, s.val_per_class, s.max_holdout_fraction, s.seed)
    else:
        raise ValueError(
            f"split.mode='predefined' needs data.split_file (a CSV with columns image_id,split) for "
            f"data.kind={cfg.data.kind!r}; set it or use split.mode 'balanced' or 'stratified'"
        )
    return {name: pool.subset(i) for name, i in zip(("train", "val", "test"), idx)}


def build_splits(cfg: Config) -> DatasetSplits:
    """Load ``cfg.data`` and split it by ``cfg.split`` into checked train / val / test sets.

    Sources by ``data.kind``: ``synthetic`` (long-tailed train, balanced val/test from derived
    seeds), ``ham10000`` and ``imagefolder`` (one pool split by ``split.mode``),
    ``isic2019_lt`` (the three protocol CSVs) and ``medmnist`` (the npz's own splits).
    ``split.mode: kfold`` pools a kind's own splits and cross-validates over all images. A
    ``data.split_file`` overrides the split of any kind; ``split.train_imbalance_factor``
    then long-tail subsamples the training split.

    Raises
    ------
    FileNotFoundError
        A required path is unset or missing (the message names the config field).
    ValueError
        Unusable data or splits (see :func:`~fopro_kd.data.splits.check_splits`).
    """
    d = cfg.data
    info: dict = {"kind": d.kind, "image_size": d.image_size, "sources": {}}
    loader_args = dict(
        image_size=d.image_size, cache_dir=d.cache_dir, max_unreadable_fraction=d.max_unreadable_fraction
    )
    parts: dict[str, ImageSet] | None = None
    pool: ImageSet | None = None

    if d.kind == "synthetic":
        parts = _synthetic(cfg)
        info["sources"] = {"synthetic_seed": d.synthetic_seed, "site_style": d.site_style}
        info["split_mode"] = "synthetic"
    elif d.kind == "ham10000":
        root = _required_path(d.root, "data.root", d.kind)
        csv = _required_path(d.metadata_csv, "data.metadata_csv", d.kind) if d.metadata_csv else None
        pool = load_ham10000(root, csv, **loader_args)
        info["sources"] = {"root": str(root), "metadata_csv": str(csv) if csv else "default"}
    elif d.kind == "imagefolder":
        root = _required_path(d.root, "data.root", d.kind)
        pool = load_imagefolder(root, **loader_args)
        info["sources"] = {"root": str(root)}
    elif d.kind == "isic2019_lt":
        root = _required_path(d.root, "data.root", d.kind)
        csvs = {name: _required_path(getattr(d, f"{name}_csv"), f"data.{name}_csv", d.kind)
                for name in ("train", "val", "test")}
        parts = load_isic2019_lt(root, csvs["train"], csvs["val"], csvs["test"], **loader_args)
        info["sources"] = {"root": str(root), **{f"{k}_csv": str(v) for k, v in csvs.items()}}
        info["split_mode"] = "predefined (csv)"
    elif d.kind == "medmnist":
        base = Path(d.root).expanduser() if d.root else None
        npz = _required_path(d.npz_file, "data.npz_file", d.kind, base)
        parts = load_medmnist_npz(npz, d.image_size)
        info["sources"] = {"npz_file": str(npz)}
        info["split_mode"] = "predefined (npz)"
    else:  # the config's Literal type makes this unreachable for validated configs
        raise ValueError(f"unknown data.kind {d.kind!r}")

    if d.split_file:
        split_path = _required_path(d.split_file, "data.split_file", d.kind)
        if pool is None and parts is not None:
            pool = concat_imagesets([parts["train"], parts["val"], parts["test"]])
        parts = apply_split_file(pool, read_split_file(split_path), d.kind)
        info["sources"]["split_file"] = str(split_path)
        info["split_mode"] = "split_file"
    elif cfg.split.mode == "kfold":
        # k-fold cross-validates over every image: kinds with their own splits are pooled first
        if pool is None and parts is not None:
            pool = concat_imagesets([parts["train"], parts["val"], parts["test"]])
        parts = _split_pool(pool, cfg)
        info["split_mode"] = f"kfold (fold {cfg.split.fold} of {cfg.split.folds}, split.seed {cfg.split.seed})"
    elif pool is not None:
        parts = _split_pool(pool, cfg)
        info["split_mode"] = cfg.split.mode
    if pool is not None:
        info["pool_size"] = len(pool)

    if d.class_names is not None:
        parts = _rename_classes(parts, d.class_names, d.kind)
        info["class_names_from"] = "data.class_names"

    if cfg.split.train_imbalance_factor is not None:
        before = len(parts["train"])
        keep = long_tail_subsample(parts["train"].labels.numpy(), cfg.split.train_imbalance_factor, cfg.split.seed)
        parts["train"] = parts["train"].subset(keep)
        info["train_imbalance_factor"] = cfg.split.train_imbalance_factor
        logger.info("%s: long-tail subsampled train %d -> %d images (IF %s)", d.kind, before, len(keep),
                    cfg.split.train_imbalance_factor)

    splits = DatasetSplits(train=parts["train"], val=parts["val"], test=parts["test"], name=d.kind, info=info)
    info["counts"] = splits.summary()
    info["sizes"] = {name: len(getattr(splits, name)) for name in ("train", "val", "test")}
    check_splits(splits)
    return splits

