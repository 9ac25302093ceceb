"""fopro-kd ServerApp: strategy from config, server-side model selection, run-directory report.

Per round the strategy (``federation.strategy`` via
:func:`server.strategies.build_strategy`) samples clients, aggregates their students and
asks every site to score the new global model on its local test split. After each round
:class:`ServerEvaluator` scores the global model on the server's *balanced validation*
split (model selection: the best round's weights are kept in ``best.pt``) and on its
*test* split (reporting only, never used for selection; method.md §9.2), and appends a
row to ``history.csv``. At the end ``metrics.json`` holds the test metrics of the
best-validation round, per-site results, weights and timings.

This module is the orchestration (strategy set-up, resume, the round loop and its
checkpoints); the phases live beside it: start-up checks (:mod:`server.startup`), scoring
and selection (:mod:`server.selection`), the final report (:mod:`server.report`) and the
run-config keys (:mod:`server.run_config`).

Configuration: :func:`make_server_app` closes over a :class:`~fopro_kd.config.Config`
(simulation, tests); the module-level ``app`` reads ``config-file``, ``overrides`` and
``out-dir`` from the run config (``flwr run``).

Differential privacy (docs/privacy.md): with ``privacy.mode`` ``local`` or ``central`` the
global model is the GroupNorm DP student, federated evaluation is switched off
(``fraction_evaluate`` forced to 0, logged: per-site test counts are outside the guarantee),
each site's reported ε goes to ``history.csv`` (``epsilon/<site>``) and its maximum to
``metrics.json``; a run in which no site has budget left ends cleanly after that round
(``stopped_early`` in ``metrics.json``). ``central``: the strategy clips and noises the
aggregate (:mod:`server.strategies.central_dp`) and ``central-epsilon`` is recorded per round.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fopro_kd.models.weights import default_offline_hub

default_offline_hub()  # before the Hub can be used: hospitals have no Hub access (its docstring)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fopro_kd.config import Config  # noqa: E402
from fopro_kd.federated_prompt import explore_rounds  # noqa: E402
from fopro_kd.federation.evaluation import build_global_student  # noqa: E402
from fopro_kd.federation.sites import cached_splits, config_from_run_config  # noqa: E402
from fopro_kd.federation.wire import REPLY_SITE_ID_KEY, RUN_CONFIG_RESUME_DIR_KEY, STATE_KEY  # noqa: E402
from fopro_kd.round_schedule import federated_evaluate_phase, persists_round, scored_in_train  # noqa: E402
from fopro_kd.run_dir import RunDir  # noqa: E402
from fopro_kd.run_plan import resolve_run_plan  # noqa: E402
from fopro_kd.run_report import try_write_run_report  # noqa: E402
from server.checkpoints import (  # noqa: E402
    ResumeError,
    ServerCheckpointStore,
    arrays_from_tensors,
    check_fresh_run_dir,
    config_hash,
    get_rng_state,
    plain,
    set_rng_state,
    tensors_from_arrays,
)
from server.history import RoundRecorder  # noqa: E402
from server.report import final_metrics, write_plots  # noqa: E402
from server.rounds import (  # noqa: E402
    BoundedWaitGrid,
    FederationAborted,
    FederationFinished,
    NodesUnavailable,
    RoundGuard,
)
from server.run_config import run_dirs_from_run_config  # noqa: E402
from server.selection import ServerEvaluator  # noqa: E402
from server.startup import check_federation_config, strategy_federation_config  # noqa: E402
from server.strategies import build_strategy  # noqa: E402
from server.strategies.base import weighted_mean_metrics  # noqa: E402
from server.strategies.central_dp import CentralDP  # noqa: E402

logger = logging.getLogger("fopro_kd.federation")

__all__ = [
    "RUN_CONFIG_RESUME_DIR_KEY",
    "FederationAborted",
    "FederationFinished",
    "ServerEvaluator",
    "app",
    "check_federation_config",
    "load_resume_checkpoint",
    "make_server_app",
    "run_federation",
]


# --------------------------------------------------------------------------- orchestration


def aggregate_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """``num-examples``-weighted mean of the clients' scalar metrics, without the ``site-id`` label.

    Used for both train and evaluate replies (the strategy has already dropped invalid ones).
    """
    records = [c.metric_records.get("metrics") or next(iter(c.metric_records.values())) for c in contents]
    counts = np.asarray([float(r[weighted_by_key]) for r in records], dtype=np.float64)
    aggregated = weighted_mean_metrics(records, counts, skip=(weighted_by_key, REPLY_SITE_ID_KEY))
    aggregated[weighted_by_key] = int(counts.sum())
    return aggregated


def _initial_arrays(cfg: Config, num_classes: int) -> ArrayRecord:
    student = build_global_student(cfg, num_classes, seed=cfg.seed)
    return ArrayRecord({k: v.detach().cpu() for k, v in student.state_dict().items()})


def _strategy_state(cfg: Config, strategy: Any, recorder: RoundRecorder, server_round: int) -> dict[str, Any]:
    """What the strategy knows at the end of ``server_round`` (FedMAS factors, DRW phase) for the checkpoint.

    Every strategy here is stateless between rounds apart from the round number (the DRW
    switch is derived from it); the robust factors are stored for the record and the report.
    """
    state: dict[str, Any] = {"name": cfg.federation.strategy, "round": int(server_round)}
    if getattr(strategy, "central_dp", None) is not None:
        state["central_dp"] = strategy.central_dp.state_dict()
    state.update(strategy.checkpoint_state(server_round, recorder))  # e.g. FedMAS: rule, DRW phase, factors
    return state


@dataclass
class _Resume:
    """What a resumed federation takes from its checkpoint."""

    payload: dict[str, Any]
    path: Path

    @property
    def round(self) -> int:
        return int(self.payload["round"])


def load_resume_checkpoint(cfg: Config, run_dir: str | Path, config_source: str = "the config") -> _Resume:
    """The checkpoint a resumed run continues from (see :class:`server.checkpoints.ServerCheckpointStore`).

    Raises :class:`~server.checkpoints.ResumeError` naming the run directory when nothing can be
    resumed, or both config hashes when the checkpoint belongs to another run.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ResumeError(f"cannot resume {path}: no such run directory")
    store = ServerCheckpointStore(RunDir(path))
    payload, ckpt = store.load_latest(config_hash(cfg), config_source)
    if int(payload["num_rounds"]) != cfg.federation.num_rounds:  # covered by the hash; kept as a clear message
        raise ResumeError(f"checkpoint {ckpt} is from a {payload['num_rounds']}-round run, the config has "
                          f"{cfg.federation.num_rounds} rounds")
    return _Resume(payload, ckpt)


