"""`mmpipe datasets show`: a readable summary of a published version; `--json` the manifest."""

import json

from dataprep.publish import DatasetManifest, ScorerInfo
from dataprep.stages import StageSummary
from pipelines.dataset_summary import format_manifest
from tests.pipelines.conftest import mmpipe


def stage(name: str, count: int, kept: int, **drops: int) -> StageSummary:
    reasons = {"success" if name == "crawl" else "kept": kept, **drops}
    return StageSummary(stage=name, shards=3, count=count, kept=kept, by_reason=reasons)


def test_the_summary_says_counts_per_stage_and_reason_shards_bytes_and_scorer():
    manifest = DatasetManifest(
        name="web",
        version="v3",
        fingerprint="0123456789abcdef0123",
        created_at="2026-12-07T03:00:00Z",
        samples=1500,
        bytes=42_000_000,
        shard_count=6,
        shard_index="shards.parquet",
        stages={
            "crawl": stage("crawl", 2000, 1800, http_404=150, url_policy=50),
            "filter": stage("filter", 1800, 1700, too_small=100),
            "dedup": stage("dedup", 1700, 1500, perceptual=120, exact=80),
        },
        scorer=ScorerInfo(
            model="clip-tiny", weights="s3://b/scorer.pt", sha256="feed" * 16, threshold=0.21
        ),
        config={},
    )
    text = format_manifest(manifest, "s3://b/datasets/web/v3/manifest.json")
    lines = text.splitlines()
    assert lines[0] == "web@v3  published 2026-12-07T03:00:00Z"
    assert "  samples:  1500 in 6 shards, 42.0 MB" in lines
    assert "  scorer:   clip-tiny, threshold 0.2100" in lines
    assert "s3://b/datasets/web/v3/manifest.json" in lines[1]
    [crawl] = [line for line in lines if line.strip().startswith("crawl ")]
    assert crawl.split()[:4] == ["crawl", "2000", "1800", "90.0%"]
    assert crawl.endswith("http_404 150, url_policy 50")  # by count; kept is not a drop
    [dedup] = [line for line in lines if line.strip().startswith("dedup ")]
    assert dedup.endswith("perceptual 120, exact 80") and "kept" not in dedup


def test_datasets_show_prints_the_summary_and_json_the_manifest(tmp_path):
    from dataprep.store import open_store
    from tests.dataprep.test_publish import publish_staged, write_staging

    store = open_store(f"file://{tmp_path}/store")
    write_staging(store)
    manifest = publish_staged(store, 20, tmp_path / "work")
    env = {"MMPIPE_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"}
    shown = mmpipe("datasets", "show", "d", "--store", store.root_uri, env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"d@{manifest.version}  published ")
    assert f"  samples:  {manifest.samples} in {manifest.shard_count} shards" in shown.stdout
    assert "{" not in shown.stdout  # not JSON
    raw = mmpipe("datasets", "show", "d", "--json", "--store", store.root_uri, env=env)
    assert raw.returncode == 0, raw.stderr
    uri, _, body = raw.stdout.partition("\n")
    assert uri.endswith("datasets/d/v1/manifest.json")
    assert json.loads(body)["samples"] == manifest.samples
