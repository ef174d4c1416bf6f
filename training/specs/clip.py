"""CLIP: open_clip architectures, symmetric InfoNCE, sample-web zero-shot evaluation."""

from __future__ import annotations

import functools
from pathlib import Path

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
        self.bundle.cache_clear()  # a fresh, seeded initialisation per call
        model = self.bundle(cfg.model).model
        # DeepSpeed cannot broadcast or partition 0-dim bf16 parameters (it views them as
        # bytes), so the scalar temperature trains as shape [1]; export turns it back.
        model.logit_scale = nn.Parameter(model.logit_scale.detach().reshape(1))
        return model

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
        from training.evaluate import sampleweb_metrics

        bundle = self.bundle(cfg.model)
        images, labels, captions = _heldout(
            cfg.eval.heldout_samples, cfg.eval.heldout_seed, cfg.eval.crawl_image_size, cfg.model
        )
        metrics = sampleweb_metrics(model, bundle.tokenizer, images.to(dtype), labels, captions)
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
