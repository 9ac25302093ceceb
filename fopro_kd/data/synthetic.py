"""Synthetic "dermoscopy-like" long-tailed data with class evidence in known frequency bands.

Why synthetic data at all: tests and demos must run in seconds on 2 CPU cores without the
real datasets, yet exercise what FoPro-KD is about: a frozen teacher with *frequency
preferences* whose input is re-weighted in the Fourier domain. So each class is defined by

* a **low-frequency** part: size, eccentricity and outline of a lesion blob on a smooth
  skin-like background, and
* a **high-frequency** part: an oriented grating of a given spatial frequency (cycles per
  pixel) inside the lesion.

Classes come in pairs that share the blob and differ *only* in the grating's frequency
band, so a low-pass filtered image cannot separate them (``tests/test_data_synthetic.py``
checks this). Within-class jitter of every parameter, weak textures and pixel noise make
the task learnable but not trivial.

``domain="public"`` defines a *different* set of classes (other shapes, frequencies and
orientations). It stands for the natural-image data a teacher is pretrained on: a teacher
trained on it learns generic shape/frequency detectors that transfer to the hospital task
without ever seeing a hospital class.

``SCANNER_STYLES`` simulate acquisition sites (colour cast, optical blur, contrast, sensor
noise): a blur attenuates exactly the high-frequency evidence, which is the domain shift
a Fourier prompt can compensate.

Everything is vectorised over chunks of images with torch and driven by one seeded CPU
``torch.Generator``, so the same arguments always give bit-identical images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import ImageSet

__all__ = [
    "ClassSpec",
    "ScannerStyle",
    "SCANNER_STYLES",
    "class_specs",
    "long_tail_counts",
    "make_synthetic_imageset",
]

# Pixels generated per chunk: small enough that the ~30 float32 intermediates stay in the CPU
# cache (elementwise ops are memory-bound), large enough that Python overhead is negligible.
_PIXELS_PER_CHUNK = 262_144


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Exponential long-tail profile ``n_i = round(n_max * IF^(-i/(C-1)))``, each at least 1.

    This is the profile of CIFAR-LT and ISIC-2019-LT (Cao et al. 2019), so a synthetic run has the
    same head/tail shape as the paper's benchmark.

    Parameters
    ----------
    n_max : images of the most frequent class (class 0).
    num_classes : number of classes ``C`` (>= 1).
    imbalance_factor : ``n_max / n_min`` (>= 1); 1 gives a balanced set.

    Returns
    -------
    list of int
        Images per class, non-increasing.
    """
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor is n_max / n_min and must be >= 1, got {imbalance_factor}")
    if num_classes == 1:
        return [int(n_max)]
    return [
        max(1, int(round(n_max * imbalance_factor ** (-i / (num_classes - 1))))) for i in range(num_classes)
    ]


# --------------------------------------------------------------------------- class definitions


@dataclass(frozen=True)
class ClassSpec:
    """The mean parameters of one synthetic class (each image jitters around them).

    Attributes
    ----------
    radius : semi-major axis of the lesion as a fraction of the image side (low frequency).
    aspect : minor / major axis ratio, 1 = round (low frequency).
    texture_freq : grating frequency inside the lesion in cycles per pixel, Nyquist = 0.5
        (high frequency; defined per pixel so it stays in the same band at every image size).
    texture_angle : grating orientation in degrees.
    """

    radius: float
    aspect: float
    texture_freq: float
    texture_angle: float


# Hospital: 4 blobs x 2 high-frequency bands x 4 orientations. Classes 2s and 2s+1 share blob s
# and orientation and differ only in the band (0.16 vs 0.30 cycles/pixel).
_HOSPITAL_SHAPES = ((0.20, 1.00), (0.29, 0.95), (0.25, 0.55), (0.17, 0.65))
_HOSPITAL_BANDS = (0.16, 0.30)
_HOSPITAL_ANGLES = (0.0, 90.0, 45.0, 135.0)
# Public (teacher pretraining): other blobs, bands and orientations; 5 x 3 combinations are
# unique for 15 classes (Chinese remainder), then the orientation changes.
_PUBLIC_SHAPES = ((0.23, 0.80), (0.28, 0.45), (0.14, 1.00), (0.33, 0.75), (0.21, 0.60))
_PUBLIC_BANDS = (0.10, 0.22, 0.38)
_PUBLIC_ANGLES = (30.0, 120.0, 75.0, 165.0)


