"""``bench step``: images/s of one local training step, framework vs a bare PyTorch reference.

For each image size the same batch is trained by

* the framework: :class:`~fopro_kd.training.trainer.LocalTrainer` ``.train(data, epochs=1,
  max_steps=n)`` over an in-memory :class:`ImageSet` of exactly ``n`` batches;
* the reference: :class:`simulations.reference_step.ReferenceStep` (plain timm + PyTorch),
  started from the framework's weights.

Both sides are timed interleaved after a warm-up (medians). Augmentation is off on both
sides (it is the data pipeline's cost, measured by ``bench data``), so the two do the same
math; the first step's losses are compared to show it.

Methods: ``bsm`` (student only), ``ekd`` (teacher forward, no grad), ``fopro-kd`` with
``akd.mode`` ``off`` (fixed prompt: FPG forward only), ``discriminative`` (the default:
FPG + teacher forward/backward + probe) and ``minmax`` (AKD). Ratios of step times:
EKD/BSM and FoPro-KD/EKD with and without AKD.

A second part measures the teacher feature cache (``train.cache_teacher_features``):
EKD steps/s with cached vs recomputed teacher features, ResNet-50 teacher at 224 px with a
ResNet-18 student, and the MobileNetV2 teacher (augmentation on, teacher sees clean images).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fopro_kd.config import Config, config_from_dict
from fopro_kd.data.dataset import ImageSet
from fopro_kd.models.teacher import build_teacher
from fopro_kd.run_plan import resolve_run_plan
from fopro_kd.training.components import build_models
from fopro_kd.training.trainer import LocalTrainer
from simulations.bench_common import format_table, measure_interleaved, paired_ratio, sync, target
from simulations.reference_step import ReferenceStep

logger = logging.getLogger("fopro_kd.bench")

SHARED = Path(__file__).resolve().parents[2] / "shared"
MOBILENET_FILE = SHARED / "weights" / "mobilenetv2_100_imagenet_keras_int8_timm.pth"
HAM_COUNTS = [6705, 1113, 1099, 514, 327, 142, 115]  # HAM10000 class sizes: the balanced-softmax prior

# (label, train.method, akd.mode)
METHODS = [
    ("bsm", "bsm", "off"),
    ("ekd", "ekd", "off"),
    ("fopro-kd(fixed prompt)", "fopro-kd", "off"),
    ("fopro-kd", "fopro-kd", "discriminative"),
    ("fopro-kd+akd(minmax)", "fopro-kd", "minmax"),
]


def teacher_section(arch: str, size: int) -> dict[str, Any]:
    """The real Keras MobileNetV2 from ../shared when present; any other teacher has random weights."""
    if arch == "mobilenetv2_100" and MOBILENET_FILE.is_file():
        return {"arch": arch, "source": "file", "file": str(MOBILENET_FILE), "input_size": size,
                "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "model_kwargs": {"pad_type": "same"}}
    section: dict[str, Any] = {"arch": arch, "source": "none", "input_size": size}
    if arch == "mobilenetv2_100":
        section.update(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], model_kwargs={"pad_type": "same"})
    return section


def step_config(size: int, batch: int, method: str, akd: str, teacher_arch: str = "mobilenetv2_100",
                augment: bool = False, cache: bool = False, prompt_every: int = 1) -> Config:
    return config_from_dict({
        "seed": 0,
        "data": {"kind": "synthetic", "image_size": size, "num_classes": len(HAM_COUNTS)},
        "student": {"arch": "resnet18", "init": "random"},
        "teacher": teacher_section(teacher_arch, size),
        "augment": {"enabled": augment, "teacher_view": "clean"},
        "akd": {"mode": akd, "prompt_every": prompt_every},
        "train": {"method": method, "loss": "bsm", "batch_size": batch, "cache_teacher_features": cache},
    })


def random_imageset(n: int, size: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, len(HAM_COUNTS), (n,), generator=g)
    names = [f"class_{i}" for i in range(len(HAM_COUNTS))]
    return ImageSet(images, labels, names, [str(i) for i in range(n)])


def _teacher_for(cfg: Config, cache: dict):
    fold = resolve_run_plan(cfg).teacher_folds_batchnorm  # as training builds it
    key = (cfg.teacher.arch, cfg.teacher.input_size, fold)
    if key not in cache:
        torch.manual_seed(0)
        cache[key] = build_teacher(cfg.teacher, fold_batchnorm=fold)
    return cache[key]


def _maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    return torch.compile(module) if enabled else module


def _framework_and_reference(
    cfg: Config, teacher, device: torch.device, compile_models: bool
) -> tuple[LocalTrainer, ReferenceStep, float]:
    """A LocalTrainer and a ReferenceStep holding identical weights; returns the loss difference of step 1."""
    torch.manual_seed(0)
    method = cfg.train.method
    t = teacher if method != "bsm" else None
    student, prompt = build_models(cfg, len(HAM_COUNTS), t)
    trainer = LocalTrainer(cfg, student, t, prompt, np.asarray(HAM_COUNTS), device)
    ref = ReferenceStep(
        method=method, akd=cfg.akd.mode, student_arch=cfg.student.arch,
        teacher_arch=cfg.teacher.arch if t is not None else None, teacher_kwargs=dict(cfg.teacher.model_kwargs),
        num_classes=len(HAM_COUNTS), class_counts=HAM_COUNTS, student_size=cfg.data.image_size,
        teacher_size=t.input_size if t is not None else None,
        student_mean=tuple(student.mean.flatten().tolist()), student_std=tuple(student.std.flatten().tolist()),
        teacher_mean=tuple(t.mean.flatten().tolist()) if t is not None else (0.5,) * 3,
        teacher_std=tuple(t.std.flatten().tolist()) if t is not None else (0.5,) * 3,
        lr=cfg.train.lr, prompt_lr=cfg.prompt.lr, lambda_rep=cfg.train.lambda_rep, grad_clip=cfg.train.grad_clip,
        eps=cfg.prompt.eps, band=cfg.prompt.band, gamma=cfg.prompt.gamma, device=device,
    )
    ref.load_weights(
        {k: v.detach().clone() for k, v in trainer.student.state_dict().items()},
        teacher=t.model.state_dict() if t is not None else None,
        prompt_m=trainer.prompt.m.detach().clone() if trainer.prompt is not None else None,
        probe=trainer.probe.state_dict() if trainer.probe is not None else None,
    )
    # same math check: one step from identical weights on one identical batch
    one = random_imageset(cfg.train.batch_size, cfg.data.image_size, seed=123)
    ref_loss = ref(one.images, one.labels)
    fw_loss = trainer.train(one, epochs=1, max_steps=1).losses["loss"]
    if compile_models:
        trainer.student.backbone = _maybe_compile(trainer.student.backbone, True)
        ref.student["backbone"] = _maybe_compile(ref.student["backbone"], True)
        if t is not None:
            if not hasattr(t.model, "_orig_mod"):  # the teacher is shared by every method: compile it once
                t.model = _maybe_compile(t.model, True)
            ref.teacher = _maybe_compile(ref.teacher, True)
    return trainer, ref, abs(fw_loss - ref_loss)


def _restore_teacher(teacher) -> None:
    model = getattr(teacher, "model", None)
    if model is not None and hasattr(model, "_orig_mod"):
        teacher.model = model._orig_mod


def bench_methods(size: int, batch: int, steps: int, warmup: int, repeats: int, device: torch.device,
                  compile_models: bool, teachers: dict) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every method, framework and reference, timed in one interleaved loop (robust to slow load drift)."""
    data = random_imageset(steps * batch, size)
    batches = [(data.images[i * batch:(i + 1) * batch], data.labels[i * batch:(i + 1) * batch]) for i in range(steps)]
    candidates: dict[str, Any] = {}
    loss_diffs: dict[str, float] = {}
    for label, method, akd in METHODS:
        cfg = step_config(size, batch, method, akd)
        teacher = _teacher_for(cfg, teachers)
        trainer, ref, loss_diffs[label] = _framework_and_reference(cfg, teacher, device, compile_models)
        candidates[f"framework/{label}"] = lambda tr=trainer: tr.train(data, epochs=1, max_steps=steps)
        candidates[f"reference/{label}"] = lambda rf=ref: [rf(images, labels) for images, labels in batches]
    timed = measure_interleaved(candidates, warmup, repeats, device)
    for teacher in teachers.values():
        _restore_teacher(teacher)
    rows = []
    for label, _, _ in METHODS:
        fw_t, rf_t = timed[f"framework/{label}"], timed[f"reference/{label}"]
        fw, rf = fw_t["median_s"] / steps, rf_t["median_s"] / steps
        rows.append({
            "size": size, "batch": batch, "method": label,
            "framework_img_s": batch / fw, "reference_img_s": batch / rf,
            # reference time / framework time, paired per round (>= 1: the framework is as fast)
            "framework_vs_reference": paired_ratio(timed, f"reference/{label}", f"framework/{label}"),
            "framework_vs_reference_cpu": paired_ratio(timed, f"reference/{label}", f"framework/{label}", cpu=True),
            "framework_step_s": fw, "reference_step_s": rf,
            "framework_step_cpu_s": fw_t["cpu_median_s"] / steps, "reference_step_cpu_s": rf_t["cpu_median_s"] / steps,
            "first_step_loss_abs_diff": loss_diffs[label],
            "samples_framework_s": fw_t["samples_s"],
            "samples_reference_s": rf_t["samples_s"],
        })
        logger.info("step %dpx %s: framework %.1f img/s, reference %.1f img/s", size, label, batch / fw, batch / rf)
    ratios = []
    for name, a, b in RATIOS:
        ratios.append({
            "size": size, "ratio": name,
            "framework": paired_ratio(timed, f"framework/{a}", f"framework/{b}"),
            "reference": paired_ratio(timed, f"reference/{a}", f"reference/{b}"),
            "framework_cpu": paired_ratio(timed, f"framework/{a}", f"framework/{b}", cpu=True),
            "reference_cpu": paired_ratio(timed, f"reference/{a}", f"reference/{b}", cpu=True),
        })
    return rows, ratios


