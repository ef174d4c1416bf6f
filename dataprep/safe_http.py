"""A urllib opener that enforces the URL policy and a total deadline on every request.

img2dataset downloads with `urllib.request.urlopen`, which uses the process-wide opener. Installing
this opener in each download process adds what img2dataset lacks:

- the URL policy, checked on the resolved addresses at connection time, for the first request
  and every redirect (the socket connects only to an address that passed the check);
- a total deadline per request (connect + redirects + headers + body): urllib's timeout is per
  socket operation, so a server that drips one byte every few seconds would hold a download
  thread, and so a whole shard, for ever;
- a cap on the body size, counted after decoding `Content-Encoding: gzip/deflate` (so a gzip
  bomb is refused), and a body shorter than its Content-Length refused, as plain urllib does;
- a limit on redirects with an error of its own, and no schemes but http(s) (urllib would read
  `file://` URLs);
- IRIs (non-ASCII, spaces) percent-encoded as browsers send them (`iri.to_uri`).
"""

from __future__ import annotations

import functools
import http.client
import io
import socket
import ssl
import time
import urllib.request
import zlib
from dataclasses import dataclass, field

from dataprep.iri import to_uri
from dataprep.url_policy import AllowRule, PolicyViolation, UrlPolicy, check_host, check_url

READ_CHUNK = 64 * 1024


class DeadlineExceeded(Exception):
    """The whole request took longer than its deadline. The message starts with `[deadline]`."""


class ResponseTooLarge(Exception):
    """The body is larger than allowed. The message starts with `[too_large]`."""


class IncompleteBody(Exception):
    """The connection closed before the body was complete. Starts with `[incomplete_body]`."""


class ContentEncodingError(Exception):
    """A gzip or deflate body that does not decode. The message starts with `[encoding_error]`."""


class TooManyRedirects(Exception):
    """More redirects than allowed (loops included). Starts with `[too_many_redirects]`."""


@dataclass
class RequestBudget:
    """Time and bytes left to one logical request, shared by its redirects."""

    deadline_s: float
    op_timeout_s: float
    max_bytes: int
    started: float = field(default_factory=time.monotonic)
    redirects: int = 0

    def timeout(self) -> float:
        """Socket timeout for the next operation: never past the deadline."""
        left = self.started + self.deadline_s - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"[deadline] request took longer than {self.deadline_s:g} s")
        return min(self.op_timeout_s, left)

    def expired(self) -> bool:
        return time.monotonic() >= self.started + self.deadline_s


class BodyDecoder:
    """Decodes a gzip or deflate body chunk by chunk, never producing more than it is asked for."""

    def __init__(self, encoding: str):
        self.encoding = encoding
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
        self._head = b""  # deflate: the first bytes, until they tell zlib from raw deflate

    @classmethod
    def for_header(cls, content_encoding: str | None) -> BodyDecoder | None:
        """A decoder for gzip/deflate; None for identity and codings left to the image decoder."""
        encoding = (content_encoding or "").strip().lower().removeprefix("x-")
        return cls(encoding) if encoding in ("gzip", "deflate") else None

    def decode(self, data: bytes, room: int) -> bytes:
        """At most `room + 1` decoded bytes: one more than `room` means the body is too large."""
        if self._zlib is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            self._zlib = zlib.decompressobj(_deflate_wbits(self._head))
            data, self._head = self._head, b""
        try:
            return self._zlib.decompress(data, room + 1)
        except zlib.error as err:
            raise ContentEncodingError(
                f"[encoding_error] cannot decode the {self.encoding} body: {err}"
            ) from None

    def finished(self) -> bool:
        return self._zlib is not None and self._zlib.eof


def _deflate_wbits(head: bytes) -> int:
    """`deflate` is zlib-wrapped (RFC 9110), but some servers send it raw: browsers take both."""
    zlib_wrapped = head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
    return zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS


