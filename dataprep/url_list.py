"""Reading URL lists: parquet, csv, tsv, jsonl or txt files with `url` and `caption` columns.

A txt list is one URL per line and has no captions: its samples get "".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from dataprep.errors import MmpipeError
from dataprep.store import local_path

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")


class UrlListError(MmpipeError, ValueError):
    """A URL list that cannot be read; the message names the file and the fix."""


def _local_file(uri: str) -> Path:
    """The URL list's path; UrlListError if it is not a local file."""
    path = local_path(uri)
    if path is None or not path.is_file():
        raise UrlListError(f"URL list {uri} does not exist")
    return path


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    fmt = {"json": "jsonl", "ndjson": "jsonl"}.get(suffix, suffix)
    if fmt not in FORMATS:
        raise UrlListError(f"{path}: unknown URL list format {suffix!r}; use one of {FORMATS}")
    return fmt


def read_url_list(uri: str, url_col: str = "url", caption_col: str | None = "caption") -> pa.Table:
    """Read a URL list as a table with string columns `url` and `caption` (in input order).

    Rows keep their order, since a crawl's shard i is rows [i*N, (i+1)*N). A missing caption
    column is an error when `caption_col` is set, except in txt lists, which have none; null
    captions become "".
    """
    path = _local_file(uri)
    fmt = detect_format(path)
    table = _read(path, fmt, url_col)
    if fmt == "txt":
        caption_col = None
    for col in (url_col, caption_col):
        if col is not None and col not in table.column_names:
            raise UrlListError(
                f"URL list {uri} has no column {col!r} (columns: {table.column_names}); "
                "set crawl.url_col / crawl.caption_col"
            )
    urls = pc.fill_null(table[url_col].cast(pa.string()), "")
    if caption_col is None:
        captions = pa.array([""] * table.num_rows, pa.string())
    else:
        captions = pc.fill_null(table[caption_col].cast(pa.string()), "")
    return pa.table({"url": urls, "caption": captions})


def check_url_list(uri: str, url_col: str = "url", caption_col: str | None = "caption") -> None:
    """Fail fast, before any flow starts, on a URL list that is missing, empty or lacks its
    columns."""
    path = _local_file(uri)
    if detect_format(path) == "parquet":
        try:
            metadata = pq.read_metadata(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise UrlListError(f"cannot read URL list {uri} as parquet: {err}") from None
        names = metadata.schema.names
        missing = [c for c in (url_col, caption_col) if c is not None and c not in names]
        if missing:
            raise UrlListError(
                f"URL list {uri} has no column {missing[0]!r} (columns: {names}); "
                "set crawl.url_col / crawl.caption_col"
            )
        rows = metadata.num_rows
    else:
        rows = len(read_url_list(uri, url_col, caption_col))
    if rows == 0:
        raise UrlListError(f"URL list {uri} has no rows: nothing to build")


def _read(path: Path, fmt: str, url_col: str) -> pa.Table:
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt == "csv":
            return pa_csv.read_csv(path)
        if fmt == "tsv":
            return pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter="\t"))
        if fmt == "jsonl":
            return pa_json.read_json(path)
        lines = [
            line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        return pa.table({url_col: pa.array(lines, pa.string())})
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        raise UrlListError(f"cannot read URL list {path} as {fmt}: {err}") from None


def fingerprint(table: pa.Table) -> str:
    """sha256 over urls and captions, in order: identifies a crawl's input for resume."""
    digest = hashlib.sha256()
    for batch in table.to_batches(max_chunksize=65_536):
        for url, caption in zip(
            batch.column("url").to_pylist(), batch.column("caption").to_pylist(), strict=True
        ):
            digest.update(url.encode() + b"\0" + caption.encode() + b"\n")
    return digest.hexdigest()
