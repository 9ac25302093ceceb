"""Frequency-preference probe: which radial frequency bands a frozen teacher reads the site's classes from.

The FoPro-KD abstract's observation (pre-trained models have *frequency preferences*) made into a
measurement a hospital runs before training (``fopro-kd probe --config FILE``), and into an
initialisation of the radial Fourier prompt (``prompt.init: probe``, :func:`fopro_kd.prompt.probe_ring_init`).

Protocol (all choices ours, [design]):

1. Data: the config's **training split** (``build_splits``, decode-once cache), optionally
   subsampled to ``probe.max_images`` by class-balanced water-filling (every class keeps
   min(n_c, cap) images, the cap as large as the budget allows), so rare classes keep all their
   images. It is split into a fit part and a held-out part with ``probe.holdout_fraction`` of
   every class, **by whole groups** (HAM10000: lesions; :func:`stratified_group_split`), so no
   lesion is in both. Val/test are never read.
2. Filters, per image at the teacher's input size, on raw [0, 1] pixels (the prompt's default
   ``domain``), then the teacher's own normalisation: keep the frequencies with
   lo ≤ r < hi (r = |k| / Nyquist, :func:`fopro_kd.prompt.radial_frequency`; hi = 1 keeps
   everything above lo, the spectrum's corners r > 1 included), zero the others (phase kept,
   no clipping). For every band [lo, hi] of ``probe.bands``: a **band-pass** [lo, hi], a
   **low-pass** [0, hi] and a **high-pass** [lo, 1]; the low-pass [0, 1] and the high-pass
   [0, 1] are the unfiltered input (the **baseline**) and are computed once.
3. Classifier: the teacher's pooled features (``teacher_features``, batched, no grad), a
   **nearest-class-mean cosine classifier** fitted on the fit part of the *same* filter and
   scored on the held-out part: features centred by the class-balanced mean of the fit class
   means, L2-normalised, class prototypes = normalised means, prediction = highest cosine. No
   hyper-parameters, no optimisation: the accuracy measures what the frozen teacher's features
   carry about the classes in that band, not a trained probe's capacity. Score: balanced accuracy
   (mean recall over the classes present in the held-out part).
4. Energy: the share of the amplitude energy Σ|X(k)|² in each band, averaged over images and
   channels, with DC (``energy_fraction``) and without it (``energy_fraction_ac``).

Outputs ``frequency_preference.json`` and ``frequency_preference.png`` in the output directory.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fopro_kd.config import Config, probe_bands_problem
from fopro_kd.data import build_splits
from fopro_kd.data.dataset import ImageSet
from fopro_kd.data.splits import stratified_group_split
from fopro_kd.data.transforms import to_float_on
from fopro_kd.models.demo_teacher import demo_teacher_path
from fopro_kd.models.teacher import FrozenTeacher, build_teacher
from fopro_kd.prompt import radial_frequency, spectrum_multiplicity
from fopro_kd.seeding import configure_threads, select_device
from fopro_kd.training.components import planned_teacher
from fopro_kd.training.teacher_view import teacher_features

__all__ = [
    "FilterRange",
    "balanced_subsample",
    "check_bands",
    "filter_images",
    "filter_ranges",
    "format_probe",
    "ncm_balanced_accuracy",
    "plot_frequency_preference",
    "radial_keep_mask",
    "run_probe",
]

logger = logging.getLogger("fopro_kd.probe")

RESULT_JSON = "frequency_preference.json"
RESULT_PNG = "frequency_preference.png"


def check_bands(bands: Any) -> list[tuple[float, float]]:
    """The bands as float pairs sorted by ``lo``; ``ValueError`` naming ``probe.bands`` when unusable."""
    problem = probe_bands_problem(bands)
    if problem is not None:
        raise ValueError(f"probe.bands {problem}")
    return sorted((float(lo), float(hi)) for lo, hi in bands)


def radial_keep_mask(image_size: int, lo: float, hi: float) -> Tensor:
    """0/1 mask (H, W//2+1) in the *unshifted* ``rfft2`` layout keeping lo ≤ r < hi (hi ≥ 1: r ≥ lo, corners too)."""
    r = torch.fft.ifftshift(radial_frequency(image_size, "rfft2"), dim=0)
    keep = r >= lo - 1e-12
    if hi < 1.0:
        keep &= r < hi - 1e-12
    return keep.float()


def filter_images(x: Tensor, keep: Tensor) -> Tensor:
    """Zero the frequencies outside ``keep`` (unshifted rfft2 layout) of a (B, C, H, W) batch; phase kept."""
    size = x.shape[-2:]
    spectrum = torch.fft.rfft2(x.float(), norm="ortho")
    return torch.fft.irfft2(spectrum * keep.to(x.device), s=size, norm="ortho")


@dataclass(frozen=True)
class FilterRange:
    """One distinct filter: keep lo ≤ r < hi (hi = 1: through the corners)."""

    lo: float
    hi: float

    @property
    def is_identity(self) -> bool:
        return self.lo <= 0.0 and self.hi >= 1.0


def filter_ranges(bands: list[tuple[float, float]]) -> tuple[list[FilterRange], list[dict[str, Any]]]:
    """Distinct filters and the entries (kind, range, filter) they serve, baseline first."""
    entries: list[dict[str, Any]] = []
    for lo, hi in bands:
        entries.append({"kind": "bandpass", "range": [lo, hi], "filter": FilterRange(lo, hi)})
    for _lo, hi in bands:
        entries.append({"kind": "lowpass", "range": [0.0, hi], "filter": FilterRange(0.0, hi)})
    for lo, _hi in bands:
        entries.append({"kind": "highpass", "range": [lo, 1.0], "filter": FilterRange(lo, 1.0)})
    distinct: list[FilterRange] = [FilterRange(0.0, 1.0)]
    for entry in entries:
        if entry["filter"] not in distinct:
            distinct.append(entry["filter"])
    return distinct, entries


def balanced_subsample(data: ImageSet, max_images: int | None, seed: int) -> tuple[ImageSet, int | None]:
    """At most ``max_images`` images by class-balanced water-filling (rare classes keep everything).

    Returns the subset and the per-class cap used (None when nothing was dropped).
    """
    if max_images is None or len(data) <= max_images:
        return data, None
    counts = data.class_counts()
    cap = 0
    while np.minimum(counts, cap + 1).sum() <= max_images and cap < counts.max():
        cap += 1
    rng = np.random.default_rng(seed)
    labels = data.labels.numpy()
    keep = []
    for c in range(data.num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) > cap:
            idx = rng.choice(idx, size=cap, replace=False)
        keep.append(idx)
    return data.subset(np.sort(np.concatenate(keep))), cap


def ncm_balanced_accuracy(
    fit_feats: Tensor, fit_labels: Tensor, held_feats: Tensor, held_labels: Tensor, num_classes: int
) -> float:
    """Balanced accuracy of the centred nearest-class-mean cosine classifier (module docstring, step 3)."""
    fit_feats, held_feats = fit_feats.double(), held_feats.double()
    present = torch.unique(fit_labels)
    means = torch.stack([fit_feats[fit_labels == c].mean(dim=0) for c in present])
    centre = means.mean(dim=0)
    fit_n = torch.nn.functional.normalize(fit_feats - centre, dim=1)
    protos = torch.stack([fit_n[fit_labels == c].mean(dim=0) for c in present])
    protos = torch.nn.functional.normalize(protos, dim=1)
    held_n = torch.nn.functional.normalize(held_feats - centre, dim=1)
    pred = present[(held_n @ protos.T).argmax(dim=1)]
    recalls = [float((pred[held_labels == c] == c).double().mean()) for c in torch.unique(held_labels)]
    return float(np.mean(recalls)) if recalls else float("nan")


def _probe_teacher(cfg: Config) -> FrozenTeacher:
    """The configured teacher, built as fopro_kd/training/components.py builds it (any ``train.method``)."""
    demo_file = str(demo_teacher_path(cfg)) if cfg.teacher.source == "demo" else None
    # the input size training uses; features only (no BatchNorm hooks), so folded as the fast path
    teacher = build_teacher(planned_teacher(cfg), demo_file=demo_file, fold_batchnorm=True)
    logger.info("teacher %s loaded: %s (feature dim %d)", teacher.arch, teacher.weights_desc, teacher.feature_dim)
    return teacher


@torch.no_grad()
def _features_and_energy(
    teacher: FrozenTeacher,
    data: ImageSet,
    ranges: list[FilterRange],
    bands: list[tuple[float, float]],
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> tuple[list[Tensor], np.ndarray, np.ndarray]:
    """Teacher features (N, D) per filter, and summed energy per band with and without DC."""
    size = teacher.input_size
    keeps = [radial_keep_mask(size, r.lo, r.hi).to(device) for r in ranges]
    band_keeps = [radial_keep_mask(size, lo, hi).to(device) for lo, hi in bands]
    mult = torch.fft.ifftshift(spectrum_multiplicity(size, "rfft2"), dim=0).float().to(device)
    dc = torch.zeros_like(mult)
    dc[0, 0] = 1.0
    feats: list[list[Tensor]] = [[] for _ in ranges]
    energy = np.zeros(len(bands))
    energy_ac = np.zeros(len(bands))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data), desc="probe", leave=False, dynamic_ncols=True)
    for start in range(0, len(data), batch_size):
        x = teacher.resize(to_float_on(data.images[start : start + batch_size], device))
        spectrum = torch.fft.rfft2(x.float(), norm="ortho")
        power = spectrum.abs().pow(2) * mult  # full-spectrum energy per stored entry
        total = power.sum(dim=(-2, -1))  # (B, C)
        total_ac = (power * (1 - dc)).sum(dim=(-2, -1))
        for b, keep in enumerate(band_keeps):
            energy[b] += float((((power * keep).sum(dim=(-2, -1))) / total.clamp(min=1e-20)).mean(dim=1).sum())
            ac = (power * keep * (1 - dc)).sum(dim=(-2, -1)) / total_ac.clamp(min=1e-20)
            energy_ac[b] += float(ac.mean(dim=1).sum())
        for i, keep in enumerate(keeps):
            xf = x if ranges[i].is_identity else torch.fft.irfft2(spectrum * keep, s=x.shape[-2:], norm="ortho")
            feats[i].append(teacher_features(teacher, xf).float().cpu())
        if bar is not None:
            bar.update(int(x.shape[0]))
    if bar is not None:
        bar.close()
    return [torch.cat(f) for f in feats], energy, energy_ac


