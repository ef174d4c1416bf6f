"""dataprep.ray_session: Ray joins only the cluster the config names, never a stale record."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dataprep.ray_session import ray_address


def test_the_configured_address_wins_then_the_job_cluster_then_a_private_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) == "local"
    assert ray_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what a Ray Job's driver is given
    assert ray_address(None) == "10.0.0.1:6379"
    assert ray_address("ray://head:10001") == "ray://head:10001"


def stale_ray_tmpdir() -> Path:
    """A Ray temp dir whose address file names a cluster that is gone (short: socket paths)."""
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    (tmp / "ray").mkdir()
    (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens there
    return tmp


@pytest.mark.slow
def test_a_stale_cluster_record_is_ignored():
    tmp = stale_ray_tmpdir()
    code = (
        "import ray\n"
        "from dataprep.ray_session import init_ray\n"
        "init_ray(None, num_cpus=1)\n"
        "print(ray.get(ray.remote(lambda: 6 * 7).remote()))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "42"
    subprocess.run(["rm", "-rf", str(tmp)], check=False)
