"""The DALL-E transformer: the 12B shape, sequence layout, loss, pads, sparse == dense model,
checkpointing, KV cache; training through the real engine (local Ray, DeepSpeed CPU, 2 workers)."""

import math

import pytest
import torch

from tests.training.test_dvae import tiny_config, write_shards
from tests.training.two_ranks import on_two_ranks
from training.engine import launch
from training.export import export_run
from training.models.attention import layer_kinds
from training.models.bpe import DalleTokenizer
from training.models.dalle import (
    ByteMaskDropout,
    Dalle,
    DalleConfig,
    count_parameters,
    dalle_loss,
)
from training.models.dvae import DVAE, DVAEConfig, save_dvae
from training.monitor import read_metrics
from training.specs.dalle import DalleSpec, check_compatible, load_dalle


def tiny(**overrides) -> DalleConfig:
    return DalleConfig.named("dalle-tiny", **overrides)


def random_batch(cfg: DalleConfig, batch: int = 2):
    text = torch.randint(0, cfg.text_vocab_padded, (batch, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab, (batch, cfg.image_len))
    return text, image


@pytest.fixture(scope="module")
def ray_local():
    import ray

    yield
    ray.shutdown()


def test_12b_on_the_meta_device_has_the_papers_size():
    cfg = DalleConfig.named("dalle-12b")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_model // cfg.n_head) == (64, 3968, 62, 64)
    assert (cfg.text_len, cfg.text_vocab, cfg.image_grid, cfg.image_vocab) == (256, 16384, 32, 8192)
    assert cfg.seq_len == 1280
    with torch.device("meta"):
        model = Dalle(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert 11.8e9 <= count_parameters(model) <= 12.4e9
    assert [b.attn.kind for b in model.blocks] == layer_kinds(64)


def test_forward_predicts_next_text_and_every_image_token():
    torch.manual_seed(0)
    cfg = tiny()
    model = Dalle(cfg).eval()  # no dropout: the two forwards must agree where they should
    text, image = random_batch(cfg)
    text_logits, image_logits = model(text, image)
    assert text_logits.shape == (2, cfg.text_len - 1, cfg.text_vocab + cfg.text_len)
    assert image_logits.shape == (2, cfg.image_len, cfg.image_vocab)
    # causal: changing image token p changes the predictions of tokens after p only
    changed = image.clone()
    changed[:, 5] = (changed[:, 5] + 1) % cfg.image_vocab
    _, image_logits_2 = model(text, changed)
    torch.testing.assert_close(image_logits[:, :6], image_logits_2[:, :6])
    assert not torch.allclose(image_logits[:, 6:], image_logits_2[:, 6:])


def test_loss_weights_text_an_eighth_each_normalised_by_its_own_tokens():
    cfg = tiny()
    text, image = random_batch(cfg)
    text_logits = torch.randn(2, cfg.text_len - 1, cfg.text_vocab_padded)
    image_logits = torch.randn(2, cfg.image_len, cfg.image_vocab)
    terms = dalle_loss(text_logits, image_logits, text, image)
    text_ce = torch.nn.functional.cross_entropy(text_logits.transpose(1, 2), text[:, 1:])
    image_ce = torch.nn.functional.cross_entropy(image_logits.transpose(1, 2), image)
    torch.testing.assert_close(terms["text_ce"], text_ce)
    torch.testing.assert_close(terms["image_ce"], image_ce)
    torch.testing.assert_close(terms["total"], text_ce / 8 + 7 * image_ce / 8)


def test_tokenizer_pads_each_position_with_its_own_token():
    tokenizer = DalleTokenizer(vocab_size=2048, text_len=24)
    tokens = tokenizer(["a small red circle", "a photo of a large yellow triangle at the top"])
    assert tokens.shape == (2, 24)
    assert (tokens[:, 0] == tokenizer.bpe.sot_token_id).all()
    for row in tokens:
        end = int((row == tokenizer.bpe.eot_token_id).nonzero()[0])
        pads = row[end + 1 :]
        assert torch.equal(pads, 2048 + torch.arange(end + 1, 24))  # pad j is vocab + j
        assert (row[: end + 1] < 2048).all()
    assert tokenizer.decode(tokens[0]) == "a small red circle"
    long = tokenizer(["word " * 100])[0]
    assert long[-1] == tokenizer.bpe.eot_token_id and (long < 2048).all()


def test_sparse_model_equals_dense_masked_model_forward_and_backward():
    torch.manual_seed(0)
    cfg = tiny(n_layer=6, image_grid=4, conv_kernel=5, dropout=0.0)
    model = Dalle(cfg).double()
    text, image = random_batch(cfg)

    def run(dense: bool):
        model.set_dense_attention(dense)
        model.zero_grad()
        logits = model(text, image)
        dalle_loss(*logits, text, image)["total"].backward()
        return logits, [p.grad.clone() for p in model.parameters()]

    (sparse_text, sparse_image), sparse_grads = run(dense=False)
    (dense_text, dense_image), dense_grads = run(dense=True)
    torch.testing.assert_close(sparse_text, dense_text)
    torch.testing.assert_close(sparse_image, dense_image)
    for a, b in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = tiny(dropout=0.0)
    model = Dalle(cfg)
    text, image = random_batch(cfg)

    def grads():
        model.zero_grad()
        dalle_loss(*model(text, image), text, image)["total"].backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    DalleSpec().enable_activation_checkpointing(model)
    assert model.grad_checkpointing
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_activation_checkpointing_replays_the_dropout_masks():
    cfg = tiny(dropout=0.2)
    model = Dalle(cfg)
    text, image = random_batch(cfg)

    def grads():
        torch.manual_seed(1)  # the same masks in both runs, if the recomputation replays them
        model.zero_grad()
        dalle_loss(*model(text, image), text, image)["total"].backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    DalleSpec().enable_activation_checkpointing(model)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_byte_mask_dropout_drops_p_and_keeps_the_expectation():
    torch.manual_seed(0)
    dropout = ByteMaskDropout(0.2)
    x = torch.ones(400_000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.2) < 0.005  # 51 of 256 byte values: 0.1992
    assert abs(y.mean().item() - 1) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 256 / 205))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * mask * scale) / dx = mask * scale
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(ByteMaskDropout(0.0)(x), x)
    with pytest.raises(ValueError, match="dropout probability"):
        ByteMaskDropout(1.0)


