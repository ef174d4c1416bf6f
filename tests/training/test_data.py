"""training.data: real shards in a local folder and in S3 (moto_server), real DataLoader workers.

Samples are tiny JPEGs whose caption carries the sample id, and the test tokenizer turns the
caption back into that id, so every test can say exactly which samples a batch holds.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import tarfile
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dataprep.store import ObjectStore
from tests.dataprep.test_publish import flip_a_byte
from training.config import DataConfig
from training.data import TrainLoader, make_train_loader
from training.shards import DataError, ShardInfo, resolve_shards


def _jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def tokenize(texts: list[str]) -> torch.Tensor:
    """[B, 2]: the sample id, then the caption length (a stand-in context)."""
    return torch.tensor([[int(t.split()[-1]), len(t)] for t in texts], dtype=torch.long)


def write_shard(store: ObjectStore, key: str, ids: range, **faults: set[int]) -> None:
    """A WebDataset tar; ``faults`` name ids with bad_jpeg, no_txt, no_jpg or bad_txt."""
    buf = io.BytesIO()
    with wds.TarWriter(buf) as tar:
        for i in ids:
            sample: dict[str, Any] = {"__key__": f"{i:07d}", "json": {"id": i}}
            if i not in faults.get("no_jpg", ()):
                sample["jpg"] = b"\xff\xd8 not a jpeg" if i in faults.get("bad_jpeg", ()) else JPEG
            if i not in faults.get("no_txt", ()):
                bad = i in faults.get("bad_txt", ())
                sample["txt"] = b"\xff\xfe\xfa" if bad else f"caption {i}"
            tar.write(sample)
    store.put_bytes(key, buf.getvalue())


def write_dataset(
    store: ObjectStore,
    folder: str,
    shards: int = 5,
    per_shard: int = 37,
    stats: bool = True,
    **faults: set[int],
) -> list[str]:
    """Shard s holds ids s*1000 ..., as the crawl lays them out; returns the tar URIs."""
    for s in range(shards):
        write_shard(store, f"{folder}/{s:05d}.tar", range(s * 1000, s * 1000 + per_shard), **faults)
        if stats:
            kept = json.dumps({"shard": s, "kept": per_shard}).encode()
            store.put_bytes(f"{folder}/{s:05d}.stats.json", kept)
    return [store.uri(f"{folder}/{s:05d}.tar") for s in range(shards)]


def all_ids(shards: int = 5, per_shard: int = 37) -> set[int]:
    return {s * 1000 + i for s in range(shards) for i in range(per_shard)}


def loader(
    shards: list[ShardInfo],
    *,
    rank: int = 0,
    world: int = 1,
    batch: int = 4,
    store: ObjectStore | None = None,
    epoch: int = 0,
    **cfg: Any,
) -> TrainLoader:
    s3 = getattr(store, "settings", None)
    return make_train_loader(
        DataConfig(source=[s.uri for s in shards], **{"shuffle_buffer": 16} | cfg),
        shards,
        rank=rank,
        world_size=world,
        batch_size=batch,
        image_transform=to_tensor,
        tokenize=tokenize,
        epoch=epoch,
        s3=s3,
    )


def run(train: TrainLoader) -> tuple[list[list[int]], int]:
    """One epoch: the sample ids of each batch, and the sum of ``skipped``."""
    batches = list(train)
    return [b["text"][:, 0].tolist() for b in batches], sum(int(b["skipped"]) for b in batches)


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


# --------------------------------------------------------------------------- equal steps


def test_ranks_run_equal_steps_and_share_out_samples(store: ObjectStore) -> None:
    """5 shards x 37 samples, 2 ranks x 2 workers, batch 4: shards can't divide evenly."""
    s3 = getattr(store, "settings", None)
    shards = resolve_shards(DataConfig(source=write_dataset(store, "ds")), s3)
    seen = []
    for rank in (0, 1):
        train = loader(shards, rank=rank, world=2, store=store, workers=2)
        assert train.steps_per_epoch == len(train) == 185 // 8
        batches = list(train)
        assert len(batches) == 23
        first = batches[0]
        assert first["image"].shape == (4, 3, 8, 8) and first["image"].dtype == torch.float32
        assert first["text"].shape == (4, 2) and first["text"].dtype == torch.long
        assert first["skipped"].dtype == torch.long and first["skipped"].shape == ()
        ids = flat([b["text"][:, 0].tolist() for b in batches])

        # The guarantee, exactly: a worker repeats only what its quota needs beyond its share.
        plan = train.plan()
        assert sum(w.batches for w in plan) == 23
        repeats = sum(max(0, w.batches * 4 - w.expected_samples) for w in plan)
        assert len(ids) - len(set(ids)) == repeats
        unseen = sum(max(0, w.expected_samples - w.batches * 4) for w in plan)
        assert len(set(ids)) == sum(w.expected_samples for w in plan) - unseen
        seen.append(set(ids))

    assert not seen[0] & seen[1]  # no sample goes to two ranks
    shares = [
        sum(w.expected_samples for w in loader(shards, rank=r, world=2).plan()) for r in (0, 1)
    ]
    assert sorted(shares) == [92, 93]  # the odd shard is shared by sample, not given to one rank


