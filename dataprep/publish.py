"""Publish: reshard the kept samples into final WebDataset shards and write the manifest last.

Layout: ``datasets/<name>/<version>/NNNNN.tar`` (``.jpg``, ``.txt``, ``.json`` per sample; at
least 5 digits, more past 10**5 shards), ``shards.parquet`` (the shard index: path, samples,
bytes, sha256) and ``manifest.json``. A version exists for readers only once its manifest does;
a version with a manifest is never written again. The manifest's size does not grow with the
data: it names the index. Manifests of older versions list their shards inline; both read.

Samples are shuffled across shards by a seeded bijection of the global sample order
(`dataprep.publish_plan`) and cut into shards of ``samples_per_shard`` samples (or as many
average samples as fit ``bytes_per_shard``). Ray map and reduce tasks (`dataprep.reshard`) move
the samples through the store: the driver holds counts and the index, never samples. Tars are
written deterministically, so the same build gives byte-identical shards and the same manifest
whatever the number of workers.

Re-running the same build (same inputs, same settings) returns the version already published,
once every shard still matches its sha256. A version folder holds exactly the manifest's
shards, its index and the manifest: each publish first removes what a dead publish of the
dataset left (objects of unpublished versions, unfinished writes, shuffle pieces), which is
safe because one build of a dataset runs at a time.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, model_validator

from dataprep.dedup import STAGE as DEDUP
from dataprep.errors import MmpipeError
from dataprep.publish_plan import (
    SHARD_INDEX,
    plan_publish,
    shard_index_bytes,
    shard_index_rows,
    shard_size,
)
from dataprep.ray_session import init_ray
from dataprep.reshard import SAMPLE_OVERHEAD, Shuffle, count_kept, map_task, reduce_task
from dataprep.stage_config import PublishConfig
from dataprep.stages import StageSummary, Staging
from dataprep.store import ObjectNotFound, ObjectStore, StoreError, concurrently

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPOOL_BYTES = 2 << 30  # what one map or reduce task spools on its machine's disk, about
_MAX_TASKS = 4096  # map and reduce tasks each: the store holds at most their product of pieces
_VERIFY_THREADS = 8  # shards hashed at once: object-store reads, not CPU
_BLOCK = 1 << 20


class PublishError(MmpipeError, RuntimeError):
    pass


class AlteredDataset(PublishError):
    """A published version's objects no longer match its manifest."""


class ShardManifest(BaseModel):
    path: str  # relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str


class ScorerInfo(BaseModel):
    model: str
    weights: str
    sha256: str
    threshold: float  # the absolute CLIP-score threshold applied
    top_fraction: float | None = None


class DatasetManifest(BaseModel):
    name: str
    version: str
    fingerprint: str  # of the inputs and every stage's settings
    created_at: str
    samples: int
    bytes: int
    shard_count: int = 0
    shard_index: str | None = None  # beside the manifest; None: shards listed inline (older)
    # Read from the index (not written to manifest.json when there is one); [] when a manifest
    # is read without its shards.
    shards: list[ShardManifest] = []
    stages: dict[str, StageSummary]  # crawl, filter, embed, score, dedup: counts by reason
    scorer: ScorerInfo
    config: dict

    @model_validator(mode="after")
    def _count_inline_shards(self) -> DatasetManifest:
        if self.shard_index is None:
            self.shard_count = len(self.shards)
        return self

    def to_json(self) -> bytes:
        """manifest.json: without the shards when they are in the index."""
        exclude = {"shards"} if self.shard_index else set()
        return self.model_dump_json(indent=2, exclude=exclude).encode()


def dataset_prefix(name: str, version: str) -> str:
    return f"datasets/{name}/{version}"


def _version_order(version: str) -> tuple:
    match = re.fullmatch(r"v(\d+)", version)
    return (0, int(match.group(1)), "") if match else (1, 0, version)


def list_datasets(store: ObjectStore, name: str | None = None) -> list[tuple[str, str]]:
    """(name, version) of every published version (those with a manifest), oldest first:
    folders listed one level at a time (never the shards), one HEAD per version."""
    names = [name] if name is not None else store.list_folders("datasets/")
    candidates = [(n, v) for n in names for v in store.list_folders(f"datasets/{n}/")]
    found = store.exists_many(f"{dataset_prefix(n, v)}/{MANIFEST}" for n, v in candidates)
    published = [nv for nv, yes in zip(candidates, found, strict=True) if yes]
    return sorted(published, key=lambda nv: (nv[0], _version_order(nv[1])))


