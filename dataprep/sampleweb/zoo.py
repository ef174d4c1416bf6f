"""The URL zoo: URLs as real lists hold them, each with the outcome a correct crawler gives.

LAION and DataComp lists hold IRIs, spaces, fragments, credentials, odd schemes and servers that
compress, cut or bounce their answers. Each `ZooCase` is one such URL and the crawl's expected
`reason` for it (`success` when the image must be kept).

The zoo is opt-in: the sample web's server always answers the `/zoo/` routes, but only
`write_zoo_url_list` names them, so the default corpus and its URL list do not change.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.sampleweb.corpus import generate_corpus, render_image

ZOO_PREFIX = "/zoo/"
CRAWLER_MAX_REDIRECTS = 10  # the crawler's limit (safe_http.FetchGuard): chains either side of it
GZIP_BOMB_MIB = 64  # decoded: twice crawl.max_body_mb's default; zeros deflate ~1000:1
IRI_PATH = "/zoo/图片/猫.jpg"
IRI_QUERY = "lang=中文"
LONG_URL_CHARS = 16_000  # far past the 2,083 of old browsers, well within servers' 64 KB


@dataclass(frozen=True)
class ZooCase:
    """One URL of the zoo and what a correct crawl makes of it."""

    name: str
    # a template: {base} = http://HOST:PORT, {host}, {port}, {wide} = HOST in full-width
    # characters, {other} = another loopback address (refused), {wide_other} = it in full-width
    url: str
    expected: str  # "success" (kept) or the drop reason
    about: str

    def url_for(self, host: str, port: int) -> str:
        other = other_loopback(host)
        return self.url.format(
            base=f"http://{host}:{port}",
            host=host,
            port=port,
            wide=full_width(host),
            other=other,
            wide_other=full_width(other),
        )


def _long_path() -> str:
    return (
        "/zoo/long/"
        + "segment/" * (LONG_URL_CHARS // 16)
        + "end.jpg?"
        + "k=v&" * (LONG_URL_CHARS // 8)
    )


ZOO_CASES: tuple[ZooCase, ...] = (
    ZooCase("explicit_port", "{base}/zoo/ok.jpg", "success", "the control: every URL names a port"),
    ZooCase("iri_query", "{base}/zoo/query.jpg?" + IRI_QUERY, "success", "non-ASCII query"),
    ZooCase("iri_path", "{base}" + IRI_PATH, "success", "non-ASCII path, sent as UTF-8"),
    ZooCase("iri_host", "http://{wide}:{port}/zoo/ok.jpg", "success", "full-width host (IDNA)"),
    ZooCase(
        "iri_host_refused",
        "http://{wide_other}:{port}/zoo/ok.jpg",
        "url_policy",
        "a full-width host that IDNA maps to a refused address",
    ),
    ZooCase("space", "{base}/zoo/with space.jpg", "success", "a space in the path"),
    ZooCase("encoded", "{base}/zoo/with%20space.jpg", "success", "already encoded: not twice"),
    ZooCase("padded", "  {base}/zoo/ok.jpg\n", "success", "spaces and a newline around the URL"),
    ZooCase("fragment", "{base}/zoo/ok.jpg#section-2", "success", "the fragment is never sent"),
    ZooCase("uppercase_scheme", "HTTP://{host}:{port}/zoo/ok.jpg", "success", "HTTP://"),
    ZooCase("bad_port", "http://{host}:{port}x/zoo/ok.jpg", "invalid_url", "a port not a number"),
    ZooCase(
        "userinfo",
        "http://user:secret@{host}:{port}/zoo/ok.jpg",
        "success",
        "credentials are dropped, never sent (the server refuses an Authorization header)",
    ),
    ZooCase(
        "userinfo_trick",
        "http://{host}:{port}@{other}:{port}/zoo/ok.jpg",
        "url_policy",
        "reads like HOST but names another address: that one is checked",
    ),
    ZooCase("long_url", "{base}" + _long_path(), "success", f"a URL of {LONG_URL_CHARS:,}+ chars"),
    ZooCase("data_scheme", "data:image/jpeg;base64,/9j/4AAQSkZJRg==", "url_policy", "data:"),
    ZooCase("javascript_scheme", "javascript:alert(1)", "url_policy", "javascript:"),
    ZooCase("gzip", "{base}/zoo/gzip.jpg", "success", "Content-Encoding: gzip"),
    ZooCase("deflate", "{base}/zoo/deflate.jpg", "success", "Content-Encoding: deflate (zlib)"),
    ZooCase("raw_deflate", "{base}/zoo/raw-deflate.jpg", "success", "deflate without zlib wrap"),
    ZooCase(
        "gzip_bomb",
        "{base}/zoo/gzip-bomb.jpg",
        "too_large",
        f"gzip of zeros that expands ~1000-fold, to {GZIP_BOMB_MIB} MiB",
    ),
    ZooCase("bad_gzip", "{base}/zoo/bad-gzip.jpg", "encoding_error", "gzip header, then garbage"),
    ZooCase(
        "short_body",
        "{base}/zoo/short.jpg",
        "incomplete_body",
        "a whole JPEG, but Content-Length promised more and the connection closes",
    ),
    ZooCase(
        "short_chunked",
        "{base}/zoo/short-chunked.jpg",
        "incomplete_body",
        "a whole JPEG in one chunk, then the connection closes before the last chunk",
    ),
    ZooCase("redirect_chain", "{base}/zoo/chain/3", "success", "3 redirects, then the image"),
    ZooCase(
        "redirect_chain_too_long",
        f"{{base}}/zoo/chain/{CRAWLER_MAX_REDIRECTS + 2}",
        "too_many_redirects",
        f"{CRAWLER_MAX_REDIRECTS + 2} redirects, over the crawler's {CRAWLER_MAX_REDIRECTS}",
    ),
    ZooCase("redirect_loop", "{base}/zoo/loop", "too_many_redirects", "a redirect to itself"),
    ZooCase(
        "redirect_to_iri",
        "{base}/zoo/to-iri",
        "success",
        "a Location in raw UTF-8, as servers send it",
    ),
)


def other_loopback(host: str) -> str:
    """A loopback address other than `host`: the crawler's allow-list names only `host`."""
    return "127.0.0.3" if host == "127.0.0.2" else "127.0.0.2"


