"""Loaders (HAM10000, ISIC-2019-LT, ImageFolder, MedMNIST, split files), the decode cache,
batching and ``build_splits``; tiny fake datasets in tmp_path plus optional real-data checks."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fopro_kd.data.cache as cache_mod
from fopro_kd.config import config_from_dict
from fopro_kd.data import BatchLoader, build_splits
from fopro_kd.data.batches import iterate_batches
from fopro_kd.data.cache import decode_images
from fopro_kd.data.dataset import ImageSet
from fopro_kd.data.loaders import (
    HAM10000_CLASSES,
    apply_split_file,
    load_ham10000,
    load_imagefolder,
    load_isic2019_lt,
    load_medmnist_npz,
    read_split_file,
)

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (220, 40, 220), (128, 128, 128)]


def _write_image(path: Path, colour, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def ham_dir(tmp_path: Path) -> Path:
    """HAM10000 layout: 2 images per class (colour = class), lesions of 1-2 images, one image missing."""
    root = tmp_path / "ham"
    rows = []
    for c, dx in enumerate(HAM10000_CLASSES):
        for k in range(2):
            image_id = f"ISIC_{c}{k}"
            _write_image(root / "images" / f"{image_id}.jpg", COLOURS[c])
            rows.append([f"HAM_{c}", image_id, dx])
    rows.append(["HAM_9", "ISIC_missing", "nv"])
    _write_csv(root / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx"], rows)
    return root


# --------------------------------------------------------------------------- cache


def test_decode_images_resizes_and_keeps_colours(tmp_path):
    _write_image(tmp_path / "a.png", (10, 20, 30), size=(50, 20))
    _write_image(tmp_path / "b.jpg", (200, 100, 50))
    images, bad = decode_images([tmp_path / "a.png", tmp_path / "b.jpg"], 16, tmp_path / "cache", 0.0, "t")
    assert bad == [] and images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert images.is_contiguous()
    assert images[0, :, 5, 5].tolist() == [10, 20, 30]  # PNG is lossless
    assert (images[1, :, 5, 5].int() - torch.tensor([200, 100, 50])).abs().max() <= 3


def test_cache_hit_does_not_decode_again_and_a_changed_file_invalidates(tmp_path, monkeypatch):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, p in enumerate(paths):
        _write_image(p, COLOURS[i])
    first, _ = decode_images(paths, 8, tmp_path / "cache", 0.0, "src")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(cache_mod, "decode_one", fail)
    second, bad = decode_images(paths, 8, tmp_path / "cache", 0.0, "src")
    assert bad == [] and torch.equal(first, second)
    second[0] = 0  # the returned tensor is a private copy, not a view of the cache file
    assert torch.equal(decode_images(paths, 8, tmp_path / "cache", 0.0, "src")[0], first)

    stat = os.stat(paths[1])
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))  # new mtime = new key
    with pytest.raises(ValueError, match="could not be decoded"):
        decode_images(paths, 8, tmp_path / "cache", 0.0, "src")


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    _write_image(tmp_path / "x.png", (1, 2, 3))
    monkeypatch.setenv("FOPRO_KD_CACHE", str(tmp_path / "envcache"))
    decode_images([tmp_path / "x.png"], 4, None, 0.0, "env")
    assert list((tmp_path / "envcache").glob("env-4px-*.npy"))


def test_unreadable_images_threshold(tmp_path, caplog):
    paths = []
    for i in range(4):
        _write_image(tmp_path / f"ok{i}.jpg", COLOURS[i])
        paths.append(tmp_path / f"ok{i}.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    paths.append(tmp_path / "broken.jpg")
    with pytest.raises(ValueError, match=r"1 of 5 .*broken\.jpg.*data\.max_unreadable_fraction"):
        decode_images(paths, 8, tmp_path / "c", 0.1, "src")
    with caplog.at_level(logging.WARNING, logger="fopro_kd.data"):
        images, bad = decode_images(paths, 8, tmp_path / "c", 0.25, "src")
    assert bad == [4] and torch.all(images[4] == 0) and images[:4].float().mean() > 10
    assert "broken.jpg" in caplog.text


# --------------------------------------------------------------------------- HAM10000


def test_load_ham10000_labels_groups_and_missing(ham_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fopro_kd.data"):
        data = load_ham10000(ham_dir, None, 12, tmp_path / "c", 0.0)  # dataset folder: uses images/ and the CSV
    assert "1 of 15" in caplog.text and "ISIC_missing" in caplog.text
    assert len(data) == 14 and data.images.shape == (14, 3, 12, 12)
    assert data.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert data.class_counts().tolist() == [2] * 7
    i = data.ids.index("ISIC_31")  # class 3 = df
    assert data.labels[i] == 3 and data.groups[i] == "HAM_3"
    assert (data.images[i, :, 6, 6].int() - torch.tensor(COLOURS[3])).abs().max() <= 4
    same = load_ham10000(ham_dir / "images", ham_dir / "HAM10000_metadata.csv", 12, tmp_path / "c", 0.0)
    assert torch.equal(same.images, data.images)


def test_load_ham10000_errors(ham_dir, tmp_path):
    bad = _write_csv(tmp_path / "nolesion.csv", ["image_id", "dx"], [["ISIC_00", "akiec"]])
    with pytest.raises(ValueError, match=r"nolesion\.csv.*lesion_id"):
        load_ham10000(ham_dir, bad, 8, tmp_path / "c", 0.0)
    bad = _write_csv(tmp_path / "badlabel.csv", ["lesion_id", "image_id", "dx"], [["L", "ISIC_00", "melanoma"]])
    with pytest.raises(ValueError, match=r"badlabel\.csv, line 2: dx='melanoma'"):
        load_ham10000(ham_dir, bad, 8, tmp_path / "c", 0.0)
    none = _write_csv(tmp_path / "none.csv", ["lesion_id", "image_id", "dx"], [["L", "ISIC_nope", "nv"]])
    with pytest.raises(FileNotFoundError, match="none of the 1 images"):
        load_ham10000(ham_dir, none, 8, tmp_path / "c", 0.0)
    with pytest.raises(FileNotFoundError, match="metadata CSV not found"):
        load_ham10000(tmp_path, None, 8, tmp_path / "c", 0.0)


# --------------------------------------------------------------------------- ISIC-2019-LT


def test_load_isic2019_lt_reports_missing_per_split(tmp_path, caplog):
    images = tmp_path / "isic"
    for name, colour in (("ISIC_1", COLOURS[0]), ("ISIC_2", COLOURS[1]), ("ISIC_3", COLOURS[2])):
        _write_image(images / f"{name}.jpg", colour)
    header = ["image", "finding_name", "finding"]
    train = _write_csv(tmp_path / "train.csv", header, [["ISIC_1", 1, 0], ["ISIC_2", 4, 3], ["ISIC_x", 1, 0]])
    val = _write_csv(tmp_path / "val.csv", header, [["ISIC_3", 5, 7]])
    test = _write_csv(tmp_path / "test.csv", header, [["ISIC_1", 1, 0], ["ISIC_y", 1, 0], ["ISIC_z", 1, 1]])
    with caplog.at_level(logging.WARNING, logger="fopro_kd.data"):
        parts = load_isic2019_lt(images, train, val, test, 8, tmp_path / "c", 0.0)
    assert "isic2019_lt train: 1 of 3" in caplog.text and "isic2019_lt test: 2 of 3" in caplog.text
    assert parts["train"].ids == ["ISIC_1", "ISIC_2"] and parts["train"].labels.tolist() == [0, 3]
    assert parts["val"].labels.tolist() == [7] and parts["val"].class_names[7] == "DF"

    bad = _write_csv(tmp_path / "bad.csv", header, [["ISIC_1", 1, 0], ["ISIC_2", 1, 8]])
    with pytest.raises(ValueError, match=r"bad\.csv, line 3: finding='8'"):
        load_isic2019_lt(images, bad, val, test, 8, tmp_path / "c", 0.0)
    gone = _write_csv(tmp_path / "gone.csv", header, [["ISIC_q", 1, 0]])
    with pytest.raises(FileNotFoundError, match=r"gone\.csv.*isic"):
        load_isic2019_lt(images, train, gone, test, 8, tmp_path / "c", 0.0)


# --------------------------------------------------------------------------- ImageFolder and MedMNIST


def test_load_imagefolder(tmp_path, caplog):
    root = tmp_path / "folder"
    _write_image(root / "mel" / "a.jpg", COLOURS[0])
    _write_image(root / "mel" / "b.PNG", COLOURS[0])
    _write_image(root / "bcc" / "c.jpeg", COLOURS[1])
    (root / "bcc" / "notes.txt").write_text("ignored")
    (root / "scc").mkdir()
    with caplog.at_level(logging.WARNING, logger="fopro_kd.data"):
        data = load_imagefolder(root, 8, tmp_path / "c", 0.0)
    assert data.class_names == ["bcc", "mel", "scc"] and "scc" in caplog.text
    assert data.ids == ["bcc/c", "mel/a", "mel/b"] and data.labels.tolist() == [0, 1, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_imagefolder(tmp_path / "empty", 8, tmp_path / "c", 0.0)
    with pytest.raises(FileNotFoundError, match="data.root"):
        load_imagefolder(tmp_path / "absent", 8, tmp_path / "c", 0.0)


def _write_npz(path: Path, rgb: bool, drop: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1).astype(np.uint8)
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)
    return path


def test_load_medmnist_npz_grey_and_rgb(tmp_path):
    grey = load_medmnist_npz(_write_npz(tmp_path / "g.npz", rgb=False), 28)
    assert grey["train"].images.shape == (6, 3, 28, 28)
    assert torch.equal(grey["train"].images[:, 0], grey["train"].images[:, 2])  # replicated channels
    assert grey["test"].labels.tolist() == [0, 1, 2, 0] and grey["val"].class_names == ["0", "1", "2"]
    rgb = load_medmnist_npz(_write_npz(tmp_path / "c.npz", rgb=True), 16)
    assert rgb["val"].images.shape == (3, 3, 16, 16) and rgb["val"].images.dtype == torch.uint8
    assert not torch.equal(rgb["val"].images[:, 0], rgb["val"].images[:, 1])
    with pytest.raises(ValueError, match=r"m\.npz: missing array 'val_labels'"):
        load_medmnist_npz(_write_npz(tmp_path / "m.npz", rgb=False, drop="val_labels"), 28)


# --------------------------------------------------------------------------- split files


def test_split_file_read_and_apply(tmp_path, caplog):
    path = _write_csv(tmp_path / "split.csv", ["image_id", "split"],
                      [["a", "train"], ["b", "train"], ["c", "val"], ["d", "test"], ["zz", "test"]])
    mapping = read_split_file(path)
    assert mapping == {"a": "train", "b": "train", "c": "val", "d": "test", "zz": "test"}
    data = ImageSet(images=torch.zeros((5, 3, 2, 2), dtype=torch.uint8), labels=torch.tensor([0, 1, 0, 1, 1]),
                    class_names=["x", "y"], ids=["a", "b", "c", "d", "e"])
    with caplog.at_level(logging.WARNING, logger="fopro_kd.data"):
        parts = apply_split_file(data, mapping, "toy")
    assert parts["train"].ids == ["a", "b"] and parts["val"].ids == ["c"] and parts["test"].ids == ["d"]
    assert "1 of 5 images are not in the split file" in caplog.text and "1 ids of the split file" in caplog.text
    with pytest.raises(ValueError, match="split 'val' is empty"):
        apply_split_file(data, {"a": "train", "d": "test"}, "toy")


@pytest.mark.parametrize(
    "header, rows, message",
    [
        (["image_id", "fold"], [["a", "train"]], "missing column.*split"),
        (["image_id", "split"], [["a", "train"], ["b", "validation"]], "line 3: split='validation'"),
        (["image_id", "split"], [["a", "train"], ["a", "test"]], "'a' is listed twice"),
    ],
)
def test_split_file_errors(tmp_path, header, rows, message):
    with pytest.raises(ValueError, match=message):
        read_split_file(_write_csv(tmp_path / "s.csv", header, rows))


# --------------------------------------------------------------------------- batching


def test_iterate_batches_covers_all_indices():
    batches = list(iterate_batches(10, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [len(b) for b in iterate_batches(10, 4, shuffle=False, generator=None, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match="Generator"):
        list(iterate_batches(10, 4, shuffle=True, generator=None))


def test_batch_loader_epochs_are_reproducible_and_resumable():
    data = ImageSet(images=torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous(),
                    labels=torch.arange(10) % 2, class_names=["a", "b"], ids=[str(i) for i in range(10)])
    loader = BatchLoader(data, 4, shuffle=True, seed=5)
    assert len(loader) == 3 and len(BatchLoader(data, 4, True, 5, drop_last=True)) == 2
    epoch0 = [idx.tolist() for _, _, idx in loader]
    epoch1 = [idx.tolist() for _, _, idx in loader]
    assert epoch0 != epoch1 and sorted(sum(epoch1, [])) == list(range(10))
    resumed = BatchLoader(data, 4, shuffle=True, seed=5)
    resumed.set_epoch(1)
    assert [idx.tolist() for _, _, idx in resumed] == epoch1
    images, labels, idx = next(iter(BatchLoader(data, 4, shuffle=False, seed=0)))
    assert images.dtype == torch.uint8 and images[:, 0, 0, 0].tolist() == idx.tolist() == [0, 1, 2, 3]
    assert labels.tolist() == [0, 1, 0, 1]


# --------------------------------------------------------------------------- build_splits


def test_build_splits_synthetic_is_long_tailed_with_balanced_holdout():
    cfg = config_from_dict({"data": {"kind": "synthetic", "num_classes": 4, "max_per_class": 40, "imbalance_factor": 10,
                                     "image_size": 32, "site_style": "scanner_b"},
                            "split": {"val_per_class": 3, "test_per_class": 5}})
    splits = build_splits(cfg)
    assert splits.train.class_counts().tolist() == [40, 19, 9, 4]
    assert splits.val.class_counts().tolist() == [3] * 4 and splits.test.class_counts().tolist() == [5] * 4
    assert not torch.equal(splits.val.images[:3], splits.test.images[:3])  # different derived seeds
    assert splits.train.sites[0] == "scanner_b" and splits.info["sizes"]["train"] == 72


def test_build_splits_ham10000_balanced_and_split_file(ham_dir, tmp_path):
    base = {"kind": "ham10000", "root": str(ham_dir), "image_size": 16, "cache_dir": str(tmp_path / "c")}
    # every class has two images in one lesion (group) and no second group: nothing can be held out
    with pytest.raises(ValueError, match="empty"):
        build_splits(config_from_dict({"data": base, "split": {"val_per_class": 1, "test_per_class": 1}}))
    split_file = _write_csv(tmp_path / "split.csv", ["image_id", "split"],
                            [[f"ISIC_{c}0", "train"] for c in range(7)] + [["ISIC_01", "val"], ["ISIC_11", "test"]])
    splits = build_splits(config_from_dict({"data": {**base, "split_file": str(split_file)}}))
    assert len(splits.train) == 7 and splits.val.ids == ["ISIC_01"] and splits.test.ids == ["ISIC_11"]
    assert splits.info["split_mode"] == "split_file" and splits.info["sources"]["split_file"] == str(split_file)
    with pytest.raises(FileNotFoundError, match="data.root"):
        build_splits(config_from_dict({"data": {**base, "root": str(tmp_path / "nowhere")}}))
    with pytest.raises(ValueError, match="data.split_file"):
        build_splits(config_from_dict({"data": base, "split": {"mode": "predefined"}}))


def test_build_splits_medmnist_relative_to_root(tmp_path):
    _write_npz(tmp_path / "derma.npz", rgb=True)
    cfg = config_from_dict({"data": {"kind": "medmnist", "root": str(tmp_path), "npz_file": "derma.npz",
                                     "image_size": 28}})
    splits = build_splits(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 4)
    with pytest.raises(FileNotFoundError, match="data.npz_file"):
        build_splits(config_from_dict({"data": {"kind": "medmnist", "root": str(tmp_path)}}))


# --------------------------------------------------------------------------- real data (../shared)


@pytest.mark.shared
def test_real_ham10000_subset(ham10000_dir, tmp_path):
    with open(ham10000_dir / "HAM10000_metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    per_class: dict[str, list] = {}
    for row in rows:
        if len(per_class.setdefault(row["dx"], [])) < 30:
            per_class[row["dx"]].append(row)
    subset = [r for dx in sorted(per_class) for r in per_class[dx]]
    path = tmp_path / "subset.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(subset)
    data = load_ham10000(ham10000_dir, path, 32, tmp_path / "c", 0.0)
    assert len(data) == 210 and data.class_counts().tolist() == [30] * 7
    assert data.images.shape == (210, 3, 32, 32)
    assert 60 < data.images.float().mean() < 220  # real dermoscopy, not blank rows
    assert len(set(data.groups)) < len(data)  # some lesions have several images


@pytest.mark.shared
def test_real_isic2019_lt_partial(shared_dir, ham10000_dir, tmp_path, caplog):
    source = shared_dir / "data" / "isic2019-lt-splits"
    if not (source / "train_skin1_0.01.csv").is_file():
        pytest.skip("ISIC-2019-LT split CSVs not present")
    paths = {}
    for split in ("train", "val", "test"):
        with open(source / f"{split}_skin1_0.01.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        inside = [r for r in rows if "ISIC_0024306" <= r["image"] <= "ISIC_0034320"][:15]  # HAM10000 ids
        outside = [r for r in rows if not "ISIC_0024306" <= r["image"] <= "ISIC_0034320"][:5]
        paths[split] = _write_csv(tmp_path / f"{split}.csv", ["image", "finding_name", "finding"],
                                  [[r["image"], r["finding_name"], r["finding"]] for r in inside + outside])
    with caplog.at_level(logging.WARNING, logger="fopro_kd.data"):
        parts = load_isic2019_lt(ham10000_dir, paths["train"], paths["val"], paths["test"], 32, tmp_path / "c", 0.0)
    for split in ("train", "val", "test"):
        assert len(parts[split]) == 15
        assert f"isic2019_lt {split}: 5 of 20" in caplog.text
    assert parts["train"].class_names == ["NV", "MEL", "BCC", "BKL", "AK", "SCC", "VASC", "DF"]
