"""The training engine: Ray Train `TorchTrainer` workers, each driving a DeepSpeed engine.

One engine for every model: a `ModelSpec` (training/specs) supplies model, data and loss. The
driver (`launch`) validates the config, starts or joins Ray and runs the trainer; each worker
(`train_worker`) initialises DeepSpeed inside the Ray worker, resumes from the run's latest
checkpoint if there is one, and trains, reporting metrics and checkpoints through Ray Train.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dataprep.errors import MmpipeError, debugging
from dataprep.ray_session import init_ray
from dataprep.state import state_dir
from dataprep.store import WITH_SECRETS
from training.config import TrainConfig
from training.parallel import (
    DTYPES,
    build_model,
    check_precision,
    deepspeed_config,
    make_optimizer,
    make_scheduler,
)
from training.registry import get_spec
from training.shards import resolve_shards
from training.specs import param_groups

CLIENT_STATE = "mmpipe_state"


@dataclass
class TrainResult:
    name: str
    steps: int
    metrics: dict
    checkpoint_uri: str | None
    run_uri: str


# --- driver -----------------------------------------------------------------------------


def validate(cfg: TrainConfig, inputs: bool = True) -> None:
    """Everything that can be checked before a worker starts: the config, and (``inputs``)
    that the run's data and checkpoints exist. Inputs are not checked when joining a cluster by
    address (``scale.ray_address``): its workers may see paths that this machine does not, and
    they report what is missing."""
    cfg.engine.check_batch(cfg.scale.num_workers)
    check_precision(cfg)
    spec = get_spec(cfg.spec)  # unknown specs fail here, not in a worker
    if inputs and not cfg.scale.ray_address:
        spec.check_inputs(cfg)


def launch(cfg: TrainConfig, echo_steps: bool = True) -> TrainResult:
    """Train (or resume) the run `cfg.name` on Ray; blocks until it ends.

    ``echo_steps``: rank 0 prints a line per logged step (through Ray to this driver); callers
    that tail metrics.jsonl themselves (the Prefect flows) turn it off.
    """
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchConfig

    from training.ray_trainer import Trainer

    validate(cfg)
    # The flows follow steps from metrics.jsonl and report errors themselves: workers' own
    # output (and Ray's copies of their tracebacks) stays in Ray's logs unless asked for.
    init_ray(
        cfg.scale.ray_address,
        runtime_env={"env_vars": worker_env(cfg)},
        log_to_driver=echo_steps or debugging(),
    )
    store = cfg.store.open()
    fs, runs_path = store.arrow_filesystem("runs")
    trainer = Trainer(
        train_worker,
        # The env travels with the run too: a Ray started earlier by someone else (the build's
        # embed stage, a user's ray.init) has not got it in its runtime_env.
        train_loop_config={
            "cfg": cfg.model_dump(mode="json", context=WITH_SECRETS),
            "env": worker_env(cfg),
            "echo_steps": echo_steps,
            # The shard list, resolved once per run here rather than once per rank; a cluster
            # joined by address may see paths this machine does not, so its ranks resolve.
            "shards": None if cfg.scale.ray_address else resolve_shards(cfg.data, cfg.store.s3),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scale.num_workers,
            use_gpu=cfg.scale.use_gpu,
            resources_per_worker={"CPU": cfg.scale.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scale.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=runs_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_kept),
            failure_config=FailureConfig(max_failures=cfg.scale.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        cause = _worker_user_error(err)
        if cause is None:
            raise
        raise cause from err  # e.g. a shard that fails its checksum: one line, not Ray's dump
    checkpoint = result.checkpoint
    return TrainResult(
        name=cfg.name,
        steps=int(result.metrics.get("step", 0)) if result.metrics else 0,
        metrics=dict(result.metrics or {}),
        checkpoint_uri=_store_uri(store, runs_path, checkpoint.path) if checkpoint else None,
        run_uri=store.uri(cfg.run_prefix()),
    )


def _worker_user_error(err: Exception) -> MmpipeError | None:
    """The lowest rank's own mmpipe error, if that is what failed the workers."""
    failures = getattr(err, "worker_failures", {})
    for rank in sorted(failures):
        if isinstance(failures[rank], MmpipeError):
            return failures[rank]
    return None


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    env = {
        "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p),
        "MMPIPE_STATE_DIR": str(state_dir()),
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    if not cfg.scale.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator: gloo, bf16
    return env


def _store_uri(store, runs_path: str, checkpoint_path: str) -> str:
    relative = checkpoint_path.split(runs_path, 1)[-1].lstrip("/")
    return store.uri(f"runs/{relative}")


# --- worker -----------------------------------------------------------------------------


def train_worker(config: dict) -> None:
    """Runs in every Ray Train worker: DeepSpeed is imported and initialised here."""
    os.environ.update(config["env"])  # before DeepSpeed picks its accelerator
    import deepspeed
    import ray.train

    _skip_shm_comm_build(deepspeed)

    cfg = TrainConfig.model_validate(config["cfg"])
    _quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scale.cpus_per_worker)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    spec = get_spec(cfg.spec)
    spec.prepare(cfg)
    model = build_model(lambda: spec.build(cfg), cfg, world, spec.late_inits)
    if cfg.engine.activation_checkpointing:
        spec.enable_activation_checkpointing(model)
    optimizer = make_optimizer(param_groups(model, spec, cfg.optim.weight_decay), cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=make_scheduler(optimizer, cfg),
        config=deepspeed_config(cfg, world),
        dist_init_required=False,  # Ray Train already set up the process group
    )
    step, metrics_rows = _restore(engine, rank)
    store = cfg.store.open()
    sink = None
    if rank == 0:
        from training.monitor import MetricsSink, read_metrics

        if step == 0:
            metrics_rows = []
        else:
            metrics_rows = [r for r in read_metrics(store, cfg.run_prefix()) if r["step"] <= step]
        local = Path(tempfile.mkdtemp(prefix=f"{cfg.name}-", dir=_work_dir()))
        sink = MetricsSink(store, cfg.run_prefix(), local, metrics_rows, config["echo_steps"])
    _train(cfg, spec, engine, rank, world, step, sink, config.get("shards"))
    if sink is not None:
        sink.close()


