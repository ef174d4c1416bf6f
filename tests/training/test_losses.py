"""ClipLoss: symmetric InfoNCE, exact across 2 real gloo processes (no mocks)."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from training.losses import MAX_LOGIT_SCALE, ClipLoss, clamp_logit_scale

WORLD = 2
BATCH = 6  # per rank
IN_DIM, DIM = 10, 8


def towers() -> tuple[nn.Linear, nn.Linear, nn.Parameter]:
    """Deterministic stand-ins for the image/text towers and the log-temperature."""
    torch.manual_seed(0)
    return nn.Linear(IN_DIM, DIM), nn.Linear(IN_DIM, DIM), nn.Parameter(torch.tensor(2.0))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(WORLD * BATCH, IN_DIM), torch.randn(WORLD * BATCH, IN_DIM)


def step(loss_fn: ClipLoss, images: torch.Tensor, texts: torch.Tensor) -> dict:
    """One forward/backward; returns the loss, feature grads and parameter grads."""
    image_tower, text_tower, log_scale = towers()
    image_features = F.normalize(image_tower(images), dim=-1)
    text_features = F.normalize(text_tower(texts), dim=-1)
    image_features.retain_grad()
    text_features.retain_grad()
    loss = loss_fn(image_features, text_features, log_scale.exp())["total"]
    loss.backward()
    params = [*image_tower.parameters(), *text_tower.parameters(), log_scale]
    return {
        "loss": loss.detach(),
        "image_grad": image_features.grad,
        "text_grad": text_features.grad,
        "param_grads": [p.grad for p in params],
    }


def reference(loss_fn: ClipLoss) -> dict:
    return step(loss_fn, *inputs())


def _worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        images, texts = inputs()
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        for name, kwargs in VARIANTS.items():
            out = step(ClipLoss(**kwargs), images[mine], texts[mine])
            for grad in out["param_grads"]:  # what DDP / DeepSpeed do: average over ranks
                dist.all_reduce(grad)
                grad /= WORLD
            mean_loss = out["loss"].clone()
            dist.all_reduce(mean_loss)
            results[(rank, name)] = out | {"mean_loss": mean_loss / WORLD}
    finally:
        dist.destroy_process_group()


VARIANTS = {
    "gather": dict(local_loss=False, gather_with_grad=True),
    "local": dict(local_loss=True, gather_with_grad=True),
    "no_grad_gather": dict(local_loss=False, gather_with_grad=False),
}


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict:
    """Run every variant in 2 spawned gloo processes; results keyed by (rank, variant)."""
    init_file = tmp_path_factory.mktemp("dist") / "init"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(init_file), results), nprocs=WORLD, join=True)
        return dict(results)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- single process


def test_matches_the_definition():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1)
    scale = torch.tensor(7.0)
    out = ClipLoss()(img, txt, scale)
    logits = scale * img @ txt.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert set(out) == {"contrastive", "total"}
    assert torch.allclose(out["contrastive"], expected) and torch.equal(
        out["total"], out["contrastive"]
    )
    swapped = ClipLoss()(txt, img, scale)["total"]  # symmetric in the two modalities
    assert torch.allclose(swapped, expected)


def test_aligned_pairs_give_low_loss():
    feats = torch.eye(8)
    aligned = ClipLoss()(feats, feats, torch.tensor(100.0))["total"]
    shuffled = ClipLoss()(feats, feats.roll(1, 0), torch.tensor(100.0))["total"]
    assert aligned.item() < 1e-6 < 10 < shuffled.item()
    uniform = ClipLoss()(feats, feats, torch.tensor(0.0))["total"]  # scale 0: chance
    assert uniform.item() == pytest.approx(math.log(8))


def test_clamp_logit_scale():
    model = nn.Module()
    model.logit_scale = nn.Parameter(torch.tensor(9.0))
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    wrapper = nn.Module()
    wrapper.module = model  # DDP / DeepSpeed style
    model.logit_scale.data.fill_(-1.0)
    clamp_logit_scale(wrapper)
    assert model.logit_scale.item() == 0.0


# --------------------------------------------------------------------------- two processes


@pytest.mark.parametrize("variant", ["gather", "local"])
def test_distributed_matches_the_concatenated_batch(distributed, variant):
    """Averaged over ranks (as DDP does), loss and parameter gradients equal one process on the
    concatenated batch; each rank's feature gradients are WORLD x the single-process ones
    (the all_gather backward sums the gradient that every rank computes)."""
    ref = reference(ClipLoss())
    for rank in range(WORLD):
        out = distributed[(rank, variant)]
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        assert close(out["mean_loss"], ref["loss"])
        if variant == "gather":  # every rank computes the full loss
            assert close(out["loss"], ref["loss"])
        assert close(out["image_grad"], WORLD * ref["image_grad"][mine])
        assert close(out["text_grad"], WORLD * ref["text_grad"][mine])
        for got, want in zip(out["param_grads"], ref["param_grads"], strict=True):
            assert close(got, want)


def test_local_loss_is_each_ranks_share(distributed):
    losses = [distributed[(rank, "local")]["loss"] for rank in range(WORLD)]
    assert not close(losses[0], losses[1])  # different rows, different values
    assert close(sum(losses) / WORLD, reference(ClipLoss())["loss"])


def test_gather_without_grad_keeps_only_local_gradients(distributed):
    ref = reference(ClipLoss())
    for rank in range(WORLD):
        out = distributed[(rank, "no_grad_gather")]
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        assert close(out["loss"], ref["loss"])
        assert close(out["image_grad"], ref["image_grad"][mine])  # 1x, not WORLD x
