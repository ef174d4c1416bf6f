"""Shared pytest fixtures.

Object storage: tests run against real backends, never mocks. ``store`` is parametrized
over a local folder and a real S3 API (the ``moto_server`` executable on loopback), so
one test case covers both backends.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

# Prefect's local server would try to send telemetry: there is no network here.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dataprep.store import LocalStore, ObjectStore, S3Settings, S3Store, open_store

# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (nothing is listening on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(proc: subprocess.Popen, port: int, log: Path, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode}:\n{log.read_text()}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()
    pytest.fail(f"moto_server did not answer on port {port} in {deadline_s}s:\n{log.read_text()}")


# --------------------------------------------------------------------------- S3 (moto)


@dataclass(frozen=True)
class MotoS3:
    """A running moto S3 server on loopback."""

    endpoint_url: str

    def settings(self, **overrides: Any) -> S3Settings:
        """S3Settings pointing at this server; keyword arguments override fields."""
        values: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region": "us-east-1",
            "access_key_id": "testing",
            "secret_access_key": "testing",
        }
        return S3Settings(**(values | overrides))

    def client(self) -> Any:
        """A raw boto3 S3 client, for checks the ObjectStore API can't express."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_bucket(self) -> str:
        """Create a bucket with a unique name and return the name."""
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """Start the real ``moto_server`` executable once per session; yield a MotoS3."""
    executable = Path(sys.executable).parent / "moto_server"
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        # Keep boto hermetic: no instance-metadata probing (slow off-cloud), no developer
        # AWS config or endpoint overrides, and loopback never goes through an HTTP proxy.
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("AWS_CONFIG_FILE", os.devnull)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(var, raising=False)
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        with open(log, "wb") as log_file:
            # Output to a file, not a pipe: a full pipe buffer would block the server.
            proc = subprocess.Popen(
                [str(executable), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_for_http(proc, port, log, deadline_s=20)
            yield MotoS3(endpoint_url=f"http://127.0.0.1:{port}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- stores


@pytest.fixture
def s3_store(moto_s3: MotoS3) -> S3Store:
    """An S3Store on a fresh bucket, under a prefix.

    Multipart threshold and part size are the 5 MiB minimum so that tests exercise
    multipart uploads with small files.
    """
    settings = moto_s3.settings(multipart_threshold_mb=5, multipart_chunk_mb=5)
    store = open_store(f"s3://{moto_s3.create_bucket()}/some/prefix", settings)
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    """A LocalStore in a fresh temporary folder (the folder itself is not created yet)."""
    store = open_store(f"file://{tmp_path}/store")
    assert isinstance(store, LocalStore)
    return store


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each backend in turn, so one test case runs against both."""
    return request.getfixturevalue({"file": "local_store", "s3": "s3_store"}[request.param])


# --------------------------------------------------------------------------- sample web


@dataclass
class SampleWeb:
    specs: list
    server: Any  # dataprep.sampleweb.SampleWebServer
    urls: str  # the URL list (parquet: url, caption)

    def allow(self) -> list[str]:
        return [f"127.0.0.1:{self.server.port}"]


@pytest.fixture(scope="session")
def sample_web(tmp_path_factory) -> Iterator[SampleWeb]:
    """240 samples (every fault kind at least 4 times), served on loopback for the session."""
    from dataprep.sampleweb import SampleWebServer, generate_corpus, write_url_list

    specs = generate_corpus(240, seed=3)
    # Rendered up front: the bomb takes ~0.6 s to render, past a crawl deadline on a busy machine.
    with SampleWebServer(specs, drip_max_s=30, prerender=True) as server:
        urls = write_url_list(specs, server, tmp_path_factory.mktemp("web") / "urls.parquet")
        yield SampleWeb(specs, server, str(urls))


# --------------------------------------------------------------------------- CLIP scorer


@pytest.fixture(scope="session")
def clip_scorer(tmp_path_factory):
    """A tiny CLIP trained on another seed of the sample web (training.scorer), calibrated.

    Trained once per session; set MMPIPE_TEST_CACHE to a folder to reuse it across sessions.
    """
    from training.scorer import ScorerRecipe, ensure_scorer

    cache = os.environ.get("MMPIPE_TEST_CACHE")
    folder = Path(cache) if cache else tmp_path_factory.mktemp("scorer")
    return ensure_scorer(folder / "clip-tiny-scorer.pt", ScorerRecipe())