def _skip_shm_comm_build(deepspeed) -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce when its communication backend
    starts: 30 s to 3 min of g++ on 2 cores, again whenever the virtualenv moves (the build is
    keyed by its include paths). Only ``inference_all_reduce`` uses it, which training never
    calls (its all-reduces go through torch.distributed, gloo here), so it is marked
    incompatible and not built. DeepSpeed keeps the probed dict, so the edit holds."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _quiet_worker_logs() -> None:
    """Keep the driver's log to mmpipe's step lines: Ray logs every report at INFO, and
    DeepSpeed calls a torch.distributed function torch has deprecated, once per step."""
    import logging
    import warnings

    from ray.train.v2._internal.execution import context

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # Ray names it by its path


def _work_dir() -> Path:
    path = state_dir() / "work" / "train"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _train(cfg, spec, engine, rank: int, world: int, step: int, sink, shards=None) -> None:
    import ray.train

    dtype = DTYPES[cfg.engine.precision]
    accum = cfg.engine.grad_accum_steps
    batches = _batches(cfg, spec, rank, world, step, shards)
    window = _Window(engine.device)
    while step < cfg.steps:
        for _ in range(accum):
            batch = _to_device(next(batches), engine.device, dtype)
            terms = spec.loss(engine, batch)
            engine.backward(terms["total"])
            engine.step()
            window.add(terms, batch, cfg.engine.micro_batch_size * world)
        step += 1
        extra = spec.after_step(engine.module)
        metrics: dict = {}
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = window.reduce(engine.get_lr()[0], world) | extra
        due = cfg.eval.every_steps and step % cfg.eval.every_steps == 0 or step == cfg.steps
        if due and cfg.eval.set != "none":  # on every rank: each scores its share
            engine.eval()
            with torch.no_grad():
                metrics |= spec.evaluate(engine.module, cfg, dtype)
            engine.train()
        if metrics and sink is not None:
            sink.log(step, metrics)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save(engine, step, metrics or {"step": step})
        elif metrics:
            ray.train.report({"step": step, **metrics})


