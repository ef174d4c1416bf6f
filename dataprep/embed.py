"""CLIP embedding and CLIP score: a distributed map over shards on Ray, then a threshold.

Embedding (``embed`` stage): Ray actors, each loading the CLIP model once, take whole shards from
a queue (``ActorPool``). For its shard an actor streams the crawl tar, decodes the samples the
filters kept, embeds image and caption in batches and publishes beside the shards
``embed/NNNNN.image.npy`` and ``NNNNN.text.npy`` (float32 [N, D], L2-normalised, row i = row i of
the table), ``NNNNN.parquet`` (``key``, ``clip_score`` = cosine of the pair) and the stats last.
The embed stage drops nothing: it records. The same code runs on a laptop's local Ray or on a
cluster (``ray_address``; ``gpus_per_worker`` puts each actor on a GPU), with the store shared.

Score (``score`` stage): keep pairs by an absolute threshold (LAION: 0.28 for ViT-B/32) or the
top fraction of the build (DataComp: 0.3), applied to the recorded scores. Changing it redoes
only this stage and what follows, never the embeddings (NeMo Curator's "score, then filter").
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dataprep.filters import STAGE as FILTER
from dataprep.stages import KEPT, StageError, StageStats, Staging, fingerprint
from dataprep.store import ObjectNotFound

log = logging.getLogger(__name__)

EMBED = "embed"
SCORE = "score"
EMBED_SCHEMA = pa.schema(
    [("key", pa.string()), ("reason", pa.string()), ("clip_score", pa.float32())]
)


class EmbedConfig(BaseModel):
    """Which CLIP embeds, and how the work is spread over Ray."""

    model_config = ConfigDict(extra="forbid")

    # An open_clip architecture (mmpipe's configs/models or a built-in such as ViT-B-32);
    # clip-scorer-tiny is the scorer training.scorer trains for the sample web.
    model: str = "clip-scorer-tiny"
    weights: str | None = None  # local open_clip state dict; required to build a dataset
    weights_sha256: str | None = None  # filled in by the build: the scorer's identity
    batch_size: int = Field(256, ge=1)
    workers: int = Field(1, ge=1)  # Ray actors, each with its own copy of the model
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    threads_per_worker: int = Field(1, ge=1)  # torch intra-op threads in an actor
    ray_address: str | None = None  # None: the current Ray, or a new local one


class ScoreConfig(BaseModel):
    """Keep a pair by its CLIP score: an absolute threshold or the build's top fraction. With
    neither, the threshold calibrated for the scorer (its card, ``<weights>.json``) is used."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=-1.0, le=1.0)  # keep score >= threshold
    top_fraction: float | None = Field(None, gt=0.0, le=1.0)  # keep the best fraction

    @model_validator(mode="after")
    def _at_most_one(self) -> ScoreConfig:
        if self.threshold is not None and self.top_fraction is not None:
            raise ValueError("set score.threshold or score.top_fraction, not both")
        return self


def calibrated_threshold(weights: str) -> float | None:
    """The threshold recorded in the scorer's card beside its weights, if there is one."""
    card = Path(f"{weights}.json")
    if not card.is_file():
        return None
    value = json.loads(card.read_text()).get("threshold")
    return float(value) if value is not None else None


# --------------------------------------------------------------------------- embedding


