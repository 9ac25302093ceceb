"""A hospital's own rules for what may run on its data, enforced on its node whatever the run config says.

In a federation the run config (method, strategy, privacy, data paths) comes from whoever
submits the run. A hospital that joins must be able to say "only with local DP at ε ≤ 8,
no class counts leave, at most 50 rounds, only these folders": the SuperNode names a policy
file the hospital owns in its node config (``policy-file=/etc/fopro/site-policy.yaml``), and
the ClientApp checks every instruction against it *before any data is read*, replying with
an error that names the violated rule (docs/federation.md §4.4). Nothing here imports
Flower: the check is a function of a validated :class:`~fopro_kd.config.Config`.

Every field is optional; an absent field allows anything. Example::

    # /etc/fopro/site-policy.yaml (owned by the hospital, not by the federation)
    allowed_methods: [ekd, fopro-kd]
    allowed_strategies: [fedavg, fedprox, median, trimmed_mean]
    min_privacy: local          # off < central < local (only local DP protects against the server)
    max_epsilon: 8.0            # local DP: privacy.target_epsilon must be set and at most this
    class_counts_may_leave: false
    federated_evaluation: false # no per-class test counts: evaluate instructions refused, none sent with train replies
    max_rounds: 50
    data_paths: [/data/ham10000, /opt/fopro/weights]   # every file the run makes the site read lies below one
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fopro_kd.config import Config

__all__ = ["PRIVACY_ORDER", "SitePolicy", "SitePolicyError", "SitePolicyViolation", "check_site_policy",
           "load_site_policy"]

PRIVACY_ORDER = {"off": 0, "central": 1, "local": 2}
"""``min_privacy``: weakest to strongest protection of the site's data against the other participants."""


class SitePolicyError(ValueError):
    """The policy file itself is unusable (missing, not YAML, unknown or ill-typed field): the site refuses to run."""


class SitePolicyViolation(ValueError):
    """The run asks for something the site's policy forbids; the message names the policy file and the rule."""


@dataclass(frozen=True)
class SitePolicy:
    """The rules of one site (see the module docstring); ``None`` / empty = no restriction."""

    source: str = "<policy>"
    allowed_methods: tuple[str, ...] | None = None
    allowed_strategies: tuple[str, ...] | None = None
    min_privacy: str = "off"
    max_epsilon: float | None = None
    class_counts_may_leave: bool = True
    federated_evaluation: bool = True
    max_rounds: int | None = None
    data_paths: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_LISTS = ("allowed_methods", "allowed_strategies", "data_paths")


