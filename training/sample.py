"""Text to images with DALL-E: sample codes, decode them with the dVAE, re-rank with CLIP.

For each caption, ``candidates`` code grids are sampled autoregressively (temperature, then
top-k and/or top-p filtering of the next-code distribution), decoded to pixels by the dVAE and
ordered by a CLIP's image-text similarity (the paper re-ranks 512 samples per caption with
CLIP and shows the best). Sampling uses the transformer's KV cache: one position per step, each
attending the cached keys through its layer's mask. Results are deterministic for a seed.

    dalle, dvae = load_pipeline("dalle.pt")
    clip = create_clip("clip-tiny", pretrained="open_clip_pytorch_model.bin")
    results = generate(dalle, dvae, ["a small red circle"], Sampling(candidates=8), clip)
    write_grid(results, "samples.png")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from dataprep.store import local_copy
from training.models.bpe import DalleTokenizer
from training.models.dalle import Dalle
from training.models.dvae import DVAE, load_dvae


@dataclass(frozen=True)
class Sampling:
    candidates: int = 8  # images sampled per caption, before re-ranking
    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely codes
    top_p: float | None = None  # keep the smallest set of codes with this much probability
    seed: int = 0
    batch_size: int = 64  # candidates decoded at once
    use_cache: bool = True  # False: a full forward pass per code (the reference)


@dataclass
class Generation:
    caption: str
    images: torch.Tensor  # [n, 3, H, W] in [0, 1], best first when re-ranked
    codes: torch.Tensor  # [n, h, w]
    clip_scores: torch.Tensor | None  # [n] cosine similarity to the caption, descending


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """logits [B, V] with everything outside the top-k / top-p nucleus set to -inf."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a code when the codes before it already reach top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One code per row of logits [B, V] -> [B]."""
    logits = filter_logits(logits.float() / max(s.temperature, 1e-6), s.top_k, s.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_codes(
    model: Dalle, text: torch.Tensor, s: Sampling, generator: torch.Generator
) -> torch.Tensor:
    """text [B, T] (with pads) -> image codes [B, N], sampled in raster order."""
    cfg = model.config
    codes = torch.zeros(text.shape[0], cfg.image_len, dtype=torch.long, device=text.device)
    if s.use_cache:
        cache = model.new_cache(text.shape[0])
        logits = model.step(text, cache)  # the prompt; predicts code 0
        for p in range(cfg.image_len):
            codes[:, p] = sample_next(logits, s, generator)
            if p + 1 < cfg.image_len:
                logits = model.step(codes[:, p : p + 1], cache)
        return codes
    for p in range(cfg.image_len):  # later codes are zeros: causal masks keep them unseen
        _, image_logits = model(text, codes)
        codes[:, p] = sample_next(image_logits[:, p], s, generator)
    return codes


@torch.no_grad()
def clip_scores(clip: Any, images: torch.Tensor, caption: str) -> torch.Tensor:
    """Cosine similarity of each image [n, 3, H, W] in [0, 1] to ``caption``: [n].

    ``clip``: a ClipBundle (training.models.clip.create_clip), i.e. an open_clip model with its
    eval transform and tokenizer.
    """
    pil = [Image.fromarray(_to_uint8(image)) for image in images]
    batch = torch.stack([clip.eval_transform(image) for image in pil])
    model = clip.model.eval()
    image_features = F.normalize(model.encode_image(batch).float(), dim=-1)
    text_features = F.normalize(model.encode_text(clip.tokenizer([caption])).float(), dim=-1)
    return (image_features @ text_features.T).squeeze(-1)


@torch.no_grad()
def generate(
    dalle: Dalle,
    dvae: DVAE,
    captions: list[str],
    sampling: Sampling = Sampling(),
    clip: Any | None = None,
) -> list[Generation]:
    """``sampling.candidates`` images per caption, best first by CLIP when ``clip`` is given."""
    cfg = dalle.config
    tokenizer = DalleTokenizer(cfg.text_vocab, cfg.text_len)
    generator = torch.Generator().manual_seed(sampling.seed)
    dalle.eval()
    dvae.eval()
    results = []
    for caption in captions:
        text = tokenizer([caption])
        chunks = []
        for start in range(0, sampling.candidates, sampling.batch_size):
            n = min(sampling.batch_size, sampling.candidates - start)
            chunks.append(sample_codes(dalle, text.repeat(n, 1), sampling, generator))
        codes = torch.cat(chunks).view(-1, cfg.image_grid, cfg.image_grid)
        images = dvae.decode(codes).float()
        scores = None
        if clip is not None:
            scores = clip_scores(clip, images, caption)
            order = scores.argsort(descending=True)
            images, codes, scores = images[order], codes[order], scores[order]
        results.append(Generation(caption, images, codes, scores))
    return results


def load_pipeline(dalle_checkpoint: str | Path, dvae_checkpoint: str | None = None):
    """The exported transformer and the dVAE it names (or ``dvae_checkpoint``)."""
    from training.specs.dalle import check_compatible, load_dalle

    dalle, named = load_dalle(dalle_checkpoint)
    uri = dvae_checkpoint or named
    if uri is None:
        raise ValueError(f"{dalle_checkpoint} names no dVAE: pass dvae_checkpoint")
    dvae = load_dvae(local_copy(uri))
    check_compatible(dalle.config, dvae)
    return dalle, dvae


def _to_uint8(image: torch.Tensor) -> Any:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def write_grid(
    results: list[Generation], path: str | Path, cell: int = 96, columns: int | None = None
) -> Path:
    """One row per caption (caption above, CLIP score under each image), as a PNG."""
    columns = columns or max(len(r.images) for r in results)
    label_h, score_h, pad = 16, 14, 4
    row_h = label_h + cell + score_h + pad
    grid = Image.new("RGB", (columns * (cell + pad) + pad, len(results) * row_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for row, result in enumerate(results):
        top = pad + row * row_h
        draw.text((pad, top), result.caption[:120], fill="black")
        for col, image in enumerate(result.images[:columns]):
            left = pad + col * (cell + pad)
            tile = Image.fromarray(_to_uint8(image)).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (left, top + label_h))
            if result.clip_scores is not None:
                score = f"{float(result.clip_scores[col]):.3f}"
                draw.text((left, top + label_h + cell + 1), score, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
