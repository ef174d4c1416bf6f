"""No two builds of one dataset at once: a Prefect global concurrency limit per dataset.

The limit `build-dataset-<name>` (one slot) is created on first use. The slot is held through
a lease that the holder renews, so a build that dies frees it when the lease runs out. This
holds across everything that talks to the same Prefect API: scheduled runs, event-triggered
runs, `mmpipe build` by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

LEASE_S = 300.0  # a dead holder's slot is free again after this long


def build_limit_name(dataset: str) -> str:
    return f"build-dataset-{dataset}"


def ensure_limit(name: str, slots: int = 1) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                limit = GlobalConcurrencyLimitCreate(name=name, limit=slots)
                client.create_global_concurrency_limit(limit)
            except ObjectAlreadyExists:
                pass  # another build created it first


@contextmanager
def dataset_build_lock(dataset: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the dataset's build slot; waits for a running build (TimeoutError after timeout_s)."""
    name = build_limit_name(dataset)
    ensure_limit(name)
    with ExitStack() as held:
        try:
            held.enter_context(_slot(name, timeout_s=min(timeout_s or 1.0, 1.0)))
        except TimeoutError:
            _say(f"another build of {dataset} is running: waiting for it (limit {name})")
            held.enter_context(_slot(name, timeout_s=timeout_s))
        yield


def _slot(name: str, timeout_s: float | None):
    from prefect.concurrency.sync import concurrency

    return concurrency(
        name, occupy=1, timeout_seconds=timeout_s, strict=True, lease_duration=LEASE_S
    )


def _say(message: str) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        print(message)
