"""`mmpipe server`: a persistent Prefect server the CLI finds and points flows at."""

import asyncio
import json
import os
import time
from collections.abc import Iterator

import pytest
import yaml

from pipelines import commands, server
from pipelines.config import BuildConfig
from tests.conftest import free_port
from tests.pipelines.conftest import PrefectServer, mmpipe, using_api
from tests.pipelines.postgres import PASSWORD, Postgres, postgres, postgres_bin


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


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory) -> Iterator[tuple[Postgres, PrefectServer]]:
    """A throwaway PostgreSQL and `mmpipe server start` on it (`server.database_url`, the
    password in PGPASSWORD as the docs say); stopped after the module."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does)")
    state = tmp_path_factory.mktemp("pg-state")
    with postgres() as pg:
        config = state / "serve.yaml"
        server_section = {"database_url": pg.url(password=None), "startup_timeout_s": 300}
        config.write_text(yaml.safe_dump({"server": server_section}))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env |= {"MMPIPE_STATE_DIR": str(state), "PGPASSWORD": PASSWORD}
        try:
            started = mmpipe(
                "server", "start", "--port", str(port), "--config", str(config), env=env
            )
            assert started.returncode == 0, started.stdout + started.stderr
            record = json.loads((state / "prefect" / "server.json").read_text())
            yield pg, PrefectServer(state, port, record["pid"])
        finally:
            stopped = mmpipe("server", "stop", env=env)
            assert stopped.returncode == 0, stopped.stderr


async def run_with_tasks_and_artifacts(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async with get_client() as client:
        filter_ = FlowRunFilter(name=FlowRunFilterName(any_=[name]))
        [run] = await client.read_flow_runs(flow_run_filter=filter_)
        tasks = await client.read_task_runs(flow_run_filter=filter_)
        artifacts = await client.read_artifacts(flow_run_filter=filter_)
        return run, tasks, artifacts


async def rows_in_postgres(pg: Postgres, table: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(pg.url().replace("+asyncpg", ""))
    try:
        return await connection.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        await connection.close()


@pytest.mark.slow
def test_a_build_on_a_server_on_postgres_reads_back_through_the_api(
    postgres_server, sample_web, tmp_path, monkeypatch
):
    from pipelines.flows import run_build

    pg, srv = postgres_server
    status = mmpipe("server", "status", env=srv.env())
    assert f"database: {pg.url(password=None)}" in status.stdout, status.stdout
    config = BuildConfig.model_validate(
        {
            "name": "pgtest",
            "urls": sample_web.urls,
            "store": {"url": f"file://{tmp_path / 'store'}"},
            "crawl_only": True,
            "crawl": {
                "image_size": 32,
                "samples_per_shard": 120,
                "shards_per_task": 1,
                "deadline_s": 2,
                "policy": {"allow": sample_web.allow()},
            },
        }
    )
    monkeypatch.setenv("MMPIPE_STATE_DIR", str(tmp_path / "state"))
    with using_api(srv.api_url):
        result = run_build(config)
    expected = {"plan-crawl", "crawl shards 00000-00000", "crawl shards 00001-00001"}
    deadline = time.monotonic() + 60  # task-run states travel as events the server records
    with using_api(srv.api_url):
        while True:
            run, tasks, artifacts = asyncio.run(run_with_tasks_and_artifacts("build pgtest"))
            names = {t.name.rsplit("-", 1)[0] if "plan" in t.name else t.name for t in tasks}
            done = all(t.state and t.state.is_completed() for t in tasks)
            if (expected <= names and done) or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert run.state.is_completed() and run.flow_id is not None
    assert expected <= names, names
    assert done, [(t.name, t.state) for t in tasks]
    assert "pgtest-crawl-counts" in {a.key for a in artifacts}
    assert result.crawl.kept > 0 and result.crawl.shards == 2
    # The rows are in PostgreSQL, not in a SQLite file beside the server.
    assert asyncio.run(rows_in_postgres(pg, "task_run")) >= len(tasks)
    assert not (srv.state / "prefect" / "server.db").exists()


def test_database_problems_are_one_line_naming_the_url_without_its_password(
    postgres_server, tmp_path
):
    pg, _ = postgres_server
    down = Postgres(free_port(), pg.folder)
    cases = {
        "bad URL": ("mysql://mmpipe:s3cret-pw@127.0.0.1/prefect", "is not a PostgreSQL"),
        "wrong password": (pg.url(password="wrong-pw"), "cannot log in to"),
        "database down": (down.url(), "Connection refused"),
        "no such database": (pg.url(database="nosuch"), "does not exist"),
    }
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["MMPIPE_STATE_DIR"] = str(tmp_path)
    for case, (url, says) in cases.items():
        started = time.monotonic()
        result = mmpipe(
            "server", "start", "--port", str(free_port()), "--database-url", url, env=env
        )
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith("mmpipe: error: ") and says in line, (case, line)
        assert "***@127.0.0.1" in line and "s3cret-pw" not in line and "wrong-pw" not in line, case
        assert time.monotonic() - started < 30, case
    assert not (tmp_path / "prefect" / "server.json").exists()  # nothing was started
