"""report.html (self-contained, parsed), ``fopro-kd report``'s like-with-like refusal and formats,
``data.class_names`` validation, and one log line per event (issue 17)."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from fopro_kd.cli import main as cli_main
from fopro_kd.config import Config, ConfigError, config_from_dict
from fopro_kd.metrics import compute_metrics
from fopro_kd.plots import plot_per_class_recall
from fopro_kd.run_dir import RunDir
from fopro_kd.run_report import REPORT_FILE, write_run_report
from fopro_kd.stats import save_predictions

PNG = b"\x89PNG\r\n\x1a\n"
NAMES = ["nv", "mel", "df"]
TRAIN = {"nv": 300, "mel": 40, "df": 6}
TEST = {"nv": 10, "mel": 8, "df": 6}


class _Page(HTMLParser):
    """Collects image sources, table headers and any external reference of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.headers: list[str] = []
        self.tables = 0
        self.external: list[str] = []
        self._in_th = False
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes.get("src") or "")
        if tag == "table":
            self.tables += 1
        if tag in ("script", "link") or any((v or "").startswith(("http:", "https:", "//")) for v in attributes.values()):
            self.external.append(f"{tag} {attrs}")
        self._in_th = tag == "th"

    def handle_endtag(self, tag: str) -> None:
        if tag == "th":
            self._in_th = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_th:
            self.headers.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _labels_probs(seed: int = 0, ids_prefix: str = "img") -> tuple[list[str], np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(3), [TEST[n] for n in NAMES])
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(3), size=len(labels))
    probs[np.arange(len(labels)) % 2 == 0, :] = np.eye(3)[labels[np.arange(len(labels)) % 2 == 0]]
    return [f"{ids_prefix}{i}" for i in range(len(labels))], labels, probs


def _single_site_run(path: Path, seed: int = 0, ids_prefix: str = "img", kind: str = "synthetic") -> Path:
    ids, labels, probs = _labels_probs(seed, ids_prefix)
    metrics = compute_metrics(labels, probs, NAMES, [TRAIN[n] for n in NAMES])
    metrics.update({"method": "ekd", "best_epoch": 2, "val_balanced_accuracy": 0.6})
    run = RunDir(path)
    run.save_config(config_from_dict({"data": {"kind": kind}, "train": {"method": "ekd", "epochs": 3}}))
    run.write_json("metrics.json", metrics)
    run.write_json("data_summary.json", {"name": kind, "counts": {
        "train": TRAIN, "val": {n: 4 for n in NAMES}, "test": TEST}, "info": {}})
    for epoch, (loss, val) in enumerate([(3.0, 0.3), (2.0, 0.6), (1.5, 0.5)], start=1):
        run.append_history({"epoch": epoch, "loss": loss, "loss_cls": loss / 3, "val_balanced_accuracy": val,
                            "val_few_shot": val / 2})
    save_predictions(run.resolve("predictions_test.npz"), ids, labels, probs, NAMES)
    plot_per_class_recall(metrics["per_class_recall"], TRAIN, run.plot_path("per_class_recall.png"))
    return path


def test_single_site_report_is_self_contained_with_tables_and_decodable_pngs(tmp_path: Path) -> None:
    run_dir = _single_site_run(tmp_path / "run")
    path = write_run_report(run_dir)
    assert path == run_dir / REPORT_FILE
    page = _parse(path)
    assert not page.external, f"the report must open without a network: {page.external}"
    assert len(page.images) >= 3  # history (redrawn), per-class recall, split histogram
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert page.tables >= 4  # config, data, headline, per-class
    for header in ("class", "train n", "test n", "recall (selected)", "metric", "setting"):
        assert header in page.headers, header
    text = " ".join(page.text)
    assert "tail recall" in text and "chance level" in text and "33.3%" in text  # 3 classes -> 1/3
    assert "24</b> images" in path.read_text()  # test n next to the headline


