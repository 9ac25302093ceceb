"""The resolved run plan, the named seed formulas and the one home of the offline-Hub default.

* :func:`fopro_kd.run_plan.resolve_run_plan` for every method x loss x privacy mode (each
  parametrised over its registry: :data:`fopro_kd.run_plan.METHODS`, :data:`fopro_kd.losses.LOSSES`,
  the ``privacy.mode`` choices), and the one rule for the teacher's input size;
* the seed helpers of :mod:`fopro_kd.seeding` give the values the code used before they had names
  (results must stay bit-identical);
* :func:`fopro_kd.models.weights.default_offline_hub` and an explicit ``HF_HUB_OFFLINE=0``;
* a scan of the modules that used to re-derive these values: the old spellings cannot come back.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from fopro_kd.config import AKDConfig, Config, PrivacyConfig, TrainConfig, load_config
from fopro_kd.losses import LOSSES, list_losses
from fopro_kd.prompt_objectives import PROMPT_OBJECTIVES
from fopro_kd.run_plan import METHODS, RunPlan, resolve_run_plan, student_input_size, teacher_input_size
from fopro_kd.seeding import DPSeeds, dp_stream_seeds, site_seed, support_draw_seed

REPO_ROOT = Path(__file__).resolve().parents[1]
PRIVACY_MODES = list(get_args(get_type_hints(PrivacyConfig)["mode"]))
AKD_MODES = ["off", *PROMPT_OBJECTIVES]


def _cfg(method: str, loss: str = "bsm", mode: str = "off", akd: str = "discriminative") -> Config:
    cfg = Config()
    cfg.train.method = method
    cfg.train.loss = loss
    cfg.privacy.mode = mode
    cfg.akd.mode = akd
    return cfg


def test_method_registry_is_the_config_choice_list() -> None:
    assert sorted(METHODS) == sorted(get_args(get_type_hints(TrainConfig)["method"]))
    assert "off" in get_args(get_type_hints(AKDConfig)["mode"])


@pytest.mark.parametrize("mode", PRIVACY_MODES)
@pytest.mark.parametrize("loss", list_losses())
@pytest.mark.parametrize("method", sorted(METHODS))
def test_plan_fields(method: str, loss: str, mode: str) -> None:
    plan = resolve_run_plan(_cfg(method, loss, mode))
    assert plan.method == method
    assert plan.uses_teacher is (method in {"ekd", "fopro-kd"})
    assert plan.uses_prompt is (method == "fopro-kd")
    assert plan.classification_loss == ("ce" if method == "ce" else loss)
    assert plan.classification_loss in LOSSES
    assert plan.akd_mode == ("discriminative" if method == "fopro-kd" else "off")
    assert plan.privacy_mode == mode
    assert (plan.local_dp, plan.central_dp, plan.any_dp) == (mode == "local", mode == "central", mode != "off")
    assert plan.any_dp == (plan.local_dp or plan.central_dp)


@pytest.mark.parametrize("akd", AKD_MODES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_akd_mode_is_off_unless_fopro_kd(method: str, akd: str) -> None:
    assert resolve_run_plan(_cfg(method, akd=akd)).akd_mode == (akd if method == "fopro-kd" else "off")


@pytest.mark.parametrize("akd", AKD_MODES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_teacher_keeps_its_batchnorms_only_for_the_objective_that_reads_them(method: str, akd: str) -> None:
    folds = resolve_run_plan(_cfg(method, akd=akd)).teacher_folds_batchnorm
    assert folds == (not (method == "fopro-kd" and akd == "bn_stats"))


def test_plan_is_frozen_and_refuses_unknown_method() -> None:
    plan = resolve_run_plan(_cfg("ekd"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.uses_teacher = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="train.method must be one of"):
        resolve_run_plan(_cfg("distill"))


def test_demo_config_plan() -> None:
    plan = resolve_run_plan(load_config(REPO_ROOT / "configs" / "demo.yaml"))
    assert plan == RunPlan(method="fopro-kd", uses_teacher=True, uses_prompt=True, classification_loss="bsm",
                           akd_mode="discriminative", teacher_folds_batchnorm=True, student_input_size=48, teacher_input_size=48,
                           privacy_mode="off", local_dp=False, central_dp=False, any_dp=False)


def test_input_sizes_one_rule() -> None:
    cfg = _cfg("fopro-kd")
    cfg.data.image_size = 40
    cfg.student.input_size = None
    assert student_input_size(cfg) == 40
    cfg.student.input_size = 32
    assert resolve_run_plan(cfg).student_input_size == 32
    cfg.teacher.source, cfg.teacher.input_size = "hub", None
    assert teacher_input_size(cfg) is None  # the pretrained config decides when the model is loaded
    cfg.teacher.source = "demo"
    assert teacher_input_size(cfg) == 40  # the size the demo teacher is pretrained at
    cfg.teacher.input_size = 64
    assert teacher_input_size(cfg) == 64
    cfg.teacher.source = "file"
    assert resolve_run_plan(cfg).teacher_input_size == 64


def test_shared_demo_teacher_gets_the_planned_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The demo teacher without ``teacher.input_size`` is built at the size it is pretrained at."""
    from fopro_kd.training import components

    seen = []

    class _Teacher:
        arch, weights_desc, feature_dim = "x", "fake", 8

    def fake_build(tcfg, demo_file=None, fold_batchnorm=False):
        seen.append(tcfg.input_size)
        return _Teacher()

    monkeypatch.setattr(components, "build_teacher", fake_build)
    monkeypatch.setattr(components, "demo_teacher_path", lambda cfg: tmp_path / "demo.pth")
    cfg = _cfg("ekd")
    cfg.teacher.source, cfg.teacher.input_size, cfg.data.image_size = "demo", None, 36
    components.clear_teacher_cache()
    try:
        assert components.shared_teacher(cfg) is not None
        assert components.shared_teacher(_cfg("bsm")) is None
    finally:
        components.clear_teacher_cache()
    assert seen == [36]
    assert cfg.teacher.input_size is None  # the config itself is left as written


