"""DALL-E's transformer (stage 2): a decoder-only model over [text tokens | image tokens].

Sequence. ``T`` text tokens (BPE, padded with one pad token per position: a pad at position j
is token ``text_vocab + j``, as in the paper), then the ``H x W`` dVAE codes of the image in
raster order: ``S = T + N`` positions. Position j predicts token j + 1: text positions
``0..T-2`` predict text tokens ``1..T-1`` (token 0 is always start-of-text), positions
``T-1..S-2`` predict the image codes ``0..N-1``. The last image code is fed too, so the image
part is a full grid for the sparse attention; its output is unused.

Embeddings: text tokens + a learned position per text slot; image codes + a row embedding +
a column embedding. Two output heads: text logits over ``text_vocab + T`` (pads included),
image logits over the dVAE's codes.

Blocks: pre-LayerNorm transformer blocks (attention, 4x MLP with GELU); each layer's attention
is row, column or convolutional in the image part (training/models/attention.py has the masks
and the paper's layer schedule). Loss: ``(1/8) text CE + (7/8) image CE``, each the mean over
its own tokens.

Sizes are ``DalleConfig`` flavors in ``model_configs/dalle-*.json``; ``dalle-12b`` is the
paper's 64 layers x 3968 wide (62 heads of 64), ~12.3 B parameters with untied heads. Build it
on the meta device (``torch.device("meta")``) to count or plan without allocating.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.models.attention import (
    Kind,
    Layout,
    dense_attention,
    full_mask,
    layer_kinds,
    sparse_attention,
)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"  # shipped in the package
TEXT_LOSS_WEIGHT = 1 / 8  # the paper's weighting; image tokens get 7/8


@dataclass(frozen=True)
class DalleConfig:
    text_vocab: int = 16384  # BPE vocabulary (start/end-of-text included); pad ids follow it
    text_len: int = 256
    image_vocab: int = 8192  # dVAE codebook size
    image_grid: int = 32  # image tokens form image_grid x image_grid
    n_layer: int = 64
    n_head: int = 62
    d_model: int = 3968
    conv_kernel: int = 11  # the last layer's causal convolutional window
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        if self.text_len < 2:
            raise ValueError("text_len must be at least 2 (start-of-text and one more)")

    @property
    def layout(self) -> Layout:
        return Layout(self.text_len, self.image_grid, self.image_grid)

    @property
    def image_len(self) -> int:
        return self.image_grid**2

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def text_vocab_padded(self) -> int:
        return self.text_vocab + self.text_len

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> DalleConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise ValueError(
                f"unknown DalleConfig fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**args)

    @classmethod
    def named(cls, name: str, **overrides: Any) -> DalleConfig:
        """The flavor ``model_configs/<name>.json`` (beside this module), with field overrides."""
        path = MODEL_CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"unknown DALL-E model {name!r}: no {path}")
        return cls.from_dict(json.loads(path.read_text()) | overrides)


class ByteMaskDropout(nn.Module):
    """``nn.Dropout`` with a cheaper mask on CPU, where torch's one bernoulli per element costs a
    tiny model a large share of its step (docs/training.md). Here each random int64 gives 8 mask
    bytes: an element is kept when its byte is below ``round(256 * (1 - p))``, so p is rounded to
    a multiple of 1/256, and kept values are scaled by the inverse of that keep rate (the
    expectation is unchanged). Other devices: torch's dropout. Uses the default generator, so
    ``torch.manual_seed`` and activation checkpointing's RNG replay give the same masks."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(256 * (1 - p))  # keep a byte below this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, (-(-n // 8),), dtype=torch.int64)
        keep = words.view(torch.uint8)[:n].view(x.shape) < self.threshold
        return x * keep.to(x.dtype).mul_(256 / self.threshold)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SelfAttention(nn.Module):
    def __init__(self, cfg: DalleConfig, kind: Kind):
        super().__init__()
        self.kind, self.layout, self.kernel = kind, cfg.layout, cfg.conv_kernel
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = ByteMaskDropout(cfg.dropout)
        self.dense = False  # True: the dense masked reference (tests, benchmarks)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bsz, seq, _ = x.shape
        qkv = self.qkv(x).view(bsz, seq, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, h, S, hd]
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, d]
        q, k, v = self._heads(x)
        attend = dense_attention if self.dense else sparse_attention
        y = attend(q, k, v, self.kind, self.layout, self.kernel)  # [B, h, S, hd]
        y = y.transpose(1, 2).reshape(x.shape)  # [B, S, d]
        return self.dropout(self.proj(y))

    def step(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """Positions ``cache.length .. cache.length + L - 1`` given all earlier ones in
        ``cache``: x [B, L, d] -> [B, L, d]; appends their keys and values."""
        q, k, v = self._heads(x)
        start = cache.length
        keys, values = cache.append(layer, k, v)  # [B, h, start + L, hd]
        mask = cache.mask(self.kind, self.kernel)[start : start + x.shape[1], : start + x.shape[1]]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(x.device))
        return self.proj(y.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, cfg: DalleConfig, kind: Kind):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, kind)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
            ByteMaskDropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def step(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        x = x + self.attn.step(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class Dalle(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.text_embedding = nn.Embedding(cfg.text_vocab_padded, d)
        self.text_pos_embedding = nn.Embedding(cfg.text_len, d)
        self.image_embedding = nn.Embedding(cfg.image_vocab, d)
        self.image_row_embedding = nn.Embedding(cfg.image_grid, d)
        self.image_col_embedding = nn.Embedding(cfg.image_grid, d)
        self.dropout = ByteMaskDropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in layer_kinds(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_vocab_padded)
        self.image_head = nn.Linear(d, cfg.image_vocab)
        self.grad_checkpointing = False
        # GPT-2: residual projections scaled down by depth so the residual stream stays O(1)
        for block in self.blocks:
            block.attn.proj.residual_std = block.mlp[2].residual_std = 0.02 / math.sqrt(
                2 * cfg.n_layer
            )
        # One `apply`: under ZeRO-3's partitioned construction (training/parallel.py) DeepSpeed
        # gathers each module's weights around it; a plain loop would see empty partitions.
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=getattr(module, "residual_std", 0.02))
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Tokens at positions ``start .. start + L - 1`` (text, image or both): [B, L] -> [B, L, d]."""
        cfg = self.config
        device = tokens.device
        n_text = min(max(cfg.text_len - start, 0), tokens.shape[1])
        parts = []
        if n_text:
            text_pos = torch.arange(start, start + n_text, device=device)
            parts.append(
                self.text_embedding(tokens[:, :n_text]) + self.text_pos_embedding(text_pos)
            )
        if n_text < tokens.shape[1]:
            first = max(start - cfg.text_len, 0)
            image_pos = torch.arange(first, first + tokens.shape[1] - n_text, device=device)
            rows, cols = image_pos // cfg.image_grid, image_pos % cfg.image_grid
            parts.append(
                self.image_embedding(tokens[:, n_text:])
                + self.image_row_embedding(rows)
                + self.image_col_embedding(cols)
            )
        return torch.cat(parts, dim=1)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B, T] (pads per position), image codes [B, N] ->
        text logits [B, T-1, text_vocab + T] (for text tokens 1..T-1),
        image logits [B, N, image_vocab] (for image codes 0..N-1)."""
        cfg = self.config
        x = self.dropout(self.embed(torch.cat([text, image], dim=1), 0))  # [B, S, d]
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.ln_f(x)
        text_logits = self.text_head(x[:, : cfg.text_len - 1])
        image_logits = self.image_head(x[:, cfg.text_len - 1 : cfg.seq_len - 1])
        return text_logits, image_logits

    def set_dense_attention(self, dense: bool) -> None:
        """Compute attention with the dense masked reference instead of the sparse kernels."""
        for block in self.blocks:
            block.attn.dense = dense

    # --- incremental decoding (sampling) ---------------------------------------------------

    def new_cache(self, batch: int) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, batch, p.dtype, p.device)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed tokens [B, L] at the next L positions (a prompt, then one token at a time);
        return the logits of the token after the last one: [B, vocab of that token's kind]."""
        last = cache.length + tokens.shape[1] - 1
        x = self.embed(tokens, cache.length)
        for layer, block in enumerate(self.blocks):
            x = block.step(x, cache, layer)
        cache.length += tokens.shape[1]
        x = self.ln_f(x[:, -1])  # [B, d]
        head = self.text_head if last < self.config.text_len - 1 else self.image_head
        return head(x)


class KVCache:
    """Keys and values of the positions fed so far, per layer: [B, h, S, hd] each."""

    def __init__(self, cfg: DalleConfig, batch: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.n_layer, 2, batch, cfg.n_head, cfg.seq_len, cfg.d_model // cfg.n_head)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.layout = cfg.layout
        self.length = 0
        self._masks: dict[tuple[str, int], torch.Tensor] = {}

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        self.kv[layer, 0, :, :, self.length : end] = k
        self.kv[layer, 1, :, :, self.length : end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]

    def mask(self, kind: Kind, kernel: int) -> torch.Tensor:
        if (kind, kernel) not in self._masks:
            self._masks[kind, kernel] = full_mask(kind, self.layout, kernel)
        return self._masks[kind, kernel]


def dalle_loss(
    text_logits: torch.Tensor, image_logits: torch.Tensor, text: torch.Tensor, image: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The paper's loss: 1/8 text CE + 7/8 image CE, each averaged over its own tokens."""
    text_ce = F.cross_entropy(text_logits.flatten(0, 1).float(), text[:, 1:].flatten())
    image_ce = F.cross_entropy(image_logits.flatten(0, 1).float(), image.flatten())
    total = TEXT_LOSS_WEIGHT * text_ce + (1 - TEXT_LOSS_WEIGHT) * image_ce
    return {"total": total, "text_ce": text_ce, "image_ce": image_ce}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
