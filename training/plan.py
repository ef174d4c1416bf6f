"""Memory planner: which ZeRO stage and offload lets a training config fit on N GPUs.

Per GPU: model states from DeepSpeed's own estimators for each ZeRO option, counted on the
model built on the meta device, plus the activations of one micro-batch where the spec
estimates them. Per rank, the host memory that building the model takes: the whole model in
fp32 under ZeRO 0-2, one share plus the largest layer under ZeRO-3 (training/parallel.py).
The verdict is the fastest option that fits (docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from training.config import TrainConfig
from training.registry import get_spec

GB = 2**30


@dataclass(frozen=True)
class Option:
    name: str
    stage: int
    offload_optimizer: bool
    offload_params: bool
    model_states_gb: float  # per GPU
    cpu_gb_per_node: float  # host memory DeepSpeed's estimator asks for, per node
    build_gb_per_rank: float  # host memory one rank takes while constructing the model
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


def build_bytes_per_rank(
    params: int, largest: int, stage: int, ranks: int, precision: str = "bf16"
) -> int:
    """Host memory one rank needs to construct the model. ZeRO 0-2: every rank builds all of it
    in fp32. ZeRO-3 (``deepspeed.zero.Init``): its share in the training dtype, plus the largest
    layer, which is created whole in fp32 before it is partitioned."""
    if stage < 3:
        return 4 * params
    share = (4 if precision == "fp32" else 2) * -(-params // ranks)
    return share + 4 * largest


def meta_model(cfg: TrainConfig) -> nn.Module:
    """The config's model on the meta device (no memory, no dVAE checkpoint needed)."""
    with torch.device("meta"):
        return get_spec(cfg.spec).architecture(cfg)


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
    activation_bytes = get_spec(cfg.spec).activation_bytes(cfg, checkpointing)
    activations = None if activation_bytes is None else activation_bytes / GB
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
        build = build_bytes_per_rank(params, largest, stage, gpus, cfg.engine.precision) / GB
        host = max(cpu / GB, build * per_node)  # building comes first, then DeepSpeed's share
        plan.options.append(
            Option(
                name,
                stage,
                offload_optimizer,
                offload_params,
                model_states_gb=gpu / GB,
                cpu_gb_per_node=cpu / GB,
                build_gb_per_rank=build,
                activations_gb=activations,
                total_gb=total,
                fits=total <= headroom * gpu_mem_gb and (cpu_mem_gb is None or host <= cpu_mem_gb),
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
        f"{'option':<42}{'states/GPU':>11}{'total/GPU':>11}{'CPU/node':>10}"
        f"{'build/rank':>12}  fits",
    ]
    for o in plan.options:
        lines.append(
            f"{o.name:<42}{o.model_states_gb:>9.2f}GB{o.total_gb:>9.2f}GB"
            f"{o.cpu_gb_per_node:>8.0f}GB{o.build_gb_per_rank:>10.2f}GB  {'yes' if o.fits else 'no'}"
        )
    lines.append(
        "build/rank: host memory each rank takes to construct the model (ZeRO 0-2 build it "
        "whole in fp32; ZeRO-3 builds it partitioned)"
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
