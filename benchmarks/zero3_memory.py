"""ZeRO-3 construction memory: how much resident memory each rank adds while building the model.

A 2-layer slice of the 12B (d_model 3968, 62 heads, the 12B's vocabularies; ~0.58 B parameters)
on 2 CPU ranks (gloo): built partitioned as the engine does under ZeRO-3 (training/parallel.py),
then whole in fp32 as ZeRO 0-2 build it, then 2 training steps of the partitioned model.
Figures: docs/training.md ("GPU nodes").

    .venv/bin/python benchmarks/zero3_memory.py
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file

GB = 1e9
WORLD = 2


class PeakRSS:
    """Resident set size of this process, sampled every 5 ms; `peak` since the last reset."""

    def __init__(self):
        self.peak = self.now()
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak


def train_config(n_layer: int, text_len: int, image_grid: int):
    from training.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "name": "zero3-memory",
            "spec": "dalle",
            "model": "dalle-12b",
            "model_args": {"n_layer": n_layer, "text_len": text_len, "image_grid": image_grid},
            "dvae_checkpoint": "unused",
            "data": {"source": "unused"},
            "steps": 2,
            "engine": {"micro_batch_size": 1, "zero": {"stage": 3}, "precision": "bf16"},
            "optim": {"warmup_steps": 0},
        }
    )


def _rank(rank: int, port: int, args: argparse.Namespace, results: dict) -> None:
    os.environ |= {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)}
    import deepspeed
    import torch
    import torch.distributed as dist

    from training.engine import _skip_shm_comm_build
    from training.models.dalle import Dalle
    from training.parallel import build_model
    from training.specs.dalle import model_config

    _skip_shm_comm_build(deepspeed)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = train_config(args.layers, args.text_len, args.image_grid)
    rss = PeakRSS()

    base = rss.reset()
    torch.manual_seed(0)
    model = build_model(lambda: Dalle(model_config(cfg)), cfg, WORLD)
    partitioned = rss.peak - base
    dist.barrier()

    base = rss.reset()
    whole = Dalle(model_config(cfg))  # what every rank builds under ZeRO 0-2
    full = rss.peak - base
    params = sum(p.numel() for p in whole.parameters())
    del whole
    dist.barrier()

    results[rank] = {"partitioned": partitioned, "full": full, "params": params, "step_s": []}
    if args.steps:
        results[rank] |= train(model, cfg, args.steps, rss)
    dist.destroy_process_group()


def train(model, cfg, steps: int, rss: PeakRSS) -> dict:
    """`steps` DeepSpeed ZeRO-3 steps of the partitioned model on random tokens."""
    import deepspeed
    import torch

    from training.models.dalle import dalle_loss
    from training.parallel import deepspeed_config, make_optimizer, make_scheduler
    from training.specs import param_groups
    from training.specs.dalle import DalleSpec, model_config

    rss.reset()
    spec = DalleSpec()
    optimizer = make_optimizer(param_groups(model, spec, cfg.optim.weight_decay), cfg)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=make_scheduler(optimizer, cfg),
        config=deepspeed_config(cfg, WORLD),
        dist_init_required=False,
    )
    m = model_config(cfg)
    step_s = []
    for _ in range(steps):
        started = time.monotonic()
        text = torch.randint(0, m.text_vocab, (1, m.text_len))
        codes = torch.randint(0, m.image_vocab, (1, m.image_len))
        loss = dalle_loss(*engine(text, codes), text, codes)["total"]
        engine.backward(loss)
        engine.step()
        step_s.append(time.monotonic() - started)
    return {"train_peak": rss.peak, "step_s": step_s, "loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--image-grid", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    import torch.multiprocessing as mp

    from tests.conftest import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), args, results), nprocs=WORLD, join=True)
        results = dict(results)
    per_rank = max(r["partitioned"] for r in results.values())
    full = max(r["full"] for r in results.values())
    print(f"model: {results[0]['params'] / 1e9:.2f} B parameters, {WORLD} ranks (gloo, CPU)")
    print(
        f"zero3 construction: {per_rank / GB:.2f} GB per rank of {full / GB:.2f} GB full "
        f"(ratio {per_rank / full:.2f})"
    )
    for rank, r in sorted(results.items()):
        line = f"rank {rank}: built {r['partitioned'] / GB:.2f} GB, whole {r['full'] / GB:.2f} GB"
        if r["step_s"]:
            steps = ", ".join(f"{s:.0f}" for s in r["step_s"])
            line += (
                f"; {len(r['step_s'])} ZeRO-3 steps ({steps} s, loss {r['loss']:.2f}), "
                f"peak RSS {r['train_peak'] / GB:.2f} GB"
            )
        print(line)


if __name__ == "__main__":
    main()
