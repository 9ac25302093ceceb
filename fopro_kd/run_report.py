"""``report.html``: a one-page, self-contained report of one run directory.

A clinician-researcher should not need a Python session to read a run: this page opens in any
browser from the file system (no server, no network, no scripts; every PNG is embedded as a
base64 ``data:`` URI) and puts the numbers next to what they depend on:

* the run (single-site or federated strategy, method, selected epoch/round) and a config summary
  (the full ``config.yaml`` folded underneath);
* the data: images per class and split (and per site for a federation), the test set size and
  the chance level (balanced accuracy of a constant classifier, 1 / C), and the test-set
  fingerprint that ``fopro-kd report`` compares;
* the headline table (balanced accuracy, many/medium/few-shot, ``tail``, macro-F1, MCC, AUC);
* per-class recall with training and test counts (a recall on 6 test images moves in steps of
  17 points, so the count belongs next to it);
* the plots of the run directory, each with a caption;
* federated runs: the per-round table and the per-site table.

Everything is read back from the files of the run directory (``config.yaml``, ``metrics.json``,
``history.csv``, ``data_summary.json`` or ``site_histograms.json``, ``plots/*.png``), so a report
can be rewritten for an old run with ``python -m fopro_kd.run_report RUN_DIR``. No torch or
Flower import.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = ["REPORT_FILE", "data_counts", "test_fingerprint", "try_write_run_report", "write_run_report"]

logger = logging.getLogger("fopro_kd.report")

REPORT_FILE = "report.html"

_PLOT_CAPTIONS: dict[str, str] = {
    "history.png": "Training curves per epoch: validation scores (left, 0-1, chance level dotted, selected epoch "
                   "dashed) and training losses (right).",
    "balanced_accuracy.png": "Global model per round: validation (selection) and test scores; dashed: the selected "
                             "round, dotted: chance level.",
    "per_class_recall.png": "Test recall of each class of the selected model, classes ordered by training count "
                            "(orange, log axis).",
    "per_class_recall_rounds.png": "Test recall of each class per round, one panel per class (training and test "
                                   "counts in the panel title).",
    "site_balanced_accuracy.png": "Balanced accuracy of the global model on each site's local test split (its size "
                                  "in the legend).",
    "aggregation_weights.png": "Aggregation weight α_k of each site per round.",
    "class_histograms.png": "Training images per class at each site (the partition, before training).",
    "reported_class_histograms.png": "Class counts the sites reported to the server.",
    "split_histograms.png": "Images per class in the server's train / validation / test splits.",
    "prompt_mask.png": "Learned Fourier-prompt amplitude multiplier M on frequency axes, and its radial profile.",
}
_PLOT_ORDER = list(_PLOT_CAPTIONS)

_HEADLINE = (
    ("balanced accuracy", "balanced_accuracy"), ("accuracy", "accuracy"), ("many-shot recall", "many_shot"),
    ("medium-shot recall", "medium_shot"), ("few-shot recall", "few_shot"), ("tail recall", "tail"),
    ("macro-F1", "macro_f1"), ("MCC", "mcc"), ("Cohen's kappa", "kappa"), ("macro AUC (OvR)", "auc"),
)
_PERCENT_KEYS = {"balanced_accuracy", "accuracy", "many_shot", "medium_shot", "few_shot", "tail"}

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc;
       padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.sub { color: #666; font-size: 0.9em; } .warn { color: #a40; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
"""


# --------------------------------------------------------------------------- reading the run directory


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("report: cannot read %s (%s)", path, exc)
        return None


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = {}
            for key, value in row.items():
                if value in ("", None):
                    continue
                try:
                    parsed[key] = float(value)
                except ValueError:
                    parsed[key] = value
            rows.append(parsed)
    return rows


