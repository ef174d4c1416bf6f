"""The open_clip-based CLIP factory: configs as data, offline tokenizer, transforms, weights."""

import json

import open_clip
import pytest
import torch
from PIL import Image

from dataprep.clip_models import MODEL_CONFIG_DIR, create_clip, list_clip_models


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_clip("clip-tiny")


def test_tiny_config_is_a_plain_open_clip_config():
    cfg = json.loads((MODEL_CONFIG_DIR / "clip-tiny.json").read_text())
    assert set(cfg) <= {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
    assert cfg["text_cfg"]["vocab_size"] == 49408  # the shared BPE vocabulary
    assert "hf_tokenizer_name" not in cfg["text_cfg"]


def test_names_include_mmpipe_and_builtin_architectures():
    names = list_clip_models()
    assert {"clip-tiny", "ViT-B-32", "RN50"} <= set(names)
    assert "clip-tiny.preprocess" not in names  # the sidecar is not an architecture


def test_forward_shapes_and_logit_scale(tiny):
    model, tok = tiny.model, tiny.tokenizer
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(3, 3, size, size)  # [B, 3, H, W]
    texts = tok(["a red circle", "a blue star", ""])  # [B, context_length]
    assert texts.shape == (3, tiny.context_length) and texts.dtype == torch.long
    image_features, text_features, scale = model(images, texts)
    embed_dim = json.loads((MODEL_CONFIG_DIR / "clip-tiny.json").read_text())["embed_dim"]
    assert image_features.shape == text_features.shape == (3, embed_dim)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert scale.item() == pytest.approx(model.logit_scale.exp().item())


def test_tokenizer_is_the_offline_bpe(tiny):
    assert isinstance(tiny.tokenizer, open_clip.SimpleTokenizer)
    assert tiny.context_length == tiny.model.context_length == tiny.tokenizer.context_length


def test_eval_transform_pads_like_the_crawl(tiny):
    """Border mode: longest side to S, white padding; a crawled SxS image passes unchanged."""
    size = tiny.model.visual.preprocess_cfg["size"]
    wide = Image.new("RGB", (4 * size, 2 * size), (200, 30, 30))
    x = tiny.eval_transform(wide)  # [3, S, S]
    assert x.shape == (3, size, size)
    white = tiny.eval_transform(Image.new("RGB", (size, size), (255, 255, 255)))
    assert torch.allclose(x[:, 0, 0], white[:, 0, 0])  # top rows are padding
    assert not torch.allclose(x[:, size // 2, size // 2], white[:, 0, 0])


def test_train_transform_does_not_crop(tiny):
    """The tiny config disables random crops (they cut shapes at the border)."""
    size = tiny.model.visual.preprocess_cfg["size"]
    img = Image.effect_noise((size, size), 64).convert("RGB")
    assert torch.allclose(tiny.train_transform(img), tiny.eval_transform(img), atol=1e-5)


def test_pretrained_path_round_trip(tiny, tmp_path):
    """An exported state dict loads through mmpipe and through plain open_clip."""
    path = tmp_path / "clip-tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    reloaded = create_clip("clip-tiny", pretrained=str(path)).model
    open_clip.add_model_config(MODEL_CONFIG_DIR / "clip-tiny.json")
    plain = open_clip.create_model("clip-tiny", pretrained=str(path))
    for model in (reloaded, plain):
        for (name, a), b in zip(
            tiny.model.state_dict().items(), model.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name


def test_overrides_reach_open_clip():
    bundle = create_clip("clip-tiny", force_image_size=32, aug_cfg={"scale": (0.8, 1.0)})
    assert bundle.model.visual.preprocess_cfg["size"] == 32
    assert bundle.eval_transform(Image.new("RGB", (64, 64))).shape == (3, 32, 32)
    assert "scale=(0.8, 1.0)" in repr(bundle.train_transform)


def test_errors():
    with pytest.raises(ValueError, match="unknown CLIP model"):
        create_clip("no-such-model")
    with pytest.raises(FileNotFoundError):
        create_clip("clip-tiny", pretrained="/nonexistent/weights.pt")
