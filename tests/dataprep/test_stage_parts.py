"""The parts of the post-crawl stages, on small data: filters, hashes, dedup, resharding, versions."""

import io

import numpy as np
import pytest
from PIL import Image

from dataprep.filters import FilterConfig, caption_reason, image_reason, judge_sample
from dataprep.phash import (
    colour_distance,
    colour_signature,
    content_box,
    hamming,
    phash,
)
from dataprep.publish import (
    DatasetManifest,
    PublishConfig,
    PublishError,
    ScorerInfo,
    choose_version,
    list_datasets,
    plan_shards,
    read_manifest,
)
from dataprep.sampleweb.corpus import generate_corpus, render_image
from dataprep.semdedup import ArraySource, SemanticConfig, greedy_within, semantic_dedup
from dataprep.stages import KEPT, StageStats
from training.scorer import best_threshold


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- filters


def test_datacomp_basic_filter_defaults():
    cfg = FilterConfig()
    assert caption_reason("", cfg) == "empty_caption"
    assert caption_reason("   ", cfg) == "empty_caption"
    assert caption_reason("a cat", cfg) == "caption_too_short"  # 5 characters
    assert caption_reason("redcircle", cfg) == "caption_too_few_words"
    assert caption_reason("a red circle", cfg) is None  # 3 words, 12 characters
    assert image_reason(199, 400, 1000, cfg) == "image_too_small"
    assert image_reason(200, 601, 1000, cfg) == "aspect_ratio"
    assert image_reason(200, 600, 1000, cfg) is None


