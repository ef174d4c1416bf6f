"""Perceptual hash (pHash) of an image: 64 bits that change little when an image is re-encoded,
resized or slightly cropped, compared by Hamming distance.

The classic DCT hash (as the ``imagehash`` package computes it): greyscale, resize to 32x32, 2-D
DCT-II, keep the 8x8 lowest frequencies, one bit per coefficient: above their median or not.
numpy only: the DCT is two products with a fixed 32x32 matrix.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

HASH_SIZE = 8  # bits per side: 64-bit hashes
HIGHFREQ_FACTOR = 4  # image side = HASH_SIZE * factor


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix [n, n]: ``D @ x`` transforms the columns of x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def phash(image: Image.Image) -> int:
    """64-bit pHash as an unsigned int."""
    side = HASH_SIZE * HIGHFREQ_FACTOR
    grey = np.asarray(image.convert("L").resize((side, side), Image.Resampling.LANCZOS), float)
    d = _dct_matrix(side)
    low = (d @ grey @ d.T)[:HASH_SIZE, :HASH_SIZE]  # [8, 8]
    bits = (low > np.median(low)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def to_signed(h: int) -> int:
    """Stored as int64 (parquet has no uint64 everywhere): same 64 bits."""
    return h - (1 << 64) if h >= 1 << 63 else h


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of int64/uint64 hash arrays (broadcasting)."""
    x = np.bitwise_xor(a.astype(np.uint64), b.astype(np.uint64))
    return np.bitwise_count(x).astype(np.int64)


def _bin_centre(code: int) -> np.ndarray:
    return np.array([(code >> 10) * 8 + 4, ((code >> 5) & 31) * 8 + 4, (code & 31) * 8 + 4])


def _refined(px: np.ndarray, centre: np.ndarray, radius: int) -> np.ndarray:
    """Mean of the pixels within ``radius`` levels of ``centre``: robust to JPEG noise."""
    return px[np.abs(px - centre).max(1) <= radius].mean(0)


def content_box(
    size: tuple[int, int], original: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """The part of a crawled image that holds the picture, or None if it was not padded.

    img2dataset's ``border`` mode scales the longest side to the (square) image size and pads
    the rest with white, centred. The padding depends on the aspect ratio, so a cropped copy is
    framed differently from its original; hashing the content alone compares like with like.
    Padded sides lose one more pixel: JPEG blurs the seam.
    """
    (width, height), (ow, oh) = size, original
    if width != height or ow <= 0 or oh <= 0 or ow == oh:
        return None
    scale = width / max(ow, oh)
    w, h = round(ow * scale), round(oh * scale)
    if min(w, h) < 4 or (w, h) == (width, height):
        return None
    left, top = (width - w) // 2, (height - h) // 2
    inset_x, inset_y = int(w < width), int(h < height)
    return (left + inset_x, top + inset_y, left + w - inset_x, top + h - inset_y)


def colour_signature(image: Image.Image, distinct: int = 64) -> list[float]:
    """[background r, g, b, foreground r, g, b]: the most frequent colour, and the median of the
    farther half of the pixels more than ``distinct`` levels from it; NaN if there are none.

    pHash hashes luma only, so two pictures of the same layout in other colours collide. The
    exact colours of a picture survive re-encoding, resizing and cropping, and differ between
    two renders of the same scene, so they separate near duplicates from look-alikes. The
    foreground is an upper-half median, not a mean: anti-aliased edges blend it with the
    background, and small shapes are mostly edge.
    """
    px = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.int16)  # [P, 3]
    codes = (px[:, 0] >> 3) * 1024 + (px[:, 1] >> 3) * 32 + (px[:, 2] >> 3)  # 8-level bins
    values, counts = np.unique(codes, return_counts=True)
    background = _refined(px, _bin_centre(int(values[np.argmax(counts)])), 8)
    distance = np.abs(px - background).max(1)
    far = distance > distinct
    if far.sum() < 3:
        return [round(float(c), 2) for c in background] + [float("nan")] * 3
    outer = px[far][distance[far] >= np.median(distance[far])]
    foreground = np.median(outer, axis=0)
    return [round(float(c), 2) for c in (*background, *foreground)]


def colour_distance(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    """Largest per-channel difference of two colour signatures (levels); infinite when only one
    of them has a foreground colour."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) != 6 or len(b) != 6:
        return float("inf")
    a_fg, b_fg = ~np.isnan(a[3:]).any(), ~np.isnan(b[3:]).any()
    if a_fg != b_fg:
        return float("inf")
    return float(np.abs(a - b).max() if a_fg else np.abs(a[:3] - b[:3]).max())
