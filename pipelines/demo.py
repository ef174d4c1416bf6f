"""`mmpipe demo`: serve the sample web on loopback, build a dataset from it, stop the server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from dataprep.state import state_dir
from pipelines.config import BuildConfig, load_config

READY_TIMEOUT_S = 120.0
#: The demo's CLIP schedule: about 3 minutes on 2 cores (the full recipe, configs/clip-tiny.yaml,
#: trains 500 steps on a 12,000-URL crawl; see the README).
DEMO_CLIP_SCHEDULE = [
    "steps=150",
    "eval.every_steps=50",
    "checkpoint_every=50",
    "optim.warmup_steps=20",
]


@contextmanager
def sample_web(n: int, seed: int, out: Path):
    """Run `mmpipe sampleweb serve` in a child process on a free port; yield its ready info."""
    out.mkdir(parents=True, exist_ok=True)
    ready = out / "ready.json"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipelines.cli", "sampleweb", "serve", "--n", str(n)]
    cmd += ["--seed", str(seed), "--port", "0", "--out", str(out), "--ready-file", str(ready)]
    server = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if server.poll() is not None:
                raise RuntimeError(f"sample web server exited with code {server.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sample web server not ready after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        yield json.loads(ready.read_text())
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_demo(
    config_path: str,
    overrides: list[str],
    n: int,
    seed: int,
    train_config: str | None = "configs/clip-tiny.yaml",
    train_overrides: list[str] = (),
) -> int:
    """Crawl the sample web into shards, then (unless `train_config` is None) train CLIP on them."""
    # The demo crawls and trains on the crawl output (publishing needs a scorer: issue 4 wiring).
    overrides = ["crawl_only=true", *overrides]
    config = load_config(BuildConfig, config_path, overrides)  # fail fast, before the server
    train = _train_config(train_config, train_overrides, "file:///placeholder/")
    from pipelines.console import print_crawl_summary
    from pipelines.flows import run_build

    started = time.monotonic()
    with sample_web(n, seed, state_dir() / "sampleweb") as web:
        print(f"sample web: {web['n']} samples at {web['base_url']}")
        serving = [f"urls={web['urls']}", f"crawl.policy.allow=['127.0.0.1:{web['port']}']"]
        config = load_config(BuildConfig, config_path, [*overrides, *serving])
        # The server's port, and so every URL, is new each run: start the demo build afresh.
        _remove(config.store.open(), f"staging/{config.name}/", "the previous demo build")
        summary = run_build(config).crawl
    print_crawl_summary(config, summary)
    print(f"crawl finished after {time.monotonic() - started:.0f} s")
    if train is not None:
        store = config.store.open()
        shards = store.uri(config.staging_prefix()) + "/"
        train = _train_config(train_config, train_overrides, shards)
        _remove(store, f"{train.run_prefix()}/", "the previous demo training run")
        from pipelines.console import print_training_result
        from pipelines.training_flows import train_clip

        print(f"training {train.model} for {train.steps} steps on {shards}")
        print_training_result(train, train_clip(train))
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0


def _train_config(path: str | None, overrides, shards: str):
    if path is None:
        return None
    from training.config import TrainConfig
    from training.engine import validate

    # Its own run name: the demo starts its run afresh and must not touch a user's runs.
    base = [f"data.source={shards}", "name=demo-clip", *DEMO_CLIP_SCHEDULE]
    cfg = load_config(TrainConfig, path, [*base, *overrides])
    validate(cfg)
    return cfg


def _remove(store, prefix: str, what: str) -> None:
    removed = store.delete_prefix(prefix)
    if removed:
        print(f"removed {what} ({removed} objects)")
