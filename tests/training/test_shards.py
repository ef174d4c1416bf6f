"""training.shards: every kind of source, and errors that name the URI (local folder and S3)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pydantic
import pytest

from dataprep.publish_plan import shard_index_bytes
from dataprep.store import ObjectStore
from tests.training.test_data import loader, write_dataset
from training.config import DataConfig
from training.shards import DataError, ShardInfo, check_data, resolve_shards


def test_every_kind_of_source_resolves_to_the_same_shards(store: ObjectStore) -> None:
    uris = write_dataset(store, "ds")
    root, s3 = store.uri("ds"), getattr(store, "settings", None)
    manifest = {"name": "demo", "shards": []}
    for s in range(5):
        data = store.get_bytes(f"ds/{s:05d}.tar")
        entry = {
            "path": f"{s:05d}.tar",
            "samples": 37,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        manifest["shards"].append(entry)
    store.put_bytes("ds/manifest.json", json.dumps(manifest).encode())
    expected = [ShardInfo(uri, 37) for uri in uris]

    for source in (uris, f"{root}/{{00000..00004}}.tar", f"{root}/", f"{root}/manifest.json"):
        assert resolve_shards(DataConfig(source=source), s3) == expected, source

    # No sidecars: counted by scanning the tar (seeking locally, streamed from S3)...
    raw = write_dataset(store, "raw", stats=False)
    assert resolve_shards(DataConfig(source=raw), s3) == [ShardInfo(u, 37) for u in raw]
    # ... unless the epoch size is given.
    cfg = DataConfig(source=raw, samples_per_epoch=100)
    assert resolve_shards(cfg, s3) == [ShardInfo(u, None) for u in raw]


def test_manifest_paths_are_relative_to_its_folder(local_store: ObjectStore) -> None:
    uris = write_dataset(local_store, "datasets/demo/v1/shards", shards=2)
    shards = [{"path": f"shards/{s:05d}.tar", "samples": 37} for s in range(2)]
    local_store.put_bytes("datasets/demo/v1/manifest.json", json.dumps({"shards": shards}).encode())
    cfg = DataConfig(source=local_store.uri("datasets/demo/v1/manifest.json"))
    assert resolve_shards(cfg) == [ShardInfo(u, 37) for u in uris]


def test_bad_sources_give_errors_naming_the_uri(local_store: ObjectStore) -> None:
    uris = write_dataset(local_store, "ds", shards=2)
    root = local_store.uri("ds")

    def error(source: str | list[str], **cfg: Any) -> str:
        with pytest.raises(DataError) as info:
            resolve_shards(DataConfig(source=source, **cfg))
        return str(info.value)

    assert error([*uris, f"{root}/00009.tar"]) == f"shard not found: {root}/00009.tar"
    assert error(f"{root}/{{00000..00002}}.tar") == f"shard not found: {root}/00002.tar"
    assert "no shards found in" in error(local_store.uri("nothing") + "/")
    local_store.put_bytes("ds/00007.stats.json", b'{"kept": 3}')
    assert f"shard not found: {root}/00007.tar" in error(f"{root}/")
    assert error(f"{root}/manifest.json") == f"manifest not found: {root}/manifest.json"
    for bad in (b"{not json", b'{"shards": [{"path": "00000.tar"}]}'):
        local_store.put_bytes("ds/manifest.json", bad)
        assert f"cannot read manifest {root}/manifest.json" in error(f"{root}/manifest.json")
    for path, message in (("00005.tar", "shard not found"), ("../x.tar", "stay in its folder")):
        local_store.put_bytes(
            "ds/manifest.json", json.dumps({"shards": [{"path": path, "samples": 1}]}).encode()
        )
        assert message in error(f"{root}/manifest.json")
    assert "no scheme" in error("/abs/path/00000.tar")
    with pytest.raises(pydantic.ValidationError, match="source is empty"):
        DataConfig(source=[])

    shards = resolve_shards(DataConfig(source=uris))
    with pytest.raises(DataError, match="74 samples .* make no full step of 40 x 2 ranks"):
        loader(shards, world=2, batch=40)
    with pytest.raises(DataError, match=re.escape(f"sample count of {uris[0]} is unknown")):
        loader([ShardInfo(u, None) for u in uris])


def test_check_data_reads_each_shards_first_tar_header(store: ObjectStore) -> None:
    uris = write_dataset(store, "ds", shards=3)
    s3 = getattr(store, "settings", None)
    cfg = DataConfig(source=store.uri("ds") + "/")
    assert check_data(cfg, s3) == resolve_shards(cfg, s3, scan=False)
    store.put_bytes("ds/00001.tar", b"<html>not a tar</html>" * 40)  # what a bad copy leaves
    with pytest.raises(DataError, match=f"shard {re.escape(uris[1])} is not a readable tar"):
        check_data(cfg, s3)


def test_a_published_manifest_reads_its_shard_index_without_listing(store: ObjectStore) -> None:
    """publish's manifest names a parquet index; shards with sha256s are not looked up (a
    rank reads 2 objects, whatever the number of shards), check_data still finds a missing one."""
    uris = write_dataset(store, "ds", shards=3)
    rows = []
    for s in range(3):
        data = store.get_bytes(f"ds/{s:05d}.tar")
        sha = hashlib.sha256(data).hexdigest()
        rows.append({"path": f"{s:05d}.tar", "samples": 37, "bytes": len(data), "sha256": sha})
    store.put_bytes("ds/shards.parquet", shard_index_bytes(rows))
    store.put_bytes("ds/manifest.json", json.dumps({"shard_index": "shards.parquet"}).encode())
    store.put_bytes("ds/inline.json", json.dumps({"shards": rows}).encode())
    s3 = getattr(store, "settings", None)
    indexed = resolve_shards(DataConfig(source=store.uri("ds/manifest.json")), s3)
    assert indexed == resolve_shards(DataConfig(source=store.uri("ds/inline.json")), s3)
    assert indexed == [ShardInfo(u, 37) for u in uris]
    assert [(s.bytes, s.sha256) for s in indexed] == [(r["bytes"], r["sha256"]) for r in rows]

    store.delete("ds/00001.tar")
    cfg = DataConfig(source=store.uri("ds/manifest.json"))
    assert resolve_shards(cfg, s3) == indexed  # no listing, no lookup
    with pytest.raises(DataError, match=f"cannot read shard {re.escape(uris[1])}"):
        check_data(cfg, s3)
    store.put_bytes("ds/shards.parquet", b"not parquet")
    with pytest.raises(DataError, match="cannot read shard index .*shards.parquet"):
        resolve_shards(cfg, s3)
    store.put_bytes("ds/manifest.json", json.dumps({"shard_index": "../x.parquet"}).encode())
    with pytest.raises(DataError, match="must stay in its folder"):
        resolve_shards(cfg, s3)
