"""The `mmpipe` command as a user runs it: a real process, its exit code and its output."""

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port


def mmpipe(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_help_lists_the_user_jobs():
    result = mmpipe("--help")
    assert result.returncode == 0
    for command in ("build", "demo", "sampleweb", "config", "plan", "generate", "encode-codes"):
        assert command in result.stdout


def test_plan_says_which_zero_stage_fits_and_fails_when_nothing_does():
    fits = mmpipe("plan", "--config", "configs/dalle-12b.yaml", "--gpus", "1024", "--gpu-mem", "16")
    assert fits.returncode == 0, fits.stderr
    assert "12.29 B parameters" in fits.stdout and "verdict: ZeRO-3" in fits.stdout
    nothing = mmpipe("plan", "--config", "configs/dalle-12b.yaml", "--gpus", "1", "--gpu-mem", "1")
    assert nothing.returncode == 1 and "nothing fits" in nothing.stdout


def test_generate_and_demo_refuse_bad_arguments_in_one_line():
    result = mmpipe("generate", "--checkpoint", "dalle.pt")  # no caption, no --heldout
    assert result.returncode == 2
    assert (
        result.stderr.startswith("mmpipe: error: invalid config")
        and "give captions" in result.stderr
    )
    result = mmpipe("demo", "--set", "vqgan:steps=3")
    assert result.returncode == 2 and "clip:steps=100" in result.stderr


def test_config_show_applies_overrides():
    result = mmpipe("config", "show", "--config", "configs/demo.yaml", "crawl.threads=7")
    assert result.returncode == 0, result.stderr
    assert "threads: 7" in result.stdout


def test_config_errors_are_one_clear_message_without_traceback():
    result = mmpipe("build", "--config", "configs/demo.yaml", "crawl.threads=many")
    assert result.returncode == 2
    assert "crawl.threads = 'many'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_url_list_is_a_clear_error(tmp_path):
    env = {"MMPIPE_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = mmpipe(
        "build", "--config", "configs/demo.yaml", f"urls={tmp_path}/none.parquet", env=env
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"mmpipe: error: URL list {tmp_path}/none.parquet does not exist"
    )


def test_empty_url_lists_and_unreachable_stores_are_refused_before_any_task(tmp_path):
    env = {"MMPIPE_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    (tmp_path / "empty.csv").write_text("url,caption\n")
    (tmp_path / "one.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    build = ["build", "--config", "configs/demo.yaml"]
    empty = mmpipe(*build, f"urls={tmp_path}/empty.csv", env=env)
    assert empty.returncode == 2
    assert (
        empty.stderr.strip()
        == f"mmpipe: error: URL list {tmp_path}/empty.csv has no rows: nothing to build"
    )

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    down = mmpipe(
        *build, f"urls={tmp_path}/one.txt", "crawl.caption_col=null", "store.url=s3://b/p",
        f"store.s3.endpoint_url={endpoint}", "store.s3.access_key_id=t",
        "store.s3.secret_access_key=t", "store.s3.region=us-east-1", env=env,
    )  # fmt: skip
    assert down.returncode == 2
    [line] = down.stderr.strip().splitlines()
    assert line.startswith(f"mmpipe: error: cannot reach S3 endpoint {endpoint} for s3://b/p")
    assert time.monotonic() - started < 30  # one probe, no Prefect, no retries


@pytest.mark.slow
def test_demo_serves_crawls_reports_and_stops_the_server(tmp_path):
    env = {"MMPIPE_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = mmpipe("demo", "--n", "120", "--seed", "1", "--no-train", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "crawl of demo: 120 URLs" in result.stdout
    assert f"file://{tmp_path}/store/staging/demo/crawl" in result.stdout
    assert "url_policy" in result.stdout and "deadline_exceeded" in result.stdout
    port = json.loads((tmp_path / "sampleweb" / "ready.json").read_text())["port"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


def test_project_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    store = ["--store", f"file://{tmp_path}/store"]
    quiet = mmpipe("datasets", "show", "../../../etc@v1", *store)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [
        "mmpipe: error: invalid store key 'datasets/../../../etc/v1/manifest.json': empty, '.' "
        "or '..' path segment"
    ]
    debug = mmpipe("--debug", "datasets", "show", "../../../etc@v1", *store)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "InvalidKey" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("mmpipe: error: invalid store key")


def test_datasets_verify_names_each_shard_that_differs_from_the_manifest(tmp_path):
    from dataprep.store import open_store
    from tests.dataprep.test_publish import flip_a_byte, publish_staged, write_staging

    store = open_store(f"file://{tmp_path}/store")
    write_staging(store)
    manifest = publish_staged(store, 20, tmp_path / "work")
    verify = ("datasets", "verify", f"d@{manifest.version}", "--store", store.root_uri)
    intact = mmpipe(*verify)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.startswith("d@v1: all 3 shards (") and "match" in intact.stdout

    flip_a_byte(store, "datasets/d/v1/00001.tar")
    store.delete("datasets/d/v1/00002.tar")
    altered = mmpipe(*verify)
    assert altered.returncode == 2
    lines = altered.stderr.splitlines()
    manifest_uri = store.uri("datasets/d/v1/manifest.json")
    assert lines[0] == f"mmpipe: error: d@v1 does not match its manifest {manifest_uri}:"
    assert lines[1].startswith(f"  {store.uri('datasets/d/v1/00001.tar')}: sha256 ")
    assert lines[2] == f"  {store.uri('datasets/d/v1/00002.tar')}: missing"
    assert "00000.tar" not in altered.stderr and "Traceback" not in altered.stderr


def test_train_with_inconsistent_batch_sizes_fails_fast_and_clearly():
    started = time.monotonic()
    result = mmpipe(
        "train", "clip", "--config", "configs/clip-tiny.yaml", "engine.train_batch_size=100"
    )
    assert result.returncode == 2
    assert "engine.train_batch_size = 100 but micro_batch_size" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30  # no Ray, no workers


def test_train_with_missing_inputs_fails_fast_and_clearly(tmp_path):
    started = time.monotonic()
    result = mmpipe(
        "train", "dalle", "--config", "configs/dalle-tiny.yaml", "--data", f"file://{tmp_path}/"
    )
    assert result.returncode == 2
    assert f"mmpipe: error: no shards found in file://{tmp_path}/" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30  # no Ray, no workers


def test_train_on_a_corrupt_tar_fails_fast_in_one_line(local_store):
    from tests.training.test_data import write_dataset

    uris = write_dataset(local_store, "ds", shards=2)
    local_store.put_bytes("ds/00001.tar", b"\x00garbage" * 100)
    started = time.monotonic()
    result = mmpipe(
        "train", "clip", "--config", "configs/clip-tiny.yaml", "--data", local_store.uri("ds") + "/"
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"mmpipe: error: shard {uris[1]} is not a readable tar file")
    assert time.monotonic() - started < 30  # no Ray, no workers


def test_generate_arguments_make_its_config():
    from pipelines.cli import build_parser, generate_config_from_args

    args = build_parser().parse_args(
        ["generate", "--checkpoint", "dalle.pt", "--heldout", "128", "--heldout-seed", "2000"]
        + ["--top-k", "64", "a small red circle"]
    )
    cfg = generate_config_from_args(args)
    assert (cfg.heldout, cfg.heldout_seed, cfg.sampling.top_k) == (128, 2000, 64)
    assert cfg.captions == ["a small red circle"] and cfg.sampling.top_p is None


def test_generate_takes_captions_alone():
    """The README's form: captions and no --heldout (validated with the captions in)."""
    from pipelines.cli import build_parser, generate_config_from_args

    captions = ["a large red circle in the center on a white background", "star: blue, small"]
    args = build_parser().parse_args(["generate", "--checkpoint", "dalle.pt", *captions])
    cfg = generate_config_from_args(args)
    assert cfg.captions == captions and cfg.heldout == 0


def test_encode_codes_and_generate_refuse_missing_checkpoints_in_one_line(tmp_path):
    missing = f"file://{tmp_path}/dvae.pt"
    encode = mmpipe("encode-codes", "--dvae", missing, "--data", f"file://{tmp_path}/", "--out",
                    f"file://{tmp_path}/codes/")  # fmt: skip
    assert encode.returncode == 2, encode.stderr[-2000:]
    assert f"mmpipe: error: dvae_checkpoint (--dvae) not found: {missing}" in encode.stderr
    generate = mmpipe("generate", "--checkpoint", str(tmp_path / "dalle.pt"), "a red circle")
    assert generate.returncode == 2, generate.stderr[-2000:]
    assert f"dalle_checkpoint (--checkpoint) not found: {tmp_path}/dalle.pt" in generate.stderr
    assert "Traceback" not in encode.stderr + generate.stderr


HEAVY = {"torch", "ray", "prefect", "deepspeed", "img2dataset", "open_clip", "webdataset", "pandas"}
LIGHT_COMMANDS = [
    ["--help"],
    ["train", "--help"],
    ["build", "--config", "configs/demo.yaml", "crawl.threads=many"],
    ["train", "clip", "--config", "configs/clip-tiny.yaml", "steps=many"],
]


def test_help_and_config_errors_import_nothing_heavy():
    code = f"""
import contextlib, io, sys
from pipelines.cli import main
for argv in {LIGHT_COMMANDS!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            assert main(argv) == 2
        except SystemExit as exit:
            assert exit.code == 0
print(sorted(set(sys.modules) & {HEAVY!r}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_help_is_quick():
    mmpipe_script = Path(sys.executable).parent / "mmpipe"
    for args in (["--help"], ["train", "--help"]):
        started = time.monotonic()
        result = subprocess.run([mmpipe_script, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 5  # generous: under 1.5 s on a quiet machine


@pytest.mark.slow
def test_train_starts_its_own_ray_despite_a_stale_record_and_stays_quiet(local_store, tmp_path):
    import os

    from tests.dataprep.test_ray_session import stale_ray_tmpdir
    from tests.training.test_engine import write_shards

    write_shards(local_store, "data")
    ray_tmp = stale_ray_tmpdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(ray_tmp), "MMPIPE_STATE_DIR": str(tmp_path / "state")}
    result = mmpipe(
        "train", "clip", "--config", "configs/clip-tiny.yaml",
        "--data", f"{local_store.root_uri}/data/", f"store.url={local_store.root_uri}",
        "name=stale", "steps=2", "log_every=1", "scale.num_workers=1", "data.workers=0",
        "eval.heldout_samples=16", "engine.micro_batch_size=16",
        env=env, timeout=300,
    )  # fmt: skip
    subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert local_store.list("runs/stale/export/")
    # No Ray Train monitor warnings: neither the wall of state-API queries nor a failed stop.
    assert "PlacementGroupCleaner" not in result.stdout + result.stderr
    assert "Ray Train Controller" not in result.stdout + result.stderr


@pytest.mark.slow
def test_train_on_an_altered_published_shard_fails_in_one_line(local_store, tmp_path):
    import hashlib
    import os

    from tests.training.test_engine import write_shards

    write_shards(local_store, "data")
    shards = []
    for key in sorted(k for k in local_store.list("data/") if k.endswith(".tar")):
        data = bytearray(local_store.get_bytes(key))
        digest = hashlib.sha256(data).hexdigest()
        shards.append({"path": key.removeprefix("data/"), "samples": 96, "sha256": digest})
        data[512 + 5] ^= 0xFF  # inside the first member's bytes: the tar still reads
        local_store.put_bytes(key, bytes(data))
    local_store.put_bytes("data/manifest.json", json.dumps({"shards": shards}).encode())
    env = {**os.environ, "MMPIPE_STATE_DIR": str(tmp_path / "state")}
    result = mmpipe(
        "train", "clip", "--config", "configs/clip-tiny.yaml",
        "--data", local_store.uri("data/manifest.json"), f"store.url={local_store.root_uri}",
        "name=altered", "steps=4", "scale.num_workers=1", "scale.max_failures=0",
        "data.workers=0", "engine.micro_batch_size=32",
        env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("mmpipe: error:")]
    assert re.match(
        rf"mmpipe: error: shard {local_store.root_uri}/data/\d+\.tar does not match", line
    )
    assert "Traceback" not in result.stdout + result.stderr  # the run lines name the error