def read_manifest(
    store: ObjectStore, name: str, version: str | None = None, shards: bool = True
) -> DatasetManifest:
    """A published version's manifest; ``version`` None: the latest. ``shards``: with its shard
    list (read from the index when it has one)."""
    if version is None:
        versions = [v for _, v in list_datasets(store, name)]
        if not versions:
            raise PublishError(f"no published dataset {name!r} in {store.uri('datasets')}")
        version = versions[-1]
    key = f"{dataset_prefix(name, version)}/{MANIFEST}"
    try:
        manifest = DatasetManifest.model_validate_json(store.get_bytes(key))
    except ObjectNotFound:
        raise PublishError(
            f"dataset {name}@{version} is not published: no {store.uri(key)}"
        ) from None
    if shards and manifest.shard_index:
        manifest.shards = read_shard_index(
            store, f"{dataset_prefix(name, version)}/{manifest.shard_index}"
        )
    return manifest


def read_shard_index(store: ObjectStore, key: str) -> list[ShardManifest]:
    try:
        return [ShardManifest(**row) for row in shard_index_rows(store.get_bytes(key))]
    except ObjectNotFound:
        raise PublishError(f"shard index missing: {store.uri(key)}") from None
    except ValueError as e:
        raise PublishError(f"cannot read shard index {store.uri(key)}: {e}") from None


def manifest_uri(store: ObjectStore, name: str, version: str) -> str:
    return store.uri(f"{dataset_prefix(name, version)}/{MANIFEST}")


def _published_marks(store: ObjectStore, name: str) -> dict[str, set[str]]:
    """version -> fingerprints, as each publish records them after its manifest: one listing
    (a version deleted and published again has more than one until the next publish)."""
    prefix = f"{Staging(store, name).prefix('publish')}/published/"
    marks: dict[str, set[str]] = {}
    for key in store.list(prefix):
        version, _, fp = key[len(prefix) :].partition("/")
        marks.setdefault(version, set()).add(fp)
    return marks


def _mark_published(store: ObjectStore, manifest: DatasetManifest) -> None:
    prefix = Staging(store, manifest.name).prefix("publish")
    store.put_bytes(f"{prefix}/published/{manifest.version}/{manifest.fingerprint}", b"")


def choose_version(
    store: ObjectStore, name: str, cfg: PublishConfig, fp: str
) -> str | DatasetManifest:
    """The version to write, or the manifest of the version this very build already published.
    Fingerprints come from the publish records; only versions without one (published before
    those existed) have their manifest read."""
    versions = [v for _, v in list_datasets(store, name)]
    marks = _published_marks(store, name)
    unmarked = [v for v in versions if v not in marks]
    for version in [v for v in versions if fp in marks.get(v, ())] + unmarked:
        manifest = read_manifest(store, name, version)
        if manifest.fingerprint == fp:
            return manifest
    if cfg.version is not None:
        if cfg.version in versions:
            raise PublishError(
                f"dataset {name}@{cfg.version} is already published from other inputs or "
                "settings; published versions are never overwritten: choose another version"
            )
        return cfg.version
    numbers = [int(v[1:]) for v in versions if re.fullmatch(r"v\d+", v)]
    return f"v{max(numbers, default=0) + 1}"


# --------------------------------------------------------------------------- verifying


def shard_problem(store: ObjectStore, prefix: str, shard: ShardManifest) -> str | None:
    """What is wrong with one published shard, read whole as a stream (None: it matches)."""
    key = f"{prefix}/{shard.path}"
    digest, size = hashlib.sha256(), 0
    try:
        with store.open(key) as f:
            while block := f.read(_BLOCK):
                digest.update(block)
                size += len(block)
    except ObjectNotFound:
        return f"{store.uri(key)}: missing"
    if size != shard.bytes:
        return f"{store.uri(key)}: {size} bytes, the manifest says {shard.bytes}"
    if digest.hexdigest() != shard.sha256:
        return f"{store.uri(key)}: sha256 {digest.hexdigest()}, the manifest says {shard.sha256}"
    return None


