"""A student initialised from public weights with a frozen backbone (``student.init: teacher``,
``student.freeze_backbone``): what DP-SGD needs to have few private parameters (docs/privacy.md §6)."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from torch import nn

from fopro_kd.checkpoint import load_checkpoint
from fopro_kd.config import Config, ConfigError, config_from_dict
from fopro_kd.data import make_synthetic_imageset
from fopro_kd.privacy.surgery import private_compatibility_problems
from fopro_kd.models.student import StudentLoadError
from fopro_kd.training.components import build_configured_student, build_models, shared_teacher
from fopro_kd.training.trainer import LocalTrainer
from server.server_app import run_federation
from server.strategies.base import ValidatedWeightedAvg
from server.strategies.central_dp import CentralDP

sys.path.insert(0, str(Path(__file__).parent))
from federation_helpers import LocalGrid, aggregate_one_round, fake_task_identity, preserved_torch_threads, tiny_values  # noqa: E402

from client.client_app import make_client_app  # noqa: E402

SIZE = 32
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)


@pytest.fixture(scope="module")
def public_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'public' test_resnet checkpoint with non-trivial BatchNorm statistics."""
    torch.manual_seed(3)
    model = timm.create_model("test_resnet", num_classes=0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("public") / "test_resnet.pth"
    torch.save(model.state_dict(), path)
    return path


def frozen_cfg(public_weights: Path, **sections: dict[str, Any]) -> Config:
    values: dict[str, Any] = {
        "data": {"image_size": SIZE, "num_classes": 3},
        "student": {"arch": "test_resnet", "init": "teacher", "freeze_backbone": True},
        "teacher": {"arch": "test_resnet", "source": "file", "file": str(public_weights), "input_size": SIZE},
        "train": {"batch_size": 8, "epochs": 1, "method": "ekd"},
        "augment": {"enabled": False},
        "federation": {"num_rounds": 2, "local_epochs": 1},
    }
    for key, val in sections.items():
        values.setdefault(key, {}).update(val)
    return config_from_dict(values)


def trained(cfg: Config) -> tuple[LocalTrainer, dict[str, torch.Tensor]]:
    """A trainer for ``cfg`` after 2 steps on a small synthetic set, and the student's state before them."""
    torch.manual_seed(0)
    data = make_synthetic_imageset([12, 8, 4], SIZE, seed=0)
    teacher = shared_teacher(cfg)
    student, prompt = build_models(cfg, 3, teacher)
    trainer = LocalTrainer(cfg, student, teacher, prompt, data.class_counts(), torch.device("cpu"))
    before = copy.deepcopy(trainer.student.state_dict())
    result = trainer.train(data, epochs=1, max_steps=2)
    assert result.num_steps == 2 and math.isfinite(result.losses["loss"])
    return trainer, before


def changed_keys(student: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}


def test_config_rejects_frozen_random_backbone_and_foreign_teacher_weights() -> None:
    with pytest.raises(ConfigError, match=r"student.freeze_backbone.*student.init"):
        config_from_dict({"student": {"freeze_backbone": True}})
    with pytest.raises(ConfigError, match=r"student.arch.*teacher.arch"):
        config_from_dict({"student": {"arch": "resnet18", "init": "teacher"}, "teacher": {"arch": "mobilenetv2_100"}})
    with pytest.raises(ConfigError, match=r"teacher.file"):
        config_from_dict({"student": {"arch": "resnet18", "init": "teacher"},
                          "teacher": {"arch": "resnet18", "source": "file"}, "train": {"method": "bsm"}})


def test_teacher_init_loads_the_public_weights_and_training_never_moves_them(public_weights: Path) -> None:
    cfg = frozen_cfg(public_weights)
    trainer, before = trained(cfg)
    student = trainer.student
    public = torch.load(public_weights, weights_only=True)
    for key, value in public.items():  # parameters and BatchNorm statistics, before and after training
        assert torch.equal(before[f"backbone.{key}"], value), key
        assert torch.equal(student.state_dict()[f"backbone.{key}"], value), key
    assert not any(p.requires_grad for p in student.backbone.parameters())
    assert student.training and not student.backbone.training, "a frozen backbone stays in eval mode"
    assert {"classifier.weight", "aux_classifier.weight", "projector.0.weight"} <= changed_keys(student, before)
    assert student.frozen_state_keys() == {f"backbone.{k}" for k in public}


def test_architecture_only_build_reads_no_weights_and_matches_the_loaded_student(public_weights: Path) -> None:
    """What a client (global arrays next) or a checkpoint evaluation builds: no file read, same keys and
    normalisation, so the full state dict of the weight-loaded student fits it exactly."""
    loaded_cfg = frozen_cfg(public_weights, teacher={"mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.4)})
    missing_cfg = frozen_cfg(public_weights.parent / "not-there.pth", teacher={"mean": (0.4, 0.5, 0.6),
                                                                               "std": (0.2, 0.3, 0.4)})
    loaded = build_configured_student(loaded_cfg, 3, 16)
    bare = build_configured_student(missing_cfg, 3, 16, load_weights=False)
    assert torch.equal(bare.mean, loaded.mean) and torch.equal(bare.std, loaded.std)
    assert bare.mean.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    bare.load_state_dict(loaded.state_dict())  # strict: same keys and shapes
    assert bare.backbone_frozen and not any(p.requires_grad for p in bare.backbone.parameters())
    with pytest.raises(StudentLoadError, match="teacher.file"):
        build_configured_student(missing_cfg, 3, 16)


def test_dp_student_keeps_the_frozen_public_batchnorm_and_trains_only_the_heads(public_weights: Path) -> None:
    cfg = frozen_cfg(public_weights, privacy={"mode": "local", "noise_multiplier": 1.0, "noise_seed": 0})
    trainer, before = trained(cfg)
    student = trainer.student
    assert trainer.dp is not None and private_compatibility_problems(student) == []
    assert any(isinstance(m, nn.BatchNorm2d) for m in student.backbone.modules()), "public statistics kept"
    assert not any(isinstance(m, BATCHNORM) for m in student.projector.modules()), "trainable BatchNorm converted"
    changed = changed_keys(student, before)
    assert changed and not any(k.startswith("backbone.") for k in changed)
    assert {"classifier.weight", "projector.1.weight"} <= changed  # projector.1 = the GroupNorm
    grad_samples = {n for n, p in student.named_parameters() if getattr(p, "grad_sample", None) is not None}
    assert not any(n.startswith("backbone.") for n in grad_samples)
    # FedProx on top: the proximal term covers the trainable heads; the backbone still does not move
    global_params = {k: v.clone() for k, v in before.items()}
    data = make_synthetic_imageset([12, 8, 4], SIZE, seed=1)
    result = trainer.train(data, epochs=1, max_steps=2, proximal_mu=0.5, global_params=global_params)
    assert result.num_steps == 2
    assert not any(k.startswith("backbone.") for k in changed_keys(student, before))


def test_a_trainable_batchnorm_is_still_reported_when_the_backbone_is_frozen(public_weights: Path) -> None:
    cfg = frozen_cfg(public_weights)
    torch.manual_seed(0)
    student, _ = build_models(cfg, 3, shared_teacher(cfg))  # DP off: the projector keeps BatchNorm1d
    problems = private_compatibility_problems(student)
    assert any(p.startswith("projector.1 is BatchNorm1d") for p in problems)
    assert not any(p.startswith("backbone.") and "BatchNorm" in p for p in problems)


def test_central_dp_leaves_public_arrays_out_of_clipping_and_noise() -> None:
    strategy = ValidatedWeightedAvg()
    strategy.central_dp = CentralDP(clip_norm=1.0, noise_multiplier=5.0, delta=1e-5, noise_seed=0, population=2)
    strategy.central_dp.public_keys = frozenset({"frozen"})

    ref = {"frozen": np.linspace(-1, 1, 50).astype(np.float32), "head": np.zeros(10, np.float32)}
    replies = [{"frozen": ref["frozen"] + 100.0, "head": ref["head"] + 0.01}, {k: v.copy() for k, v in ref.items()}]
    with fake_task_identity(run_id=13):
        out = aggregate_one_round(strategy, ref, replies, [10, 10])
    np.testing.assert_array_equal(out["frozen"], ref["frozen"])  # neither the client's change nor noise
    assert list(strategy.central_dp.last_norms.values())[0] == pytest.approx(0.01 * math.sqrt(10), rel=1e-4)
    assert float(np.std(out["head"])) > 0.5, "the private head is noised (std sigma C / W = 5 x 1 / 2)"


@pytest.mark.parametrize("mode", ["local", "central"])
def test_a_dp_federation_keeps_the_public_backbone(mode: str, public_weights: Path, tmp_path: Path) -> None:
    """Server and clients build the same frozen-backbone student; the released models keep the public backbone."""
    privacy = {"mode": mode, "central_noise_multiplier": 2.0, "central_clip_norm": 0.5}
    if mode == "local":
        privacy = {"mode": "local", "noise_multiplier": 2.0, "max_grad_norm": 0.5, "noise_seed": 0}
    values = tiny_values(
        student={"init": "teacher", "freeze_backbone": True},
        teacher={"source": "file", "file": str(public_weights)},
        train={"method": "bsm"},
        privacy=privacy,
    )
    cfg = config_from_dict(values)
    apps = {k: make_client_app(cfg, state_root=tmp_path / "state") for k in range(cfg.federation.num_clients)}
    with fake_task_identity(run_id=13), preserved_torch_threads():
        run_federation(LocalGrid(apps, run_id=13), cfg, tmp_path / "run")
    payload = load_checkpoint(tmp_path / "run" / "best.pt", expected_format="fopro-kd-student/1")
    public = torch.load(public_weights, weights_only=True)
    for key, value in public.items():
        assert torch.equal(payload["state_dict"][f"backbone.{key}"], value), key
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["rejected_replies"] == [] and metrics["failed_replies"] == {}, "clients and server must agree"
    assert metrics["rounds_without_aggregation"] == []
    head = payload["state_dict"]["classifier.weight"]
    if mode == "central":
        assert float(head.std()) > 0.2, "the head carries the central noise (std sigma C / W = 2 x 0.5 / 3)"
    else:
        assert metrics["dp_epsilon_max"] > 0
