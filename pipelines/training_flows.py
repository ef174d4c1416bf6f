"""Prefect flows that train models: `train-<spec>` for every registered spec, one body.

Thin wrappers over `training.engine`. With `cluster_address` (a Ray dashboard URL), a flow trains
on that cluster instead: a Ray Job trains the resolved config (`pipelines.job`), its logs stream
into the flow's log, and the flow reports from the store the job wrote to.
"""

from __future__ import annotations

import contextvars
import functools
import threading

from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from pipelines import launch as ray_job
from pipelines.build_report import png_markdown
from pipelines.report import training_markdown
from pipelines.training_report import curves_png
from training.config import TrainConfig
from training.engine import TrainResult, launch
from training.export import export_run
from training.monitor import read_metrics
from training.registry import check_spec_name, spec_names

POLL_S = 5.0


class _Progress:
    """Tails the run's metrics.jsonl while training runs: Prefect logs and a progress bar."""

    def __init__(self, cfg: TrainConfig, artifact_id, log_rows: bool = True):
        self.cfg, self.artifact_id, self.log_rows = cfg, artifact_id, log_rows
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
        for row in rows[self.seen :] if self.log_rows else []:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            self.logger.info("step %d: %s", row["step"], shown)
        self.seen = len(rows)
        if rows:
            update_progress_artifact(self.artifact_id, 100.0 * rows[-1]["step"] / self.cfg.steps)


def _progress_artifact(cfg: TrainConfig):
    return create_progress_artifact(
        0.0, key=f"{cfg.name}-progress", description=f"training {cfg.name}: share of steps done"
    )


@task(name="train", task_run_name="train {cfg.name}")
def train_task(cfg: TrainConfig) -> TrainResult:
    with _Progress(cfg, _progress_artifact(cfg)):
        return launch(cfg, echo_steps=False)  # _Progress logs the steps


@task(name="launch", task_run_name="launch {cfg.name} on {address}")
def launch_task(cfg: TrainConfig, address: str) -> TrainResult:
    """Train on the Ray cluster at `address` as a Ray Job; fails when the job does."""
    logger = get_run_logger()
    # The job's own flow logs a line per step: here the metrics tail only moves the bar.
    with _Progress(cfg, _progress_artifact(cfg), log_rows=False):
        job = ray_job.launch_resolved(address, cfg, out=logger.info)
    where = f"Ray job {job.job_id} on {address}"
    if job.status != "SUCCEEDED":
        raise RuntimeError(f"{where} ended {job.status} (its log is above)")
    if job.checkpoint_uri is None:
        raise RuntimeError(
            f"{where} succeeded, but {job.run_uri} holds no checkpoint: the cluster and this "
            "flow must share the store (store.url, e.g. s3://bucket/prefix)"
        )
    logger.info("%s succeeded; latest checkpoint %s", where, job.checkpoint_uri)
    final = (read_metrics(cfg.store.open(), cfg.run_prefix()) or [{}])[-1]
    return TrainResult(cfg.name, final.get("step", 0), final, job.checkpoint_uri, job.run_uri)


@task(name="export", retries=2, retry_delay_seconds=5)
def export_task(cfg: TrainConfig) -> str:
    return export_run(cfg)


def job_export(cfg: TrainConfig) -> str:
    """The weights a cluster job exported (its `mmpipe train` exports as a local run does):
    consolidating them again here could need more memory than this machine has."""
    store = cfg.store.open()
    keys = sorted(store.list(f"{cfg.run_prefix()}/export/"))
    if not keys:
        raise FileNotFoundError(f"no exported weights under {store.uri(cfg.run_prefix())}")
    return store.uri(keys[-1])


def _run_name() -> str:
    from prefect.runtime import flow_run

    cfg = flow_run.parameters["cfg"]
    return f"train {cfg.spec} {cfg.name}"


def train_and_report(cfg: TrainConfig, cluster_address: str | None = None) -> dict:
    """The body of every training flow: train (or resume), export, report the curve; here, or
    as a Ray Job on the cluster whose dashboard is `cluster_address` (http://HEAD:8265)."""
    if cluster_address:
        result = launch_task(cfg, cluster_address)
        exported = job_export(cfg)
    else:
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
    _curves_artifact(cfg, rows)
    return {"result": result.__dict__, "export": exported, "final": rows[-1] if rows else {}}


def _curves_artifact(cfg: TrainConfig, rows: list[dict]) -> None:
    """The loss and held-out metric curves: a PNG beside the metrics, shown in an artifact."""
    if (png := curves_png(rows)) is None:
        return
    store = cfg.store.open()
    key = f"{cfg.run_prefix()}/report/curves.png"
    store.put_bytes(key, png)
    create_markdown_artifact(
        png_markdown(f"{cfg.name}: loss and held-out metrics", png, store.uri(key)),
        key=f"{cfg.name}-curves",
        description=f"{cfg.name}: loss and held-out metric curves",
    )


@functools.cache
def training_flow(spec: str) -> Flow:
    """The flow `train-<spec>`: train (or resume) a run of a registered spec on Ray + DeepSpeed,
    export its weights and report its curve; on the Ray cluster at `cluster_address` (its
    dashboard URL) if given. It refuses a config of another spec."""
    check_spec_name(spec)

    def train(cfg: TrainConfig, cluster_address: str | None = None) -> dict:
        if cfg.spec != spec:
            raise ValueError(f"train-{spec} got a config for spec {cfg.spec!r} ({cfg.name})")
        return train_and_report(cfg, cluster_address)

    # The name a deployment's entrypoint gives (pipelines/training_flows.py:train_clip).
    train.__name__ = train.__qualname__ = f"train_{spec.replace('-', '_')}"
    train.__doc__ = f"Train (or resume) a {spec} run, export its weights, report its curve."
    return flow(name=f"train-{spec}", flow_run_name=_run_name)(train)


def __getattr__(name: str) -> Flow:
    """`train_clip`, `train_dvae`, ...: the flow of each registered spec."""
    spec = name.removeprefix("train_").replace("_", "-")
    if name.startswith("train_") and spec in spec_names():
        return training_flow(spec)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
