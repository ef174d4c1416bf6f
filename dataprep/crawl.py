"""Crawl stage: a URL list -> WebDataset shards in the store, with a reason for every URL.

Built on img2dataset's own Downloader, Resizer and WebDataset writer (`crawl_download`); mmpipe
adds
- a URL policy and a total per-request deadline (`safe_http`, installed in each download process),
- checks that refuse decompression bombs and truncated images before decoding,
- resume at shard granularity: shard i is always input rows [i*N, (i+1)*N), and a shard counts
  as done only once its `NNNNN.stats.json` is in the store, written after its tar and status table;
- a stable `reason` per sample and per-shard counts that must add up to the input.

Staging layout under `prefix`: `_plan.json`, then per shard `NNNNN.tar` (WebDataset: .jpg, .txt,
.json), `NNNNN.parquet` (one row per input URL: status, reason, error) and `NNNNN.stats.json`.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from dataprep.crawl_status import KEPT, MISSING, CrawlSummary, ShardStats, reason_for
from dataprep.errors import MmpipeError
from dataprep.stage_config import CrawlConfig
from dataprep.store import ObjectNotFound, ObjectStore
from dataprep.url_list import fingerprint, read_url_list

OOM_SHARD_COUNT = 5  # shard names are 5 digits, as img2dataset writes them
PLAN_KEY = "_plan.json"


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


def prepare_crawl(url_list: str, store: ObjectStore, prefix: str, cfg: CrawlConfig) -> CrawlPlan:
    """Plan the crawl, or load the plan of an interrupted one (refusing a different input)."""
    table = read_url_list(url_list, cfg.url_col, cfg.caption_col)
    if table.num_rows == 0:
        raise CrawlError(f"URL list {url_list} is empty")
    plan = CrawlPlan(
        url_list=url_list,
        fingerprint=fingerprint(table),
        rows=table.num_rows,
        samples_per_shard=cfg.samples_per_shard,
        shards=math.ceil(table.num_rows / cfg.samples_per_shard),
        settings=cfg.output_settings(),
    )
    key = f"{prefix}/{PLAN_KEY}"
    try:
        existing = CrawlPlan.model_validate_json(store.get_bytes(key))
    except ObjectNotFound:
        store.put_bytes(key, plan.model_dump_json(indent=2).encode())
        return plan
    if (existing.fingerprint, existing.settings) != (plan.fingerprint, plan.settings):
        raise CrawlError(
            f"{store.uri(prefix)} holds a crawl of another URL list or with other output settings "
            f"(was {existing.url_list}, {existing.settings}); use another dataset name, "
            "or delete that staging folder to start over"
        )
    return existing


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
    work_root: Path,
    on_shard: Callable[[ShardStats], None] | None = None,
) -> list[ShardStats]:
    """Crawl the given shards of a plan; committed shards are skipped. Returns stats per shard."""
    done = {s: st for s in shards if (st := load_shard_stats(store, prefix, s)) is not None}
    todo = [s for s in shards if s not in done]
    if todo:
        work_root.mkdir(parents=True, exist_ok=True)
        table = read_url_list(plan.url_list, cfg.url_col, cfg.caption_col)
        if table.num_rows != plan.rows:
            raise CrawlError(f"URL list {plan.url_list} changed since the crawl was planned")
        with tempfile.TemporaryDirectory(dir=work_root, prefix="crawl-") as tmp:
            for stats in _run_img2dataset(plan, table, todo, Path(tmp), cfg):
                _commit_shard(stats, Path(tmp), store, prefix)
                done[stats.shard] = stats
                if on_shard is not None:
                    on_shard(stats)
    return [done[s] for s in shards]


def _run_img2dataset(plan, table, shards, work: Path, cfg: CrawlConfig):
    """Yield each shard's stats as soon as img2dataset has finished it."""
    from dataprep.crawl_download import make_downloader

    downloader = make_downloader(cfg, work, plan.samples_per_shard, OOM_SHARD_COUNT)
    pending = list(shards)
    for _attempt in range(cfg.max_shard_retry + 1):
        rows = [_write_shard_input(plan, table, s, work) for s in pending]
        failed = []
        # spawn: img2dataset's own choice; workers must not inherit the caller's threads.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(cfg.processes, len(rows)), maxtasksperchild=5) as pool:
            for ok, (shard, _path) in pool.imap_unordered(downloader, rows):
                if ok:
                    yield _shard_stats(plan, table, shard, work)
                else:
                    failed.append(shard)
        if not failed:
            return
        pending = sorted(failed)
    raise CrawlError(
        f"shards {pending} failed {cfg.max_shard_retry + 1} times (see the log above); "
        "run the build again to resume"
    )


def _write_shard_input(plan: CrawlPlan, table: pa.Table, shard: int, work: Path) -> tuple:
    start, end = plan.shard_rows(shard)
    path = work / f"{shard_name(shard)}.feather"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.slice(start, end - start))
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
        start, _ = plan.shard_rows(shard)
        filler = {c: [None] * len(missing) for c in table.column_names}
        filler["key"] = [expected[i] for i in missing]
        filler["status"] = [MISSING] * len(missing)
        filler["url"] = [urls[start + i].as_py() for i in missing]
        filler["caption"] = [captions[start + i].as_py() for i in missing]
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
