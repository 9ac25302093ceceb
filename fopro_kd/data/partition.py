"""Split one labelled dataset into virtual hospitals (simulation only; pure numpy).

Every partitioner returns one sorted ``int64`` index array per site; the arrays are
disjoint, and the result depends only on ``(labels, num_sites, cfg, seed, sites)``.

Kinds (``PartitionConfig.kind``):

``iid``
    A random permutation cut into K near-equal parts (covers all samples).
``dirichlet``
    Label skew (Hsu et al., 2019, arXiv:1909.06335): for each class c a share vector
    q_c ~ Dir(α·1_K) splits that class's samples between sites. Small α: few classes per
    site; large α: close to iid. Draws are repeated (same generator, so deterministic)
    until every site holds at least ``min(min_per_site, N // K)`` samples; after 100 draws
    the largest sites donate samples to the small ones. Covers all samples.
``quantity``
    Quantity skew: site sizes ∝ exp(z_k), z_k ~ N(0, σ²) (σ = ``quantity_sigma``), each site
    at least ``min(min_per_site, N // K)``; labels iid. Covers all samples.
``imbalance``
    Each site takes an iid share, then keeps a long-tailed subsample with its own
    imbalance factor IF_k (``site_imbalance_factors``, one per site): with classes ranked
    by global frequency (rank i = 0 most frequent, ties by label) and a_{k,i} the site's
    available samples of rank i, it keeps
    n_{k,i} = min(a_{k,i}, max(1, ⌊a_{k,0} · IF_k^{−i/(C−1)}⌋)) (0 when a_{k,i} = 0).
    Dropped samples belong to no site.
``site_column``
    One site per distinct value of ``sites`` (e.g. the acquiring hospital column), in
    sorted order of the values; their number must equal K. Covers all samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from fopro_kd.config import PartitionConfig

__all__ = [
    "PARTITIONERS",
    "list_partitioners",
    "partition_indices",
    "site_column_values",
    "site_histograms",
    "split_local_test",
]

logger = logging.getLogger(__name__)

_MAX_DIRICHLET_DRAWS = 100


# --------------------------------------------------------------------------- helpers


def _check_labels(labels: Any) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class ids, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.equal(np.mod(y, 1), 0)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {int(y.min())}")
    return y.astype(np.int64, copy=False)


def _min_size(cfg: PartitionConfig, n: int, k: int) -> int:
    return max(0, min(int(cfg.min_per_site), n // k))


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _split_by_sizes(perm: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(perm, np.cumsum(sizes)[:-1])


def _sizes_from_proportions(n: int, proportions: np.ndarray, minimum: int) -> np.ndarray:
    """Integer sizes summing to n, each >= minimum, the rest split by largest remainder."""
    k = len(proportions)
    free = n - minimum * k
    raw = proportions / proportions.sum() * free
    sizes = np.floor(raw).astype(np.int64)
    remainder = free - int(sizes.sum())
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[:remainder]] += 1
    return sizes + minimum


# --------------------------------------------------------------------------- partitioners


def _iid(y: np.ndarray, k: int, cfg: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(len(y)), k)


def _dirichlet_draw(y: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[list[np.ndarray]]:
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        q = rng.dirichlet(np.full(k, alpha))
        cuts = (np.cumsum(q)[:-1] * len(idx)).astype(np.int64)
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].append(chunk)
    return parts


def _dirichlet(y: np.ndarray, k: int, cfg: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    if not cfg.alpha > 0:
        raise ValueError(f"partition.alpha must be > 0 for kind 'dirichlet', got {cfg.alpha!r}")
    minimum = _min_size(cfg, len(y), k)
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in _dirichlet_draw(y, k, cfg.alpha, rng)]
        if min(len(p) for p in parts) >= minimum:
            return parts
    logger.warning(
        "dirichlet partition (alpha=%s, %d sites): no draw in %d gave every site >= %d samples; "
        "moving samples from the largest sites",
        cfg.alpha, k, _MAX_DIRICHLET_DRAWS, minimum,
    )
    parts = [rng.permutation(p) for p in parts]
    for site in range(k):
        while len(parts[site]) < minimum:
            donor = int(np.argmax([len(p) for p in parts]))
            take = min(minimum - len(parts[site]), len(parts[donor]) - minimum)
            parts[site] = np.concatenate([parts[site], parts[donor][:take]])
            parts[donor] = parts[donor][take:]
    return parts


def _quantity(y: np.ndarray, k: int, cfg: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    if not cfg.quantity_sigma >= 0:
        raise ValueError(f"partition.quantity_sigma must be >= 0, got {cfg.quantity_sigma!r}")
    proportions = rng.lognormal(mean=0.0, sigma=cfg.quantity_sigma, size=k)
    sizes = _sizes_from_proportions(len(y), proportions, _min_size(cfg, len(y), k))
    return _split_by_sizes(rng.permutation(len(y)), sizes)


def _imbalance(y: np.ndarray, k: int, cfg: PartitionConfig, rng: np.random.Generator) -> list[np.ndarray]:
    factors = list(cfg.site_imbalance_factors)
    if len(factors) != k:
        raise ValueError(
            f"partition kind 'imbalance' needs one factor per site in partition.site_imbalance_factors: "
            f"got {len(factors)} for {k} sites"
        )
    for f in factors:
        if not f >= 1:
            raise ValueError(f"partition.site_imbalance_factors are n_max / n_min and must be >= 1, got {f!r}")
    classes, counts = np.unique(y, return_counts=True)
    ranked = classes[np.lexsort((classes, -counts))]  # most frequent first, ties by label
    num = len(ranked)
    parts = []
    for share, factor in zip(np.array_split(rng.permutation(len(y)), k), factors):
        by_class = [share[y[share] == c] for c in ranked]
        head = len(by_class[0])
        kept = []
        for i, idx in enumerate(by_class):
            target = head if num == 1 else int(np.floor(head * float(factor) ** (-i / (num - 1)) + 1e-9))
            kept.append(idx[: min(len(idx), max(1, target))])
        parts.append(np.concatenate(kept) if kept else np.zeros(0, np.int64))
    return parts


def _site_column(
    y: np.ndarray, k: int, cfg: PartitionConfig, rng: np.random.Generator, sites: Sequence[Any] | None
) -> list[np.ndarray]:
    values = site_column_values(sites, len(y))
    if len(values) != k:
        raise ValueError(
            f"partition kind 'site_column': the site column has {len(values)} distinct values "
            f"({values[:10]}{'...' if len(values) > 10 else ''}) but num_sites is {k}"
        )
    column = np.asarray([str(s) for s in sites])  # type: ignore[union-attr]
    return [np.flatnonzero(column == v) for v in values]


PARTITIONERS = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "quantity": _quantity,
    "imbalance": _imbalance,
    "site_column": _site_column,
}


def list_partitioners() -> list[str]:
    """Registered partition kinds, sorted."""
    return sorted(PARTITIONERS)


def site_column_values(sites: Sequence[Any] | None, num_samples: int | None = None) -> list[str]:
    """Sorted distinct site names (as strings): site k of a ``site_column`` partition is the k-th."""
    if sites is None:
        raise ValueError(
            "partition kind 'site_column' needs a per-sample site column (e.g. the hospital of each "
            "image), but the dataset provides none; choose another partition.kind"
        )
    column = [str(s) for s in sites]
    if num_samples is not None and len(column) != num_samples:
        raise ValueError(f"the site column has {len(column)} entries but there are {num_samples} labels")
    return sorted(set(column))


def partition_indices(
    labels: np.ndarray,
    num_sites: int,
    cfg: PartitionConfig,
    seed: int,
    sites: Sequence[Any] | None = None,
) -> list[np.ndarray]:
    """Split sample indices into ``num_sites`` disjoint, sorted index arrays (see module docstring).

    Parameters
    ----------
    labels : np.ndarray
        Class id of every sample, shape (N,).
    num_sites : int
        K >= 1, at most N.
    cfg : PartitionConfig
        ``kind`` and its parameters.
    seed : int
        Seed of the only random generator used; same inputs give the same split.
    sites : sequence, optional
        Per-sample site values, required by ``kind='site_column'``.

    Returns
    -------
    list[np.ndarray]
        K sorted int64 index arrays.
    """
    y = _check_labels(labels)
    if isinstance(num_sites, bool) or not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise ValueError(f"num_sites must be an int >= 1, got {num_sites!r}")
    num_sites = int(num_sites)
    if num_sites > len(y):
        raise ValueError(f"cannot split {len(y)} samples into {num_sites} sites; use at most {len(y)} sites")
    kind = cfg.kind
    if kind not in PARTITIONERS:
        raise ValueError(f"unknown partition kind {kind!r}; valid kinds are {list_partitioners()}")
    rng = np.random.default_rng(seed)
    if kind == "site_column":
        parts = _site_column(y, num_sites, cfg, rng, sites)
    else:
        parts = PARTITIONERS[kind](y, num_sites, cfg, rng)
    return _finish(parts)


def split_local_test(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one site's ``indices`` into (train, test), approximately stratified by class.

    ``labels`` is the label array of the whole dataset (indexed by ``indices``). The test
    set gets T = round(fraction · n) samples; each class c gets ⌊fraction · n_c⌋ of them,
    the remainder going to the classes with the largest fractional parts, and every class
    keeps at least one training sample. Returns two sorted int64 arrays.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    y = _check_labels(labels)
    if idx.size and (idx.min() < 0 or idx.max() >= len(y)):
        raise ValueError(
            f"indices must index the full label array (length {len(y)}), got range [{idx.min()}, {idx.max()}]"
        )
    rng = np.random.default_rng(seed)
    site_y = y[idx]
    classes = np.unique(site_y)
    groups = [rng.permutation(idx[site_y == c]) for c in classes]
    n_c = np.asarray([len(g) for g in groups], dtype=np.int64)
    cap = np.maximum(n_c - 1, 0)
    raw = fraction * n_c
    take = np.minimum(np.floor(raw).astype(np.int64), cap)
    left = min(int(round(fraction * len(idx))), int(cap.sum())) - int(take.sum())
    for c in np.argsort(-(raw - np.floor(raw)), kind="stable"):
        if left <= 0:
            break
        if take[c] < cap[c]:
            take[c] += 1
            left -= 1
    test = [g[:t] for g, t in zip(groups, take)]
    train = [g[t:] for g, t in zip(groups, take)]
    empty = np.zeros(0, np.int64)
    return (
        np.sort(np.concatenate(train)) if train else empty,
        np.sort(np.concatenate(test)) if test else empty,
    )


def site_histograms(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-site class counts, shape (K, C), int64."""
    y = _check_labels(labels)
    if y.size and y.max() >= num_classes:
        raise ValueError(f"labels go up to {int(y.max())} but num_classes is {num_classes}")
    return np.stack(
        [np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts]
    ).astype(np.int64) if len(parts) else np.zeros((0, num_classes), np.int64)
