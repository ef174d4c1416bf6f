"""Colour fidelity by pixel statistics: sample-web renders show their own colour."""

import itertools

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from dataprep.sampleweb.corpus import BACKGROUNDS, COLOURS, SHAPES, SIZES, render_scene
from training.colour_match import colour_matches, dominant_colour, hue_degrees, named_colour


def render(shape, colour, size, background, px=32, seed=0) -> torch.Tensor:
    image = render_scene(shape, colour, size, "center", background, px, px, seed)
    return pil_to_tensor(image).float() / 255


@pytest.mark.parametrize("colour,background", list(itertools.product(COLOURS, BACKGROUNDS)))
def test_every_render_shows_its_colour_on_every_background(colour, background):
    for seed, (shape, size) in enumerate(itertools.product(SHAPES, SIZES)):
        assert dominant_colour(render(shape, colour, size, background, seed=seed)) == colour


def test_plain_backgrounds_show_no_colour():
    for background in BACKGROUNDS:
        image = render("circle", "red", "small", background)
        plain = image[:, :2, :2].repeat(1, 16, 16)  # a corner, tiled: background only
        assert dominant_colour(plain) is None


def test_the_majority_of_chromatic_pixels_wins():
    image = render("square", "blue", "large", "white")
    image[:, :6, :] = torch.tensor([0.86, 0.12, 0.12])[:, None, None]  # a red band: fewer pixels
    assert dominant_colour(image) == "blue"
    image[:, :20, :] = torch.tensor([0.86, 0.12, 0.12])[:, None, None]
    assert dominant_colour(image) == "red"


def test_hue_of_primaries():
    rgb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    torch.testing.assert_close(hue_degrees(rgb), torch.tensor([0.0, 120.0, 240.0, 60.0]))


def test_captions_name_one_colour():
    assert named_colour("A small Red circle at the top left on a white background") == "red"
    assert named_colour("a shape") is None
    assert named_colour("red and blue") is None
    images = torch.stack(
        [render("star", "green", "large", "black"), render("star", "red", "large", "black")]
    )
    assert colour_matches(images, "a large green star") == [True, False]
    with pytest.raises(ValueError, match="names no single shape colour"):
        colour_matches(images, "a star")
