"""Deployments, schedules, publish-triggered training and the build lock, on a real server."""

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_config
from pipelines.deployments import apply_deployments
from pipelines.events import emit_dataset_published
from pipelines.locks import dataset_build_lock
from pipelines.ops_config import ServeConfig
from pipelines.training_flows import training_flow
from tests.pipelines.browser import Browser, chromium_path, keep
from tests.pipelines.conftest import mmpipe, using_api


def serve_config(tmp_path, enabled: bool = True) -> ServeConfig:
    data = {
        "builds": [
            {
                "config": "configs/demo.yaml",
                "overrides": ["name=nightly", f"urls={tmp_path}/urls.parquet"],
                "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
            },
            {
                "config": "configs/demo.yaml",
                "overrides": ["name=hourly"],
                "schedule": {"interval_s": 3600},
            },
        ],
        "training": [
            {
                "model": "clip",
                "config": "configs/clip-tiny.yaml",
                "overrides": ["name=deptrain", "steps=4"],
                "on_publish": {"dataset": "nightly", "enabled": enabled},
                "cluster_address": "http://127.0.0.1:8265",
            }
        ],
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(ServeConfig, path)


async def read_back(names):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployments = {n: await client.read_deployment_by_name(n) for n in names}
        automations = await client.read_automations()
        return deployments, automations


async def runs_of(deployment_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter

    async with get_client() as client:
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id={"any_": [deployment_id]})
        )


@pytest.fixture(scope="module")
def applied(prefect_server, tmp_path_factory):
    config = serve_config(tmp_path_factory.mktemp("serve"))
    names = ["build-dataset/nightly", "build-dataset/hourly", "train-clip/deptrain"]
    with using_api(prefect_server.api_url):
        ids = apply_deployments(config)
        deployments, automations = asyncio.run(read_back(names))
    return config, ids, deployments, automations


def test_deployments_are_created_with_their_schedules(applied, tmp_path):
    config, ids, deployments, _ = applied
    assert len(ids) == 3
    nightly = deployments["build-dataset/nightly"]
    [cron] = [s.schedule for s in nightly.schedules]
    assert (cron.cron, cron.timezone) == ("0 3 * * *", "Europe/Berlin")
    assert nightly.parameters["config"]["name"] == "nightly"
    assert nightly.parameters["config"]["urls"].endswith("/urls.parquet")
    assert nightly.global_concurrency_limit.limit == 1
    assert "dataset:nightly" in nightly.tags
    [interval] = [s.schedule for s in deployments["build-dataset/hourly"].schedules]
    assert interval.interval.total_seconds() == 3600
    train = deployments["train-clip/deptrain"]
    assert train.schedules == [] and train.parameters["cfg"]["steps"] == 4
    assert train.parameters["cluster_address"] == "http://127.0.0.1:8265"


def test_publishing_a_dataset_starts_the_triggered_training(applied, prefect_server):
    _, _, deployments, automations = applied
    [trigger] = [a for a in automations if a.name == "train clip on publish of nightly"]
    assert trigger.enabled
    train = deployments["train-clip/deptrain"]
    manifest = "file:///data/datasets/nightly/v2.1/manifest.json"
    with using_api(prefect_server.api_url):
        assert emit_dataset_published("nightly", "v2.1", manifest, samples=120) is not None
        deadline = time.monotonic() + 90
        runs = []
        while not runs and time.monotonic() < deadline:
            time.sleep(1)
            runs = asyncio.run(runs_of(train.id))
    assert runs, "no run of train-clip/deptrain after the publish event"
    cfg = runs[0].parameters["cfg"]
    assert cfg["data"]["source"] == manifest
    assert cfg["name"] == "deptrain-v2-1" and cfg["steps"] == 4
    assert runs[0].parameters["cluster_address"] == "http://127.0.0.1:8265"


def test_the_trigger_can_be_switched_off(prefect_server, tmp_path):
    with using_api(prefect_server.api_url):
        apply_deployments(serve_config(tmp_path, enabled=False))
        _, automations = asyncio.run(read_back([]))
    [trigger] = [a for a in automations if a.name == "train clip on publish of nightly"]
    assert not trigger.enabled


