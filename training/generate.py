"""Text to images as a job: load DALL-E, its dVAE and a CLIP, sample, re-rank, measure, save.

``GenerateConfig`` names the exported checkpoints (paths, file:// or s3:// URIs), the captions
(given, and/or held-out sample-web captions), the sampling settings and where the results go
(``samples/<name>/`` in the store): ``grid.png`` (one row per caption, best first, CLIP score
under each image) and ``report.json``.

For sample-web captions the report measures colour fidelity with pixel statistics
(training.colour_match): the share of all candidates showing the caption's colour (what one
unranked sample gives on average) and the share of CLIP's top-ranked candidates that do (what
re-ranking gives).

    report = run_generation(GenerateConfig(name="demo", dalle_checkpoint="dalle.pt", heldout=32))
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dataprep.store import StoreConfig, local_copy, require_file

if TYPE_CHECKING:
    from training.sample import Generation, Sampling

# torch loads in the functions that generate: the CLI validates configs with this module.


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidates: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(64, ge=1)


class GenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")  # results: samples/<name>/
    dalle_checkpoint: str  # an exported dalle.pt
    dvae_checkpoint: str | None = None  # default: the dVAE the transformer was trained with
    clip_model: str | None = None  # re-ranking CLIP architecture (model_configs/ or open_clip)
    clip_weights: str | None = None  # its open_clip state dict (required with clip_model)
    captions: list[str] = []
    heldout: int = Field(0, ge=0)  # plus this many held-out sample-web captions
    heldout_seed: int = 1000
    sampling: SamplingConfig = SamplingConfig()
    grid_columns: int | None = Field(None, ge=1)  # images shown per caption (default: all)
    store: StoreConfig = StoreConfig()

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if not self.captions and not self.heldout:
            raise ValueError("give captions, or heldout > 0 for held-out sample-web captions")
        if (self.clip_model is None) != (self.clip_weights is None):
            raise ValueError("clip_model and clip_weights go together")
        return self

    def prefix(self) -> str:
        return f"samples/{self.name}"


class CaptionResult(BaseModel):
    caption: str
    clip_scores: list[float] | None  # best first
    colour: str | None  # the colour the caption names (None: not a sample-web caption)
    colour_matches: list[bool] | None  # per candidate, best first


class GenerationReport(BaseModel):
    name: str
    candidates: int
    reranked_by: str | None
    results: list[CaptionResult]
    colour_match_all: float | None  # share of all candidates with the named colour
    colour_match_top1: float | None  # the same for the CLIP-best candidate of each caption
    grid_uri: str
    report_uri: str


def captions_of(cfg: GenerateConfig) -> list[str]:
    captions = list(cfg.captions)
    if cfg.heldout:
        from dataprep.sampleweb.corpus import generate_corpus

        captions += [s.caption for s in generate_corpus(cfg.heldout, cfg.heldout_seed, {})]
    return captions


def load_clip(cfg: GenerateConfig):
    if cfg.clip_model is None:
        return None
    from training.models.clip import create_clip

    weights = local_copy(cfg.clip_weights, cfg.store.s3)
    return create_clip(cfg.clip_model, pretrained=str(weights))


def caption_result(generation: Generation) -> CaptionResult:
    from training.colour_match import colour_matches, named_colour

    colour = named_colour(generation.caption)
    scores = generation.clip_scores
    return CaptionResult(
        caption=generation.caption,
        clip_scores=None if scores is None else [round(float(s), 4) for s in scores],
        colour=colour,
        colour_matches=None
        if colour is None
        else colour_matches(generation.images, generation.caption),
    )


def colour_rates(results: list[CaptionResult]) -> tuple[float | None, float | None]:
    measured = [r.colour_matches for r in results if r.colour_matches is not None]
    if not measured:
        return None, None
    every = [hit for hits in measured for hit in hits]
    return sum(every) / len(every), sum(hits[0] for hits in measured) / len(measured)


def check_inputs(cfg: GenerateConfig) -> None:
    """The checkpoints the config names exist (FileNotFoundError naming the field)."""
    for uri, what in (
        (cfg.dalle_checkpoint, "dalle_checkpoint (--checkpoint)"),
        (cfg.dvae_checkpoint, "dvae_checkpoint (--dvae)"),
        (cfg.clip_weights, "clip_weights (--clip-weights)"),
    ):
        if uri is not None:
            require_file(uri, cfg.store.s3, what)


def run_generation(cfg: GenerateConfig, progress=None) -> GenerationReport:
    """Generate, re-rank, measure and save; ``progress(done, total)`` after each caption."""
    from training.sample import Sampling, generate, load_pipeline, write_grid

    dalle, dvae = load_pipeline(
        local_copy(cfg.dalle_checkpoint, cfg.store.s3),
        None if cfg.dvae_checkpoint is None else str(local_copy(cfg.dvae_checkpoint, cfg.store.s3)),
    )
    clip = load_clip(cfg)
    sampling = Sampling(**cfg.sampling.model_dump())
    captions = captions_of(cfg)
    generations = []
    for i, caption in enumerate(captions):  # one caption at a time: progress, bounded memory
        generations += generate(dalle, dvae, [caption], _caption_seed(sampling, i), clip)
        if progress is not None:
            progress(i + 1, len(captions))
    results = [caption_result(g) for g in generations]
    rate_all, rate_top1 = colour_rates(results)
    store = cfg.store.open()
    with tempfile.TemporaryDirectory() as tmp:
        grid = write_grid(generations, Path(tmp) / "grid.png", columns=cfg.grid_columns)
        store.put_file(f"{cfg.prefix()}/grid.png", grid)
    report = GenerationReport(
        name=cfg.name,
        candidates=sampling.candidates,
        reranked_by=None if clip is None else f"{cfg.clip_model} ({cfg.clip_weights})",
        results=results,
        colour_match_all=rate_all,
        colour_match_top1=None if clip is None else rate_top1,
        grid_uri=store.uri(f"{cfg.prefix()}/grid.png"),
        report_uri=store.uri(f"{cfg.prefix()}/report.json"),
    )
    store.put_bytes(
        f"{cfg.prefix()}/report.json", json.dumps(report.model_dump(), indent=2).encode()
    )
    return report


def _caption_seed(sampling: Sampling, index: int) -> Sampling:
    """Each caption its own seed: a caption's samples do not depend on the captions before it."""
    return replace(sampling, seed=sampling.seed + index)