def version_problems(store: ObjectStore, manifest: DatasetManifest) -> list[str]:
    """Every shard that differs from the manifest, and every object it does not list."""
    prefix = dataset_prefix(manifest.name, manifest.version)
    with ThreadPoolExecutor(max_workers=_VERIFY_THREADS) as pool:
        problems = list(pool.map(lambda s: shard_problem(store, prefix, s), manifest.shards))
    listed = {f"{prefix}/{s.path}" for s in manifest.shards} | {f"{prefix}/{MANIFEST}"}
    if manifest.shard_index:
        listed.add(f"{prefix}/{manifest.shard_index}")
    unlisted = [k for k in store.list(f"{prefix}/") if k not in listed]
    return [p for p in problems if p] + [f"{store.uri(k)}: not in the manifest" for k in unlisted]


def verify_version(store: ObjectStore, manifest: DatasetManifest) -> None:
    """AlteredDataset naming each shard that no longer matches the manifest's sha256 and size."""
    if problems := version_problems(store, manifest):
        prefix = dataset_prefix(manifest.name, manifest.version)
        raise AlteredDataset(
            f"{manifest.name}@{manifest.version} does not match its manifest "
            f"{store.uri(f'{prefix}/{MANIFEST}')}:\n  " + "\n  ".join(problems) + "\n"
            f"Restore those objects, or delete {store.uri(prefix)}/ to publish the version again"
        )


def remove_dead_publishes(store: ObjectStore, name: str) -> int:
    """Delete what dead publishes of ``name`` left: unfinished writes, objects of versions that
    never got a manifest, shuffle pieces. Only while no publish of ``name`` runs (the build
    lock). Lists version folders, not the shards of published versions."""
    pieces = f"{Staging(store, name).prefix('publish')}/pieces/"
    try:
        removed = store.delete_abandoned(f"datasets/{name}/") + store.delete_abandoned(pieces)
    except StoreError as e:  # e.g. no s3:ListBucketMultipartUploads: invisible, so not fatal
        log.warning("cannot remove unfinished writes (a bucket lifecycle rule can): %s", e)
        removed = 0
    published = {v for _, v in list_datasets(store, name)}
    dead = [v for v in store.list_folders(f"datasets/{name}/") if v not in published]
    removed += sum(concurrently(store.delete_prefix, [f"{dataset_prefix(name, v)}/" for v in dead]))
    marks = f"{Staging(store, name).prefix('publish')}/published/"
    store.delete_keys(  # records of versions deleted since: not removed objects, not counted
        f"{marks}{v}/{fp}"
        for v, fps in _published_marks(store, name).items()
        if v not in published
        for fp in fps
    )
    return removed + store.delete_prefix(pieces)


# --------------------------------------------------------------------------- resharding


def plan_shards(
    keys: list[str], info: dict[str, dict], cfg: PublishConfig
) -> dict[str, tuple[int, int]]:
    """key -> (output shard, slot) for keys in global order, as publish places them."""
    total = sum(
        (info[k]["image_bytes"] or 0) + info[k]["caption_chars"] + SAMPLE_OVERHEAD for k in keys
    )
    size = shard_size(cfg.samples_per_shard, cfg.bytes_per_shard, len(keys), total)
    outputs, slots = plan_publish([len(keys)], size, cfg.seed).destinations(0)
    return {k: (int(o), int(s)) for k, o, s in zip(keys, outputs, slots, strict=True)}


def _run_tasks(
    fn: Callable[..., Any], ids: list[int], args: tuple, ray_address: str | None, in_process: bool
) -> Iterator[Any]:
    """``fn(id, *args)`` for each id: Ray tasks (results as they finish), or here, in order."""
    if in_process:
        return (fn(i, *args) for i in ids)
    from dataprep.ray_stages import map_shards

    return map_shards(fn, ids, args, ray_address=ray_address)