class _Window:
    """Loss terms and throughput since the last log, averaged over ranks when reported.

    Sums stay on the engine's ``device``: no host sync per micro-step, and the all-reduce gets
    a tensor of the device NCCL serves (it takes CUDA tensors only; gloo takes CPU ones)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.samples, self.skipped = 0, 0, 0
        self.started = time.monotonic()

    def add(self, terms: dict, batch: dict, global_samples: int) -> None:
        for name, value in terms.items():
            value = value.detach().float().reshape(()).to(self.device)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1
        self.samples += global_samples
        self.skipped += int(batch.get("skipped", 0))

    def reduce(self, lr: float, world: int) -> dict:
        names = sorted(self.sums)
        skipped = torch.tensor([float(self.skipped)], device=self.device)
        values = torch.cat([torch.stack([self.sums[n] for n in names]) / self.count, skipped])
        if world > 1:
            dist.all_reduce(values)
            values[: len(names)] /= world
        values = values.tolist()
        elapsed = time.monotonic() - self.started
        metrics = {f"train/{n}": v for n, v in zip(names, values[: len(names)], strict=True)}
        metrics["lr"] = lr
        metrics["samples_per_s"] = self.samples / elapsed if elapsed > 0 else 0.0
        metrics["data/skipped_samples"] = int(values[-1])
        self.__init__(self.device)
        return metrics


def _batches(cfg, spec, rank: int, world: int, step: int, shards=None):
    """Micro-batches forever, epoch after epoch, starting where `step` left off."""
    loader = spec.train_loader(cfg, rank, world, shards)
    epoch, skip = divmod(step * cfg.engine.grad_accum_steps, loader.steps_per_epoch)
    while True:
        loader.set_epoch(epoch, skip_batches=skip)  # replays the epoch's stream, no decoding
        yield from loader
        epoch, skip = epoch + 1, 0


def _to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
        out[key] = value
    return out


def _save(engine, step: int, metrics: dict) -> None:
    """Every rank writes its part (ZeRO shards) and reports it; Ray merges them in storage."""
    import ray.train

    with tempfile.TemporaryDirectory(dir=_work_dir()) as tmp:
        engine.save_checkpoint(tmp, tag=f"step{step:08d}", client_state={CLIENT_STATE: step})
        ray.train.report(
            {"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
        )


def _restore(engine, rank: int) -> tuple[int, list]:
    """Load the run's latest checkpoint, if any: weights, optimizer, LR schedule and step."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with tempfile.TemporaryDirectory(dir=_work_dir()) as tmp:
        download_rank_share(checkpoint, rank, Path(tmp))
        _, client_state = engine.load_checkpoint(tmp)
    step = int(client_state[CLIENT_STATE])
    print(f"resumed from {checkpoint.path} at step {step}", flush=True)
    return step, []


_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank partition files


def download_rank_share(checkpoint, rank: int, dest: Path) -> list[str]:
    """Copy the files of a Ray Train checkpoint that ``rank`` loads into ``dest``: its own ZeRO
    partitions and the shared files, not the other ranks' partitions (for the 12B, ~200 GB a
    worker otherwise). Returns the relative paths copied."""
    import pyarrow.fs as pafs

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    copied = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        relative = info.path[len(root) :].lstrip("/")
        owner = _RANK_FILE.search(Path(relative).name)
        if info.type != pafs.FileType.File or (owner and int(owner.group(1)) != rank):
            continue
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(info.path, str(dest / relative), source_filesystem=fs)
        copied.append(relative)
    return sorted(copied)
