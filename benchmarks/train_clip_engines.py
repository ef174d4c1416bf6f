"""The two engines of the train_clip benchmark, each run in its own process tree and watched.

mmpipe runs ``benchmarks.train_clip_mmpipe`` (Ray Train + DeepSpeed); open_clip runs
``benchmarks.train_clip_openclip`` under torchrun (DDP). Both read the same shards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.metering import TreeWatch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "clip-tiny"
CONFIG = ROOT / "configs" / "clip-tiny.yaml"
WORLD = 2  # ranks: 2 processes x 1 thread on the 2-core box
LOG_EVERY = 10  # steps per log window, both engines
SHARDS, PER_SHARD = 8, 1024
MMPIPE, OPENCLIP = "mmpipe", "open_clip"
OPENCLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}
RUN_TIMEOUT_S = 1800
STEP_MARK = "@@step-log"  # the open_clip launcher's timed "Train Epoch" lines
DONE_MARK = "@@done"  # the mmpipe driver finished
STEP_LOG = re.compile(rf"^{STEP_MARK} ([0-9.]+) Train Epoch: \d+ \[\s*(\d+)/", re.MULTILINE)


class BenchmarkError(RuntimeError):
    """A benchmark run that cannot give a valid figure; the message says why."""


@dataclass
class Run:
    engine: str
    repeat: int
    samples_per_s: float  # global, over the measured steps
    windows: list[float]  # global samples/s of each 10-step window in the measurement
    wall_s: float  # the whole run, start-up included
    rank_peak_rss_mib: list[float]  # VmHWM of each rank process
    loader_peak_rss_mib: list[float]  # VmHWM of each DataLoader worker process
    window_s: float | None = None  # the measured window, as seen by the watcher
    rank_cpu_s: float | None = None  # CPU of ranks + loaders in the measured window
    loader_cpu_s: float | None = None  # the loaders' part of it
    other_cpu_s: float | None = None  # CPU of processes outside the run, same window
    disturbed: bool = False  # others used > OTHER_CPU_WARN cores in the window
    counted: bool = True  # in the medians (a disturbed run is run again, --retries times)
    extra: dict = field(default_factory=dict)

    @property
    def rank_cpu_ms_per_sample(self) -> float | None:
        """Contention-robust cost: CPU (all ranks and loaders) per global sample."""
        if self.rank_cpu_s is None or self.window_s is None:
            return None
        return 1000 * self.rank_cpu_s / (self.samples_per_s * self.window_s)

    @property
    def loader_cpu_ms_per_sample(self) -> float | None:
        if self.loader_cpu_s is None or self.window_s is None:
            return None
        return 1000 * self.loader_cpu_s / (self.samples_per_s * self.window_s)

    @property
    def other_cores(self) -> float | None:
        """Cores that other processes used, on average, during the measured window."""
        if self.other_cpu_s is None or not self.window_s:
            return None
        return self.other_cpu_s / self.window_s


@dataclass
class Setup:
    args: argparse.Namespace
    tmp: Path
    shards: Path
    samples: int  # in the shards

    @property
    def total_steps(self) -> int:
        return self.args.warmup + self.args.steps

    @property
    def micro(self) -> int:
        return self.args.batch // WORLD

    @property
    def openclip_precision(self) -> str:
        return self.args.openclip_precision or OPENCLIP_PRECISION[self.args.precision]


def write_shards(folder: Path) -> int:
    """Crawl-shaped shards (NNNNN.tar + NNNNN.stats.json) of clean sample-web images."""
    import webdataset as wds

    from dataprep.sampleweb import generate_corpus, render_image
    from training.evaluate import crawl_border_resize

    folder.mkdir(parents=True)
    specs = generate_corpus(SHARDS * PER_SHARD, seed=11, fault_rates={})
    for shard in range(SHARDS):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
            for i, spec in enumerate(specs[shard * PER_SHARD : (shard + 1) * PER_SHARD]):
                image = crawl_border_resize(render_image(spec), 64)
                tar.write({"__key__": f"{shard:05d}{i:04d}", "jpg": image, "txt": spec.caption})
        (folder / f"{shard:05d}.stats.json").write_text(json.dumps({"kept": PER_SHARD}))
    with contextlib.suppress(AttributeError):
        render_image.cache_clear()
    return SHARDS * PER_SHARD


# --------------------------------------------------------------------------- watched processes


def run_watched(
    cmd: list[str], env: dict, log: Path, is_rank, steps_logged=None
) -> tuple[int, TreeWatch, float]:
    """Run ``cmd`` in its own session, output to ``log``; returns (rc, watch, wall seconds).

    On any error or interrupt the whole session is stopped: SIGINT first (so a Ray driver shuts
    its cluster down), then SIGKILL.
    """
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        watch = TreeWatch(proc.pid, is_rank, steps_logged)
        watch.start()
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except BaseException:
            _stop_session(proc)
            raise
        finally:
            watch.finish()
    return rc, watch, time.monotonic() - started


def _stop_session(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the session left behind


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- mmpipe

MMPIPE_DRIVER = "benchmarks.train_clip_mmpipe"


def mmpipe_overrides(setup: Setup, name: str) -> list[str]:
    a = setup.args
    return [
        f"name={name}",
        f"model={MODEL}",
        f"steps={setup.total_steps}",
        f"log_every={LOG_EVERY}",
        f"checkpoint_every={setup.total_steps}",  # only the final one, after the measurement
        "eval.every_steps=0",  # only at the end, after the measurement
        "eval.heldout_samples=64",
        f"data.source={setup.shards.as_uri()}/",
        "data.workers=1",
        "data.shuffle_buffer=1000",
        f"data.samples_per_epoch={setup.total_steps * a.batch}",  # one epoch, as open_clip
        f"engine.micro_batch_size={setup.micro}",
        "engine.grad_accum_steps=1",
        f"engine.train_batch_size={a.batch}",
        f"engine.precision={a.precision}",
        "engine.grad_clip=1.0",
        f"engine.zero.stage={a.zero_stage}",
        "optim.lr=0.002",
        "optim.weight_decay=0.1",
        "optim.warmup_steps=30",
        f"scale.num_workers={WORLD}",
        "scale.cpus_per_worker=1",
        "scale.use_gpu=false",
        f"store.url={(setup.tmp / 'store').as_uri()}",
    ]


def _is_ray_train_rank(proc, root_pid: int) -> bool:
    """A Ray Train worker, not one of its DataLoader workers (those share its proctitle)."""

    def train_worker(p) -> bool:
        return any("RayTrainWorker" in part for part in p.cmdline())

    return train_worker(proc) and not train_worker(proc.parent())


class MetricsSteps:
    """Polled by the watcher: the steps whose rows have landed in a run's metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path, self.mtime, self.logged = path, 0.0, set()

    def __call__(self) -> set[int]:
        with contextlib.suppress(OSError):
            mtime = self.path.stat().st_mtime
            if mtime != self.mtime:
                self.mtime = mtime
                steps = re.findall(r'"step": (\d+)', self.path.read_text())
                self.logged.update(int(n) for n in steps)
        return self.logged


