"""ObjectStore behaviour, checked against a local folder and a real S3 API (moto_server).

Unless marked otherwise, every test runs on both backends through the ``store`` fixture.
"""

from __future__ import annotations

import errno
import http.client
import http.server
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from dataprep.store import (
    WITH_SECRETS,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Settings,
    S3Store,
    StoreError,
    local_copy,
    local_path,
    open_store,
    require_file,
    split_uri,
)
from tests.conftest import MotoS3, free_port

MiB = 1024 * 1024


def raw_s3(request: pytest.FixtureRequest) -> Any:
    """A plain boto3 client on the moto server (only requested by S3 cases)."""
    return request.getfixturevalue("moto_s3").client()


def full_key(store: S3Store, key: str) -> str:
    return f"{store.prefix}/{key}"


# --------------------------------------------------------------------------- basics


def test_put_get_bytes_round_trip(store: ObjectStore) -> None:
    store.put_bytes("a/b/c.bin", b"\x00hello\xff")
    assert store.get_bytes("a/b/c.bin") == b"\x00hello\xff"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    assert store.uri("a/b/c.bin") == f"{store.root_uri}/a/b/c.bin"


def test_put_file_get_file_beyond_multipart_threshold(
    store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = os.urandom(12 * MiB)  # S3 fixture: 5 MiB threshold and parts -> 3 parts
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    store.put_file("big/shard-000.tar", src)

    dst = tmp_path / "out" / "nested" / "dst.bin"  # parents are created
    store.get_file("big/shard-000.tar", dst)
    assert dst.read_bytes() == data
    assert store.size("big/shard-000.tar") == len(data)
    assert [p.name for p in dst.parent.iterdir()] == ["dst.bin"]  # no temp left behind
    if isinstance(store, S3Store):
        head = raw_s3(request).head_object(
            Bucket=store.bucket, Key=full_key(store, "big/shard-000.tar")
        )
        assert head["ETag"].strip('"').endswith("-3"), "expected a 3-part multipart upload"


def test_overwrite_replaces_whole_object(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("k", b"x" * 10_000)
    store.put_bytes("k", b"short")
    assert store.get_bytes("k") == b"short"
    assert store.size("k") == 5
    src = tmp_path / "f"
    src.write_bytes(b"from file")
    store.put_file("k", src)
    assert store.get_bytes("k") == b"from file"
    assert store.list() == ["k"]


def test_list_is_sorted_recursive_and_prefix_filtered(store: ObjectStore) -> None:
    for key in ["c", "b.txt", "a/sub/x", "a/2.bin", "ab/y", "a/1.bin"]:
        store.put_bytes(key, key.encode())

    assert store.list() == ["a/1.bin", "a/2.bin", "a/sub/x", "ab/y", "b.txt", "c"]
    assert store.list("a/") == ["a/1.bin", "a/2.bin", "a/sub/x"]
    assert store.list("a") == ["a/1.bin", "a/2.bin", "a/sub/x", "ab/y"]  # string prefix
    assert store.list("a/sub") == ["a/sub/x"]
    assert store.list("a/1") == ["a/1.bin"]
    assert store.list("nothing/") == []


def test_empty_store_lists_nothing(store: ObjectStore) -> None:
    assert store.list() == []
    assert store.delete_prefix("") == 0


def test_in_flight_writes_are_invisible(store: ObjectStore, request: pytest.FixtureRequest) -> None:
    store.put_bytes("data/done.bin", b"done")
    if isinstance(store, LocalStore):
        # What a writer that crashed before its rename leaves behind.
        (store.root / "data" / ".partial.bin.tmp-0123456789abcdef0123456789abcdef").write_bytes(
            b"half"
        )
    else:
        # A multipart upload with a part uploaded but never completed.
        client = raw_s3(request)
        upload = client.create_multipart_upload(
            Bucket=store.bucket, Key=full_key(store, "data/partial.bin")
        )
        client.upload_part(
            Bucket=store.bucket,
            Key=full_key(store, "data/partial.bin"),
            UploadId=upload["UploadId"],
            PartNumber=1,
            Body=b"p" * (5 * MiB),
        )
        in_flight = client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        assert [u["Key"] for u in in_flight] == [full_key(store, "data/partial.bin")]

    assert store.list() == ["data/done.bin"]
    assert store.list("data/") == ["data/done.bin"]
    assert not store.exists("data/partial.bin")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("data/partial.bin")
    # delete_prefix only touches complete objects (and never races in-flight writers).
    assert store.delete_prefix("data/") == 1
    # delete_abandoned removes the dead write (once no writer can be at work there).
    assert store.delete_abandoned("other/") == 0
    assert store.delete_abandoned("data/") == 1
    if isinstance(store, LocalStore):
        assert list((store.root / "data").iterdir()) == []
    else:
        assert "Uploads" not in raw_s3(request).list_multipart_uploads(Bucket=store.bucket)


def test_exists_size_delete(store: ObjectStore) -> None:
    assert not store.exists("x/y")
    store.put_bytes("x/y", b"12345")
    assert store.exists("x/y")
    assert store.size("x/y") == 5
    assert not store.exists("x")  # a "folder" is not an object
    store.delete("x/y")
    assert not store.exists("x/y")
    store.delete("x/y")  # absent: no error
    store.delete("never/existed")


def test_delete_prefix(store: ObjectStore) -> None:
    for key in ["run1/a", "run1/b/c", "run1/b/d", "run10/e", "run2/f"]:
        store.put_bytes(key, b".")
    assert store.delete_prefix("run1/") == 3
    assert store.list() == ["run10/e", "run2/f"]
    assert store.delete_prefix("run1/") == 0
    assert store.delete_prefix("") == 2
    assert store.list() == []


def test_list_folders_lists_one_level_only(store: ObjectStore) -> None:
    for key in ["d/a/v1/0.tar", "d/a/v1/m.json", "d/a/v2/0.tar", "d/b/v1/x", "d/top", "e/z"]:
        store.put_bytes(key, b".")
    assert store.list_folders() == ["d", "e"]
    assert store.list_folders("d/") == ["a", "b"]
    assert store.list_folders("d/a/") == ["v1", "v2"]
    assert store.list_folders("d/a/v1/") == []
    assert store.list_folders("nothing/") == []
    with pytest.raises(ValueError, match="must be '' or end with '/'"):
        store.list_folders("d/a")


def test_batched_puts_heads_and_deletes(store: ObjectStore, tmp_path: Path) -> None:
    files = []
    for i in range(40):
        path = tmp_path / f"{i}.bin"
        path.write_bytes(bytes([i]) * (i + 1))
        files.append((f"many/{i:03d}", path))
    store.put_files(files)
    assert store.list("many/") == [key for key, _ in files]
    assert store.get_bytes("many/007") == bytes([7]) * 8
    assert store.exists_many(["many/000", "many/xyz", "many/039"]) == [True, False, True]
    assert store.delete_keys([f"many/{i:03d}" for i in range(0, 40, 2)] + ["many/absent"]) == 21
    assert store.list("many/") == [f"many/{i:03d}" for i in range(1, 40, 2)]


def test_missing_object_raises_object_not_found_naming_uri(
    store: ObjectStore, tmp_path: Path
) -> None:
    uri = store.uri("no/such.bin")
    for call in [
        lambda: store.get_bytes("no/such.bin"),
        lambda: store.get_file("no/such.bin", tmp_path / "out.bin"),
        lambda: store.open("no/such.bin"),
        lambda: store.size("no/such.bin"),
    ]:
        with pytest.raises(ObjectNotFound, match="not found") as info:
            call()
        assert uri in str(info.value)
    assert not (tmp_path / "out.bin").exists()


BAD_KEYS = [
    "",
    "/etc/passwd",
    "../outside",
    "a/../../b",
    "a/..",
    "a//b",
    "./a",
    "a/",
    ".x.tmp-0123456789abcdef0123456789abcdef",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_rejected(store: ObjectStore, key: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b".")
    calls: list[Callable[[], object]] = [
        lambda: store.uri(key),
        lambda: store.put_bytes(key, b"."),
        lambda: store.put_file(key, src),
        lambda: store.get_bytes(key),
        lambda: store.open(key),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.delete(key),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="invalid store key"):
            call()
    assert store.list() == []


@pytest.mark.parametrize("prefix", ["/abs", "../", "a/../b/"])
def test_invalid_prefixes_are_rejected(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid store key"):
        store.list(prefix)
    with pytest.raises(ValueError, match="invalid store key"):
        store.delete_prefix(prefix)


def test_open_streams_content(store: ObjectStore) -> None:
    data = os.urandom(3 * MiB + 17)
    store.put_bytes("stream.bin", data)
    chunks = []
    with store.open("stream.bin") as f:
        assert f.read(10) == data[:10]
        while chunk := f.read(256 * 1024):
            chunks.append(chunk)
    assert data[:10] + b"".join(chunks) == data
    assert len(chunks) > 1


def test_store_pickles_and_works_after_unpickling(store: ObjectStore) -> None:
    store.put_bytes("k", b"before")  # on S3 this creates the (unpicklable) client
    clone = pickle.loads(pickle.dumps(store))
    assert clone.root_uri == store.root_uri
    assert clone.get_bytes("k") == b"before"
    clone.put_bytes("k2", b"from clone")
    assert store.get_bytes("k2") == b"from clone"


# --------------------------------------------------------------------------- crash safety

# Runs in a separate process: unpickles a store from stdin and uploads one file,
# optionally with the size of files it may write capped (as on a full disk).
WRITER = """
import pickle, resource, sys
store = pickle.loads(sys.stdin.buffer.read())
if len(sys.argv) > 3:
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]),) * 2)
store.put_file(sys.argv[1], sys.argv[2])
"""


def start_writer(
    store: ObjectStore, key: str, src: Path, max_file_size: int | None = None
) -> subprocess.Popen:
    args = [key, str(src)] + ([str(max_file_size)] if max_file_size else [])
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, *args],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )
    assert proc.stdin is not None
    proc.stdin.write(pickle.dumps(store))
    proc.stdin.close()
    return proc


def open_fifo_writer(path: Path, reader: subprocess.Popen) -> BinaryIO:
    """Open a FIFO for writing once ``reader`` has opened it (plain open() would hang
    forever if the reader died first)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader is there
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            if reader.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the writer process never opened {path}")
            time.sleep(0.02)
            continue
        os.set_blocking(fd, True)
        return open(fd, "wb", buffering=0)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_writer_killed_mid_upload_leaves_nothing_visible(
    store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SIGKILL a real writer process while its upload is in progress."""
    key = "shards/000.tar"
    if isinstance(store, LocalStore):
        # The source is a FIFO: the writer copies the first MiB, then blocks on the
        # pipe for more, with its half-written temp file on disk.
        src = tmp_path / "src.fifo"
        os.mkfifo(src)

        def half_written() -> list[Path]:
            return [p for p in store.root.rglob(".*.tmp-*") if p.stat().st_size == MiB]

        with start_writer(store, key, src) as proc:
            try:
                with open_fifo_writer(src, proc) as pipe:
                    pipe.write(b"x" * MiB)
                    wait_for(lambda: bool(half_written()), "the writer's temp file")
            finally:
                proc.kill()
        assert len(half_written()) == 1  # the crash leftover really is there...
    else:
        # All parts go through; the proxy holds CompleteMultipartUpload forever, and the
        # writer is killed while waiting for it.
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom(12 * MiB))
        with FaultyProxy(store.settings.endpoint_url, stall=is_complete_multipart) as proxy:
            settings = store.settings.model_copy(update={"endpoint_url": proxy.url})
            with start_writer(S3Store(store.bucket, store.prefix, settings), key, src) as proc:
                try:
                    assert proxy.stalled.wait(15), "the writer never tried to complete its upload"
                finally:
                    proc.kill()
        uploads = raw_s3(request).list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        assert [u["Key"] for u in uploads] == [full_key(store, key)]  # ...really in flight

    # ...and yet nothing is visible at the key.
    assert not store.exists(key)
    assert store.list() == []
    with pytest.raises(ObjectNotFound):
        store.get_bytes(key)
    # A retry after the crash publishes normally.
    store.put_bytes(key, b"retried")
    assert store.list() == [key]
    assert store.get_bytes(key) == b"retried"


def test_local_write_failing_midway_cleans_up(local_store: LocalStore, tmp_path: Path) -> None:
    """A write that fails part-way (file size limit, like a full disk) leaves no trace."""
    local_store.put_bytes("k", b"old")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * MiB))
    with start_writer(local_store, "k", src, max_file_size=MiB) as proc:
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
    assert proc.returncode == 1
    assert f"StoreError: cannot write {local_store.uri('k')}" in stderr
    assert "File too large" in stderr
    assert local_store.get_bytes("k") == b"old"
    assert [p.name for p in local_store.root.iterdir()] == ["k"]  # temp file removed


