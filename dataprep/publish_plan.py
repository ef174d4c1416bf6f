"""Where publish puts each kept sample, from the per-shard kept counts alone.

Sample ``g`` (its index in global (source shard, row) order) goes to position ``permute(g)`` of
the shuffled dataset: output shard ``p // samples_per_shard``, slot ``p % samples_per_shard``.
``permute`` is a seeded bijection on [0, N) (a Feistel network, cycle-walked into range), so any
task computes its own samples' destinations from its offset and no process holds N items.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

SHARD_INDEX = "shards.parquet"  # beside manifest.json: one row per shard
INDEX_COLUMNS = ("path", "samples", "bytes", "sha256")

_ROUNDS = 6
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _round_keys(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x5EED]).integers(0, 2**63, _ROUNDS, dtype=np.uint64)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A keyed 64-bit hash (splitmix64's finaliser); uint64 arithmetic wraps by design."""
    x = (x ^ key) * _MIX[0]
    x = (x ^ (x >> np.uint64(30))) * _MIX[1]
    x = (x ^ (x >> np.uint64(27))) * _MIX[2]
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    """A bijection on [0, 4**half_bits)."""
    mask = np.uint64((1 << half_bits) - 1)
    left, right = x >> np.uint64(half_bits), x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right, key) & mask)
    return (left << np.uint64(half_bits)) | right


def permute(indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Positions of ``indices`` (each in [0, n)) under the seeded bijection of [0, n)."""
    x = np.asarray(indices, dtype=np.uint64)
    if n <= 1:
        return x.astype(np.int64)
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)  # domain 4**half_bits < 4n
    keys = _round_keys(seed)
    x = _feistel(x, half_bits, keys)
    # Cycle-walking: re-encrypt what fell outside [0, n); each value stays inside its own
    # cycle of the larger bijection, so the result is a bijection of [0, n).
    while (out := np.flatnonzero(x >= np.uint64(n))).size:
        x[out] = _feistel(x[out], half_bits, keys)
    return x.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class PublishPlan:
    offsets: np.ndarray  # int64, len(sources) + 1: prefix sums of the kept counts
    samples_per_shard: int
    seed: int

    @property
    def samples(self) -> int:
        return int(self.offsets[-1])

    @property
    def outputs(self) -> int:
        return -(-self.samples // self.samples_per_shard)

    def destinations(self, source: int) -> tuple[np.ndarray, np.ndarray]:
        """(output shard, slot) of each kept sample of the ``source``-th source shard, in order."""
        start, stop = int(self.offsets[source]), int(self.offsets[source + 1])
        position = permute(np.arange(start, stop, dtype=np.uint64), self.samples, self.seed)
        return position // self.samples_per_shard, position % self.samples_per_shard

    def output_samples(self, output: int) -> int:
        return min(self.samples_per_shard, self.samples - output * self.samples_per_shard)


def plan_publish(
    kept_counts: np.ndarray | list[int], samples_per_shard: int, seed: int
) -> PublishPlan:
    """The plan for source shards holding ``kept_counts`` kept samples: O(shards) memory."""
    counts = np.asarray(kept_counts, dtype=np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return PublishPlan(offsets, samples_per_shard, seed)


def shard_size(
    samples_per_shard: int | None, bytes_per_shard: int | None, samples: int, sample_bytes: int
) -> int:
    """Samples per output shard: as configured, or as many average samples as fit the bytes."""
    if samples_per_shard is not None:
        return samples_per_shard
    average = sample_bytes / max(1, samples)
    return max(1, int(bytes_per_shard // average)) if average else max(1, samples)


def shard_name(output: int, outputs: int) -> str:
    """``00042.tar``: at least 5 digits, and as many as the version's last shard needs, so the
    names of one version sort in order and brace patterns cover them (10**6+ shards too)."""
    return f"{output:0{max(5, len(str(max(0, outputs - 1))))}d}.tar"


def shard_index_bytes(rows: list[dict[str, Any]]) -> bytes:
    """The shard index (parquet) of rows with INDEX_COLUMNS: O(shards), written by publish."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = (pa.string(), pa.int64(), pa.int64(), pa.string())
    schema = pa.schema(list(zip(INDEX_COLUMNS, types, strict=True)))
    table = pa.table({c: [r[c] for r in rows] for c in INDEX_COLUMNS}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def shard_index_rows(data: bytes) -> list[dict[str, Any]]:
    """The rows of a shard index, as publish wrote them (ValueError if it is not one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data), columns=list(INDEX_COLUMNS))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"not a shard index: {e}") from None
    return table.to_pylist()
