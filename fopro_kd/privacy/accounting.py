"""Privacy accounting with Opacus' accountants: ε of a history, budget checks, noise derivation.

A *history* is Opacus' own format, a list of ``(noise_multiplier, sample_rate, steps)``
events composed by the accountant (RDP or PRV). Everything the project releases under the
hospital's budget is an event of that history:

* one DP-SGD step on a Poisson-sampled batch: ``(σ_eff, q, 1)``; when r Gaussian releases
  of sensitivity C are made from the same batch (the student step and, with
  ``privacy.prompt: dp``, the prompt step), they form one Gaussian mechanism of joint
  sensitivity √r·C, i.e. ``σ_eff = σ / √r`` (docs/privacy.md);
* one release of a statistic by the Gaussian mechanism (every example counted once, no
  subsampling): ``(σ_stat, 1.0, 1)``.

The accountant's ``state_dict()`` (``{"history": [...], "mechanism": "rdp"}``) is plain
JSON; it persists on the client between rounds, so ε composes over the whole federation. In the
federation the authoritative copy is the site's append-only privacy ledger
(:mod:`fopro_kd.privacy.ledger`), which no reload of the model state rolls back.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Event",
    "PrivacyBudgetExhausted",
    "budget_reason",
    "derive_noise_multiplier",
    "epsilon_of_history",
    "make_accountant",
    "normalise_history",
    "would_exceed_budget",
]

Event = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``, as in Opacus' accountant history."""

ACCOUNTANTS = ("rdp", "prv")
MAX_SIGMA = 1e4


class PrivacyBudgetExhausted(RuntimeError):
    """Training (or a statistics release) would take the hospital's ε above its target."""


def make_accountant(mechanism: str = "rdp", state: Mapping[str, Any] | None = None):
    """A fresh Opacus accountant (``"rdp"`` or ``"prv"``), optionally restored from ``state``."""
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant must be one of {list(ACCOUNTANTS)}, got {mechanism!r}")
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=mechanism)
    if state:
        loaded = dict(state)
        if loaded.get("mechanism", mechanism) != mechanism:
            raise ValueError(
                f"the stored privacy accountant used {loaded.get('mechanism')!r} but privacy.accountant is "
                f"{mechanism!r}; epsilon cannot be composed across accountants (keep the setting for the whole federation)"
            )
        accountant.load_state_dict({"history": normalise_history(loaded.get("history", [])), "mechanism": mechanism})
    return accountant


def normalise_history(history: Iterable[Sequence[float]] | None) -> list[Event]:
    """History as a list of ``(float σ, float q, int steps)`` tuples (JSON turns tuples into lists)."""
    events: list[Event] = []
    for event in history or []:
        if len(event) != 3:
            raise ValueError(f"privacy history events are (noise_multiplier, sample_rate, steps), got {event!r}")
        sigma, q, steps = float(event[0]), float(event[1]), int(event[2])
        if not (sigma > 0 and 0 < q <= 1 and steps >= 0):
            raise ValueError(f"invalid privacy history event {event!r}")
        if steps > 0:
            events.append((sigma, q, steps))
    return events


def epsilon_of_history(history: Iterable[Sequence[float]] | None, delta: float, mechanism: str = "rdp") -> float:
    """ε spent by ``history`` at ``delta`` (0 for an empty history)."""
    events = normalise_history(history)
    if not events:
        return 0.0
    return _epsilon(tuple(events), float(delta), mechanism)


