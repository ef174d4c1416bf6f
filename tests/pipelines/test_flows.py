"""The build-dataset flow on Prefect's ephemeral API (a real, temporary Prefect server)."""

import asyncio
import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter
from prefect.testing.utilities import prefect_test_harness

from pipelines.config import BuildConfig
from pipelines.flows import run_build


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def read_run(name: str):
    async with get_client() as client:
        keys = [f"{name}-crawl-counts", f"{name}-crawl-summary", f"{name}-crawl-progress"]
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
        flow_runs = await client.read_flow_runs()
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in flow_runs]})
        )
        return {a.key: a for a in artifacts}, flow_runs, task_runs


@pytest.mark.slow
def test_build_dataset_flow_crawls_and_reports(prefect_api, sample_web, tmp_path, monkeypatch):
    monkeypatch.setenv("MMPIPE_STATE_DIR", str(tmp_path / "state"))
    config = BuildConfig.model_validate(
        {
            "name": "flowtest",
            "crawl_only": True,
            "urls": sample_web.urls,
            "store": {"url": f"file://{tmp_path / 'store'}"},
            "crawl": {
                "image_size": 32,
                "samples_per_shard": 60,
                "shards_per_task": 2,
                "threads": 16,
                "deadline_s": 2,
                "policy": {"allow": sample_web.allow()},
            },
        }
    )
    summary = run_build(config).crawl
    assert summary.count == len(sample_web.specs) == sum(summary.by_reason.values())
    assert summary.shards == 4 and 0 < summary.kept < summary.count

    artifacts, flow_runs, task_runs = asyncio.run(read_run("flowtest"))
    assert [r.name for r in flow_runs] == ["build flowtest"]
    assert flow_runs[0].state.is_completed()
    names = sorted(t.name for t in task_runs)
    assert names[:2] == ["crawl shards 00000-00001", "crawl shards 00002-00003"]
    assert any(n.startswith("plan-crawl") for n in names)

    table = artifacts["flowtest-crawl-counts"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert sum(r["count"] for r in rows) == summary.count
    assert {r["reason"] for r in rows} == set(summary.by_reason)
    markdown = artifacts["flowtest-crawl-summary"].data
    assert f"file://{tmp_path / 'store'}/staging/flowtest/crawl" in markdown
    assert f"**{summary.kept}**" in markdown
    assert artifacts["flowtest-crawl-progress"].data == 100.0
