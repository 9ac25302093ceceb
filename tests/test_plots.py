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


# --------------------------------------------------------------------------- readability (issue 17)


def test_metric_labels_are_human() -> None:
    assert plots.metric_label("val_balanced_accuracy") == "validation balanced accuracy"
    assert plots.metric_label("recall/mel") == "test recall of mel"
    assert plots.metric_label("some_new_key") == "some new key"


def test_history_puts_scores_and_losses_in_separate_panels(tmp_path: Path, monkeypatch) -> None:
    drawn: list = []
    original = plots._save

    def spy(fig, path):
        drawn.append([(ax.get_title(), ax.get_ylim(), [line.get_label() for line in ax.lines]) for ax in fig.axes])
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    history = [{"epoch": e, "loss": 5.0 - e, "val_balanced_accuracy": 0.1 * e} for e in range(1, 5)]
    assert_png(plots.plot_history(history, ["val_balanced_accuracy", "loss"], tmp_path / "h.png", chance=0.125))
    (score_title, score_ylim, score_lines), (loss_title, _, loss_lines) = drawn[0]
    assert "accuracy" in score_title.lower() and "loss" in loss_title.lower()
    assert score_ylim[1] <= 1.05, "the accuracy axis must not stretch to the loss's range"
    assert "validation balanced accuracy" in score_lines and "total training loss" in loss_lines
    assert "selected epoch (4)" in score_lines and "chance (0.125)" in score_lines  # best val epoch marked


def test_round_plots_have_integer_ticks_and_small_multiples(tmp_path: Path, monkeypatch) -> None:
    axes: list = []
    original = plots._save

    def spy(fig, path):
        fig.canvas.draw()
        axes.append([(ax.get_title(), [t for t in ax.get_xticks()]) for ax in fig.axes])
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    rows = [{"round": r, "recall/nv": 0.2 * r, "recall/df": 0.0, "recall/mel": 0.0} for r in range(4)]
    assert_png(plots.plot_per_class_rounds(rows, tmp_path / "pc.png", {"nv": 300, "df": 5, "mel": 40},
                                           {"nv": 10, "df": 6, "mel": 8}, selected=2, chance=1 / 3))
    titles = [title for title, _ in axes[0]]
    assert len(titles) == 3, "one panel per class: classes stuck at 0 cannot hide each other"
    assert titles[0].startswith("nv") and "test n=6" in titles[-1]  # rarest last, test size in the title
    assert all(float(t).is_integer() for _, ticks in axes[0] for t in ticks)
    assert_png(plots.plot_lines_by_group(rows, "round", "recall/", tmp_path / "g.png", "t",
                                         labels={"nv": "nv (test n=10)"}))
    assert all(float(t).is_integer() for t in axes[1][0][1])
