"""Deduplication across all shards of a build: exact, perceptual, semantic, in that order.

Input: the pairs the CLIP-score stage kept, in global order (shard order, then row order). The
first item of a group of duplicates is kept; each dropped item records the key of the kept item
it duplicates (``duplicate_of``).

- **exact**: same sha256 of the stored image bytes (``exact_duplicate``).
- **perceptual**: pHash within ``hamming_threshold`` bits *and* colour signatures within
  ``colour_threshold`` levels (pHash sees luma only) of an item kept before (``near_duplicate``),
  compared inside semantic clusters.
- **semantic**: SemDeDup on the CLIP image embeddings (``semantic_duplicate``): cosine above
  ``1 - eps`` to an item kept before, inside a cluster.

Ray tasks over the store, no per-sample state in the driver (docs/dedup.md): map tasks hash-
partition (gid, sha256) and write a bounded k-means sample; one task trains k-means (at most
``semantic.clusters`` centroids); map tasks assign every item to its nearest centroid (and the
second one when within ``boundary_margin``) and write the rows partitioned by cluster; reduce
tasks turn each partition into duplicate edges; one task resolves the edges in global order
(:mod:`dataprep.dedup_edges`); map tasks commit ``dedup/NNNNN.parquet`` (``key``, ``reason``,
``duplicate_of``) per shard. Work files live in the staging area and are deleted at the end.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataprep.dedup_edges import Edges, exact_edges, gids, group_pairs, resolve, shard_of
from dataprep.embed import EMBED, SCORE, load_embeddings
from dataprep.filters import STAGE as FILTER
from dataprep.ray_stages import map_shards
from dataprep.semdedup import _normalise, assign
from dataprep.stage_config import DedupConfig
from dataprep.stages import KEPT, StageStats, Staging, fingerprint
from dataprep.store import ObjectNotFound

STAGE = "dedup"
SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("duplicate_of", pa.string())])
REASONS = ("exact_duplicate", "near_duplicate", "semantic_duplicate")
_UINT64_TO_UNIT = 2.0**-64
log = logging.getLogger(__name__)


def dedup_fingerprint(score_fp: str, cfg: DedupConfig) -> str:
    return fingerprint(STAGE, score_fp, cfg.model_dump(exclude={"partitions", "shards_per_task"}))


# --------------------------------------------------------------------------- store files


def put_arrays(staging: Staging, name: str, **arrays: np.ndarray) -> int:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    staging.store.put_bytes(name, buf.getvalue())
    return buf.tell()


def get_arrays(staging: Staging, key: str) -> dict[str, np.ndarray] | None:
    try:
        data = staging.store.get_bytes(key)
    except ObjectNotFound:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def concat_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def hex_prefix(sha256: np.ndarray) -> np.ndarray:
    """The first 8 hex digits of each sha256 (bytes) as a number: the exact-dedup partition key."""
    digits = sha256.view(np.uint8).reshape(len(sha256), -1)[:, :8].astype(np.int64)
    values = np.where(digits >= ord("a"), digits - ord("a") + 10, digits - ord("0"))
    return values @ (16 ** np.arange(7, -1, -1, dtype=np.int64))


def uniform(gid: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per item (splitmix64 of gid and seed): the k-means
    sample is the same whatever the batching."""
    with np.errstate(over="ignore"):
        z = gid.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.astype(np.float64) * _UINT64_TO_UNIT


# --------------------------------------------------------------------------- per-shard input


def shard_signals(staging: Staging, shard: int, embeddings: bool = True) -> dict[str, np.ndarray]:
    """The score stage's kept items of one shard, in row order: gid, key, sha256, phash, colours
    [m, 6] (NaN where missing) and, if asked, normalised image embeddings [m, d]."""
    score = staging.table(SCORE, shard)
    kept_keys = pc.filter(score["key"], pc.equal(score["reason"], KEPT))
    embed_keys = staging.table(EMBED, shard)["key"]
    rows = np.flatnonzero(pc.is_in(embed_keys, value_set=kept_keys).to_numpy(zero_copy_only=False))
    keys = pc.take(embed_keys, pa.array(rows, pa.int64()))
    out = {"gid": gids(shard, rows), "key": np.array(keys.to_pylist(), dtype=str)}
    if embeddings:
        out["embedding"] = _normalise(load_embeddings(staging, shard, "image")[rows])
    signals = staging.table(FILTER, shard)
    at = pc.index_in(keys, value_set=signals["key"])
    out["sha256"] = np.array(pc.take(signals["sha256"], at).to_pylist(), dtype="S64")
    out["phash"] = pc.take(signals["phash"], at).to_numpy(zero_copy_only=False).astype(np.int64)
    colours = pc.take(signals["colours"], at).combine_chunks()
    if len(colours) and pc.all(pc.equal(pc.list_value_length(colours), 6)).as_py():
        flat = colours.flatten().to_numpy(zero_copy_only=False)
        out["colours"] = flat.astype(np.float64).reshape(-1, 6)
    else:  # a missing or odd signature never matches (as dataprep.phash.colour_distance)
        out["colours"] = np.array(
            [c if c is not None and len(c) == 6 else [np.nan] * 6 for c in colours.to_pylist()],
            np.float64,
        ).reshape(-1, 6)
    return out


