"""CLIP for training: the model factory (``dataprep.clip_models``) and the optimizer's groups.

The factory lives in dataprep so the embed stage can build the same models without importing
training; training code takes its CLIP from here.
"""

from __future__ import annotations

from typing import Any

import torch

from dataprep.clip_models import ClipBundle, create_clip, list_clip_models, register_model_configs

__all__ = [
    "ClipBundle",
    "create_clip",
    "list_clip_models",
    "no_weight_decay",
    "param_groups",
    "register_model_configs",
]


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: gains, biases, norms and the temperature are not decayed."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` on weight matrices, 0 on everything else."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {
            "params": [p for n, p in named if not no_weight_decay(n, p)],
            "weight_decay": weight_decay,
        },
        {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0},
    ]
