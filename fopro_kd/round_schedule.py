"""Which federated rounds evaluate and which persist state: one rule, read by the server and the clients.

The server and every simulated hospital must agree on the rounds whose state reaches disk:
the server's checkpoint of round k is only useful for a resume if each site's state of round
k was written too (``client/state.py``). Keeping the rule here, in the library, means neither
app computes it on its own (``federation.state_persist_every``, ``federation.evaluate_every``).
"""

from __future__ import annotations

from fopro_kd.config import Config

__all__ = ["evaluates_round", "federated_evaluate_phase", "persists_round", "scored_in_train"]


def _scheduled(server_round: int, every: int, num_rounds: int) -> bool:
    """Every ``every``-th round, plus round 0 (the initial model) and the last round."""
    return server_round <= 0 or server_round % max(1, int(every)) == 0 or server_round >= num_rounds


def persists_round(cfg: Config, server_round: int) -> bool:
    """Whether round ``server_round``'s client states and server checkpoint are written to disk.

    Every ``federation.state_persist_every``-th round and the last one (round 0 = the initial
    model's checkpoint). A run killed in between resumes from the newest persisted round.
    """
    return _scheduled(server_round, cfg.federation.state_persist_every, cfg.federation.num_rounds)


def evaluates_round(cfg: Config, server_round: int) -> bool:
    """Whether round ``server_round`` is scored: server validation (test too with ``test_every_round``)
    and federated evaluation; every ``federation.evaluate_every``-th round, round 0 and the last."""
    return _scheduled(server_round, cfg.federation.evaluate_every, cfg.federation.num_rounds)


def scored_in_train(cfg: Config, server_round: int) -> int | None:
    """The round whose global model the sites score in round ``server_round``'s train call, or None.

    ``federation.evaluate_in_train``: the global model a site receives in round r is the one
    the server aggregated in round r - 1, so the site can score it on its local test split
    before training and send the counts with its update, instead of a separate evaluate
    round trip (one message with the whole model per site) after round r - 1. Scheduled
    rounds before the last are scored this way; the last has no later train call and keeps
    its evaluate phase (:func:`federated_evaluate_phase`).
    """
    scored = int(server_round) - 1
    if not cfg.federation.evaluate_in_train or scored < 1 or scored >= cfg.federation.num_rounds:
        return None
    return scored if evaluates_round(cfg, scored) else None


def federated_evaluate_phase(cfg: Config, server_round: int) -> bool:
    """Whether round ``server_round`` ends with Flower's federated-evaluate phase (messages to the sites).

    Every scheduled round (:func:`evaluates_round`), except those scored in the next round's
    train call (:func:`scored_in_train`): with ``federation.evaluate_in_train`` only the last.
    """
    if not evaluates_round(cfg, server_round):
        return False
    return not cfg.federation.evaluate_in_train or server_round >= cfg.federation.num_rounds
