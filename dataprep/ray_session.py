"""Starting Ray: join only the cluster the config names, else a private local Ray.

`ray.init(address=None)` joins whatever cluster this machine last recorded (Ray's address file),
so a Ray that died leaves every later run retrying a dead address. mmpipe never relies on that.
"""

from __future__ import annotations

import os
from typing import Any


def ray_address(configured: str | None) -> str:
    """The configured address; inside a Ray Job, the job's cluster (RAY_ADDRESS, set by Ray);
    otherwise "local": a new Ray of this process's own."""
    return configured or os.environ.get("RAY_ADDRESS") or "local"


def init_ray(configured: str | None, **init_kwargs: Any) -> None:
    """Connect this process to Ray once: to `configured` ("auto", host:port, ray://...) or as
    `ray_address` says."""
    import ray

    if not ray.is_initialized():
        init_kwargs.setdefault("include_dashboard", False)
        init_kwargs.setdefault("log_to_driver", True)
        ray.init(address=ray_address(configured), **init_kwargs)
