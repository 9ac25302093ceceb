"""A student module reused across rounds and sites (client/model_cache.py) behaves exactly as a fresh one."""

from __future__ import annotations

import torch

from client.model_cache import clear_model_cache, reusable_module
from fopro_kd.config import config_from_dict
from fopro_kd.training.components import build_federated_student
from simulations.tiny_federation import tiny_federation_values

CFG = config_from_dict(tiny_federation_values())
NUM_CLASSES = CFG.data.num_classes


def build():
    return build_federated_student(CFG, NUM_CLASSES, teacher_dim=8, load_weights=False)


def one_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model.forward_train(x)
    loss = torch.nn.functional.cross_entropy(out.logits, y) + out.projection.pow(2).mean()
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()
    return loss.detach(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def test_reused_student_gives_the_outputs_and_the_step_of_a_fresh_one() -> None:
    clear_model_cache()
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in build().state_dict().items()}  # "the global model" of a round
    x = torch.rand(6, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 0, 1])

    used = reusable_module(CFG, NUM_CLASSES, "train", build)
    used.load_state_dict({k: torch.randn_like(v) if v.is_floating_point() else v for k, v in global_state.items()})
    used.train()
    used.forward_train(x).projection.sum().backward()  # an earlier site's round left gradients and train mode behind
    used.eval()

    reused = reusable_module(CFG, NUM_CLASSES, "train", build)
    assert reused is used, "the second call must hand out the cached module"
    assert all(p.grad is None for p in reused.parameters()), "gradients of the earlier use must be dropped"
    assert reused.training == build().training
    fresh = build()
    for model in (reused, fresh):
        model.load_state_dict(global_state)
    reused.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(logits(reused, x), logits(fresh, x))
    torch.manual_seed(1)
    loss_a, after_a = one_step(reused, x, y)
    torch.manual_seed(1)
    loss_b, after_b = one_step(fresh, x, y)
    assert torch.equal(loss_a, loss_b)
    for key in after_a:
        assert torch.equal(after_a[key], after_b[key]), key
    clear_model_cache()


def test_purposes_and_dp_get_their_own_modules() -> None:
    clear_model_cache()
    train = reusable_module(CFG, NUM_CLASSES, "train", build)
    evaluate = reusable_module(CFG, NUM_CLASSES, "evaluate", build)
    assert train is not evaluate, "training and evaluation must not share one module"
    dp = config_from_dict(tiny_federation_values(privacy={"mode": "local", "target_epsilon": 8.0}))
    first = reusable_module(dp, NUM_CLASSES, "train", build)
    assert reusable_module(dp, NUM_CLASSES, "train", build) is not first, "DP (Opacus hooks): always a fresh module"
    clear_model_cache()
