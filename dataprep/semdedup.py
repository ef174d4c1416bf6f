"""SemDeDup over any embedding source: faiss k-means, then greedy dedup inside each cluster.

1. Spherical k-means (faiss) on a sample of the normalised embeddings (at most
   ``max_points_per_centroid`` per centroid, as faiss would subsample anyway).
2. Every embedding is assigned to its nearest centroid, streamed in blocks.
3. Cluster by cluster, items in global order (items close to a boundary take part in their two
   nearest clusters): an item is dropped when its cosine similarity to an
   item kept before it exceeds ``1 - eps``; it records that item. The first item of a group is
   therefore always the one kept (deterministic: lowest global index).

Memory: the cluster ids (4 bytes per item) plus one cluster's embeddings, with similarities
computed in row blocks (at most ``_SIM_BUDGET`` floats at a time), never an all-pairs matrix.
Pairs that k-means puts in different clusters are not compared: that is SemDeDup's trade-off
(see benchmarks/dedup.py for how many brute-force pairs it still finds).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dataprep.stage_config import SemanticConfig

_SIM_BUDGET = 1 << 25  # floats in one block of similarities (128 MB)
_ASSIGN_BLOCK = 65536


class EmbeddingSource(Protocol):
    """Normalised embeddings [n, d] in global order, readable in blocks and by index."""

    n: int
    dim: int

    def blocks(self, size: int) -> Iterator[np.ndarray]: ...

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows at sorted global indices ``index``."""
        ...


@dataclass
class ArraySource:
    """An in-memory or memory-mapped array as a source."""

    array: np.ndarray

    @property
    def n(self) -> int:
        return self.array.shape[0]

    @property
    def dim(self) -> int:
        return self.array.shape[1]

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n, size):
            yield np.asarray(self.array[start : start + size], np.float32)

    def take(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[index], np.float32)


@dataclass
class SemDedupResult:
    keep: np.ndarray  # bool [n]
    duplicate_of: np.ndarray  # int64 [n]: global index of the kept item it duplicates, or -1
    cluster: np.ndarray  # int32 [n]: nearest centroid
    second: np.ndarray  # int32 [n]: second cluster it was also compared in, or -1
    clusters: int


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def kmeans_centroids(source: EmbeddingSource, k: int, cfg: SemanticConfig) -> np.ndarray:
    import faiss

    if k == 1:
        return np.zeros((1, source.dim), np.float32)
    cap = k * cfg.max_points_per_centroid
    rng = np.random.default_rng(cfg.seed)
    sample = np.arange(source.n) if source.n <= cap else np.sort(rng.choice(source.n, cap, False))
    x = _normalise(source.take(sample))
    kmeans = faiss.Kmeans(
        source.dim,
        k,
        niter=cfg.kmeans_iterations,
        seed=cfg.seed,
        spherical=True,
        max_points_per_centroid=cfg.max_points_per_centroid,
        verbose=False,
    )
    kmeans.train(x)
    return kmeans.centroids


def assign(
    source: EmbeddingSource, centroids: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every item, and its second-nearest where that is within ``margin``
    (else -1)."""
    import faiss

    nearest = np.zeros(source.n, np.int32)
    second = np.full(source.n, -1, np.int32)
    if len(centroids) == 1:
        return nearest, second
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    start = 0
    for block in source.blocks(_ASSIGN_BLOCK):
        sims, ids = index.search(_normalise(block), 2)
        stop = start + len(block)
        nearest[start:stop] = ids[:, 0]
        second[start:stop] = np.where(sims[:, 0] - sims[:, 1] <= margin, ids[:, 1], -1)
        start = stop
    return nearest, second


def greedy_within(
    embeddings: np.ndarray, threshold: float, dropped: np.ndarray | None = None
) -> np.ndarray:
    """For rows in order: index of the earlier *kept* row it duplicates (similarity >
    ``threshold``), or -1 if it is kept. ``dropped`` marks rows already dropped elsewhere (they
    are skipped and drop nothing). Blockwise: at most ``_SIM_BUDGET`` similarities at a time."""
    n = len(embeddings)
    duplicate_of = np.full(n, -1, np.int64)
    kept = np.ones(n, bool) if dropped is None else ~dropped
    block = max(1, _SIM_BUDGET // max(n, 1))
    candidates = []  # rows similar to *some* earlier row: only those can be dropped
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = embeddings[start:stop] @ embeddings[:stop].T  # [b, stop]
        rows = np.arange(start, stop)[:, None]
        sims[np.arange(stop)[None, :] >= rows] = -np.inf  # only earlier rows
        candidates.extend(start + np.flatnonzero(sims.max(1) > threshold))
    for i in candidates:
        if not kept[i]:
            continue
        sims = embeddings[:i] @ embeddings[i]
        sims[~kept[:i]] = -np.inf
        j = int(np.argmax(sims))
        if sims[j] > threshold:
            kept[i] = False
            duplicate_of[i] = j
    return duplicate_of


def semantic_dedup(source: EmbeddingSource, cfg: SemanticConfig) -> SemDedupResult:
    n = source.n
    k = max(1, min(cfg.clusters, -(-n // cfg.cluster_size)))
    centroids = kmeans_centroids(source, k, cfg) if n else np.zeros((1, source.dim), np.float32)
    nearest, second = assign(source, centroids, cfg.boundary_margin)
    duplicate_of = np.full(n, -1, np.int64)
    # Members of each cluster in global order: nearest-centroid items plus boundary items.
    index = np.concatenate([np.arange(n), np.flatnonzero(second >= 0)])
    cluster = np.concatenate([nearest, second[second >= 0]])
    order = np.lexsort((index, cluster))
    bounds = np.searchsorted(cluster[order], np.arange(len(centroids) + 1))
    for c in range(len(centroids)):
        members = index[order[bounds[c] : bounds[c + 1]]]
        if len(members) < 2:
            continue
        local = greedy_within(
            _normalise(source.take(members)), 1.0 - cfg.eps, duplicate_of[members] >= 0
        )
        found = local >= 0
        duplicate_of[members[found]] = members[local[found]]
    return SemDedupResult(duplicate_of < 0, duplicate_of, nearest, second, len(centroids))
