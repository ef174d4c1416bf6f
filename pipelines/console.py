"""Terminal output of pipeline results."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from dataprep.crawl_status import CrawlSummary
from pipelines.config import BuildConfig
from pipelines.report import reason_rows


def print_crawl_summary(config: BuildConfig, summary: CrawlSummary) -> None:
    console = Console()
    location = config.store.open().uri(config.staging_prefix())
    table = Table(title=f"crawl of {config.name}: {summary.count} URLs, {summary.kept} kept")
    for column in ("outcome", "reason", "count", "share"):
        table.add_column(column, justify="right" if column in ("count", "share") else "left")
    for row in reason_rows(summary):
        table.add_row(row["outcome"], row["reason"], str(row["count"]), row["share"])
    console.print(table)
    console.print(
        f"shards: {summary.shards} WebDataset shards at [bold]{location}[/bold]", soft_wrap=True
    )


def print_training_result(config, outcome: dict) -> None:
    console = Console()
    final = outcome.get("final", {})
    table = Table(title=f"training run {config.name}: step {final.get('step', 0)}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in final.items():
        if isinstance(value, float):
            table.add_row(name, f"{value:.4g}")
    console.print(table)
    console.print(f"run folder: {outcome['result']['run_uri']}", soft_wrap=True)
    console.print(f"exported weights: {outcome['export']}", soft_wrap=True)


def print_generation_report(report) -> None:
    """Per caption: best CLIP score and whether the candidates show the caption's colour."""
    console = Console()
    table = Table(title=f"samples {report.name}: {report.candidates} candidates per caption")
    for column in ("caption", "best CLIP", "colour", "best shows it", "candidates showing it"):
        table.add_column(column, justify="left" if column == "caption" else "right")
    for r in report.results:
        best = "-" if r.clip_scores is None else f"{r.clip_scores[0]:.3f}"
        hits = r.colour_matches
        table.add_row(
            r.caption,
            best,
            r.colour or "-",
            "-" if hits is None else ("yes" if hits[0] else "no"),
            "-" if hits is None else f"{sum(hits)}/{len(hits)}",
        )
    console.print(table)
    if report.colour_match_all is not None:
        line = f"named colour shown: {report.colour_match_all:.1%} of all candidates"
        if report.colour_match_top1 is not None:
            line += f", {report.colour_match_top1:.1%} of CLIP's best per caption"
        console.print(line)
    console.print(f"grid: {report.grid_uri}", soft_wrap=True)


def print_build_summary(result) -> None:
    """After the crawl table: each later stage's input, kept and drops by reason."""
    if not result.stages:
        return
    console = Console()
    table = Table(title="build stages after the crawl")
    for column in ("stage", "in", "kept", "dropped by reason"):
        table.add_column(column, justify="right" if column in ("in", "kept") else "left")
    for summary in result.stages.values():
        drops = ", ".join(
            f"{reason} {n}" for reason, n in sorted(summary.by_reason.items()) if reason != "kept"
        )
        table.add_row(summary.stage, str(summary.count), str(summary.kept), drops or "-")
    console.print(table)
