"""Training throughput: mmpipe's engine against open_clip's own trainer, clip-tiny on 2 CPU ranks.

What is measured
  Steady-state *global* samples per second of data-parallel CLIP training of ``clip-tiny``
  (configs/models/clip-tiny.json) by
  (a) mmpipe: ``training.engine.launch`` (Ray Train ``TorchTrainer``, 2 workers x 1 CPU thread,
      DeepSpeed ZeRO ``--zero-stage`` over gloo), driven from a child process, and
  (b) open_clip: ``open_clip_train.main`` under ``torchrun --standalone --nproc_per_node 2``
      (torch DDP over gloo, ``--device cpu``, OMP_NUM_THREADS=1 and ``torch.set_num_threads(1)``
      per rank), through a tiny launcher that registers configs/models with
      ``open_clip.add_model_config`` and carries two shims that open_clip_train needs here:
      DDP on a CPU module (open_clip passes ``device_ids=[cpu]``, which torch refuses), and
      webdataset 0.2.111's end-of-shard marker, which open_clip_train 3.3.0's sample grouping
      does not expect (without the shim it fails with KeyError 'fname' after the first shard).
  Same model, same global batch (``--batch``, split over the 2 ranks), same WebDataset shards
  (written once to a temp dir: 8 shards x 1024 clean sample-web captioned images,
  border-resized to 64 px as the crawl stores them), one DataLoader worker per rank, the same
  samples per epoch (so neither starts a second epoch), the same loss (full global InfoNCE,
  features gathered with gradients: open_clip ``--gather-with-grad``), optimizer (AdamW, lr
  0.002, wd 0.1, betas 0.9/0.98, eps 1e-6, 30 warm-up steps, cosine), gradient clipping 1.0,
  normalisation and augmentation (mean 0.5, std 0.25, bilinear, crop scale 1.0).

  Precision (``--precision``): fp32 runs both engines in fp32 (exactly the same arithmetic).
  bf16 runs mmpipe as shipped (DeepSpeed ``bf16``: bf16 weights and activations, fp32 master
  weights and Adam states) against open_clip ``--precision amp_bf16`` (fp32 weights, bf16
  autocast), open_clip's recommended bf16 mode and the one with the same optimizer numerics
  (fp32 master weights); ``--openclip-precision pure_bf16`` instead matches DeepSpeed's
  all-bf16 forward/backward but steps bf16 weights without master copies.

  Each run trains ``--warmup`` + ``--steps`` steps from scratch and logs every 10 steps. The
  measurement is the same for both: on rank 0, wall time between the step logs that bracket the
  ``--steps`` steps after the warm-up (data waits, forward, backward, gradient reduction,
  optimizer, logging: everything a step costs), and samples/s = steps x global batch / that
  time. mmpipe: the ``samples_per_s`` that its rank 0 logs per 10-step window
  (runs/<name>/metrics.jsonl in the store); open_clip: the creation times of its "Train Epoch"
  log records (captured by the launcher). Start-up (Ray, DeepSpeed, process groups, loader
  workers, the first steps) and the final checkpoint and evaluation are outside the window.
  The engines alternate (a b, b a, a b, ...); every run, the median of each and the ratio
  mmpipe / open_clip (target >= 0.9) are printed.

  Memory per rank: DeepSpeed's model-state estimate for the chosen ZeRO stage
  (``estimate_zero2_model_states_mem_needs_all_live`` / ``estimate_zero3_...``, 2 ranks on 1
  node, for clip-tiny), and measured, the peak RSS (VmHWM) of each rank process: the
  ``ray::RayTrainWorker`` processes for mmpipe, the torchrun children for open_clip, with their
  DataLoader worker processes shown apart. other: cores that processes outside the benchmark
  used in the measured window (whole machine minus the run's process tree); a busy neighbour
  skews a run, so the benchmark first waits (``--wait-quiet``; ``--wait-for PATTERN``: also
  while a process matching PATTERN runs) for the machine to go idle, runs a disturbed run
  (others > 0.25 core) again (``--retries``; only the last attempt counts) and warns when one
  still was. Because other load stretches wall time far more than CPU time, each run also
  reports CPU ms/sample: CPU seconds of all rank and loader processes in the measured window per
  global sample, and the ratio of those costs (open_clip / mmpipe) next to the samples/s ratio.

Run (from the repository root; about 1.5 min per run at the defaults)
  .venv/bin/python benchmarks/train_clip.py                        # bf16, ZeRO-2, 3 repeats
  .venv/bin/python benchmarks/train_clip.py --precision fp32 --json bench-train-fp32.json
  .venv/bin/python benchmarks/train_clip.py --zero-stage 3 --steps 30 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "clip-tiny"
WORLD = 2  # ranks: 2 processes x 1 thread on the 2-core box
LOG_EVERY = 10  # steps per log window, both engines
SHARDS, PER_SHARD = 8, 1024
MMPIPE, OPENCLIP = "mmpipe", "open_clip"
OPENCLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}
OTHER_CPU_WARN = 0.25  # of one core, over a run: the machine was not quiet
QUIET_CORES = 0.1  # the machine counts as quiet when others use less than this
POLL_S = 0.25
RUN_TIMEOUT_S = 1800

# Runs open_clip_train.main under torchrun: register mmpipe's model configs, one thread per rank,
# two compatibility shims (below), and the exact time of every "Train Epoch" log line (open_clip's
# own log lines carry whole seconds).
OPENCLIP_LAUNCHER = """
import functools
import json
import logging
import os
import sys

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

