"""The operations config (configs/serve.yaml): the Prefect server and the served deployments.

Loaded like every other config (`load_config`): YAML holds what differs from the defaults,
dotted overrides on the command line. Paths inside (build and training configs) are relative
to the directory `mmpipe serve` runs in.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.config import SpecName


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSection(_Strict):
    """`mmpipe server start`: a persistent Prefect server on loopback."""

    host: str = "127.0.0.1"
    port: int = Field(4200, ge=1, le=65535)
    startup_timeout_s: float = Field(90.0, gt=0)
    # postgresql+asyncpg://USER@HOST:PORT/DB, password in PGPASSWORD; None: SQLite in STATE
    database_url: str | None = None


class Schedule(_Strict):
    """When a deployment runs by itself: a cron line or an interval; neither means on demand."""

    cron: str | None = None  # "0 3 * * *": every day at 03:00
    interval_s: float | None = Field(None, gt=0)
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _one_kind(self) -> Schedule:
        if self.cron and self.interval_s:
            raise ValueError("give schedule.cron or schedule.interval_s, not both")
        return self


class BuildDeployment(_Strict):
    """A `build-dataset` deployment: a build config (URL list, dataset name) and its schedule."""

    config: str  # a BuildConfig YAML, e.g. configs/demo.yaml
    overrides: list[str] = []  # dotted key=value, as on the command line
    schedule: Schedule = Schedule()
    concurrency_limit: int = Field(1, ge=1)  # runs of this deployment at once


class PublishTrigger(_Strict):
    """Start the training deployment when a version of `dataset` is published."""

    dataset: str  # dataset name; the event's resource is mmpipe.dataset.<name>
    enabled: bool = True


class TrainDeployment(_Strict):
    """A `train-<model>` deployment: a training config, optionally triggered by a publish."""

    model: SpecName = "clip"
    config: str  # a TrainConfig YAML, e.g. configs/clip-tiny.yaml
    overrides: list[str] = []
    schedule: Schedule = Schedule()
    on_publish: PublishTrigger | None = None  # data.source := the published manifest
    concurrency_limit: int = Field(1, ge=1)
    # A Ray dashboard URL (http://HEAD:8265): runs train there as Ray Jobs; None: on this host.
    cluster_address: str | None = Field(None, pattern=r"^https?://")


class Alerts(_Strict):
    """A webhook notified when a build or training run ends in one of the `on` states."""

    webhook_url: str = Field(pattern=r"^https?://")  # Slack/Teams incoming webhook, a pager
    on: list[Literal["Failed", "Crashed", "TimedOut", "Cancelled"]] = ["Failed", "Crashed"]

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        """YAML 1.1 reads the key `on` as the boolean true."""
        if isinstance(data, dict) and True in data:
            data = {("on" if key is True else key): value for key, value in data.items()}
        return data


class ServeConfig(_Strict):
    """Everything `mmpipe serve`, `mmpipe deploy` and `mmpipe server` need."""

    server: ServerSection = ServerSection()
    alerts: Alerts | None = None  # created with the deployments as a Prefect automation
    builds: list[BuildDeployment] = []
    training: list[TrainDeployment] = []
