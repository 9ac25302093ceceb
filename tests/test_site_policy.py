"""The hospital's site policy (fopro_kd/site_policy.py): parsed strictly, each rule enforced before data is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import SiteSkipped, make_client_app
from fopro_kd.federation.sites import SiteDataError
from fopro_kd.config import Config, config_from_dict
from fopro_kd.site_policy import SitePolicyError, SitePolicyViolation, check_site_policy, load_site_policy
from fopro_kd.federation.evaluation import build_global_student
from simulations.tiny_federation import tiny_federation_values

from federation_helpers import fake_task_identity, preserved_torch_threads  # noqa: E402


def cfg_with(**sections: dict[str, Any]) -> Config:
    return config_from_dict(tiny_federation_values(**sections))


def policy_file(tmp_path: Path, rules: dict[str, Any]) -> Path:
    path = tmp_path / "site-policy.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


@pytest.mark.parametrize(("rules", "message"), [
    ({"allowed_method": ["ekd"]}, r"unknown field\(s\) \['allowed_method'\]"),
    ({"max_epsilon": -1}, r"'max_epsilon' must be a number > 0"),
    ({"min_privacy": "strong"}, r"'min_privacy' must be one of \['off', 'central', 'local'\]"),
    ({"data_paths": "/data"}, r"'data_paths' must be a list"),
    ({"class_counts_may_leave": "no"}, r"'class_counts_may_leave' must be true or false"),
])
def test_bad_policy_files_are_refused_naming_the_field(tmp_path: Path, rules: dict[str, Any], message: str) -> None:
    with pytest.raises(SitePolicyError, match=message) as info:
        load_site_policy(policy_file(tmp_path, rules))
    assert "site-policy.yaml" in str(info.value)


def test_missing_policy_file_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(SitePolicyError, match=r"cannot be read.*refuses to run"):
        load_site_policy(tmp_path / "absent.yaml")


LOCAL_DP = {"mode": "local", "target_epsilon": 6.0}


@pytest.mark.parametrize(("rules", "sections", "kwargs", "rule"), [
    ({"allowed_methods": ["ekd"]}, {}, {}, "allowed_methods"),  # the tiny federation runs fopro-kd
    ({"allowed_strategies": ["median"]}, {}, {}, "allowed_strategies"),
    ({"min_privacy": "local"}, {"privacy": {"mode": "central"}}, {}, "min_privacy"),
    ({"max_epsilon": 4.0}, {"privacy": LOCAL_DP}, {}, "max_epsilon"),  # a server that raised the budget
    ({"max_epsilon": 8.0}, {"privacy": {"mode": "local", "noise_multiplier": 1.0}}, {}, "max_epsilon"),
    ({"class_counts_may_leave": False}, {}, {"shares_class_counts": True}, "class_counts_may_leave"),
    ({"max_rounds": 1}, {}, {}, "max_rounds"),
    ({"federated_evaluation": False}, {}, {"kind": "evaluate"}, "federated_evaluation"),
    ({"data_paths": ["/data/hospital"]}, {"teacher": {"source": "file", "file": "/etc/passwd"}}, {}, "data_paths"),
    ({"data_paths": ["/data/hospital"]}, {}, {"data_root": "/data/hospital/../other"}, "data_paths"),
])
def test_each_rule_refuses_a_run_that_breaks_it(tmp_path: Path, rules, sections, kwargs, rule) -> None:
    policy = load_site_policy(policy_file(tmp_path, rules))
    with pytest.raises(SitePolicyViolation, match=rf"rule '{rule}' forbids this run"):
        check_site_policy(cfg_with(**sections), policy, **kwargs)


def test_a_run_within_the_policy_passes(tmp_path: Path) -> None:
    policy = load_site_policy(policy_file(tmp_path, {
        "allowed_methods": ["fopro-kd"], "allowed_strategies": ["fedavg"], "min_privacy": "local", "max_epsilon": 8.0,
        "class_counts_may_leave": False, "max_rounds": 10, "data_paths": [str(tmp_path)],
    }))
    cfg = cfg_with(privacy=LOCAL_DP)
    check_site_policy(cfg, policy, shares_class_counts=False, data_root=str(tmp_path / "images"))  # no error
    with pytest.raises(SitePolicyViolation):  # the same run, one step further: ε above the cap
        check_site_policy(cfg_with(privacy={**LOCAL_DP, "target_epsilon": 9.0}), policy)


def test_client_refuses_before_reading_any_data(tmp_path: Path) -> None:
    """A run breaking the policy is refused with the rule named, even though its data path does not exist."""
    cfg = cfg_with()  # privacy off
    policy = policy_file(tmp_path, {"min_privacy": "local"})
    missing = tmp_path / "no-such-images"
    context = Context(run_id=5, node_id=3, state=RecordDict(), run_config={},
                      node_config={"site-id": 0, "data-root": str(missing), "policy-file": str(policy)})
    with fake_task_identity(run_id=5, node_id=3), preserved_torch_threads():
        student = build_global_student(cfg, cfg.data.num_classes, seed=0)
        arrays = ArrayRecord({k: v.detach() for k, v in student.state_dict().items()})
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), dst_node_id=3,
                      message_type="train")
        app = make_client_app(cfg, state_root=tmp_path / "state")
        with pytest.raises(SiteSkipped, match=r"rule 'min_privacy' forbids this run.*'off'") as info:
            app(msg, context)
        assert "no-such-images" not in str(info.value), "the policy must be checked before the data path"
        # and without the policy the same node fails on its (missing) data: the order above is real
        context.node_config.pop("policy-file")
        with pytest.raises(SiteDataError, match=r"data root .* does not exist"):
            app(msg, context)
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("*.pt"))


def test_scores_in_a_train_call_follow_the_evaluation_rule(tmp_path: Path) -> None:
    """``federated_evaluation: false`` also keeps the counts a train call was asked for (evaluate_in_train) home."""
    cfg = cfg_with()

    def train_reply(node_config: dict[str, Any]) -> dict[str, Any]:
        context = Context(run_id=5, node_id=3, state=RecordDict(), run_config={},
                          node_config={"partition-id": 0, "num-partitions": 3, **node_config})
        with fake_task_identity(run_id=5, node_id=3), preserved_torch_threads():
            student = build_global_student(cfg, cfg.data.num_classes, seed=0)
            arrays = ArrayRecord({k: v.detach() for k, v in student.state_dict().items()})
            msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2, "score-round": 1})}),
                          dst_node_id=3, message_type="train")
            reply = make_client_app(cfg, state_root=tmp_path / "state")(msg, context)
        assert not reply.has_error()
        return dict(reply.content.metric_records["metrics"])

    allowed = train_reply({})
    assert allowed["scored-round"] == 1 and sum(allowed["total-counts"]) > 0
    assert all(0 <= c <= t for c, t in zip(allowed["correct-counts"], allowed["total-counts"]))
    refused = train_reply({"policy-file": str(policy_file(tmp_path, {"federated_evaluation": False}))})
    assert "correct-counts" not in refused and "scored-round" not in refused, "the policy keeps the counts home"
    assert refused["num-examples"] == allowed["num-examples"], "and the site still trained"
