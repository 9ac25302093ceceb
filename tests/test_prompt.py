"""Fourier Prompt Generator: identity at init, phase kept, bounded and band-limited multiplier, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import functional_call

from fopro_kd.config import PromptConfig, TeacherConfig
from fopro_kd.models.teacher import build_teacher
from fopro_kd.prompt import FourierPrompt, band_mask, build_prompt

PARAMS = ("free", "generator")
FFTS = ("rfft2", "fft2")


def _prompt(param: str = "free", fft: str = "rfft2", size: int = 32, channels: int = 3, **kw) -> FourierPrompt:
    return FourierPrompt(PromptConfig(param=param, fft=fft, **kw), image_size=size, channels=channels)


def _randomise(prompt: FourierPrompt, scale: float = 2.0, seed: int = 0) -> None:
    """Move the prompt away from the identity (every parameter, including the zero-init last layer)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (scale if prompt.param == "free" else 0.5))


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


def test_regularizer_is_gamma_mean_squared_deviation() -> None:
    prompt = _prompt("free", gamma=0.3)
    _randomise(prompt)
    expected = 0.3 * (prompt.multiplier() - 1).pow(2).mean()
    reg = prompt.regularizer()
    assert reg.ndim == 0
    torch.testing.assert_close(reg, expected)
    reg.backward()
    assert prompt.m.grad is not None and prompt.m.grad.abs().sum() > 0


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
