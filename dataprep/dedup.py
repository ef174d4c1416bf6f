"""Deduplication across all shards of a build: exact, perceptual, semantic, in that order.

Input: the pairs the CLIP-score stage kept, in global order (shard order, then key order). The
first item of a group of duplicates is kept, so the choice is deterministic; each dropped item
records the key of the kept item it duplicates (``duplicate_of``).

- **exact**: same sha256 of the stored image bytes (reason ``exact_duplicate``).
- **perceptual**: pHash within ``hamming_threshold`` bits *and* colour signatures within
  ``colour_threshold`` levels (pHash sees luma only) of an item kept before
  (``near_duplicate``). Candidate pairs come from multi-index hashing: the 64 bits are cut into
  ``hamming_threshold + 1`` bands, and two hashes within the threshold agree exactly on at least
  one band (pigeonhole), so only items sharing a band value are compared, not all pairs.
- **semantic**: SemDeDup on the CLIP image embeddings (``semantic_duplicate``), see
  :mod:`dataprep.semdedup`; embeddings are read from the store into local memory-mapped files,
  so memory holds one cluster at a time.

Signals come from earlier stages (sha256, pHash, colours: filter; embeddings: embed), so dedup
decodes nothing. Output per shard: ``dedup/NNNNN.parquet`` (``key``, ``reason``,
``duplicate_of``) and the stats. Dedup is global: a re-run with every shard committed does
nothing; otherwise it recomputes (deterministically) and commits the shards that are missing.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from dataprep.embed import EMBED, SCORE, load_embeddings
from dataprep.filters import STAGE as FILTER
from dataprep.phash import colour_distance, hamming
from dataprep.semdedup import semantic_dedup
from dataprep.stage_config import DedupConfig, PerceptualConfig
from dataprep.stages import KEPT, StageStats, Staging, fingerprint

STAGE = "dedup"
SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("duplicate_of", pa.string())])


@dataclass
class Items:
    """The score stage's kept pairs of the whole build, in global order."""

    keys: list[str] = field(default_factory=list)
    shard: list[int] = field(default_factory=list)
    row: list[int] = field(default_factory=list)  # row in the shard's embedding files
    sha256: list[str] = field(default_factory=list)
    phash: list[int] = field(default_factory=list)
    colours: list[list[float]] = field(default_factory=list)


def collect_items(staging: Staging, shards: list[int]) -> Items:
    items = Items()
    for shard in shards:
        score = staging.table(SCORE, shard)
        kept = {
            k
            for k, r in zip(score["key"].to_pylist(), score["reason"].to_pylist(), strict=True)
            if r == KEPT
        }
        signals = {r["key"]: r for r in staging.table(FILTER, shard).to_pylist()}
        for row, key in enumerate(staging.table(EMBED, shard)["key"].to_pylist()):
            if key in kept:
                items.keys.append(key)
                items.shard.append(shard)
                items.row.append(row)
                items.sha256.append(signals[key]["sha256"])
                items.phash.append(signals[key]["phash"])
                items.colours.append(signals[key]["colours"])
    return items


def exact_duplicates(sha256: list[str], alive: np.ndarray) -> np.ndarray:
    """duplicate_of[i] = index of the first alive item with the same hash, else -1."""
    first: dict[str, int] = {}
    dup = np.full(len(sha256), -1, np.int64)
    for i in np.flatnonzero(alive):
        j = first.setdefault(sha256[i], int(i))
        if j != i:
            dup[i] = j
    return dup


