"""The URL policy, tested on the policy functions alone: nothing here opens a connection."""

import ipaddress

import pytest

from dataprep.url_policy import (
    PolicyViolation,
    UrlPolicy,
    check_url,
    parse_allow_rule,
    parse_ipv4_loose,
)


def no_dns(host, port):
    raise AssertionError(f"policy tried to resolve {host!r}: numeric hosts need no lookup")


def fake_dns(table):
    def resolve(host, port):
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


DEFAULT = UrlPolicy()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
        ("http://100.100.100.200/", "metadata"),
        ("http://10.0.0.5/img.jpg", "private"),
        ("http://172.16.3.4/", "private"),
        ("http://192.168.1.1:8080/x.png", "private"),
        ("http://[fd00::1]/", "private"),
        ("http://[fd12:3456::1]:8443/", "private"),
        ("http://169.254.1.2/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://127.0.0.1/", "loopback"),
        ("http://127.0.0.2:9000/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),  # IPv4-mapped IPv6
        ("http://[::ffff:a9fe:a9fe]/", "metadata"),  # ::ffff:169.254.169.254
        ("http://2130706433/", "loopback"),  # decimal 127.0.0.1
        ("http://2852039166/", "metadata"),  # decimal 169.254.169.254
        ("http://0177.0.0.1/", "loopback"),  # octal
        ("http://0x7f.0.0.1/", "loopback"),  # hex
        ("http://0xa9fea9fe/", "metadata"),  # hex 169.254.169.254
        ("http://0251.0376.0251.0376/", "metadata"),  # octal 169.254.169.254
        ("http://127.1/", "loopback"),  # short form
        ("http://10.1/", "private"),
        ("http://100.64.0.1/", "non-public"),  # carrier-grade NAT
        ("http://224.0.0.1/", "multicast"),
    ],
)
def test_non_public_addresses_are_refused(url, why):
    with pytest.raises(PolicyViolation, match=r"^\[url_policy\] .*" + why):
        check_url(url, DEFAULT, resolver=no_dns)


@pytest.mark.parametrize(
    "url",
    [
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://metadata/",
        "http://METADATA.goog./",
    ],
)
def test_metadata_hostnames_are_refused_by_name(url):
    with pytest.raises(PolicyViolation, match="metadata hostname"):
        check_url(url, DEFAULT, resolver=no_dns)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://x/", "//x"]
)
def test_other_schemes_are_refused(url):
    with pytest.raises(PolicyViolation, match="scheme"):
        check_url(url, DEFAULT, resolver=no_dns)


def test_public_address_is_allowed():
    assert check_url("https://93.184.215.14/a.jpg", DEFAULT, resolver=no_dns) == [
        ipaddress.ip_address("93.184.215.14")
    ]


def test_a_name_is_refused_if_any_of_its_addresses_is_private():
    dns = fake_dns({"cdn.example": ["93.184.215.14", "10.0.0.7"], "ok.example": ["93.184.215.14"]})
    with pytest.raises(PolicyViolation, match="10.0.0.7:80 is a private address"):
        check_url("http://cdn.example/a.jpg", DEFAULT, resolver=dns)
    check_url("http://ok.example/a.jpg", DEFAULT, resolver=dns)


def test_allow_list_opens_exactly_the_named_host_and_port():
    policy = UrlPolicy(allow=["127.0.0.1:8765"])
    check_url("http://127.0.0.1:8765/img/1.jpg", policy, resolver=no_dns)
    with pytest.raises(PolicyViolation, match="127.0.0.1:8766"):
        check_url("http://127.0.0.1:8766/img/1.jpg", policy, resolver=no_dns)
    with pytest.raises(PolicyViolation, match="127.0.0.2:8765"):
        check_url("http://127.0.0.2:8765/img/1.jpg", policy, resolver=no_dns)
    with pytest.raises(PolicyViolation, match="127.0.0.1:80 "):
        check_url("http://2130706433/img/1.jpg", policy, resolver=no_dns)


def test_allow_list_networks_and_ipv6():
    policy = UrlPolicy(allow=["10.0.0.0/8", "[::1]:9000"])
    check_url("http://10.20.30.40:1234/", policy, resolver=no_dns)
    check_url("http://[::1]:9000/", policy, resolver=no_dns)
    with pytest.raises(PolicyViolation):
        check_url("http://[::1]:9001/", policy, resolver=no_dns)
    with pytest.raises(PolicyViolation):
        check_url("http://192.168.0.1/", policy, resolver=no_dns)


@pytest.mark.parametrize("entry", ["localhost:80", "10.0.0.0/8:99999", "[::1]x", "1.2.3.4:"])
def test_bad_allow_entries_are_named(entry):
    with pytest.raises(ValueError, match="allow-list entry"):
        parse_allow_rule(entry)
    with pytest.raises(ValueError, match="allow-list entry"):
        UrlPolicy(allow=[entry])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("0x7f.0x0.0.0x1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.258", "10.0.1.2"),
        ("1.2.3.4", "1.2.3.4"),
    ],
)
def test_loose_ipv4_parsing_matches_inet_aton(text, expected):
    assert str(parse_ipv4_loose(text)) == expected


@pytest.mark.parametrize(
    "text", ["example.com", "1.2.3.4.5", "256.1.1.1", "0x", "1..2", "08.1.1.1"]
)
def test_names_are_not_mistaken_for_addresses(text):
    assert parse_ipv4_loose(text) is None
