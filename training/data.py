"""Training data: WebDataset shards streamed from the object store, equal steps on every rank.

The pipeline follows open_clip's ``get_wds_dataset`` and runs in each DataLoader worker:

    epoch shard order            seeded by (seed, epoch): identical on every rank
    split by node                rank's share of the shards
    split by worker              worker's share of the rank's shards
    per pass over that share:
        read tars                through ``open_store``: file:// and s3:// share one code path
        drop incomplete          no image or no text: counted, dropped before anything costly
        shuffle                  buffer of ``shuffle_buffer`` samples, drained at the end of a pass
        fast-forward             resume: drop already-trained samples without decoding them
        decode                   undecodable image or text: counted, dropped (with
                                 ``codes`` set: the sample's dVAE codes from its shard's
                                 sidecar instead of the image; uncoded samples counted)
    batch                        transform per sample, tokenize per batch
    cut                          exactly this worker's quota of batches

Equal steps. ZeRO/DDP collectives hang if one rank runs fewer steps than another, and shards
rarely split evenly. As open_clip does with ``with_epoch``, we don't stop when the data runs out:
``steps_per_epoch = floor(samples / (batch_size * world_size))`` is fixed up front, the rank's
steps are apportioned among its workers by their expected sample counts, and each worker reads
its share pass after pass (``repeat()``-style) and stops at exactly its quota. A short share is
topped up by a second pass over the same samples; a long one leaves its tail for another epoch
(the per-epoch shard order makes that a different tail each time).

Splitting. Whole shards are dealt round-robin (``split_by_node`` / ``split_by_worker``
semantics, with rank and world size given explicitly). When the shards don't divide evenly,
each leftover shard is shared by sample index (``i % stride == offset``) among a group of
consumers, so every sample belongs to exactly one (rank, worker) per epoch, shares stay
balanced, and 1 shard for 2 ranks x 2 workers works too. The price: a shared shard is read
(bytes, not decoded images) once by each consumer sharing it, at most one such shard per
consumer. ``resampled=True`` instead draws shards with replacement per worker (open_clip's
``--dataset-resampled``): no partition, no read amplification.

Guarantees, per epoch, when no sample is corrupt (a corrupt one is treated as absent):
- every rank yields exactly ``steps_per_epoch`` batches of exactly ``batch_size`` samples;
- (not resampled) each sample is assigned to exactly one worker of one rank; a worker yields its
  samples once each, in shuffled order, before repeating any of them; so a worker with quota
  ``q`` batches and ``m`` assigned samples repeats ``max(0, q*B - m)`` samples and leaves
  ``max(0, m - q*B)`` unseen, and no sample is yielded by two workers or two ranks.
``TrainLoader.plan()`` reports each worker's share, expected samples and quota.

Data position on resume. A tar stream can't seek, so the exact position can't be jumped to.
``skip_batches=k`` replays the epoch's deterministic stream and drops the samples of the first
``k`` batches after shuffling but before decoding: shards are read again, images are not decoded.
The resumed batches are exactly those the interrupted run would have produced next, unless the
skipped span held undecodable images: each one makes the stream resume one sample early (a few
samples trained twice; the number of batches is still exact). Random augmentations are not
replayed. The cost of the replay is I/O: the bytes of ``k * batch_size`` samples per rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import random
import re
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any, BinaryIO

import braceexpand
import numpy as np
import pydantic
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from dataprep.store import ObjectNotFound, ObjectStore, S3Settings, StoreError, open_store

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
ImageTransform = Callable[[Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], torch.Tensor]

_STATS_SUFFIX = ".stats.json"
_META_FILE = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, not samples
_IO_THREADS = 16  # concurrent stats reads / tar scans while resolving shards
_LOGGED_SKIPS = 20  # per worker and epoch, then only every 1000th
_SIDECARS_KEPT = 8  # code sidecars cached per worker (LRU)


class DataError(RuntimeError):
    """The training data can't be used as configured; the message names the URI involved."""


