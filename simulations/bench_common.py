"""Shared helpers of ``python -m simulations.bench``: timing, environment record, tables, targets.

Timing rule of every suite: the machine may be shared, so nothing is compared with a
figure from another run. Each comparison measures its candidates in the same process,
*interleaved* (A, B, A, B, ...) after a warm-up, and reports medians; ratios are taken
between medians measured side by side.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device | str | None) -> None:
    """Wait for queued GPU work so that wall-clock timings mean something."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_interleaved(
    candidates: dict[str, Callable[[], Any]],
    warmup: int,
    repeats: int,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, Any]]:
    """Time each callable ``warmup + repeats`` times, interleaved round-robin; medians of the repeats.

    The order is reversed every other round, so a load that rises or falls during the
    measurement biases no candidate. Besides wall-clock seconds, the process CPU time of
    each call is recorded: with other jobs on the machine it says how much work a call did,
    independently of how long it waited for a core.

    Returns ``{name: {"median_s", "min_s", "samples_s", "cpu_median_s", "cpu_samples_s"}}``
    (warm-up calls are not kept); ``samples_s[i]`` of every candidate come from the same round ``i``.
    """
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else reversed(names):
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            sync(device)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if i >= warmup:
                samples[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
    return {
        name: {"median_s": statistics.median(s), "min_s": min(s), "samples_s": [round(v, 6) for v in s],
               "cpu_median_s": statistics.median(cpu[name]), "cpu_samples_s": [round(v, 6) for v in cpu[name]]}
        for name, s in samples.items()
    }


def paired_ratio(timed: dict[str, dict[str, Any]], a: str, b: str, cpu: bool = False) -> float:
    """Median over rounds of time(a) / time(b), each pair measured side by side in the same round."""
    key = "cpu_samples_s" if cpu else "samples_s"
    return statistics.median(x / y for x, y in zip(timed[a][key], timed[b][key]) if y > 0)


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def environment(device: torch.device | str) -> dict[str, Any]:
    """What the figures were measured on (the load average says whether others used the CPUs)."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_start": loadavg(),
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def target(name: str, measured: float | None, threshold: float, op: str, unit: str = "", note: str = "") -> dict:
    """One target line: ``measured op threshold`` (op is ``>=``, ``<=`` or ``<``); None = not measured."""
    if measured is None:
        met = None
    elif op == ">=":
        met = measured >= threshold
    elif op == "<=":
        met = measured <= threshold
    elif op == "<":
        met = measured < threshold
    else:  # pragma: no cover - programming error
        raise ValueError(op)
    return {"name": name, "measured": measured, "target": f"{op} {threshold}{unit}", "met": met, "note": note}


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain fixed-width table of ``rows`` (floats with 3 significant decimals)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2):
                return f"{v:.3g}"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def format_targets(targets: list[dict]) -> str:
    rows = []
    for t in targets:
        measured = t["measured"]
        rows.append({
            "target": t["name"], "measured": measured if measured is None else round(float(measured), 4),
            "goal": t["target"], "met": t["met"], "note": t.get("note", ""),
        })
    return format_table(rows, ["target", "measured", "goal", "met", "note"])
