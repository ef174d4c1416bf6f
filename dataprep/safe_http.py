"""A urllib opener that enforces the URL policy and a total deadline on every request.

img2dataset downloads with `urllib.request.urlopen`, which uses the process-wide opener. Installing
this opener in each download process adds what img2dataset lacks:

- the URL policy, checked on the resolved addresses at connection time, for the first request
  and every redirect (the socket connects only to an address that passed the check);
- a total deadline per request (connect + redirects + headers + body): urllib's timeout is per
  socket operation, so a server that drips one byte every few seconds would hold a download
  thread, and so a whole shard, for ever;
- a cap on the body size, and no schemes but http(s) (urllib would read `file://` URLs).
"""

from __future__ import annotations

import functools
import http.client
import socket
import ssl
import time
import urllib.request
from dataclasses import dataclass, field

from dataprep.url_policy import AllowRule, PolicyViolation, UrlPolicy, check_host, check_url

READ_CHUNK = 64 * 1024


class DeadlineExceeded(Exception):
    """The whole request took longer than its deadline. The message starts with `[deadline]`."""


class ResponseTooLarge(Exception):
    """The body is larger than allowed. The message starts with `[too_large]`."""


@dataclass
class RequestBudget:
    """Time and bytes left to one logical request, shared by its redirects."""

    deadline_s: float
    op_timeout_s: float
    max_bytes: int
    started: float = field(default_factory=time.monotonic)

    def timeout(self) -> float:
        """Socket timeout for the next operation: never past the deadline."""
        left = self.started + self.deadline_s - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"[deadline] request took longer than {self.deadline_s:g} s")
        return min(self.op_timeout_s, left)

    def expired(self) -> bool:
        return time.monotonic() >= self.started + self.deadline_s


class GuardedResponse(http.client.HTTPResponse):
    """HTTPResponse whose reads stop at the request's deadline and byte cap."""

    def __init__(self, sock, *args, budget: RequestBudget, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self._guard_sock = sock
        self._budget = budget

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
        if amt is not None:
            self._arm()
            return super().read(amt)
        # read1 returns after one socket read, so the deadline is checked between drips.
        chunks, total = [], 0
        while True:
            self._arm()
            try:
                chunk = super().read1(READ_CHUNK)
            except TimeoutError as err:
                raise self._deadline_or(err) from None
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self._budget.max_bytes:
                raise ResponseTooLarge(f"[too_large] body exceeds {self._budget.max_bytes} bytes")
            chunks.append(chunk)


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


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Checks a redirect target before following it, and carries the budget over."""

    def __init__(self, guard: FetchGuard):
        super().__init__()
        self._guard = guard

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            check_url(newurl, self._guard.policy)
        except PolicyViolation as err:
            detail = str(err).removeprefix("[url_policy] ")
            raise PolicyViolation(f"redirect to {newurl} refused: {detail}") from None
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.mmpipe_budget = self._guard.budget_for(req)
        return new


class _RefuseOtherSchemes(urllib.request.BaseHandler):
    handler_order = 10_000  # after every real handler

    def unknown_open(self, req):
        raise PolicyViolation(f"scheme {req.type!r} is not allowed in {req.full_url!r}")


def build_opener(guard: FetchGuard) -> urllib.request.OpenerDirector:
    """An opener with only guarded http(s), redirects and error handling: no proxies, no file://."""
    opener = urllib.request.OpenerDirector()
    for handler in (
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