def data_counts(run_dir: str | Path) -> dict[str, dict[str, int]] | None:
    """``{split: {class: count}}`` of the run's train / val / test data (single-site or the federation's server)."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "data_summary.json")
    if isinstance(summary, dict) and isinstance(summary.get("counts"), dict):
        return summary["counts"]
    sites = _read_json(run_dir / "site_histograms.json")
    if isinstance(sites, dict) and isinstance(sites.get("server"), dict):
        return sites["server"]
    return None


def _data_name(run_dir: Path, config: dict[str, Any]) -> str:
    summary = _read_json(run_dir / "data_summary.json")
    if isinstance(summary, dict) and summary.get("name"):
        return str(summary["name"])
    return str((config.get("data") or {}).get("kind") or "?")


def test_fingerprint(run_dir: str | Path) -> dict[str, Any]:
    """What identifies the run's test set, for ``fopro-kd report``'s like-with-like check.

    Returns ``{"kind": "ids" | "counts" | "none", "value": str, "n": int | None, "classes": [...]}``.
    ``ids``: a SHA-256 over the sorted ``(image id, label)`` pairs of ``predictions_test.npz`` (two runs
    share it exactly when they were scored on the same images with the same labels); ``counts``: a
    SHA-256 over the data kind, the class names and the test counts per class of the data summary
    (weaker: two different test sets of equal per-class size collide), for runs without predictions.
    """
    run_dir = Path(run_dir)
    config = _read_yaml(run_dir / "config.yaml")
    pred_file = run_dir / "predictions_test.npz"
    if pred_file.is_file():
        import numpy as np

        try:
            with np.load(pred_file, allow_pickle=False) as data:
                ids = [str(i) for i in data["ids"]]
                labels = [int(v) for v in data["labels"]]
                classes = [str(c) for c in data["class_names"]]
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("report: cannot read %s (%s); using the data summary", pred_file, exc)
        else:
            pairs = sorted(zip(ids, labels))
            digest = hashlib.sha256(json.dumps([classes, pairs]).encode()).hexdigest()[:12]
            return {"kind": "ids", "value": digest, "n": len(ids), "classes": classes,
                    "counts_value": _counts_digest(run_dir, config)}
    counts = data_counts(run_dir)
    if counts and isinstance(counts.get("test"), dict):
        test = counts["test"]
        return {"kind": "counts", "value": _counts_digest(run_dir, config), "n": int(sum(test.values())),
                "classes": list(test), "counts_value": _counts_digest(run_dir, config)}
    return {"kind": "none", "value": "", "n": None, "classes": [], "counts_value": None}


def _counts_digest(run_dir: Path, config: dict[str, Any]) -> str | None:
    counts = data_counts(run_dir)
    if not counts or not isinstance(counts.get("test"), dict):
        return None
    payload = [_data_name(run_dir, config), list(counts["test"].items())]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:12]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


# --------------------------------------------------------------------------- HTML pieces


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, percent: bool) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(float(value)):
        return "n/a"
    return f"{100 * float(value):.1f}%" if percent else f"{float(value):.3f}"


def _table(header: list[str], rows: list[list[Any]], left: int = 1, text_cols: tuple[int, ...] = ()) -> str:
    """An HTML table; the first ``left`` columns and ``text_cols`` are left-aligned (names, words), the rest
    right-aligned (numbers)."""
    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="l"' if i < left or i in text_cols else ""
        return f"<{tag}{cls}>{_e(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _embed_png(path: Path) -> str | None:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


_CONFIG_SUMMARY = (
    "seed", "data.kind", "data.image_size", "data.class_names", "split.mode", "train.method", "train.loss",
    "train.epochs", "train.batch_size", "train.lr", "train.lambda_rep", "student.arch", "student.init",
    "teacher.arch", "teacher.source", "prompt.param", "akd.mode", "metrics.many_shot_threshold",
    "metrics.few_shot_threshold", "metrics.tail_classes", "privacy.mode",
)
_FEDERATION_SUMMARY = (
    "federation.strategy", "federation.num_rounds", "federation.num_clients", "federation.local_epochs",
    "federation.fraction_train", "federation.partition.kind", "federation.partition.alpha",
)


# --------------------------------------------------------------------------- sections


def _section_run(run_dir: Path, metrics: dict[str, Any], config: dict[str, Any], federated: bool) -> str:
    kind = f"federated ({metrics.get('strategy')}, {metrics.get('num_clients', '?')} sites)" if federated \
        else "single-site"
    selected = (f"round {metrics.get('best_round')} of {metrics.get('rounds', '?')}" if federated
                else f"epoch {metrics.get('best_epoch')} of {_get(config, 'train.epochs') or '?'}")
    keys = list(_CONFIG_SUMMARY) + (list(_FEDERATION_SUMMARY) if federated else [])
    rows = [[k, "-" if _get(config, k) is None else _get(config, k)] for k in keys]
    teacher = metrics.get("teacher")
    if teacher:
        rows.append(["teacher weights", teacher])
    full = html.escape(yaml.safe_dump(config, sort_keys=False)) if config else "(no config.yaml)"
    return (
        f"<h1>Run report: {_e(run_dir.name)}</h1>"
        f"<p class='sub'>{_e(run_dir)} &middot; {_e(kind)} &middot; method <b>{_e(metrics.get('method') or '-')}"
        f"</b> &middot; reported model: {_e(selected)} (chosen on the validation split, scored once on test)"
        f" &middot; written {_e(time.strftime('%Y-%m-%d %H:%M'))}</p>"
        "<h2>Configuration</h2>" + _table(["setting", "value"], rows, left=2)
        + f"<details><summary>full config.yaml</summary><pre>{full}</pre></details>"
    )


def _section_data(run_dir: Path, metrics: dict[str, Any], counts: dict[str, dict[str, int]] | None,
                  fingerprint: dict[str, Any]) -> str:
    parts = ["<h2>Data</h2>"]
    recalls = metrics.get("per_class_recall") or {}
    classes = list(recalls) or (list(counts["train"]) if counts else [])
    chance = 1.0 / len(classes) if classes else None
    test_n = metrics.get("num_samples") or fingerprint.get("n")
    parts.append(
        f"<p>{len(classes)} classes; test set: <b>{_e(test_n if test_n is not None else '?')}</b> images; chance level "
        f"(balanced accuracy of a constant classifier, 1 / C): <b>{_fmt(chance, True)}</b>. Test-set fingerprint: "
        f"<code>{_e(fingerprint.get('kind'))}:{_e(fingerprint.get('value') or '-')}</code> "
        "(<code>fopro-kd report</code> compares runs only when it matches).</p>"
    )
    if counts:
        splits = [s for s in ("train", "val", "test") if s in counts]
        rows = [[c, *(counts[s].get(c, 0) for s in splits)] for c in classes]
        rows.append(["total", *(sum(counts[s].values()) for s in splits)])
        parts.append("<p>Images per class and split:</p>" + _table(["class", *splits], rows))
    sites = _read_json(run_dir / "site_histograms.json")
    if isinstance(sites, dict) and isinstance(sites.get("train"), dict) and sites["train"]:
        site_names = list(sites["train"])
        local_test = sites.get("local_test_sizes") or {}
        styles = sites.get("styles") or {}
        rows = [[c, *(sites["train"][s].get(c, 0) for s in site_names)] for c in classes]
        rows.append(["train total", *(sum(sites["train"][s].values()) for s in site_names)])
        rows.append(["local test", *(local_test.get(s, "?") for s in site_names)])
        if any(styles.get(s) for s in site_names):
            rows.append(["style", *(styles.get(s) or "-" for s in site_names)])
        parts.append("<p>Training images per class at each site (and each site's local test split):</p>"
                     + _table(["class", *site_names], rows))
    return "".join(parts)


def _section_headline(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    groups = metrics.get("shot_groups") or {}
    member = {"many_shot": groups.get("many"), "medium_shot": groups.get("medium"), "few_shot": groups.get("few"),
              "tail": metrics.get("tail_classes")}
    rows = []
    for label, key in _HEADLINE:
        if key not in metrics:
            continue
        names = member.get(key)
        rows.append([label, _fmt(metrics.get(key), key in _PERCENT_KEYS),
                     "" if names is None else (", ".join(names) or "(no class)")])
    if metrics.get("val_balanced_accuracy") is not None:
        rows.append(["validation balanced accuracy (selection)", _fmt(metrics["val_balanced_accuracy"], True), ""])
    last = metrics.get("last_epoch") or {}
    if last.get("balanced_accuracy") is not None:
        rows.append(["test balanced accuracy of the last epoch", _fmt(last["balanced_accuracy"], True), ""])
    privacy = metrics.get("privacy") or {}
    eps = privacy.get("dp-epsilon", privacy.get("epsilon_max"))
    if eps is not None:
        rows.append(["differential privacy: ε spent", _fmt(eps, False), f"δ = {privacy.get('delta', '?')}"])
    many = _get(config, "metrics.many_shot_threshold") or 100
    few = _get(config, "metrics.few_shot_threshold") or 20
    note = (f"<p class='sub'>Shot groups by training count: many &gt; {_e(many)}, medium {_e(few)}-{_e(many)}, few "
            f"&lt; {_e(few)} training images; <i>tail</i>: the k rarest training classes (metrics.tail_classes), "
            "defined on every data set. n/a: the group has no class with test images.</p>")
    return "<h2>Headline (test split, selected model)</h2>" + \
        _table(["metric", "value", "classes"], rows, left=1, text_cols=(2,)) + note


def _section_classes(metrics: dict[str, Any], counts: dict[str, dict[str, int]] | None) -> str:
    recalls = metrics.get("per_class_recall") or {}
    if not recalls:
        return ""
    train = metrics.get("train_counts") or (counts or {}).get("train") or {}
    test = (counts or {}).get("test") or {}
    val = (counts or {}).get("val") or {}
    groups = {n: g for g, names in (metrics.get("shot_groups") or {}).items() for n in names}
    tail = set(metrics.get("tail_classes") or [])
    last = (metrics.get("last_epoch") or {}).get("per_class_recall") or {}
    header = ["class", "train n", "val n", "test n", "group", "recall (selected)"]
    if last:
        header.append("recall (last epoch)")
    rows = []
    for name in sorted(recalls, key=lambda n: (-(train.get(n) or 0), n)):
        group = groups.get(name, "") + (" + tail" if name in tail else "")
        row = [name, train.get(name, "?"), val.get(name, "?"), test.get(name, "?"), group,
               _fmt(recalls[name], True)]
        if last:
            row.append(_fmt(last.get(name), True))
        rows.append(row)
    return "<h2>Per-class recall (classes by training count)</h2>" + _table(header, rows, text_cols=(4,))


def _section_federation(metrics: dict[str, Any], history: list[dict[str, Any]],
                        site_info: dict[str, Any] | None) -> str:
    parts = ["<h2>Federation: per round</h2>"]
    columns = [("round", "round", False), ("val bACC", "val_balanced_accuracy", True),
               ("test bACC", "test_balanced_accuracy", True), ("test few-shot", "test_few_shot", True),
               ("test tail", "test_tail", True), ("sites aggregated", "clients_aggregated", None),
               ("sites failed", "clients_failed", None), ("round s", "round_seconds", None)]
    present = [c for c in columns if any(c[1] in row for row in history)]
    rows = []
    for row in history:
        cells = []
        for _, key, percent in present:
            value = row.get(key)
            if percent is None or key == "round":
                cells.append("-" if value is None else (f"{value:.0f}" if key != "round_seconds" else f"{value:.1f}"))
            else:
                cells.append(_fmt(value, percent))
        if row.get("round") == metrics.get("best_round"):
            cells[0] = f"{cells[0]} (selected)"
        rows.append(cells)
    parts.append(_table([c[0] for c in present], rows) if rows else "<p>(no history.csv)</p>")
    per_site = metrics.get("per_site") or {}
    local_test = (site_info or {}).get("local_test_sizes") or {}
    train = (site_info or {}).get("train") or {}
    if per_site or train:
        parts.append(f"<h2>Federation: per site (selected round {_e(metrics.get('best_round'))}, global model on each "
                     "site's local test split)</h2>")
        site_names = sorted(set(per_site) | set(train))
        rows = []
        for site in site_names:
            m = per_site.get(site) or {}
            rows.append([site, sum((train.get(site) or {}).values()) if site in train else "?",
                         m.get("num_samples", local_test.get(site, "?")), _fmt(m.get("balanced_accuracy"), True),
                         _fmt(m.get("many_shot"), True), _fmt(m.get("medium_shot"), True),
                         _fmt(m.get("few_shot"), True)])
        parts.append(_table(["site", "train n", "local test n", "bACC", "many", "medium", "few"], rows))
        if not per_site:
            parts.append("<p class='sub'>No federated evaluation (e.g. off under differential privacy).</p>")
        else:
            parts.append("<p class='sub'>Local test splits are small: one image of a class with 5 local test images "
                         "moves that class's recall by 20 points.</p>")
    return "".join(parts)


def _section_plots(run_dir: Path) -> str:
    plot_dir = run_dir / "plots"
    files = sorted(plot_dir.glob("*.png")) if plot_dir.is_dir() else []
    files.sort(key=lambda p: (_PLOT_ORDER.index(p.name) if p.name in _PLOT_ORDER else len(_PLOT_ORDER), p.name))
    parts = ["<h2>Plots</h2>"]
    for path in files:
        uri = _embed_png(path)
        if uri is None:
            continue
        caption = _PLOT_CAPTIONS.get(path.name, path.stem.replace("_", " "))
        parts.append(f"<figure><img alt='{_e(path.name)}' src='{uri}'><figcaption><b>{_e(path.name)}</b>: "
                     f"{_e(caption)}</figcaption></figure>")
    if len(parts) == 1:
        parts.append("<p>(no plots)</p>")
    return "".join(parts)


# --------------------------------------------------------------------------- entry point


def _refresh_plots(run_dir: Path, metrics: dict[str, Any], history: list[dict[str, Any]],
                   counts: dict[str, dict[str, int]] | None, federated: bool) -> None:
    """Draw the plots that need what only the final metrics know (selected epoch, chance level, split counts)."""
    from fopro_kd.plots import plot_class_histograms, plot_history

    classes = list(metrics.get("per_class_recall") or {})
    chance = 1.0 / len(classes) if classes else None
    if not federated and history:
        losses = [k for k in history[0] if k.startswith("loss")]
        keys = ["val_balanced_accuracy", "val_few_shot", *sorted(losses, key=lambda k: (k != "loss", k))]
        present = [k for k in keys if any(k in row for row in history)]
        plot_history(history, present, run_dir / "plots" / "history.png",
                     selected=metrics.get("best_epoch"), chance=chance)
    if counts:
        plot_class_histograms(counts, run_dir / "plots" / "split_histograms.png",
                              title="Images per class and split", ylabel="images")


def write_run_report(run_dir: str | Path, refresh_plots: bool = True) -> Path:
    """Write ``RUN_DIR/report.html`` from the run directory's files; return its path.

    ``refresh_plots`` redraws ``plots/history.png`` of a single-site run with the selected epoch and
    the chance level marked, and draws ``plots/split_histograms.png``, before embedding the plots.
    A report is a view: a missing file leaves its section out instead of failing the run.
    """
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    if not isinstance(metrics, dict):
        raise FileNotFoundError(f"{run_dir}: no readable metrics.json; the report is written after the final test")
    config = _read_yaml(run_dir / "config.yaml")
    history = _read_history(run_dir / "history.csv")
    counts = data_counts(run_dir)
    federated = "strategy" in metrics
    if refresh_plots:
        try:
            _refresh_plots(run_dir, metrics, history, counts, federated)
        except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
            logger.warning("report: could not redraw the plots (%s)", exc)
    fingerprint = test_fingerprint(run_dir)
    site_info = _read_json(run_dir / "site_histograms.json") if federated else None
    body = [
        _section_run(run_dir, metrics, config, federated),
        _section_data(run_dir, metrics, counts, fingerprint),
        _section_headline(metrics, config),
        _section_classes(metrics, counts),
    ]
    if federated:
        body.append(_section_federation(metrics, history, site_info if isinstance(site_info, dict) else None))
    body.append(_section_plots(run_dir))
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>fopro-kd run report: {_e(run_dir.name)}</title><style>{_CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")
    from fopro_kd.checkpoint import atomic_write_text

    path = run_dir / REPORT_FILE
    atomic_write_text(path, page)
    logger.info("run report: %s", path)
    return path


def try_write_run_report(run_dir: str | Path) -> Path | None:
    """:func:`write_run_report` for the end of a run: a failure is logged, never raised (the run's results
    are already on disk; a broken view of them must not turn a finished run into a failed one)."""
    try:
        return write_run_report(run_dir)
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not write %s in %s: %s: %s", REPORT_FILE, run_dir, type(exc).__name__, exc)
        return None


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin wrapper
    """``python -m fopro_kd.run_report RUN_DIR...``: (re)write the report of finished runs."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m fopro_kd.run_report RUN_DIR [RUN_DIR...]", file=sys.stderr)
        return 2
    for run_dir in args:
        print(write_run_report(run_dir))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
