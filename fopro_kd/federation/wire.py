"""Every key the apps exchange: message records and metrics, node config, run config (one home each).

A key written twice drifts; a typo in one app is a silent protocol break. Both apps import
the names below (kebab-case strings, as Flower's records and configs use them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fopro_kd.federation.fedmas import FEDMAS_RULES

__all__ = [
    "CLASS_COUNTS_KEY", "CORRECT_COUNTS_KEY", "DATA_ROOT_KEY", "DECLINE_RECORD_KEY", "DP_BUDGET_MARKER", "DP_DECLINE_KEY",
    "FEDMAS_RULE_KEY", "NUM_EXAMPLES_KEY", "NUM_PARTITIONS_KEY", "PARTITION_ID_KEY", "POLICY_FILE_KEY",
    "PROMPT_ARRAYS_KEY", "PROMPT_EXPLORE_KEY", "PROXIMAL_MU_KEY", "REPLY_SITE_ID_KEY", "ROBUST_FACTOR_KEY", "RUN_CONFIG_FILE_KEY",
    "RUN_CONFIG_OUT_DIR_KEY", "RUN_CONFIG_OVERRIDES_KEY", "RUN_CONFIG_RESUME_DIR_KEY", "SERVER_ROUND_KEY",
    "SITE_ID_KEY", "STATE_DIR_KEY", "STATE_KEY", "TOTAL_COUNTS_KEY", "InstructionError", "TrainInstruction", "site_name",
]

# --- train / evaluate instructions (server -> site), ConfigRecord "config"
SERVER_ROUND_KEY = "server-round"
STATE_KEY = "state-key"
"""The run's client-state folder name, chosen by the server and kept across a resume."""
PROXIMAL_MU_KEY = "proximal-mu"
"""FedProx: the proximal coefficient mu of this round (0 = plain FedAvg step)."""
FEDMAS_RULE_KEY = "fedmas-rule"
PROMPT_EXPLORE_KEY = "prompt-explore"
"""``prompt.scope: federated``: 1 while the shared prompt is explored this round."""
PROMPT_ARRAYS_KEY = "prompt"
"""``prompt.scope: federated``: ArrayRecord of the shared prompt (both ways)."""
SCORE_ROUND_KEY = "score-round"
"""``federation.evaluate_in_train``: score the received global model (round k's) on the local test split first."""

# --- replies (site -> server), MetricRecord "metrics"
REPLY_SITE_ID_KEY = "site-id"
"""Every reply names its site (the server maps node ids to sites with it)."""
NUM_EXAMPLES_KEY = "num-examples"
CLASS_COUNTS_KEY = "class-counts"
ROBUST_FACTOR_KEY = "robust-factor"
CORRECT_COUNTS_KEY = "correct-counts"
"""Federated evaluation: per-class correct predictions of the global model on the site's local test split."""
TOTAL_COUNTS_KEY = "total-counts"
"""Federated evaluation: per-class local test images (what the correct counts are out of)."""
SCORED_ROUND_KEY = "scored-round"
"""Train reply: the round whose global model the counts above score (``SCORE_ROUND_KEY`` of the instruction)."""
DP_DECLINE_KEY = "dp-budget-exhausted"
"""Metric of a budget-decline reply (value 1)."""
DECLINE_RECORD_KEY = "decline"
"""ConfigRecord of a budget-decline reply; its ``"reason"`` names epsilon so far and the target."""
DP_BUDGET_MARKER = "dp budget exhausted"
"""Text that marks a budget decline in logs and reasons."""

# --- node config (set by each hospital on its SuperNode)
DATA_ROOT_KEY = "data-root"
SITE_ID_KEY = "site-id"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
STATE_DIR_KEY = "state-dir"
POLICY_FILE_KEY = "policy-file"
"""The hospital's own site policy (fopro_kd/site_policy.py), checked before every instruction is answered."""

# --- run config (set by whoever submits the run: ``flwr run --run-config``)
RUN_CONFIG_FILE_KEY = "config-file"
RUN_CONFIG_OVERRIDES_KEY = "overrides"
RUN_CONFIG_OUT_DIR_KEY = "out-dir"
RUN_CONFIG_RESUME_DIR_KEY = "resume-dir"
"""Absolute run directory to continue from its last complete round."""


