"""Model specs: everything the engine needs to know about one kind of model.

The engine (training/engine.py) is the same for every model. A spec builds the model, supplies
its data hooks (transform, tokenize, decode) and its loss, and says what to evaluate and export.
Specs are registered by name in training/registry.py.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dataprep.store import WITH_SECRETS, S3Settings
from training.config import DataConfig, TrainConfig
from training.data import (
    Decode,
    DecodeImage,
    ImageTransform,
    Tokenize,
    TrainLoader,
    make_train_loader,
)
from training.shards import DataError, ShardInfo, check_data, resolve_shards


class ModelSpec(abc.ABC):
    name: str  # the registered name, set by training.registry.get_spec

    @abc.abstractmethod
    def build(self, cfg: TrainConfig) -> nn.Module:
        """The model, freshly initialised (the same on every rank for the same seed)."""

    @abc.abstractmethod
    def transform(self, cfg: TrainConfig) -> ImageTransform:
        """PIL image -> the tensor the model trains on (the default ``decode`` uses it)."""

    @abc.abstractmethod
    def tokenize(self, cfg: TrainConfig) -> Tokenize:
        """A batch's captions -> its ``text`` tensor."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named loss terms; `total` is what gets back-propagated."""

    def decode(self, cfg: TrainConfig) -> Decode:
        """A raw sample -> its named tensors: by default ``{"image": transform(image)}``."""
        return DecodeImage(self.transform(cfg))

    def train_loader(
        self, cfg: TrainConfig, rank: int, world_size: int, shards: list[ShardInfo] | None = None
    ) -> TrainLoader:
        """Batches of one epoch with `.steps_per_epoch` (equal on every rank) and
        `.set_epoch(epoch, skip_batches)`, built from the hooks above; `shards`: the list the
        driver resolved (else this worker resolves it)."""
        if shards is None:
            s3_json = cfg.store.s3.model_dump_json(context=WITH_SECRETS)
            shards = _shards(cfg.data.model_dump_json(), s3_json)
        return make_train_loader(
            cfg.data,
            shards,
            rank=rank,
            world_size=world_size,
            batch_size=cfg.engine.micro_batch_size,
            decode=self.decode(cfg),
            tokenize=self.tokenize(cfg),
            s3=cfg.store.s3,
            pin_memory=cfg.scale.use_gpu,
        )

    def check_inputs(self, cfg: TrainConfig) -> None:
        """Raise (DataError, FileNotFoundError) if what the run reads is missing; called on the
        driver before any worker starts, so a typo costs seconds, not a cluster start-up."""
        if cfg.data.codes is not None:  # specs that read code sidecars override this check
            raise DataError(f"data.codes: {self.name} does not train on dVAE code sidecars")
        check_data(cfg.data, cfg.store.s3)

    def prepare(self, cfg: TrainConfig) -> None:
        """Load what `build` needs from elsewhere (a frozen dVAE): called before `build`, outside
        ZeRO-3's partitioned construction, which would partition it too."""
        return None

    def late_inits(self, model: nn.Module) -> list[tuple[list[nn.Parameter], Callable[[], None]]]:
        """Initialisers a parent's ``__init__`` applies to its children's weights (open_clip's
        ``init_parameters``): under ZeRO-3's partitioned construction they saw only empty
        partitions, so the engine runs them again with these parameters gathered."""
        return [
            (list(m.parameters()), m.init_parameters)
            for m in model.modules()
            if callable(getattr(m, "init_parameters", None))
        ]

    def architecture(self, cfg: TrainConfig) -> nn.Module:
        """The model without what `build` loads from elsewhere: the memory planner builds it on
        the meta device."""
        return self.build(cfg)

    def activation_bytes(self, cfg: TrainConfig, checkpointing: bool) -> int | None:
        """Activation bytes of one micro-batch on one GPU; None: not estimated."""
        return None

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
            # A ZeRO-3 partition is a flat tensor; its full shape decides (as a meta tensor).
            shaped = (
                torch.empty(param.ds_shape, device="meta") if hasattr(param, "ds_shape") else param
            )
            (no_decay if spec.no_weight_decay(name, shaped) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@functools.cache
def _shards(data_json: str, s3_json: str) -> list[ShardInfo]:
    """Shard list and counts, resolved once per worker process (it may list a bucket)."""
    return resolve_shards(
        DataConfig.model_validate_json(data_json), S3Settings.model_validate_json(s3_json)
    )
