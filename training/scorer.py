"""A CLIP scorer for the dataset build: a tiny CLIP trained on a separate seed of the sample web.

The build's CLIP-score stage needs a model that knows which caption goes with which image. For
the sample web that model is trained here, in one process on pre-decoded images (no Ray, no
DeepSpeed: a minute or two on 2 CPUs), on *clean* samples of a seed the served web never uses,
made exactly as the crawl stores them (border-resized, JPEG re-encoded). Then it is calibrated
on another seed: the cosine scores of true pairs and of mismatched pairs (a caption of an image
whose shape and colour both differ) give the threshold that separates them best.

The weights are an open_clip state dict (``create_clip(name, pretrained=path)`` loads them);
``<path>.json`` beside them records the recipe, the weights' sha256 and the calibration.
``ensure_scorer`` trains once and reuses the file while the recipe and the architecture
(``dataprep/model_configs/clip-scorer-tiny.json``, the first clip-tiny, kept fixed for the
scorer) are unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from dataprep.sampleweb.corpus import generate_corpus, render_image
from training.evaluate import crawl_border_resize, encode_images, encode_texts, preprocess_images
from training.losses import ClipLoss, clamp_logit_scale
from training.models.clip import ClipBundle, create_clip, param_groups, register_model_configs

#: Seeds no served sample web uses (the demo serves seed 0, tests 3 and 5).
TRAIN_SEED = 101
CALIBRATION_SEED = 102


class ScorerRecipe(BaseModel):
    """Everything that determines the scorer's weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "clip-scorer-tiny"  # fixed architecture, unlike the clip-tiny training recipe
    # 4,000 pairs x 300 steps: at 2,000 x 200 the scorer misread small low-contrast shapes
    # (yellow on white) and dropped 0.5% of true pairs (benchmarks/quality.py)
    train_n: int = 4000
    train_seed: int = TRAIN_SEED
    image_size: int = 64  # as the crawl stores images (crawl.image_size)
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    calibration_n: int = 600
    calibration_seed: int = CALIBRATION_SEED


class ScorerCard(BaseModel):
    """What a trained scorer is: its recipe, its weights and how its scores separate pairs."""

    recipe: ScorerRecipe
    architecture: dict  # the open_clip model config the weights belong to
    weights: str  # local path of the open_clip state dict
    sha256: str
    threshold: float  # cosine score separating true from mismatched pairs on the calibration set
    calibration_accuracy: float  # share of calibration pairs (true + mismatched) on the right side
    matched_mean: float
    mismatched_mean: float
    train_s: float


def sampleweb_pairs(n: int, seed: int, image_size: int) -> tuple[list[Image.Image], list]:
    """Clean sample-web images as the crawl stores them, with their specs."""
    images, specs = [], []
    for spec in generate_corpus(n, seed, fault_rates={}):
        jpeg = crawl_border_resize(render_image(spec), image_size)
        images.append(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        specs.append(spec)
    render_image.cache_clear()
    return images, specs


def _lr_at(step: int, recipe: ScorerRecipe) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * progress))


