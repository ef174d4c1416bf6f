"""Publish: reshard the kept samples into final WebDataset shards and write the manifest last.

Layout: ``datasets/<name>/<version>/NNNNN.tar`` (``.jpg``, ``.txt``, ``.json`` per sample) and
``datasets/<name>/<version>/manifest.json``. A version exists for readers only once its manifest
does; a version with a manifest is never written again.

Samples are shuffled across shards (a seeded permutation of the whole build) and cut into shards
of ``samples_per_shard`` samples or about ``bytes_per_shard`` bytes. Writing is two passes with
bounded memory: each crawl tar is read once and its kept samples are spooled to local files, one
per output shard; then each output shard is assembled in permutation order and uploaded. Tars are
written deterministically (fixed mtime, owner and order), so the same build gives byte-identical
shards and the same sha256 in the manifest.

Re-running the same build (same inputs, same settings) returns the version already published,
once every shard still matches the manifest's sha256. A version folder holds exactly the manifest's
shards: each publish first removes what a dead publish of the dataset left (objects of unpublished
versions, unfinished writes), which is safe because one build of a dataset runs at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from dataprep.dedup import STAGE as DEDUP
from dataprep.embed import SCORE
from dataprep.errors import MmpipeError
from dataprep.filters import STAGE as FILTER
from dataprep.stage_config import PublishConfig
from dataprep.stages import StageSummary, Staging, file_sha256
from dataprep.store import ObjectNotFound, ObjectStore, StoreError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
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
    shards: list[ShardManifest]
    stages: dict[str, StageSummary]  # crawl, filter, embed, score, dedup: counts by reason
    scorer: ScorerInfo
    config: dict


def dataset_prefix(name: str, version: str) -> str:
    return f"datasets/{name}/{version}"


def _version_order(version: str) -> tuple:
    match = re.fullmatch(r"v(\d+)", version)
    return (0, int(match.group(1)), "") if match else (1, 0, version)


def list_datasets(store: ObjectStore) -> list[tuple[str, str]]:
    """(name, version) of every published version (those with a manifest), oldest first."""
    found = []
    for key in store.list("datasets/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == MANIFEST:
            found.append((parts[1], parts[2]))
    return sorted(found, key=lambda nv: (nv[0], _version_order(nv[1])))


def read_manifest(store: ObjectStore, name: str, version: str | None = None) -> DatasetManifest:
    """A published version's manifest; ``version`` None: the latest."""
    if version is None:
        versions = [v for n, v in list_datasets(store) if n == name]
        if not versions:
            raise PublishError(f"no published dataset {name!r} in {store.uri('datasets')}")
        version = versions[-1]
    key = f"{dataset_prefix(name, version)}/{MANIFEST}"
    try:
        return DatasetManifest.model_validate_json(store.get_bytes(key))
    except ObjectNotFound:
        raise PublishError(
            f"dataset {name}@{version} is not published: no {store.uri(key)}"
        ) from None


def manifest_uri(store: ObjectStore, name: str, version: str) -> str:
    return store.uri(f"{dataset_prefix(name, version)}/{MANIFEST}")


