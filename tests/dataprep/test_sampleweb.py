"""The sample web: corpus determinism, label consistency, and the real HTTP server on loopback."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import socket
import threading
import time
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, replace
from urllib.parse import urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataprep.sampleweb import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOUR_RGB,
    COLOURS,
    DEFAULT_FAULT_RATES,
    FAULTS,
    POSITIONS,
    SHAPES,
    SIZES,
    ZOO_CASES,
    SampleWebServer,
    generate_corpus,
    ground_truth_table,
    render_image,
    serve_forever,
    write_ground_truth,
    write_url_list,
    write_zoo_url_list,
)
from dataprep.sampleweb.corpus import POSITION_XY
from dataprep.sampleweb.zoo import GZIP_BOMB_MIB, IRI_PATH, zoo_image

N, SEED = 2000, 0


@pytest.fixture(scope="module")
def specs():
    return generate_corpus(N, SEED)


@pytest.fixture(scope="module")
def by_key(specs):
    return {s.key: s for s in specs}


@pytest.fixture(scope="module")
def web(specs):
    with SampleWebServer(specs) as server:
        yield server


def of_kind(specs, fault):
    return [s for s in specs if s.fault == fault]


def get(server, path, timeout=10.0, method="GET"):
    """(status, headers, body) without following redirects."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def decode(data):
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def small(data):
    img = decode(data).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float64)


def words(caption):
    return set(
        caption.replace(",", " ").replace(":", " ").replace("(", " ").replace(")", " ").split()
    )


def check_picture(img, spec):
    """The shape's colour dominates the non-background pixels, and it sits where it should."""
    px = np.asarray(img.convert("RGB"), dtype=np.float64)
    bg = np.array(BACKGROUND_RGB[spec.background], dtype=np.float64)
    fg_mask = np.linalg.norm(px - bg, axis=-1) > 80
    assert fg_mask.sum() >= 4, spec
    mean = px[fg_mask].mean(axis=0)
    nearest = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOUR_RGB[c])))
    assert nearest == spec.colour, (spec, mean)
    # the clearly-coloured pixels are close to the spec colour
    colour = np.array(COLOUR_RGB[spec.colour], dtype=np.float64)
    near_colour = np.linalg.norm(px[fg_mask] - colour, axis=-1) < 60
    assert near_colour.mean() > 0.5, spec
    h, w = fg_mask.shape
    ys, xs = np.nonzero(fg_mask)
    fx, fy = POSITION_XY[spec.position]
    for f, centre, extent in ((fx, xs.mean(), w), (fy, ys.mean(), h)):
        rel = (centre + 0.5) / extent
        if f == 0.0:
            assert rel < 0.5, spec
        elif f == 1.0:
            assert rel > 0.5, spec
        else:
            assert abs(rel - 0.5) < 0.06, spec


# ------------------------------------------------------------------ corpus


def test_vocabulary():
    assert SHAPES == ("circle", "square", "triangle", "star")
    assert COLOURS == ("red", "green", "blue", "yellow")
    assert SIZES == ("small", "medium", "large")
    assert len(POSITIONS) == 9
    assert BACKGROUNDS == ("white", "gray", "black", "beige")
    assert len(CAPTION_TEMPLATES) >= 6
    fields = dict(shape="S", colour="C", size="Z", position="P", background="B")
    for t in CAPTION_TEMPLATES:
        text = t.format(**fields)
        assert all(v in text for v in fields.values())
        fixed = t.format(**{k: "" for k in fields})
        assert not any(w in fixed for w in (*SHAPES, *COLOURS)), t
    assert set(DEFAULT_FAULT_RATES) == set(FAULTS)
    assert 0.25 <= sum(DEFAULT_FAULT_RATES.values()) <= 0.32


def test_determinism():
    t0 = time.perf_counter()
    a = generate_corpus(300, 7)
    assert time.perf_counter() - t0 < 1.0
    b = generate_corpus(300, 7)
    assert a == b
    assert [astuple(s) for s in a] == [astuple(s) for s in b]
    # render without the cache, so the bytes really are computed twice
    for s in a[:80]:
        assert render_image.__wrapped__(s) == render_image(s)
    c = generate_corpus(300, 8)
    assert [s.caption for s in c] != [s.caption for s in a]
    assert [s.fault for s in c] != [s.fault for s in a]


