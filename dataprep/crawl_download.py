"""img2dataset's Downloader and Resizer with mmpipe's guards, for the crawl stage (`crawl.py`).

The downloader installs the URL policy and per-request deadline (`safe_http`) in each download
process; the resizer refuses decompression bombs and truncated files before decoding them.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

# albumentations (imported by img2dataset) checks PyPI for updates at import: not in a crawler.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from img2dataset.writer import WebDatasetSampleWriter  # noqa: E402
from PIL import Image  # noqa: E402

from dataprep import safe_http  # noqa: E402
from dataprep.stage_config import CrawlConfig  # noqa: E402


def make_downloader(
    cfg: CrawlConfig, work: Path, samples_per_shard: int, oom_shard_count: int
) -> GuardedDownloader:
    """img2dataset's Downloader for one crawl: shards of `samples_per_shard` written to `work`."""
    resizer = GuardedResizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=False,
        encode_quality=cfg.encode_quality,
        encode_format=cfg.encode_format,
        min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area,
        max_aspect_ratio=cfg.max_aspect_ratio,
    )
    guard = safe_http.FetchGuard(
        policy=cfg.policy,
        op_timeout_s=cfg.timeout_s,
        deadline_s=cfg.deadline_s,
        max_bytes=int(cfg.max_body_mb * 1024 * 1024),
    )
    return GuardedDownloader(
        guard,
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=cfg.threads,
        save_caption=True,
        extract_exif=False,
        output_folder=str(work),
        column_list=["url", "caption"],
        timeout=cfg.timeout_s,
        number_sample_per_shard=samples_per_shard,
        oom_shard_count=oom_shard_count,
        compute_hash=cfg.compute_hash,
        verify_hash_type=None,
        encode_format=cfg.encode_format,
        retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=cfg.disallowed_header_directives or None,
    )


class GuardedDownloader(Downloader):
    """img2dataset's Downloader with mmpipe's guarded urllib opener in its process."""

    def __init__(self, guard: safe_http.FetchGuard, **kwargs):
        super().__init__(**kwargs)
        self.guard = guard

    def __call__(self, row):
        safe_http.install(self.guard)  # cheap; runs in the pool process, never in the caller
        return super().__call__(row)


class GuardedResizer(Resizer):
    """img2dataset's Resizer, refusing bombs and truncated files before the full decode.

    img2dataset decodes first and checks the area after, so a 20000x20000 PNG of a few KB costs
    1.2 GB per download thread. The image header tells the size without decoding.
    """

    def __call__(self, img_stream, blurring_bbox_list=None):
        problem = self.precheck(img_stream.getvalue())
        if problem is not None:
            return None, None, None, None, None, problem
        return super().__call__(img_stream, blurring_bbox_list)

    def precheck(self, data: bytes) -> str | None:
        truncated = _truncation(data)
        if truncated is not None:
            return truncated
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
        except Image.DecompressionBombError as err:
            return f"[decompression_bomb] {err}"
        except Exception:  # not something PIL reads: let img2dataset's decoder judge it
            return None
        if width * height > self.max_image_area:
            ratio = width * height / max(len(data), 1)
            label = "[decompression_bomb]" if ratio > 100 else "image area too large:"
            return f"{label} {width}x{height} pixels from {len(data)} bytes, over max_image_area"
        return None


def _truncation(data: bytes) -> str | None:
    """Files cut short: OpenCV would decode what is there and grey-fill the rest."""
    # 0xFFD9 cannot occur inside JPEG scan data (0xFF is byte-stuffed), so its absence near the
    # end means the file stops early; a little trailing padding after it is common and fine.
    if data.startswith(b"\xff\xd8\xff") and b"\xff\xd9" not in data[-256:]:
        return "[truncated] JPEG data ends before its end-of-image marker"
    if data.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" not in data[-64:]:
        return "[truncated] PNG data ends before its IEND chunk"
    return None
