"""Figures written to the run directory (PNG, headless).

Every function draws on its own :class:`matplotlib.figure.Figure` attached to the
non-interactive **Agg** canvas (no ``pyplot``, no display, no global figure state), writes a
PNG to ``path`` (creating parent directories) and returns the path. Missing or non-finite
values are skipped rather than drawn as zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

__all__ = [
    "plot_per_class_recall",
    "plot_prompt_mask",
    "plot_history",
    "plot_lines_by_group",
    "plot_class_histograms",
    "plot_weights_per_round",
    "plot_per_class_rounds",
    "plot_paired_differences",
    "paired_difference_rows",
    "metric_label",
    "best_x",
]

DPI: int = 100


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # Agg backend: renders without a display
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        fig.clear()  # release artists; the figure is not registered with pyplot
    return path


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, None, NaN, non-numeric)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def _no_data(ax: Any, message: str = "no data") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_per_class_recall(
    per_class_recall: dict[str, float | None], train_counts: dict[str, int], path: str | Path
) -> Path:
    """Bar chart of recall per class, classes ordered by training count (descending).

    The training count is drawn as a line on a secondary (log) axis and written under each
    class name; classes without test samples (recall None) are marked "n/a".

    Parameters
    ----------
    per_class_recall : dict[str, float | None]
        ``metrics["per_class_recall"]``.
    train_counts : dict[str, int]
        ``metrics["train_counts"]``.
    path : str or Path
        PNG file to write.
    """
    names = sorted(per_class_recall, key=lambda n: (-(train_counts.get(n) or 0), n))
    recalls = [_number(per_class_recall[n]) for n in names]
    counts = [int(train_counts.get(n) or 0) for n in names]
    fig = _new_figure(max(5.0, 0.6 * len(names) + 2.0), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    if names:
        ax.bar(x, [r if r is not None else 0.0 for r in recalls], color="tab:blue", label="recall")
        for xi, r in zip(x, recalls):
            ax.text(xi, (r or 0.0) + 0.01, "n/a" if r is None else f"{r:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{n}\n(n={c})" for n, c in zip(names, counts)], rotation=45, ha="right", fontsize=8)
        ax2 = ax.twinx()
        ax2.plot(x, [max(c, 1) for c in counts], color="tab:orange", marker="o", label="train count")
        ax2.set_yscale("log")
        _plain_log_ticks(ax2)
        ax2.set_ylabel("training samples (log)", color="tab:orange")
    else:
        _no_data(ax)
    ax.set_ylim(0.0, 1.1)
    ax.set_ylabel("recall")
    ax.set_title("Per-class recall (classes by training count)")
    return _save(fig, path)


def _plain_log_ticks(ax: Any) -> None:
    """Counts on a log axis as plain numbers (``40``, not ``4 × 10^1``)."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _pos: Any) -> str:
        lead = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
        return f"{value:g}" if round(lead) in (2, 5) and abs(lead - round(lead)) < 1e-6 else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _mask_layout(height: int, width: int, fft: str | None) -> str | None:
    """``"rfft2"`` / ``"fft2"`` for a multiplier of that shape (``fft`` if given), None if neither fits."""
    if fft is not None:
        expected = height // 2 + 1 if fft == "rfft2" else height
        if width != expected:
            raise ValueError(f"a {fft!r} mask of height {height} must have width {expected}, got {width}")
        return fft
    if width == height // 2 + 1 and width != height:
        return "rfft2"
    if width == height:
        return "fft2"
    return None


