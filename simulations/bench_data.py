"""``bench data``: images/s of the training data pipeline on HAM10000 vs the training step rate.

The pipeline is what :class:`~fopro_kd.training.trainer.LocalTrainer` runs before every
step: :class:`~fopro_kd.data.batches.BatchLoader` (an ``index_select`` on the decoded
uint8 tensor) + ``to_float`` + :class:`~fopro_kd.data.transforms.BatchAugment` (the skin
augmentation, on tensors) + ``resize_batch`` to the student size. Decoding happens once
(``build_splits``, through the on-disk uint8 cache), so "after the first epoch" the
pipeline never touches a JPEG; the first load (cold decode or cache read) is reported apart.

The step rate is the FoPro-KD training step of ``configs/ham10000-lt.yaml`` (ResNet-18
student at 64 px, MobileNetV2 teacher at the data size, augmentation on), measured
interleaved with the pipeline. Skipped, with a message, when HAM10000 is absent.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fopro_kd.config import load_config
from fopro_kd.data import BatchAugment, BatchLoader, build_splits, resize_batch, to_float_on
from fopro_kd.data.cache import default_cache_dir
from fopro_kd.run_plan import student_input_size
from fopro_kd.data.dataset import ImageSet
from fopro_kd.training.components import build_models, shared_teacher
from fopro_kd.training.trainer import LocalTrainer
from simulations.bench_common import REPO_ROOT, format_table, measure_interleaved, target

logger = logging.getLogger("fopro_kd.bench")

DEFAULT_HAM = REPO_ROOT.parent / "shared" / "data" / "ham10000"
MOBILENET_FILE = REPO_ROOT.parent / "shared" / "weights" / "mobilenetv2_100_imagenet_keras_int8_timm.pth"


def _npy_files(folder: Path) -> set[Path]:
    return set(folder.glob("*.npy")) if folder.is_dir() else set()


def _subset_csv(csv_path: Path, n: int, out_dir: Path) -> Path:
    """The first ``n`` rows of each class of the metadata CSV (quick mode: a tiny, still long-tailed set)."""
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    per_class: dict[str, int] = {}
    keep = []
    for row in rows:
        if per_class.get(row["dx"], 0) < n:
            keep.append(row)
            per_class[row["dx"]] = per_class.get(row["dx"], 0) + 1
    out = out_dir / "HAM10000_metadata_subset.csv"
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    return out


def _pipeline(data: ImageSet, batch: int, batches: int, augment: BatchAugment, student_size: int,
              device: torch.device, full: bool = True):
    """A callable running ``batches`` batches of the pipeline (``full=False``: the loader only)."""
    loader = BatchLoader(data, batch, shuffle=True, seed=0, drop_last=False)
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        done = 0
        while done < batches:
            for images, labels, _ in loader:
                if full:
                    x = to_float_on(images, device)
                    x = augment(x, generator)
                    resize_batch(x, student_size)
                    labels.to(device)
                done += 1
                if done >= batches:
                    break

    return run


def bench_size(ham_root: Path, csv_path: Path, size: int, batch: int, pipe_batches: int, step_batches: int,
               warmup: int, repeats: int, device: torch.device, cache_dir: Path | None,
               extra: list[str] | None = None) -> dict[str, Any]:
    overrides = [
        f"data.root={ham_root / 'images'}", f"data.metadata_csv={csv_path}", f"data.image_size={size}",
        f"teacher.input_size={size}", f"train.batch_size={batch}",
        f"student.input_size={min(64, size)}",
    ]
    overrides += list(extra or [])
    if cache_dir is not None:
        overrides.append(f"data.cache_dir={cache_dir}")
    if not MOBILENET_FILE.is_file():
        overrides += ["teacher.source=none"]
    else:
        overrides += [f"teacher.file={MOBILENET_FILE}"]
    cfg = load_config(REPO_ROOT / "configs" / "ham10000-lt.yaml", overrides)
    cache_folder = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
    before = _npy_files(cache_folder)
    start = time.perf_counter()
    splits = build_splits(cfg)
    first_load = time.perf_counter() - start
    decoded = bool(_npy_files(cache_folder) - before)
    start = time.perf_counter()
    splits = build_splits(cfg)
    cached_load = time.perf_counter() - start
    train = splits.train
    student_size = student_input_size(cfg)
    augment = BatchAugment(cfg.augment)

    # the training step of this config (pipeline included: it is what an epoch costs)
    torch.manual_seed(0)
    teacher = shared_teacher(cfg)
    student, prompt = build_models(cfg, train.num_classes, teacher)
    trainer = LocalTrainer(cfg, student, teacher, prompt, train.class_counts(), device)
    step_data = train.subset(np.arange(min(len(train), step_batches * batch)))
    n_step = -(-len(step_data) // batch)

    candidates = {
        "loader_only": _pipeline(train, batch, pipe_batches, augment, student_size, device, full=False),
        "pipeline": _pipeline(train, batch, pipe_batches, augment, student_size, device),
        "step": lambda: trainer.train(step_data, epochs=1, max_steps=n_step),
    }
    timed = measure_interleaved(candidates, warmup, repeats, device)
    loader_rate = pipe_batches * batch / timed["loader_only"]["median_s"]
    pipe_rate = pipe_batches * batch / timed["pipeline"]["median_s"]
    step_rate = len(step_data) / timed["step"]["median_s"]
    row = {
        "size": size, "student_size": student_size, "teacher_size": cfg.teacher.input_size, "batch": batch,
        "train_images": len(train), "resident_mb": train.images.numel() / 2**20,
        "first_load_s": first_load, "first_load_decoded": decoded, "cached_load_s": cached_load,
        "loader_only_img_s": loader_rate, "pipeline_img_s": pipe_rate, "step_img_s": step_rate,
        "pipeline_vs_step": pipe_rate / step_rate,
        "pipeline_share_of_step": step_rate / pipe_rate,
        "samples_s": {k: v["samples_s"] for k, v in timed.items()},
    }
    logger.info("data %d px: pipeline %.0f img/s, step %.1f img/s", size, pipe_rate, step_rate)
    return row


def run(opts: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(opts["device"])
    ham = Path(opts.get("ham_root") or DEFAULT_HAM)
    csv_path = ham / "HAM10000_metadata.csv"
    if not csv_path.is_file() or not (ham / "images").is_dir():
        message = f"HAM10000 not found at {ham} (needs HAM10000_metadata.csv and images/): data suite skipped"
        print(message)
        return {"skipped": message, "what": "data pipeline on HAM10000", "rows": [],
                "targets": [target("data pipeline vs step rate, HAM10000 @ 64 px", None, 3.0, ">=", "x",
                                   note="skipped: no HAM10000")]}
    quick = opts["quick"]
    tmp = tempfile.TemporaryDirectory(prefix="fopro-bench-data-")
    try:
        if quick:
            csv_used = _subset_csv(csv_path, 20, Path(tmp.name))
            extra = ["split.val_per_class=2", "split.test_per_class=2"]
            plan = [(32, 8, 6, 2)]
            cache_dir: Path | None = Path(tmp.name) / "cache"
            warmup, repeats = 1, 2
        else:
            csv_used = csv_path
            plan = [(64, 32, 60, 4), (128, 32, 30, 3)]  # (size, batch, pipeline batches, step batches)
            extra = []
            cache_dir = None  # the user's decoded-image cache: decoded once, reused by later runs
            warmup, repeats = opts.get("warmup") or 1, opts.get("repeats") or 3
        rows = [bench_size(ham, csv_used, size, batch, pb, sb, warmup, repeats, device, cache_dir, extra)
                for size, batch, pb, sb in plan]
    finally:
        tmp.cleanup()
    first = rows[0]
    result = {
        "what": ("images/s of BatchLoader + to_float + BatchAugment + resize_batch on decoded HAM10000 train images "
                 "(in memory, i.e. after the first epoch), vs the FoPro-KD step of configs/ham10000-lt.yaml "
                 f"(augmentation on); medians of {repeats} interleaved repeats after {warmup} warm-up"),
        "ham_root": str(ham), "subset": bool(quick), "warmup": warmup, "repeats": repeats, "rows": rows,
        "targets": [target(f"data pipeline vs step rate, HAM10000 @ {first['size']} px", first["pipeline_vs_step"],
                           3.0, ">=", "x")],
    }
    return result


def render(result: dict[str, Any]) -> str:
    if result.get("skipped"):
        return result["skipped"]
    return result["what"] + "\n\n" + format_table(result["rows"], [
        "size", "student_size", "teacher_size", "train_images", "resident_mb", "first_load_s", "first_load_decoded",
        "cached_load_s", "loader_only_img_s", "pipeline_img_s", "step_img_s", "pipeline_vs_step"])