import open_clip
import open_clip_train.data
from torch.nn.parallel import DistributedDataParallel
from webdataset.tariterators import tar_file_expander

# Shim 1: webdataset 0.2.111 ends each shard with an EOF marker ({}) that open_clip_train
# 3.3.0's group_by_keys_nothrow does not expect (KeyError: 'fname' at the end of the first shard).
# Module level, so DataLoader workers have it however they start.
open_clip_train.data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


class CpuDDP(DistributedDataParallel):
    # Shim 2: open_clip passes device_ids=[device]; torch refuses device_ids for a CPU module.
    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


class Stamp(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Train Epoch"):
            print(f"@@step-log {record.created:.6f} {message}", flush=True)


if __name__ == "__main__":
    torch.nn.parallel.DistributedDataParallel = CpuDDP
    open_clip.add_model_config(sys.argv[1])
    logging.getLogger().addHandler(Stamp())
    from open_clip_train.main import main

    # The arguments come in a file: torchrun's own parser would claim some (--logs).
    with open(sys.argv[2]) as f:
        sys.exit(main(json.load(f)) or 0)
"""

# Runs one mmpipe training in its own process (its own local Ray, shut down at the end).
MMPIPE_DRIVER = """
import sys

if __name__ == "__main__":
    import ray

    from pipelines.config import load_config
    from training.config import TrainConfig
    from training.engine import launch

    try:
        result = launch(load_config(TrainConfig, sys.argv[1], sys.argv[2:]))
        print(f"@@done steps={result.steps}", flush=True)
    finally:
        ray.shutdown()
"""

STEP_LOG = re.compile(r"^@@step-log ([0-9.]+) Train Epoch: \d+ \[\s*(\d+)/", re.MULTILINE)


class BenchmarkError(RuntimeError):
    pass


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


# --------------------------------------------------------------------------- data


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
        stats = {"kept": PER_SHARD}
        (folder / f"{shard:05d}.stats.json").write_text(json.dumps(stats))
    with contextlib.suppress(AttributeError):
        render_image.cache_clear()
    return SHARDS * PER_SHARD


# --------------------------------------------------------------------------- process watching


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / _clock_ticks()


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Snapshot:
    t: float  # time.time()
    busy: float | None  # whole machine, CPU seconds
    tree: float  # the run's process tree, CPU seconds since the run began
    ranks: float  # rank processes and their DataLoader workers, CPU seconds
    loaders: float  # the DataLoader workers alone
    own: float  # this process


class TreeWatch(threading.Thread):
    """Polls a run's process tree: peak RSS of rank and loader processes, CPU use over time.

    Rank processes are the tree's processes for which ``is_rank(proc, root_pid)`` holds; their
    children are DataLoader workers. VmHWM only grows, so polling misses at most the last
    interval. CPU: cumulative CPU seconds of the tree and of the ranks (with loaders), as last
    seen per process, next to the machine's, every POLL_S; ``window`` interpolates them over a
    measured window. ``steps_logged`` (optional) returns the steps logged so far; the time each
    first appears is kept in ``step_seen``.
    """

    def __init__(self, root_pid: int, is_rank, steps_logged=None) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.is_rank, self.steps_logged = root_pid, is_rank, steps_logged
        self.ranks: dict[int, float] = {}  # peak RSS MiB
        self.loaders: dict[int, float] = {}  # peak RSS MiB
        self.cpu: dict[int, float] = {}
        self.cpu_base: dict[int, float] = {}
        self.rank_or_loader: set[int] = set()
        self.lifetime: dict[int, list[float]] = {}  # rank and loader pids: first, last seen
        self.snapshots: list[Snapshot] = []
        self.step_seen: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
        except psutil.Error:
            return
        first = True
        while not self.stop.is_set():
            self._poll(root, psutil, first)
            first = False
            self.stop.wait(POLL_S)

    def _poll(self, root, psutil, first: bool) -> None:
        now = time.time()
        busy = machine_busy_s()
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        rank_pids = set()
        for proc in procs:
            try:
                times = proc.cpu_times()
                cpu = times.user + times.system
                if proc.pid not in self.cpu and first:
                    self.cpu_base[proc.pid] = cpu  # already running when the run began
                self.cpu[proc.pid] = cpu
                if self.is_rank(proc, self.root_pid):
                    rank_pids.add(proc.pid)
            except psutil.Error:
                continue
        for proc in procs:
            try:
                ppid = proc.ppid()
                # A loader is forked from its rank (same command line); not a short-lived helper
                # a library runs (lscpu and the like).
                forked = ppid in rank_pids and proc.cmdline() == proc.parent().cmdline()
            except psutil.Error:
                continue
            bucket = self.ranks if proc.pid in rank_pids else self.loaders if forked else None
            if bucket is not None:
                self.rank_or_loader.add(proc.pid)
                self.lifetime.setdefault(proc.pid, [now, now])[1] = now
                peak = peak_rss_mib(proc.pid)
                if peak is not None:
                    bucket[proc.pid] = max(bucket.get(proc.pid, 0.0), peak)
        tree = sum(cpu - self.cpu_base.get(pid, 0.0) for pid, cpu in self.cpu.items())
        ranks = sum(self.cpu.get(pid, 0.0) for pid in self.rank_or_loader)
        loaders = sum(self.cpu.get(pid, 0.0) for pid in self.rank_or_loader if pid in self.loaders)
        self.snapshots.append(Snapshot(now, busy, tree, ranks, loaders, _self_cpu_s()))
        if self.steps_logged is not None:
            for step in self.steps_logged():
                self.step_seen.setdefault(step, now)

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=10)

    def peaks(self, bucket: dict[int, float], t0: float | None, t1: float | None) -> list[float]:
        """Peak RSS of the bucket's processes that lived during [t0, t1] (all if unknown):
        the loaders that fed the measured steps, not a short-lived fork at the end."""
        if t0 is None or t1 is None:
            return sorted(bucket.values())
        return sorted(
            peak
            for pid, peak in bucket.items()
            if self.lifetime[pid][0] <= t1 + POLL_S and self.lifetime[pid][1] >= t0 - POLL_S
        )

    def _at(self, t: float, name: str) -> float | None:
        """A snapshot field at time t, interpolated linearly between polls."""
        points = [(s.t, getattr(s, name)) for s in self.snapshots]
        if not points or points[0][1] is None or t < points[0][0] or t > points[-1][0]:
            return None
        for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
            if t0 <= t <= t1:
                return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        return points[-1][1]

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        """CPU seconds in [t0, t1]: the ranks' (with loaders), and other processes'."""
        values = {}
        for name in ("busy", "tree", "ranks", "loaders", "own"):
            a, b = self._at(t0, name), self._at(t1, name)
            values[name] = None if a is None or b is None else b - a
        other = None
        if None not in (values["busy"], values["tree"], values["own"]):
            other = max(0.0, values["busy"] - values["tree"] - values["own"])
        return {
            "rank_cpu_s": values["ranks"],
            "loader_cpu_s": values["loaders"],
            "other_cpu_s": other,
        }


def _self_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def wait_quiet(max_wait_s: float, window_s: float = 2.0) -> float:
    """Wait until the machine's load is < QUIET_CORES over a window, at most max_wait_s."""
    started = time.monotonic()
    while time.monotonic() - started < max_wait_s:
        busy0, own0 = machine_busy_s(), _self_cpu_s()
        time.sleep(window_s)
        busy1, own1 = machine_busy_s(), _self_cpu_s()
        if busy0 is None or busy1 is None:
            break
        if (busy1 - busy0) - (own1 - own0) < QUIET_CORES * window_s:
            break
    return time.monotonic() - started


def wait_for_absent(pattern: str | None, poll_s: float = 30.0) -> float:
    """Wait (no limit) while a process whose command line matches ``pattern`` runs."""
    import psutil

    started = time.monotonic()
    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}  # their args may match
    while pattern:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        others = [p for p in found.stdout.split() if int(p) not in ours]
        if not others:
            break
        time.sleep(poll_s)
    return time.monotonic() - started


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
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- the two engines


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


