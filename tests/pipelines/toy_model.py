"""A toy model, as a new model arrives: a model and its spec here, a config in toy.yaml.

Nothing else in mmpipe changes for it: test_new_model.py registers it as `toy` and trains it
through the CLI's choices, the ops config, the deployments and the training flow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from training.specs import ModelSpec

SIDE = 8  # images are shrunk to SIDE x SIDE


class ToyAutoencoder(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.encoder = nn.Linear(3 * SIDE * SIDE, hidden)
        self.decoder = nn.Linear(hidden, 3 * SIDE * SIDE)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (B, 3, SIDE, SIDE)
        return self.decoder(torch.relu(self.encoder(image.flatten(1)))).view_as(image)


def small_tensor(image: Image.Image) -> torch.Tensor:
    pixels = image.convert("RGB").resize((SIDE, SIDE)).tobytes()
    return (
        torch.frombuffer(bytearray(pixels), dtype=torch.uint8)
        .view(SIDE, SIDE, 3)
        .permute(2, 0, 1)
        .float()
        / 255
    )


def caption_lengths(captions: list[str]) -> torch.Tensor:
    return torch.tensor([len(c) for c in captions])


class ToySpec(ModelSpec):
    def build(self, cfg) -> nn.Module:
        return ToyAutoencoder()

    def transform(self, cfg):
        return small_tensor

    def tokenize(self, cfg):
        return caption_lengths

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        return {"total": F.mse_loss(model(image), image)}
