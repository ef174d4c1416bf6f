"""The guarded opener against a real HTTP server on loopback."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dataprep.safe_http import DeadlineExceeded, FetchGuard, ResponseTooLarge, build_opener
from dataprep.url_policy import PolicyViolation, UrlPolicy


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

    def do_GET(self):
        port = self.server.server_port
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
