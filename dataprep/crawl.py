"""Crawl stage: a URL list -> WebDataset shards in the store, with a reason for every URL.

Built on img2dataset's own Downloader, Resizer and WebDataset writer (`crawl_download`); mmpipe
adds
- a URL policy and a total per-request deadline (`safe_http`, installed in each crawl process),
- checks that refuse decompression bombs and truncated images before decoding,
- resume at shard granularity: shard i is always input rows [i*N, (i+1)*N), and a shard counts
  as done only once its `NNNNN.stats.json` is in the store, written after its tar and status table;
- a stable `reason` per sample and per-shard counts that must add up to the input.

Planning cuts the URL list once into per-shard slices in the store (`staging/<name>/urls/`); each
shard is then one Ray task, on any node, that reads its slice and writes its output to the store.
Staging layout under `prefix`: `_plan.json`, then per shard `NNNNN.tar` (WebDataset: .jpg, .txt,
.json), `NNNNN.parquet` (one row per input URL: status, reason, error) and `NNNNN.stats.json`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from dataprep.crawl_status import KEPT, MISSING, CrawlSummary, ShardStats, reason_for
from dataprep.errors import MmpipeError
from dataprep.ray_stages import run_shards, this_node
from dataprep.stage_config import ClusterConfig, CrawlConfig
from dataprep.store import ObjectNotFound, ObjectStore, S3Settings
from dataprep.url_list import iter_url_parts, shard_slices, slice_digest

OOM_SHARD_COUNT = 5  # shard names are 5 digits, as img2dataset writes them
PLAN_KEY = "_plan.json"
PUT_THREADS = 16  # planning writes the URL slices this many at a time


class CrawlError(MmpipeError, RuntimeError):
    pass


class CrawlPlan(BaseModel):
    """Fixes the input and the shard layout of a crawl, so a re-run resumes the same shards."""

    url_list: str
    fingerprint: str
    rows: int
    samples_per_shard: int
    shards: int
    settings: dict

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.samples_per_shard
        return start, min(self.rows, start + self.samples_per_shard)

    def groups(self, shards_per_group: int) -> list[list[int]]:
        ids = list(range(self.shards))
        return [ids[i : i + shards_per_group] for i in range(0, len(ids), shards_per_group)]


def shard_name(shard: int) -> str:
    return f"{shard:0{OOM_SHARD_COUNT}d}"


def stats_key(prefix: str, shard: int) -> str:
    return f"{prefix}/{shard_name(shard)}.stats.json"


def input_key(prefix: str, shard: int) -> str:
    """Shard ``shard``'s slice of the URL list, written once by planning: ``staging/<name>/urls``
    beside the crawl's own folder."""
    return f"{prefix.rpartition('/')[0] or prefix}/urls/{shard_name(shard)}.parquet"


def prepare_crawl(
    url_list: str,
    store: ObjectStore,
    prefix: str,
    cfg: CrawlConfig,
    s3: S3Settings | None = None,
) -> CrawlPlan:
    """Plan the crawl, or load the plan of an interrupted one (refusing a different input).

    Planning reads the URL list once, part by part, and writes each shard's slice of it to the
    store: crawl tasks read only their slice. The plan, written last, commits the slices.
    """
    key = f"{prefix}/{PLAN_KEY}"
    try:
        existing = CrawlPlan.model_validate_json(store.get_bytes(key))
    except ObjectNotFound:
        existing = None
    digest, rows, shards = hashlib.sha256(), 0, 0
    tables = (t for _, t in iter_url_parts(url_list, cfg.url_col, cfg.caption_col, s3))
    with ThreadPoolExecutor(PUT_THREADS) as puts:
        writes = []
        for shard, table in enumerate(shard_slices(tables, cfg.samples_per_shard)):
            digest.update(slice_digest(table))
            rows, shards = rows + table.num_rows, shard + 1
            if existing is None:
                writes.append(
                    puts.submit(store.put_bytes, input_key(prefix, shard), _parquet(table))
                )
            if len(writes) >= 4 * PUT_THREADS:  # a bounded backlog of slices in memory
                _wait_all(writes)
                writes = []
        _wait_all(writes)
    if rows == 0:
        raise CrawlError(f"URL list {url_list} is empty")
    plan = CrawlPlan(
        url_list=url_list,
        fingerprint=digest.hexdigest(),
        rows=rows,
        samples_per_shard=cfg.samples_per_shard,
        shards=shards,
        settings=cfg.output_settings(),
    )
    if existing is None:
        store.put_bytes(key, plan.model_dump_json(indent=2).encode())
        return plan
    if (existing.fingerprint, existing.settings) != (plan.fingerprint, plan.settings):
        raise CrawlError(
            f"{store.uri(prefix)} holds a crawl of another URL list or with other output settings "
            f"(was {existing.url_list}, {existing.settings}); use another dataset name, "
            "or delete that staging folder to start over"
        )
    return existing


def _wait_all(futures: list) -> None:
    for future in futures:
        future.result()  # raises the write's error


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def load_shard_stats(store: ObjectStore, prefix: str, shard: int) -> ShardStats | None:
    try:
        return ShardStats.model_validate_json(store.get_bytes(stats_key(prefix, shard)))
    except ObjectNotFound:
        return None