def _federated_run(path: Path) -> Path:
    run = RunDir(path)
    run.save_config(config_from_dict({"federation": {"strategy": "fedavg", "num_rounds": 2, "num_clients": 2}}))
    ids, labels, probs = _labels_probs()
    metrics = compute_metrics(labels, probs, NAMES, [TRAIN[n] for n in NAMES])
    metrics.update({"method": "fopro-kd", "strategy": "fedavg", "best_round": 2, "rounds": 2, "num_clients": 2,
                    "per_site": {"site-0": {"balanced_accuracy": 0.5, "num_samples": 7},
                                 "site-1": {"balanced_accuracy": 0.25, "num_samples": 17}}})
    run.write_json("metrics.json", metrics)
    run.write_json("site_histograms.json", {
        "train": {"site-0": {"nv": 200, "mel": 10, "df": 1}, "site-1": {"nv": 100, "mel": 30, "df": 5}},
        "local_test_sizes": {"site-0": 7, "site-1": 17}, "styles": {},
        "server": {"train": TRAIN, "val": {n: 4 for n in NAMES}, "test": TEST}})
    for r in range(3):
        run.append_history({"round": r, "val_balanced_accuracy": 0.3 + 0.1 * r, "test_balanced_accuracy": 0.3,
                            "clients_aggregated": 2 if r else None})
    return path


def test_federated_report_has_per_round_and_per_site_tables(tmp_path: Path) -> None:
    path = write_run_report(_federated_run(tmp_path / "fed"))
    page = _parse(path)
    text = " ".join(page.text)
    assert "Federation: per round" in text and "Federation: per site" in text
    assert "2 (selected)" in text
    assert "local test n" in page.headers and "site-1" in text
    assert "17" in text and "train total" in text  # per-site histogram table and local test sizes


