"""A real Prefect server for the operations tests, started and stopped as a user does it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

START_TIMEOUT_S = 300


@dataclass(frozen=True)
class PrefectServer:
    state: Path  # its MMPIPE_STATE_DIR
    port: int
    pid: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of an mmpipe process that uses this state dir (and so this server)."""
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        return env | {"MMPIPE_STATE_DIR": str(self.state)} | extra


def mmpipe(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def small_build(name: str, sample_web, store_url: str, scorer, **crawl) -> dict:
    """A build config of the sample web with small images and shards (`crawl` overrides)."""
    return {
        "name": name,
        "urls": sample_web.urls,
        "store": {"url": store_url},
        "crawl": {
            "image_size": 64,
            "samples_per_shard": 60,
            "threads": 16,
            "deadline_s": 2,
            "min_image_size": 16,
            "max_aspect_ratio": 4,
            "policy": {"allow": sample_web.allow()},
            **crawl,
        },
        "filter": {"min_image_side": 16, "max_aspect_ratio": 4},
        "embed": {"model": scorer.recipe.model, "weights": scorer.weights},
        "publish": {"samples_per_shard": 50},
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def using_api(url: str) -> Iterator[None]:
    """Point this process's Prefect client at `url`.

    Prefect's events worker (which also carries task-run states) keeps the API it was started
    with, so it is drained on the way in and out: later tests then get one for their own API.
    """
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    EventsWorker.drain_all(timeout=30, at_exit=False)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        try:
            yield
        finally:
            EventsWorker.drain_all(timeout=30, at_exit=False)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """`mmpipe server start` on a free loopback port in a temporary state dir; `stop` after."""
    state = tmp_path_factory.mktemp("ops-state")
    config = state / "serve.yaml"
    config.write_text(f"server:\n  startup_timeout_s: {START_TIMEOUT_S}\n")  # busy CI cores
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["MMPIPE_STATE_DIR"] = str(state)
    try:
        cmd = ["server", "start", "--port", str(port), "--config", str(config)]
        started = mmpipe(*cmd, env=env, timeout=START_TIMEOUT_S + 300)
        assert started.returncode == 0, started.stdout + started.stderr
        record = json.loads((state / "prefect" / "server.json").read_text())
        server = PrefectServer(state, port, record["pid"])
        yield server
    finally:  # also after a failed start: the server runs detached from `server start`
        stopped = mmpipe("server", "stop", env=env, timeout=300)
    deadline = time.monotonic() + 10
    while alive(server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stopped.returncode == 0 and not alive(server.pid), stopped.stderr
