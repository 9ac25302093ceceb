"""Fourier Prompt Generator: identity at init, phase kept, bounded and band-limited multiplier, gradients,
the radial parameterisation, the regulariser's value and scale, probe initialisation, statistics."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from fopro_kd.config import ConfigError, PromptConfig, TeacherConfig, config_from_dict
from fopro_kd.models.teacher import build_teacher
from fopro_kd.prompt import (
    FourierPrompt,
    band_mask,
    build_prompt,
    mask_statistics,
    prompt_input,
    radial_frequency,
    radial_profile,
    ring_centres,
)

PARAMS = ("free", "generator", "radial")
FFTS = ("rfft2", "fft2")


def _prompt(param: str = "free", fft: str = "rfft2", size: int = 32, channels: int = 3, **kw) -> FourierPrompt:
    return FourierPrompt(PromptConfig(param=param, fft=fft, **kw), image_size=size, channels=channels)


def _randomise(prompt: FourierPrompt, scale: float = 2.0, seed: int = 0) -> None:
    """Move the prompt away from the identity (every parameter, including the zero-init last layer)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (scale if prompt.param in ("free", "radial") else 0.5))


def _shifted_full_spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x.double(), norm="ortho"), dim=(-2, -1))


@pytest.mark.parametrize("size", [32, 33])
@pytest.mark.parametrize("fft", FFTS)
@pytest.mark.parametrize("param", PARAMS)
def test_identity_at_init_returns_input(param: str, fft: str, size: int) -> None:
    prompt = _prompt(param, fft, size)
    x = torch.rand(2, 3, size, size)
    y = prompt(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - x).abs().max().item() < 1e-5
    assert torch.equal(prompt.multiplier(x), torch.ones(3, *prompt.spectrum_shape))
    assert prompt.regularizer(x).item() == 0.0


@pytest.mark.parametrize("size", [32, 33])
@pytest.mark.parametrize("fft", FFTS)
@pytest.mark.parametrize("param", PARAMS)
def test_phase_kept_and_amplitude_scaled_by_multiplier(param: str, fft: str, size: int) -> None:
    prompt = _prompt(param, fft, size, eps=0.5).double()
    _randomise(prompt)
    x = torch.rand(1, 3, size, size, dtype=torch.float64)  # batch of 1: the generator's M is per image
    y = prompt(x)
    assert torch.isfinite(y).all() and not torch.is_complex(y)
    assert (y - x).abs().max() > 1e-3  # the prompt really changed the image

    spec_x, spec_y = _shifted_full_spectrum(x)[0], _shifted_full_spectrum(y)[0]
    significant = spec_x.abs() > 1e-6 * spec_x.abs().max()
    phase_diff = torch.angle(spec_y * spec_x.conj())[significant]
    assert phase_diff.abs().max().item() < 1e-8

    # |Y| = M ⊙ |X| in the prompt's own layout: M is exactly what multiplier() reports.
    def layout(t: torch.Tensor) -> torch.Tensor:
        if fft == "rfft2":
            return torch.fft.fftshift(torch.fft.rfft2(t, norm="ortho"), dim=-2)[0]
        return torch.fft.fftshift(torch.fft.fft2(t, norm="ortho"), dim=(-2, -1))[0]

    m = prompt.multiplier(x)
    torch.testing.assert_close(layout(y).abs(), m * layout(x).abs(), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("fft", FFTS)
@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0])
def test_multiplier_bounded_by_eps(fft: str, eps: float) -> None:
    prompt = _prompt("free", fft, 17, eps=eps)
    with torch.no_grad():
        prompt.m.copy_(torch.randn(prompt.m.shape) * 50)
    m = prompt.multiplier()
    assert m.min().item() >= 1 - eps - 1e-6 and m.max().item() <= 1 + eps + 1e-6
    assert m.min().item() < 1 - 0.5 * eps and m.max().item() > 1 + 0.5 * eps  # the bound is actually reached
    y = prompt(torch.rand(2, 3, 17, 17))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("size", [32, 33])
@pytest.mark.parametrize("fft", FFTS)
@pytest.mark.parametrize("param", PARAMS)
def test_multiplier_is_one_outside_band(param: str, fft: str, size: int) -> None:
    prompt = _prompt(param, fft, size, band=0.25)
    _randomise(prompt)
    x = torch.rand(2, 3, size, size)
    m = prompt.multiplier(x)
    outside = prompt.band_mask == 0
    assert outside.any()
    assert torch.equal(m[:, outside], torch.ones_like(m[:, outside]))
    assert (m[:, ~outside] != 1).any()


