"""IRIs to the URIs browsers send (the WHATWG URL standard's encoding)."""

import pytest

from dataprep.iri import InvalidUrl, to_uri


@pytest.mark.parametrize(
    ("iri", "uri"),
    [
        ("http://host/ok.jpg?lang=中文", "http://host/ok.jpg?lang=%E4%B8%AD%E6%96%87"),
        ("http://host/图片/猫.jpg", "http://host/%E5%9B%BE%E7%89%87/%E7%8C%AB.jpg"),
        ("http://host/a b.jpg?q=a b", "http://host/a%20b.jpg?q=a%20b"),
        ("http://bücher.example/x", "http://xn--bcher-kva.example/x"),
        ("http://Bücher.EXAMPLE:8080/x", "http://xn--bcher-kva.example:8080/x"),
        ("http://１２７．０．０．１:8080/x", "http://127.0.0.1:8080/x"),
        ("http://%31%32%37.0.0.1/x", "http://127.0.0.1/x"),
        ("HTTP://Host/Path", "http://host/Path"),
        ("http://host/x.jpg#frag ment", "http://host/x.jpg"),
        ("http://user:secret@host/x", "http://host/x"),
        ("http://host:8080@other:9090/x", "http://other:9090/x"),
        ("http://host:08080/x", "http://host:8080/x"),
        ("  http://host/x\n", "http://host/x"),
        ("http://ho\tst/x\r\n.jpg", "http://host/x.jpg"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
        ("http://host/x?", "http://host/x?"),
        ("http://host/x?a='1'", "http://host/x?a=%271%27"),
        ('http://host/{a}`<b>"', "http://host/%7Ba%7D%60%3Cb%3E%22"),
        ("https://host/ü", "https://host/%C3%BC"),
    ],
)
def test_iris_are_encoded_as_browsers_send_them(iri, uri):
    assert to_uri(iri) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "http://host/ok.jpg?lang=%E4%B8%AD%E6%96%87",
        "http://host/a%20b/%25/100%.jpg?x=%zz&y=a+b",
        "https://host:8443/p;params/[x]|y^z?a=b=c&d",
    ],
)
def test_ascii_urls_are_left_as_they_are(uri):
    assert to_uri(uri) == uri


@pytest.mark.parametrize(
    "iri", ["http://host/ok.jpg?lang=中文#x", "HTTP://Bücher.de/a b", " http://h/é "]
)
def test_encoding_twice_changes_nothing(iri):
    assert to_uri(to_uri(iri)) == to_uri(iri)


@pytest.mark.parametrize("url", ["data:image/png;base64,AAAA", "javascript:alert(1)", "file:///x"])
def test_other_schemes_are_left_for_the_policy(url):
    assert to_uri(url) == url


@pytest.mark.parametrize(
    "url", ["http://host:80x/", "http://host:99999/", "http://[::1]x/", "http://a" + "é" * 70 + "/"]
)
def test_urls_no_browser_fetches_are_invalid(url):
    with pytest.raises(InvalidUrl, match=r"^\[invalid_url\]"):
        to_uri(url)
