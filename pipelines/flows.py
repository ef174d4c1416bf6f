"""Prefect flows. Thin: each task wraps one `dataprep` function; the flow puts them in order."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from dataprep import build
from dataprep.crawl import CrawlPlan, ShardStats, crawl_shards, prepare_crawl, summarize
from dataprep.crawl_status import CrawlSummary
from dataprep.filters import filter_fingerprint, filter_shard
from dataprep.publish import AlteredDataset, list_datasets, manifest_uri
from dataprep.stages import StageStats, StageSummary, Staging
from dataprep.state import state_dir
from pipelines import build_report
from pipelines.config import BuildConfig
from pipelines.events import emit_dataset_published
from pipelines.locks import BuildLock, dataset_build_lock
from pipelines.report import crawl_markdown, reason_rows


@task(name="plan-crawl", retries=2, retry_delay_seconds=2)
def plan_crawl(config: BuildConfig) -> CrawlPlan:
    return prepare_crawl(config.urls, config.store.open(), config.staging_prefix(), config.crawl)


def _group_name() -> str:
    from prefect.runtime import task_run

    shards = task_run.parameters["shards"]
    return f"crawl shards {shards[0]:05d}-{shards[-1]:05d}"


@task(name="crawl-shards", task_run_name=_group_name)
def crawl_group(config: BuildConfig, plan: CrawlPlan, shards: list[int]) -> list[ShardStats]:
    logger = get_run_logger()
    work = state_dir() / "work" / config.name

    def log_shard(stats: ShardStats) -> None:
        logger.info("shard %05d: %d/%d kept", stats.shard, stats.kept, stats.count)

    store = config.store.open()
    return crawl_shards(
        plan, shards, store, config.staging_prefix(), config.crawl, work, on_shard=log_shard
    )


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"build {flow_run.parameters['config'].name}"


class BuildResult(BaseModel):
    """What a `build-dataset` run produced."""

    crawl: CrawlSummary
    stages: dict[str, StageSummary] = {}  # filter, embed, score, dedup
    manifest_uri: str | None = None  # the published version's manifest.json (None: crawl only)
    version: str | None = None


@flow(name="build-dataset", flow_run_name=_run_name, log_prints=True)
def build_dataset(config: BuildConfig) -> BuildResult:
    """Crawl a URL list, filter, CLIP-score, deduplicate and publish a dataset version."""
    with dataset_build_lock(config.name, lease_s=config.lock_lease_s) as lock:  # one at a time
        crawl = _build(config)
        lock.check()
        if config.crawl_only:
            return BuildResult(crawl=crawl)
        return _build_after_crawl(config, crawl, lock)


def _build(config: BuildConfig) -> CrawlSummary:
    plan = plan_crawl(config)
    groups = plan.groups(config.crawl.shards_per_task)
    progress = create_progress_artifact(
        0.0, key=f"{config.name}-crawl-progress", description="crawl: share of shards done"
    )
    crawl = crawl_group.with_options(
        retries=config.task_retries, retry_delay_seconds=config.task_retry_delay_s
    )
    futures = [crawl.submit(config, plan, shards) for shards in groups]
    stats: list[ShardStats] = []
    for future in futures:
        stats.extend(future.result())
        update_progress_artifact(progress, 100.0 * len(stats) / plan.shards)
    summary = summarize(stats)
    if summary.count != plan.rows:
        raise RuntimeError(f"crawl accounted for {summary.count} of {plan.rows} URLs")
    location = config.store.open().uri(config.staging_prefix())
    create_table_artifact(
        reason_rows(summary),
        key=f"{config.name}-crawl-counts",
        description=f"crawl of {config.name}: URLs by status and reason",
    )
    create_markdown_artifact(
        crawl_markdown(config.name, summary, location),
        key=f"{config.name}-crawl-summary",
        description=f"crawl of {config.name}",
    )
    return summary


# --- stages after the crawl --------------------------------------------------------------


def _staging(config: BuildConfig) -> Staging:
    return Staging(config.store.open(), config.name)


def _work(config: BuildConfig) -> Path:
    return state_dir() / "work" / config.name


def _shards_name() -> str:
    from prefect.runtime import task_run

    shards = task_run.parameters["shards"]
    return f"filter shards {shards[0]:05d}-{shards[-1]:05d}"


@task(name="filter-shards", task_run_name=_shards_name)
def filter_group(config: BuildConfig, shards: list[int], fp: str) -> list[StageStats]:
    staging = _staging(config)
    return [filter_shard(staging, shard, config.filter, fp) for shard in shards]


@task(name="embed")
def embed_task(config: BuildConfig, filtered: build.StageResult) -> build.StageResult:
    logger = get_run_logger()

    def log_shard(stats: StageStats) -> None:
        logger.info("embedded shard %05d: %d samples", stats.shard, stats.count)

    return build.run_embed(_staging(config), _all_shards(config), config.embed, filtered, log_shard)


@task(name="score")
def score_task(config: BuildConfig, embedded: build.StageResult) -> build.StageResult:
    staging = _staging(config)
    weights = config.embed.weights
    return build.run_score(staging, _all_shards(config), config.score, weights, embedded)


@task(name="dedup")
def dedup_task(config: BuildConfig, scored: build.StageResult) -> build.StageResult:
    staging = _staging(config)
    return build.run_dedup(staging, _all_shards(config), config.dedup, scored, _work(config))


def _unless_altered(task, task_run, state) -> bool:
    """Retry a failed publish, but not one that found its version altered: that stays so."""
    try:
        state.result()
    except AlteredDataset:
        return False
    except Exception:
        return True
    return True


@task(name="publish", retry_condition_fn=_unless_altered)
def publish_task(config: BuildConfig, results: list[build.StageResult]):
    config_dump = config.model_dump(mode="json", exclude={"store"})
    staging = _staging(config)
    stages = config.stages()
    return build.run_publish(
        staging, _all_shards(config), stages, results, config_dump, _work(config)
    )


def _all_shards(config: BuildConfig) -> list[int]:
    return list(range(_staging(config).crawl_plan().shards))


def _retrying(task_fn, config: BuildConfig):
    return task_fn.with_options(
        retries=config.task_retries, retry_delay_seconds=config.task_retry_delay_s
    )


def _filter_stage(config: BuildConfig, crawl: build.StageResult) -> build.StageResult:
    staging = _staging(config)
    fp = filter_fingerprint(staging, config.filter)
    shards = _all_shards(config)
    per_task = config.crawl.shards_per_task
    groups = [shards[i : i + per_task] for i in range(0, len(shards), per_task)]
    futures = [_retrying(filter_group, config).submit(config, g, fp) for g in groups]
    stats = [s for future in futures for s in future.result()]
    summary = StageSummary.of("filter", stats)
    return build.StageResult(stage="filter", fingerprint=fp, summary=summary)


def _build_after_crawl(
    config: BuildConfig, crawl_summary: CrawlSummary, lock: BuildLock
) -> BuildResult:
    if config.embed.weights is None:
        raise ValueError(
            "embed.weights is not set: the CLIP-score stage needs a scorer (local open_clip "
            "weights); set crawl_only=true to stop after the crawl"
        )
    staging = _staging(config)
    results = [build.crawl_result(staging, _all_shards(config))]
    results.append(_filter_stage(config, results[-1]))
    results.append(_retrying(embed_task, config)(config, results[-1]))
    results.append(_retrying(score_task, config)(config, results[-1]))
    results.append(_retrying(dedup_task, config)(config, results[-1]))
    lock.check()  # a build whose lock was taken over must not publish
    published_before = set(list_datasets(staging.store))
    manifest = _retrying(publish_task, config)(config, results)
    uri = manifest_uri(staging.store, manifest.name, manifest.version)
    _report_stages(config, staging, results, manifest, uri)
    if (manifest.name, manifest.version) not in published_before:  # a rebuild emits nothing
        emit_dataset_published(manifest.name, manifest.version, uri, samples=manifest.samples)
    return BuildResult(
        crawl=crawl_summary,
        stages={r.stage: r.summary for r in results[1:]},
        manifest_uri=uri,
        version=manifest.version,
    )


def _report_stages(config, staging: Staging, results, manifest, uri: str) -> None:
    """Artifacts: counts by reason per stage, the score histogram, example images."""
    name = config.name
    for result in results[1:]:
        create_table_artifact(
            build_report.summary_rows(result.summary),
            key=f"{name}-{result.stage}-counts",
            description=f"{result.stage} stage of {name}: samples by outcome and reason",
        )
    shards = _all_shards(config)
    threshold = next(r.threshold for r in results if r.stage == "score")
    histogram = build_report.score_histogram(build_report.all_scores(staging, shards), threshold)
    grid = build_report.example_grid(staging, shards)
    images = []
    for title, png, key in (
        ("CLIP-score histogram", histogram, "score-histogram.png"),
        ("Examples: kept and dropped", grid, "examples.png"),
    ):
        store_key = f"staging/{name}/report/{key}"
        staging.store.put_bytes(store_key, png)
        images.append(build_report.png_markdown(title, png, staging.store.uri(store_key)))
    create_markdown_artifact(
        "\n".join(images), key=f"{name}-build-images", description=f"build of {name}"
    )
    create_markdown_artifact(
        build_report.manifest_markdown(manifest, uri),
        key=f"{name}-dataset-summary",
        description=f"published {name}@{manifest.version}",
    )


def run_build(config: BuildConfig) -> BuildResult:
    """Run `build-dataset` with the task concurrency the config asks for."""
    runner = ThreadPoolTaskRunner(max_workers=config.concurrent_tasks)
    return build_dataset.with_options(task_runner=runner)(config)
