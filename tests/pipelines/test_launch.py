"""`mmpipe launch`: a training run submitted as a Ray Job to a Ray head started here.

The head is `ray start --head --block` from the venv, on free loopback ports, in its own
process group (stopped by signalling that group, never `ray stop`, which would stop every
Ray on the machine). Its PATH starts with the venv, as a cluster image's does, so the job's
`python -m pipelines.cli` runs on the head's interpreter with the uploaded project. Token auth
stays on: the client sends the token `ray start` keeps in ~/.ray/auth_token.
"""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dataprep.store import open_store
from pipelines.launch import check_dashboard, connect
from pipelines.server import ConnectionProblem
from tests.conftest import free_port
from tests.pipelines.conftest import mmpipe
from tests.training.test_engine import config, write_shards

VENV_BIN = Path(sys.executable).parent


def dashboard_answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
    except urllib.error.HTTPError:
        return True  # 401: up, and asking for the token
    except OSError:
        return False
    return True


def jobs_api_answers(url: str) -> bool:
    """The dashboard answers before its job API does: a submission then drops the connection."""
    try:
        connect(url).list_jobs()
    except Exception:
        return False
    return True


def stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "3"]
    cmd += ["--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1"]
    cmd += ["--temp-dir", temp, *[str(x) for kv in ports.items() for x in kv]]
    env = os.environ | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    with open(Path(temp) / "head.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 300  # a busy 2-core machine
        while not (dashboard_answers(url) and jobs_api_answers(url)):
            assert proc.poll() is None, (Path(temp) / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray job API did not come up in 300 s"
            time.sleep(1)
        yield url
    finally:
        stop_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_launch_trains_on_the_cluster_and_reports_the_checkpoint(ray_head, tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    write_shards(store, "data")
    train = ["train", "clip", "--config", "configs/clip-tiny.yaml", "name=launched", "steps=4"]
    train += ["log_every=2", "checkpoint_every=4", "eval.every_steps=0"]
    train += ["eval.heldout_samples=64", "engine.micro_batch_size=32", "data.workers=1"]
    train += [f"store.url={store.root_uri}", "--data", f"{store.root_uri}/data/"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL")}
    env["MMPIPE_STATE_DIR"] = str(tmp_path / "state")
    result = mmpipe("launch", "--address", ray_head, "--", *train, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "Running entrypoint for job mmpipe-launched-" in result.stdout  # streamed logs
    assert "exported weights:" in result.stdout
    assert "Ray job mmpipe-launched-" in result.stdout and ": SUCCEEDED" in result.stdout
    [line] = [x for x in result.stdout.splitlines() if x.startswith("latest checkpoint: ")]
    checkpoint = line.removeprefix("latest checkpoint: ")
    assert checkpoint.startswith(f"{store.root_uri}/runs/launched/checkpoint_")
    key = checkpoint.removeprefix(f"{store.root_uri}/")
    assert store.list(key + "/"), f"no files in {checkpoint}"
    assert store.exists("runs/launched/export/open_clip_pytorch_model.bin")


async def flow_run_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        found = await client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in found]


@pytest.mark.slow
def test_the_training_flow_launches_on_the_cluster_through_a_task(ray_head, tmp_path, monkeypatch):
    from prefect.logging.handlers import APILogWorker
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.training_flows import train_clip

    monkeypatch.setenv("MMPIPE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = open_store(f"file://{tmp_path}/store")
    write_shards(store, "data")
    run = {"name": "flowlaunched", "steps": 4, "log_every": 2, "checkpoint_every": 4}
    cfg = config(store, f"{store.root_uri}/data/", **run)
    with prefect_test_harness(server_startup_timeout=300):
        state = train_clip(cfg, cluster_address=ray_head, return_state=True)
        outcome = state.result()
        APILogWorker.drain_all()
        logs = "\n".join(asyncio.run(flow_run_logs(state.state_details.flow_run_id)))
    assert "Running entrypoint for job mmpipe-flowlaunched-" in logs  # the job's log, streamed
    assert "succeeded; latest checkpoint" in logs
    checkpoint = outcome["result"]["checkpoint_uri"]
    assert checkpoint.startswith(f"{store.root_uri}/runs/flowlaunched/checkpoint_")
    assert store.list(checkpoint.removeprefix(f"{store.root_uri}/") + "/")
    assert outcome["result"]["steps"] == 4 and outcome["final"]["step"] == 4
    assert (
        outcome["export"]
        == f"{store.root_uri}/runs/flowlaunched/export/open_clip_pytorch_model.bin"
    )
    assert store.exists("runs/flowlaunched/export/open_clip_pytorch_model.bin")


def test_a_refused_cluster_address_fails_fast_in_one_line(tmp_path):
    address = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionProblem, match="cannot reach the Ray cluster at"):
        check_dashboard(address)
    assert time.monotonic() - started < 2
    env = {"MMPIPE_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    args = ["launch", "--address", address, "--", "train", "clip"]
    result = mmpipe(*args, "--config", "configs/clip-tiny.yaml", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"mmpipe: error: cannot reach the Ray cluster at {address}")
    assert "Fix: check --address" in line


def test_an_address_that_is_no_dashboard_url_is_refused_with_the_fix():
    with pytest.raises(ConnectionProblem, match="e.g. --address http://HEAD:8265"):
        check_dashboard("ray://head:10001")
    started = time.monotonic()
    with pytest.raises(ConnectionProblem):  # unroutable: bounded by the connect timeout
        check_dashboard("http://10.255.255.1:8265", timeout_s=3)
    assert time.monotonic() - started < 5
