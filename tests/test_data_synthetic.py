"""The synthetic generator: long-tail profile, determinism, styles, domains and frequency-band evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from fopro_kd.data.synthetic import (
    SCANNER_STYLES,
    ScannerStyle,
    class_specs,
    long_tail_counts,
    make_synthetic_imageset,
)


def test_long_tail_counts_follow_the_exponential_profile():
    counts = long_tail_counts(500, 8, 100.0)
    expected = [round(500 * 100.0 ** (-i / 7)) for i in range(8)]
    assert counts == expected == [500, 259, 134, 69, 36, 19, 10, 5]
    assert counts[0] / counts[-1] == pytest.approx(100.0)


def test_long_tail_counts_edge_cases():
    assert long_tail_counts(10, 4, 1.0) == [10, 10, 10, 10]
    assert long_tail_counts(3, 5, 1000.0)[-1] == 1  # never below one image
    assert long_tail_counts(7, 1, 50.0) == [7]
    with pytest.raises(ValueError, match="imbalance_factor"):
        long_tail_counts(10, 3, 0.5)


def test_same_seed_gives_identical_images_and_other_seed_differs():
    a = make_synthetic_imageset([5, 3, 2], 32, seed=7)
    b = make_synthetic_imageset([5, 3, 2], 32, seed=7)
    c = make_synthetic_imageset([5, 3, 2], 32, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.ids == b.ids
    assert not torch.equal(a.images, c.images)
    assert a.labels.tolist() == [0] * 5 + [1] * 3 + [2] * 2


@pytest.mark.parametrize("size", [32, 64, 224])
def test_image_sizes(size):
    data = make_synthetic_imageset([2, 1, 0, 1], size, seed=0)
    assert data.images.shape == (4, 3, size, size)
    assert data.images.dtype == torch.uint8 and data.images.is_contiguous()
    assert data.class_counts().tolist() == [2, 1, 0, 1]
    assert data.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert data.groups is None and data.sites is None
    # real images, not flat fields: every image has spatial structure
    assert (data.images.float().std(dim=(1, 2, 3)) > 5).all()


def test_style_changes_images_and_sets_sites():
    plain = make_synthetic_imageset([20, 20], 64, seed=3)
    styled = make_synthetic_imageset([20, 20], 64, seed=3, style="scanner_c")
    assert styled.sites == ["scanner_c"] * 40
    diff = (plain.images.float() - styled.images.float()).abs().mean()
    assert diff > 3.0
    # a colour cast with more red than blue raises the red/blue ratio
    warm = make_synthetic_imageset([20, 20], 64, seed=3, style="scanner_d")
    ratio = lambda d: (d.images[:, 0].float().mean() / d.images[:, 2].float().mean()).item()  # noqa: E731
    assert ratio(warm) > ratio(plain) * 1.1


def test_blurred_scanner_attenuates_high_frequencies():
    plain = make_synthetic_imageset([30, 30], 64, seed=1)
    blurred = make_synthetic_imageset([30, 30], 64, seed=1, style=ScannerStyle(blur_sigma=1.2))
    assert blurred.sites == ["custom"] * 60

    def high_band_power(d):
        x = d.images.float().mean(1)
        power = torch.fft.fft2(x - x.mean((1, 2), keepdim=True)).abs() ** 2
        f = torch.fft.fftfreq(64)
        radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
        return power[:, radius > 0.2].mean().item()

    assert high_band_power(blurred) < 0.3 * high_band_power(plain)


def test_scanner_styles_are_distinct_and_unknown_names_fail():
    names = ["none"] + [f"scanner_{c}" for c in "abcdef"]
    assert set(names) <= set(SCANNER_STYLES)
    assert len({SCANNER_STYLES[n] for n in names}) == len(names)
    with pytest.raises(ValueError, match="scanner_a"):
        make_synthetic_imageset([1, 1], 32, seed=0, style="scanner_z")


def test_hospital_and_public_domains_define_different_classes():
    hospital, public = class_specs("hospital", 8), class_specs("public", 8)
    assert len(set(hospital)) == 8 and len(set(public)) == 8
    assert not set(hospital) & set(public)
    assert {s.texture_freq for s in hospital}.isdisjoint({s.texture_freq for s in public})
    pub = make_synthetic_imageset([2] * 8, 32, seed=0, domain="public")
    assert pub.class_names[0] == "public_0"
    hos = make_synthetic_imageset([2] * 8, 32, seed=0)
    assert not torch.equal(pub.images, hos.images)
    with pytest.raises(ValueError, match="num_classes"):
        class_specs("hospital", 33)


def test_hospital_class_pairs_differ_only_in_texture_frequency():
    specs = class_specs("hospital", 8)
    for k in range(0, 8, 2):
        a, b = specs[k], specs[k + 1]
        assert (a.radius, a.aspect, a.texture_angle) == (b.radius, b.aspect, b.texture_angle)
        assert a.texture_freq != b.texture_freq


def _radial_log_power(images: torch.Tensor, lowpass: float | None) -> np.ndarray:
    """Log mean power in 20 radial frequency bands of the grey image (optionally low-passed)."""
    x = images.float().mean(1) / 255.0
    power = torch.fft.fft2(x - x.mean((1, 2), keepdim=True)).abs() ** 2
    f = torch.fft.fftfreq(x.shape[-1])
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    if lowpass is not None:
        power = power * (radius < lowpass)
    edges = torch.linspace(0, 0.5, 21)
    bands = [power[:, (radius >= lo) & (radius < hi)].mean(1) for lo, hi in zip(edges[:-1], edges[1:])]
    return torch.log(torch.stack(bands, 1) + 1e-8).numpy()


def test_class_evidence_lives_in_frequency_bands():
    """Classes 0/1 differ only above ~0.1 cycles/pixel; classes 0/2 differ in the blob (low band)."""
    data = make_synthetic_imageset([150, 150, 150], 64, seed=0)
    y = data.labels.numpy()

    def separability(pair, lowpass):
        feats = _radial_log_power(data.images, lowpass)
        mask = np.isin(y, pair)
        return cross_val_score(LogisticRegression(max_iter=2000), feats[mask], y[mask], cv=5).mean()

    assert separability((0, 1), None) > 0.95  # full spectrum: the texture band separates them
    assert separability((0, 1), 0.08) < 0.7  # low-passed: (near) chance
    assert separability((0, 2), 0.08) > 0.8  # the blob shape survives a low-pass

    # the mean spectra of 0 and 1 differ mainly in the high band
    feats = _radial_log_power(data.images, None)
    gap = np.abs(feats[y == 0].mean(0) - feats[y == 1].mean(0))
    assert gap[4:].max() > 5 * gap[:3].max()  # bands >= 0.1 vs < 0.075 cycles/pixel