def run_mmpipe(setup: Setup, repeat: int, attempt: int = 0) -> Run:
    from pipelines.config import load_config
    from training.config import TrainConfig
    from training.monitor import read_metrics

    a = setup.args
    name = f"bench-{repeat}-{attempt}"  # a new run: the same name would resume
    overrides = mmpipe_overrides(setup, name)
    cfg = load_config(TrainConfig, CONFIG, overrides)
    cmd = [sys.executable, "-m", MMPIPE_DRIVER, str(CONFIG), *overrides]
    env = os.environ | {
        "MMPIPE_STATE_DIR": str(setup.tmp / "state"),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    log = setup.tmp / f"mmpipe-{repeat}-{attempt}.log"
    steps = MetricsSteps(setup.tmp / "store" / cfg.run_prefix() / "metrics.jsonl")
    rc, watch, wall = run_watched(cmd, env, log, _is_ray_train_rank, steps)
    if rc != 0 or DONE_MARK not in log.read_text(errors="replace"):
        raise BenchmarkError(f"mmpipe run {repeat} failed (exit {rc}):\n{_tail(log)}")
    rows = read_metrics(cfg.store.open(), cfg.run_prefix())
    by_step = {r["step"]: r for r in rows if "samples_per_s" in r}
    ends = range(a.warmup + LOG_EVERY, setup.total_steps + 1, LOG_EVERY)
    missing = [s for s in ends if s not in by_step]
    if missing:
        raise BenchmarkError(f"mmpipe run {repeat}: no samples_per_s logged at steps {missing}")
    windows = [by_step[s]["samples_per_s"] for s in ends]
    window_samples = LOG_EVERY * a.batch
    seconds = sum(window_samples / w for w in windows)
    # CPU over the window: its ends as the watcher saw the rows appear (within its poll).
    t0, t1 = watch.step_seen.get(a.warmup), watch.step_seen.get(setup.total_steps)
    cpu = watch.window(t0, t1) if t0 is not None and t1 is not None else {}
    return Run(
        engine=MMPIPE,
        repeat=repeat,
        samples_per_s=len(windows) * window_samples / seconds,
        windows=windows,
        wall_s=wall,
        rank_peak_rss_mib=watch.peaks(watch.ranks, t0, t1),
        loader_peak_rss_mib=watch.peaks(watch.loaders, t0, t1),
        window_s=seconds,
        rank_cpu_s=cpu.get("rank_cpu_s"),
        loader_cpu_s=cpu.get("loader_cpu_s"),
        other_cpu_s=cpu.get("other_cpu_s"),
        extra={"final_loss": by_step[setup.total_steps].get("train/contrastive")},
    )


# --------------------------------------------------------------------------- open_clip

OPENCLIP_LAUNCHER = "benchmarks.train_clip_openclip"


def openclip_args(setup: Setup, name: str) -> list[str]:
    a = setup.args
    pattern = f"{setup.shards}/{{00000..{SHARDS - 1:05d}}}.tar"
    # One more step than mmpipe: open_clip logs after steps 1, 11, 21, ... (and the last), so
    # the measured window runs from the log after step warmup+1 to the one after total+1.
    steps = setup.total_steps + 1
    return [
        f"--model={MODEL}",
        f"--train-data={pattern}",
        "--dataset-type=webdataset",
        f"--train-num-samples={steps * a.batch}",
        "--epochs=1",
        f"--batch-size={setup.micro}",
        "--workers=1",
        "--device=cpu",
        "--dist-backend=gloo",
        f"--precision={setup.openclip_precision}",
        "--lr=0.002",
        "--wd=0.1",
        "--beta1=0.9",
        "--beta2=0.98",
        "--eps=1e-6",
        "--warmup=30",
        "--grad-clip-norm=1.0",
        "--gather-with-grad",
        f"--log-every-n-steps={LOG_EVERY}",
        "--save-frequency=0",
        "--zeroshot-frequency=0",
        "--val-frequency=0",
        "--report-to=",
        f"--logs={setup.tmp / 'openclip-logs'}",
        f"--name={name}",
        "--seed=0",
        *("--image-mean", "0.5", "0.5", "0.5"),
        *("--image-std", "0.25", "0.25", "0.25"),
        "--image-interpolation=bilinear",
        *("--aug-cfg", "scale=(1.0,1.0)"),
    ]


def _torchrun() -> list[str]:
    beside = Path(sys.executable).parent / "torchrun"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _is_torchrun_rank(proc, root_pid: int) -> bool:
    """torchrun's children run the launcher module."""
    return proc.ppid() == root_pid and OPENCLIP_LAUNCHER in proc.cmdline()


def run_openclip(setup: Setup, repeat: int, attempt: int = 0) -> Run:
    from dataprep.clip_models import MODEL_CONFIG_DIR

    a = setup.args
    cmd = [*_torchrun(), "--standalone", "--nnodes=1", f"--nproc_per_node={WORLD}"]
    args_file = setup.tmp / f"openclip-{repeat}-{attempt}.args.json"
    args_file.write_text(json.dumps(openclip_args(setup, f"bench-{repeat}-{attempt}")))
    cmd += ["-m", OPENCLIP_LAUNCHER, str(MODEL_CONFIG_DIR), str(args_file)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    log = setup.tmp / f"openclip-{repeat}-{attempt}.log"
    rc, watch, wall = run_watched(cmd, env, log, _is_torchrun_rank)
    text = log.read_text(errors="replace")
    if rc != 0:
        raise BenchmarkError(f"open_clip run {repeat} failed (exit {rc}):\n{_tail(log)}")
    global_batch = setup.micro * WORLD
    stamps = {int(n) // global_batch: float(t) for t, n in STEP_LOG.findall(text)}
    marks = list(range(a.warmup + 1, setup.total_steps + 2, LOG_EVERY))
    missing = [m for m in marks if m not in stamps]
    if missing:
        raise BenchmarkError(
            f"open_clip run {repeat}: no step log after steps {missing}:\n{_tail(log)}"
        )
    windows = [
        (m1 - m0) * global_batch / (stamps[m1] - stamps[m0])
        for m0, m1 in zip(marks, marks[1:], strict=False)
    ]
    t0, t1 = stamps[marks[0]], stamps[marks[-1]]
    cpu = watch.window(t0, t1)
    return Run(
        engine=OPENCLIP,
        repeat=repeat,
        samples_per_s=(marks[-1] - marks[0]) * global_batch / (t1 - t0),
        windows=windows,
        wall_s=wall,
        rank_peak_rss_mib=watch.peaks(watch.ranks, t0, t1),
        loader_peak_rss_mib=watch.peaks(watch.loaders, t0, t1),
        window_s=t1 - t0,
        rank_cpu_s=cpu["rank_cpu_s"],
        loader_cpu_s=cpu["loader_cpu_s"],
        other_cpu_s=cpu["other_cpu_s"],
        extra={"final_loss": _last_openclip_loss(text)},
    )


def _last_openclip_loss(text: str) -> float | None:
    found = re.findall(r"Contrastive_loss: ([0-9.]+)", text)
    return float(found[-1]) if found else None