def write_shards(
    staging: Staging,
    shards: list[int],
    prefix: str,
    cfg: PublishConfig,
    work: Path,
    ray_address: str | None = None,
    tasks: int | None = None,
    in_process: bool = False,
) -> list[ShardManifest]:
    """Count, plan, map, reduce: the version's shards, written by tasks; their index rows."""
    run = lambda fn, ids, *args: _run_tasks(fn, ids, args, ray_address, in_process)  # noqa: E731
    cpus = 1 if in_process else _cluster_cpus(ray_address)
    groups = min(len(shards), tasks or min(_MAX_TASKS, max(cpus, len(shards) // 1000)))
    counted = dict(run(count_kept, list(range(groups)), staging, list(shards), groups))
    counts = np.array([c for g in range(groups) for c in counted[g]], dtype=np.int64)
    counts = counts.reshape(-1, 2)  # (kept samples, their bytes) per crawl shard
    samples, total_bytes = counts.sum(axis=0).tolist()
    size = shard_size(cfg.samples_per_shard, cfg.bytes_per_shard, samples, total_bytes)
    plan = plan_publish(counts[:, 0], size, cfg.seed)
    if plan.samples == 0:
        return []
    tasks = tasks or min(_MAX_TASKS, max(cpus, -(-total_bytes // SPOOL_BYTES)))
    shuffle = Shuffle(
        staging=staging,
        sources=list(shards),
        plan=plan,
        map_groups=min(len(shards), tasks),
        reduce_groups=min(plan.outputs, tasks),
        prefix=prefix,
        pieces=f"{staging.prefix('publish')}/pieces",
        work=str(work),
    )
    inputs: dict[int, list[int]] = {g: [] for g in range(shuffle.reduce_groups)}
    for map_id, groups in run(map_task, list(range(shuffle.map_groups)), shuffle):
        for group in groups:
            inputs[group].append(map_id)
    rows = []
    reduce_ids = list(range(shuffle.reduce_groups))
    for written in run(_reduce, reduce_ids, shuffle, {g: sorted(m) for g, m in inputs.items()}):
        rows += written
    staging.store.delete_prefix(f"{shuffle.pieces}/")
    return sorted((ShardManifest(**row) for row in rows), key=lambda s: s.path)


def _cluster_cpus(ray_address: str | None) -> int:
    import ray

    init_ray(ray_address)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _reduce(task: int, shuffle: Shuffle, inputs: dict[int, list[int]]) -> list[dict]:
    return reduce_task(task, shuffle, inputs[task])


def publish(
    staging: Staging,
    shards: list[int],
    cfg: PublishConfig,
    fp: str,
    stages: dict[str, StageSummary],
    scorer: ScorerInfo,
    config: dict,
    work_root: Path,
    *,
    ray_address: str | None = None,
    tasks: int | None = None,
    in_process: bool = False,
) -> DatasetManifest:
    """Write the version's shards, then its index, then its manifest; or return the version
    already published, verified (AlteredDataset if a shard changed since).

    The shards are written by Ray tasks (``ray_address``: the cluster; None: this process's
    Ray, a private local one if none), at most ``tasks`` map and reduce tasks each;
    ``in_process``: the same tasks, one after the other in this process (small builds, tests)."""
    remove_dead_publishes(staging.store, staging.name)
    chosen = choose_version(staging.store, staging.name, cfg, fp)
    if isinstance(chosen, DatasetManifest):
        verify_version(staging.store, chosen)
        return chosen
    prefix = dataset_prefix(staging.name, chosen)
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root, prefix="publish-") as work:
        shard_manifests = write_shards(
            staging, shards, prefix, cfg, Path(work), ray_address, tasks, in_process
        )
    kept = stages[DEDUP].kept
    if sum(s.samples for s in shard_manifests) != kept:
        raise AssertionError(
            f"published {sum(s.samples for s in shard_manifests)} of {kept} samples"
        )
    manifest = DatasetManifest(
        name=staging.name,
        version=chosen,
        fingerprint=fp,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        samples=kept,
        bytes=sum(s.bytes for s in shard_manifests),
        shard_count=len(shard_manifests),
        shard_index=SHARD_INDEX,
        shards=shard_manifests,
        stages=stages,
        scorer=scorer,
        config=config,
    )
    index = shard_index_bytes([s.model_dump() for s in shard_manifests])
    staging.store.put_bytes(f"{prefix}/{SHARD_INDEX}", index)
    # Last: the version exists from this moment on.
    staging.store.put_bytes(f"{prefix}/{MANIFEST}", manifest.to_json())
    _mark_published(staging.store, manifest)
    return manifest