def crawl_shards(
    plan: CrawlPlan,
    shards: list[int],
    store: ObjectStore,
    prefix: str,
    cfg: CrawlConfig,
    work_root: Path | None = None,
    on_shard: Callable[[ShardStats], None] | None = None,
    cluster: ClusterConfig = ClusterConfig(),  # noqa: B008 (frozen settings)
) -> list[ShardStats]:
    """Crawl the given shards of a plan, one Ray task per shard; committed shards are skipped.
    Returns stats per shard. (``work_root`` is unused: each task works in a temporary folder of
    its own node.)"""
    done = {s: st for s in shards if (st := load_shard_stats(store, prefix, s)) is not None}
    return run_shards(
        crawl_shard,
        shards,
        done,
        (plan, store, prefix, cfg),
        on_shard,
        ray_address=cluster.ray_address,
        num_cpus=cluster.crawl_cpus,
        max_retries=cfg.max_shard_retry,
    )


def crawl_shard(
    shard: int, plan: CrawlPlan, store: ObjectStore, prefix: str, cfg: CrawlConfig
) -> ShardStats:
    """One shard: its URL slice from the store -> img2dataset here -> tar, table, stats to the
    store (the stats last: the commit marker)."""
    from dataprep.crawl_download import make_downloader

    key = input_key(prefix, shard)
    try:
        inputs = pq.read_table(io.BytesIO(store.get_bytes(key)))
    except ObjectNotFound:
        raise CrawlError(f"the URL slice of shard {shard} is missing: {store.uri(key)}") from None
    with tempfile.TemporaryDirectory(prefix="mmpipe-crawl-") as tmp:
        work = Path(tmp)
        downloader = make_downloader(cfg, work, plan.samples_per_shard, OOM_SHARD_COUNT)
        ok, _ = downloader(_write_shard_input(inputs, shard, work))
        if not ok:
            raise CrawlError(f"img2dataset failed on shard {shard} (see the log above)")
        stats = _shard_stats(plan, inputs, shard, work)
        _commit_shard(stats, work, store, prefix)
    return stats


def _write_shard_input(inputs: pa.Table, shard: int, work: Path) -> tuple:
    path = work / f"{shard_name(shard)}.feather"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, inputs.schema) as writer:
        writer.write_table(inputs)
    return shard, str(path)


def _sample_keys(plan: CrawlPlan, shard: int) -> list[str]:
    from img2dataset.downloader import compute_key

    start, end = plan.shard_rows(shard)
    oom_sample = math.ceil(math.log10(plan.samples_per_shard))
    return [compute_key(i, shard, oom_sample, OOM_SHARD_COUNT) for i in range(end - start)]


def _shard_stats(plan: CrawlPlan, inputs: pa.Table, shard: int, work: Path) -> ShardStats:
    """Add a reason to every row of img2dataset's status table and account for every input row."""
    name = shard_name(shard)
    table = pq.read_table(work / f"{name}.parquet")
    keys = table["key"].to_pylist()
    urls, captions = inputs["url"], inputs["caption"]
    if len(keys) != len(set(keys)):
        raise CrawlError(f"shard {shard}: img2dataset wrote duplicate keys")
    expected = _sample_keys(plan, shard)
    present = set(keys)
    missing = [i for i, k in enumerate(expected) if k not in present]
    if missing:  # samples img2dataset lost on an internal error: record them, never drop silently
        filler = {c: [None] * len(missing) for c in table.column_names}
        filler["key"] = [expected[i] for i in missing]
        filler["status"] = [MISSING] * len(missing)
        filler["url"] = [urls[i].as_py() for i in missing]
        filler["caption"] = [captions[i].as_py() for i in missing]
        table = pa.concat_tables([table, pa.table(filler, schema=table.schema)])
    table = table.sort_by("key")
    reasons = [
        reason_for(s, e)
        for s, e in zip(
            table["status"].to_pylist(), table["error_message"].to_pylist(), strict=True
        )
    ]
    table = table.append_column("reason", pa.array(reasons, pa.string()))
    pq.write_table(table, work / f"{name}.status.parquet")
    i2d_stats = json.loads((work / f"{name}_stats.json").read_text())
    stats = ShardStats(
        shard=shard,
        count=len(expected),
        kept=reasons.count(KEPT),
        by_status=dict(Counter(table["status"].to_pylist())),
        by_reason=dict(Counter(reasons).most_common()),
        duration_s=round(i2d_stats["duration"], 3),
        tar_bytes=(work / f"{name}.tar").stat().st_size,
        node=this_node(),
    )
    stats.check()
    return stats


def _commit_shard(stats: ShardStats, work: Path, store: ObjectStore, prefix: str) -> None:
    """Publish tar, then status table, then stats: the stats object marks the shard done."""
    name = shard_name(stats.shard)
    store.put_file(f"{prefix}/{name}.tar", work / f"{name}.tar")
    store.put_file(f"{prefix}/{name}.parquet", work / f"{name}.status.parquet")
    store.put_bytes(stats_key(prefix, stats.shard), stats.model_dump_json(indent=2).encode())


def summarize(stats: list[ShardStats]) -> CrawlSummary:
    return CrawlSummary.of(stats)
