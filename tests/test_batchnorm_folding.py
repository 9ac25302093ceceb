"""BatchNorm folding of the frozen teacher: same features and input gradients, and a guard that keeps
the original whenever a fold would change what the network computes."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from fopro_kd.config import config_from_dict
from fopro_kd.models.batchnorm_folding import fold_batchnorms
from fopro_kd.models.teacher import FrozenTeacher
from fopro_kd.run_plan import resolve_run_plan
from fopro_kd.training.components import clear_teacher_cache, shared_teacher


def _randomise_batchnorms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold cannot pass by luck."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g) * 0.3 + 1)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    # pad_type same: the Keras-origin teacher's dynamic-padding convolutions must fold too
    return _randomise_batchnorms(timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0,
                                                   pad_type="same"))


def test_folded_mobilenet_computes_the_same_features_and_input_gradient(mobilenet) -> None:
    x = torch.rand(4, 3, 48, 48)
    before = {k: v.clone() for k, v in mobilenet.state_dict().items()}
    folded, count = fold_batchnorms(mobilenet, x[:2])
    assert count == _batchnorms(mobilenet) == 52 and _batchnorms(folded) == 0
    assert all(torch.equal(before[k], v) for k, v in mobilenet.state_dict().items())  # the original untouched
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = mobilenet(xa), folded(xb)
    assert float((ya - yb).detach().abs().max()) < 1e-4 * float(ya.detach().abs().max())
    ya.square().sum().backward()
    yb.square().sum().backward()
    # relative L2: rounding may flip a ReLU6 clamp at a few pixels, so not an elementwise bound
    assert float((xa.grad - xb.grad).norm() / xa.grad.norm()) < 1e-3
    assert not any(p.requires_grad for p in folded.parameters())


class _SharedConvOutput(nn.Module):
    """conv -> BN, and the *pre*-BN conv output also feeds the sum: folding BN into conv would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return (self.bn(y) + y).mean(dim=(2, 3))


class _NormAfterSum(nn.Module):
    """A BatchNorm whose input is no convolution's output: nothing to fold it into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x) + x).mean(dim=(2, 3))


@pytest.mark.parametrize("net", [_SharedConvOutput, _NormAfterSum])
def test_a_fold_that_would_change_the_network_is_not_made(net) -> None:
    torch.manual_seed(0)
    model = _randomise_batchnorms(net())
    x = torch.rand(2, 3, 8, 8)
    folded, count = fold_batchnorms(model, x)
    assert count == 0 and folded is model
    assert _batchnorms(folded) == 1


def test_folding_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train(), torch.rand(1, 3, 4, 4))


def test_frozen_teacher_folds_only_when_asked_and_says_so_in_its_numerics(mobilenet) -> None:
    import copy

    plain = FrozenTeacher(copy.deepcopy(mobilenet), input_size=32)
    fast = FrozenTeacher(copy.deepcopy(mobilenet), input_size=32, fold_batchnorm=True)
    assert not plain.batchnorm_folded and fast.batchnorm_folded
    assert plain.numerics != fast.numerics and "folded" in fast.numerics
    x = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        assert float((plain(x) - fast(x)).abs().max()) < 1e-4 * float(plain(x).abs().max())


def _cfg(mode: str):
    return config_from_dict({
        "data": {"kind": "synthetic", "image_size": 16, "num_classes": 3},
        "student": {"arch": "resnet18", "init": "random"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": 16},
        "akd": {"mode": mode}, "train": {"method": "fopro-kd"},
    })


def test_the_shared_teacher_keeps_its_batchnorms_only_for_the_objective_that_reads_them() -> None:
    clear_teacher_cache()
    try:
        assert not resolve_run_plan(_cfg("bn_stats")).teacher_folds_batchnorm
        assert resolve_run_plan(_cfg("prototype")).teacher_folds_batchnorm
        kept, fast = shared_teacher(_cfg("bn_stats")), shared_teacher(_cfg("prototype"))
        assert not kept.batchnorm_folded and _batchnorms(kept) > 0
        assert fast.batchnorm_folded and fast is not kept
    finally:
        clear_teacher_cache()


def test_bn_stats_refuses_a_folded_teacher() -> None:
    from fopro_kd.prompt_objectives import BNStatsObjective, ObjectiveContext

    clear_teacher_cache()
    try:
        teacher = shared_teacher(_cfg("prototype"))
        ctx = ObjectiveContext.__new__(ObjectiveContext)
        object.__setattr__(ctx, "teacher", teacher)
        with pytest.raises(ValueError, match="bn_stats.*folded"):
            BNStatsObjective(ctx)
    finally:
        clear_teacher_cache()
