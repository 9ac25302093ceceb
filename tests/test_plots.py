"""Every plot function writes a real, non-trivial PNG (headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from fopro_kd import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_pixels: int = 100) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] >= min_pixels and image.shape[1] >= min_pixels
    assert float(np.ptp(image[..., :3])) > 0  # not a blank canvas


def test_plot_per_class_recall_creates_parent_dirs(tmp_path: Path) -> None:
    path = plots.plot_per_class_recall(
        {"nv": 0.9, "mel": 0.5, "df": None, "vasc": 0.25}, {"nv": 600, "mel": 100, "df": 5, "vasc": 12},
        tmp_path / "nested" / "dir" / "recall.png",
    )
    assert path == tmp_path / "nested" / "dir" / "recall.png"
    assert_png(path)


@pytest.mark.parametrize("shape", [(3, 16, 9), (8, 8)])
def test_plot_prompt_mask_channels_and_2d(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    mask = 1.0 + 0.3 * rng.standard_normal(shape)
    assert_png(plots.plot_prompt_mask(mask, tmp_path / "mask.png", title="test mask"))


def test_plot_prompt_mask_accepts_tensor_and_constant_mask(tmp_path: Path) -> None:
    path = plots.plot_prompt_mask(torch.ones(2, 4, 4, requires_grad=True), tmp_path / "ones.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_prompt_mask_rejects_bad_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        plots.plot_prompt_mask(np.ones(5), tmp_path / "bad.png")


def test_plot_history_skips_missing_values(tmp_path: Path) -> None:
    history = [
        {"epoch": 0, "loss": 2.0, "val/balanced_accuracy": None},
        {"epoch": 1, "loss": 1.5},
        {"epoch": 2, "loss": float("nan"), "val/balanced_accuracy": 0.4},
        {"epoch": 3, "loss": 1.0, "val/balanced_accuracy": 0.5},
    ]
    assert_png(plots.plot_history(history, ["loss", "val/balanced_accuracy", "absent"], tmp_path / "h.png"))


def test_plot_history_with_rounds_and_no_data(tmp_path: Path) -> None:
    assert_png(plots.plot_history([{"round": 1}], ["loss"], tmp_path / "empty.png", x_key="round"))


def test_plot_lines_by_group(tmp_path: Path) -> None:
    rows = [{"round": r, "recall/nv": 0.5 + 0.1 * r, "recall/mel": 0.2 * r, "loss": 1.0} for r in range(4)]
    rows[1].pop("recall/mel")
    assert_png(plots.plot_lines_by_group(rows, "round", "recall/", tmp_path / "g.png", "Per-class recall"))


def test_plot_class_histograms(tmp_path: Path) -> None:
    histograms = {"site0": {"nv": 300, "mel": 40}, "site1": {"nv": 50, "bcc": 12}, "site2": {}}
    assert_png(plots.plot_class_histograms(histograms, tmp_path / "hist.png"))


def test_plot_weights_per_round(tmp_path: Path) -> None:
    rows = [{"round": r, "weight/client_0": 0.6 - 0.05 * r, "weight/client_1": 0.4 + 0.05 * r} for r in range(5)]
    assert_png(plots.plot_weights_per_round(rows, tmp_path / "w.png"))


def test_plots_leave_no_pyplot_figures_open(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plots.plot_history([{"epoch": 0, "loss": 1.0}], ["loss"], tmp_path / "a.png")
    plots.plot_weights_per_round([{"round": 0, "weight/a": 1.0}], tmp_path / "b.png")
    assert len(plt.get_fignums()) == before