class DataConfig(pydantic.BaseModel):
    """Where the training shards are and how to stream them."""

    model_config = pydantic.ConfigDict(extra="forbid")

    # Shard URIs (file:// or s3://), a brace pattern (s3://b/p/{00000..00007}.tar), a crawl
    # folder (URI ending in '/': shards with a .stats.json) or a manifest (URI ending in .json).
    source: str | list[str]
    shuffle_buffer: int = pydantic.Field(1000, ge=0)  # samples; 0 or 1: no sample shuffle
    workers: int = pydantic.Field(2, ge=0)  # DataLoader workers per rank; 0: in the main process
    resampled: bool = False  # draw shards with replacement per worker (many nodes, few shards)
    seed: int = 0
    image_key: str = "jpg;png;jpeg;webp"  # first extension present wins
    text_key: str = "txt"
    samples_per_epoch: int | None = pydantic.Field(None, ge=1)  # overrides the shard counts
    # A folder of dVAE code sidecars (training/encode_codes.py: `<shard>.codes.npy` per shard):
    # batches then carry each sample's codes (`codes`, [B, h, w] long) instead of an image.
    codes: str | None = None

    @pydantic.field_validator("source")
    @classmethod
    def _not_empty(cls, source: str | list[str]) -> str | list[str]:
        if not source:
            raise ValueError("source is empty: give shard URIs, a pattern, a folder or manifest")
        return source


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    uri: str
    samples: int | None  # None: unknown (then DataConfig.samples_per_epoch must be set)


@dataclasses.dataclass(frozen=True)
class Piece:
    """The samples ``i`` of shard ``shard`` (an index into the shard list) with
    ``i % stride == offset``: a whole shard, or one consumer's part of a shared shard."""

    shard: int
    stride: int = 1
    offset: int = 0

    def samples(self, shard_samples: int) -> int:
        return len(range(self.offset, shard_samples, self.stride))


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """One DataLoader worker's share of one epoch."""

    pieces: tuple[Piece, ...]  # empty when resampled (drawn while streaming)
    expected_samples: int | None  # None: counts unknown, or resampled
    batches: int  # this worker's quota; the rank's quotas sum to steps_per_epoch


# --------------------------------------------------------------------------- resolving shards


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
    """What a training run reads exists, checked before any worker starts: the shards, and with
    ``codes`` a code sidecar for each. Sidecars and manifests are read, tars are not scanned."""
    shards = resolve_shards(cfg, s3, scan=False)
    if cfg.codes is not None:
        from training.encode_codes import SUFFIX

        present = set(_open_folder(cfg.codes, s3).list())
        missing = [s.uri for s in shards if _sidecar_name(s.uri, SUFFIX) not in present]
        if missing:
            raise DataError(
                f"no dVAE codes for {len(missing)} of {len(shards)} shards in {cfg.codes} "
                f"(first: {missing[0]}); encode the shards first (mmpipe encode-codes)"
            )
    return shards


def _sidecar_name(shard_uri: str, suffix: str) -> str:
    """``.../00003.tar`` -> ``00003<suffix>``: a shard's sidecar in another folder."""
    return shard_uri.rpartition("/")[2].removesuffix(".tar") + suffix


