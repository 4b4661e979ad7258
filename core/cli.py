"""``alienec2``: the command line of the core (and, later, the console and the demo)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from core.config import Config, ConfigError, load_config, summary

EXIT_CONFIG = 2


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # boto's own debug output can carry signed headers; keep it out of our logs.
    for noisy in ("botocore", "boto3", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return EXIT_CONFIG
    print(summary(config))
    return 0


def cmd_core(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    _configure_logging(args.log_level)
    from core.daemon import run_core

    if not args.sandbox:
        asyncio.run(run_core(config))
        return 0
    from core.clouds.sandbox import SANDBOX_CREDENTIALS, MotoEC2Server, sandbox_config

    os.environ.update(SANDBOX_CREDENTIALS)
    with MotoEC2Server() as cloud:
        print(f"sandbox EC2 endpoint: {cloud.url}", file=sys.stderr)
        asyncio.run(run_core(sandbox_config(config, cloud.url)))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="alienec2", description="Elastic EC2 worker pools for grid job queues."
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file", help="YAML configuration file")
    check.set_defaults(run=cmd_check_config)

    core = sub.add_parser("core", help="run the headless core (the daemon systemd starts)")
    core.add_argument("--config", required=True, help="YAML configuration file")
    core.add_argument(
        "--sandbox",
        action="store_true",
        help="start an embedded EC2 sandbox (moto) and point every cloud at it",
    )
    core.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    core.set_defaults(run=cmd_core)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
