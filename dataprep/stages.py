"""What the build stages after the crawl share: staging layout, commit markers, accounting.

Every stage reads the crawl's WebDataset shards (never rewritten) plus the decisions of the
stages before it, and writes per shard a decision table ``NNNNN.parquet`` (one row per input
sample: ``key``, ``reason`` and the stage's signals) and then ``NNNNN.stats.json``, the commit
marker, each published atomically. A stage's input is the previous stage's kept samples, so
every crawled sample ends kept or with exactly one drop reason.

A stats file carries the stage's *fingerprint*: a hash of its settings and of the fingerprint
of the stage before. A shard counts as done only when its stats hold the current fingerprint,
so changing, say, the CLIP-score threshold redoes the score stage and what follows, and reuses
the crawl, the filters and the embeddings.

Layout: ``staging/<name>/<stage>/NNNNN.{parquet,stats.json}`` beside ``staging/<name>/crawl/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from dataprep.crawl import PLAN_KEY, CrawlPlan, shard_name
from dataprep.crawl_status import ShardStats
from dataprep.errors import MmpipeError
from dataprep.ray_stages import this_node
from dataprep.store import ObjectNotFound, ObjectStore, StoreError

KEPT = "kept"
CRAWL = "crawl"


class StageError(MmpipeError, RuntimeError):
    """A stage's input is missing or unreadable; the message names the object."""


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (settings, upstream fingerprints)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageStats(BaseModel):
    """What happened to every input sample of one shard in one stage. Written last."""

    stage: str
    shard: int
    fingerprint: str
    count: int  # input samples (the previous stage's kept)
    kept: int
    by_reason: dict[str, int]  # KEPT and each drop reason
    node: str | None = None  # the Ray node that ran it

    @classmethod
    def of(cls, stage: str, shard: int, fp: str, reasons: list[str]) -> StageStats:
        stats = cls(
            stage=stage,
            shard=shard,
            fingerprint=fp,
            count=len(reasons),
            kept=reasons.count(KEPT),
            by_reason=dict(Counter(reasons).most_common()),
            node=this_node(),
        )
        stats.check()
        return stats

    def check(self) -> None:
        """Counts must add up to the input: nothing silently lost or duplicated."""
        if sum(self.by_reason.values()) != self.count or self.by_reason.get(KEPT, 0) != self.kept:
            raise AssertionError(
                f"{self.stage} shard {self.shard}: reasons {self.by_reason} do not add up to "
                f"{self.count} inputs with {self.kept} kept"
            )


class StageSummary(BaseModel):
    """A stage's counts over all shards."""

    stage: str
    shards: int
    count: int
    kept: int
    by_reason: dict[str, int]

    @classmethod
    def of(cls, stage: str, stats: list[StageStats]) -> StageSummary:
        by_reason: Counter[str] = Counter()
        for s in stats:
            by_reason.update(s.by_reason)
        return cls(
            stage=stage,
            shards=len(stats),
            count=sum(s.count for s in stats),
            kept=sum(s.kept for s in stats),
            by_reason=dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        )


@dataclass(frozen=True)
class Staging:
    """The staging area of one build in a store (picklable: goes to Ray workers)."""

    store: ObjectStore
    name: str

    def prefix(self, stage: str) -> str:
        return f"staging/{self.name}/{stage}"

    def key(self, stage: str, shard: int, suffix: str) -> str:
        return f"{self.prefix(stage)}/{shard_name(shard)}.{suffix}"

    def uri(self, stage: str, shard: int, suffix: str) -> str:
        return self.store.uri(self.key(stage, shard, suffix))

    # --- the crawl's output ---------------------------------------------------------------

    def crawl_plan(self) -> CrawlPlan:
        key = f"{self.prefix(CRAWL)}/{PLAN_KEY}"
        try:
            return CrawlPlan.model_validate_json(self.store.get_bytes(key))
        except ObjectNotFound:
            raise StageError(f"no crawl plan at {self.store.uri(key)}: crawl first") from None

    def crawl_fingerprint(self) -> str:
        plan = self.crawl_plan()
        return fingerprint(plan.fingerprint, plan.settings, plan.samples_per_shard)

    def crawl_stats(self, shard: int) -> ShardStats:
        try:
            return ShardStats.model_validate_json(
                self.store.get_bytes(self.key(CRAWL, shard, "stats.json"))
            )
        except ObjectNotFound:
            raise StageError(
                f"crawl shard {shard} is not committed: {self.uri(CRAWL, shard, 'stats.json')} "
                "is missing"
            ) from None

    def samples(self, shard: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {extension: bytes}) of each sample in crawl shard ``shard``, streamed."""
        key = self.key(CRAWL, shard, "tar")
        try:
            with self.store.open(key) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                yield from _group_members(tar)
        except ObjectNotFound:
            raise StageError(f"crawl shard not found: {self.store.uri(key)}") from None
        except (tarfile.TarError, OSError, StoreError) as e:
            raise StageError(f"cannot read crawl shard {self.store.uri(key)}: {e}") from e

    # --- stage output ---------------------------------------------------------------------

    def stats(self, stage: str, shard: int, fp: str) -> StageStats | None:
        """The shard's committed stats if they were made with fingerprint ``fp``."""
        try:
            raw = self.store.get_bytes(self.key(stage, shard, "stats.json"))
        except ObjectNotFound:
            return None
        stats = StageStats.model_validate_json(raw)
        return stats if stats.fingerprint == fp else None

    def commit(self, stats: StageStats, table: pa.Table, files: dict[str, bytes] = {}) -> None:  # noqa: B006
        """Publish the decision table and extra files, then the stats (the commit marker)."""
        stats.check()
        if table.num_rows != stats.count:
            raise AssertionError(f"{stats.stage} shard {stats.shard}: table/stats mismatch")
        for suffix, data in files.items():
            self.store.put_bytes(self.key(stats.stage, stats.shard, suffix), data)
        self.store.put_bytes(self.key(stats.stage, stats.shard, "parquet"), table_bytes(table))
        self.store.put_bytes(
            self.key(stats.stage, stats.shard, "stats.json"),
            stats.model_dump_json(indent=2).encode(),
        )

    def table(self, stage: str, shard: int) -> pa.Table:
        """A committed decision table; StageError naming it if missing or unreadable."""
        return read_table(self.store, self.key(stage, shard, "parquet"))

    def kept_keys(self, stage: str, shard: int) -> list[str]:
        table = self.table(stage, shard)
        return [
            k
            for k, r in zip(table["key"].to_pylist(), table["reason"].to_pylist(), strict=True)
            if r == KEPT
        ]


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_table(store: ObjectStore, key: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(store.get_bytes(key)))
    except ObjectNotFound:
        raise StageError(f"stage output not found: {store.uri(key)}") from None
    except (pa.ArrowException, OSError) as e:
        raise StageError(f"corrupt stage output {store.uri(key)}: {e}") from e


def _group_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """WebDataset grouping: consecutive members sharing a key form one sample."""
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        base, _, ext = member.name.partition(".")
        if base != key:
            if key is not None:
                yield key, files
            key, files = base, {}
        files[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, files


def file_sha256(path: str) -> str:
    """sha256 of a local file (model weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
