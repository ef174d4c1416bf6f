"""Typed training configs: one `TrainConfig` per run, loaded from YAML in configs/.

The engine section says *how* to train (ZeRO stage, precision, batch arithmetic, schedule);
the model section says *what* (a registered spec and its architecture); data says *on what*.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dataprep.store import StoreConfig
from training.data import DataConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ZeroConfig(_Strict):
    stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False  # optimizer states (and step) on CPU: DeepSpeedCPUAdam
    offload_params: bool = False  # ZeRO-3 only: parameters live on CPU between uses


class EngineConfig(_Strict):
    """Batch arithmetic, precision and memory savers, validated before any worker starts."""

    micro_batch_size: int = Field(64, ge=1)  # per rank, per forward
    grad_accum_steps: int = Field(1, ge=1)
    train_batch_size: int | None = None  # if set, must equal micro x accum x world size
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    grad_clip: float | None = Field(1.0, gt=0)
    activation_checkpointing: bool = False
    zero: ZeroConfig = ZeroConfig()

    def global_batch(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum_steps * world_size

    def check_batch(self, world_size: int) -> None:
        expected = self.global_batch(world_size)
        if self.train_batch_size is not None and self.train_batch_size != expected:
            raise ValueError(
                f"engine.train_batch_size = {self.train_batch_size} but micro_batch_size "
                f"({self.micro_batch_size}) x grad_accum_steps ({self.grad_accum_steps}) x "
                f"world size ({world_size}) = {expected}; fix one of them"
            )

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> EngineConfig:
        if self.zero.offload_params and self.zero.stage != 3:
            raise ValueError("engine.zero.offload_params needs engine.zero.stage = 3")
        return self


class OptimConfig(_Strict):
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio


class ScaleConfig(_Strict):
    """Ray Train's ScalingConfig: one worker per GPU, or per CPU slot."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    ray_address: str | None = None  # None: a local Ray instance; "auto" or ray://host:10001
    max_failures: int = Field(1, ge=0)  # worker failures retried from the latest checkpoint


class EvalSection(_Strict):
    every_steps: int = Field(0, ge=0)  # 0: only at the end
    heldout_samples: int = Field(800, ge=16)
    heldout_seed: int = 1000  # a sample-web seed no training corpus uses
    batch_size: int = Field(256, ge=1)
    crawl_image_size: int = Field(64, ge=8)  # held-out images are resized as the crawl did


class TrainConfig(_Strict):
    """One training run. `name` identifies it: launching the same name again resumes it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    spec: Literal["clip", "dvae", "dalle"] = "clip"
    model: str = "clip-tiny"  # architecture name (configs/models/*.json or open_clip built-ins)
    model_args: dict[str, Any] = {}  # dVAE / DALL-E: overrides of the architecture's fields
    dvae_checkpoint: str | None = None  # DALL-E: the frozen dVAE (exported file, path or URI)
    steps: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    checkpoints_kept: int = Field(2, ge=1)
    seed: int = 0
    data: DataConfig
    eval: EvalSection = EvalSection()
    engine: EngineConfig = EngineConfig()
    optim: OptimConfig = OptimConfig()
    scale: ScaleConfig = ScaleConfig()
    store: StoreConfig = StoreConfig()

    @model_validator(mode="after")
    def _dalle_needs_dvae(self) -> TrainConfig:
        if self.spec == "dalle" and not self.dvae_checkpoint:
            raise ValueError("spec 'dalle' needs dvae_checkpoint (an exported dVAE)")
        return self

    def run_prefix(self) -> str:
        return f"runs/{self.name}"
