"""The dataset build lock on a real Prefect API (ephemeral and a server): a live holder is
waited for and named, a dead one is taken over, racing builds hold it one at a time, and a
`mmpipe build` killed mid-crawl does not block the next one."""

import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from contextvars import copy_context
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from dataprep.publish import list_datasets, read_manifest
from dataprep.store import open_store
from pipelines.locks import Holder, LockLost, acquire, dataset_build_lock, lock_name
from tests.pipelines.conftest import small_build, using_api

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["ephemeral", "server"])
def api(request):
    """The API every test here runs against: Prefect's ephemeral API, then a real server."""
    if request.param == "ephemeral":
        with prefect_test_harness(server_startup_timeout=120):
            yield request.param
    else:
        with using_api(request.getfixturevalue("prefect_server").api_url):
            yield request.param


def dataset(api: str, name: str) -> str:
    return f"{name}-{api}"  # each API keeps its own locks; names only for readability


def plant(name: str, lease_s: float) -> None:
    """A holder record as a build on another host leaves it when it dies there."""
    now = datetime.now(UTC).isoformat()
    holder = Holder(
        host="elsewhere", pid=4242, pid_space="elsewhere", started_at=now, renewed_at=now,
        lease_s=lease_s,
    )  # fmt: skip
    with get_client(sync_client=True) as client:
        client.create_variable(VariableCreate(name=lock_name(name), value=holder.model_dump()))


HOLDER = """
import sys, time
from prefect import flow
from pipelines.locks import acquire

@flow(name="lock-holder", flow_run_name="hold " + sys.argv[1])
def hold(name: str, then: str):
    acquire(name, lease_s=60)  # never released
    if then == "stay":
        print("held", flush=True)
        time.sleep(600)

hold(sys.argv[1], sys.argv[2])
print("held", flush=True)  # the flow run has ended; this process lives on, renewing the lock
time.sleep(600)
"""


def start_holder(name: str, then: str) -> subprocess.Popen:
    """A process that takes the lock in a flow run and keeps the flow running (`stay`) or ends
    it (`end`), then waits to be killed."""
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name, then], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout.readline() == "held\n", "the holder did not take the lock"
    return proc


def timed_acquire(name: str, timeout_s: float) -> float:
    started = time.monotonic()
    with dataset_build_lock(name, timeout_s=timeout_s):
        return time.monotonic() - started


def test_a_live_holder_is_waited_for_and_named_then_taken_over_when_killed(api, capsys):
    name = dataset(api, "killed")
    holder = start_holder(name, "stay")
    try:
        with pytest.raises(TimeoutError, match=f"pid {holder.pid}"):
            acquire(name, timeout_s=3)
        waiting = capsys.readouterr().out
        assert (
            f"another build of {name} is running: waiting for it (flow run 'hold {name}'" in waiting
        )
        assert f"host {socket.gethostname()}, pid {holder.pid}, since " in waiting
    finally:
        holder.kill()
        holder.wait()
    assert timed_acquire(name, timeout_s=30) < 10  # its process is gone: no lease to wait out
    assert f"its process {holder.pid} has exited" in capsys.readouterr().out


def test_a_holder_whose_flow_run_ended_is_taken_over(api, capsys):
    name = dataset(api, "ended")
    holder = start_holder(name, "end")  # alive and renewing, but its flow run is Completed
    try:
        assert timed_acquire(name, timeout_s=30) < 10
        assert "its flow run is Completed" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_on_another_host_is_taken_over_when_its_lease_runs_out(api, capsys):
    name = dataset(api, "elsewhere")
    plant(name, lease_s=3)
    waited = timed_acquire(name, timeout_s=60)
    assert 3 <= waited < 3 + 10
    out = capsys.readouterr().out
    assert f"another build of {name} is running: waiting for it (host elsewhere, pid 4242" in out
    assert "it has not renewed the lock for 3 s (lease 3 s)" in out


def test_racing_builds_take_a_dead_holders_lock_one_at_a_time(api):
    name = dataset(api, "race")
    plant(name, lease_s=3)
    held: list[tuple[float, float]] = []

    def build() -> None:
        with dataset_build_lock(name, timeout_s=120):
            entered = time.monotonic()
            time.sleep(0.5)
            held.append((entered, time.monotonic()))

    # each in a copy of this context: the one that points Prefect at the API under test
    builds = [threading.Thread(target=copy_context().run, args=(build,)) for _ in range(4)]
    for thread in builds:
        thread.start()
    for thread in builds:
        thread.join()
    held.sort()
    assert len(held) == 4
    assert all(left[1] <= right[0] for left, right in zip(held, held[1:], strict=False))


