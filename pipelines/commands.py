"""What `mmpipe`, the demo and a Ray Job share: the process's environment, user errors in one
line, and builds and training runs through their Prefect flows with progress and a summary.

Light at import, like the CLI: Prefect, Ray and torch are imported by the functions that run.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataprep.errors import MmpipeError, debugging
from dataprep.state import state_dir
from pipelines.config import BuildConfig, ConfigError, load_config

if TYPE_CHECKING:
    from training.config import TrainConfig


def prepare_environment() -> None:
    """Settings Prefect reads at import: keep its files in the state dir, no telemetry."""
    home = os.environ.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
    Path(home).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API's 20 s start-up limit is too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if "PREFECT_API_URL" not in os.environ:  # a server from `mmpipe server start`, if it runs
        from pipelines.server import running_api_url

        if url := running_api_url():
            os.environ["PREFECT_API_URL"] = url


def check_prefect_api() -> None:
    """Runs of flows fail fast when PREFECT_API_URL points at nothing."""
    if url := os.environ.get("PREFECT_API_URL"):
        from pipelines.server import check_api

        check_api(url)


def run_reporting_errors(run: Callable[[], int], debug: bool = False) -> int:
    """`run()`'s exit code; mmpipe's own errors are one line on stderr and code 2 (with their
    traceback when `debug`), Ctrl-C is code 130."""
    try:
        return run()
    except MmpipeError as err:
        if debug:
            traceback.print_exc()
        print(f"mmpipe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmpipe: interrupted", file=sys.stderr)
        return 130


class _UserErrorsInOneLine(logging.Formatter):
    """A console formatter that leaves out the traceback of mmpipe's own errors: the message
    says what is wrong. The Prefect API's log handler still records the whole traceback."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and isinstance(record.exc_info[1], MmpipeError):
            record = copy.copy(record)
            record.exc_info = record.exc_text = None
        return self.inner.format(record)


def quiet_user_errors() -> None:
    """Run lines on the terminal without tracebacks for mmpipe's own errors, unless --debug."""
    if debugging():
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler.formatter, _UserErrorsInOneLine
        ):
            handler.setFormatter(_UserErrorsInOneLine(handler.formatter))


def build_with_progress(config: BuildConfig, label: str = ""):
    """Run `build-dataset` with a progress bar, then print what every stage kept and dropped."""
    from pipelines.console import print_build_summary, print_crawl_summary
    from pipelines.flows import run_build
    from pipelines.progress import crawl_progress

    quiet_user_errors()
    with crawl_progress(config):
        result = run_build(config)
    print_crawl_summary(config, result.crawl)
    print_build_summary(result)
    if result.manifest_uri:
        print(f"{label}published {config.name}@{result.version}: {result.manifest_uri}")
    return result


def train_config(
    spec: str,
    path: str | None,
    overrides: list[str] = (),
    values: dict[str, Any] | None = None,
    inputs: bool = True,
) -> TrainConfig:
    """The TrainConfig of a `spec` run, validated before any worker starts; with ``inputs``, its
    data and checkpoints must exist as this machine sees them."""
    from training.config import TrainConfig

    config = load_config(TrainConfig, path, [f"spec={spec}", *overrides], values=values)
    from training.engine import validate
    from training.shards import DataError

    try:
        validate(config, inputs=inputs)
    except (ValueError, DataError, FileNotFoundError) as err:  # config, data, checkpoints
        raise ConfigError(str(err)) from None
    return config


def train_with_progress(config: TrainConfig) -> dict:
    """Train through the spec's flow (`train-<spec>`) with a progress bar; print the result."""
    from pipelines.console import print_training_result
    from pipelines.progress import training_progress
    from pipelines.training_flows import training_flow

    quiet_user_errors()
    with training_progress(config):
        outcome = training_flow(config.spec)(config)
    print_training_result(config, outcome)
    return outcome
