"""The `mmpipe` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dataprep.state import state_dir
from pipelines.config import BuildConfig, ConfigError, load_config

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError,)


def _prepare_environment() -> None:
    """Settings Prefect reads at import: keep its files in the state dir, no telemetry."""
    os.environ.setdefault("PREFECT_HOME", str(state_dir() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def cmd_build(args: argparse.Namespace) -> int:
    config = load_config(BuildConfig, args.config, args.overrides)
    from dataprep.url_list import check_url_list
    from pipelines.flows import run_build

    check_url_list(config.urls, config.crawl.url_col, config.crawl.caption_col)

    summary = run_build(config)
    from pipelines.console import print_crawl_summary

    print_crawl_summary(config, summary)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.engine import validate

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.ray_address:
        overrides.append(f"scale.ray_address={args.ray_address}")
    config = load_config(TrainConfig, args.config, [f"spec={args.model}", *overrides])
    try:
        validate(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    from pipelines.console import print_training_result
    from pipelines.training_flows import train_clip

    print_training_result(config, train_clip(config))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    train_config = None if args.no_train else args.train_config
    return run_demo(
        args.config,
        args.overrides,
        n=args.n,
        seed=args.seed,
        train_config=train_config,
        train_overrides=args.train_set or [],
    )


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmpipe",
        description="From image URLs to trained CLIP and DALL-E models.",
        epilog="Overrides are dotted key=value pairs, e.g. crawl.threads=32 store.url=s3://b/p",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", required=required, help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")

    build = sub.add_parser("build", help="build a dataset (Prefect flow build-dataset)")
    with_config(build)
    build.set_defaults(func=cmd_build)

    train = sub.add_parser("train", help="train a model on Ray + DeepSpeed (flow train-MODEL)")
    train.add_argument("model", choices=["clip"], help="what to train")
    with_config(train)
    train.add_argument("--data", help="training shards: URIs, brace pattern, folder/ or manifest")
    train.add_argument("--ray-address", help="Ray cluster address (default: a local Ray)")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="serve the sample web and build a dataset from it")
    demo.add_argument("--config", default="configs/demo.yaml", help="YAML config file")
    demo.add_argument("--n", type=int, default=2000, help="sample web size")
    demo.add_argument("--seed", type=int, default=0, help="sample web seed")
    demo.add_argument("--train-config", default="configs/clip-tiny.yaml", help="CLIP config")
    demo.add_argument(
        "--train-set", action="append", metavar="KEY=VALUE", help="override in the CLIP config"
    )
    demo.add_argument("--no-train", action="store_true", help="crawl only")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="build config overrides")
    demo.set_defaults(func=cmd_demo)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    _prepare_environment()
    parser = build_parser()
    # Overrides may follow other positionals (`train clip --config X a.b=1`), where argparse
    # has already closed its `overrides` list: collect them from the leftovers.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from dataprep.crawl import CrawlError
    from dataprep.store import StoreError
    from dataprep.url_list import UrlListError

    try:
        return args.func(args)
    except (*USER_ERRORS, CrawlError, StoreError, UrlListError) as err:
        print(f"mmpipe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
