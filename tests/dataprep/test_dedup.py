"""dataprep.dedup and dedup_edges: edges, their resolution in global order, and the distributed
dedup on synthetic signals (the same kept set however the work is cut; a driver that holds no
per-sample state; the same decisions as an all-pairs reference)."""

import itertools
import time
import tracemalloc

import numpy as np
import pytest

from dataprep.dedup import STAGE, dedup_shards
from dataprep.dedup_edges import Edges, exact_edges, group_pairs, resolve
from dataprep.dedup_synthetic import KINDS, write_signals
from dataprep.phash import colour_distance, hamming, to_signed
from dataprep.semdedup import greedy_within
from dataprep.stage_config import DedupConfig
from dataprep.stages import KEPT, Staging
from dataprep.store import open_store


def edges(pairs: list[tuple[int, int]], weight=None) -> Edges:
    a, b = (np.array(x, np.int64) for x in zip(*pairs, strict=True))
    w = np.zeros(len(a), np.float32) if weight is None else np.array(weight, np.float32)
    return Edges(a, b, w, np.array([f"k{x}" for x in a]))


def test_exact_edges_keep_the_first():
    sha = np.array([b"a", b"b", b"a", b"c", b"b", b"a"])
    found = exact_edges(np.arange(6), sha, np.array(list("012345")))
    gid, dup, key = resolve(found, np.zeros(0, np.int64))
    assert dict(zip(gid.tolist(), dup.tolist(), strict=True)) == {2: 0, 4: 1, 5: 0}
    assert key.tolist() == ["0", "1", "0"]


def test_resolution_follows_global_order_and_skips_earlier_drops():
    # 1 duplicates 0; 2 duplicates 1 only: 1 is dropped, so 2 is kept (greedy keep-the-first)
    gid, dup, _ = resolve(edges([(0, 1), (1, 2), (3, 4), (2, 4)]), np.zeros(0, np.int64))
    assert dict(zip(gid.tolist(), dup.tolist(), strict=True)) == {1: 0, 4: 2}
    # an item dropped by an earlier kind neither drops nor is dropped
    gid, dup, _ = resolve(edges([(0, 1), (1, 2)]), np.array([0]))
    assert dict(zip(gid.tolist(), dup.tolist(), strict=True)) == {2: 1}
    # among several kept earlier items, the highest weight wins, then the lowest gid
    gid, dup, _ = resolve(edges([(0, 5), (1, 5), (2, 5)], [0.5, 0.9, 0.9]), np.zeros(0, np.int64))
    assert dup.tolist() == [1]


