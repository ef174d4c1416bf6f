"""The dataset build after the crawl, stage by stage: filter -> embed -> score -> dedup -> publish.

Plain functions (no Prefect): the ``build-dataset`` flow makes each one a task, and tests and
scripts call :func:`build_after_crawl`. Each stage returns its fingerprint, which the next stage
folds into its own, and its stats per shard. Every stage skips shards already committed with its
current fingerprint, so running the build again after a crash resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dataprep.crawl_status import KEPT as CRAWL_KEPT
from dataprep.dedup import STAGE as DEDUP
from dataprep.dedup import DedupConfig, dedup_shards
from dataprep.embed import (
    EMBED,
    SCORE,
    EmbedConfig,
    ScoreConfig,
    calibrated_threshold,
    embed_fingerprint,
    embed_shards,
    score_shards,
)
from dataprep.filters import STAGE as FILTER
from dataprep.filters import FilterConfig, filter_fingerprint, filter_shards
from dataprep.publish import DatasetManifest, PublishConfig, ScorerInfo, publish
from dataprep.stages import CRAWL, KEPT, StageStats, StageSummary, Staging, file_sha256, fingerprint


class StagesConfig(BaseModel):
    """Settings of the stages after the crawl."""

    model_config = ConfigDict(extra="forbid")

    filter: FilterConfig = FilterConfig()
    embed: EmbedConfig = EmbedConfig()
    score: ScoreConfig = ScoreConfig()
    dedup: DedupConfig = DedupConfig()
    publish: PublishConfig = PublishConfig()


class StageResult(BaseModel):
    stage: str
    fingerprint: str
    summary: StageSummary
    threshold: float | None = None  # score stage: the absolute threshold applied


def crawl_result(staging: Staging, shards: list[int]) -> StageResult:
    stats = [staging.crawl_stats(s) for s in shards]
    as_stage = [
        StageStats(
            stage=CRAWL,
            shard=s.shard,
            fingerprint="",
            count=s.count,
            kept=s.kept,
            by_reason={(KEPT if r == CRAWL_KEPT else r): n for r, n in s.by_reason.items()},
        )
        for s in stats
    ]
    fp = staging.crawl_fingerprint()
    return StageResult(stage=CRAWL, fingerprint=fp, summary=StageSummary.of(CRAWL, as_stage))


def _result(stage: str, fp: str, stats: list[StageStats], previous: StageResult) -> StageResult:
    summary = StageSummary.of(stage, stats)
    if summary.count != previous.summary.kept:
        raise AssertionError(
            f"{stage} saw {summary.count} samples, {previous.stage} kept {previous.summary.kept}"
        )
    return StageResult(stage=stage, fingerprint=fp, summary=summary)


def run_filter(
    staging: Staging, shards: list[int], cfg: FilterConfig, crawl: StageResult
) -> StageResult:
    return _result(
        FILTER, filter_fingerprint(staging, cfg), filter_shards(staging, shards, cfg), crawl
    )


def with_weights_identity(cfg: EmbedConfig) -> EmbedConfig:
    """The embed config with the weights' sha256 filled in (the scorer's identity)."""
    if cfg.weights is None:
        raise ValueError("embed.weights is not set: give a local open_clip state dict")
    if not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"scorer weights not found: {cfg.weights}")
    return cfg.model_copy(update={"weights_sha256": file_sha256(cfg.weights)})


def run_embed(
    staging: Staging,
    shards: list[int],
    cfg: EmbedConfig,
    filtered: StageResult,
    on_shard: Callable[[StageStats], None] | None = None,
) -> StageResult:
    cfg = with_weights_identity(cfg)
    stats = embed_shards(staging, shards, cfg, filtered.fingerprint, on_shard)
    return _result(EMBED, embed_fingerprint(filtered.fingerprint, cfg), stats, filtered)


def run_score(
    staging: Staging, shards: list[int], cfg: ScoreConfig, weights: str, embedded: StageResult
) -> StageResult:
    threshold, stats = score_shards(
        staging, shards, cfg, embedded.fingerprint, calibrated_threshold(weights)
    )
    result = _result(SCORE, stats[0].fingerprint if stats else "", stats, embedded)
    return result.model_copy(update={"threshold": threshold})


def run_dedup(
    staging: Staging, shards: list[int], cfg: DedupConfig, scored: StageResult, work: Path
) -> StageResult:
    stats = dedup_shards(staging, shards, cfg, scored.fingerprint, work)
    return _result(DEDUP, stats[0].fingerprint if stats else "", stats, scored)


def run_publish(
    staging: Staging,
    shards: list[int],
    cfg: StagesConfig,
    results: list[StageResult],
    config: dict,
    work: Path,
) -> DatasetManifest:
    by_stage = {r.stage: r for r in results}
    embed = with_weights_identity(cfg.embed)
    scorer = ScorerInfo(
        model=embed.model,
        weights=embed.weights,
        sha256=embed.weights_sha256,
        threshold=by_stage[SCORE].threshold,
        top_fraction=cfg.score.top_fraction,
    )
    fp = fingerprint(
        "publish", by_stage[DEDUP].fingerprint, cfg.publish.model_dump(exclude={"version"})
    )
    summaries = {r.stage: r.summary for r in results}
    return publish(staging, shards, cfg.publish, fp, summaries, scorer, config, work)


def build_after_crawl(
    staging: Staging,
    cfg: StagesConfig,
    work: Path,
    config: dict | None = None,
    log: Callable[[str], None] = print,
) -> DatasetManifest:
    """Run every stage after a finished crawl and publish; resumes whatever is committed."""
    shards = list(range(staging.crawl_plan().shards))
    results = [crawl_result(staging, shards)]
    results.append(run_filter(staging, shards, cfg.filter, results[-1]))
    results.append(run_embed(staging, shards, cfg.embed, results[-1]))
    results.append(run_score(staging, shards, cfg.score, cfg.embed.weights, results[-1]))
    results.append(run_dedup(staging, shards, cfg.dedup, results[-1], work))
    for r in results:
        log(f"{r.stage}: {r.summary.kept}/{r.summary.count} kept {r.summary.by_reason}")
    config = config if config is not None else cfg.model_dump(mode="json")
    return run_publish(staging, shards, cfg, results, config, work)
