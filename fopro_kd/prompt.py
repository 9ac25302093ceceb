"""Fourier Prompt Generator (FPG): a learned, bounded re-weighting of an image's amplitude spectrum.

This is the project's own reconstruction (method.md §2.2, [design]); the paper's FPG code was
never released, so every choice below is a :class:`~fopro_kd.config.PromptConfig` option to be
ablated rather than assumed.

Per channel, with 𝒮 the centring shift and ℱ the 2-D DFT::

    X = 𝒮(ℱ(x)),  A = |X|,  Φ = arg X
    M = 1 + ε · tanh(m)                       (M = 1 at init: the prompt starts as the identity)
    x̃ = Re ℱ⁻¹( 𝒮⁻¹(M ⊙ A) · e^{iΦ} )

Only the amplitude is changed; the phase, which carries most of an image's semantics, is kept.
The prompted image x̃ feeds only the frozen teacher, so the prompt learns which frequencies the
teacher "prefers" for the target dataset (amplify: M > 1, attenuate: M < 1).

Implementation choices (all documented because the paper does not fix them):

- ``fft="rfft2"`` works on the half spectrum (H, W//2+1), shifted along H only (the half axis
  already starts at DC); ``fft="fft2"`` on the full, doubly shifted spectrum. The inverse always
  gets ``s=(H, W)`` (odd widths come back one column short otherwise, libraries.md §4).
- A real image has a Hermitian spectrum, X(−k) = conj X(k). A multiplier that is not symmetric
  would be symmetrised implicitly by taking the real part, so M is symmetrised explicitly,
  M(k) ← (M(k) + M(−k))/2: ``multiplier()`` then returns exactly the re-weighting applied, and
  the output is real before ``.real`` is taken. The average stays in [1 − ε, 1 + ε].
- Because M is real and positive, 𝒮⁻¹(M ⊙ A)·e^{iΦ} = 𝒮⁻¹(M) ⊙ ℱ(x) exactly; the code uses the
  right-hand side, which avoids differentiating ``angle()`` at zero-amplitude frequencies.
- ``band`` β ∈ (0, 1]: M is learned only on frequencies with |k_h|, |k_w| ≤ ⌊βH⌋/2 (a centred,
  DC-symmetric low-frequency square; β = 1 is the whole spectrum) and fixed to 1 outside,
  through a fixed mask buffer.
- ``param="free"``: one tensor m per channel and frequency, learned per dataset.
  ``param="generator"``: a small conv net maps the image's centred log-amplitude to m (one
  prompt per image); its last layer is zero-initialised so that M = 1 at init as well.
- FFTs use ``norm="ortho"`` (Parseval), so the generator's input scale does not grow with the
  image size, and run in float32 or float64 with autocast disabled (half-precision FFTs are
  restricted to power-of-two sizes on CUDA).

``cfg.domain`` (apply the prompt to raw [0, 1] pixels then normalise, or to normalised pixels)
is handled by the caller: this module transforms whatever tensor it is given. It also expects
the teacher's input size: the trainer resizes to ``teacher.input_size`` first, and any other
size raises ``ValueError`` instead of being silently resampled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fopro_kd.config import PromptConfig

__all__ = ["FourierPrompt", "build_prompt", "band_mask"]

_PARAMS = ("free", "generator")
_FFTS = ("rfft2", "fft2")


def band_mask(image_size: int, band: float, fft: str) -> Tensor:
    """Mask (H, W') of the frequencies where the multiplier is learned, in the shifted layout.

    Parameters
    ----------
    image_size
        H = W of the (square) image.
    band
        β ∈ (0, 1]; frequencies with |k_h| ≤ r and |k_w| ≤ r, r = ⌊⌊βH⌋/2⌋, are learnable. The
        square is symmetric about DC so that the symmetrised multiplier stays 1 outside it.
    fft
        ``"rfft2"`` (W' = W//2 + 1, column j is frequency j) or ``"fft2"`` (W' = W, centred).

    Returns
    -------
    Tensor
        float32 mask with 1 inside the band and 0 outside.
    """
    if not 0.0 < band <= 1.0:
        raise ValueError(f"prompt.band must be in (0, 1], got {band!r}")
    size = image_size
    radius = int(math.floor(band * size + 1e-9)) // 2
    k_h = torch.arange(size) - size // 2
    if fft == "rfft2":
        k_w = torch.arange(size // 2 + 1)
    else:
        k_w = torch.arange(size) - size // 2
    inside = (k_h.abs()[:, None] <= radius) & (k_w.abs()[None, :] <= radius)
    return inside.float()


class _SpectrumGenerator(nn.Module):
    """Small conv net: centred log-amplitude (B, C, H, W') -> pre-activation m (B, C, H, W').

    The last 1x1 convolution starts at zero, so m = 0 and the prompt is the identity at init;
    it is the only layer with a non-zero gradient at the first step (as in zero-initialised
    residual/control branches), after which the whole net trains.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        last = self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, log_amplitude: Tensor) -> Tensor:
        return self.net(log_amplitude)


