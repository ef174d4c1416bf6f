"""dataprep.publish on a small staged build, in a local folder and in S3 (moto_server): shards
checked against the manifest, a rerun that finds its version altered, a publish killed midway."""

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import braceexpand
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep.dedup import STAGE as DEDUP
from dataprep.embed import SCORE
from dataprep.filters import STAGE as FILTER
from dataprep.publish import (
    MANIFEST,
    SHARD_INDEX,
    AlteredDataset,
    PublishConfig,
    ScorerInfo,
    choose_version,
    dataset_prefix,
    list_datasets,
    publish,
    read_manifest,
    verify_version,
)
from dataprep.publish_plan import permute, plan_publish, shard_name
from dataprep.reshard import Spools, read_records
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


def publish_staged(
    store: ObjectStore, samples_per_shard: int, work: Path, seed: int = 0, **options
):
    """Publish what write_staging wrote; ``options``: publish's (default: in this process)."""
    staging = Staging(store, NAME)
    kept = sum(len(staging.kept_keys(DEDUP, s)) for s in SHARDS)
    stages = {DEDUP: StageSummary(stage=DEDUP, shards=2, count=60, kept=kept, by_reason={})}
    scorer = ScorerInfo(model="m", weights="w", sha256="s", threshold=0.1)
    cfg = PublishConfig(samples_per_shard=samples_per_shard, seed=seed)
    fp = f"fp-{samples_per_shard}-{seed}"
    options = {"in_process": True} | options
    return publish(staging, SHARDS, cfg, fp, stages, scorer, {}, work, **options)


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
    index = [f"{folder}{MANIFEST}", f"{folder}{SHARD_INDEX}"]
    expected = sorted([f"{folder}{s.path}" for s in manifest.shards] + index)
    assert store.list(folder) == expected
    if isinstance(store, LocalStore):  # nothing hidden either
        assert sorted(os.listdir(store.root / folder)) == [k.rsplit("/")[-1] for k in expected]
    verify_version(store, manifest)


# --------------------------------------------------------------------------- at scale


def test_the_plan_is_a_seeded_bijection_computed_per_source_shard():
    counts = [7, 0, 30, 1, 12]
    plan = plan_publish(counts, 8, seed=3)
    positions = []
    for source, count in enumerate(counts):
        outputs, slots = plan.destinations(source)
        assert len(outputs) == count
        positions += (outputs * 8 + slots).tolist()
    assert sorted(positions) == list(range(50)) and positions != sorted(positions)
    assert plan.outputs == 7 and [plan.output_samples(o) for o in (0, 6)] == [8, 2]
    assert permute(np.arange(50), 50, 3).tolist() == positions  # per shard = all at once
    assert permute(np.arange(50), 50, 4).tolist() != positions


def test_shard_names_widen_past_five_digits_and_keep_their_order():
    assert [shard_name(i, 3) for i in range(3)] == ["00000.tar", "00001.tar", "00002.tar"]
    assert shard_name(99_999, 100_000) == "99999.tar"
    names = [shard_name(i, 2_000_000) for i in (0, 99_999, 100_000, 1_999_999)]
    assert names == ["0000000.tar", "0099999.tar", "0100000.tar", "1999999.tar"]
    assert names == sorted(names)
    pattern = f"{{{names[1][:-4]}..{names[2][:-4]}}}.tar"
    assert list(braceexpand.braceexpand(pattern)) == names[1:3]


