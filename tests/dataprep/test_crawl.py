"""The crawl stage against the sample web on loopback: real img2dataset, real HTTP."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from dataprep.crawl import CrawlConfig, CrawlError, crawl_shards, prepare_crawl, summarize
from dataprep.sampleweb import ZOO_CASES, write_zoo_url_list
from dataprep.store import open_store
from dataprep.url_policy import UrlPolicy

PREFIX = "staging/test/crawl"

# What a correct crawl makes of each injected fault. Caption and duplicate faults are kept:
# later stages (filters, CLIP score, dedup) deal with them.
EXPECTED_REASON = {
    None: "success",
    "slow": "success",
    "redirect_ok": "success",
    "exact_duplicate": "success",
    "near_duplicate": "success",
    "mismatched_caption": "success",
    "empty_caption": "success",
    "http_404": "http_404",
    "http_500": "http_500",
    "slow_drip": "deadline_exceeded",
    "not_image": "decode_error",
    "truncated_jpeg": "truncated_image",
    "corrupt_jpeg": "decode_error",
    "decompression_bomb": "decompression_bomb",
    "tiny_image": "image_too_small",
    "extreme_aspect": "aspect_ratio",
    "forbidden_redirect": "url_policy",
}


@pytest.fixture(scope="module")
def web(sample_web):
    return sample_web.specs, sample_web.server, sample_web.urls


def crawl_config(server, **overrides) -> CrawlConfig:
    settings = dict(
        image_size=32,
        samples_per_shard=60,
        processes=2,
        threads=16,
        timeout_s=5,
        deadline_s=2,
        min_image_size=16,
        max_aspect_ratio=4,
        policy=UrlPolicy(allow=[f"127.0.0.1:{server.port}"]),
    )
    return CrawlConfig(**(settings | overrides))


def crawl_all(store, urls, cfg, work):
    plan = prepare_crawl(urls, store, PREFIX, cfg)
    return plan, crawl_shards(plan, list(range(plan.shards)), store, PREFIX, cfg, work)


def sample_table(store, shards):
    tables = [
        pq.read_table(io.BytesIO(store.get_bytes(f"{PREFIX}/{s:05d}.parquet"))) for s in shards
    ]
    return [
        row
        for t in tables
        for row in t.select(["key", "url", "caption", "status", "reason"]).to_pylist()
    ]


def tar_samples(store, shard):
    """{key: {extension: bytes}} of one WebDataset shard."""
    samples = {}
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(f"{PREFIX}/{shard:05d}.tar"))) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def crawled(web, tmp_path_factory):
    specs, server, urls = web
    store = open_store(f"file://{tmp_path_factory.mktemp('store')}")
    plan, stats = crawl_all(store, urls, crawl_config(server), tmp_path_factory.mktemp("work"))
    return specs, server, urls, store, plan, stats


def test_every_url_is_accounted_for(crawled):
    specs, _, _, store, plan, stats = crawled
    summary = summarize(stats)
    assert plan.rows == len(specs) == summary.count
    assert sum(summary.by_status.values()) == sum(summary.by_reason.values()) == len(specs)
    rows = sample_table(store, range(plan.shards))
    assert len(rows) == len({r["key"] for r in rows}) == len(specs)
    for s in stats:
        assert sum(s.by_reason.values()) == s.count
        assert s.count == plan.shard_rows(s.shard)[1] - plan.shard_rows(s.shard)[0]


def test_each_fault_ends_with_its_expected_reason(crawled):
    specs, server, _, store, plan, _ = crawled
    by_url = {server.base_url + s.path: s for s in specs}
    outcomes = Counter()
    for row in sample_table(store, range(plan.shards)):
        fault = by_url[row["url"]].fault
        outcomes[(fault, row["reason"])] += 1
        assert row["reason"] == EXPECTED_REASON[fault], (row["url"], fault, row)
    assert {fault for fault, _ in outcomes} == set(EXPECTED_REASON), "every fault kind exercised"


def test_shards_hold_exactly_the_kept_samples(crawled):
    specs, server, _, store, plan, _ = crawled
    by_url = {server.base_url + s.path: s for s in specs}
    rows = sample_table(store, range(plan.shards))
    for shard in range(plan.shards):
        samples = tar_samples(store, shard)
        kept = {
            r["key"]: r
            for r in rows
            if r["status"] == "success" and r["key"].startswith(f"{shard:05d}")
        }
        assert set(samples) == set(kept)
        for key, files in samples.items():
            assert set(files) == {"jpg", "txt", "json"}
            assert files["txt"].decode() == by_url[kept[key]["url"]].caption
            meta = json.loads(files["json"])
            assert (meta["width"], meta["height"]) == (32, 32)
            assert meta["key"] == key and len(meta["sha256"]) == 64


def test_rerun_skips_committed_shards(crawled, tmp_path):
    _, server, urls, store, plan, stats = crawled
    before = {k: store.get_bytes(k) for k in store.list(PREFIX)}
    started = time.monotonic()
    again = crawl_shards(
        plan, list(range(plan.shards)), store, PREFIX, crawl_config(server), tmp_path
    )
    assert time.monotonic() - started < 2, "nothing was crawled again"
    assert again == stats
    assert {k: store.get_bytes(k) for k in store.list(PREFIX)} == before


def test_a_different_input_under_the_same_name_is_refused(crawled):
    _, server, urls, store, _, _ = crawled
    with pytest.raises(CrawlError, match="another URL list or with other output settings"):
        prepare_crawl(urls, store, PREFIX, crawl_config(server, image_size=64))


@pytest.fixture(scope="module")
def zoo_crawled(web, tmp_path_factory):
    """The URL zoo (opt-in odd URLs, each with its expected reason), crawled on its own."""
    _, server, _ = web
    folder = tmp_path_factory.mktemp("zoo")
    urls = write_zoo_url_list(server.host, server.port, folder / "zoo.parquet")
    store = open_store(f"file://{folder / 'store'}")
    plan, stats = crawl_all(store, str(urls), crawl_config(server), folder / "work")
    return server, store, plan, stats


def test_url_zoo_each_case_ends_with_its_expected_reason(zoo_crawled):
    server, store, plan, stats = zoo_crawled
    cases = {c.url_for(server.host, server.port): c for c in ZOO_CASES}
    rows = sample_table(store, range(plan.shards))
    assert sorted(r["url"] for r in rows) == sorted(cases)
    outcomes = {cases[r["url"]].name: r["reason"] for r in rows}
    assert outcomes == {c.name: c.expected for c in ZOO_CASES}
    kept = [c for c in ZOO_CASES if c.expected == "success"]
    assert (
        summarize(stats).kept
        == len(kept)
        == sum(len(tar_samples(store, s)) for s in range(plan.shards))
    )


def test_txt_list_is_crawled_without_captions(web, tmp_path):
    _, server, _ = web
    path = tmp_path / "urls.txt"
    zoo = {c.name: c.url_for(server.host, server.port) for c in ZOO_CASES}
    path.write_text("".join(zoo[name].strip() + "\n" for name in ("iri_query", "gzip", "space")))
    store = open_store(f"file://{tmp_path / 'store'}")
    plan, stats = crawl_all(store, str(path), crawl_config(server), tmp_path / "work")
    assert summarize(stats).kept == 3
    assert {files["txt"] for files in tar_samples(store, 0).values()} == {b""}


RESUME_SCRIPT = """
import json, sys
from pathlib import Path
from dataprep.crawl import CrawlConfig, crawl_shards, prepare_crawl
from dataprep.store import open_store
args = json.loads(sys.argv[1])
store = open_store(args["store"])
cfg = CrawlConfig.model_validate(args["cfg"])
plan = prepare_crawl(args["urls"], store, args["prefix"], cfg)
crawl_shards(plan, list(range(plan.shards)), store, args["prefix"], cfg, Path(args["work"]))
"""


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_crawl(crawled, tmp_path):
    _, server, urls, reference, plan, _ = crawled
    cfg = crawl_config(server, processes=1)
    store_url = f"file://{tmp_path / 'store'}"
    args = {"store": store_url, "cfg": cfg.model_dump(mode="json"), "urls": urls}
    args |= {"prefix": PREFIX, "work": str(tmp_path / "work")}
    proc = subprocess.Popen(
        [sys.executable, "-c", RESUME_SCRIPT, json.dumps(args)], start_new_session=True
    )
    store = open_store(store_url)
    deadline = time.monotonic() + 300  # a loaded CI machine starts slowly
    while not store.exists(f"{PREFIX}/00000.stats.json"):
        assert proc.poll() is None, "crawl ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the crawl and its download processes, mid-run
    proc.wait()
    done = [k for k in store.list(PREFIX) if k.endswith(".stats.json")]
    assert 1 <= len(done) < plan.shards, "killed mid-run"

    _, stats = crawl_all(store, urls, cfg, tmp_path / "work")
    assert summarize(stats).count == plan.rows
    rows = sample_table(store, range(plan.shards))
    assert len(rows) == len({r["key"] for r in rows}) == plan.rows
    assert rows == sample_table(reference, range(plan.shards))
    for shard in range(plan.shards):
        assert set(tar_samples(store, shard)) == set(tar_samples(reference, shard))


@pytest.mark.slow
def test_crawl_into_s3(web, s3_store, tmp_path):
    specs, server, urls = web
    cfg = crawl_config(server, samples_per_shard=120)
    plan, stats = crawl_all(s3_store, urls, cfg, tmp_path)
    assert summarize(stats).count == len(specs)
    keys = s3_store.list(PREFIX)
    assert keys == sorted(
        [f"{PREFIX}/_plan.json"]
        + [
            f"{PREFIX}/{s:05d}.{ext}"
            for s in range(plan.shards)
            for ext in ("parquet", "stats.json", "tar")
        ]
    )
    assert len(tar_samples(s3_store, 0)) == stats[0].kept > 0
