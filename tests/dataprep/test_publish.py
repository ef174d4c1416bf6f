"""dataprep.publish on a small staged build, in a local folder and in S3 (moto_server): shards
checked against the manifest, a rerun that finds its version altered, a publish killed midway."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest

from dataprep.dedup import STAGE as DEDUP
from dataprep.embed import SCORE
from dataprep.filters import STAGE as FILTER
from dataprep.publish import (
    MANIFEST,
    AlteredDataset,
    PublishConfig,
    ScorerInfo,
    dataset_prefix,
    list_datasets,
    publish,
    verify_version,
)
from dataprep.stages import CRAWL, KEPT, StageSummary, Staging, table_bytes
from dataprep.store import LocalStore, ObjectStore

NAME = "d"
SHARDS = [0, 1]  # crawl shards of 30 samples; dedup drops every 10th
ROOT = Path(__file__).resolve().parents[2]


def write_staging(store: ObjectStore, per_shard: int = 30) -> None:
    """What publish reads: crawl tars and the filter, score and dedup tables."""
    staging = Staging(store, NAME)
    for shard in SHARDS:
        keys = [f"{shard:05d}{i:04d}" for i in range(per_shard)]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for key in keys:
                image = bytes(range(256)) * (1 + int(key) % 7)  # publish does not decode
                for ext, data in (("jpg", image), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        store.put_bytes(staging.key(CRAWL, shard, "tar"), buf.getvalue())
        tables = {
            FILTER: {
                "key": keys,
                "reason": [KEPT] * per_shard,
                "image_bytes": [256 * (1 + int(k) % 7) for k in keys],
                "caption_chars": [len(f"caption {k}") for k in keys],
            },
            SCORE: {"key": keys, "clip_score": [0.3] * per_shard},
            DEDUP: {"key": keys, "reason": [KEPT if i % 10 else "exact" for i in range(per_shard)]},
        }
        for stage, columns in tables.items():
            store.put_bytes(staging.key(stage, shard, "parquet"), table_bytes(pa.table(columns)))


def publish_staged(store: ObjectStore, samples_per_shard: int, work: Path):
    staging = Staging(store, NAME)
    kept = sum(len(staging.kept_keys(DEDUP, s)) for s in SHARDS)
    stages = {DEDUP: StageSummary(stage=DEDUP, shards=2, count=60, kept=kept, by_reason={})}
    scorer = ScorerInfo(model="m", weights="w", sha256="s", threshold=0.1)
    cfg = PublishConfig(samples_per_shard=samples_per_shard)
    return publish(staging, SHARDS, cfg, f"fp-{samples_per_shard}", stages, scorer, {}, work)


def flip_a_byte(store: ObjectStore, key: str) -> None:
    """Change one byte amid the first image of a tar: the tar reads as before, the image too."""
    data = bytearray(store.get_bytes(key))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        image = next(m for m in tar if m.name.endswith(".jpg"))
    at = image.offset_data + image.size // 2
    data[at] ^= 0xFF
    store.put_bytes(key, bytes(data))


def test_verify_names_each_altered_missing_or_unlisted_shard(store, tmp_path):
    write_staging(store)
    manifest = publish_staged(store, 20, tmp_path)
    assert manifest.samples == 54 and len(manifest.shards) == 3
    verify_version(store, manifest)  # as published: no error
    prefix = dataset_prefix(NAME, manifest.version)

    flip_a_byte(store, f"{prefix}/00001.tar")
    store.delete(f"{prefix}/00002.tar")
    store.put_bytes(f"{prefix}/00003.tar", b"not a shard of this version")
    with pytest.raises(AlteredDataset) as error:
        verify_version(store, manifest)
    lines = str(error.value).splitlines()
    assert lines[1:4] == [
        f"  {store.uri(f'{prefix}/00001.tar')}: sha256 {_sha(store, f'{prefix}/00001.tar')}, "
        f"the manifest says {manifest.shards[1].sha256}",
        f"  {store.uri(f'{prefix}/00002.tar')}: missing",
        f"  {store.uri(f'{prefix}/00003.tar')}: not in the manifest",
    ]
    assert store.uri(f"{prefix}/00000.tar") not in str(error.value)


def _sha(store: ObjectStore, key: str) -> str:
    return hashlib.sha256(store.get_bytes(key)).hexdigest()


def test_a_rerun_refuses_to_call_an_altered_version_published(store, tmp_path):
    write_staging(store)
    manifest = publish_staged(store, 20, tmp_path)
    assert publish_staged(store, 20, tmp_path) == manifest  # the same build: the same version
    shard = f"{dataset_prefix(NAME, manifest.version)}/00002.tar"
    flip_a_byte(store, shard)
    with pytest.raises(AlteredDataset, match=f"{store.uri(shard)}: sha256"):
        publish_staged(store, 20, tmp_path)


# Publishes the staged build and dies (SIGKILL) while it writes the fifth shard: a local write
# dies between its temp file and the rename; an S3 one before its upload.
KILLED_PUBLISH = """
import json, os, signal, sys
from pathlib import Path
from dataprep.store import S3Settings, open_store
from tests.dataprep.test_publish import publish_staged
args = json.loads(sys.argv[1])
store = open_store(args["url"], S3Settings(**args["s3"]) if args["s3"] else None)

def die_at(key):
    if str(key).endswith("00004.tar"):
        os.kill(os.getpid(), signal.SIGKILL)

replace, put_file = os.replace, store.put_file
if args["s3"]:
    store.put_file = lambda key, path: (die_at(key), put_file(key, path))
else:
    os.replace = lambda src, dst: (die_at(dst), replace(src, dst))
publish_staged(store, 10, Path(args["work"]))
"""


def _s3_settings(store: ObjectStore) -> dict | None:
    settings = getattr(store, "settings", None)
    if settings is None:
        return None
    secret = settings.secret_access_key.get_secret_value()
    return settings.model_dump(exclude={"secret_access_key"}) | {"secret_access_key": secret}


def test_a_killed_publish_leaves_nothing_after_a_rerun(store, tmp_path):
    write_staging(store)
    args = {"url": store.root_uri, "s3": _s3_settings(store), "work": str(tmp_path / "work")}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_PUBLISH, json.dumps(args)], cwd=ROOT, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    folder = f"{dataset_prefix(NAME, 'v1')}/"
    assert list_datasets(store) == []
    assert store.list(folder) == [f"{folder}{i:05d}.tar" for i in range(4)]  # the dead one's
    if isinstance(store, LocalStore):
        temp = [p.name for p in (store.root / folder).iterdir() if p.name.startswith(".")]
        assert len(temp) == 1 and temp[0].startswith(".00004.tar.tmp-")

    manifest = publish_staged(store, 30, tmp_path / "work")  # other shard settings: 2 shards
    assert manifest.version == "v1" and len(manifest.shards) == 2
    expected = sorted([f"{folder}{s.path}" for s in manifest.shards] + [f"{folder}{MANIFEST}"])
    assert store.list(folder) == expected
    if isinstance(store, LocalStore):  # nothing hidden either
        assert sorted(os.listdir(store.root / folder)) == [k.rsplit("/")[-1] for k in expected]
    verify_version(store, manifest)