def full_width(host: str) -> str:
    """`host` in full-width digits, letters and dots (IDNA maps them back)."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in host)


def zoo_table(host: str, port: int) -> pa.Table:
    """The zoo as a URL list: `url`, `caption`, and each case's `case` and `expected` reason."""
    return pa.table(
        {
            "url": [c.url_for(host, port) for c in ZOO_CASES],
            "caption": [zoo_caption()] * len(ZOO_CASES),
            "case": [c.name for c in ZOO_CASES],
            "expected": [c.expected for c in ZOO_CASES],
        }
    )


def write_zoo_url_list(host: str, port: int, path: str | os.PathLike) -> Path:
    """Write `zoo_table` as parquet (the crawl reads `url` and `caption`, and ignores the rest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(zoo_table(host, port), path)
    return path


# ---------------------------------------------------------------------- serving


@dataclass(frozen=True)
class ZooResponse:
    """What the server answers to one zoo request."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    promised_extra: int = 0  # Content-Length promises this many bytes more, then the socket closes
    cut_chunked: bool = False  # sent chunked, and the socket closes before the last chunk


@functools.lru_cache(maxsize=1)
def _zoo_spec():
    return generate_corpus(1, seed=0, fault_rates={})[0]


def zoo_image() -> bytes:
    """The one clean JPEG every kept zoo URL ends at."""
    return render_image(_zoo_spec())


def zoo_caption() -> str:
    return _zoo_spec().caption


@functools.lru_cache(maxsize=1)
def gzip_bomb() -> bytes:
    """A valid gzip stream of GZIP_BOMB_MIB MiB of zeros, built a MiB at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    mib = bytes(1 << 20)
    return b"".join([packer.compress(mib) for _ in range(GZIP_BOMB_MIB)] + [packer.flush()])


def _packed(wbits: int) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(zoo_image()) + packer.flush()


def _image(**kwargs) -> ZooResponse:
    return ZooResponse(200, zoo_image(), "image/jpeg", **kwargs)


def _encoded(encoding: str, body: bytes) -> ZooResponse:
    return ZooResponse(200, body, "image/jpeg", (("Content-Encoding", encoding),))


def _redirect(location: str) -> ZooResponse:
    # http.server writes header values as latin-1: this sends the location's raw UTF-8 bytes.
    return ZooResponse(302, headers=(("Location", location.encode().decode("latin-1")),))


def _percent_encoded(path: str) -> str:
    return "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in path)


_FIXED_ROUTES: dict[str, Callable[[], ZooResponse]] = {
    "/zoo/ok.jpg": _image,
    _percent_encoded(IRI_PATH): _image,
    "/zoo/with%20space.jpg": _image,
    "/zoo/gzip.jpg": lambda: _encoded("gzip", _packed(16 + zlib.MAX_WBITS)),
    "/zoo/deflate.jpg": lambda: _encoded("deflate", _packed(zlib.MAX_WBITS)),
    "/zoo/raw-deflate.jpg": lambda: _encoded("deflate", _packed(-zlib.MAX_WBITS)),
    "/zoo/gzip-bomb.jpg": lambda: _encoded("gzip", gzip_bomb()),
    "/zoo/bad-gzip.jpg": lambda: _encoded("gzip", b"\x1f\x8b\x08\x00" + bytes(range(200))),
    "/zoo/short.jpg": lambda: _image(promised_extra=1000),
    "/zoo/short-chunked.jpg": lambda: _image(cut_chunked=True),
    "/zoo/loop": lambda: _redirect("/zoo/loop"),
    "/zoo/to-iri": lambda: _redirect(IRI_PATH),
}


def zoo_response(path: str, query: str, sent_credentials: bool) -> ZooResponse:
    """The answer to GET `path?query` (both as received, percent-encoded)."""
    if sent_credentials:
        return ZooResponse(400, b"credentials from a URL list must not be sent\n")
    if path == "/zoo/query.jpg":
        expected = _percent_encoded(IRI_QUERY)
        return _image() if query == expected else ZooResponse(400, f"want {expected}\n".encode())
    if path.startswith("/zoo/chain/") and path.removeprefix("/zoo/chain/").isdigit():
        hops = int(path.removeprefix("/zoo/chain/"))
        return _redirect(f"/zoo/chain/{hops - 1}") if hops > 0 else _image()
    if path.startswith("/zoo/long/"):
        return _image()
    route = _FIXED_ROUTES.get(path)
    return route() if route is not None else ZooResponse(404, b"not found\n")
