"""Memory planner: which ZeRO stage and offload lets a training config fit on N GPUs.

Per GPU, two parts:

- **Model states** (parameters, gradients, optimizer states) from DeepSpeed's own estimators,
  ``estimate_zero2_model_states_mem_needs`` and ``estimate_zero3_model_states_mem_needs`` (the
  functions behind ``estimate_zero{2,3}_model_states_mem_needs_all_cold``, which only print), for
  each option: ZeRO-2, ZeRO-2 with the optimizer on CPU, ZeRO-3, ZeRO-3 with the optimizer on
  CPU, ZeRO-3 with optimizer and parameters on CPU. Counts come from the model built on the
  meta device (nothing allocated).
- **Activations** of the transformer (DALL-E) for one micro-batch, after Korthikanti et al.
  2022 ("Reducing Activation Recomputation in Large Transformer Models"): a layer keeps
  ``s b h (34 + 5 a k / h)`` bytes in 16-bit, with ``k`` keys per query (``s`` for dense
  attention; the sparse layers' windows here). With checkpointing per resblock only each
  layer's input (``2 s b h`` bytes) is kept, plus one layer's full set while it is recomputed.
  Logits add ``b x (text + image logits) x 10`` bytes (16-bit logits, fp32 loss and gradient).
  Other models: activations are not estimated (model states only).

The verdict is the first option, in order of speed (less offload first), whose total fits in
``headroom`` of the GPU's memory (the rest: allocator fragmentation, communication buffers,
the CUDA context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from training.config import TrainConfig

GB = 2**30
BYTES_16BIT = 2


@dataclass(frozen=True)
class Option:
    name: str
    stage: int
    offload_optimizer: bool
    offload_params: bool
    model_states_gb: float  # per GPU
    cpu_gb_per_node: float  # host memory DeepSpeed's estimator asks for, per node
    activations_gb: float | None
    total_gb: float
    fits: bool


@dataclass
class MemoryPlan:
    config: str
    model: str
    params: int
    largest_layer_params: int
    gpus: int
    gpus_per_node: int
    gpu_mem_gb: float
    headroom: float
    micro_batch_size: int
    activation_checkpointing: bool
    activations_gb: float | None
    options: list[Option] = field(default_factory=list)

    @property
    def verdict(self) -> Option | None:
        return next((o for o in self.options if o.fits), None)


def count_params(model: nn.Module) -> tuple[int, int]:
    """Total parameters and the largest single module's own parameters (what ZeRO-3 gathers
    at once), counted as DeepSpeed's ``model_to_params`` does."""
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def meta_model(cfg: TrainConfig) -> nn.Module:
    """The config's model on the meta device (no memory, no dVAE checkpoint needed)."""
    with torch.device("meta"):
        if cfg.spec == "dalle":
            from training.models.dalle import Dalle
            from training.specs.dalle import model_config

            return Dalle(model_config(cfg))
        if cfg.spec == "dvae":
            from training.models.dvae import DVAE
            from training.specs.dvae import model_config

            return DVAE(model_config(cfg))
        from training.specs import get_spec

        return get_spec(cfg.spec).build(cfg)


def dalle_activation_bytes(cfg: TrainConfig, checkpointing: bool) -> int:
    """Activation bytes of one micro-batch of the DALL-E transformer on one GPU."""
    from training.models.attention import block_plan
    from training.specs.dalle import model_config

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


