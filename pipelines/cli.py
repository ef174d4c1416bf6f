"""The `mmpipe` command.

Light at import: `--help` and config errors need argparse, the configs and the model registry;
each command imports what it runs (Prefect, Ray, torch) itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dataprep.errors import debugging
from dataprep.state import state_dir
from pipelines.commands import (
    build_with_progress,
    check_prefect_api,
    prepare_environment,
    run_reporting_errors,
    train_config,
    train_with_progress,
)
from pipelines.config import BuildConfig, ConfigError, load_config
from training.registry import spec_names

SERVE_CONFIG = "configs/serve.yaml"


def build_config_from_args(args: argparse.Namespace) -> BuildConfig:
    overrides = list(args.overrides)
    if args.ray_address:
        overrides.append(f"cluster.ray_address={args.ray_address}")
    return load_config(BuildConfig, args.config, overrides)


def cmd_build(args: argparse.Namespace) -> int:
    config = build_config_from_args(args)
    from dataprep.url_list import check_url_list

    crawl = config.crawl
    check_url_list(config.urls, crawl.url_col, crawl.caption_col, config.store.s3)
    config.store.open().check_reachable()
    build_with_progress(config)
    return 0


def train_config_from_args(args: argparse.Namespace, inputs: bool = True):
    """The TrainConfig of a parsed `train` command (`commands.train_config`)."""
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.ray_address:
        overrides.append(f"scale.ray_address={args.ray_address}")
    return train_config(args.model, args.config, overrides, inputs=inputs)


def cmd_train(args: argparse.Namespace) -> int:
    train_with_progress(train_config_from_args(args))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.plan import format_plan, plan_memory

    config = load_config(TrainConfig, args.config, args.overrides)
    try:
        plan = plan_memory(
            config,
            gpus=args.gpus,
            gpu_mem_gb=args.gpu_mem,
            gpus_per_node=args.gpus_per_node,
            headroom=args.headroom,
            config_name=args.config,
            cpu_mem_gb=args.cpu_mem,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(format_plan(plan))
    return 0 if plan.verdict is not None else 1


def generate_config_from_args(args: argparse.Namespace):
    from training.generate import GenerateConfig

    overrides = [
        f"name={args.name}",
        f"dalle_checkpoint={args.checkpoint}",
        f"heldout={args.heldout}",
        f"heldout_seed={args.heldout_seed}",
        f"sampling.candidates={args.candidates}",
        f"sampling.temperature={args.temperature}",
        f"sampling.seed={args.seed}",
    ]
    for key, value in (
        ("dvae_checkpoint", args.dvae),
        ("clip_model", args.clip_model),
        ("clip_weights", args.clip_weights),
        ("sampling.top_k", args.top_k),
        ("sampling.top_p", args.top_p),
        ("store.url", args.store),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(GenerateConfig, None, overrides, values={"captions": list(args.captions)})


def refuse_missing_inputs(check, config) -> None:
    """``check(config)``; a missing input is a one-line user error, before any flow starts."""
    from training.shards import DataError

    try:
        check(config)
    except (DataError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from training.generate import check_inputs

    config = generate_config_from_args(args)
    refuse_missing_inputs(check_inputs, config)
    from pipelines.console import print_generation_report
    from pipelines.dalle_flows import generate_dalle

    print_generation_report(generate_dalle(config))
    return 0


def cmd_encode_codes(args: argparse.Namespace) -> int:
    from training.encode_codes import EncodeConfig

    overrides = [f"source={args.data}", f"dvae_checkpoint={args.dvae}", f"out={args.out}"]
    config = load_config(EncodeConfig, None, [*overrides, *args.overrides])
    from training.encode_codes import check_inputs

    refuse_missing_inputs(check_inputs, config)
    from pipelines.dalle_flows import encode_codes

    coded = encode_codes(config)
    samples, skipped = sum(c.samples for c in coded), sum(c.skipped for c in coded)
    print(f"coded {samples} samples of {len(coded)} shards ({skipped} without an image)")
    print(f"sidecars in {config.out}: train with data.codes={config.out}")
    return 0


def cmd_scorer(args: argparse.Namespace) -> int:
    from training.scorer import ensure_scorer

    scorer = ensure_scorer(Path(args.out), log=print)
    print(f"scorer: {scorer.weights} (calibrated threshold {scorer.threshold:.4f})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoConfigs, run_demo

    configs = DemoConfigs(clip=args.clip_config, dvae=args.dvae_config, dalle=args.dalle_config)
    for item in args.set or []:
        model, sep, override = item.partition(":")
        if not sep or model not in spec_names():
            models = ", ".join(spec_names())
            raise ConfigError(f"--set {item!r} must look like clip:steps=100 ({models})")
        configs.overrides.setdefault(model, []).append(override)
    until = "crawl" if args.no_train else args.until
    return run_demo(args.config, args.overrides, args.n, args.seed, until, configs)


def cmd_sampleweb_serve(args: argparse.Namespace) -> int:
    from dataprep.sampleweb.server import serve_forever

    out = Path(args.out) if args.out else state_dir() / "sampleweb"
    faults = {} if args.clean else None  # None: the default fault mix
    serve_forever(
        args.n, args.seed, out, args.host, args.port, ready_file=args.ready_file, fault_rates=faults
    )
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    config = load_config(BuildConfig, args.config, args.overrides)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _serve_config(args: argparse.Namespace):
    from pipelines.ops_config import ServeConfig

    path = args.config
    if path is None and Path(SERVE_CONFIG).exists():
        path = SERVE_CONFIG
    return load_config(ServeConfig, path, getattr(args, "overrides", []))


def cmd_server(args: argparse.Namespace) -> int:
    from pipelines import server

    if args.server_command == "start":
        section = _serve_config(args).server
        info = server.start_server(
            args.host or section.host,
            args.port or section.port,
            section.startup_timeout_s,
            args.database_url or section.database_url,
        )
        print(f"Prefect server running (pid {info.pid}): UI at {info.ui_url}")
        print(f"mmpipe commands now use it; `mmpipe server stop` stops it (log: {info.log})")
    elif args.server_command == "stop":
        stopped = server.stop_server()
        print(f"stopped the Prefect server (pid {stopped.pid})" if stopped else "not running")
    else:
        print("\n".join(server.status_lines()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines import deployments

    config = _serve_config(args)
    if args.apply_only:
        ids = deployments.apply_deployments(config)
        print(f"created or updated {len(ids)} deployments")
        return 0
    deployments.serve(config)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from pipelines import deployments

    config = _serve_config(args)
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url:  # workers cannot reach this process's ephemeral API
        raise ConfigError("mmpipe deploy needs a Prefect server: `mmpipe server start` first")
    project_dir = Path(args.working_dir) if args.working_dir else None
    for deployment in deployments.deploy(config, args.pool, project_dir):
        print(f"deployed {deployment.flow_name}/{deployment.name} to work pool {args.pool}")
    print(f"run them with: PREFECT_API_URL={api_url} prefect worker start --pool {args.pool}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from pipelines.launch import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    train_args = parse_args(build_parser(), command)
    if getattr(train_args, "func", None) not in (cmd_train, cmd_build):
        raise ConfigError(
            "mmpipe launch runs a training command or a build. Fix: mmpipe launch --address "
            "http://HEAD:8265 -- train clip --config configs/clip-tiny.yaml"
        )
    env = {}
    for item in args.env or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--env {item!r} must look like NAME=VALUE")
        env[key] = value
    if train_args.func is cmd_build:  # the build driver on the head; its inputs as it sees them
        return launch_build(args.address, command, build_config_from_args(train_args), env, args)
    cfg = train_config_from_args(train_args, inputs=False)  # the cluster's paths, not ours
    result = launch(args.address, command, cfg, env, python=args.python)
    print(f"Ray job {result.job_id}: {result.status}")
    print(f"run folder: {result.run_uri}")
    print(f"latest checkpoint: {result.checkpoint_uri or '(none visible from here)'}")
    return 0 if result.status == "SUCCEEDED" else 1


def launch_build(address: str, command: list[str], cfg, env: dict, args) -> int:
    """`mmpipe build ...` as a Ray Job: the driver runs on the head, its stages on the cluster."""
    from pipelines import launch as jobs

    client = jobs.connect(address)
    job_id = jobs.submit(client, cfg, command, env, Path.cwd(), args.python, "pipelines.cli")
    print(f"submitted Ray job {job_id} to {address}")
    jobs.stream_logs(client, job_id)
    status = jobs.wait_terminal(client, job_id)
    print(f"Ray job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


DESCRIPTION = """From image URLs to trained CLIP and DALL-E models.