def run_mmpipe(setup: Setup, repeat: int, attempt: int = 0) -> Run:
    from pipelines.config import load_config
    from training.config import TrainConfig
    from training.monitor import read_metrics

    a = setup.args
    name = f"bench-{repeat}-{attempt}"  # a new run: the same name would resume
    overrides = mmpipe_overrides(setup, name)
    cfg = load_config(TrainConfig, ROOT / "configs" / "clip-tiny.yaml", overrides)
    driver = setup.tmp / "mmpipe_driver.py"
    cmd = [sys.executable, str(driver), str(ROOT / "configs" / "clip-tiny.yaml"), *overrides]
    env = os.environ | {
        "MMPIPE_STATE_DIR": str(setup.tmp / "state"),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    log = setup.tmp / f"mmpipe-{repeat}-{attempt}.log"

    def is_rank(proc, root_pid: int) -> bool:  # not its DataLoader workers: same proctitle
        def train_worker(p) -> bool:
            return any("RayTrainWorker" in part for part in p.cmdline())

        return train_worker(proc) and not train_worker(proc.parent())

    metrics_file = setup.tmp / "store" / cfg.run_prefix() / "metrics.jsonl"
    seen_mtime: list[float] = [0.0]
    logged: set[int] = set()

    def steps_logged() -> set[int]:  # polled: when each step's row lands in metrics.jsonl
        with contextlib.suppress(OSError):
            mtime = metrics_file.stat().st_mtime
            if mtime != seen_mtime[0]:
                seen_mtime[0] = mtime
                logged.update(
                    int(n) for n in re.findall(r'"step": (\d+)', metrics_file.read_text())
                )
        return logged

    rc, watch, wall = run_watched(cmd, env, log, is_rank, steps_logged)
    if rc != 0 or "@@done" not in log.read_text(errors="replace"):
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
    # CPU over the window: its ends as the watcher saw the rows appear (within POLL_S).
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
        "--image-mean",
        "0.5",
        "0.5",
        "0.5",
        "--image-std",
        "0.25",
        "0.25",
        "0.25",
        "--image-interpolation=bilinear",
        "--aug-cfg",
        "scale=(1.0,1.0)",
    ]