# --------------------------------------------------------------------------- Ray tasks


class Work:
    """Where one dedup run keeps its files in the staging area, and how they are named."""

    def __init__(self, staging: Staging, fp: str, cfg: DedupConfig) -> None:
        self.staging, self.cfg = staging, cfg
        self.root = f"staging/{staging.name}/{STAGE}-work/{fp}"

    def key(self, *parts: str | int) -> str:
        return "/".join([self.root, *(f"{p:06d}" if isinstance(p, int) else p for p in parts)])


def count_batch(batch: int, work: Work, batches: list[list[int]]) -> int:
    store = work.staging.store
    return sum(
        StageStats.model_validate_json(
            store.get_bytes(work.staging.key(SCORE, s, "stats.json"))
        ).kept
        for s in batches[batch]
    )


def _put_partitioned(work: Work, kind: str, batch: int, part: np.ndarray, rows: dict) -> int:
    """One file per partition; the bytes written (the shuffle's size)."""
    written = 0
    for p in np.unique(part):
        at = part == p
        name = work.key(kind, int(p), batch)
        written += put_arrays(work.staging, name, **{k: v[at] for k, v in rows.items()})
    return written


def hash_batch(batch: int, work: Work, batches: list[list[int]], sample_rate: float) -> int:
    """Map 1: (gid, key, sha256) by sha256 prefix into ``exact/<partition>/<batch>``, and the
    k-means sample (items whose fixed random number is below ``sample_rate``); bytes written."""
    cfg = work.cfg
    shards = [shard_signals(work.staging, s, sample_rate > 0) for s in batches[batch]]
    rows = concat_arrays(shards)
    if not rows:
        return 0
    written = 0
    if cfg.exact:
        part = hex_prefix(rows["sha256"]) % cfg.partitions
        exact = {k: rows[k] for k in ("gid", "key", "sha256")}
        written += _put_partitioned(work, "exact", batch, part, exact)
    if sample_rate > 0:
        sample = rows["embedding"][uniform(rows["gid"], cfg.semantic.seed) < sample_rate]
        written += put_arrays(work.staging, work.key("sample", batch), embedding=sample)
    return written


def train_kmeans(k: int, work: Work, batches: int) -> None:
    """The fixed cost: faiss spherical k-means on the sample, centroids into the store."""
    parts = [a for b in range(batches) if (a := get_arrays(work.staging, work.key("sample", b)))]
    sample = concat_arrays(parts)["embedding"]
    k = min(k, len(sample))
    centroids = kmeans(sample, k, work.cfg.semantic, work.cfg.semantic.seed)
    put_arrays(work.staging, work.key("centroids"), centroids=centroids)


def kmeans(x: np.ndarray, k: int, cfg, seed: int) -> np.ndarray:
    import faiss

    if k <= 1:
        return np.zeros((1, x.shape[1]), np.float32)
    model = faiss.Kmeans(
        x.shape[1], k, niter=cfg.kmeans_iterations, seed=seed, spherical=True,
        max_points_per_centroid=cfg.max_points_per_centroid, verbose=False,
    )  # fmt: skip
    model.train(x)
    return model.centroids


