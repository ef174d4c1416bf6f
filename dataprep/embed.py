"""CLIP embedding and CLIP score: a distributed map over shards on Ray, then a threshold.

Embedding (``embed`` stage): Ray actors, each loading the CLIP model once, take whole shards from
a queue (``ActorPool``). For its shard an actor streams the crawl tar, decodes the samples the
filters kept, embeds image and caption in batches and publishes beside the shards
``embed/NNNNN.image.npy`` and ``NNNNN.text.npy`` (float32 [N, D], L2-normalised, row i = row i of
the table), ``NNNNN.parquet`` (``key``, ``clip_score`` = cosine of the pair) and the stats last.
The embed stage drops nothing: it records. The same code runs on a laptop's local Ray or on a
cluster (``cluster.ray_address``; ``gpus_per_worker`` puts each actor on a GPU), with the store
shared; weights in a store (``s3://``) are downloaded by each actor.

Score (``score`` stage): keep pairs by an absolute threshold (LAION: 0.28 for ViT-B/32) or the
top fraction of the build (DataComp: 0.3; found from per-shard histograms), applied to the
recorded scores, one Ray task per shard. Changing it redoes
only this stage and what follows, never the embeddings (NeMo Curator's "score, then filter").
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import pyarrow as pa
from PIL import Image

from dataprep.filters import STAGE as FILTER
from dataprep.ray_session import init_ray
from dataprep.ray_stages import map_shards, run_shards
from dataprep.stage_config import ClusterConfig, EmbedConfig, ScoreConfig
from dataprep.stages import KEPT, StageError, StageStats, Staging, fingerprint
from dataprep.store import (
    ObjectNotFound,
    ObjectStore,
    S3Settings,
    local_copy,
    local_path,
    open_store,
    split_uri,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

EMBED = "embed"
SCORE = "score"
EMBED_SCHEMA = pa.schema(
    [("key", pa.string()), ("reason", pa.string()), ("clip_score", pa.float32())]
)


def calibrated_threshold(weights: str, s3: S3Settings | None = None) -> float | None:
    """The threshold recorded in the scorer's card beside its weights (a path or a store URI),
    if there is one."""
    card = f"{weights}.json"
    path = local_path(card)
    if path is not None:
        if not path.is_file():
            return None
        text = path.read_bytes()
    else:
        folder, name = split_uri(card)
        try:
            text = open_store(folder, s3).get_bytes(name)
        except ObjectNotFound:
            return None
    value = json.loads(text).get("threshold")
    return float(value) if value is not None else None


def store_s3(store: ObjectStore) -> S3Settings | None:
    """The S3 settings of a build's store: weights in the same S3 service are read with them."""
    return getattr(store, "settings", None)


# --------------------------------------------------------------------------- embedding