def test_kv_cache_steps_give_the_forward_logits():
    torch.manual_seed(0)
    cfg = tiny(image_grid=4)
    model = Dalle(cfg).double().eval()
    text, image = random_batch(cfg)
    _, image_logits = model(text, image)
    cache = model.new_cache(2)
    logits = [model.step(text, cache)]  # the prompt at once: predicts image token 0
    for p in range(cfg.image_len - 1):
        logits.append(model.step(image[:, p : p + 1], cache))
    torch.testing.assert_close(torch.stack(logits, dim=1), image_logits)


def test_dvae_and_transformer_must_agree_on_the_code_grid():
    dvae = DVAE(DVAEConfig.named("dvae-tiny"))  # 8x8 codes from 512
    check_compatible(tiny(), dvae)
    with pytest.raises(ValueError, match="expects 4x4"):
        check_compatible(tiny(image_grid=4), dvae)


@pytest.fixture(scope="module")
def dvae_checkpoint(tmp_path_factory) -> str:
    """A frozen dVAE for the transformer: freshly initialised is enough to code images."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dvae") / "dvae.pt"
    return str(save_dvae(DVAE(DVAEConfig.named("dvae-tiny")), path))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_trains_through_the_engine_and_loss_falls(
    local_store, ray_local, dvae_checkpoint, stage, tmp_path
):
    data = write_shards(local_store, "data")
    cfg = tiny_config(
        local_store,
        data,
        "configs/dalle-tiny.yaml",
        name=f"dalle-z{stage}",
        dvae_checkpoint=dvae_checkpoint,
        **{"engine.zero.stage": stage, "optim.lr": 0.003, "engine.activation_checkpointing": True},
    )
    result = launch(cfg)
    assert result.steps == cfg.steps
    rows = [r for r in read_metrics(local_store, cfg.run_prefix()) if "train/total" in r]
    assert rows[-1]["train/image_ce"] < rows[0]["train/image_ce"] - 0.3, rows
    assert rows[-1]["train/text_ce"] < rows[0]["train/text_ce"] - 0.3, rows
    assert rows[-1]["eval/image_ce"] < 6.2  # below uniform over 512 codes (ln 512 = 6.24)

    uri = export_run(cfg)
    exported = tmp_path / "dalle.pt"
    local_store.get_file(uri.removeprefix(local_store.root_uri + "/"), exported)
    model, dvae_uri = load_dalle(exported)
    assert model.config == tiny() and dvae_uri == dvae_checkpoint


def dalle_eval(dvae_checkpoint: str) -> dict:
    from training.config import TrainConfig
    from training.specs.dalle import DalleSpec

    cfg = TrainConfig(
        name="e",
        spec="dalle",
        model="dalle-tiny",
        dvae_checkpoint=dvae_checkpoint,
        data={"source": "file:///d/"},
        eval={"heldout_samples": 21, "batch_size": 4},  # 11 + 10 (padded) on 2 ranks
    )
    spec = DalleSpec()
    torch.manual_seed(0)
    model = spec.build(cfg).eval()
    with torch.no_grad():
        return spec.evaluate(model, cfg, torch.float32)


@pytest.mark.slow
def test_evaluation_sharded_over_ranks_equals_one_rank(dvae_checkpoint, tmp_path):
    alone = dalle_eval(dvae_checkpoint)
    results = on_two_ranks(dalle_eval, dvae_checkpoint, tmp_path=tmp_path)
    for rank in (0, 1):
        assert results[rank].keys() == alone.keys()
        for name, value in alone.items():
            assert results[rank][name] == pytest.approx(value, rel=1e-5), name


def test_residual_projections_start_scaled_down_by_depth():
    torch.manual_seed(0)
    model = Dalle(tiny(n_layer=8, d_model=256, n_head=4))
    scaled = 0.02 / math.sqrt(2 * 8)
    assert float(model.blocks[0].attn.proj.weight.std()) == pytest.approx(scaled, rel=0.1)
    assert float(model.blocks[3].mlp[2].weight.std()) == pytest.approx(scaled, rel=0.1)
    assert float(model.blocks[0].attn.qkv.weight.std()) == pytest.approx(0.02, rel=0.1)
