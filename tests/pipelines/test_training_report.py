"""A training run's curves as a PNG: loss and held-out metrics by step."""

import io

from PIL import Image

from pipelines.training_report import WIDTH, curves_png, eval_keys, loss_key


def rows(evals: bool = True) -> list[dict]:
    found = []
    for step in range(10, 110, 10):
        row = {"step": step, "train/contrastive": 5.0 / step, "train/total": 6.0 / step}
        if evals and step % 50 == 0:
            row |= {"eval/top1": step / 200, "eval/top5": step / 120}
        found.append(row)
    return found


def pixels_of(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.convert("RGB")


def test_the_png_has_a_loss_panel_and_a_held_out_panel_when_there_are_evals():
    assert loss_key(rows()) == "train/total" and eval_keys(rows()) == ["eval/top1", "eval/top5"]
    both, loss_only = pixels_of(curves_png(rows())), pixels_of(curves_png(rows(evals=False)))
    assert both.width == loss_only.width == WIDTH
    assert both.height == 2 * loss_only.height
    blue = (31, 119, 180)  # the first series' colour: the loss curve is drawn
    assert sum(1 for p in loss_only.get_flattened_data() if p == blue) > 100


def test_no_numbers_no_png():
    assert curves_png([{"step": 1, "lr": 0.1}]) is None
    assert loss_key([{"step": 1, "train/loss": 2.0}]) == "train/loss"