def test_group_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.int64)
    flips = [np.int64(1) << np.int64(b) for b in rng.integers(0, 63, (300, 5))]
    hashes = np.concatenate([base, base ^ np.bitwise_or.reduce(np.array(flips), axis=1)])
    colours = rng.integers(0, 256, (600, 6)).astype(np.float64)
    colours[300:] = colours[:300] + rng.integers(-4, 5, (300, 6))
    colours[::7, 3:] = np.nan  # no foreground
    x = rng.standard_normal((600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[300:400] = x[:100]
    (si, sj, _), (pi, pj) = group_pairs(x, hashes, colours, 0.999, 6, 3.0)
    brute = {
        (i, j)
        for i, j in itertools.combinations(range(600), 2)
        if hamming(hashes[i], hashes[j]) <= 6 and colour_distance(colours[i], colours[j]) <= 3
    }
    assert set(zip(pi.tolist(), pj.tolist(), strict=True)) == brute and len(brute) > 30
    assert set(zip(si.tolist(), sj.tolist(), strict=True)) == {(i, 300 + i) for i in range(100)}
    assert to_signed(2**64 - 1) == -1


# --------------------------------------------------------------------------- distributed


def decisions(staging: Staging, shards: list[int]) -> list[tuple]:
    out = []
    for shard in shards:
        t = staging.table(STAGE, shard)
        out += zip(
            t["key"].to_pylist(),
            t["reason"].to_pylist(),
            t["duplicate_of"].to_pylist(),
            strict=True,
        )
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """4,000 items in 8 shards with planted copies."""
    staging = Staging(open_store(f"file://{tmp_path_factory.mktemp('dedup')}"), "syn")
    return staging, write_signals(staging, 4000, 500, 32, seed=1)


def test_kept_set_does_not_depend_on_partitions_or_tasks(synthetic):
    staging, truth = synthetic
    shards = truth["shards"]
    # 8 clusters of ~500 > 2 x cluster_size: every cluster is split again
    semantic = {"cluster_size": 200, "clusters": 8}
    one = DedupConfig.model_validate({"partitions": 1, "shards_per_task": 8, "semantic": semantic})
    four = DedupConfig.model_validate({"partitions": 4, "shards_per_task": 1, "semantic": semantic})
    dedup_shards(staging, shards, one, "one")
    first = decisions(staging, shards)
    dedup_shards(staging, shards, four, "four")
    assert decisions(staging, shards) == first
    dropped = {k for k, r, _ in first if r != KEPT}
    planted = {f"{g >> 32:07d}{g & 0xFFFFFFFF:06d}" for k in KINDS for g in truth[k].tolist()}
    assert len(dropped & planted) >= 0.98 * len(planted) and dropped <= planted
    assert not staging.store.list(f"staging/{staging.name}/{STAGE}-work/")  # work files gone


def test_same_decisions_as_all_pairs_in_global_order(synthetic, tmp_path):
    """With one cluster, dedup equals the sequential reference: exact, then perceptual, then
    semantic, each keeping the first in global order (what the build did before partitioning)."""
    staging, truth = synthetic
    shards = truth["shards"][:3]
    cfg = DedupConfig.model_validate(
        {"perceptual": {"hamming_threshold": 22}, "semantic": {"cluster_size": 2000}}
    )
    dedup_shards(staging, shards, cfg, "ref")
    got = decisions(staging, shards)

    from dataprep.dedup import shard_signals

    s = [shard_signals(staging, shard) for shard in shards]
    keys = np.concatenate([x["key"] for x in s])
    sha, ph = np.concatenate([x["sha256"] for x in s]), np.concatenate([x["phash"] for x in s])
    col, emb = (
        np.concatenate([x["colours"] for x in s]),
        np.concatenate([x["embedding"] for x in s]),
    )
    dup, reason = np.full(len(keys), -1), [KEPT] * len(keys)
    first: dict = {}
    for i in range(len(keys)):
        j = first.setdefault(sha[i], i)
        if j != i:
            dup[i], reason[i] = j, "exact_duplicate"
    for i in range(len(keys)):
        if dup[i] >= 0:
            continue
        close = (hamming(ph[:i], ph[i]) <= 22) & (dup[:i] < 0)
        near = [j for j in np.flatnonzero(close) if colour_distance(col[i], col[j]) <= 3]
        if near:
            dup[i], reason[i] = near[0], "near_duplicate"
    semantic = greedy_within(emb, 1 - cfg.semantic.eps, dup >= 0)
    for i in np.flatnonzero(semantic >= 0):
        dup[i], reason[i] = semantic[i], "semantic_duplicate"
    want = [(k, r, keys[d] if d >= 0 else None) for k, r, d in zip(keys, reason, dup, strict=True)]
    assert got == want
    assert set(reason) == {KEPT, "exact_duplicate", "near_duplicate", "semantic_duplicate"}


@pytest.mark.slow
def test_driver_memory_does_not_grow_with_samples(tmp_path):
    """Peak traced memory of the dedup driver at 10^4 and 10^5 items (same shard count)."""
    peaks = []
    for n in (1_000, 10_000, 100_000):
        staging = Staging(open_store(f"file://{tmp_path / str(n)}"), "mem")
        truth = write_signals(staging, n, n // 10, 8, seed=2)
        tracemalloc.start()
        dedup_shards(staging, truth["shards"], DedupConfig(), "m")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[2] <= 1.5 * peaks[1], peaks  # the 10^3 run warms imports and Ray up


@pytest.mark.slow
def test_on_a_cluster_with_s3_a_node_lost_mid_dedup_changes_nothing(s3_store, tmp_path):
    """A head without CPUs and three 1-CPU nodes, moto S3 the only shared state; one node is
    removed once the cluster files appear. Same decisions as a local run."""
    import threading

    import ray
    from ray.cluster_utils import Cluster

    staging = Staging(s3_store, "onc")
    shards = write_signals(staging, 1200, 300, 16, seed=3)["shards"]
    cfg = DedupConfig.model_validate({"partitions": 2, "shards_per_task": 1})
    dedup_shards(staging, shards, cfg, "local")
    local = decisions(staging, shards)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    removed = threading.Event()

    def lose_a_node_mid_dedup() -> None:
        while not s3_store.list(f"staging/onc/{STAGE}-work/"):
            time.sleep(0.05)
        while not any("/clusters/" in k for k in s3_store.list(f"staging/onc/{STAGE}-work/")):
            time.sleep(0.05)
        cluster.remove_node(nodes[-1])
        removed.set()

    try:
        cluster.wait_for_nodes()
        watcher = threading.Thread(target=lose_a_node_mid_dedup, daemon=True)
        watcher.start()
        dedup_shards(staging, shards, cfg, "cluster", ray_address=cluster.address)
        assert removed.is_set()
        assert decisions(staging, shards) == local
    finally:
        ray.shutdown()
        cluster.shutdown()