def _torchrun() -> list[str]:
    beside = Path(sys.executable).parent / "torchrun"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "torch.distributed.run"]


def run_openclip(setup: Setup, repeat: int, attempt: int = 0) -> Run:
    a = setup.args
    launcher = setup.tmp / "openclip_launcher.py"
    cmd = [*_torchrun(), "--standalone", "--nnodes=1", f"--nproc_per_node={WORLD}"]
    args_file = setup.tmp / f"openclip-{repeat}-{attempt}.args.json"
    args_file.write_text(json.dumps(openclip_args(setup, f"bench-{repeat}-{attempt}")))
    cmd += [str(launcher), str(ROOT / "configs" / "models"), str(args_file)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = setup.tmp / f"openclip-{repeat}-{attempt}.log"

    def is_rank(proc, root_pid: int) -> bool:  # torchrun's children run the launcher
        return proc.ppid() == root_pid and any(str(launcher) in p for p in proc.cmdline())

    rc, watch, wall = run_watched(cmd, env, log, is_rank)
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
    seconds = stamps[marks[-1]] - stamps[marks[0]]
    t0, t1 = stamps[marks[0]], stamps[marks[-1]]
    cpu = watch.window(t0, t1)
    return Run(
        engine=OPENCLIP,
        repeat=repeat,
        samples_per_s=(marks[-1] - marks[0]) * global_batch / seconds,
        windows=windows,
        wall_s=wall,
        rank_peak_rss_mib=watch.peaks(watch.ranks, t0, t1),
        loader_peak_rss_mib=watch.peaks(watch.loaders, t0, t1),
        window_s=seconds,
        rank_cpu_s=cpu["rank_cpu_s"],
        loader_cpu_s=cpu["loader_cpu_s"],
        other_cpu_s=cpu["other_cpu_s"],
        extra={"final_loss": _last_openclip_loss(text)},
    )


def _last_openclip_loss(text: str) -> float | None:
    found = re.findall(r"Contrastive_loss: ([0-9.]+)", text)
    return float(found[-1]) if found else None


# --------------------------------------------------------------------------- memory estimate


def zero_estimate(stage: int, precision: str) -> dict:
    """DeepSpeed's per-rank model-state estimate for clip-tiny, 2 ranks on 1 node."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipelines.config import load_config
    from training.config import TrainConfig
    from training.specs.clip import ClipSpec

    cfg = load_config(
        TrainConfig,
        ROOT / "configs" / "clip-tiny.yaml",
        ["name=estimate", "data.source=file:///unused/"],
    )
    printed = io.StringIO()
    logging.disable(logging.WARNING)  # open_clip: "No pretrained weights loaded" and the like
    try:
        model = ClipSpec().build(cfg)  # exactly the engine's module
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            total, per_rank, estimator = _zero_estimate(model, stage)
    finally:
        logging.disable(logging.NOTSET)
    note = (
        "DeepSpeed's estimate assumes 16-bit params/grads plus fp32 master weights and Adam "
        "states; in fp32 the real footprint is larger"
        if precision == "fp32"
        else "16-bit params/grads, fp32 master weights and Adam states"
    )
    return {
        "stage": stage,
        "params": total,
        "estimator": estimator,
        "per_rank_model_states_mib": per_rank / 2**20,
        "table": printed.getvalue().rstrip(),
        "note": note,
    }


def _zero_estimate(model, stage: int) -> tuple[int, int, str]:
    """(params, per-rank bytes, estimator name); the estimator prints its table."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import (
            estimate_zero3_model_states_mem_needs,
            estimate_zero3_model_states_mem_needs_all_live,
            model_to_params,
        )

        estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=WORLD)
        total, largest = model_to_params(model)
        # mmpipe: no offload, no zero.Init (the model is built whole, then partitioned)
        _, per_rank, _ = estimate_zero3_model_states_mem_needs(
            total, largest, WORLD, 1, cpu_offload=False, cpu_offload_params=False, zero_init=False
        )
        return total, per_rank, "estimate_zero3_model_states_mem_needs_all_live"
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_live,
        model_to_params,
    )

    # Stage 0 partitions nothing: the 1-rank figure. Stage 1 partitions optimizer states only,
    # so the ZeRO-2 figure (gradients partitioned too) is a lower bound for it.
    ranks = 1 if stage == 0 else WORLD
    estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=ranks)
    total = model_to_params(model)
    _, per_rank = estimate_zero2_model_states_mem_needs(total, ranks, 1, cpu_offload=False)
    return total, per_rank, "estimate_zero2_model_states_mem_needs_all_live"


