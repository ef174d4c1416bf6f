"""DALL-E's discrete VAE (stage 1): images <-> a grid of codes from a K-entry vocabulary.

Architecture (the paper's, as OpenAI released it): an encoder of 4 groups of bottleneck
resblocks, widths ``hidden x (1, 2, 4, 8)``, with a 2x max-pool after each of the first three
groups (8x downsampling; ``downsampling`` 4 or 2 pools fewer times, for small images), ending in
a 1x1 convolution to K logits per grid cell; a decoder that mirrors it (1x1 convolution from K
channels, 4 groups with 2x nearest upsampling after the first three, widths
``hidden x (8, 4, 2, 1)``). Convolutions start from OpenAI's initialisation. Every resblock adds ``post_gain x residual`` to its
identity path, with ``post_gain = 1 / (number of resblocks)^2``, which keeps a deep stack close to
the identity at initialisation.

Training: the encoder's logits are relaxed with gumbel-softmax at temperature ``tau`` (soft
samples in the forward and backward passes, no straight-through); the decoder sees the relaxed
one-hot grid. The loss is the negative ELBO with a beta-weighted KL to the uniform prior over the
K codes. Reconstruction is the paper's logit-Laplace likelihood (pixels squeezed into
``[eps, 1 - eps]``, the decoder predicts a location and log-scale per subpixel) or plain MSE.
``tau`` is annealed and the KL weight ramped up with cosine schedules (``cosine_schedule``).

At encode time the codes are the argmax of the logits; ``decode`` maps codes back to pixels.
Images are floats in [0, 1], [B, 3, H, W].
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"  # shipped in the package
LOGIT_LAPLACE_EPS = 0.1  # the paper's epsilon


@dataclass(frozen=True)
class DVAEConfig:
    image_size: int = 256
    channels: int = 3
    vocab_size: int = 8192  # K
    hidden: int = 256  # width of the first encoder group (and last decoder group)
    blocks_per_group: int = 2
    decoder_init: int = 128  # channels after the decoder's first 1x1 convolution
    reconstruction: Literal["logit_laplace", "mse"] = "logit_laplace"
    # relaxation schedules (the paper's): KL weight 0 -> 6.6 over 5000 updates, tau 1 -> 1/16
    # over 150k updates, both cosine
    kl_weight: float = 6.6
    kl_warmup_steps: int = 5000
    temperature_start: float = 1.0
    temperature_end: float = 1 / 16
    temperature_steps: int = 150_000
    # 2x pooling after the first log2(downsampling) groups: 8 in the paper; 4 gives small
    # images a finer grid (32 px -> 8x8 codes)
    downsampling: Literal[2, 4, 8] = 8

    def __post_init__(self) -> None:
        if self.downsampling not in (2, 4, 8):
            raise ValueError(f"downsampling must be 2, 4 or 8, not {self.downsampling}")
        if self.image_size % self.downsampling:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of {self.downsampling}"
            )
        if self.reconstruction not in ("logit_laplace", "mse"):
            raise ValueError(f"unknown reconstruction {self.reconstruction!r}")

    @property
    def scaling_stages(self) -> int:
        return self.downsampling.bit_length() - 1  # 8 -> 3

    @property
    def grid(self) -> int:
        return self.image_size // self.downsampling

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> DVAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown DVAEConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**args)

    @classmethod
    def named(cls, name: str, **overrides: Any) -> DVAEConfig:
        """The flavor ``model_configs/<name>.json`` (beside this module), with field overrides."""
        path = MODEL_CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"unknown dVAE model {name!r}: no {path}")
        return cls.from_dict(json.loads(path.read_text()) | overrides)


def cosine_schedule(step: int, start: float, end: float, steps: int) -> float:
    """``start`` at step 0 to ``end`` at ``steps`` along half a cosine, then ``end``."""
    progress = min(max(step, 0) / max(steps, 1), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def temperature_at(cfg: DVAEConfig, step: int) -> float:
    return cosine_schedule(step, cfg.temperature_start, cfg.temperature_end, cfg.temperature_steps)


def kl_weight_at(cfg: DVAEConfig, step: int) -> float:
    return cosine_schedule(step, 0.0, cfg.kl_weight, cfg.kl_warmup_steps)


class EncoderBlock(nn.Module):
    """Bottleneck resblock: 3x3, 3x3, 3x3, 1x1 convolutions at a quarter of the width."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.grad_checkpointing = False
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(n_in, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    """Bottleneck resblock: 1x1, 3x3, 3x3, 3x3 convolutions at a quarter of the width."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.grad_checkpointing = False
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(n_in, n_hid, 1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hid, n_out, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(block: type[nn.Module], n_in: int, n_out: int, cfg: DVAEConfig, n_layers: int):
    blocks = [
        block(n_in if i == 0 else n_out, n_out, n_layers) for i in range(cfg.blocks_per_group)
    ]
    return [(f"block_{i + 1}", b) for i, b in enumerate(blocks)]


class Encoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        n_layers = 4 * cfg.blocks_per_group
        widths = [cfg.hidden * m for m in (1, 2, 4, 8)]
        groups: list[tuple[str, nn.Module]] = [
            ("input", nn.Conv2d(cfg.channels, cfg.hidden, 7, padding=3))
        ]
        n_in = cfg.hidden
        for g, width in enumerate(widths):
            layers = _group(EncoderBlock, n_in, width, cfg, n_layers)
            if g < cfg.scaling_stages:
                layers.append(("pool", nn.MaxPool2d(2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
            n_in = width
        groups.append(("output", nn.Sequential(nn.ReLU(), nn.Conv2d(n_in, cfg.vocab_size, 1))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, K, H/8, W/8]
        return _run(self.blocks, x)


class Decoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        n_layers = 4 * cfg.blocks_per_group
        widths = [cfg.hidden * m for m in (8, 4, 2, 1)]
        out_channels = 2 * cfg.channels if cfg.reconstruction == "logit_laplace" else cfg.channels
        groups: list[tuple[str, nn.Module]] = [
            ("input", nn.Conv2d(cfg.vocab_size, cfg.decoder_init, 1))
        ]
        n_in = cfg.decoder_init
        for g, width in enumerate(widths):
            layers = _group(DecoderBlock, n_in, width, cfg, n_layers)
            if g >= 3 - cfg.scaling_stages and g < 3:
                layers.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
            n_in = width
        groups.append(("output", nn.Sequential(nn.ReLU(), nn.Conv2d(n_in, out_channels, 1))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, K, h, w] -> [B, 2C or C, 8h, 8w]
        return _run(self.blocks, z)


def _run(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run the groups; resblocks recompute in backward when checkpointing is on."""
    for group in blocks:
        for layer in group if isinstance(group, nn.Sequential) else [group]:
            if getattr(layer, "grad_checkpointing", False) and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
    return x


def _init_conv(module: nn.Module) -> None:
    """OpenAI's dVAE initialisation: weights N(0, 1 / fan_in), zero biases. PyTorch's default
    (variance 1 / (3 fan_in)) shrinks the signal along the chain of 1x1 identity-path
    convolutions, and a small dVAE then learns little beyond the mean image."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, std=1 / math.sqrt(module.weight[0].numel()))
        nn.init.zeros_(module.bias)


class DVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.apply(_init_conv)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for module in self.modules():
            if isinstance(module, EncoderBlock | DecoderBlock):
                module.grad_checkpointing = enabled

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the encoder's input (squeezed away from 0 and 1 for logit-Laplace),
        channels-last: every convolution then runs channels-last (oneDNN on CPU, tensor cores
        on GPU), the weights staying as they are (ZeRO flattens them)."""
        images = images.contiguous(memory_format=torch.channels_last)
        if self.config.reconstruction == "logit_laplace":
            return (1 - 2 * LOGIT_LAPLACE_EPS) * images + LOGIT_LAPLACE_EPS
        return images

    def forward(
        self, images: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: images [B, C, H, W] in [0, 1] -> (decoder output [B, 2C or C, H, W],
        encoder logits [B, K, h, w]). The decoder sees a gumbel-softmax sample at
        ``temperature``."""
        logits = self.encoder(self.prepare(images))
        soft_codes = F.gumbel_softmax(logits.float(), tau=temperature, hard=False, dim=1)
        return self.decoder(soft_codes.to(logits.dtype)), logits

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [0, 1] -> codes [B, h, w] (argmax of the logits)."""
        return self.encoder(self.prepare(images)).argmax(dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> images [B, C, H, W] in [0, 1]."""
        weight = next(self.decoder.parameters())
        one_hot = F.one_hot(codes, self.config.vocab_size).permute(0, 3, 1, 2)  # [B, K, h, w]
        return self.to_pixels(self.decoder(one_hot.to(weight.dtype)))

    def to_pixels(self, stats: torch.Tensor) -> torch.Tensor:
        """Decoder output -> the reconstruction's expected pixels in [0, 1]."""
        c = self.config.channels
        if self.config.reconstruction == "mse":
            return stats[:, :c].clamp(0, 1)
        mean = torch.sigmoid(stats[:, :c].float())
        return ((mean - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


def dvae_loss(
    model: nn.Module,
    images: torch.Tensor,
    temperature: float,
    kl_weight: float,
    cfg: DVAEConfig,
) -> dict[str, torch.Tensor]:
    """Negative ELBO per subpixel: ``(sum reconstruction NLL + kl_weight * sum KL) / (C H W)``,
    averaged over the batch. ``model`` is a DVAE or a wrapper whose call runs its forward."""
    stats, logits = model(images, temperature)
    stats, logits, images = stats.float(), logits.float(), images.float()
    subpixels = images[0].numel()
    c = cfg.channels
    if cfg.reconstruction == "logit_laplace":
        x = (1 - 2 * LOGIT_LAPLACE_EPS) * images + LOGIT_LAPLACE_EPS
        mu, log_b = stats[:, :c], stats[:, c:]
        # -log of 1 / (2 b x (1 - x)) exp(-|logit(x) - mu| / b)
        nll = log_b + math.log(2) + torch.log(x) + torch.log1p(-x)
        nll = nll + (torch.logit(x) - mu).abs() * torch.exp(-log_b)
        recon = nll.mean()
        with torch.no_grad():
            mean = ((torch.sigmoid(mu) - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(
                0, 1
            )
            mse = F.mse_loss(mean, images)
    else:
        recon = F.mse_loss(stats[:, :c], images)
        mse = recon.detach()
    log_q = F.log_softmax(logits, dim=1)  # [B, K, h, w]
    kl_per_cell = (log_q.exp() * (log_q + math.log(cfg.vocab_size))).sum(dim=1)  # KL(q || 1/K)
    kl = kl_per_cell.sum(dim=(1, 2)).mean() / subpixels
    total = recon + kl_weight * kl
    return {"total": total, "reconstruction": recon, "kl": kl, "mse": mse}


def save_dvae(model: DVAE, path: str | Path) -> Path:
    """A checkpoint that rebuilds itself: architecture (``model_args``) and fp32 weights."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save({"model_args": dataclasses.asdict(model.config), "state_dict": state}, path)
    return Path(path)


def load_dvae(path: str | Path) -> DVAE:
    """An exported dVAE, frozen (eval mode, no gradients)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = DVAE(DVAEConfig.from_dict(checkpoint["model_args"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval().requires_grad_(False)
