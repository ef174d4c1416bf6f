"""Object storage behind one small interface: a local folder (``file://``) or S3 (``s3://``).

This is the only module that knows about URI schemes. Everything else in the pipeline
(crawl output, WebDataset shards, checkpoints, manifests) talks to an :class:`ObjectStore`
obtained from :func:`open_store`, so switching from the embedded local default to a real
bucket is a configuration change.

Keys are ``/``-separated paths relative to the store root (``shards/train-000001.tar``).
Every write is an *atomic publish*: readers see either no object or the complete object,
never a half-written one, so a crashed writer can't poison a dataset that others list.
"""

from __future__ import annotations

import abc
import contextlib
import io
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import pydantic
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from dataprep.errors import MmpipeError

MiB = 1024 * 1024
_COPY_BUFFER = MiB
REQUEST_THREADS = 16  # requests in flight at once: latency-bound, not CPU-bound

# Name of an in-flight local write: hidden, and unmistakable for a real key (keys that
# look like this are rejected), so list() can skip it and delete_prefix() never races it.
_TEMP_NAME = re.compile(r"^\..*\.tmp-[0-9a-f]{32}$")
_BUCKET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class S3Settings(pydantic.BaseModel):
    """How to reach S3 or an S3-compatible service (MinIO, Ceph, moto...).

    Anything left as None falls back to boto3's standard resolution (env vars, profile,
    instance metadata), so the same config works on a laptop and in the cloud.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    endpoint_url: str | None = None  # None -> AWS default / AWS_ENDPOINT_URL env
    region: str | None = None  # None -> AWS_REGION / AWS_DEFAULT_REGION / boto default
    access_key_id: str | None = None  # None -> standard AWS credential chain
    secret_access_key: pydantic.SecretStr | None = None  # SecretStr: never logged/repr'd
    # botocore "standard" retry mode: backoff on 5xx, throttling and connection errors.
    # Counts attempts in total, the first one included.
    max_attempts: int = pydantic.Field(default=8, ge=1)
    connect_timeout_s: float = pydantic.Field(default=5.0, gt=0)
    read_timeout_s: float = pydantic.Field(default=60.0, gt=0)
    # Sizes in MiB. S3 rejects multipart parts under 5 MiB (except the last one).
    multipart_threshold_mb: int = pydantic.Field(default=64, ge=1)
    multipart_chunk_mb: int = pydantic.Field(default=16, ge=5)

    @pydantic.field_serializer("secret_access_key", when_used="json")
    def _secret_for_workers(self, secret: pydantic.SecretStr | None, info):
        """Masked in JSON, except in the copy a run hands its own workers (WITH_SECRETS)."""
        if secret is not None and info.context and info.context.get("with_secrets"):
            return secret.get_secret_value()
        return secret

    @pydantic.model_validator(mode="after")
    def _keys_come_in_pairs(self) -> S3Settings:
        # boto3 would fail later with a confusing PartialCredentialsError.
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both access_key_id and secret_access_key, or neither")
        return self


# `model_dump(mode="json", context=WITH_SECRETS)`: settings for this run's own Ray workers, which
# need the secret; never for logs, Prefect parameters or a Ray Job's command line.
WITH_SECRETS = {"with_secrets": True}


class StoreError(MmpipeError, RuntimeError):
    """A storage operation failed; the message names the URI involved."""


class ObjectNotFound(StoreError):
    """The object at the given key does not exist."""


class InvalidKey(StoreError, ValueError):
    """A key that would leave the store root or differ between backends."""


def _check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key; raise InvalidKey otherwise.

    Rejecting absolute paths and '..' keeps every key inside the store root, and
    rejecting empty/'.' segments keeps keys identical on both backends.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"invalid store key {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise InvalidKey(f"invalid store key {key!r}: must be relative, not absolute")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKey(f"invalid store key {key!r}: empty, '.' or '..' path segment")
        if _TEMP_NAME.match(part):
            raise InvalidKey(f"invalid store key {key!r}: reserved temporary-file name")
    return key


def _folder_prefix(prefix: str) -> str:
    """A folder prefix is '' or a key prefix ending in '/'."""
    if prefix and not prefix.endswith("/"):
        raise InvalidKey(f"invalid folder prefix {prefix!r}: must be '' or end with '/'")
    return _check_prefix(prefix)


def concurrently(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` with REQUEST_THREADS requests in flight (clients are
    thread-safe); the first error is raised once all have finished."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(REQUEST_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def _check_prefix(prefix: str) -> str:
    """A prefix is '' or the start of a key (it may end with '/' or mid-name)."""
    if prefix:
        _check_key(prefix.removesuffix("/"))
    return prefix


class ObjectStore(abc.ABC):
    """Flat key -> bytes storage with atomic publish. Implementations must be picklable."""

    root_uri: str  # e.g. "file:///abs/path/store" or "s3://bucket/prefix"

    def uri(self, key: str) -> str:
        """Full URI of ``key``, for messages and logs."""
        return f"{self.root_uri}/{_check_key(key)}"

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Publish ``data`` at ``key`` atomically, replacing any previous object."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | Path) -> None:
        """Publish the local file ``path`` at ``key`` atomically."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Whole object; ObjectNotFound if absent."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | Path) -> None:
        """Download to local ``path`` (parents created; ``path`` is never left half-written)."""

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Streaming binary reader; the caller closes it (use ``with``)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; ObjectNotFound if absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (a plain string prefix), recursively.

        Only complete objects are listed, never in-flight or abandoned writes.
        """

    @abc.abstractmethod
    def list_folders(self, prefix: str = "") -> list[str]:
        """Sorted names of the folders right under ``prefix`` (``""`` or ending in ``/``): one
        level, like S3's Delimiter="/", so the objects inside them are never listed."""

    def put_files(self, items: Iterable[tuple[str, str | Path]]) -> None:
        """``put_file`` of each (key, path), several requests in flight."""
        concurrently(lambda item: self.put_file(*item), items)

    def exists_many(self, keys: Iterable[str]) -> list[bool]:
        """``exists`` of each key, several requests in flight."""
        return concurrently(self.exists, keys)

    def delete_keys(self, keys: Iterable[str]) -> int:
        """Remove each key (absent ones too); return how many were asked for."""
        keys = list(keys)
        concurrently(self.delete, keys)
        return len(keys)

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is absent."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every key ``list(prefix)`` returns; return how many."""

    @abc.abstractmethod
    def delete_abandoned(self, prefix: str) -> int:
        """Remove the unfinished writes of keys under ``prefix`` (local temp files, incomplete
        S3 multipart uploads); return how many. Only for a prefix no live writer is using."""

    @abc.abstractmethod
    def arrow_filesystem(self, prefix: str = "") -> tuple[Any, str]:
        """(pyarrow FileSystem, path) of ``prefix``: for libraries that take one (Ray Train)."""

    @abc.abstractmethod
    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fail at once (StoreError) if the store cannot be reached: one clear line before a
        build starts, instead of every task retrying an endpoint that is down."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"


