"""`mmpipe serve` and `mmpipe deploy`: Prefect deployments of the build and training flows, from
configs/serve.yaml, run by this process (`serve`) or by the workers of a work pool (`deploy`).

- `build-dataset/<dataset>`: one per build config, on its cron or interval schedule (or on
  demand), with the config (URL list, dataset name, ...) as its parameters; one run at a time.
- `train-<model>/<run>`: one per training config, for any registered model (`training_flows`);
  with `on_publish`, a DeploymentEventTrigger starts it when `mmpipe.dataset.published` is
  emitted for that dataset, training on the published manifest under the run name
  `<run>-<version>`; with `cluster_address`, its runs train on that Ray cluster as Ray Jobs.
- `alerts:` adds the automation that posts failed runs to a webhook (`pipelines.alerts`).
"""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipelines.config import BuildConfig, ConfigError, load_config
from pipelines.events import DATASET_PUBLISHED, dataset_resource_id
from pipelines.ops_config import BuildDeployment, Schedule, ServeConfig, TrainDeployment

# The run name of a triggered training run: the configured name plus the published version.
VERSION_SUFFIX = "-{{ event.payload.version | lower | replace('.', '-') | replace('_', '-') }}"


def _schedule_kwargs(schedule: Schedule) -> dict[str, Any]:
    if schedule.cron:
        from prefect.schedules import Cron

        return {"schedule": Cron(schedule.cron, timezone=schedule.timezone)}
    if schedule.interval_s:
        from prefect.schedules import Interval

        return {"schedule": Interval(timedelta(seconds=schedule.interval_s))}
    return {}


def build_deployment(spec: BuildDeployment):
    """The `build-dataset` deployment of one build config."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from pipelines.flows import build_dataset

    config = load_config(BuildConfig, spec.config, spec.overrides)
    runner = ThreadPoolTaskRunner(max_workers=config.concurrent_tasks)
    return build_dataset.with_options(task_runner=runner).to_deployment(
        name=config.name,
        parameters={"config": config.model_dump(mode="json")},
        concurrency_limit=spec.concurrency_limit,
        tags=["mmpipe", f"dataset:{config.name}"],
        description=f"build dataset {config.name} from {config.urls}",
        **_schedule_kwargs(spec.schedule),
    )


def train_deployment(spec: TrainDeployment):
    """The `train-<model>` deployment of one training config."""
    from pipelines.training_flows import training_flow
    from training.config import TrainConfig

    flow = training_flow(spec.model)
    cfg = load_config(TrainConfig, spec.config, [f"spec={spec.model}", *spec.overrides])
    params = {"cfg": cfg.model_dump(mode="json")}
    if spec.cluster_address:  # only then: a flow without the parameter is served unchanged
        params["cluster_address"] = spec.cluster_address
    triggers = [publish_trigger(spec, params)] if spec.on_publish else []
    return flow.to_deployment(
        name=cfg.name,
        parameters=params,
        triggers=triggers,
        concurrency_limit=spec.concurrency_limit,
        tags=["mmpipe", f"model:{spec.model}"],
        description=f"train {spec.model} run {cfg.name}",
        **_schedule_kwargs(spec.schedule),
    )


def publish_trigger(spec: TrainDeployment, params: dict):
    """Run the deployment when its dataset is published, on the published manifest."""
    from prefect.events import DeploymentEventTrigger

    dataset = spec.on_publish.dataset
    cfg = dict(params["cfg"])
    cfg["name"] = cfg["name"] + VERSION_SUFFIX
    cfg["data"] = {**cfg["data"], "source": "{{ event.payload.manifest_url }}"}
    return DeploymentEventTrigger(
        name=f"train {cfg['spec']} on publish of {dataset}",
        enabled=spec.on_publish.enabled,
        expect={DATASET_PUBLISHED},
        match={"prefect.resource.id": dataset_resource_id(dataset)},
        parameters={**params, "cfg": cfg},
    )


def deployments(config: ServeConfig) -> list:
    """Every deployment the serve config asks for."""
    found = [build_deployment(spec) for spec in config.builds]
    found += [train_deployment(spec) for spec in config.training]
    if not found:
        raise ConfigError("the serve config lists no deployments (builds: or training:)")
    return found


def apply_deployments(config: ServeConfig) -> list[str]:
    """Create or update the deployments (and their triggers) on the Prefect API; returns ids."""
    ids = [str(d.apply()) for d in deployments(config)]
    apply_alerts_of(config)
    return ids


def apply_alerts_of(config: ServeConfig) -> None:
    """The alerts automation of `config.alerts`, if it asks for one."""
    if config.alerts:
        from pipelines.alerts import apply_alerts

        apply_alerts(config.alerts)


def deploy(config: ServeConfig, pool: str = "mmpipe", project_dir: Path | None = None) -> list:
    """Create or update the deployments on the `process` work pool `pool` (created if missing)
    for `prefect worker start --pool POOL` to run; returns them.

    Workers import the flows from the installed mmpipe (module-path entrypoints) and run them
    in `project_dir` (default: here), where the configs' relative paths point."""
    found = deployments(config)
    _ensure_process_pool(pool)
    working_dir = str(project_dir or Path.cwd().resolve())  # as the workers see it
    for deployment in found:
        deployment.entrypoint = _module_entrypoint(deployment.flow_name)
        deployment.job_variables = {**deployment.job_variables, "working_dir": working_dir}
        deployment.apply(work_pool_name=pool)
    apply_alerts_of(config)
    return found


def _module_entrypoint(flow_name: str) -> str:
    """Where a worker imports a flow from: `pipelines.flows.build_dataset`, ..."""
    if flow_name == "build-dataset":
        return "pipelines.flows.build_dataset"
    return f"pipelines.training_flows.{flow_name.replace('-', '_')}"  # train_clip, ...


def _ensure_process_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(name=pool, type="process", base_job_template=template)
            )
            return
    if found.type != "process":
        raise ConfigError(f"work pool {pool} is of type {found.type}, not process")


def serve(config: ServeConfig) -> None:
    """Create the deployments and run their flow runs here until Ctrl-C or SIGTERM; either
    pauses their schedules and returns."""
    found = deployments(config)
    apply_alerts_of(config)
    runner = _runner()
    for deployment in found:
        runner.add_deployment(deployment)
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in found)
    print(f"serving {len(found)} deployments: {names} (Ctrl-C or SIGTERM stops)", flush=True)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass  # the way to stop serving: the runner has paused the schedules on its way out
    finally:
        signal.signal(signal.SIGTERM, previous)  # the runner leaves its handler installed
    print("stopped serving; the deployments' schedules are paused", flush=True)


def _runner():
    """Prefect's Runner (what `prefect.serve` runs), stopping on SIGTERM as on Ctrl-C.

    Prefect's SIGTERM handler calls the sync `Runner.stop()` from inside the running event
    loop, where it returns a coroutine nobody awaits (so runs are not cancelled), then raises
    SystemExit wherever the loop is, in the middle of pausing schedules or of a request; once
    the runner has stopped, the same handler raises RuntimeError into whatever runs at exit.
    Raising SIGINT instead takes asyncio's own path: the main task is cancelled, the runner
    pauses its schedules on the way out, and a second signal stops at once."""
    from prefect.runner import Runner

    class StopsLikeCtrlC(Runner):
        def handle_sigterm(self, *args, **kwargs) -> None:
            self._logger.info("SIGTERM received: stopping as on Ctrl-C")
            signal.raise_signal(signal.SIGINT)

    return StopsLikeCtrlC(pause_on_shutdown=True)