def class_specs(domain: Literal["hospital", "public"], num_classes: int) -> list[ClassSpec]:
    """The class definitions of a synthetic domain, in label order.

    Parameters
    ----------
    domain : ``"hospital"`` (the target task) or ``"public"`` (the teacher's pretraining task).
    num_classes : number of classes; at most 32 (hospital) or 60 (public).

    Returns
    -------
    list of ClassSpec
        ``num_classes`` distinct definitions; hospital classes ``2s`` and ``2s+1`` differ only
        in the high-frequency band.
    """
    if domain == "hospital":
        shapes, bands, angles = _HOSPITAL_SHAPES, _HOSPITAL_BANDS, _HOSPITAL_ANGLES
        limit = len(shapes) * len(bands) * len(angles)
    elif domain == "public":
        shapes, bands, angles = _PUBLIC_SHAPES, _PUBLIC_BANDS, _PUBLIC_ANGLES
        limit = len(shapes) * len(bands) * len(angles)
    else:
        raise ValueError(f"domain must be 'hospital' or 'public', got {domain!r}")
    if not 1 <= num_classes <= limit:
        raise ValueError(
            f"the synthetic {domain!r} domain defines 1..{limit} classes, got num_classes={num_classes}; "
            f"lower data.num_classes"
        )
    specs = []
    for k in range(num_classes):
        if domain == "hospital":
            shape = shapes[(k // 2) % len(shapes)]
            band = bands[k % 2]
            angle = angles[k // (2 * len(shapes))]
        else:
            shape = shapes[k % len(shapes)]
            band = bands[k % len(bands)]
            angle = angles[k // (len(shapes) * len(bands))]
        specs.append(ClassSpec(radius=shape[0], aspect=shape[1], texture_freq=band, texture_angle=angle))
    return specs


# --------------------------------------------------------------------------- scanner styles


@dataclass(frozen=True)
class ScannerStyle:
    """Acquisition characteristics of a simulated site, applied after the scene is drawn.

    Attributes
    ----------
    colour_cast : per-channel (R, G, B) gain (white balance / illuminant).
    blur_sigma : Gaussian optical blur in pixels; attenuates the high-frequency class evidence.
    contrast : factor around each image's mean (1 = unchanged).
    noise_std : additive Gaussian sensor noise on the [0, 1] scale.
    """

    colour_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    blur_sigma: float = 0.0
    contrast: float = 1.0
    noise_std: float = 0.0


SCANNER_STYLES: dict[str, ScannerStyle] = {
    "none": ScannerStyle(),
    "scanner_a": ScannerStyle(colour_cast=(1.08, 0.98, 0.92), blur_sigma=0.0, contrast=1.10, noise_std=0.010),
    "scanner_b": ScannerStyle(colour_cast=(0.92, 1.00, 1.10), blur_sigma=0.6, contrast=0.95, noise_std=0.005),
    "scanner_c": ScannerStyle(colour_cast=(1.00, 0.90, 0.95), blur_sigma=0.9, contrast=1.00, noise_std=0.020),
    "scanner_d": ScannerStyle(colour_cast=(1.12, 1.05, 0.85), blur_sigma=0.4, contrast=0.85, noise_std=0.000),
    "scanner_e": ScannerStyle(colour_cast=(0.95, 1.05, 1.00), blur_sigma=0.0, contrast=1.25, noise_std=0.030),
    "scanner_f": ScannerStyle(colour_cast=(1.05, 0.95, 1.15), blur_sigma=1.2, contrast=0.90, noise_std=0.010),
}
"""Named site styles; ``data.site_style`` and ``federation.partition.site_styles`` refer to these keys."""


def _resolve_style(style: str | ScannerStyle | None) -> tuple[ScannerStyle | None, str | None]:
    if style is None:
        return None, None
    if isinstance(style, ScannerStyle):
        names = [name for name, s in SCANNER_STYLES.items() if s == style]
        return style, (names[0] if names else "custom")
    if style not in SCANNER_STYLES:
        raise ValueError(f"unknown scanner style {style!r}; choose one of {sorted(SCANNER_STYLES)}")
    return SCANNER_STYLES[style], style


# --------------------------------------------------------------------------- generation


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an (N, C, H, W) batch with reflect padding.

    Implemented as two matrix products with a banded (side x side) blur matrix: on CPU this
    is many times faster than a depthwise ``conv2d`` for small images.
    """
    side = x.shape[-1]
    radius = max(1, min(int(math.ceil(3 * sigma)), side - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    # row i of `matrix` is the blurred unit impulse at i (reflect padding), so out = x @ matrix
    eye = torch.eye(side, dtype=x.dtype).unsqueeze(1)
    matrix = F.conv1d(F.pad(eye, (radius, radius), mode="reflect"), kernel.view(1, 1, -1)).squeeze(1)
    return matrix.t() @ (x @ matrix)


def _apply_style(x: torch.Tensor, style: ScannerStyle, gen: torch.Generator) -> torch.Tensor:
    x = x * torch.tensor(style.colour_cast, dtype=x.dtype).view(1, 3, 1, 1)
    if style.blur_sigma > 0:
        x = _gaussian_blur(x, style.blur_sigma)
    if style.contrast != 1.0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * style.contrast + mean
    if style.noise_std > 0:
        x = x + style.noise_std * torch.randn(x.shape, generator=gen)
    return x


def _render_chunk(
    labels: torch.Tensor, specs: list[ClassSpec], size: int, gen: torch.Generator, style: ScannerStyle | None
) -> torch.Tensor:
    """Draw one chunk of images (float in ~[0, 1]) for the given labels."""
    n = labels.shape[0]
    scale = size / 64.0  # low-frequency quantities (edge width, offsets) scale with the image
    radius = torch.tensor([s.radius for s in specs])[labels]
    aspect = torch.tensor([s.aspect for s in specs])[labels]
    freq = torch.tensor([s.texture_freq for s in specs])[labels]
    angle = torch.tensor([s.texture_angle for s in specs])[labels] * (math.pi / 180.0)

    # --- per-image parameters (within-class variation makes neighbouring classes overlap)
    radius = radius * torch.exp(0.12 * torch.randn(n, generator=gen)) * size  # semi-major axis, px
    aspect = (aspect + _uniform(gen, n, -0.10, 0.10)).clamp(0.3, 1.0)
    blob_rot = _uniform(gen, n, 0.0, math.pi)
    cx = _uniform(gen, n, -0.08, 0.08) * size
    cy = _uniform(gen, n, -0.08, 0.08) * size
    irregular = _uniform(gen, n, 0.0, 0.10)
    lobes_phase = _uniform(gen, n, 0.0, 2 * math.pi)
    edge_px = _uniform(gen, n, 0.8, 2.5) * scale
    freq = freq * _uniform(gen, n, 0.90, 1.10)
    angle = angle + _uniform(gen, n, -0.35, 0.35)  # about +-20 degrees
    tex_phase = _uniform(gen, n, 0.0, 2 * math.pi)
    tex_amp = _uniform(gen, n, 0.04, 0.35)
    skin_r = _uniform(gen, n, 0.72, 0.95)
    skin = torch.stack([skin_r, skin_r * _uniform(gen, n, 0.68, 0.82), skin_r * _uniform(gen, n, 0.55, 0.72)], 1)
    lesion = torch.stack([_uniform(gen, n, 0.30, 0.55), _uniform(gen, n, 0.18, 0.33), _uniform(gen, n, 0.12, 0.28)], 1)
    # smooth low-frequency colour field of the skin (4x4 control points, bicubic upsampling)
    field = F.interpolate(0.05 * torch.randn(n, 3, 4, 4, generator=gen), size=(size, size), mode="bicubic",
                          align_corners=False)

    # --- geometry, broadcast as (n, H, W)
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    yy = coords.view(1, size, 1)
    xx = coords.view(1, 1, size)
    dx = xx - cx.view(n, 1, 1)
    dy = yy - cy.view(n, 1, 1)
    cos_r, sin_r = torch.cos(blob_rot).view(n, 1, 1), torch.sin(blob_rot).view(n, 1, 1)
    u = dx * cos_r + dy * sin_r
    v = -dx * sin_r + dy * cos_r
    a = radius.view(n, 1, 1)
    b = (radius * aspect).view(n, 1, 1)
    rho = torch.sqrt((u / a) ** 2 + (v / b) ** 2)
    theta = torch.atan2(v, u)
    rho = rho * (1.0 + irregular.view(n, 1, 1) * torch.sin(3.0 * theta + lobes_phase.view(n, 1, 1)))
    mask = torch.sigmoid((1.0 - rho) * a / edge_px.view(n, 1, 1))  # soft border, ~edge_px wide

    # high-frequency grating inside the lesion, in absolute image orientation
    wave = xx * torch.cos(angle).view(n, 1, 1) + yy * torch.sin(angle).view(n, 1, 1)
    grating = torch.cos(2 * math.pi * freq.view(n, 1, 1) * wave + tex_phase.view(n, 1, 1))
    # lesions are lighter towards the border (low frequency), textured inside (high frequency)
    shading = (1.0 + 0.25 * rho.clamp(max=1.0) ** 2) * (1.0 + tex_amp.view(n, 1, 1) * grating)

    background = skin.view(n, 3, 1, 1) + field
    lesion_rgb = lesion.view(n, 3, 1, 1) * shading.unsqueeze(1)
    m = mask.unsqueeze(1)
    x = background * (1.0 - m) + lesion_rgb * m
    x = x + 0.02 * torch.randn(x.shape, generator=gen)
    if style is not None:
        x = _apply_style(x, style, gen)
    return x


def make_synthetic_imageset(
    counts: Sequence[int],
    image_size: int,
    seed: int,
    domain: Literal["hospital", "public"] = "hospital",
    style: str | ScannerStyle | None = None,
    class_names: list[str] | None = None,
    id_prefix: str = "syn",
) -> ImageSet:
    """Generate a labelled synthetic image set, deterministically from ``seed``.

    Parameters
    ----------
    counts : images per class; ``len(counts)`` is the number of classes. Use
        :func:`long_tail_counts` for a long-tailed training set, ``[n] * C`` for balanced held-out sets.
    image_size : square side in pixels, 32..224 (any size works; textures are defined in
        cycles per pixel so they stay high-frequency at every size).
    seed : the only source of randomness; same arguments give bit-identical images.
    domain : ``"hospital"`` (target task) or ``"public"`` (a different class set, used to
        pretrain the demo teacher).
    style : a :data:`SCANNER_STYLES` name or a :class:`ScannerStyle`; ``None`` = no site effect.
    class_names : defaults to ``class_<k>`` (hospital) or ``public_<k>`` (public).
    id_prefix : image ids are ``<id_prefix>_<index>``; give splits different prefixes so
        ids stay unique when sets are concatenated.

    Returns
    -------
    ImageSet
        uint8 images grouped by class (class 0 first), ``groups=None``, ``sites`` = the style
        name per image (or ``None`` without a style).
    """
    counts = [int(c) for c in counts]
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"counts must be a non-empty list of non-negative integers, got {counts}")
    if not 8 <= image_size <= 1024:
        raise ValueError(f"image_size must be in [8, 1024] (32..224 is the intended range), got {image_size}")
    specs = class_specs(domain, len(counts))
    style_obj, style_name = _resolve_style(style)
    if class_names is None:
        prefix = "class" if domain == "hospital" else "public"
        class_names = [f"{prefix}_{k}" for k in range(len(counts))]
    elif len(class_names) != len(counts):
        raise ValueError(f"class_names has {len(class_names)} entries for {len(counts)} classes in counts")

    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))
    n = int(labels.shape[0])
    images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    chunk = max(1, _PIXELS_PER_CHUNK // (image_size * image_size))
    domain_code = 0 if domain == "hospital" else 1
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # one generator per chunk, derived from (seed, domain, chunk start): chunks are independent
        state = np.random.SeedSequence([int(seed) % 2**63, domain_code, start]).generate_state(1, dtype=np.uint64)
        gen = torch.Generator().manual_seed(int(state[0]) % 2**63)
        x = _render_chunk(labels[start:stop], specs, image_size, gen, style_obj)
        images[start:stop] = (x.clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)
    return ImageSet(
        images=images,
        labels=labels,
        class_names=list(class_names),
        ids=[f"{id_prefix}_{i}" for i in range(n)],
        groups=None,
        sites=None if style_name is None else [style_name] * n,
    )