def test_a_holder_whose_lock_was_taken_over_does_not_go_on(api):
    name = dataset(api, "lost")
    with dataset_build_lock(name, lease_s=3) as lock:
        lock.check()
        with get_client(sync_client=True) as client:
            client.delete_variable_by_name(lock_name(name))  # as a waiter taking it over does
        deadline = time.monotonic() + 10
        with pytest.raises(LockLost, match=f"took over the build lock of {name}"):  # noqa: PT012
            while time.monotonic() < deadline:
                lock.check()
                time.sleep(0.2)


# --------------------------------------------------------------------------- mmpipe build

NAME = "lockkill"
LEASE_S = 20  # the builds' lock_lease_s: short, so a wait for it would show in the test's time


def write_config(path: Path, sample_web, scorer, store: Path) -> Path:
    # shards commit one by one: a kill lands between them
    config = small_build(
        NAME, sample_web, f"file://{store}", scorer, shards_per_task=1, processes=1
    )
    config["lock_lease_s"] = LEASE_S
    path.write_text(yaml.safe_dump(config))
    return path


class Build:
    """`mmpipe build` in its own process group, on the ephemeral API of its state dir; its output
    lines with the time each arrived."""

    def __init__(self, config: Path, state: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "build", "--config", str(config)],
            cwd=ROOT, env=env | {"MMPIPE_STATE_DIR": str(state)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip()))

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the build, its API server and its crawlers
        self.wait(30)

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, text: str) -> float:
        """Seconds from the start to the first line with `text`."""
        return next(t for t, line in self.lines if text in line)


@pytest.fixture
def start_build():
    """Start `Build`s; whatever still runs at the end of the test is killed."""
    started: list[Build] = []

    def start(config: Path, state: Path) -> Build:
        started.append(Build(config, state))
        return started[-1]

    yield start
    for build in started:
        if build.proc.poll() is None:
            build.kill()


def published(store: Path) -> dict:
    """The published manifest without what differs between two crawls of one list (the order
    crawled samples arrive in, and so each shard's bytes), plus the samples published."""
    manifest = read_manifest(open_store(f"file://{store}"), NAME)
    folder = store / "datasets" / NAME / manifest.version
    samples = set()
    for shard in manifest.shards:
        with tarfile.open(folder / shard.path) as tar:
            samples |= {member.name.split(".")[0] for member in tar.getmembers()}
    shards = [(shard.path, shard.samples) for shard in manifest.shards]
    exclude = {"created_at", "bytes", "shards"}
    # Which of a pair of near-duplicates is kept can follow crawl order (seen in a full run):
    # compare how many samples are published, and every count by stage and reason.
    return manifest.model_dump(exclude=exclude) | {"shards": shards, "published": len(samples)}


@pytest.mark.slow
def test_a_build_killed_mid_crawl_does_not_block_the_next_one(
    sample_web, clip_scorer, tmp_path, start_build
):
    ref_config = write_config(
        tmp_path / "ref.yaml", sample_web, clip_scorer, tmp_path / "ref-store"
    )
    reference = start_build(ref_config, tmp_path / "ref-state")
    assert reference.wait(600) == 0, reference.output()

    store = tmp_path / "store"
    config = write_config(tmp_path / "build.yaml", sample_web, clip_scorer, store)
    killed = start_build(config, tmp_path / "state")
    crawl = open_store(f"file://{store}")
    deadline = time.monotonic() + 300  # a loaded machine starts Prefect slowly
    while not crawl.exists(f"staging/{NAME}/crawl/00000.stats.json"):
        assert killed.proc.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline, killed.output()
        time.sleep(0.05)
    killed.kill()
    done = [k for k in crawl.list(f"staging/{NAME}/crawl/") if k.endswith(".stats.json")]
    assert 1 <= len(done) < 4, "killed mid-crawl"

    # Two builds at once on the same state (the same Prefect database), each with its own
    # ephemeral API process: one takes the lock over, the other waits for it, one version.
    reruns = [start_build(config, tmp_path / "state") for _ in range(2)]
    for rerun in reruns:
        assert rerun.wait(600) == 0, rerun.output()
    took_over = min(
        rerun.first(f"taking over the build lock of {NAME} from flow run 'build {NAME}'")
        for rerun in reruns
        if "taking over" in rerun.output()
    )
    print(f"a rerun took the lock over {took_over:.1f} s after it started")
    assert took_over < LEASE_S + 60  # at once, after Prefect's start-up
    dead = f"pid {killed.proc.pid}, since "  # the takeover names whom it took the lock from
    assert any(dead in r.output() and f"its process {killed.proc.pid} has exited" in r.output()
               for r in reruns)  # fmt: skip
    first, second = reruns
    waited = [
        f"waiting for it (flow run 'build {NAME}'" in waiter.output()
        and f"pid {holder.proc.pid}, since " in waiter.output()
        for waiter, holder in ((first, second), (second, first))
    ]
    assert sorted(waited) == [False, True], first.output() + second.output()
    assert list_datasets(crawl) == [(NAME, "v1")]
    assert published(store) == published(tmp_path / "ref-store")
