"""Training throughput: mmpipe's engine against open_clip's own trainer, clip-tiny on 2 CPU ranks.

Same model, data, loss, optimizer and global batch; the engines alternate; prints the samples/s
of every run, the medians, the ratio mmpipe / open_clip (target >= 0.9), CPU per sample and memory
per rank. What exactly is compared and how: docs/benchmarks.md.

    .venv/bin/python benchmarks/train_clip.py                        # bf16, ZeRO-2, 3 repeats
    .venv/bin/python benchmarks/train_clip.py --steps 10 --warmup 10 --repeats 1 --batch 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file

from benchmarks.metering import OTHER_CPU_WARN, OtherLoad, wait_for_absent  # noqa: E402
from benchmarks.train_clip_engines import (  # noqa: E402
    LOG_EVERY,
    MMPIPE,
    MODEL,
    OPENCLIP,
    PER_SHARD,
    SHARDS,
    WORLD,
    BenchmarkError,
    Run,
    Setup,
    run_mmpipe,
    run_openclip,
    write_shards,
)
from benchmarks.train_clip_report import cpu_cost, other_cores, report, zero_estimate  # noqa: E402

QUIET_WINDOW_S = 2.0


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


def measure(setup: Setup, engine: str, repeat: int) -> list[Run]:
    """One counted run of ``engine``; a disturbed one is run again, up to --retries times."""
    a, runs = setup.args, []
    for attempt in range(a.retries + 1):
        waited = wait_for_absent(a.wait_for)
        waited += OtherLoad().wait_quiet(a.wait_quiet, QUIET_WINDOW_S) if a.wait_quiet > 0 else 0
        run = (run_mmpipe if engine == MMPIPE else run_openclip)(setup, repeat, attempt)
        runs.append(run)
        run.disturbed = (run.other_cores or 0) > OTHER_CPU_WARN
        run.counted = not run.disturbed or attempt == a.retries
        note = "" if run.counted else ": disturbed, run again"
        print(
            f"  run {repeat + 1}/{a.repeats} {engine:<9} {run.samples_per_s:7.1f} "
            f"samples/s, {cpu_cost(run)} CPU ms/sample  (wall {run.wall_s:.0f}s, "
            f"waited {waited:.0f}s for quiet, other processes {other_cores(run)} cores)" + note,
            flush=True,
        )
        if run.counted:
            break
    return runs


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    for dist in ("torch", "deepspeed", "ray", "open_clip_torch", "webdataset"):
        with contextlib.suppress(Exception):
            out[dist] = version(dist)
    return out


def benchmark(args: argparse.Namespace, tmp: Path) -> dict:
    t0 = time.monotonic()
    setup = Setup(args, tmp, tmp / "shards", write_shards(tmp / "shards"))
    found = versions()
    print(
        f"train_clip: {MODEL}, global batch {args.batch} ({WORLD} ranks x {setup.micro}), "
        f"{args.warmup} warm-up + {args.steps} measured steps, {args.repeats} repeats\n"
        f"  mmpipe: DeepSpeed ZeRO-{args.zero_stage}, precision {args.precision}; "
        f"open_clip_train: DDP, --precision {setup.openclip_precision}\n"
        f"  data: {SHARDS} shards x {PER_SHARD} samples in {setup.shards} "
        f"({time.monotonic() - t0:.1f}s), 1 loader worker and 1 thread per rank\n"
        f"  {found}",
        flush=True,
    )
    runs: list[Run] = []
    for repeat in range(args.repeats):
        order = [MMPIPE, OPENCLIP] if repeat % 2 == 0 else [OPENCLIP, MMPIPE]
        for engine in order:
            runs += measure(setup, engine, repeat)
    estimate = zero_estimate(args.zero_stage, args.precision)
    return report(setup, runs, estimate, found)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: runs are stopped, the temp dir is removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    tmp = Path(tempfile.mkdtemp(prefix="mmpipe-bench-train-"))
    try:
        result = benchmark(args, tmp)
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
