"""A throwaway PostgreSQL on loopback: `initdb` + `pg_ctl` of the installed server (Debian's
`postgresql` package; `.ci/run` installs it), in a fresh data dir, stopped afterwards.

initdb refuses to run as root, so as root the server runs as the `postgres` user (or nobody).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

USER, PASSWORD, DATABASE = "mmpipe", "s3cret-pw", "prefect"


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl, or None when PostgreSQL is not installed."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


@dataclass(frozen=True)
class Postgres:
    port: int
    folder: Path

    def url(self, password: str | None = PASSWORD, database: str = DATABASE) -> str:
        login = f"{USER}:{password}" if password else USER
        return f"postgresql+asyncpg://{login}@127.0.0.1:{self.port}/{database}"


def _as_server_user() -> list[str]:
    """A prefix that runs a command as a non-root user when this process is root."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    raise RuntimeError("running as root and no `postgres` or `nobody` user to run PostgreSQL")


@contextmanager
def postgres() -> Iterator[Postgres]:
    """initdb, start on a free loopback port (password login), create DATABASE; stop after."""
    bin_dir = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="mmpipe-pg-"))
    (folder / "pw").write_text(PASSWORD)
    as_user = _as_server_user()
    if as_user:
        uid, gid = int(as_user[1].split("=")[1]), int(as_user[2].split("=")[1])
        for path in (folder, folder / "pw"):
            os.chown(path, uid, gid)
    data, port = folder / "data", free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(folder / "pw"),
        "--auth=scram-sha-256", "-E", "UTF8")  # fmt: skip
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    run(*pg_ctl, "-l", str(folder / "postgres.log"), "-o", options, "-w", "start")
    try:
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE],
            check=True, capture_output=True, env=env, timeout=60,
        )  # fmt: skip
        yield Postgres(port, folder)
    finally:
        run(*pg_ctl, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
