"""Terminal progress bars for long stages, read from what the stages write to the store.

A bar polls the store from a background thread: a training run's metrics.jsonl, a crawl's plan
and its per-shard stats files (the commit markers). So it needs nothing from the flow, and
works whether the work runs in this process, in Ray workers or as a job on a cluster that
shares the store.

    with training_progress(cfg):
        train_clip(cfg)

Nothing is drawn when the console is not a terminal (CI logs stay clean); pass a Console with
`force_terminal=True` (or set TTY_COMPATIBLE=1) to draw anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.file_proxy import FileProxy
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dataprep.crawl_status import ShardStats
from dataprep.store import ObjectNotFound
from training.monitor import read_metrics

POLL_S = 2.0
LOSS_KEYS = ("train/loss", "train/total")  # the first one a run logs is shown
# Steps are logged every `log_every` steps: estimate the speed over minutes, not rich's 30 s.
SPEED_WINDOW_S = 300.0


@dataclass
class Reading:
    """How far a stage is: `completed` of `total`, and what else the bar shows."""

    completed: float
    total: float | None
    fields: dict = field(default_factory=dict)


@contextmanager
def training_progress(
    cfg, console: Console | None = None, poll_s: float = POLL_S
) -> Iterator[Progress | None]:
    """Steps done of `cfg.steps`, the latest loss and the time left, while the run trains."""
    store = cfg.store.open()

    def read() -> Reading | None:
        rows = read_metrics(store, cfg.run_prefix())
        if not rows:
            return None
        loss = next((rows[-1][k] for k in LOSS_KEYS if k in rows[-1]), None)
        return Reading(
            rows[-1]["step"], cfg.steps, {"loss": "-" if loss is None else f"{loss:.4g}"}
        )

    columns = [TextColumn("loss {task.fields[loss]}")]
    with _bar(
        f"training {cfg.name}", "steps", columns, {"loss": "-"}, read, console, poll_s
    ) as bar:
        yield bar


@contextmanager
def crawl_progress(
    config, console: Console | None = None, poll_s: float = POLL_S
) -> Iterator[Progress | None]:
    """Shards committed of the plan's, URLs accounted for and kept, while a build crawls."""
    columns = [TextColumn("{task.fields[urls]} URLs, {task.fields[kept]} kept")]
    read = _CrawlReader(config.store.open(), config.staging_prefix()).read
    start = {"urls": 0, "kept": 0}
    with _bar(f"crawling {config.name}", "shards", columns, start, read, console, poll_s) as bar:
        yield bar


class _CrawlReader:
    """Counts committed shards with one listing per poll; reads each stats file only once."""

    def __init__(self, store, prefix: str):
        self.store, self.prefix = store, prefix
        self.plan = None  # the CrawlPlan, once the flow has written it
        self.stats: dict[str, ShardStats] = {}

    def read(self) -> Reading | None:
        from dataprep.crawl import PLAN_KEY, CrawlPlan  # img2dataset: only crawl bars need it

        if self.plan is None:
            try:
                self.plan = CrawlPlan.model_validate_json(
                    self.store.get_bytes(f"{self.prefix}/{PLAN_KEY}")
                )
            except ObjectNotFound:  # the flow has not planned the crawl yet
                return None
        for key in self.store.list(f"{self.prefix}/"):
            if key.endswith(".stats.json") and key not in self.stats:
                self.stats[key] = ShardStats.model_validate_json(self.store.get_bytes(key))
        urls = sum(s.count for s in self.stats.values())
        kept = sum(s.kept for s in self.stats.values())
        return Reading(len(self.stats), self.plan.shards, {"urls": urls, "kept": kept})


@contextmanager
def _bar(
    description: str,
    unit: str,
    columns: list[ProgressColumn],
    fields: dict,
    read: Callable[[], Reading | None],
    console: Console | None,
    poll_s: float,
) -> Iterator[Progress | None]:
    console = console or Console()
    if not console.is_terminal:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        *columns,
        TimeElapsedColumn(),
        TextColumn("elapsed,"),
        TimeRemainingColumn(),
        TextColumn("left"),
        console=console,
        speed_estimate_period=SPEED_WINDOW_S,
    )
    task = progress.add_task(description, total=None, **fields)
    poller = _Poller(progress, task, read, poll_s)
    with progress, _prefect_logs_above(console):
        poller.start()
        try:
            yield progress
        finally:
            poller.stop()


class _Poller:
    """Moves one bar from `read()` every `poll_s` seconds in a daemon thread."""

    def __init__(self, progress: Progress, task, read: Callable[[], Reading | None], poll_s):
        self.progress, self.task, self.read, self.poll_s = progress, task, read, poll_s
        self.started = False  # the first reading resets the bar: work done before is no speed
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="progress-poller")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self._tick()  # the final state, so the bar ends where the stage did

    def _loop(self) -> None:
        self._tick()
        while not self.done.wait(self.poll_s):
            self._tick()

    def _tick(self) -> None:
        try:
            reading = self.read()
        except Exception as err:  # a bar must never fail the stage it watches
            logging.getLogger(__name__).debug("progress: cannot read the store yet: %s", err)
            return
        if reading is None:
            return
        update = self.progress.update if self.started else self.progress.reset
        update(self.task, total=reading.total, completed=reading.completed, **reading.fields)
        self.started = True


@contextmanager
def _prefect_logs_above(console: Console) -> Iterator[None]:
    """Prefect's console handler writes to the stream it was created with, past rich's
    redirection, so its lines would run into the bar: while the bar is drawn, lines meant for
    a terminal go through the bar's console, which prints them above it."""
    handlers = [h for h in _prefect_console_handlers() if h.console.is_terminal]
    originals = [h.console.file for h in handlers]
    for handler, original in zip(handlers, originals, strict=True):
        handler.console.file = _AboveTheBar(console, original)
    try:
        yield
    finally:
        for handler, original in zip(handlers, originals, strict=True):
            handler.console.file = original


class _AboveTheBar(FileProxy):
    """rich's proxy that prints lines above a live display (as for redirected stdout), kept
    as it is: a Console unwraps a plain FileProxy given as its file."""

    @property
    def rich_proxied_file(self):
        return self


def _prefect_console_handlers() -> list:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()]
    loggers += [
        x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)
    ]
    found = {
        id(h): h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)
    }
    return list(found.values())