# --------------------------------------------------------------------------- S3 faults


def is_complete_multipart(method: str, path: str) -> bool:
    return method == "POST" and "uploadId=" in path


class FaultyProxy:
    """An HTTP proxy on loopback in front of the S3 server, for injecting faults.

    Answers the first ``fail_first`` requests with HTTP 500, holds requests for which
    ``stall(method, path)`` is true without ever answering (and sets ``stalled``), and
    forwards everything else unchanged.
    """

    def __init__(
        self,
        upstream: str | None,
        fail_first: int = 0,
        stall: Callable[[str, str], bool] | None = None,
    ) -> None:
        assert upstream and upstream.startswith("http://127.0.0.1:")
        self.upstream_port = int(upstream.rsplit(":", 1)[1])
        self.fail_first = fail_first
        self.stall = stall
        self.failed = 0
        self.forwarded = 0
        self.stalled = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultyProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def _should_fail(self) -> bool:
        with self._lock:
            if self.failed < self.fail_first:
                self.failed += 1
                return True
            return False

    def _forward(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            with self._lock:
                self.forwarded += 1
            return response.status, response.getheaders(), data
        finally:
            conn.close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint

            def log_message(self, *args: object) -> None:
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._read_body()
                if proxy.stall and proxy.stall(self.command, self.path):
                    proxy.stalled.set()
                    proxy._release.wait()
                    self.close_connection = True
                    return
                if proxy._should_fail():
                    error = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self._reply(500, [("Content-Type", "application/xml")], error)
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"
                }
                headers["Content-Length"] = str(len(body))
                self._reply(*proxy._forward(self.command, self.path, headers, body))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


