"""The dVAE: architecture, relaxation, schedules, checkpoints; training through the real engine
(local Ray, DeepSpeed on CPU with gloo, 2 workers)."""

import io
import json

import pytest
import torch
import webdataset as wds

from pipelines.config import load_config
from training.config import TrainConfig
from training.engine import launch
from training.export import export_run
from training.models.dalle import count_parameters
from training.models.dvae import (
    DVAE,
    DVAEConfig,
    cosine_schedule,
    dvae_loss,
    kl_weight_at,
    load_dvae,
    save_dvae,
    temperature_at,
)
from training.monitor import read_metrics
from training.specs.dvae import DVAESpec

SHARDS, PER_SHARD = 2, 128


def write_shards(store, prefix: str, image_size: int = 32) -> str:
    """Clean sample-web images and captions as crawl shards; returns the folder URI."""
    from dataprep.sampleweb import generate_corpus, render_image
    from training.evaluate import crawl_border_resize

    specs = generate_corpus(SHARDS * PER_SHARD, seed=21, fault_rates={})
    for shard in range(SHARDS):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer) as tar:
            for i, spec in enumerate(specs[shard * PER_SHARD : (shard + 1) * PER_SHARD]):
                image = crawl_border_resize(render_image(spec), image_size)
                tar.write({"__key__": f"{shard:05d}{i:04d}", "jpg": image, "txt": spec.caption})
        store.put_bytes(f"{prefix}/{shard:05d}.tar", buffer.getvalue())
        store.put_bytes(
            f"{prefix}/{shard:05d}.stats.json", json.dumps({"kept": PER_SHARD}).encode()
        )
    return f"{store.root_uri}/{prefix}/"


def tiny_config(store, data_uri: str, config: str, **overrides) -> TrainConfig:
    base = [
        "steps=12",
        "log_every=3",
        "checkpoint_every=12",
        "eval.every_steps=0",
        "eval.heldout_samples=32",
        "engine.micro_batch_size=16",
        "optim.warmup_steps=2",
        "data.workers=1",
        "data.shuffle_buffer=64",
        f"data.source={data_uri}",
        f"store.url={store.root_uri}",
    ]
    return load_config(TrainConfig, config, base + [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def ray_local():
    import ray

    yield
    ray.shutdown()


def test_paper_shape_downsamples_8x_to_8192_codes():
    cfg = DVAEConfig.named("dvae-paper")
    assert (cfg.image_size, cfg.grid, cfg.vocab_size, cfg.hidden) == (256, 32, 8192, 256)
    with torch.device("meta"):
        model = DVAE(cfg)
        logits = model.encoder(torch.zeros(1, 3, 256, 256))
    assert logits.shape == (1, 8192, 32, 32)
    assert 90e6 < count_parameters(model) < 110e6  # OpenAI's released dVAE: ~98M
    blocks = [m for m in model.modules() if hasattr(m, "post_gain")]
    assert len(blocks) == 16 and all(b.post_gain == 1 / 8**2 for b in blocks)


@pytest.mark.parametrize("downsampling", [2, 4, 8])
def test_fewer_pooling_stages_give_a_finer_grid(downsampling):
    cfg = DVAEConfig.named("dvae-tiny", downsampling=downsampling)
    model = DVAE(cfg).eval()
    images = torch.rand(2, 3, 32, 32)
    assert model.encode(images).shape == (2, 32 // downsampling, 32 // downsampling)
    assert model.decode(model.encode(images)).shape == images.shape
    with pytest.raises(ValueError, match="downsampling must be 2, 4 or 8"):
        DVAEConfig.named("dvae-tiny", downsampling=3)


def test_convolutions_start_from_openais_initialisation():
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.named("dvae-tiny", hidden=64))
    conv = model.encoder.blocks.group_4.block_1.res_path[3]  # 16 x 16 x 3 x 3
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(fan_in**-0.5, rel=0.05)
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_encode_gives_argmax_codes_and_decode_gives_pixels():
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.named("dvae-tiny")).eval()
    images = torch.rand(3, 3, 32, 32)
    codes = model.encode(images)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert torch.equal(codes, model.encoder(model.prepare(images)).argmax(1))
    pixels = model.decode(codes)
    assert pixels.shape == (3, 3, 32, 32) and pixels.min() >= 0 and pixels.max() <= 1


def test_relaxation_is_soft_and_differentiable_and_kl_is_to_uniform():
    torch.manual_seed(0)
    cfg = DVAEConfig.named("dvae-tiny")
    model = DVAE(cfg)
    images = torch.rand(2, 3, 32, 32)
    terms = dvae_loss(model, images, temperature=1.0, kl_weight=1.0, cfg=cfg)
    terms["total"].backward()
    assert all(p.grad is not None for p in model.encoder.parameters())  # through the sample
    assert terms["kl"] >= 0
    # KL to uniform vanishes exactly when the encoder's logits are flat
    with torch.no_grad():
        model.encoder.blocks.output[1].weight.zero_()
        model.encoder.blocks.output[1].bias.zero_()
    flat = dvae_loss(model, images, temperature=1.0, kl_weight=1.0, cfg=cfg)
    assert float(flat["kl"].detach()) == pytest.approx(0.0, abs=1e-6)


def test_mse_reconstruction_variant():
    cfg = DVAEConfig.named("dvae-tiny", reconstruction="mse")
    model = DVAE(cfg)
    terms = dvae_loss(model, torch.rand(2, 3, 32, 32), 1.0, 0.0, cfg)
    assert float(terms["reconstruction"]) == pytest.approx(float(terms["mse"]))


def test_cosine_schedules_match_the_paper_endpoints():
    cfg = DVAEConfig.named("dvae-paper")
    assert temperature_at(cfg, 0) == 1.0
    assert temperature_at(cfg, 150_000) == pytest.approx(1 / 16)
    assert temperature_at(cfg, 10**6) == pytest.approx(1 / 16)
    assert temperature_at(cfg, 75_000) == pytest.approx((1 + 1 / 16) / 2)
    assert kl_weight_at(cfg, 0) == 0.0 and kl_weight_at(cfg, 5000) == pytest.approx(6.6)
    ramp = [cosine_schedule(s, 0, 1, 10) for s in range(11)]
    assert ramp == sorted(ramp)


def test_checkpoint_rebuilds_the_model_from_its_own_args(tmp_path):
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.named("dvae-tiny", hidden=8))
    loaded = load_dvae(save_dvae(model, tmp_path / "dvae.pt"))
    assert loaded.config == model.config
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(images), model.encode(images))


