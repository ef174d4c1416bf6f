"""Prefect flows. Thin: each task wraps one `dataprep` function; the flow puts them in order."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.task_runners import ThreadPoolTaskRunner

from dataprep.crawl import CrawlPlan, ShardStats, crawl_shards, prepare_crawl, summarize
from dataprep.crawl_status import CrawlSummary
from dataprep.state import state_dir
from pipelines.config import BuildConfig
from pipelines.locks import dataset_build_lock
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


@flow(name="build-dataset", flow_run_name=_run_name, log_prints=True)
def build_dataset(config: BuildConfig) -> CrawlSummary:
    """Crawl a URL list into WebDataset shards in the store, accounting for every URL."""
    with dataset_build_lock(config.name):  # one build of a dataset at a time
        return _build(config)


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


def run_build(config: BuildConfig) -> CrawlSummary:
    """Run `build-dataset` with the task concurrency the config asks for."""
    runner = ThreadPoolTaskRunner(max_workers=config.concurrent_tasks)
    return build_dataset.with_options(task_runner=runner)(config)
