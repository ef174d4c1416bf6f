"""Embedding stage throughput against the bare model forward, in the same run.

Alternating for ``--repeats`` rounds: ``embed_shard`` over crawl-shaped sample-web shards in a
local store (read, decode, transform, both towers, write), and ``Embedder.forward`` on the same
samples already decoded in memory; also the same shards through the build's Ray actor (one
call per shard, the model loaded once). Prints images/s of each (medians) and the ratios to the
forward (targets >= 0.8 in process, >= 0.76 through the actor); ``--profile`` then times each
part of the stage alone. See docs/benchmarks.md.

    .venv/bin/python benchmarks/embed.py                        # clip-tiny at 64 px
    .venv/bin/python benchmarks/embed.py --model ViT-B-32 --shards 2 --per-shard 128
    .venv/bin/python benchmarks/embed.py --profile    # and where the stage's time goes
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.metering import Timers  # noqa: E402
from dataprep.crawl import PLAN_KEY, CrawlPlan  # noqa: E402
from dataprep.crawl_status import ShardStats  # noqa: E402
from dataprep.embed import (  # noqa: E402
    EMBED,
    EMBED_SCHEMA,
    EmbedConfig,
    Embedder,
    embed_shard,
    npy_bytes,
)
from dataprep.filters import STAGE as FILTER  # noqa: E402
from dataprep.filters import FilterConfig, filter_shards  # noqa: E402
from dataprep.sampleweb.corpus import generate_corpus, render_image  # noqa: E402
from dataprep.stages import KEPT, StageStats, Staging  # noqa: E402
from dataprep.store import open_store  # noqa: E402
from training.evaluate import crawl_border_resize  # noqa: E402


def write_crawl(staging: Staging, shards: int, per_shard: int, size: int) -> list[tuple]:
    """Crawl-like shards of clean sample-web images; returns every (jpeg, caption)."""
    specs = generate_corpus(shards * per_shard, seed=7, fault_rates={})
    samples = []
    for shard in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, spec in enumerate(specs[shard * per_shard : (shard + 1) * per_shard]):
                key = f"{shard:05d}{i:04d}"
                jpeg = crawl_border_resize(render_image(spec), size)
                meta = {
                    "url": f"http://x{spec.path}",
                    "original_width": spec.width,
                    "original_height": spec.height,
                }
                for ext, data in (
                    ("jpg", jpeg),
                    ("txt", spec.caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                samples.append((jpeg, spec.caption))
        staging.store.put_bytes(staging.key("crawl", shard, "tar"), buf.getvalue())
        stats = ShardStats(
            shard=shard,
            count=per_shard,
            kept=per_shard,
            by_status={},
            by_reason={"success": per_shard},
            duration_s=0,
            tar_bytes=0,
        )
        staging.store.put_bytes(
            staging.key("crawl", shard, "stats.json"), stats.model_dump_json().encode()
        )
    plan = CrawlPlan(
        url_list="synthetic",
        fingerprint="bench",
        rows=len(samples),
        samples_per_shard=per_shard,
        shards=shards,
        settings={},
    )
    staging.store.put_bytes(
        f"{staging.prefix('crawl')}/{PLAN_KEY}", plan.model_dump_json().encode()
    )
    return samples


def time_stage(
    staging: Staging, shards: int, embedder: Embedder, round_: int, prefetch: int | None = None
) -> float:
    for key in staging.store.list(staging.prefix(EMBED) + "/"):
        staging.store.delete(key)
    options = {} if prefetch is None else {"prefetch": prefetch}
    started = time.perf_counter()
    for shard in range(shards):
        embed_shard(staging, shard, embedder, f"round-{round_}", **options)
    return time.perf_counter() - started


def start_actor(staging: Staging, cfg: EmbedConfig):
    """The build's embed actor (``embed._ShardEmbedder``) on a local Ray, its model loaded."""
    import ray

    from dataprep.embed import _ShardEmbedder
    from dataprep.ray_session import init_ray

    init_ray(None, num_cpus=max(1, cfg.threads_per_worker))
    actor_class = ray.remote(num_cpus=cfg.cpus_per_worker)(_ShardEmbedder)
    actor = actor_class.remote(staging, cfg, "actor")
    ray.get(actor.__ray_ready__.remote())
    return actor


def time_actor(staging: Staging, shards: int, actor) -> float:
    """The shards through the actor, one call per shard as the build makes them."""
    import ray

    for key in staging.store.list(staging.prefix(EMBED) + "/"):
        staging.store.delete(key)
    started = time.perf_counter()
    for shard in range(shards):
        ray.get(actor.run.remote(shard))
    return time.perf_counter() - started


