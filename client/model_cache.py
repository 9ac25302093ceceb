"""Student modules built once per process and reused for every round and site it serves.

A simulation actor serves many virtual hospitals, one message at a time; building a
ResNet-18 student (and, for federated evaluation, a global student) for every message costs
≈ 0.2 s per client and round (docs/performance.md), and the weights are overwritten by the
global model right after. Here a module of the same architecture is kept per process and
``purpose`` (``"train"`` / ``"evaluate"``) and handed out again with its training state
reset (gradients dropped, ``requires_grad`` and train/eval flags as built); the caller then
loads a *complete* state dict into it (``load_state_dict`` is strict in the client), so no
value of an earlier round or site survives. ``tests/test_model_cache.py`` checks that a
reused module gives the same outputs and the same training step as a fresh one.

Not used with ``privacy.mode`` other than ``off``: Opacus attaches hooks and per-sample
gradient buffers to the module it trains, which must not outlive the round.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable

from torch import nn

from fopro_kd.config import Config
from fopro_kd.run_plan import resolve_run_plan

__all__ = ["clear_model_cache", "reusable_module"]

_MODULES: dict[str, tuple[nn.Module, dict[str, bool], dict[str, bool]]] = {}
_LOCK = threading.Lock()


def _architecture_key(cfg: Config, num_classes: int, purpose: str) -> str:
    """What fixes the module's architecture: the student and teacher sections, classes, method, DP mode."""
    return json.dumps({
        "purpose": purpose,
        "num_classes": int(num_classes),
        "student": dataclasses.asdict(cfg.student),
        "teacher": dataclasses.asdict(cfg.teacher),
        "method": cfg.train.method,
        "privacy": cfg.privacy.mode,
    }, sort_keys=True, default=str)


def _flags(module: nn.Module) -> tuple[dict[str, bool], dict[str, bool]]:
    return ({name: p.requires_grad for name, p in module.named_parameters()},
            {name: m.training for name, m in module.named_modules()})


def reusable_module(cfg: Config, num_classes: int, purpose: str, build: Callable[[], nn.Module]) -> nn.Module:
    """This process's module for (architecture, ``purpose``), built by ``build()`` on first use.

    A reused module has no gradients and the ``requires_grad`` / training flags it was built
    with; its weights are those of its last use, so the caller must load a full state dict.
    With ``privacy.mode`` not ``off``, or ``federation.reuse_client_models: false``, every call builds a
    fresh module.
    """
    if resolve_run_plan(cfg).any_dp or not cfg.federation.reuse_client_models:
        return build()
    key = _architecture_key(cfg, num_classes, purpose)
    with _LOCK:
        entry = _MODULES.get(key)
        if entry is None:
            module = build()
            _MODULES[key] = (module, *_flags(module))
            return module
    module, requires_grad, training = entry
    for name, param in module.named_parameters():
        param.grad = None
        param.requires_grad_(requires_grad[name])
    for name, sub in module.named_modules():
        sub.training = training[name]
    return module


def clear_model_cache() -> None:
    """Forget every cached module (tests; a process that changes its config)."""
    with _LOCK:
        _MODULES.clear()
