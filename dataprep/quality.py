"""A build scored against the sample web's ground truth: what the stages after the crawl dropped,
and whether they were right.

The sample web labels every planted fault (``SampleSpec.fault``; duplicates name their original),
so precision and recall are counted, not eyeballed:

- **score**: mismatched captions among the pairs that reached the CLIP-score stage, against the
  pairs it dropped as ``low_clip_score``.
- **exact / near**: a planted duplicate counts as found when it, or its original, was dropped as a
  duplicate of the other's group (``duplicate_of``). Near duplicates are judged across the
  perceptual and semantic stages together; a near or semantic drop is right when the item it
  names belongs to the dropped item's group.
- **clean**: unique, well-captioned samples (no fault, nobody's original) dropped by any stage.

Counts, not ratios, are kept so that corpora pool: one corpus of 1,000 samples plants 25 of each
fault, so one sample moves a ratio by 0.04; pooled over several seeds the figures settle.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

from dataprep.stages import KEPT, Staging

STAGES_AFTER_CRAWL = ("filter", "embed", "score", "dedup")
NEAR_REASONS = frozenset({"near_duplicate", "semantic_duplicate"})


def final_outcomes(staging: Staging, shards) -> dict[str, dict]:
    """crawl key -> {"url", "stage", "reason", "duplicate_of"} for every sample the crawl kept:
    the stage that dropped it (or the last stage, ``reason`` KEPT)."""
    out: dict[str, dict] = {}
    for shard in shards:
        for row in staging.table("filter", shard).to_pylist():
            out[row["key"]] = {"url": row["url"], "stage": "filter", "reason": row["reason"]}
        for stage in STAGES_AFTER_CRAWL[1:]:
            for row in staging.table(stage, shard).to_pylist():
                if row["reason"] != KEPT:
                    out[row["key"]] |= {"stage": stage, "reason": row["reason"]}
                    out[row["key"]]["duplicate_of"] = row.get("duplicate_of")
    return out


def specs_by_key(specs, outcome: dict[str, dict]) -> dict:
    """crawl key -> the sample web's spec of the URL it was crawled from."""
    by_path = {s.path: s for s in specs}
    return {key: by_path["/" + o["url"].split("/", 3)[3]] for key, o in outcome.items()}


@dataclass
class BuildQuality:
    """Counts against the labels; ``+`` pools corpora, :meth:`figures` gives the ratios."""

    mismatched: int = 0  # mismatched captions that reached the score stage
    low_score: int = 0  # pairs the score stage dropped
    low_score_mismatched: int = 0  # ... that were mismatched
    exact: int = 0  # planted exact duplicates that reached dedup with their original
    exact_found: int = 0
    near: int = 0  # planted near duplicates that reached dedup with their original
    near_found: int = 0
    near_dropped: int = 0  # near + semantic drops
    near_dropped_right: int = 0  # ... naming an item of the same group
    clean: int = 0
    clean_dropped: int = 0
    clean_drops: Counter = field(default_factory=Counter)  # reason -> clean samples

    def __add__(self, other: BuildQuality) -> BuildQuality:
        return BuildQuality(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def figures(self) -> dict[str, float]:
        def ratio(a: int, b: int) -> float:
            return a / b if b else 1.0

        return {
            "score_recall": ratio(self.low_score_mismatched, self.mismatched),
            "score_precision": ratio(self.low_score_mismatched, self.low_score),
            "exact_recall": ratio(self.exact_found, self.exact),
            "near_recall": ratio(self.near_found, self.near),
            "near_precision": ratio(self.near_dropped_right, self.near_dropped),
            "clean_dropped": ratio(self.clean_dropped, self.clean),
        }


def build_quality(specs, staging: Staging, shards) -> BuildQuality:
    """Score the build in ``staging`` (crawled from the sample web ``specs``) against its labels."""
    outcome = final_outcomes(staging, shards)
    spec = specs_by_key(specs, outcome)
    key_of = {s.key: k for k, s in spec.items()}  # sample web key -> crawl key
    group = {k: s.duplicate_of or s.key for k, s in spec.items()}  # crawl key -> source picture

    scored = {k for k, o in outcome.items() if o["stage"] != "filter" or o["reason"] == KEPT}
    mismatched = {k for k in scored if spec[k].fault == "mismatched_caption"}
    low = {k for k in scored if outcome[k]["reason"] == "low_clip_score"}

    def found(k: str, reasons: set[str] | frozenset[str]) -> bool:
        """The duplicate or its original was dropped as a duplicate of the other's group."""
        for a in (k, key_of.get(spec[k].duplicate_of)):
            o = outcome.get(a)
            if o and o["reason"] in reasons and group.get(o.get("duplicate_of")) == group[k]:
                return True
        return False

    def reached_dedup(k: str) -> bool:
        original = key_of.get(spec[k].duplicate_of)
        if original not in outcome:
            return False
        return all(
            outcome[a]["stage"] == "dedup" or outcome[a]["reason"] == KEPT for a in (k, original)
        )

    exact = [k for k in scored if spec[k].fault == "exact_duplicate" and reached_dedup(k)]
    near = [k for k in scored if spec[k].fault == "near_duplicate" and reached_dedup(k)]
    near_dropped = [k for k, o in outcome.items() if o["reason"] in NEAR_REASONS]
    referenced = {s.duplicate_of for s in spec.values() if s.duplicate_of}
    clean = [k for k, s in spec.items() if s.fault is None and s.key not in referenced]
    clean_drops = Counter(outcome[k]["reason"] for k in clean if outcome[k]["reason"] != KEPT)
    return BuildQuality(
        mismatched=len(mismatched),
        low_score=len(low),
        low_score_mismatched=len(low & mismatched),
        exact=len(exact),
        exact_found=sum(found(k, {"exact_duplicate"}) for k in exact),
        near=len(near),
        near_found=sum(found(k, NEAR_REASONS) for k in near),
        near_dropped=len(near_dropped),
        near_dropped_right=sum(group[outcome[k]["duplicate_of"]] == group[k] for k in near_dropped),
        clean=len(clean),
        clean_dropped=sum(clean_drops.values()),
        clean_drops=clean_drops,
    )
