"""The training stream: one rank's WebDataset batches, equal steps on every rank.

Each DataLoader worker reads its share of the epoch's shards (split by node, then by worker),
drops incomplete samples, shuffles, fast-forwards on resume, decodes through the spec's hook
and batches, stopping at exactly its quota. Shards from a manifest are hashed as they stream and
a mismatch fails the run. docs/data-loading.md explains the guarantees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any, BinaryIO

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from dataprep.store import ObjectStore, S3Settings, StoreError, open_store
from training.config import DataConfig
from training.shards import DataError, ShardInfo, split_shard_uri

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
RawSample = dict[str, Any]  # __key__, __url__, image and text (bytes), as read from the tar
Decode = Callable[[RawSample], dict[str, torch.Tensor]]  # a sample's tensors, batched by name
ImageTransform = Callable[[Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], torch.Tensor]

_LOGGED_SKIPS = 20  # per worker and epoch, then only every 1000th


class SkipSample(Exception):
    """Raised by a decode hook: the sample is unusable (counted and dropped, not fatal)."""


@dataclasses.dataclass(frozen=True)
class DecodeImage:
    """The default decode hook: ``{"image": transform(RGB image)}``."""

    transform: ImageTransform

    def __call__(self, sample: RawSample) -> dict[str, torch.Tensor]:
        try:
            # convert() forces the full decode here, so a truncated image fails here.
            image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
        except Exception as e:  # PIL raises many types for corrupt bytes
            raise SkipSample(repr(e)) from None
        return {"image": self.transform(image)}


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


class _CheckedStream:
    """A shard's byte stream, hashed as tarfile reads it, to check it against its manifest."""

    def __init__(self, raw: BinaryIO, shard: ShardInfo) -> None:
        self.raw, self.shard = raw, shard
        self.digest, self.size, self.at_end = hashlib.sha256(), 0, False

    def read(self, size: int | None = None) -> bytes:
        data = self.raw.read(size)
        if self.shard.sha256 is not None:  # no hash to compare: no hashing
            self.digest.update(data)
        self.size += len(data)
        self.at_end = self.at_end or (not data and size != 0)
        return data

    def close(self) -> None:
        self.raw.close()

    def verify(self) -> None:
        """DataError naming the shard if it was read to its end and differs from the manifest."""
        expected = (self.shard.bytes, self.shard.sha256)
        if self.shard.sha256 is None or not self.at_end:
            return  # no manifest entry, or a read cut short: nothing to compare
        if (self.size, self.digest.hexdigest()) != expected:
            raise DataError(
                f"shard {self.shard.uri} does not match its manifest: read {self.size} bytes "
                f"with sha256 {self.digest.hexdigest()}, the manifest says {expected[0]} bytes "
                f"with sha256 {expected[1]}; the published data was altered or damaged"
            )


def _read_piece(shard: ShardInfo, piece: Piece, state: _WorkerState) -> Iterator[dict[str, Any]]:
    """The piece's raw samples. A damaged tar ends the piece; its lost samples are counted.
    Every piece reads its whole shard, so a shard from a manifest is verified at its end."""
    uri, shard_samples = shard.uri, shard.samples
    folder, key = split_shard_uri(uri)
    errors: list[Exception] = []

    def on_error(exn: Exception) -> bool:  # webdataset handler: note, carry on
        errors.append(exn)
        return True

    seen = 0
    try:
        stream = _CheckedStream(state.store(folder).open(key), shard)
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
            trailing = _has_trailing_data(stream)  # read even after errors: to end the hash
            if trailing and not errors:
                errors.append(tarfile.ReadError("invalid tar header before the end of the file"))
            stream.verify()
    expected = piece.samples(shard_samples) if shard_samples is not None else None
    lost = expected - seen if expected is not None else int(bool(errors))
    if errors or lost > 0:
        what = f"{errors[0]!r}" if errors else "no error, but the tar is short"
        state.skip(max(lost, 0), f"shard {uri} ended after {seen} of {expected} samples: {what}")


def _has_trailing_data(stream: _CheckedStream) -> bool:
    """True if anything but zero padding follows where tarfile stopped reading. Reads to the
    end (the shard's hash needs every byte) unless there is no hash to complete."""
    found = False
    try:
        while chunk := stream.read(1 << 16):
            found = found or chunk.count(0) != len(chunk)
            if found and stream.shard.sha256 is None:
                break
    except Exception:  # a failing read of the tail is damage too (e.g. a botocore error)
        return True
    return found


def _caption(sample: RawSample) -> str:
    try:
        return sample["text"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample(repr(e)) from None


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
    decode: Decode
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
    ) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
        """Pass after pass over the worker's share; the consumer stops at the quota."""
        for n in itertools.count():
            rng = random.Random(_seed(self.cfg.seed, self.epoch, self.rank, worker, n))
            stages: list[Callable[[Iterator[Any]], Iterator[Any]]] = [
                functools.partial(self._read, state=state),  # tar -> raw samples
                functools.partial(self._complete, state=state),  # image and text present
                self._shuffler(rng),  # within the pass: no repeat before every sample is seen
                functools.partial(_fast_forward, state=state),  # resume, before decoding
                functools.partial(self._decode, state=state),  # the spec's hook; bad -> counted
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
            yield from _read_piece(self.shards[piece.shard], piece, state)

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
        self, samples: Iterator[RawSample], state: _WorkerState
    ) -> Iterator[tuple[dict[str, torch.Tensor], str] | None]:
        """Decoded samples; ``None`` for a fast-forwarded one (it still counts for the guard)."""
        for sample in samples:
            if sample.get("__fast_forwarded__"):
                yield None
                continue
            try:
                yield self.decode(sample), _caption(sample)
            except SkipSample as e:
                state.skip(1, f"sample {sample['__key__']} in {sample['__url__']}: {e}")

    def _batches(
        self, samples: Iterator[tuple[dict[str, torch.Tensor], str]], state: _WorkerState
    ) -> Iterator[Batch]:
        while True:  # samples never end: passes repeat until the quota is cut
            fields, texts = zip(*itertools.islice(samples, self.batch_size), strict=True)
            yield {name: torch.stack([f[name] for f in fields]) for name in fields[0]} | {
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

        ``skip_batches``: resume after that many batches of this epoch (docs/data-loading.md). It
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
    tokenize: Tokenize,
    image_transform: ImageTransform | None = None,
    decode: Decode | None = None,
    epoch: int = 0,
    skip_batches: int = 0,
    s3: S3Settings | None = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """A loader yielding ``{"image": [B,3,H,W] float, "text": [B,ctx] long, "skipped": long}``.

    ``decode`` turns a raw sample into named tensors (``DecodeImage(image_transform)`` unless
    given: the ``image`` above); ``tokenize`` turns the batch's captions into ``text``.
    ``skipped`` is the number of corrupt samples (plus samples lost in damaged tars) the
    worker that made the batch dropped since its previous batch; summed over an epoch's
    batches it is the rank's total.
    """
    if (decode is None) == (image_transform is None):
        raise ValueError("give make_train_loader a decode hook or an image_transform")
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
    decode = decode or DecodeImage(image_transform)
    stream = _RankStream(
        cfg, tuple(shards), rank, world_size, batch_size, decode, tokenize, steps, s3
    )
    loader = TrainLoader(stream, pin_memory)
    loader.set_epoch(epoch, skip_batches)
    return loader