def test_seed_helpers_keep_the_old_values() -> None:
    assert site_seed(0, 3) == 0 * 1000 + 3
    assert site_seed(7, 2) == 7002
    assert len({site_seed(s, i) for s in range(3) for i in range(1000)}) == 3000  # distinct below 1000 sites
    assert dp_stream_seeds(5) == DPSeeds(sample=5, noise=6, statistics=7)
    big = 2**62 - 1
    assert dp_stream_seeds(big) == (big, big + 1, big + 2)
    assert support_draw_seed(4) == 5


def test_default_offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from fopro_kd.models.weights import default_offline_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as when huggingface_hub was imported first
    default_offline_hub()
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user's explicit choice wins
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    default_offline_hub()
    assert os.environ["HF_HUB_OFFLINE"] == "0" and constants.HF_HUB_OFFLINE is False


# Modules that re-derived a plan field, a seed or the offline default; the spellings they used.
# simulations/benchmark_methods.py still sets HF_HUB_OFFLINE itself (edited elsewhere): not listed.
SCANNED = [
    "fopro_kd/training/trainer.py", "fopro_kd/training/components.py", "fopro_kd/privacy/feature_probe.py",
    "fopro_kd/privacy/local_dp.py", "fopro_kd/privacy/surgery.py", "fopro_kd/privacy/statistics.py",
    "fopro_kd/prompt_objectives.py", "fopro_kd/cli.py", "client/client_app.py", "client/model_cache.py",
    "server/server_app.py", "server/startup.py", "server/selection.py", "server/report.py",
    "simulations/bench.py", "simulations/simulate.py",
]


def _name_of(node: ast.AST) -> str:
    """The last name of ``a.b.c`` / ``c`` / ``int(a.c)`` (``c``), else ''."""
    if isinstance(node, ast.Call) and len(node.args) == 1:
        node = node.args[0]
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _is_str(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(_is_str(e) for e in node.elts)


def rederivations(source: str) -> list[tuple[int, str]]:
    """(line, what) of every re-derivation in ``source``'s code (docstrings, comments and messages do not count)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(_is_str(c) for c in node.comparators):
            name = _name_of(node.left)
            owner = _name_of(node.left.value) if isinstance(node.left, ast.Attribute) else ""
            if name == "method":
                found.append((node.lineno, "train.method compared to a name (use the plan's traits)"))
            elif name == "mode" and owner in {"privacy", "p"}:
                found.append((node.lineno, "privacy.mode compared (use plan.local_dp / central_dp / any_dp)"))
            elif name == "mode" and owner == "akd":
                found.append((node.lineno, "akd.mode compared (use the plan's effective akd_mode)"))
        if isinstance(node, ast.IfExp) and isinstance(node.body, ast.Constant) and node.body.value == "ce":
            found.append((node.lineno, "the ce method's forced loss"))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setdefault"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "HF_HUB_OFFLINE"):
            found.append((node.lineno, "HF_HUB_OFFLINE set by hand"))
        if (isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult))
                and "seed" in _name_of(node.left) and isinstance(node.right, ast.Constant)):
            found.append((node.lineno, "a seed offset written out"))
        if (isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or)
                and _name_of(node.values[0]) == "input_size"):
            found.append((node.lineno, "an input size defaulted by hand (use the plan's sizes)"))
    return sorted(found)


def test_the_scan_finds_the_old_spellings() -> None:
    old = (
        'if self.method in ("ekd", "fopro-kd"):\n    pass\n'
        'loss = "ce" if method == "ce" else cfg.train.loss\n'
        'x = cfg.privacy.mode != "off"\ny = p.mode in ("local", "central")\n'
        'z = cfg.train.method == "fopro-kd" and cfg.akd.mode != "off"\n'
        'os.environ.setdefault("HF_HUB_OFFLINE", "1")\n'
        'torch.manual_seed(int(cfg.seed) * 1000 + spec.site_id)\ng = rng(seed + 2)\n'
        'def f():\n    \"\"\"cfg.privacy.mode == "local" and seed + 1 in a docstring\"\"\"\n'
        'if self.mode == "minmax":\n    pass\n'
        'size = cfg.teacher.input_size or cfg.data.image_size\n'
    )
    assert [line for line, _ in rederivations(old)] == [1, 3, 3, 4, 5, 6, 6, 7, 8, 9, 14]


@pytest.mark.parametrize("path", SCANNED)
def test_no_rederivation_comes_back(path: str) -> None:
    found = rederivations((REPO_ROOT / path).read_text(encoding="utf-8"))
    assert not found, ("use fopro_kd.run_plan / fopro_kd.seeding / default_offline_hub instead:\n"
                       + "\n".join(f"{path}:{line}: {what}" for line, what in found))
