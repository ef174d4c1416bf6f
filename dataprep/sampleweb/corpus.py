"""Deterministic captioned-image corpus ("sample web") with labelled faults.

Every sample is a single coloured shape (``SHAPES`` x ``COLOURS``) of a given ``SIZES`` at one of
nine ``POSITIONS`` on a plain neutral ``BACKGROUNDS`` colour, with a caption built from one of the
``CAPTION_TEMPLATES``.  A configurable fraction of the samples carries a fault (see ``FAULTS``):
HTTP errors, slow or stalling responses, broken or hostile image files, duplicates, bad captions
and redirects.  Ground-truth attributes always describe the *image*; for a ``mismatched_caption``
the caption describes another sample.

Everything is a pure function of ``(n, seed, fault_rates)``: the same arguments always give equal
specs and byte-identical payloads.  Images are rendered lazily by :func:`render_image`.
"""

from __future__ import annotations

import functools
import io
import math
import random
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import pyarrow as pa
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------------
# Attribute vocabulary
# --------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: tuple[str, ...] = ("small", "medium", "large")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "black", "beige")

#: Saturated shape colours (before a small per-sample jitter of at most ``COLOUR_JITTER``).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
}
#: Neutral background colours (before a jitter of at most ``BACKGROUND_JITTER``).
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "black": (12, 12, 12),
    "beige": (225, 212, 185),
}
COLOUR_JITTER = 12
BACKGROUND_JITTER = 5
#: Shape extent (bounding-circle diameter) as a fraction of the image's shorter side.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.25, "medium": 0.4, "large": 0.6}
#: Position -> (fx, fy) in [0, 1]; 0 = left/top edge (inside a margin), 1 = right/bottom edge.
POSITION_XY: dict[str, tuple[float, float]] = {
    "top left": (0.0, 0.0),
    "top": (0.5, 0.0),
    "top right": (1.0, 0.0),
    "left": (0.0, 0.5),
    "center": (0.5, 0.5),
    "right": (1.0, 0.5),
    "bottom left": (0.0, 1.0),
    "bottom": (0.5, 1.0),
    "bottom right": (1.0, 1.0),
}

#: Caption templates; every one uses all five fields.  The words in the templates themselves never
#: contain a shape or colour name (not even as a substring), so captions can be parsed by tokens.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} in the {position} on a {background} background",
    "{colour} {shape}, {size}, {position}, {background} backdrop",
    "a photo of a {size} {colour} {shape} at the {position} of a {background} canvas",
    "{background} background with a {size} {colour} {shape} ({position})",
    "an illustration of a {colour} {shape}: {size}, {position}, on {background}",
    "{size} {shape} in {colour}, placed {position} against a {background} background",
)

# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------

SLOW_DELAY_S = 1.0
DRIP_INTERVAL_S = 0.5
DRIP_MAX_S = 120.0
TINY_SIZE = (8, 8)
EXTREME_SIZES = {"wide": (600, 20), "tall": (20, 600)}
#: Declared size of the decompression bomb: 1.225e9 pixels, above both PIL's hard limit
#: (2 * Image.MAX_IMAGE_PIXELS ~ 3.6e8, raises DecompressionBombError on open) and OpenCV's
#: default CV_IO_MAX_IMAGE_PIXELS (2**30, imdecode refuses), so a naive crawler fails fast
#: instead of allocating gigabytes.  The file is a complete, valid 1-bit palette PNG (~150 KB).
BOMB_SIZE = (35000, 35000)
TRUNCATE_FRACTION = 0.4
NEAR_DUPLICATE_VARIANTS: tuple[str, ...] = ("requality", "resize", "crop")
FORBIDDEN_REDIRECT_VARIANTS: tuple[str, ...] = ("other_ip", "other_port", "decimal_ip")

