"""dVAE (DALL-E stage 1): gumbel-softmax relaxation, cosine schedules, held-out reconstruction.

The relaxation temperature and the KL weight follow the optimizer step. The engine hands
``loss`` the DeepSpeed engine, whose ``global_steps`` counts optimizer steps and is restored with
a checkpoint, so a resumed run continues both schedules where they were.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms

from training.config import TrainConfig
from training.data import ImageTransform, Tokenize
from training.models.dvae import (
    DVAE,
    DVAEConfig,
    dvae_loss,
    kl_weight_at,
    save_dvae,
    temperature_at,
)
from training.specs import ModelSpec

EXPORT_NAME = "dvae.pt"


def model_config(cfg: TrainConfig) -> DVAEConfig:
    return DVAEConfig.named(cfg.model, **cfg.model_args)


def image_transform(image_size: int):
    """PIL image -> [3, size, size] floats in [0, 1]: what the dVAE encodes."""
    return transforms.Compose(
        [
            transforms.Resize(image_size, antialias=True),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
        ]
    )


def no_text(texts: list[str]) -> torch.Tensor:
    """The dVAE ignores captions: an empty [B, 0] tensor keeps the loader's batch shape."""
    return torch.zeros(len(texts), 0, dtype=torch.long)


class DVAESpec(ModelSpec):
    def build(self, cfg: TrainConfig) -> nn.Module:
        return DVAE(model_config(cfg))

    def transform(self, cfg: TrainConfig) -> ImageTransform:
        return image_transform(model_config(cfg).image_size)

    def tokenize(self, cfg: TrainConfig) -> Tokenize:
        return no_text

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.loss_at(model, batch, int(getattr(model, "global_steps", 0)))

    def loss_at(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> dict[str, torch.Tensor]:
        config = _unwrap(model).config
        temperature, kl_weight = temperature_at(config, step), kl_weight_at(config, step)
        terms = dvae_loss(model, batch["image"], temperature, kl_weight, config)
        terms["temperature"] = torch.tensor(temperature)
        terms["kl_weight"] = torch.tensor(kl_weight)
        return terms

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        model.set_grad_checkpointing(True)

    def evaluate(self, model: nn.Module, cfg: TrainConfig, dtype: torch.dtype) -> dict[str, float]:
        """Reconstruction error of held-out images (``eval.set``) through argmax codes; every
        rank scores the whole set (the dVAE is small)."""
        e = cfg.eval
        if e.set == "shards":
            from training.evaluate import decode_images, heldout_shards

            raw, _, _ = heldout_shards(e.source, e.heldout_samples, cfg.store.s3)
            images = decode_images(raw, image_transform(model.config.image_size))
        else:
            images = heldout_images(
                e.heldout_samples, e.heldout_seed, e.crawl_image_size, model.config.image_size
            )
        errors = []
        for chunk in images.split(cfg.eval.batch_size):
            reconstruction = model.decode(model.encode(chunk.to(dtype)))
            errors.append((reconstruction.float() - chunk).square().mean(dim=(1, 2, 3)))
        codes = model.encode(images[: cfg.eval.batch_size].to(dtype))
        used = codes.unique().numel()
        return {"eval/reconstruction_mse": float(torch.cat(errors).mean()), "eval/codes_used": used}

    def export(self, state_dict: dict[str, torch.Tensor], cfg: TrainConfig, out: Path) -> Path:
        model = DVAE(model_config(cfg))
        model.load_state_dict(state_dict)
        return save_dvae(model, out / EXPORT_NAME)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # the DeepSpeed engine wraps the model


@functools.cache
def heldout_images(n: int, seed: int, crawl_image_size: int, image_size: int) -> torch.Tensor:
    """[n, 3, size, size] held-out sample-web images as the crawl delivers them, built once."""
    from training.evaluate import heldout_sampleweb

    pil_images, _, _ = heldout_sampleweb(n, seed, crawl_image_size)
    transform = image_transform(image_size)
    return torch.stack([transform(image) for image in pil_images])
