"""DALL-E transformer (stage 2) on captioned images coded by a frozen dVAE.

Codes come from sidecars written ahead (``data.codes``, training/codes.py: the dVAE runs once
per image, not once per epoch) or from the dVAE named by ``dvae_checkpoint`` on the fly, per
batch. The dVAE is not trained; it also codes the held-out images of evaluations. Captions
become BPE tokens with per-position pads (training/models/bpe.py).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
from torch import nn

from dataprep.store import WITH_SECRETS, S3Settings, local_copy, require_file
from training.codes import ReadCodes, check_codes
from training.config import TrainConfig
from training.data import Decode, ImageTransform, Tokenize
from training.models.attention import block_plan
from training.models.bpe import DalleTokenizer
from training.models.dalle import Dalle, DalleConfig, dalle_loss
from training.models.dvae import DVAE, load_dvae
from training.shards import check_data
from training.specs import ModelSpec
from training.specs.dvae import heldout_images, image_transform

EXPORT_NAME = "dalle.pt"
BYTES_16BIT = 2


def model_config(cfg: TrainConfig) -> DalleConfig:
    return DalleConfig.named(cfg.model, **cfg.model_args)


@functools.cache
def frozen_dvae(uri: str, s3_json: str) -> DVAE:
    """The dVAE that codes images, loaded once per process."""
    return load_dvae(local_copy(uri, S3Settings.model_validate_json(s3_json)))


@functools.cache
def tokenizer(vocab_size: int, text_len: int) -> DalleTokenizer:
    return DalleTokenizer(vocab_size, text_len)


def check_compatible(config: DalleConfig, dvae: DVAE) -> None:
    if (dvae.config.vocab_size, dvae.config.grid) != (config.image_vocab, config.image_grid):
        raise ValueError(
            f"the dVAE codes {dvae.config.grid}x{dvae.config.grid} from "
            f"{dvae.config.vocab_size} codes but the transformer expects "
            f"{config.image_grid}x{config.image_grid} from {config.image_vocab}"
        )


def save_dalle(model: Dalle, path: Path, dvae_checkpoint: str | None) -> Path:
    """A checkpoint that rebuilds itself (``model_args``) and names its dVAE."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {
            "model_args": dataclasses.asdict(model.config),
            "state_dict": state,
            "dvae_checkpoint": dvae_checkpoint,
        },
        path,
    )
    return path


