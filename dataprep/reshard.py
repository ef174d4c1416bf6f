"""Publish's shuffle: map tasks send kept samples to their output shards, reduce tasks write tars.

A map task reads a group of crawl shards and writes, per reduce group, one piece (a stream of
``(output, slot, key, files)`` records) to the staging area. A reduce task reads its pieces,
orders each output shard by slot and uploads it. Destinations come from the `PublishPlan`, so
the driver only sees counts and the output shards' index rows; samples travel worker -> store ->
worker. Tars are deterministic (fixed mtime, owner, order): the same plan gives the same bytes,
whatever the number of tasks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dataprep.dedup import STAGE as DEDUP
from dataprep.embed import SCORE
from dataprep.filters import STAGE as FILTER
from dataprep.publish_plan import PublishPlan, shard_name
from dataprep.stages import KEPT, Staging

_BLOCK = 1 << 20
SAMPLE_OVERHEAD = 512  # tar headers of a sample's three members, about


@dataclasses.dataclass(frozen=True)
class Shuffle:
    """What every task of one publish shares (sent to each task once)."""

    staging: Staging
    sources: list[int]  # crawl shards, in global order
    plan: PublishPlan
    map_groups: int
    reduce_groups: int
    prefix: str  # the version folder
    pieces: str  # staging prefix of this publish's pieces
    work: str  # a local folder for spools, on whichever machine runs the task

    def map_sources(self, task: int) -> range:
        return _split(len(self.sources), self.map_groups, task)

    def reduce_outputs(self, task: int) -> range:
        return _split(self.plan.outputs, self.reduce_groups, task)

    def reduce_group(self, outputs: np.ndarray) -> np.ndarray:
        """The reduce group of each output shard (the inverse of ``reduce_outputs``)."""
        n, groups = self.plan.outputs, self.reduce_groups
        bounds = np.array([_split(n, groups, g).start for g in range(1, groups)], dtype=np.int64)
        return np.searchsorted(bounds, outputs, side="right")

    def piece(self, reduce_task: int, map_task: int) -> str:
        return f"{self.pieces}/{reduce_task:06d}/{map_task:06d}.pieces"


def _split(n: int, groups: int, group: int) -> range:
    """The ``group``-th of ``groups`` contiguous, near-equal parts of range(n)."""
    return range(n * group // groups, n * (group + 1) // groups)


def kept_rows(staging: Staging, shard: int) -> list[dict[str, Any]]:
    """The shard's kept samples in global order (the filter table's), with their signals."""
    dedup = staging.table(DEDUP, shard).select(["key", "reason"]).to_pydict()
    kept = {k for k, r in zip(dedup["key"], dedup["reason"], strict=True) if r == KEPT}
    score = staging.table(SCORE, shard).select(["key", "clip_score"]).to_pydict()
    scores = dict(zip(score["key"], score["clip_score"], strict=True))
    rows = staging.table(FILTER, shard).to_pylist()
    return [r | {"shard": shard, "score": scores[r["key"]]} for r in rows if r["key"] in kept]


def sample_bytes(row: dict[str, Any]) -> int:
    return (row["image_bytes"] or 0) + row["caption_chars"] + SAMPLE_OVERHEAD


def count_kept(task: int, staging: Staging, sources: list[int], groups: int) -> tuple[int, list]:
    """(task, [(kept samples, their bytes, about)] of each crawl shard of the task's group):
    what planning needs, one task per group as the map tasks split them."""
    counts = []
    for index in _split(len(sources), groups, task):
        rows = kept_rows(staging, sources[index])
        counts.append((len(rows), sum(map(sample_bytes, rows))))
    return task, counts


def sample_files(files: dict[str, bytes], row: dict[str, Any]) -> dict[str, bytes]:
    meta = json.loads(files.get("json", b"{}") or b"{}")
    meta |= {"clip_score": round(float(row["score"]), 6), "source_shard": row["shard"]}
    ext = next(e for e in ("jpg", "png", "webp") if e in files)
    return {
        ext: files[ext],
        "txt": files.get("txt", b""),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


class Spools:
    """Local files of pickled records, one per group, appended through small buffers: memory
    and open files stay bounded however many groups a task feeds."""

    FLUSH = 256 * 1024

    def __init__(self, folder: str, suffix: str) -> None:
        self.folder, self.suffix = folder, suffix
        self.buffers: dict[int, io.BytesIO] = {}
        self.written: set[int] = set()

    def path(self, group: int) -> Path:
        return Path(self.folder, f"{group}{self.suffix}")

    def add(self, group: int, record: tuple) -> None:
        buffer = self.buffers.setdefault(group, io.BytesIO())
        pickle.dump(record, buffer, protocol=pickle.HIGHEST_PROTOCOL)
        if buffer.tell() >= self.FLUSH:
            self._flush(group)

    def _flush(self, group: int) -> None:
        with open(self.path(group), "ab") as f:
            f.write(self.buffers.pop(group).getbuffer())
        self.written.add(group)

    def close(self) -> list[int]:
        """Flush everything; the groups that got records."""
        for group in list(self.buffers):
            self._flush(group)
        return sorted(self.written)


def map_task(task: int, shuffle: Shuffle) -> tuple[int, list[int]]:
    """Send the kept samples of one group of crawl shards to their reduce groups' pieces;
    return (task, the reduce groups that got a piece)."""
    with tempfile.TemporaryDirectory(dir=_work(shuffle), prefix="map-") as tmp:
        spools = Spools(tmp, ".pieces")
        for index in shuffle.map_sources(task):
            shard = shuffle.sources[index]
            rows = kept_rows(shuffle.staging, shard)
            outputs, slots = shuffle.plan.destinations(index)
            groups = shuffle.reduce_group(outputs)
            where = {
                row["key"]: (int(o), int(s), int(g), row)
                for row, o, s, g in zip(rows, outputs, slots, groups, strict=True)
            }
            for key, files in shuffle.staging.samples(shard):
                if key in where:
                    output, slot, group, row = where.pop(key)
                    spools.add(group, (output, slot, key, sample_files(files, row)))
            if where:
                raise AssertionError(f"crawl shard {shard} lacks kept samples {sorted(where)[:3]}")
        groups = spools.close()
        shuffle.staging.store.put_files(
            (shuffle.piece(group, task), spools.path(group)) for group in groups
        )
    return task, groups


def reduce_task(task: int, shuffle: Shuffle, map_tasks: list[int]) -> list[dict[str, Any]]:
    """Write the output shards of one reduce group from its pieces; their index rows."""
    store = shuffle.staging.store
    with tempfile.TemporaryDirectory(dir=_work(shuffle), prefix="reduce-") as tmp:
        spools = Spools(tmp, ".spool")
        for map_id in map_tasks:
            local = Path(tmp, "piece")
            store.get_file(shuffle.piece(task, map_id), local)
            for record in read_records(local):
                spools.add(record[0], record)
            local.unlink()
        spools.close()
        rows = []
        for output in shuffle.reduce_outputs(task):
            records = sorted(read_records(spools.path(output)), key=lambda r: r[1])
            expected = shuffle.plan.output_samples(output)
            if [r[1] for r in records] != list(range(expected)):
                raise AssertionError(f"output shard {output}: {len(records)} of {expected} samples")
            name = shard_name(output, shuffle.plan.outputs)
            tar = Path(tmp, name)
            write_tar(records, tar)
            store.put_file(f"{shuffle.prefix}/{name}", tar)
            rows.append({"path": name, "samples": len(records)} | _size_and_hash(tar))
            tar.unlink()
            spools.path(output).unlink()
    return rows


def read_records(path: Path) -> Iterator[tuple]:
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


def write_tar(records: list[tuple], path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for record in records:
            key, files = record[-2], record[-1]
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(files[ext]), 0, 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(files[ext]))


def _size_and_hash(path: Path) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _work(shuffle: Shuffle) -> str:
    """The local spool folder: the publish's work folder where it can be made (the driver's
    machine), else the worker's temp folder. Spools stay within one task."""
    try:
        Path(shuffle.work).mkdir(parents=True, exist_ok=True)
    except OSError:
        return tempfile.gettempdir()
    return shuffle.work
