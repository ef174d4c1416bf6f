"""Per-shard work on Ray: one task per shard, placed by Ray over the cluster, retried on failure.

A task reads its inputs from the store and writes its outputs there (through ``Staging``); only
small results (stats, histograms) come back to the driver, in the order the tasks finish. Ray
starts once per build process: ``init_ray`` does nothing when this process is connected already.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dataprep.ray_session import init_ray

T = TypeVar("T")
MAX_IN_FLIGHT = 2000  # submitted and unfinished tasks; bounds the driver's bookkeeping


def this_node() -> str | None:
    """The Ray node this code runs on (recorded in per-shard stats); None outside Ray."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to ask
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def map_shards(
    fn: Callable[..., T],
    shards: list[int],
    args: tuple = (),
    *,
    ray_address: str | None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_retries: int = 2,
) -> Iterator[T]:
    """``fn(shard, *args)`` for every shard as a Ray task; yields results as tasks finish.

    A task that raises or whose worker or node dies is run again up to ``max_retries`` times; a
    shard that still fails raises its own error here (an mmpipe error as itself, one line) and
    the tasks not yet finished are cancelled.
    """
    import ray
    from ray.exceptions import RayTaskError

    if not shards:
        return
    init_ray(ray_address)
    remote = ray.remote(fn).options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_retries=max_retries,
        retry_exceptions=True,
        scheduling_strategy="SPREAD",  # shards are alike: use every node's disks and network
    )
    shared = [ray.put(a) for a in args]  # once, not once per task
    queue = list(reversed(shards))
    pending: list[Any] = []
    try:
        while queue or pending:
            while queue and len(pending) < MAX_IN_FLIGHT:
                pending.append(remote.remote(queue.pop(), *shared))
            ready, _ = ray.wait(pending, num_returns=1)
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in ready:
                yield ray.get(ref)
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        raise (cause if isinstance(cause, Exception) else err) from None
    finally:
        for ref in pending:
            ray.cancel(ref)


def run_shards(
    fn: Callable[..., T],
    shards: list[int],
    done: dict[int, T],
    args: tuple = (),
    on_shard: Callable[[T], None] | None = None,
    **options: Any,
) -> list[T]:
    """`map_shards` over the shards not in `done` (those already committed), each result
    recorded there and reported to `on_shard`; every shard's result, in shard order."""
    todo = [s for s in shards if s not in done]
    for result in map_shards(fn, todo, args, **options):
        done[result.shard] = result
        if on_shard is not None:
            on_shard(result)
    return [done[s] for s in shards]