# --------------------------------------------------------------------------- local


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable, not just the file contents.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(final: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write via a hidden temp file in the same directory, then rename over ``final``.

    Same directory -> same filesystem -> os.replace is an atomic rename: concurrent
    readers see the old object or the new one, and a crash leaves only a temp file.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "xb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def _raise_unless_missing(error: OSError) -> None:
    # A missing folder just means no keys; anything else (permissions...) must not be
    # silently read as "empty", which os.walk does by default.
    if not isinstance(error, FileNotFoundError | NotADirectoryError):
        raise StoreError(f"cannot list {error.filename}: {error}") from error


class LocalStore(ObjectStore):
    """Objects are plain files under a root folder (created on first write)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.abspath(root))
        self.root_uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    @contextlib.contextmanager
    def _errors(self, key: str, reading: bool) -> Iterator[None]:
        """Turn OSErrors into StoreErrors naming the URI."""
        try:
            yield
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            if reading:
                raise ObjectNotFound(f"object not found: {self.uri(key)}") from None
            raise StoreError(f"cannot write {self.uri(key)}: {e}") from e
        except OSError as e:
            action = "read" if reading else "write"
            raise StoreError(f"cannot {action} {self.uri(key)}: {e}") from e

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key, reading=False):
            _write_atomically(self._path(key), lambda f: f.write(data))

    def put_file(self, key: str, path: str | Path) -> None:
        final = self._path(key)
        # Opened outside _errors: a missing *source* is the caller's FileNotFoundError,
        # not a missing object.
        with open(path, "rb") as src, self._errors(key, reading=False):
            _write_atomically(final, lambda f: shutil.copyfileobj(src, f, _COPY_BUFFER))

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key, reading=True):
            return self._path(key).read_bytes()

    def get_file(self, key: str, path: str | Path) -> None:
        with self._errors(key, reading=True):
            src = open(self._path(key), "rb")  # noqa: SIM115 - closed below
        with src:
            _write_atomically(Path(path), lambda f: shutil.copyfileobj(src, f, _COPY_BUFFER))

    def open(self, key: str) -> BinaryIO:
        with self._errors(key, reading=True):
            return open(self._path(key), "rb")  # noqa: SIM115 - the caller closes it

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        with self._errors(key, reading=True):
            if not path.is_file():
                raise FileNotFoundError(path)
            return path.stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        _check_prefix(prefix)
        # Walk only the deepest folder the prefix pins down, then filter by string prefix
        # (same semantics as S3's Prefix=).
        folder = self.root.joinpath(*prefix.split("/")[:-1])
        keys = []
        for dirpath, _dirnames, filenames in os.walk(folder, onerror=_raise_unless_missing):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if _TEMP_NAME.match(name):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def list_folders(self, prefix: str = "") -> list[str]:
        folder = self.root.joinpath(*_folder_prefix(prefix).split("/")[:-1])
        try:
            with os.scandir(folder) as entries:
                return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        except OSError as e:
            _raise_unless_missing(e)
            return []

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        pass  # a folder on this machine: nothing to reach

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key, reading=False), contextlib.suppress(FileNotFoundError):
            if path.is_file():
                path.unlink()

    def delete_prefix(self, prefix: str) -> int:
        # Empty folders are left behind on purpose: removing them could race with a
        # concurrent writer that has just created its parent folder.
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def delete_abandoned(self, prefix: str) -> int:
        folder = self.root.joinpath(*_check_prefix(prefix).split("/")[:-1])
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(folder, onerror=_raise_unless_missing):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filter(_TEMP_NAME.match, filenames):
                final = name[1:].rsplit(".tmp-", 1)[0]  # the key it was being written to
                if (final if rel_dir == "." else f"{rel_dir}/{final}").startswith(prefix):
                    Path(dirpath, name).unlink(missing_ok=True)
                    removed += 1
        return removed

    def arrow_filesystem(self, prefix: str = "") -> tuple[Any, str]:
        import pyarrow.fs

        path = self.root / _check_prefix(prefix) if prefix else self.root
        return pyarrow.fs.LocalFileSystem(), str(path)


# --------------------------------------------------------------------------- S3


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix``.

    Atomic publish comes from S3 itself: a single PUT and a *completed* multipart upload
    are each atomic, and a multipart upload stays invisible (not listed, HEAD -> 404)
    until CompleteMultipartUpload. So we upload straight to the final key with boto3's
    managed transfer; if it fails boto3 aborts the upload, and if the process dies the
    incomplete upload only costs storage until a bucket lifecycle rule
    (AbortIncompleteMultipartUpload) reaps it; it never becomes a visible object.
    """

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings or S3Settings()
        self.root_uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client_obj: Any = None
        self._client_lock = threading.Lock()

    # The client (sockets, thread pools) and the lock can't be pickled; workers that
    # receive this store build their own client on first use.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client_obj"] = None
        del state["_client_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    def _client(self) -> Any:
        with self._client_lock:
            if self._client_obj is None:
                self._client_obj = self._make_client()
            return self._client_obj

    def _make_client(self, probe_timeout_s: float | None = None) -> Any:
        """The client; with ``probe_timeout_s``, one attempt with that timeout (a probe)."""
        s = self.settings
        attempts = 1 if probe_timeout_s else s.max_attempts
        config = Config(
            # total_max_attempts counts the first try; botocore's "max_attempts" key
            # would count retries only (one more request than configured).
            retries={"total_max_attempts": attempts, "mode": "standard"},
            connect_timeout=probe_timeout_s or s.connect_timeout_s,
            read_timeout=probe_timeout_s or s.read_timeout_s,
            # Custom endpoints (MinIO, moto, Ceph) usually have no wildcard DNS for
            # virtual-hosted buckets ("bucket.minio:9000"), so address buckets by path.
            s3={"addressing_style": "path"} if self._custom_endpoint() else None,
        )
        secret = s.secret_access_key.get_secret_value() if s.secret_access_key else None
        # A private Session: boto3's default session is not thread-safe.
        return boto3.session.Session().client(
            "s3",
            endpoint_url=s.endpoint_url,
            region_name=s.region,
            aws_access_key_id=s.access_key_id,
            aws_secret_access_key=secret,
            config=config,
        )

    def _custom_endpoint(self) -> str | None:
        return (
            self.settings.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )

    def _endpoint(self) -> str:
        if self._client_obj is not None:
            return self._client_obj.meta.endpoint_url
        return self._custom_endpoint() or "the default AWS S3 endpoint"

    def _transfer_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=self.settings.multipart_threshold_mb * MiB,
            multipart_chunksize=self.settings.multipart_chunk_mb * MiB,
        )

    def _s3_key(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, uri: str, attempts: int | None = None) -> Iterator[None]:
        """Translate boto errors (raised after botocore's retries) into StoreErrors."""
        try:
            yield
        except S3UploadFailedError as e:
            # boto3 re-raises an upload's ClientError as this, losing the error code;
            # the original is still attached as the context.
            if isinstance(e.__context__, ClientError):
                raise self._client_error(uri, e.__context__) from e
            raise StoreError(f"upload to {uri} failed: {e}") from e
        except ClientError as e:
            raise self._client_error(uri, e) from e
        except (BotoConnectionError, HTTPClientError) as e:
            raise StoreError(
                f"cannot reach S3 endpoint {self._endpoint()} for {uri} "
                f"({attempts or self.settings.max_attempts} attempts): {e}; check "
                "store.s3.endpoint_url / AWS_ENDPOINT_URL and that the service is up"
            ) from e
        except NoCredentialsError as e:
            raise StoreError(
                f"no S3 credentials for {uri}: set store.s3.access_key_id and "
                "store.s3.secret_access_key, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            ) from e
        except BotoCoreError as e:
            raise StoreError(f"S3 request for {uri} failed: {e}") from e

    def _client_error(self, uri: str, e: ClientError) -> StoreError:
        error = e.response.get("Error", {})
        meta = e.response.get("ResponseMetadata", {})
        code = error.get("Code", "?")
        if code in ("404", "NoSuchKey", "NotFound"):
            return ObjectNotFound(f"object not found: {uri}")
        if code == "NoSuchBucket":
            return StoreError(f"bucket {self.bucket!r} does not exist (while accessing {uri})")
        retries = meta.get("RetryAttempts", 0)
        message = error.get("Message") or meta.get("HTTPStatusCode", "")
        return StoreError(
            f"S3 request for {uri} failed: {code}: {message} (after {retries + 1} attempts)"
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        uri = self.uri(key)
        with self._errors(uri):
            self._client().upload_fileobj(
                io.BytesIO(data), self.bucket, self._s3_key(key), Config=self._transfer_config()
            )

    def put_file(self, key: str, path: str | Path) -> None:
        uri = self.uri(key)
        with self._errors(uri):
            self._client().upload_file(
                os.fspath(path), self.bucket, self._s3_key(key), Config=self._transfer_config()
            )

    def get_bytes(self, key: str) -> bytes:
        uri = self.uri(key)
        with self.open(key) as body, self._errors(uri):
            return body.read()

    def get_file(self, key: str, path: str | Path) -> None:
        # boto3 downloads to a temp name next to ``path`` and renames it when done.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._errors(self.uri(key)):
            self._client().download_file(
                self.bucket, self._s3_key(key), os.fspath(path), Config=self._transfer_config()
            )

    def open(self, key: str) -> BinaryIO:
        with self._errors(self.uri(key)):
            # StreamingBody reads from the socket on demand: nothing is buffered whole.
            return self._client().get_object(Bucket=self.bucket, Key=self._s3_key(key))["Body"]

    def _head(self, key: str) -> dict[str, Any]:
        with self._errors(self.uri(key)):
            return self._client().head_object(Bucket=self.bucket, Key=self._s3_key(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        # Incomplete multipart uploads never appear in ListObjectsV2, so this lists
        # only complete objects.
        root = f"{self.prefix}/" if self.prefix else ""
        full_prefix = root + _check_prefix(prefix)
        keys = []
        with self._errors(f"{self.root_uri}/{prefix}"):
            pages = self._client().get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(root) :]
                    # Skip "folder" markers some tools create; they aren't valid keys.
                    if key and not key.endswith("/"):
                        keys.append(key)
        return sorted(keys)

    def list_folders(self, prefix: str = "") -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        full_prefix = root + _folder_prefix(prefix)
        folders = []
        with self._errors(f"{self.root_uri}/{prefix}"):
            pages = self._client().get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket, Prefix=full_prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    folders.append(common["Prefix"][len(full_prefix) :].removesuffix("/"))
        return sorted(f for f in folders if f)

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        probe = self._make_client(probe_timeout_s=timeout_s)
        prefix = f"{self.prefix}/" if self.prefix else ""
        with self._errors(self.root_uri, attempts=1):
            probe.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)

    def delete(self, key: str) -> None:
        # S3 DELETE of a missing key already succeeds silently.
        with self._errors(self.uri(key)):
            self._client().delete_object(Bucket=self.bucket, Key=self._s3_key(key))

    def delete_prefix(self, prefix: str) -> int:
        return self._delete_batches(self.list(prefix), f"{self.root_uri}/{prefix}")

    def delete_keys(self, keys: Iterable[str]) -> int:
        return self._delete_batches([_check_key(k) for k in keys], self.root_uri)

    def _delete_batches(self, keys: list[str], where: str) -> int:
        def delete_batch(start: int) -> None:
            batch = keys[start : start + 1000]  # DeleteObjects takes at most 1000 keys
            with self._errors(where):
                response = self._client().delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._s3_key(k)} for k in batch], "Quiet": True},
                )
            if errors := response.get("Errors"):
                first = errors[0]
                raise StoreError(
                    f"could not delete {len(errors)} objects under {where}, "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

        concurrently(delete_batch, range(0, len(keys), 1000))
        return len(keys)

    def delete_abandoned(self, prefix: str) -> int:
        # Incomplete multipart uploads: invisible, but they are kept (and billed) until aborted.
        root = f"{self.prefix}/" if self.prefix else ""

        def abort(upload: dict[str, Any]) -> None:
            with self._errors(f"{self.root_uri}/{prefix}"):
                self._client().abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )

        uploads = []
        with self._errors(f"{self.root_uri}/{prefix}"):
            pages = self._client().get_paginator("list_multipart_uploads")
            for page in pages.paginate(Bucket=self.bucket, Prefix=root + _check_prefix(prefix)):
                uploads += page.get("Uploads", [])
        return len(concurrently(abort, uploads))

    def arrow_filesystem(self, prefix: str = "") -> tuple[Any, str]:
        import pyarrow.fs

        s = self.settings
        endpoint = self._custom_endpoint()
        scheme, _, host = (endpoint or "").partition("://")
        secret = s.secret_access_key.get_secret_value() if s.secret_access_key else None
        fs = pyarrow.fs.S3FileSystem(
            access_key=s.access_key_id,
            secret_key=secret,
            region=s.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            endpoint_override=host or None,
            scheme=scheme or "https",
            connect_timeout=s.connect_timeout_s,
            request_timeout=s.read_timeout_s,
        )
        parts = [self.bucket, self.prefix, _check_prefix(prefix) if prefix else ""]
        return fs, "/".join(p for p in parts if p)


