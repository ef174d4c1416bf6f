"""Duplicate edges and their resolution: the numpy work inside dedup's partition tasks.

Items are named by a global id, ``gid = shard << 32 | row`` (row in the shard's embedding
files), whose order is the build's global order. An edge (earlier, later) says two items are
duplicates of one kind. :func:`resolve` decides from the edges alone, in global order: an item
is dropped when an edge links it to an earlier item that is kept, and it records the kept item
with the highest weight (then the lowest gid). That is "keep the first" of every group, and it
does not depend on how the items were partitioned to find the edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GID_SHIFT = 32
_BLOCK = 256  # rows of a similarity / Hamming block: at most 256 x group size values


def gids(shard: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(shard) << np.int64(GID_SHIFT)) | rows.astype(np.int64)


def shard_of(gid: np.ndarray) -> np.ndarray:
    return gid >> np.int64(GID_SHIFT)


@dataclass
class Edges:
    """Duplicate pairs, ``earlier < later`` (gids), with the earlier item's key."""

    earlier: np.ndarray  # int64
    later: np.ndarray  # int64
    weight: np.ndarray  # float32: the preferred kept item has the highest
    earlier_key: np.ndarray  # str

    @classmethod
    def empty(cls) -> Edges:
        return cls(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, "U1")
        )

    @classmethod
    def concat(cls, parts: list[Edges]) -> Edges:
        if not parts:
            return cls.empty()
        return cls(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__)
        )

    def take(self, at: np.ndarray) -> Edges:
        return Edges(self.earlier[at], self.later[at], self.weight[at], self.earlier_key[at])

    def unique(self) -> Edges:
        """One edge per pair (a pair found in two clusters or partitions comes twice)."""
        if not len(self.earlier):
            return self
        order = np.lexsort((-self.weight, self.later, self.earlier))
        e = self.take(order)
        first = np.r_[True, (e.earlier[1:] != e.earlier[:-1]) | (e.later[1:] != e.later[:-1])]
        return e.take(np.flatnonzero(first))

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def exact_edges(gid: np.ndarray, sha256: np.ndarray, key: np.ndarray) -> Edges:
    """Every item to the first item (lowest gid) with the same sha256."""
    order = np.lexsort((gid, sha256))
    s = sha256[order]
    starts = np.r_[True, s[1:] != s[:-1]] if len(s) else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(len(s)), 0))
    later, earlier = order[~starts], order[first[~starts]]
    return Edges(gid[earlier], gid[later], np.zeros(len(later), np.float32), key[earlier])


def colour_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise :func:`dataprep.phash.colour_distance` of two [E, 6] float64 arrays (a row of
    NaN background marks a missing signature: infinite)."""
    a_fg, b_fg = ~np.isnan(a[:, 3:]).any(1), ~np.isnan(b[:, 3:]).any(1)
    diff = np.abs(a - b)
    out = np.where(a_fg, diff.max(1, initial=-np.inf, where=~np.isnan(diff)), diff[:, :3].max(1))
    out[a_fg != b_fg] = np.inf
    out[np.isnan(a[:, :3]).any(1) | np.isnan(b[:, :3]).any(1)] = np.inf
    return out


def _upper(hits: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of the hits of rows [start, ...) against columns [start, n) with i < j."""
    i, j = np.nonzero(hits)
    keep = j > i
    return start + i[keep], start + j[keep]


def group_pairs(
    embeddings: np.ndarray | None,
    phash: np.ndarray | None,
    colours: np.ndarray | None,
    similarity: float,
    hamming_threshold: int,
    colour_threshold: float,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """All pairs i < j of one group (rows in global order): semantic (cosine > ``similarity``;
    i, j, cosine) and perceptual (pHash within ``hamming_threshold`` bits and colours within
    ``colour_threshold``; i, j). Row blocks against the later columns only."""
    n = len(embeddings) if embeddings is not None else len(phash)
    sem: list[tuple[np.ndarray, ...]] = []
    per: list[tuple[np.ndarray, ...]] = []
    unsigned = phash.astype(np.uint64) if phash is not None else None
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        if embeddings is not None:
            sims = embeddings[start:stop] @ embeddings[start:].T
            i, j = _upper(sims > similarity, start)
            sem.append((i, j, sims[i - start, j - start]))
        if unsigned is not None:
            distance = np.bitwise_count(unsigned[start:stop, None] ^ unsigned[None, start:])
            i, j = _upper(distance <= hamming_threshold, start)
            close = colour_distances(colours[i], colours[j]) <= colour_threshold
            per.append((i[close], j[close]))

    def stack(parts: list, k: int) -> tuple:
        return tuple(
            np.concatenate([p[c] for p in parts]) if parts else np.zeros(0, int) for c in range(k)
        )

    return stack(sem, 3), stack(per, 2)


def resolve(edges: Edges, dropped: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decisions of one kind in global order, among items not in ``dropped`` (sorted gids of items
    dropped by an earlier kind): (gid, duplicate_of gid, duplicate_of key) of the items it drops.

    An item is kept when none of its earlier neighbours is kept, so decisions propagate in rounds
    from the items with no earlier neighbour; duplicate groups are shallow, so rounds are few.
    """
    live = ~(np.isin(edges.earlier, dropped) | np.isin(edges.later, dropped))
    e = edges.take(np.flatnonzero(live))
    nodes = np.unique(np.concatenate([e.earlier, e.later]))
    a, b = np.searchsorted(nodes, e.earlier), np.searchsorted(nodes, e.later)
    unknown, kept, gone = 0, 1, 2
    state = np.full(len(nodes), kept, np.int8)
    state[b] = unknown
    while (state == unknown).any():
        state[b[(state[a] == kept) & (state[b] == unknown)]] = gone
        blocked = np.zeros(len(nodes), bool)
        blocked[b[state[a] == unknown]] = True
        state[(state == unknown) & ~blocked] = kept
    chosen = np.flatnonzero((state[a] == kept) & (state[b] == gone))
    chosen = chosen[np.lexsort((e.earlier[chosen], -e.weight[chosen], e.later[chosen]))]
    first = np.r_[True, e.later[chosen][1:] != e.later[chosen][:-1]] if len(chosen) else chosen > 0
    chosen = chosen[first]
    return e.later[chosen], e.earlier[chosen], e.earlier_key[chosen]
