"""Batch-level image transforms on tensors: conversion, resizing, the paper's skin augmentation.

Why batch-level: per-image PIL transforms cost more than a small model's training step on
2 CPU cores; here a whole batch is augmented with one ``affine_grid`` / ``grid_sample``
call and a few broadcast operations, on whatever device the batch lives on. All
randomness is drawn from an explicit CPU ``torch.Generator``, so a run is reproducible
regardless of the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import AugmentConfig

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BatchAugment", "normalize", "resize_batch", "to_float"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ (NTSC): hue is a rotation of the (I, Q) chroma plane
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1] (same shape and device)."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"to_float expects a uint8 tensor, got {images_uint8.dtype}")
    return images_uint8.to(torch.float32).div_(255.0)


def to_float_on(images_uint8: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``to_float`` on ``device``: the uint8 batch crosses the host-device bus (1/4 of the float32 bytes,
    asynchronously from pinned memory) and is converted there (the same values as converting first)."""
    return to_float(images_uint8.to(device, non_blocking=True))


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize an (N, C, H, W) batch to ``size`` x ``size`` (bilinear, antialiased when shrinking).

    No-op (the same tensor) when the batch already has that size. uint8 input is resized in
    float32 and rounded back to uint8.
    """
    if x.ndim != 4:
        raise ValueError(f"resize_batch expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    is_uint8 = x.dtype == torch.uint8
    y = x.float() if is_uint8 else x
    antialias = size < x.shape[-1] or size < x.shape[-2]
    y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    if is_uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y.contiguous()


def normalize(
    x: torch.Tensor, mean: tuple[float, ...] | torch.Tensor, std: tuple[float, ...] | torch.Tensor
) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` of an (N, C, H, W) float batch (not in place)."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    if mean_t.shape[1] != x.shape[1] or std_t.shape[1] != x.shape[1]:
        raise ValueError(f"mean/std have {mean_t.shape[1]}/{std_t.shape[1]} values for {x.shape[1]} channels")
    return (x - mean_t) / std_t


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


class BatchAugment:
    """The FoPro-KD / Fed-MAS skin augmentation, vectorised over a batch.

    Per image, as in the original ISIC-LT training transform (``docs/method.md``):

    1. **one** random geometric op out of {scale in ``cfg.affine_scale``, horizontal translate
       up to ``cfg.affine_translate`` of the width (torchvision ``translate=(0.05, 0)``),
       rotation up to +-``cfg.rotation_degrees``}, all applied in one ``affine_grid`` +
       ``grid_sample`` (bilinear) with **reflection** padding: skin continues past the border
       instead of black corners, which a model could use as a shortcut;
    2. colour jitter with ranges ``cfg.color_jitter`` = (brightness, contrast, saturation, hue),
       torchvision semantics, applied in this fixed order; the hue shift is a rotation of the
       YIQ chroma plane by ``2 pi h`` (close to HSV hue for the small ``h`` used here);
    3. horizontal and vertical flips, each with probability 0.5 (``cfg.hflip`` / ``cfg.vflip``).

    The output is clamped to [0, 1]. With ``cfg.enabled`` False the input is returned unchanged.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        lo, hi = cfg.affine_scale
        if not 0 < lo <= hi:
            raise ValueError(f"augment.affine_scale must satisfy 0 < low <= high, got {cfg.affine_scale}")
        if not 0 <= cfg.affine_translate < 1:
            raise ValueError(f"augment.affine_translate must be in [0, 1), got {cfg.affine_translate}")
        if cfg.rotation_degrees < 0:
            raise ValueError(f"augment.rotation_degrees must be >= 0, got {cfg.rotation_degrees}")
        b, c, s, h = cfg.color_jitter
        if min(b, c, s) < 0 or not 0 <= h <= 0.5:
            raise ValueError(
                "augment.color_jitter must be (brightness>=0, contrast>=0, saturation>=0, 0<=hue<=0.5), "
                f"got {cfg.color_jitter}"
            )
        self.cfg = cfg

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a float (N, 3, H, W) batch in [0, 1]; all randomness comes from ``generator``."""
        return self.with_flip_views(x, generator)[0]

    def with_flip_views(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented batch and each image's flip view ``hflip + 2 * vflip`` (int64, on the CPU).

        The view index lets the teacher see the student's flips on the clean image
        (``augment.teacher_view: flips``) and lets cached teacher features be looked up per view.
        """
        if not self.cfg.enabled:
            return x, torch.zeros(x.shape[0], dtype=torch.int64)
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(
                f"BatchAugment expects a float (N, 3, H, W) batch in [0, 1], got {x.dtype} {tuple(x.shape)}"
            )
        n = x.shape[0]
        if n == 0:
            return x, torch.zeros(0, dtype=torch.int64)
        draws = self._draw(n, generator)
        views = draws["hflip"].long() + 2 * draws["vflip"].long()
        draws = {k: v.to(x.device, x.dtype if v.is_floating_point() else v.dtype) for k, v in draws.items()}
        x = self._geometric(x, draws)
        x = self._colour(x, draws)
        x = self._flip(x, draws)
        return x.clamp_(0.0, 1.0), views

    # ------------------------------------------------------------------ random parameters

    def _draw(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Every random number of the batch, drawn in a fixed order on the CPU generator."""
        cfg = self.cfg
        bright, contrast, sat, hue = cfg.color_jitter
        choice = torch.randint(0, 3, (n,), generator=gen)
        scale = _uniform(gen, n, cfg.affine_scale[0], cfg.affine_scale[1])
        shift = _uniform(gen, n, -cfg.affine_translate, cfg.affine_translate)
        angle = _uniform(gen, n, -cfg.rotation_degrees, cfg.rotation_degrees) * (math.pi / 180.0)
        return {
            "scale": torch.where(choice == 0, scale, torch.ones(n)),
            "shift": torch.where(choice == 1, shift, torch.zeros(n)),
            "angle": torch.where(choice == 2, angle, torch.zeros(n)),
            "brightness": _uniform(gen, n, max(0.0, 1 - bright), 1 + bright),
            "contrast": _uniform(gen, n, max(0.0, 1 - contrast), 1 + contrast),
            "saturation": _uniform(gen, n, max(0.0, 1 - sat), 1 + sat),
            "hue": _uniform(gen, n, -hue, hue),
            "hflip": (torch.rand(n, generator=gen) < 0.5) & torch.tensor(cfg.hflip),
            "vflip": (torch.rand(n, generator=gen) < 0.5) & torch.tensor(cfg.vflip),
        }

    # ------------------------------------------------------------------ ops

    @staticmethod
    def _geometric(x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        # affine_grid maps output to input coordinates: input = R(angle) / scale @ output + t.
        # scale > 1 zooms in; a shift of s image widths is 2 s in normalised [-1, 1] units.
        cos, sin, inv = torch.cos(d["angle"]), torch.sin(d["angle"]), 1.0 / d["scale"]
        theta = torch.stack(
            [
                torch.stack([cos * inv, -sin * inv, -2.0 * d["shift"]], dim=1),
                torch.stack([sin * inv, cos * inv, torch.zeros_like(cos)], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    @staticmethod
    def _colour(x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * d["brightness"].view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
        mean = (x * luma).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        c = d["contrast"].view(-1, 1, 1, 1)
        x = (x * c + mean * (1 - c)).clamp_(0.0, 1.0)
        gray = (x * luma).sum(dim=1, keepdim=True)
        s = d["saturation"].view(-1, 1, 1, 1)
        x = (x * s + gray * (1 - s)).clamp_(0.0, 1.0)
        # hue: rotate (I, Q) by 2*pi*h per image; M = YIQ^-1 @ R(h) @ YIQ, applied as a batched 3x3
        phi = 2 * math.pi * d["hue"]
        cos, sin = torch.cos(phi), torch.sin(phi)
        one, zero = torch.ones_like(cos), torch.zeros_like(cos)
        rot = torch.stack(
            [torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1), torch.stack([zero, sin, cos], 1)], 1
        )
        to_yiq = _RGB_TO_YIQ.to(device=x.device, dtype=x.dtype)
        to_rgb = _YIQ_TO_RGB.to(device=x.device, dtype=x.dtype)
        matrix = to_rgb @ rot @ to_yiq  # (N, 3, 3)
        x = torch.einsum("nij,njhw->nihw", matrix, x)
        return x.clamp_(0.0, 1.0)

    @staticmethod
    def _flip(x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.where(d["hflip"].view(-1, 1, 1, 1), x.flip(-1), x)
        return torch.where(d["vflip"].view(-1, 1, 1, 1), x.flip(-2), x)
