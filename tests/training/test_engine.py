"""The training engine end to end: real Ray (local), real DeepSpeed (CPU, gloo), 2 workers."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import open_clip
import pytest
import torch
import webdataset as wds

from pipelines.config import load_config
from training.config import TrainConfig
from training.engine import launch, validate
from training.evaluate import crawl_border_resize, encode_images, preprocess_images
from training.export import export_run, latest_checkpoint_prefix
from training.monitor import read_metrics
from training.parallel import WarmupCosine
from training.shards import DataError

SHARDS, PER_SHARD = 4, 96


def write_shards(store, prefix, corrupt_in_first=0):
    """Crawl-shaped shards of clean sample-web images, optionally with corrupt samples."""
    from dataprep.sampleweb import generate_corpus, render_image

    specs = generate_corpus(SHARDS * PER_SHARD, seed=11, fault_rates={})
    for shard in range(SHARDS):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer) as tar:
            for i, spec in enumerate(specs[shard * PER_SHARD : (shard + 1) * PER_SHARD]):
                image = crawl_border_resize(render_image(spec), 64)
                if shard == 0 and i < corrupt_in_first:
                    image = b"\xff\xd8\xff\xe0 not really a jpeg"
                tar.write({"__key__": f"{shard:05d}{i:04d}", "jpg": image, "txt": spec.caption})
        store.put_bytes(f"{prefix}/{shard:05d}.tar", buffer.getvalue())
        stats = {"kept": PER_SHARD}
        store.put_bytes(f"{prefix}/{shard:05d}.stats.json", json.dumps(stats).encode())


def config(store, data_uri, **overrides) -> TrainConfig:
    base = [
        "name=t",
        "steps=12",
        "log_every=3",
        "checkpoint_every=6",
        "eval.every_steps=0",
        "eval.heldout_samples=64",
        "engine.micro_batch_size=32",
        "optim.warmup_steps=4",
        "optim.lr=0.002",
        "data.workers=1",
        f"data.source={data_uri}",
        f"store.url={store.root_uri}",
    ]
    if store.root_uri.startswith("s3://"):
        s3 = store.settings
        base += [
            f"store.s3.endpoint_url={s3.endpoint_url}",
            f"store.s3.region={s3.region}",
            f"store.s3.access_key_id={s3.access_key_id}",
            f"store.s3.secret_access_key={s3.secret_access_key.get_secret_value()}",
        ]
    extra = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(TrainConfig, "configs/clip-tiny.yaml", base + extra)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    yield
    ray.shutdown()


def test_inconsistent_batch_sizes_fail_before_any_worker_starts(local_store):
    cfg = config(local_store, "file:///nowhere/", **{"engine.train_batch_size": 100})
    with pytest.raises(ValueError, match=r"train_batch_size = 100 but micro_batch_size \(32\)"):
        validate(cfg)
    fp16 = config(local_store, "file:///nowhere/", **{"engine.precision": "fp16"})
    with pytest.raises(ValueError, match="fp16"):
        validate(fp16)


def test_a_missing_data_source_fails_before_any_worker_starts(local_store):
    cfg = config(local_store, local_store.uri("nowhere") + "/")
    with pytest.raises(DataError, match="no shards found in .*nowhere/"):
        validate(cfg)
    validate(cfg, inputs=False)
    remote = config(local_store, local_store.uri("nowhere") + "/", **{"scale.ray_address": "auto"})
    validate(remote)  # a cluster's workers may see paths this machine does not


def test_cpu_workers_do_not_build_deepspeeds_shm_comm_op():
    """DeepSpeed JIT-compiles its CPU shared-memory all-reduce (g++, 30 s and more) when its
    comm backend starts; training never uses it, so the workers mark it incompatible."""
    code = (
        "import deepspeed\n"
        "from deepspeed.comm.torch import build_shm_op\n"
        "from training.engine import _skip_shm_comm_build\n"
        "_skip_shm_comm_build(deepspeed)\n"
        "print('op:', build_shm_op())\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "op: None" in out.stdout
    assert "built successfully" not in out.stdout


@pytest.mark.slow
def test_zero3_trains_from_s3_survives_corrupt_samples_and_exports(s3_store, ray_local, tmp_path):
    write_shards(s3_store, "data", corrupt_in_first=5)
    cfg = config(
        s3_store,
        f"{s3_store.root_uri}/data/",
        name="z3",
        **{"engine.zero.stage": 3, "engine.precision": "fp32", "eval.every_steps": 12},
    )
    result = launch(cfg)
    assert result.steps == cfg.steps
    rows = read_metrics(s3_store, cfg.run_prefix())
    losses = [r["train/contrastive"] for r in rows if "train/contrastive" in r]
    assert losses[-1] < losses[0] - 0.3, losses
    assert sum(r["data/skipped_samples"] for r in rows) >= 5  # the corrupt ones, counted
    assert "eval/top1" in rows[-1]
    assert s3_store.list(f"{cfg.run_prefix()}/tensorboard/")

    uri = export_run(cfg)
    local = tmp_path / "model.bin"
    s3_store.get_file(uri.removeprefix(s3_store.root_uri + "/"), local)
    model = open_clip.create_model("clip-tiny", pretrained=str(local))  # the scorer path
    model.eval()

    # The engine's own weights (ZeRO-3 partitions merged) give the same embeddings.
    from training.export import consolidated_state_dict
    from training.specs.clip import ClipSpec

    state = consolidated_state_dict(s3_store, latest_checkpoint_prefix(s3_store, cfg.run_prefix()))
    torch.manual_seed(0)
    engine_model = ClipSpec().build(cfg)
    engine_model.load_state_dict(state)
    from training.evaluate import heldout_sampleweb

    images, _, _ = heldout_sampleweb(16, 5, 64)
    batch = preprocess_images(images, ClipSpec().bundle("clip-tiny").eval_transform)
    assert torch.allclose(
        encode_images(model, batch), encode_images(engine_model, batch), atol=1e-5
    )


RESUME_DRIVER = """
import sys
from pipelines.config import load_config
from training.config import TrainConfig
from training.engine import launch
if __name__ == "__main__":
    launch(load_config(TrainConfig, "configs/clip-tiny.yaml", sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_driver_sigkill_continues_steps_and_schedule(local_store, tmp_path):
    import ray

    ray.shutdown()  # the drivers below start their own local Ray
    write_shards(local_store, "data")
    args = [
        "name=resume",
        "steps=24",
        "log_every=2",
        "checkpoint_every=8",
        "eval.every_steps=0",
        "engine.micro_batch_size=32",
        "engine.zero.stage=2",
        "optim.warmup_steps=4",
        "data.workers=1",
        f"data.source={local_store.root_uri}/data/",
        f"store.url={local_store.root_uri}",
    ]
    cfg = load_config(TrainConfig, "configs/clip-tiny.yaml", args)
    script = tmp_path / "driver.py"
    script.write_text(RESUME_DRIVER)
    env = os.environ | {"MMPIPE_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env, start_new_session=True)
    deadline = time.monotonic() + 420  # Ray start-up and the first 8 steps
    while latest_checkpoint_prefix(local_store, cfg.run_prefix()) is None:
        assert proc.poll() is None, "driver ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = read_metrics(local_store, cfg.run_prefix())
    killed_at = first[-1]["step"]
    assert 8 <= killed_at < cfg.steps

    subprocess.run([sys.executable, str(script), *args], env=env, check=True, timeout=400)
    rows = read_metrics(local_store, cfg.run_prefix())
    steps = [r["step"] for r in rows]
    assert steps == list(range(2, cfg.steps + 1, 2))  # continues: no step lost or repeated
    shape = WarmupCosine(4, cfg.steps, cfg.optim.min_lr_ratio)
    for row in rows:  # the schedule continues where it was, it does not warm up again
        expected = cfg.optim.lr * shape(row["step"])
        assert row["lr"] == pytest.approx(expected, rel=1e-6), row


# --- 2 ranks without Ray: metrics reduction and a resume's downloads ----------------------


def _two_rank_worker(rank: int, port: int, shared: str, results: dict) -> None:
    os.environ |= {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
    from pathlib import Path

    import deepspeed
    import ray.train
    import torch.distributed as dist

    from training.engine import _skip_shm_comm_build, _Window, download_rank_share

    _skip_shm_comm_build(deepspeed)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        window = _Window(torch.device("cpu"))  # the engine's device
        for value in (1.0, 3.0):
            window.add({"total": torch.tensor(value * (rank + 1))}, {"skipped": rank}, 8)
        results[rank, "metrics"] = window.reduce(0.1, 2)
        results[rank, "sums_device"] = str(window.device)

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
        ds_config = {
            "train_micro_batch_size_per_gpu": 2,
            "train_batch_size": 4,
            "zero_optimization": {"stage": 3},
            "steps_per_print": 2**31 - 1,
        }
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
            config=ds_config,
            dist_init_required=False,
        )
        engine.backward(engine(torch.randn(2, 16)).square().mean())
        engine.step()
        engine.save_checkpoint(shared, tag="step00000001", client_state={"mmpipe_state": 1})
        dist.barrier()
        own = Path(shared).parent / f"rank{rank}"
        copied = download_rank_share(ray.train.Checkpoint.from_directory(shared), rank, own)
        _, client_state = engine.load_checkpoint(str(own))
        results[rank, "copied"] = copied
        results[rank, "all"] = sorted(
            str(p.relative_to(shared)) for p in Path(shared).rglob("*") if p.is_file()
        )
        results[rank, "client_state"] = client_state["mmpipe_state"]
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    shared = tmp_path_factory.mktemp("resume") / "checkpoint"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_worker, args=(free_port(), str(shared), results), nprocs=2, join=True)
        return dict(results)


@pytest.mark.slow
def test_metrics_reduce_across_ranks_on_the_engines_device(two_ranks):
    for rank in (0, 1):
        metrics = two_ranks[rank, "metrics"]
        assert metrics["train/total"] == pytest.approx((2.0 + 4.0) / 2)  # ranks' means: 2 and 4
        assert metrics["data/skipped_samples"] == 2  # rank 1 skipped one per micro-batch
        assert metrics["lr"] == 0.1
        assert two_ranks[rank, "sums_device"] == "cpu"


@pytest.mark.slow
def test_resume_reads_only_its_own_partitions(two_ranks):
    everything = two_ranks[0, "all"]
    assert any("zero_pp_rank_1_" in f for f in everything)  # both ranks' partitions are there
    for rank, other in ((0, 1), (1, 0)):
        copied = two_ranks[rank, "copied"]
        assert not any(f"zero_pp_rank_{other}_" in f for f in copied), copied
        assert sum(f"zero_pp_rank_{rank}_" in f for f in copied) == 2  # model and optimizer
        assert "latest" in copied  # the shared files come too
        assert two_ranks[rank, "client_state"] == 1  # DeepSpeed resumed from them alone