class Embedder:
    """A CLIP model loaded once, embedding (JPEG bytes, caption) batches."""

    def __init__(self, cfg: EmbedConfig, s3: S3Settings | None = None) -> None:
        import torch

        from dataprep.clip_models import create_clip

        if cfg.weights is None:
            raise ValueError("embed.weights is not set: give an open_clip state dict")
        torch.set_num_threads(cfg.threads_per_worker)
        device = "cuda" if cfg.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        weights = str(local_copy(cfg.weights, s3))  # a store URI: downloaded on this node
        self.bundle = create_clip(cfg.model, pretrained=weights, device=device)
        self.bundle.model.eval()
        self.device = device
        self.batch_size = cfg.batch_size
        self._image_steps, self._tensor_steps, self._lut = _split_transform(
            self.bundle.eval_transform
        )

    def preprocess(self, jpegs: list[bytes]):
        """Pixels [B, 3, H, W] of JPEG (or PNG, WebP) bytes: the model's eval transform of each
        image, bit for bit; the uint8 -> float step runs once per batch through a lookup table."""
        import torch

        images = []
        for data in jpegs:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            for step in self._image_steps:
                image = step(image)
            images.append(image)
        if self._lut is None or any(im.mode != "RGB" or im.size != images[0].size for im in images):
            return torch.stack([self._tensor_steps(im) for im in images])
        arrays = np.stack([np.asarray(im) for im in images])  # [B, H, W, 3] uint8
        pixels = np.empty((len(images), 3, *arrays.shape[1:3]), np.float32)
        for c in range(3):
            pixels[:, c] = self._lut[c][arrays[..., c]]
        return torch.from_numpy(pixels)

    def tokenize(self, captions: list[str]):
        return self.bundle.tokenizer(captions)

    def forward(self, pixels, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Normalised image and text embeddings [B, D] of preprocessed pixels and captions."""
        return self.forward_tokens(pixels, self.tokenize(captions))

    def forward_tokens(self, pixels, tokens) -> tuple[np.ndarray, np.ndarray]:
        """``forward`` with the captions already tokenised (``tokenize``)."""
        import torch

        model = self.bundle.model
        with torch.inference_mode():
            image = model.encode_image(pixels.to(self.device), normalize=True)
            text = model.encode_text(tokens.to(self.device), normalize=True)
        return image.float().cpu().numpy(), text.float().cpu().numpy()

    def embed(self, jpegs: list[bytes], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batches = (
            (self.preprocess(jpegs[i : i + self.batch_size]), captions[i : i + self.batch_size])
            for i in range(0, len(jpegs), self.batch_size)
        )
        return self._concat([self.forward(pixels, texts) for pixels, texts in batches])

    def _concat(self, out: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if not out:
            dim = (
                self.bundle.model.text_projection.shape[1]
                if hasattr(self.bundle.model, "text_projection")
                else 0
            )
            return np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32)
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def _split_transform(transform):
    """(PIL steps, tensor steps, lookup table) of an eval transform.

    open_clip's eval transforms are PIL steps (resize, crop or pad, convert to RGB) followed by
    ``ToTensor`` and ``Normalize``, which map each uint8 value of each channel to one float on
    its own. The table [3, 256] holds those floats, computed by the tensor steps themselves, so
    looking values up gives the same bits as running the steps image by image, without the
    per-image tensors. None (and the steps run per image) for any other transform.
    """
    from torchvision import transforms as tv

    steps = list(getattr(transform, "transforms", [transform]))
    at = next((i for i, s in enumerate(steps) if isinstance(s, tv.ToTensor)), None)
    if at is None:
        return [], transform, None
    image_steps, tensor_steps = steps[:at], tv.Compose(steps[at:])
    if not all(isinstance(s, tv.ToTensor | tv.Normalize) for s in steps[at:]):
        return image_steps, tensor_steps, None
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]
    lut = tensor_steps(Image.fromarray(ramp, "RGB"))  # [3, 1, 256]
    return image_steps, tensor_steps, lut[:, 0, :].numpy().copy()


def embed_fingerprint(filter_fp: str, cfg: EmbedConfig) -> str:
    # Only what changes the numbers: not the batching or the Ray layout.
    return fingerprint(EMBED, filter_fp, cfg.model, cfg.weights_sha256 or cfg.weights)


def embed_shard(
    staging: Staging, shard: int, embedder: Embedder, fp: str, prefetch: int = 1
) -> StageStats:
    """Embed the filter-kept samples of one shard; skipped if committed with ``fp``.

    A background thread reads the tar, decodes, transforms and tokenises the next ``prefetch``
    batches while the model runs the current one (0: all in this thread, one after the other).
    """
    done = staging.stats(EMBED, shard, fp)
    if done is not None:
        return done
    wanted = staging.kept_keys(FILTER, shard)
    keys: list[str] = []
    out = []
    batches = prefetched(_prepared_batches(staging, shard, set(wanted), embedder), prefetch)
    with contextlib.closing(batches):  # on an error here, the thread stops before it is raised
        for batch_keys, pixels, tokens in batches:
            keys += batch_keys
            out.append(embedder.forward_tokens(pixels, tokens))
    if keys != wanted:
        missing = sorted(set(wanted) - set(keys))[:5]
        raise StageError(
            f"crawl shard {staging.uri('crawl', shard, 'tar')} lacks samples the filter kept "
            f"(e.g. {missing})"
        )
    image, text = embedder._concat(out)
    scores = (image * text).sum(1)
    table = pa.table(
        {"key": keys, "reason": [KEPT] * len(keys), "clip_score": scores.astype(np.float32)},
        schema=EMBED_SCHEMA,
    )
    stats = StageStats.of(EMBED, shard, fp, [KEPT] * len(keys))
    staging.commit(stats, table, {"image.npy": npy_bytes(image), "text.npy": npy_bytes(text)})
    return stats


def _prepared_batches(staging: Staging, shard: int, wanted: set[str], embedder: Embedder):
    """(keys, pixels, tokens) of the wanted samples of a crawl shard, ``batch_size`` at a time,
    in the tar's order: one pass over the tar."""
    keys, jpegs, captions = [], [], []
    for key, files in staging.samples(shard):
        if key not in wanted:
            continue
        keys.append(key)
        jpegs.append(files.get("jpg") or files.get("png") or files.get("webp"))
        captions.append(files.get("txt", b"").decode("utf-8", errors="replace"))
        if len(keys) == embedder.batch_size:
            yield keys, embedder.preprocess(jpegs), embedder.tokenize(captions)
            keys, jpegs, captions = [], [], []
    if keys:
        yield keys, embedder.preprocess(jpegs), embedder.tokenize(captions)


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """The items of ``items``, produced on a background thread up to ``depth`` ahead.

    An exception raised while producing is raised here, after the items before it; the thread
    stops at it. Leaving the loop early (an error in the consumer, ``close``) stops the thread
    too, and the producing iterator is closed in its thread.
    """
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="embed-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = slots.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()


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
        self.embedder = Embedder(cfg, store_s3(staging.store))

    def run(self, shard: int) -> StageStats:
        return embed_shard(self.staging, shard, self.embedder, self.fp)


def embed_shards(
    staging: Staging,
    shards: list[int],
    cfg: EmbedConfig,
    filter_fp: str,
    on_shard: Callable[[StageStats], None] | None = None,
    cluster: ClusterConfig = ClusterConfig(),  # noqa: B008 (frozen settings)
) -> list[StageStats]:
    """Embed every shard not yet committed, spread over Ray actors; stats in shard order."""
    fp = embed_fingerprint(filter_fp, cfg)
    done = {s: st for s in shards if (st := staging.stats(EMBED, s, fp)) is not None}
    todo = [s for s in shards if s not in done]
    if todo:
        for stats in _map_on_ray(staging, todo, cfg, fp, cluster):
            done[stats.shard] = stats
            if on_shard is not None:
                on_shard(stats)
    return [done[s] for s in shards]


def _map_on_ray(
    staging: Staging, shards: list[int], cfg: EmbedConfig, fp: str, cluster: ClusterConfig
):
    import ray
    from ray.util import ActorPool

    init_ray(cluster.ray_address)
    # An actor lost with its node starts again elsewhere, and its shard is run again there.
    actor_class = ray.remote(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker,
        max_restarts=cluster.max_retries,
        max_task_retries=cluster.max_retries,
        scheduling_strategy="SPREAD",
    )(_ShardEmbedder)
    actors = [actor_class.remote(staging, cfg, fp) for _ in range(min(cfg.workers, len(shards)))]
    try:
        pool = ActorPool(actors)
        yield from pool.map_unordered(lambda actor, shard: actor.run.remote(shard), shards)
    finally:
        for actor in actors:
            ray.kill(actor)


# --------------------------------------------------------------------------- score


HISTOGRAM_BINS = 1 << 16  # over [-1, 1]: a bin holds few scores, so the exact rank is cheap


def resolve_threshold(
    staging: Staging,
    shards: list[int],
    cfg: ScoreConfig,
    calibrated: float | None,
    cluster: ClusterConfig = ClusterConfig(),  # noqa: B008 (frozen settings)
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
    return top_fraction_threshold(staging, shards, cfg.top_fraction, cluster)


def top_fraction_threshold(
    staging: Staging, shards: list[int], fraction: float, cluster: ClusterConfig
) -> float:
    """The score of the ``round(fraction * N)``-th best pair of the build, exactly, from per-shard
    histograms (merged on the driver) and then the scores of the one bin that holds it."""
    ray_options = {"ray_address": cluster.ray_address, "num_cpus": cluster.score_cpus}
    ray_options["max_retries"] = cluster.max_retries
    counts = np.zeros(HISTOGRAM_BINS, np.int64)
    for shard_counts in map_shards(_score_histogram, shards, (staging,), **ray_options):
        counts += shard_counts
    total = int(counts.sum())
    if total == 0:
        return 1.0
    keep = max(1, round(fraction * total))
    above = np.cumsum(counts[::-1])  # above[i]: scores in the top i + 1 bins
    top_bins = int(np.searchsorted(above, keep))  # the bin holding the keep-th score, from the top
    target = HISTOGRAM_BINS - 1 - top_bins
    rank = keep - (int(above[top_bins - 1]) if top_bins else 0)  # its rank inside the bin
    in_bin = list(map_shards(_scores_in_bin, shards, (staging, target), **ray_options))
    return float(np.sort(np.concatenate(in_bin))[::-1][rank - 1])


def _bins(scores: np.ndarray) -> np.ndarray:
    at = np.floor((scores.astype(np.float64) + 1.0) / 2.0 * HISTOGRAM_BINS)
    return np.clip(at, 0, HISTOGRAM_BINS - 1).astype(np.int64)


def _score_histogram(shard: int, staging: Staging) -> np.ndarray:
    scores = staging.table(EMBED, shard)["clip_score"].to_numpy()
    return np.bincount(_bins(scores), minlength=HISTOGRAM_BINS)


def _scores_in_bin(shard: int, staging: Staging, target: int) -> np.ndarray:
    scores = staging.table(EMBED, shard)["clip_score"].to_numpy()
    return scores[_bins(scores) == target]


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
    cluster: ClusterConfig = ClusterConfig(),  # noqa: B008 (frozen settings)
    on_shard: Callable[[StageStats], None] | None = None,
) -> tuple[float, list[StageStats]]:
    """Apply the threshold to every shard not yet committed, one Ray task per shard."""
    threshold = resolve_threshold(staging, shards, cfg, calibrated, cluster)
    fp = score_fingerprint(embed_fp, threshold)
    done = {s: st for s in shards if (st := staging.stats(SCORE, s, fp)) is not None}
    stats = run_shards(
        _score_one,
        shards,
        done,
        (staging, threshold, fp),
        on_shard,
        ray_address=cluster.ray_address,
        num_cpus=cluster.score_cpus,
        max_retries=cluster.max_retries,
    )
    return threshold, stats


def _score_one(shard: int, staging: Staging, threshold: float, fp: str) -> StageStats:
    return score_shard(staging, shard, threshold, fp)