def test_band_mask_geometry() -> None:
    # β = 0.25 on 32 px: |k| <= 4 on both axes -> 9 centred rows; rfft2 keeps columns 0..4.
    full = band_mask(32, 0.25, "fft2")
    half = band_mask(32, 0.25, "rfft2")
    assert full.shape == (32, 32) and half.shape == (32, 17)
    assert full.sum().item() == 9 * 9 and half.sum().item() == 9 * 5
    rows = full.sum(dim=1).nonzero().flatten()
    assert rows.tolist() == list(range(16 - 4, 16 + 5))  # DC sits at index H // 2 after fftshift
    assert torch.equal(full, full.flip(0).roll(1, 0).flip(1).roll(1, 1))  # symmetric under k -> -k
    for fft in FFTS:
        assert band_mask(32, 1.0, fft).min().item() == 1.0  # β = 1: the whole spectrum
        assert band_mask(33, 1.0, fft).min().item() == 1.0


def test_state_dict_holds_only_learnable_prompt() -> None:
    assert list(_prompt("free").state_dict()) == ["m"]
    assert _prompt("free", "fft2", 8).m.shape == (3, 8, 8)
    assert _prompt("free", "rfft2", 9).m.shape == (3, 9, 5)
    assert all(key.startswith("generator.") for key in _prompt("generator").state_dict())
    assert list(_prompt("radial").state_dict()) == ["m"]
    assert _prompt("radial", radial_bands=5).m.shape == (3, 5)  # K rings x channels, whatever the size


def test_regularizer_value_on_hand_made_masks() -> None:
    """R = γ·Σ_c Σ_k w_k (M_c(k) − 1)², w_k normalised over the band (full-spectrum frequencies)."""
    size, gamma, eps = 16, 0.3, 0.5
    # uniform tanh(m) = t on the whole band: M − 1 = ε·t everywhere, R = γ·C·(ε t)²
    t = 0.4
    for fft in FFTS:
        prompt = _prompt("free", fft, size, gamma=gamma, eps=eps)
        with torch.no_grad():
            prompt.m.fill_(math.atanh(t))
        torch.testing.assert_close(prompt.regularizer(), torch.tensor(gamma * 3 * (eps * t) ** 2))
    # one frequency pair (k, −k) of one channel in the full layout: 2 of the 256 frequencies deviate
    prompt = _prompt("free", "fft2", size, gamma=gamma, eps=eps)
    with torch.no_grad():
        prompt.m[1, 8 + 3, 8 + 2] = math.atanh(t)  # k = (3, 2); symmetrisation gives M − 1 = ε t / 2 at ±k
        prompt.m[1, 8 - 3, 8 - 2] = math.atanh(t)  # and its mirror -> ε t at both
    expected = gamma * (2 / size**2) * (eps * t) ** 2
    torch.testing.assert_close(prompt.regularizer(), torch.tensor(expected))
    # the same k in the half layout (one stored entry standing for two frequencies): same R
    half = _prompt("free", "rfft2", size, gamma=gamma, eps=eps)
    with torch.no_grad():
        half.m[1, 8 + 3, 2] = math.atanh(t)
    torch.testing.assert_close(half.regularizer(), torch.tensor(expected))
    reg = half.regularizer()
    reg.backward()
    assert half.m.grad is not None and half.m.grad.abs().sum() > 0


@pytest.mark.parametrize("param", ["free", "radial"])
def test_regularizer_does_not_vanish_or_explode_with_image_size(param: str) -> None:
    values = []
    for size in (16, 64, 128):
        prompt = _prompt(param, "rfft2", size, gamma=0.1, eps=0.5)
        with torch.no_grad():
            prompt.m.fill_(math.atanh(0.6))  # M = 1.3 on the whole band
        values.append(prompt.regularizer().item())
    assert values == pytest.approx([0.1 * 3 * 0.3**2] * 3, rel=1e-5)


