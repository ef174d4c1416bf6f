"""Zero-shot and retrieval metrics, sample-web prompts and the held-out set."""

import io

import pytest
import torch
import torch.nn.functional as F

from dataprep.sampleweb.corpus import COLOURS, SHAPES, generate_corpus, render_image
from tests.training.two_ranks import on_two_ranks
from training.evaluate import (
    HELDOUT_SEED,
    crawl_border_resize,
    embedding_ensemble,
    heldout_sampleweb,
    preprocess_images,
    probability_ensemble,
    retrieval_recall,
    sampleweb_classnames,
    sampleweb_metrics,
    sampleweb_zero_shot_setup,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from training.models.clip import create_clip


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_clip("clip-tiny")


@pytest.fixture(scope="module")
def heldout(tiny):
    images, labels, captions = heldout_sampleweb(48, image_size=64)
    return preprocess_images(images, tiny.eval_transform), labels, captions


# --------------------------------------------------------------------------- prompts


def test_prompts_cover_all_16_classes():
    classnames, prompts = sampleweb_zero_shot_setup()
    assert len(classnames) == len(set(classnames)) == 16 == len(prompts)
    for name, class_prompts in zip(classnames, prompts, strict=True):
        colour, shape = name.split()
        assert len(class_prompts) == len(set(class_prompts)) == 6 * 3 * 9 * 4
        for prompt in class_prompts:
            words = prompt.replace(",", " ").replace(":", " ").replace("(", " ").split()
            assert colour in words and shape in words
            assert not (set(words) & (set(COLOURS) | set(SHAPES))) - {colour, shape}


def test_all_fillings_is_the_full_caption_grid():
    _, prompts = sampleweb_zero_shot_setup(fillings=None)
    assert all(len(set(p)) == 6 * 3 * 9 * 4 for p in prompts)


def test_classifier_shape_and_norm(tiny):
    classnames, prompts = sampleweb_zero_shot_setup(fillings=2)
    templates = ["a photo of a {}.", lambda c: f"{c} on a white background"]
    for clf in (
        zero_shot_classifier(tiny.model, tiny.tokenizer, classnames, templates),
        zero_shot_classifier(tiny.model, tiny.tokenizer, ["a", "b", "c"], templates),
    ):
        assert clf.shape[0] == tiny.model.text_projection.shape[1]
        assert torch.allclose(clf.norm(dim=0), torch.ones(clf.shape[1]), atol=1e-5)
    assert clf.shape[1] == 3


# --------------------------------------------------------------------------- metrics


def test_tiny_model_metrics_are_well_formed(tiny, heldout):
    images, labels, captions = heldout
    classnames, prompts = sampleweb_zero_shot_setup(fillings=2)
    clf = zero_shot_classifier(tiny.model, tiny.tokenizer, classnames, [lambda c: c])
    acc = zero_shot_accuracy(tiny.model, clf, images, labels)
    assert set(acc) == {"top1", "top5"} and 0 <= acc["top1"] <= acc["top5"] <= 1
    metrics = sampleweb_metrics(tiny.model, tiny.tokenizer, images, labels, captions, prompts)
    for direction in ("image_to_text", "text_to_image"):
        recalls = [metrics[f"{direction}_R@{k}"] for k in (1, 5, 10)]
        assert 0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1
    for ensemble in ("", "prob_ensemble_"):
        assert 0 <= metrics[f"{ensemble}top1"] <= metrics[f"{ensemble}top5"] <= 1
    assert tiny.model.training  # evaluation restored the mode


def test_perfect_features_give_recall_one():
    feats = F.normalize(torch.randn(20, 8), dim=-1)
    assert set(retrieval_recall(feats, feats + 0.01 * torch.randn(20, 8)).values()) == {1.0}


def test_recall_counts_ties_against_and_is_monotone():
    collapsed = torch.ones(10, 4)  # every pair ties: a collapsed model must not score
    recalls = retrieval_recall(collapsed, collapsed, ks=(1, 5, 10))
    assert recalls["image_to_text_R@1"] == recalls["text_to_image_R@5"] == 0.0
    assert recalls["image_to_text_R@10"] == 1.0  # k = N: always found
    img, txt = torch.randn(50, 16), torch.randn(50, 16)
    r = retrieval_recall(img, txt, ks=(1, 2, 5, 10, 50))
    assert [r[f"image_to_text_R@{k}"] for k in (1, 2, 5, 10, 50)] == sorted(
        r[f"image_to_text_R@{k}"] for k in (1, 2, 5, 10, 50)
    )
    assert r["text_to_image_R@50"] == 1.0


def test_perfect_classifier_gives_accuracy_one():
    class Oracle(torch.nn.Module):  # image features = one-hot label embeddings
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode_image(self, x, normalize=False):
            return F.one_hot(x[:, 0, 0, 0].long(), 16).float()

    labels = torch.arange(32) % 16
    images = labels.float()[:, None, None, None].expand(32, 3, 2, 2)
    acc = zero_shot_accuracy(Oracle(), torch.eye(16), images, labels)
    assert acc == {"top1": 1.0, "top5": 1.0}


# --------------------------------------------------------------------------- held-out data


def test_heldout_is_clean_labelled_and_crawl_sized():
    images, labels, captions = heldout_sampleweb(20, seed=HELDOUT_SEED, image_size=48)
    assert len(images) == len(captions) == labels.shape[0] == 20
    assert all(img.size == (48, 48) and img.mode == "RGB" for img in images)
    names = sampleweb_classnames()
    for label, caption in zip(labels.tolist(), captions, strict=True):
        colour, shape = names[label].split()
        assert colour in caption and shape in caption


def test_border_resize_is_byte_identical_to_img2dataset(monkeypatch):
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import
    from img2dataset.resizer import Resizer

    specs = generate_corpus(12, seed=7, fault_rates={})
    for size in (64, 200):  # shrinking (INTER_AREA) and enlarging (LANCZOS4)
        resizer = Resizer(size, "border", resize_only_if_bigger=False, encode_quality=95)
        for spec in specs:
            data = render_image(spec)
            assert crawl_border_resize(data, size) == resizer(io.BytesIO(data))[0]


def test_probability_ensemble_sums_prompt_probabilities_per_class():
    prompts = F.normalize(torch.randn(7, 8), dim=-1)
    images = F.normalize(torch.randn(5, 8), dim=-1)
    probs = probability_ensemble(images, prompts, [3, 4], logit_scale=10.0)
    assert probs.shape == (5, 2)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-6)
    full = (10.0 * images @ prompts.T).softmax(1)
    assert torch.allclose(probs[:, 1], full[:, 3:].sum(1), atol=1e-6)