# --------------------------------------------------------------------------- factory


def open_store(uri: str, s3: S3Settings | None = None) -> ObjectStore:
    """Open ``file:///abs/path`` or ``s3://bucket[/prefix]``.

    ``s3`` configures the S3 client and is ignored for local stores. File URIs are taken
    literally (no percent-decoding) and must be absolute.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise ValueError(
            f"store URI {uri!r} has no scheme; use file:///abs/path or s3://bucket/prefix"
        )
    scheme = scheme.lower()
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError(
                f"file store URI {uri!r} must hold an absolute path, e.g. file:///data/store"
            )
        return LocalStore(rest.rstrip("/") or "/")
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"S3 store URI {uri!r} has no bucket; use s3://bucket/prefix")
        if not _BUCKET_NAME.match(bucket):
            raise ValueError(f"S3 store URI {uri!r}: invalid bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            try:
                _check_key(prefix)
            except ValueError as e:
                raise ValueError(f"S3 store URI {uri!r}: invalid prefix ({e})") from None
        return S3Store(bucket, prefix, s3)
    raise ValueError(f"unsupported store URI scheme {scheme!r} in {uri!r}; use file:// or s3://")


# --------------------------------------------------------------------------- URIs


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/p/00000.tar`` -> (``s3://b/p``, ``00000.tar``): its folder's store URI and key."""
    if "://" not in uri:
        raise ValueError(f"URI {uri!r} has no scheme; use file:///abs/path or s3://bucket/key")
    parent, _, name = uri.rpartition("/")
    if not name or parent.endswith(":/"):
        raise ValueError(f"URI {uri!r} names no object")
    return (parent + "/" if parent.endswith("://") else parent), name


