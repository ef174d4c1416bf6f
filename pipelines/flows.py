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
from dataprep.publish import AlteredDataset, list_datasets, manifest_uri
from dataprep.ray_session import init_ray
from dataprep.stages import StageStats, StageSummary, Staging
from dataprep.state import state_dir
from pipelines import build_report
from pipelines.config import BuildConfig
from pipelines.events import emit_dataset_published
from pipelines.locks import BuildLock, dataset_build_lock
from pipelines.report import crawl_markdown, reason_rows


@task(name="plan-crawl", retries=2, retry_delay_seconds=2)
def plan_crawl(config: BuildConfig) -> CrawlPlan:
    store = config.store.open()
    return prepare_crawl(config.urls, store, config.staging_prefix(), config.crawl, config.store.s3)


def _group_name() -> str:
    from prefect.runtime import task_run

    shards = task_run.parameters["shards"]
    return f"crawl shards {shards[0]:05d}-{shards[-1]:05d}"


@task(name="crawl-shards", task_run_name=_group_name)
def crawl_group(config: BuildConfig, plan: CrawlPlan, shards: list[int]) -> list[ShardStats]:
    logger = get_run_logger()
    work = state_dir() / "work" / config.name

    def log_shard(stats: ShardStats) -> None:
        node = (stats.node or "-")[:12]
        logger.info("shard %05d: %d/%d kept on node %s", stats.shard, stats.kept, stats.count, node)

    store, prefix = config.store.open(), config.staging_prefix()
    return crawl_shards(plan, shards, store, prefix, config.crawl, work, log_shard, config.cluster)


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
        init_ray(config.cluster.ray_address)  # once for the whole build; its stages share it
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


@task(name="stage")
def stage_task(config: BuildConfig, stage: build.Stage, previous: build.StageResult):
    """One stage over every shard (its shards run as Ray tasks): per-shard counts go to the log
    and a progress artifact, never one Prefect task per shard."""
    logger = get_run_logger()
    ctx = _context(config)
    progress = create_progress_artifact(
        0.0, key=f"{config.name}-{stage.name}-progress", description=f"{stage.name}: shards done"
    )
    done = 0

    def log_shard(stats: StageStats) -> None:
        nonlocal done
        done += 1
        logger.info(
            "%s shard %05d: %d/%d kept on node %s",
            stage.name, stats.shard, stats.kept, stats.count, (stats.node or "-")[:12],
        )  # fmt: skip
        update_progress_artifact(progress, 100.0 * done / len(ctx.shards))

    result = stage.run(ctx, previous, log_shard)
    update_progress_artifact(progress, 100.0)
    return result


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


def _context(config: BuildConfig) -> build.BuildContext:
    return build.BuildContext(_staging(config), _all_shards(config), config.stages(), _work(config))


def _retrying(task_fn, config: BuildConfig):
    return task_fn.with_options(
        retries=config.task_retries, retry_delay_seconds=config.task_retry_delay_s
    )


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
    for stage in build.STAGES:  # the library's own stage order
        run_stage = _retrying(stage_task, config).with_options(name=stage.name)
        results.append(run_stage(config, stage, results[-1]))
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
