"""Frequency-preference probe: filters, band validation, the NCM score, subsampling, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fopro_kd.cli import main
from fopro_kd.config import ConfigError, config_from_dict
from fopro_kd.data.dataset import ImageSet
from fopro_kd.probe import (
    RESULT_JSON,
    RESULT_PNG,
    balanced_subsample,
    check_bands,
    filter_images,
    filter_ranges,
    ncm_balanced_accuracy,
    radial_keep_mask,
    run_probe,
)
from fopro_kd.prompt import FourierPrompt, radial_frequency
from fopro_kd.config import PromptConfig

EQUAL_8 = [(i / 8, (i + 1) / 8) for i in range(8)]


@pytest.mark.parametrize("size", [16, 17, 32])
def test_lowpass_at_full_band_is_the_unfiltered_input(size: int) -> None:
    keep = radial_keep_mask(size, 0.0, 1.0)
    assert torch.equal(keep, torch.ones_like(keep))  # the corners r > 1 are kept too
    x = torch.rand(3, 3, size, size)
    assert (filter_images(x, keep) - x).abs().max().item() < 1e-5


def test_equal_rings_partition_the_spectrum_and_lowpass_is_their_union() -> None:
    size = 32
    masks = [radial_keep_mask(size, lo, hi) for lo, hi in EQUAL_8]
    assert torch.equal(sum(masks), torch.ones_like(masks[0]))  # every frequency in exactly one ring
    assert torch.equal(radial_keep_mask(size, 0.0, 0.375), masks[0] + masks[1] + masks[2])
    assert torch.equal(radial_keep_mask(size, 0.375, 1.0), sum(masks[3:]))
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    parts = sum(filter_images(x, m) for m in masks)
    assert (parts - x).abs().max().item() < 1e-5  # linear filters: the band-passed images add up to the image
    low = filter_images(x, masks[0])
    assert (low - x).abs().max() > 1e-3
    # the lowest ring keeps exactly r < 1/8 (mirrors the prompt's radial frequency)
    r = torch.fft.ifftshift(radial_frequency(size, "rfft2"), dim=0)
    assert torch.equal(masks[0].bool(), r < 0.125)


def test_bad_bands_are_one_error_naming_probe_bands() -> None:
    for bands in ([], [[0.0, 0.5], [0.4, 1.0]], [[0.0, 1.2]], [[-0.1, 0.5]], [[0.5, 0.5]], [[0.6, 0.2]]):
        with pytest.raises(ValueError, match="probe.bands"):
            check_bands(bands)
        with pytest.raises(ConfigError, match="probe.bands"):
            config_from_dict({"probe": {"bands": bands}})
    assert check_bands([[0.5, 1.0], [0.0, 0.5]]) == [(0.0, 0.5), (0.5, 1.0)]  # touching is not overlapping
    assert config_from_dict({}).probe.bands == EQUAL_8


def test_filter_ranges_compute_the_unfiltered_input_once() -> None:
    ranges, entries = filter_ranges(EQUAL_8)
    assert len(entries) == 24 and {e["kind"] for e in entries} == {"bandpass", "lowpass", "highpass"}
    # unfiltered + 8 rings + 6 more low-passes + 6 more high-passes: the lowest ring is the first
    # low-pass, the highest ring the last high-pass, [0, 1] low/high-pass the unfiltered input
    assert len(ranges) == 1 + 8 + 6 + 6 and ranges[0].is_identity
    assert sum(r.is_identity for r in ranges) == 1


def test_ncm_balanced_accuracy_separable_and_uninformative() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=gen) * 5
    labels = torch.arange(4).repeat_interleave(30)
    feats = centres[labels] + torch.randn(120, 32, generator=gen)
    assert ncm_balanced_accuracy(feats[::2], labels[::2], feats[1::2], labels[1::2], 4) == 1.0
    noise = torch.randn(120, 32, generator=gen)
    assert ncm_balanced_accuracy(noise[::2], labels[::2], noise[1::2], labels[1::2], 4) < 0.6


def test_balanced_subsample_keeps_rare_classes_whole() -> None:
    counts = [50, 10, 3]
    labels = torch.tensor(sum(([c] * n for c, n in enumerate(counts)), []))
    data = ImageSet(torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8), labels, ["a", "b", "c"],
                    [str(i) for i in range(len(labels))])
    sub, cap = balanced_subsample(data, 30, seed=0)
    assert cap == 17 and sub.class_counts().tolist() == [17, 10, 3]
    same, cap = balanced_subsample(data, 100, seed=0)
    assert cap is None and len(same) == len(data)


def _tiny_config(tmp_path: Path) -> dict:
    return {
        "seed": 0,
        "data": {"kind": "synthetic", "image_size": 16, "num_classes": 3, "max_per_class": 24, "imbalance_factor": 4,
                 "cache_dir": str(tmp_path / "cache")},
        "split": {"val_per_class": 2, "test_per_class": 2},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": 16},
        "train": {"method": "ce", "num_threads": 2},
        "probe": {"bands": [[0.0, 0.5], [0.5, 1.0]], "batch_size": 32},
    }


def test_tiny_probe_writes_the_expected_json_and_figure(tmp_path: Path) -> None:
    cfg = config_from_dict(_tiny_config(tmp_path))
    payload = run_probe(cfg, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / RESULT_JSON).read_text())
    assert (tmp_path / "out" / RESULT_PNG).stat().st_size > 1000
    assert saved == payload
    assert {"baseline", "bands", "chance", "teacher", "data"} <= set(saved)
    assert saved["baseline"]["range"] == [0.0, 1.0] and 0.0 <= saved["baseline"]["balanced_accuracy"] <= 1.0
    kinds = [(b["kind"], b["range"]) for b in saved["bands"]]
    assert kinds == [("bandpass", [0.0, 0.5]), ("bandpass", [0.5, 1.0]), ("lowpass", [0.0, 0.5]),
                     ("lowpass", [0.0, 1.0]), ("highpass", [0.0, 1.0]), ("highpass", [0.5, 1.0])]
    for b in saved["bands"]:
        assert set(b) >= {"kind", "range", "balanced_accuracy"} and 0.0 <= b["balanced_accuracy"] <= 1.0
        if b["kind"] == "bandpass":
            assert 0.0 < b["energy_fraction"] <= 1.0 and 0.0 < b["energy_fraction_ac"] <= 1.0
    by_kind = {(b["kind"], tuple(b["range"])): b["balanced_accuracy"] for b in saved["bands"]}
    assert by_kind[("lowpass", (0.0, 1.0))] == saved["baseline"]["balanced_accuracy"]
    assert by_kind[("highpass", (0.0, 1.0))] == saved["baseline"]["balanced_accuracy"]
    band_energy = [b["energy_fraction"] for b in saved["bands"] if b["kind"] == "bandpass"]
    assert sum(band_energy) == pytest.approx(1.0, abs=1e-4)  # the two rings cover the spectrum
    assert not saved["data"]["subsampled"] and saved["data"]["heldout_images"] > 0
    # the result seeds a radial prompt
    prompt = FourierPrompt(PromptConfig(param="radial", radial_bands=2, init="probe",
                                        probe_file=str(tmp_path / "out" / RESULT_JSON)), 16)
    assert torch.isfinite(prompt.m).all()


def test_probe_command_subsamples_and_says_so(tmp_path: Path, capsys) -> None:
    import yaml

    file = tmp_path / "probe.yaml"
    file.write_text(yaml.safe_dump(_tiny_config(tmp_path)))
    assert main(["probe", "--config", str(file), "--out", str(tmp_path / "p"), "--max-images", "20",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "SUBSAMPLED" in printed and "baseline" in printed
    saved = json.loads((tmp_path / "p" / RESULT_JSON).read_text())
    assert saved["data"]["subsampled"] and saved["data"]["probe_images"] <= 20
    assert main(["probe", "--config", str(file), "--set", "probe.bands=[]"]) == 2  # one clear error, no run
    assert "probe.bands" in capsys.readouterr().err
    assert np.isfinite(saved["chance"])
