"""mmpipe's engine for the train_clip benchmark: one training in its own process and its own Ray.

Run from the repository root: ``python -m benchmarks.train_clip_mmpipe CONFIG_YAML [OVERRIDE ...]``.
"""

from __future__ import annotations

import sys

from benchmarks.train_clip_engines import DONE_MARK


def main(argv: list[str]) -> int:
    import ray

    from pipelines.config import load_config
    from training.config import TrainConfig
    from training.engine import launch

    try:
        result = launch(load_config(TrainConfig, argv[0], argv[1:]))
        print(f"{DONE_MARK} steps={result.steps}", flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