# --------------------------------------------------------------------------- report


def _fmt_mib(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values) if values else "n/a"


def _other(run: Run) -> str:
    return "n/a" if run.other_cores is None else f"{run.other_cores:.2f}"


def _cpu_cost(run: Run) -> str:
    cost = run.rank_cpu_ms_per_sample
    return "n/a" if cost is None else f"{cost:.2f}"


def _loader_cost(run: Run) -> str:
    cost = run.loader_cpu_ms_per_sample
    return "n/a" if cost is None else f"{cost:.2f}"


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def report(setup: Setup, runs: list[Run], estimate: dict, versions: dict) -> dict:
    a = setup.args
    print()
    print(
        f"{'engine':<10}{'run':>4}{'samples/s':>11}{'cpu ms/sa':>10}{'loaders':>8}{'other':>7}"
        f"{'wall s':>8}"
        f"{'loss':>7}  rank peak RSS MiB (loaders)  10-step windows, samples/s"
    )
    for r in runs:
        loss = r.extra.get("final_loss")
        rss = f"{_fmt_mib(r.rank_peak_rss_mib)} ({_fmt_mib(r.loader_peak_rss_mib)})"
        mark = " " if r.counted else "x"
        print(
            f"{r.engine:<10}{r.repeat + 1:>3}{mark}{r.samples_per_s:>11.1f}{_cpu_cost(r):>10}"
            f"{_loader_cost(r):>8}"
            f"{_other(r):>7}{r.wall_s:>8.1f}{'' if loss is None else f'{loss:.3f}':>7}  "
            f"{rss:<28} {' '.join(f'{w:.0f}' for w in r.windows)}"
        )
    print(
        "  samples/s: global, over the measured steps; cpu ms/sa: CPU of all ranks and their "
        "loaders per sample\n  in that window (robust to a busy machine), loaders: their part; "
        "other: cores other "
        "processes used meanwhile;\n  x: disturbed, run again, not in the medians"
    )
    engines = (MMPIPE, OPENCLIP)
    counted = [r for r in runs if r.counted]
    medians = {
        e: statistics.median(r.samples_per_s for r in counted if r.engine == e) for e in engines
    }
    cpu_cost = {
        e: _median([r.rank_cpu_ms_per_sample for r in counted if r.engine == e]) for e in engines
    }
    ratio = medians[MMPIPE] / medians[OPENCLIP]
    loader_cost = {
        e: _median([r.loader_cpu_ms_per_sample for r in counted if r.engine == e]) for e in engines
    }
    cpu_ratio = (
        cpu_cost[OPENCLIP] / cpu_cost[MMPIPE] if cpu_cost[MMPIPE] and cpu_cost[OPENCLIP] else None
    )
    rss = {
        e: max(max(r.rank_peak_rss_mib, default=0) for r in runs if r.engine == e) for e in engines
    }
    print()
    for e in engines:
        cost = "n/a" if cpu_cost[e] is None else f"{cpu_cost[e]:.2f}"
        part = "n/a" if loader_cost[e] is None else f"{loader_cost[e]:.2f}"
        print(
            f"median {e:<10}: {medians[e]:8.1f} samples/s (global), {cost} CPU ms/sample "
            f"({part} in its DataLoader workers)"
        )
    verdict = "ok" if ratio >= 0.9 else "BELOW TARGET"
    print(f"ratio mmpipe/open_clip: {ratio:.3f} samples/s (target >= 0.9: {verdict})")
    if cpu_ratio is not None:
        print(f"  by CPU cost (open_clip ms/sample / mmpipe ms/sample): {cpu_ratio:.3f}")
    print()
    print(
        f"memory, ZeRO-{estimate['stage']} ({a.precision}), clip-tiny "
        f"{estimate['params'] / 1e6:.2f}M params, {WORLD} ranks:"
    )
    print(
        f"  model states per rank, DeepSpeed estimate ({estimate['estimator']}): "
        f"{estimate['per_rank_model_states_mib']:.1f} MiB ({estimate['note']})"
    )
    for line in estimate["table"].splitlines():
        print(f"    | {line}")
    print(
        f"  measured peak RSS per rank process (VmHWM, max over runs): mmpipe "
        f"{rss[MMPIPE]:.0f} MiB (Ray Train worker), open_clip {rss[OPENCLIP]:.0f} MiB "
        "(torchrun child); DataLoader workers listed per run above"
    )
    busy = [r for r in counted if r.disturbed]
    if busy:
        print(
            f"WARNING: other processes used > {OTHER_CPU_WARN:.0%} of a core while "
            + ", ".join(f"{r.engine} run {r.repeat + 1}" for r in busy)
            + f" (still, after {a.retries} retries) measured: their samples/s are skewed "
            "(cpu ms/sample much less so)"
        )
    return {
        "benchmark": "train_clip",
        "config": {
            "model": MODEL,
            "world": WORLD,
            "global_batch": a.batch,
            "warmup_steps": a.warmup,
            "measured_steps": a.steps,
            "repeats": a.repeats,
            "zero_stage": a.zero_stage,
            "precision": {MMPIPE: a.precision, OPENCLIP: setup.openclip_precision},
            "shard_samples": setup.samples,
            "data_workers_per_rank": 1,
            "threads_per_rank": 1,
        },
        "versions": versions,
        "runs": [
            asdict(r)
            | {
                "rank_cpu_ms_per_sample": r.rank_cpu_ms_per_sample,
                "loader_cpu_ms_per_sample": r.loader_cpu_ms_per_sample,
                "other_cores": r.other_cores,
            }
            for r in runs
        ],
        "median_samples_per_s": medians,
        "ratio_mmpipe_over_openclip": ratio,
        "median_cpu_ms_per_sample": cpu_cost,
        "median_loader_cpu_ms_per_sample": loader_cost,
        "cpu_cost_ratio_openclip_over_mmpipe": cpu_ratio,
        "memory": {
            "zero_estimate": estimate,
            "peak_rss_per_rank_mib": rss,
        },
    }


