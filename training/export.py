"""Consolidated fp32 weights from a run's latest checkpoint, in the model's own format.

DeepSpeed checkpoints hold ZeRO partitions per rank. `zero_to_fp32` merges the fp32 master
weights of any ZeRO stage offline, so export needs no GPUs and no running workers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from dataprep.store import ObjectStore
from training.config import TrainConfig
from training.registry import get_spec


def latest_checkpoint_prefix(store: ObjectStore, run_prefix: str) -> str | None:
    """Key prefix of the newest complete checkpoint Ray Train stored for the run.

    Ray names checkpoint folders `checkpoint_<timestamp>`, so names sort by time; DeepSpeed
    writes `latest` last, so a folder without it is incomplete.
    """
    base = len(run_prefix) + 1
    folders = {
        key[base:].split("/")[0]
        for key in store.list(f"{run_prefix}/checkpoint_")
        if key.endswith("/latest")
    }
    return f"{run_prefix}/{max(folders)}" if folders else None


def consolidated_state_dict(store: ObjectStore, checkpoint_prefix: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        for key in store.list(f"{checkpoint_prefix}/"):
            store.get_file(key, Path(tmp) / key[len(checkpoint_prefix) + 1 :])
        tag = (Path(tmp) / "latest").read_text().strip()
        if any((Path(tmp) / tag).glob("*optim_states.pt")):
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag)
        # ZeRO stage 0 keeps whole weights in the model-states file.
        states = torch.load(Path(tmp) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}


def export_run(cfg: TrainConfig) -> str:
    """Export the run's latest weights next to it (`runs/<name>/export/`); return the URI."""
    store = cfg.store.open()
    prefix = latest_checkpoint_prefix(store, cfg.run_prefix())
    if prefix is None:
        raise FileNotFoundError(f"no checkpoint under {store.uri(cfg.run_prefix())}")
    state = consolidated_state_dict(store, prefix)
    with tempfile.TemporaryDirectory() as tmp:
        path = get_spec(cfg.spec).export(state, cfg, Path(tmp))
        key = f"{cfg.run_prefix()}/export/{path.name}"
        store.put_file(key, path)
    return store.uri(key)