def plot_prompt_mask(
    mask: Any, path: str | Path, title: str = "FPG amplitude multiplier", fft: str | None = None
) -> Path:
    """The Fourier-prompt amplitude multiplier ``M``: 2-D maps on frequency axes and its radial profile.

    Top row: one map per channel in the shifted layout, axes in cycles per image (k_w, k_h; DC at
    0, the ``rfft2`` half spectrum has k_w ≥ 0 only), diverging colormap centred at 1 (no change)
    with symmetric limits ``1 ± max|M − 1|`` and a shared colour bar. Bottom: the radial profile,
    mean M per radial frequency |k| / Nyquist (:func:`fopro_kd.prompt.radial_profile`), one curve
    per channel, which shows at a glance which frequencies are amplified or attenuated.

    Parameters
    ----------
    mask : array-like (C, H, W') or (H, W')
        Multiplier in the shifted frequency layout; torch tensors are accepted.
    path : str or Path
        PNG file to write.
    title : str
        Figure title.
    fft : ``"rfft2"``, ``"fft2"`` or None
        Layout of ``mask``; None infers it from the shape (W' = H//2 + 1: rfft2, W' = H: fft2;
        any other shape is drawn on index axes without a profile).
    """
    from fopro_kd.prompt import radial_profile

    values = _to_numpy(mask)
    if values.ndim == 2:
        values = values[None]
    if values.ndim != 3 or values.shape[1] == 0 or values.shape[2] == 0:
        raise ValueError(f"mask must have shape (C, H, W) or (H, W), got {np.shape(mask)}")
    channels, height, width = values.shape
    layout = _mask_layout(height, width, fft)
    finite = values[np.isfinite(values)]
    spread = float(np.max(np.abs(finite - 1.0))) if finite.size else 0.0
    spread = max(spread, 1e-6)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=1.0 - spread, vmax=1.0 + spread)
    fig = Figure(figsize=(max(3.2 * channels + 1.2, 6.0), 6.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, channels, height_ratios=[1.15, 1.0])
    axes = [fig.add_subplot(grid[0, i]) for i in range(channels)]
    if layout is None:
        extent, xlabel, ylabel = None, "column", "row"
    else:
        k_h0 = -(height // 2)
        k_w0 = 0 if layout == "rfft2" else -(width // 2)
        extent = (k_w0 - 0.5, k_w0 + width - 0.5, k_h0 - 0.5, k_h0 + height - 0.5)
        xlabel, ylabel = "k_w (cycles / image)", "k_h (cycles / image)"
    image = None
    for i, ax in enumerate(axes):
        image = ax.imshow(values[i], cmap="RdBu_r", norm=norm, interpolation="nearest", origin="lower",
                          extent=extent, aspect="equal")
        ax.set_title(f"channel {i}" if channels > 1 else "mask", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        if i == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes, shrink=0.9, label="amplitude multiplier (1 = unchanged)")
    prof_ax = fig.add_subplot(grid[1, :])
    if layout is None:
        _no_data(prof_ax, "no radial profile (not an rfft2/fft2 spectrum layout)")
    else:
        radii, profile = radial_profile(values, layout)
        colours = ["tab:red", "tab:green", "tab:blue"] if channels == 3 else [None] * channels
        names = ["R", "G", "B"] if channels == 3 else [str(i) for i in range(channels)]
        for i in range(channels):
            prof_ax.plot(radii, profile[i], color=colours[i], marker=".", markersize=3, label=f"channel {names[i]}")
        prof_ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
        prof_ax.axvline(1.0, color="0.6", linestyle=":", linewidth=0.8)
        prof_ax.set_xlabel("radial frequency |k| / Nyquist (1 = Nyquist; corners up to √2)")
        prof_ax.set_ylabel("mean multiplier")
        prof_ax.set_title(f"radial profile (cycles / image = {height / 2:g} × radius)", fontsize=9)
        prof_ax.grid(alpha=0.3)
        prof_ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


METRIC_LABELS: dict[str, str] = {
    "val_balanced_accuracy": "validation balanced accuracy",
    "val_few_shot": "validation few-shot recall",
    "test_balanced_accuracy": "test balanced accuracy",
    "test_few_shot": "test few-shot recall",
    "test_medium_shot": "test medium-shot recall",
    "test_many_shot": "test many-shot recall",
    "test_tail": "test tail recall (rarest classes)",
    "loss": "total training loss",
    "loss_cls": "classification loss (main head)",
    "loss_aux": "classification loss (aux head)",
    "loss_rep": "representation loss (2 - 2 cos, before λ)",
    "loss_prox": "FedProx proximal term",
    "epoch_seconds": "seconds per epoch",
    "images_per_second": "training images per second",
    "round": "communication round",
    "epoch": "epoch",
}
"""Human names of history columns (titles, legends, axis labels); unknown keys are shown with spaces."""


def metric_label(key: str) -> str:
    """Human name of a history column (``"val_balanced_accuracy"`` -> ``"validation balanced accuracy"``)."""
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    for prefix, what in (("recall/", "test recall of "), ("site_bacc/", "local test bACC of "),
                         ("weight/", "aggregation weight of "), ("epsilon/", "ε spent by ")):
        if key.startswith(prefix):
            return what + key[len(prefix):]
    return key.replace("_", " ")


def _kind(key: str) -> str:
    """``"score"`` (a value in [0, 1]: accuracy, recall), ``"loss"`` or ``"other"`` (seconds, throughput...)."""
    name = key.lower()
    if "loss" in name:
        return "loss"
    if any(word in name for word in ("accuracy", "shot", "recall", "bacc", "tail", "f1", "auc")):
        return "score"
    return "other"


def _integer_axis(ax: Any) -> None:
    """Epochs and rounds are counts: ticks at integers only (no 1.25, 1.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mark(ax: Any, selected: float | None, chance: float | None, x_name: str) -> None:
    """The selected epoch/round (vertical dashed line) and the chance level (horizontal dotted line)."""
    if selected is not None:
        ax.axvline(selected, color="0.25", linestyle="--", linewidth=1.0, label=f"selected {x_name} ({selected:g})")
    if chance is not None:
        ax.axhline(chance, color="tab:red", linestyle=":", linewidth=1.0, label=f"chance ({chance:.3g})")


def _lines(ax: Any, rows: Sequence[dict[str, Any]], keys: Sequence[str], x_key: str, label_of: Any = None) -> int:
    """Draw one line per key (skipping missing values); return the number of lines drawn."""
    drawn = 0
    for key in keys:
        xs, ys = [], []
        for index, row in enumerate(rows):
            y = _number(row.get(key))
            if y is None:
                continue
            x = _number(row.get(x_key))
            xs.append(index if x is None else x)
            ys.append(y)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=label_of(key) if label_of else metric_label(key))
            drawn += 1
    return drawn


def _finish_lines(ax: Any, drawn: int, x_key: str, ylabel: str, title: str, legend: bool = True) -> None:
    if drawn and legend:
        ax.legend(fontsize=7, loc="best", ncol=1 if drawn <= 10 else 2)
    elif not drawn:
        _no_data(ax)
    ax.set_xlabel(metric_label(x_key))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _integer_axis(ax)


def best_x(rows: Sequence[dict[str, Any]], key: str, x_key: str, min_x: float | None = None) -> float | None:
    """x of the first row with the highest ``key`` (the selection rule of training and the server: a later
    row must be strictly better), rows with ``x_key < min_x`` ignored (round 0, the initial model)."""
    best: tuple[float, float] | None = None
    for index, row in enumerate(rows):
        y = _number(row.get(key))
        x = _number(row.get(x_key))
        x = float(index) if x is None else x
        if y is None or (min_x is not None and x < min_x):
            continue
        if best is None or y > best[1]:
            best = (x, y)
    return None if best is None else best[0]


def plot_history(
    history: list[dict[str, Any]],
    keys: list[str],
    path: str | Path,
    x_key: str = "epoch",
    *,
    selected: float | None = None,
    chance: float | None = None,
    title: str | None = None,
) -> Path:
    """Lines of ``keys`` against ``x_key`` (epoch or round): scores and losses in separate panels.

    Scores (accuracy, recall: values in [0, 1]) share a panel with a fixed 0-1 axis, so a
    learning curve is not flattened by a loss of 5; losses get their own panel, anything else
    (seconds, throughput) a third. Rows missing a key (or holding None / NaN) are skipped for
    that line; a row without ``x_key`` uses its index. Ticks are integers.

    Parameters
    ----------
    selected : float, optional
        The epoch/round whose model is reported, drawn as a dashed line in every panel. None:
        the first maximum of ``val_balanced_accuracy`` when it is among ``keys`` (the selection
        rule of single-site training and of the server; round 0 excluded).
    chance : float, optional
        Balanced accuracy of a constant classifier (1 / C), drawn in the score panel.
    title : str, optional
        Figure title (default: none above the panel titles).
    """
    groups: dict[str, list[str]] = {"score": [], "loss": [], "other": []}
    for key in keys:
        groups[_kind(key)].append(key)
    if selected is None and "val_balanced_accuracy" in keys:
        selected = best_x(history, "val_balanced_accuracy", x_key, min_x=1 if x_key == "round" else None)
    panels = [name for name in ("score", "loss", "other") if groups[name]] or ["score"]
    fig = _new_figure(5.2 * len(panels), 4.0)
    x_name = "round" if x_key == "round" else x_key
    titles = {"score": "Balanced accuracy and recall", "loss": "Training losses (mean per image)",
              "other": "Other"}
    for i, name in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        drawn = _lines(ax, history, groups[name], x_key)
        _mark(ax, selected, chance if name == "score" else None, x_name)
        ylabel = {"score": "score (0-1)", "loss": "loss", "other": "value"}[name]
        _finish_lines(ax, drawn, x_key, ylabel, titles[name])
        if name == "score":
            ax.set_ylim(0.0, 1.02)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _prefixed_keys(rows: Sequence[dict[str, Any]], prefix: str) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith(prefix) and key not in keys:
                keys.append(key)
    return keys


def plot_lines_by_group(
    rows: list[dict[str, Any]],
    x_key: str,
    y_prefix: str,
    path: str | Path,
    title: str,
    *,
    labels: dict[str, str] | None = None,
    ylabel: str | None = None,
    selected: float | None = None,
    chance: float | None = None,
) -> Path:
    """One line per key starting with ``y_prefix`` (e.g. ``"site_bacc/"``) against ``x_key``.

    The legend shows the key without the prefix (e.g. the site), or ``labels[name]`` (e.g.
    ``"site-0 (test n=17)"``); ``selected`` and ``chance`` are marked as in :func:`plot_history`.
    Values are scores (0-1 axis) unless the prefix is ``weight/``. Lines that would coincide
    (e.g. sites stuck at 0) stay visible: distinct markers, earlier lines wider underneath.
    """
    keys = _prefixed_keys(rows, y_prefix)
    fig = _new_figure(6.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>ph*"
    drawn = 0
    last = max(1, len(keys) - 1)
    for i, key in enumerate(keys):
        name = key[len(y_prefix):]
        before = len(ax.lines)
        _lines(ax, rows, [key], x_key, label_of=lambda _k, n=name: (labels or {}).get(n, n))
        if len(ax.lines) > before:
            # sites with equal scores (e.g. all at 0) would hide each other: earlier lines are drawn wider and
            # with larger markers, so a coinciding later line shows inside them
            line = ax.lines[-1]
            line.set_marker(markers[i % len(markers)])
            line.set_linewidth(1.2 + 3.0 * (last - i) / last if len(keys) > 1 else 1.5)
            line.set_markersize(3 + 5 * (last - i) / last if len(keys) > 1 else 3)
            line.set_alpha(0.85)
            drawn += 1
    _mark(ax, selected, chance, "round" if x_key == "round" else x_key)
    _finish_lines(ax, drawn, x_key, ylabel or y_prefix.rstrip("/") or "value", title)
    if y_prefix != "weight/":
        ax.set_ylim(-0.02, 1.02)
    return _save(fig, path)


def plot_per_class_rounds(
    rows: list[dict[str, Any]],
    path: str | Path,
    train_counts: dict[str, int],
    test_counts: dict[str, int] | None = None,
    *,
    x_key: str = "round",
    prefix: str = "recall/",
    selected: float | None = None,
    chance: float | None = None,
    title: str = "Test recall per class (global model)",
) -> Path:
    """Small multiples: one panel per class (rarest last), its test recall per round.

    One panel per class keeps every curve readable (on one axis, classes stuck at 0 hide each
    other). Each panel title gives the class's training and test counts, since a recall on 6
    test images moves in steps of 17 points.
    """
    names = [k[len(prefix):] for k in _prefixed_keys(rows, prefix)]
    names.sort(key=lambda n: (-(train_counts.get(n) or 0), n))
    count = max(1, len(names))
    cols = min(4, count)
    grid_rows = int(math.ceil(count / cols))
    fig = _new_figure(2.8 * cols + 0.6, 2.3 * grid_rows + 0.8)
    if not names:
        _no_data(fig.add_subplot(1, 1, 1))
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        drawn = _lines(ax, rows, [prefix + name], x_key, label_of=lambda _k: "recall")
        _mark(ax, selected, chance, "round")
        if not drawn:
            _no_data(ax)
        caption = f"train n={train_counts.get(name, '?')}"
        if test_counts is not None:
            caption += f", test n={test_counts.get(name, '?')}"
        ax.set_title(f"{name}\n({caption})", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        _integer_axis(ax)
        if i % cols == 0:
            ax.set_ylabel("recall", fontsize=8)
        if i >= count - cols:
            ax.set_xlabel(metric_label(x_key), fontsize=8)
    footnote = "dashed: selected round" if selected is not None else ""
    if chance is not None:
        footnote += ("; " if footnote else "") + f"dotted: chance level {chance:.3g}"
    fig.suptitle(title + (f"\n{footnote}" if footnote else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_class_histograms(
    histograms: dict[str, dict[str, int]], path: str | Path, title: str = "Training images per class and site",
    ylabel: str = "training images",
) -> Path:
    """Grouped bar chart of class counts per site (client / hospital) or per split.

    Parameters
    ----------
    histograms : dict[str, dict[str, int]]
        ``{site: {class name: count}}``; classes missing at a site count as 0.
    path : str or Path
        PNG file to write.
    title, ylabel : str
        Figure title and y label (e.g. ``"Images per class and split"``).
    """
    sites = list(histograms)
    classes: list[str] = []
    for counts in histograms.values():
        classes.extend(c for c in counts if c not in classes)
    fig = _new_figure(max(6.0, 0.5 * len(classes) * max(1, len(sites)) ** 0.5 + 2.0), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    if sites and classes:
        x = np.arange(len(classes))
        width = 0.8 / len(sites)
        for i, site in enumerate(sites):
            heights = [int(histograms[site].get(c) or 0) for c in classes]
            total = sum(heights)
            bars = ax.bar(x - 0.4 + (i + 0.5) * width, heights, width=width, label=f"{site} (n={total})")
            if len(classes) * len(sites) <= 48:  # the count on each bar: a log axis is hard to read off
                ax.bar_label(bars, labels=[str(h) for h in heights], fontsize=6, padding=1)
        ax.set_xticks(x)
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
        ax.legend(fontsize=7)
        if any(int(h.get(c) or 0) > 10 for h in histograms.values() for c in classes):
            ax.set_yscale("symlog", linthresh=10)  # long-tailed counts: rare classes' bars stay visible
            _plain_log_ticks(ax)
            ylabel += " (log scale above 10)"
    else:
        _no_data(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def plot_weights_per_round(
    rows: list[dict[str, Any]], path: str | Path, labels: dict[str, str] | None = None, selected: float | None = None
) -> Path:
    """Aggregation weight of each client per round, from keys ``"weight/<client>"``.

    The x axis is ``row["round"]`` (the row index when absent); ``labels`` renames clients in
    the legend; ``selected`` marks the reported round.
    """
    keys = _prefixed_keys(rows, "weight/")
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    drawn = _lines(ax, rows, keys, "round", label_of=lambda k: (labels or {}).get(k[len("weight/"):], k[len("weight/"):]))
    _mark(ax, selected, None, "round")
    _finish_lines(ax, drawn, "round", "aggregation weight α_k (sums to 1)", "Aggregation weight of each site per round")
    return _save(fig, path)


def paired_difference_rows(paired: dict[str, dict[str, dict[str, Any]]], metric: str) -> list[dict[str, Any]]:
    """One row per compared variant, in points: ``mean``, the test-image interval and the total one.

    ``paired`` is the ``"paired"`` part of a comparison (:func:`simulations.compare_runs.compare_runs`):
    variant -> metric -> ``mean_diff``, ``ci95_low`` / ``ci95_high`` (test images) and, with several
    seeds or folds, ``ci95_total_low`` / ``ci95_total_high`` (their ``interval``: "seeds+images" or
    "folds"). Variants without ``metric`` are left out. Kept apart from the drawing so that what the
    figure shows is checked as numbers.
    """
    rows = []
    for name, metrics in paired.items():
        d = metrics.get(metric)
        if not d:
            continue
        total = None if d.get("ci95_total_low") is None else (100.0 * d["ci95_total_low"], 100.0 * d["ci95_total_high"])
        rows.append({"name": name, "mean": 100.0 * d["mean_diff"],
                     "images": (100.0 * d["ci95_low"], 100.0 * d["ci95_high"]),
                     "total": total, "interval": d.get("interval", "images")})
    return rows


def plot_paired_differences(
    paired: dict[str, dict[str, dict[str, Any]]], path: str | Path, reference: str,
    metrics: Sequence[tuple[str, str]] = (("balanced_accuracy", "balanced accuracy"), ("rare_recall", "rare-class recall")),
    subtitle: str = "",
) -> Path:
    """Forest plot of paired differences against ``reference``: one panel per metric, one row per variant.

    Why a figure: a table of ten intervals hides that they all straddle zero; drawn side by side
    with a line at 0 a reader sees at once which differences the noise allows. The dot is the
    mean difference, the thick bar the test-image 95% interval, the thin bar the interval that
    also counts the seed (or fold) spread, where there is one.
    """
    panels = [(key, label, paired_difference_rows(paired, key)) for key, label in metrics]
    count = max((len(rows) for _, _, rows in panels), default=0)
    fig = _new_figure(5.0 * len(panels), 1.2 + 0.38 * max(count, 1))
    for index, (_, label, rows) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), index)
        if not rows:
            _no_data(ax)
        ys = np.arange(len(rows))[::-1]
        for y, row in zip(ys, rows):
            if row["total"] is not None:
                ax.plot(row["total"], [y, y], color="0.55", linewidth=1.0,
                        label=row["interval"] if y == ys[0] else None)
            ax.plot(row["images"], [y, y], color="tab:blue", linewidth=4.0, solid_capstyle="butt",
                    label="test images" if y == ys[0] else None)
            ax.plot([row["mean"]], [y], "o", color="black", markersize=4)
        ax.axvline(0.0, color="tab:red", linewidth=1.0, linestyle="--")
        ax.set_yticks(ys)
        ax.set_yticklabels([row["name"] for row in rows] if index == 1 else [""] * len(rows), fontsize=8)
        ax.set_xlabel(f"Δ {label} vs {reference} (points)")
        ax.grid(axis="x", alpha=0.3)
        if rows:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Paired differences, 95% intervals" + (f" ({subtitle})" if subtitle else ""), fontsize=10)
    return _save(fig, path)