RATIOS = [
    ("EKD / BSM", "ekd", "bsm"),
    ("FoPro-KD / EKD (no AKD: fixed prompt, FPG forward only)", "fopro-kd(fixed prompt)", "ekd"),
    ("FoPro-KD / EKD (default: discriminative prompt training)", "fopro-kd", "ekd"),
    ("FoPro-KD+AKD / EKD (AKD: minmax)", "fopro-kd+akd(minmax)", "ekd"),
]


def bench_feature_cache(size: int, batch: int, steps: int, warmup: int, repeats: int, device: torch.device,
                        teacher_arch: str, teachers: dict) -> dict[str, Any]:
    """EKD steps with the teacher feature cache vs recomputing the teacher (augmentation on)."""
    data = random_imageset(steps * batch, size, seed=7)
    trainers = {}
    build_s = None
    for cached in (False, True):
        cfg = step_config(size, batch, "ekd", "off", teacher_arch=teacher_arch, augment=True, cache=cached)
        teacher = _teacher_for(cfg, teachers)
        torch.manual_seed(0)
        student, _ = build_models(cfg, len(HAM_COUNTS), teacher)
        trainer = LocalTrainer(cfg, student, teacher, None, np.asarray(HAM_COUNTS), device)
        if cached:
            sync(device)
            start = time.perf_counter()
            trainer.enable_feature_cache(data)
            sync(device)
            build_s = time.perf_counter() - start
        trainers["cached" if cached else "recomputed"] = trainer
    timed = measure_interleaved(
        {name: (lambda tr=tr: tr.train(data, epochs=1, max_steps=steps)) for name, tr in trainers.items()},
        warmup, repeats, device,
    )
    rec, cac = timed["recomputed"]["median_s"] / steps, timed["cached"]["median_s"] / steps
    return {
        "teacher": teacher_arch, "student": "resnet18", "size": size, "batch": batch,
        "recomputed_steps_s": 1.0 / rec, "cached_steps_s": 1.0 / cac,
        "speedup": paired_ratio(timed, "recomputed", "cached"),
        "speedup_cpu": paired_ratio(timed, "recomputed", "cached", cpu=True),
        "cache_build_s": build_s, "cache_build_images": len(data),
        "samples_recomputed_s": timed["recomputed"]["samples_s"], "samples_cached_s": timed["cached"]["samples_s"],
    }