class Embedder:
    """A CLIP model loaded once, embedding (JPEG bytes, caption) batches."""

    def __init__(self, cfg: EmbedConfig) -> None:
        import torch

        from training.models.clip import create_clip

        if cfg.weights is None:
            raise ValueError("embed.weights is not set: give a local open_clip state dict")
        torch.set_num_threads(cfg.threads_per_worker)
        device = "cuda" if cfg.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.bundle = create_clip(cfg.model, pretrained=cfg.weights, device=device)
        self.bundle.model.eval()
        self.device = device
        self.batch_size = cfg.batch_size

    def preprocess(self, jpegs: list[bytes]):
        import torch

        images = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
        return torch.stack([self.bundle.eval_transform(im) for im in images])

    def forward(self, pixels, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Normalised image and text embeddings [B, D] of preprocessed pixels and captions."""
        import torch

        model = self.bundle.model
        with torch.inference_mode():
            image = model.encode_image(pixels.to(self.device), normalize=True)
            tokens = self.bundle.tokenizer(captions).to(self.device)
            text = model.encode_text(tokens, normalize=True)
        return image.float().cpu().numpy(), text.float().cpu().numpy()

    def embed(self, jpegs: list[bytes], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        out = [
            self.forward(
                self.preprocess(jpegs[i : i + self.batch_size]), captions[i : i + self.batch_size]
            )
            for i in range(0, len(jpegs), self.batch_size)
        ]
        if not out:
            dim = (
                self.bundle.model.text_projection.shape[1]
                if hasattr(self.bundle.model, "text_projection")
                else 0
            )
            return np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32)
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def embed_fingerprint(filter_fp: str, cfg: EmbedConfig) -> str:
    # Only what changes the numbers: not the batching or the Ray layout.
    return fingerprint(EMBED, filter_fp, cfg.model, cfg.weights_sha256 or cfg.weights)


def embed_shard(staging: Staging, shard: int, embedder: Embedder, fp: str) -> StageStats:
    """Embed the filter-kept samples of one shard; skipped if committed with ``fp``."""
    done = staging.stats(EMBED, shard, fp)
    if done is not None:
        return done
    wanted = staging.kept_keys(FILTER, shard)
    wanted_set = set(wanted)
    jpegs, captions, keys = [], [], []
    for key, files in staging.samples(shard):
        if key in wanted_set:
            keys.append(key)
            jpegs.append(files.get("jpg") or files.get("png") or files.get("webp"))
            captions.append(files.get("txt", b"").decode("utf-8", errors="replace"))
    if keys != wanted:
        missing = sorted(wanted_set - set(keys))[:5]
        raise StageError(
            f"crawl shard {staging.uri('crawl', shard, 'tar')} lacks samples the filter kept "
            f"(e.g. {missing})"
        )
    image, text = embedder.embed(jpegs, captions)
    scores = (image * text).sum(1)
    table = pa.table(
        {"key": keys, "reason": [KEPT] * len(keys), "clip_score": scores.astype(np.float32)},
        schema=EMBED_SCHEMA,
    )
    stats = StageStats.of(EMBED, shard, fp, [KEPT] * len(keys))
    staging.commit(stats, table, {"image.npy": npy_bytes(image), "text.npy": npy_bytes(text)})
    return stats


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    return buf.getvalue()


def load_embeddings(staging: Staging, shard: int, kind: str = "image") -> np.ndarray:
    """Embeddings [N, D] of one shard, checked against its table; StageError naming the file."""
    key = staging.key(EMBED, shard, f"{kind}.npy")
    uri = staging.store.uri(key)
    try:
        array = np.load(io.BytesIO(staging.store.get_bytes(key)), allow_pickle=False)
    except ObjectNotFound:
        raise StageError(f"embedding file not found: {uri}") from None
    except (ValueError, OSError, EOFError) as e:  # what np.load raises on a damaged file
        raise StageError(f"corrupt embedding file {uri}: {e}") from e
    rows = staging.table(EMBED, shard).num_rows
    if array.ndim != 2 or array.shape[0] != rows or not np.isfinite(array).all():
        raise StageError(
            f"corrupt embedding file {uri}: shape {array.shape} (expected {rows} finite rows)"
        )
    return array


class _ShardEmbedder:
    """Ray actor: one model per actor, many shards."""

    def __init__(self, staging: Staging, cfg: EmbedConfig, fp: str) -> None:
        self.staging, self.fp = staging, fp
        self.embedder = Embedder(cfg)

    def run(self, shard: int) -> StageStats:
        return embed_shard(self.staging, shard, self.embedder, self.fp)


def embed_shards(
    staging: Staging,
    shards: list[int],
    cfg: EmbedConfig,
    filter_fp: str,
    on_shard: Callable[[StageStats], None] | None = None,
) -> list[StageStats]:
    """Embed every shard not yet committed, spread over Ray actors; stats in shard order."""
    fp = embed_fingerprint(filter_fp, cfg)
    done = {s: st for s in shards if (st := staging.stats(EMBED, s, fp)) is not None}
    todo = [s for s in shards if s not in done]
    if todo:
        for stats in _map_on_ray(staging, todo, cfg, fp):
            done[stats.shard] = stats
            if on_shard is not None:
                on_shard(stats)
    return [done[s] for s in shards]


def _map_on_ray(staging: Staging, shards: list[int], cfg: EmbedConfig, fp: str):
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=True)
    actor_class = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker)(
        _ShardEmbedder
    )
    actors = [actor_class.remote(staging, cfg, fp) for _ in range(min(cfg.workers, len(shards)))]
    try:
        pool = ActorPool(actors)
        yield from pool.map_unordered(lambda actor, shard: actor.run.remote(shard), shards)
    finally:
        for actor in actors:
            ray.kill(actor)


# --------------------------------------------------------------------------- score


def resolve_threshold(
    staging: Staging, shards: list[int], cfg: ScoreConfig, calibrated: float | None
) -> float:
    """The absolute threshold: as configured, the score of the top fraction's last pair, or the
    scorer's calibrated one."""
    if cfg.threshold is not None:
        return cfg.threshold
    if cfg.top_fraction is None:
        if calibrated is None:
            raise ValueError(
                "set score.threshold or score.top_fraction: the scorer has no calibrated "
                "threshold (no <weights>.json card with one)"
            )
        return calibrated
    scores = np.concatenate(
        [staging.table(EMBED, s)["clip_score"].to_numpy() for s in shards] or [np.zeros(0)]
    )
    if len(scores) == 0:
        return 1.0
    keep = max(1, round(cfg.top_fraction * len(scores)))
    return float(np.sort(scores)[::-1][keep - 1])


def score_fingerprint(embed_fp: str, threshold: float) -> str:
    return fingerprint(SCORE, embed_fp, round(threshold, 7))


def score_shard(staging: Staging, shard: int, threshold: float, fp: str) -> StageStats:
    """Keep the shard's pairs scoring at least ``threshold``; drops are ``low_clip_score``."""
    done = staging.stats(SCORE, shard, fp)
    if done is not None:
        return done
    table = staging.table(EMBED, shard)
    scores = table["clip_score"].to_numpy()
    reasons = [KEPT if s >= threshold else "low_clip_score" for s in scores]
    out = pa.table(
        {
            "key": table["key"],
            "reason": pa.array(reasons, pa.string()),
            "clip_score": table["clip_score"],
        }
    )
    stats = StageStats.of(SCORE, shard, fp, reasons)
    staging.commit(stats, out)
    return stats


def score_shards(
    staging: Staging,
    shards: list[int],
    cfg: ScoreConfig,
    embed_fp: str,
    calibrated: float | None = None,
) -> tuple[float, list[StageStats]]:
    threshold = resolve_threshold(staging, shards, cfg, calibrated)
    fp = score_fingerprint(embed_fp, threshold)
    return threshold, [score_shard(staging, s, threshold, fp) for s in shards]
