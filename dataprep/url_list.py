"""Reading URL lists: parquet, csv, tsv, jsonl or txt parts with `url` and `caption` columns.

A URL list is one file, a folder of parts or a glob of parts (LAION publishes hundreds of
parquet parts), local or in S3 (``s3://bucket/laion/*.parquet``); parts are read in name order,
one at a time. A txt part is one URL per line and has no captions: its samples get "".
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from dataprep.errors import MmpipeError
from dataprep.store import LocalStore, ObjectStore, S3Settings, StoreError, local_path, open_store

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")
_GLOB = set("*?[")


class UrlListError(MmpipeError, ValueError):
    """A URL list that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class Part:
    """One file of a URL list."""

    uri: str
    store: ObjectStore
    key: str

    @property
    def format(self) -> str:
        return detect_format(Path(self.key))


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    fmt = {"json": "jsonl", "ndjson": "jsonl"}.get(suffix, suffix)
    if fmt not in FORMATS:
        raise UrlListError(f"{path}: unknown URL list format {suffix!r}; use one of {FORMATS}")
    return fmt


def list_parts(uri: str, s3: S3Settings | None = None) -> list[Part]:
    """The parts of a URL list in name order: the file itself, a folder's files or a glob's."""
    path = local_path(uri)
    if path is not None:
        return _local_parts(uri, path)
    scheme, _, rest = uri.partition("://")
    bucket, _, pattern = rest.partition("/")
    try:
        store = open_store(f"{scheme}://{bucket}", s3)
        if pattern and not _GLOB & set(pattern) and store.exists(pattern):
            return [Part(uri, store, pattern)]
        if _GLOB & set(pattern):
            fixed = pattern[: min(pattern.index(c) for c in _GLOB & set(pattern))]
            keys = [k for k in store.list(fixed) if fnmatch.fnmatchcase(k, pattern)]
        else:
            keys = store.list(pattern.rstrip("/") + "/" if pattern else "")
    except (StoreError, ValueError) as err:
        raise UrlListError(f"cannot list URL list {uri}: {err}") from None
    return _parts(uri, [Part(store.uri(k), store, k) for k in keys])