ProxiedStore = Callable[..., tuple[S3Store, FaultyProxy]]


@pytest.fixture
def via_proxy(s3_store: S3Store) -> Iterator[ProxiedStore]:
    """Build (store, proxy): an S3Store on ``s3_store``'s bucket, reached via a FaultyProxy."""
    proxies: list[FaultyProxy] = []

    def make(max_attempts: int, **proxy_args: Any) -> tuple[S3Store, FaultyProxy]:
        proxy = FaultyProxy(s3_store.settings.endpoint_url, **proxy_args).__enter__()
        proxies.append(proxy)
        settings = s3_store.settings.model_copy(
            update={"endpoint_url": proxy.url, "max_attempts": max_attempts}
        )
        return S3Store(s3_store.bucket, s3_store.prefix, settings), proxy

    yield make
    for proxy in proxies:
        proxy.__exit__()


def test_s3_retries_transient_server_errors(via_proxy: ProxiedStore) -> None:
    store, proxy = via_proxy(max_attempts=3, fail_first=2)
    store.put_bytes("k", b"made it")
    assert proxy.failed == 2
    proxy.fail_first += 2
    assert store.get_bytes("k") == b"made it"
    assert proxy.failed == 4


def test_s3_gives_up_after_max_attempts(via_proxy: ProxiedStore, s3_store: S3Store) -> None:
    store, proxy = via_proxy(max_attempts=3, fail_first=4)
    with pytest.raises(StoreError, match="InternalError") as info:
        store.put_bytes("k", b"lost")
    assert store.uri("k") in str(info.value)
    assert "after 3 attempts" in str(info.value)
    assert proxy.failed == 3
    assert not s3_store.exists("k")


