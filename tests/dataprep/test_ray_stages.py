"""The build on a multi-node Ray cluster on loopback (``ray.cluster_utils.Cluster``: a head without
CPUs and three 1-CPU nodes) with moto S3 as the only store: every per-shard stage spreads over
the nodes, a node lost mid-crawl costs nothing, and the result equals the single-machine build."""

import io
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataprep.build import StagesConfig, build_after_crawl
from dataprep.crawl import CrawlConfig, crawl_shards, prepare_crawl
from dataprep.quality import final_outcomes
from dataprep.stage_config import ClusterConfig
from dataprep.stages import StageStats, Staging
from dataprep.store import open_store
from dataprep.url_policy import UrlPolicy

NAME = "spread"
PER_SHARD = ("filter", "embed", "score")
ROWS = 160  # of the sample web's 240: four shards of 40
pytestmark = pytest.mark.slow


def crawl_config(web) -> CrawlConfig:
    return CrawlConfig(
        image_size=64,
        samples_per_shard=40,
        threads=16,
        timeout_s=5,
        deadline_s=6,  # past the sample web's slow answers even on a loaded machine
        min_image_size=16,
        max_aspect_ratio=4,
        max_shard_retry=2,
        policy=UrlPolicy(allow=web.allow()),
    )


def stages_config(scorer, weights: str, cluster: ClusterConfig) -> StagesConfig:
    return StagesConfig.model_validate(
        {
            "filter": {"min_image_side": 16, "max_aspect_ratio": 4},
            "embed": {"model": scorer.recipe.model, "weights": weights, "workers": 2},
            "score": {"top_fraction": 0.8},  # from the per-shard histograms
            "publish": {"samples_per_shard": 50},
            "cluster": cluster.model_dump(),
        }
    )


def inputs(store, web, scorer, folder: Path) -> tuple[str, str]:
    """The first ROWS URLs as two parquet parts and the scorer (weights and card), in ``store``
    (the cluster's) or, without one, in ``folder`` (the single machine's); their URIs."""
    table = pq.read_table(web.urls).slice(0, ROWS)
    folder.mkdir(parents=True)
    for part, rows in enumerate((table.slice(0, ROWS // 2), table.slice(ROWS // 2))):
        pq.write_table(rows, folder / f"part-{part}.parquet")
    if store is None:
        return str(folder), scorer.weights
    for part in sorted(folder.iterdir()):
        store.put_file(f"input/{part.name}", part)
    store.put_file("models/scorer.pt", scorer.weights)
    store.put_file("models/scorer.pt.json", f"{scorer.weights}.json")
    return store.uri("input"), store.uri("models/scorer.pt")


def build(store, urls, weights, web, scorer, cluster, work: Path, on_crawled=None):
    prefix, cfg = f"staging/{NAME}/crawl", crawl_config(web)
    plan = prepare_crawl(urls, store, prefix, cfg, getattr(store, "settings", None))
    shards = list(range(plan.shards))
    crawl_shards(plan, shards, store, prefix, cfg, None, on_crawled, cluster)
    return build_after_crawl(Staging(store, NAME), stages_config(scorer, weights, cluster), work)


def outcome(store, manifest) -> dict:
    """What a build decided: published keys, keys per (stage, reason), counts per stage."""
    staging = Staging(store, NAME)
    shards = range(manifest.stages["crawl"].shards)
    by_reason = defaultdict(set)
    for shard in shards:
        crawl = pq.read_table(io.BytesIO(store.get_bytes(staging.key("crawl", shard, "parquet"))))
        for key, reason in zip(crawl["key"].to_pylist(), crawl["reason"].to_pylist(), strict=True):
            by_reason["crawl", reason].add(key)
    for key, o in final_outcomes(staging, shards).items():
        by_reason[o["stage"], o["reason"]].add(key)
    published = set()
    for shard in manifest.shards:
        data = store.get_bytes(f"datasets/{NAME}/{manifest.version}/{shard.path}")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            published |= {name.split(".")[0] for name in tar.getnames()}
    counts = {stage: summary.model_dump() for stage, summary in manifest.stages.items()}
    return {"published": published, "by_reason": dict(by_reason), "counts": counts}


def nodes_per_stage(store, shards: int) -> dict[str, set]:
    staging = Staging(store, NAME)
    nodes = {"crawl": {staging.crawl_stats(s).node for s in range(shards)}}
    for stage in PER_SHARD:
        raw = [store.get_bytes(staging.key(stage, s, "stats.json")) for s in range(shards)]
        nodes[stage] = {StageStats.model_validate_json(r).node for r in raw}
    return nodes


def test_cluster_build_spreads_over_nodes_and_equals_the_local_build(
    sample_web, clip_scorer, moto_s3, tmp_path
):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this process joins the test cluster, then starts its own local Ray
    store = open_store(f"s3://{moto_s3.create_bucket()}/mmpipe", moto_s3.settings())
    urls, weights = inputs(store, sample_web, clip_scorer, tmp_path / "upload")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
        cluster.wait_for_nodes()
        lost = []

        def lose_a_node(stats) -> None:  # mid-crawl: one shard is in, the others run
            if not lost:
                lost.append(stats.shard)
                cluster.remove_node(workers[-1])

        on_cluster = ClusterConfig(ray_address=cluster.address)
        manifest = build(
            store, urls, weights, sample_web, clip_scorer, on_cluster, tmp_path, lose_a_node
        )
        nodes = nodes_per_stage(store, manifest.stages["crawl"].shards)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert lost, "a node was removed mid-crawl"
    for stage, seen in nodes.items():
        assert None not in seen and len(seen) >= 2, (stage, seen)
    assert manifest.stages["crawl"].count == ROWS  # every URL accounted for

    local_store = open_store(f"file://{tmp_path / 'local'}")
    urls, weights = inputs(None, sample_web, clip_scorer, tmp_path / "here")
    local = build(
        local_store, urls, weights, sample_web, clip_scorer, ClusterConfig(), tmp_path / "work"
    )
    ray.shutdown()
    assert outcome(store, manifest) == outcome(local_store, local)
    assert len(nodes_per_stage(local_store, local.stages["crawl"].shards)["filter"]) == 1


def test_top_fraction_from_histograms_is_the_exact_cut(local_store):
    import numpy as np
    import pyarrow as pa
    import ray

    from dataprep.embed import EMBED, top_fraction_threshold
    from dataprep.stages import table_bytes

    staging = Staging(local_store, "hist")
    rng = np.random.default_rng(0)
    scores = [rng.normal(0.25, 0.05, n).astype(np.float32) for n in (500, 1, 0, 333)]
    scores[3][:40] = scores[3][40]  # ties at the cut
    for shard, values in enumerate(scores):
        table = pa.table(
            {"key": [f"{shard}-{i}" for i in range(len(values))], "clip_score": values}
        )
        local_store.put_bytes(staging.key(EMBED, shard, "parquet"), table_bytes(table))
    every = np.sort(np.concatenate(scores))[::-1]
    try:
        for fraction in (0.001, 0.3, 0.77, 1.0):
            keep = max(1, round(fraction * len(every)))
            cut = top_fraction_threshold(staging, [0, 1, 2, 3], fraction, ClusterConfig())
            assert cut == every[keep - 1]
    finally:
        ray.shutdown()
