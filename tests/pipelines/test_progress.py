"""Terminal progress bars, drawn from a real store while the test writes what a stage writes."""

import io
import json
import logging
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from dataprep.crawl import prepare_crawl, stats_key
from dataprep.crawl_status import ShardStats
from dataprep.store import open_store
from pipelines.config import BuildConfig, load_config
from pipelines.progress import crawl_progress, training_progress
from training.config import TrainConfig
from training.monitor import METRICS_FILE

POLL_S = 0.05


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=160)


def shown(console: Console) -> str:
    """Every frame drawn, without colours and cursor moves."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())


def wait_until(condition, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the bar did not move"
        time.sleep(POLL_S)


def train_config(store) -> TrainConfig:
    overrides = ["name=bar", "steps=4", f"store.url={store.root_uri}"]
    return load_config(TrainConfig, "configs/clip-tiny.yaml", overrides)


def write_metrics(store, cfg, rows) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)  # as training.monitor.MetricsSink does
    store.put_bytes(f"{cfg.run_prefix()}/{METRICS_FILE}", text.encode())


def test_the_training_bar_follows_the_metrics_to_the_last_step(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    cfg = train_config(store)
    console = terminal()
    rows = [{"step": 2, "time_s": 1.0, "train/total": 4.656, "lr": 0.0015}]
    with training_progress(cfg, console=console, poll_s=POLL_S) as bar:
        [task] = bar.tasks
        assert task.total is None  # before the first logged step
        write_metrics(store, cfg, rows)
        wait_until(lambda: task.completed == 2)
        assert task.total == 4 and task.fields["loss"] == "4.656"
        bar.refresh()  # draw this frame now, not at rich's next tick
        rows.append({"step": 4, "time_s": 2.0, "train/total": 4.275, "lr": 0.002})
        write_metrics(store, cfg, rows)
    assert task.completed == task.total == 4  # the last reading is taken on the way out
    text = shown(console)
    assert "training bar" in text and "2/4 steps loss 4.656" in text
    assert "4/4 steps loss 4.275" in text and "elapsed, 0:00:00 left" in text


def test_the_crawl_bar_counts_committed_shards_and_urls(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    urls = tmp_path / "urls.parquet"
    rows = [
        {"url": f"http://example.com/{i}.jpg", "caption": f"a red square {i}"} for i in range(25)
    ]
    pq.write_table(pa.Table.from_pylist(rows), urls)
    overrides = ["name=bar", f"urls={urls}", f"store.url={store.root_uri}"]
    config = load_config(
        BuildConfig, "configs/demo.yaml", [*overrides, "crawl.samples_per_shard=10"]
    )
    prefix = config.staging_prefix()
    console = terminal()
    with crawl_progress(config, console=console, poll_s=POLL_S) as bar:
        [task] = bar.tasks
        plan = prepare_crawl(str(urls), store, prefix, config.crawl)  # as the flow's first task
        for shard in range(plan.shards):
            start, end = plan.shard_rows(shard)
            commit(store, prefix, shard, count=end - start, kept=end - start - 2)
            wait_until(lambda shard=shard: task.completed == shard + 1)
            assert task.total == 3 and task.fields["urls"] == end
            bar.refresh()
    assert (task.fields["urls"], task.fields["kept"]) == (25, 19)
    text = shown(console)
    assert "crawling bar" in text and "1/3 shards 10 URLs, 8 kept" in text
    assert "3/3 shards 25 URLs, 19 kept" in text


def commit(store, prefix: str, shard: int, count: int, kept: int) -> None:
    """A shard's stats file, the crawl's commit marker."""
    stats = ShardStats(
        shard=shard,
        count=count,
        kept=kept,
        by_status={"success": kept, "failed_to_download": count - kept},
        by_reason={"success": kept, "http_404": count - kept},
        duration_s=1.0,
        tar_bytes=1000,
    )
    stats.check()
    store.put_bytes(stats_key(prefix, shard), stats.model_dump_json().encode())


def test_nothing_is_drawn_when_the_console_is_no_terminal(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    cfg = train_config(store)
    console = Console(file=io.StringIO())  # a pipe or a CI log
    with training_progress(cfg, console=console, poll_s=POLL_S) as bar:
        write_metrics(store, cfg, [{"step": 4, "time_s": 1.0, "train/total": 4.0}])
        time.sleep(5 * POLL_S)
    assert bar is None and console.file.getvalue() == ""


def test_prefect_console_logs_print_above_the_bar(tmp_path):
    from prefect.logging.handlers import PrefectConsoleHandler

    own = io.StringIO()
    handler = PrefectConsoleHandler(stream=own)
    handler.console = Console(file=own, force_terminal=True)  # Prefect's handler on a terminal
    logger = logging.getLogger("prefect.test-progress")
    logger.addHandler(handler)
    store = open_store(f"file://{tmp_path}/store")
    console = terminal()
    try:
        with training_progress(train_config(store), console=console, poll_s=POLL_S):
            logger.warning("step 2: train/total=4.656")
        logger.warning("after the bar")
    finally:
        logger.removeHandler(handler)
    assert "step 2: train/total=4.656" in shown(console)
    assert "step 2" not in own.getvalue() and "after the bar" in own.getvalue()
