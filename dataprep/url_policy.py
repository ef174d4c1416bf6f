"""Which URLs a crawler may fetch.

img2dataset fetches whatever a URL list names, including `http://169.254.169.254/` (cloud
metadata), `http://10.0.0.5/` (the cluster's private network) or `file:///etc/passwd`. A URL list
is untrusted input, so mmpipe refuses non-public destinations unless an allow-list opens them.

The check is made on resolved IP addresses, at connection time (see `safe_http`), so redirects,
DNS tricks and odd encodings (`http://2130706433/`, `http://0x7f.1/`) cannot get around it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, field_validator

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Hostnames of cloud metadata services, refused by name before any lookup.
METADATA_HOSTNAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
# Metadata addresses named explicitly so the refusal says what they are.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)


class PolicyViolation(Exception):
    """A URL or address the policy refuses. The message starts with `[url_policy]`."""

    def __init__(self, detail: str):
        super().__init__(f"[url_policy] {detail}")


@dataclass(frozen=True)
class AllowRule:
    """One allow-list entry: a network, optionally restricted to one port."""

    network: IPNetwork
    port: int | None = None

    def matches(self, ip: IPAddress, port: int) -> bool:
        return ip in self.network and (self.port is None or self.port == port)


def parse_allow_rule(entry: str) -> AllowRule:
    """Parse `127.0.0.1:8080`, `10.0.0.0/8`, `10.1.2.3`, `[::1]:8080` or `[fd00::/8]`."""
    text = entry.strip()
    port: int | None = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad allow-list entry {entry!r}: expected [addr]:port")
            port = _parse_port(rest[1:], entry)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _parse_port(port_text, entry)
    else:
        host = text
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        raise ValueError(
            f"bad allow-list entry {entry!r}: expected an IP address or network "
            "(e.g. 127.0.0.1:8080, 10.0.0.0/8, [::1]:8080)"
        ) from None
    return AllowRule(network, port)


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad allow-list entry {entry!r}: port must be 1..65535")
    return int(text)


class UrlPolicy(BaseModel):
    """Destinations the crawler may connect to. Public addresses are always allowed."""

    model_config = ConfigDict(extra="forbid")

    schemes: tuple[str, ...] = ("http", "https")
    allow: list[str] = []  # e.g. ["127.0.0.1:8080"] for a crawl of a loopback test server

    @field_validator("allow")
    @classmethod
    def _valid_rules(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            parse_allow_rule(entry)  # raises with the entry named
        return entries

    def rules(self) -> list[AllowRule]:
        return [parse_allow_rule(e) for e in self.allow]


def refusal_reason(ip: IPAddress) -> str | None:
    """Why connecting to `ip` is refused by default, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return refusal_reason(mapped)
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for label, flag in (
        ("a loopback address", ip.is_loopback),
        ("a link-local address", ip.is_link_local),
        ("an unspecified address", ip.is_unspecified),
        ("a multicast address", ip.is_multicast),
        ("a private address", ip.is_private),
        ("a reserved address", ip.is_reserved),
    ):
        if flag:
            return label
    if not ip.is_global:  # shared (100.64/10 CGNAT), documentation ranges and the like
        return "a non-public address"
    return None


def check_address(ip: IPAddress, port: int, rules: Iterable[AllowRule]) -> None:
    """Raise PolicyViolation if connecting to ip:port is not allowed."""
    if any(rule.matches(ip, port) for rule in rules):
        return
    reason = refusal_reason(ip)
    if reason is not None:
        shown = f"[{ip}]" if ip.version == 6 else str(ip)
        raise PolicyViolation(f"{shown}:{port} is {reason} and not in the allow-list")


def parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """Read an IPv4 address the way inet_aton (and so most HTTP clients) does.

    Accepts decimal (`2130706433`), octal (`0177.0.0.1`), hex (`0x7f.0.0.1`) and short forms
    (`127.1`). Returns None when `host` is not a numeric address.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or any(p == "" for p in parts):
        return None
    values = []
    for part in parts:
        try:
            if part.lower().startswith("0x"):
                values.append(int(part[2:], 16))
            elif len(part) > 1 and part.startswith("0"):
                values.append(int(part, 8))
            else:
                values.append(int(part, 10))
        except ValueError:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for v in head:
        number = number * 256 + v
    number = number * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(number)


Resolver = Callable[[str, int], list[IPAddress]]


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """All addresses a host name resolves to (system resolver)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def literal_address(host: str) -> IPAddress | None:
    """The address a numeric host names (any IPv4 encoding, or IPv6), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return parse_ipv4_loose(host)


def check_url(url: str, policy: UrlPolicy, resolver: Resolver = resolve_host) -> list[IPAddress]:
    """Check scheme, host and every resolved address of `url`; return the allowed addresses.

    Raises PolicyViolation naming what was refused. Numeric hosts are checked without any
    lookup, so policy tests never touch the network.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in policy.schemes:
        raise PolicyViolation(f"scheme {scheme or '(none)'!r} is not allowed in {url!r}")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise PolicyViolation(f"no host in {url!r}")
    if host in METADATA_HOSTNAMES:
        raise PolicyViolation(f"{host} is a cloud metadata hostname")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise PolicyViolation(f"bad port in {url!r}") from None
    return check_host(host, port, policy.rules(), resolver)


def check_host(
    host: str, port: int, rules: list[AllowRule], resolver: Resolver = resolve_host
) -> list[IPAddress]:
    """Resolve host and check every address: one refused address refuses the host.

    Refusing on any (not all) addresses stops a name that resolves to both a public and a
    private address from being used to reach the private one.
    """
    numeric = literal_address(host)  # numeric hosts, in any encoding, need no lookup
    try:
        addresses = [numeric] if numeric is not None else resolver(host, port)
    except OSError as err:
        raise OSError(f"cannot resolve {host!r}: {err}") from None
    for ip in addresses:
        check_address(ip, port, rules)
    return addresses
