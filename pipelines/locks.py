"""No two builds of one dataset at once, and a dead build never blocks the next one.

The lock of dataset NAME is the Prefect variable `build-lock-NAME`, so it holds across everything
that talks to one Prefect API (a server, or the ephemeral API's database): scheduled runs,
triggered runs, `mmpipe build` by hand. Creating the variable takes the lock (names are unique:
of two racing builds one wins); deleting it frees it. Its value names the holder (flow run, host,
pid, start) and when the holder last renewed it (every lease_s / 3).

A waiting build takes the lock over when the holder is gone: its process has exited (same host),
its flow run has ended, or it has not renewed the lock for its lease. The waiter deletes that
holder's record by id, so a late verdict can never delete a newer holder's, then creates its own.
A holder that finds its record gone stops before it publishes (`BuildLock.check`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from pydantic import BaseModel

from dataprep.errors import MmpipeError
from pipelines.server import process_alive

LEASE_S = 300.0  # a holder that stops renewing (no process check possible) is gone after this
POLL_S = 1.0  # how often a waiting build looks at the holder


class LockLost(MmpipeError, RuntimeError):
    """Another build took this build's lock over (it had not renewed it for its lease)."""


class Holder(BaseModel):
    """Who holds a build lock: the record stored in the lock's variable."""

    flow_run_id: str | None = None
    flow_run_name: str | None = None
    host: str
    pid: int
    pid_space: str  # where `pid` names this process: host, boot and pid namespace
    started_at: str  # ISO 8601, UTC, on the holder's clock
    renewed_at: str
    lease_s: float

    def describe(self) -> str:
        run = f"flow run '{self.flow_run_name}' ({self.flow_run_id})" if self.flow_run_id else ""
        where = f"host {self.host}, pid {self.pid}, since {self.started_at}"
        return f"{run}, {where}" if run else where


def lock_name(dataset: str) -> str:
    return f"build-lock-{dataset}"


class BuildLock:
    """A held build lock; a thread renews it until `release`."""

    def __init__(self, dataset: str, record_id: UUID, holder: Holder):
        self.dataset, self.record_id, self.holder = dataset, record_id, holder
        self._stop, self._lost = threading.Event(), threading.Event()
        run_in_context = contextvars.copy_context().run  # the flow run's logger in the thread
        self._thread = threading.Thread(
            target=run_in_context, args=(self._renew,), name=f"lock-{dataset}", daemon=True
        )
        self._thread.start()

    def check(self) -> None:
        """Raise LockLost if another build has taken the lock over."""
        if self._lost.is_set():
            raise LockLost(
                f"another build took over the build lock of {self.dataset} from this one (which "
                f"had not renewed it for its {self.holder.lease_s:.0f} s lease, or looked dead to "
                "it): stopping before publishing"
            )

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                _delete(client, self.record_id)  # False: taken over, and `check` says so
        except Exception as err:  # waiters see this process exit, or the lease run out
            _say(f"could not release the build lock of {self.dataset}: {err}")

    def _renew(self) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while not self._stop.wait(self.holder.lease_s / 3):
                self.holder.renewed_at = _now()
                try:
                    if not _update(client, self.record_id, self.holder):
                        self._lost.set()
                        _say(f"the build lock of {self.dataset} was taken over by another build")
                        return
                except Exception as err:  # the API is away for a moment: try again next time
                    _say(f"could not renew the build lock of {self.dataset}: {err}")


@contextmanager
def dataset_build_lock(
    dataset: str, lease_s: float = LEASE_S, timeout_s: float | None = None
) -> Iterator[BuildLock]:
    """Hold the dataset's build lock; waits while a live build holds it (TimeoutError after
    timeout_s) and takes it over from a dead one."""
    lock = acquire(dataset, lease_s, timeout_s)
    try:
        yield lock
    finally:
        lock.release()


def acquire(dataset: str, lease_s: float = LEASE_S, timeout_s: float | None = None) -> BuildLock:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate
    from prefect.exceptions import ObjectAlreadyExists

    name = lock_name(dataset)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    unchanged = _Unchanged()
    announced = None
    with get_client(sync_client=True) as client:
        while True:
            me = _me(lease_s)
            try:
                record = client.create_variable(VariableCreate(name=name, value=me.model_dump()))
                return BuildLock(dataset, record.id, me)
            except ObjectAlreadyExists:
                pass  # another build holds it: see who, below
            record = client.read_variable_by_name(name)
            if record is None:
                continue  # released a moment ago
            holder = Holder.model_validate(record.value)
            if reason := _gone(client, holder, unchanged.for_s((record.id, holder.renewed_at))):
                _say(f"taking over the build lock of {dataset} from {holder.describe()}: {reason}")
                _delete(client, record.id)  # False: another waiter was first
                continue
            if announced != record.id:
                announced = record.id
                _say(f"another build of {dataset} is running: waiting for it ({holder.describe()})")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{name} is held by {holder.describe()}")
            time.sleep(POLL_S)


class _Unchanged:
    """How long, on this process's clock, a value has stayed the same (no clock skew between
    hosts: the holder's own timestamps are only shown)."""

    def __init__(self):
        self._value: object = None
        self._since = time.monotonic()

    def for_s(self, value: object) -> float:
        if value != self._value:
            self._value, self._since = value, time.monotonic()
        return time.monotonic() - self._since


def _gone(client, holder: Holder, unrenewed_s: float) -> str | None:
    """Why the holder is gone, or None while it may be alive."""
    from prefect.exceptions import ObjectNotFound

    if holder.pid_space == _pid_space() and not process_alive(holder.pid):
        return f"its process {holder.pid} has exited"
    if holder.flow_run_id:
        try:
            run = client.read_flow_run(UUID(holder.flow_run_id))
        except ObjectNotFound:
            return "its flow run no longer exists"
        if run.state is not None and run.state.is_final():
            return f"its flow run is {run.state.name}"
    if unrenewed_s > holder.lease_s:
        return f"it has not renewed the lock for {unrenewed_s:.0f} s (lease {holder.lease_s:.0f} s)"
    return None


def _me(lease_s: float) -> Holder:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    now = _now()
    return Holder(
        flow_run_id=str(run.id) if run else None,
        flow_run_name=run.name if run else None,
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_space=_pid_space(),
        started_at=now,
        renewed_at=now,
        lease_s=lease_s,
    )


def _pid_space() -> str:
    """Where a pid names one process: this host, its boot and this pid namespace (on Linux)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    return " ".join(parts)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")  # renewals a second apart differ


def _update(client, record_id: UUID, holder: Holder) -> bool:
    """Write the holder's record; False if it is gone (taken over)."""
    return _by_id(client, "PATCH", record_id, json={"value": holder.model_dump()})


def _delete(client, record_id: UUID) -> bool:
    """Delete one record by id (never a newer holder's); False if it was already gone."""
    return _by_id(client, "DELETE", record_id)


def _by_id(client, method: str, record_id: UUID, **kwargs) -> bool:
    import httpx

    try:
        client.request(method, "/variables/{id}", path_params={"id": record_id}, **kwargs)
    except httpx.HTTPStatusError as err:
        if err.response.status_code == 404:
            return False
        raise
    return True


def _say(message: str) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        print(message, flush=True)
