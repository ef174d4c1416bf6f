"""`mmpipe datasets show`: a published version's manifest as a person reads it.

What was published (samples, shards, bytes), what each stage kept and dropped and why, and
the scorer that judged it. `--json` prints the manifest itself.
"""

from __future__ import annotations

from dataprep.publish import DatasetManifest
from dataprep.stages import KEPT

KEPT_REASONS = {KEPT, "success"}  # the stages' and the crawl's word for a kept sample


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def stage_lines(manifest: DatasetManifest) -> list[str]:
    """One line per stage (in, kept, share kept), then its drop reasons by count."""
    width = max([len(name) for name in manifest.stages] + [5])
    lines = [f"  {'stage':<{width}}  {'in':>8}  {'kept':>8}  kept%  dropped because"]
    for name, stage in manifest.stages.items():
        drops = [(r, n) for r, n in stage.by_reason.items() if r not in KEPT_REASONS and n]
        reasons = ", ".join(f"{reason} {count}" for reason, count in drops) or "-"
        lines.append(
            f"  {name:<{width}}  {stage.count:>8}  {stage.kept:>8}  "
            f"{_share(stage.kept, stage.count):>5}  {reasons}"
        )
    return lines


def format_manifest(manifest: DatasetManifest, uri: str) -> str:
    scorer = manifest.scorer
    top = f", top {scorer.top_fraction:.0%} kept" if scorer.top_fraction else ""
    lines = [
        f"{manifest.name}@{manifest.version}  published {manifest.created_at}",
        f"  manifest: {uri}",
        f"  samples:  {manifest.samples} in {manifest.shard_count} shards, "
        f"{manifest.bytes / 1e6:.1f} MB",
        f"  scorer:   {scorer.model}, threshold {scorer.threshold:.4f}{top}",
        f"            {scorer.weights} (sha256 {scorer.sha256[:12]})",
        f"  inputs:   fingerprint {manifest.fingerprint[:16]}",
        "",
        *stage_lines(manifest),
    ]
    return "\n".join(lines)