def run_federation(
    grid: Grid,
    cfg: Config,
    out_dir: str | Path,
    parallel_slots: int | None = None,
    *,
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``cfg.federation.num_rounds`` rounds on ``grid`` and write the run directory.

    After every round (round 0 = the initial model included) a checkpoint is written to
    ``checkpoints/server-round-XXXX.pt`` (:mod:`server.checkpoints`). With ``resume=True`` the
    run continues from the newest valid checkpoint in ``out_dir``: Flower's strategy starts
    from the checkpoint's global model for the remaining rounds, with round numbers offset
    so that the strategy, the clients and the history see the true round.

    Returns the content of ``metrics.json``.

    Raises
    ------
    FederationAborted
        After ``federation.max_failed_rounds`` consecutive rounds with too few valid replies;
        the checkpoint of the last round and ``aborted.json`` are written first.
    ResumeError
        A fresh run in a directory holding another run's checkpoints, or nothing to resume.
    """
    wall_start = time.perf_counter()
    fed = cfg.federation
    check_federation_config(cfg)
    resumed = load_resume_checkpoint(cfg, out_dir, f"the config of {Path(out_dir)}") if resume else None
    if resumed is None:
        check_fresh_run_dir(out_dir)
    run = RunDir(out_dir)
    run.save_config(cfg)
    store = ServerCheckpointStore(run)
    splits = cached_splits(cfg)
    recorder = RoundRecorder()
    strategy_fed = strategy_federation_config(cfg)  # DP mode: fraction_evaluate 0, no federated evaluation
    strategy = recorder.instrument(build_strategy(
        strategy_fed, train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics, min_valid_replies=fed.min_valid_replies,
        max_update_norm=fed.max_update_norm, transfer_dtype=fed.transfer_dtype))
    evaluator = ServerEvaluator(cfg, splits, run, recorder, parallel_slots)
    strategy.evaluate_schedule = lambda server_round: federated_evaluate_phase(cfg, server_round)
    if strategy_fed.fraction_evaluate > 0:  # federation.evaluate_in_train: scored in the next train call
        strategy.score_schedule = lambda server_round: scored_in_train(cfg, server_round)
    if cfg.prompt.scope == "federated":  # one prompt for every site: averaged while exploring, then frozen
        strategy.enable_federated_prompt(explore_rounds(cfg))
    plan = resolve_run_plan(cfg)
    if plan.central_dp:  # Poisson sampling, DP-FedAvg with a fixed denominator (docs/privacy.md §3)
        strategy.central_dp = evaluator.central_dp = CentralDP.from_config(cfg)
        strategy.central_dp.public_keys = evaluator.student.frozen_state_keys()
    done = 0
    wall_before = 0.0
    state_key = f"run-{uuid.uuid4().hex[:16]}"
    run_uid = state_key
    if resumed is not None:
        payload = resumed.payload
        done = resumed.round
        wall_before = float(payload.get("wall_seconds", 0.0))
        state_key, run_uid = str(payload["state_key"]), str(payload.get("run_uid", payload["state_key"]))
        recorder.load_payload(payload["recorder"])
        rows = [dict(r) for r in payload["history"]]
        run.history = rows[:-1]
        if rows:
            run.append_history(rows[-1])  # rewrites history.csv without rows of rounds after the checkpoint
        best = payload["best"]
        best_tensors = best.get("arrays") if best.get("arrays") is not None else payload["arrays"]
        evaluator.restore(best, arrays_from_tensors(best_tensors), payload.get("timings", []))
        if evaluator.central_dp is not None:
            evaluator.central_dp.load_state_dict(payload.get("strategy", {}).get("central_dp"))
        logger.info("resuming %s from %s: round %d of %d done", run.path, resumed.path.name, done, fed.num_rounds)
    guard = RoundGuard(recorder, round_offset=done, timeout_s=fed.round_timeout_s,
                       min_valid_replies=fed.min_valid_replies, update_norm_factor=fed.update_norm_factor,
                       max_update_norm=fed.max_update_norm, max_num_examples=fed.max_num_examples,
                       num_examples_growth=fed.num_examples_growth,
                       # central DP: whether a reply is kept must not depend on other sites' data (sensitivity)
                       num_examples_peer_ratio=(float("inf") if plan.central_dp
                                                else fed.num_examples_peer_ratio))
    if resumed is not None:
        guard.load_state_dict(resumed.payload.get("guard"))
    guard.instrument(strategy)
    evaluator.guard = guard
    grid = BoundedWaitGrid(grid, fed.min_available_clients, fed.node_wait_s)
    completed = [done]  # last round whose checkpoint was written

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        best = evaluator.best
        store.save({
            "round": int(server_round),
            "num_rounds": int(fed.num_rounds),
            "config_hash": config_hash(cfg),
            "state_key": state_key,
            "run_uid": run_uid,
            "arrays": tensors_from_arrays(arrays),
            "strategy": _strategy_state(cfg, strategy, recorder, server_round),
            "best": {
                "round": int(best.round),
                "val_balanced_accuracy": float(best.val_balanced_accuracy),
                "test_metrics": plain(best.test_metrics),
                "arrays": None if best.round in (server_round, -1) else evaluator.best_arrays,
            },
            "history": plain(run.history),
            "recorder": recorder.to_payload(),
            "timings": plain(evaluator.timings),
            "failed_streak": int(guard.failed_streak),
            "guard": plain(guard.state_dict()),
            "rng": get_rng_state(),
            "wall_seconds": wall_before + time.perf_counter() - wall_start,
            "versions": {"torch": str(torch.__version__), "numpy": str(np.__version__)},
        })

    def evaluate_fn(loop_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = guard.true_round(loop_round)
        if resumed is not None and loop_round == 0:
            set_rng_state(resumed.payload["rng"])  # the state the uninterrupted run had when round k+1 began
            return None
        try:
            result = evaluator(server_round, arrays)
        except (ValueError, RuntimeError) as exc:  # e.g. NaN probabilities of a finite but exploded model
            raise FederationAborted(
                f"server evaluation of round {server_round} failed ({type(exc).__name__}: {exc}); the global model of "
                f"round {completed[0]} is the last good one ({store.path_for(completed[0])}); continue with "
                f"`fopro-kd simulate --resume {run.path}`",
                server_round=completed[0], failed_rounds=list(guard.failed_rounds) + [server_round],
                run_dir=str(run.path),
            ) from exc
        if persists_round(cfg, server_round):  # with the clients' states (federation.state_persist_every)
            checkpoint(server_round, arrays)
            completed[0] = server_round
        if guard.failed_streak >= fed.max_failed_rounds:
            raise FederationAborted(
                f"stopping after round {server_round}: {guard.failed_streak} consecutive round(s) without enough valid "
                f"replies (federation.max_failed_rounds={fed.max_failed_rounds}, min_valid_replies="
                f"{fed.min_valid_replies}); state saved in {store.path_for(completed[0])}; fix the failing hospitals "
                f"and continue with `fopro-kd simulate --resume {run.path}`",
                server_round=completed[0], failed_rounds=list(guard.failed_rounds), run_dir=str(run.path),
            )
        if guard.budget_stop is not None and server_round < fed.num_rounds:
            raise FederationFinished(guard.budget_stop, server_round=server_round)
        return result

    remaining = fed.num_rounds - done
    logger.info("federation: %s, %d rounds (%d to run), %d clients, run directory %s", fed.strategy,
                fed.num_rounds, remaining, fed.num_clients, run.path)
    initial = (_initial_arrays(cfg, splits.train.num_classes) if resumed is None
               else arrays_from_tensors(resumed.payload["arrays"]))
    try:
        if remaining > 0:
            strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=remaining,
                timeout=fed.round_timeout_s,
                train_config=ConfigRecord({"num-rounds": int(fed.num_rounds), STATE_KEY: state_key}),
                evaluate_fn=evaluate_fn,
            )
    except FederationAborted as exc:
        metrics = final_metrics(cfg, evaluator, recorder, wall_before + time.perf_counter() - wall_start)
        run.write_json("aborted.json", {"reason": str(exc), "round": exc.server_round,
                                        "failed_rounds": exc.failed_rounds, "partial_metrics": metrics})
        logger.error("federation aborted: %s", exc)
        raise
    except NodesUnavailable as exc:  # a dead hospital: stop instead of waiting forever (resumable)
        aborted = FederationAborted(
            f"stopping after round {completed[0]}: {exc}; state saved in {store.path_for(completed[0])}; when the "
            f"hospitals are back, continue with `fopro-kd simulate --resume {run.path}` (or run config "
            f"'{RUN_CONFIG_RESUME_DIR_KEY}')",
            server_round=completed[0], failed_rounds=list(guard.failed_rounds), run_dir=str(run.path),
        )
        metrics = final_metrics(cfg, evaluator, recorder, wall_before + time.perf_counter() - wall_start)
        run.write_json("aborted.json", {"reason": str(aborted), "round": completed[0], "check": "nodes-unavailable",
                                        "connected": exc.connected, "required": exc.required,
                                        "waited_s": exc.waited_s, "failed_rounds": aborted.failed_rounds,
                                        "partial_metrics": metrics})
        logger.error("federation aborted: %s", aborted)
        raise aborted from exc
    except FederationFinished as exc:  # e.g. every hospital has spent its privacy budget: a clean end
        stopped = {"round": exc.server_round, "reason": str(exc)}
        logger.warning("federation ended after round %d of %d: %s", exc.server_round, fed.num_rounds, exc)
    else:
        stopped = None
    evaluator.test_selected()  # test_every_round false: the selected model's test scores, computed once
    metrics = final_metrics(cfg, evaluator, recorder, wall_before + time.perf_counter() - wall_start)
    metrics["resumed_from_round"] = done if resumed is not None else None
    metrics["stopped_early"] = stopped
    evaluator.save_test_predictions()
    run.write_json("metrics.json", metrics)
    write_plots(run, metrics, evaluator, recorder)
    try_write_run_report(run.path)
    logger.info("federation finished: best round %d, test bACC %s", metrics["best_round"],
                metrics.get("balanced_accuracy"))
    return metrics


def make_server_app(
    cfg: Config, out_dir: str | Path, parallel_slots: int | None = None, *, resume: bool = False
) -> ServerApp:
    """A ServerApp bound to ``cfg`` writing to ``out_dir`` (simulation and tests); ``resume`` continues it."""
    server_app = ServerApp()
    out = Path(out_dir).resolve()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, out, parallel_slots, resume=resume)

    return server_app


app = ServerApp()
"""The ServerApp of ``flwr run`` (``[tool.flwr.app.components] serverapp``)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the config from the run config and run (or, with ``resume-dir``, continue) the federation."""
    cfg = config_from_run_config(context.run_config)
    torch.set_num_threads(max(1, cfg.train.num_threads or torch.get_num_threads()))
    out, resume = run_dirs_from_run_config(cfg, context)
    run_federation(grid, cfg, out, resume=resume)