def test_generation_is_fast():
    t0 = time.perf_counter()
    generate_corpus(N, 123)
    assert time.perf_counter() - t0 < 1.0


def test_fault_rates_argument():
    specs = generate_corpus(100, 3, {"http_404": 0.1, "slow": 0.05})
    counts = Counter(s.fault for s in specs)
    assert counts == {None: 85, "http_404": 10, "slow": 5}
    assert all(s.fault is None for s in generate_corpus(50, 3, {}))
    with pytest.raises(ValueError, match="unknown"):
        generate_corpus(10, 0, {"http_418": 0.1})
    with pytest.raises(ValueError):
        generate_corpus(10, 0, {"http_404": 0.7, "http_500": 0.7})


def test_every_fault_present_and_labels_consistent(specs, by_key):
    counts = Counter(s.fault for s in specs)
    assert set(counts) == {None, *FAULTS}
    assert all(counts[f] >= 25 for f in FAULTS), counts
    assert 0.65 <= counts[None] / N <= 0.75
    assert len({s.key for s in specs}) == N
    assert len({s.path for s in specs}) == N
    for s in specs:
        assert s.shape in SHAPES and s.colour in COLOURS and s.size in SIZES
        assert s.position in POSITIONS and s.background in BACKGROUNDS
        if s.fault in ("exact_duplicate", "near_duplicate"):
            orig = by_key[s.duplicate_of]
            assert orig.fault is None
            assert (orig.shape, orig.colour, orig.size, orig.position, orig.background) == (
                s.shape,
                s.colour,
                s.size,
                s.position,
                s.background,
            )
        else:
            assert s.duplicate_of is None
        if s.fault == "mismatched_caption":
            donor = by_key[s.mismatched_from]
            assert donor.fault is None and donor.caption == s.caption
            ws = words(s.caption)
            assert s.shape not in ws and s.colour not in ws, s
            assert donor.shape in ws and donor.colour in ws
        else:
            assert s.mismatched_from is None
        if s.fault == "empty_caption":
            assert s.caption == ""
        elif s.fault != "mismatched_caption":
            assert {s.shape, s.colour, s.size, s.background} <= words(s.caption), s
            assert s.position in s.caption
    truth = ground_truth_table(specs)
    assert truth.num_rows == N
    assert truth.column("key").to_pylist() == [s.key for s in specs]
    assert truth.column("fault").null_count == counts[None]


def test_duplicates(specs, by_key):
    exact = of_kind(specs, "exact_duplicate")
    for s in exact:
        assert render_image(s) == render_image(by_key[s.duplicate_of])
        assert s.path != by_key[s.duplicate_of].path
    near = of_kind(specs, "near_duplicate")
    assert {s.variant for s in near} == {"requality", "resize", "crop"}
    for s in near:
        orig = by_key[s.duplicate_of]
        data, orig_data = render_image(s), render_image(orig)
        assert data != orig_data
        img = decode(data)
        assert img.size == (s.width, s.height)
        if s.variant == "requality":
            assert img.size == (orig.width, orig.height)
            assert s.jpeg_quality != orig.jpeg_quality
        else:
            assert img.size != (orig.width, orig.height)
        assert np.abs(small(data) - small(orig_data)).mean() < 10, s


def test_rendered_pictures_match_labels(specs):
    """Offline, every clean image shows the labelled colour at the labelled place."""
    for s in of_kind(specs, None)[:400]:
        img = decode(render_image(s))
        assert img.format == "JPEG" and img.size == (s.width, s.height)
        check_picture(img, s)


# ------------------------------------------------------------------ server


