"""EKD student: three heads, main head only at inference, clean state dict, gradients to every head."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from fopro_kd.config import StudentConfig
from fopro_kd.models import EKDStudent, StudentOutput, build_student
from fopro_kd.models.student import StudentLoadError

TINY = "test_resnet"  # feature 96


def _student(teacher_dim: int | None = 40, num_classes: int = 5, **kw) -> EKDStudent:
    torch.manual_seed(0)
    return build_student(StudentConfig(arch=TINY, **kw), num_classes=num_classes, teacher_dim=teacher_dim)


def test_heads_shapes_and_projector_layout() -> None:
    student = _student(teacher_dim=40, num_classes=5)
    assert student.feature_dim == 96 and student.num_classes == 5
    out = student.forward_train(torch.rand(4, 3, 32, 32))
    assert isinstance(out, StudentOutput)
    assert out.logits.shape == (4, 5) and out.aux_logits.shape == (4, 5)
    assert out.projection.shape == (4, 40) and out.features.shape == (4, 96)
    layers = list(student.projector)
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[3].out_features) == (96, 96, 40)
    assert (student.aux_classifier.in_features, student.aux_classifier.out_features) == (40, 5)
    custom = _student(teacher_dim=40, projector_hidden=24)
    assert custom.projector[0].out_features == 24 and custom.projector[1].num_features == 24


def test_forward_returns_main_logits_only() -> None:
    student = _student().eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits = student(x)
        out = student.forward_train(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 5)
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(logits, student.classifier(out.features))


def test_state_dict_has_no_normalisation_buffers() -> None:
    state = _student().state_dict()
    assert not any(key in ("mean", "std") or key.endswith((".mean", ".std")) for key in state)
    assert "classifier.weight" in state and "projector.1.running_mean" in state
    assert any(key.startswith("backbone.") and key.endswith("running_var") for key in state)


def test_input_normalised_inside_with_imagenet_stats() -> None:
    student = _student().eval()
    torch.testing.assert_close(student.mean.flatten(), torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = student.backbone((x - student.mean) / student.std)
        torch.testing.assert_close(student.forward_train(x).features, expected)


def test_ce_bsm_variant_has_no_projector() -> None:
    student = _student(teacher_dim=None)
    assert student.projector is None and student.aux_classifier is None
    assert not any(key.startswith(("projector", "aux_classifier")) for key in student.state_dict())
    out = student.forward_train(torch.rand(2, 3, 32, 32))
    assert out.aux_logits is None and out.projection is None and out.logits.shape == (2, 5)


def test_gradient_reaches_every_head_and_backbone() -> None:
    student = _student(teacher_dim=16).train()
    x, y, t = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.randn(4, 16)
    out = student.forward_train(x)
    loss = F.cross_entropy(out.logits, y) + F.cross_entropy(out.aux_logits, y)
    loss = loss + (2 - 2 * F.cosine_similarity(out.projection, t)).mean()
    loss.backward()
    for name in ("classifier.weight", "projector.0.weight", "projector.3.weight", "aux_classifier.weight"):
        grad = dict(student.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    backbone_grads = [p.grad for p in student.backbone.parameters()]
    assert all(g is not None for g in backbone_grads)
    assert sum(g.abs().sum() for g in backbone_grads) > 0


def test_dropout_only_before_main_head() -> None:
    student = _student(drop_rate=0.5).train()
    x = torch.rand(4, 3, 32, 32)
    first, second = student.forward_train(x), student.forward_train(x)
    torch.testing.assert_close(first.projection, second.projection)  # projector sees the clean feature
    assert not torch.allclose(first.logits, second.logits)


@pytest.mark.parametrize(
    ("arch", "dim"),
    [("resnet18", 512), ("efficientnet_b0", 1280), ("mobilenetv2_100", 1280), ("resnet10t", 512),
     ("mobilenetv3_small_050", 1024), ("test_resnet", 96), ("test_efficientnet", 256)],
)
def test_supported_architectures(arch: str, dim: int) -> None:
    student = build_student(StudentConfig(arch=arch), num_classes=3, teacher_dim=8).eval()
    assert student.feature_dim == dim
    with torch.no_grad():
        out = student.forward_train(torch.rand(2, 3, 32, 32))
    assert out.logits.shape == (2, 3) and out.projection.shape == (2, 8) and out.features.shape == (2, dim)


def test_imagenet_init_from_local_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = timm.create_model(TINY)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    student = build_student(StudentConfig(arch=TINY, init="imagenet", weights_file=str(path)), 4, 32)
    torch.testing.assert_close(student.backbone.conv1[0].weight, source.conv1[0].weight)
    assert student.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # the weights' own pretrained statistics


def test_imagenet_init_errors_are_actionable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(StudentLoadError, match="student.weights_file"):
        build_student(StudentConfig(arch=TINY, init="imagenet"), 4, None)
    with pytest.raises(StudentLoadError, match="student.weights_file"):
        build_student(StudentConfig(arch=TINY, init="imagenet", weights_file=str(tmp_path / "no.pth")), 4, None)
    wrong = tmp_path / "effnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), wrong)
    with pytest.raises(StudentLoadError, match="student.weights_file"):
        build_student(StudentConfig(arch=TINY, init="imagenet", weights_file=str(wrong)), 4, None)
    with pytest.raises(StudentLoadError, match="student.arch"):
        build_student(StudentConfig(arch="resnet_does_not_exist"), 4, None)


def test_bad_input_and_arguments_raise_value_error() -> None:
    student = _student()
    with pytest.raises(ValueError, match="student input"):
        student(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="num_classes"):
        EKDStudent(timm.create_model(TINY, num_classes=0), num_classes=1, teacher_dim=None, projector_hidden=None)
