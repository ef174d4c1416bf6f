"""dVAE code sidecars: coded on Ray per shard, streamed by the loader, trained on by DALL-E."""

import io

import numpy as np
import pytest
import torch

from tests.training.test_dvae import PER_SHARD, SHARDS, tiny_config, write_shards
from training.codes import ReadCodes, read_codes, sidecar_dtype
from training.config import DataConfig, EncodeConfig
from training.data import make_train_loader
from training.encode_codes import encode_dataset
from training.engine import launch, validate
from training.models.dvae import DVAE, DVAEConfig, save_dvae
from training.monitor import read_metrics
from training.shards import DataError, resolve_shards


@pytest.fixture(scope="module")
def dvae_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dvae") / "dvae.pt"
    return str(save_dvae(DVAE(DVAEConfig.named("dvae-tiny")), path))


@pytest.fixture
def ray_session():
    import ray

    yield
    ray.shutdown()


def loader(data: DataConfig, batch_size: int = 32):
    shards = resolve_shards(data)
    return make_train_loader(
        data, shards, rank=0, world_size=1, batch_size=batch_size,
        decode=ReadCodes(data.codes), tokenize=lambda texts: torch.zeros(len(texts), 1),
    )  # fmt: skip


def test_dataset_is_coded_on_ray_and_the_loader_streams_the_codes(
    local_store, dvae_checkpoint, ray_session
):
    data = write_shards(local_store, "data")
    out = f"{local_store.root_uri}/codes/"
    results = encode_dataset(EncodeConfig(source=data, dvae_checkpoint=dvae_checkpoint, out=out))
    assert sorted(r.sidecar for r in results) == [
        f"{local_store.root_uri}/codes/{i:05d}.codes.npy" for i in range(SHARDS)
    ]
    assert [r.samples for r in results] == [PER_SHARD] * SHARDS
    codes = read_codes(results[0].sidecar) | read_codes(results[1].sidecar)

    batches = list(loader(DataConfig(source=data, codes=out, workers=0, shuffle_buffer=0)))
    assert len(batches) == SHARDS * PER_SHARD // 32
    first = batches[0]
    assert "image" not in first and first["codes"].shape == (32, 8, 8)
    assert first["codes"].dtype == torch.long
    # the loader's batch is made of the sidecar's codes (no shuffle: stream order of shard keys)
    stream_codes = torch.cat([b["codes"] for b in batches])
    sidecar_codes = {tuple(c.flatten().tolist()) for c in codes.values()}
    assert {tuple(c.flatten().tolist()) for c in stream_codes} <= sidecar_codes

    on_gpus = EncodeConfig(source=data, dvae_checkpoint=dvae_checkpoint, out=out, gpus_per_task=1)
    with pytest.raises(DataError, match="the Ray cluster has no GPUs"):  # not queued forever
        encode_dataset(on_gpus)


def test_uncoded_samples_are_skipped_and_a_missing_sidecar_is_named(local_store, tmp_path):
    data = write_shards(local_store, "data")
    table = np.zeros(PER_SHARD - 5, dtype=sidecar_dtype(8))  # 5 samples of shard 0 not coded
    table["key"] = [f"{0:05d}{i:04d}".encode() for i in range(5, PER_SHARD)]
    for shard in range(SHARDS):
        buffer = io.BytesIO()
        np.save(buffer, table)
        local_store.put_bytes(f"codes/{shard:05d}.codes.npy", buffer.getvalue())
    # shard 1's sidecar holds shard 0's keys: every sample of shard 1 is uncoded
    batches = loader(DataConfig(source=data, codes=f"{local_store.root_uri}/codes/", workers=0))
    skipped = sum(int(b["skipped"]) for b in batches)
    assert skipped >= 5 + PER_SHARD

    local_store.delete_prefix("codes/")
    with pytest.raises(DataError, match=r"no dVAE codes for .*00000.tar: .*00000.codes.npy"):
        list(loader(DataConfig(source=data, codes=f"{local_store.root_uri}/codes/", workers=0)))


@pytest.mark.slow
def test_dalle_trains_from_sidecars(local_store, dvae_checkpoint, ray_session):
    data = write_shards(local_store, "data")
    out = f"{local_store.root_uri}/codes/"
    encode_dataset(EncodeConfig(source=data, dvae_checkpoint=dvae_checkpoint, out=out))
    cfg = tiny_config(
        local_store,
        data,
        "configs/dalle-tiny.yaml",
        name="dalle-codes",
        dvae_checkpoint=dvae_checkpoint,
        **{"data.codes": out, "optim.lr": 0.003},
    )
    result = launch(cfg)
    assert result.steps == cfg.steps
    rows = [r for r in read_metrics(local_store, cfg.run_prefix()) if "train/total" in r]
    assert rows[-1]["train/image_ce"] < rows[0]["train/image_ce"] - 0.3, rows
    assert all(r["data/skipped_samples"] == 0 for r in rows if "data/skipped_samples" in r)


def test_a_dalle_run_with_missing_inputs_is_refused_before_any_worker_starts(
    local_store, dvae_checkpoint
):
    """The driver checks what the workers would read: the dVAE export, every shard's codes."""
    data = write_shards(local_store, "data")
    out = f"{local_store.root_uri}/codes/"
    config = lambda **kw: tiny_config(local_store, data, "configs/dalle-tiny.yaml", **kw)  # noqa: E731

    missing = f"{local_store.root_uri}/nowhere/dvae.pt"
    with pytest.raises(FileNotFoundError, match=f"dvae_checkpoint .* not found: {missing}"):
        validate(config(dvae_checkpoint=missing))
    with pytest.raises(DataError, match=f"no dVAE codes for 2 of 2 shards in {out} .*00000.tar"):
        validate(config(dvae_checkpoint=dvae_checkpoint, **{"data.codes": out}))
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(0, dtype=sidecar_dtype(8)))
    local_store.put_bytes("codes/00000.codes.npy", buffer.getvalue())
    with pytest.raises(DataError, match="no dVAE codes for 1 of 2 shards .*00001.tar"):
        validate(config(dvae_checkpoint=dvae_checkpoint, **{"data.codes": out}))
    local_store.put_bytes("codes/00001.codes.npy", buffer.getvalue())
    validate(config(dvae_checkpoint=dvae_checkpoint, **{"data.codes": out}))
    validate(config(dvae_checkpoint=missing), inputs=False)  # config only (the demo's check)