def test_s3_unreachable_endpoint_gives_clear_error() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = S3Settings(
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
        max_attempts=2,
        connect_timeout_s=1,
    )
    store = open_store("s3://bucket/prefix", settings)
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.get_bytes("k")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert endpoint in message
    assert "endpoint_url" in message
    assert "s3://bucket/prefix/k" in message
    assert not isinstance(info.value, ObjectNotFound)


def test_check_reachable_gives_up_after_one_short_try() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings = S3Settings(
        endpoint_url=endpoint, region="us-east-1", access_key_id="t", secret_access_key="t"
    )  # 8 attempts, 5 s connect timeout: a minute of retries for every other request
    store = open_store("s3://bucket/prefix", settings)
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach S3 endpoint {endpoint}.*1 attempts"):
        store.check_reachable(timeout_s=1)
    assert time.monotonic() - started < 5


def test_check_reachable_passes_on_a_live_store(store: ObjectStore, moto_s3: MotoS3) -> None:
    store.check_reachable()
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        open_store("s3://no-such-bucket-here/p", moto_s3.settings()).check_reachable()


def test_s3_missing_bucket_is_a_clear_error(moto_s3: MotoS3) -> None:
    store = open_store("s3://no-such-bucket-here/p", moto_s3.settings())
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        store.put_bytes("k", b".")


