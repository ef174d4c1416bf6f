"""Sampling: top-k / top-p, determinism, KV cache == full forward, CLIP re-ranking, grid PNG."""

import pytest
import torch
from PIL import Image

from training.models.clip import create_clip
from training.models.dalle import Dalle, DalleConfig
from training.models.dvae import DVAE, DVAEConfig, save_dvae
from training.sample import (
    Sampling,
    clip_scores,
    filter_logits,
    generate,
    load_pipeline,
    sample_codes,
    write_grid,
)
from training.specs.dalle import save_dalle


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return Dalle(DalleConfig.named("dalle-tiny")).eval(), DVAE(DVAEConfig.named("dvae-tiny"))


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log()
    assert filter_logits(logits, top_p=0.5).isfinite().tolist() == [[False, True, False, False]]
    assert filter_logits(logits, top_p=0.7).isfinite().tolist() == [[False, True, True, False]]
    assert filter_logits(logits, top_p=0.9).isfinite().tolist() == [[False, True, True, True]]
    assert filter_logits(logits, top_p=1.0).isfinite().all()


def test_sampling_is_deterministic_given_a_seed(models):
    dalle, _ = models
    text = torch.randint(0, 2048, (3, dalle.config.text_len))
    s = Sampling(top_k=64, temperature=0.9)

    def draw(seed):
        return sample_codes(dalle, text, s, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_cached_sampling_draws_what_the_full_forward_draws(models):
    dalle, _ = models
    model = Dalle(dalle.config).double().eval()  # same draws need the same logits to the bit
    text = torch.randint(0, 2048, (2, model.config.text_len))
    cached = sample_codes(model, text, Sampling(top_p=0.9), torch.Generator().manual_seed(3))
    plain = sample_codes(
        model, text, Sampling(top_p=0.9, use_cache=False), torch.Generator().manual_seed(3)
    )
    assert torch.equal(cached, plain)


def test_generate_reranks_by_clip_and_writes_a_grid(models, tmp_path):
    dalle, dvae = models
    clip = create_clip("clip-tiny")
    captions = ["a small red circle on a white background", "a large blue square"]
    results = generate(dalle, dvae, captions, Sampling(candidates=4, seed=5, top_k=100), clip)
    assert [r.caption for r in results] == captions
    for r in results:
        assert r.images.shape == (4, 3, 32, 32) and r.codes.shape == (4, 8, 8)
        assert torch.equal(r.clip_scores, r.clip_scores.sort(descending=True).values)
        torch.testing.assert_close(r.clip_scores, clip_scores(clip, r.images, r.caption))
        torch.testing.assert_close(r.images, dvae.decode(r.codes))
    again = generate(dalle, dvae, captions, Sampling(candidates=4, seed=5, top_k=100), clip)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(results, again, strict=True))

    path = write_grid(results, tmp_path / "grid.png", cell=64)
    with Image.open(path) as grid:
        assert grid.size[0] == 4 * (64 + 4) + 4 and grid.size[1] > 2 * 64


def test_pipeline_loads_from_exported_checkpoints(models, tmp_path):
    dalle, dvae = models
    dvae_path = save_dvae(dvae, tmp_path / "dvae.pt")
    dalle_path = save_dalle(dalle, tmp_path / "dalle.pt", f"file://{dvae_path}")
    loaded_dalle, loaded_dvae = load_pipeline(dalle_path)
    text = torch.randint(0, 2048, (1, dalle.config.text_len))
    s = Sampling()
    a = sample_codes(dalle, text, s, torch.Generator().manual_seed(0))
    b = sample_codes(loaded_dalle, text, s, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert torch.equal(loaded_dvae.decode(a.view(1, 8, 8)), dvae.decode(a.view(1, 8, 8)))
