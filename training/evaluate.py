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


def encode_images(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Normalised image features [N, D] of preprocessed images [N, 3, H, W]."""
    with _eval_mode(model) as m:
        device = _device(m)
        feats = [m.encode_image(x.to(device), normalize=True) for x in images.split(batch_size)]
    return torch.cat(feats).float()


def encode_texts(
    model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 1024
) -> torch.Tensor:
    """Normalised text features [N, D]."""
    with _eval_mode(model) as m:
        device = _device(m)
        feats = [
            m.encode_text(tokenizer(list(texts[i : i + batch_size])).to(device), normalize=True)
            for i in range(0, len(texts), batch_size)
        ]
    return torch.cat(feats).float()


def preprocess_images(images: Sequence[Image.Image], transform: Callable) -> torch.Tensor:
    """Apply an image transform (e.g. ``ClipBundle.eval_transform``) -> [N, 3, H, W]."""
    return torch.stack([transform(img) for img in images])


# --------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------


def classifier_from_prompts(
    model: nn.Module, tokenizer: Callable, prompts_per_class: Sequence[Sequence[str]]
) -> torch.Tensor:
    """Zero-shot weights [D, C]: per class, the mean of its normalised prompt embeddings,
    renormalised.  Classes may have different numbers of prompts."""
    flat = [p for prompts in prompts_per_class for p in prompts]
    feats = encode_texts(model, tokenizer, flat)  # [P, D]
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
) -> dict[str, float]:
    """Zero-shot top-1/top-5 and retrieval R@1/5/10 on preprocessed held-out images."""
    if prompts_per_class is None:
        prompts_per_class = sampleweb_zero_shot_setup()[1]
    prompt_features = encode_texts(model, tokenizer, [p for ps in prompts_per_class for p in ps])
    sizes = [len(prompts) for prompts in prompts_per_class]
    classifier = embedding_ensemble(prompt_features, sizes)  # [D, C]
    image_features = encode_images(model, images)  # [N, D]
    text_features = encode_texts(model, tokenizer, captions)  # [N, D]
    metrics = _topk_accuracy(image_features, classifier, labels)
    scale = logit_scale_of(model)
    probs = probability_ensemble(image_features, prompt_features, sizes, scale)  # [N, C]
    metrics |= {f"prob_ensemble_{k}": v for k, v in _topk_from_scores(probs, labels).items()}
    return metrics | retrieval_recall(image_features, text_features)