FAULTS: dict[str, str] = {
    "http_404": "GET answers 404 Not Found (small text body).",
    "http_500": "GET answers 500 Internal Server Error (small text body).",
    "slow": (
        f"complete, valid image, but the response starts only after {SLOW_DELAY_S:g} s "
        "(spec.delay_s); a crawler with a reasonable timeout should fetch it fine."
    ),
    "slow_drip": (
        "200 with image/jpeg and the Content-Length of a full valid JPEG, then the body "
        f"trickles 1 byte every {DRIP_INTERVAL_S:g} s; after {DRIP_MAX_S:g} s the server closes "
        "the connection (body never completes).  Only a total deadline escapes it."
    ),
    "not_image": "200 with an HTML page served as text/html; charset=utf-8 (URL still ends .jpg).",
    "truncated_jpeg": (
        f"200 image/jpeg carrying the first {TRUNCATE_FRACTION:.0%} of a valid JPEG; the "
        "Content-Length is that of the truncated bytes.  PIL .load() raises OSError; "
        "cv2.imdecode (OpenCV 4.14) returns None."
    ),
    "corrupt_jpeg": (
        "200 image/jpeg: SOI + JFIF APP0 + DQT segments of a real JPEG, then garbage (no 0xFF "
        "bytes) instead of frame/scan data, then EOI.  PIL cannot identify it and "
        "cv2.imdecode returns None."
    ),
    "decompression_bomb": (
        f"200 image/png: valid 1-bit palette PNG declaring {BOMB_SIZE[0]}x{BOMB_SIZE[1]} pixels "
        "of one colour, ~150 KB on the wire.  PIL raises DecompressionBombError on open; "
        "cv2.imdecode refuses it (above 2**30 pixels)."
    ),
    "tiny_image": f"valid JPEG of only {TINY_SIZE[0]}x{TINY_SIZE[1]} pixels.",
    "extreme_aspect": "valid JPEG of 600x20 (variant 'wide') or 20x600 (variant 'tall').",
    "exact_duplicate": (
        "byte-identical image to the clean sample duplicate_of, under another URL; caption is "
        "either the same or another template of the same attributes."
    ),
    "near_duplicate": (
        "the same rendered picture as the clean sample duplicate_of, transformed per variant: "
        "'requality' (re-encoded at JPEG quality 35-60), 'resize' (scaled by 0.6-0.85), or "
        "'crop' (2-7% cropped off each side)."
    ),
    "mismatched_caption": (
        "caption copied verbatim from the clean sample mismatched_from, whose shape AND colour "
        "both differ from this image's."
    ),
    "empty_caption": 'valid image, caption is "".',
    "forbidden_redirect": (
        "302 to a loopback URL a crawler's URL policy must refuse, rotating variants: "
        "'other_ip' (http://127.0.0.2:PORT/...), 'other_port' (http://HOST:PORT+1/...), "
        "'decimal_ip' (http://2130706434:PORT/..., i.e. 127.0.0.2)."
    ),
    "redirect_ok": (
        "302 to http://HOST:PORT/content/KEY.jpg on the same server, which serves the valid "
        "image; a crawler should follow it and succeed."
    ),
}

#: Faults whose URL yields a valid, decodable image for a correct crawler.
FETCHABLE_FAULTS: frozenset[str | None] = frozenset(
    {
        None,
        "slow",
        "tiny_image",
        "extreme_aspect",
        "exact_duplicate",
        "near_duplicate",
        "mismatched_caption",
        "empty_caption",
        "redirect_ok",
    }
)
REDIRECT_FAULTS: frozenset[str] = frozenset({"redirect_ok", "forbidden_redirect"})

DEFAULT_FAULT_RATES: dict[str, float] = {
    "http_404": 0.0175,
    "http_500": 0.0175,
    "slow": 0.0175,
    "slow_drip": 0.0175,
    "not_image": 0.0175,
    "truncated_jpeg": 0.0175,
    "corrupt_jpeg": 0.0175,
    "decompression_bomb": 0.0175,
    "tiny_image": 0.0175,
    "extreme_aspect": 0.0175,
    "exact_duplicate": 0.025,
    "near_duplicate": 0.025,
    "mismatched_caption": 0.025,
    "empty_caption": 0.0175,
    "forbidden_redirect": 0.0175,
    "redirect_ok": 0.0175,
}

_DEPENDENT_FAULTS = ("exact_duplicate", "near_duplicate", "mismatched_caption")


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """One sample of the corpus.  Attributes describe what is drawn in the image."""

    key: str
    path: str
    caption: str
    shape: str
    colour: str
    size: str
    position: str
    background: str
    width: int  # served image width (declared width for the bomb)
    height: int
    fault: str | None = None
    duplicate_of: str | None = None
    mismatched_from: str | None = None
    #: near_duplicate: requality|resize|crop; forbidden_redirect: other_ip|other_port|decimal_ip;
    #: extreme_aspect: wide|tall; otherwise None.
    variant: str | None = None
    render_seed: int = 0
    jpeg_quality: int = 90
    #: size the scene is drawn at before a near-duplicate transform (== width/height otherwise)
    canvas_width: int = 0
    canvas_height: int = 0
    crop_box: tuple[int, int, int, int] | None = None  # near_duplicate 'crop', in canvas pixels
    delay_s: float = 0.0  # slow: delay before responding
    content_type: str = "image/jpeg"

    @property
    def fetchable(self) -> bool:
        """True when a correct crawler should end up with a valid image for this sample."""
        return self.fault in FETCHABLE_FAULTS


