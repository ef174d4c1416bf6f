"""The project's state dir: the embedded store, Prefect's database, work files."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STATE_DIR = "state"


def state_dir() -> Path:
    """`$MMPIPE_STATE_DIR`, else ./state (absolute, so subprocesses agree on it)."""
    return Path(os.environ.get("MMPIPE_STATE_DIR", DEFAULT_STATE_DIR)).absolute()