def plan_memory(
    cfg: TrainConfig,
    gpus: int,
    gpu_mem_gb: float,
    gpus_per_node: int = 8,
    headroom: float = 0.9,
    config_name: str = "",
    cpu_mem_gb: float | None = None,
) -> MemoryPlan:
    """Per-GPU memory of every ZeRO option for ``cfg`` on ``gpus`` GPUs of ``gpu_mem_gb``;
    with ``cpu_mem_gb`` (host memory per node) an option must also fit the host."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if gpus < 1 or gpu_mem_gb <= 0:
        raise ValueError("gpus must be >= 1 and gpu_mem_gb > 0")
    per_node = min(gpus_per_node, gpus)
    if gpus % per_node:
        raise ValueError(f"{gpus} GPUs do not fill nodes of {per_node}")
    nodes = gpus // per_node
    params, largest = count_params(meta_model(cfg))
    checkpointing = cfg.engine.activation_checkpointing
    activations = dalle_activation_bytes(cfg, checkpointing) / GB if cfg.spec == "dalle" else None
    plan = MemoryPlan(
        config=config_name,
        model=cfg.model,
        params=params,
        largest_layer_params=largest,
        gpus=gpus,
        gpus_per_node=per_node,
        gpu_mem_gb=gpu_mem_gb,
        headroom=headroom,
        micro_batch_size=cfg.engine.micro_batch_size,
        activation_checkpointing=checkpointing,
        activations_gb=activations,
    )
    choices = [
        ("ZeRO-2", 2, False, False),
        ("ZeRO-2 + optimizer offload", 2, True, False),
        ("ZeRO-3", 3, False, False),
        ("ZeRO-3 + optimizer offload", 3, True, False),
        ("ZeRO-3 + optimizer and parameter offload", 3, True, True),
    ]
    for name, stage, offload_optimizer, offload_params in choices:
        if stage == 2:
            cpu, gpu = estimate_zero2_model_states_mem_needs(
                params, per_node, nodes, cpu_offload=offload_optimizer
            )
        else:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                params,
                largest,
                per_node,
                nodes,
                cpu_offload=offload_optimizer,
                cpu_offload_params=offload_params,
                zero_init=True,
            )
        total = gpu / GB + (activations or 0.0)
        plan.options.append(
            Option(
                name,
                stage,
                offload_optimizer,
                offload_params,
                model_states_gb=gpu / GB,
                cpu_gb_per_node=cpu / GB,
                activations_gb=activations,
                total_gb=total,
                fits=total <= headroom * gpu_mem_gb
                and (cpu_mem_gb is None or cpu / GB <= cpu_mem_gb),
            )
        )
    return plan


def format_plan(plan: MemoryPlan) -> str:
    act = (
        f"{plan.activations_gb:.2f} GB"
        if plan.activations_gb is not None
        else "not estimated for this model"
    )
    lines = [
        f"{plan.config or plan.model}: {_count(plan.params)} parameters "
        f"(largest layer {_count(plan.largest_layer_params)})",
        f"{plan.gpus} GPUs ({plan.gpus // plan.gpus_per_node} nodes x {plan.gpus_per_node}) of "
        f"{plan.gpu_mem_gb:g} GB, budget {plan.headroom:.0%} = {plan.headroom * plan.gpu_mem_gb:.1f} GB",
        f"activations per GPU (micro-batch {plan.micro_batch_size}, checkpointing "
        f"{'on' if plan.activation_checkpointing else 'off'}): {act}",
        "",
        f"{'option':<42}{'states/GPU':>11}{'total/GPU':>11}{'CPU/node':>10}  fits",
    ]
    for o in plan.options:
        lines.append(
            f"{o.name:<42}{o.model_states_gb:>9.2f}GB{o.total_gb:>9.2f}GB"
            f"{o.cpu_gb_per_node:>8.0f}GB  {'yes' if o.fits else 'no'}"
        )
    verdict = plan.verdict
    lines.append("")
    if verdict is None:
        lines.append("verdict: nothing fits: more GPUs, a smaller micro-batch or checkpointing")
    else:
        settings = f"engine.zero.stage={verdict.stage}"
        if verdict.offload_optimizer:
            settings += " engine.zero.offload_optimizer=true"
        if verdict.offload_params:
            settings += " engine.zero.offload_params=true"
        lines.append(f"verdict: {verdict.name} ({settings})")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