def load_site_policy(path: str | os.PathLike[str]) -> SitePolicy:
    """Read and validate a policy file; :class:`SitePolicyError` naming the file and field on any problem."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SitePolicyError(f"site policy {where}: cannot be read ({exc.strerror or exc}); the site refuses to run "
                              "without its policy") from exc
    except yaml.YAMLError as exc:
        raise SitePolicyError(f"site policy {where}: not valid YAML ({exc})") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SitePolicyError(f"site policy {where}: expected a mapping of rules, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(SitePolicy)} - {"source", "extra"}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise SitePolicyError(f"site policy {where}: unknown field(s) {unknown}; valid: {sorted(names)}")
    values: dict[str, Any] = {"source": where}
    for key, value in raw.items():
        if key in _LISTS:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise SitePolicyError(f"site policy {where}: '{key}' must be a list of names/paths, got {value!r}")
            values[key] = tuple(value)
        elif key == "min_privacy":
            if value not in PRIVACY_ORDER:
                raise SitePolicyError(f"site policy {where}: 'min_privacy' must be one of {list(PRIVACY_ORDER)}, "
                                      f"got {value!r}")
            values[key] = value
        elif key in ("class_counts_may_leave", "federated_evaluation"):
            if not isinstance(value, bool):
                raise SitePolicyError(f"site policy {where}: '{key}' must be true or false, got {value!r}")
            values[key] = value
        elif key == "max_epsilon":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise SitePolicyError(f"site policy {where}: 'max_epsilon' must be a number > 0, got {value!r}")
            values[key] = float(value)
        elif key == "max_rounds":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SitePolicyError(f"site policy {where}: 'max_rounds' must be an integer >= 1, got {value!r}")
            values[key] = value
    return SitePolicy(**values)


def _within(path: str, roots: Iterable[str]) -> bool:
    resolved = Path(path).expanduser().resolve()
    for root in roots:
        base = Path(root).expanduser().resolve()
        if resolved == base or base in resolved.parents:
            return True
    return False


def files_read(cfg: Config, data_root: str | None = None) -> list[tuple[str, str]]:
    """(config field, path) of every local file or folder the run config makes a site read."""
    d = cfg.data
    paths = [("node data-root" if data_root else "data.root", data_root or d.root)]
    paths += [(f"data.{name}", getattr(d, name)) for name in ("metadata_csv", "train_csv", "val_csv", "test_csv",
                                                               "npz_file", "split_file")]
    if cfg.teacher.source == "file":
        paths.append(("teacher.file", cfg.teacher.file))
    return [(name, str(p)) for name, p in paths if p]


def check_site_policy(
    cfg: Config, policy: SitePolicy, *, kind: str = "train", shares_class_counts: bool = False,
    data_root: str | None = None,
) -> None:
    """Raise :class:`SitePolicyViolation` naming the first rule of ``policy`` that ``cfg`` breaks.

    ``kind``: ``"train"`` or ``"evaluate"`` (the instruction being answered);
    ``shares_class_counts``: whether this run sends per-class counts (the client decides it
    from the strategy); ``data_root``: the node's own ``data-root`` when it overrides ``data.root``.
    """
    def violated(rule: str, detail: str) -> SitePolicyViolation:
        return SitePolicyViolation(f"site policy {policy.source}: rule '{rule}' forbids this run: {detail}")

    if kind == "evaluate" and not policy.federated_evaluation:
        raise violated("federated_evaluation", "this site does not send evaluation counts of its local test split")
    if policy.allowed_methods is not None and cfg.train.method not in policy.allowed_methods:
        raise violated("allowed_methods", f"train.method is {cfg.train.method!r}, allowed {list(policy.allowed_methods)}")
    if policy.allowed_strategies is not None and cfg.federation.strategy not in policy.allowed_strategies:
        raise violated("allowed_strategies",
                       f"federation.strategy is {cfg.federation.strategy!r}, allowed {list(policy.allowed_strategies)}")
    mode = cfg.privacy.mode
    if PRIVACY_ORDER[mode] < PRIVACY_ORDER[policy.min_privacy]:
        raise violated("min_privacy", f"privacy.mode is {mode!r}, this site requires at least {policy.min_privacy!r}")
    if policy.max_epsilon is not None and mode == "local":
        eps = cfg.privacy.target_epsilon
        if eps is None:
            raise violated("max_epsilon", f"privacy.target_epsilon is not set (only a noise multiplier); this site "
                                          f"requires a budget of at most {policy.max_epsilon:g}")
        if eps > policy.max_epsilon:
            raise violated("max_epsilon", f"privacy.target_epsilon is {eps:g} > {policy.max_epsilon:g}")
    if not policy.class_counts_may_leave and shares_class_counts:
        raise violated("class_counts_may_leave",
                       f"the run sends per-class counts (federation.strategy {cfg.federation.strategy!r}, "
                       f"federation.share_class_counts {cfg.federation.share_class_counts!r})")
    if policy.max_rounds is not None and cfg.federation.num_rounds > policy.max_rounds:
        raise violated("max_rounds", f"federation.num_rounds is {cfg.federation.num_rounds} > {policy.max_rounds}")
    if policy.data_paths is not None:
        for name, path in files_read(cfg, data_root):
            if not _within(path, policy.data_paths):
                raise violated("data_paths", f"{name} {path!r} is outside {list(policy.data_paths)}")