def test_two_builds_of_one_dataset_cannot_run_at_once(prefect_server):
    with using_api(prefect_server.api_url):
        with dataset_build_lock("locked"):
            with pytest.raises(TimeoutError), dataset_build_lock("locked", timeout_s=2):
                pass
            with dataset_build_lock("other", timeout_s=10):  # other datasets are not held up
                pass
        with dataset_build_lock("locked", timeout_s=10):  # free again
            pass


def test_dalle_flows_are_served_once_they_exist():
    from importlib.util import find_spec

    if find_spec("pipelines.dalle_flows") is None:
        assert training_flow("dvae") is None and training_flow("dalle") is None
    else:
        assert training_flow("dvae").name == "train-dvae"
        assert training_flow("dalle").name == "train-dalle"
    assert training_flow("clip").name == "train-clip"


def start_serving(prefect_server, tmp_path, name: str) -> tuple[subprocess.Popen, object]:
    """`mmpipe serve` of one build deployment, in its own process, once it serves."""
    config = tmp_path / "serve.yaml"
    build = {"config": "configs/demo.yaml", "overrides": [f"name={name}"]}
    config.write_text(yaml.safe_dump({"builds": [{**build, "schedule": {"interval_s": 3600}}]}))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=prefect_server.env(PYTHONUNBUFFERED="1"),
        )
    deadline = time.monotonic() + 300  # imports on a busy 2-core machine
    while "serving 1 deployments" not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "mmpipe serve did not start in 300 s"
        time.sleep(0.5)
    time.sleep(3)  # into the runner's loop
    return proc, log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_promptly_on_a_signal_and_pauses_its_schedules(prefect_server, tmp_path, sig):
    name = f"served-{sig.name.lower()}"
    proc, log = start_serving(prefect_server, tmp_path, name)
    sent = time.monotonic()
    proc.send_signal(sig)
    while "stopped serving" not in log.read_text() and proc.poll() is None:
        assert time.monotonic() - sent < 30, f"serve still stopping 30 s after {sig.name}"
        time.sleep(0.1)
    stopped = time.monotonic() - sent
    try:
        # Python's own exit after that took 2-9 s on an idle 2-core machine, and once more than
        # 60 s under a load of 14: interpreter finalisation, after serve itself has returned.
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"mmpipe serve still running 120 s after {sig.name}: {log.read_text()[-3000:]}")
    print(
        f"{sig.name}: stopped serving after {stopped:.1f} s, exited after {time.monotonic() - sent:.1f} s"
    )
    output = log.read_text()
    assert code in (0, 130), output[-3000:]
    # Prefect's own SIGTERM handler left an un-awaited Runner.astop and a traceback behind.
    assert "never awaited" not in output and "Traceback" not in output, output[-3000:]
    assert "schedules are paused" in output, output[-3000:]
    with using_api(prefect_server.api_url):
        served, _ = asyncio.run(read_back([f"build-dataset/{name}"]))
    assert served[f"build-dataset/{name}"].paused  # the runner's shutdown ran to its end


async def run_deployment_and_wait(name: str, timeout_s: float):
    """Trigger deployment `name` by hand (as the UI's Run button does); its final flow run."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        run = await client.create_flow_run_from_deployment(deployment.id)
        deadline = time.monotonic() + timeout_s
        while not (run.state and run.state.is_final()) and time.monotonic() < deadline:
            await asyncio.sleep(1)
            run = await client.read_flow_run(run.id)
        return run


@pytest.mark.slow
async def triggered_run(name: str, timeout_s: float):
    """The final flow run of deployment `name` that an event started."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = await runs_of(deployment.id)
        if runs and runs[0].state and runs[0].state.is_final():
            return runs[0]
        await asyncio.sleep(2)
    return runs[0] if runs else None


async def artifact_keys(flow_run_id) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    async with get_client() as client:
        found = await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]})
        )
    return {a.key for a in found}