def _versions() -> dict:
    from importlib.metadata import version

    out = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    for dist in ("torch", "deepspeed", "ray", "open_clip_torch", "webdataset"):
        with contextlib.suppress(Exception):
            out[dist] = version(dist)
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--steps", type=int, default=60, help="measured steps per run (x10)")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured steps first (x10)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each engine")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument(
        "--openclip-precision",
        choices=["fp32", "amp_bf16", "pure_bf16"],
        default=None,
        help="open_clip's --precision (default: fp32 for fp32, amp_bf16 for bf16)",
    )
    p.add_argument("--batch", type=int, default=256, help="global batch size (all ranks)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        metavar="S",
        help="before each run, wait up to S seconds for the machine to go idle (0: don't)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="run a disturbed run (others used > 0.25 core) again, up to this many times",
    )
    p.add_argument(
        "--wait-for",
        default=None,
        metavar="PATTERN",
        help="before each run, wait while a process matching PATTERN (pgrep -f) runs",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (shards, logs)")
    args = p.parse_args(argv)
    for name in ("steps", "warmup"):
        value = getattr(args, name)
        if value < LOG_EVERY or value % LOG_EVERY:
            p.error(f"--{name} must be a positive multiple of {LOG_EVERY}")
    if args.batch % WORLD:
        p.error(f"--batch must be divisible by {WORLD} ranks")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: runs are stopped, the temp dir is removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="mmpipe-bench-train-"))
    try:
        (tmp / "openclip_launcher.py").write_text(OPENCLIP_LAUNCHER)
        (tmp / "mmpipe_driver.py").write_text(MMPIPE_DRIVER)
        t0 = time.monotonic()
        samples = write_shards(tmp / "shards")
        setup = Setup(args, tmp, tmp / "shards", samples)
        versions = _versions()
        print(
            f"train_clip: {MODEL}, global batch {args.batch} ({WORLD} ranks x {setup.micro}), "
            f"{args.warmup} warm-up + {args.steps} measured steps, {args.repeats} repeats\n"
            f"  mmpipe: DeepSpeed ZeRO-{args.zero_stage}, precision {args.precision}; "
            f"open_clip_train: DDP, --precision {setup.openclip_precision}\n"
            f"  data: {SHARDS} shards x {PER_SHARD} samples in {setup.shards} "
            f"({time.monotonic() - t0:.1f}s), 1 loader worker and 1 thread per rank\n"
            f"  {versions}",
            flush=True,
        )
        runs: list[Run] = []
        for repeat in range(args.repeats):
            order = [MMPIPE, OPENCLIP] if repeat % 2 == 0 else [OPENCLIP, MMPIPE]
            for engine in order:
                for attempt in range(args.retries + 1):
                    waited = wait_for_absent(args.wait_for)
                    waited += wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
                    fn = run_mmpipe if engine == MMPIPE else run_openclip
                    run = fn(setup, repeat, attempt)
                    runs.append(run)
                    run.disturbed = (run.other_cores or 0) > OTHER_CPU_WARN
                    run.counted = not run.disturbed or attempt == args.retries
                    note = "" if run.counted else ": disturbed, run again"
                    print(
                        f"  run {repeat + 1}/{args.repeats} {engine:<9} {run.samples_per_s:7.1f} "
                        f"samples/s, {_cpu_cost(run)} CPU ms/sample  (wall {run.wall_s:.0f}s, "
                        f"waited {waited:.0f}s for quiet, other processes {_other(run)} cores)"
                        + note,
                        flush=True,
                    )
                    if run.counted:
                        break
        estimate = zero_estimate(args.zero_stage, args.precision)
        result = report(setup, runs, estimate, versions)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"\nwrote {args.json}")
        return 0
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if "ray" in sys.modules:  # the drivers run (and shut down) their own Ray
            with contextlib.suppress(Exception):
                sys.modules["ray"].shutdown()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