def make_caption(template: str, shape: str, colour: str, size: str, position: str, bg: str) -> str:
    return template.format(shape=shape, colour=colour, size=size, position=position, background=bg)


def _allocate(n: int, rates: Mapping[str, float]) -> dict[str, int]:
    """Exact per-fault counts (largest remainder), so the mix is exact rather than sampled."""
    total = min(n, round(n * sum(rates.values())))
    raw = {k: n * r for k, r in rates.items()}
    counts = {k: math.floor(v) for k, v in raw.items()}
    order = sorted(rates, key=lambda k: (-(raw[k] - counts[k]), list(rates).index(k)))
    i = 0
    while sum(counts.values()) < total and order:
        k = order[i % len(order)]
        if rates[k] > 0:
            counts[k] += 1
        i += 1
    while sum(counts.values()) > total:  # only when rounding of the total went down
        k = max(counts, key=lambda k: counts[k] - raw[k])
        counts[k] -= 1
    return counts


def _validate_rates(fault_rates: Mapping[str, float] | None) -> dict[str, float]:
    if fault_rates is None:
        return dict(DEFAULT_FAULT_RATES)
    unknown = set(fault_rates) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown fault kinds: {sorted(unknown)}; known: {list(FAULTS)}")
    rates = {k: float(fault_rates.get(k, 0.0)) for k in FAULTS}
    if any(r < 0 for r in rates.values()):
        raise ValueError("fault rates must be >= 0")
    if sum(rates.values()) > 1.0 + 1e-9:
        raise ValueError(f"fault rates sum to {sum(rates.values()):.4f} > 1")
    return rates