def train_clip_scorer(recipe: ScorerRecipe, log: Callable[[str], None] | None = None) -> ClipBundle:
    """Plain-torch contrastive training on pre-decoded images; returns the trained bundle."""
    torch.manual_seed(recipe.seed)
    bundle = create_clip(recipe.model)
    model = bundle.model.train()
    images, specs = sampleweb_pairs(recipe.train_n, recipe.train_seed, recipe.image_size)
    pixels = preprocess_images(images, bundle.eval_transform)  # [N, 3, S, S]
    tokens = bundle.tokenizer([s.caption for s in specs])  # [N, L]
    optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), betas=(0.9, 0.98))
    loss_fn = ClipLoss()
    order = torch.empty(0, dtype=torch.long)
    for step in range(recipe.steps):
        if len(order) < recipe.batch_size:
            order = torch.randperm(len(tokens))
        idx, order = order[: recipe.batch_size], order[recipe.batch_size :]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe)
        loss = loss_fn(*model(pixels[idx], tokens[idx]))["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clamp_logit_scale(model)
        if log is not None and (step + 1) % 50 == 0:
            log(f"scorer step {step + 1}/{recipe.steps}: loss {loss.item():.3f}")
    model.eval()
    return bundle


def mismatched_captions(specs: list, seed: int) -> list[str]:
    """For each spec, the caption of another spec whose shape and colour both differ
    (the sample web's ``mismatched_caption`` fault)."""
    rng = random.Random(seed)
    out = []
    for spec in specs:
        while True:
            donor = specs[rng.randrange(len(specs))]
            if donor.shape != spec.shape and donor.colour != spec.colour:
                out.append(donor.caption)
                break
    return out


def best_threshold(matched: torch.Tensor, mismatched: torch.Tensor) -> tuple[float, float]:
    """(threshold, accuracy): the cut between the two score sets with the fewest errors; where
    several cuts tie, halfway across the range they span (the widest margin)."""
    scores = torch.cat([matched, mismatched])
    is_match = torch.cat([torch.ones_like(matched), torch.zeros_like(mismatched)]).bool()
    order = scores.argsort()
    scores, is_match = scores[order], is_match[order]
    # Cut after position i: below it counted as mismatched. Errors = matches below + rest above.
    matches_below = torch.cumsum(is_match.long(), 0)
    mismatches_above = (~is_match).sum() - torch.cumsum((~is_match).long(), 0)
    errors = matches_below + mismatches_above
    best = torch.nonzero(errors == errors.min()).flatten()
    # Among equally good cuts (a gap between the two sets), take the middle of the gap.
    first, last = int(best[0]), int(best[-1])
    upper = scores[last + 1] if last + 1 < len(scores) else scores[last] + 1e-3
    accuracy = 1.0 - float(errors[first]) / len(scores)
    return float((scores[first] + upper) / 2), accuracy


def pair_scores(bundle: ClipBundle, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
    """Cosine image-text score of each (image, caption) pair [N]."""
    image_features = encode_images(bundle.model, preprocess_images(images, bundle.eval_transform))
    text_features = encode_texts(bundle.model, bundle.tokenizer, captions)
    return (image_features * text_features).sum(-1)


def calibrate(bundle: ClipBundle, recipe: ScorerRecipe) -> dict[str, float]:
    images, specs = sampleweb_pairs(
        recipe.calibration_n, recipe.calibration_seed, recipe.image_size
    )
    matched = pair_scores(bundle, images, [s.caption for s in specs])
    mismatched = pair_scores(bundle, images, mismatched_captions(specs, recipe.calibration_seed))
    threshold, accuracy = best_threshold(matched, mismatched)
    return {
        "threshold": round(threshold, 6),
        "calibration_accuracy": accuracy,
        "matched_mean": float(matched.mean()),
        "mismatched_mean": float(mismatched.mean()),
    }


def architecture(model: str) -> dict:
    """The open_clip config of ``model``: a changed architecture invalidates trained weights."""
    register_model_configs()
    return open_clip.get_model_config(model) or {}


def card_path(weights: str | Path) -> Path:
    return Path(f"{weights}.json")


def train_scorer(
    weights: str | Path,
    recipe: ScorerRecipe | None = None,
    log: Callable[[str], None] | None = None,
) -> ScorerCard:
    """Train, calibrate and save a scorer to ``weights`` (+ its card beside it)."""
    recipe = recipe or ScorerRecipe()
    weights = Path(weights)
    started = time.monotonic()
    bundle = train_clip_scorer(recipe, log)
    train_s = time.monotonic() - started
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f".{weights.name}.tmp")
    torch.save(bundle.model.state_dict(), tmp)
    tmp.replace(weights)
    card = ScorerCard(
        recipe=recipe,
        architecture=architecture(recipe.model),
        weights=str(weights),
        sha256=file_sha256(weights),
        train_s=round(train_s, 1),
        **calibrate(bundle, recipe),
    )
    card_path(weights).write_text(card.model_dump_json(indent=2))
    return card


def ensure_scorer(
    weights: str | Path,
    recipe: ScorerRecipe | None = None,
    log: Callable[[str], None] | None = None,
) -> ScorerCard:
    """The scorer at ``weights`` if it was made by ``recipe`` and is intact; else train it."""
    recipe = recipe or ScorerRecipe()
    Path(weights).parent.mkdir(parents=True, exist_ok=True)
    # One trainer at a time: a second caller waits, then finds the file made.
    with open(f"{weights}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        card_file = card_path(weights)
        if card_file.is_file() and Path(weights).is_file():
            card = ScorerCard.model_validate_json(card_file.read_text())
            same = (card.recipe, card.architecture) == (recipe, architecture(recipe.model))
            if same and card.sha256 == file_sha256(weights):
                return card
        return train_scorer(weights, recipe, log)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
