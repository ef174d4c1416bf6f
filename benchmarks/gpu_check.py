"""GPU check: the figures mmpipe needs from one H100/H200-class GPU, in one command.

    make gpu-check          # or: .venv/bin/python benchmarks/gpu_check.py

Runs in under 8 minutes on a fresh machine with nothing installed beyond make's venv, and prints
one line per figure: sparse vs dense masked attention, CLIP ViT-B/32 through the engine (and
through open_clip's trainer when installed), a 4-layer slice of the 12B under ZeRO-3 with
activation checkpointing, and encode-codes against the bare dVAE encoder. A figure that fails
prints its error on its line and the others still run. Without a GPU: one line, exit 2.
Figures measured: README ("On a GPU") and docs/training.md ("GPU nodes").
"""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}  # dense
CLIP_MODEL, CLIP_BATCH, CLIP_STEPS = "ViT-B-32", 256, 40
SHARDS, PER_SHARD = 12, 1024


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); "
            "run it on a machine with one H100/H200-class GPU",
            file=sys.stderr,
        )
        return 2
    os.environ |= {"RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    os.environ |= {"DO_NOT_TRACK": "1", "WANDB_MODE": "disabled"}
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 989.0) * 1e12
    print(
        f"gpu-check on {name} (bf16 peak {peak / 1e12:.0f} TFLOP/s dense), torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        os.environ["MMPIPE_STATE_DIR"] = str(work / "state")
        figures = {
            "attention": attention,
            "dalle": dalle_zero3,
            "dvae codes": lambda p: codes(p, work),
            "clip": lambda p: clip(p, work),
        }
        for name, figure in figures.items():
            try:
                figure(peak)
            except Exception as err:  # one failed figure must not hide the others
                message = (str(err).strip().splitlines() or [""])[0][:300]
                print(f"{name}: failed: {type(err).__name__}: {message}", flush=True)
            torch.cuda.empty_cache()
    return 0


def cuda_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the GPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forward_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


# --- attention -------------------------------------------------------------------------------


def attention(peak: float) -> None:
    """Sparse row / column / conv against dense masked SDPA, fwd+bwd, 256 text + 32x32 image
    tokens in bf16; and against unmasked causal FlashAttention, the practical floor."""
    import torch
    import torch.nn.functional as F

    from training.models.attention import Layout, dense_attention, sparse_attention

    layout, kernel = Layout(256, 32, 32), 11
    shape = (8, 16, layout.seq_len, 64)  # batch, heads, tokens, head dim
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step(attend):
        def run():
            for t in (q, k, v):
                t.grad = None
            out = attend()
            out.backward(torch.ones_like(out))

        return run

    flash = cuda_ms(step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
    for kind in ("row", "column", "conv"):
        with torch.no_grad():
            dense_out = dense_attention(q, k, v, kind, layout, kernel).float()
            error = (sparse_attention(q, k, v, kind, layout, kernel).float() - dense_out).abs()
        close = bool(error.max() <= 2e-2 + 2e-2 * dense_out.abs().max())
        sparse = cuda_ms(step(lambda kind=kind: sparse_attention(q, k, v, kind, layout, kernel)))
        dense = cuda_ms(step(lambda kind=kind: dense_attention(q, k, v, kind, layout, kernel)))
        print(
            f"attention {kind:<6} fwd+bwd: allclose {close} (max err {error.max():.2g}); sparse "
            f"{sparse:.2f} ms vs dense masked SDPA {dense:.2f} ms: {dense / sparse:.1f}x "
            f"(target >= 3x); {sparse / flash:.2f}x unmasked causal flash ({flash:.2f} ms)"
        )


# --- DALL-E: a 4-layer slice of the 12B under ZeRO-3 ---------------------------------------


def dalle_zero3(peak: float) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from training.config import TrainConfig
    from training.models.dalle import Dalle, dalle_loss
    from training.parallel import build_model, deepspeed_config, make_optimizer, make_scheduler
    from training.specs import param_groups
    from training.specs.dalle import DalleSpec, model_config

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "RANK": "0"}
    os.environ |= {"LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    batch = 8
    cfg = TrainConfig.model_validate(
        {
            "name": "gpu-check-dalle",
            "spec": "dalle",
            "model": "dalle-12b",
            "model_args": {"n_layer": 4},
            "dvae_checkpoint": "unused",
            "data": {"source": "unused"},
            "engine": {
                "micro_batch_size": batch,
                "activation_checkpointing": True,
                "zero": {"stage": 3},
            },
            "scale": {"num_workers": 1, "use_gpu": True},
        }
    )
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    try:
        model = build_model(lambda: Dalle(model_config(cfg)), cfg, 1)
        model.grad_checkpointing = True
        optimizer = make_optimizer(param_groups(model, DalleSpec(), 0.1), cfg)
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=make_scheduler(optimizer, cfg),
            config=deepspeed_config(cfg, 1),
            dist_init_required=False,
        )
        m = model_config(cfg)
        text = torch.randint(0, m.text_vocab, (batch, m.text_len), device="cuda")
        image = torch.randint(0, m.image_vocab, (batch, m.image_len), device="cuda")

        def step():
            loss = dalle_loss(*engine(text, image), text, image)["total"]
            engine.backward(loss)
            engine.step()

        ms = cuda_ms(step, warmup=2, iters=5)
        with torch.no_grad():
            flops = 3 * forward_flops(lambda: engine(text, image))  # model FLOPs, no recompute
        params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        tokens = batch * m.seq_len / (ms / 1000)
        print(
            f"dalle 12B-width 4-layer slice ({params / 1e9:.2f} B), ZeRO-3 + activation "
            f"checkpointing, bf16, micro-batch {batch}: {tokens:,.0f} tokens/s, "
            f"MFU {flops / (ms / 1000) / peak:.0%} ({ms:.0f} ms/step)"
        )
    finally:
        dist.destroy_process_group()


# --- shards, dVAE codes --------------------------------------------------------------------


def write_shards(folder: Path, size: int) -> list[str]:
    """Captioned webdataset shards of smooth random images at ``size`` px."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    uris = []
    for shard in range(SHARDS):
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as tar:
            for i in range(PER_SHARD):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                caption = f"a photo of pattern {i % 97} in shard {shard}"
                tar.write(
                    {"__key__": f"{shard:05d}{i:05d}", "jpg": buffer.getvalue(), "txt": caption}
                )
        path.with_suffix(".stats.json").write_text(json.dumps({"kept": PER_SHARD}))
        uris.append(path.as_uri())
    return uris


def bare_encoder_rate(dvae) -> float:
    """Images/s of the dVAE encoder alone on GPU-resident batches of 256."""
    import torch

    encoder = dvae.cuda().eval()
    images = torch.rand(256, 3, 256, 256, device="cuda")
    with torch.no_grad():
        return 256 / (cuda_ms(lambda: encoder.encode(images), warmup=2, iters=5) / 1000)


def codes(peak: float, work: Path) -> None:
    """``encode-codes`` (Ray tasks sharing the GPU) against the bare dVAE encoder forward."""
    import torch

    from training.config import EncodeConfig
    from training.encode_codes import encode_dataset
    from training.models.dvae import DVAE, DVAEConfig, save_dvae

    shards = write_shards(work / "shards-256", 256)
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig.named("dvae-paper"))
    checkpoint = save_dvae(dvae, work / "dvae.pt")
    bare = bare_encoder_rate(dvae)
    torch.cuda.empty_cache()
    cfg = EncodeConfig(
        source=[s for s in shards[:4]],
        dvae_checkpoint=str(checkpoint),
        out=(work / "codes").as_uri() + "/",
        gpus_per_task=0.25,
        cpus_per_task=max(1, (os.cpu_count() or 4) // 5),
    )
    started = time.monotonic()
    done = encode_dataset(cfg)
    rate = sum(r.samples for r in done) / (time.monotonic() - started)
    print(
        f"dvae codes (dvae-paper, 256 px, fp32): encode-codes {rate:,.0f} images/s on 4 Ray tasks "
        f"sharing the GPU (Ray start and dVAE loads included) vs bare encoder {bare:,.0f} images/s "
        f"({rate / bare:.0%})"
    )


# --- CLIP ViT-B/32 through the engine and through open_clip's trainer ---------------------


def clip_train_flops_per_sample() -> float:
    """Model FLOPs of one CLIP training sample: 3 x its forward (image and text)."""
    import torch

    from training.models.clip import create_clip

    bundle = create_clip(CLIP_MODEL)
    model = bundle.model.cuda()
    images = torch.randn(8, 3, 224, 224, device="cuda")
    text = bundle.tokenizer(["a photo of a pattern"] * 8).cuda()
    with torch.no_grad():
        return 3 * forward_flops(lambda: model(images, text)) / 8


def clip(peak: float, work: Path) -> None:
    import torch

    from training.config import TrainConfig
    from training.engine import launch
    from training.monitor import read_metrics

    shards = work / "shards-224"
    write_shards(shards, 224)
    per_sample = clip_train_flops_per_sample()
    torch.cuda.empty_cache()
    workers = max(1, min(12, (os.cpu_count() or 4) - 2))
    cfg = TrainConfig.model_validate(
        {
            "name": "gpu-check-clip",
            "model": CLIP_MODEL,
            "steps": CLIP_STEPS,
            "log_every": 5,
            "checkpoint_every": 10**6,
            "data": {"source": shards.as_uri() + "/", "workers": workers},
            "eval": {"set": "none"},
            "engine": {"micro_batch_size": CLIP_BATCH, "zero": {"stage": 2}},
            "optim": {"warmup_steps": 10},
            "scale": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": workers + 1},
            "store": {"url": (work / "store").as_uri()},
        }
    )
    launch(cfg, echo_steps=False)
    rows = read_metrics(cfg.store.open(), cfg.run_prefix())
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]  # past the warm-up
    ours = statistics.median(rates)
    line = (
        f"clip {CLIP_MODEL} 224 px through the engine (1 worker, ZeRO-2, bf16, batch {CLIP_BATCH}): "
        f"{ours:,.0f} samples/s, MFU {ours * per_sample / peak:.0%} (target >= 40%)"
    )
    theirs = openclip_rate(shards, work)
    if theirs is None:
        line += "; open_clip_train not installed"
    else:
        line += (
            f"; open_clip_train {theirs:,.0f} samples/s: ratio {ours / theirs:.2f} (target >= 0.9)"
        )
    print(line)


def openclip_rate(shards: Path, work: Path) -> float | None:
    """samples/s of ``open_clip_train.main`` on the same shards, model and batch."""
    import importlib.util

    from benchmarks.train_clip_engines import OPENCLIP_LAUNCHER, STEP_LOG
    from dataprep.clip_models import MODEL_CONFIG_DIR

    if importlib.util.find_spec("open_clip_train") is None:
        return None
    steps = CLIP_STEPS + 1
    args = [
        f"--model={CLIP_MODEL}",
        f"--train-data={shards}/{{00000..{SHARDS - 1:05d}}}.tar",
        "--dataset-type=webdataset",
        f"--train-num-samples={steps * CLIP_BATCH}",
        "--epochs=1",
        f"--batch-size={CLIP_BATCH}",
        f"--workers={max(1, min(12, (os.cpu_count() or 4) - 2))}",
        "--precision=amp_bf16",
        "--warmup=10",
        "--gather-with-grad",
        "--log-every-n-steps=5",
        "--save-frequency=0",
        "--zeroshot-frequency=0",
        "--val-frequency=0",
        "--report-to=",
        f"--logs={work / 'openclip-logs'}",
        "--name=gpu-check",
    ]
    args_file = work / "openclip-args.json"
    args_file.write_text(json.dumps(args))
    out = subprocess.run(
        [sys.executable, "-m", OPENCLIP_LAUNCHER, str(MODEL_CONFIG_DIR), str(args_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    marks = [(float(t), int(n)) for t, n in STEP_LOG.findall(out.stdout)]
    if len(marks) < 3:
        tail = re.sub(r"\s+", " ", (out.stderr or out.stdout)[-300:])
        raise RuntimeError(f"open_clip_train logged {len(marks)} steps: {tail}")
    (t0, n0), (t1, n1) = marks[1], marks[-1]  # past the first step's warm-up
    return (n1 - n0) / (t1 - t0)


if __name__ == "__main__":
    sys.exit(main())
