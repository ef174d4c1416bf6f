"""Zero-shot classification and retrieval metrics, and the sample-web held-out set.

The sample web's classes are shape x colour. A class is prompted with full captions (every
``CAPTION_TEMPLATES`` entry filled with the class and each size/position/background), and its
prompts are ensembled in embedding space (``top1``, CLIP's choice) and in probability space
(``prob_ensemble_top1``): docs/training.md explains why both.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dataprep.sampleweb.corpus import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    generate_corpus,
    make_caption,
    render_image,
)
from dataprep.store import S3Settings, open_store, split_uri
from training.losses import rank_and_world

Template = str | Callable[[str], str]

#: Held-out corpus seed; training corpora use other seeds (the demo serves seed 0).
HELDOUT_SEED = 1000
DEFAULT_FILLINGS: int | None = None  # all 108 size/position/background fillings


# --------------------------------------------------------------------------------------------
# Encoding helpers
# --------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped model in eval mode (BatchNorm statistics frozen) without autograd."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def rank_share(n: int) -> tuple[list[int], int]:
    """This rank's indices of ``n`` items and how many of them are real: ``ceil(n / world)`` on
    every rank, the last ones padded with item ``n - 1``, so every rank runs as many forwards
    (ZeRO-3 gathers the weights in each one, with all ranks)."""
    rank, world = rank_and_world()
    per = -(-n // world)
    return [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)], max(
        0, min(per, n - rank * per)
    )


def gather_shares(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's ``rank_share`` rows [per, ...] -> all ``n`` rows, in order, on every rank.
    The gather runs on the tensor's device (NCCL takes only CUDA tensors)."""
    _, world = rank_and_world()
    if world == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)[:n]


def encode_images(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256, sharded: bool = False
) -> torch.Tensor:
    """Normalised image features [N, D] of preprocessed images [N, 3, H, W]. ``sharded``: each
    rank encodes its share and the features are gathered (call it on every rank)."""
    n = len(images)
    if sharded:
        images = images[rank_share(n)[0]]
    with _eval_mode(model) as m:
        device = _device(m)
        feats = [m.encode_image(x.to(device), normalize=True) for x in images.split(batch_size)]
    feats = torch.cat(feats).float()
    return gather_shares(feats, n) if sharded else feats


def encode_texts(
    model: nn.Module,
    tokenizer: Callable,
    texts: Sequence[str],
    batch_size: int = 1024,
    sharded: bool = False,
) -> torch.Tensor:
    """Normalised text features [N, D]; ``sharded`` as in ``encode_images``."""
    n = len(texts)
    if sharded:
        texts = [texts[i] for i in rank_share(n)[0]]
    with _eval_mode(model) as m:
        device = _device(m)
        feats = [
            m.encode_text(tokenizer(list(texts[i : i + batch_size])).to(device), normalize=True)
            for i in range(0, len(texts), batch_size)
        ]
    feats = torch.cat(feats).float()
    return gather_shares(feats, n) if sharded else feats


def preprocess_images(images: Sequence[Image.Image], transform: Callable) -> torch.Tensor:
    """Apply an image transform (e.g. ``ClipBundle.eval_transform``) -> [N, 3, H, W]."""
    return torch.stack([transform(img) for img in images])


# --------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------


def classifier_from_prompts(
    model: nn.Module,
    tokenizer: Callable,
    prompts_per_class: Sequence[Sequence[str]],
    sharded: bool = False,
) -> torch.Tensor:
    """Zero-shot weights [D, C]: per class, the mean of its normalised prompt embeddings,
    renormalised.  Classes may have different numbers of prompts."""
    flat = [p for prompts in prompts_per_class for p in prompts]
    feats = encode_texts(model, tokenizer, flat, sharded=sharded)  # [P, D]
    return embedding_ensemble(feats, [len(prompts) for prompts in prompts_per_class])