def test_report_refuses_runs_on_different_test_sets_unless_allowed(tmp_path: Path, capsys) -> None:
    a = _single_site_run(tmp_path / "a" / "demo")
    b = _single_site_run(tmp_path / "b" / "demo", seed=1)  # same test images, another model
    other = _single_site_run(tmp_path / "ham" / "demo", ids_prefix="ISIC_", kind="ham10000")

    assert cli_main(["report", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "a/demo" in out and "b/demo" in out, "runs are named by their unique relative path"
    assert "n = 24 images, 3 classes" in out and "33.3%" in out
    assert "paired difference to the first run" in out and "share the same test images" in out

    assert cli_main(["report", str(a), str(other)]) == 2
    captured = capsys.readouterr()
    assert "refusing to compare" in captured.err and "ham/demo" in captured.err
    assert "test metrics" not in captured.out

    assert cli_main(["report", str(a), str(other), "--allow-mixed"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("WARNING: NOT LIKE WITH LIKE") and "WARNING" in captured.err


def test_report_formats_markdown_and_csv(tmp_path: Path, capsys) -> None:
    a = _single_site_run(tmp_path / "x")
    b = _single_site_run(tmp_path / "y", seed=3)
    assert cli_main(["report", str(a), str(b), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.reader(io.StringIO(captured.out.split("\n\n")[0])))
    assert rows[0][:5] == ["run", "strategy", "method", "round/epoch", "test n"] and "tail" in rows[0]
    assert [r[0] for r in rows[1:]] == ["x", "y"] and rows[1][4] == "24"
    assert "chance level" in captured.err  # notes stay out of the CSV
    assert cli_main(["report", str(a), str(b), "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| run | strategy |") and set(table[1]) <= set("|-:") and len(table) >= 4


def test_report_on_different_classes_is_refused(tmp_path: Path) -> None:
    a = _single_site_run(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    (b / "metrics.json").write_text(json.dumps({"balanced_accuracy": 0.5, "per_class_recall": {"0": 0.5, "1": 0.5}}))
    assert cli_main(["report", str(a), str(b)]) == 2


# --------------------------------------------------------------------------- data.class_names


def _synthetic(**data: object) -> Config:
    return config_from_dict({"data": {"kind": "synthetic", "num_classes": 3, "image_size": 16, "max_per_class": 12,
                                      "imbalance_factor": 2, **data},
                             "split": {"val_per_class": 2, "test_per_class": 2}})


def test_class_names_rename_every_split() -> None:
    from fopro_kd.data import build_splits

    splits = build_splits(_synthetic(class_names=["normal", "benign", "malignant"]))
    assert splits.class_names == ["normal", "benign", "malignant"]
    assert splits.test.class_names == splits.val.class_names == splits.class_names
    assert list(splits.summary()["train"]) == ["normal", "benign", "malignant"]


def test_class_names_of_the_wrong_length_name_the_field() -> None:
    from fopro_kd.data import build_splits

    with pytest.raises(ConfigError, match=r"'data.class_names' lists 2 names .* has 3 classes"):
        build_splits(_synthetic(class_names=["normal", "pneumonia"]))


@pytest.mark.parametrize("names, match", [(["a", "a", "b"], "unique"), (["a", " "], "non-empty"), (["a"], "at least 2")])
def test_bad_class_names_fail_at_load_time(names: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=f"data.class_names.*{match}|{match}.*"):
        _synthetic(class_names=names)


def test_class_names_for_a_medmnist_file(tmp_path: Path) -> None:
    from fopro_kd.data import build_splits

    arrays = {}
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, size=(n, 16, 16), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    np.savez(tmp_path / "pneumonia.npz", **arrays)
    base = {"data": {"kind": "medmnist", "npz_file": str(tmp_path / "pneumonia.npz"), "image_size": 16}}
    splits = build_splits(config_from_dict({**base, "data": {**base["data"], "class_names": ["normal", "pneumonia"]}}))
    assert splits.class_names == ["normal", "pneumonia"]
    with pytest.raises(ConfigError, match="data.class_names"):
        build_splits(config_from_dict({**base, "data": {**base["data"], "class_names": ["a", "b", "c"]}}))


# --------------------------------------------------------------------------- logging


def test_configured_logging_prints_each_line_once_and_mutes_library_info() -> None:
    import flwr.common  # noqa: F401 - installs Flower's own console handler
    from flwr.common import log

    from fopro_kd.logging_setup import configure_logging

    stream = io.StringIO()
    flower = logging.getLogger("flwr")
    saved = (list(flower.handlers), flower.level, flower.propagate)
    handler = configure_logging(verbose=False, stream=stream)
    try:
        log(logging.INFO, "flower info line")
        log(logging.DEBUG, "flower debug line")
        log(logging.WARNING, "flower warning line")
        logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate.schemas")
        logging.getLogger("fopro_kd.federation").info("round 1: val bACC 0.5")
        text = stream.getvalue()
        from flwr.supercore.logger import ConsoleHandler

        own_console = [h for h in flower.handlers if isinstance(h, ConsoleHandler)]
    finally:
        logging.getLogger().removeHandler(handler)
        flower.handlers[:] = saved[0]
        flower.setLevel(saved[1])
        flower.propagate = saved[2]
    assert not own_console, "Flower's own console handler would print every Flower line a second time"
    assert text.count("flower warning line") == 1
    assert "flower info line" not in text and "flower debug line" not in text and "alembic" not in text
    assert text.count("round 1: val bACC 0.5") == 1


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_simulate_log_has_no_duplicate_lines(tmp_path: Path) -> None:
    """The log of a real tiny ``fopro-kd simulate`` (fresh process): no line twice, no DEBUG, no alembic."""
    from simulations.tiny_federation import tiny_federation_values

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_federation_values(federation={"num_rounds": 1})))
    result = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config), "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # one message per line: strip the timestamp, then no message may repeat back to back (the old doubling)
    messages = [line.split(" ", 1)[1] if line[:2].isdigit() else line for line in lines]
    doubled = [a for a, b in zip(messages, messages[1:]) if a == b]
    assert not doubled, doubled
    flower_info = [m for m in messages if "INFO flwr" in m or "\x1b[92mINFO" in m]
    assert not flower_info, flower_info[:5]
    assert not any(" DEBUG " in m or "alembic" in m for m in messages)
    assert any("fopro_kd.federation" in m and "round 1" in m for m in messages), "fopro-kd's progress stays"
    assert (tmp_path / "run" / REPORT_FILE).is_file()
