"""Basic filters: caption and image checks per sample, DataComp's basic filter as the default.

DataComp's "basic filtering" keeps captions of more than 2 words and more than 5 characters and
images whose original smaller side is at least 200 px with an aspect ratio of at most 3 (it also
keeps English only; mmpipe has no language model, so that part is left out). Sizes are the
*original* ones the crawl recorded (before its resize), as in DataComp. Decode validity and byte
size are checked on the stored image.

The stage decodes every image anyway, so it also records the signals dedup needs (sha256 of the
stored image bytes, its perceptual hash and colour signature): dedup then never decodes again.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable

import pyarrow as pa
from PIL import Image

from dataprep.phash import colour_signature, content_box, phash, to_signed
from dataprep.ray_stages import run_shards
from dataprep.stage_config import ClusterConfig, FilterConfig
from dataprep.stages import KEPT, StageStats, Staging, fingerprint

STAGE = "filter"
SIGNALS_VERSION = 3  # bump when the recorded signals change: staged output is then redone


# Checked in this order; the first that fails names the drop.
REASONS = (
    "missing_image",
    "decode_error",
    "empty_caption",
    "caption_too_short",
    "caption_too_few_words",
    "caption_too_long",
    "image_too_small",
    "aspect_ratio",
    "image_bytes_too_small",
    "image_bytes_too_large",
)

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("reason", pa.string()),
        ("url", pa.string()),
        ("caption_chars", pa.int32()),
        ("caption_words", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("image_bytes", pa.int64()),
        ("sha256", pa.string()),
        ("phash", pa.int64()),
        ("colours", pa.list_(pa.float32())),
    ]
)


def filter_fingerprint(staging: Staging, cfg: FilterConfig) -> str:
    return fingerprint(STAGE, SIGNALS_VERSION, staging.crawl_fingerprint(), cfg.model_dump())


def caption_reason(caption: str, cfg: FilterConfig) -> str | None:
    text = caption.strip()
    if not text:
        return "empty_caption"
    if len(text) < cfg.min_caption_chars:
        return "caption_too_short"
    if len(text.split()) < cfg.min_caption_words:
        return "caption_too_few_words"
    if cfg.max_caption_chars is not None and len(text) > cfg.max_caption_chars:
        return "caption_too_long"
    return None


def image_reason(width: int, height: int, nbytes: int, cfg: FilterConfig) -> str | None:
    if min(width, height) < cfg.min_image_side:
        return "image_too_small"
    if max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
        return "aspect_ratio"
    if nbytes < cfg.min_image_bytes:
        return "image_bytes_too_small"
    if cfg.max_image_bytes is not None and nbytes > cfg.max_image_bytes:
        return "image_bytes_too_large"
    return None


def decode(data: bytes) -> Image.Image | None:
    """The decoded RGB image, or None if the bytes are not a complete image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def judge_sample(
    key: str, files: dict[str, bytes], cfg: FilterConfig, bordered: bool = False
) -> dict:
    """One decision row: the signals, and KEPT or the first failed check. ``bordered``: the crawl
    padded pictures to a square (img2dataset's ``border`` mode); signals skip the padding."""
    meta = json.loads(files.get("json", b"{}") or b"{}")
    caption = files.get("txt", b"").decode("utf-8", errors="replace")
    data = files.get("jpg") or files.get("png") or files.get("webp")
    row = {name: None for name in SCHEMA.names}
    row |= {"key": key, "url": meta.get("url"), "caption_chars": len(caption.strip())}
    row["caption_words"] = len(caption.split())
    width = meta.get("original_width") or meta.get("width") or 0
    height = meta.get("original_height") or meta.get("height") or 0
    row |= {"original_width": width, "original_height": height}
    if data is None:
        return row | {"reason": "missing_image"}
    row |= {"image_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    image = decode(data)
    if image is None:
        return row | {"reason": "decode_error"}
    box = content_box(image.size, (width, height)) if bordered else None
    picture = image.crop(box) if box else image
    row |= {"phash": to_signed(phash(picture)), "colours": colour_signature(picture)}
    reason = caption_reason(caption, cfg) or image_reason(width, height, len(data), cfg)
    return row | {"reason": reason or KEPT}


def filter_shard(staging: Staging, shard: int, cfg: FilterConfig, fp: str) -> StageStats:
    """Filter one crawl shard (its kept samples); skipped if already committed with ``fp``."""
    done = staging.stats(STAGE, shard, fp)
    if done is not None:
        return done
    crawl = staging.crawl_stats(shard)
    bordered = staging.crawl_plan().settings.get("resize_mode") == "border"
    rows = [judge_sample(key, files, cfg, bordered) for key, files in staging.samples(shard)]
    if len(rows) != crawl.kept:
        raise AssertionError(
            f"crawl shard {staging.uri('crawl', shard, 'tar')} holds {len(rows)} samples, "
            f"its stats say {crawl.kept}"
        )
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    stats = StageStats.of(STAGE, shard, fp, table["reason"].to_pylist())
    staging.commit(stats, table)
    return stats


def filter_shards(
    staging: Staging,
    shards: list[int],
    cfg: FilterConfig,
    cluster: ClusterConfig = ClusterConfig(),  # noqa: B008 (frozen settings)
    on_shard: Callable[[StageStats], None] | None = None,
) -> list[StageStats]:
    """Filter every shard not yet committed, one Ray task per shard; stats in shard order."""
    fp = filter_fingerprint(staging, cfg)
    done = {s: st for s in shards if (st := staging.stats(STAGE, s, fp)) is not None}
    return run_shards(
        _filter_one,
        shards,
        done,
        (staging, cfg, fp),
        on_shard,
        ray_address=cluster.ray_address,
        num_cpus=cluster.filter_cpus,
        max_retries=cluster.max_retries,
    )


def _filter_one(shard: int, staging: Staging, cfg: FilterConfig, fp: str) -> StageStats:
    return filter_shard(staging, shard, cfg, fp)