def generate_corpus(
    n: int, seed: int, fault_rates: Mapping[str, float] | None = None
) -> list[SampleSpec]:
    """``n`` sample specs, fully determined by ``(n, seed, fault_rates)``.

    ``fault_rates`` maps fault kind -> fraction of ``n`` (kinds left out get 0; ``None`` means
    ``DEFAULT_FAULT_RATES``, ~70% clean).  Counts are exact (largest-remainder rounding of
    ``n * rate``), positions are shuffled.  Duplicates and mismatched captions always refer to
    clean samples; if the corpus has no suitable clean sample they degrade to clean samples.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    rates = _validate_rates(fault_rates)
    rng = random.Random(f"sampleweb:{n}:{seed}")
    counts = _allocate(n, rates)
    faults: list[str | None] = [None] * (n - sum(counts.values()))
    for kind in FAULTS:
        faults.extend([kind] * counts[kind])
    rng.shuffle(faults)

    specs: list[SampleSpec] = []
    rotation: dict[str, int] = {}
    for i, fault in enumerate(faults):
        key = f"s{i:06d}"
        shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
        size, position, bg = rng.choice(SIZES), rng.choice(POSITIONS), rng.choice(BACKGROUNDS)
        width, height = rng.randint(96, 256), rng.randint(96, 256)
        template = rng.choice(CAPTION_TEMPLATES)
        render_seed = rng.getrandbits(32)
        quality = rng.randint(80, 95)
        caption = make_caption(template, shape, colour, size, position, bg)
        variant = None
        delay = 0.0
        ext, ctype = ".jpg", "image/jpeg"
        if fault in ("extreme_aspect", "forbidden_redirect"):
            variants = (
                tuple(EXTREME_SIZES) if fault == "extreme_aspect" else FORBIDDEN_REDIRECT_VARIANTS
            )
            variant = variants[rotation.get(fault, 0) % len(variants)]
            rotation[fault] = rotation.get(fault, 0) + 1
        if fault == "tiny_image":
            width, height = TINY_SIZE
        elif fault == "extreme_aspect":
            width, height = EXTREME_SIZES[variant]
        elif fault == "decompression_bomb":
            width, height = BOMB_SIZE
            ext, ctype = ".png", "image/png"
        elif fault == "slow":
            delay = SLOW_DELAY_S
        elif fault == "not_image":
            ctype = "text/html; charset=utf-8"
        elif fault == "empty_caption":
            caption = ""
        specs.append(
            SampleSpec(
                key=key,
                path=f"/img/{key}{ext}",
                caption=caption,
                shape=shape,
                colour=colour,
                size=size,
                position=position,
                background=bg,
                width=width,
                height=height,
                fault=fault,
                variant=variant,
                render_seed=render_seed,
                jpeg_quality=quality,
                canvas_width=width,
                canvas_height=height,
                delay_s=delay,
                content_type=ctype,
            )
        )

    # Second pass: samples that refer to clean originals.
    clean = [s for s in specs if s.fault is None]
    dependent = [i for i, s in enumerate(specs) if s.fault in _DEPENDENT_FAULTS]
    dup_idx = [i for i in dependent if specs[i].fault != "mismatched_caption"]
    if clean and dup_idx:
        originals = (
            rng.sample(clean, len(dup_idx))
            if len(clean) >= len(dup_idx)
            else [rng.choice(clean) for _ in dup_idx]
        )
    else:
        originals = []
    orig_iter = iter(originals)
    near_count = 0
    for i in dependent:
        s = specs[i]
        if s.fault == "mismatched_caption":
            donors = [c for c in clean if c.shape != s.shape and c.colour != s.colour]
            if not donors:
                specs[i] = replace(s, fault=None)
                continue
            donor = rng.choice(donors)
            specs[i] = replace(s, caption=donor.caption, mismatched_from=donor.key)
            continue
        if not clean:
            specs[i] = replace(s, fault=None)
            continue
        o = next(orig_iter)
        template = rng.choice(CAPTION_TEMPLATES)
        caption = make_caption(template, o.shape, o.colour, o.size, o.position, o.background)
        common = dict(
            shape=o.shape,
            colour=o.colour,
            size=o.size,
            position=o.position,
            background=o.background,
            render_seed=o.render_seed,
            canvas_width=o.width,
            canvas_height=o.height,
            duplicate_of=o.key,
        )
        if s.fault == "exact_duplicate":
            specs[i] = replace(
                s,
                caption=o.caption if rng.random() < 0.5 else caption,
                width=o.width,
                height=o.height,
                jpeg_quality=o.jpeg_quality,
                **common,
            )
            continue
        variant = NEAR_DUPLICATE_VARIANTS[near_count % len(NEAR_DUPLICATE_VARIANTS)]
        near_count += 1
        w, h, q, box = o.width, o.height, o.jpeg_quality, None
        if variant == "requality":
            q = rng.randint(35, 60)
        elif variant == "resize":
            scale = rng.uniform(0.6, 0.85)
            w, h = max(1, round(o.width * scale)), max(1, round(o.height * scale))
        else:  # crop
            fr = [rng.uniform(0.02, 0.07) for _ in range(4)]
            box = (
                round(o.width * fr[0]),
                round(o.height * fr[1]),
                o.width - round(o.width * fr[2]),
                o.height - round(o.height * fr[3]),
            )
            w, h = box[2] - box[0], box[3] - box[1]
        specs[i] = replace(
            s,
            caption=caption,
            width=w,
            height=h,
            jpeg_quality=q,
            variant=variant,
            crop_box=box,
            **common,
        )
    return specs


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _jitter(rgb: tuple[int, int, int], amount: int, rng: random.Random) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple]:
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.42 * r) for k in range(10)]
    else:
        raise ValueError(shape)
    return [(cx + rr * math.cos(a + rot), cy + rr * math.sin(a + rot)) for a, rr in pts]


def render_scene(
    shape: str,
    colour: str,
    size: str,
    position: str,
    background: str,
    width: int,
    height: int,
    seed: int,
) -> Image.Image:
    """The RGB picture for the given attributes (anti-aliased by supersampling)."""
    rng = random.Random(seed)
    ss = 4 if min(width, height) < 64 else 2
    cw, ch = width * ss, height * ss
    bg = _jitter(BACKGROUND_RGB[background], BACKGROUND_JITTER, rng)
    fg = _jitter(COLOUR_RGB[colour], COLOUR_JITTER, rng)
    img = Image.new("RGB", (cw, ch), bg)
    draw = ImageDraw.Draw(img)
    short = min(cw, ch)
    r = SIZE_FRACTIONS[size] * short / 2
    pad = 0.05 * short
    fx, fy = POSITION_XY[position]
    jx, jy = rng.uniform(-0.02, 0.02) * short, rng.uniform(-0.02, 0.02) * short
    cx = r + pad + fx * (cw - 2 * (r + pad)) + jx
    cy = r + pad + fy * (ch - 2 * (r + pad)) + jy
    rot = math.radians(rng.uniform(-20, 20))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, rot), fill=fg)
    return img.reduce(ss)


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _picture(spec: SampleSpec) -> Image.Image:
    img = render_scene(
        spec.shape,
        spec.colour,
        spec.size,
        spec.position,
        spec.background,
        spec.canvas_width or spec.width,
        spec.canvas_height or spec.height,
        spec.render_seed,
    )
    if spec.crop_box is not None:
        img = img.crop(spec.crop_box)
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.LANCZOS)
    return img


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=4)
def _bomb_idat(width: int, height: int) -> tuple[bytes, ...]:
    """IDAT chunks of a 1-bit image, all palette index 0 except a 4-row band of index 1.

    Compressed row batch by row batch, so memory stays at a few MB whatever the size.
    """
    rowbytes = (width + 7) // 8
    plain = b"\x00" + b"\x00" * rowbytes  # filter byte 0 + row
    band = b"\x00" + b"\xff" * rowbytes
    band_rows = range(height // 2, height // 2 + 4)
    comp = zlib.compressobj(9)
    parts: list[bytes] = []
    batch = 1024
    for y in range(0, height, batch):
        rows = range(y, min(height, y + batch))
        if band_rows.start < rows.stop and rows.start < band_rows.stop:
            parts.append(comp.compress(b"".join(band if r in band_rows else plain for r in rows)))
        else:
            parts.append(comp.compress(plain * len(rows)))
    parts.append(comp.flush())
    idat = b"".join(parts)
    step = 1 << 16
    return tuple(_png_chunk(b"IDAT", idat[k : k + step]) for k in range(0, len(idat), step))


def bomb_png(width: int, height: int, bg: tuple[int, ...], fg: tuple[int, ...]) -> bytes:
    """A complete, valid 1-bit palette PNG of ``width`` x ``height`` pixels, almost all ``bg``.

    The compressed pixel data depends on the size only and is cached, so building one for another
    pair of colours costs nothing.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)  # bit depth 1, palette
    head = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"PLTE", bytes(bg) + bytes(fg))
    return (
        b"\x89PNG\r\n\x1a\n" + head + b"".join(_bomb_idat(width, height)) + _png_chunk(b"IEND", b"")
    )