user jobs:
  schedule dataset builds    mmpipe build (now), mmpipe serve (on schedules and events)
  launch training runs       mmpipe train {models} (here), mmpipe launch (Ray cluster)
  size a cluster             mmpipe plan --config configs/dalle-12b.yaml --gpus N --gpu-mem GB
  draw images                mmpipe generate --checkpoint dalle.pt "a small red circle ..."
  monitor in the Prefect UI  mmpipe server start, then open the URL it prints
"""


def _dataset_store(args: argparse.Namespace):
    from dataprep.store import StoreConfig

    return StoreConfig(url=args.store).open()


def cmd_datasets_list(args: argparse.Namespace) -> int:
    from dataprep.publish import list_datasets, read_manifest

    store = _dataset_store(args)
    published = list_datasets(store)
    if not published:
        print(f"no published datasets in {store.uri('datasets')}")
    for name, version in published:
        manifest = read_manifest(store, name, version, shards=False)  # not the shard index
        print(
            f"{name}@{version}  {manifest.samples} samples  {manifest.shard_count} shards  "
            f"{manifest.bytes / 1e6:.1f} MB  {manifest.created_at}"
        )
    return 0


def cmd_datasets_show(args: argparse.Namespace) -> int:
    from dataprep.publish import manifest_uri, read_manifest

    name, _, version = args.dataset.partition("@")
    store = _dataset_store(args)
    manifest = read_manifest(store, name, version or None, shards=False)  # not the index
    uri = manifest_uri(store, manifest.name, manifest.version)
    if args.json:
        print(uri)
        print(manifest.to_json().decode())  # as published: shards inline only in older versions
        return 0
    from pipelines.dataset_summary import format_manifest

    print(format_manifest(manifest, uri))
    return 0


def cmd_datasets_verify(args: argparse.Namespace) -> int:
    from dataprep.publish import read_manifest, verify_version

    name, _, version = args.dataset.partition("@")
    store = _dataset_store(args)
    manifest = read_manifest(store, name, version or None)
    verify_version(store, manifest)  # AlteredDataset (exit 2) names each shard that differs
    print(
        f"{manifest.name}@{manifest.version}: all {len(manifest.shards)} shards "
        f"({manifest.bytes / 1e6:.1f} MB) match the manifest's sha256"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmpipe",
        description=DESCRIPTION.format(models="|".join(spec_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted key=value pairs, e.g. crawl.threads=32 store.url=s3://b/p",
    )
    parser.add_argument(
        "--debug", action="store_true", help="print tracebacks with errors (or MMPIPE_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", required=required, help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    build = sub.add_parser("build", help="build a dataset (Prefect flow build-dataset)")
    with_config(build)
    build.add_argument(
        "--ray-address", help="Ray cluster the per-shard stages run on (default: a local Ray)"
    )
    build.set_defaults(func=cmd_build, uses_prefect=True)

    train = sub.add_parser("train", help="train a model on Ray + DeepSpeed (flow train-MODEL)")
    train.add_argument("model", choices=spec_names(), help="what to train")
    with_config(train)
    train.add_argument("--data", help="training shards: URIs, brace pattern, folder/ or manifest")
    train.add_argument("--ray-address", help="Ray cluster address (default: a local Ray)")
    train.set_defaults(func=cmd_train, uses_prefect=True)

    _add_model_commands(sub)

    demo = sub.add_parser(
        "demo", help="the whole pipeline on the sample web: build, CLIP, dVAE, DALL-E, samples"
    )
    demo.add_argument("--config", default="configs/demo.yaml", help="YAML config file")
    demo.add_argument("--n", type=int, default=2000, help="sample web size")
    demo.add_argument("--seed", type=int, default=0, help="sample web seed")
    demo.add_argument(
        "--until",
        choices=["crawl", "build", "clip", "all"],
        default="all",
        help="stop after the crawl, the published build, CLIP, or (all) the DALL-E samples",
    )
    demo.add_argument("--no-train", action="store_true", help="crawl only (--until crawl)")
    demo.add_argument("--clip-config", default="configs/clip-tiny.yaml")
    demo.add_argument("--dvae-config", default="configs/dvae-tiny.yaml")
    demo.add_argument("--dalle-config", default="configs/dalle-tiny.yaml")
    demo.add_argument(
        "--set", action="append", metavar="MODEL:KEY=VALUE", help="e.g. --set dalle:steps=100"
    )
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="build config overrides")
    demo.set_defaults(func=cmd_demo, uses_prefect=True)

    web = sub.add_parser("sampleweb", help="the synthetic sample web (test corpus)")
    web_sub = web.add_subparsers(dest="sampleweb_command", required=True, metavar="COMMAND")
    serve = web_sub.add_parser("serve", help="write the URL list and serve until stopped")
    serve.add_argument("--n", type=int, default=2000, help="number of samples")
    serve.add_argument("--seed", type=int, default=0, help="corpus seed")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (loopback)")
    serve.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    serve.add_argument("--out", help="folder for urls.parquet (default: STATE/sampleweb)")
    serve.add_argument("--ready-file", help="write a JSON file here once serving")
    serve.add_argument("--clean", action="store_true", help="no injected faults (benchmarks)")
    serve.set_defaults(func=cmd_sampleweb_serve)

    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    show = config_sub.add_parser("show", help="print a config with defaults and overrides")
    with_config(show)
    show.set_defaults(func=cmd_config_show)

    datasets = sub.add_parser("datasets", help="published dataset versions")
    datasets_sub = datasets.add_subparsers(
        dest="datasets_command", required=True, metavar="COMMAND"
    )
    for command, func, text in (
        ("list", cmd_datasets_list, "every published NAME@VERSION"),
        ("show", cmd_datasets_show, "summary of NAME[@VERSION] (latest); --json: as is"),
        ("verify", cmd_datasets_verify, "check every shard of NAME[@VERSION] against its sha256"),
    ):
        p = datasets_sub.add_parser(command, help=text)
        if command != "list":
            p.add_argument("dataset", metavar="NAME[@VERSION]")
        p.add_argument("--store", help="store URL (default: store.url unset, STATE/store)")
        if command == "show":
            p.add_argument("--json", action="store_true", help="the manifest itself, as JSON")
        p.set_defaults(func=func)
    _add_ops_commands(sub)
    return parser


def _add_model_commands(sub) -> None:
    plan = sub.add_parser("plan", help="per-GPU memory of a training config: which ZeRO fits")
    arg = plan.add_argument
    arg("--config", required=True, help="training YAML config")
    arg("--gpus", type=int, required=True, help="GPUs in the run")
    arg("--gpu-mem", type=float, required=True, help="memory per GPU, GB")
    arg("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    arg("--cpu-mem", type=float, help="host memory per node, GB (offload checks)")
    arg("--headroom", type=float, default=0.9, help="usable share of GPU memory")
    arg("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    plan.set_defaults(func=cmd_plan)

    gen = sub.add_parser("generate", help="images from captions with DALL-E, re-ranked by CLIP")
    gen.add_argument("captions", nargs="*", metavar="CAPTION", help="captions to draw")
    gen.add_argument("--checkpoint", required=True, help="exported dalle.pt (path or URI)")
    gen.add_argument("--dvae", help="dVAE export (default: the one the checkpoint names)")
    gen.add_argument("--clip-model", help="re-ranking CLIP architecture, e.g. clip-tiny")
    gen.add_argument("--clip-weights", help="its open_clip weights (path or URI)")
    gen.add_argument("--candidates", type=int, default=8, help="samples per caption")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, help="sample from the k likeliest codes")
    gen.add_argument("--top-p", type=float, help="sample from the nucleus of this mass")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--heldout", type=int, default=0, help="add N held-out sample-web captions")
    gen.add_argument(
        "--heldout-seed", type=int, default=1000, help="corpus seed of the held-out captions"
    )
    gen.add_argument("--name", default="samples", help="results go to STORE/samples/NAME/")
    gen.add_argument("--store", help="store URL (default: STATE/store)")
    gen.set_defaults(func=cmd_generate, uses_prefect=True)

    enc = sub.add_parser("encode-codes", help="dVAE codes of a dataset's shards, for DALL-E")
    enc.add_argument("--dvae", required=True, help="exported dvae.pt (path or URI)")
    enc.add_argument("--data", required=True, help="shards: URIs, pattern, folder/ or manifest")
    enc.add_argument("--out", required=True, help="folder URI for the .codes.npy sidecars")
    enc.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. batch_size=512")
    enc.set_defaults(func=cmd_encode_codes, uses_prefect=True)

    scorer = sub.add_parser("scorer", help="train (once) the sample web's CLIP scorer")
    scorer.add_argument(
        "--out", default=str(state_dir() / "cache" / "scorer" / "clip-scorer-tiny.pt")
    )
    scorer.set_defaults(func=cmd_scorer)


def _add_ops_commands(sub) -> None:
    srv = sub.add_parser("server", help="a persistent Prefect server and its UI on loopback")
    srv_sub = srv.add_subparsers(dest="server_command", required=True, metavar="COMMAND")
    start = srv_sub.add_parser("start", help="start it (detached) and wait until healthy")
    start.add_argument("--config", help=f"serve config (default: {SERVE_CONFIG})")
    start.add_argument("--host", help="address to bind (default from config: 127.0.0.1)")
    start.add_argument("--port", type=int, help="port (default from config: 4200)")
    start.add_argument(
        "--database-url", help="postgresql+asyncpg://USER@HOST:PORT/DB (default: SQLite in STATE)"
    )
    srv_sub.add_parser("stop", help="stop it")
    srv_sub.add_parser("status", help="print its URL and health")
    srv.set_defaults(func=cmd_server)

    serve = sub.add_parser("serve", help="serve scheduled and event-triggered deployments")
    serve.add_argument("--config", help=f"serve config (default: {SERVE_CONFIG})")
    serve.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    serve.add_argument(
        "--apply-only", action="store_true", help="create or update the deployments, then exit"
    )
    serve.set_defaults(func=cmd_serve, uses_prefect=True)

    deploy = sub.add_parser("deploy", help="deploy to a work pool, for `prefect worker start`")
    deploy.add_argument("--config", help=f"serve config (default: {SERVE_CONFIG})")
    deploy.add_argument("--pool", default="mmpipe", help="process work pool (created if missing)")
    deploy.add_argument("--working-dir", help="the project root on the workers (default: here)")
    deploy.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    deploy.set_defaults(func=cmd_deploy, uses_prefect=True)

    launch = sub.add_parser(
        "launch",
        help="submit a training run to a Ray cluster as a Ray Job",
        usage="mmpipe launch --address http://HEAD:8265 [--env K=V] -- train clip --config ...",
    )
    launch.add_argument("--address", required=True, help="Ray dashboard URL of the head")
    launch.add_argument("--env", action="append", metavar="NAME=VALUE", help="job env var")
    launch.add_argument("--python", default="python", help="interpreter on the head node")
    launch.add_argument("command", nargs=argparse.REMAINDER, help="the mmpipe train command")
    launch.set_defaults(func=cmd_launch)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    # Overrides may follow other positionals (`train clip --config X a.b=1`), where argparse
    # has already closed its `overrides` list: collect them from the leftovers.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    prepare_environment()
    args = parse_args(build_parser(), argv)

    def run() -> int:
        if getattr(args, "uses_prefect", False):
            check_prefect_api()  # commands that run flows fail fast when the API is not there
        return args.func(args)

    if args.debug:
        os.environ["MMPIPE_DEBUG"] = "1"  # Ray Jobs and workers started from here inherit it
    return run_reporting_errors(run, debug=debugging())


if __name__ == "__main__":
    sys.exit(main())