def test_each_sample_gets_exactly_one_reason():
    cfg = FilterConfig(min_image_side=16, max_image_bytes=10_000)
    good = jpeg(Image.new("RGB", (64, 64), (200, 30, 30)))
    meta = b'{"original_width": 100, "original_height": 120, "url": "http://x/1.jpg"}'
    cases = {
        "kept": {"jpg": good, "txt": b"a red square on white", "json": meta},
        "missing_image": {"txt": b"a red square on white", "json": meta},
        "decode_error": {"jpg": good[: len(good) // 2], "txt": b"a red square", "json": meta},
        "empty_caption": {"jpg": good, "txt": b"", "json": meta},
        "image_bytes_too_large": {
            "jpg": jpeg(Image.effect_noise((256, 256), 80).convert("RGB"), 95),
            "txt": b"noise noise noise",
            "json": meta,
        },
    }
    for expected, files in cases.items():
        row = judge_sample("k", files, cfg)
        assert row["reason"] == expected, (expected, row)
    kept = judge_sample("k", cases["kept"], cfg)
    assert len(kept["sha256"]) == 64 and kept["phash"] is not None and len(kept["colours"]) == 6


def test_stage_stats_must_add_up():
    stats = StageStats.of("filter", 0, "fp", [KEPT, KEPT, "empty_caption"])
    assert (stats.count, stats.kept, stats.by_reason) == (3, 2, {KEPT: 2, "empty_caption": 1})
    with pytest.raises(AssertionError, match="do not add up"):
        StageStats(stage="x", shard=0, fingerprint="", count=3, kept=2, by_reason={KEPT: 2}).check()


# --------------------------------------------------------------------------- perceptual


def sample_web_pictures(n: int = 60):
    specs = [s for s in generate_corpus(n, seed=11, fault_rates={})]
    return [Image.open(io.BytesIO(render_image(s))).convert("RGB") for s in specs]


def test_phash_survives_reencoding_and_resizing():
    for picture in sample_web_pictures(20):
        h = phash(picture)
        requality = Image.open(io.BytesIO(jpeg(picture, 40)))
        smaller = picture.resize((picture.width * 3 // 4, picture.height * 3 // 4))
        assert hamming(np.array([h]), np.array([phash(requality)]))[0] <= 6
        assert hamming(np.array([h]), np.array([phash(smaller)]))[0] <= 8
        # exact colours survive resizing (within the demo's dedup threshold, 3 levels);
        # heavy JPEG moves saturated colours by up to tens of levels
        assert colour_distance(colour_signature(picture), colour_signature(smaller)) <= 3


def border_resized(picture: Image.Image, size: int = 64) -> Image.Image:
    """What the crawl stores in img2dataset's border mode: longest side to ``size``, centred
    on white."""
    scale = size / max(picture.size)
    w, h = round(picture.width * scale), round(picture.height * scale)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(picture.resize((w, h)), ((size - w) // 2, (size - h) // 2))
    return out


def test_content_box_is_the_picture_without_the_crawls_padding():
    assert content_box((64, 64), (200, 100)) == (0, 17, 64, 47)  # 64 x 32 at row 16, seam inset
    assert content_box((64, 64), (90, 180)) == (17, 0, 47, 64)
    assert content_box((64, 64), (120, 120)) is None  # square: no padding
    assert content_box((64, 48), (200, 150)) is None  # not a padded square
    picture = Image.new("RGB", (200, 100), (128, 128, 128))
    picture.paste((220, 30, 30), (80, 30, 120, 70))
    stored = border_resized(picture)
    content = stored.crop(content_box(stored.size, picture.size))
    assert (np.asarray(content) < 250).all(), "no padding left"
    # with the padding, the most frequent colour is the padding's, not the picture's background
    assert min(colour_signature(stored)[:3]) >= 250
    assert np.allclose(colour_signature(content)[:3], 128, atol=1)


def test_colour_signature_tells_recoloured_layouts_apart():
    red = Image.new("RGB", (64, 64), (128, 128, 128))
    red.paste((220, 30, 30), (16, 16, 48, 48))
    blue = Image.new("RGB", (64, 64), (128, 128, 128))
    blue.paste((30, 70, 220), (16, 16, 48, 48))
    assert hamming(np.array([phash(red)]), np.array([phash(blue)]))[0] <= 16  # pHash: alike
    assert colour_distance(colour_signature(red), colour_signature(blue)) > 100
    assert colour_distance(colour_signature(red), colour_signature(red)) == 0


# exact and perceptual edges: tests/dataprep/test_dedup.py


# --------------------------------------------------------------------------- semantic


def planted(n: int, dim: int, duplicates: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    copies = rng.choice(n - duplicates, duplicates, replace=False)
    noise = 0.01 * rng.standard_normal((duplicates, dim)).astype(np.float32)
    x[n - duplicates :] = x[copies] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, copies


def test_greedy_within_drops_only_later_items_similar_to_kept_ones():
    e = np.eye(4, dtype=np.float32)
    e = np.vstack([e, e[1:2], e[1:2]])  # rows 4 and 5 duplicate row 1
    assert greedy_within(e, 0.99).tolist() == [-1, -1, -1, -1, 1, 1]


def test_semdedup_finds_the_planted_duplicates_like_brute_force():
    x, copies = planted(3000, 64, 150)
    cfg = SemanticConfig(eps=0.01, cluster_size=300)
    result = semantic_dedup(ArraySource(x), cfg)
    brute = greedy_within(x, 1 - cfg.eps)
    assert result.clusters == 10
    assert (result.keep == (brute < 0)).mean() >= 0.999
    assert set(np.flatnonzero(~result.keep)) == set(range(2850, 3000))
    assert (result.duplicate_of[2850:] == copies).all()


# --------------------------------------------------------------------------- publish


def test_reshard_plan_by_count_and_by_bytes():
    keys = [f"{i:09d}" for i in range(25)]
    info = {k: {"image_bytes": 1000, "caption_chars": 20} for k in keys}
    plan = plan_shards(keys, info, PublishConfig(samples_per_shard=10))
    sizes = np.bincount([s for s, _ in plan.values()])
    assert sizes.tolist() == [10, 10, 5]
    assert sorted(plan) == keys and plan != plan_shards(keys, info, PublishConfig(seed=1))
    by_bytes = plan_shards(keys, info, PublishConfig(samples_per_shard=None, bytes_per_shard=5000))
    assert max(np.bincount([s for s, _ in by_bytes.values()])) == 3  # 3 x 1532 bytes fit


def manifest(name: str, version: str, fp: str) -> DatasetManifest:
    return DatasetManifest(
        name=name,
        version=version,
        fingerprint=fp,
        created_at="2026-01-01T00:00:00+00:00",
        samples=0,
        bytes=0,
        shards=[],
        stages={},
        scorer=ScorerInfo(model="m", weights="w", sha256="s", threshold=0.1),
        config={},
    )


def test_versions_exist_only_with_a_manifest_and_are_never_overwritten(store):
    store.put_bytes(
        "datasets/d/v1/manifest.json", manifest("d", "v1", "aaa").model_dump_json().encode()
    )
    store.put_bytes("datasets/d/v2/00000.tar", b"half-written")  # no manifest: not a version
    store.put_bytes(
        "datasets/d/v10/manifest.json", manifest("d", "v10", "bbb").model_dump_json().encode()
    )
    assert list_datasets(store) == [("d", "v1"), ("d", "v10")]
    assert read_manifest(store, "d").version == "v10"
    with pytest.raises(PublishError, match="not published"):
        read_manifest(store, "d", "v2")
    assert choose_version(store, "d", PublishConfig(), "ccc") == "v11"
    assert choose_version(store, "d", PublishConfig(), "aaa").version == "v1"  # same build
    with pytest.raises(PublishError, match="never overwritten"):
        choose_version(store, "d", PublishConfig(version="v1"), "ccc")


def test_calibrated_threshold_separates_the_two_score_sets():
    import torch

    threshold, accuracy = best_threshold(torch.tensor([0.5, 0.6, 0.7]), torch.tensor([0.1, 0.2]))
    assert 0.2 < threshold < 0.5 and accuracy == 1.0


# --------------------------------------------------------------------------- embedding


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    import torch

    from dataprep.clip_models import create_clip
    from dataprep.embed import EmbedConfig, Embedder

    weights = tmp_path_factory.mktemp("scorer") / "random.pt"
    torch.manual_seed(0)
    torch.save(create_clip("clip-tiny").model.state_dict(), weights)
    return Embedder(EmbedConfig(model="clip-tiny", weights=str(weights), batch_size=4))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def embed_inputs(n: int = 11) -> list[tuple[str, bytes, str]]:
    """(key, image bytes, caption): sample-web JPEGs, and a PNG with alpha, a grey and a wide
    image, which the eval transform pads."""
    specs = generate_corpus(n, seed=3, fault_rates={})
    samples = [(f"{i:09d}", render_image(s), s.caption) for i, s in enumerate(specs)]
    rgba = Image.new("RGBA", (40, 30), (10, 200, 30, 128))
    samples[2] = (samples[2][0], encoded(rgba, "PNG"), samples[2][2])
    samples[5] = (samples[5][0], jpeg(Image.new("L", (70, 70), 90)), samples[5][2])
    samples[7] = (samples[7][0], jpeg(Image.new("RGB", (120, 20), (0, 0, 250))), "wide")
    return samples


def write_shard(staging, samples, kept: set[str], corrupt: str | None = None) -> None:
    """Crawl tar and filter table of shard 0; the filter kept ``kept``."""
    import tarfile

    import pyarrow as pa

    from dataprep.stages import table_bytes

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data, caption in samples:
            ext = "png" if data.startswith(b"\x89PNG") else "jpg"
            data = data[: len(data) // 3] if key == corrupt else data
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    staging.store.put_bytes(staging.key("crawl", 0, "tar"), buf.getvalue())
    keys = [k for k, _, _ in samples]
    reasons = [KEPT if k in kept else "caption_too_short" for k in keys]
    table = pa.table({"key": keys, "reason": reasons})
    staging.store.put_bytes(staging.key("filter", 0, "parquet"), table_bytes(table))


def test_preprocess_is_the_eval_transform_bit_for_bit(embedder):
    import torch

    data = [d for _, d, _ in embed_inputs()]
    expected = torch.stack(
        [embedder.bundle.eval_transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in data]
    )
    assert torch.equal(embedder.preprocess(data), expected)


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_embed_shard_outputs_do_not_depend_on_prefetching(embedder, local_store, prefetch):
    """Every path gives the embeddings of the plain per-image transform and forward, batch by
    batch, for the filter-kept samples in tar order."""
    import torch

    from dataprep.embed import EMBED, embed_shard, load_embeddings
    from dataprep.stages import Staging

    samples = embed_inputs()
    kept = [s for i, s in enumerate(samples) if i not in (1, 8)]
    staging = Staging(local_store, f"p{prefetch}")
    write_shard(staging, samples, {k for k, _, _ in kept})
    stats = embed_shard(staging, 0, embedder, "fp", prefetch=prefetch)
    assert (stats.count, stats.kept) == (len(kept), len(kept))

    image, text = [], []
    for i in range(0, len(kept), embedder.batch_size):
        batch = kept[i : i + embedder.batch_size]
        pixels = torch.stack(
            [
                embedder.bundle.eval_transform(Image.open(io.BytesIO(d)).convert("RGB"))
                for _, d, _ in batch
            ]
        )
        out = embedder.forward(pixels, [c for _, _, c in batch])
        image.append(out[0])
        text.append(out[1])
    table = staging.table(EMBED, 0)
    assert table["key"].to_pylist() == [k for k, _, _ in kept]
    np.testing.assert_array_equal(load_embeddings(staging, 0, "image"), np.concatenate(image))
    np.testing.assert_array_equal(load_embeddings(staging, 0, "text"), np.concatenate(text))
    scores = (np.concatenate(image) * np.concatenate(text)).sum(1).astype(np.float32)
    np.testing.assert_array_equal(table["clip_score"].to_numpy(), scores)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_embed_shard_fails_on_a_corrupt_image_and_commits_nothing(embedder, local_store, prefetch):
    import threading

    from dataprep.embed import EMBED, embed_shard
    from dataprep.stages import Staging

    samples = embed_inputs()
    staging = Staging(local_store, f"c{prefetch}")
    write_shard(staging, samples, {k for k, _, _ in samples}, corrupt=samples[6][0])
    with pytest.raises(OSError):  # PIL: truncated or unidentified image
        embed_shard(staging, 0, embedder, "fp", prefetch=prefetch)
    assert staging.stats(EMBED, 0, "fp") is None
    assert not local_store.list(staging.prefix(EMBED) + "/")
    assert not [t for t in threading.enumerate() if t.name == "embed-prefetch"]


def test_prefetched_raises_the_producers_error_and_stops_both_ways():
    import threading

    from dataprep.embed import prefetched

    produced, closed = [], []

    def items(fail_at: int | None):
        try:
            for i in range(100):
                if i == fail_at:
                    raise ValueError(f"bad item {i}")
                produced.append(i)
                yield i
        finally:
            closed.append(threading.current_thread().name)

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for item in prefetched(items(3), 2):
            got.append(item)
    assert got == [0, 1, 2] and produced == [0, 1, 2] and closed == ["embed-prefetch"]

    # the consumer fails: the producer stops a few items ahead and its iterator is closed
    produced.clear(), closed.clear()
    with pytest.raises(RuntimeError, match="consumer"):
        for item in prefetched(items(None), 2):
            if item == 5:
                raise RuntimeError("consumer")
    assert len(produced) <= 5 + 1 + 2 + 1 and closed == ["embed-prefetch"]
    assert list(prefetched(iter(range(7)), 3)) == list(range(7))
    assert not [t for t in threading.enumerate() if t.name == "embed-prefetch"]