def bench_prompt_schedule(size: int, batch: int, every: int, warmup: int, repeats: int, device: torch.device,
                          teachers: dict) -> dict[str, Any]:
    """FoPro-KD step time with the prompt trained on every ``every``-th batch, against EKD and the default.

    Each timed call runs ``every`` batches, so every call holds exactly one prompt update
    (``LocalTrainer.train`` trains the prompt on batches 0, k, 2k, ... of a call).
    """
    data = random_imageset(every * batch, size)
    trainers = {}
    for name, method, akd, k in (("ekd", "ekd", "off", 1), ("every", "fopro-kd", "discriminative", 1),
                                 ("scheduled", "fopro-kd", "discriminative", every)):
        cfg = step_config(size, batch, method, akd, prompt_every=k)
        teacher = _teacher_for(cfg, teachers)
        torch.manual_seed(0)
        student, prompt = build_models(cfg, len(HAM_COUNTS), teacher)
        trainers[name] = LocalTrainer(cfg, student, teacher, prompt, np.asarray(HAM_COUNTS), device)
    timed = measure_interleaved(
        {name: (lambda tr=tr: tr.train(data, epochs=1, max_steps=every)) for name, tr in trainers.items()},
        warmup, repeats, device,
    )
    return {
        "size": size, "batch": batch, "prompt_every": every,
        "scheduled_vs_ekd": paired_ratio(timed, "scheduled", "ekd"),
        "scheduled_vs_ekd_cpu": paired_ratio(timed, "scheduled", "ekd", cpu=True),
        "every_batch_vs_ekd": paired_ratio(timed, "every", "ekd"),
        "every_batch_vs_ekd_cpu": paired_ratio(timed, "every", "ekd", cpu=True),
        "samples_s": {name: t["samples_s"] for name, t in timed.items()},
    }