def nearest_two(
    x: np.ndarray, centroids: np.ndarray, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """(row, cluster) pairs: every row with its nearest centroid, and rows near a boundary with
    their second nearest too."""
    from dataprep.semdedup import ArraySource

    nearest, second = assign(ArraySource(x), centroids, margin)
    both = np.flatnonzero(second >= 0)
    return np.r_[np.arange(len(nearest)), both], np.r_[nearest, second[both]]


def cluster_batch(batch: int, work: Work, batches: list[list[int]]) -> int:
    """Map 2: rows by cluster partition into ``clusters/<partition>/<batch>``."""
    cfg = work.cfg
    centroids = get_arrays(work.staging, work.key("centroids"))["centroids"]
    s = concat_arrays([shard_signals(work.staging, shard) for shard in batches[batch]])
    if not s:
        return 0
    rows, cluster = nearest_two(s["embedding"], centroids, cfg.semantic.boundary_margin)
    columns = {k: s[k][rows] for k in ("gid", "key", "phash", "colours", "embedding")}
    return _put_partitioned(
        work, "clusters", batch, cluster % cfg.partitions, columns | {"cluster": cluster}
    )


def _read_partition(work: Work, kind: str, partition: int) -> dict[str, np.ndarray]:
    prefix = work.key(kind, partition) + "/"
    return concat_arrays(
        [get_arrays(work.staging, k) for k in sorted(work.staging.store.list(prefix))]
    )


def exact_partition(partition: int, work: Work) -> None:
    rows = _read_partition(work, "exact", partition)
    edges = exact_edges(rows["gid"], rows["sha256"], rows["key"]) if rows else Edges.empty()
    put_arrays(work.staging, work.key("edges", "exact", partition), **edges.arrays())


def split(embeddings: np.ndarray, cfg: DedupConfig, seed: int) -> list[np.ndarray]:
    """Groups of about ``cluster_size`` rows of one large cluster, by a k-means of its own (with
    the boundary margin), so pairwise work per item stays bounded."""
    sem = cfg.semantic
    if len(embeddings) <= 2 * sem.cluster_size:
        return [np.arange(len(embeddings))]
    k = -(-len(embeddings) // sem.cluster_size)
    rows, group = nearest_two(embeddings, kmeans(embeddings, k, sem, seed), sem.boundary_margin)
    order = np.lexsort((rows, group))
    bounds = np.searchsorted(group[order], np.arange(k + 1))
    return [rows[order[bounds[g] : bounds[g + 1]]] for g in range(k) if bounds[g + 1] > bounds[g]]


def cluster_partition(partition: int, work: Work) -> None:
    """Reduce: semantic and perceptual edges inside each cluster of one partition."""
    cfg = work.cfg
    rows = _read_partition(work, "clusters", partition)
    found: dict[str, list[Edges]] = {"semantic": [], "perceptual": []}
    if rows:
        order = np.lexsort((rows["gid"], rows["cluster"]))
        rows = {k: v[order] for k, v in rows.items()}
        starts = np.flatnonzero(np.r_[True, rows["cluster"][1:] != rows["cluster"][:-1]])
        for lo, hi in zip(starts, np.r_[starts[1:], len(order)], strict=True):
            c = {k: v[lo:hi] for k, v in rows.items()}
            for group in split(c["embedding"], cfg, cfg.semantic.seed + int(c["cluster"][0])):
                g = {k: v[group] for k, v in c.items()}
                (si, sj, sim), (pi, pj) = group_pairs(
                    g["embedding"] if cfg.semantic.enabled else None,
                    g["phash"] if cfg.perceptual.enabled else None,
                    g["colours"],
                    1.0 - cfg.semantic.eps,
                    cfg.perceptual.hamming_threshold,
                    cfg.perceptual.colour_threshold,
                )
                found["semantic"].append(
                    Edges(g["gid"][si], g["gid"][sj], sim.astype(np.float32), g["key"][si])
                )
                found["perceptual"].append(
                    Edges(g["gid"][pi], g["gid"][pj], np.zeros(len(pi), np.float32), g["key"][pi])
                )
    for kind, parts in found.items():
        edges = Edges.concat(parts).unique()
        put_arrays(work.staging, work.key("edges", kind, partition), **edges.arrays())


def resolve_edges(_: int, work: Work, batches: list[list[int]]) -> dict[str, int]:
    """All edges, kind by kind in global order; the drops go to ``drops/<batch>``."""
    kinds = [("exact", REASONS[0], work.cfg.exact)]
    kinds += [("perceptual", REASONS[1], work.cfg.perceptual.enabled)]
    kinds += [("semantic", REASONS[2], work.cfg.semantic.enabled)]
    dropped, parts, counts = np.zeros(0, np.int64), [], {}
    for kind, reason, enabled in kinds:
        if not enabled:
            continue
        files = [
            get_arrays(work.staging, work.key("edges", kind, p)) for p in range(work.cfg.partitions)
        ]
        edges = Edges.concat([Edges(**f) for f in files if f is not None]).unique()
        gid, dup, dup_key = resolve(edges, dropped)
        parts.append((gid, np.full(len(gid), REASONS.index(reason), np.int8), dup_key))
        dropped = np.sort(np.r_[dropped, gid])
        counts[reason] = len(gid)
    gid = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    reason = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int8)
    dup_key = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, "U1")
    batch_of_shard = {s: b for b, shards in enumerate(batches) for s in shards}
    batch = np.array([batch_of_shard[s] for s in shard_of(gid).tolist()], np.int64)
    for b in range(len(batches)):
        at = batch == b
        put_arrays(
            work.staging, work.key("drops", b), gid=gid[at], reason=reason[at], dup_key=dup_key[at]
        )
    return counts


