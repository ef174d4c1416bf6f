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