def test_plans_assign_every_sample_to_exactly_one_worker() -> None:
    """The split, over many layouts: no storage needed, plan() is pure."""
    rng = np.random.default_rng(0)
    for n_shards, world, workers in itertools.product(range(1, 8), range(1, 5), range(4)):
        counts = rng.integers(0, 30, n_shards).tolist()
        if sum(counts) < 2 * world:
            continue
        shards = [ShardInfo(f"file:///d/{i:05d}.tar", n) for i, n in enumerate(counts)]
        nonempty = [s for s in shards if s.samples]
        owners: Counter[tuple[str, int]] = Counter()
        for rank in range(world):
            train = loader(shards, rank=rank, world=world, batch=2, workers=workers, epoch=3)
            plan = train.plan()
            assert len(plan) == max(1, workers)
            assert (
                sum(w.batches for w in plan) == train.steps_per_epoch == sum(counts) // (2 * world)
            )
            for w in plan:
                assert w.expected_samples == sum(
                    p.samples(nonempty[p.shard].samples) for p in w.pieces
                )
                for p in w.pieces:
                    uri, n = nonempty[p.shard].uri, nonempty[p.shard].samples
                    owners.update((uri, i) for i in range(p.offset, n, p.stride))
        assert sorted(owners) == sorted((s.uri, i) for s in shards for i in range(s.samples or 0))
        assert set(owners.values()) == {1}


@pytest.mark.parametrize(
    ("shards", "per_shard", "batch"),
    [(4, 36, 4), (1, 40, 2)],  # one shard for 2 ranks x 2 workers: split by sample index
    ids=["shards-divide", "one-shard"],
)
def test_even_data_is_seen_exactly_once(
    local_store: ObjectStore, shards: int, per_shard: int, batch: int
) -> None:
    infos = resolve_shards(DataConfig(source=write_dataset(local_store, "ds", shards, per_shard)))
    ids: list[int] = []
    for rank in (0, 1):
        batches, skipped = run(loader(infos, rank=rank, world=2, batch=batch, workers=2))
        assert len(batches) == shards * per_shard // (2 * batch) and skipped == 0
        ids += flat(batches)
    assert sorted(ids) == sorted(all_ids(shards, per_shard))


def test_resampled_runs_equal_steps_on_few_shards(local_store: ObjectStore) -> None:
    shards = resolve_shards(DataConfig(source=write_dataset(local_store, "ds", shards=1)))
    for rank in (0, 1):
        batches, _ = run(loader(shards, rank=rank, world=2, workers=2, resampled=True))
        assert len(batches) == 37 // 8
        assert set(flat(batches)) <= all_ids(1)


# --------------------------------------------------------------------------- damaged data


def test_corrupt_samples_are_skipped_and_counted(store: ObjectStore) -> None:
    faults = {
        "bad_jpeg": {3, 1001, 1010},
        "no_txt": {5, 1015},
        "no_jpg": {7, 1002},
        "bad_txt": {12},
    }
    uris = write_dataset(store, "ds", shards=2, per_shard=20, **faults)
    shards = resolve_shards(DataConfig(source=uris), getattr(store, "settings", None))
    # 4 bad samples per shard, none last: with no shuffle, one pass meets them all and gives
    # each worker exactly its quota of 16.
    train = loader(shards, store=store, workers=2, shuffle_buffer=0, samples_per_epoch=32)
    batches, skipped = run(train)
    assert len(batches) == 8 and all(len(b) == 4 for b in batches)
    assert skipped == 8
    assert sorted(flat(batches)) == sorted(all_ids(2, 20) - set().union(*faults.values()))


