"""Crawl throughput: mmpipe's crawl stage against the bare img2dataset CLI, same URLs and settings.

Both crawl one clean URL list of the loopback sample web with the same settings, alternating;
prints images/s of every run, the medians and the ratio mmpipe / img2dataset (target >= 0.95),
and the CPU other processes used meanwhile. What exactly is compared and how: docs/benchmarks.md.

    .venv/bin/python benchmarks/crawl.py                     # n=5000, 3 repeats of each
    .venv/bin/python benchmarks/crawl.py --n 200 --repeats 1 --warmup-n 0 --wait-quiet 0

Then the same URLs on a local 4-node Ray cluster against img2dataset with 4 processes: prints
`cluster crawl ratio <r>` (target >= 0.9; `--cluster-nodes 0` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a file

from benchmarks.metering import OTHER_CPU_WARN, OtherLoad  # noqa: E402

READY_TIMEOUT_S = 300.0
MIN_SUCCESS = 0.99  # a run must crawl more than this share of the URLs to count
TARGET_RATIO = 0.95
TARGET_CLUSTER_RATIO = 0.9
ENCODE_QUALITY = 95
TIMEOUT_S = 10
RETRIES = 0
MAX_SHARD_RETRY = 1
HASH = "sha256"
USER_AGENT_TOKEN = "mmpipe"
MAX_IMAGE_AREA = 89_478_485  # mmpipe's default (PIL's bomb limit); img2dataset's is inf
MMPIPE, I2D = "mmpipe", "img2dataset"


class BenchmarkError(RuntimeError):
    pass


@dataclass
class Run:
    tool: str
    repeat: int
    seconds: float
    urls: int
    kept: int
    shard_s: float  # sum of img2dataset's per-shard durations, inside the workers
    other_cpu_s: float | None  # CPU used meanwhile by processes outside the benchmark

    @property
    def shard_ms_per_url(self) -> float:
        return 1000 * self.shard_s / self.urls

    @property
    def images_per_s(self) -> float:
        return self.kept / self.seconds


# --------------------------------------------------------------------------- sample web


@contextlib.contextmanager
def sample_web(n: int, seed: int, out: Path):
    """`mmpipe sampleweb serve --clean` in a child process; yields its ready info."""
    out.mkdir(parents=True, exist_ok=True)
    ready, log = out / "ready.json", out / "server.log"
    cmd = [sys.executable, "-m", "pipelines.cli", "sampleweb", "serve", "--n", str(n)]
    cmd += ["--seed", str(seed), "--port", "0", "--out", str(out), "--ready-file", str(ready)]
    cmd += ["--clean"]
    with open(log, "wb") as log_file:
        server = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if server.poll() is not None:
                raise BenchmarkError(
                    f"sample web server exited with code {server.returncode}:\n{_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise BenchmarkError(f"sample web server not ready after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        with urllib.request.urlopen(f"{info['base_url']}/healthz", timeout=10) as r:
            if r.status != 200:
                raise BenchmarkError(f"sample web server unhealthy: HTTP {r.status}")
        info["pid"] = server.pid
        yield info
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def write_subset(urls: Path, rows: int, path: Path) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(urls).slice(0, rows), path)
    return path


# --------------------------------------------------------------------------- the two crawlers


def run_mmpipe(urls: Path, n: int, work: Path, args: argparse.Namespace, port: int):
    """Crawl with mmpipe; returns (seconds, kept, shard_s, by_reason), every URL accounted for."""
    from dataprep.crawl import CrawlConfig, crawl_shards, prepare_crawl, summarize
    from dataprep.store import open_store
    from dataprep.url_policy import UrlPolicy

    cfg = CrawlConfig(
        image_size=args.image_size,
        resize_mode="border",
        encode_format="jpg",
        encode_quality=ENCODE_QUALITY,
        samples_per_shard=args.samples_per_shard,
        processes=args.processes,
        threads=args.threads,
        timeout_s=TIMEOUT_S,
        retries=RETRIES,
        max_shard_retry=MAX_SHARD_RETRY,
        max_image_area=MAX_IMAGE_AREA,
        user_agent_token=USER_AGENT_TOKEN,
        compute_hash=HASH,
        policy=UrlPolicy(allow=[f"127.0.0.1:{port}"]),
    )
    store = open_store(f"file://{work / 'store'}")
    prefix = f"bench/{work.name}"
    started = time.perf_counter()
    plan = prepare_crawl(str(urls), store, prefix, cfg)
    stats = crawl_shards(plan, list(range(plan.shards)), store, prefix, cfg, work / "work")
    seconds = time.perf_counter() - started
    summary = summarize(stats)
    if summary.count != n:
        raise BenchmarkError(f"mmpipe accounted for {summary.count} of {n} URLs")
    tars = list((work / "store" / prefix).glob("*.tar"))
    if len(tars) != plan.shards:
        raise BenchmarkError(f"mmpipe wrote {len(tars)} tars for {plan.shards} shards")
    shard_s = sum(s.duration_s for s in stats)
    return seconds, summary.kept, shard_s, dict(summary.by_reason)


def img2dataset_command(urls: Path, out: Path, args: argparse.Namespace) -> list[str]:
    exe = Path(sys.executable).with_name("img2dataset")
    if not exe.exists():
        found = shutil.which("img2dataset")
        if found is None:
            raise BenchmarkError("img2dataset CLI not found next to this Python nor on PATH")
        exe = Path(found)
    flags = {
        "url_list": urls,
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "output_format": "webdataset",
        "output_folder": out,
        "processes_count": args.processes,
        "thread_count": args.threads,
        "image_size": args.image_size,
        "resize_mode": "border",
        "encode_format": "jpg",
        "encode_quality": ENCODE_QUALITY,
        "number_sample_per_shard": args.samples_per_shard,
        "timeout": TIMEOUT_S,
        "retries": RETRIES,
        "max_shard_retry": MAX_SHARD_RETRY,
        "max_image_area": MAX_IMAGE_AREA,
        "user_agent_token": USER_AGENT_TOKEN,
        "extract_exif": False,
        "compute_hash": HASH,
        "enable_wandb": False,
        "distributor": "multiprocessing",
    }
    cmd = [str(exe)]
    for name, value in flags.items():
        cmd += [f"--{name}", str(value)]
    return cmd


def run_img2dataset(urls: Path, n: int, work: Path, args: argparse.Namespace, port: int):
    """Crawl with the img2dataset CLI; returns (seconds, kept, shard_s, by_status), checked."""
    del port  # img2dataset has no URL policy: it fetches whatever the list names
    out, log = work / "out", work / "img2dataset.log"
    work.mkdir(parents=True, exist_ok=True)
    cmd = img2dataset_command(urls, out, args)
    with open(log, "wb") as log_file:
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, stdout=log_file, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchmarkError(f"img2dataset exited with {proc.returncode}:\n{_tail(log)}")
    count = kept = 0
    shard_s = 0.0
    by_status: dict[str, int] = {}
    stats_files = sorted(out.glob("*_stats.json"))
    for path in stats_files:
        stats = json.loads(path.read_text())
        count += stats["count"]
        kept += stats["successes"]
        shard_s += stats["duration"]
        for key in ("successes", "failed_to_download", "failed_to_resize"):
            by_status[key] = by_status.get(key, 0) + stats[key]
    if count != n:
        raise BenchmarkError(f"img2dataset accounted for {count} of {n} URLs:\n{_tail(log)}")
    tars = list(out.glob("*.tar"))
    if len(tars) != len(stats_files):
        raise BenchmarkError(f"img2dataset wrote {len(tars)} tars for {len(stats_files)} shards")
    return seconds, kept, shard_s, by_status


CRAWLERS = {MMPIPE: run_mmpipe, I2D: run_img2dataset}


def measure(
    tool: str, repeat: int, urls: Path, n: int, root: Path, args, port: int, meter: OtherLoad
) -> Run:
    work = root / f"{tool}-{repeat}"
    work.mkdir(parents=True)
    if args.wait_quiet > 0:
        waited = meter.wait_quiet(args.wait_quiet)
        if waited > args.wait_quiet:
            print(f"  (machine still busy after {waited:.0f} s; measuring anyway)", flush=True)
    before = meter.read()
    try:
        seconds, kept, shard_s, outcome = CRAWLERS[tool](urls, n, work, args, port)
        other = OtherLoad.between(before, meter.read())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if kept <= MIN_SUCCESS * n:
        raise BenchmarkError(
            f"{tool} run {repeat} crawled only {kept} of {n} URLs in {seconds:.1f} s "
            f"({outcome}); not a valid measurement"
        )
    other = None if other is None else round(other, 2)
    return Run(tool, repeat, round(seconds, 3), n, kept, round(shard_s, 3), other)


def alternate(urls: Path, root: Path, args, port: int, meter: OtherLoad) -> list[Run]:
    """``args.repeats`` runs of each crawler, alternating which goes first."""
    runs: list[Run] = []
    for repeat in range(1, args.repeats + 1):
        for tool in (MMPIPE, I2D) if repeat % 2 else (I2D, MMPIPE):
            run = measure(tool, repeat, urls, args.n, root, args, port, meter)
            runs.append(run)
            print(
                f"repeat {repeat}  {tool:<12} {run.seconds:6.2f} s  "
                f"{run.kept}/{run.urls} kept  {run.images_per_s:7.1f} images/s  "
                f"(other processes: {_cpu(run.other_cpu_s)} CPU)",
                flush=True,
            )
    return runs


def cluster_crawl(urls: Path, root: Path, args, port: int, meter: OtherLoad) -> dict:
    """mmpipe's crawl on a local multi-node Ray cluster (a head without CPUs and
    ``--cluster-nodes`` nodes of 1 CPU) against img2dataset with as many processes."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(args.cluster_nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        same_cpus = argparse.Namespace(**{**vars(args), "processes": args.cluster_nodes})
        print(f"\ncluster: {args.cluster_nodes} nodes of 1 CPU against {same_cpus.processes} "
              "img2dataset processes", flush=True)  # fmt: skip
        runs = alternate(urls, root, same_cpus, port, meter)
    finally:
        ray.shutdown()
        cluster.shutdown()
    medians = {
        tool: statistics.median(r.images_per_s for r in runs if r.tool == tool)
        for tool in (MMPIPE, I2D)
    }
    ratio = medians[MMPIPE] / medians[I2D]
    print(f"median cluster {medians[MMPIPE]:.1f} images/s, process pool {medians[I2D]:.1f}")
    print(f"cluster crawl ratio {ratio:.3f}  (target {TARGET_CLUSTER_RATIO})")
    return {"nodes": args.cluster_nodes, "runs": [asdict(r) for r in runs], "ratio": ratio}


