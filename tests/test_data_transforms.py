"""Batch transforms: conversion, resizing, normalisation and the vectorised skin augmentation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fopro_kd.config import AugmentConfig
from fopro_kd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchAugment, normalize, resize_batch, to_float, to_float_on

_NO_GEOMETRY = dict(affine_scale=(1.0, 1.0), affine_translate=0.0, rotation_degrees=0.0)
_NO_COLOUR = dict(color_jitter=(0.0, 0.0, 0.0, 0.0))


def _batch(n=8, size=16, seed=0) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_float_scales_uint8_to_unit_interval():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    y = to_float(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.flatten(), torch.tensor([0.0, 128 / 255, 1.0]))
    with pytest.raises(ValueError, match="uint8"):
        to_float(y)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_to_float_on_converts_on_the_device_with_the_same_values(device: str):
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    y = to_float_on(x, device)
    assert y.device.type == device and y.dtype == torch.float32
    assert torch.equal(y.cpu(), to_float(x))
    with pytest.raises(ValueError, match="uint8"):
        to_float_on(y, device)


def test_resize_batch_shapes_noop_and_uint8():
    x = _batch(size=32)
    assert resize_batch(x, 32) is x
    assert resize_batch(x, 16).shape == (8, 3, 16, 16)
    assert resize_batch(x, 48).shape == (8, 3, 48, 48)
    const = torch.full((2, 3, 20, 20), 77, dtype=torch.uint8)
    small = resize_batch(const, 7)
    assert small.dtype == torch.uint8 and torch.all(small == 77)
    # antialiased downscaling averages a pixel-level checkerboard to grey
    # (plain bilinear would sample pixel centres here and return 0s and 1s)
    checker = ((torch.arange(30)[:, None] + torch.arange(30)[None, :]) % 2).float().expand(1, 3, 30, 30)
    inner = resize_batch(checker, 10)[..., 1:-1, 1:-1]
    assert torch.allclose(inner, torch.full_like(inner, 0.5), atol=0.02)


def test_normalize_per_channel():
    x = torch.ones((2, 3, 4, 4))
    y = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(y[0, :, 0, 0], torch.tensor(expected))
    with pytest.raises(ValueError, match="channels"):
        normalize(x, (0.5,) * 2, (0.5,) * 2)


def test_augment_is_deterministic_given_the_generator():
    aug = BatchAugment(AugmentConfig())
    x = _batch()
    a, b, c = aug(x.clone(), _gen(1)), aug(x.clone(), _gen(1)), aug(x.clone(), _gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)


def test_augment_disabled_is_identity():
    x = _batch()
    gen = _gen(0)
    state = gen.get_state()
    out = BatchAugment(AugmentConfig(enabled=False))(x, gen)
    assert out is x
    assert torch.equal(gen.get_state(), state)  # no randomness consumed


def test_augment_output_shape_dtype_and_range():
    x = _batch(n=5, size=24)
    x[0] = 1.0
    x[1] = 0.0
    out = BatchAugment(AugmentConfig(color_jitter=(0.9, 0.9, 0.9, 0.5)))(x, _gen(3))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    with pytest.raises(ValueError, match="float"):
        BatchAugment(AugmentConfig())(torch.zeros((1, 3, 4, 4), dtype=torch.uint8), _gen())


def test_flips_actually_flip():
    x = _batch(n=32)
    for axis, flags in ((-1, dict(hflip=True, vflip=False)), (-2, dict(hflip=False, vflip=True))):
        cfg = AugmentConfig(**_NO_GEOMETRY, **_NO_COLOUR, **flags)
        out = BatchAugment(cfg)(x.clone(), _gen(5))
        same = [torch.allclose(out[i], x[i], atol=1e-5) for i in range(32)]
        flipped = [torch.allclose(out[i], x[i].flip(axis), atol=1e-5) for i in range(32)]
        assert all(s or f for s, f in zip(same, flipped))
        assert 4 < sum(flipped) < 28  # about half of them


def test_no_op_config_returns_the_input():
    cfg = AugmentConfig(**_NO_GEOMETRY, **_NO_COLOUR, hflip=False, vflip=False)
    x = _batch()
    assert torch.allclose(BatchAugment(cfg)(x.clone(), _gen()), x, atol=1e-5)


def test_rotation_uses_reflection_padding():
    # a constant image stays constant under rotation: no black (zero-padded) corners
    cfg = AugmentConfig(**_NO_COLOUR, affine_scale=(1.0, 1.0), affine_translate=0.0, rotation_degrees=45.0,
                        hflip=False, vflip=False)
    x = torch.full((16, 3, 20, 20), 0.6)
    out = BatchAugment(cfg)(x, _gen(0))
    assert torch.allclose(out, x, atol=1e-5)


def test_geometric_ops_change_images_one_at_a_time():
    x = _batch(n=64, size=20)
    cfg = AugmentConfig(**_NO_COLOUR, hflip=False, vflip=False)
    out = BatchAugment(cfg)(x.clone(), _gen(0))
    changed = (out - x).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.9  # every op (scale, shift or rotation) moves pixels


def test_colour_jitter_keeps_grey_images_grey_and_varies_brightness():
    cfg = AugmentConfig(**_NO_GEOMETRY, hflip=False, vflip=False, color_jitter=(0.25, 0.25, 0.25, 0.01))
    grey = torch.full((32, 3, 8, 8), 0.5)
    out = BatchAugment(cfg)(grey, _gen(1))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)
    means = out.mean(dim=(1, 2, 3))
    assert means.min() >= 0.5 * 0.75 - 1e-4 and means.max() <= 0.5 * 1.25 + 1e-4
    assert means.max() - means.min() > 0.1


def test_hue_shift_rotates_chroma_but_keeps_luma():
    cfg = AugmentConfig(**_NO_GEOMETRY, hflip=False, vflip=False, color_jitter=(0.0, 0.0, 0.0, 0.05))
    x = torch.tensor([0.6, 0.4, 0.3]).view(1, 3, 1, 1).expand(16, 3, 4, 4).contiguous()
    out = BatchAugment(cfg)(x, _gen(2))
    luma = lambda t: (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)  # noqa: E731
    assert torch.allclose(luma(out), luma(x), atol=1e-5)
    assert (out - x).abs().amax() > 0.01


def test_invalid_augment_config_is_rejected():
    with pytest.raises(ValueError, match="affine_scale"):
        BatchAugment(dataclasses.replace(AugmentConfig(), affine_scale=(1.2, 0.9)))
