"""Synthetic per-shard dedup inputs with planted duplicates, for tests and benchmarks/build_scale.

Writes what the stages before dedup write (score, filter and embed tables, ``image.npy``) for
``n`` items without images: 5% exact copies, 5% near copies (pHash within 6 bits, colours within
1 level, embedding cosine ~0.99) and 5% semantic copies (embedding cosine ~0.9998, other pHash
and colours) of clean items of the same or the previous shard; one shard in memory at a time.
"""

from __future__ import annotations

import binascii
import io

import numpy as np
import pyarrow as pa

from dataprep.dedup_edges import gids
from dataprep.embed import EMBED, SCORE
from dataprep.filters import STAGE as FILTER
from dataprep.stages import KEPT, StageStats, Staging

CENTRES = 2000
SHARE = 0.05  # of each kind of planted copy
KINDS = ("exact", "near", "semantic")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _noisy(rng, x: np.ndarray, sigma: float) -> np.ndarray:
    return _unit(x + sigma * rng.standard_normal(x.shape).astype(np.float32))


def write_signals(staging: Staging, n: int, per_shard: int, dim: int, seed: int = 0) -> dict:
    """Write ``n`` items in shards of ``per_shard``; returns {kind: sorted gids of planted copies}
    and the shard list. Holds one shard (and the previous one) at a time."""
    centres = np.random.default_rng(seed).standard_normal((CENTRES, dim)).astype(np.float32)
    planted: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
    previous = None
    shards = -(-n // per_shard)
    for shard in range(shards):
        rng = np.random.default_rng([seed, shard])
        m = min(per_shard, n - shard * per_shard)
        raw = binascii.hexlify(rng.integers(0, 256, 32 * m, np.uint8).tobytes())
        cur = {
            "sha256": np.frombuffer(raw, dtype="S64").copy(),
            "phash": rng.integers(-(2**63), 2**63 - 1, m, np.int64),
            "colours": rng.integers(0, 256, (m, 6)).astype(np.float32),
            "embedding": _unit(
                centres[rng.integers(0, CENTRES, m)]
                + 0.8 * rng.standard_normal((m, dim)).astype(np.float32)
            ),
        }
        kind = rng.choice(4, m, p=[1 - 3 * SHARE, SHARE, SHARE, SHARE])  # 0: clean
        kind[: m // 10 if previous is None else 0] = 0  # the first rows of the build are clean
        clean = np.flatnonzero(kind == 0)
        for code, name in enumerate(KINDS, 1):
            rows = np.flatnonzero(kind == code)
            if not len(rows):
                continue
            # originals: an earlier clean row of this shard, or (half the time) of the previous one
            before = np.searchsorted(clean, rows)
            local = clean[(rng.random(len(rows)) * before).astype(int)]
            use_prev = (rng.random(len(rows)) < 0.5) & (previous is not None) | (before == 0)
            src = {k: v[local].copy() for k, v in cur.items()}
            if previous is not None and use_prev.any():
                pick = previous["clean"][rng.integers(0, len(previous["clean"]), use_prev.sum())]
                for k in src:
                    src[k][use_prev] = previous[k][pick]
            if name == "exact":
                for k in cur:
                    cur[k][rows] = src[k]
            elif name == "near":
                flips = rng.integers(0, 64, (len(rows), 6)).astype(np.uint64)
                mask = np.bitwise_or.reduce(np.uint64(1) << flips, axis=1)
                cur["phash"][rows] = (src["phash"].view(np.uint64) ^ mask).view(np.int64)
                cur["colours"][rows] = np.clip(
                    src["colours"] + rng.integers(-1, 2, (len(rows), 6)), 0, 255
                )
                cur["embedding"][rows] = _noisy(rng, src["embedding"], 0.018)
            else:
                cur["embedding"][rows] = _noisy(rng, src["embedding"], 0.0025)
            planted[name].append(gids(shard, rows))
        cur["clean"] = clean
        _commit_shard(staging, shard, cur)
        previous = cur
    return {"shards": list(range(shards))} | {
        k: np.sort(np.concatenate(v)) for k, v in planted.items()
    }


def _commit_shard(staging: Staging, shard: int, s: dict) -> None:
    m = len(s["phash"])
    keys = pa.array([f"{shard:07d}{r:06d}" for r in range(m)], pa.string())
    reasons = pa.array([KEPT] * m, pa.string())
    staging.commit(
        StageStats.of(SCORE, shard, "bench", [KEPT] * m), pa.table({"key": keys, "reason": reasons})
    )
    colours = pa.FixedSizeListArray.from_arrays(pa.array(s["colours"].ravel()), 6).cast(
        pa.list_(pa.float32())
    )
    signals = pa.table(
        {
            "key": keys,
            "reason": reasons,
            "sha256": pa.array(s["sha256"]).cast(pa.string()),
            "phash": s["phash"],
            "colours": colours,
        }
    )
    staging.commit(StageStats.of(FILTER, shard, "bench", [KEPT] * m), signals)
    buf = io.BytesIO()
    np.save(buf, s["embedding"])
    staging.commit(
        StageStats.of(EMBED, shard, "bench", [KEPT] * m),
        pa.table({"key": keys}),
        {"image.npy": buf.getvalue()},
    )
