"""Typed pipeline configs, loaded from YAML and overridden from the command line.

A config file holds only what differs from the defaults. Overrides are dotted `key=value` pairs
(`crawl.threads=32 store.url=s3://bucket/mmpipe`), values parsed as YAML. Every error names the
field and the bad value.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dataprep.errors import MmpipeError
from dataprep.stage_config import (
    ClusterConfig,
    CrawlConfig,
    DedupConfig,
    EmbedConfig,
    FilterConfig,
    PublishConfig,
    ScoreConfig,
)
from dataprep.store import StoreConfig

if TYPE_CHECKING:
    from dataprep.build import StagesConfig


class ConfigError(MmpipeError, ValueError):
    """A config that cannot be used; the message names the file, field and value."""


class BuildConfig(BaseModel):
    """The `build-dataset` pipeline: URL list -> crawl -> filter -> embed + score -> dedup ->
    publish."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")  # dataset name, used in keys
    # URL list: a parquet, csv, tsv, jsonl or txt file with `url` (+ `caption`) columns, or a
    # folder or glob of such parts; a path or s3://
    urls: str
    store: StoreConfig = StoreConfig()
    cluster: ClusterConfig = ClusterConfig()  # where the per-shard stages run (Ray)
    crawl: CrawlConfig = CrawlConfig()
    filter: FilterConfig = FilterConfig()
    embed: EmbedConfig = EmbedConfig()
    score: ScoreConfig = ScoreConfig()
    dedup: DedupConfig = DedupConfig()
    publish: PublishConfig = PublishConfig()
    crawl_only: bool = False  # stop after the crawl (no scorer needed)
    task_retries: int = Field(2, ge=0)
    task_retry_delay_s: float = Field(5.0, ge=0)
    concurrent_tasks: int = Field(1, ge=1)  # crawl tasks (groups of shards) at once
    # The build lock's lease: a holder that stops renewing it (dead on another host) loses it
    # after this long; on the holder's own host its exit frees the lock at once.
    lock_lease_s: float = Field(300.0, ge=3)

    def staging_prefix(self) -> str:
        return f"staging/{self.name}/crawl"

    def stages(self) -> StagesConfig:
        from dataprep.build import StagesConfig  # the stages themselves: pyarrow, img2dataset

        return StagesConfig(
            filter=self.filter,
            embed=self.embed,
            score=self.score,
            dedup=self.dedup,
            publish=self.publish,
            cluster=self.cluster,
        )


C = TypeVar("C", bound=BaseModel)


def load_config(
    cls: type[C],
    path: str | Path | None,
    overrides: list[str] = (),
    values: dict[str, Any] | None = None,
) -> C:
    """Read YAML (if given), set ``values`` (top-level fields that are not strings, e.g. a CLI's
    positional arguments), apply dotted overrides, validate into `cls`."""
    source = str(path) if path else "command line"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data.update(values or {})
    for item in overrides:
        apply_override(data, item)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[leaf] = value


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "missing":
            lines.append(f"  {field}: required field is missing")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown field (value {e['input']!r})")
        else:
            lines.append(f"  {field} = {e['input']!r}: {e['msg']}")
    return "\n".join(lines)
