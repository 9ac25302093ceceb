"""A small offline "public" teacher for the built-in demo.

Real runs use real public weights (ImageNet, MoCo-v2, DINOv2; e.g. ``../shared/weights/``
or the timm Hub). The demo must run offline, so it pretrains a timm model on a
*disjoint* synthetic public domain (other classes than the demo hospitals') and saves a
plain timm state dict, loaded later through the same local-file path as real weights.
The file is cached: the demo trains it once per settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from fopro_kd.checkpoint import _atomic_write_bytes
from fopro_kd.run_plan import teacher_input_size

logger = logging.getLogger("fopro_kd.models")


@dataclass(frozen=True)
class DemoTeacherSettings:
    """What the demo teacher is trained on; the cache key is derived from these."""

    arch: str = "resnet18"
    image_size: int = 64
    num_classes: int = 12
    per_class: int = 200
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 1234

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FOPRO_KD_CACHE", Path.home() / ".cache" / "fopro-kd"))


def demo_teacher_file(settings: DemoTeacherSettings, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / f"demo-teacher-{settings.arch}-{settings.image_size}px-{settings.key()}.pth"


def pretrain_demo_teacher(
    settings: DemoTeacherSettings, out_path: str | Path, progress: bool = False
) -> dict[str, float]:
    """Train ``settings.arch`` on the synthetic public domain and save its state dict atomically."""
    from fopro_kd.data.synthetic import make_synthetic_imageset
    from fopro_kd.data.transforms import to_float

    torch.manual_seed(settings.seed)
    data = make_synthetic_imageset(
        [settings.per_class] * settings.num_classes, settings.image_size, seed=settings.seed, domain="public"
    )
    model = timm.create_model(settings.arch, pretrained=False, num_classes=settings.num_classes)
    mean = torch.tensor(model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    n = len(data)
    steps = settings.epochs * ((n + settings.batch_size - 1) // settings.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="demo teacher", leave=False)
    correct = seen = 0
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        correct = seen = 0
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            x = to_float(data.images[idx])
            flip = torch.rand(x.shape[0], 1, 1, 1, generator=generator) < 0.5
            x = torch.where(flip, x.flip(-1), x)
            y = data.labels[idx]
            logits = model((x - mean) / std)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += int(y.shape[0])
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    _atomic_write_bytes(Path(out_path), buffer.getvalue())
    train_acc = correct / max(1, seen)
    logger.info("demo teacher saved to %s (last-epoch train accuracy %.3f)", out_path, train_acc)
    return {"train_accuracy": train_acc, "images": float(n)}


def demo_teacher_path(cfg, progress: bool = True) -> Path:
    """The demo teacher file for ``cfg``: ``teacher.file`` if given, else the cached one (trained if missing)."""
    if cfg.teacher.file:
        path = Path(cfg.teacher.file)
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher.file {path} does not exist; run `fopro-kd teacher pretrain --out {path}` first"
            )
        return path
    settings = DemoTeacherSettings(arch=cfg.teacher.arch, image_size=int(teacher_input_size(cfg)))  # demo: known
    path = demo_teacher_file(settings, cfg.data.cache_dir)
    if not path.is_file():
        logger.warning("demo teacher not cached yet: pretraining %s on the synthetic public domain", settings.arch)
        pretrain_demo_teacher(settings, path, progress=progress)
    return path