# --------------------------------------------------------------------------- URIs, settings


def test_open_store_dispatches_on_scheme(tmp_path: Path) -> None:
    local = open_store(f"file://{tmp_path}/store/")
    assert isinstance(local, LocalStore)
    assert local.root_uri == f"file://{tmp_path}/store"
    s3 = open_store("s3://bucket/a/b/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.root_uri) == ("bucket", "a/b", "s3://bucket/a/b")
    assert open_store("s3://bucket").root_uri == "s3://bucket"
    assert open_store("S3://bucket").root_uri == "s3://bucket"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://x", "unsupported store URI scheme 'gs'"),
        ("s3://", "has no bucket"),
        ("s3:///prefix", "has no bucket"),
        ("s3://bad bucket/p", "invalid bucket name"),
        ("s3://bucket/a/../b", "invalid prefix"),
        ("file://relative/path", "must hold an absolute path"),
        ("/no/scheme", "has no scheme"),
        ("", "has no scheme"),
    ],
)
def test_open_store_rejects_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(uri)


def test_uris_split_into_folder_and_key_and_resolve_to_local_files(store: ObjectStore) -> None:
    assert split_uri("s3://b/p/00000.tar") == ("s3://b/p", "00000.tar")
    assert split_uri("file:///x.tar") == ("file:///", "x.tar")
    for bad, message in (("/no/scheme.tar", "no scheme"), ("s3://bucket", "names no object")):
        with pytest.raises(ValueError, match=message):
            split_uri(bad)
    assert local_path("relative/dvae.pt") == Path("relative/dvae.pt")
    assert local_path("file:///abs/dvae.pt") == Path("/abs/dvae.pt")
    assert local_path("s3://b/dvae.pt") is None

    store.put_bytes("exports/dvae.pt", b"weights")
    uri = store.uri("exports/dvae.pt")
    settings = getattr(store, "settings", None)
    assert local_copy(uri, settings).read_bytes() == b"weights"
    require_file(uri, settings)
    with pytest.raises(FileNotFoundError, match=f"the dVAE not found: {uri}x"):
        require_file(uri + "x", settings, "the dVAE")


def test_s3_settings_keep_the_secret_secret() -> None:
    settings = S3Settings(access_key_id="AKIA", secret_access_key="hunter2")
    store = S3Store("b", "p", settings)
    for text in (repr(settings), str(settings), repr(store), settings.model_dump_json()):
        assert "hunter2" not in text
    with pytest.raises(ValueError, match="extra"):
        S3Settings(endpoint="http://x")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="both"):
        S3Settings(access_key_id="AKIA")


def test_s3_settings_for_a_runs_own_workers_keep_the_secret() -> None:
    settings = S3Settings(access_key_id="AKIA", secret_access_key="hunter2")
    masked = S3Settings.model_validate_json(settings.model_dump_json())
    assert masked.secret_access_key.get_secret_value() != "hunter2"  # logs, Prefect parameters
    for copy in (
        S3Settings.model_validate_json(settings.model_dump_json(context=WITH_SECRETS)),
        S3Settings.model_validate(settings.model_dump(mode="json", context=WITH_SECRETS)),
    ):
        assert copy.secret_access_key.get_secret_value() == "hunter2"


def test_arrow_filesystem_sees_the_same_objects(store):
    store.put_bytes("runs/a/x.bin", b"payload")
    fs, path = store.arrow_filesystem("runs/a")
    with fs.open_input_stream(f"{path}/x.bin") as f:
        assert f.read() == b"payload"
    with fs.open_output_stream(f"{path}/y.bin") as f:
        f.write(b"from arrow")
    assert store.get_bytes("runs/a/y.bin") == b"from arrow"