def local_path(uri: str) -> Path | None:
    """The path a plain path or a ``file://`` URI names; None for a remote URI."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return Path(uri)
    return Path(rest) if scheme.lower() == "file" else None


def local_copy(uri: str, s3: S3Settings | None = None) -> Path:
    """A local file for a path or URI: a remote object is downloaded to a temporary folder."""
    path = local_path(uri)
    if path is not None:
        return path
    folder, name = split_uri(uri)
    path = Path(tempfile.mkdtemp(prefix="mmpipe-")) / name
    open_store(folder, s3).get_file(name, path)
    return path


def require_file(uri: str, s3: S3Settings | None = None, what: str = "file") -> None:
    """FileNotFoundError naming ``what`` if the file at a path or URI is missing."""
    path = local_path(uri)
    if path is not None:
        found = path.is_file()
    else:
        folder, name = split_uri(uri)
        found = open_store(folder, s3).exists(name)
    if not found:
        raise FileNotFoundError(f"{what} not found: {uri}")


class StoreConfig(pydantic.BaseModel):
    """Where a pipeline keeps its objects: `url` unset means a folder in the state dir."""

    model_config = pydantic.ConfigDict(extra="forbid")

    url: str | None = None  # file:///path or s3://bucket/prefix
    s3: S3Settings = S3Settings()

    def open(self) -> ObjectStore:
        from dataprep.state import state_dir

        return open_store(self.url or f"file://{state_dir() / 'store'}", self.s3)
