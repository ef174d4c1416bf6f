"""dVAE code sidecars: ``<shard>.codes.npy`` beside or apart from each shard, read and checked.

A sidecar is a structured array with one row per coded sample: ``key`` (the WebDataset
``__key__``, bytes) and ``codes`` (``[h, w]`` int16, raster order). training/encode_codes.py
writes them; `ReadCodes` is the loader's decode hook that yields them instead of images.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
import torch

from dataprep.store import S3Settings, StoreError, open_store, split_uri
from training.data import RawSample, SkipSample
from training.shards import DataError, ShardInfo, open_folder

SUFFIX = ".codes.npy"
_SIDECARS_KEPT = 8  # per worker (LRU): the shuffle buffer mixes a few shards


def sidecar_dtype(grid: int) -> np.dtype:
    return np.dtype([("key", "S64"), ("codes", np.int16, (grid, grid))])


def sidecar_name(shard_uri: str) -> str:
    """``.../00003.tar`` -> ``00003.codes.npy``."""
    return shard_uri.rpartition("/")[2].removesuffix(".tar") + SUFFIX


def read_codes(sidecar_uri: str, s3: S3Settings | None = None) -> dict[str, np.ndarray]:
    """A sidecar as ``{key: [h, w] int16 codes}``."""
    folder, name = split_uri(sidecar_uri)
    table = np.load(io.BytesIO(open_store(folder, s3).get_bytes(name)), allow_pickle=False)
    return {key.decode(): codes for key, codes in zip(table["key"], table["codes"], strict=True)}


def check_codes(folder: str, shards: list[ShardInfo], s3: S3Settings | None = None) -> None:
    """DataError unless every shard has a sidecar in ``folder``."""
    present = set(open_folder(folder, s3).list())
    missing = [s.uri for s in shards if sidecar_name(s.uri) not in present]
    if missing:
        raise DataError(
            f"no dVAE codes for {len(missing)} of {len(shards)} shards in {folder} "
            f"(first: {missing[0]}); encode the shards first (mmpipe encode-codes)"
        )


class ReadCodes:
    """Decode hook: ``{"codes": [h, w] long}`` from the sample's shard's sidecar in ``folder``.

    A sample without codes (its image did not decode when encoded) is skipped; a missing
    sidecar is a DataError. Sidecars are read once per DataLoader worker.
    """

    def __init__(self, folder: str, s3: S3Settings | None = None) -> None:
        self.folder, self.s3 = folder, s3
        self._sidecars: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    def __call__(self, sample: RawSample) -> dict[str, torch.Tensor]:
        codes = self._sidecar(sample["__url__"]).get(sample["__key__"])
        if codes is None:
            raise SkipSample("no codes")
        return {"codes": torch.from_numpy(codes.astype(np.int64))}

    def _sidecar(self, shard_uri: str) -> dict[str, np.ndarray]:
        if shard_uri in self._sidecars:
            self._sidecars.move_to_end(shard_uri)
            return self._sidecars[shard_uri]
        sidecar = f"{self.folder.rstrip('/')}/{sidecar_name(shard_uri)}"
        try:
            self._sidecars[shard_uri] = read_codes(sidecar, self.s3)
        except StoreError as e:
            raise DataError(
                f"no dVAE codes for {shard_uri}: {sidecar} cannot be read ({e}); encode the "
                "shards first (mmpipe encode-codes)"
            ) from None
        if len(self._sidecars) > _SIDECARS_KEPT:
            self._sidecars.popitem(last=False)
        return self._sidecars[shard_uri]
