"""The guarded opener against a real HTTP server on loopback."""

import contextlib
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dataprep.safe_http import (
    ContentEncodingError,
    DeadlineExceeded,
    FetchGuard,
    IncompleteBody,
    ResponseTooLarge,
    TooManyRedirects,
    build_opener,
)
from dataprep.url_policy import PolicyViolation, UrlPolicy

IMAGE = b"image bytes " * 100
IRI_TARGET = "/img/%E5%9B%BE.jpg?q=%E4%B8%AD"  # /img/图.jpg?q=中 as browsers send it


def packed(data: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


def raw_utf8(text: str) -> str:
    """A header value that http.server writes out as the raw UTF-8 bytes of `text`."""
    return text.encode().decode("latin-1")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _ok(self):
        credentials = "Authorization" in self.headers  # a URL's user:pass must never be sent
        self._send(400 if credentials else 200, IMAGE)

    def _cut(self, head: bytes, body: bytes):
        """Send `head` and `body`, then close: the body is shorter than the head promised."""
        self.close_connection = True
        self.wfile.write(head + body)

    def do_GET(self):
        port = self.server.server_port
        gzip = 16 + zlib.MAX_WBITS
        encoded = {
            "/gzip": ("gzip", packed(IMAGE, gzip)),
            "/x-gzip": ("x-gzip", packed(IMAGE, gzip)),
            "/deflate": ("deflate", packed(IMAGE, zlib.MAX_WBITS)),
            "/raw-deflate": ("deflate", packed(IMAGE, -zlib.MAX_WBITS)),
            "/gzip-bomb": ("gzip", packed(bytes(5000), gzip)),
            "/bad-gzip": ("gzip", b"\x1f\x8b\x08\x00" + bytes(range(100))),
            "/cut-gzip": ("gzip", packed(IMAGE, gzip)[:-20]),
        }
        if self.path in encoded:
            encoding, body = encoded[self.path]
            self._send(200, body, headers=[("Content-Encoding", encoding)])
            return
        if self.path.startswith("/chain/"):
            hops = int(self.path.removeprefix("/chain/"))
            if hops == 0:
                self._ok()
            else:
                self._send(302, headers=[("Location", f"/chain/{hops - 1}")])
            return
        routes = {
            "/ok": lambda: self._send(200, b"image bytes"),
            "/to-ok": lambda: self._send(302, headers=[("Location", "/ok")]),
            "/to-other-ip": lambda: self._send(
                302, headers=[("Location", f"http://127.0.0.2:{port}/ok")]
            ),
            "/to-decimal": lambda: self._send(
                302, headers=[("Location", f"http://2130706434:{port}/ok")]
            ),
            "/to-file": lambda: self._send(302, headers=[("Location", "file:///etc/passwd")]),
            "/big": lambda: self._send(200, b"x" * 5000),
            "/loop": lambda: self._send(302, headers=[("Location", "/loop")]),
            IRI_TARGET: self._ok,
            "/to-iri": lambda: self._send(
                302, headers=[("Location", raw_utf8("/img/图.jpg?q=中"))]
            ),
            "/to-wide-other": lambda: self._send(
                302, headers=[("Location", raw_utf8(f"http://１２７．０．０．２:{port}/ok"))]
            ),
            "/short": lambda: self._cut(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n", IMAGE),
            "/short-chunked": lambda: self._cut(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                f"{len(IMAGE):x}\r\n".encode() + IMAGE + b"\r\n",
            ),
        }
        if self.path in routes:
            routes[self.path]()
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
        elif self.path == "/slow-headers":
            time.sleep(3)
            with contextlib.suppress(OSError):  # the client gave up long ago
                self._send(200, b"late")
        else:
            self._send(404, b"no")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", httpd.server_port
    httpd.shutdown()
    httpd.server_close()


def opener_for(port, **limits):
    return build_opener(FetchGuard(UrlPolicy(allow=[f"127.0.0.1:{port}"]), **limits))


def test_allowed_fetch_and_same_host_redirect(server):
    base, port = server
    opener = opener_for(port)
    assert opener.open(f"{base}/ok").read() == b"image bytes"
    assert opener.open(f"{base}/to-ok").read() == b"image bytes"


@pytest.mark.parametrize("path", ["/to-other-ip", "/to-decimal"])
def test_redirect_to_forbidden_address_is_refused(server, path):
    base, port = server
    with pytest.raises(PolicyViolation, match=r"redirect to .* refused: 127\.0\.0\.2"):
        opener_for(port).open(f"{base}{path}")


def test_redirect_to_file_scheme_is_refused(server):
    base, port = server
    with pytest.raises((PolicyViolation, Exception), match="file"):
        opener_for(port).open(f"{base}/to-file")


def test_policy_applies_without_allow_list(server):
    base, _ = server
    with pytest.raises(PolicyViolation, match="loopback"):
        build_opener(FetchGuard(UrlPolicy())).open(f"{base}/ok")


def test_slow_drip_is_cut_by_the_total_deadline(server):
    base, port = server
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"\[deadline\]"):
        opener_for(port, op_timeout_s=5, deadline_s=1.5).open(f"{base}/drip").read()
    assert time.monotonic() - started < 1.5 + 4  # the deadline, plus slack for a loaded machine


def test_slow_headers_are_cut_by_the_total_deadline(server):
    base, port = server
    with pytest.raises(DeadlineExceeded):
        opener_for(port, op_timeout_s=5, deadline_s=1).open(f"{base}/slow-headers")


def test_body_size_cap(server):
    base, port = server
    with pytest.raises(ResponseTooLarge, match=r"\[too_large\]"):
        opener_for(port, max_bytes=1000).open(f"{base}/big")


def test_redirect_loop_ends(server):
    base, port = server
    with pytest.raises(Exception, match="redirect"):
        opener_for(port).open(f"{base}/loop")


def test_iris_are_fetched_percent_encoded(server):
    base, port = server
    assert opener_for(port).open(f"{base}/img/图.jpg?q=中#fragment").read() == IMAGE
    assert opener_for(port).open(f"{base}/img/%E5%9B%BE.jpg?q=%E4%B8%AD").read() == IMAGE


def test_redirect_to_an_iri_is_followed(server):
    base, port = server
    assert opener_for(port).open(f"{base}/to-iri").read() == IMAGE


def test_redirect_to_a_full_width_forbidden_host_is_refused(server):
    base, port = server
    with pytest.raises(PolicyViolation, match=r"127\.0\.0\.2"):
        opener_for(port).open(f"{base}/to-wide-other")


def test_credentials_in_the_url_are_not_sent_and_the_real_host_is_checked(server):
    base, port = server
    assert opener_for(port).open(f"http://user:pw@127.0.0.1:{port}/chain/0").read() == IMAGE
    with pytest.raises(PolicyViolation, match=r"127\.0\.0\.2"):
        opener_for(port).open(f"http://127.0.0.1:{port}@127.0.0.2:{port}/chain/0")


@pytest.mark.parametrize("path", ["/gzip", "/x-gzip", "/deflate", "/raw-deflate"])
def test_compressed_bodies_are_decoded(server, path):
    base, port = server
    assert opener_for(port).open(f"{base}{path}").read() == IMAGE


def test_body_cap_counts_decoded_bytes(server):
    base, port = server
    with pytest.raises(ResponseTooLarge, match=r"\[too_large\]"):
        opener_for(port, max_bytes=1000).open(f"{base}/gzip-bomb").read()
    assert opener_for(port, max_bytes=5000).open(f"{base}/gzip-bomb").read() == bytes(5000)


def test_undecodable_body_is_an_encoding_error(server):
    base, port = server
    with pytest.raises(ContentEncodingError, match=r"\[encoding_error\]"):
        opener_for(port).open(f"{base}/bad-gzip").read()


@pytest.mark.parametrize("path", ["/short", "/short-chunked", "/cut-gzip"])
def test_short_bodies_are_refused(server, path):
    base, port = server
    with pytest.raises(IncompleteBody, match=r"\[incomplete_body\]"):
        opener_for(port).open(f"{base}{path}").read()


def test_partial_reads_give_the_checked_body(server):
    base, port = server
    with opener_for(port).open(f"{base}/gzip") as response:
        parts = [response.read(1000) for _ in range(2)] + [response.read()]
    assert b"".join(parts) == IMAGE and len(parts[0]) == 1000


def test_redirect_limit(server):
    base, port = server
    assert opener_for(port).open(f"{base}/chain/10").read() == IMAGE
    with pytest.raises(TooManyRedirects, match=r"\[too_many_redirects\] more than 10 redirects"):
        opener_for(port).open(f"{base}/chain/11")
    with pytest.raises(TooManyRedirects, match="more than 2 redirects"):
        opener_for(port, max_redirects=2).open(f"{base}/chain/3")
    with pytest.raises(TooManyRedirects):
        opener_for(port).open(f"{base}/loop")
