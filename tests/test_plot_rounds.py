"""Per-round comparison curves of several federations (simulations/plot_rounds.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from simulations.plot_rounds import main, round_curves


def write_history(run_dir: Path, rows: list[dict[str, str]]) -> Path:
    run_dir.mkdir(parents=True)
    with open(run_dir / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return run_dir


def row(rnd: int, bacc: str, df: str, vasc: str, nv: str = "0.9") -> dict[str, str]:
    return {"round": str(rnd), "test_balanced_accuracy": bacc, "recall/df": df, "recall/vasc": vasc, "recall/nv": nv}


def test_curves_average_the_rare_classes_and_leave_untested_rounds_empty(tmp_path: Path) -> None:
    a = write_history(tmp_path / "a", [row(0, "0.1", "0.0", "0.2"), row(1, "", "", ""), row(2, "0.5", "0.4", "0.8")])
    b = write_history(tmp_path / "b", [row(0, "0.2", "0.5", "0.5"), row(1, "0.3", "0.2", "0.6")])
    rows = round_curves({"a": a, "b": b}, ["df", "vasc"])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["rare/a"] == pytest.approx(0.1) and rows[2]["rare/a"] == pytest.approx(0.6)
    assert rows[1]["bacc/a"] is None and rows[1]["rare/a"] is None, "an untested round is a gap, not a zero"
    assert rows[1]["rare/b"] == pytest.approx(0.4) and "bacc/b" not in rows[2]


def test_cli_writes_both_figures_and_names_a_missing_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_history(tmp_path / "a", [row(0, "0.1", "0.0", "0.2"), row(1, "0.4", "0.3", "0.5")])
    assert main(["--variant", f"a={a}", "--rare-classes", "df", "vasc", "--out", str(tmp_path / "fig")]) == 0
    assert "a: round 1: test bACC 0.400, rare recall 0.400" in capsys.readouterr().out
    for name in ("fig-balanced-accuracy.png", "fig-rare-recall.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with pytest.raises(ValueError, match=r"no recall of \['akiec'\].*classes: \['df', 'nv', 'vasc'\]"):
        main(["--variant", f"a={a}", "--rare-classes", "df", "akiec", "--out", str(tmp_path / "fig2")])
