"""The dedup stage's parts timed separately at 10^4, 10^5 and 10^6 items, on a local Ray.

Synthetic per-shard signals with planted copies (dataprep.dedup_synthetic, 10^4 items a shard).
Each size runs the stage three times: exact dedup alone; exact + pHash (perceptual, compared
inside the semantic clusters, so it includes k-means and assignment); exact + SemDeDup. The
pHash and SemDeDup figures are the differences from exact alone (median of the repeats). Then
the full stage, with its recall and precision against the planted copies
(benchmarks/build_scale.py carries on to 10^7 and extrapolates).

    .venv/bin/python benchmarks/dedup.py                       # 1e4, 1e5, 1e6
    .venv/bin/python benchmarks/dedup.py --sizes 100000 --repeats 5 --dim 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_scale import dropped_gids  # noqa: E402
from dataprep.dedup import STAGE, dedup_shards  # noqa: E402
from dataprep.dedup_synthetic import KINDS, write_signals  # noqa: E402
from dataprep.stage_config import DedupConfig  # noqa: E402
from dataprep.stages import Staging  # noqa: E402
from dataprep.store import open_store  # noqa: E402

PARTS = {
    "exact": {"perceptual": {"enabled": False}, "semantic": {"enabled": False}},
    "exact+phash": {"semantic": {"enabled": False}},
    "exact+semdedup": {"perceptual": {"enabled": False}},
    "all": {},
}


def timed(staging: Staging, shards: list[int], cfg: DedupConfig, repeats: int) -> float:
    times = []
    for r in range(repeats):
        for shard in shards:
            staging.store.delete(staging.key(STAGE, shard, "stats.json"))
        started = time.perf_counter()
        dedup_shards(staging, shards, cfg, f"bench-{r}")
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=256, help="semantic.clusters (k-means cap)")
    args = p.parse_args()
    from dataprep.ray_session import init_ray

    init_ray(None, num_cpus=os.cpu_count())
    print(
        f"{'n':>9} {'exact s':>8} {'pHash s':>8} {'SemDeDup s':>10} {'all s':>8} {'recall':>7} {'prec.':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            staging = Staging(open_store(f"file://{tmp}/{n}"), "bench")
            truth = write_signals(staging, n, min(n, 10_000), args.dim)
            shards = truth["shards"]
            t = {}
            timed(staging, shards, DedupConfig(), 1)  # warm-up: Ray workers, imports
            for name, part in PARTS.items():
                cfg = DedupConfig.model_validate(part | {"partitions": 16})
                cfg.semantic.clusters = args.clusters
                t[name] = timed(staging, shards, cfg, args.repeats)
            planted = np.concatenate([truth[k] for k in KINDS])
            dropped = np.concatenate(list(dropped_gids(staging, shards).values()))
            hit = np.isin(dropped, planted).sum()
            print(
                f"{n:>9} {t['exact']:>8.1f} {t['exact+phash'] - t['exact']:>8.1f} "
                f"{t['exact+semdedup'] - t['exact']:>10.1f} {t['all']:>8.1f} "
                f"{hit / len(planted):>7.4f} {hit / max(1, len(dropped)):>7.4f}",
                flush=True,
            )
            staging.store.delete_prefix("staging/")


if __name__ == "__main__":
    main()
