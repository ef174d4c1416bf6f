"""The full build-dataset flow on Prefect's ephemeral API: crawl -> filter -> embed + score ->
dedup -> publish, with a task per stage and artifacts per stage."""

import asyncio
import json
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.testing.utilities import prefect_test_harness

from dataprep import build
from dataprep.publish import AlteredDataset, read_manifest
from pipelines.cli import main
from pipelines.config import BuildConfig
from pipelines.events import DATASET_PUBLISHED, dataset_resource_id
from pipelines.flows import run_build
from tests.dataprep.test_publish import flip_a_byte
from tests.pipelines.conftest import small_build

NAME = "flowpub"
STAGES = ("filter", "embed", "score", "dedup")


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield
    import ray

    ray.shutdown()


async def published_events(timeout_s: float = 30.0) -> list:
    """`mmpipe.dataset.published` events of NAME (the server persists events asynchronously)."""
    deadline = time.monotonic() + timeout_s
    event_filter = EventFilter(
        event=EventNameFilter(name=[DATASET_PUBLISHED]),
        resource=EventResourceFilter(id=[dataset_resource_id(NAME)]),
    )
    async with get_client() as client:
        while True:
            events = (await client.read_events(filter=event_filter, limit=10)).events
            if events or time.monotonic() > deadline:
                return events
            await asyncio.sleep(1)


async def read_run():
    async with get_client() as client:
        keys = [f"{NAME}-{s}-counts" for s in STAGES] + [f"{NAME}-{s}-progress" for s in STAGES]
        keys += [f"{NAME}-build-images", f"{NAME}-dataset-summary"]
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
        flow_runs = await client.read_flow_runs()
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in flow_runs]})
        )
        return {a.key: a for a in artifacts}, task_runs


@pytest.mark.slow
def test_build_dataset_flow_publishes_and_reports(
    prefect_api, sample_web, clip_scorer, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MMPIPE_STATE_DIR", str(tmp_path / "state"))
    store_url = f"file://{tmp_path / 'store'}"
    config = BuildConfig.model_validate(
        small_build(NAME, sample_web, store_url, clip_scorer, shards_per_task=2)
    )
    result = run_build(config)
    manifest = read_manifest(config.store.open(), NAME)
    assert result.manifest_uri == f"{store_url}/datasets/{NAME}/v1/manifest.json"
    assert result.version == "v1" and manifest.samples == result.stages["dedup"].kept > 0
    assert result.crawl.count == len(sample_web.specs)

    [event] = asyncio.run(published_events())
    assert event.payload["version"] == "v1" and event.payload["manifest_url"] == result.manifest_uri

    artifacts, task_runs = asyncio.run(read_run())
    names = {t.name.rsplit("-", 1)[0] for t in task_runs}
    assert {"embed", "score", "dedup", "publish"} <= names
    # one task per stage (not per shard), in the library's own order (build_after_crawl's)
    ran = sorted(task_runs, key=lambda t: t.start_time)
    ran = [t.name.rsplit("-", 1)[0] for t in ran if t.name.rsplit("-", 1)[0] in STAGES]
    assert ran == [stage.name for stage in build.STAGES] == list(STAGES)
    for stage in build.STAGES[:-1]:  # per-shard stages: progress streamed shard by shard
        assert artifacts[f"{NAME}-{stage.name}-progress"].data == 100.0
    for stage in STAGES:
        rows = artifacts[f"{NAME}-{stage}-counts"].data
        rows = json.loads(rows) if isinstance(rows, str) else rows  # the API returns JSON text
        assert sum(r["count"] for r in rows) == result.stages[stage].count
    images = artifacts[f"{NAME}-build-images"].data
    assert images.count("](data:image/png;base64,") == 2
    assert f"{store_url}/staging/{NAME}/report/score-histogram.png" in images
    assert result.manifest_uri in artifacts[f"{NAME}-dataset-summary"].data

    # the CLI lists and shows what was published
    assert main(["datasets", "list", "--store", store_url]) == 0
    assert main(["datasets", "show", f"{NAME}@v1", "--store", store_url]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}@v1  {manifest.samples} samples" in out and result.manifest_uri in out
    assert main(["datasets", "show", f"{NAME}@v9", "--store", store_url]) == 2

    # a rebuild that finds its version altered refuses it, at once (publish is not retried)
    assert main(["datasets", "verify", f"{NAME}@v1", "--store", store_url]) == 0
    shard = f"datasets/{NAME}/v1/{manifest.shards[0].path}"
    flip_a_byte(config.store.open(), shard)
    with pytest.raises(AlteredDataset, match=f"{store_url}/{shard}: sha256"):
        run_build(config)
    _, task_runs = asyncio.run(read_run())
    failed = [t for t in task_runs if t.name.startswith("publish") and t.state.is_failed()]
    assert [t.run_count for t in failed] == [1]


def test_build_names_its_cluster_and_launches_as_a_ray_job(tmp_path):
    from pipelines.cli import build_config_from_args, build_parser, parse_args
    from tests.conftest import free_port
    from tests.pipelines.conftest import mmpipe

    argv = ["build", "--config", "configs/demo.yaml", "--ray-address", "10.0.0.1:6379"]
    config = build_config_from_args(parse_args(build_parser(), argv))
    assert config.cluster.ray_address == config.stages().cluster.ray_address == "10.0.0.1:6379"

    address = f"http://127.0.0.1:{free_port()}"  # nothing listens: the launch stops in one line
    env = {"MMPIPE_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = mmpipe("launch", "--address", address, "--", *argv, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"mmpipe: error: cannot reach the Ray cluster at {address}")
    bad = mmpipe("launch", "--address", address, "--", "build", "--config", "configs/demo.yaml",
                 "cluster.cpus=2", env=env)  # fmt: skip
    assert bad.returncode == 2 and "cluster.cpus: unknown field" in bad.stderr  # checked here
