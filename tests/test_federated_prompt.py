"""prompt.scope federated: sites' prompts averaged while exploring, then one frozen prompt everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.client_app import make_client_app
from fopro_kd.config import ConfigError
from fopro_kd.federated_prompt import (
    PROMPT_ARRAYS_KEY,
    PROMPT_EXPLORE_KEY,
    average_prompts,
    check_federated_prompt,
    explore_rounds,
    prompt_parameter_count,
)
from server.server_app import run_federation
from federation_helpers import LocalGrid, fake_task_identity, preserved_torch_threads, tiny_config  # noqa: E402

FLIPS_ONLY = {"affine_scale": [1.0, 1.0], "affine_translate": 0.0, "rotation_degrees": 0.0,
              "color_jitter": [0.0, 0.0, 0.0, 0.0], "teacher_view": "flips"}


def federated_prompt_config(**extra):
    return tiny_config(
        prompt={"schedule": "two_stage", "explore_epochs": 1, "scope": "federated", "param": "radial", "lr": 0.05},
        augment=FLIPS_ONLY, federation={"num_rounds": 3, "local_steps": 2, **extra},
    )


def test_prompt_is_averaged_while_exploring_then_identical_and_frozen_on_every_site(tmp_path: Path) -> None:
    cfg = federated_prompt_config()
    assert explore_rounds(cfg) == 1
    app = make_client_app(cfg, state_root=tmp_path / "state")
    seen: list[dict] = []

    def recording_app(msg, context):
        config = msg.content.config_records["config"]
        received = msg.content.array_records.get(PROMPT_ARRAYS_KEY)
        reply = app(msg, context)
        assert not reply.has_error(), reply.error.reason
        sent = reply.content.array_records.get(PROMPT_ARRAYS_KEY)
        weight = float(reply.content.metric_records["metrics"]["num-examples"])
        seen.append({
            "round": int(config["server-round"]), "node": msg.metadata.dst_node_id,
            "explore": int(config[PROMPT_EXPLORE_KEY]),
            "received": None if received is None else {k: v.numpy() for k, v in received.items()},
            "sent": None if sent is None else {k: v.numpy() for k, v in sent.items()},
            "weight": weight,
        })
        return reply

    with fake_task_identity(run_id=9), preserved_torch_threads():
        run_federation(LocalGrid(recording_app, cfg.federation.num_clients), cfg, tmp_path / "run")
    first = [s for s in seen if s["round"] == 1]
    later = [s for s in seen if s["round"] > 1]
    assert first and later and all(s["explore"] == 1 for s in first) and all(s["explore"] == 0 for s in later)
    # round 1: each site trained its own prompt (they differ) and sent it; nothing received yet
    assert all(s["received"] is None and s["sent"] is not None for s in first)
    sent = [s["sent"]["m"] for s in first]
    assert any(not np.allclose(sent[0], other) for other in sent[1:]), "sites' explored prompts should differ"
    assert all(np.abs(m).max() > 0 for m in sent), "exploration did not move the prompt"
    # later rounds: every site receives the same prompt, the average of what was sent, and sends none
    weights = np.asarray([s["weight"] for s in first])
    expected = np.tensordot(weights / weights.sum(), np.stack(sent), axes=1)  # the students' FedAvg weights
    received = [s["received"]["m"] for s in later]
    for m in received:
        np.testing.assert_array_equal(m, received[0])
        np.testing.assert_allclose(m, expected, atol=1e-6)
    assert all(s["sent"] is None for s in later)


def test_average_prompts_is_the_weighted_mean() -> None:
    a, b = {"m": np.array([[1.0, 2.0]])}, {"m": np.array([[3.0, 6.0]])}
    out = average_prompts([a, b], [1.0, 3.0])
    np.testing.assert_allclose(out["m"], [[2.5, 5.0]])


def test_federated_prompt_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="two_stage"):
        check_federated_prompt(tiny_config(prompt={"scope": "federated"}), 32)
    cfg = federated_prompt_config()
    big = tiny_config(prompt={"schedule": "two_stage", "scope": "federated", "param": "free"}, augment=FLIPS_ONLY,
                      federation={"num_rounds": 3})
    assert prompt_parameter_count(big.prompt, 448) > 100_000
    with pytest.raises(ConfigError, match="too many to send"):
        check_federated_prompt(big, 448)
    check_federated_prompt(cfg, 448)  # radial: 24 numbers, fine at any size
    with pytest.raises(ConfigError, match="num_rounds"):
        check_federated_prompt(federated_prompt_config(num_rounds=1), 32)
    dp = tiny_config(prompt={"schedule": "two_stage", "scope": "federated", "param": "radial"}, augment=FLIPS_ONLY,
                     federation={"num_rounds": 3}, privacy={"mode": "local", "target_epsilon": 8.0})
    with pytest.raises(ConfigError, match="privatised"):
        check_federated_prompt(dp, 32)
