"""URLs as the web writes them, turned into what a browser sends.

URL lists (LAION, DataComp) hold IRIs: non-ASCII paths and queries, spaces, international host
names. http.client refuses them (`'ascii' codec can't encode characters`), so they would be
dropped although every browser fetches them. `to_uri` encodes them as browsers do (after the
WHATWG URL standard): host by IDNA, path and query as percent-encoded UTF-8, fragment dropped,
and credentials (`user:pass@`) removed, since a URL list's secrets are not ours to send.

Only http(s) URLs are rewritten; others are left as they are for the URL policy to refuse.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

WEB_SCHEMES = ("http", "https")
# What browsers percent-encode besides controls, space and non-ASCII (WHATWG "percent-encode sets").
_PATH_ESCAPED = frozenset('"#<>?`{}')
_QUERY_ESCAPED = frozenset("\"#<>'")
_C0_AND_SPACE = "".join(map(chr, range(0x21)))  # stripped from both ends, as browsers do
_REMOVED = str.maketrans("", "", "\t\n\r")  # browsers drop tabs and newlines anywhere in a URL


class InvalidUrl(ValueError):
    """A URL no browser would fetch. The message starts with `[invalid_url]`."""

    def __init__(self, detail: str):
        super().__init__(f"[invalid_url] {detail}")


def to_uri(url: str) -> str:
    """The ASCII URL a browser requests for `url`; already-encoded URLs come back unchanged."""
    text = url.strip(_C0_AND_SPACE).translate(_REMOVED)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in WEB_SCHEMES:
        return text
    netloc = encode_netloc(parts.netloc, text)
    path = percent_encode(parts.path, _PATH_ESCAPED)
    query = "?" + percent_encode(parts.query, _QUERY_ESCAPED) if _has_query(text) else ""
    return f"{scheme}://{netloc}{path}{query}"


def encode_netloc(netloc: str, url: str) -> str:
    """`host[:port]` with the host in ASCII (IDNA) and lower case; any `user:pass@` dropped."""
    host, port = _split_port(netloc.rpartition("@")[2], url)
    if port and not (port.isascii() and port.isdigit() and int(port) < 65536):
        raise InvalidUrl(f"bad port {port!r} in {url!r}")
    return ascii_host(host, url) + (f":{int(port)}" if port else "")


def _split_port(hostport: str, url: str) -> tuple[str, str]:
    if hostport.startswith("["):  # an IPv6 literal: its colons are inside the brackets
        host, bracket, rest = hostport.partition("]")
        if rest and not rest.startswith(":"):
            raise InvalidUrl(f"bad host in {url!r}")
        return host + bracket, rest[1:]
    host, _, port = hostport.partition(":")
    return host, port


def ascii_host(host: str, url: str) -> str:
    """The host as DNS knows it: percent-decoded, IDNA-encoded, lower case."""
    name = unquote(host)
    if name.isascii():
        return name.lower()
    try:
        return name.encode("idna").decode("ascii").lower()
    except UnicodeError as err:
        raise InvalidUrl(f"host {name!r} of {url!r} is not a valid domain name: {err}") from None


def percent_encode(text: str, escaped: frozenset[str]) -> str:
    """Percent-encode controls, space, non-ASCII (as UTF-8) and `escaped`; keep existing `%XX`."""
    return "".join(c if "!" <= c <= "~" and c not in escaped else _escape(c) for c in text)


def _escape(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "replace"))


def _has_query(url: str) -> bool:
    """True when the URL has a `?`, even with nothing after it (urlsplit cannot tell)."""
    return "?" in url.partition("#")[0]
