"""Prefect flows that train models: thin wrappers over `training.engine`."""

from __future__ import annotations

import contextvars
import threading

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from pipelines.report import training_markdown
from training.config import TrainConfig
from training.engine import TrainResult, launch
from training.export import export_run
from training.monitor import read_metrics

POLL_S = 5.0


class _Progress:
    """Tails the run's metrics.jsonl while training runs: Prefect logs and a progress bar."""

    def __init__(self, cfg: TrainConfig, artifact_id):
        self.cfg, self.artifact_id = cfg, artifact_id
        self.logger = get_run_logger()
        self.seen = 0
        self.stop = threading.Event()
        run = contextvars.copy_context().run  # the thread talks to this flow run's API
        self.thread = threading.Thread(target=run, args=(self._poll,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._update()

    def _poll(self) -> None:
        while not self.stop.wait(POLL_S):
            self._update()

    def _update(self) -> None:
        try:
            rows = read_metrics(self.cfg.store.open(), self.cfg.run_prefix())
        except Exception as err:  # monitoring must never fail the run
            self.logger.warning("cannot read metrics yet: %s", err)
            return
        for row in rows[self.seen :]:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            self.logger.info("step %d: %s", row["step"], shown)
        self.seen = len(rows)
        if rows:
            update_progress_artifact(self.artifact_id, 100.0 * rows[-1]["step"] / self.cfg.steps)


@task(name="train", task_run_name="train {cfg.name}")
def train_task(cfg: TrainConfig) -> TrainResult:
    artifact = create_progress_artifact(
        0.0, key=f"{cfg.name}-progress", description=f"training {cfg.name}: share of steps done"
    )
    with _Progress(cfg, artifact):
        return launch(cfg)


@task(name="export", retries=2, retry_delay_seconds=5)
def export_task(cfg: TrainConfig) -> str:
    return export_run(cfg)


def _run_name() -> str:
    from prefect.runtime import flow_run

    cfg = flow_run.parameters["cfg"]
    return f"train {cfg.spec} {cfg.name}"


def train_and_report(cfg: TrainConfig) -> dict:
    """The body of every training flow: train (or resume), export, report the curve."""
    result = train_task(cfg)
    exported = export_task(cfg)
    rows = read_metrics(cfg.store.open(), cfg.run_prefix())
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if evals:
        create_table_artifact(
            evals, key=f"{cfg.name}-eval", description=f"{cfg.name}: held-out metrics by step"
        )
    create_markdown_artifact(
        training_markdown(cfg, result, exported, rows),
        key=f"{cfg.name}-summary",
        description=f"training run {cfg.name}",
    )
    return {"result": result.__dict__, "export": exported, "final": rows[-1] if rows else {}}


@flow(name="train-clip", flow_run_name=_run_name)
def train_clip(cfg: TrainConfig) -> dict:
    """Train (or resume) a CLIP run on Ray + DeepSpeed, export its weights, report its curve."""
    return train_and_report(cfg)
