"""The train-clip flow on Prefect's ephemeral API, with real Ray and DeepSpeed underneath."""

import asyncio

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from pipelines.config import load_config
from pipelines.training_flows import train_clip
from tests.training.test_engine import write_shards
from training.config import TrainConfig


async def artifacts(keys):
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))
        )
        runs = await client.read_flow_runs()
        return {a.key: a for a in found}, runs


@pytest.mark.slow
def test_train_clip_flow_trains_exports_and_reports(local_store, tmp_path, monkeypatch):
    import ray

    ray.shutdown()
    monkeypatch.setenv("MMPIPE_STATE_DIR", str(tmp_path / "state"))
    write_shards(local_store, "data")
    cfg = load_config(
        TrainConfig,
        "configs/clip-tiny.yaml",
        [
            "name=flowclip",
            "steps=6",
            "log_every=2",
            "checkpoint_every=6",
            "eval.every_steps=6",
            "eval.heldout_samples=64",
            "engine.micro_batch_size=32",
            f"data.source={local_store.root_uri}/data/",
            f"store.url={local_store.root_uri}",
        ],
    )
    with prefect_test_harness(server_startup_timeout=120):
        outcome = train_clip(cfg)
        found, runs = asyncio.run(
            artifacts(["flowclip-progress", "flowclip-eval", "flowclip-summary", "flowclip-curves"])
        )
    ray.shutdown()
    assert outcome["final"]["step"] == 6 and "eval/top1" in outcome["final"]
    assert (
        outcome["export"]
        == f"{local_store.root_uri}/runs/flowclip/export/open_clip_pytorch_model.bin"
    )
    assert local_store.exists("runs/flowclip/export/open_clip_pytorch_model.bin")
    assert [r.name for r in runs] == ["train clip flowclip"]
    assert found["flowclip-progress"].data == 100.0
    assert "eval/top1" in str(found["flowclip-eval"].data)
    assert "runs/flowclip" in found["flowclip-summary"].data
    assert found["flowclip-curves"].data.count("](data:image/png;base64,") == 1
    assert local_store.exists("runs/flowclip/report/curves.png")