def _damage(store: ObjectStore, key: str, how: str) -> None:
    data = bytearray(store.get_bytes(key))
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # a garbage header block halfway: tarfile stops there without an error
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            offsets = [m.offset for m in tar]
        at = offsets[len(offsets) // 2]
        data[at : at + 512] = b"\x01" * 512
    store.put_bytes(key, bytes(data))


@pytest.mark.parametrize("counts", ["known", "unknown"])
def test_damaged_tars_end_their_shard_not_the_run(
    local_store: ObjectStore, counts: str, caplog: pytest.LogCaptureFixture
) -> None:
    uris = write_dataset(local_store, "ds", shards=3, per_shard=20)
    _damage(local_store, "ds/00000.tar", "truncated")
    _damage(local_store, "ds/00001.tar", "bad header")
    if counts == "known":
        shards = resolve_shards(DataConfig(source=uris))
        cfg: dict[str, Any] = {}
    else:
        shards = [ShardInfo(u, None) for u in uris]
        cfg = {"samples_per_epoch": 60}
    # Workers in this process, so that caplog sees the warnings.
    batches, skipped = run(loader(shards, workers=0, **cfg))
    assert len(batches) == 15 and all(len(b) == 4 for b in batches)  # topped up by repeats
    assert set(flat(batches)) < all_ids(3, 20)
    assert skipped >= (20 if counts == "known" else 2)  # samples lost, or one per damaged tar
    for uri in uris[:2]:
        assert f"shard {uri} ended after" in caplog.text
    assert uris[2] not in caplog.text


def write_manifest(store: ObjectStore, folder: str) -> str:
    """A manifest of the folder's tars with their sizes and sha256, as publish writes it."""
    entries = []
    for key in store.list(f"{folder}/"):
        if key.endswith(".tar"):
            data = store.get_bytes(key)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                samples = len({m.name.split(".")[0] for m in tar})
            entries.append(
                {
                    "path": key.rsplit("/")[-1],
                    "samples": samples,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
    store.put_bytes(f"{folder}/manifest.json", json.dumps({"shards": entries}).encode())
    return store.uri(f"{folder}/manifest.json")


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_from_a_manifest_are_checked_as_they_stream(
    store: ObjectStore, workers: int
) -> None:
    """One shard shared by 2 ranks (x 2 workers): each reader reads it whole and checks it,
    fresh or resuming (resume drops samples after reading them)."""
    write_dataset(store, "ds", shards=1, per_shard=40)
    shards = resolve_shards(
        DataConfig(source=write_manifest(store, "ds")), getattr(store, "settings", None)
    )
    assert shards[0].sha256 is not None and shards[0].bytes == store.size("ds/00000.tar")
    ids = []
    for rank in (0, 1):
        batches, _ = run(loader(shards, rank=rank, world=2, batch=2, store=store, workers=workers))
        ids += flat(batches)
    assert sorted(ids) == sorted(all_ids(1, 40))  # intact: the whole epoch, no error

    flip_a_byte(store, "ds/00000.tar")
    mismatch = f"shard {re.escape(shards[0].uri)} does not match its manifest: read"
    for rank, skip in ((0, 0), (1, 0), (1, 3)):
        train = loader(shards, rank=rank, world=2, batch=2, store=store, workers=workers)
        train.set_epoch(0, skip_batches=skip)
        with pytest.raises(DataError, match=mismatch):
            run(train)


def test_a_share_without_usable_samples_is_an_error(local_store: ObjectStore) -> None:
    ids = set(range(20))
    uris = write_dataset(local_store, "ds", shards=1, per_shard=20, bad_jpeg=ids)
    with pytest.raises(DataError, match="a full pass over its shards yielded no usable sample"):
        run(loader(resolve_shards(DataConfig(source=uris)), workers=0))


# --------------------------------------------------------------------------- epochs, resume


def test_epoch_sets_the_order_deterministically(local_store: ObjectStore) -> None:
    shards = resolve_shards(DataConfig(source=write_dataset(local_store, "ds")))
    epoch0, _ = run(loader(shards, world=2, workers=2))
    assert run(loader(shards, world=2, workers=2))[0] == epoch0  # same seed, same stream
    train = loader(shards, world=2, workers=2, epoch=1)
    epoch1, _ = run(train)
    assert epoch1 != epoch0 and len(epoch1) == len(epoch0)
    train.set_epoch(0)
    assert run(train)[0] == epoch0
    assert run(loader(shards, world=2, workers=2, seed=1))[0] != epoch0


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers", [3, 0])
def test_skip_batches_resumes_where_the_epoch_stopped(
    local_store: ObjectStore, workers: int
) -> None:
    shards = resolve_shards(
        DataConfig(source=write_dataset(local_store, "ds", no_txt={1001, 2002}))
    )
    train = loader(shards, workers=workers, epoch=2)
    if workers:  # 5 shards, 3 workers: unequal quotas, so workers run out at different times
        assert len({w.batches for w in train.plan()}) > 1
    full, _ = run(train)
    assert len(full) == train.steps_per_epoch == 185 // 4  # counts from stats
    for k in (1, 17, 40, len(full)):
        train.set_epoch(2, skip_batches=k)
        assert len(train) == len(full) - k
        assert run(train)[0] == full[k:], k
    with pytest.raises(ValueError, match="skip_batches"):
        train.set_epoch(2, skip_batches=len(full) + 1)