def run_probe(cfg: Config, out_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    """Run the probe for ``cfg`` and write ``frequency_preference.json`` / ``.png`` to ``out_dir``.

    Raises
    ------
    ValueError
        Unusable ``probe.bands`` (named), or a training split too small to hold out images.
    """
    bands = check_bands(cfg.probe.bands)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    configure_threads(cfg.train.num_threads)
    device = select_device(cfg.device)
    splits = build_splits(cfg)
    full_train = splits.train
    data, cap = balanced_subsample(full_train, cfg.probe.max_images, cfg.split.seed)
    if cap is not None:
        logger.warning("probe: training split subsampled from %d to %d images (probe.max_images=%d, at most %d per class)",
                       len(full_train), len(data), cfg.probe.max_images, cap)
    fit_idx, held_idx, _ = stratified_group_split(data, cfg.probe.holdout_fraction, 0.0, cfg.split.seed)
    if len(held_idx) == 0 or len(fit_idx) == 0:
        raise ValueError(f"probe: the training split ({len(data)} images) is too small to hold out "
                         f"probe.holdout_fraction={cfg.probe.holdout_fraction} of any class")
    fit, held = data.subset(fit_idx), data.subset(held_idx)
    teacher = _probe_teacher(cfg).to(device)
    ranges, entries = filter_ranges(bands)
    fit_feats, energy_fit, energy_ac_fit = _features_and_energy(
        teacher, fit, ranges, bands, cfg.probe.batch_size, device, progress)
    held_feats, energy_held, energy_ac_held = _features_and_energy(
        teacher, held, ranges, bands, cfg.probe.batch_size, device, progress)
    accuracy = {
        r: ncm_balanced_accuracy(fit_feats[i], fit.labels, held_feats[i], held.labels, data.num_classes)
        for i, r in enumerate(ranges)
    }
    n = len(fit) + len(held)
    energy = (energy_fit + energy_held) / n
    energy_ac = (energy_ac_fit + energy_ac_held) / n
    results = []
    for entry in entries:
        item = {"kind": entry["kind"], "range": entry["range"], "balanced_accuracy": accuracy[entry["filter"]]}
        if entry["kind"] == "bandpass":
            b = bands.index(tuple(entry["range"]))
            item["energy_fraction"] = float(energy[b])
            item["energy_fraction_ac"] = float(energy_ac[b])
        results.append(item)
    held_present = sorted(set(held.labels.tolist()))
    grouped = data.groups is not None
    payload: dict[str, Any] = {
        "teacher": {"arch": teacher.arch, "weights": teacher.weights_desc, "input_size": teacher.input_size},
        "data": {
            "kind": cfg.data.kind,
            "split": "train",
            "train_images": len(full_train),
            "probe_images": len(data),
            "subsampled": cap is not None,
            "max_images": cfg.probe.max_images,
            "per_class_cap": cap,
            "fit_images": len(fit),
            "heldout_images": len(held),
            "heldout": ("whole groups (data groups, e.g. lesion_id) per class" if grouped else "images per class")
            + f", fraction {cfg.probe.holdout_fraction}, seed split.seed={cfg.split.seed}",
            "classes": list(data.class_names),
            "fit_per_class": [int(v) for v in fit.class_counts()],
            "heldout_per_class": [int(v) for v in held.class_counts()],
        },
        "classifier": "nearest-class-mean cosine (features centred by the class-balanced mean), fitted per filter",
        "filter_domain": "raw [0, 1] pixels at the teacher input size, then the teacher's normalisation",
        "radius": "r = |k| / Nyquist; a range [lo, hi] keeps lo <= r < hi, hi = 1 keeps the corners r > 1 too",
        "chance": 1.0 / max(1, len(held_present)),
        "baseline": {"kind": "unfiltered", "range": [0.0, 1.0], "balanced_accuracy": accuracy[FilterRange(0.0, 1.0)]},
        "bands": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    payload = _json_safe(payload)
    (out / RESULT_JSON).write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    plot_frequency_preference(payload, out / RESULT_PNG)
    return payload


def _json_safe(obj: Any) -> Any:
    """Non-finite floats (a class-free held-out part) become None: the file stays standard JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def plot_frequency_preference(payload: dict[str, Any], path: str | Path) -> Path:
    """Balanced accuracy vs radial frequency (band-pass at the band centre, low-pass at its cut-off hi,
    high-pass at its cut-off lo), baseline and chance as lines; below it, the energy share per band."""
    from fopro_kd.plots import _new_figure, _save

    fig = _new_figure(9.0, 6.0)
    grid = fig.add_gridspec(2, 1, height_ratios=[3, 1.3], hspace=0.35)
    ax = fig.add_subplot(grid[0])
    styles = {"bandpass": ("tab:blue", "o", "band-pass [lo, hi] (at centre)"),
              "lowpass": ("tab:green", "s", "low-pass [0, hi] (at hi)"),
              "highpass": ("tab:red", "^", "high-pass [lo, 1] (at lo)")}
    for kind, (colour, marker, label) in styles.items():
        rows = [b for b in payload["bands"] if b["kind"] == kind and b["balanced_accuracy"] is not None]
        if kind == "bandpass":
            xs = [0.5 * (b["range"][0] + b["range"][1]) for b in rows]
        elif kind == "lowpass":
            xs = [b["range"][1] for b in rows]
        else:
            xs = [b["range"][0] for b in rows]
        order = np.argsort(xs)
        ax.plot(np.asarray(xs)[order], np.asarray([b["balanced_accuracy"] for b in rows])[order], color=colour,
                marker=marker, label=label)
    baseline = payload["baseline"]["balanced_accuracy"] or 0.0
    ax.axhline(baseline, color="black", linestyle="--", label=f"unfiltered {baseline:.3f}")
    ax.axhline(payload["chance"], color="0.5", linestyle=":", label=f"chance {payload['chance']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, min(1.0, max(baseline, 0.2) * 1.25))
    ax.set_xlabel("radial frequency r = |k| / Nyquist")
    ax.set_ylabel("balanced accuracy (held-out, NCM)")
    data = payload["data"]
    note = f"{data['probe_images']} images" + (" (subsampled)" if data["subsampled"] else "")
    ax.set_title(f"Frequency preference of {payload['teacher']['arch']} @ {payload['teacher']['input_size']} px, "
                 f"{data['kind']} train split, {note}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # off the curves
    ax2 = fig.add_subplot(grid[1])
    rows = [b for b in payload["bands"] if b["kind"] == "bandpass"]
    centres = [0.5 * (b["range"][0] + b["range"][1]) for b in rows]
    widths = [0.9 * (b["range"][1] - b["range"][0]) for b in rows]
    ax2.bar(centres, [max(b["energy_fraction_ac"], 1e-12) for b in rows], width=widths, color="tab:purple",
            label="share of amplitude energy (DC excluded)")
    ax2.set_yscale("log")
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("radial frequency r = |k| / Nyquist")
    ax2.set_ylabel("energy share")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax2.grid(alpha=0.3)
    return _save(fig, path)


def format_probe(payload: dict[str, Any]) -> str:
    """A plain-text table of the probe result (one line per entry)."""
    lines = [f"baseline (unfiltered): {payload['baseline']['balanced_accuracy']:.4f}   chance: {payload['chance']:.4f}"]
    data = payload["data"]
    if data["subsampled"]:
        lines.append(f"SUBSAMPLED: {data['probe_images']} of {data['train_images']} training images "
                     f"(probe.max_images={data['max_images']}, at most {data['per_class_cap']} per class)")
    lines.append(f"{'kind':<9} {'range':<14} {'bal.acc':>8} {'energy(AC)':>11}")
    for b in payload["bands"]:
        energy = f"{b['energy_fraction_ac']:.2e}" if "energy_fraction_ac" in b else ""
        acc = b["balanced_accuracy"]
        lines.append(f"{b['kind']:<9} [{b['range'][0]:.3f}, {b['range'][1]:.3f}] "
                     f"{'n/a' if acc is None else f'{acc:.4f}':>8} {energy:>11}")
    return "\n".join(lines)
