"""The text-to-images job: checkpoints in, grid and report in the store, colour measured."""

import io
import json

import pytest
import torch
from PIL import Image

from training.generate import GenerateConfig, run_generation
from training.models.clip import create_clip
from training.models.dalle import Dalle, DalleConfig
from training.models.dvae import DVAE, DVAEConfig, save_dvae
from training.specs.dalle import save_dalle


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Freshly initialised exports, as `mmpipe train dvae|dalle|clip` write them."""
    folder = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    dvae = save_dvae(DVAE(DVAEConfig.named("dvae-tiny")), folder / "dvae.pt")
    dalle = save_dalle(
        Dalle(DalleConfig.named("dalle-tiny")), folder / "dalle.pt", f"file://{dvae}"
    )
    clip = folder / "open_clip_pytorch_model.bin"
    torch.save(create_clip("clip-tiny").model.state_dict(), clip)
    return {"dalle": f"file://{dalle}", "clip": str(clip)}


def config(local_store, checkpoints, **fields) -> GenerateConfig:
    base = {
        "name": "t",
        "dalle_checkpoint": checkpoints["dalle"],
        "clip_model": "clip-tiny",
        "clip_weights": checkpoints["clip"],
        "captions": ["a large red square"],
        "heldout": 3,
        "sampling": {"candidates": 4, "seed": 7, "top_k": 64},
        "store": {"url": local_store.root_uri},
    }
    return GenerateConfig.model_validate(base | fields)


def test_generates_reranks_measures_and_saves(local_store, checkpoints):
    seen = []
    report = run_generation(config(local_store, checkpoints), progress=lambda *a: seen.append(a))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]  # the given caption and 3 held-out ones
    assert report.results[0].caption == "a large red square"
    for r in report.results:
        assert r.clip_scores == sorted(r.clip_scores, reverse=True) and len(r.clip_scores) == 4
        assert r.colour is not None and len(r.colour_matches) == 4
    hits = [hit for r in report.results for hit in r.colour_matches]
    assert report.colour_match_all == sum(hits) / len(hits)
    tops = [r.colour_matches[0] for r in report.results]
    assert report.colour_match_top1 == sum(tops) / len(tops)

    saved = json.loads(local_store.get_bytes("samples/t/report.json"))
    assert saved == json.loads(report.model_dump_json())
    with Image.open(io.BytesIO(local_store.get_bytes("samples/t/grid.png"))) as grid:
        assert grid.size[0] > 4 * 96  # four candidates per row
    assert report.grid_uri == f"{local_store.root_uri}/samples/t/grid.png"


def test_same_seed_same_images_and_each_caption_draws_alone(local_store, checkpoints):
    cfg = config(local_store, checkpoints, heldout=0, captions=["a red star", "a blue star"])
    first, again = run_generation(cfg), run_generation(cfg)
    assert first.results == again.results
    # caption i samples with seed + i: it does not depend on the captions before it
    alone = config(local_store, checkpoints, heldout=0, captions=["a blue star"])
    alone = run_generation(
        alone.model_copy(update={"sampling": cfg.sampling.model_copy(update={"seed": 8})})
    )
    assert alone.results[0] == first.results[1]


def test_without_clip_the_sampling_order_is_kept(local_store, checkpoints):
    cfg = config(local_store, checkpoints, heldout=1, clip_model=None, clip_weights=None)
    report = run_generation(cfg)
    assert all(r.clip_scores is None for r in report.results)
    assert report.colour_match_top1 is None and report.colour_match_all is not None
    assert report.reranked_by is None


def test_config_needs_captions_and_both_clip_fields(checkpoints):
    with pytest.raises(ValueError, match="give captions"):
        GenerateConfig(name="t", dalle_checkpoint=checkpoints["dalle"])
    with pytest.raises(ValueError, match="go together"):
        GenerateConfig(name="t", dalle_checkpoint="x", captions=["a"], clip_model="clip-tiny")