def candidate_pairs(hashes: np.ndarray, threshold: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(i, j) index arrays, i < j, of pairs sharing at least one of ``threshold + 1`` bands."""
    bands = threshold + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    unsigned = hashes.astype(np.uint64)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        width = int(hi - lo)
        if width == 0:
            continue
        value = (unsigned >> np.uint64(64 - hi)) & np.uint64((1 << width) - 1)
        order = np.argsort(value, kind="stable")
        sorted_values = value[order]
        starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
        stops = np.r_[starts[1:], len(order)]
        for start, stop in zip(starts, stops, strict=True):
            if stop - start > 1:
                members = np.sort(order[start:stop])
                i, j = np.triu_indices(len(members), 1)
                yield members[i], members[j]


def perceptual_duplicates(items: Items, alive: np.ndarray, cfg: PerceptualConfig) -> np.ndarray:
    index = np.flatnonzero(alive)
    hashes = np.array(items.phash, np.int64)[index]
    earlier: dict[int, set[int]] = defaultdict(set)  # later item -> earlier similar items
    for i, j in candidate_pairs(hashes, cfg.hamming_threshold):
        close = hamming(hashes[i], hashes[j]) <= cfg.hamming_threshold
        for a, b in zip(index[i[close]], index[j[close]], strict=True):
            a, b = int(a), int(b)
            if a in earlier.get(b, ()):  # already found through another band
                continue
            if colour_distance(items.colours[a], items.colours[b]) <= cfg.colour_threshold:
                earlier[b].add(a)
    dup = np.full(len(items.keys), -1, np.int64)
    for b in sorted(earlier):  # global order: an item is compared with items kept before it
        kept = [a for a in sorted(earlier[b]) if dup[a] < 0]
        if kept:
            dup[b] = kept[0]
    return dup


class ShardEmbeddings:
    """The image embeddings of the alive items, from local memory-mapped copies of the shards'
    ``.npy`` files: an :class:`~dataprep.semdedup.EmbeddingSource`."""

    def __init__(self, staging: Staging, items: Items, alive: np.ndarray, work: Path) -> None:
        self.index = np.flatnonzero(alive)
        shard = np.array(items.shard, np.int64)[self.index]
        self.row = np.array(items.row, np.int64)[self.index]
        self.files: dict[int, np.ndarray] = {}
        for s in np.unique(shard):
            array = load_embeddings(staging, int(s), "image")  # validated against its table
            path = work / f"{int(s):05d}.npy"
            np.save(path, array)
            self.files[int(s)] = np.load(path, mmap_mode="r")
        self.shard = shard
        self.n = len(self.index)
        self.dim = next(iter(self.files.values())).shape[1] if self.files else 0

    def take(self, index: np.ndarray) -> np.ndarray:
        out = np.empty((len(index), self.dim), np.float32)
        shards = self.shard[index]
        for s in np.unique(shards):
            at = np.flatnonzero(shards == s)
            out[at] = self.files[int(s)][self.row[index[at]]]
        return out

    def blocks(self, size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n, size):
            yield self.take(np.arange(start, min(self.n, start + size)))


def dedup_fingerprint(score_fp: str, cfg: DedupConfig) -> str:
    return fingerprint(STAGE, score_fp, cfg.model_dump())


def find_duplicates(
    staging: Staging, items: Items, cfg: DedupConfig, work: Path
) -> tuple[np.ndarray, list[str]]:
    """(duplicate_of index or -1, reason) per item, stage by stage on the survivors."""
    n = len(items.keys)
    dup = np.full(n, -1, np.int64)
    reasons = [KEPT] * n

    def apply(found: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(found >= 0):
            dup[i], reasons[i] = found[i], reason

    if cfg.exact:
        apply(exact_duplicates(items.sha256, dup < 0), "exact_duplicate")
    if cfg.perceptual.enabled:
        apply(perceptual_duplicates(items, dup < 0, cfg.perceptual), "near_duplicate")
    if cfg.semantic.enabled and (dup < 0).any():
        source = ShardEmbeddings(staging, items, dup < 0, work)
        result = semantic_dedup(source, cfg.semantic)
        found = np.full(n, -1, np.int64)
        dropped = result.duplicate_of >= 0
        found[source.index[dropped]] = source.index[result.duplicate_of[dropped]]
        apply(found, "semantic_duplicate")
    return dup, reasons


def dedup_shards(
    staging: Staging, shards: list[int], cfg: DedupConfig, score_fp: str, work_root: Path
) -> list[StageStats]:
    """Dedup the build; shards already committed with the same fingerprint are kept as they are."""
    fp = dedup_fingerprint(score_fp, cfg)
    done = {s: st for s in shards if (st := staging.stats(STAGE, s, fp)) is not None}
    if len(done) == len(shards):
        return [done[s] for s in shards]
    items = collect_items(staging, shards)
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root, prefix="dedup-") as work:
        dup, reasons = find_duplicates(staging, items, cfg, Path(work))
    by_shard: dict[int, list[int]] = defaultdict(list)
    for i, shard in enumerate(items.shard):
        by_shard[shard].append(i)
    for shard in shards:
        if shard in done:
            continue
        rows = by_shard.get(shard, [])
        table = pa.table(
            {
                "key": [items.keys[i] for i in rows],
                "reason": [reasons[i] for i in rows],
                "duplicate_of": [items.keys[dup[i]] if dup[i] >= 0 else None for i in rows],
            },
            schema=SCHEMA,
        )
        stats = StageStats.of(STAGE, shard, fp, table["reason"].to_pylist())
        staging.commit(stats, table)
        done[shard] = stats
    return [done[s] for s in shards]
