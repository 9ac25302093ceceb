"""The typed train instruction (fopro_kd/federation/wire.py): parsed once at the site's boundary."""

from __future__ import annotations

import math

import pytest

from fopro_kd.federation.wire import (
    FEDMAS_RULE_KEY,
    PROMPT_EXPLORE_KEY,
    PROXIMAL_MU_KEY,
    SCORE_ROUND_KEY,
    SERVER_ROUND_KEY,
    STATE_KEY,
    InstructionError,
    TrainInstruction,
)


def test_round_trip_and_defaults() -> None:
    full = TrainInstruction(server_round=7, state_key="run-abc", proximal_mu=0.01, fedmas_rule="mas_inv",
                            prompt_explore=True, score_round=6)
    assert TrainInstruction.from_config(full.to_config()) == full
    assert full.to_config() == {SERVER_ROUND_KEY: 7, STATE_KEY: "run-abc", PROXIMAL_MU_KEY: 0.01,
                                FEDMAS_RULE_KEY: "mas_inv", PROMPT_EXPLORE_KEY: 1, SCORE_ROUND_KEY: 6}
    assert TrainInstruction.from_config({}) == TrainInstruction()
    # unknown keys from a newer server are ignored; the server's own extra keys too
    assert TrainInstruction.from_config({SERVER_ROUND_KEY: 2, "num-rounds": 10}).server_round == 2


@pytest.mark.parametrize(("config", "message"), [
    ({SERVER_ROUND_KEY: -1}, "'server-round' must be an integer >= 0"),
    ({SERVER_ROUND_KEY: "3"}, "'server-round' must be an integer"),
    ({SERVER_ROUND_KEY: True}, "'server-round' must be an integer"),
    ({PROXIMAL_MU_KEY: "abc"}, "'proximal-mu' must be a finite number >= 0"),
    ({PROXIMAL_MU_KEY: -0.1}, "'proximal-mu' must be a finite number >= 0"),
    ({PROXIMAL_MU_KEY: math.inf}, "'proximal-mu' must be a finite number >= 0"),
    ({FEDMAS_RULE_KEY: "MAS"}, "'fedmas-rule' must be one of"),
    ({PROMPT_EXPLORE_KEY: 2}, "'prompt-explore' must be 0 or 1"),
    ({STATE_KEY: 5}, "'state-key' must be a string"),
    ({SERVER_ROUND_KEY: 3, SCORE_ROUND_KEY: 3}, "'score-round' must name an earlier round than 'server-round' 3"),
    ({SERVER_ROUND_KEY: 3, SCORE_ROUND_KEY: 0}, "'score-round' must be an integer >= 1"),
    ({SERVER_ROUND_KEY: 3, SCORE_ROUND_KEY: 1.5}, "'score-round' must be an integer"),
])
def test_bad_values_name_the_key(config, message) -> None:
    with pytest.raises(InstructionError, match=message):
        TrainInstruction.from_config(config)


# ---------------------------------------------------------------------------- one home for wire keys
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

import fopro_kd.federation.wire as wire  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIRE_VALUES = {v for k, v in vars(wire).items() if k.endswith("_KEY") and isinstance(v, str)} - {"prompt"}
"""``"prompt"`` (the shared prompt's ArrayRecord) is also an ordinary word of reports and configs: not scanned."""
STATE_FORMAT_FILES = {"client/state.py"}
"""The site's own state files use some of the same words as their own field names (not messages)."""


def wire_literals(source: str) -> list[tuple[int, str]]:
    """String constants in code (docstrings excluded) equal to a wire key's value."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in WIRE_VALUES
            and id(node) not in docstrings]


def test_the_wire_scan_finds_a_literal_key() -> None:
    assert wire_literals('x = record.get("site-id")\n') == [(1, "site-id")]
    assert wire_literals('"""mentions "site-id" in a docstring"""\n') == []


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for folder in ("client", "server")
                                        for p in (ROOT / folder).rglob("*.py")
                                        if str(p.relative_to(ROOT)) not in STATE_FORMAT_FILES))
def test_apps_spell_wire_keys_through_wire_py(path: str) -> None:
    """Every message, metric and node-config key the apps exchange is named through fopro_kd/federation/wire.py."""
    found = wire_literals((ROOT / path).read_text())
    if path == "client/client_app.py":  # the context.state record mirrors the state file's own field names
        found = [(line, v) for line, v in found if v != "site-id" or "state.site_id" not in
                 (ROOT / path).read_text().splitlines()[line - 1]]
    assert found == [], f"{path}: wire keys spelled as literals (use fopro_kd/federation/wire.py): {found}"
