"""The Prefect server's database: PostgreSQL for a team, SQLite in STATE for one person.

`check_database` connects once before the server starts, so a bad URL, a wrong password or a
database that is down is one line naming the URL (its password masked), not a server that
dies in its log. A URL without a password takes it from PGPASSWORD or ~/.pgpass (asyncpg's
rules), which keeps it out of configs/serve.yaml.
"""

from __future__ import annotations

import asyncio
import os
import socket
from urllib.parse import urlsplit, urlunsplit

from dataprep.errors import MmpipeError

SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg", "sqlite", "sqlite+aiosqlite"}
CONNECT_TIMEOUT_S = 10.0


class DatabaseProblem(MmpipeError, RuntimeError):
    """The Prefect server's database cannot be used; the message names the masked URL."""


def masked(url: str) -> str:
    """`url` with its password replaced by ***, safe to print and to log."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "(a database URL that cannot be parsed)"


def server_database_url(url: str) -> str:
    """The URL as Prefect's server takes it (the asyncpg or aiosqlite driver named)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise DatabaseProblem(
            f"database URL {masked(url)} is not a PostgreSQL or SQLite URL. "
            "Fix: postgresql+asyncpg://USER@HOST:PORT/DATABASE (password in PGPASSWORD)"
        )
    if scheme.startswith("sqlite"):
        return f"sqlite+aiosqlite://{rest}"
    return f"postgresql+asyncpg://{rest}"


def check_database(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Log in to the PostgreSQL database at `url` once; raise DatabaseProblem saying why not."""
    url = server_database_url(url)
    if url.startswith("sqlite"):
        return  # created on first use
    try:
        asyncio.run(_connect(url.replace("+asyncpg", "", 1), timeout_s))
    except DatabaseProblem:
        raise
    except Exception as err:  # asyncpg's, the socket's and the URL parser's errors alike
        raise DatabaseProblem(_explain(url, err)) from None


async def _connect(dsn: str, timeout_s: float) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=timeout_s)
    await connection.close()


def _explain(url: str, err: Exception) -> str:
    import asyncpg

    where = f"the Prefect database {masked(url)}"
    if isinstance(err, asyncpg.InvalidAuthorizationSpecificationError):  # password, user
        return f"cannot log in to {where}: {err}. Fix: the user and PGPASSWORD"
    if isinstance(err, asyncpg.InvalidCatalogNameError):
        return f"{where} does not exist: {err}. Fix: `createdb` it"
    if isinstance(err, OSError):  # refused, unknown host, timed out
        reason = str(err) or type(err).__name__
        if err.errno:  # asyncpg's "Connect call failed" hides the errno's own words
            reason = err.strerror if isinstance(err, socket.gaierror) else os.strerror(err.errno)
        return f"cannot reach {where}: {reason}. Fix: start PostgreSQL or correct the URL"
    if isinstance(err, ValueError):  # asyncpg's URL parser: a bad port, an unknown option
        return f"bad database URL {masked(url)}: {err}"
    return f"cannot use {where}: {type(err).__name__}: {err}"