def test_clean_images_over_http(web, specs):
    for s in of_kind(specs, None)[:100]:
        status, headers, body = get(web, s.path)
        assert status == 200
        assert headers["Content-Type"] == "image/jpeg"
        assert int(headers["Content-Length"]) == len(body)
        img = decode(body)
        assert img.size == (s.width, s.height)
        check_picture(img, s)
    s = of_kind(specs, None)[0]
    with urllib.request.urlopen(web.url(s), timeout=5) as resp:
        assert resp.read() == render_image(s)
    status, headers, body = get(web, s.path, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_unknown_paths_404(web, specs):
    clean = of_kind(specs, None)[0]
    for path in ("/", "/img/", "/img/nope.jpg", "/content/" + clean.path.rsplit("/")[-1]):
        assert get(web, path)[0] == 404
    assert get(web, "/healthz")[0] == 200


def test_http_errors(web, specs):
    for fault, code in (("http_404", 404), ("http_500", 500)):
        for s in of_kind(specs, fault)[:5]:
            status, _, _ = get(web, s.path)
            assert status == code
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(web.url(s), timeout=5)
            assert err.value.code == code


def test_not_image(web, specs):
    for s in of_kind(specs, "not_image")[:5]:
        status, headers, body = get(web, s.path)
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert body.lstrip().lower().startswith(b"<!doctype html")
        with pytest.raises(Image.UnidentifiedImageError):
            decode(body)


def test_broken_jpegs(web, specs, by_key):
    cv2 = pytest.importorskip("cv2")
    for fault in ("truncated_jpeg", "corrupt_jpeg"):
        for s in of_kind(specs, fault):
            status, headers, body = get(web, s.path)
            assert status == 200 and headers["Content-Type"] == "image/jpeg"
            assert int(headers["Content-Length"]) == len(body)
            assert body.startswith(b"\xff\xd8")
            with pytest.raises(OSError):  # UnidentifiedImageError is an OSError too
                decode(body)
            assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED) is None
            if fault == "truncated_jpeg":
                clean = render_image(replace(s, fault=None))  # the same image, untruncated
                assert clean.startswith(body) and len(body) < 0.5 * len(clean)


def test_decompression_bomb(web, specs):
    bombs = of_kind(specs, "decompression_bomb")
    s = bombs[0]
    assert s.path.endswith(".png")
    status, headers, body = get(web, s.path)
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert len(body) < 200_000
    assert body[12:16] == b"IHDR"  # declared size, read from the header by hand
    w, h = int.from_bytes(body[16:20], "big"), int.from_bytes(body[20:24], "big")
    # PIL reads the header only; refusing to even open it is proof that the size is huge
    with contextlib.suppress(Image.DecompressionBombError):
        assert Image.open(io.BytesIO(body)).size == (w, h)
    assert (w, h) == (s.width, s.height)
    assert w * h > 1e8
    assert len(body) / (w * h) < 1e-3


def test_odd_sizes(web, specs):
    for s in of_kind(specs, "tiny_image")[:5]:
        assert decode(get(web, s.path)[2]).size == (8, 8)
    sizes = {decode(get(web, s.path)[2]).size for s in of_kind(specs, "extreme_aspect")}
    assert sizes == {(600, 20), (20, 600)}


def test_forbidden_redirects(web, specs):
    variants = Counter()
    for s in of_kind(specs, "forbidden_redirect"):
        status, headers, body = get(web, s.path)  # http.client never follows redirects
        assert status == 302 and body == b""
        loc = urlsplit(headers["Location"])
        assert loc.scheme == "http"
        assert (loc.hostname, loc.port) != (web.host, web.port)
        if s.variant == "other_ip":
            assert (loc.hostname, loc.port) == ("127.0.0.2", web.port)
        elif s.variant == "other_port":
            assert loc.hostname == web.host and loc.port != web.port
        else:
            assert (loc.hostname, loc.port) == ("2130706434", web.port)  # 127.0.0.2
        variants[s.variant] += 1
    assert set(variants) == {"other_ip", "other_port", "decimal_ip"}
    assert min(variants.values()) >= 5


def test_redirect_ok(web, specs):
    for s in of_kind(specs, "redirect_ok")[:10]:
        status, headers, _ = get(web, s.path)
        assert status == 302
        loc = urlsplit(headers["Location"])
        assert (loc.hostname, loc.port) == (web.host, web.port)
        assert loc.path != s.path
        with urllib.request.urlopen(web.url(s), timeout=5) as resp:  # follows the redirect
            assert resp.geturl() == headers["Location"]
            img = decode(resp.read())
        assert img.size == (s.width, s.height)
        check_picture(img, s)


def test_slow(web, specs):
    s = of_kind(specs, "slow")[0]
    t0 = time.monotonic()
    status, _, body = get(web, s.path, timeout=5)
    elapsed = time.monotonic() - t0
    assert status == 200 and s.delay_s >= 1.0
    assert s.delay_s * 0.95 <= elapsed < s.delay_s + 2
    assert decode(body).size == (s.width, s.height)


