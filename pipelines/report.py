"""Human-readable reports of stage stats, for Prefect artifacts and the terminal."""

from __future__ import annotations

from dataprep.crawl_status import KEPT, CrawlSummary


def reason_rows(summary: CrawlSummary) -> list[dict]:
    """One row per outcome: kept first, then drop reasons by count."""
    rows = []
    for reason, count in summary.by_reason.items():
        rows.append(
            {
                "outcome": "kept" if reason == KEPT else "dropped",
                "reason": reason,
                "count": count,
                "share": f"{100.0 * count / max(summary.count, 1):.1f}%",
            }
        )
    rows.sort(key=lambda r: (r["outcome"] != "kept", -r["count"], r["reason"]))
    return rows


def crawl_markdown(name: str, summary: CrawlSummary, location: str) -> str:
    lines = [
        f"# Crawl of `{name}`",
        "",
        f"- shards: **{summary.shards}** at `{location}`",
        f"- URLs: **{summary.count}**, kept **{summary.kept}** "
        f"({100.0 * summary.kept / max(summary.count, 1):.1f}%)",
        f"- shard bytes: {summary.tar_bytes / 1e6:.1f} MB, "
        f"download work time: {summary.duration_s:.1f} s (sum over shards)",
        "",
        "| outcome | reason | count | share |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['outcome']} | {r['reason']} | {r['count']} | {r['share']} |"
        for r in reason_rows(summary)
    ]
    return "\n".join(lines) + "\n"


def training_markdown(cfg, result, exported: str, rows: list[dict]) -> str:
    final = rows[-1] if rows else {}
    lines = [
        f"# Training run `{cfg.name}` ({cfg.spec}, {cfg.model})",
        "",
        f"- steps: **{result.steps}** of {cfg.steps}; run folder `{result.run_uri}`",
        f"- latest checkpoint: `{result.checkpoint_uri}`",
        f"- exported weights: `{exported}`",
        f"- engine: ZeRO-{cfg.engine.zero.stage}, {cfg.engine.precision}, "
        f"{cfg.scale.num_workers} workers x micro-batch {cfg.engine.micro_batch_size} "
        f"x accumulation {cfg.engine.grad_accum_steps}",
        "",
        "| metric | final value |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.4g} |" for k, v in final.items() if isinstance(v, float)]
    return "\n".join(lines) + "\n"
