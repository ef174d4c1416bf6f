"""The clip-tiny recipe, kept as a reproducible record: train on the sample web, watch zero-shot.

Single process, ``torch.set_num_threads(2)``: about the throughput of the engine's 2 Ray workers x
1 thread.  Train data comes straight from the sample-web generator (training seed, default fault
mix), made exactly as the demo crawl makes it: what a correct crawler keeps (mismatched and empty
captions included), border-resized to 64 px and JPEG re-encoded like img2dataset.  The crawled
JPEGs are cached under ``state/cache/clip_recipe``.  Held-out images come from another seed,
clean only.  Zero-shot top-1 and retrieval R@1 are printed every ``--eval-every`` steps against
*training* seconds (evaluation time excluded and reported separately).

    .venv/bin/python benchmarks/clip_recipe.py                    # the recipe (about 6 minutes)
    .venv/bin/python benchmarks/clip_recipe.py --steps 600        # the short `make demo` schedule
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.metering import Timers, own_cpu_s  # noqa: E402
from dataprep.clip_models import ClipBundle, create_clip, register_model_configs  # noqa: E402
from dataprep.sampleweb.corpus import COLOURS, generate_corpus, render_image  # noqa: E402
from training.evaluate import (  # noqa: E402
    HELDOUT_SEED,
    classifier_from_prompts,
    crawl_border_resize,
    encode_images,
    heldout_sampleweb,
    preprocess_images,
    sampleweb_label,
    sampleweb_metrics,
    sampleweb_zero_shot_setup,
    zero_shot_accuracy,
)
from training.losses import ClipLoss, clamp_logit_scale  # noqa: E402
from training.models.clip import param_groups  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / "state" / "cache" / "clip_recipe"
CRAWL_SIZE = 64  # configs/demo.yaml crawl.image_size
#: Fetchable samples the demo crawl still refuses (min_image_size 16, max_aspect_ratio 4).
CRAWL_REFUSES = {"tiny_image", "extreme_aspect"}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def crawled_specs(n: int, seed: int) -> list:
    """The specs of a sample web of ``n`` (default fault mix) that the demo crawl keeps."""
    return [
        spec
        for spec in generate_corpus(n, seed)
        if spec.fetchable and spec.fault not in CRAWL_REFUSES
    ]


def crawled_corpus(n: int, seed: int) -> tuple[list[bytes], list[str]]:
    """(JPEG bytes, captions) the demo crawl would store for a sample web of ``n`` (cached)."""
    path = CACHE / f"train-n{n}-seed{seed}-{CRAWL_SIZE}px.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    jpegs, captions = [], []
    for spec in crawled_specs(n, seed):
        jpegs.append(crawl_border_resize(render_image(spec), CRAWL_SIZE))
        captions.append(spec.caption)
    render_image.cache_clear()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps((jpegs, captions)))
    return jpegs, captions


def decode(jpegs: list[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]


class TrainData:
    """Shuffled epochs of (images [B, 3, S, S], tokens [B, L]).

    Without random augmentation the train transform is deterministic, so images are
    transformed once up front; otherwise each batch goes through ``train_transform``.
    """

    def __init__(self, bundle: ClipBundle, jpegs: list[bytes], captions: list[str], augment: bool):
        self.images = decode(jpegs)
        self.tokens = bundle.tokenizer(captions)  # [N, L]
        self.transform = bundle.train_transform
        self.augment = augment
        self.cached = None if augment else preprocess_images(self.images, self.transform)
        self.order = torch.empty(0, dtype=torch.long)
        self.epochs = 0

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.order) < size:  # drop the remainder, start a new epoch
            self.order, self.epochs = torch.randperm(len(self.tokens)), self.epochs + 1
        idx, self.order = self.order[:size], self.order[size:]
        if self.cached is not None:
            return self.cached[idx], self.tokens[idx]
        images = preprocess_images([self.images[i] for i in idx.tolist()], self.transform)
        return images, self.tokens[idx]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 0 at ``args.steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.5 * args.lr * (1 + math.cos(math.pi * progress))


@dataclass
class EvalSet:
    images: torch.Tensor  # [N, 3, S, S], eval transform applied
    labels: torch.Tensor  # [N] class index (shape-major, see sampleweb_classnames)
    captions: list[str]


def evaluate(bundle: ClipBundle, heldout: EvalSet, train: EvalSet, prompts: list) -> dict:
    """Held-out zero-shot top-1/5 (+ shape / colour part of top-1) and retrieval R@1, and the
    zero-shot top-1 on training images (the generalisation gap)."""
    model, tokenizer = bundle.model, bundle.tokenizer
    metrics = sampleweb_metrics(
        model, tokenizer, heldout.images, heldout.labels, heldout.captions, prompts
    )
    classifier = classifier_from_prompts(model, tokenizer, prompts)  # [D, C]
    predicted = (encode_images(model, heldout.images) @ classifier).argmax(1)  # [N]
    n_colours = len(COLOURS)
    metrics["shape_acc"] = (predicted // n_colours == heldout.labels // n_colours).float().mean()
    metrics["colour_acc"] = (predicted % n_colours == heldout.labels % n_colours).float().mean()
    metrics["train_top1"] = zero_shot_accuracy(model, classifier, train.images, train.labels)[
        "top1"
    ]
    return {k: float(v) for k, v in metrics.items()}


def train(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    if args.config:
        register_model_configs(args.config)
    overrides = {"aug_cfg": {"scale": tuple(args.aug_scale)}} if args.aug_scale else {}
    if args.image_size:
        overrides["force_image_size"] = args.image_size
    for item in args.set:  # model constructor kwargs, e.g. init_logit_scale=3.9
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value)
    bundle = create_clip(args.model, **overrides)
    model = bundle.model
    augment = bool(args.aug_scale) and tuple(args.aug_scale) != (1.0, 1.0)

    t0 = time.time()
    jpegs, captions = crawled_corpus(args.train_n, args.train_seed)
    data = TrainData(bundle, jpegs, captions, augment)
    images, labels, heldout_captions = heldout_sampleweb(args.heldout_n, HELDOUT_SEED, CRAWL_SIZE)
    heldout = EvalSet(preprocess_images(images, bundle.eval_transform), labels, heldout_captions)
    train_specs = crawled_specs(args.train_n, args.train_seed)[: args.heldout_n]
    train_set = EvalSet(
        preprocess_images(decode(jpegs[: args.heldout_n]), bundle.eval_transform),
        torch.tensor([sampleweb_label(s.shape, s.colour) for s in train_specs]),
        captions[: args.heldout_n],
    )
    _, prompts = sampleweb_zero_shot_setup(args.fillings)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# data ready in {time.time() - t0:.1f}s: {len(captions)} train pairs "
        f"({sum(not c for c in captions)} empty captions), {len(labels)} held-out; "
        f"model {args.model} {n_params / 1e6:.2f}M params, image {heldout.images.shape[-1]}px",
        flush=True,
    )

    optimizer = torch.optim.AdamW(
        param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=True
    )
    loss_fn = ClipLoss()
    curve: list[dict] = []
    timers = Timers()  # "train" and "eval": wall and CPU seconds
    losses: list[float] = []  # since the last evaluation
    cpu0 = own_cpu_s()
    print(
        "train_s  cpu/2  step epoch   loss  scale  ptop1   top1   top5  shape colour  i2t@1  t2i@1  train1",
        flush=True,
    )
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            with timers("eval"):
                metrics = evaluate(bundle, heldout, train_set, prompts)
            train_s, train_cpu_s = timers.wall.get("train", 0.0), timers.cpu.get("train", 0.0)
            loss_mean = sum(losses) / len(losses) if losses else float("nan")
            point = {"train_s": round(train_s, 1), "cpu_s": round(train_cpu_s, 1), "step": step}
            point["epoch"] = data.epochs
            point |= {"loss": loss_mean, "logit_scale": model.logit_scale.exp().item()} | metrics
            curve.append(point)
            losses.clear()
            print(
                f"{train_s:7.1f} {train_cpu_s / 2:6.1f} {step:5d} {data.epochs:5d} {point['loss']:6.3f} "
                f"{point['logit_scale']:6.2f} {metrics['prob_ensemble_top1']:6.3f} "
                f"{metrics['top1']:6.3f} {metrics['top5']:6.3f} "
                f"{metrics['shape_acc']:6.3f} {metrics['colour_acc']:6.3f} "
                f"{metrics['image_to_text_R@1']:6.3f} {metrics['text_to_image_R@1']:6.3f} "
                f"{metrics['train_top1']:7.3f}",
                flush=True,
            )
        if step == args.steps:
            break
        with timers("train"):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            x, tokens = data.batch(args.batch)
            image_features, text_features, scale = model(x, tokens)
            loss = loss_fn(image_features, text_features, scale)["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clamp_logit_scale(model)
            losses.append(loss.item())

    train_s, eval_s = timers.wall.get("train", 0.0), timers.wall["eval"]
    cpu_per_wall = (own_cpu_s() - cpu0) / max(1e-9, train_s + eval_s)
    final = curve[-1]
    print(
        f"# final: zero-shot top1 {final['prob_ensemble_top1']:.3f} (probability-space "
        f"ensemble), {final['top1']:.3f} (embedding space); "
        f"i2t@1 {final['image_to_text_R@1']:.3f} t2i@1 {final['text_to_image_R@1']:.3f} after "
        f"{train_s:.0f}s training ({args.steps} steps, {data.epochs} epochs), {eval_s:.0f}s eval; "
        f"{args.steps * args.batch / train_s:.0f} samples/s; "
        f"CPU use {cpu_per_wall:.2f} cores (2.0 = uncontended)",
        flush=True,
    )
    if args.save:
        torch.save(model.state_dict(), args.save)
    return curve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="clip-tiny")
    p.add_argument("--config", default=None, help="extra open_clip config file or folder")
    p.add_argument("--image-size", type=int, default=None, help="force_image_size override")
    p.add_argument("--train-n", type=int, default=12000, help="sample-web size (before faults)")
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--heldout-n", type=int, default=800)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--aug-scale", type=float, nargs=2, default=None, help="RandomResizedCrop")
    p.add_argument("--fillings", type=int, default=None, help="prompt fillings per template")
    p.add_argument("--set", action="append", default=[], help="model kwarg KEY=JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", default=None, help="write the final state dict here")
    p.add_argument("--json", default=None, help="write the curve here")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    curve = train(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