def test_slow_drip(web, specs):
    s = of_kind(specs, "slow_drip")[0]
    full = render_image(s)
    with socket.create_connection((web.host, web.port), timeout=5) as sock:
        sock.sendall(f"GET {s.path} HTTP/1.1\r\nHost: {web.host}\r\n\r\n".encode())
        sock.settimeout(0.2)
        data = b""
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            with contextlib.suppress(TimeoutError):
                chunk = sock.recv(4096)
                assert chunk, "server closed the connection early"
                data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    lines = head.decode().split("\r\n")
    assert lines[0].split()[1] == "200"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "image/jpeg"
    assert int(headers["Content-Length"]) == len(full) > 100
    assert 1 <= len(body) <= 6  # ~1 byte every 0.5 s: still far from complete
    assert body == full[: len(body)]


def test_concurrent_fetches(web, specs):
    targets = [s for s in specs if s.fault is None][:400]

    def fetch(s):
        with urllib.request.urlopen(web.url(s), timeout=10) as resp:
            return resp.read()

    t0 = time.monotonic()
    with ThreadPoolExecutor(64) as pool:
        bodies = list(pool.map(fetch, targets))
    assert time.monotonic() - t0 < 10
    assert all(b == render_image(s) for b, s in zip(bodies, targets, strict=True))


def test_url_list_and_ground_truth_files(web, specs, tmp_path):
    path = write_url_list(specs, web, tmp_path / "urls.parquet")
    table = pq.read_table(path)
    assert table.column_names == ["url", "caption"]
    assert table.num_rows == N
    assert table.column("url")[0].as_py() == web.url(specs[0])
    assert table.column("caption").to_pylist() == [s.caption for s in specs]
    truth = pq.read_table(write_ground_truth(specs, tmp_path / "gt.parquet"))
    assert truth.num_rows == N
    assert {"key", "path", "caption", "shape", "colour", "fault", "duplicate_of"} <= set(
        truth.column_names
    )
    assert {"mismatched_from", "size", "position", "background", "width", "height"} <= set(
        truth.column_names
    )


def test_stop_with_drip_in_flight():
    specs = generate_corpus(20, 1, {"slow_drip": 0.5, "slow": 0.25})
    drip = of_kind(specs, "slow_drip")[0]
    slow = of_kind(specs, "slow")[0]
    server = SampleWebServer(specs).start()
    started = threading.Event()
    results = {}

    def client(spec):
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        try:
            conn.request("GET", spec.path)
            if spec.fault == "slow_drip":
                resp = conn.getresponse()
                started.set()
                resp.read()
            else:
                started.wait()
                conn.getresponse().read()
            results[spec.key] = "complete"
        except (http.client.HTTPException, OSError) as exc:
            results[spec.key] = type(exc).__name__
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(s,)) for s in (drip, slow)]
    for t in threads:
        t.start()
    assert started.wait(5)
    idle = socket.create_connection((server.host, server.port))  # an idle keep-alive client
    time.sleep(0.3)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 2.0
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert results[drip.key] != "complete"  # IncompleteRead: the body never finished
    idle.close()
    server.stop()  # idempotent


def test_serve_forever(tmp_path):
    stop = threading.Event()
    ready = tmp_path / "ready.json"
    out = {}
    thread = threading.Thread(
        target=lambda: out.setdefault(
            "info", serve_forever(60, 5, tmp_path / "web", ready_file=ready, stop_event=stop)
        )
    )
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert set(info) == {"base_url", "host", "port", "n", "seed", "urls", "ground_truth"}
        assert info["base_url"] == f"http://127.0.0.1:{info['port']}"
        assert (info["n"], info["seed"]) == (60, 5)
        urls = pq.read_table(info["urls"])
        assert urls.num_rows == 60
        assert pq.read_table(info["ground_truth"]).num_rows == 60
        specs = generate_corpus(60, 5)
        first_clean = next(i for i, s in enumerate(specs) if s.fault is None)
        url = urls.column("url")[first_clean].as_py()
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.read() == render_image(specs[first_clean])
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert out["info"] == info


