"""HTTP server for the sample web corpus, on loopback.

Routes:
  ``GET|HEAD /img/<key>.jpg`` (``.png`` for the bomb)  the sample's URL, behaving per its fault
  ``GET|HEAD /content/<key>.jpg``  image behind a ``redirect_ok`` / ``forbidden_redirect``
  ``GET|HEAD /healthz``  200 "ok"
  ``GET|HEAD /zoo/...``  the URL zoo (:mod:`dataprep.sampleweb.zoo`), named only by its own list
Anything else is 404.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.sampleweb.corpus import (
    DRIP_INTERVAL_S,
    DRIP_MAX_S,
    SampleSpec,
    generate_corpus,
    ground_truth_table,
    render_image,
)
from dataprep.sampleweb.zoo import (
    ZOO_PREFIX,
    ZooResponse,
    other_loopback,
    write_zoo_url_list,
    zoo_response,
)

_QUIET_ERRORS = (ConnectionError, TimeoutError, OSError)


def _as_decimal(ip: str) -> str:
    a, b, c, d = (int(x) for x in ip.split("."))
    return str((a << 24) | (b << 16) | (c << 8) | d)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    app: SampleWebServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(): a reverse DNS lookup we don't need
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        if isinstance(sys.exc_info()[1], _QUIET_ERRORS):
            return  # client went away / timed out: not worth a traceback
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mmpipe-sampleweb/1.0"
    sys_version = ""
    timeout = 30  # idle keep-alive connections are dropped after this
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms stalls
    server: _HTTPServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002, ANN002
        pass

    def setup(self) -> None:
        super().setup()
        self.server.app._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            with contextlib.suppress(*_QUIET_ERRORS):
                super().finish()
        finally:
            self.server.app._track(self.connection, add=False)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(head=True)

    # ------------------------------------------------------------------ helpers

    def _send(
        self,
        status: int,
        body: bytes = b"",
        ctype: str = "text/plain; charset=utf-8",
        head: bool = False,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _dispatch(self, head: bool) -> None:
        app = self.server.app
        try:
            target = urlsplit(self.path)
            path = target.path
            if path == "/healthz":
                self._send(200, b"ok\n", head=head)
                return
            if path.startswith(ZOO_PREFIX):
                credentials = "Authorization" in self.headers
                self._send_zoo(zoo_response(path, target.query, credentials), head)
                return
            route = app._routes.get(path)
            if route is None:
                self._send(404, b"not found\n", head=head)
                return
            kind, spec = route
            if kind == "target":
                self._send(200, app.payload(spec), spec.content_type, head=head)
                return
            self._serve(spec, head)
        except _QUIET_ERRORS:
            self.close_connection = True

    def _serve(self, spec: SampleSpec, head: bool) -> None:
        app = self.server.app
        fault = spec.fault
        if fault == "http_404":
            self._send(404, b"not found\n", head=head)
        elif fault == "http_500":
            self._send(500, b"internal server error\n", head=head)
        elif fault == "redirect_ok" or fault == "forbidden_redirect":
            location = app.redirect_location(spec)
            self._send(302, b"", head=head, headers=[("Location", location)])
        elif fault == "slow_drip":
            self._drip(app.payload(spec), spec.content_type, head)
        else:
            if fault == "slow" and spec.delay_s > 0 and app._stopping.wait(spec.delay_s):
                self.close_connection = True
                return
            self._send(200, app.payload(spec), spec.content_type, head=head)

    def _send_zoo(self, answer: ZooResponse, head: bool) -> None:
        if not (answer.promised_extra or answer.cut_chunked):
            self._send(answer.status, answer.body, answer.content_type, head, answer.headers)
            return
        self.close_connection = True  # the body is cut short by closing the connection
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        for name, value in answer.headers:
            self.send_header(name, value)
        if answer.cut_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(answer.body) + answer.promised_extra))
        self.end_headers()
        if head:
            return
        if answer.cut_chunked:  # one chunk holding the whole body, and no last (empty) chunk
            self.wfile.write(f"{len(answer.body):x}\r\n".encode() + answer.body + b"\r\n")
        else:
            self.wfile.write(answer.body)

    def _drip(self, body: bytes, ctype: str, head: bool) -> None:
        app = self.server.app
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()
        if head:
            return
        self.close_connection = True  # the body never completes: never reuse this connection
        deadline = time.monotonic() + app.drip_max_s
        for i in range(len(body)):
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()
            if time.monotonic() >= deadline or app._stopping.wait(app.drip_interval_s):
                return


class SampleWebServer:
    """Serves ``specs`` over HTTP/1.1 on ``host:port`` (``port=0``: any free port).

    Usable as a context manager (``with SampleWebServer(specs) as web: ...``).  Rendered payloads
    are cached in memory; ``prerender=True`` renders all of them in :meth:`start`.
    """

    def __init__(
        self,
        specs: Sequence[SampleSpec],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        prerender: bool = False,
        drip_interval_s: float = DRIP_INTERVAL_S,
        drip_max_s: float = DRIP_MAX_S,
    ) -> None:
        self.specs = list(specs)
        self.host = host
        self._requested_port = port
        self.prerender = prerender
        self.drip_interval_s = drip_interval_s
        self.drip_max_s = drip_max_s
        self._routes: dict[str, tuple[str, SampleSpec]] = {}
        for s in self.specs:
            if s.path in self._routes:
                raise ValueError(f"duplicate path {s.path}")
            self._routes[s.path] = ("primary", s)
            if s.fault in ("redirect_ok", "forbidden_redirect"):
                self._routes[self.target_path(s)] = ("target", s)
        self._cache: dict[str, bytes] = {}
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SampleWebServer:
        if self._httpd is not None:
            raise RuntimeError("server already started")
        if self.prerender:
            for s in self.specs:
                self.payload(s)
        self._stopping.clear()
        httpd = _HTTPServer((self.host, self._requested_port), _Handler)
        httpd.app = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"sampleweb:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; returns promptly, aborting slow and dripping responses in flight."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:  # unblock handler threads waiting on idle keep-alive reads
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> SampleWebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, spec: SampleSpec | str) -> str:
        """Full URL of a spec (or of a path starting with '/')."""
        return self.base_url + (spec if isinstance(spec, str) else spec.path)

    @staticmethod
    def target_path(spec: SampleSpec) -> str:
        """Path that a redirect of ``spec`` points to (served for redirect faults only)."""
        return "/content/" + spec.path.rsplit("/", 1)[1]

    def redirect_location(self, spec: SampleSpec) -> str:
        """The Location header for a redirect_ok / forbidden_redirect spec."""
        target = self.target_path(spec)
        if spec.fault == "redirect_ok":
            return self.base_url + target
        if spec.fault != "forbidden_redirect":
            raise ValueError(f"{spec.key} is not a redirect")
        port = self.port
        if spec.variant == "other_port":
            other = port + 1 if port < 65535 else port - 1
            return f"http://{self.host}:{other}{target}"
        other_ip = other_loopback(self.host)
        if spec.variant == "decimal_ip":
            return f"http://{_as_decimal(other_ip)}:{port}{target}"
        return f"http://{other_ip}:{port}{target}"

    def payload(self, spec: SampleSpec) -> bytes:
        data = self._cache.get(spec.key)
        if data is None:
            data = self._cache[spec.key] = render_image(spec)
        return data


# ---------------------------------------------------------------------- files


def write_url_list(
    specs: Sequence[SampleSpec], server: SampleWebServer | str, path: str | os.PathLike
) -> Path:
    """LAION-style URL list: parquet with columns ``url``, ``caption`` in spec order.

    ``server`` is a started :class:`SampleWebServer` or a base URL like "http://127.0.0.1:8765".
    """
    base = server.base_url if isinstance(server, SampleWebServer) else server.rstrip("/")
    table = pa.table(
        {"url": [base + s.path for s in specs], "caption": [s.caption for s in specs]},
        schema=pa.schema([("url", pa.string()), ("caption", pa.string())]),
    )
    return _write_parquet(table, path)


def write_ground_truth(specs: Sequence[SampleSpec], path: str | os.PathLike) -> Path:
    """The :func:`ground_truth_table` of ``specs`` as parquet."""
    return _write_parquet(ground_truth_table(specs), path)


def _write_parquet(table: pa.Table, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def _write_json_atomic(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def serve_forever(
    n: int,
    seed: int,
    out_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_file: str | os.PathLike | None = None,
    *,
    fault_rates: dict[str, float] | None = None,
    stop_event: threading.Event | None = None,
    zoo: bool = False,
) -> dict:
    """Serve a generated corpus until SIGINT/SIGTERM (or ``stop_event`` is set).

    Writes ``out_dir/urls.parquet`` and ``out_dir/ground_truth.parquet``, pre-renders all
    payloads, starts listening, then writes ``ready_file`` (JSON, atomically) with ``base_url``,
    ``host``, ``port``, ``n``, ``seed``, ``urls`` and ``ground_truth`` (absolute paths), and prints
    one line.  With ``zoo=True`` it also writes ``out_dir/zoo_urls.parquet`` (the URL zoo, with
    each case's expected reason) and names it ``zoo_urls``.  Returns that info dict after a clean
    stop.  Signal handlers are installed only when called from the main thread; they are
    restored on return.
    """
    out = Path(out_dir).resolve()
    specs = generate_corpus(n, seed, fault_rates)
    stop = stop_event or threading.Event()
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        with SampleWebServer(specs, host, port, prerender=True) as web:
            urls = write_url_list(specs, web, out / "urls.parquet")
            truth = write_ground_truth(specs, out / "ground_truth.parquet")
            info = {
                "base_url": web.base_url,
                "host": web.host,
                "port": web.port,
                "n": n,
                "seed": seed,
                "urls": str(urls),
                "ground_truth": str(truth),
            }
            if zoo:
                info["zoo_urls"] = str(
                    write_zoo_url_list(web.host, web.port, out / "zoo_urls.parquet")
                )
            if ready_file is not None:
                _write_json_atomic(info, Path(ready_file))
            print(
                f"sampleweb: serving {n} samples (seed {seed}) at {web.base_url}; url list {urls}",
                flush=True,
            )
            while not stop.wait(0.5):
                pass
        return info
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
