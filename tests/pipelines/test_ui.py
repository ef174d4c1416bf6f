"""The Prefect UI in a real browser: a finished build-dataset run shows its tasks and stats.

A real Prefect server (`mmpipe server start`, the session fixture), a small crawl of the sample
web against it, then headless Chromium opens the run's page, its Task Runs and Artifacts tabs
and the stats table. Screenshots go to the test's tmp dir and to state/test-artifacts/.
"""

import asyncio

import pytest

from pipelines.config import BuildConfig
from tests.pipelines.browser import Browser, chromium_path, keep
from tests.pipelines.conftest import using_api


def build_config(sample_web, tmp_path) -> BuildConfig:
    data = {
        "name": "uitest",
        "urls": sample_web.urls,
        "store": {"url": f"file://{tmp_path / 'store'}"},
        "crawl": {
            "image_size": 32,
            "samples_per_shard": 120,
            "shards_per_task": 1,
            "threads": 16,
            "deadline_s": 2,
            "policy": {"allow": sample_web.allow()},
        },
    }
    if "crawl_only" in BuildConfig.model_fields:  # builds that go on to filter and publish
        data["crawl_only"] = True
    return BuildConfig.model_validate(data)


async def flow_run_id(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]))
        )
        return runs[0].id


@pytest.mark.slow
def test_the_ui_shows_a_finished_build_with_its_tasks_and_stats(
    prefect_server, sample_web, tmp_path, monkeypatch
):
    if chromium_path() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
    from pipelines.flows import run_build

    monkeypatch.setenv("MMPIPE_STATE_DIR", str(tmp_path / "state"))
    with using_api(prefect_server.api_url):
        run_build(build_config(sample_web, tmp_path))
        run_id = asyncio.run(flow_run_id("build uitest"))

    with Browser() as browser:
        browser.open(f"{prefect_server.ui_url}/runs/flow-run/{run_id}")
        browser.wait_for_text("build uitest", "Completed", "build-dataset")
        browser.click_text("Task Runs")
        browser.wait_for_text("plan-crawl", "crawl shards 00000-00000", "crawl shards 00001-00001")
        keep(browser.screenshot(tmp_path / "ui-build-run-tasks.png"))
        browser.click_text("Artifacts")
        browser.wait_for_text("uitest-crawl-counts", "crawl of uitest: URLs by status and reason")
        keep(browser.screenshot(tmp_path / "ui-build-run-artifacts.png"))
        browser.click_text("uitest-crawl-counts")
        browser.wait_for_text("url_policy", "deadline_exceeded", "http_404", "success")
        keep(browser.screenshot(tmp_path / "ui-build-stats-table.png"))


@pytest.mark.slow
def test_the_deployments_page_lists_the_deployments_with_their_schedules(prefect_server, tmp_path):
    if chromium_path() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
    import yaml

    from pipelines.config import load_config
    from pipelines.deployments import apply_deployments
    from pipelines.ops_config import ServeConfig

    serve = {
        "builds": [
            {
                "config": "configs/demo.yaml",
                "overrides": ["name=ui-nightly"],
                "schedule": {"cron": "0 3 * * *"},
            }
        ],
        "training": [
            {"model": "clip", "config": "configs/clip-tiny.yaml", "overrides": ["name=ui-clip"]}
        ],
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve))
    with using_api(prefect_server.api_url):
        apply_deployments(load_config(ServeConfig, tmp_path / "serve.yaml"))

    with Browser() as browser:
        browser.open(f"{prefect_server.ui_url}/deployments")
        page = browser.wait_for_text("ui-nightly", "build-dataset", "ui-clip", "train-clip")
        keep(browser.screenshot(tmp_path / "ui-deployments.png"))
    table = page[page.rindex("Schedules") :]  # the rows, after the header
    nightly, clip = table.index("ui-nightly"), table.index("ui-clip")
    rows = {"nightly": table[nightly : clip if clip > nightly else None]}
    rows["clip"] = table[clip : nightly if nightly > clip else None]
    assert "At 03:00 AM every day" in rows["nightly"], page  # the cron, on the build's row
    assert "At 03:00" not in rows["clip"], page  # training on demand: no schedule
