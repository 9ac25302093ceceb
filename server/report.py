"""What a finished (or aborted) federation writes: ``metrics.json`` content and the run's plots."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fopro_kd.config import Config
from fopro_kd.plots import (
    plot_class_histograms,
    plot_history,
    plot_lines_by_group,
    plot_per_class_recall,
    plot_per_class_rounds,
    plot_weights_per_round,
)
from fopro_kd.run_dir import RunDir
from fopro_kd.run_plan import resolve_run_plan
from server.selection import ServerEvaluator
from server.strategies import get_strategy_class
from server.history import RoundRecorder

logger = logging.getLogger("fopro_kd.federation")

__all__ = ["final_metrics", "write_plots"]


def final_metrics(cfg: Config, evaluator: ServerEvaluator, recorder: RoundRecorder, wall: float) -> dict[str, Any]:
    best = evaluator.best
    metrics: dict[str, Any] = dict(best.test_metrics)
    metrics.setdefault("per_site", {})
    timings = evaluator.timings
    metrics.update({
        "method": cfg.train.method,
        "strategy": cfg.federation.strategy,
        "fedmas_rule": cfg.federation.fedmas_rule if get_strategy_class(cfg.federation.strategy).reports_rule else None,
        "best_round": best.round,
        "val_balanced_accuracy": best.val_balanced_accuracy if best.round > 0 else None,
        "rounds": cfg.federation.num_rounds,
        "num_clients": cfg.federation.num_clients,
        "round_seconds": [t["round_seconds"] for t in timings],
        "mean_round_seconds": float(np.mean([t["round_seconds"] for t in timings])) if timings else None,
        "outside_training_share": [t["outside_training_share"] for t in timings],
        "mean_outside_training_share": (
            float(np.mean([t["outside_training_share"] for t in timings])) if timings else None
        ),
        "wall_seconds": wall,
        "failed_replies": {
            str(r): {**recorder.by_site(recorder.failures(log)),
                     **{f"evaluate:{k}": v for k, v in recorder.by_site(log.eval_errors).items()}}
            for r, log in sorted(recorder.rounds.items()) if log.train_errors or log.missing or log.eval_errors
        },
        "rejected_replies": [{**rej, "site": recorder.site_of(rej.get("node_id", -1))}
                             for _, log in sorted(recorder.rounds.items()) for rej in log.rejections],
        "missing_replies": [{"round": r, "node_id": node, "site": recorder.site_of(node), "check": "timeout",
                             "reason": reason}
                            for r, log in sorted(recorder.rounds.items()) for node, reason in sorted(log.missing.items())],
        "rounds_without_aggregation": [r for r, log in sorted(recorder.rounds.items()) if log.aggregated is False],
        "rejected_aggregates": ({} if evaluator.guard is None
                                else {str(r): v for r, v in sorted(evaluator.guard.aggregate_rejections.items())}),
    })
    if resolve_run_plan(cfg).any_dp:
        metrics["privacy"] = _privacy_summary(cfg, evaluator, recorder)
        metrics["dp_epsilon_max"] = metrics["privacy"].get("epsilon_max")
        metrics["central_epsilon"] = metrics["privacy"].get("central_epsilon")
    return metrics


def _privacy_summary(cfg: Config, evaluator: ServerEvaluator, recorder: RoundRecorder) -> dict[str, Any]:
    """What ``metrics.json`` says about privacy: per-site and max ε (local), central ε, declined rounds."""
    p = cfg.privacy
    summary: dict[str, Any] = {"mode": p.mode, "delta": p.delta, "accountant": p.accountant,
                               "federated_evaluation": False}
    if resolve_run_plan(cfg).local_dp:
        last = max(recorder.rounds) if recorder.rounds else 0
        per_site = recorder.epsilon_so_far(last)
        summary.update({
            "target_epsilon": p.target_epsilon,
            "epsilon_per_site": per_site,
            "epsilon_max": max(per_site.values()) if per_site else None,
            "statistics": p.statistics,
            "prompt": p.prompt,
            "budget_declines": {str(r): recorder.by_site(log.budget_declines)
                                for r, log in sorted(recorder.rounds.items()) if log.budget_declines},
        })
    central = evaluator.central_dp
    if central is not None:
        summary.update({"central_epsilon": central.epsilon(), "central_rounds": central.rounds,
                        "central_clip_norm": central.clip_norm, "central_noise_multiplier": central.noise_multiplier,
                        "central_sample_rates": [q for _, q, _ in central.history],
                        "central": central.summary()})  # sensitivity, noise_std, client_sampling, epsilon, delta, ...
    return summary


def _site_test_sizes(recorder: RoundRecorder, server_round: int) -> dict[str, int]:
    """Local test images of each site (from its federated-evaluation counts, the selected round first)."""
    sizes: dict[str, int] = {}
    rounds = sorted(recorder.rounds, key=lambda r: (r != server_round, -r))
    for r in rounds:
        for site, (_correct, total) in recorder.by_site(recorder.rounds[r].site_eval).items():
            sizes.setdefault(site, int(sum(total)))
    return sizes


def write_plots(run: RunDir, metrics: dict[str, Any], evaluator: ServerEvaluator, recorder: RoundRecorder) -> None:
    rows = run.history
    names = evaluator.splits.class_names
    train_counts = dict(zip(names, map(int, evaluator.train_counts)))
    test_counts = dict(zip(names, map(int, evaluator.splits.test.class_counts())))
    selected = metrics.get("best_round") if (metrics.get("best_round") or 0) > 0 else None
    chance = 1.0 / len(names) if names else None
    plot_history(rows, ["val_balanced_accuracy", "test_balanced_accuracy", "test_few_shot", "test_tail"],
                 run.plot_path("balanced_accuracy.png"), x_key="round", selected=selected, chance=chance,
                 title=f"Global model per round (test n={len(evaluator.splits.test)}, "
                       f"validation n={len(evaluator.splits.val)})")
    plot_per_class_rounds(rows, run.plot_path("per_class_recall_rounds.png"), train_counts, test_counts,
                          selected=selected, chance=chance)
    site_n = _site_test_sizes(recorder, selected or -1)
    plot_lines_by_group(rows, "round", "site_bacc/", run.plot_path("site_balanced_accuracy.png"),
                        "Balanced accuracy on each site's local test split",
                        labels={site: f"{site} (test n={n})" for site, n in site_n.items()},
                        ylabel="local test balanced accuracy", selected=selected, chance=chance)
    plot_weights_per_round(rows, run.plot_path("aggregation_weights.png"), selected=selected)
    if metrics.get("per_class_recall"):
        plot_per_class_recall(metrics["per_class_recall"], train_counts, run.plot_path("per_class_recall.png"))
    shared = {}
    for log in recorder.rounds.values():
        shared.update(recorder.by_site(log.class_counts))
    if shared:  # only when sites chose to share their class counts
        names = evaluator.splits.class_names
        hist = {site: dict(zip(names, counts)) for site, counts in sorted(shared.items())}
        run.write_json("reported_class_counts.json", hist)
        plot_class_histograms(hist, run.plot_path("reported_class_histograms.png"))