def test_planning_memory_does_not_grow_with_the_samples():
    """The driver holds prefix sums; a task holds one source shard's destinations."""

    def peak(samples: int) -> int:
        tracemalloc.start()
        plan = plan_publish(np.full(samples // 1000, 1000), 1000, seed=0)
        for source in range(samples // 1000):
            plan.destinations(source)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(10_000), peak(100_000)
    assert large < 1.5 * small, (small, large)


def test_the_manifest_names_its_shard_index_and_old_manifests_still_read(store, tmp_path):
    write_staging(store)
    manifest = publish_staged(store, 20, tmp_path)
    prefix = dataset_prefix(NAME, manifest.version)
    written = json.loads(store.get_bytes(f"{prefix}/{MANIFEST}"))
    assert "shards" not in written and written["shard_index"] == SHARD_INDEX
    assert written["shard_count"] == 3
    index = pq.read_table(io.BytesIO(store.get_bytes(f"{prefix}/{SHARD_INDEX}")))
    assert index.to_pylist() == [s.model_dump() for s in manifest.shards]
    assert read_manifest(store, NAME) == manifest
    assert read_manifest(store, NAME, shards=False).shards == []

    # A version published before the index: its shards inline, no index file.
    old = manifest.model_copy(update={"version": "v2", "shard_index": None, "fingerprint": "old"})
    for shard in manifest.shards:
        store.put_bytes(
            f"datasets/{NAME}/v2/{shard.path}", store.get_bytes(f"{prefix}/{shard.path}")
        )
    store.put_bytes(f"datasets/{NAME}/v2/{MANIFEST}", old.model_dump_json().encode())
    assert "shards" in json.loads(store.get_bytes(f"datasets/{NAME}/v2/{MANIFEST}"))
    again = read_manifest(store, NAME, "v2")
    assert again.shards == manifest.shards and again.shard_count == 3
    verify_version(store, again)
    # The same build of it is found by reading its manifest (it has no publish record).
    assert choose_version(store, NAME, PublishConfig(), "old") == again
    assert choose_version(store, NAME, PublishConfig(), "new") == "v3"


class CountingStore(LocalStore):
    """A real local store that counts its listings (what a bucket would bill)."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.listed: list[str] = []

    def list(self, prefix: str = "") -> list[str]:
        self.listed.append(prefix)
        return super().list(prefix)


def test_versions_are_listed_by_folder_and_manifests_read_only_when_needed(tmp_path):
    store = CountingStore(tmp_path / "store")
    write_staging(store)
    first = publish_staged(store, 20, tmp_path)
    second = publish_staged(store, 10, tmp_path)
    store.put_bytes(f"datasets/{NAME}/v9/00000.tar", b"no manifest: not a version")
    store.put_bytes("datasets/other/v1/00000.tar", b"nor this")
    store.listed.clear()
    assert list_datasets(store) == [(NAME, "v1"), (NAME, "v2")]
    assert store.listed == []  # folders and HEADs only: no object listing
    reads = []
    get_bytes = store.get_bytes
    store.get_bytes = lambda key: (reads.append(key), get_bytes(key))[1]
    assert choose_version(store, NAME, PublishConfig(), second.fingerprint) == second
    assert not any(first.version in key for key in reads)  # found by its record, v1 unread
    assert choose_version(store, NAME, PublishConfig(), "another") == "v3"
    assert store.listed == [f"staging/{NAME}/publish/published/"] * 2


@pytest.mark.slow
def test_ray_tasks_publish_the_same_version_with_1_or_4_tasks(local_store, s3_store, tmp_path):
    """Through S3 (the tasks share nothing else) with 1 or 4 map and reduce tasks: the same
    shards, byte for byte, as the same publish in one process on a local folder."""
    write_staging(local_store, per_shard=45)
    copy = s3_store
    for key in local_store.list():
        copy.put_bytes(key, local_store.get_bytes(key))

    in_process = publish_staged(local_store, 7, tmp_path / "a", seed=5)
    one = publish_staged(copy, 7, tmp_path / "b", seed=5, in_process=False, tasks=1)
    assert one.model_dump(exclude={"created_at"}) == in_process.model_dump(exclude={"created_at"})
    four = _republish(copy, 7, tmp_path / "c", seed=5, in_process=False, tasks=4)
    assert four.model_dump(exclude={"created_at"}) == one.model_dump(exclude={"created_at"})
    assert four.shard_count == 12 and four.samples == 80  # 2 x 45, 5 of each dropped
    keys = _published_keys(copy, four)
    assert len(keys) == len(set(keys)) == 80
    assert set(keys) == {k for s in SHARDS for k in Staging(copy, NAME).kept_keys(DEDUP, s)}
    other = _republish(copy, 7, tmp_path / "d", seed=6, in_process=False, tasks=4)
    assert set(_published_keys(copy, other)) == set(keys) and other.shards != four.shards
    assert copy.list(f"staging/{NAME}/publish/pieces/") == []  # the shuffle's pieces removed


def _republish(store, samples_per_shard, work, **options):
    """Publish again after removing the published version (a new build of the same inputs)."""
    for _, version in list_datasets(store):
        store.delete_prefix(f"{dataset_prefix(NAME, version)}/")
    store.delete_prefix(f"staging/{NAME}/publish/published/")
    return publish_staged(store, samples_per_shard, work, **options)


def _published_keys(store, manifest) -> list[str]:
    keys = []
    for shard in manifest.shards:
        data = store.get_bytes(f"{dataset_prefix(NAME, manifest.version)}/{shard.path}")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar})
    return keys


# Publishes on Ray and dies (SIGKILL) as the driver writes the shard index: every tar is up,
# no manifest.
KILLED_RAY_PUBLISH = """
import json, os, signal, sys
from pathlib import Path
from dataprep.store import LocalStore
from tests.dataprep.test_publish import publish_staged
args = json.loads(sys.argv[1])
store = LocalStore(args["root"])
put_bytes = store.put_bytes

def put_or_die(key, data):
    if key.endswith("shards.parquet"):
        os.kill(os.getpid(), signal.SIGKILL)
    put_bytes(key, data)

store.put_bytes = put_or_die
publish_staged(store, 7, Path(args["work"]), in_process=False, tasks=3)
"""


@pytest.mark.slow
def test_a_publish_killed_on_ray_gives_the_same_manifest_when_rerun(local_store, tmp_path):
    write_staging(local_store, per_shard=45)
    write_staging(unkilled := LocalStore(tmp_path / "unkilled"), per_shard=45)
    reference = publish_staged(unkilled, 7, tmp_path / "w0")
    args = {"root": str(local_store.root), "work": str(tmp_path / "w1")}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RAY_PUBLISH, json.dumps(args)],
        cwd=ROOT,
        start_new_session=True,  # its local Ray too: stopped below with it
        stderr=subprocess.PIPE,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert list_datasets(local_store) == []
    assert len(local_store.list(f"{dataset_prefix(NAME, 'v1')}/")) == 12  # the dead one's tars

    again = publish_staged(local_store, 7, tmp_path / "w2")
    assert again.model_dump(exclude={"created_at"}) == reference.model_dump(exclude={"created_at"})
    verify_version(local_store, again)
    assert local_store.list(f"staging/{NAME}/publish/pieces/") == []


def test_spools_keep_each_groups_records_in_order_across_flushes(tmp_path):
    spools = Spools(str(tmp_path), ".spool")
    spools.FLUSH = 100  # flush every record or two
    for i in range(300):
        spools.add(i % 7, (i, b"x" * (i % 50)))
    assert spools.close() == list(range(7))
    for group in range(7):
        got = list(read_records(spools.path(group)))
        assert got == [(i, b"x" * (i % 50)) for i in range(group, 300, 7)]


def test_a_deleted_version_loses_its_publish_record(local_store, tmp_path):
    write_staging(local_store)
    first = publish_staged(local_store, 20, tmp_path)
    local_store.delete_prefix(f"{dataset_prefix(NAME, first.version)}/")  # a user deletes it
    second = publish_staged(local_store, 10, tmp_path)  # another build takes the name v1
    assert second.version == first.version == "v1"
    assert local_store.list(f"staging/{NAME}/publish/published/") == [
        f"staging/{NAME}/publish/published/v1/{second.fingerprint}"
    ]
    assert publish_staged(local_store, 20, tmp_path).version == "v2"  # first's build, again