def commit_batch(batch: int, work: Work, batches: list[list[int]], fp: str) -> list[StageStats]:
    """Map 3: each shard's decision table and stats (the commit marker)."""
    drops = get_arrays(work.staging, work.key("drops", batch))
    order = np.argsort(drops["gid"])
    drop_gid = np.r_[drops["gid"][order], -1]  # -1: no item; keeps the lookups in range
    drop_reason = np.r_[drops["reason"][order], len(REASONS)]
    drop_key = np.append(drops["dup_key"][order], "")
    out = []
    for shard in batches[batch]:
        s = shard_signals(work.staging, shard, embeddings=False)
        at = np.minimum(np.searchsorted(drop_gid[:-1], s["gid"]), len(drop_gid) - 1)
        hit = drop_gid[at] == s["gid"]
        reason = np.array([*REASONS, KEPT])[np.where(hit, drop_reason[at], len(REASONS))]
        dup_key = np.where(hit, drop_key[at], "")
        reasons = reason.tolist()
        table = pa.table(
            {
                "key": s["key"].tolist(),
                "reason": reasons,
                "duplicate_of": pa.array(dup_key.tolist(), pa.string(), mask=~hit),
            },
            schema=SCHEMA,
        )
        stats = StageStats.of(STAGE, shard, fp, reasons)
        work.staging.commit(stats, table)
        out.append(stats)
    return out


# --------------------------------------------------------------------------- driver


def dedup_shards(
    staging: Staging,
    shards: list[int],
    cfg: DedupConfig,
    score_fp: str,
    work_root: Path | None = None,  # unused: every work file is in the store
    ray_address: str | None = None,
) -> list[StageStats]:
    """Dedup the build; shards already committed with the same fingerprint are kept as they are.
    Otherwise everything is recomputed (deterministically) and the missing shards committed."""
    fp = dedup_fingerprint(score_fp, cfg)
    done = {s: st for s in shards if (st := staging.stats(STAGE, s, fp)) is not None}
    if len(done) == len(shards):
        return [done[s] for s in shards]
    work = Work(staging, fp, cfg)
    staging.store.delete_prefix(work.root + "/")
    step = cfg.shards_per_task
    batches = [shards[i : i + step] for i in range(0, len(shards), step)]
    every = list(range(len(batches)))

    def run(fn, items, *args):
        started = time.perf_counter()
        out = list(map_shards(fn, items, (work, *args), ray_address=ray_address))
        log.info(
            "dedup %s: %d tasks, %.2f s", fn.__name__, len(items), time.perf_counter() - started
        )
        return out

    n = sum(run(count_batch, every, batches))
    k = max(1, min(cfg.semantic.clusters, -(-n // cfg.semantic.cluster_size)))
    clustered = (cfg.semantic.enabled or cfg.perceptual.enabled) and n > 0
    rate = min(1.0, k * cfg.semantic.max_points_per_centroid / max(n, 1)) if clustered else 0.0
    shuffled = sum(run(hash_batch, every, batches, rate))
    if clustered:
        run(train_kmeans, [k], len(batches))
        shuffled += sum(run(cluster_batch, every, batches))
        run(cluster_partition, list(range(cfg.partitions)))
    if cfg.exact:
        run(exact_partition, list(range(cfg.partitions)))
    run(resolve_edges, [0], batches)
    todo = [i for i, b in enumerate(batches) if any(s not in done for s in b)]
    for stats in run(commit_batch, todo, batches, fp):
        done.update({st.shard: st for st in stats if st.shard not in done})
    staging.store.delete_prefix(work.root + "/")
    log.info("dedup shuffle: %d bytes", shuffled)
    return [done[s] for s in shards]