def load_dalle(path: str | Path) -> tuple[Dalle, str | None]:
    """The transformer (eval mode) and the dVAE checkpoint it was trained with."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = Dalle(DalleConfig.from_dict(checkpoint["model_args"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint.get("dvae_checkpoint")


def dalle_activation_bytes(cfg: TrainConfig, checkpointing: bool) -> int:
    """Activation bytes of one micro-batch of the transformer on one GPU (docs/training.md)."""
    m = model_config(cfg)
    b, s, h, a = cfg.engine.micro_batch_size, m.seq_len, m.d_model, m.n_head
    layer = s * b * h * 34  # every layer's non-attention-score activations
    for kind in ("row", "column", "conv"):  # the largest sparse layer bounds the others
        plan = block_plan(kind, m.layout, m.conv_kernel)
        keys = m.text_len + plan.window  # keys per image query, text queries fewer
        layer = max(layer, s * b * h * 34 + 5 * a * b * s * keys)
    logits = b * ((m.text_len - 1) * m.text_vocab_padded + m.image_len * m.image_vocab) * 10
    if checkpointing:
        return m.n_layer * BYTES_16BIT * s * b * h + layer + logits
    return m.n_layer * layer + logits


class DalleSpec(ModelSpec):
    def dvae(self, cfg: TrainConfig) -> DVAE:
        if cfg.dvae_checkpoint is None:
            raise ValueError("spec 'dalle' needs dvae_checkpoint")
        dvae = frozen_dvae(cfg.dvae_checkpoint, cfg.store.s3.model_dump_json(context=WITH_SECRETS))
        check_compatible(model_config(cfg), dvae)
        return dvae

    def check_inputs(self, cfg: TrainConfig) -> None:
        shards = check_data(cfg.data, cfg.store.s3)
        if cfg.data.codes is not None:
            check_codes(cfg.data.codes, shards, cfg.store.s3)
        require_file(
            cfg.dvae_checkpoint,
            cfg.store.s3,
            "dvae_checkpoint (a dVAE export: mmpipe train dvae writes runs/NAME/export/dvae.pt)",
        )

    def prepare(self, cfg: TrainConfig) -> None:
        self._dvae = self.dvae(cfg)  # fails early on a missing or mismatched dVAE

    def build(self, cfg: TrainConfig) -> nn.Module:
        self.prepare(cfg)
        return Dalle(model_config(cfg))

    def architecture(self, cfg: TrainConfig) -> nn.Module:
        return Dalle(model_config(cfg))  # without the frozen dVAE

    def activation_bytes(self, cfg: TrainConfig, checkpointing: bool) -> int:
        return dalle_activation_bytes(cfg, checkpointing)

    def transform(self, cfg: TrainConfig) -> ImageTransform:
        return image_transform(self.dvae(cfg).config.image_size)

    def tokenize(self, cfg: TrainConfig) -> Tokenize:
        config = model_config(cfg)
        return tokenizer(config.text_vocab, config.text_len)

    def decode(self, cfg: TrainConfig) -> Decode:
        """Codes from the sidecars in ``data.codes``; without them, images for the dVAE."""
        if cfg.data.codes is not None:
            return ReadCodes(cfg.data.codes, cfg.store.s3)
        return super().decode(cfg)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "codes" in batch:  # sidecars: check they come from a dVAE of the same grid
            codes = batch["codes"].flatten(1)
            if codes.shape[1] != self._dvae.config.grid**2:
                raise ValueError(
                    f"data.codes holds {tuple(batch['codes'].shape[1:])} code grids but the "
                    f"dVAE codes {self._dvae.config.grid}x{self._dvae.config.grid}"
                )
        else:
            codes = self.codes(batch["image"])
        text_logits, image_logits = model(batch["text"], codes)
        return dalle_loss(text_logits, image_logits, batch["text"], codes)

    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N] dVAE codes in raster order (the dVAE runs in fp32)."""
        dvae = self._dvae.to(images.device)
        return dvae.encode(images.float()).flatten(1)

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        model.grad_checkpointing = True

    def evaluate(self, model: nn.Module, cfg: TrainConfig, dtype: torch.dtype) -> dict[str, float]:
        """Text and image cross-entropy on ``eval.set``'s captions and images; each rank scores
        its share and the sums are reduced."""
        from training.evaluate import decode_images, heldout_sampleweb, heldout_shards, rank_share

        config, e = model.config, cfg.eval
        size = self._dvae.config.image_size
        if e.set == "shards":
            raw, _, captions = heldout_shards(e.source, e.heldout_samples, cfg.store.s3)
            share, real = rank_share(len(raw))
            images = decode_images([raw[i] for i in share], image_transform(size))
        else:
            _, _, captions = heldout_sampleweb(
                e.heldout_samples, e.heldout_seed, e.crawl_image_size
            )
            share, real = rank_share(len(captions))
            images = heldout_images(len(captions), e.heldout_seed, e.crawl_image_size, size)[share]
        text = tokenizer(config.text_vocab, config.text_len)([captions[i] for i in share])
        device = next(model.parameters()).device
        sums = torch.zeros(3, device=device)  # total, text_ce, image_ce, over real samples
        for start in range(0, len(share), e.batch_size):
            chunk = slice(start, start + e.batch_size)
            codes = self.codes(images[chunk].to(device))
            text_logits, image_logits = model(text[chunk].to(device), codes)
            keep = max(0, min(real - start, codes.shape[0]))  # the padding is scored, not counted
            if keep:
                terms = dalle_loss(
                    text_logits[:keep],
                    image_logits[:keep],
                    text[chunk][:keep].to(device),
                    codes[:keep],
                )
                sums += keep * torch.stack([terms["total"], terms["text_ce"], terms["image_ce"]])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        total, text_ce, image_ce = (sums / len(captions)).tolist()
        return {"eval/total": total, "eval/text_ce": text_ce, "eval/image_ce": image_ce}

    def export(self, state_dict: dict[str, torch.Tensor], cfg: TrainConfig, out: Path) -> Path:
        model = Dalle(model_config(cfg))
        model.load_state_dict(state_dict)
        return save_dalle(model, out / EXPORT_NAME, cfg.dvae_checkpoint)