def test_activation_checkpointing_keeps_gradients():
    torch.manual_seed(0)
    cfg = DVAEConfig.named("dvae-tiny", reconstruction="mse")
    model = DVAE(cfg)
    images = torch.rand(2, 3, 32, 32)

    def grads():
        model.zero_grad()
        torch.manual_seed(1)  # the same gumbel noise
        dvae_loss(model, images, 1.0, 1.0, cfg)["total"].backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    DVAESpec().enable_activation_checkpointing(model)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_trains_under_zero3_and_loss_falls(local_store, ray_local):
    data = write_shards(local_store, "data")
    cfg = tiny_config(
        local_store,
        data,
        "configs/dvae-tiny.yaml",
        name="dvae-z3",
        **{"engine.zero.stage": 3, "optim.lr": 0.003},
    )
    result = launch(cfg)
    assert result.steps == cfg.steps
    rows = [r for r in read_metrics(local_store, cfg.run_prefix()) if "train/total" in r]
    assert rows[-1]["train/reconstruction"] < rows[0]["train/reconstruction"] - 0.05, rows
    assert rows[-1]["train/temperature"] < rows[0]["train/temperature"]  # annealing runs
    assert "eval/reconstruction_mse" in rows[-1]


@pytest.mark.slow
def test_zero2_resumes_from_its_checkpoint_and_continues_the_schedules(
    local_store, ray_local, tmp_path, capfd
):
    """Train 6 steps, launch the same run for 12: it resumes at step 6 (weights, optimizer,
    step) and the temperature and KL weight go on from there instead of starting over."""
    data = write_shards(local_store, "data")
    schedules = {"model_args.temperature_steps": 12, "model_args.kl_warmup_steps": 12}
    common = {"name": "dvae-resume", "optim.lr": 0.003, "checkpoint_every": 3, **schedules}
    launch(tiny_config(local_store, data, "configs/dvae-tiny.yaml", steps=6, **common))
    capfd.readouterr()
    cfg = tiny_config(local_store, data, "configs/dvae-tiny.yaml", steps=12, **common)
    result = launch(cfg)
    assert result.steps == 12
    out, err = capfd.readouterr()
    assert "at step 6" in out + err  # the workers' resume line, forwarded by Ray
    rows = [r for r in read_metrics(local_store, cfg.run_prefix()) if "train/total" in r]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    config = DVAEConfig.named("dvae-tiny", temperature_steps=12, kl_warmup_steps=12)
    for row in rows:  # step s trains at s - 1 completed steps; a row averages 3 steps
        done = range(row["step"] - 3, row["step"])
        expected = sum(temperature_at(config, s) for s in done) / 3
        assert row["train/temperature"] == pytest.approx(expected, rel=1e-5), row
        expected = sum(kl_weight_at(config, s) for s in done) / 3
        assert row["train/kl_weight"] == pytest.approx(expected, rel=1e-5, abs=1e-6), row
    assert rows[-1]["train/reconstruction"] < rows[0]["train/reconstruction"] - 0.05, rows

    uri = export_run(cfg)
    exported = tmp_path / "dvae.pt"
    local_store.get_file(uri.removeprefix(local_store.root_uri + "/"), exported)
    model = load_dvae(exported)
    assert model.config == config
    assert model.encode(torch.rand(1, 3, 32, 32)).shape == (1, 8, 8)


def test_shards_get_code_sidecars_matching_the_dvae(local_store, tmp_path):
    import webdataset as wds
    from PIL import Image

    from training.codes import read_codes
    from training.encode_codes import encode_shards
    from training.specs.dvae import image_transform

    data = write_shards(local_store, "data")
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig.named("dvae-tiny")).eval()
    checkpoint = save_dvae(dvae, tmp_path / "dvae.pt")
    shards = [f"{data}{i:05d}.tar" for i in range(SHARDS)]
    results = encode_shards(shards, str(checkpoint), batch_size=50)
    assert [r.samples for r in results] == [PER_SHARD] * SHARDS
    assert all(r.skipped == 0 and r.sidecar.endswith(".codes.npy") for r in results)

    codes = read_codes(results[0].sidecar)
    assert len(codes) == PER_SHARD and codes["000000003"].shape == (8, 8)
    # the same codes as encoding the shard's decoded images directly
    transform = image_transform(32)
    path = local_store.root_uri.removeprefix("file://") + "/data/00000.tar"
    for sample in list(wds.WebDataset(path, shardshuffle=False))[:5]:
        image = transform(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        expected = dvae.encode(image[None])[0]
        assert torch.equal(torch.from_numpy(codes[sample["__key__"]]).long(), expected)
