"""Partitioned construction under ZeRO-3: 2 real gloo processes, real DeepSpeed (CPU)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.config import load_config
from training.config import TrainConfig
from training.parallel import build_model, partition_numel
from training.registry import get_spec
from training.specs import param_groups

WORLD = 2


def clip_config(stage: int) -> TrainConfig:
    return load_config(
        TrainConfig,
        "configs/clip-tiny.yaml",
        ["data.source=file:///unused/", f"engine.zero.stage={stage}", "engine.micro_batch_size=4"],
    )


def _worker(rank: int, port: int, results: dict) -> None:
    os.environ |= {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)}
    import deepspeed

    from training.engine import _skip_shm_comm_build

    _skip_shm_comm_build(deepspeed)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        spec = get_spec("clip")
        for stage in (2, 3):
            cfg = clip_config(stage)
            torch.manual_seed(0)
            model = build_model(lambda cfg=cfg: spec.build(cfg), cfg, WORLD, spec.late_inits)
            local, full = partition_numel(model)
            groups = [len(g["params"]) for g in param_groups(model, spec, 0.1)]
            embedding = model.token_embedding.weight
            with deepspeed.zero.GatheredParameters([embedding], enabled=stage == 3):
                std = float(embedding.detach().float().std())
            results[(rank, stage)] = {"local": local, "full": full, "groups": groups, "std": std}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def built() -> dict:
    from tests.conftest import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(free_port(), results), nprocs=WORLD, join=True)
        return dict(results)


@pytest.mark.slow
def test_zero3_builds_each_rank_only_its_share(built):
    full = built[(0, 2)]["full"]
    assert built[(0, 2)]["local"] == full  # ZeRO-2: every rank builds the whole model
    for rank in range(WORLD):
        zero3 = built[(rank, 3)]
        assert zero3["full"] == full
        assert zero3["local"] <= full / WORLD * 1.01  # its partition (plus padding), no more
    assert built[(0, 3)]["local"] + built[(1, 3)]["local"] >= full


@pytest.mark.slow
def test_zero3_build_keeps_the_initialisation_and_weight_decay_groups(built):
    # open_clip sets the text embedding to std 0.02 from the parent's __init__; partitioned
    # construction must not leave nn.Embedding's std 1 there.
    for rank in range(WORLD):
        assert built[(rank, 3)]["std"] == pytest.approx(0.02, rel=0.1)
        assert built[(rank, 3)]["groups"] == built[(0, 2)]["groups"]
    assert built[(0, 2)]["std"] == pytest.approx(0.02, rel=0.1)
