"""``alienec2``: the command line of the core (and, later, the console and the demo)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from alienec2_tui.client import (
    DEFAULT_SOCKET,
    AdminClient,
    AdminError,
    CoreUnreachable,
    default_socket,
)
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


def _run_core(config: Config) -> int:
    from core.daemon import run_core

    try:
        asyncio.run(run_core(config))
    except ConfigError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_core(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    _configure_logging(args.log_level)
    if not args.sandbox:
        return _run_core(config)
    from core.clouds.sandbox import SANDBOX_CREDENTIALS, MotoEC2Server, sandbox_config

    os.environ.update(SANDBOX_CREDENTIALS)
    with MotoEC2Server() as cloud:
        print(f"sandbox EC2 endpoint: {cloud.url}", file=sys.stderr)
        return _run_core(sandbox_config(config, cloud.url))


def cmd_demo(args: argparse.Namespace) -> int:
    from core.demo import DemoOptions, run_demo

    if args.jobs is not None and args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return EXIT_CONFIG
    if not 0 <= args.never_boot < 1:
        print("error: --never-boot must be a fraction in [0, 1)", file=sys.stderr)
        return EXIT_CONFIG
    if not 0 <= args.min <= args.max:
        print(f"error: need 0 <= --min <= --max (got {args.min} and {args.max})", file=sys.stderr)
        return EXIT_CONFIG
    opts = DemoOptions(
        jobs=args.jobs if args.jobs is not None else (40 if args.headless else None),
        min_vms=args.min,
        max_vms=args.max,
        idle_timeout_s=args.idle_timeout,
        boot_delay_s=args.boot_delay,
        never_boot_fraction=args.never_boot,
        die_mid_job=args.die_mid_job,
        capacity_error=args.capacity_error,
        timeout_s=args.timeout,
    )
    workdir = Path(args.workdir) if args.workdir else None
    if args.headless:
        _configure_logging("warning")
        summary = asyncio.run(run_demo(opts, workdir))
        print(json.dumps(summary.as_dict(), indent=2) if args.json else summary.text())
        return 0 if summary.all_finished else 1
    from alienec2_tui.app import demo_console

    log_dir = workdir or Path(tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        filename=str(log_dir / "alienec2-demo.log"),
    )
    summary = asyncio.run(run_demo(opts, workdir, console=demo_console))
    print(f"demo stopped; log in {log_dir / 'alienec2-demo.log'}")
    return 0


# ---- admin commands: talk to a running core through the admin API ------------------------


def _client(args: argparse.Namespace) -> AdminClient:
    if args.url:
        return AdminClient(url=args.url, token=os.environ.get(args.token_env))
    socket_path = args.socket
    if socket_path is None and args.config:
        config = _load(args.config)
        if config is None:
            raise SystemExit(EXIT_CONFIG)
        socket_path = config.admin.socket
    return AdminClient(socket_path=socket_path or default_socket())


def _admin(args: argparse.Namespace, work: Callable[[AdminClient], Awaitable[int]]) -> int:
    async def run() -> int:
        async with _client(args) as client:
            return await work(client)

    try:
        return asyncio.run(run())
    except CoreUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except AdminError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def _print_status(status: dict[str, Any]) -> None:
    pool, jobs = status["pool"], status["queue"]["jobs"]
    vms = pool["vms"]
    shown = ("requested", "booting", "idle", "busy", "draining", "failed", "lost", "terminating")
    print(
        f"pool {pool['name']}: min {pool['min_vms']} max {pool['max_vms']}"
        f"{' (scaling PAUSED)' if pool['paused'] else ''}"
    )
    print("vms:  " + "  ".join(f"{state} {vms.get(state, 0)}" for state in shown))
    print(
        "jobs: "
        + "  ".join(f"{s} {jobs.get(s, 0)}" for s in ("queued", "assigned", "running", "done"))
        + f"  failed {jobs.get('failed', 0)}"
    )
    for cloud in status["clouds"]:
        backoff = f"  backoff {cloud['backoff_s']:.0f}s" if cloud["backoff_s"] > 0 else ""
        error = f"  last error: {cloud['last_error']}" if cloud["last_error"] and backoff else ""
        print(
            f"cloud {cloud['name']}: {cloud['alive']}/{cloud['max_instances']} instances"
            f"  priority {cloud['priority']}{backoff}{error}"
        )


def cmd_status(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        status = await client.status()
        if args.json:
            print(json.dumps(status, indent=2, sort_keys=True))
        else:
            _print_status(status)
        return 0

    return _admin(args, work)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --env takes KEY=VALUE (got {pair!r})")
        env[key] = value
    return env


def _jobs_file(path: str, env: dict[str, str], wall_time_s: float | None) -> list[dict[str, Any]]:
    """One job per line, a command line split like a shell would; blank lines and # skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SystemExit(f"error: {path}: {exc.strerror}") from None
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise SystemExit(f"error: {path}:{number}: {exc}") from None
        job: dict[str, Any] = {"command": argv, "env": env}
        if wall_time_s is not None:
            job["wall_time_s"] = wall_time_s
        jobs.append(job)
    if not jobs:
        raise SystemExit(f"error: {path}: no jobs in the file")
    return jobs


