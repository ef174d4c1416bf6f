"""Which shards a run reads and how many samples each holds, before any worker starts.

`DataConfig.source` names shards as a list, a brace pattern, a crawl folder or a manifest;
`resolve_shards` turns any of them into `ShardInfo`s, and `check_data` checks that they exist.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import braceexpand
import pydantic

from dataprep.errors import MmpipeError
from dataprep.publish_plan import shard_index_rows
from dataprep.store import (
    ObjectNotFound,
    ObjectStore,
    S3Settings,
    StoreError,
    open_store,
    split_uri,
)
from training.config import DataConfig

log = logging.getLogger(__name__)

STATS_SUFFIX = ".stats.json"
_META_FILE = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not samples
_IO_THREADS = 16  # concurrent stats reads / tar scans while resolving shards


class DataError(MmpipeError, RuntimeError):
    """The training data can't be used as configured; the message names the URI involved."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    uri: str
    samples: int | None  # None: unknown (then DataConfig.samples_per_epoch must be set)
    # From a manifest: what the reader checks the shard's bytes against (None: not checked).
    sha256: str | None = dataclasses.field(default=None, compare=False)
    bytes: int | None = dataclasses.field(default=None, compare=False)


def resolve_shards(
    cfg: DataConfig, s3: S3Settings | None = None, scan: bool = True
) -> list[ShardInfo]:
    """The shards ``cfg.source`` names, with sample counts where they can be known.

    Counts come from crawl ``.stats.json`` sidecars (``kept``) or the manifest. Shards given
    as a list or pattern use a sidecar when one sits next to the tar; otherwise, unless
    ``samples_per_epoch`` is set or ``scan`` is False (count None), the tar is scanned: a local
    tar costs only its headers (tarfile seeks over member data) but an S3 tar is streamed
    whole, so that is one full read of the dataset. Set ``samples_per_epoch`` or use a
    manifest for large S3 datasets.
    """
    source = cfg.source
    if isinstance(source, str) and source.endswith("/"):
        shards = _crawl_folder(source, s3)
    elif isinstance(source, str) and source.endswith(".json"):
        shards = _manifest(source, s3)
    else:
        patterns = [source] if isinstance(source, str) else source
        uris = [uri for pattern in patterns for uri in braceexpand.braceexpand(pattern)]
        shards = _listed(uris, s3, scan=scan and cfg.samples_per_epoch is None)
    if not shards:
        raise DataError(f"no shards found in {source}")
    return shards


def check_data(cfg: DataConfig, s3: S3Settings | None = None) -> list[ShardInfo]:
    """The shards a run reads exist and begin with a tar header (one small read each);
    sidecars and manifests are read, tars are not scanned."""
    shards = resolve_shards(cfg, s3, scan=False)
    stores: dict[str, ObjectStore] = {}

    def located(uri: str) -> tuple[ObjectStore, str]:
        folder, name = split_shard_uri(uri)
        if folder not in stores:
            stores[folder] = open_folder(folder, s3)
        return stores[folder], name

    _parallel(_check_tar_header, [located(s.uri) for s in shards if s.samples != 0])
    return shards


def _check_tar_header(at: tuple[ObjectStore, str]) -> None:
    store, key = at
    try:
        with store.open(key) as f, tarfile.open(fileobj=f, mode="r|"):
            pass  # opening a stream reads the first member's header, and nothing more
    except tarfile.TarError as e:
        raise DataError(f"shard {store.uri(key)} is not a readable tar file: {e}") from None
    except StoreError as e:
        raise DataError(f"cannot read shard {store.uri(key)}: {e}") from e


def split_shard_uri(uri: str) -> tuple[str, str]:
    """A shard's folder URI and name (DataError naming the URI if it is not one)."""
    try:
        return split_uri(uri)
    except ValueError as e:
        raise DataError(f"shard {e}") from None


def open_folder(uri: str, s3: S3Settings | None) -> ObjectStore:
    try:
        return open_store(uri, s3)
    except ValueError as e:
        raise DataError(str(e)) from None


def _read_json(store: ObjectStore, key: str, what: str) -> Any:
    try:
        return json.loads(store.get_bytes(key))
    except ObjectNotFound:
        raise DataError(f"{what} not found: {store.uri(key)}") from None
    except (StoreError, ValueError) as e:
        raise DataError(f"cannot read {what} {store.uri(key)}: {e}") from e


def _kept(store: ObjectStore, key: str) -> int:
    stats = _read_json(store, key, "shard stats")
    if not isinstance(stats, dict) or not isinstance(stats.get("kept"), int):
        raise DataError(f"shard stats {store.uri(key)} has no integer 'kept' field")
    return stats["kept"]


def _parallel(fn: Callable[..., Any], *args: list[Any]) -> list[Any]:
    """``map`` over threads: these are object-store round trips, not CPU work."""
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        return list(pool.map(fn, *args))


def _crawl_folder(uri: str, s3: S3Settings | None) -> list[ShardInfo]:
    """Committed crawl shards: a tar counts only once its ``.stats.json`` exists."""
    store = open_folder(uri, s3)
    keys = {key for key in store.list() if "/" not in key}
    stats = sorted(key for key in keys if key.endswith(STATS_SUFFIX))
    if not stats:
        raise DataError(
            f"no shards found in {uri}: no *{STATS_SUFFIX} (a crawl shard is committed "
            "when its stats file is written; has the crawl run?)"
        )
    tars = [key.removesuffix(STATS_SUFFIX) + ".tar" for key in stats]
    for tar, stat in zip(tars, stats, strict=True):
        if tar not in keys:
            raise DataError(f"shard not found: {store.uri(tar)} (its {stat} exists)")
    counts = _parallel(functools.partial(_kept, store), stats)
    return [ShardInfo(store.uri(tar), n) for tar, n in zip(tars, counts, strict=True)]