def choose_version(
    store: ObjectStore, name: str, cfg: PublishConfig, fp: str
) -> str | DatasetManifest:
    """The version to write, or the manifest of the version this very build already published."""
    versions = [v for n, v in list_datasets(store) if n == name]
    for version in versions:
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
    never got a manifest. Only while no publish of ``name`` runs (the build lock)."""
    published = {v for n, v in list_datasets(store) if n == name}
    try:
        removed = store.delete_abandoned(f"datasets/{name}/")
    except StoreError as e:  # e.g. no s3:ListBucketMultipartUploads: invisible, so not fatal
        log.warning("cannot remove unfinished writes (a bucket lifecycle rule can): %s", e)
        removed = 0
    for key in store.list(f"datasets/{name}/"):
        parts = key.split("/")  # datasets, name, version, ...
        if len(parts) > 3 and parts[2] not in published:
            store.delete(key)
            removed += 1
    return removed


# --------------------------------------------------------------------------- resharding


def kept_samples(staging: Staging, shards: list[int]) -> tuple[list[str], dict[str, dict]]:
    """Keys the dedup stage kept, in global order, and their signals (size, score)."""
    keys, info = [], {}
    for shard in shards:
        kept = set(staging.kept_keys(DEDUP, shard))
        scores = dict(
            zip(
                *staging.table(SCORE, shard).select(["key", "clip_score"]).to_pydict().values(),
                strict=True,
            )
        )
        for row in staging.table(FILTER, shard).to_pylist():
            if row["key"] in kept:
                keys.append(row["key"])
                info[row["key"]] = {"shard": shard, "score": scores[row["key"]]} | row
    return keys, info


def plan_shards(
    keys: list[str], info: dict[str, dict], cfg: PublishConfig
) -> dict[str, tuple[int, int]]:
    """key -> (output shard, position in it): a seeded shuffle cut by count or bytes."""
    order = np.random.default_rng(cfg.seed).permutation(len(keys))
    plan, shard, position, size = {}, 0, 0, 0
    for index in order:
        key = keys[index]
        sample_bytes = (info[key]["image_bytes"] or 0) + info[key]["caption_chars"] + 512
        full = (
            position >= cfg.samples_per_shard
            if cfg.samples_per_shard is not None
            else position > 0 and size + sample_bytes > cfg.bytes_per_shard
        )
        if full:
            shard, position, size = shard + 1, 0, 0
        plan[key] = (shard, position)
        position, size = position + 1, size + sample_bytes
    return plan


def _sample_files(key: str, files: dict[str, bytes], info: dict) -> dict[str, bytes]:
    meta = json.loads(files.get("json", b"{}") or b"{}")
    meta |= {"clip_score": round(float(info["score"]), 6), "source_shard": info["shard"]}
    ext = next(e for e in ("jpg", "png", "webp") if e in files)
    return {
        ext: files[ext],
        "txt": files.get("txt", b""),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def _spool(staging: Staging, shards: list[int], plan: dict, info: dict, work: Path) -> None:
    for shard in shards:
        for key, files in staging.samples(shard):
            if key in plan:
                out, position = plan[key]
                with open(work / f"{out:05d}.spool", "ab") as f:
                    pickle.dump((position, key, _sample_files(key, files, info[key])), f)


def _read_spool(path: Path) -> list[tuple]:
    records = []
    with open(path, "rb") as f:
        while True:
            try:
                records.append(pickle.load(f))
            except EOFError:
                return sorted(records)


def _write_tar(records: list[tuple], path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for _position, key, files in records:
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(files[ext]), 0, 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(files[ext]))


def write_shards(
    staging: Staging, shards: list[int], prefix: str, cfg: PublishConfig, work: Path
) -> list[ShardManifest]:
    keys, info = kept_samples(staging, shards)
    plan = plan_shards(keys, info, cfg)
    _spool(staging, shards, plan, info, work)
    outputs = sorted({shard for shard, _ in plan.values()})
    manifests = []
    for out in outputs:
        records = _read_spool(work / f"{out:05d}.spool")
        tar_path = work / f"{out:05d}.tar"
        _write_tar(records, tar_path)
        staging.store.put_file(f"{prefix}/{out:05d}.tar", tar_path)
        manifests.append(
            ShardManifest(
                path=f"{out:05d}.tar",
                samples=len(records),
                bytes=tar_path.stat().st_size,
                sha256=file_sha256(tar_path),
            )
        )
        tar_path.unlink()
    return manifests


def publish(
    staging: Staging,
    shards: list[int],
    cfg: PublishConfig,
    fp: str,
    stages: dict[str, StageSummary],
    scorer: ScorerInfo,
    config: dict,
    work_root: Path,
) -> DatasetManifest:
    """Write the version's shards, then its manifest; or return the version already published,
    verified (AlteredDataset if a shard changed since)."""
    remove_dead_publishes(staging.store, staging.name)
    chosen = choose_version(staging.store, staging.name, cfg, fp)
    if isinstance(chosen, DatasetManifest):
        verify_version(staging.store, chosen)
        return chosen
    prefix = dataset_prefix(staging.name, chosen)
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root, prefix="publish-") as work:
        shard_manifests = write_shards(staging, shards, prefix, cfg, Path(work))
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
        shards=shard_manifests,
        stages=stages,
        scorer=scorer,
        config=config,
    )
    # Last: the version exists from this moment on.
    staging.store.put_bytes(f"{prefix}/{MANIFEST}", manifest.model_dump_json(indent=2).encode())
    return manifest
