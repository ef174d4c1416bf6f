"""The settings of the build's stages (crawl, filter, embed, score, dedup, publish).

Validating a build config (`mmpipe build`, `mmpipe config show`) imports only this module, not
img2dataset, pyarrow or faiss; each stage module imports its settings from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dataprep.url_policy import UrlPolicy

_VERSION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class CrawlConfig(BaseModel):
    """img2dataset's settings plus mmpipe's guards. Defaults follow img2dataset's."""

    model_config = ConfigDict(extra="forbid")

    url_col: str = "url"
    caption_col: str | None = "caption"
    image_size: int = Field(256, ge=8)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = (
        "border"
    )
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    samples_per_shard: int = Field(10_000, ge=1)
    shards_per_task: int = Field(4, ge=1)  # shards per Prefect crawl task (each a Ray task)
    processes: int = Field(2, ge=1)  # unused: shards run as Ray tasks (cluster.crawl_cpus each)
    threads: int = Field(64, ge=1)
    timeout_s: float = Field(10.0, gt=0)  # per socket operation
    deadline_s: float = Field(30.0, gt=0)  # per request, redirects and body included
    max_body_mb: float = Field(32.0, gt=0)
    retries: int = Field(0, ge=0)  # per URL
    max_shard_retry: int = Field(1, ge=0)  # a shard whose process failed is run again
    min_image_size: int = Field(0, ge=0)
    max_image_area: float = Field(89_478_485, gt=0)  # PIL's decompression-bomb limit
    max_aspect_ratio: float = Field(float("inf"), gt=0)
    user_agent_token: str | None = "mmpipe"
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    compute_hash: Literal["md5", "sha256", "sha512"] | None = "sha256"
    policy: UrlPolicy = UrlPolicy()

    def output_settings(self) -> dict:
        """The settings that change what a shard contains: a resumed crawl must not mix them."""
        return self.model_dump(
            include={
                "image_size",
                "resize_mode",
                "encode_format",
                "encode_quality",
                "samples_per_shard",
                "min_image_size",
                "max_image_area",
                "max_aspect_ratio",
                "compute_hash",
            }
        )


class FilterConfig(BaseModel):
    """Thresholds; a sample must pass all of them. Defaults: DataComp's basic filter."""

    model_config = ConfigDict(extra="forbid")

    min_caption_words: int = Field(3, ge=0)  # DataComp: more than 2 words
    min_caption_chars: int = Field(6, ge=0)  # DataComp: more than 5 characters
    max_caption_chars: int | None = Field(None, ge=1)
    min_image_side: int = Field(200, ge=0)  # original smaller side, px
    max_aspect_ratio: float = Field(3.0, ge=1.0)  # original longer side / smaller side
    min_image_bytes: int = Field(0, ge=0)  # stored image
    max_image_bytes: int | None = Field(None, ge=1)


class SemanticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    eps: float = Field(0.001, gt=0, lt=1)  # drop when cosine similarity > 1 - eps
    cluster_size: int = Field(1000, ge=1)  # target items per cluster: k = ceil(n / cluster_size)
    # The most k-means clusters (a fixed cost); a cluster larger than 2 x cluster_size is split
    # by a k-means of its own, so pairwise work per item stays bounded.
    clusters: int = Field(2000, ge=1)
    # An item whose second-nearest centroid is within this cosine margin of its nearest is also
    # compared in that second cluster: fewer duplicate pairs split by a cluster boundary.
    boundary_margin: float = Field(0.02, ge=0)
    kmeans_iterations: int = Field(20, ge=1)
    max_points_per_centroid: int = Field(256, ge=1)
    seed: int = 0


class PerceptualConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    hamming_threshold: int = Field(16, ge=0, le=63)  # bits of 64
    colour_threshold: float = Field(3.0, ge=0)  # levels (0-255), L-infinity


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: bool = True
    perceptual: PerceptualConfig = PerceptualConfig()
    semantic: SemanticConfig = SemanticConfig()
    # How the work is cut (the kept set does not depend on either): store files per
    # hash/cluster partition, and shards per map task.
    partitions: int = Field(16, ge=1)
    shards_per_task: int = Field(8, ge=1)


class EmbedConfig(BaseModel):
    """Which CLIP embeds, and how the work is spread over Ray."""

    model_config = ConfigDict(extra="forbid")

    # An open_clip architecture (mmpipe's dataprep/model_configs or a built-in such as ViT-B-32);
    # clip-scorer-tiny is the scorer training.scorer trains for the sample web.
    model: str = "clip-scorer-tiny"
    weights: str | None = None  # local open_clip state dict; required to build a dataset
    weights_sha256: str | None = None  # filled in by the build: the scorer's identity
    batch_size: int = Field(256, ge=1)
    workers: int = Field(1, ge=1)  # Ray actors, each with its own copy of the model
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    threads_per_worker: int = Field(1, ge=1)  # torch intra-op threads in an actor


class ClusterConfig(BaseModel):
    """Where the build's per-shard stages run: one Ray task (embed: one actor) per shard."""

    model_config = ConfigDict(extra="forbid")

    ray_address: str | None = None  # None: a private local Ray (in a Ray Job: its cluster)
    crawl_cpus: float = Field(1.0, gt=0)  # per crawl task (one shard, crawl.threads threads)
    filter_cpus: float = Field(1.0, gt=0)
    score_cpus: float = Field(0.25, gt=0)
    max_retries: int = Field(2, ge=0)  # a shard whose task failed or whose node died runs again


class ScoreConfig(BaseModel):
    """Keep a pair by its CLIP score: an absolute threshold or the build's top fraction. With
    neither, the threshold calibrated for the scorer (its card, ``<weights>.json``) is used."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=-1.0, le=1.0)  # keep score >= threshold
    top_fraction: float | None = Field(None, gt=0.0, le=1.0)  # keep the best fraction

    @model_validator(mode="after")
    def _at_most_one(self) -> ScoreConfig:
        if self.threshold is not None and self.top_fraction is not None:
            raise ValueError("set score.threshold or score.top_fraction, not both")
        return self


class PublishConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(None, pattern=_VERSION)  # None: the next vN
    samples_per_shard: int | None = Field(1000, ge=1)
    bytes_per_shard: int | None = Field(None, ge=1)  # used when samples_per_shard is None
    seed: int = 0

    @model_validator(mode="after")
    def _one_target(self) -> PublishConfig:
        if (self.samples_per_shard is None) == (self.bytes_per_shard is None):
            raise ValueError("set exactly one of samples_per_shard and bytes_per_shard")
        return self