@functools.lru_cache(maxsize=2048)
def _rdp_per_step(q: float, sigma: float) -> tuple[float, ...]:
    """RDP curve of one subsampled-Gaussian step at Opacus' default orders (linear in the steps)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    return tuple(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


@functools.lru_cache(maxsize=512)
def _epsilon(events: tuple[Event, ...], delta: float, mechanism: str) -> float:
    if mechanism == "rdp":
        # the same arithmetic as RDPAccountant.get_privacy_spent, with the per-step curves cached
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as rdp_analysis

        rdp = sum([np.array(_rdp_per_step(q, sigma)) * steps for sigma, q, steps in events])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha" for very small ε
            eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    accountant = make_accountant(mechanism)
    accountant.history = list(events)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # PRV at q = 1 takes log(0) on a branch it then discards; RDP warns when the best order is the largest
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def _state_history(accountant_state: Mapping[str, Any] | None) -> tuple[list[Event], str | None]:
    if not accountant_state:
        return [], None
    return normalise_history(accountant_state.get("history", [])), accountant_state.get("mechanism")


def budget_reason(
    accountant_state: Mapping[str, Any] | None,
    planned_steps: int,
    sample_rate: float,
    noise_multiplier: float,
    delta: float,
    target_epsilon: float | None,
    *,
    extra_events: Iterable[Sequence[float]] = (),
    mechanism: str | None = None,
) -> str | None:
    """Why the next round must not run (a sentence naming ε and the target), or None when it fits.

    ``planned_steps`` DP-SGD steps at ``(noise_multiplier, sample_rate)`` plus ``extra_events``
    (e.g. statistics releases ``(σ_stat, 1.0, 1)``) are composed with the stored history.
    No target (``None``) never blocks.
    """
    if target_epsilon is None:
        return None
    history, stored = _state_history(accountant_state)
    mechanism = mechanism or stored or "rdp"
    extra = normalise_history(extra_events)
    planned = [(float(noise_multiplier), float(sample_rate), int(planned_steps))] if planned_steps > 0 else []
    after_events = history + planned + extra
    spent = epsilon_of_history(history, delta, mechanism)
    after = epsilon_of_history(after_events, delta, mechanism)
    if after <= target_epsilon * (1 + 1e-9):  # float slack: the same events split differently
        return None
    return (
        f"privacy budget exhausted: epsilon spent so far is {spent:.4f}; the next round ({int(planned_steps)} DP-SGD "
        f"steps at noise multiplier {float(noise_multiplier):.4g}, sample rate {float(sample_rate):.4g}"
        + (f", plus {sum(e[2] for e in extra)} statistics release(s)" if extra else "")
        + f") would raise epsilon to {after:.4f}, above the target epsilon {target_epsilon:g} (delta {delta:g}, "
        f"{mechanism} accountant); this hospital declines to train"
    )


def would_exceed_budget(
    accountant_state: Mapping[str, Any] | None,
    planned_steps: int,
    sample_rate: float,
    noise_multiplier: float,
    delta: float,
    target_epsilon: float | None,
    *,
    extra_events: Iterable[Sequence[float]] = (),
    mechanism: str | None = None,
) -> bool:
    """True when the stored history plus the planned round would spend more than ``target_epsilon``."""
    return budget_reason(
        accountant_state, planned_steps, sample_rate, noise_multiplier, delta, target_epsilon,
        extra_events=extra_events, mechanism=mechanism,
    ) is not None


def derive_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str = "rdp",
    *,
    extra_events: Iterable[Sequence[float]] = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest σ (to ``tolerance`` in ε) such that ``steps`` steps at ``(σ, q)`` plus ``extra_events`` spend ≤ target.

    The same bisection as ``opacus.accountants.utils.get_noise_multiplier``, extended with the
    fixed extra events (statistics releases) that share the budget. The returned σ always
    satisfies ε ≤ ``target_epsilon`` (it is the upper end of the bracket).

    Raises
    ------
    PrivacyBudgetExhausted
        The extra events alone exceed the target, or no σ ≤ 1e4 meets it.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    extra = tuple(normalise_history(extra_events))
    return _derive(float(target_epsilon), float(delta), float(sample_rate), int(steps), mechanism, extra, float(tolerance))


@functools.lru_cache(maxsize=64)
def _derive(target: float, delta: float, q: float, steps: int, mechanism: str, extra: tuple[Event, ...], tol: float) -> float:
    if extra and epsilon_of_history(list(extra), delta, mechanism) >= target:
        raise PrivacyBudgetExhausted(
            f"the statistics releases alone spend epsilon {epsilon_of_history(list(extra), delta, mechanism):.4f} >= "
            f"target epsilon {target:g}; raise privacy.statistics_noise_multiplier, use privacy.statistics: withheld, "
            "or raise the target"
        )

    def eps(sigma: float) -> float:
        return epsilon_of_history([*extra, (sigma, q, steps)], delta, mechanism)

    low, high = 0.0, 1.0
    eps_high = eps(high)
    while eps_high > target:
        low, high = high, 2 * high
        if high > MAX_SIGMA:
            raise PrivacyBudgetExhausted(
                f"no noise multiplier <= {MAX_SIGMA:g} reaches target epsilon {target:g} over {steps} steps "
                f"at sample rate {q:.4g}"
            )
        eps_high = eps(high)
    while target - eps_high > tol and high - low > 1e-6:
        mid = 0.5 * (low + high)
        e = eps(mid)
        if e <= target:
            high, eps_high = mid, e
        else:
            low = mid
    return high


def sample_rate_for(num_examples: int, batch_size: int) -> tuple[float, int]:
    """(q, steps per epoch) of Poisson sampling with expected batch ``≈ batch_size``, as Opacus does.

    Opacus' DPDataLoader keeps the number of batches of the original loader,
    ``⌈N / B⌉``, and samples each example with ``q = 1 / ⌈N / B⌉`` at each step.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = max(1, math.ceil(num_examples / batch_size))
    return 1.0 / steps, steps
