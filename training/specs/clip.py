"""CLIP: open_clip architectures, symmetric InfoNCE, sample-web zero-shot evaluation."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from training.config import TrainConfig
from training.data import ImageTransform, Tokenize
from training.losses import ClipLoss
from training.models.clip import ClipBundle, create_clip, no_weight_decay
from training.specs import ModelSpec

MAX_LOGIT_SCALE = 100.0
EXPORT_NAME = "open_clip_pytorch_model.bin"  # what open_clip.create_model(pretrained=...) loads


class ClipSpec(ModelSpec):
    def __init__(self) -> None:
        self.contrastive = ClipLoss(local_loss=False, gather_with_grad=True)

    @functools.cache  # noqa: B019 - one spec per worker process; the bundle is built once
    def bundle(self, model_name: str) -> ClipBundle:
        return create_clip(model_name)

    def build(self, cfg: TrainConfig) -> nn.Module:
        self.contrastive = ClipLoss(cfg.loss.use_local_loss(cfg.scale.num_workers))
        self.bundle.cache_clear()  # a fresh, seeded initialisation per call
        model = self.bundle(cfg.model).model
        # DeepSpeed cannot broadcast or partition 0-dim bf16 parameters (it views them as
        # bytes), so the scalar temperature trains as shape [1]; export turns it back.
        if not hasattr(model.logit_scale, "ds_id"):  # ZeRO-3's construction did it already
            model.logit_scale = nn.Parameter(model.logit_scale.detach().reshape(1))
        return model

    def late_inits(self, model: nn.Module) -> list:
        inits = super().late_inits(model)
        if hasattr(model, "token_embedding"):  # open_clip's CLIP keeps the text tower's parts
            from open_clip.transformer import TextTransformer

            projection = model.text_projection
            text = SimpleNamespace(
                token_embedding=model.token_embedding,
                positional_embedding=model.positional_embedding,
                cls_emb=None,
                transformer=model.transformer,
                text_projection=projection,
            )
            params = [
                *model.token_embedding.parameters(),
                model.positional_embedding,
                *model.transformer.parameters(),
                *(projection.parameters() if isinstance(projection, nn.Module) else [projection]),
            ]
            inits.append(
                (
                    [p for p in params if p is not None],
                    lambda: TextTransformer.init_parameters(text),
                )
            )
        return inits

    def transform(self, cfg: TrainConfig) -> ImageTransform:
        return self.bundle(cfg.model).train_transform

    def tokenize(self, cfg: TrainConfig) -> Tokenize:
        return self.bundle(cfg.model).tokenizer

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # channels-last images: the ResNet towers' convolutions run channels-last (oneDNN on CPU,
        # tensor cores on GPU; docs/training.md, "Speed on CPU")
        images = batch["image"].contiguous(memory_format=torch.channels_last)
        image_features, text_features, scale = model(images, batch["text"])
        # The temperature is clamped here rather than by editing the parameter after the step:
        # with bf16 and ZeRO the optimizer owns fp32 master weights that an in-place clamp of
        # the module's copy would not reach. Past the clamp its gradient is zero, so it stays.
        scale = scale.float().clamp(max=MAX_LOGIT_SCALE)
        terms = self.contrastive(image_features.float(), text_features.float(), scale)
        terms["logit_scale"] = scale.detach()
        return terms

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        return no_weight_decay(name, param)

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        model.set_grad_checkpointing(True)

    def evaluate(self, model: nn.Module, cfg: TrainConfig, dtype: torch.dtype) -> dict[str, float]:
        """Zero-shot and retrieval metrics of ``eval.set``; each rank encodes its share."""
        from training.evaluate import (
            clip_metrics,
            decode_images,
            encode_images,
            gather_shares,
            heldout_shards,
            rank_share,
            sampleweb_metrics,
        )

        bundle = self.bundle(cfg.model)
        e = cfg.eval
        if e.set == "shards":
            raw, labels, captions = heldout_shards(
                e.source, e.heldout_samples, cfg.store.s3, e.label_key
            )
            share, _ = rank_share(len(raw))
            images = decode_images([raw[i] for i in share], bundle.eval_transform).to(dtype)
            features = gather_shares(encode_images(model, images, e.batch_size), len(raw))
            prompts = [[t.format(c) for t in e.templates] for c in e.classes]
            metrics = clip_metrics(
                model, bundle.tokenizer, features, labels, captions, prompts, True
            )
        else:
            images, labels, captions = _heldout(
                e.heldout_samples, e.heldout_seed, e.crawl_image_size, cfg.model
            )
            metrics = sampleweb_metrics(
                model, bundle.tokenizer, images.to(dtype), labels, captions, sharded=True
            )
        return {f"eval/{k}": float(v) for k, v in metrics.items()}

    def export(self, state_dict: dict[str, torch.Tensor], cfg: TrainConfig, out: Path) -> Path:
        model = create_clip(cfg.model).model
        state_dict = dict(state_dict)
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        persistent_missing = [k for k in missing if k in model.state_dict()]
        if persistent_missing or unexpected:
            raise ValueError(
                f"checkpoint does not match {cfg.model}: missing {persistent_missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        path = out / EXPORT_NAME
        torch.save(model.state_dict(), path)
        return path


@functools.cache
def _heldout(n: int, seed: int, crawl_image_size: int, model_name: str):
    """Held-out images preprocessed for the model, built once per worker process."""
    from training.evaluate import heldout_sampleweb, preprocess_images

    images, labels, captions = heldout_sampleweb(n, seed, crawl_image_size)
    transform = create_clip(model_name).eval_transform
    return preprocess_images(images, transform), labels, captions
