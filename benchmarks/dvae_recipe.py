"""How well does a small dVAE keep the sample web's colours? One process, no Ray, fp32.

Trains ``dvae`` variants on pre-decoded clean sample-web images (as the crawl stores them,
resized to the dVAE's input) and prints, on held-out images coded with hard argmax codes: the
reconstruction MSE, the codes used, and the share of reconstructions whose dominant colour
(training.colour_match) is the picture's colour (the originals' share is the ceiling). The
DALL-E samples cannot show a colour the dVAE does not reconstruct, so this is the first thing to
get right for the colour target of the demo.

    .venv/bin/python benchmarks/dvae_recipe.py                       # dvae-tiny as configured
    .venv/bin/python benchmarks/dvae_recipe.py --set kl_weight=6.6 reconstruction=logit_laplace
    .venv/bin/python benchmarks/dvae_recipe.py --set downsampling=8 --steps 300 --lr 1e-3

What it measured, and how that shaped configs/dvae-tiny.yaml: docs/recipes.md (dvae-tiny). The
defaults here are the settings those figures were measured with; they were taken at width 16
(``--set hidden=16``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataprep.sampleweb.corpus import generate_corpus  # noqa: E402
from pipelines.config import apply_override  # noqa: E402
from training.colour_match import dominant_colour  # noqa: E402
from training.evaluate import heldout_sampleweb  # noqa: E402
from training.models.dvae import (  # noqa: E402
    DVAE,
    DVAEConfig,
    dvae_loss,
    kl_weight_at,
    temperature_at,
)
from training.specs.dvae import image_transform  # noqa: E402


def images(n: int, seed: int, size: int) -> tuple[torch.Tensor, list[str]]:
    transform = image_transform(size)
    pil, _, _ = heldout_sampleweb(n, seed, 64)
    colours = [spec.colour for spec in generate_corpus(n, seed, fault_rates={})]
    return torch.stack([transform(image) for image in pil]), colours


def train(
    cfg: DVAEConfig,
    data: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    beta2: float,
    seed: int,
    warmup: int,
) -> DVAE:
    torch.manual_seed(seed)
    model = DVAE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.0)
    draw = torch.Generator().manual_seed(seed)
    for step in range(steps):
        ramp = min(1.0, (step + 1) / warmup)
        for group in opt.param_groups:
            group["lr"] = lr * ramp * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(data), (batch,), generator=draw)
        loss = dvae_loss(model, data[idx], temperature_at(cfg, step), kl_weight_at(cfg, step), cfg)
        opt.zero_grad()
        loss["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


@torch.no_grad()
def measure(model: DVAE, held: torch.Tensor, colours: list[str]) -> dict[str, float]:
    codes = model.encode(held)
    rebuilt = model.decode(codes).float()
    hits = sum(dominant_colour(r) == c for r, c in zip(rebuilt, colours, strict=True))
    ceiling = sum(dominant_colour(h) == c for h, c in zip(held, colours, strict=True))
    return {
        "mse": float((rebuilt - held).square().mean()),
        "codes_used": codes.unique().numel(),
        "colour": hits / len(colours),
        "colour_originals": ceiling / len(colours),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="dvae-tiny")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config fields")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--beta2", type=float, default=0.99, help="AdamW beta2 (configs/dvae-tiny)")
    p.add_argument("--warmup", type=int, default=20, help="linear lr warmup steps")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    p.add_argument("--train-n", type=int, default=2000)
    p.add_argument("--heldout-n", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fields: dict = {}
    for item in args.set:
        apply_override(fields, item)
    cfg = DVAEConfig.named(args.model, **fields)
    data, _ = images(args.train_n, 7, cfg.image_size)
    held, colours = images(args.heldout_n, 1000, cfg.image_size)
    started = time.monotonic()
    model = train(cfg, data, args.steps, args.batch, args.lr, args.beta2, args.seed, args.warmup)
    result = measure(model, held, colours)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
    elapsed = time.monotonic() - started
    settings = f"{' '.join(args.set)} lr {args.lr} warmup {args.warmup} seed {args.seed}"
    print(f"{args.model} {settings}: {shown}, {elapsed:.0f} s")


if __name__ == "__main__":
    main()
