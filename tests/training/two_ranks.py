"""Run a function on two gloo ranks in fresh processes and collect what each rank returns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def on_two_ranks(fn: Callable[..., Any], *args: Any, tmp_path: Path) -> dict[int, Any]:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        init_file = str(tmp_path / "init")
        mp.spawn(_rank, args=(init_file, fn, args, results), nprocs=2, join=True)
        return dict(results)


def _rank(rank: int, init_file: str, fn: Callable[..., Any], args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results[rank] = fn(*args)
    finally:
        dist.destroy_process_group()
