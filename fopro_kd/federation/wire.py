"""Every key the apps exchange: message records and metrics, node config, run config (one home each).

A key written twice drifts; a typo in one app is a silent protocol break. Both apps import
the names below (kebab-case strings, as Flower's records and configs use them).
"""

from __future__ import annotations

__all__ = [
    "CLASS_COUNTS_KEY", "DATA_ROOT_KEY", "DECLINE_RECORD_KEY", "DP_BUDGET_MARKER", "DP_DECLINE_KEY",
    "FEDMAS_RULE_KEY", "NUM_EXAMPLES_KEY", "NUM_PARTITIONS_KEY", "PARTITION_ID_KEY", "POLICY_FILE_KEY",
    "PROMPT_ARRAYS_KEY", "PROMPT_EXPLORE_KEY", "PROXIMAL_MU_KEY", "ROBUST_FACTOR_KEY", "RUN_CONFIG_FILE_KEY",
    "RUN_CONFIG_OUT_DIR_KEY", "RUN_CONFIG_OVERRIDES_KEY", "RUN_CONFIG_RESUME_DIR_KEY", "SERVER_ROUND_KEY",
    "SITE_ID_KEY", "STATE_DIR_KEY", "STATE_KEY", "site_name",
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

# --- replies (site -> server), MetricRecord "metrics"
NUM_EXAMPLES_KEY = "num-examples"
CLASS_COUNTS_KEY = "class-counts"
ROBUST_FACTOR_KEY = "robust-factor"
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