def test_hundreds_of_simultaneous_connections(web, specs):
    targets = [s for s in specs if s.fault is None][:300]
    socks = [socket.create_connection((web.host, web.port), timeout=10) for _ in targets]
    try:
        for sock, s in zip(socks, targets, strict=True):
            sock.sendall(f"GET {s.path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        for sock, s in zip(socks, targets, strict=True):
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ")
            assert data.endswith(render_image(s))
    finally:
        for sock in socks:
            sock.close()


def test_client_disconnects_are_quiet(capfd):
    specs = generate_corpus(10, 2, {"slow_drip": 0.5})
    drips = of_kind(specs, "slow_drip")
    with SampleWebServer(specs, drip_interval_s=0.02) as server:
        for s in drips:
            with socket.create_connection((server.host, server.port), timeout=5) as sock:
                sock.sendall(f"GET {s.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.5)  # the drips now write into closed connections
        assert get(server, "/healthz")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


# ------------------------------------------------------------------ URL zoo


def test_zoo_is_opt_in(web, specs, tmp_path):
    urls = pq.read_table(write_url_list(specs, web, tmp_path / "urls.parquet"))["url"]
    assert not any("/zoo/" in url for url in urls.to_pylist())


def test_zoo_list_names_each_case_with_its_outcome(web, tmp_path):
    table = pq.read_table(write_zoo_url_list(web.host, web.port, tmp_path / "zoo.parquet"))
    assert table.column_names == ["url", "caption", "case", "expected"]
    assert table["case"].to_pylist() == [c.name for c in ZOO_CASES]
    assert len(set(table["case"].to_pylist())) == len(set(table["url"].to_pylist())) == len(table)
    assert set(table["expected"].to_pylist()) == {
        "success",
        "url_policy",
        "invalid_url",
        "too_large",
        "encoding_error",
        "incomplete_body",
        "too_many_redirects",
    }
    urls = dict(zip(table["case"].to_pylist(), table["url"].to_pylist(), strict=True))
    assert urls["iri_query"] == f"{web.base_url}/zoo/query.jpg?lang=中文"
    assert urls["iri_host"] == f"http://１２７．０．０．１:{web.port}/zoo/ok.jpg"
    assert len(urls["long_url"]) > 16_000


def test_zoo_images_and_encodings(web):
    image = zoo_image()
    decode(image)
    for path in ("/zoo/ok.jpg", "/zoo/%E5%9B%BE%E7%89%87/%E7%8C%AB.jpg", "/zoo/with%20space.jpg"):
        assert get(web, path)[2] == image, path
    assert get(web, "/zoo/query.jpg?lang=%E4%B8%AD%E6%96%87")[2] == image
    assert get(web, "/zoo/query.jpg?lang=%D6%D0%CE%C4")[0] == 400  # GBK, not UTF-8
    for path, wbits in (("gzip", 31), ("deflate", 15), ("raw-deflate", -15)):
        _, headers, body = get(web, f"/zoo/{path}.jpg")
        assert headers["Content-Encoding"] in path and zlib.decompress(body, wbits) == image
    _, _, bomb = get(web, "/zoo/gzip-bomb.jpg")
    assert len(bomb) < 100_000 and len(zlib.decompress(bomb, 31)) == GZIP_BOMB_MIB << 20
    with pytest.raises(zlib.error):
        zlib.decompress(get(web, "/zoo/bad-gzip.jpg")[2], 31)


def test_zoo_refuses_credentials(web):
    conn = http.client.HTTPConnection(web.host, web.port, timeout=5)
    try:
        conn.request("GET", "/zoo/ok.jpg", headers={"Authorization": "Basic dXNlcjpzZWNyZXQ="})
        assert conn.getresponse().status == 400
    finally:
        conn.close()


def test_zoo_redirects(web):
    assert get(web, "/zoo/chain/2")[1]["Location"] == "/zoo/chain/1"
    assert get(web, "/zoo/chain/0")[2] == zoo_image()
    assert get(web, "/zoo/loop")[1]["Location"] == "/zoo/loop"
    location = get(web, "/zoo/to-iri")[1]["Location"]
    assert location.encode("latin-1").decode() == IRI_PATH  # raw UTF-8 on the wire


@pytest.mark.parametrize("path", ["/zoo/short.jpg", "/zoo/short-chunked.jpg"])
def test_zoo_short_bodies_close_early(web, path):
    with pytest.raises(http.client.IncompleteRead):
        get(web, path)


def test_serve_forever_writes_the_zoo_list_on_request(tmp_path):
    stop = threading.Event()
    ready = tmp_path / "ready.json"
    thread = threading.Thread(
        target=serve_forever,
        args=(10, 5, tmp_path / "web"),
        kwargs=dict(ready_file=ready, stop_event=stop, zoo=True),
    )
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert pq.read_table(info["zoo_urls"]).num_rows == len(ZOO_CASES)
    finally:
        stop.set()
        thread.join(5)