def test_default_gamma_lets_a_band_move_under_a_unit_objective() -> None:
    """At the default γ a ±0.3 band costs a few % of a cross-entropy of ~1.2, not ~0 and not ≫ 1."""
    cfg = PromptConfig(param="radial")
    prompt = FourierPrompt(cfg, 128)
    with torch.no_grad():
        prompt.m[:, :2].fill_(math.atanh(0.6))  # the two lowest rings at M = 1.3
    reg = prompt.regularizer().item()
    assert 1e-3 < reg < 0.1
    with torch.no_grad():
        prompt.m.fill_(math.atanh(0.6))
    assert 0.01 < prompt.regularizer().item() < 0.12  # the whole spectrum at 1.3: 0.027


def test_generator_regularizer_is_computed_on_the_m_it_applies() -> None:
    teacher = build_teacher(TeacherConfig(arch="test_resnet", source="none", input_size=16, mean=(0.5, 0.5, 0.5),
                                          std=(0.25, 0.25, 0.25)))
    prompt = _prompt("generator", "rfft2", 16)
    _randomise(prompt)
    x01 = torch.rand(3, 3, 20, 20)
    xn = prompt_input(teacher, x01, "normalised")
    assert xn.shape == (3, 3, 16, 16)
    torch.testing.assert_close(xn, teacher.normalize(teacher.resize(x01)))
    out, reg = prompt.forward_with_regularizer(xn)
    torch.testing.assert_close(out, prompt(xn))
    torch.testing.assert_close(reg, prompt.regularizer(xn))
    raw = prompt_input(teacher, x01, "raw")
    assert abs(prompt.regularizer(raw).item() - reg.item()) > 1e-6  # the M of another tensor is another R
    with pytest.raises(ValueError, match="prompt.domain"):
        prompt_input(teacher, x01, "pixels")


def test_wrong_size_and_missing_image_raise_value_error() -> None:
    prompt = _prompt("free", size=32)
    with pytest.raises(ValueError, match="teacher input size"):
        prompt(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="inputs"):
        prompt(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="pass x"):
        _prompt("generator").multiplier()
    with pytest.raises(ValueError, match="prompt.fft"):
        FourierPrompt(dataclasses.replace(PromptConfig(), fft="dct"), 32)
    with pytest.raises(ValueError, match="prompt.band"):
        FourierPrompt(PromptConfig(band=0.0), 32)


def test_low_precision_input_computed_in_float32() -> None:
    prompt = build_prompt(PromptConfig(), 16)
    x = torch.rand(2, 3, 16, 16).to(torch.bfloat16)
    y = prompt(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - x.float()).abs().max().item() < 1e-2