class GuardedResponse(http.client.HTTPResponse):
    """HTTPResponse whose body is read whole within the deadline and byte cap, decoded, checked."""

    def __init__(self, sock, *args, budget: RequestBudget, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self._guard_sock = sock
        self._budget = budget
        self._checked_body: io.BytesIO | None = None

    def _arm(self) -> None:
        self._guard_sock.settimeout(self._budget.timeout())

    def _deadline_or(self, err: BaseException) -> BaseException:
        if self._budget.expired():
            return DeadlineExceeded(
                f"[deadline] no complete response within {self._budget.deadline_s:g} s"
            )
        return err

    def begin(self) -> None:
        self._arm()
        try:
            super().begin()
        except TimeoutError as err:
            raise self._deadline_or(err) from None
        declared = self.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > self._budget.max_bytes:
            raise ResponseTooLarge(
                f"[too_large] Content-Length {declared} exceeds {self._budget.max_bytes} bytes"
            )

    def read(self, amt: int | None = None) -> bytes:
        # The body is bounded by max_bytes, so reading it whole first costs nothing extra.
        if self._checked_body is None:
            self._checked_body = io.BytesIO(self._read_body())
        return self._checked_body.read(amt)

    def _read_body(self) -> bytes:
        """The whole body, decoded; raises when it is too large, cut short or undecodable."""
        decoder = BodyDecoder.for_header(self.getheader("Content-Encoding"))
        limit = self._budget.max_bytes
        chunks, received, total = [], 0, 0
        while chunk := self._next_chunk():
            received += len(chunk)
            data = chunk if decoder is None else decoder.decode(chunk, limit - total)
            total += len(data)
            if max(received, total) > limit:
                raise ResponseTooLarge(f"[too_large] body exceeds {limit} bytes")
            chunks.append(data)
        if self.length:  # bytes Content-Length promised that never came
            raise IncompleteBody(
                f"[incomplete_body] connection closed {self.length} bytes before the "
                f"end of the body (Content-Length {self.getheader('Content-Length')})"
            )
        if decoder is not None and received and not decoder.finished():
            raise IncompleteBody(f"[incomplete_body] the {decoder.encoding} stream is cut short")
        return b"".join(chunks)

    def _next_chunk(self) -> bytes:
        """One socket read (read1), so the deadline is checked between drips; b"" at the end."""
        self._arm()
        try:
            return super().read1(READ_CHUNK)
        except TimeoutError as err:
            raise self._deadline_or(err) from None
        except http.client.IncompleteRead:  # a chunked body that stops before its last chunk
            raise IncompleteBody(
                "[incomplete_body] chunked body ends before its last chunk"
            ) from None


class _GuardedConnectionMixin:
    """Connects only to addresses of `host` that pass the policy, within the deadline."""

    def __init__(self, host, *args, budget: RequestBudget, rules: list[AllowRule], **kwargs):
        super().__init__(host, *args, **kwargs)
        self._budget = budget
        self._rules = rules
        self.response_class = functools.partial(GuardedResponse, budget=budget)
        self._create_connection = self._connect_checked

    def _connect_checked(self, address, timeout=None, source_address=None):
        host, port = address
        addresses = check_host(host, port, self._rules)
        last_error: OSError | None = None
        for ip in addresses:
            try:
                return socket.create_connection(
                    (str(ip), port), self._budget.timeout(), source_address
                )
            except TimeoutError as err:
                last_error = err
                if self._budget.expired():
                    raise DeadlineExceeded(
                        f"[deadline] could not connect within {self._budget.deadline_s:g} s"
                    ) from None
            except OSError as err:
                last_error = err
        raise last_error or OSError(f"no address for {host}")


class GuardedHTTPConnection(_GuardedConnectionMixin, http.client.HTTPConnection):
    pass


class GuardedHTTPSConnection(_GuardedConnectionMixin, http.client.HTTPSConnection):
    pass


@dataclass(frozen=True)
class FetchGuard:
    """Everything the opener enforces; picklable so it can travel to download processes."""

    policy: UrlPolicy
    op_timeout_s: float = 10.0
    deadline_s: float = 30.0
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 10  # urllib's own limit

    def budget_for(self, req: urllib.request.Request) -> RequestBudget:
        # Redirects copy the budget onto the new request (see _GuardedRedirectHandler).
        budget = getattr(req, "mmpipe_budget", None)
        if budget is None:
            budget = RequestBudget(self.deadline_s, self.op_timeout_s, self.max_bytes)
            req.mmpipe_budget = budget
        return budget


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: FetchGuard):
        super().__init__()
        self._guard, self._rules = guard, guard.policy.rules()

    def http_open(self, req):
        factory = functools.partial(
            GuardedHTTPConnection, budget=self._guard.budget_for(req), rules=self._rules
        )
        return self.do_open(factory, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: FetchGuard):
        super().__init__(context=ssl.create_default_context())
        self._guard, self._rules = guard, guard.policy.rules()

    def https_open(self, req):
        factory = functools.partial(
            GuardedHTTPSConnection, budget=self._guard.budget_for(req), rules=self._rules
        )
        return self.do_open(factory, req, context=self._context)


class _EncodeIris(urllib.request.BaseHandler):
    """Percent-encodes every http(s) request's URL, redirects included, as browsers do."""

    handler_order = 100  # before the HTTP handlers read the URL

    def http_request(self, req):
        req.full_url = to_uri(req.full_url)
        return req

    https_request = http_request


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Checks a redirect target before following it, counts hops, and carries the budget over."""

    def __init__(self, guard: FetchGuard):
        super().__init__()
        self._guard = guard
        # urllib's own loop check would answer first, as an "HTTP Error 302".
        self.max_repeats = self.max_redirections = guard.max_redirects + 1

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            check_url(to_uri(newurl), self._guard.policy)
        except PolicyViolation as err:
            detail = str(err).removeprefix("[url_policy] ")
            raise PolicyViolation(f"redirect to {newurl} refused: {detail}") from None
        budget = self._guard.budget_for(req)
        budget.redirects += 1
        if budget.redirects > self._guard.max_redirects:
            raise TooManyRedirects(
                f"[too_many_redirects] more than {self._guard.max_redirects} redirects "
                f"(the last to {newurl})"
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.mmpipe_budget = budget
        return new


class _RefuseOtherSchemes(urllib.request.BaseHandler):
    handler_order = 10_000  # after every real handler

    def unknown_open(self, req):
        raise PolicyViolation(f"scheme {req.type!r} is not allowed in {req.full_url!r}")


def build_opener(guard: FetchGuard) -> urllib.request.OpenerDirector:
    """An opener with only guarded http(s), redirects and error handling: no proxies, no file://."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _EncodeIris(),
        _GuardedHTTPHandler(guard),
        _GuardedHTTPSHandler(guard),
        _GuardedRedirectHandler(guard),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _RefuseOtherSchemes(),
    ):
        opener.add_handler(handler)
    return opener


def install(guard: FetchGuard) -> None:
    """Make `urllib.request.urlopen` in this process go through the guarded opener."""
    urllib.request.install_opener(build_opener(guard))