class FourierPrompt(nn.Module):
    """Fourier Prompt Generator: x̃ = Re ℱ⁻¹(𝒮⁻¹(M ⊙ A) · e^{iΦ}) with M = 1 + ε·tanh(m).

    Parameters
    ----------
    cfg
        ``prompt`` config section (``param``, ``eps``, ``band``, ``fft``, ``gamma``,
        ``generator_hidden``; ``domain``/``scope``/``lr`` are used by the caller).
    image_size
        Square size H = W of the images the prompt receives (the teacher's input size).
    channels
        Number of image channels.
    """

    band_mask: Tensor
    mirror_rows: Tensor
    mirror_cols: Tensor
    self_conjugate_cols: Tensor

    def __init__(self, cfg: PromptConfig, image_size: int, channels: int = 3) -> None:
        super().__init__()
        if cfg.param not in _PARAMS:
            raise ValueError(f"prompt.param must be one of {list(_PARAMS)}, got {cfg.param!r}")
        if cfg.fft not in _FFTS:
            raise ValueError(f"prompt.fft must be one of {list(_FFTS)}, got {cfg.fft!r}")
        if not 0.0 < cfg.eps <= 1.0:
            raise ValueError(f"prompt.eps must be in (0, 1] (M = 1 + eps*tanh(m) must stay positive), got {cfg.eps!r}")
        if cfg.gamma < 0:
            raise ValueError(f"prompt.gamma must be >= 0, got {cfg.gamma!r}")
        if not isinstance(image_size, int) or image_size < 2:
            raise ValueError(f"prompt image_size must be an integer >= 2 (the teacher input size), got {image_size!r}")
        if channels < 1:
            raise ValueError(f"prompt channels must be >= 1, got {channels!r}")
        self.param = cfg.param
        self.fft = cfg.fft
        self.eps = float(cfg.eps)
        self.band = float(cfg.band)
        self.gamma = float(cfg.gamma)
        self.domain = cfg.domain
        self.image_size = image_size
        self.channels = channels
        width = image_size // 2 + 1 if cfg.fft == "rfft2" else image_size
        self.spectrum_shape = (image_size, width)

        # Fixed, config-derived buffers: non-persistent so that the state dict (what a
        # `federated` scope would aggregate) holds only the learnable prompt.
        self.register_buffer("band_mask", band_mask(image_size, cfg.band, cfg.fft), persistent=False)
        centre = 2 * (image_size // 2)
        mirror = (centre - torch.arange(image_size)) % image_size  # index of -k in the shifted layout
        self.register_buffer("mirror_rows", mirror, persistent=False)
        self.register_buffer("mirror_cols", mirror if cfg.fft == "fft2" else torch.arange(width), persistent=False)
        self_conj = torch.zeros(width, dtype=torch.bool)
        if cfg.fft == "rfft2":
            self_conj[0] = True  # DC column pairs with itself (rows k and -k)
            if image_size % 2 == 0:
                self_conj[-1] = True  # Nyquist column likewise
        else:
            self_conj[:] = True
        self.register_buffer("self_conjugate_cols", self_conj, persistent=False)

        self.m: nn.Parameter | None = None
        self.generator: _SpectrumGenerator | None = None
        if cfg.param == "free":
            self.m = nn.Parameter(torch.zeros(channels, *self.spectrum_shape))
        else:
            if cfg.generator_hidden < 1:
                raise ValueError(f"prompt.generator_hidden must be >= 1, got {cfg.generator_hidden!r}")
            self.generator = _SpectrumGenerator(channels, cfg.generator_hidden)

    # ------------------------------------------------------------------ spectra

    def _check_input(self, x: Tensor) -> None:
        expected = (self.channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"FourierPrompt was built for (B, {expected[0]}, {expected[1]}, {expected[2]}) inputs but got "
                f"{tuple(x.shape)}; resize the batch to the teacher input size ({self.image_size}) before the prompt "
                "(the prompt's image_size must equal teacher.input_size)"
            )

    def _forward_fft(self, x: Tensor) -> Tensor:
        if self.fft == "rfft2":
            return torch.fft.rfft2(x, norm="ortho")
        return torch.fft.fft2(x, norm="ortho")

    def _shift(self, spectrum: Tensor) -> Tensor:
        dims = (-2,) if self.fft == "rfft2" else (-2, -1)
        return torch.fft.fftshift(spectrum, dim=dims)

    def _unshift(self, spectrum: Tensor) -> Tensor:
        dims = (-2,) if self.fft == "rfft2" else (-2, -1)
        return torch.fft.ifftshift(spectrum, dim=dims)

    def _inverse_fft(self, spectrum: Tensor) -> Tensor:
        size = (self.image_size, self.image_size)
        if self.fft == "rfft2":
            return torch.fft.irfft2(spectrum, s=size, norm="ortho")
        return torch.fft.ifft2(spectrum, s=size, norm="ortho").real

    @staticmethod
    def _work_dtype(x: Tensor) -> torch.dtype:
        return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

    def _symmetrise(self, t: Tensor) -> Tensor:
        """(t(k) + t(−k)) / 2 in the shifted layout, on the frequencies whose conjugate is stored."""
        mirrored = t.index_select(-2, self.mirror_rows).index_select(-1, self.mirror_cols)
        mirrored = torch.where(self.self_conjugate_cols, mirrored, t)
        return 0.5 * (t + mirrored)

    def _multiplier_from_m(self, m: Tensor) -> Tensor:
        return 1.0 + self.eps * self.band_mask.to(m.dtype) * self._symmetrise(torch.tanh(m))

    def _raw_m(self, x: Tensor | None) -> Tensor:
        if self.m is not None:
            return self.m
        if x is None:
            raise ValueError("prompt.param is 'generator': the multiplier depends on the image, pass x")
        self._check_input(x)
        generator = self.generator
        if generator is None:  # pragma: no cover - __init__ builds exactly one of m / generator
            raise RuntimeError("FourierPrompt has neither a free multiplier nor a generator")
        work = x.to(self._work_dtype(x))
        with torch.autocast(device_type=work.device.type, enabled=False):
            log_amp = torch.log1p(self._shift(self._forward_fft(work)).abs())
            log_amp = log_amp - log_amp.mean(dim=(-2, -1), keepdim=True)  # centre per image and channel
            return generator(log_amp.to(self._param_dtype()))

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------ public API

    def forward(self, x: Tensor) -> Tensor:
        """Prompted image x̃ (same shape and dtype as ``x``), real and differentiable end to end."""
        self._check_input(x)
        dtype = self._work_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            work = x.to(dtype)
            spectrum = self._forward_fft(work)
            multiplier = self._multiplier_from_m(self._raw_m(x)).to(dtype)  # (C,H,W') or (B,C,H,W')
            prompted = spectrum * self._unshift(multiplier)  # = 𝒮⁻¹(M ⊙ A) · e^{iΦ}
            out = self._inverse_fft(prompted)
        return out.to(x.dtype)

    def multiplier(self, x: Tensor | None = None) -> Tensor:
        """The applied multiplier M (C, H, W') in the shifted layout, DC at row H//2 (for plots).

        For ``param="generator"`` M depends on the image: ``x`` is required and the batch mean is
        returned.
        """
        multiplier = self._multiplier_from_m(self._raw_m(x))
        return multiplier.mean(dim=0) if multiplier.ndim == 4 else multiplier

    def regularizer(self, x: Tensor | None = None) -> Tensor:
        """Identity regulariser R = γ · mean((M − 1)²), a scalar (per-image M for the generator)."""
        multiplier = self._multiplier_from_m(self._raw_m(x))
        return self.gamma * (multiplier - 1.0).pow(2).mean()

    def extra_repr(self) -> str:
        return (
            f"param={self.param!r}, fft={self.fft!r}, image_size={self.image_size}, channels={self.channels}, "
            f"eps={self.eps}, band={self.band}, gamma={self.gamma}, domain={self.domain!r}"
        )


def build_prompt(cfg: PromptConfig, image_size: int) -> FourierPrompt:
    """Build the FPG for RGB images of the teacher's input size ``image_size``."""
    return FourierPrompt(cfg, image_size=image_size, channels=3)
