"""Prefect flows for DALL-E beside training (`train-dvae`, `train-dalle`: `training_flows`):
code a dataset with the dVAE, generate images.

Thin wrappers over `training.encode_codes` and `training.generate.run_generation`; the flows add
names, progress and artifacts (the image grid and a table of CLIP scores and colour matches).
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from training.encode_codes import EncodeConfig, ShardCodes, encode_dataset
from training.generate import GenerateConfig, GenerationReport, run_generation


@task(name="encode", task_run_name="encode shards with {cfg.dvae_checkpoint}")
def encode_task(cfg: EncodeConfig) -> list[ShardCodes]:
    return encode_dataset(cfg)


@flow(name="encode-codes", flow_run_name="encode codes into {cfg.out}")
def encode_codes(cfg: EncodeConfig) -> list[ShardCodes]:
    """dVAE code sidecars for a dataset's shards (one Ray task per shard), for `data.codes`."""
    coded = encode_task(cfg)
    rows = [{"shard": c.shard, "samples": c.samples, "skipped": c.skipped} for c in coded]
    create_table_artifact(rows, description=f"dVAE codes in {cfg.out}: samples per shard")
    return coded


@task(name="generate", task_run_name="generate {cfg.name}")
def generate_task(cfg: GenerateConfig) -> GenerationReport:
    artifact = create_progress_artifact(
        0.0, key=f"{cfg.name}-generation", description=f"captions done for {cfg.name}"
    )
    return run_generation(
        cfg, progress=lambda done, total: update_progress_artifact(artifact, 100.0 * done / total)
    )


def report_rows(report: GenerationReport) -> list[dict]:
    rows = []
    for r in report.results:
        rows.append(
            {
                "caption": r.caption,
                "best CLIP score": None if r.clip_scores is None else r.clip_scores[0],
                "colour": r.colour,
                "best shows colour": None if r.colour_matches is None else r.colour_matches[0],
                "candidates showing colour": None
                if r.colour_matches is None
                else f"{sum(r.colour_matches)}/{len(r.colour_matches)}",
            }
        )
    return rows


def report_markdown(report: GenerationReport, grid_png: bytes) -> str:
    from pipelines.build_report import png_markdown

    lines = [f"# Samples `{report.name}`", ""]
    lines.append(f"- {len(report.results)} captions x {report.candidates} candidates")
    lines.append(f"- re-ranked by: {report.reranked_by or 'nothing (sampling order)'}")
    if report.colour_match_all is not None:
        lines.append(f"- named colour shown, all candidates: **{report.colour_match_all:.1%}**")
    if report.colour_match_top1 is not None:
        lines.append(f"- named colour shown, CLIP's best: **{report.colour_match_top1:.1%}**")
    lines.append(f"- report: `{report.report_uri}`\n")
    return "\n".join(lines) + png_markdown("Samples, best first", grid_png, report.grid_uri)


def _generate_run_name() -> str:
    from prefect.runtime import flow_run

    return f"generate {flow_run.parameters['cfg'].name}"


@flow(name="generate-dalle", flow_run_name=_generate_run_name)
def generate_dalle(cfg: GenerateConfig) -> GenerationReport:
    """Sample images for captions, re-rank them with CLIP, publish the grid as an artifact."""
    report = generate_task(cfg)
    grid = cfg.store.open().get_bytes(f"{cfg.prefix()}/grid.png")
    create_markdown_artifact(
        report_markdown(report, grid), key=f"{cfg.name}-samples", description="DALL-E samples"
    )
    create_table_artifact(
        report_rows(report), key=f"{cfg.name}-scores", description="per caption: CLIP, colour"
    )
    return report
