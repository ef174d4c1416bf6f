"""`mmpipe demo`: the whole pipeline on the synthetic sample web, on 2 CPU cores.

Serve the sample web on loopback, build and publish a dataset from it (crawl, filters, CLIP
score with a scorer trained once and cached, dedup, publish), train CLIP, the dVAE and DALL-E on
the published version through their Prefect flows, and draw held-out captions with DALL-E,
re-ranked by the CLIP it trained.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dataprep.state import state_dir
from pipelines.commands import build_with_progress, train_config, train_with_progress
from pipelines.config import BuildConfig, load_config

READY_TIMEOUT_S = 120.0
#: Where the demo stops: after the crawl, the published build, CLIP, or (all) DALL-E samples.
UNTIL = ("crawl", "build", "clip", "all")
SCORER_PATH = ("cache", "scorer", "clip-scorer-tiny.pt")  # under the state dir
#: Short schedules that keep the whole demo near 10 minutes on 2 cores (the configs hold the
#: full recipes: docs/recipes.md).
DEMO_SCHEDULES = {  # CLIP: zero-shot eval at the end only (each costs ~30 s here)
    "clip": ["steps=150", "eval.every_steps=0", "checkpoint_every=50", "optim.warmup_steps=20"],
    "dvae": [],  # configs/dvae-tiny.yaml as it is: 600 steps
    "dalle": [],  # configs/dalle-tiny.yaml as it is: 600 steps
}
#: Held-out captions drawn at the end, and candidates per caption re-ranked by the demo's CLIP.
DEMO_CAPTIONS = 32
DEMO_CANDIDATES = 8


@dataclass
class DemoConfigs:
    """The training configs the demo runs (each with the demo's schedule and run name)."""

    clip: str = "configs/clip-tiny.yaml"
    dvae: str = "configs/dvae-tiny.yaml"
    dalle: str = "configs/dalle-tiny.yaml"
    overrides: dict[str, list[str]] = field(default_factory=dict)  # model -> KEY=VALUE


@contextmanager
def sample_web(n: int, seed: int, out: Path):
    """Run `mmpipe sampleweb serve` in a child process on a free port; yield its ready info."""
    out.mkdir(parents=True, exist_ok=True)
    ready = out / "ready.json"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipelines.cli", "sampleweb", "serve", "--n", str(n)]
    cmd += ["--seed", str(seed), "--port", "0", "--out", str(out), "--ready-file", str(ready)]
    server = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if server.poll() is not None:
                raise RuntimeError(f"sample web server exited with code {server.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sample web server not ready after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        yield json.loads(ready.read_text())
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_demo(
    config_path: str,
    overrides: list[str],
    n: int,
    seed: int,
    until: str = "all",
    configs: DemoConfigs | None = None,
) -> int:
    """Crawl the sample web, publish a dataset, train CLIP, the dVAE and DALL-E on it, draw."""
    configs = configs or DemoConfigs()
    if until not in UNTIL:
        raise ValueError(f"until must be one of {UNTIL}, not {until!r}")
    started = time.monotonic()
    scorer = state_dir().joinpath(*SCORER_PATH)
    build_overrides = ["crawl_only=true"] if until == "crawl" else _scorer_overrides(scorer)
    config = load_config(BuildConfig, config_path, [*build_overrides, *overrides])
    placeholder = "file:///placeholder/manifest.json"
    runs = {m: _train_config(m, configs, placeholder) for m in _models(until)}  # fail fast
    if until != "crawl":
        _ensure_scorer(scorer)
    manifest = _build(config, n, seed)
    _lap(started, "build")
    if until in ("crawl", "build"):
        return 0
    exports = {}
    for model in runs:
        extra = []
        if model == "dalle":  # the transformer reads the dVAE's codes, coded once
            codes = _encode(exports["dvae"], manifest, runs["dvae"])
            extra = [f"dvae_checkpoint={exports['dvae']}", f"data.codes={codes}"]
            _lap(started, "codes")
        cfg = _train_config(model, configs, manifest, extra)
        exports[model] = _train(cfg)
        _lap(started, model)
    if until == "all":
        clip = runs["clip"]
        _generate(exports["dalle"], clip.model, exports["clip"])
        _lap(started, "samples")
    return 0


def _models(until: str) -> list[str]:
    return {"crawl": [], "build": [], "clip": ["clip"], "all": ["clip", "dvae", "dalle"]}[until]


def _lap(started: float, what: str) -> None:
    print(f"[demo] {what} done at {time.monotonic() - started:.0f} s")


def _scorer_overrides(path: Path) -> list[str]:
    from training.scorer import ScorerRecipe

    return [f"embed.model={ScorerRecipe().model}", f"embed.weights={path}"]


def _ensure_scorer(path: Path) -> None:
    """The build's CLIP scorer: trained once (about 100 s), then reused from the cache."""
    from training.scorer import ensure_scorer

    print(f"[demo] CLIP scorer for the build: {path} (trained on first use)")
    ensure_scorer(path, log=lambda line: print(f"[scorer] {line}"))


def _build(config: BuildConfig, n: int, seed: int) -> str | None:
    """Serve the sample web, run build-dataset on it; the published manifest's URI."""
    with sample_web(n, seed, state_dir() / "sampleweb") as web:
        print(f"[demo] sample web: {web['n']} samples at {web['base_url']}")
        config = config.model_copy(
            update={"urls": web["urls"], "crawl": _allow(config.crawl, web["port"])}
        )
        # The server's port, and so every URL, is new each run: start the demo build afresh.
        _remove(config.store.open(), f"staging/{config.name}/", "the previous demo build")
        result = build_with_progress(config, label="[demo] ")
    return result.manifest_uri


def _allow(crawl, port: int):
    policy = crawl.policy.model_copy(update={"allow": [f"127.0.0.1:{port}"]})
    return crawl.model_copy(update={"policy": policy})


def _train(cfg) -> str:
    """Train afresh through the spec's Prefect flow; the URI of its exported weights."""
    _remove(cfg.store.open(), f"{cfg.run_prefix()}/", f"the previous {cfg.name} run")
    print(f"[demo] training {cfg.model} for {cfg.steps} steps on {cfg.data.source}")
    return train_with_progress(cfg)["export"]


def _encode(dvae_export: str, manifest: str, dvae_run) -> str:
    """Code the published shards with the trained dVAE; the sidecars' folder URI."""
    from pipelines.dalle_flows import encode_codes
    from training.encode_codes import EncodeConfig

    out = dvae_run.store.open().uri(f"{dvae_run.run_prefix()}/codes") + "/"
    print(f"[demo] coding the published shards with {dvae_export} into {out}")
    encode_codes(EncodeConfig(source=manifest, dvae_checkpoint=dvae_export, out=out))
    return out


def _generate(dalle_export: str, clip_model: str, clip_export: str) -> None:
    from pipelines.console import print_generation_report
    from pipelines.dalle_flows import generate_dalle
    from training.generate import GenerateConfig, SamplingConfig

    cfg = GenerateConfig(
        name="demo",
        dalle_checkpoint=dalle_export,
        clip_model=clip_model,
        clip_weights=clip_export,
        heldout=DEMO_CAPTIONS,
        sampling=SamplingConfig(candidates=DEMO_CANDIDATES),
    )
    print(f"[demo] drawing {DEMO_CAPTIONS} held-out captions x {DEMO_CANDIDATES} candidates")
    print_generation_report(generate_dalle(cfg))


def _train_config(model: str, configs: DemoConfigs, source: str, extra: list[str] = ()):
    # Its own run name: the demo starts its runs afresh and must not touch a user's runs.
    base = [f"data.source={source}", f"name=demo-{model}", *DEMO_SCHEDULES[model]]
    if model == "dalle" and not extra:
        extra = ["dvae_checkpoint=file:///placeholder/dvae.pt"]
    overrides = [*base, *extra, *configs.overrides.get(model, [])]
    # The data and the dVAE come later in the demo.
    return train_config(model, getattr(configs, model), overrides, inputs=False)


def _remove(store, prefix: str, what: str) -> None:
    removed = store.delete_prefix(prefix)
    if removed:
        print(f"[demo] removed {what} ({removed} objects)")