def test_a_worker_runs_a_deployed_build_and_the_training_its_publication_triggers(
    prefect_server, sample_web, tmp_path
):
    store = tmp_path / "store"
    build = {
        "config": "configs/demo.yaml",
        "overrides": [
            "name=pooled",
            f"urls={sample_web.urls}",
            f"store.url=file://{store}",
            "crawl_only=true",
            "crawl.samples_per_shard=120",
            "crawl.shards_per_task=1",
            "crawl.deadline_s=2",
            f"crawl.policy.allow=[{sample_web.allow()[0]}]",
        ],
    }
    config = tmp_path / "serve.yaml"
    train = {
        "model": "clip",
        "config": "configs/clip-tiny.yaml",
        "overrides": [
            "name=pooledclip",
            "steps=2",
            "log_every=1",
            "checkpoint_every=2",
            "eval.every_steps=2",
            "eval.heldout_samples=32",
            "engine.micro_batch_size=16",
            f"store.url=file://{store}",
        ],
        "on_publish": {"dataset": "pooled"},
    }
    config.write_text(yaml.safe_dump({"builds": [build], "training": [train]}))
    env = prefect_server.env(PYTHONUNBUFFERED="1")
    deployed = mmpipe("deploy", "--config", str(config), "--pool", "test-pool", env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "deployed build-dataset/pooled to work pool test-pool" in deployed.stdout
    assert "deployed train-clip/pooledclip to work pool test-pool" in deployed.stdout
    assert f"PREFECT_API_URL={prefect_server.api_url} prefect worker" in deployed.stdout

    log = tmp_path / "worker.log"
    worker_env = env | {
        "PREFECT_API_URL": prefect_server.api_url,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    prefect_cli = str(Path(sys.executable).parent / "prefect")
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [prefect_cli, "worker", "start", "--pool", "test-pool", "--type", "process"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=worker_env,
        )
    try:
        with using_api(prefect_server.api_url):
            run = asyncio.run(run_deployment_and_wait("build-dataset/pooled", timeout_s=300))
            assert run.state.is_completed(), (run.state, log.read_text()[-3000:])
            # What publishing the build emits; the crawl's shards stand in for a manifest.
            emit_dataset_published("pooled", "v1", f"file://{store}/staging/pooled/crawl/")
            trained = asyncio.run(triggered_run("train-clip/pooledclip", timeout_s=400))
            keys = asyncio.run(artifact_keys(trained.id)) if trained else set()
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert run.work_pool_name == "test-pool"
    shards = sorted(p.name for p in (store / "staging/pooled/crawl").glob("*.tar"))
    assert len(shards) == 2, shards  # 240 URLs, 120 per shard, crawled by the worker's run
    assert trained is not None, log.read_text()[-3000:]
    assert trained.state.is_completed(), (trained.state, log.read_text()[-3000:])
    assert trained.parameters["cfg"]["name"] == "pooledclip-v1"
    assert (store / "runs/pooledclip-v1/export").is_dir()
    assert {"pooledclip-v1-progress", "pooledclip-v1-eval", "pooledclip-v1-curves"} <= keys
    if chromium_path():  # the run as the UI shows it: progress, held-out metrics, curves
        check_training_page(prefect_server.ui_url, trained.id, tmp_path)


def check_training_page(ui_url: str, flow_run_id, tmp_path) -> None:
    with Browser() as browser:
        browser.open(f"{ui_url}/runs/flow-run/{flow_run_id}")
        browser.wait_for_text("train clip pooledclip-v1", "Completed")
        browser.click_text("Artifacts")
        browser.wait_for_text("pooledclip-v1-eval", "pooledclip-v1-curves", "pooledclip-v1-summary")
        keep(browser.screenshot(tmp_path / "ui-training-run-artifacts.png"))
        browser.click_text("pooledclip-v1-eval")
        browser.wait_for_text("eval/top1", "step")  # the held-out metrics table
        keep(browser.screenshot(tmp_path / "ui-training-eval-table.png"))
        browser.open(f"{ui_url}/artifacts/key/pooledclip-v1-progress")  # the train task's
        browser.wait_for_text("pooledclip-v1-progress", "train pooledclip-v1", "share of steps")
        keep(browser.screenshot(tmp_path / "ui-training-progress.png"))


def test_deploy_without_a_server_is_a_clear_error(tmp_path):
    env = {"MMPIPE_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = mmpipe("deploy", "--config", "configs/serve.yaml", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "mmpipe: error: mmpipe deploy needs a Prefect server: `mmpipe server start` first"
    )
