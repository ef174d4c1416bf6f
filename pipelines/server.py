"""A persistent Prefect server on loopback: `mmpipe server start|stop|status`.

The server runs detached (`prefect server start` in its own process group), with its files in
`STATE/prefect` (database `server.db`, log `server.log`) and a record `server.json` (pid, URL).
While a recorded server is healthy, the `mmpipe` command points flows at it (PREFECT_API_URL);
otherwise flows use Prefect's ephemeral local API. For a team, the server keeps its database in
PostgreSQL (`--database-url`, `server.database_url` or PREFECT_API_DATABASE_CONNECTION_URL),
checked by `pipelines.database` before the server starts.

This module imports nothing from Prefect: the CLI calls it before Prefect reads its settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from dataprep.errors import MmpipeError
from dataprep.state import state_dir
from pipelines.database import check_database, masked, server_database_url

HEALTH_TIMEOUT_S = 2.0


class ConnectionProblem(MmpipeError, RuntimeError):
    """A server or cluster mmpipe cannot reach; the message says what to do about it."""


@dataclass
class ServerInfo:
    pid: int
    url: str  # the API URL, http://HOST:PORT/api; the UI is at http://HOST:PORT
    log: str
    database: str = ""  # its URL, password masked; empty: SQLite in STATE

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")


def prefect_dir() -> Path:
    return state_dir() / "prefect"


def _record_path() -> Path:
    return prefect_dir() / "server.json"


def recorded_server() -> ServerInfo | None:
    """The server `mmpipe server start` recorded, if its process is still alive."""
    try:
        info = ServerInfo(**json.loads(_record_path().read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return info if process_alive(info.pid) else None


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (a zombie has exited, unreaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def is_healthy(api_url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def running_api_url() -> str | None:
    """The API URL of the recorded server if it answers, else None (use the ephemeral API)."""
    info = recorded_server()
    return info.url if info and is_healthy(info.url, timeout_s=1.0) else None


def check_api(api_url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Fail fast, in one line, when PREFECT_API_URL points at nothing that answers."""
    if not is_healthy(api_url, timeout_s):
        raise ConnectionProblem(
            f"cannot reach the Prefect server at {api_url} (PREFECT_API_URL). "
            "Fix: start it with `mmpipe server start`, correct PREFECT_API_URL, "
            "or unset it to use the local ephemeral API"
        )


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def server_env(api_url: str, database_url: str | None = None) -> dict[str, str]:
    """The server's environment: its home and database (default: SQLite in STATE)."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the server is the API, it is not a client of one
    env["PREFECT_UI_API_URL"] = api_url  # where the browser finds the API (default: port 4200)
    env["PREFECT_UI_URL"] = api_url.removesuffix("/api")  # links in alerts
    env["PREFECT_HOME"] = str(prefect_dir())
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = server_database_url(database_url)
    env.setdefault(
        "PREFECT_API_DATABASE_CONNECTION_URL",
        f"sqlite+aiosqlite:///{prefect_dir() / 'server.db'}",
    )
    return env


def start_server(
    host: str = "127.0.0.1",
    port: int = 4200,
    timeout_s: float = 90.0,
    database_url: str | None = None,
) -> ServerInfo:
    """Start the server detached and wait until it is healthy; reuse a healthy recorded one.
    `database_url` (else PREFECT_API_DATABASE_CONNECTION_URL, else SQLite) is checked first."""
    database_url = database_url or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
    if database_url:
        check_database(database_url)
    running = recorded_server()
    if running and is_healthy(running.url):
        return running
    if not _port_free(host, port):
        raise ConnectionProblem(
            f"port {port} on {host} is in use. Fix: `mmpipe server start --port OTHER`"
        )
    prefect_dir().mkdir(parents=True, exist_ok=True)
    log = prefect_dir() / "server.log"
    prefect_cli = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect_cli), "server", "start", "--host", host, "--port", str(port)]
    api_url = f"http://{host}:{port}/api"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=server_env(api_url, database_url),
            start_new_session=True,  # its own process group: survives the CLI, stops as one
        )
    database = masked(database_url) if database_url else ""
    info = ServerInfo(pid=proc.pid, url=api_url, log=str(log), database=database)
    _record_path().write_text(json.dumps(asdict(info)))
    _wait_healthy(proc, info, timeout_s)
    return info


def _wait_healthy(proc: subprocess.Popen, info: ServerInfo, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not is_healthy(info.url, timeout_s=1.0):
        if proc.poll() is not None:
            _record_path().unlink(missing_ok=True)
            tail = Path(info.log).read_text(errors="replace")[-2000:]
            raise ConnectionProblem(f"the Prefect server exited ({proc.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            stop_server()
            raise ConnectionProblem(
                f"the Prefect server was not healthy after {timeout_s:.0f} s; see {info.log}"
            )
        time.sleep(0.5)


def stop_server(timeout_s: float = 20.0) -> ServerInfo | None:
    """Terminate the recorded server's process group; returns what was stopped, if anything."""
    info = recorded_server()
    _record_path().unlink(missing_ok=True)
    if info is None:
        return None
    _signal_group(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while process_alive(info.pid) and time.monotonic() < deadline:
        _reap(info.pid)
        time.sleep(0.2)
    if process_alive(info.pid):
        _signal_group(info.pid, signal.SIGKILL)
        _reap(info.pid)
    return info


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # the server leads its own session (start_new_session)


def _reap(pid: int) -> None:
    """Collect the exit status when this process started the server (no zombie left)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def status_lines() -> list[str]:
    info = recorded_server()
    if info is None:
        return ["Prefect server: not running (flows use the ephemeral local API)"]
    health = "healthy" if is_healthy(info.url) else "NOT answering"
    return [
        f"Prefect server: {health}, pid {info.pid}",
        f"  UI:  {info.ui_url}",
        f"  API: {info.url}",
        f"  log: {info.log}",
        f"  database: {info.database or 'SQLite in ' + str(prefect_dir())}",
    ]