def _corrupt(jpeg: bytes, seed: int) -> bytes:
    """Keep SOI and the APP0/DQT segments, replace everything after with 0xFF-free garbage."""
    pos = 2
    while pos + 4 <= len(jpeg) and jpeg[pos] == 0xFF and jpeg[pos + 1] in (0xE0, 0xDB):
        pos += 2 + struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
    rng = random.Random(seed)
    garbage = bytes(rng.randrange(0, 255) for _ in range(max(64, len(jpeg) - pos - 2)))
    return jpeg[:pos] + garbage + b"\xff\xd9"


def not_image_html(spec: SampleSpec) -> bytes:
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Image gallery</title></head>'
        f"<body><h1>Gallery</h1><p>The picture {spec.key} moved; this is an HTML page, "
        "not an image.</p></body></html>\n"
    ).encode()


@functools.lru_cache(maxsize=8192)
def render_image(spec: SampleSpec) -> bytes:
    """The 200-response payload bytes for ``spec`` (deterministic).

    JPEG for most specs; the PNG bomb for ``decompression_bomb``; the HTML page for ``not_image``;
    truncated / corrupted JPEG bytes for those faults.  For ``http_404`` / ``http_500`` it is the
    image that would have been there (never served); for redirects it is the redirect target's
    image; for ``slow`` / ``slow_drip`` the full image.
    """
    if spec.fault == "decompression_bomb":
        rng = random.Random(spec.render_seed)
        bg = _jitter(BACKGROUND_RGB[spec.background], BACKGROUND_JITTER, rng)
        fg = _jitter(COLOUR_RGB[spec.colour], COLOUR_JITTER, rng)
        return bomb_png(spec.width, spec.height, bg, fg)
    if spec.fault == "not_image":
        return not_image_html(spec)
    data = _encode_jpeg(_picture(spec), spec.jpeg_quality)
    if spec.fault == "truncated_jpeg":
        return data[: int(len(data) * TRUNCATE_FRACTION)]
    if spec.fault == "corrupt_jpeg":
        return _corrupt(data, spec.render_seed)
    return data


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------

GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),
        ("caption", pa.string()),
        ("shape", pa.string()),
        ("colour", pa.string()),
        ("size", pa.string()),
        ("position", pa.string()),
        ("background", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fault", pa.string()),
        ("variant", pa.string()),
        ("duplicate_of", pa.string()),
        ("mismatched_from", pa.string()),
        ("fetchable", pa.bool_()),
    ]
)


def ground_truth_table(specs: Sequence[SampleSpec]) -> pa.Table:
    """One row per spec with its labels (``fault`` null = clean; ``fetchable`` = a correct
    crawler ends with a valid image)."""
    cols: dict[str, list] = {f.name: [] for f in GROUND_TRUTH_SCHEMA}
    for s in specs:
        for name in cols:
            cols[name].append(getattr(s, name))
    return pa.table(cols, schema=GROUND_TRUTH_SCHEMA)
