"""dVAE codes for a dataset's shards, one sidecar per shard (the reproductions' stage 1.5).

``NNNNN.tar`` gets ``NNNNN.codes.npy`` (training/codes.py) next to it or under ``out``, so a
transformer run reads codes (``data.codes=<out>``) instead of running the dVAE every epoch.
Each shard is one call (``encode_shard``) that writes its sidecar whole or not at all;
``encode_dataset`` runs one Ray task per shard.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from dataprep.ray_session import init_ray
from dataprep.store import (
    WITH_SECRETS,
    ObjectStore,
    S3Settings,
    local_copy,
    open_store,
    require_file,
    split_uri,
)
from training.codes import sidecar_dtype, sidecar_name
from training.config import DataConfig, EncodeConfig
from training.models.dvae import DVAE, load_dvae
from training.shards import DataError, check_data, resolve_shards
from training.specs.dvae import image_transform

IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")


@dataclass(frozen=True)
class ShardCodes:
    shard: str  # the tar's URI
    sidecar: str  # the written sidecar's URI
    samples: int  # coded samples
    skipped: int  # samples without a decodable image


def _samples(store: ObjectStore, key: str, uri: str) -> Iterator[dict[str, Any]]:
    with store.open(key) as stream:
        yield from group_by_keys(tar_file_expander([{"url": uri, "stream": stream}]))


@torch.no_grad()
def encode_shard(
    shard_uri: str,
    dvae: DVAE,
    transform,
    out_uri: str | None = None,
    batch_size: int = 256,
    s3: S3Settings | None = None,
) -> ShardCodes:
    """Code every sample of one tar; write ``<name>.codes.npy`` in ``out_uri`` (default: next
    to the tar). ``transform``: PIL image -> [3, H, W] in [0, 1], as the dVAE was trained."""
    if dvae.config.vocab_size > np.iinfo(np.int16).max + 1:
        raise ValueError("codes above 32767 do not fit the int16 sidecar")
    folder, name = split_uri(shard_uri)
    store = open_store(folder, s3)
    keys: list[bytes] = []
    codes: list[np.ndarray] = []
    pending_keys: list[bytes] = []
    pending: list[torch.Tensor] = []
    skipped = 0

    device = next(dvae.parameters()).device

    def flush() -> None:
        batch = torch.stack(pending).to(device, non_blocking=True)
        codes.extend(dvae.encode(batch).to(torch.int16).cpu().numpy())
        keys.extend(pending_keys)
        pending.clear()
        pending_keys.clear()

    for sample in _samples(store, name, shard_uri):
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB") if data is not None else None
        except Exception:  # PIL raises many types for corrupt bytes
            image = None
        if image is None:
            skipped += 1
            continue
        pending.append(transform(image))
        pending_keys.append(sample["__key__"].encode())
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()

    table = np.zeros(len(keys), dtype=sidecar_dtype(dvae.config.grid))
    table["key"] = keys
    if codes:
        table["codes"] = np.stack(codes)
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    out_store = store if out_uri is None else open_store(out_uri, s3)
    sidecar_key = sidecar_name(shard_uri)
    out_store.put_bytes(sidecar_key, buffer.getvalue())
    return ShardCodes(shard_uri, out_store.uri(sidecar_key), len(keys), skipped)


def encode_shards(
    shard_uris: list[str],
    dvae_checkpoint: str,
    out_uri: str | None = None,
    batch_size: int = 256,
    s3: S3Settings | None = None,
    device: str = "cpu",
) -> list[ShardCodes]:
    """``encode_shard`` for each tar with the exported dVAE ``dvae_checkpoint`` on ``device``."""
    dvae = load_dvae(local_copy(dvae_checkpoint, s3)).to(device)
    transform = image_transform(dvae.config.image_size)
    return [encode_shard(uri, dvae, transform, out_uri, batch_size, s3) for uri in shard_uris]


def _encode_one(shard_uri: str, cfg_json: str) -> ShardCodes:
    cfg = EncodeConfig.model_validate_json(cfg_json)
    s3 = cfg.store.s3
    device = "cuda" if cfg.gpus_per_task > 0 else "cpu"  # Ray set CUDA_VISIBLE_DEVICES
    return encode_shards([shard_uri], cfg.dvae_checkpoint, cfg.out, cfg.batch_size, s3, device)[0]


def check_inputs(cfg: EncodeConfig) -> None:
    """The dVAE export and the shards exist (FileNotFoundError, DataError), as this machine sees
    them: before Ray starts, unless joining a cluster whose paths may differ (``ray_address``)."""
    if cfg.ray_address:
        return
    require_file(cfg.dvae_checkpoint, cfg.store.s3, "dvae_checkpoint (--dvae)")
    check_data(DataConfig(source=cfg.source), cfg.store.s3)


def encode_dataset(cfg: EncodeConfig) -> list[ShardCodes]:
    """Sidecars for every non-empty shard of ``cfg.source`` in ``cfg.out``, coded on Ray."""
    import ray

    found = resolve_shards(DataConfig(source=cfg.source), cfg.store.s3)
    shards = [s.uri for s in found if s.samples != 0]
    init_ray(cfg.ray_address)
    if cfg.gpus_per_task > 0 and not ray.cluster_resources().get("GPU"):
        raise DataError(  # Ray would queue GPU tasks forever on a cluster without GPUs
            f"gpus_per_task = {cfg.gpus_per_task} but the Ray cluster has no GPUs; "
            "set gpus_per_task=0 to code on CPUs"
        )
    task = ray.remote(
        num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task, max_retries=cfg.max_retries
    )(_encode_one)
    cfg_json = cfg.model_dump_json(context=WITH_SECRETS)
    return ray.get([task.remote(uri, cfg_json) for uri in shards])