class _ManifestShard(pydantic.BaseModel):
    path: str
    samples: int = pydantic.Field(ge=0)
    bytes: int | None = None
    sha256: str | None = None


class _Manifest(pydantic.BaseModel):
    shards: list[_ManifestShard] = []
    shard_index: str | None = None  # publish's index beside the manifest (then no "shards")


def _manifest(uri: str, s3: S3Settings | None) -> list[ShardInfo]:
    """``{"shards": [{"path": <relative to the manifest's folder>, "samples": N, ...}]}``, or
    publish's ``{"shard_index": "shards.parquet"}`` naming a parquet index of the same rows; a
    shard's ``bytes`` and ``sha256``, when given, are what its readers check it against. Shards
    with them are not looked up (their readers fail on a missing one); others are, one listing
    per folder."""
    folder, key = split_shard_uri(uri)
    store = open_folder(folder, s3)
    try:
        manifest = _Manifest.model_validate(_read_json(store, key, "manifest"))
        if manifest.shard_index is not None:
            _check_relative(uri, manifest.shard_index)
            manifest.shards = _read_index(store, manifest.shard_index)
    except pydantic.ValidationError as e:
        raise DataError(f"cannot read manifest {uri}: not a shard manifest: {e}") from None
    for shard in manifest.shards:
        _check_relative(uri, shard.path)
    uris = [f"{folder.rstrip('/')}/{s.path}" for s in manifest.shards]
    if all(s.bytes is not None and s.sha256 is not None for s in manifest.shards):
        located = _canonical(uris, s3)
    else:
        located = [at.uri for at in _locate(uris, s3)]
    return [
        ShardInfo(at, s.samples, s.sha256, s.bytes)
        for at, s in zip(located, manifest.shards, strict=True)
    ]


def _check_relative(uri: str, path: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise DataError(f"manifest {uri}: shard path {path!r} must stay in its folder")


def _read_index(store: ObjectStore, key: str) -> list[_ManifestShard]:
    try:
        rows = shard_index_rows(store.get_bytes(key))
    except ObjectNotFound:
        raise DataError(f"shard index not found: {store.uri(key)}") from None
    except (StoreError, ValueError) as e:
        raise DataError(f"cannot read shard index {store.uri(key)}: {e}") from e
    return [_ManifestShard.model_validate(row) for row in rows]


def _canonical(uris: list[str], s3: S3Settings | None) -> list[str]:
    """Shard URIs as their folders' stores spell them, without a request."""
    stores: dict[str, ObjectStore] = {}
    canonical = []
    for uri in uris:
        parent, name = split_shard_uri(uri)
        if parent not in stores:
            stores[parent] = open_folder(parent, s3)
        canonical.append(stores[parent].uri(name))
    return canonical


@dataclasses.dataclass(frozen=True)
class _Located:
    store: ObjectStore  # the shard's folder
    key: str  # the shard's name in it
    folder_keys: frozenset[str]  # everything else in that folder (sidecars)

    @property
    def uri(self) -> str:  # canonical, whatever the spelling of the input
        return self.store.uri(self.key)


def _locate(uris: list[str], s3: S3Settings | None) -> list[_Located]:
    """List each shard folder once (not one request per shard); raise if a shard is missing."""
    folders: dict[str, tuple[ObjectStore, frozenset[str]]] = {}
    located = []
    for uri in uris:
        parent, name = split_shard_uri(uri)
        if parent not in folders:
            store = open_folder(parent, s3)
            folders[parent] = (store, frozenset(k for k in store.list() if "/" not in k))
        store, keys = folders[parent]
        if name not in keys:
            raise DataError(f"shard not found: {uri}")
        located.append(_Located(store, name, keys))
    return located


def _listed(uris: list[str], s3: S3Settings | None, scan: bool) -> list[ShardInfo]:
    def count(at: _Located) -> int | None:
        sidecar = at.key.removesuffix(".tar") + STATS_SUFFIX
        if sidecar in at.folder_keys:
            return _kept(at.store, sidecar)
        return count_samples(at.store, at.key) if scan else None

    located = _locate(uris, s3)
    return [ShardInfo(at.uri, n) for at, n in zip(located, _parallel(count, located), strict=True)]


def count_samples(store: ObjectStore, key: str) -> int:
    """Samples in a tar (runs of member names sharing a key). See ``resolve_shards`` for cost."""
    from webdataset.tariterators import base_plus_ext  # webdataset imports torch

    count, last = 0, None
    try:
        with store.open(key) as f, tarfile.open(fileobj=f, mode=_scan_mode(f)) as tar:
            for member in tar:
                if member.isreg() and not _META_FILE.match(member.name):
                    prefix, _ = base_plus_ext(member.name)
                    if prefix is not None and prefix != last:
                        count, last = count + 1, prefix
    except tarfile.TarError as e:
        # The same samples will be readable when training: count those, don't fail here.
        log.warning("shard %s is damaged after %d samples: %s", store.uri(key), count, e)
    except StoreError as e:
        raise DataError(f"cannot count samples of {store.uri(key)}: {e}") from e
    return count


def _scan_mode(f: BinaryIO) -> str:
    # A seekable file lets tarfile jump over member data; a network stream must be read whole.
    return "r:" if f.seekable() else "r|"
