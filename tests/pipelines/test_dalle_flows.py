"""train-dvae -> encode-codes -> train-dalle -> generate-dalle on Prefect's ephemeral API, with real Ray and
DeepSpeed underneath: the chain `make demo` runs, at a few steps each."""

import asyncio

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from pipelines.config import load_config
from pipelines.dalle_flows import encode_codes, generate_dalle
from pipelines.training_flows import train_dalle, train_dvae
from tests.training.test_engine import write_shards
from training.config import TrainConfig
from training.encode_codes import EncodeConfig
from training.generate import GenerateConfig

FEW_STEPS = [
    "steps=4",
    "log_every=2",
    "checkpoint_every=4",
    "eval.every_steps=4",
    "eval.heldout_samples=32",
    "engine.micro_batch_size=16",
]


async def artifacts(keys):
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
        runs = await client.read_flow_runs()
        return {a.key: a for a in found}, sorted(r.name for r in runs)


def train_config(model, store, *extra) -> TrainConfig:
    where = [f"data.source={store.root_uri}/data/", f"store.url={store.root_uri}"]
    return load_config(
        TrainConfig, f"configs/{model}-tiny.yaml", [f"name=flow{model}", *FEW_STEPS, *where, *extra]
    )


@pytest.mark.slow
def test_dvae_then_dalle_then_samples(local_store, tmp_path, monkeypatch):
    import ray

    ray.shutdown()
    monkeypatch.setenv("MMPIPE_STATE_DIR", str(tmp_path / "state"))
    write_shards(local_store, "data")
    dvae_cfg = train_config("dvae", local_store)
    with prefect_test_harness(server_startup_timeout=120):
        with pytest.raises(ValueError, match="train-dalle got a config for spec 'dvae'"):
            train_dalle(dvae_cfg)
        dvae = train_dvae(dvae_cfg)
        codes = f"{local_store.root_uri}/codes/"
        coded = encode_codes(
            EncodeConfig(source=dvae_cfg.data.source, dvae_checkpoint=dvae["export"], out=codes)
        )
        dalle = train_dalle(
            train_config(
                "dalle", local_store, f"dvae_checkpoint={dvae['export']}", f"data.codes={codes}"
            )
        )
        report = generate_dalle(
            GenerateConfig(
                name="flowsamples",
                dalle_checkpoint=dalle["export"],
                heldout=2,
                sampling={"candidates": 3},
                store={"url": local_store.root_uri},
            )
        )
        found, runs = asyncio.run(
            artifacts(["flowdalle-eval", "flowsamples-samples", "flowsamples-scores"])
        )
    ray.shutdown()
    assert dvae["final"]["step"] == 4 and "eval/reconstruction_mse" in dvae["final"]
    assert dvae["export"] == f"{local_store.root_uri}/runs/flowdvae/export/dvae.pt"
    assert sum(c.samples for c in coded) == 4 * 96  # write_shards: 4 shards of 96
    assert dalle["final"]["step"] == 4 and "eval/image_ce" in dalle["final"]
    assert dalle["export"] == f"{local_store.root_uri}/runs/flowdalle/export/dalle.pt"
    assert len(report.results) == 2 and local_store.exists("samples/flowsamples/grid.png")
    assert runs == [
        f"encode codes into {codes}",
        "generate flowsamples",
        "train dalle flowdalle",
        "train dvae flowdvae",  # the refused train-dalle run: named after its config
        "train dvae flowdvae",
    ]
    assert "data:image/png;base64," in found["flowsamples-samples"].data
    assert "eval/image_ce" in str(found["flowdalle-eval"].data)
    assert report.results[0].caption in str(found["flowsamples-scores"].data)