def profile_stage(staging: Staging, shards: int, embedder: Embedder) -> Timers:
    """The stage's parts one after the other, each timed: what prefetching has to hide."""
    t = Timers()
    model, batch = embedder.bundle.model, embedder.batch_size
    for shard in range(shards):
        with t("filter table"):
            wanted = set(staging.kept_keys(FILTER, shard))
        with t("read tar"):
            samples = [(k, f) for k, f in staging.samples(shard) if k in wanted]
        keys = [k for k, _ in samples]
        jpegs = [f["jpg"] for _, f in samples]
        captions = [f["txt"].decode("utf-8", errors="replace") for _, f in samples]
        images, texts = [], []
        for i in range(0, len(keys), batch):
            with t("decode + transform"):
                pixels = embedder.preprocess(jpegs[i : i + batch])
            with t("tokenise"):
                tokens = embedder.tokenize(captions[i : i + batch])
            with torch.inference_mode():
                with t("forward image"):
                    images.append(model.encode_image(pixels, normalize=True).float().numpy())
                with t("forward text"):
                    texts.append(model.encode_text(tokens, normalize=True).float().numpy())
        with t("write .npy + table"):
            image, text = np.concatenate(images), np.concatenate(texts)
            scores = (image * text).sum(1).astype(np.float32)
            table = pa.table(
                {"key": keys, "reason": [KEPT] * len(keys), "clip_score": scores},
                schema=EMBED_SCHEMA,
            )
            stats = StageStats.of(f"{EMBED}-profile", shard, "profile", [KEPT] * len(keys))
            staging.commit(
                stats, table, {"image.npy": npy_bytes(image), "text.npy": npy_bytes(text)}
            )
    return t


def time_forward(embedder: Embedder, pixels: torch.Tensor, captions: list[str]) -> float:
    batch = embedder.batch_size
    started = time.perf_counter()
    for i in range(0, len(captions), batch):
        embedder.forward(pixels[i : i + batch], captions[i : i + batch])
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="clip-tiny")
    p.add_argument("--weights", default=None, help="open_clip state dict (default: random init)")
    p.add_argument("--image-size", type=int, default=64, help="size the crawl stores")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--prefetch", type=int, default=None, help="embed_shard's prefetch (default: its own)"
    )
    p.add_argument("--profile", action="store_true", help="then time each part of the stage")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            from dataprep.clip_models import create_clip

            weights = f"{tmp}/random.pt"
            torch.save(create_clip(args.model).model.state_dict(), weights)
        staging = Staging(open_store(f"file://{tmp}/store"), "bench")
        samples = write_crawl(staging, args.shards, args.per_shard, args.image_size)
        filter_shards(staging, list(range(args.shards)), FilterConfig(min_image_side=0))
        cfg = EmbedConfig(
            model=args.model,
            weights=weights,
            batch_size=args.batch_size,
            threads_per_worker=args.threads,
        )
        embedder = Embedder(cfg)
        pixels = embedder.preprocess([jpeg for jpeg, _ in samples])
        captions = [caption for _, caption in samples]
        time_forward(embedder, pixels[: args.batch_size], captions[: args.batch_size])  # warm-up
        actor = start_actor(staging, cfg.model_copy(update={"cpus_per_worker": args.threads}))
        stage_s, actor_s, forward_s = [], [], []
        for round_ in range(args.repeats):
            stage_s.append(time_stage(staging, args.shards, embedder, round_, args.prefetch))
            actor_s.append(time_actor(staging, args.shards, actor))
            forward_s.append(time_forward(embedder, pixels, captions))
            print(
                f"round {round_}: stage {len(samples) / stage_s[-1]:.0f} images/s, "
                f"through a Ray actor {len(samples) / actor_s[-1]:.0f} images/s, "
                f"forward {len(samples) / forward_s[-1]:.0f} images/s",
                flush=True,
            )
        if args.profile:
            timers = profile_stage(staging, args.shards, embedder)
    stage = len(samples) / statistics.median(stage_s)
    on_ray = len(samples) / statistics.median(actor_s)
    forward = len(samples) / statistics.median(forward_s)
    print(
        f"\n{args.model} at {args.image_size} px, {len(samples)} images, batch {args.batch_size}, "
        f"{args.threads} threads, median of {args.repeats}:"
    )
    print(f"  embed stage (store -> decode -> model -> .npy): {stage:8.0f} images/s")
    print(f"  model forward on pre-decoded tensors:            {forward:8.0f} images/s")
    print(f"  the same through the build's Ray actor:          {on_ray:8.0f} images/s")
    print(f"  ratio: {stage / forward:.2f} (target >= 0.8)")
    print(f"  ratio through the Ray actor: {on_ray / forward:.2f} (target >= 0.76)")
    if args.profile:
        total = sum(timers.wall.values())
        print(f"\nthe stage's parts one after the other, per shard of {args.per_shard}:")
        for name, wall in timers.wall.items():
            print(
                f"  {name:20s} {1e3 * wall / args.shards:8.1f} ms wall {100 * wall / total:5.1f}%"
                f"  {1e3 * timers.cpu[name] / args.shards:8.1f} ms CPU"
            )
        print(f"  {'total':20s} {1e3 * total / args.shards:8.1f} ms wall")


if __name__ == "__main__":
    main()
