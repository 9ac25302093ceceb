"""``bench comm``: bytes per client per round, fp32 vs fp16 / bf16 transfer, and the accuracy effect.

The federation exchanges the student's ``state_dict`` twice per client and round (the
global model down, the trained model up) as a Flower ``ArrayRecord``, in float32 unless
``federation.transfer_dtype`` is float16 / bfloat16. This suite measures, with the codec of
:mod:`fopro_kd.compression` that the federation uses:

* bytes: ``ArrayRecord.count_bytes()`` of the student state in float32 (what the
  federation sends today) and after ``compress_state`` to float16 / bfloat16 (bfloat16
  carried as its int16 bit pattern), up + down per client and round; plus the upload
  bytes the simulation recorded, when a run directory is given;
* accuracy: the balanced accuracy of the demo's *final global model* (``best.pt`` of a
  ``configs/sim-demo.yaml`` run) on the server's test split, before and after a
  compress/decompress round trip, with the share of identical predictions. This is the
  effect of casting the final model once; the effect of compressing every round of
  training is a full run with ``--set federation.transfer_dtype=float16`` (docs/performance.md).

Without a run directory (``--run-dir``, or the ``simulation`` suite's run when ``all`` is
run), a short simulation of the demo is run first; ``--quick`` evaluates a freshly
initialised global model of a tiny config instead (figures meaningless, shape only).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fopro_kd.compression import compress_state, decompress_state, pack_for_numpy, state_nbytes, unpack_from_numpy
from fopro_kd.run_plan import student_input_size
from simulations.bench_common import REPO_ROOT, format_table, target

logger = logging.getLogger("fopro_kd.bench")

DTYPES = ("float32", "float16", "bfloat16")


def _record_bytes(state: dict[str, torch.Tensor]) -> int | None:
    try:
        from flwr.app import ArrayRecord
    except ImportError:  # pragma: no cover - flwr is a dependency
        return None
    return int(ArrayRecord({k: v.contiguous() for k, v in state.items()}).count_bytes())


def _global_model(opts: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor], str, Path | None]:
    """(config, global state dict, description, run dir) of the model to evaluate."""
    from fopro_kd.checkpoint import load_checkpoint
    from fopro_kd.config import config_from_dict, load_config
    from fopro_kd.training.single_site import STUDENT_FORMAT

    run_dir = Path(opts["run_dir"]) if opts.get("run_dir") else None
    if run_dir is not None and (run_dir / "best.pt").is_file():
        cfg = load_config(run_dir / "config.yaml")
        payload = load_checkpoint(run_dir / "best.pt", expected_format=STUDENT_FORMAT)
        return cfg, payload["state_dict"], f"best.pt of {run_dir} (round {payload.get('round')})", run_dir
    if opts["quick"]:
        from fopro_kd.federation.evaluation import build_global_student
        from simulations.bench_sim import QUICK_CONFIG

        cfg = config_from_dict(QUICK_CONFIG)
        from fopro_kd.data import build_splits

        num_classes = build_splits(cfg).train.num_classes
        student = build_global_student(cfg, num_classes, seed=0)
        return cfg, student.state_dict(), "freshly initialised global student of the quick config", None
    raise FileNotFoundError("no run directory with best.pt")


def _short_simulation(opts: dict[str, Any]) -> tuple[Path, Path]:
    from simulations.bench_sim import run_simulation_process

    config = Path(opts.get("config") or REPO_ROOT / "configs" / "sim-demo.yaml")
    config = config if config.is_absolute() else (REPO_ROOT / config).resolve()
    work = Path(tempfile.mkdtemp(prefix="fopro-bench-comm-"))
    out = work / "run"
    proc = run_simulation_process(config, ["federation.num_rounds=2", *opts.get("overrides", [])], out, 1200)
    if proc["rc"] != 0:
        raise RuntimeError(f"the demo simulation failed (exit {proc['rc']}):\n" + "\n".join(proc["log_tail"]))
    shutil.rmtree(out / "client_state", ignore_errors=True)
    return work, out


def _predict(cfg, state: dict[str, torch.Tensor], splits, device: torch.device) -> tuple[dict[str, Any], np.ndarray]:
    from fopro_kd.metrics import compute_metrics
    from fopro_kd.training.trainer import predict
    from fopro_kd.federation.evaluation import build_global_student

    student = build_global_student(cfg, splits.train.num_classes)
    student.load_state_dict(state)
    probs = predict(student.to(device), splits.test, cfg.train.eval_batch_size, device,
                    student_input_size(cfg))
    metrics = compute_metrics(splits.test.labels.numpy(), probs, splits.test.class_names,
                              splits.train.class_counts(), cfg.metrics)
    return metrics, probs


def run(opts: dict[str, Any]) -> dict[str, Any]:
    from fopro_kd.data import build_splits

    device = torch.device(opts["device"])
    cleanup = None
    if not opts.get("run_dir") and not opts["quick"]:
        cleanup, run_dir = _short_simulation(opts)
        opts = dict(opts, run_dir=str(run_dir))
    try:
        cfg, state, source, run_dir = _global_model(opts)
        recorded_up = None
        if run_dir is not None and (run_dir / "history.csv").is_file():
            from simulations.bench_sim import read_run

            recorded_up = read_run(run_dir)["bytes_up_per_client"]
        splits = build_splits(cfg)
        base_metrics, base_probs = _predict(cfg, state, splits, device)
        rows = []
        for name in DTYPES:
            t0 = time.perf_counter()
            compressed = compress_state(state, name)
            packed = pack_for_numpy(compressed)
            t1 = time.perf_counter()
            restored = decompress_state(unpack_from_numpy(packed, state), like=state)
            t2 = time.perf_counter()
            ints_exact = all(torch.equal(restored[k], v) for k, v in state.items() if not v.is_floating_point())
            metrics, probs = (base_metrics, base_probs) if name == "float32" else _predict(cfg, restored, splits, device)
            record = _record_bytes(packed)
            rows.append({
                "dtype": name,
                "record_bytes": record,
                "tensor_bytes": state_nbytes(packed),
                "bytes_per_client_round": 2 * record if record is not None else 2 * state_nbytes(packed),
                "vs_float32": None,
                "encode_s": t1 - t0, "decode_s": t2 - t1,
                "balanced_accuracy": metrics["balanced_accuracy"],
                "delta_balanced_accuracy": (metrics["balanced_accuracy"] - base_metrics["balanced_accuracy"]),
                "same_prediction_share": float((probs.argmax(1) == base_probs.argmax(1)).mean()),
                "max_abs_prob_diff": float(np.abs(probs - base_probs).max()),
                "integer_buffers_exact": ints_exact,
                "max_abs_weight_err": max(float((restored[k].float() - v.float()).abs().max())
                                          for k, v in state.items() if v.is_floating_point()),
            })
        ref = rows[0]["bytes_per_client_round"]
        for r in rows:
            r["vs_float32"] = r["bytes_per_client_round"] / ref
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
    by = {r["dtype"]: r for r in rows}
    return {
        "what": ("bytes: ArrayRecord.count_bytes() of the student state dict, x2 per client and round (global model "
                 "down + trained model up); accuracy: balanced accuracy on the server test split of " + source +
                 " before/after ONE compress->decompress round trip (compression during every training round: run the "
                 "federation with federation.transfer_dtype, see docs/performance.md)"),
        "model_source": source, "num_tensors": len(state),
        "num_parameters": int(sum(v.numel() for v in state.values() if v.is_floating_point())),
        "recorded_upload_bytes_per_client": recorded_up, "rows": rows,
        "targets": [
            target("fp16 transfer: bytes vs fp32", by["float16"]["vs_float32"], 0.55, "<=", "x",
                   note="no target given; bound chosen here"),
            target("fp16 round trip: |delta balanced accuracy|", abs(by["float16"]["delta_balanced_accuracy"]), 0.01,
                   "<=", note="no target given; bound chosen here"),
            target("bf16 round trip: |delta balanced accuracy|", abs(by["bfloat16"]["delta_balanced_accuracy"]), 0.01,
                   "<=", note="no target given; bound chosen here"),
        ],
        "codec_median_s": statistics.median(r["encode_s"] + r["decode_s"] for r in rows[1:]),
    }


def render(result: dict[str, Any]) -> str:
    lines = [result["what"], ""]
    if result.get("recorded_upload_bytes_per_client") is not None:
        lines.append(f"upload bytes per client recorded by the simulation: {result['recorded_upload_bytes_per_client']:.0f}")
    lines.append(format_table(result["rows"], ["dtype", "record_bytes", "bytes_per_client_round", "vs_float32",
                                               "balanced_accuracy", "delta_balanced_accuracy", "same_prediction_share",
                                               "max_abs_prob_diff", "max_abs_weight_err", "integer_buffers_exact"]))
    return "\n".join(lines)
