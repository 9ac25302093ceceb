"""Frozen teacher: frozen forever, own normalisation, offline file loading, fast and helpful failures."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from fopro_kd.config import TeacherConfig
from fopro_kd.models import FrozenTeacher, TeacherLoadError, build_teacher, file_sha256

TINY = "test_resnet"  # 0.37 M parameters, feature 96, pretrained cfg mean = std = 0.5


def _save_timm_weights(arch: str, path: Path, seed: int = 0) -> nn.Module:
    """Save a full timm model's state dict (classifier included, as published checkpoints are)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch).eval()
    torch.save(model.state_dict(), path)
    return model


def _file_cfg(path: Path | str, arch: str = TINY, **kw) -> TeacherConfig:
    return TeacherConfig(arch=arch, source="file", file=str(path), **kw)


def test_stays_frozen_when_parent_trains() -> None:
    teacher = build_teacher(TeacherConfig(arch=TINY, source="none"))
    parent = nn.ModuleDict({"teacher": teacher, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train(True)
    assert not teacher.training and not teacher.model.training


def test_input_gradient_flows_but_params_get_none() -> None:
    teacher = build_teacher(TeacherConfig(arch=TINY, source="none", input_size=32))
    x = torch.rand(2, 3, 48, 48, requires_grad=True)
    teacher(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(("arch", "dim"), [("resnet18", 512), ("mobilenetv3_small_100", 1024), (TINY, 96)])
def test_feature_dim_detected(arch: str, dim: int) -> None:
    teacher = build_teacher(TeacherConfig(arch=arch, source="none", input_size=32))
    assert teacher.feature_dim == dim
    with torch.no_grad():
        assert teacher(torch.rand(2, 3, 40, 40)).shape == (2, dim)


def test_own_normalisation_and_override() -> None:
    own = build_teacher(TeacherConfig(arch=TINY, source="none"))
    assert own.mean.flatten().tolist() == [0.5, 0.5, 0.5] and own.std.flatten().tolist() == [0.5, 0.5, 0.5]
    imagenet = build_teacher(TeacherConfig(arch="mobilenetv3_small_050", source="none"))
    torch.testing.assert_close(imagenet.mean.flatten(), torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN))
    override = build_teacher(TeacherConfig(arch=TINY, source="none", mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0)))
    x = torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(override.normalize(x)[0, :, 0, 0], torch.tensor([0.9, 0.4, 0.175]))
    assert "mean" not in override.state_dict() and "std" not in override.state_dict()


def test_input_size_from_pretrained_cfg_and_resize() -> None:
    teacher = build_teacher(TeacherConfig(arch=TINY, source="none"))
    assert teacher.input_size == 160  # test_resnet's pretrained input size
    small = build_teacher(TeacherConfig(arch=TINY, source="none", input_size=24))
    x = torch.rand(2, 3, 24, 24)
    assert small.resize(x) is x
    assert small.resize(torch.rand(2, 3, 50, 50)).shape == (2, 3, 24, 24)


def test_source_none_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        teacher = build_teacher(TeacherConfig(arch=TINY, source="none"))
    assert "meaningless" in caplog.text
    assert teacher.weights_desc == "random (no weights)"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_roundtrip_gives_same_features(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(TINY).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        save_file(reference.state_dict(), str(path))
    teacher = build_teacher(_file_cfg(path, input_size=32))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(teacher.normalize(x)), pre_logits=True)
        torch.testing.assert_close(teacher(x), expected)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == digest
    assert digest in teacher.weights_desc and str(path) in teacher.weights_desc


def test_file_of_other_architecture_names_a_key(tmp_path: Path) -> None:
    path = tmp_path / "effnet.pth"
    _save_timm_weights("test_efficientnet", path)
    with pytest.raises(TeacherLoadError) as info:
        build_teacher(_file_cfg(path))
    message = str(info.value)
    expected_keys = timm.create_model(TINY, num_classes=0).state_dict()
    named = [key for key in expected_keys if f"'{key}'" in message]
    assert named, message
    assert "teacher.file" in message and str(path) in message


def test_shape_mismatch_names_the_key(tmp_path: Path) -> None:
    state = timm.create_model(TINY).state_dict()
    assert "conv1.0.weight" in state
    state["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(TeacherLoadError, match=r"conv1\.0\.weight.*shape|first mismatching key: 'conv1\.0\.weight'"):
        build_teacher(_file_cfg(path))


def test_unexpected_extra_key_is_reported(tmp_path: Path) -> None:
    state = timm.create_model(TINY).state_dict()
    state["stages.9.extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(TeacherLoadError, match=r"'stages\.9\.extra\.weight'"):
        build_teacher(_file_cfg(path))


def test_missing_file_names_path_and_field(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "teacher.pth"
    with pytest.raises(TeacherLoadError) as info:
        build_teacher(_file_cfg(path))
    assert str(path) in str(info.value) and "teacher.file" in str(info.value)
    with pytest.raises(TeacherLoadError, match="teacher.file"):
        build_teacher(TeacherConfig(arch=TINY, source="file", file=None))


def test_unreadable_file_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(TeacherLoadError, match="cannot read weights file"):
        build_teacher(_file_cfg(path))


def test_demo_source(tmp_path: Path) -> None:
    with pytest.raises(TeacherLoadError, match="fopro-kd teacher pretrain"):
        build_teacher(TeacherConfig(arch=TINY, source="demo"))
    with pytest.raises(TeacherLoadError, match="fopro-kd teacher pretrain"):
        build_teacher(TeacherConfig(arch=TINY, source="demo"), demo_file=str(tmp_path / "missing.pth"))
    path = tmp_path / "demo.pth"
    _save_timm_weights(TINY, path)
    teacher = build_teacher(TeacherConfig(arch=TINY, source="demo"), demo_file=str(path))
    assert teacher.weights_desc.startswith("demo:") and file_sha256(path) in teacher.weights_desc


def _empty_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_hub_offline_fails_fast_pointing_at_local_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _empty_hub_cache(monkeypatch, tmp_path)  # HF_HUB_OFFLINE=1 comes from conftest
    start = time.monotonic()
    with pytest.raises(TeacherLoadError) as info:
        build_teacher(TeacherConfig(arch=TINY, source="hub", hub_timeout_s=2))
    assert time.monotonic() - start < 5
    assert "teacher.file" in str(info.value) and "teacher.source: file" in str(info.value)


def test_hub_unreachable_fails_within_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    _empty_hub_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    with pytest.raises(TeacherLoadError, match="unreachable") as info:
        build_teacher(TeacherConfig(arch=TINY, source="hub", hub_timeout_s=2))
    assert time.monotonic() - start < 5
    assert "teacher.file" in str(info.value)
    assert constants.HF_HUB_OFFLINE is False  # the temporary offline switch was undone


def test_frozen_teacher_wraps_plain_timm_model() -> None:
    teacher = FrozenTeacher(timm.create_model("mobilenetv3_small_050", num_classes=0))
    assert teacher.feature_dim == 1024 and teacher.input_size == 224 and teacher.arch == "mobilenetv3_small_050"


def test_channels_last_teacher_computes_the_same_features_and_input_gradients() -> None:
    """The teacher runs in channels-last layout (its fast CPU path): same features and prompt gradients as the
    plain layout, up to float rounding, with TF-style 'same' padding too (the shipped MobileNetV2 build)."""
    import copy

    torch.manual_seed(0)
    fast = FrozenTeacher(timm.create_model("mobilenetv2_050", num_classes=0, pad_type="same"), input_size=64)
    plain = FrozenTeacher(copy.deepcopy(fast.model), input_size=64, channels_last=False)
    assert fast.memory_format == torch.channels_last and plain.memory_format == torch.contiguous_format
    conv = next(m for m in fast.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    x = torch.rand(3, 3, 48, 48)
    grads = []
    for teacher in (fast, plain):
        xi = x.clone().requires_grad_(True)
        out = teacher(xi)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        grads.append((out.detach(), xi.grad))
    (f_fast, g_fast), (f_plain, g_plain) = grads
    assert torch.allclose(f_fast, f_plain, rtol=1e-4, atol=1e-5)
    assert g_plain.abs().max() > 0
    assert (g_fast - g_plain).abs().max() <= 1e-4 * g_plain.abs().max()


def test_real_mobilenetv2_teacher(mobilenet_weights: Path) -> None:
    cfg = TeacherConfig(
        arch="mobilenetv2_100", source="file", file=str(mobilenet_weights),
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), model_kwargs={"pad_type": "same"},
    )
    teacher = build_teacher(cfg)
    assert teacher.feature_dim == 1280 and teacher.input_size == 224
    assert teacher.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert any(type(m).__name__ == "Conv2dSame" for m in teacher.modules())  # TF-style asymmetric padding
    assert "sha256" in teacher.weights_desc
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = teacher(x)  # resized to 224 inside
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    assert features.min() >= 0 and features.max() <= 6  # pooled ReLU6 activations
    assert not torch.allclose(features[0], features[1])
