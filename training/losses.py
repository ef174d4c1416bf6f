"""Contrastive (CLIP / InfoNCE) loss, exact across data-parallel ranks.

Gradient bookkeeping with ``gather_with_grad=True`` (the default): the backward of
``torch.distributed.nn.functional.all_gather`` *sums* the gradients every rank computes for a
rank's features, so on each rank the gradient of its local features is ``world_size`` x the
gradient the same features get in a single process on the concatenated batch.  Data-parallel
training (DDP, DeepSpeed) then *averages* parameter gradients over ranks, which divides that
factor out again: the averaged parameter gradient equals the single-process gradient on the
global batch.  This holds for both variants:

* ``local_loss=False``: every rank computes the full ``[W*B, W*B]`` loss (same value on all
  ranks); memory is quadratic in the global batch.
* ``local_loss=True``: each rank computes only its ``[B, W*B]`` rows, labels offset by
  ``rank * B``.  Its loss value is its share, the *mean over ranks* equals the full loss; the
  gradients are the same as above.  Memory is linear in the global batch.

``gather_with_grad=False`` gathers detached copies (open_clip's cheaper option).  Without
``local_loss`` the local features are put back in their own slot, so the local gradient is 1x
(not ``world_size`` x) the single-process one and after averaging the towers get
``1/world_size`` of the full gradient; with ``local_loss`` the gradient through other ranks'
rows is lost entirely.  Prefer the default.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

#: open_clip clamps the learnable temperature so the logit multiplier stays in [1, 100].
MAX_LOGIT_SCALE = math.log(100.0)


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(
    features: torch.Tensor, with_grad: bool = True, keep_local_grad: bool = True
) -> torch.Tensor:
    """All ranks' ``features`` [B, D] concatenated in rank order -> [W*B, D].

    ``with_grad``: gradients flow back to every rank's features.  Otherwise the gather is
    detached, and ``keep_local_grad`` puts this rank's own (differentiable) tensor in its slot.
    """
    rank, world_size = rank_and_world()
    if world_size == 1:
        return features
    if with_grad:
        with warnings.catch_warnings():  # deprecated in torch 2.14 but still the autograd gather
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(dist_nn.all_gather(features), dim=0)
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.detach().contiguous())
    if keep_local_grad:
        gathered[rank] = features
    return torch.cat(gathered, dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over L2-normalised image and text features.

    forward(image_features [B, D], text_features [B, D], logit_scale) -> {"contrastive", "total"}
    where ``logit_scale`` is the *multiplier* (open_clip's ``model.logit_scale.exp()``, which the
    model's forward returns).  Pair i of the batch is the positive for row i.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def logits(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text, labels) for this rank."""
        rank, world_size = rank_and_world()
        batch = image_features.shape[0]
        labels = torch.arange(batch, device=image_features.device)
        if world_size == 1:
            logits_per_image = logit_scale * image_features @ text_features.T  # [B, B]
            return logits_per_image, logits_per_image.T, labels
        keep_local = not self.local_loss  # local rows use the local tensors directly anyway
        all_image = gather_features(image_features, self.gather_with_grad, keep_local)  # [W*B, D]
        all_text = gather_features(text_features, self.gather_with_grad, keep_local)  # [W*B, D]
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T  # [B, W*B]
            logits_per_text = logit_scale * text_features @ all_image.T  # [B, W*B]
            return logits_per_image, logits_per_text, labels + rank * batch
        logits_per_image = logit_scale * all_image @ all_text.T  # [W*B, W*B]
        labels = torch.arange(world_size * batch, device=image_features.device)
        return logits_per_image, logits_per_image.T, labels

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        logits_per_image, logits_per_text, labels = self.logits(
            image_features, text_features, logit_scale
        )
        contrastive = (
            F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
        ) / 2
        return {"contrastive": contrastive, "total": contrastive}


def clamp_logit_scale(model: nn.Module, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Clamp the model's learnable log-temperature to [0, ln 100] in place.

    Call after every optimizer step (as open_clip does): unclamped, the temperature keeps
    growing on an easy task and the loss becomes unstable.  Works through DDP/DeepSpeed wrappers
    (``.module``); with ZeRO-3 the parameter must be gathered first.
    """
    model = getattr(model, "module", model)
    with torch.no_grad():
        model.logit_scale.clamp_(0, max_value)
