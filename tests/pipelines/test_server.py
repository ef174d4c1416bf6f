"""`mmpipe server`: a persistent Prefect server the CLI finds and points flows at."""

import os
import time

import pytest

from pipelines import commands, server
from tests.conftest import free_port
from tests.pipelines.conftest import mmpipe


def test_status_start_again_and_flows_point_at_the_server(prefect_server, monkeypatch):
    env = prefect_server.env()
    status = mmpipe("server", "status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"healthy, pid {prefect_server.pid}" in status.stdout
    assert f"UI:  {prefect_server.ui_url}" in status.stdout

    again = mmpipe("server", "start", env=env)  # a healthy recorded server is reused
    assert again.returncode == 0, again.stderr
    assert f"pid {prefect_server.pid}" in again.stdout

    monkeypatch.setenv("MMPIPE_STATE_DIR", str(prefect_server.state))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    commands.prepare_environment()
    assert os.environ["PREFECT_API_URL"] == prefect_server.api_url


def test_without_a_server_flows_keep_the_ephemeral_api(tmp_path, monkeypatch):
    monkeypatch.setenv("MMPIPE_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    commands.prepare_environment()
    assert "PREFECT_API_URL" not in os.environ
    assert server.status_lines() == [
        "Prefect server: not running (flows use the ephemeral local API)"
    ]
    assert server.stop_server() is None


def test_a_busy_port_is_a_clear_error(prefect_server, tmp_path):
    env = prefect_server.env(MMPIPE_STATE_DIR=str(tmp_path))
    result = mmpipe("server", "start", "--port", str(prefect_server.port), env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"mmpipe: error: port {prefect_server.port} on 127.0.0.1 is in use. "
        "Fix: `mmpipe server start --port OTHER`"
    )


def test_a_bad_prefect_api_url_fails_fast_in_one_line(tmp_path):
    bad = f"http://127.0.0.1:{free_port()}/api"
    started = time.monotonic()
    with pytest.raises(server.ConnectionProblem):
        server.check_api(bad)
    assert time.monotonic() - started < 3
    env = {"MMPIPE_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "PREFECT_API_URL": bad}
    result = mmpipe("build", "--config", "configs/demo.yaml", env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"mmpipe: error: cannot reach the Prefect server at {bad}")
    assert "Fix: start it with `mmpipe server start`" in result.stderr
