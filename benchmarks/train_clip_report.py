"""The train_clip benchmark's report: the runs, the medians and ratios, memory per rank."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
from dataclasses import asdict

from benchmarks.metering import OTHER_CPU_WARN
from benchmarks.train_clip_engines import CONFIG, MMPIPE, MODEL, OPENCLIP, WORLD, Run, Setup

ENGINES = (MMPIPE, OPENCLIP)
TARGET_RATIO = 0.9


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _fmt_mib(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values) if values else "n/a"


def other_cores(run: Run) -> str:
    return _fmt(run.other_cores)


def cpu_cost(run: Run) -> str:
    return _fmt(run.rank_cpu_ms_per_sample)


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def print_runs(runs: list[Run]) -> None:
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
            f"{r.engine:<10}{r.repeat + 1:>3}{mark}{r.samples_per_s:>11.1f}{cpu_cost(r):>10}"
            f"{_fmt(r.loader_cpu_ms_per_sample):>8}"
            f"{other_cores(r):>7}{r.wall_s:>8.1f}{'' if loss is None else f'{loss:.3f}':>7}  "
            f"{rss:<28} {' '.join(f'{w:.0f}' for w in r.windows)}"
        )
    print(
        "  samples/s: global, over the measured steps; cpu ms/sa: CPU of all ranks and their "
        "loaders per sample\n  in that window (robust to a busy machine), loaders: their part; "
        "other: cores other "
        "processes used meanwhile;\n  x: disturbed, run again, not in the medians"
    )


def summarize(runs: list[Run]) -> dict:
    """Medians over the counted runs, the ratios, and the largest rank RSS of each engine."""
    counted = [r for r in runs if r.counted]

    def per_engine(value) -> dict:
        return {e: _median([value(r) for r in counted if r.engine == e]) for e in ENGINES}

    medians = per_engine(lambda r: r.samples_per_s)
    cpu = per_engine(lambda r: r.rank_cpu_ms_per_sample)
    return {
        "median_samples_per_s": medians,
        "ratio_mmpipe_over_openclip": medians[MMPIPE] / medians[OPENCLIP],
        "median_cpu_ms_per_sample": cpu,
        "median_loader_cpu_ms_per_sample": per_engine(lambda r: r.loader_cpu_ms_per_sample),
        "cpu_cost_ratio_openclip_over_mmpipe": (
            cpu[OPENCLIP] / cpu[MMPIPE] if cpu[MMPIPE] and cpu[OPENCLIP] else None
        ),
        "peak_rss_per_rank_mib": {
            e: max(max(r.rank_peak_rss_mib, default=0) for r in runs if r.engine == e)
            for e in ENGINES
        },
    }


def print_summary(summary: dict) -> None:
    print()
    for e in ENGINES:
        print(
            f"median {e:<10}: {summary['median_samples_per_s'][e]:8.1f} samples/s (global), "
            f"{_fmt(summary['median_cpu_ms_per_sample'][e])} CPU ms/sample "
            f"({_fmt(summary['median_loader_cpu_ms_per_sample'][e])} in its DataLoader workers)"
        )
    ratio = summary["ratio_mmpipe_over_openclip"]
    verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
    print(f"ratio mmpipe/open_clip: {ratio:.3f} samples/s (target >= {TARGET_RATIO}: {verdict})")
    cpu_ratio = summary["cpu_cost_ratio_openclip_over_mmpipe"]
    if cpu_ratio is not None:
        print(f"  by CPU cost (open_clip ms/sample / mmpipe ms/sample): {cpu_ratio:.3f}")


def print_memory(estimate: dict, precision: str, rss: dict) -> None:
    print()
    print(
        f"memory, ZeRO-{estimate['stage']} ({precision}), clip-tiny "
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


def report(setup: Setup, runs: list[Run], estimate: dict, versions: dict) -> dict:
    """Prints the report; returns it as the --json document."""
    a = setup.args
    summary = summarize(runs)
    print_runs(runs)
    print_summary(summary)
    print_memory(estimate, a.precision, summary["peak_rss_per_rank_mib"])
    busy = [r for r in runs if r.counted and r.disturbed]
    if busy:
        print(
            f"WARNING: other processes used > {OTHER_CPU_WARN:.0%} of a core while "
            + ", ".join(f"{r.engine} run {r.repeat + 1}" for r in busy)
            + f" (still, after {a.retries} retries) measured: their samples/s are skewed "
            "(cpu ms/sample much less so)"
        )
    rss = summary.pop("peak_rss_per_rank_mib")
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
        **summary,
        "memory": {"zero_estimate": estimate, "peak_rss_per_rank_mib": rss},
    }


# --------------------------------------------------------------------------- memory estimate


def zero_estimate(stage: int, precision: str) -> dict:
    """DeepSpeed's per-rank model-state estimate for clip-tiny, 2 ranks on 1 node."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipelines.config import load_config
    from training.config import TrainConfig
    from training.specs.clip import ClipSpec

    cfg = load_config(TrainConfig, CONFIG, ["name=estimate", "data.source=file:///unused/"])
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