def cmd_submit(args: argparse.Namespace) -> int:
    env = _parse_env(args.env)
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if bool(command) == bool(args.file):
        print("error: give either a command after -- or --file FILE", file=sys.stderr)
        return EXIT_CONFIG
    jobs = (
        _jobs_file(args.file, env, args.wall_time)
        if args.file
        else [{"command": command, "env": env, "wall_time_s": args.wall_time}]
    )

    async def work(client: AdminClient) -> int:
        if len(jobs) == 1 and not args.file:
            job = await client.submit(command, env, args.wall_time)
            print(f"submitted job {job['id']}")
        else:
            reply = await client.submit_batch(jobs)
            ids = reply["ids"]
            print(f"submitted {len(ids)} jobs ({ids[0]}..{ids[-1]})")
        return 0

    return _admin(args, work)


def cmd_cancel(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        job = await client.cancel(args.job)
        print(f"job {job['id']} {job['state']}")
        return 0

    return _admin(args, work)


def cmd_drain(args: argparse.Namespace) -> int:
    if bool(args.vm) == bool(args.all):
        print("error: give a VM id or --all", file=sys.stderr)
        return EXIT_CONFIG

    async def work(client: AdminClient) -> int:
        if args.all:
            drained = (await client.drain_all())["drained"]
            print(f"draining {len(drained)} VMs")
        else:
            vm = await client.drain(args.vm)
            print(f"vm {vm['id']} {vm['state']}")
        return 0

    return _admin(args, work)


def cmd_kill(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        vm = await client.kill(args.vm)
        job = f"; job {vm['job_id']} goes back to the queue" if vm["job_id"] else ""
        print(f"vm {vm['id']} will be terminated{job}")
        return 0

    return _admin(args, work)


def cmd_resize(args: argparse.Namespace) -> int:
    if args.min is None and args.max is None:
        print("error: give --min, --max or both", file=sys.stderr)
        return EXIT_CONFIG

    async def work(client: AdminClient) -> int:
        bounds = await client.resize(args.min, args.max)
        print(f"pool min {bounds['min_vms']} max {bounds['max_vms']}")
        return 0

    return _admin(args, work)


def cmd_tui(args: argparse.Namespace) -> int:
    from alienec2_tui.app import ConsoleApp

    async def run() -> None:
        async with _client(args) as client:
            await ConsoleApp(client, refresh_s=args.refresh, readonly=args.readonly).run_async()

    asyncio.run(run())
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        await client.pause(args.command == "pause")
        print("scaling paused" if args.command == "pause" else "scaling resumed")
        return 0

    return _admin(args, work)


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

    demo = sub.add_parser(
        "demo",
        help="the whole system on this machine: sandbox cloud, core, agents and the console",
    )
    demo.add_argument("--headless", action="store_true", help="no console: run jobs, summarise")
    demo.add_argument("--jobs", type=int, help="jobs to run (headless default 40; else endless)")
    demo.add_argument("--json", action="store_true", help="headless summary as JSON")
    demo.add_argument("--min", type=int, default=1, help="pool min_vms (default 1)")
    demo.add_argument("--max", type=int, default=8, help="pool max_vms (default 8)")
    demo.add_argument("--idle-timeout", type=float, default=15.0, help="seconds (default 15)")
    demo.add_argument("--boot-delay", type=float, default=3.0, help="VM boot seconds (default 3)")
    demo.add_argument(
        "--never-boot", type=float, default=0.0, help="fraction of VMs that never boot"
    )
    demo.add_argument("--die-mid-job", type=int, default=0, help="VMs that die while running a job")
    demo.add_argument(
        "--capacity-error",
        action="store_true",
        help="the preferred cloud answers InsufficientInstanceCapacity",
    )
    demo.add_argument("--timeout", type=float, default=300.0, help="headless time limit (s)")
    demo.add_argument("--workdir", help="keep state, sockets and instances here (not removed)")
    demo.set_defaults(run=cmd_demo)

    connection = argparse.ArgumentParser(add_help=False)
    where = connection.add_argument_group("connection to the core")
    where.add_argument(
        "--socket", help=f"admin socket (default $ALIENEC2_SOCKET or {DEFAULT_SOCKET})"
    )
    where.add_argument("--config", help="read the admin socket path from this configuration")
    where.add_argument("--url", help="admin API over TCP, e.g. http://core.example.org:8471")
    where.add_argument(
        "--token-env",
        default="ALIENEC2_ADMIN_TOKEN",
        help="environment variable holding the TCP bearer token (default ALIENEC2_ADMIN_TOKEN)",
    )

    status = sub.add_parser("status", parents=[connection], help="the pool at a glance")
    status.add_argument("--json", action="store_true", help="the full status as JSON")
    status.set_defaults(run=cmd_status)

    submit = sub.add_parser(
        "submit",
        parents=[connection],
        help="queue a job: alienec2 submit -- CMD ARGS..., or --file FILE (one per line)",
    )
    submit.add_argument("--file", help="a file with one command line per job")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--wall-time", type=float, metavar="SECONDS", help="kill after this long")
    submit.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    submit.set_defaults(run=cmd_submit)

    cancel = sub.add_parser("cancel", parents=[connection], help="cancel a job")
    cancel.add_argument("job", type=int)
    cancel.set_defaults(run=cmd_cancel)

    drain = sub.add_parser("drain", parents=[connection], help="drain a VM, or --all")
    drain.add_argument("vm", nargs="?")
    drain.add_argument("--all", action="store_true")
    drain.set_defaults(run=cmd_drain)

    kill = sub.add_parser("kill", parents=[connection], help="terminate a VM now (job requeued)")
    kill.add_argument("vm")
    kill.set_defaults(run=cmd_kill)

    resize = sub.add_parser("resize", parents=[connection], help="change the pool bounds")
    resize.add_argument("--min", type=int)
    resize.add_argument("--max", type=int)
    resize.set_defaults(run=cmd_resize)

    tui = sub.add_parser("tui", parents=[connection], help="the console: watch and steer the pool")
    tui.add_argument("--refresh", type=float, default=1.0, help="seconds between refreshes")
    tui.add_argument("--readonly", action="store_true", help="watch only: no key changes the pool")
    tui.set_defaults(run=cmd_tui)

    for name, text in (("pause", "pause scaling"), ("resume", "resume scaling")):
        pause = sub.add_parser(name, parents=[connection], help=text)
        pause.set_defaults(run=cmd_pause)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
