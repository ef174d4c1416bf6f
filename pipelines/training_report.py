"""A training run's curves as a PNG: the loss by step, and the held-out metrics by step.

Drawn with PIL like the build report (no plotting library); the flow stores the PNG beside the
run's metrics and shows it in a markdown artifact.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

WIDTH, PANEL_H, MARGIN = 640, 240, 44
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


def loss_key(rows: list[dict]) -> str | None:
    """The run's total training loss: `train/total`, else its first `train/` number."""
    keys = [k for row in rows for k in row if k.startswith("train/")]
    return "train/total" if "train/total" in keys else (keys[0] if keys else None)


def eval_keys(rows: list[dict]) -> list[str]:
    return sorted({k for row in rows for k in row if k.startswith("eval/")})


def _series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(row["step"], float(row[key])) for row in rows if isinstance(row.get(key), int | float)]


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, lines: dict, steps: float) -> None:
    """Axes from step 0 to `steps`, min/max labels, a legend and one polyline (a dot per
    point) per series."""
    values = [v for series in lines.values() for _, v in series]
    y_lo, y_hi = min(values), max(values)
    y_hi = y_hi if y_hi > y_lo else y_lo + 1e-6
    plot_top = top + 22 + 12 * ((len(lines) + 2) // 3)  # below the title and the legend
    left, right, bottom = MARGIN, WIDTH - MARGIN, top + PANEL_H - 20

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + step / steps * (right - left)
        return x, bottom - (value - y_lo) / (y_hi - y_lo) * (bottom - plot_top)

    draw.text((left, top + 6), title, fill="black")
    draw.line((left, bottom, right, bottom), fill="black")
    draw.line((left, plot_top, left, bottom), fill="black")
    draw.text((4, plot_top - 6), f"{y_hi:.3g}", fill="black")
    draw.text((4, bottom - 6), f"{y_lo:.3g}", fill="black")
    draw.text((right - 60, bottom + 4), f"step {steps:g}", fill="black")
    for i, (name, series) in enumerate(lines.items()):
        colour = COLOURS[i % len(COLOURS)]
        xys = [xy(*p) for p in series]
        if len(xys) > 1:
            draw.line(xys, fill=colour, width=2)
        for x, y in xys:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((left + 180 + 140 * (i % 3), top + 6 + 12 * (i // 3)), name, fill=colour)


def curves_png(rows: list[dict]) -> bytes | None:
    """PNG of the loss curve and (when there are any) the held-out metric curves."""
    panels = {}
    if (key := loss_key(rows)) and (series := _series(rows, key)):
        panels[f"training loss ({key})"] = {key: series}
    evals = {k.removeprefix("eval/"): _series(rows, k) for k in eval_keys(rows)}
    if evals := {k: v for k, v in evals.items() if v}:
        panels["held-out metrics"] = evals
    if not panels:
        return None
    image = Image.new("RGB", (WIDTH, PANEL_H * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    steps = max(max(row["step"] for row in rows), 1)
    for i, (title, lines) in enumerate(panels.items()):
        _panel(draw, i * PANEL_H, title, lines, steps)
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()