# --------------------------------------------------------------------------- facts and report


def machine_facts() -> dict:
    from importlib.metadata import version

    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "img2dataset": version("img2dataset"),
        "loadavg_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def cli_startup_seconds(tries: int = 3) -> float:
    """Interpreter start + `import img2dataset.main` in a fresh process (part of each CLI run).

    The least of a few tries: what it costs on a quiet machine.
    """
    times = []
    for _ in range(tries):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import img2dataset.main"], check=True)
        times.append(time.perf_counter() - started)
    return min(times)


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def report(runs: list[Run], args, facts: dict, startup_s: float) -> dict:
    medians = {
        tool: statistics.median(r.images_per_s for r in runs if r.tool == tool)
        for tool in (MMPIPE, I2D)
    }
    ratio = medians[MMPIPE] / medians[I2D]
    print()
    print(
        f"crawl benchmark: {args.n} URLs, processes={args.processes} threads={args.threads} "
        f"image_size={args.image_size} samples_per_shard={args.samples_per_shard}"
    )
    print(
        f"{'#':>2}  {'tool':<12}{'seconds':>9}{'kept/urls':>13}{'images/s':>10}"
        f"{'shard-s':>9}{'ms/url':>8}{'other-cpu':>11}"
    )
    for i, r in enumerate(runs, 1):
        kept = f"{r.kept}/{r.urls}"
        print(
            f"{i:>2}  {r.tool:<12}{r.seconds:>9.2f}{kept:>13}{r.images_per_s:>10.1f}"
            f"{r.shard_s:>9.2f}{r.shard_ms_per_url:>8.2f}{_cpu(r.other_cpu_s):>11}"
        )
    for tool in (MMPIPE, I2D):
        values = [r.images_per_s for r in runs if r.tool == tool]
        print(
            f"median {tool:<12} {medians[tool]:7.1f} images/s  "
            f"(min {min(values):.1f}, max {max(values):.1f}, {len(values)} runs)"
        )
    print(
        "shard-s: img2dataset's per-shard durations summed (inside the download processes);\n"
        "ms/url: shard-s per URL, the crawl work without start-up and upload;\n"
        "other-cpu: CPU seconds used during the run by processes outside this benchmark"
    )
    busy = [r for r in runs if (r.other_cpu_s or 0) > OTHER_CPU_WARN * r.seconds]
    if busy:
        print(
            f"WARNING: other processes used > {OTHER_CPU_WARN:.0%} of a core during "
            f"{len(busy)} of {len(runs)} runs: the machine was not quiet, figures are skewed"
        )
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    print(f"ratio mmpipe/img2dataset: {ratio:.3f}  ({verdict} the target {TARGET_RATIO})")
    # mmpipe runs inside this already started interpreter; the CLI starts its own each run.
    charged = statistics.median(r.kept / (r.seconds + startup_s) for r in runs if r.tool == MMPIPE)
    print(
        f"  had mmpipe also paid the CLI's start-up ({startup_s:.2f} s, interpreter + imports): "
        f"{charged:.1f} images/s, ratio {charged / medians[I2D]:.3f}"
    )
    print(
        f"machine: {facts['usable_cores']} usable cores of {facts['cpu_count']} "
        f"({facts['cpu_model']}), {facts['memory_gib']} GiB, Python {facts['python']}, "
        f"img2dataset {facts['img2dataset']}, load average at start {facts['loadavg_start']}"
    )
    return {
        "settings": {
            "n": args.n,
            "repeats": args.repeats,
            "processes": args.processes,
            "threads": args.threads,
            "image_size": args.image_size,
            "samples_per_shard": args.samples_per_shard,
            "resize_mode": "border",
            "encode_format": "jpg",
            "encode_quality": ENCODE_QUALITY,
            "timeout_s": TIMEOUT_S,
            "retries": RETRIES,
            "compute_hash": HASH,
            "seed": args.seed,
            "warmup_n": args.warmup_n,
            "wait_quiet_s": args.wait_quiet,
        },
        "machine": facts,
        "img2dataset_cli_startup_s": round(startup_s, 3),
        "runs": [
            {
                **asdict(r),
                "images_per_s": round(r.images_per_s, 2),
                "shard_ms_per_url": round(r.shard_ms_per_url, 3),
            }
            for r in runs
        ],
        "median_images_per_s": {k: round(v, 2) for k, v in medians.items()},
        "ratio": round(ratio, 4),
        "ratio_mmpipe_charged_cli_startup": round(charged / medians[I2D], 4),
        "target_ratio": TARGET_RATIO,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="URLs on the sample web (default 5000)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs of each (default 3)")
    p.add_argument("--processes", type=int, default=2, help="download processes (default 2)")
    p.add_argument("--threads", type=int, default=32, help="threads per process (default 32)")
    p.add_argument("--image-size", type=int, default=64, help="output size, px (default 64)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="(default 1000)")
    p.add_argument("--seed", type=int, default=0, help="sample web corpus seed (default 0)")
    p.add_argument(
        "--warmup-n", type=int, default=200, help="URLs of the unmeasured warm-up (0: none)"
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=60,
        metavar="S",
        help="before each run, wait up to S seconds for other processes to go idle (0: don't)",
    )
    p.add_argument(
        "--cluster-nodes",
        type=int,
        default=4,
        help="then crawl on a local Ray cluster of this many 1-CPU nodes against img2dataset "
        "with as many processes (0: skip; default 4)",
    )
    p.add_argument("--keep", action="store_true", help="keep the outputs and print where")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        p.error("--n and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # inherited by pools and the CLI
    no_proxy = ",".join(filter(None, [os.environ.get("no_proxy"), "127.0.0.1", "localhost"]))
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = no_proxy  # urllib would honour a proxy
    facts = machine_facts()
    root = Path(tempfile.mkdtemp(prefix="mmpipe-bench-crawl-"))
    try:
        print(f"starting the sample web ({args.n} clean samples) ...", flush=True)
        with sample_web(args.n, args.seed, root / "sampleweb") as web:
            urls, port = Path(web["urls"]), web["port"]
            print(f"sample web at {web['base_url']}; work folder {root}", flush=True)
            meter = OtherLoad(pids=(web["pid"],))  # the server is ours
            startup_s = cli_startup_seconds()
            from dataprep.ray_session import init_ray

            # mmpipe crawls on Ray: a local Ray of as many CPUs as img2dataset's processes,
            # started once (as a build starts it once), before any measured run.
            init_ray(None, num_cpus=args.processes)
            if args.warmup_n > 0:
                warm_n = min(args.warmup_n, args.n)
                subset = write_subset(urls, warm_n, root / "warmup.parquet")
                for tool in (MMPIPE, I2D):
                    run = measure(tool, 0, subset, warm_n, root / "warmup", args, port, meter)
                    print(f"warm-up  {tool:<12} {run.seconds:6.2f} s (not counted)", flush=True)
            runs = alternate(urls, root, args, port, meter)
            result = report(runs, args, facts, startup_s)
            if args.cluster_nodes > 0:
                result["cluster"] = cluster_crawl(urls, root / "cluster", args, port, meter)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            print(f"results written to {args.json}")
        return 0
    finally:
        if args.keep:
            print(f"outputs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as err:
        print(f"benchmark failed: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
