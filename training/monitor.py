"""Training metrics: TensorBoard event files and a metrics.jsonl in the run's store folder.

Rank 0 writes locally and copies the files to `runs/<name>/` after each log, so TensorBoard
(pointed at the store) and `mmpipe` flows (which tail metrics.jsonl) see progress while the run
is going, whatever the store is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dataprep.store import ObjectStore

METRICS_FILE = "metrics.jsonl"


class MetricsSink:
    def __init__(
        self,
        store: ObjectStore,
        run_prefix: str,
        local_dir: Path,
        resumed_rows: list,
        echo: bool = True,
    ):
        from tensorboardX import SummaryWriter

        self.store, self.prefix, self.local = store, run_prefix, local_dir
        self.local.mkdir(parents=True, exist_ok=True)
        self.rows = list(resumed_rows)
        self.writer = SummaryWriter(str(self.local / "tensorboard"))
        self.started = time.monotonic()
        self.echo = echo  # print a line per log (off when a flow tails metrics.jsonl)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time_s": round(time.monotonic() - self.started, 2), **metrics}
        self.rows.append(row)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        if self.echo:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            print(f"[step {step}] {shown}", flush=True)
        self.sync()

    def sync(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        self.store.put_bytes(f"{self.prefix}/{METRICS_FILE}", text.encode())
        for path in sorted((self.local / "tensorboard").glob("*")):
            self.store.put_file(f"{self.prefix}/tensorboard/{path.name}", path)

    def close(self) -> None:
        self.writer.close()
        self.sync()


def read_metrics(store: ObjectStore, run_prefix: str) -> list[dict]:
    """The run's logged rows so far ([] before its first log)."""
    key = f"{run_prefix}/{METRICS_FILE}"
    if not store.exists(key):
        return []
    return [json.loads(line) for line in store.get_bytes(key).decode().splitlines() if line]


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
