"""Semantic dedup (SemDeDup, dataprep.semdedup) at 10^4, 10^5 and 10^6 embeddings of d=512.

Synthetic embeddings: points around 2,000 random centres (so k-means has structure to find), 5%
of them planted duplicates (a copy of another point plus noise, cosine about 0.999). The
embeddings sit in a memory-mapped file, as the build's do. For each size it prints the median
wall time of the repeats, the peak memory the dedup itself allocated (numpy, traced) and the
process's peak RSS, and where a brute-force all-pairs reference fits (``--brute-max``), the
share of the brute-force duplicate pairs (cosine > 1 - eps) that SemDeDup compared (same
cluster) and the agreement of the dropped sets. Then the scaling between sizes.

    .venv/bin/python benchmarks/dedup.py                       # 1e4, 1e5, 1e6
    .venv/bin/python benchmarks/dedup.py --sizes 10000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.metering import own_peak_rss_mib  # noqa: E402
from dataprep.semdedup import ArraySource, SemanticConfig, greedy_within, semantic_dedup  # noqa: E402

DIM = 512
CENTRES = 2000
DUPLICATE_SHARE = 0.05


def synthetic(n: int, path: Path, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors with planted near-copies, written block by block to a memmap."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    block = 100_000
    for start in range(0, n, block):
        stop = min(n, start + block)
        x = centres[rng.integers(0, CENTRES, stop - start)]
        x += 0.8 * rng.standard_normal(x.shape).astype(np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    planted = int(n * DUPLICATE_SHARE)
    targets = rng.choice(np.arange(n // 2, n), planted, replace=False)  # copies sit later
    sources = rng.integers(0, n // 2, planted)
    for start in range(0, planted, block):
        t, s = targets[start : start + block], sources[start : start + block]
        x = out[s] + 0.0015 * rng.standard_normal((len(s), DIM)).astype(np.float32)
        out[t] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return np.load(path, mmap_mode="r")


def brute_pairs(x: np.ndarray, threshold: float, block: int = 2048) -> set[tuple[int, int]]:
    """Every pair (i < j) with cosine above ``threshold``, blockwise."""
    pairs = set()
    for start in range(0, len(x), block):
        sims = np.asarray(x[start : start + block]) @ np.asarray(x).T
        rows, cols = np.nonzero(sims > threshold)
        pairs.update(
            (int(start + r), int(c)) for r, c in zip(rows, cols, strict=True) if start + r < c
        )
    return pairs


def _share(result, i: int, j: int) -> bool:
    a = {result.cluster[i], result.second[i]} - {-1}
    return bool(a & ({result.cluster[j], result.second[j]} - {-1}))


def run_once(x: np.ndarray, cfg: SemanticConfig) -> tuple[float, int, object]:
    tracemalloc.start()
    started = time.perf_counter()
    result = semantic_dedup(ArraySource(x), cfg)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak, result


def measure(n: int, cfg: SemanticConfig, repeats: int, brute_max: int, work: Path) -> dict:
    x = synthetic(n, work / f"emb-{n}.npy")
    runs = [run_once(x, cfg) for _ in range(repeats)]
    result = runs[-1][2]
    row = {
        "n": n,
        "time_s": statistics.median(r[0] for r in runs),
        "times": [round(r[0], 2) for r in runs],
        "peak_mb": max(r[1] for r in runs) / 2**20,
        "rss_mb": own_peak_rss_mib(),
        "clusters": result.clusters,
        "dropped": int((~result.keep).sum()),
        "largest_cluster": int(np.bincount(result.cluster).max()),
    }
    if n <= brute_max:
        threshold = 1 - cfg.eps
        pairs = brute_pairs(x, threshold)
        # a pair is found when SemDeDup compared it: the two share a cluster
        same_cluster = sum(_share(result, i, j) for i, j in pairs)
        brute = greedy_within(np.asarray(x), threshold)
        row |= {
            "brute_pairs": len(pairs),
            "pairs_found": same_cluster / max(1, len(pairs)),
            "drop_agreement": float(((brute < 0) == result.keep).mean()),
            "brute_dropped": int((brute >= 0).sum()),
        }
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--brute-max", type=int, default=100_000, help="largest n checked all-pairs")
    p.add_argument("--eps", type=float, default=0.001)
    p.add_argument("--cluster-size", type=int, default=1000)
    args = p.parse_args()
    cfg = SemanticConfig(eps=args.eps, cluster_size=args.cluster_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            repeats = args.repeats if n < 1_000_000 else max(1, args.repeats - 1)
            row = measure(n, cfg, repeats, args.brute_max, Path(tmp))
            rows.append(row)
            print(row, flush=True)
            Path(tmp, f"emb-{n}.npy").unlink()
    print(
        f"\n{'n':>9} {'time s':>8} {'peak MB':>8} {'RSS MB':>8} {'clusters':>8} "
        f"{'dropped':>8} {'pairs found':>11} {'agree':>7}"
    )
    for r in rows:
        found = f"{r['pairs_found']:.4f}" if "pairs_found" in r else "-"
        agree = f"{r['drop_agreement']:.5f}" if "drop_agreement" in r else "-"
        print(
            f"{r['n']:>9} {r['time_s']:>8.2f} {r['peak_mb']:>8.0f} {r['rss_mb']:>8.0f} "
            f"{r['clusters']:>8} {r['dropped']:>8} {found:>11} {agree:>7}"
        )
    for a, b in zip(rows, rows[1:], strict=False):
        ratio = b["time_s"] / a["time_s"]
        print(
            f"{a['n']} -> {b['n']}: x{b['n'] / a['n']:.0f} items, x{ratio:.1f} time, "
            f"x{b['peak_mb'] / max(a['peak_mb'], 1e-9):.1f} peak memory"
        )


if __name__ == "__main__":
    main()
