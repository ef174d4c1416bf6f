"""Does a generated image show the colour its caption names? Pixel statistics, no model.

Sample-web pictures are one saturated shape (red, green, blue or yellow) on a neutral
background (white, gray, black or beige). A pixel is *chromatic* when its chroma (max - min
channel) is at least ``MIN_CHROMA``: every background colour stays below 60 even with its
jitter, every shape colour is above 130. Each chromatic pixel votes for the shape colour nearest
in hue; the image's dominant colour is the one with most votes, or None when fewer than
``MIN_PIXELS`` pixels are chromatic (a blank or washed-out image shows no colour).

    colour_matches(images, "a small red circle")   # [True, False, ...] per image
"""

from __future__ import annotations

import re

import torch

from dataprep.sampleweb.corpus import COLOUR_RGB, COLOURS

MIN_CHROMA = 80 / 255
MIN_PIXELS = 4
_WORD = re.compile(r"[a-z]+")


def hue_degrees(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in [0, 360) of RGB values [..., 3] in [0, 1] (HSV's hexcone hue)."""
    r, g, b = rgb.unbind(-1)
    high, low = rgb.max(-1).values, rgb.min(-1).values
    chroma = (high - low).clamp_min(1e-6)
    hue = torch.where(
        high == r,
        ((g - b) / chroma) % 6,
        torch.where(high == g, (b - r) / chroma + 2, (r - g) / chroma + 4),
    )
    return hue * 60


def _reference_hues() -> torch.Tensor:
    rgb = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float32) / 255
    return hue_degrees(rgb)


def dominant_colour(image: torch.Tensor) -> str | None:
    """The shape colour most chromatic pixels of ``image`` [3, H, W] in [0, 1] are nearest
    to in hue, or None if the image has fewer than MIN_PIXELS chromatic pixels."""
    pixels = image.float().clamp(0, 1).flatten(1).T  # [H*W, 3]
    chroma = pixels.max(-1).values - pixels.min(-1).values
    chromatic = pixels[chroma >= MIN_CHROMA]
    if chromatic.shape[0] < MIN_PIXELS:
        return None
    distance = (hue_degrees(chromatic)[:, None] - _reference_hues()[None, :]).abs()
    distance = torch.minimum(distance, 360 - distance)  # hue is an angle
    votes = torch.bincount(distance.argmin(-1), minlength=len(COLOURS))
    return COLOURS[int(votes.argmax())]


def named_colour(caption: str) -> str | None:
    """The one shape colour a caption names, or None if it names none or several."""
    named = {word for word in _WORD.findall(caption.lower()) if word in COLOURS}
    return named.pop() if len(named) == 1 else None


def colour_matches(images: torch.Tensor, caption: str) -> list[bool]:
    """For each image [n, 3, H, W]: is its dominant colour the one ``caption`` names?"""
    wanted = named_colour(caption)
    if wanted is None:
        raise ValueError(f"caption names no single shape colour: {caption!r}")
    return [dominant_colour(image) == wanted for image in images]
