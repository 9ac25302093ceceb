"""The typed train instruction (fopro_kd/federation/wire.py): parsed once at the site's boundary."""

from __future__ import annotations

import math

import pytest

from fopro_kd.federation.wire import (
    FEDMAS_RULE_KEY,
    PROMPT_EXPLORE_KEY,
    PROXIMAL_MU_KEY,
    SERVER_ROUND_KEY,
    STATE_KEY,
    InstructionError,
    TrainInstruction,
)


def test_round_trip_and_defaults() -> None:
    full = TrainInstruction(server_round=7, state_key="run-abc", proximal_mu=0.01, fedmas_rule="mas_inv",
                            prompt_explore=True)
    assert TrainInstruction.from_config(full.to_config()) == full
    assert full.to_config() == {SERVER_ROUND_KEY: 7, STATE_KEY: "run-abc", PROXIMAL_MU_KEY: 0.01,
                                FEDMAS_RULE_KEY: "mas_inv", PROMPT_EXPLORE_KEY: 1}
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
])
def test_bad_values_name_the_key(config, message) -> None:
    with pytest.raises(InstructionError, match=message):
        TrainInstruction.from_config(config)
