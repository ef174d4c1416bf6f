"""Why each crawled sample was kept or dropped, and per-shard counts that add up.

img2dataset records a status (`success`, `failed_to_download`, `failed_to_resize`) and a raw
error string per sample. mmpipe adds a stable `reason` label derived from them, so counts can be
grouped, alerted on and compared across builds.
"""

from __future__ import annotations

import re
from collections import Counter

from pydantic import BaseModel

KEPT = "success"

# First match wins. mmpipe's own errors carry a [tag]; the rest are urllib/img2dataset wording.
_DOWNLOAD_REASONS: list[tuple[str, str]] = [
    (r"\[url_policy\]", "url_policy"),
    (r"\[deadline\]", "deadline_exceeded"),
    (r"\[too_large\]", "too_large"),
    (r"\[too_many_redirects\]", "too_many_redirects"),
    (r"\[incomplete_body\]", "incomplete_body"),
    (r"\[encoding_error\]", "encoding_error"),
    (r"\[invalid_url\]", "invalid_url"),
    (r"HTTP Error (\d{3})", r"http_\1"),
    (r"X-Robots-Tag", "opted_out"),
    (r"hash mismatch", "hash_mismatch"),
    (r"unknown url type|no host given|Invalid URL|URL can't contain", "invalid_url"),
    (r"cannot resolve|Name or service not known|Temporary failure in name resolution", "dns_error"),
    (r"CERTIFICATE_VERIFY_FAILED|SSL|TLS", "tls_error"),
    (r"timed out", "timeout"),
    (r"Connection refused", "connection_refused"),
    (r"IncompleteRead", "incomplete_body"),
    (r"Remote end closed|Connection reset|Connection aborted", "connection_error"),
]
_RESIZE_REASONS: list[tuple[str, str]] = [
    (r"\[decompression_bomb\]", "decompression_bomb"),
    (r"\[truncated\]", "truncated_image"),
    (r"Image decoding error", "decode_error"),
    (r"image too small", "image_too_small"),
    (r"image area too large", "image_too_large"),
    (r"aspect ratio too large", "aspect_ratio"),
]
MISSING = "missing_from_output"  # img2dataset lost the sample (an internal error); never silent


def reason_for(status: str | None, error_message: str | None) -> str:
    """A short, stable label for one sample's outcome."""
    if status == KEPT:
        return KEPT
    if status in (None, MISSING):
        return MISSING
    message = error_message or ""
    table, fallback = (
        (_RESIZE_REASONS, "resize_error")
        if status == "failed_to_resize"
        else (_DOWNLOAD_REASONS, "download_error")
    )
    for pattern, label in table:
        match = re.search(pattern, message)
        if match:
            return match.expand(label)
    return fallback


class ShardStats(BaseModel):
    """What happened to every input row of one crawl shard. Written last: the commit marker."""

    shard: int
    count: int  # input rows
    kept: int
    by_status: dict[str, int]
    by_reason: dict[str, int]
    duration_s: float
    tar_bytes: int
    node: str | None = None  # the Ray node that crawled it

    def check(self) -> None:
        """Counts must add up to the input: nothing silently lost or duplicated."""
        for name, counts in (("status", self.by_status), ("reason", self.by_reason)):
            if sum(counts.values()) != self.count:
                raise AssertionError(
                    f"shard {self.shard}: {name} counts sum to {sum(counts.values())}, "
                    f"expected {self.count}"
                )


class CrawlSummary(BaseModel):
    shards: int
    count: int
    kept: int
    by_status: dict[str, int]
    by_reason: dict[str, int]
    duration_s: float  # sum over shards (work time, not wall time)
    tar_bytes: int

    @classmethod
    def of(cls, stats: list[ShardStats]) -> CrawlSummary:
        by_status: Counter[str] = Counter()
        by_reason: Counter[str] = Counter()
        for s in stats:
            by_status.update(s.by_status)
            by_reason.update(s.by_reason)
        return cls(
            shards=len(stats),
            count=sum(s.count for s in stats),
            kept=sum(s.kept for s in stats),
            by_status=dict(by_status.most_common()),
            by_reason=dict(by_reason.most_common()),
            duration_s=sum(s.duration_s for s in stats),
            tar_bytes=sum(s.tar_bytes for s in stats),
        )
