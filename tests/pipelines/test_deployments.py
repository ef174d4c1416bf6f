"""Deployments, schedules, publish-triggered training and the build lock, on a real server."""

import asyncio
import signal
import subprocess
import sys
import time

import pytest
import yaml

from pipelines.config import load_config
from pipelines.deployments import apply_deployments
from pipelines.events import emit_dataset_published
from pipelines.locks import dataset_build_lock
from pipelines.ops_config import ServeConfig
from pipelines.training_flows import training_flow
from tests.pipelines.conftest import using_api


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
