"""Which images a federated node trains and tests on, rebuilt deterministically in every process.

Nothing here imports Flower: the simulation driver (``simulations/simulate.py``), the
ServerApp (its held-out splits) and the ClientApp call the same functions, so the class histograms printed before a simulation
are exactly the data the virtual hospitals train on.

Why rebuild instead of shipping data: in simulation, Ray actors must not receive pickled
datasets (memory, and a real hospital's images never travel); in deployment, each
hospital reads only its own folder. A node is described by a :class:`SiteSpec` read from
its node config; its data is derived from ``(config, spec)`` alone and cached once per
process (decoding images dominates the cost on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fopro_kd.config import Config, ConfigError
from fopro_kd.data import build_splits
from fopro_kd.data.dataset import DatasetSplits, ImageSet
from fopro_kd.data.partition import partition_indices, split_local_test
from fopro_kd.data.synthetic import SCANNER_STYLES, make_synthetic_imageset
from fopro_kd.seeding import local_test_seed, site_style_seed
from fopro_kd.federation.wire import (
    DATA_ROOT_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    RUN_CONFIG_FILE_KEY,
    RUN_CONFIG_OVERRIDES_KEY,
    SITE_ID_KEY,
    site_name,
)

logger = logging.getLogger("fopro_kd.federation")

__all__ = [
    "SiteData",
    "SiteDataError",
    "SitePlan",
    "SiteSpec",
    "cached_splits",
    "config_key",
    "load_site_data",
    "plan_sites",
    "site_spec_from_node_config",
]

# Node-config keys are read (converted once) here; their names live in fopro_kd/federation/wire.py.


class SiteDataError(ValueError):
    """A node's data cannot be located or is unusable; the message names the node and the field."""


@dataclass(frozen=True)
class SiteSpec:
    """Where one node's data comes from.

    Attributes
    ----------
    site_id : int
        Stable site number, reported to the server as metric ``"site-id"`` (plain int).
    partition_id, num_partitions : int or None
        Take partition ``partition_id`` of ``num_partitions`` of the dataset (simulation, or
        a test deployment where every node holds the same public data).
    data_root : str or None
        Overrides ``data.root`` for this node (a hospital's own image folder).
    node : str
        Human-readable node description for error messages.
    """

    site_id: int
    partition_id: int | None = None
    num_partitions: int | None = None
    data_root: str | None = None
    node: str = "node"


@dataclass
class SitePlan:
    """Index-level plan of one simulated site (train / local test indices into the train split)."""

    site_id: int
    train_indices: np.ndarray
    test_indices: np.ndarray
    style: str | None = None


@dataclass
class SiteData:
    """One site's training set and local test split (never leaves the node)."""

    site_id: int
    train: ImageSet
    local_test: ImageSet
    style: str | None = None

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    def class_counts(self) -> np.ndarray:
        return self.train.class_counts()