def test_probability_ensemble_finds_the_class_when_the_embedding_mean_does_not():
    # Class A: one prompt matches the image exactly, its others point elsewhere; class B's
    # prompts all sit at a middling angle. The mean of A's prompts is far from the image
    # (embedding space says B); the softmax mass says A.
    image = torch.tensor([[1.0, 0.0, 0.0]])
    a = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]]), dim=-1)
    b = F.normalize(torch.tensor([[0.8, 0.6, 0], [0.8, 0, 0.6]]), dim=-1)
    prompts, sizes = torch.cat([a, b]), [4, 2]
    assert (image @ embedding_ensemble(prompts, sizes)).argmax().item() == 1
    assert probability_ensemble(image, prompts, sizes, logit_scale=20.0).argmax().item() == 0


# --------------------------------------------------------------------------- sharded over ranks

EVAL_N = 40  # not a multiple of the world size' per-rank batches: the last share is padded


def write_heldout_shard(folder) -> str:
    """A held-out shard in the ImageNet-wds layout: jpg, txt and a class index in cls."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    specs = generate_corpus(EVAL_N - 1, seed=HELDOUT_SEED + 1, fault_rates={})
    with wds.TarWriter(str(folder / "00000.tar")) as tar:
        for i, spec in enumerate(specs):
            label = SHAPES.index(spec.shape) * len(COLOURS) + COLOURS.index(spec.colour)
            jpeg = crawl_border_resize(render_image(spec), 64)
            sample = {"__key__": f"{i:05d}", "jpg": jpeg, "txt": spec.caption, "cls": str(label)}
            tar.write(sample)
    return (folder / "00000.tar").as_uri()


def eval_configs(source: str):
    from training.config import TrainConfig

    base = {"name": "e", "model": "clip-tiny", "data": {"source": "file:///d/"}}
    sampleweb = {"heldout_samples": EVAL_N + 1, "batch_size": 8}
    shards = {
        "set": "shards",
        "source": source,
        "classes": sampleweb_classnames(),
        "templates": ["a {}.", "a drawing of a {}."],
        "batch_size": 8,
    }
    return [TrainConfig(**base, eval=e) for e in (sampleweb, shards)]


def run_evaluations(source: str) -> tuple[list[dict], int]:
    """Both evaluation sets' metrics, and how many images this rank's image tower saw."""
    from training.specs.clip import ClipSpec

    spec = ClipSpec()
    cfgs = eval_configs(source)
    torch.manual_seed(0)
    model = spec.build(cfgs[0])
    seen = []
    model.visual.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    results = [spec.evaluate(model, cfg, torch.float32) for cfg in cfgs]
    return results, sum(seen)


@pytest.mark.slow
def test_evaluation_is_sharded_over_ranks_and_names_its_set(tmp_path):
    source = write_heldout_shard(tmp_path / "heldout")
    alone, seen_alone = run_evaluations(source)
    results = on_two_ranks(run_evaluations, source, tmp_path=tmp_path)
    sampleweb, shards = alone
    assert {"eval/top1", "eval/image_to_text_R@1"} <= set(sampleweb) & set(shards)
    assert sampleweb != shards  # two different sets
    for rank in (0, 1):
        metrics, seen = results[rank]
        for one, sharded in zip(alone, metrics, strict=True):
            assert sharded.keys() == one.keys()
            for name in one:
                assert sharded[name] == pytest.approx(one[name], abs=1e-6), name
        # each rank encodes its half (padded to equal shares), not the whole set
        assert seen == (EVAL_N + 1 + 1) // 2 + EVAL_N // 2
    assert seen_alone == EVAL_N + 1 + EVAL_N - 1


def test_held_out_shards_need_a_source():
    from pydantic import ValidationError

    from training.config import EvalSection

    with pytest.raises(ValidationError, match="eval.set = 'shards' needs eval.source"):
        EvalSection(set="shards")
    assert EvalSection(set="none").set == "none"
