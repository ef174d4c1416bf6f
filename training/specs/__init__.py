"""Model specs: everything the engine needs to know about one kind of model.

The engine (training/engine.py) is the same for every model. A spec builds the model, its data
loader and its loss, and says what to evaluate and export. Adding a model means a model file,
a spec here and a config; the engine does not change.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from training.config import TrainConfig


class ModelSpec(abc.ABC):
    name: str

    @abc.abstractmethod
    def build(self, cfg: TrainConfig) -> nn.Module:
        """The model, freshly initialised (the same on every rank for the same seed)."""

    @abc.abstractmethod
    def train_loader(self, cfg: TrainConfig, rank: int, world_size: int) -> Any:
        """Batches of one epoch with `.steps_per_epoch` (equal on every rank) and
        `.set_epoch(epoch, skip_batches)` (see training.data.TrainLoader)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named loss terms; `total` is what gets back-propagated."""

    def check_inputs(self, cfg: TrainConfig) -> None:
        """Raise (DataError, FileNotFoundError) if what the run reads is missing; called on the
        driver before any worker starts, so a typo costs seconds, not a cluster start-up."""
        from training.data import check_data

        check_data(cfg.data, cfg.store.s3)

    def after_step(self, model: nn.Module) -> dict[str, float]:
        """Called after each optimizer step (e.g. clamp a temperature); returns metrics."""
        return {}

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """Biases, norms, embeddings and scalars are not decayed (as in GPT-2 and CLIP)."""
        return param.ndim < 2 or "bias" in name or "embedding" in name or "ln_" in name

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        raise ValueError(f"{self.name}: activation checkpointing is not supported")

    def evaluate(self, model: nn.Module, cfg: TrainConfig, dtype: torch.dtype) -> dict[str, float]:
        """Held-out metrics; run on every rank (ZeRO-3 forwards need all of them)."""
        return {}

    def export(self, state_dict: dict[str, torch.Tensor], cfg: TrainConfig, out: Path) -> Path:
        """Write consolidated fp32 weights in the format other tools load; return the file."""
        path = out / "model.pt"
        torch.save(state_dict, path)
        return path


def param_groups(model: nn.Module, spec: ModelSpec, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if spec.no_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def get_spec(name: str) -> ModelSpec:
    if name == "clip":
        from training.specs.clip import ClipSpec

        return ClipSpec()
    if name == "dvae":
        from training.specs.dvae import DVAESpec

        return DVAESpec()
    if name == "dalle":
        from training.specs.dalle import DalleSpec

        return DalleSpec()
    raise ValueError(f"unknown model spec {name!r}; known: {', '.join(SPECS)}")


SPECS: Iterable[str] = ("clip", "dvae", "dalle")
