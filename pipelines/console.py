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
