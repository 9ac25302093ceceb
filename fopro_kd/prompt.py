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
- Radial frequency: r(k) = |k| / (H/2), |k| = √(k_h² + k_w²) in cycles per image, so r = 1 is
  the Nyquist frequency on either axis and the spectrum's corners reach r = √2.
- ``param="free"``: one tensor m per channel and frequency, learned per dataset.
  ``param="generator"``: a small conv net maps the image's centred log-amplitude to m (one
  prompt per image); its last layer is zero-initialised so that M = 1 at init as well.
  ``param="radial"``: m has K = ``radial_bands`` entries per channel, one per frequency ring.
  The rings split [0, β] into K equal rings with centres c_j = (j + ½)·β/K; the ring values
  v_j = 1 + ε·tanh(m_j) are interpolated linearly in r between neighbouring centres (held at
  v_0 below c_0 and at v_{K−1} between c_{K−1} and β). M is then a function of |k| only, hence
  Hermitian-symmetric by construction (no symmetrisation needed), smooth in r, within
  [1 − ε, 1 + ε] (a convex combination of ring values), and 3·K parameters instead of ~3·H²/2.
- ``band`` β ∈ (0, 1], fixed to M = 1 outside through a fixed mask buffer (``band_mask``):
  ``free`` / ``generator``: a centred, DC-symmetric low-frequency square |k_h|, |k_w| ≤ ⌊βH⌋/2
  (method.md's definition, kept so that earlier runs mean what they meant);
  ``radial``: the disc r ≤ β (a square would break "a function of |k| only"). β = 1 is the whole
  spectrum for every parameterisation (for ``radial`` the corners r > 1 take the outermost ring's
  value).
- ``init="probe"`` (``radial`` only) starts m from a frequency-preference probe result
  (``fopro-kd probe``, :func:`probe_ring_init`) instead of 0.
- Regulariser (method.md writes γ‖M − 1‖²)::

      R(M) = γ · Σ_c Σ_{k ∈ band} w_k (M_c(k) − 1)²,   w_k = μ_k / Σ_{k' ∈ band} μ_k'

  where μ_k is the number of full-spectrum frequencies a stored entry stands for (2 for an
  ``rfft2`` column whose conjugate is not stored, else 1): the same M gives the same R under
  ``rfft2`` and ``fft2``. A uniform deviation δ on the band gives R = γ·C·δ² whatever the image
  size or band (the plain ‖·‖² grows with H², 25k entries at 128 px; the old mean over all
  entries was 1/C of this and, at γ = 1e-3, ~1e-4 at δ = 0.3: off in effect). The default γ = 0.1
  makes a uniform ±0.3 cost 0.027 (2 % of a cross-entropy of ~1.2) and the bound ε = 0.5 cost
  0.075: the prompt can move where the objective gains, and is still pulled back where it does
  not. For the generator R is averaged over the images of the batch.
- FFTs use ``norm="ortho"`` (Parseval), so the generator's input scale does not grow with the
  image size, and run in float32 or float64 with autocast disabled (half-precision FFTs are
  restricted to power-of-two sizes on CUDA).

``cfg.domain`` (apply the prompt to raw [0, 1] pixels then normalise, or to normalised pixels)
is handled by the caller: this module transforms whatever tensor it is given. The tensor passed
to :meth:`FourierPrompt.regularizer` must be the one passed to :meth:`FourierPrompt.forward`
(:func:`prompt_input` builds it), or :meth:`FourierPrompt.forward_with_regularizer` returns both
from one multiplier. The prompt also expects the teacher's input size: the trainer resizes to
``teacher.input_size`` first, and any other size raises ``ValueError`` instead of being silently
resampled.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from fopro_kd.config import PromptConfig

__all__ = [
    "FourierPrompt",
    "band_mask",
    "build_prompt",
    "mask_statistics",
    "prompt_input",
    "probe_ring_init",
    "radial_band_mask",
    "radial_frequency",
    "radial_profile",
    "ring_centres",
    "ring_weights",
    "spectrum_multiplicity",
]

logger = logging.getLogger("fopro_kd.prompt")

_PARAMS = ("free", "generator", "radial")
_FFTS = ("rfft2", "fft2")
_INITS = ("identity", "probe")


# --------------------------------------------------------------------------- frequency grids


def _check_fft(fft: str) -> None:
    if fft not in _FFTS:
        raise ValueError(f"prompt.fft must be one of {list(_FFTS)}, got {fft!r}")


def _frequency_indices(image_size: int, fft: str) -> tuple[Tensor, Tensor]:
    """Signed frequencies (cycles per image) of the rows and columns of the shifted layout."""
    _check_fft(fft)
    k_h = torch.arange(image_size) - image_size // 2
    k_w = torch.arange(image_size // 2 + 1) if fft == "rfft2" else torch.arange(image_size) - image_size // 2
    return k_h, k_w


def radial_frequency(image_size: int, fft: str) -> Tensor:
    """r(k) = |k| / (H/2) (float64, shape (H, W')) in the shifted layout: 1 = Nyquist, √2 at the corners."""
    k_h, k_w = _frequency_indices(image_size, fft)
    k2 = (k_h[:, None] ** 2 + k_w[None, :] ** 2).double()
    return k2.sqrt() / (image_size / 2.0)


def spectrum_multiplicity(image_size: int, fft: str) -> Tensor:
    """How many full-spectrum frequencies each stored entry stands for (float64, (H, W')).

    ``fft2`` stores every frequency once. ``rfft2`` stores columns k_w = 0 (and k_w = W/2 for an
    even width) in full and the other columns for both k and −k, so those count twice. The sum is
    H·W for both layouts, which makes weighted means layout-independent.
    """
    _check_fft(fft)
    width = image_size // 2 + 1 if fft == "rfft2" else image_size
    mult = torch.ones(image_size, width, dtype=torch.float64)
    if fft == "rfft2":
        mult[:, 1:] = 2.0
        if image_size % 2 == 0:
            mult[:, -1] = 1.0
    return mult


def band_mask(image_size: int, band: float, fft: str) -> Tensor:
    """Mask (H, W') of the frequencies where the ``free``/``generator`` multiplier is learned (shifted layout).

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
    radius = int(math.floor(band * image_size + 1e-9)) // 2
    k_h, k_w = _frequency_indices(image_size, fft)
    inside = (k_h.abs()[:, None] <= radius) & (k_w.abs()[None, :] <= radius)
    return inside.float()


def radial_band_mask(image_size: int, band: float, fft: str) -> Tensor:
    """Mask (H, W') of the ``radial`` prompt's learnable disc r ≤ β (β = 1: every frequency, corners included)."""
    if not 0.0 < band <= 1.0:
        raise ValueError(f"prompt.band must be in (0, 1], got {band!r}")
    r = radial_frequency(image_size, fft)
    if band >= 1.0:
        return torch.ones(r.shape, dtype=torch.float32)
    return (r <= band + 1e-12).float()


def ring_centres(num_rings: int, band: float) -> Tensor:
    """Centres c_j = (j + ½)·β/K (fraction of Nyquist, float64) of K equal rings on [0, β]."""
    return (torch.arange(num_rings, dtype=torch.float64) + 0.5) * (band / num_rings)


def ring_weights(image_size: int, num_rings: int, band: float, fft: str) -> Tensor:
    """Linear interpolation weights (K, H, W') from ring values to frequencies (float64).

    Inside the disc r ≤ β the K weights of a frequency sum to 1 and at most two neighbouring rings
    are non-zero; outside it they are all 0 (there M = 1). r is clamped to β, so with β = 1 the
    corners r > 1 take the outermost ring's value.
    """
    inside = radial_band_mask(image_size, band, fft).bool()
    r = radial_frequency(image_size, fft).clamp(max=band)
    position = (r / (band / num_rings) - 0.5).clamp(0.0, num_rings - 1.0)  # in ring-centre units
    lower = position.floor().long().clamp(max=num_rings - 1)
    frac = position - lower.double()
    upper = (lower + 1).clamp(max=num_rings - 1)
    weights = torch.zeros(num_rings, *r.shape, dtype=torch.float64)
    weights.scatter_add_(0, lower[None], (1.0 - frac)[None])
    weights.scatter_add_(0, upper[None], frac[None])
    return weights * inside[None]


def distinct_radii(image_size: int, band: float, fft: str) -> int:
    """Number of distinct radial frequencies |k| inside the radial disc r ≤ β (exact, from k_h² + k_w²)."""
    k_h, k_w = _frequency_indices(image_size, fft)
    k2 = k_h[:, None] ** 2 + k_w[None, :] ** 2
    inside = radial_band_mask(image_size, band, fft).bool()
    return int(torch.unique(k2[inside]).numel())


# --------------------------------------------------------------------------- probe initialisation


def probe_ring_init(path: str | Path, centres: np.ndarray | Tensor, scale: float) -> np.ndarray:
    """Initial ring pre-activations m0 (K,) from a ``frequency_preference.json`` (``fopro-kd probe``).

    Rule: with a_b the balanced accuracy of the teacher on band-passed inputs of probe band b
    (radial range [lo_b, hi_b]) and ā their mean over bands,

        d_b = (a_b − ā) / max_b |a_b − ā|  ∈ [−1, 1],    m0_j = scale · d(c_j),

    where d(c_j) is d interpolated linearly at the prompt's ring centre c_j from the probe band
    centres (held constant beyond the outermost ones). The initial multiplier of ring j is
    1 + ε·tanh(m0_j): bands from which the teacher reads the classes better than on average are
    amplified, the others attenuated, the best and worst by ε·tanh(scale). Equal accuracies give
    the identity.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing file, not a probe result, or no band-pass entry; the message names ``prompt.probe_file``.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompt.probe_file: {file} does not exist (write it with `fopro-kd probe`)")
    try:
        payload = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"prompt.probe_file: {file} is not a JSON file ({exc})") from exc
    entries = payload.get("bands") if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"prompt.probe_file: {file} is not a frequency_preference.json (no 'bands' list)")
    band_centres, accuracies = [], []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kind") != "bandpass":
            continue
        acc = entry.get("balanced_accuracy")
        lo_hi = entry.get("range")
        if acc is None or not isinstance(lo_hi, (list, tuple)) or len(lo_hi) != 2:
            continue
        band_centres.append(0.5 * (float(lo_hi[0]) + float(lo_hi[1])))
        accuracies.append(float(acc))
    if not accuracies:
        raise ValueError(f"prompt.probe_file: {file} has no band-pass entry with a balanced_accuracy")
    order = np.argsort(band_centres)
    xs = np.asarray(band_centres, dtype=np.float64)[order]
    acc_arr = np.asarray(accuracies, dtype=np.float64)[order]
    dev = acc_arr - acc_arr.mean()
    spread = float(np.max(np.abs(dev)))
    if spread < 1e-12:
        logger.warning("prompt.probe_file %s: every band has the same accuracy; the prompt starts at the identity", file)
        d = np.zeros_like(dev)
    else:
        d = dev / spread
    c = np.asarray(centres.detach().cpu().numpy() if isinstance(centres, Tensor) else centres, dtype=np.float64)
    return np.clip(scale * np.interp(c, xs, d), -abs(scale), abs(scale))


# --------------------------------------------------------------------------- modules


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
        ``generator_hidden``, ``radial_bands``, ``init``, ``probe_file``, ``probe_scale``;
        ``domain``/``scope``/``lr`` are used by the caller).
    image_size
        Square size H = W of the images the prompt receives (the teacher's input size).
    channels
        Number of image channels.

    Raises
    ------
    ValueError
        An option out of range, named by its config field (e.g. ``prompt.radial_bands`` larger
        than the number of distinct radial frequencies inside the band).
    """

    band_mask: Tensor
    reg_weights: Tensor
    mirror_rows: Tensor
    mirror_cols: Tensor
    self_conjugate_cols: Tensor
    radial_weights: Tensor

    def __init__(self, cfg: PromptConfig, image_size: int, channels: int = 3) -> None:
        super().__init__()
        if cfg.param not in _PARAMS:
            raise ValueError(f"prompt.param must be one of {list(_PARAMS)}, got {cfg.param!r}")
        _check_fft(cfg.fft)
        if not 0.0 < cfg.eps <= 1.0:
            raise ValueError(f"prompt.eps must be in (0, 1] (M = 1 + eps*tanh(m) must stay positive), got {cfg.eps!r}")
        if not 0.0 < cfg.band <= 1.0:
            raise ValueError(f"prompt.band must be in (0, 1], got {cfg.band!r}")
        if cfg.gamma < 0:
            raise ValueError(f"prompt.gamma must be >= 0, got {cfg.gamma!r}")
        if not isinstance(image_size, int) or image_size < 2:
            raise ValueError(f"prompt image_size must be an integer >= 2 (the teacher input size), got {image_size!r}")
        if channels < 1:
            raise ValueError(f"prompt.channels must be >= 1, got {channels!r}")
        init = getattr(cfg, "init", "identity")
        if init not in _INITS:
            raise ValueError(f"prompt.init must be one of {list(_INITS)}, got {init!r}")
        if init == "probe" and cfg.param != "radial":
            raise ValueError(f"prompt.init 'probe' needs prompt.param 'radial' (got {cfg.param!r}): the probe "
                             "measures rings of radial frequency")
        self.param = cfg.param
        self.fft = cfg.fft
        self.eps = float(cfg.eps)
        self.band = float(cfg.band)
        self.gamma = float(cfg.gamma)
        self.domain = cfg.domain
        self.image_size = image_size
        self.channels = channels
        self.init = init
        width = image_size // 2 + 1 if cfg.fft == "rfft2" else image_size
        self.spectrum_shape = (image_size, width)

        # Fixed, config-derived buffers: non-persistent so that the state dict holds only the
        # learnable prompt.
        if cfg.param == "radial":
            learnable = radial_band_mask(image_size, cfg.band, cfg.fft)
        else:
            learnable = band_mask(image_size, cfg.band, cfg.fft)
        self.register_buffer("band_mask", learnable, persistent=False)
        weights = spectrum_multiplicity(image_size, cfg.fft) * learnable.double()
        self.register_buffer("reg_weights", (weights / weights.sum()).float(), persistent=False)
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
        self.num_rings = 0
        if cfg.param == "free":
            self.m = nn.Parameter(torch.zeros(channels, *self.spectrum_shape))
        elif cfg.param == "radial":
            self.num_rings = self._check_rings(cfg, image_size)
            self.register_buffer(
                "radial_weights", ring_weights(image_size, self.num_rings, cfg.band, cfg.fft).float(), persistent=False
            )
            self.m = nn.Parameter(torch.zeros(channels, self.num_rings))
            if init == "probe":
                if not cfg.probe_file:
                    raise ValueError("prompt.init is 'probe' but prompt.probe_file is not set (the "
                                     "frequency_preference.json written by `fopro-kd probe`)")
                m0 = probe_ring_init(cfg.probe_file, self.ring_centres(), float(cfg.probe_scale))
                with torch.no_grad():
                    self.m.copy_(torch.as_tensor(m0, dtype=torch.float32).expand(channels, -1))
        else:
            if cfg.generator_hidden < 1:
                raise ValueError(f"prompt.generator_hidden must be >= 1, got {cfg.generator_hidden!r}")
            self.generator = _SpectrumGenerator(channels, cfg.generator_hidden)

    @staticmethod
    def _check_rings(cfg: PromptConfig, image_size: int) -> int:
        rings = getattr(cfg, "radial_bands", None)
        if isinstance(rings, bool) or not isinstance(rings, int) or rings < 2:
            raise ValueError(f"prompt.radial_bands must be an integer >= 2 (rings of radial frequency), got {rings!r}")
        available = distinct_radii(image_size, cfg.band, cfg.fft)
        if rings > available:
            raise ValueError(
                f"prompt.radial_bands={rings} is larger than the {available} distinct radial frequencies inside "
                f"prompt.band={cfg.band} at {image_size} px; use at most {available} rings or a wider band"
            )
        return rings

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
        if self.param == "radial":
            # (C, K) ring values -> (C, H, W'); the weights are 0 outside the disc, so M = 1 there.
            return 1.0 + self.eps * torch.einsum("ck,khw->chw", torch.tanh(m), self.radial_weights.to(m.dtype))
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

    def _full_multiplier(self, x: Tensor | None) -> Tensor:
        """M as applied: (C, H, W') for free/radial, (B, C, H, W') per image for the generator.

        Autocast is off: under a caller's bf16 autocast the radial einsum would otherwise round
        M to bf16 (steps of 2^-8 near 1), coarser than the deviations the regulariser measures.
        """
        device_type = next(self.parameters()).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._multiplier_from_m(self._raw_m(x))

    def _regularizer_of(self, multiplier: Tensor) -> Tensor:
        return self.gamma * self._weighted_sq_deviation(multiplier).sum(dim=-1).mean()

    def _weighted_sq_deviation(self, multiplier: Tensor) -> Tensor:
        """Σ_k w_k (M_c(k) − 1)² per channel (and per image for the generator): shape (C,) or (B, C)."""
        weights = self.reg_weights.to(multiplier.dtype)
        return ((multiplier - 1.0).pow(2) * weights).sum(dim=(-2, -1))

    def _prompted(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_input(x)
        dtype = self._work_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            work = x.to(dtype)
            spectrum = self._forward_fft(work)
            multiplier = self._full_multiplier(x)
            prompted = spectrum * self._unshift(multiplier.to(dtype))  # = 𝒮⁻¹(M ⊙ A) · e^{iΦ}
            out = self._inverse_fft(prompted)
        return out.to(x.dtype), multiplier

    # ------------------------------------------------------------------ public API

    def forward(self, x: Tensor) -> Tensor:
        """Prompted image x̃ (same shape and dtype as ``x``), real and differentiable end to end."""
        return self._prompted(x)[0]

    def forward_with_regularizer(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x̃, R(M)) from one multiplier: the regulariser of exactly the M applied to ``x``."""
        out, multiplier = self._prompted(x)  # M in the parameters' dtype (autocast off in _prompted)
        return out, self._regularizer_of(multiplier)

    def multiplier(self, x: Tensor | None = None) -> Tensor:
        """The applied multiplier M (C, H, W') in the shifted layout, DC at row H//2 (for plots).

        For ``param="generator"`` M depends on the image: ``x`` (the tensor the prompt is applied
        to) is required and the batch mean is returned.
        """
        multiplier = self._full_multiplier(x)
        return multiplier.mean(dim=0) if multiplier.ndim == 4 else multiplier

    def regularizer(self, x: Tensor | None = None) -> Tensor:
        """R = γ · Σ_c Σ_{k∈band} w_k (M_c(k) − 1)² (module docstring), a scalar.

        ``x`` matters for the generator only and must be the very tensor passed to ``forward``
        (with ``domain: normalised``, the normalised image: :func:`prompt_input`); the generator's
        R is the mean over the images of the batch.
        """
        return self._regularizer_of(self._full_multiplier(x))

    def ring_centres(self) -> Tensor:
        """Ring centres (fraction of Nyquist) of the ``radial`` parameterisation (empty otherwise)."""
        if self.param != "radial":
            return torch.zeros(0, dtype=torch.float64)
        return ring_centres(self.num_rings, self.band)

    def extra_repr(self) -> str:
        rings = f", radial_bands={self.num_rings}" if self.param == "radial" else ""
        return (
            f"param={self.param!r}, fft={self.fft!r}, image_size={self.image_size}, channels={self.channels}, "
            f"eps={self.eps}, band={self.band}, gamma={self.gamma}, domain={self.domain!r}{rings}, init={self.init!r}"
        )


def build_prompt(cfg: PromptConfig, image_size: int) -> FourierPrompt:
    """Build the FPG for RGB images of the teacher's input size ``image_size``."""
    return FourierPrompt(cfg, image_size=image_size, channels=3)


# --------------------------------------------------------------------------- callers' helpers


class _TeacherLike(Protocol):
    def resize(self, x01: Tensor) -> Tensor: ...

    def normalize(self, x: Tensor) -> Tensor: ...


def prompt_input(teacher: _TeacherLike, x01: Tensor, domain: str) -> Tensor:
    """The tensor the prompt is applied to: the [0, 1] image resized to the teacher's input, then
    normalised by the teacher when ``domain == "normalised"``. Pass it to both ``forward`` and
    ``regularizer`` so that the generator's R is computed on the M it applies."""
    x = teacher.resize(x01)
    if domain == "raw":
        return x
    if domain == "normalised":
        return teacher.normalize(x)
    raise ValueError(f"prompt.domain must be 'raw' or 'normalised', got {domain!r}")


@torch.no_grad()
def mask_statistics(prompt: FourierPrompt, x: Tensor | None = None) -> dict[str, float]:
    """Where the prompt stands: ``min``/``max`` of the applied M (over every frequency, channel
    and, for the generator, image of ``x``) and ``dev``, the RMS of M − 1 over the learnable
    frequencies with the regulariser's weights, dev = √(R / (γ·C)) (0 at the identity; ε·tanh(|m|)
    for a uniform mask)."""
    multiplier = prompt._full_multiplier(x).float()
    sq = prompt._weighted_sq_deviation(multiplier).mean(dim=-1)  # mean over channels
    return {
        "min": float(multiplier.min()),
        "max": float(multiplier.max()),
        "dev": float(sq.mean().clamp(min=0).sqrt()),
    }


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def radial_profile(multiplier: Any, fft: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean multiplier per radial frequency: (radii as a fraction of Nyquist (R,), profile (C, R)).

    ``multiplier`` is M in the shifted layout, (C, H, W') or (H, W') (tensor or array). Frequencies
    are binned by |k| rounded to whole cycles per image (bin b holds b − ½ ≤ |k| < b + ½, the
    corners included), each entry weighted by the number of full-spectrum frequencies it stands for.
    """
    values = _as_numpy(multiplier)
    if values.ndim == 2:
        values = values[None]
    if values.ndim != 3:
        raise ValueError(f"multiplier must have shape (C, H, W') or (H, W'), got {values.shape}")
    size = values.shape[-2]
    width = size // 2 + 1 if fft == "rfft2" else size
    _check_fft(fft)
    if values.shape[-1] != width:
        raise ValueError(f"multiplier of height {size} in the {fft!r} layout must have width {width}, got {values.shape[-1]}")
    k_h, k_w = _frequency_indices(size, fft)
    k = np.sqrt((k_h[:, None] ** 2 + k_w[None, :] ** 2).double().numpy())
    bins = np.rint(k).astype(np.int64).ravel()
    mult = spectrum_multiplicity(size, fft).numpy().ravel()
    count = np.bincount(bins, weights=mult)
    present = np.flatnonzero(count > 0)
    profile = np.stack([np.bincount(bins, weights=mult * ch.ravel())[present] / count[present] for ch in values])
    return present / (size / 2.0), profile
