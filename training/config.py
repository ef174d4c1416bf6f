"""Typed training configs: one `TrainConfig` per run, loaded from YAML in configs/.

The engine section says *how* to train (ZeRO stage, precision, batch arithmetic, schedule);
the model section says *what* (a registered spec and its architecture); data says *on what*.
Imports nothing heavy: the CLI validates configs with it before torch or Ray load.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from dataprep.store import StoreConfig
from training.registry import check_spec_name

SpecName = Annotated[str, AfterValidator(check_spec_name)]  # a model in training/registry.py


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Where the training shards are and how to stream them (docs/data-loading.md)."""

    # Shard URIs (file:// or s3://), a brace pattern (s3://b/p/{00000..00007}.tar), a crawl
    # folder (URI ending in '/': shards with a .stats.json) or a manifest (URI ending in .json).
    source: str | list[str]
    shuffle_buffer: int = Field(1000, ge=0)  # samples; 0 or 1: no sample shuffle
    workers: int = Field(2, ge=0)  # DataLoader workers per rank; 0: in the main process
    resampled: bool = False  # draw shards with replacement per worker (many nodes, few shards)
    seed: int = 0
    image_key: str = "jpg;png;jpeg;webp"  # first extension present wins
    text_key: str = "txt"
    samples_per_epoch: int | None = Field(None, ge=1)  # overrides the shard counts
    # A folder of dVAE code sidecars (training/encode_codes.py: `<shard>.codes.npy` per shard):
    # a DALL-E run's batches then carry each sample's codes instead of an image.
    codes: str | None = None

    @field_validator("source")
    @classmethod
    def _not_empty(cls, source: str | list[str]) -> str | list[str]:
        if not source:
            raise ValueError("source is empty: give shard URIs, a pattern, a folder or manifest")
        return source


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
    # None: a private local Ray (in a Ray Job, the job's cluster); or "auto", host:port, ray://...
    ray_address: str | None = None
    max_failures: int = Field(1, ge=0)  # worker failures retried from the latest checkpoint


class LossSection(_Strict):
    """CLIP's contrastive loss across ranks (training/losses.py). The global loss builds the
    [W*B, W*B] logits on every rank (275 GB at 1024 ranks x 256); the local loss each rank's
    [B, W*B] rows, with the same gradients (open_clip's choice for large runs)."""

    local_loss: bool | None = None  # None: local above `local_loss_above` ranks
    local_loss_above: int = Field(8, ge=1)

    def use_local_loss(self, world_size: int) -> bool:
        if self.local_loss is not None:
            return self.local_loss
        return world_size > self.local_loss_above


class EvalSection(_Strict):
    """What evaluations score: the sample web's held-out renders, held-out shards or nothing.
    Every rank scores its share of the set and the results are reduced (training/evaluate.py)."""

    set: Literal["sampleweb", "shards", "none"] = "sampleweb"
    every_steps: int = Field(0, ge=0)  # 0: only at the end
    heldout_samples: int = Field(800, ge=16)  # shards: at most this many, the first ones
    heldout_seed: int = 1000  # a sample-web seed no training corpus uses
    batch_size: int = Field(256, ge=1)
    crawl_image_size: int = Field(64, ge=8)  # held-out images are resized as the crawl did
    # set = shards: held-out shards (URIs, pattern, folder/ or manifest, as data.source) whose
    # samples carry an image, a caption (`txt`) and, for CLIP's zero-shot top-1, a class index
    # (`label_key`) into `classes`, prompted with each of `templates`.
    source: str | list[str] | None = None
    label_key: str = "cls"
    classes: list[str] = []
    templates: list[str] = ["a photo of a {}."]

    @model_validator(mode="after")
    def _shards_need_a_source(self) -> EvalSection:
        if self.set == "shards" and not self.source:
            raise ValueError("eval.set = 'shards' needs eval.source (the held-out shards)")
        return self


class TrainConfig(_Strict):
    """One training run. `name` identifies it: launching the same name again resumes it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    spec: SpecName = "clip"
    model: str = "clip-tiny"  # architecture: the package's model_configs/ or open_clip built-ins
    model_args: dict[str, Any] = {}  # dVAE / DALL-E: overrides of the architecture's fields
    dvae_checkpoint: str | None = None  # DALL-E: the frozen dVAE (exported file, path or URI)
    steps: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    checkpoints_kept: int = Field(2, ge=1)
    seed: int = 0
    data: DataConfig
    eval: EvalSection = EvalSection()
    loss: LossSection = LossSection()
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


class EncodeConfig(_Strict):
    """Code a dataset's shards with an exported dVAE, one Ray task per shard (encode_codes.py)."""

    source: str | list[str]  # as training's data.source: shards, pattern, folder/ or manifest
    dvae_checkpoint: str  # an exported dvae.pt (path or URI)
    out: str  # folder URI for the sidecars (codes depend on the dVAE: one folder per dVAE)
    batch_size: int = Field(256, ge=1)
    cpus_per_task: int = Field(1, ge=1)
    # > 0: each task codes on a GPU (Ray's num_gpus; 0.25 lets 4 tasks share one); 0: on CPU
    gpus_per_task: float = Field(0, ge=0)
    max_retries: int = Field(2, ge=0)
    ray_address: str | None = None  # None: a private local Ray (in a Ray Job: its cluster)
    store: StoreConfig = StoreConfig()  # S3 settings for s3:// URIs