def embedding_ensemble(prompt_features: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """[D, C] from normalised prompt features [P, D] grouped by class (``sizes`` per class)."""
    centroids = torch.stack([f.mean(0) for f in prompt_features.split(list(sizes))])  # [C, D]
    return F.normalize(centroids, dim=-1).T


def probability_ensemble(
    image_features: torch.Tensor,
    prompt_features: torch.Tensor,
    sizes: Sequence[int],
    logit_scale: float,
) -> torch.Tensor:
    """p(class | image) [N, C]: the softmax over all prompts [P, D] at ``logit_scale``, summed
    over each class's prompts (``sizes`` per class, in order)."""
    logits = logit_scale * image_features.float() @ prompt_features.float().T  # [N, P]
    probs = logits.softmax(dim=1)
    return torch.stack([p.sum(1) for p in probs.split(list(sizes), dim=1)], dim=1)


def logit_scale_of(model: nn.Module, max_scale: float = 100.0) -> float:
    """The model's learned inverse temperature, clamped as in training."""
    model = getattr(model, "module", model)
    return min(float(model.logit_scale.detach().float().exp().reshape(-1)[0]), max_scale)


def zero_shot_classifier(
    model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[Template]
) -> torch.Tensor:
    """CLIP prompt ensembling: weights [D, C] from format strings ("a photo of a {}.") or
    callables ``classname -> prompt``."""
    prompts = [[t.format(c) if isinstance(t, str) else t(c) for t in templates] for c in classnames]
    return classifier_from_prompts(model, tokenizer, prompts)


def zero_shot_accuracy(
    model: nn.Module,
    classifier: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy of preprocessed ``images`` [N, 3, H, W] against ``classifier``
    [D, C] (top-5 is 1.0 when there are at most 5 classes)."""
    return _topk_accuracy(encode_images(model, images, batch_size), classifier, labels)


def _topk_accuracy(
    image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    logits = image_features @ classifier.float().to(image_features.device)  # [N, C]
    return _topk_from_scores(logits, labels)


def _topk_from_scores(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    labels = torch.as_tensor(labels).to(scores.device)
    topk = scores.topk(min(5, scores.shape[1]), dim=1).indices  # [N, k]
    hits = topk == labels[:, None]
    return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(1).float().mean().item()}


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


def _recall_at(similarity: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Row i's positive is column i.  Its rank counts the *other* columns scoring at least as
    high, so ties count against it: a collapsed model (all features equal) scores 0, not 1."""
    positive = similarity.diagonal()[:, None]  # [N, 1]
    ahead = (similarity >= positive).sum(1) - 1  # [N]
    return {k: (ahead < k).float().mean().item() for k in ks}


def retrieval_recall(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k both ways for paired features [N, D] (pair i = image i + text i)."""
    similarity = (
        F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    )  # [N_img, N_txt]
    i2t, t2i = _recall_at(similarity, ks), _recall_at(similarity.T, ks)
    metrics = {f"image_to_text_R@{k}": v for k, v in i2t.items()}
    return metrics | {f"text_to_image_R@{k}": v for k, v in t2i.items()}


# --------------------------------------------------------------------------------------------
# The sample web
# --------------------------------------------------------------------------------------------


def sampleweb_classnames() -> list[str]:
    """The 16 class names, shape-major: "red circle", "green circle", ..., "yellow star"."""
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


def sampleweb_label(shape: str, colour: str) -> int:
    """Index of (shape, colour) in ``sampleweb_classnames()``."""
    return SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def _fillings(template_index: int, count: int | None) -> list[tuple[str, str, str]]:
    combos = list(itertools.product(SIZES, POSITIONS, BACKGROUNDS))
    if count is None:
        return combos
    random.Random(f"prompts:{template_index}").shuffle(combos)
    return combos[:count]


def sampleweb_templates(fillings: int | None = DEFAULT_FILLINGS) -> list[Callable[[str], str]]:
    """Callables "red circle" -> full caption: each of the caption templates x ``fillings``
    (size, position, background) combinations (None: all 108)."""

    def template(tmpl: str, size: str, position: str, background: str) -> Callable[[str], str]:
        def fill(classname: str) -> str:
            colour, shape = classname.split(" ")
            return make_caption(tmpl, shape, colour, size, position, background)

        return fill

    return [
        template(tmpl, *filling)
        for i, tmpl in enumerate(CAPTION_TEMPLATES)
        for filling in _fillings(i, fillings)
    ]


def sampleweb_zero_shot_setup(
    fillings: int | None = DEFAULT_FILLINGS,
) -> tuple[list[str], list[list[str]]]:
    """(classnames, prompts_per_class) for ``classifier_from_prompts``."""
    classnames = sampleweb_classnames()
    templates = sampleweb_templates(fillings)
    return classnames, [[t(c) for t in templates] for c in classnames]


def crawl_border_resize(data: bytes, image_size: int, encode_quality: int = 95) -> bytes:
    """The JPEG that the crawl (img2dataset ``resize_mode=border``) stores for image ``data``.

    Same operations as img2dataset's Resizer: OpenCV decode, longest side scaled to
    ``image_size`` (INTER_AREA when shrinking, LANCZOS4 when enlarging, albumentations'
    rounding), centred white padding to a square, OpenCV JPEG encode.
    """
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # [H, W, 3] BGR
    if img is None:
        raise ValueError("image decoding error")
    height, width = img.shape[:2]
    scale = image_size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        shrink = max(height, width) > image_size
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4
        img = cv2.resize(img, (new_w, new_h), interpolation=interpolation)
    top, left = (image_size - new_h) // 2, (image_size - new_w) // 2
    img = cv2.copyMakeBorder(
        img,
        top,
        image_size - new_h - top,
        left,
        image_size - new_w - left,
        cv2.BORDER_CONSTANT,
        value=(255, 255, 255),
    )
    ok, encoded = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, encode_quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return encoded.tobytes()


def heldout_sampleweb(
    n: int, seed: int = HELDOUT_SEED, image_size: int = 64
) -> tuple[list[Image.Image], torch.Tensor, list[str]]:
    """``n`` clean sample-web images as the crawl delivers them (border-resized to
    ``image_size``, JPEG round trip, decoded RGB), their labels [n] and their captions.

    Use a ``seed`` that no training corpus uses: images are then new renders (random sizes,
    positions, jitter), not copies of training images.
    """
    images, labels, captions = [], [], []
    for spec in generate_corpus(n, seed, fault_rates={}):
        jpeg = crawl_border_resize(render_image(spec), image_size)
        images.append(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        labels.append(sampleweb_label(spec.shape, spec.colour))
        captions.append(spec.caption)
    return images, torch.tensor(labels), captions


def sampleweb_metrics(
    model: nn.Module,
    tokenizer: Callable,
    images: torch.Tensor,
    labels: torch.Tensor,
    captions: Sequence[str],
    prompts_per_class: Sequence[Sequence[str]] | None = None,
    sharded: bool = False,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 and retrieval R@1/5/10 on preprocessed held-out images.
    ``sharded``: every rank encodes its share of images, captions and prompts (call it on
    every rank; all get the same metrics)."""
    if prompts_per_class is None:
        prompts_per_class = sampleweb_zero_shot_setup()[1]
    image_features = encode_images(model, images, sharded=sharded)  # [N, D]
    return clip_metrics(
        model, tokenizer, image_features, labels, captions, prompts_per_class, sharded
    )


def clip_metrics(
    model: nn.Module,
    tokenizer: Callable,
    image_features: torch.Tensor,
    labels: torch.Tensor | None,
    captions: Sequence[str],
    prompts_per_class: Sequence[Sequence[str]],
    sharded: bool = False,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 (without ``labels`` or prompts: none) and retrieval R@1/5/10 from
    image features [N, D] and the images' captions."""
    text_features = encode_texts(model, tokenizer, captions, sharded=sharded)  # [N, D]
    metrics = retrieval_recall(image_features, text_features)
    if labels is None or not prompts_per_class:
        return metrics
    flat = [p for ps in prompts_per_class for p in ps]
    prompt_features = encode_texts(model, tokenizer, flat, sharded=sharded)
    sizes = [len(prompts) for prompts in prompts_per_class]
    classifier = embedding_ensemble(prompt_features, sizes)  # [D, C]
    metrics |= _topk_accuracy(image_features, classifier, labels)
    scale = logit_scale_of(model)
    probs = probability_ensemble(image_features, prompt_features, sizes, scale)  # [N, C]
    metrics |= {f"prob_ensemble_{k}": v for k, v in _topk_from_scores(probs, labels).items()}
    return metrics


# --------------------------------------------------------------------------------------------
# Held-out shards
# --------------------------------------------------------------------------------------------


def heldout_shards(
    source: str | list[str],
    limit: int,
    s3: S3Settings | None = None,
    label_key: str = "cls",
    image_key: str = "jpg;png;jpeg;webp",
) -> tuple[list[bytes], torch.Tensor | None, list[str]]:
    """The first ``limit`` samples of held-out shards: encoded images, class indices from
    ``label_key`` (None unless every sample has one) and captions (``txt``). Cheap to hold:
    each rank decodes only its share (``rank_share``)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from training.config import DataConfig
    from training.shards import DataError, resolve_shards

    images, labels, captions = [], [], []
    for shard in resolve_shards(DataConfig(source=source), s3):
        folder, name = split_uri(shard.uri)
        with open_store(folder, s3).open(name) as stream:
            for sample in group_by_keys(tar_file_expander([{"url": shard.uri, "stream": stream}])):
                image = next((sample[k] for k in image_key.split(";") if k in sample), None)
                if image is None:
                    continue
                images.append(image)
                captions.append(sample.get("txt", b"").decode())
                label = sample.get(label_key)
                labels.append(int(label) if label is not None else None)
                if len(images) == limit:
                    break
        if len(images) == limit:
            break
    if not images:
        raise DataError(f"eval.source {source}: no held-out samples with an image")
    if any(label is None for label in labels):
        return images, None, captions
    return images, torch.tensor(labels), captions


def decode_images(data: Sequence[bytes], transform: Callable) -> torch.Tensor:
    """Encoded images -> the transform's tensors [N, 3, H, W]."""
    return preprocess_images([Image.open(io.BytesIO(d)).convert("RGB") for d in data], transform)