def _split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/p/00000.tar`` -> (``s3://b/p``, ``00000.tar``): the folder's store and a key."""
    if "://" not in uri:
        raise DataError(f"shard URI {uri!r} has no scheme; use file:///abs/path or s3://bucket/key")
    parent, _, name = uri.rpartition("/")
    if not name or parent.endswith(":/"):
        raise DataError(f"shard URI {uri!r} names no object")
    return (parent + "/" if parent.endswith("://") else parent), name


def _open_folder(uri: str, s3: S3Settings | None) -> ObjectStore:
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
    store = _open_folder(uri, s3)
    keys = {key for key in store.list() if "/" not in key}
    stats = sorted(key for key in keys if key.endswith(_STATS_SUFFIX))
    if not stats:
        raise DataError(
            f"no shards found in {uri}: no *{_STATS_SUFFIX} (a crawl shard is committed "
            "when its stats file is written; has the crawl run?)"
        )
    tars = [key.removesuffix(_STATS_SUFFIX) + ".tar" for key in stats]
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
    shards: list[_ManifestShard]


def _manifest(uri: str, s3: S3Settings | None) -> list[ShardInfo]:
    """``{"shards": [{"path": <relative to the manifest's folder>, "samples": N, ...}]}``."""
    folder, key = _split_uri(uri)
    store = _open_folder(folder, s3)
    try:
        manifest = _Manifest.model_validate(_read_json(store, key, "manifest"))
    except pydantic.ValidationError as e:
        raise DataError(f"cannot read manifest {uri}: not a shard manifest: {e}") from None
    for shard in manifest.shards:
        parts = shard.path.split("/")
        if shard.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise DataError(f"manifest {uri}: shard path {shard.path!r} must stay in its folder")
    located = _locate([f"{folder.rstrip('/')}/{s.path}" for s in manifest.shards], s3)
    return [ShardInfo(at.uri, s.samples) for at, s in zip(located, manifest.shards, strict=True)]


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
        parent, name = _split_uri(uri)
        if parent not in folders:
            store = _open_folder(parent, s3)
            folders[parent] = (store, frozenset(k for k in store.list() if "/" not in k))
        store, keys = folders[parent]
        if name not in keys:
            raise DataError(f"shard not found: {uri}")
        located.append(_Located(store, name, keys))
    return located


def _listed(uris: list[str], s3: S3Settings | None, scan: bool) -> list[ShardInfo]:
    def count(at: _Located) -> int | None:
        sidecar = at.key.removesuffix(".tar") + _STATS_SUFFIX
        if sidecar in at.folder_keys:
            return _kept(at.store, sidecar)
        return count_samples(at.store, at.key) if scan else None

    located = _locate(uris, s3)
    return [ShardInfo(at.uri, n) for at, n in zip(located, _parallel(count, located), strict=True)]


def count_samples(store: ObjectStore, key: str) -> int:
    """Samples in a tar (runs of member names sharing a key). See ``resolve_shards`` for cost."""
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


# --------------------------------------------------------------------------- splitting


def _split(pieces: list[Piece], parts: int) -> list[list[Piece]]:
    """Partition ``pieces`` into ``parts`` shares that cover every sample exactly once.

    Whole pieces are dealt round-robin; each of the (fewer than ``parts``) leftovers is split
    by sample index among its own group of about ``parts / leftovers`` shares, so shares stay
    balanced and none reads more than one shared shard.
    """
    dealt = len(pieces) // parts * parts
    shares = [pieces[p:dealt:parts] for p in range(parts)]
    leftover = pieces[dealt:]
    for j, piece in enumerate(leftover):
        group = range(j * parts // len(leftover), (j + 1) * parts // len(leftover))
        for i, share in enumerate(group):
            stride = piece.stride * len(group)
            shares[share].append(Piece(piece.shard, stride, piece.offset + i * piece.stride))
    return shares


def _apportion(total: int, weights: list[Fraction]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder)."""
    if sum(weights) == 0:
        weights = [Fraction(1)] * len(weights)
    shares = [total * w / sum(weights) for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _resume_point(quotas: list[int], k: int) -> tuple[list[int], int]:
    """How many of the rank's first ``k`` batches each worker made, and which worker is next.

    The DataLoader (in order) takes one batch from each worker in turn, leaving out workers
    that have reached their quota.
    """
    taken, worker = [0] * len(quotas), 0
    while k > 0:
        if taken[worker] < quotas[worker]:
            taken[worker] += 1
            k -= 1
        worker = (worker + 1) % len(quotas)
    return taken, worker


def _seed(*parts: object) -> int:
    """A seed from its parts, identical in every process (unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------- worker stages


@dataclasses.dataclass
class _WorkerState:
    """What the stages of one worker's pipeline share."""

    where: str  # "rank 0 worker 1", for messages
    s3: S3Settings | None
    fast_forward: int  # samples still to drop (resume)
    skipped: int = 0  # corrupt samples since the last batch
    skip_events: int = 0
    stores: dict[str, ObjectStore] = dataclasses.field(default_factory=dict)
    sidecars: OrderedDict[str, dict[str, np.ndarray]] = dataclasses.field(
        default_factory=OrderedDict
    )

    def store(self, folder: str) -> ObjectStore:
        # Opened in the worker: an S3 client must not cross a fork.
        if folder not in self.stores:
            self.stores[folder] = open_store(folder, self.s3)
        return self.stores[folder]

    def skip(self, count: int, why: str) -> None:
        self.skipped += count
        self.skip_events += 1
        if self.skip_events <= _LOGGED_SKIPS or self.skip_events % 1000 == 0:
            log.warning(
                "%s: skipped %d sample(s) (event %d): %s", self.where, count, self.skip_events, why
            )

    def take_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped

    def codes_of(self, folder: str, shard_uri: str) -> dict[str, np.ndarray]:
        """The code sidecar of a shard, ``{key: [h, w] codes}``, read once per worker."""
        if shard_uri in self.sidecars:
            self.sidecars.move_to_end(shard_uri)
        else:
            from training.encode_codes import SUFFIX, read_codes

            sidecar = f"{folder.rstrip('/')}/{_sidecar_name(shard_uri, SUFFIX)}"
            try:
                self.sidecars[shard_uri] = read_codes(sidecar, self.s3)
            except StoreError as e:
                raise DataError(
                    f"no dVAE codes for {shard_uri}: {sidecar} cannot be read ({e}); encode the "
                    "shards first (mmpipe encode-codes)"
                ) from None
            if len(self.sidecars) > _SIDECARS_KEPT:  # the shuffle buffer mixes a few shards
                self.sidecars.popitem(last=False)
        return self.sidecars[shard_uri]


def _read_piece(
    uri: str, piece: Piece, shard_samples: int | None, state: _WorkerState
) -> Iterator[dict[str, Any]]:
    """The piece's raw samples. A damaged tar ends the piece; its lost samples are counted."""
    folder, key = _split_uri(uri)
    errors: list[Exception] = []

    def on_error(exn: Exception) -> bool:  # webdataset handler: note, carry on
        errors.append(exn)
        return True

    seen = 0
    try:
        stream = state.store(folder).open(key)
    except StoreError as e:
        errors.append(e)
    else:
        with contextlib.closing(stream):
            files = tar_file_expander([{"url": uri, "stream": stream}], handler=on_error)
            for i, sample in enumerate(group_by_keys(files, handler=on_error)):
                if i % piece.stride == piece.offset:
                    seen += 1
                    yield sample
            # tarfile ends silently at a bad header mid-file: data after the end is the tell.
            if not errors and _has_trailing_data(stream):
                errors.append(tarfile.ReadError("invalid tar header before the end of the file"))
    expected = piece.samples(shard_samples) if shard_samples is not None else None
    lost = expected - seen if expected is not None else int(bool(errors))
    if errors or lost > 0:
        what = f"{errors[0]!r}" if errors else "no error, but the tar is short"
        state.skip(max(lost, 0), f"shard {uri} ended after {seen} of {expected} samples: {what}")


def _has_trailing_data(stream: BinaryIO) -> bool:
    """True if anything but zero padding follows where tarfile stopped reading."""
    try:
        while chunk := stream.read(1 << 16):
            if chunk.count(0) != len(chunk):
                return True
    except Exception:  # a failing read of the tail is damage too (e.g. a botocore error)
        return True
    return False


def _fast_forward(
    samples: Iterator[dict[str, Any]], state: _WorkerState
) -> Iterator[dict[str, Any]]:
    """Resume: drop the samples of batches trained before the interruption, undecoded."""
    for sample in samples:
        if state.fast_forward > 0:
            state.fast_forward -= 1
            if state.fast_forward == 0:
                state.skipped = 0  # those skips were reported by the interrupted run
            sample["__fast_forwarded__"] = True  # decode passes it on undecoded, as None
        yield sample


# --------------------------------------------------------------------------- the dataset


@dataclasses.dataclass
class _RankStream(IterableDataset):
    """One rank's batches for one epoch; each DataLoader worker iterates its own share."""

    cfg: DataConfig
    shards: tuple[ShardInfo, ...]
    rank: int
    world_size: int
    batch_size: int
    image_transform: ImageTransform
    tokenize: Tokenize
    steps_per_epoch: int
    s3: S3Settings | None
    epoch: int = 0
    skip_batches: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def _counts_known(self) -> bool:
        return all(s.samples is not None for s in self.shards)

    def plan(self) -> list[WorkerPlan]:
        workers = max(1, self.cfg.workers)
        if self.cfg.resampled:
            quotas = _apportion(self.steps_per_epoch, [Fraction(1)] * workers)
            return [WorkerPlan((), None, q) for q in quotas]
        order = [Piece(i) for i in range(len(self.shards))]
        random.Random(_seed(self.cfg.seed, self.epoch)).shuffle(order)  # same on every rank
        shares = _split(_split(order, self.world_size)[self.rank], workers)
        if self._counts_known:
            sizes = [sum(p.samples(self.shards[p.shard].samples) for p in s) for s in shares]
            quotas = _apportion(self.steps_per_epoch, [Fraction(n) for n in sizes])
            return [
                WorkerPlan(tuple(s), n, q) for s, n, q in zip(shares, sizes, quotas, strict=True)
            ]
        # Unknown counts: assume equal shards, so a piece weighs 1 / stride.
        weights = [sum((Fraction(1, p.stride) for p in s), Fraction(0)) for s in shares]
        quotas = _apportion(self.steps_per_epoch, weights)
        return [WorkerPlan(tuple(s), None, q) for s, q in zip(shares, quotas, strict=True)]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        plans = self.plan()
        done, next_worker = _resume_point([p.batches for p in plans], self.skip_batches)
        # The DataLoader asks worker 0 first; on resume the interrupted run's next worker must
        # answer first, so workers take their shares rotated (the identity when not resuming).
        worker = ((info.id if info is not None else 0) + next_worker) % len(plans)
        state = _WorkerState(
            where=f"rank {self.rank} worker {worker}",
            s3=self.s3,
            fast_forward=done[worker] * self.batch_size,
        )
        samples = self._samples(plans[worker], worker, state)
        quota = plans[worker].batches - done[worker]
        yield from itertools.islice(self._batches(samples, state), quota)

    def _samples(
        self, plan: WorkerPlan, worker: int, state: _WorkerState
    ) -> Iterator[tuple[torch.Tensor, str]]:
        """Pass after pass over the worker's share; the consumer stops at the quota."""
        for n in itertools.count():
            rng = random.Random(_seed(self.cfg.seed, self.epoch, self.rank, worker, n))
            stages: list[Callable[[Iterator[Any]], Iterator[Any]]] = [
                functools.partial(self._read, state=state),  # tar -> raw samples
                functools.partial(self._complete, state=state),  # image and text present
                self._shuffler(rng),  # within the pass: no repeat before every sample is seen
                functools.partial(_fast_forward, state=state),  # resume, before decoding
                functools.partial(self._decode, state=state),  # PIL, transform; bad -> counted
            ]
            usable = 0
            for sample in functools.reduce(lambda s, f: f(s), stages, self._pieces(plan, rng)):
                usable += 1
                if sample is not None:
                    yield sample
            if usable == 0:
                # Repeating would spin forever and the rank would never reach its quota.
                raise DataError(
                    f"{state.where}: a full pass over its shards yielded no usable sample "
                    f"(all missing, damaged or undecodable): {self._describe(plan)}"
                )

    def _pieces(self, plan: WorkerPlan, rng: random.Random) -> Iterator[Piece]:
        if not self.cfg.resampled:
            return iter(rng.sample(plan.pieces, len(plan.pieces)))
        draws = max(1, len(self.shards) // (self.world_size * max(1, self.cfg.workers)))
        return iter([Piece(rng.randrange(len(self.shards))) for _ in range(draws)])

    def _read(self, pieces: Iterator[Piece], state: _WorkerState) -> Iterator[dict[str, Any]]:
        for piece in pieces:
            shard = self.shards[piece.shard]
            yield from _read_piece(shard.uri, piece, shard.samples, state)

    def _complete(
        self, samples: Iterator[dict[str, Any]], state: _WorkerState
    ) -> Iterator[dict[str, Any]]:
        """Keep samples with an image and a text; cheap, so before the shuffle and resume."""
        image_keys = self.cfg.image_key.split(";")
        for sample in samples:
            image = next((sample[k] for k in image_keys if k in sample), None)
            text = sample.get(self.cfg.text_key)
            if image is None or text is None:
                missing = "image" if image is None else "text"
                state.skip(1, f"sample {sample['__key__']} in {sample['__url__']} has no {missing}")
                continue
            yield {
                "__key__": sample["__key__"],
                "__url__": sample["__url__"],
                "image": image,
                "text": text,
            }

    def _shuffler(self, rng: random.Random) -> Callable[[Iterator[Any]], Iterator[Any]]:
        size = self.cfg.shuffle_buffer
        return wds.shuffle(size, initial=size, rng=rng) if size > 1 else (lambda s: s)

    def _decode(
        self, samples: Iterator[dict[str, Any]], state: _WorkerState
    ) -> Iterator[tuple[torch.Tensor, str] | None]:
        """Decoded samples; ``None`` for a fast-forwarded one (it still counts for the guard)."""
        for sample in samples:
            if sample.get("__fast_forwarded__"):
                yield None
                continue
            if self.cfg.codes is not None:
                codes = state.codes_of(self.cfg.codes, sample["__url__"]).get(sample["__key__"])
                if codes is None:  # not coded: its image did not decode when encoded
                    state.skip(1, f"sample {sample['__key__']} in {sample['__url__']}: no codes")
                    continue
                yield torch.from_numpy(codes.astype(np.int64)), sample["text"].decode("utf-8")
                continue
            try:
                # convert() forces the full decode here, so a truncated image fails here.
                image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
                text = sample["text"].decode("utf-8")
            except Exception as e:  # PIL raises many types for corrupt bytes
                state.skip(1, f"sample {sample['__key__']} in {sample['__url__']}: {e!r}")
                continue
            yield self.image_transform(image), text

    def _batches(
        self, samples: Iterator[tuple[torch.Tensor, str]], state: _WorkerState
    ) -> Iterator[Batch]:
        while True:  # samples never end: passes repeat until the quota is cut
            images, texts = zip(*itertools.islice(samples, self.batch_size), strict=True)
            yield {
                "codes" if self.cfg.codes is not None else "image": torch.stack(images),
                "text": self.tokenize(list(texts)),
                "skipped": torch.tensor(state.take_skipped(), dtype=torch.long),
            }

    def _describe(self, plan: WorkerPlan) -> str:
        if self.cfg.resampled:
            return f"{len(self.shards)} shards, drawn with replacement"
        return ", ".join(
            self.shards[p.shard].uri + (f" [i % {p.stride} == {p.offset}]" if p.stride > 1 else "")
            for p in plan.pieces
        )


class TrainLoader:
    """Batches for one rank: ``steps_per_epoch`` per epoch, the same number on every rank.

    Each ``iter()`` runs one epoch (the one last given to ``set_epoch``) with fresh DataLoader
    workers, which receive the current epoch; persistent workers would keep a stale one.
    """

    def __init__(self, stream: _RankStream, pin_memory: bool) -> None:
        self._stream = stream
        self._pin_memory = pin_memory

    @property
    def steps_per_epoch(self) -> int:
        return self._stream.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self._stream.epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch to run (shard order and shuffles derive from it).

        ``skip_batches``: resume after that many batches of this epoch (see module doc). It
        applies to every iteration until the next ``set_epoch``: pass it only on resume.
        """
        if not 0 <= skip_batches <= self.steps_per_epoch:
            raise ValueError(f"skip_batches={skip_batches} not in [0, {self.steps_per_epoch}]")
        self._stream = dataclasses.replace(self._stream, epoch=epoch, skip_batches=skip_batches)

    def plan(self) -> list[WorkerPlan]:
        """Each worker's share of the current epoch, for logs and checks."""
        return self._stream.plan()

    def __len__(self) -> int:
        """Batches the next iteration yields (``steps_per_epoch`` unless resuming)."""
        return self.steps_per_epoch - self._stream.skip_batches

    def __iter__(self) -> Iterator[Batch]:
        stream, workers = self._stream, self._stream.cfg.workers
        loader = DataLoader(
            stream,
            batch_size=None,  # workers batch: a batch is one transfer, not batch_size
            num_workers=workers,
            pin_memory=self._pin_memory,
            prefetch_factor=2 if workers else None,
            # Seeds the workers' torch/random state (augmentations) per (seed, epoch, rank).
            generator=torch.Generator().manual_seed(
                _seed(stream.cfg.seed, stream.epoch, stream.rank, "loader")
            ),
        )
        count = 0
        for batch in loader:
            count += 1
            yield batch
        expected = stream.steps_per_epoch - stream.skip_batches
        if count != expected:
            # A silent short epoch would leave the other ranks waiting in a collective.
            raise DataError(
                f"rank {stream.rank}: epoch {stream.epoch} yielded {count} batches, "
                f"expected {expected}"
            )


def make_train_loader(
    cfg: DataConfig,
    shards: list[ShardInfo],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    image_transform: ImageTransform,
    tokenize: Tokenize,
    epoch: int = 0,
    skip_batches: int = 0,
    s3: S3Settings | None = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """A loader yielding ``{"image": [B,3,H,W] float, "text": [B,ctx] long, "skipped": long}``.

    ``skipped`` is the number of corrupt samples (plus samples lost in damaged tars) the
    worker that made the batch dropped since its previous batch; summed over an epoch's
    batches it is the rank's total.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in a world of size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shards = [s for s in shards if s.samples != 0]  # nothing to read
    if not shards:
        raise DataError(f"no non-empty shards in {cfg.source}")
    if cfg.samples_per_epoch is not None:
        total = cfg.samples_per_epoch
    elif all(s.samples is not None for s in shards):
        total = sum(s.samples or 0 for s in shards)
    else:
        unknown = next(s.uri for s in shards if s.samples is None)
        raise DataError(f"sample count of {unknown} is unknown: set samples_per_epoch")
    steps = total // (batch_size * world_size)
    if steps == 0:
        raise DataError(
            f"{total} samples in {cfg.source} make no full step of {batch_size} x {world_size} "
            "ranks"
        )
    stream = _RankStream(
        cfg, tuple(shards), rank, world_size, batch_size, image_transform, tokenize, steps, s3
    )
    loader = TrainLoader(stream, pin_memory)
    loader.set_epoch(epoch, skip_batches)
    return loader
