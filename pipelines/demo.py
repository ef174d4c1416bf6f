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


def run_demo(config_path: str, overrides: list[str], n: int, seed: int) -> int:
    config = load_config(BuildConfig, config_path, overrides)  # fail fast, before the server
    from pipelines.console import print_crawl_summary
    from pipelines.flows import run_build

    started = time.monotonic()
    with sample_web(n, seed, state_dir() / "sampleweb") as web:
        print(f"sample web: {web['n']} samples at {web['base_url']}")
        serving = [f"urls={web['urls']}", f"crawl.policy.allow=['127.0.0.1:{web['port']}']"]
        config = load_config(BuildConfig, config_path, [*overrides, *serving])
        # The server's port, and so every URL, is new each run: start the demo build afresh.
        removed = config.store.open().delete_prefix(f"staging/{config.name}/")
        if removed:
            print(f"removed the previous demo build ({removed} objects)")
        summary = run_build(config)
    print_crawl_summary(config, summary)
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0
