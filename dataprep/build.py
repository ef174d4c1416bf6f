"""The dataset build after the crawl, stage by stage: filter -> embed -> score -> dedup -> publish.

Plain functions (no Prefect). :data:`STAGES` is the one stage order: the ``build-dataset`` flow
makes one task of each, and tests and scripts call :func:`build_after_crawl`, which runs the
same list. Each stage returns its fingerprint, which the next stage folds into its own, and its
stats per shard. Every stage skips shards already committed with its current fingerprint, so
running the build again after a crash resumes where it stopped. The per-shard stages run one
Ray task (embed: one actor call) per shard on ``cluster.ray_address``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    store_s3,
)
from dataprep.filters import STAGE as FILTER
from dataprep.filters import FilterConfig, filter_fingerprint, filter_shards
from dataprep.publish import DatasetManifest, PublishConfig, ScorerInfo, publish
from dataprep.ray_session import init_ray
from dataprep.stage_config import ClusterConfig
from dataprep.stages import CRAWL, KEPT, StageStats, StageSummary, Staging, file_sha256, fingerprint
from dataprep.store import S3Settings, local_copy, local_path, require_file


class StagesConfig(BaseModel):
    """Settings of the stages after the crawl."""

    model_config = ConfigDict(extra="forbid")

    filter: FilterConfig = FilterConfig()
    embed: EmbedConfig = EmbedConfig()
    score: ScoreConfig = ScoreConfig()
    dedup: DedupConfig = DedupConfig()
    publish: PublishConfig = PublishConfig()
    cluster: ClusterConfig = ClusterConfig()


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


OnShard = Callable[[StageStats], None] | None


@dataclass(frozen=True)
class BuildContext:
    """What every stage after the crawl works on."""

    staging: Staging
    shards: list[int]
    cfg: StagesConfig
    work: Path  # the driver's scratch folder (dedup, publish)


def _result(stage: str, fp: str, stats: list[StageStats], previous: StageResult) -> StageResult:
    summary = StageSummary.of(stage, stats)
    if summary.count != previous.summary.kept:
        raise AssertionError(
            f"{stage} saw {summary.count} samples, {previous.stage} kept {previous.summary.kept}"
        )
    return StageResult(stage=stage, fingerprint=fp, summary=summary)


def run_filter(ctx: BuildContext, crawl: StageResult, on_shard: OnShard = None) -> StageResult:
    cfg = ctx.cfg.filter
    stats = filter_shards(ctx.staging, ctx.shards, cfg, ctx.cfg.cluster, on_shard)
    return _result(FILTER, filter_fingerprint(ctx.staging, cfg), stats, crawl)


def with_weights_identity(cfg: EmbedConfig, s3: S3Settings | None = None) -> EmbedConfig:
    """The embed config with the weights' sha256 filled in (the scorer's identity). The weights
    are a local file or an object in a store (read once here, and on each embedding node)."""
    if cfg.weights is None:
        raise ValueError("embed.weights is not set: give an open_clip state dict")
    path = local_path(cfg.weights)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"scorer weights not found: {cfg.weights}")
    if path is None:
        require_file(cfg.weights, s3, "scorer weights")
    sha256 = file_sha256(str(local_copy(cfg.weights, s3)))
    return cfg.model_copy(update={"weights_sha256": sha256})


def run_embed(ctx: BuildContext, filtered: StageResult, on_shard: OnShard = None) -> StageResult:
    cfg = with_weights_identity(ctx.cfg.embed, store_s3(ctx.staging.store))
    cluster = ctx.cfg.cluster
    stats = embed_shards(ctx.staging, ctx.shards, cfg, filtered.fingerprint, on_shard, cluster)
    return _result(EMBED, embed_fingerprint(filtered.fingerprint, cfg), stats, filtered)


def run_score(ctx: BuildContext, embedded: StageResult, on_shard: OnShard = None) -> StageResult:
    cfg = ctx.cfg
    calibrated = calibrated_threshold(cfg.embed.weights, store_s3(ctx.staging.store))
    threshold, stats = score_shards(
        ctx.staging, ctx.shards, cfg.score, embedded.fingerprint, calibrated, cfg.cluster, on_shard
    )
    result = _result(SCORE, stats[0].fingerprint if stats else "", stats, embedded)
    return result.model_copy(update={"threshold": threshold})


def run_dedup(ctx: BuildContext, scored: StageResult, on_shard: OnShard = None) -> StageResult:
    cfg = ctx.cfg
    address = cfg.cluster.ray_address
    stats = dedup_shards(ctx.staging, ctx.shards, cfg.dedup, scored.fingerprint, ctx.work, address)
    return _result(DEDUP, stats[0].fingerprint if stats else "", stats, scored)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[BuildContext, StageResult, OnShard], StageResult]


#: The stages after the crawl, in order; each takes the result of the one before. Publish follows.
STAGES: tuple[Stage, ...] = (
    Stage(FILTER, run_filter),
    Stage(EMBED, run_embed),
    Stage(SCORE, run_score),
    Stage(DEDUP, run_dedup),
)


def run_publish(
    staging: Staging,
    shards: list[int],
    cfg: StagesConfig,
    results: list[StageResult],
    config: dict,
    work: Path,
) -> DatasetManifest:
    by_stage = {r.stage: r for r in results}
    embed = with_weights_identity(cfg.embed, store_s3(staging.store))
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
    address = cfg.cluster.ray_address
    return publish(
        staging, shards, cfg.publish, fp, summaries, scorer, config, work, ray_address=address
    )


def build_after_crawl(
    staging: Staging,
    cfg: StagesConfig,
    work: Path,
    config: dict | None = None,
    log: Callable[[str], None] = print,
) -> DatasetManifest:
    """Run every stage after a finished crawl and publish; resumes whatever is committed."""
    init_ray(cfg.cluster.ray_address)  # once for the whole build
    ctx = BuildContext(staging, list(range(staging.crawl_plan().shards)), cfg, work)
    results = [crawl_result(staging, ctx.shards)]
    for stage in STAGES:
        results.append(stage.run(ctx, results[-1], None))
    for r in results:
        log(f"{r.stage}: {r.summary.kept}/{r.summary.count} kept {r.summary.by_reason}")
    config = config if config is not None else cfg.model_dump(mode="json")
    return run_publish(staging, ctx.shards, cfg, results, config, work)
