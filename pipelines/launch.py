"""`mmpipe launch --address http://HEAD:8265 -- train clip --config ...`: a Ray Job on a cluster.

The job runs the same `mmpipe train` command on the head node: `python -m pipelines.cli` in a
copy of this project (Ray's runtime_env `working_dir`, uploaded without .venv, state, .git).
The cluster's image provides Python and the pinned dependencies (infra/Dockerfile), so
`python` on the head must be that interpreter; `--python` names another one. The training
config is validated here first, so config errors fail before anything is uploaded.

Training flows launch the config they were given, already resolved (`launch_resolved`): the
job runs `python -m pipelines.job <spec> <config as JSON>`, which validates it on the head and
trains it through the spec's flow, as `mmpipe train` would.

Ray 2.60 clusters require a token: the client sends it when RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token provides one. Credentials for the store belong on the cluster (instance
role, Kubernetes secret), not in the job: `--env` values are visible in Ray's dashboard.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipelines.server import ConnectionProblem

EXCLUDES = [
    "/.venv",
    "/state",
    "/.git",
    "**/__pycache__",
    ".pytest_cache",
    "*.egg-info",
    ".ruff_cache",
]
JOB_ENV = {
    # Ray's copy of the working dir is read-only: the job's scratch (Prefect's ephemeral
    # database, work files) goes here; data and checkpoints go to the store.
    "MMPIPE_STATE_DIR": "/tmp/mmpipe-job-state",
    # The training driver's ray.init adds worker env vars; combine them with the job's.
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
    "PYTHONUNBUFFERED": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}
CONNECT_TIMEOUT_S = 5.0
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class LaunchResult:
    job_id: str
    status: str
    run_uri: str
    checkpoint_uri: str | None


def enable_token_auth() -> None:
    """Send Ray's token when one is available here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token), unless RAY_AUTH_MODE says otherwise. Ray caches the mode in its config:
    its own helper sets the variable and refreshes that cache."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def check_dashboard(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """Fail in seconds, with the fix, when `address` is not a Ray dashboard; returns Ray's
    version."""
    if not address.startswith(("http://", "https://")):
        raise ConnectionProblem(
            f"--address {address!r} is not a Ray dashboard URL. Fix: give the head's job "
            "server, e.g. --address http://HEAD:8265"
        )
    url = f"{address.rstrip('/')}/api/version"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read()).get("ray_version", "?")
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return "?"  # answering, and wants a token: the client sends it with the job
        raise _unreachable(address, f"HTTP {err.code}") from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise _unreachable(address, str(reason)) from None


def _unreachable(address: str, reason: str) -> ConnectionProblem:
    return ConnectionProblem(
        f"cannot reach the Ray cluster at {address} ({reason}). Fix: check --address (the "
        "head's dashboard, port 8265, started with `ray start --head --dashboard-host 0.0.0.0`) "
        "and that this machine can reach it"
    )


def connect(address: str):
    check_dashboard(address)
    enable_token_auth()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (AuthenticationError, ConnectionError, RuntimeError) as err:
        reason = str(err).splitlines()[0]
        raise ConnectionProblem(
            f"the Ray cluster at {address} refused the connection ({reason}). Fix: export "
            "RAY_AUTH_TOKEN with the cluster's token (the head's ~/.ray/auth_token), or "
            "RAY_AUTH_TOKEN_PATH with a file holding it"
        ) from None


def runtime_env(working_dir: Path, env: dict[str, str]) -> dict:
    return {
        "working_dir": str(working_dir),
        "excludes": EXCLUDES,
        "env_vars": {**JOB_ENV, **env},
    }


def entrypoint(command: list[str], python: str = "python", module: str = "pipelines.cli") -> str:
    return shlex.join([python, "-m", module, *command])


def submit(
    client, cfg, command: list[str], env: dict[str, str], working_dir: Path, python: str, module
):
    job_id = f"mmpipe-{cfg.name}-{uuid.uuid4().hex[:8]}"
    return client.submit_job(
        entrypoint=entrypoint(command, python, module),
        runtime_env=runtime_env(working_dir, env),
        submission_id=job_id,
        metadata={"mmpipe.run": cfg.name, "mmpipe.model": getattr(cfg, "spec", "build-dataset")},
    )


def stream_logs(client, job_id: str, out=print) -> None:
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out(lines.rstrip("\n"))

    asyncio.run(tail())


def wait_terminal(client, job_id: str, timeout_s: float = 60.0) -> str:
    """The job's final status (logs end a moment before the status is final)."""
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1.0)
        status = str(client.get_job_status(job_id))
    return status.split(".")[-1]


def latest_checkpoint(cfg) -> str | None:
    """The run's newest checkpoint in the store, if this machine can see the store."""
    store = cfg.store.open()
    prefix = f"{cfg.run_prefix()}/checkpoint_"
    try:
        keys = store.list(prefix)
    except Exception:  # the cluster's store may be out of this machine's reach
        return None
    folders = {parts[2] for key in keys if len(parts := key.split("/")) > 3}  # not files
    return store.uri(f"{cfg.run_prefix()}/{max(folders)}") if folders else None


def launch(
    address: str,
    command: list[str],
    cfg,
    env: dict[str, str] | None = None,
    working_dir: Path | None = None,
    python: str = "python",
    out=print,
    module: str = "pipelines.cli",
) -> LaunchResult:
    """Submit `mmpipe <command>` (already validated into `cfg`) as a Ray Job and follow it."""
    client = connect(address)
    job_id = submit(client, cfg, command, env or {}, working_dir or Path.cwd(), python, module)
    out(f"submitted Ray job {job_id} to {address}")
    try:
        stream_logs(client, job_id, out)
    except KeyboardInterrupt:
        out(f"stopped following; the job keeps running: ray job stop --address {address} {job_id}")
        raise
    status = wait_terminal(client, job_id)
    checkpoint = latest_checkpoint(cfg) if status == "SUCCEEDED" else None
    return LaunchResult(job_id, status, cfg.store.open().uri(cfg.run_prefix()), checkpoint)


# --- a resolved config, as the training flows launch it ---------------------------------------


def project_root() -> Path:
    """This project's folder (the job's working dir), wherever the flow runs from."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def job_config(cfg) -> dict:
    """`cfg` as the job must see it. The store is named explicitly: unset, it would be the
    job's scratch dir on the head. Ray is left to the job: `ray.init()` in a Ray Job joins the
    job's own cluster, whatever address this side uses."""
    # Keys stay out of the job (they would show in Ray's dashboard, and a SecretStr dumps
    # masked): the cluster brings its own credentials.
    s3 = cfg.store.s3.model_copy(update={"access_key_id": None, "secret_access_key": None})
    store = cfg.store.model_copy(update={"url": cfg.store.open().root_uri, "s3": s3})
    scale = cfg.scale.model_copy(update={"ray_address": None})
    return cfg.model_copy(update={"store": store, "scale": scale}).model_dump(mode="json")


def launch_resolved(address: str, cfg, env: dict[str, str] | None = None, out=print):
    """Train `cfg` on the cluster at `address` as a Ray Job, the whole config travelling with
    it (no config file needs to exist on the head)."""
    command = [cfg.spec, json.dumps(job_config(cfg))]
    return launch(address, command, cfg, env, project_root(), out=out, module="pipelines.job")