def _local_parts(uri: str, path: Path) -> list[Part]:
    root = LocalStore("/")
    if path.is_file():
        return [Part(uri, root, str(path.resolve()).lstrip("/"))]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    elif _GLOB & set(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
    else:
        raise UrlListError(f"URL list {uri} does not exist")
    return _parts(uri, [Part(str(p), root, str(p.resolve()).lstrip("/")) for p in files])


def _parts(uri: str, parts: list[Part]) -> list[Part]:
    """Only data files count as parts (not _SUCCESS or .crc files); none is an error."""
    parts = [p for p in parts if not Path(p.key).name.startswith(("_", "."))]
    parts = [p for p in parts if Path(p.key).suffix.lower().lstrip(".") in {*FORMATS, "json"}]
    if not parts:
        raise UrlListError(f"URL list {uri} holds no {'/'.join(FORMATS)} files")
    return parts


def read_url_list(
    uri: str,
    url_col: str = "url",
    caption_col: str | None = "caption",
    s3: S3Settings | None = None,
) -> pa.Table:
    """The whole URL list as one table with string columns `url` and `caption`, in order."""
    tables = [table for _, table in iter_url_parts(uri, url_col, caption_col, s3)]
    return pa.concat_tables(tables)


def iter_url_parts(
    uri: str,
    url_col: str = "url",
    caption_col: str | None = "caption",
    s3: S3Settings | None = None,
) -> Iterator[tuple[Part, pa.Table]]:
    """Each part as a table with string columns `url` and `caption` (rows in input order).

    Rows keep their order, since a crawl's shard i is rows [i*N, (i+1)*N). A missing caption
    column is an error when `caption_col` is set, except in txt parts, which have none; null
    captions become "".
    """
    for part in list_parts(uri, s3):
        yield part, _normalised(part, _read(part, url_col), url_col, caption_col)


def _normalised(part: Part, table: pa.Table, url_col: str, caption_col: str | None) -> pa.Table:
    if part.format == "txt":
        caption_col = None
    for col in (url_col, caption_col):
        if col is not None and col not in table.column_names:
            raise UrlListError(
                f"URL list part {part.uri} has no column {col!r} (columns: "
                f"{table.column_names}); set crawl.url_col / crawl.caption_col"
            )
    urls = pc.fill_null(table[url_col].cast(pa.string()), "")
    if caption_col is None:
        captions = pa.array([""] * table.num_rows, pa.string())
    else:
        captions = pc.fill_null(table[caption_col].cast(pa.string()), "")
    return pa.table({"url": urls, "caption": captions})


def check_url_list(
    uri: str,
    url_col: str = "url",
    caption_col: str | None = "caption",
    s3: S3Settings | None = None,
) -> None:
    """Fail fast, before any flow starts, on a URL list that is missing or empty, or has a part
    that is unreadable or lacks its columns (parquet parts: only their footers are read)."""
    rows = 0
    for part in list_parts(uri, s3):
        if part.format != "parquet":
            rows += _normalised(part, _read(part, url_col), url_col, caption_col).num_rows
            continue
        fs, path = part.store.arrow_filesystem(part.key)
        try:
            metadata = pq.read_metadata(path, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as err:
            raise UrlListError(f"cannot read URL list part {part.uri} as parquet: {err}") from None
        names = metadata.schema.names
        missing = [c for c in (url_col, caption_col) if c is not None and c not in names]
        if missing:
            raise UrlListError(
                f"URL list part {part.uri} has no column {missing[0]!r} (columns: {names}); "
                "set crawl.url_col / crawl.caption_col"
            )
        rows += metadata.num_rows
    if rows == 0:
        raise UrlListError(f"URL list {uri} has no rows: nothing to build")


def _read(part: Part, url_col: str) -> pa.Table:
    fmt = part.format
    try:
        data = part.store.get_bytes(part.key)
        if fmt == "parquet":
            return pq.read_table(io.BytesIO(data))
        if fmt == "csv":
            return pa_csv.read_csv(io.BytesIO(data))
        if fmt == "tsv":
            options = pa_csv.ParseOptions(delimiter="\t")
            return pa_csv.read_csv(io.BytesIO(data), parse_options=options)
        if fmt == "jsonl":
            return pa_json.read_json(io.BytesIO(data))
        lines = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
        return pa.table({url_col: pa.array(lines, pa.string())})
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError, StoreError) as err:
        raise UrlListError(f"cannot read URL list part {part.uri} as {fmt}: {err}") from None


def shard_slices(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` in order, cut into slices of ``rows`` (the last may be shorter)."""
    held: list[pa.Table] = []
    count = 0
    for table in tables:
        while table.num_rows:
            take = min(rows - count, table.num_rows)
            held.append(table.slice(0, take))
            count += take
            table = table.slice(take)
            if count == rows:
                yield pa.concat_tables(held).combine_chunks()
                held, count = [], 0
    if count:
        yield pa.concat_tables(held).combine_chunks()


def slice_digest(table: pa.Table) -> bytes:
    """sha256 of a slice's urls and captions (their lengths and bytes), from Arrow's buffers."""
    digest = hashlib.sha256()
    for name in ("url", "caption"):
        for chunk in table[name].chunks:
            offsets = np.frombuffer(
                chunk.buffers()[1], np.int32, count=len(chunk) + 1, offset=4 * chunk.offset
            )
            digest.update(np.diff(offsets).astype("<i4").tobytes())
            data = chunk.buffers()[2]
            if data is not None:
                digest.update(memoryview(data)[offsets[0] : offsets[-1]])
    return digest.digest()