def config_key(cfg: Config) -> str:
    """Stable hash of the data-defining part of a config (cache key across calls in one process)."""
    relevant = {
        "seed": cfg.seed,
        "data": cfg.to_dict()["data"],
        "split": cfg.to_dict()["split"],
        "partition": cfg.to_dict()["federation"]["partition"],
        "num_clients": cfg.federation.num_clients,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


_SPLITS: dict[str, DatasetSplits] = {}
_SITES: dict[tuple[str, SiteSpec], SiteData] = {}
_LOCK = threading.Lock()


def cached_splits(cfg: Config) -> DatasetSplits:
    """``build_splits(cfg)`` once per process and config (decoding is the expensive part)."""
    key = config_key(cfg)
    with _LOCK:
        if key not in _SPLITS:
            _SPLITS[key] = build_splits(cfg)
        return _SPLITS[key]


def clear_caches() -> None:
    """Forget cached splits and site data (tests)."""
    with _LOCK:
        _SPLITS.clear()
        _SITES.clear()


# --------------------------------------------------------------------------- node config


def _int_field(node_config: Mapping[str, Any], key: str, node: str) -> int | None:
    if key not in node_config:
        return None
    value = node_config[key]
    if isinstance(value, bool):
        raise SiteDataError(f"{node}: node config '{key}' must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SiteDataError(f"{node}: node config '{key}' must be an integer, got {value!r}") from None


def site_spec_from_node_config(node_config: Mapping[str, Any], node_id: int | None = None) -> SiteSpec:
    """Read a node's :class:`SiteSpec` from its Flower node config.

    Keys: ``partition-id`` / ``num-partitions`` (set by the simulation engine, or by hand in a
    test deployment), ``site-id`` (an integer naming the hospital; defaults to the partition
    id) and ``data-root`` (this hospital's image folder, overriding ``data.root``).
    """
    node = f"node {node_id}" if node_id is not None else "node"
    partition_id = _int_field(node_config, PARTITION_ID_KEY, node)
    num_partitions = _int_field(node_config, NUM_PARTITIONS_KEY, node)
    site_id = _int_field(node_config, SITE_ID_KEY, node)
    if (partition_id is None) != (num_partitions is None):
        raise SiteDataError(
            f"{node}: node config needs both '{PARTITION_ID_KEY}' and '{NUM_PARTITIONS_KEY}' or neither, "
            f"got {dict(node_config)}"
        )
    if partition_id is not None and not 0 <= partition_id < num_partitions:  # type: ignore[operator]
        raise SiteDataError(
            f"{node}: '{PARTITION_ID_KEY}'={partition_id} is outside [0, {num_partitions})"
        )
    if site_id is None:
        if partition_id is None:
            raise SiteDataError(
                f"{node}: node config has neither '{SITE_ID_KEY}' nor '{PARTITION_ID_KEY}'; start the SuperNode with "
                f"--node-config \"{SITE_ID_KEY}=<int> {DATA_ROOT_KEY}=/path/to/images\""
            )
        site_id = partition_id
    root = node_config.get(DATA_ROOT_KEY)
    root = str(root) if root not in (None, "") else None
    label = f"{node} ({site_name(site_id)})"
    return SiteSpec(site_id=site_id, partition_id=partition_id, num_partitions=num_partitions, data_root=root,
                    node=label)


# --------------------------------------------------------------------------- planning


def _check_styles(cfg: Config) -> list[str]:
    styles = list(cfg.federation.partition.site_styles)
    if not styles:
        return []
    if cfg.data.kind != "synthetic":
        raise ConfigError(
            f"'federation.partition.site_styles' is set ({styles}) but data.kind is {cfg.data.kind!r}: scanner "
            "styles only exist for synthetic data; remove site_styles"
        )
    unknown = [s for s in styles if s not in SCANNER_STYLES]
    if unknown:
        raise ConfigError(
            f"'federation.partition.site_styles' has unknown styles {unknown}; valid: {sorted(SCANNER_STYLES)}"
        )
    return styles


def plan_sites(cfg: Config, splits: DatasetSplits, num_sites: int | None = None) -> list[SitePlan]:
    """Partition the training split into sites and cut each site's local test split.

    Site ``k`` is partition ``k`` of :func:`~fopro_kd.data.partition.partition_indices` with
    ``seed = cfg.seed``; styles (synthetic only) are cycled over the sites.
    """
    num_sites = num_sites or cfg.federation.num_clients
    styles = _check_styles(cfg)
    labels = splits.train.labels.numpy()
    parts = partition_indices(labels, num_sites, cfg.federation.partition, seed=int(cfg.seed),
                              sites=splits.train.sites)
    plans = []
    for k, idx in enumerate(parts):
        train_idx, test_idx = split_local_test(
            idx, labels, cfg.federation.partition.local_test_fraction, seed=local_test_seed(cfg.seed, k)
        )
        plans.append(SitePlan(k, train_idx, test_idx, styles[k % len(styles)] if styles else None))
    return plans


def _restyle(data: ImageSet, cfg: Config, site_id: int, style: str, part: str) -> ImageSet:
    """Regenerate a synthetic site set with the same class counts under the site's scanner style."""
    seed = site_style_seed(cfg.data.synthetic_seed, site_id, part)
    return make_synthetic_imageset(
        data.class_counts().tolist(), cfg.data.image_size, seed=seed, domain="hospital", style=style,
        class_names=data.class_names, id_prefix=f"site{site_id}-{part}",
    )


def _materialise(cfg: Config, splits: DatasetSplits, plan: SitePlan) -> SiteData:
    train = splits.train.subset(plan.train_indices)
    test = splits.train.subset(plan.test_indices)
    if plan.style is not None:
        train = _restyle(train, cfg, plan.site_id, plan.style, "train")
        test = _restyle(test, cfg, plan.site_id, plan.style, "test")
    return SiteData(plan.site_id, train, test, plan.style)


def _node_config_with_root(cfg: Config, spec: SiteSpec) -> Config:
    if spec.data_root is None:
        return cfg
    root = Path(spec.data_root).expanduser()
    if not root.exists():
        raise SiteDataError(
            f"{spec.node}: data root {root} (node config '{DATA_ROOT_KEY}') does not exist on this machine"
        )
    return replace(cfg, data=replace(cfg.data, root=str(root)))


def _load_uncached(cfg: Config, spec: SiteSpec) -> SiteData:
    local_cfg = _node_config_with_root(cfg, spec)
    try:
        splits = cached_splits(local_cfg)
    except (FileNotFoundError, ConfigError) as exc:
        raise SiteDataError(f"{spec.node}: cannot read its data ({exc})") from exc
    if spec.partition_id is not None:
        plans = plan_sites(local_cfg, splits, spec.num_partitions)
        return replace(_materialise(local_cfg, splits, plans[spec.partition_id]), site_id=spec.site_id)
    # A hospital with its own folder: its whole training split trains, its test split is the local test.
    return SiteData(spec.site_id, splits.train, splits.test, None)


def load_site_data(cfg: Config, spec: SiteSpec) -> SiteData:
    """The site's data, built once per process for ``(config, spec)``."""
    key = (config_key(cfg), spec)
    with _LOCK:
        cached = _SITES.get(key)
    if cached is not None:
        return cached
    data = _load_uncached(cfg, spec)
    logger.info(
        "%s: %d training images %s, %d local test images%s", spec.node, len(data.train),
        data.class_counts().tolist(), len(data.local_test), f", style {data.style}" if data.style else "",
    )
    with _LOCK:
        _SITES[key] = data
    return data


# --------------------------------------------------------------------------- run config



_CONFIGS: dict[tuple[str, tuple[str, ...]], Config] = {}


def config_from_run_config(run_config: Mapping[str, Any]) -> Config:
    """The full fopro-kd config of a ``flwr run``: ``config-file`` + ``overrides``.

    ``config-file`` is either an absolute path (it must then exist on the server *and* on
    every SuperNode) or a path relative to the app's root, e.g. ``configs/sim-demo.yaml``:
    the YAML files travel inside the FAB, so a relative path names the same file on every
    node. ``overrides`` is one string of ``section.key=value`` items separated by spaces
    (shell quoting allowed), e.g. ``"federation.num_rounds=2 train.batch_size=8"``.
    """
    import shlex

    from fopro_kd.config import load_config

    path = str(run_config.get(RUN_CONFIG_FILE_KEY, "") or "")
    if not path:
        raise ConfigError(
            f"run config '{RUN_CONFIG_FILE_KEY}' is empty: pass --run-config \"{RUN_CONFIG_FILE_KEY}='/abs/path/cfg.yaml'\" "
            f"or a path inside the app such as '{RUN_CONFIG_FILE_KEY}=\"configs/sim-demo.yaml\"'"
        )
    if not Path(path).is_absolute():
        app_root = Path(__file__).resolve().parents[2]  # <app>/fopro_kd/federation/sites.py
        resolved = app_root / path
        if not resolved.is_file():
            raise ConfigError(
                f"run config '{RUN_CONFIG_FILE_KEY}' {path!r} is relative, but the app (installed at {app_root}) has no "
                "such file; give an absolute path that exists on every node, or a YAML shipped in the app"
            )
        path = str(resolved)
    overrides = tuple(shlex.split(str(run_config.get(RUN_CONFIG_OVERRIDES_KEY, "") or "")))
    key = (path, overrides)
    if key not in _CONFIGS:
        _CONFIGS[key] = load_config(path, list(overrides))
    return _CONFIGS[key]