def profile_step(size: int, batch: int, device: torch.device, teachers: dict, method: str = "fopro-kd",
                 akd: str = "discriminative", steps: int = 3, top: int = 15) -> list[dict[str, Any]]:
    """torch.profiler over ``steps`` framework steps: the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cfg = step_config(size, batch, method, akd)
    teacher = _teacher_for(cfg, teachers)
    torch.manual_seed(0)
    student, prompt = build_models(cfg, len(HAM_COUNTS), teacher)
    trainer = LocalTrainer(cfg, student, teacher, prompt, np.asarray(HAM_COUNTS), device)
    data = random_imageset(steps * batch, size)
    trainer.train(data, epochs=1, max_steps=1)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.train(data, epochs=1, max_steps=steps)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": int(e.count), "self_cpu_ms_per_step": e.self_cpu_time_total / 1000.0 / steps,
             "share": e.self_cpu_time_total / total} for e in rows]


def fpg_breakdown(size: int, batch: int, device: torch.device, teachers: dict, repeats: int = 5) -> dict[str, Any]:
    """Where the FoPro-KD step's extra time goes: teacher forward vs forward+backward through the prompt.

    Times, interleaved, the pieces of a step on one batch: the student's EKD step (forward,
    backward, Adam), the teacher forward without gradient (what EKD pays), the same through the
    prompt (FPG forward only), the teacher forward + backward to the prompt (what the prompt
    step pays) and the prompt's FFT math alone (forward + backward).
    """
    from fopro_kd.training.teacher_view import teacher_features, teacher_targets

    cfg = step_config(size, batch, "fopro-kd", "discriminative")
    teacher = _teacher_for(cfg, teachers)
    torch.manual_seed(0)
    student, prompt = build_models(cfg, len(HAM_COUNTS), teacher)
    student, prompt = student.to(device), prompt.to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.train.lr)
    x = torch.rand(batch, 3, size, size, device=device)

    def student_step() -> None:
        out = student.forward_train(x)
        loss = out.logits.logsumexp(1).mean() + out.projection.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def prompt_step() -> None:
        teacher_features(teacher, x, prompt, "raw").sum().backward()

    def fft_only() -> None:
        prompt(teacher.resize(x)).sum().backward()

    timed = measure_interleaved({
        "student_step": student_step,
        "teacher_forward": lambda: teacher_targets(teacher, x, None, "raw"),
        "teacher_forward_prompted": lambda: teacher_targets(teacher, x, prompt, "raw"),
        "teacher_forward_backward_prompted": prompt_step,
        "prompt_fft_forward_backward": fft_only,
    }, 1, repeats, device)
    out: dict[str, Any] = {k: v["median_s"] for k, v in timed.items()}
    out["teacher_backward_over_forward"] = paired_ratio(timed, "teacher_forward_backward_prompted", "teacher_forward") - 1
    out["extra_vs_ekd_step"] = (
        (out["teacher_forward_backward_prompted"] - out["teacher_forward"])
        / (out["student_step"] + out["teacher_forward"])
    )
    return {"size": size, "batch": batch, **out}


def run(opts: dict[str, Any]) -> dict[str, Any]:
    """Run the suite; ``opts``: quick, device, warmup, repeats, compile, profile."""
    device = torch.device(opts["device"])
    quick = opts["quick"]
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if quick:
        plan = [(32, 4, 1, 2)]  # (size, batch, steps per measurement, repeats)
        cache_plan = [("resnet50", 32, 4, 1), ("mobilenetv2_100", 32, 4, 1)]
        schedule_plan = (32, 4, 2)  # (size, batch, prompt_every)
        warmup, cache_repeats = 1, 2
    elif device.type == "cuda":
        plan = [(64, 128, 5, 7), (224, 64, 3, 5)]
        cache_plan = [("resnet50", 224, 64, 3), ("mobilenetv2_100", 224, 64, 3)]
        schedule_plan = (224, 64, 4)
        warmup, cache_repeats = (3 if opts.get("compile") else 2), 5
    else:
        # 224 px: batch 16 and 3 repeats, to keep `all` < 10 min on 2 cores
        plan = [(64, 32, 2, 5), (224, 16, 1, 3)]
        cache_plan = [("resnet50", 224, 16, 1), ("mobilenetv2_100", 224, 16, 1)]
        schedule_plan = (224, 16, 4)
        warmup, cache_repeats = 1, 3
    if opts.get("warmup"):
        warmup = opts["warmup"]
    if opts.get("repeats"):
        plan = [(s, b, n, opts["repeats"]) for s, b, n, _ in plan]
        cache_repeats = opts["repeats"]
    teachers: dict = {}
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    for size, batch, steps, repeats in plan:
        size_rows, size_ratios = bench_methods(size, batch, steps, warmup, repeats, device,
                                               bool(opts.get("compile")), teachers)
        rows += size_rows
        ratios += size_ratios
    cache_rows = [bench_feature_cache(size, batch, steps, warmup, cache_repeats, device, arch, teachers)
                  for arch, size, batch, steps in cache_plan]
    schedule = bench_prompt_schedule(*schedule_plan, warmup, cache_repeats, device, teachers)
    result: dict[str, Any] = {
        "what": ("images/s of one local training step (augmentation off), framework LocalTrainer.train vs the bare "
                 "PyTorch reference (simulations/reference_step.py), same models, weights and batches; medians of "
                 f"{[p[3] for p in plan]} interleaved repeats (per size) after {warmup} warm-up; ratios are medians of "
                 "per-round ratios of calls made side by side (_cpu: the same from process CPU time)"),
        "teacher": "mobilenetv2_100 (" + ("real ../shared weights" if MOBILENET_FILE.is_file() else "random") + ")",
        "student": "resnet18 (random init)",
        "warmup": warmup, "repeats": [p[3] for p in plan], "cache_repeats": cache_repeats, "compile": bool(opts.get("compile")),
        "steps": rows, "ratios": ratios, "feature_cache": cache_rows, "prompt_schedule": schedule,
    }
    if opts.get("profile"):
        size = plan[-1][0]
        result["profile"] = {"size": size, "method": "fopro-kd (discriminative)",
                             "top_ops": profile_step(size, plan[-1][1], device, teachers),
                             "fpg_breakdown_s": fpg_breakdown(size, plan[-1][1], device, teachers)}
    # Under load (load average above the core count) a wall-clock ratio mostly measures who waited
    # for a core; the process-CPU-time ratio of the same paired calls then says more about the work.
    peak_load = max(load_start, (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0))
    use_cpu = device.type == "cpu" and peak_load > (os.cpu_count() or 1)
    result["targets_basis"] = (f"process CPU time (load average {peak_load:.1f} > {os.cpu_count()} cores)" if use_cpu
                               else "wall clock")
    sfx = "_cpu" if use_cpu else ""

    def basis_note(wall: float, cpu: float) -> str:
        return f"CPU-time ratio (under load); wall-clock {wall:.3f}" if use_cpu else f"CPU-time {cpu:.3f}"

    big = max(r["size"] for r in rows)
    default_rows = [r for r in rows if r["method"] == "fopro-kd"]
    fpg = next(r for r in ratios if r["size"] == big and r["ratio"].startswith("FoPro-KD / EKD (default"))
    r50 = next((c for c in cache_rows if c["teacher"] == "resnet50"), None)
    mbv2 = next((c for c in cache_rows if c["teacher"] == "mobilenetv2_100"), None)
    worst = min(rows, key=lambda r: r["framework_vs_reference" + sfx])
    result["targets"] = [
        *[target(f"client step vs bare reference, fopro-kd @ {r['size']} px", r["framework_vs_reference" + sfx], 0.9,
                 ">=", "x", note=basis_note(r["framework_vs_reference"], r["framework_vs_reference_cpu"]))
          for r in default_rows],
        target(f"worst client step vs reference ({worst['method']} @ {worst['size']} px)",
               worst["framework_vs_reference" + sfx], 0.9, ">=", "x",
               note=basis_note(worst["framework_vs_reference"], worst["framework_vs_reference_cpu"])),
        target(f"FPG cost on top of EKD step @ {big} px (fopro-kd/ekd - 1)", fpg["framework" + sfx] - 1.0, 0.15, "<=",
               note=basis_note(fpg["framework"] - 1.0, fpg["framework_cpu"] - 1.0)),
        target(f"FPG cost with akd.prompt_every={schedule['prompt_every']} @ {schedule['size']} px "
               "(fopro-kd/ekd - 1)", schedule["scheduled_vs_ekd" + sfx] - 1.0, 0.15, "<=",
               note=basis_note(schedule["scheduled_vs_ekd"] - 1.0, schedule["scheduled_vs_ekd_cpu"] - 1.0)
               + f"; prompt on every batch in the same loop: {schedule['every_batch_vs_ekd' + sfx] - 1.0:+.3f}"),
        target(f"feature cache speedup, ResNet-50 teacher @ {r50['size']} px" if r50 else "feature cache, ResNet-50",
               r50["speedup" + sfx] if r50 else None, 1.6, ">=", "x",
               note=basis_note(r50["speedup"], r50["speedup_cpu"]) if r50 else ""),
        target(f"feature cache speedup, MobileNetV2 teacher @ {mbv2['size']} px (reported)" if mbv2 else
               "feature cache, MobileNetV2", mbv2["speedup" + sfx] if mbv2 else None, 1.0, ">=", "x",
               note="no target given; must not be slower"),
    ]
    return result


def render(result: dict[str, Any]) -> str:
    parts = [result["what"], f"teacher {result['teacher']}, student {result['student']}; targets judged on "
             f"{result.get('targets_basis', 'wall clock')}", ""]
    parts.append(format_table(result["steps"], ["size", "batch", "method", "framework_img_s", "reference_img_s",
                                                 "framework_vs_reference", "framework_vs_reference_cpu",
                                                 "first_step_loss_abs_diff"]))
    parts += ["", "step-time ratios:", format_table(result["ratios"], ["size", "ratio", "framework", "reference",
                                                                       "framework_cpu", "reference_cpu"])]
    parts += ["", "teacher feature cache (EKD, augmentation on, teacher sees clean images):",
              format_table(result["feature_cache"], ["teacher", "size", "batch", "recomputed_steps_s",
                                                     "cached_steps_s", "speedup", "speedup_cpu",
                                                     "cache_build_s"])]
    if "prompt_schedule" in result:
        parts += ["", "prompt schedule (step-time ratio to EKD):",
                  format_table([result["prompt_schedule"]], ["size", "batch", "prompt_every", "scheduled_vs_ekd",
                                                            "scheduled_vs_ekd_cpu", "every_batch_vs_ekd",
                                                            "every_batch_vs_ekd_cpu"])]
    if "profile" in result:
        parts += ["", f"profile of the framework step ({result['profile']['method']} @ {result['profile']['size']} px):",
                  format_table(result["profile"]["top_ops"]),
                  "", "FPG cost breakdown (seconds per batch, medians):",
                  format_table([{"piece": k, "value": v} for k, v in result["profile"]["fpg_breakdown_s"].items()])]
    return "\n".join(parts)