@pytest.mark.parametrize("param", PARAMS)
def test_gradients_reach_prompt_through_frozen_teacher(param: str) -> None:
    teacher = build_teacher(TeacherConfig(arch="test_resnet", source="none", input_size=32))
    prompt = _prompt(param, "rfft2", 32)
    x = torch.rand(2, 3, 32, 32)
    loss = teacher(prompt(x)).pow(2).sum() + prompt.regularizer(x)
    loss.backward()
    grads = {name: p.grad for name, p in prompt.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads, "no prompt parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads.values())
    if param == "generator":
        assert "generator.net.4.weight" in grads  # the zero-initialised last layer trains first
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(("fft", "size"), [("rfft2", 6), ("rfft2", 5), ("fft2", 6), ("fft2", 5)])
def test_gradcheck_free_float64(fft: str, size: int) -> None:
    prompt = _prompt("free", fft, size, channels=2, band=0.7).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 2, size, size, dtype=torch.float64, generator=gen, requires_grad=True)
    m = torch.randn(prompt.m.shape, dtype=torch.float64, generator=gen, requires_grad=True)

    def run(x_in: torch.Tensor, m_in: torch.Tensor) -> torch.Tensor:
        return functional_call(prompt, {"m": m_in}, (x_in,))

    assert torch.autograd.gradcheck(run, (x, m), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("fft", FFTS)
def test_gradcheck_generator_float64(fft: str) -> None:
    prompt = _prompt("generator", fft, 6, channels=1, generator_hidden=2).double()
    _randomise(prompt)
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True) + 0.1
    assert torch.autograd.gradcheck(prompt, (x,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- radial


@pytest.mark.parametrize("size", [16, 17, 32])
@pytest.mark.parametrize("fft", FFTS)
def test_radial_hermitian_by_construction_and_identity_at_init(fft: str, size: int) -> None:
    prompt = _prompt("radial", fft, size)
    x = torch.rand(2, 3, size, size)
    assert (prompt(x) - x).abs().max().item() < 1e-5
    assert torch.equal(prompt.multiplier(), torch.ones(3, *prompt.spectrum_shape))
    _randomise(prompt)
    m = prompt.multiplier().double()
    assert (m - 1).abs().max() > 0.05
    # M(k) = M(−k) on every stored frequency whose conjugate is stored too, without symmetrisation
    mirrored = m.index_select(-2, prompt.mirror_rows).index_select(-1, prompt.mirror_cols)
    both = prompt.self_conjugate_cols
    torch.testing.assert_close(m[..., both], mirrored[..., both], atol=1e-7, rtol=0)
    # a function of |k| only: equal radii, equal M
    r = radial_frequency(size, fft)
    for radius in torch.unique(r)[:20]:
        values = m[0][r == radius]
        assert (values - values[0]).abs().max() < 1e-6
    # the full complex inverse of the prompted spectrum is real: no hidden symmetrisation by .real
    if fft == "fft2":
        spectrum = torch.fft.fft2(x.double(), norm="ortho") * torch.fft.ifftshift(m, dim=(-2, -1))
        assert torch.fft.ifft2(spectrum, norm="ortho").imag.abs().max().item() < 1e-10


def test_radial_one_ring_raised_changes_only_frequencies_near_that_ring() -> None:
    size, rings, j = 64, 8, 3
    prompt = _prompt("radial", "rfft2", size, radial_bands=rings, eps=0.5).double()
    with torch.no_grad():
        prompt.m[:, j] = 3.0
    m = prompt.multiplier()[0]
    r = radial_frequency(size, "rfft2")
    c = ring_centres(rings, 1.0)
    near = (r > c[j - 1]) & (r < c[j + 1])
    assert torch.all(m[~near] == 1.0)
    assert torch.all(m[near] > 1.0)
    at_centre = (r - c[j]).abs() < 0.02
    assert at_centre.any() and torch.allclose(m[at_centre], torch.tensor(1 + 0.5 * math.tanh(3.0), dtype=m.dtype),
                                              atol=0.5 * 0.02 / (1 / rings))
    # and the image changes only there: |Y| / |X| = 1 away from the ring
    x = torch.rand(1, 3, size, size, dtype=torch.float64)
    spec = lambda t: torch.fft.fftshift(torch.fft.rfft2(t, norm="ortho"), dim=-2)[0, 0]  # noqa: E731
    ratio = spec(prompt(x)).abs() / spec(x).abs()
    assert (ratio[~near] - 1).abs().max() < 1e-8
    assert (ratio[near] - 1).min() > 1e-3


def test_radial_band_is_a_disc() -> None:
    prompt = _prompt("radial", "fft2", 32, band=0.5)
    _randomise(prompt)
    r = radial_frequency(32, "fft2")
    m = prompt.multiplier()
    assert torch.equal(prompt.band_mask.bool(), r <= 0.5)
    assert torch.all(m[:, r > 0.5] == 1.0) and (m[:, r <= 0.5] != 1.0).any()
    assert torch.allclose(ring_centres(4, 0.5), torch.tensor([0.0625, 0.1875, 0.3125, 0.4375], dtype=torch.float64))


def test_radial_bad_ring_counts_name_the_field() -> None:
    with pytest.raises(ValueError, match="prompt.radial_bands"):
        _prompt("radial", radial_bands=1)
    # 16 px, band 0.25: |k| <= 2 holds 4 distinct radii (0, 1, √2, 2)
    _prompt("radial", size=16, band=0.25, radial_bands=4)
    with pytest.raises(ValueError, match="prompt.radial_bands=5 is larger than the 4 distinct"):
        _prompt("radial", size=16, band=0.25, radial_bands=5)
    with pytest.raises(ConfigError, match="prompt.radial_bands"):
        config_from_dict({"prompt": {"param": "radial", "radial_bands": 1}})


def test_probe_init_bad_inputs_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prompt.probe_file"):
        config_from_dict({"prompt": {"param": "radial", "init": "probe"}})
    with pytest.raises(ConfigError, match="prompt.init"):
        config_from_dict({"prompt": {"param": "free", "init": "probe", "probe_file": "x.json"}})
    with pytest.raises(ValueError, match="prompt.probe_file"):
        _prompt("radial", init="probe")
    with pytest.raises(FileNotFoundError, match="prompt.probe_file"):
        _prompt("radial", init="probe", probe_file=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bands": []}))
    with pytest.raises(ValueError, match="prompt.probe_file"):
        _prompt("radial", init="probe", probe_file=str(bad))


def test_probe_init_amplifies_the_bands_the_teacher_prefers(tmp_path: Path) -> None:
    accuracies = [0.6, 0.5, 0.4, 0.3]  # mean 0.45, max |dev| 0.15
    bands = [{"kind": "bandpass", "range": [i / 4, (i + 1) / 4], "balanced_accuracy": a} for i, a in enumerate(accuracies)]
    bands.append({"kind": "lowpass", "range": [0.0, 1.0], "balanced_accuracy": 0.9})  # ignored by the rule
    file = tmp_path / "frequency_preference.json"
    file.write_text(json.dumps({"baseline": {"balanced_accuracy": 0.7}, "bands": bands}))
    prompt = _prompt("radial", "rfft2", 32, radial_bands=4, init="probe", probe_file=str(file), probe_scale=0.75, eps=0.5)
    d = torch.tensor([1.0, 1 / 3, -1 / 3, -1.0])  # (a − ā) / max|a − ā| at the same centres
    torch.testing.assert_close(prompt.m, (0.75 * d).expand(3, 4).float())
    m = prompt.multiplier()
    r = radial_frequency(32, "rfft2")
    assert m[0][r < 0.1].min() > 1.3 and m[0][(r > 0.9) & (r <= 1)].max() < 0.7  # 1 ± 0.5·tanh(0.75) at the ends
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32)
        low_share = lambda t: torch.fft.rfft2(t, norm="ortho")[..., :3, :3].abs().pow(2).sum()  # noqa: E731
        assert low_share(prompt(x) - x.mean()) > low_share(x - x.mean())


def test_mask_statistics_and_radial_profile() -> None:
    prompt = _prompt("free", "rfft2", 16, eps=0.5)
    stats = mask_statistics(prompt)
    assert stats == {"min": 1.0, "max": 1.0, "dev": 0.0}
    with torch.no_grad():
        prompt.m.fill_(math.atanh(-0.4))  # M = 0.8 on the band
    stats = mask_statistics(prompt)
    assert stats["min"] == pytest.approx(0.8) and stats["max"] == pytest.approx(0.8)
    assert stats["dev"] == pytest.approx(0.2, rel=1e-5)
    assert stats["dev"] ** 2 == pytest.approx(prompt.regularizer().item() / (prompt.gamma * 3), rel=1e-5)
    radial = _prompt("radial", "rfft2", 32, radial_bands=4)
    with torch.no_grad():
        radial.m[1, 0] = 2.0
    for fft in FFTS:
        other = _prompt("radial", fft, 32, radial_bands=4)
        other.load_state_dict(radial.state_dict())
        radii, profile = radial_profile(other.multiplier(), fft)
        assert profile.shape == (3, radii.size) and radii[0] == 0.0 and radii.max() > 1.0
        assert np.allclose(profile[[0, 2]], 1.0) and profile[1, 0] > 1.4 and profile[1, -1] == pytest.approx(1.0)
        if fft == "rfft2":
            first = profile
        else:
            np.testing.assert_allclose(profile, first, atol=1e-6)  # layout-independent
    with pytest.raises(ValueError, match="width"):
        radial_profile(torch.ones(3, 16, 16), "rfft2")


def test_prompt_mask_plot_has_frequency_axes_and_profile(tmp_path: Path) -> None:
    from fopro_kd.plots import plot_prompt_mask

    prompt = _prompt("radial", "rfft2", 32)
    _randomise(prompt)
    path = plot_prompt_mask(prompt.multiplier().detach(), tmp_path / "mask.png", fft="rfft2")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="width"):
        plot_prompt_mask(torch.ones(3, 32, 32), tmp_path / "bad.png", fft="rfft2")


def test_radial_multiplier_and_regularizer_ignore_a_callers_autocast() -> None:
    prompt = _prompt("radial", "rfft2", 32)
    with torch.no_grad():
        prompt.m.fill_(0.01)  # M − 1 = 0.005: below bf16's resolution near 1
    exact = prompt.regularizer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = prompt.regularizer()
        m = prompt.multiplier()
    assert m.dtype == torch.float32
    torch.testing.assert_close(under, exact)
