"""Reading URL lists in each format."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep.crawl import CrawlConfig, CrawlError, input_key, prepare_crawl
from dataprep.url_list import UrlListError, check_url_list, read_url_list


def test_txt_list_needs_no_caption_column(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_bytes("http://a/1.jpg\n\n  http://a/图.jpg  \n".encode())
    check_url_list(str(path))  # the default caption_col ("caption") is not required
    table = read_url_list(str(path))
    assert table.to_pydict() == {"url": ["http://a/1.jpg", "http://a/图.jpg"], "caption": ["", ""]}


def test_other_formats_still_require_a_named_caption_column(tmp_path):
    path = tmp_path / "urls.csv"
    path.write_text("url\nhttp://a/1.jpg\n")
    with pytest.raises(UrlListError, match="no column 'caption'"):
        check_url_list(str(path))
    assert read_url_list(str(path), caption_col=None)["caption"].to_pylist() == [""]


def write_parts(folder, rows: int, parts: int) -> list[dict]:
    """``rows`` rows over ``parts`` parquet files named in order; returns the rows."""
    folder.mkdir(parents=True, exist_ok=True)
    data = [{"URL": f"http://a/{i}.jpg", "TEXT": f"caption {i}"} for i in range(rows)]
    step = -(-rows // parts)
    for p in range(parts):
        part = pa.Table.from_pylist(data[p * step : (p + 1) * step])
        pq.write_table(part, folder / f"{p:03d}.parquet")
    return data


def test_a_folder_a_glob_and_s3_parts_read_as_one_list_in_order(tmp_path, s3_store):
    data = write_parts(tmp_path / "laion", rows=25, parts=3)
    (tmp_path / "laion" / "_SUCCESS").write_text("")  # not a part
    expected = [r["URL"] for r in data]
    for uri in (str(tmp_path / "laion"), f"{tmp_path}/laion/*.parquet"):
        assert read_url_list(uri, "URL", "TEXT")["url"].to_pylist() == expected
    for part in sorted((tmp_path / "laion").glob("*.parquet")):
        s3_store.put_file(f"urls/{part.name}", part)
    for uri in (s3_store.uri("urls"), s3_store.uri("urls/0*.parquet")):
        check_url_list(uri, "URL", "TEXT", s3_store.settings)
        table = read_url_list(uri, "URL", "TEXT", s3_store.settings)
        assert table["url"].to_pylist() == expected
        assert table["caption"].to_pylist()[-1] == "caption 24"


def test_the_plan_slices_the_list_once_whatever_its_parts(tmp_path, local_store):
    write_parts(tmp_path / "three", rows=25, parts=3)
    write_parts(tmp_path / "one", rows=25, parts=1)
    cfg = CrawlConfig(url_col="URL", caption_col="TEXT", samples_per_shard=10)
    plans = [
        prepare_crawl(str(tmp_path / name), local_store, f"staging/{name}/crawl", cfg)
        for name in ("three", "one")
    ]
    assert plans[0].fingerprint == plans[1].fingerprint and plans[0].shards == 3
    assert [plans[0].shard_rows(s) for s in range(3)] == [(0, 10), (10, 20), (20, 25)]
    slice_2 = local_store.get_bytes(input_key("staging/three/crawl", 2))
    assert pq.read_table(io.BytesIO(slice_2))["url"].to_pylist()[0] == "http://a/20.jpg"
    write_parts(tmp_path / "changed", rows=26, parts=2)
    with pytest.raises(CrawlError, match="another URL list"):
        prepare_crawl(str(tmp_path / "changed"), local_store, "staging/one/crawl", cfg)


def test_bad_parts_are_named_before_anything_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UrlListError, match=f"URL list {tmp_path}/empty holds no parquet"):
        check_url_list(str(tmp_path / "empty"))
    write_parts(tmp_path / "parts", rows=4, parts=2)
    (tmp_path / "parts" / "002.csv").write_text("link,caption\nhttp://a/x.jpg,x\n")
    with pytest.raises(UrlListError, match=f"part {tmp_path}/parts/002.csv has no column 'URL'"):
        check_url_list(str(tmp_path / "parts"), "URL", "TEXT")
    (tmp_path / "parts" / "002.csv").unlink()
    (tmp_path / "parts" / "001.parquet").write_bytes(b"not parquet")
    match = f"cannot read URL list part {tmp_path}/parts/001.parquet as parquet"
    with pytest.raises(UrlListError, match=match):
        check_url_list(str(tmp_path / "parts"), "URL", "TEXT")
    with pytest.raises(UrlListError, match=match):
        read_url_list(str(tmp_path / "parts"), "URL", "TEXT")
