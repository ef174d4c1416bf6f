"""Pictures of a dataset build for Prefect artifacts: a CLIP-score histogram and a grid of example
kept and dropped images with their reasons. PNGs drawn with PIL (no plotting library needed).

Prefect artifacts hold text, so each PNG is written to the store and shown in a markdown
artifact as a base64 ``data:`` URI (the Prefect UI renders those), with the store URI beside it.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict

import numpy as np
from PIL import Image, ImageDraw

from dataprep.dedup import STAGE as DEDUP
from dataprep.embed import EMBED, SCORE
from dataprep.filters import STAGE as FILTER
from dataprep.stages import KEPT, StageSummary, Staging

WIDTH, HEIGHT, MARGIN = 640, 320, 40


def score_histogram(scores: np.ndarray, threshold: float, bins: int = 40) -> bytes:
    """PNG: histogram of CLIP scores, kept (right of the threshold) in green, dropped in red."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    lo, hi = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
    lo, hi = min(lo, threshold) - 0.01, max(hi, threshold) + 0.01
    counts, edges = np.histogram(scores, bins=bins, range=(lo, hi))
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN
    top = max(1, counts.max())

    def x_of(value: float) -> float:
        return MARGIN + (value - lo) / (hi - lo) * plot_w

    for count, left, right in zip(counts, edges[:-1], edges[1:], strict=True):
        height = count / top * plot_h
        colour = (60, 160, 80) if left >= threshold else (200, 70, 60)
        draw.rectangle(
            (x_of(left), HEIGHT - MARGIN - height, x_of(right) - 1, HEIGHT - MARGIN), fill=colour
        )
    draw.line((MARGIN, HEIGHT - MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN), fill="black")
    draw.line((x_of(threshold), MARGIN, x_of(threshold), HEIGHT - MARGIN), fill="black", width=2)
    draw.text((x_of(threshold) + 4, MARGIN), f"threshold {threshold:.3f}", fill="black")
    draw.text((MARGIN, HEIGHT - MARGIN + 6), f"{lo:.2f}", fill="black")
    draw.text((WIDTH - MARGIN - 30, HEIGHT - MARGIN + 6), f"{hi:.2f}", fill="black")
    draw.text((MARGIN, 10), f"CLIP score of {len(scores)} pairs (max bin {top})", fill="black")
    return _png(image)


def outcomes(staging: Staging, shards: list[int]) -> dict[str, str]:
    """key -> final outcome ("kept" or "stage: reason[ of KEY]") for every filtered sample."""
    result: dict[str, str] = {}
    for stage in (FILTER, SCORE, DEDUP):
        for shard in shards:
            table = staging.table(stage, shard).to_pylist()
            for row in table:
                if row["reason"] != KEPT:
                    of = f" of {row['duplicate_of']}" if row.get("duplicate_of") else ""
                    result[row["key"]] = f"{stage}: {row['reason']}{of}"
                elif stage == DEDUP:
                    result[row["key"]] = KEPT
    return result


def pick_examples(outcome: dict[str, str], per_reason: int = 3, kept: int = 6) -> list[str]:
    """A few keys per outcome, kept first, in key order (deterministic)."""
    by_outcome: dict[str, list[str]] = defaultdict(list)
    for key in sorted(outcome):
        label = outcome[key].split(" of ")[0]
        limit = kept if label == KEPT else per_reason
        if len(by_outcome[label]) < limit:
            by_outcome[label].append(key)
    return by_outcome.pop(KEPT, []) + [k for label in sorted(by_outcome) for k in by_outcome[label]]


def example_grid(staging: Staging, shards: list[int], columns: int = 6, tile: int = 96) -> bytes:
    """PNG: example kept and dropped images, each with its outcome and caption start."""
    outcome = outcomes(staging, shards)
    wanted = set(pick_examples(outcome))
    images: dict[str, tuple[Image.Image, str]] = {}
    for shard in shards:
        if len(images) == len(wanted):
            break
        for key, files in staging.samples(shard):
            if key in wanted:
                data = files.get("jpg") or files.get("png") or files.get("webp")
                picture = Image.open(io.BytesIO(data)).convert("RGB")
                images[key] = (picture, files.get("txt", b"").decode(errors="replace"))
    order = [k for k in pick_examples(outcome) if k in images]
    rows = max(1, -(-len(order) // columns))
    cell_w, cell_h = tile + 110, tile + 44
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, key in enumerate(order):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        picture, caption = images[key]
        grid.paste(picture.resize((tile, tile)), (x, y))
        label = outcome[key]
        colour = (30, 120, 40) if label == KEPT else (180, 30, 30)
        draw.text((x, y + tile + 2), label[:34], fill=colour)
        draw.text((x, y + tile + 16), (caption or '""')[:34], fill="black")
    return _png(grid)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def png_markdown(title: str, png: bytes, uri: str) -> str:
    data = base64.b64encode(png).decode()
    return f"## {title}\n\n![{title}](data:image/png;base64,{data})\n\nPNG: `{uri}`\n"


def summary_rows(summary: StageSummary) -> list[dict]:
    """Table artifact rows: kept first, then drop reasons by count."""
    rows = [
        {
            "stage": summary.stage,
            "outcome": "kept" if reason == KEPT else "dropped",
            "reason": reason,
            "count": count,
            "share": f"{100.0 * count / max(summary.count, 1):.1f}%",
        }
        for reason, count in summary.by_reason.items()
    ]
    return sorted(rows, key=lambda r: (r["outcome"] != "kept", -r["count"], r["reason"]))


def all_scores(staging: Staging, shards: list[int]) -> np.ndarray:
    tables = [staging.table(EMBED, s)["clip_score"].to_numpy() for s in shards]
    return np.concatenate(tables) if tables else np.zeros(0)


def manifest_markdown(manifest, uri: str) -> str:
    """The published version: where, how much, and what each stage kept."""
    lines = [
        f"# Dataset `{manifest.name}@{manifest.version}`",
        "",
        f"- manifest: `{uri}`",
        f"- samples: **{manifest.samples}** in {len(manifest.shards)} shards, "
        f"{manifest.bytes / 1e6:.1f} MB",
        f"- scorer: `{manifest.scorer.model}` sha256 {manifest.scorer.sha256[:12]}, "
        f"threshold {manifest.scorer.threshold:.4f}",
        "",
        "| stage | input | kept | dropped by reason |",
        "|---|---:|---:|---|",
    ]
    for stage, summary in manifest.stages.items():
        drops = ", ".join(f"{r} {n}" for r, n in summary.by_reason.items() if r != KEPT)
        lines.append(f"| {stage} | {summary.count} | {summary.kept} | {drops or '-'} |")
    return "\n".join(lines) + "\n"
