"""How a model is trained across ranks: the DeepSpeed config, optimizer and LR schedule.

Models never import DeepSpeed; this module turns an `EngineConfig` into what
`deepspeed.initialize` takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from training.config import TrainConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    e = cfg.engine
    zero: dict = {"stage": e.zero.stage}
    if e.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scale.use_gpu}
    if e.zero.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scale.use_gpu}
    if e.zero.stage == 3:
        # Consolidated 16-bit weights on save let `save_16bit_model` work under ZeRO-3.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": e.micro_batch_size,
        "gradient_accumulation_steps": e.grad_accum_steps,
        "train_batch_size": e.global_batch(world_size),
        "gradient_clipping": e.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16", "initial_scale_power": 16},
        # Buffers (norm statistics, masks) in the compute dtype too: CPU kernels such as
        # batch_norm refuse mixed bf16 inputs and fp32 running stats.
        "data_types": {"buffer_dtype": e.precision},
        # The optimizer is built here (torch AdamW or DeepSpeedCPUAdam), not by DeepSpeed.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the engine logs metrics itself
        "wall_clock_breakdown": False,
    }


def build_model(
    build: Callable[[], nn.Module],
    cfg: TrainConfig,
    world_size: int,
    late_inits: Callable[[nn.Module], list[tuple[list, Callable[[], None]]]] | None = None,
) -> nn.Module:
    """``build()``, under ZeRO-3 inside ``deepspeed.zero.Init``: each module's parameters are
    partitioned as soon as it is constructed, so no rank ever holds the whole model (the 12B in
    fp32 is 49 GB per rank otherwise). ZeRO 0-2 build the whole model, as DeepSpeed expects.
    ``late_inits(model)``: (parameters, initialiser) pairs that set a child's weights from a
    parent's ``__init__`` and saw only empty partitions there; they run again, gathered."""
    if cfg.engine.zero.stage != 3:
        return build()
    import deepspeed

    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False)  # joins torch's group
    with _partitioned_init(deepspeed)(config_dict_or_path=deepspeed_config(cfg, world_size)):
        model = build()
    for params, init in late_inits(model) if late_inits else []:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            init()
    return model


def _partitioned_init(deepspeed) -> type:
    """``deepspeed.zero.Init`` that first turns 0-dim parameters (open_clip's ``logit_scale``)
    into shape [1]: DeepSpeed broadcasts a parameter as a byte view, which a 0-dim tensor of
    more than one byte refuses."""

    class Init(deepspeed.zero.Init):
        def _post_init_method(self, module: nn.Module) -> None:
            for name, param in list(module.named_parameters(recurse=False)):
                if param.dim() == 0 and not hasattr(param, "ds_id"):
                    setattr(
                        module, name, nn.Parameter(param.detach().reshape(1), param.requires_grad)
                    )
            super()._post_init_method(module)

    return Init


def partition_numel(model: nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model): a ZeRO-3 partitioned
    parameter keeps its share in ``ds_tensor`` and its full size in ``ds_numel``."""
    local = sum(
        p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters()
    )
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return local, full


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    if cfg.engine.zero.offload_optimizer:
        # Offloaded optimizer states are stepped on the CPU by DeepSpeed's vectorised Adam.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


class WarmupCosine:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total` steps.

    A class, not a lambda, so the scheduler's state pickles into checkpoints and a resumed
    run continues the schedule instead of restarting it.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    shape = WarmupCosine(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)


def check_precision(cfg: TrainConfig) -> None:
    """Refuse, before any worker starts, a precision the workers' device cannot do."""
    if cfg.engine.precision == "fp16" and not cfg.scale.use_gpu:
        raise ValueError(
            "engine.precision = 'fp16' needs GPUs (DeepSpeed's CPU accelerator has no fp16 "
            "training); use bf16 on CPU, or set scale.use_gpu = true"
        )