def site_name(site_id: int) -> str:
    """``site-<id>``: how a hospital is named in replies, logs, history columns and reports."""
    return f"site-{int(site_id)}"


class InstructionError(ValueError):
    """A server instruction whose value cannot be what its key means (the site refuses the round)."""


def _int_value(config: Mapping[str, Any], key: str, minimum: int) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InstructionError(f"instruction {key!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class TrainInstruction:
    """The server's train / evaluate instruction (ConfigRecord ``"config"``) as typed values.

    Why a record: the site reads the server's values in one place, at the boundary, and every
    later reader (the trainer set-up, the strategy hooks, the federated prompt) gets a typed
    field instead of a string key and a cast of its own; a value of the wrong type or range is
    one :class:`InstructionError` naming the key before anything is built, not a ``float("abc")``
    deep in a hook. Unknown keys are ignored (a newer server may send more). The folder-name
    check of ``state_key`` stays with the state store (``client/state.py:check_state_key``), which
    owns the paths.
    """

    server_round: int = 0
    state_key: str | None = None
    proximal_mu: float = 0.0
    """FedProx's μ of this round (0: plain local training)."""
    fedmas_rule: str | None = None
    """FedMAS's robust-factor rule chosen by the server (None: the site's config)."""
    prompt_explore: bool = False
    """``prompt.scope: federated``: this round explores the shared prompt."""
    score_round: int | None = None
    """``federation.evaluate_in_train``: the round of the global model in this message, to score before training."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainInstruction:
        """Parse and check the instruction's plain values (a ConfigRecord is a mapping)."""
        round_ = _int_value(config, SERVER_ROUND_KEY, 0) if SERVER_ROUND_KEY in config else 0
        state_key = config.get(STATE_KEY)
        if state_key is not None and not isinstance(state_key, str):
            raise InstructionError(f"instruction {STATE_KEY!r} must be a string, got {state_key!r}")
        mu = config.get(PROXIMAL_MU_KEY, 0.0)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
            raise InstructionError(f"instruction {PROXIMAL_MU_KEY!r} must be a finite number >= 0, got {mu!r}")
        rule = config.get(FEDMAS_RULE_KEY)
        if rule is not None:
            if rule not in FEDMAS_RULES:
                raise InstructionError(f"instruction {FEDMAS_RULE_KEY!r} must be one of {list(FEDMAS_RULES)}, "
                                       f"got {rule!r}")
        explore = _int_value(config, PROMPT_EXPLORE_KEY, 0) if PROMPT_EXPLORE_KEY in config else 0
        if explore > 1:
            raise InstructionError(f"instruction {PROMPT_EXPLORE_KEY!r} must be 0 or 1, got {explore!r}")
        score = _int_value(config, SCORE_ROUND_KEY, 1) if SCORE_ROUND_KEY in config else None
        if score is not None and SERVER_ROUND_KEY in config and score >= round_:
            raise InstructionError(f"instruction {SCORE_ROUND_KEY!r} must name an earlier round than "
                                   f"{SERVER_ROUND_KEY!r} {round_}, got {score!r}")
        return cls(server_round=round_, state_key=state_key, proximal_mu=float(mu),
                   fedmas_rule=None if rule is None else str(rule), prompt_explore=bool(explore), score_round=score)

    def to_config(self) -> dict[str, Any]:
        """The plain values a server puts in the ConfigRecord (the defaults left out)."""
        out: dict[str, Any] = {SERVER_ROUND_KEY: int(self.server_round)}
        if self.state_key is not None:
            out[STATE_KEY] = self.state_key
        if self.proximal_mu:
            out[PROXIMAL_MU_KEY] = float(self.proximal_mu)
        if self.fedmas_rule is not None:
            out[FEDMAS_RULE_KEY] = self.fedmas_rule
        if self.prompt_explore:
            out[PROMPT_EXPLORE_KEY] = 1
        if self.score_round is not None:
            out[SCORE_ROUND_KEY] = int(self.score_round)
        return out
