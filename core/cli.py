"""``alienec2``: the command line of the core (and, later, the console and the demo)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from alienec2_tui.client import (
    DEFAULT_SOCKET,
    AdminClient,
    AdminError,
    CoreUnreachable,
    default_socket,
)
from core.config import Config, ConfigError, load_config, summary
from core.model import JobState, VMState

if TYPE_CHECKING:
    from core.demo import DemoOptions

EXIT_CONFIG = 2
EXIT_USAGE = 2  # a bad command line, as argparse


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


def _run_core(main: Coroutine[Any, Any, None]) -> int:
    from core.store import StateError

    try:
        # asyncio's own loop, not uvloop: its listener pauses and resumes on EMFILE and ENOBUFS
        # (limits.throttle_accept_errors), where uvloop's closes for good without a log line;
        # uvloop's CPU gain was within noise (benchmarks/README.md).
        asyncio.run(main)
    except StateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _sandbox_core(
    config: Config, ec2_url: str, reload: Callable[[], Config] | None = None
) -> None:
    """The core, with the sandbox's instances booting as local agents as in the demo."""
    from core.clouds.sandbox import local_instances
    from core.daemon import run_core

    workdir = Path(tempfile.mkdtemp(prefix="alienec2-sandbox-"))
    print(f"sandbox instances run as local agents in {workdir}", file=sys.stderr)
    async with local_instances(
        ec2_url, workdir, boot_delay_s=1.0, jitter_s=0.5, agent_overrides={"max_backoff_s": 2}
    ):
        await run_core(config, reload)


def cmd_core(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    _configure_logging(args.log_level)
    path = args.config
    if not args.sandbox:
        from core.daemon import run_core

        return _run_core(run_core(config, lambda: load_config(path)))
    from core.clouds.sandbox import (
        SANDBOX_CREDENTIALS,
        MotoEC2Server,
        sandbox_config,
        sandbox_refusal,
    )

    refusal = sandbox_refusal(config)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_CONFIG
    os.environ.update(SANDBOX_CREDENTIALS)
    with MotoEC2Server() as cloud:
        print(f"sandbox EC2 endpoint: {cloud.url}", file=sys.stderr)
        url = cloud.url
        return _run_core(
            _sandbox_core(
                sandbox_config(config, url), url, lambda: sandbox_config(load_config(path), url)
            )
        )


def _demo_running_in(workdir: Path) -> str | None:
    """The pid of the demo whose core holds this directory's state lock, if one does."""
    from core.lock import StateLock
    from core.store import StateError

    lock = StateLock(workdir / "state.db")
    try:
        lock.acquire()
    except StateError:
        return lock.holder()
    lock.release()
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    from core.demo import DemoOptions
    from core.store import StateError

    if args.jobs is not None and args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return EXIT_CONFIG
    if not 0 <= args.never_boot < 1:
        print("error: --never-boot must be a fraction in [0, 1)", file=sys.stderr)
        return EXIT_CONFIG
    if not 0 <= args.spot_interrupt <= 1:
        print("error: --spot-interrupt must be a fraction in [0, 1]", file=sys.stderr)
        return EXIT_CONFIG
    if args.slots < 1:
        print("error: --slots must be >= 1", file=sys.stderr)
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
        spot_interrupt=args.spot_interrupt,
        timeout_s=args.timeout,
        alien=args.alien,
        slots_per_vm=args.slots,
    )
    workdir = Path(args.workdir).absolute() if args.workdir else None
    if workdir is not None:
        _check_demo_workdir(workdir)
    try:
        return _run_demo(args, opts, workdir)
    except ConfigError as exc:  # what the options make of the demo's configuration
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StateError as exc:  # a second demo started in the same directory at the same time
        running = _demo_running_in(workdir) if workdir is not None else None
        _usage_error(_demo_running_there(workdir, running) if running else str(exc))


def _check_demo_workdir(workdir: Path) -> None:
    """Here, as one line, not as a traceback from inside the demo: a directory the demo can
    make, and that holds nothing (it removes what it made there, its instances/ included)."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _usage_error(f"--workdir {workdir}: {exc.strerror}")
    if (workdir / "state.db").exists():
        # Its VMs lived in that run's embedded cloud, gone with it: the summary and the wait
        # for every job would count the earlier run's. Kept, never overwritten.
        running = _demo_running_in(workdir)
        if running:
            _usage_error(_demo_running_there(workdir, running))
        _usage_error(
            f"--workdir {workdir}: holds an earlier demo's state (state.db); give a new or "
            "empty directory"
        )
    if any(workdir.iterdir()):
        _usage_error(f"--workdir {workdir}: not empty; give a new or empty directory")


def _demo_running_there(workdir: Path | None, pid: str) -> str:
    return (
        f"--workdir {workdir}: a demo is running there (pid {pid}); stop it, or give a new "
        "directory"
    )


def _run_demo(args: argparse.Namespace, opts: DemoOptions, workdir: Path | None) -> int:
    from core.demo import run_demo

    if args.headless:
        _configure_logging("warning")
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)  # the demo's log file gets the rest
        summary = asyncio.run(run_demo(opts, workdir))
        print(json.dumps(summary.as_dict(), indent=2) if args.json else summary.text())
        if summary.timed_out:
            print(f"error: timed out after {opts.timeout_s:g} s", file=sys.stderr)
    else:
        from alienec2_tui.app import demo_console

        summary = asyncio.run(run_demo(opts, workdir, console=demo_console))
        _restore_terminal()
        kept = f"; state and log kept in {workdir}" if workdir else ""
        with contextlib.suppress(OSError):
            print(f"demo stopped{kept}")
    if summary.stopped_by:
        with contextlib.suppress(OSError):  # after SIGHUP there may be no terminal to tell
            print(f"demo stopped by {summary.stopped_by}", file=sys.stderr)
        return 128 + int(getattr(signal, summary.stopped_by))
    if args.headless:
        return 0 if summary.all_finished and not summary.timed_out else 1
    return 0


def _restore_terminal() -> None:
    """Alternate screen off, cursor on, mouse reporting off: harmless when the console
    already did it, and what a console stopped by a signal may not have done."""
    if not sys.stdout.isatty():
        return
    with contextlib.suppress(OSError):
        sys.stdout.write("\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?1049l\x1b[?25h")
        sys.stdout.flush()


# ---- admin commands: talk to a running core through the admin API ------------------------


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if args.config:
        config = _load(args.config)
        if config is None:
            raise SystemExit(EXIT_CONFIG)
        return config.admin.socket
    return default_socket()


def _client(args: argparse.Namespace) -> AdminClient:
    """Strings come as the core sent them for --json (the encoder escapes controls), and
    with controls escaped for the tables: job output and commands are untrusted."""
    raw = bool(getattr(args, "json", False))
    if args.url:
        return AdminClient(url=args.url, token=os.environ.get(args.token_env), raw=raw)
    return AdminClient(socket_path=_socket_path(args), raw=raw)


def _listening(path: str) -> bool:
    """Whether anything accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _unreachable(args: argparse.Namespace, exc: CoreUnreachable) -> str:
    """The line to print: for a socket nobody listens on, say so and how to start a core."""
    if args.url:
        return str(exc)
    path = _socket_path(args)
    if _listening(path):
        return str(exc)
    config = args.config or "FILE"
    return f"no core listening at {path}; start one with: alienec2 core --config {config}"


def _admin(args: argparse.Namespace, work: Callable[[AdminClient], Awaitable[int]]) -> int:
    async def run() -> int:
        async with _client(args) as client:
            return await work(client)

    try:
        return asyncio.run(run())
    except CoreUnreachable as exc:
        print(f"error: {_unreachable(args, exc)}", file=sys.stderr)
        return 1
    except AdminError as exc:
        hint = ""
        if exc.code == "no_route" and args.url:  # an alienec2 API, but not the admin one
            hint = f" (is {args.url} the agent API? The admin API listens on admin.port)"
        print(f"error: {exc.message}{hint}", file=sys.stderr)
        return 1


def _print_status(status: dict[str, Any]) -> None:
    pool, jobs = status["pool"], status["queue"]["jobs"]
    vms = pool["vms"]
    shown = (
        "requested",
        "booting",
        "idle",
        "busy",
        "draining",
        "failed",
        "lost",
        "interrupted",
        "terminating",
    )
    print(
        f"pool {pool['name']}: min {pool['min_vms']} max {pool['max_vms']}"
        f"{' (scaling PAUSED)' if pool['paused'] else ''}"
    )
    print("vms:  " + "  ".join(f"{state} {vms.get(state, 0)}" for state in shown))
    slots = pool.get("slots") or {}
    if slots.get("per_vm", 1) > 1:
        print(f"slots: {slots['used']}/{slots['total']} in use ({slots['per_vm']} per VM)")
    print(
        "jobs: "
        + "  ".join(f"{s} {jobs.get(s, 0)}" for s in ("queued", "assigned", "running", "done"))
        + f"  failed {jobs.get('failed', 0)}  cancelled {jobs.get('cancelled', 0)}"
    )
    if status.get("last_decision"):
        print(f"last decision: {status['last_decision']}")
    for cloud in status["clouds"]:
        backoff = f"  backoff {cloud['backoff_s']:.0f}s" if cloud["backoff_s"] > 0 else ""
        error = f"  last error: {cloud['last_error']}" if cloud["last_error"] and backoff else ""
        cost = f"  ${cloud['cost_per_hour']:.2f}/h" if cloud.get("cost_per_hour") else ""
        market = "  spot" if cloud.get("market") == "spot" else ""
        print(
            f"cloud {cloud['name']}: {cloud['alive']}/{cloud['max_instances']} instances"
            f"  priority {cloud['priority']}{market}{cost}{backoff}{error}"
        )
        for placement in cloud.get("placements", []):
            if placement["backoff_s"] > 0:
                print(
                    f"  {placement['instance_type'] or 'template'}"
                    f"/{placement['subnet_id'] or 'default'}:"
                    f" backoff {placement['backoff_s']:.0f}s  {placement['last_error'] or ''}"
                )
    total: dict[str, Any] = status.get("cost_per_hour") or {}
    if total.get("total") or total.get("max") is not None:
        cap = f" of max {total['max']:g}" if total.get("max") is not None else ""
        print(f"cost: ${total.get('total', 0):.2f}/h{cap}")


def cmd_status(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        status = await client.status()
        if args.json:
            print(json.dumps(status, indent=2, sort_keys=True))
        else:
            _print_status(status)
        return 0

    return _admin(args, work)


def cmd_snapshot(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        _print_json(await client.snapshot(jobs=args.jobs))
        return 0

    return _admin(args, work)


def cmd_why(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        reply = await client.decisions(args.last)
        if args.json:
            _print_json(reply)
            return 0
        for decision in reply["decisions"]:
            when = time.strftime("%H:%M:%S", time.localtime(decision["at"]))
            print(f"{when}  {decision['reason']}")
        if not reply["decisions"]:
            print("no decisions yet (the core decides once per cycle)")
        return 0

    return _admin(args, work)


def cmd_flow(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        reply = await client.flow(args.minutes)
        if args.json:
            _print_json(reply)
            return 0
        kinds = ("submitted", "started", "finished", "failed")
        rows = [
            (time.strftime("%H:%M", time.localtime(minute["t"])), *(str(minute[k]) for k in kinds))
            for minute in reply["minutes"]
        ]
        _table(("MINUTE", *(kind.upper() for kind in kinds)), rows)
        return 0

    return _admin(args, work)


def _age(now: float, since: float | None) -> str:
    """A duration as an admin reads it at a glance: 42s, 7m03s, 2h05m."""
    if since is None:
        return "-"
    seconds = max(int(now - since), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _vm_jobs(vm: dict[str, Any]) -> str:
    """A VM's job, or with several slots its slots in use ("2/4"); a core from before slots
    sends neither field."""
    slots = vm.get("slots", 1)
    return f"{vm.get('slots_used', 0)}/{slots}" if slots > 1 else _dash(vm["job_id"])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Aligned columns; the last one is not padded (a command line or a message)."""
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def _answer(args: argparse.Namespace, reply: Any, line: str) -> None:
    """What a command that changes the pool prints: one line, or with --json the core's
    answer (scripts read the new job's id or the bounds from it)."""
    if args.json:
        _print_json(reply)
    else:
        print(line)


def _run_time(job: dict[str, Any], now: float) -> str:
    if job["started_at"] is None:
        return "-"
    return _age(job["finished_at"] or now, job["started_at"])


def cmd_vms(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        reply = await client.vms(args.state)
        if args.json:
            _print_json(reply)
            return 0
        now, vms = reply["now"], reply["vms"]
        if not vms:
            print("no VMs" + (f" in state {args.state}" if args.state else ""))
            return 0
        rows = [
            (
                vm["id"],
                vm["cloud"],
                vm["state"] + (" (kill)" if vm["kill_requested"] else ""),
                _age(now, vm["state_since"]),
                _vm_jobs(vm),
                _age(now, vm["idle_since"]) if vm["state"] == "idle" else "-",
                _age(now, vm["last_heartbeat"]),
                vm["address"] or "-",
            )
            for vm in vms
        ]
        _table(("ID", "CLOUD", "STATE", "FOR", "JOB", "IDLE", "HEARTBEAT", "ADDRESS"), rows)
        return 0

    return _admin(args, work)


def cmd_jobs(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        reply = await client.jobs(args.state, args.limit, args.kind)
        if args.json:
            _print_json(reply)
            return 0
        now = reply["now"]
        jobs = sorted(reply["jobs"], key=lambda job: job["id"])
        if not jobs:
            which = " ".join(
                part
                for part in (
                    f"in state {args.state}" if args.state else "",
                    f"of kind {args.kind}" if args.kind else "",
                )
                if part
            )
            print("no jobs" + (f" {which}" if which else ""))
            return 0
        pilots = any(job.get("kind") == "pilot" for job in jobs)
        rows = [
            (
                str(job["id"]),
                job["state"],
                _dash(job["vm_id"]),
                job.get("kind", "job"),
                f"{job['attempt']}/{job['max_attempts']}",
                _seconds(job["wait_s"]),
                _run_time(job, now),
                _dash(job["exit_code"]),
                *((_dash(job.get("alien_job_id")),) if pilots else ()),
                shlex.join(job["command"]),
            )
            for job in jobs
        ]
        header = ("ID", "STATE", "VM", "KIND", "ATTEMPT", "WAIT", "RUN", "EXIT")
        _table((*header, *(("ALIEN",) if pilots else ()), "COMMAND"), rows)
        return 0

    return _admin(args, work)


def _print_fields(fields: Sequence[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name + ':':<{width + 1}}  {value}")


def _print_events(events: Sequence[dict[str, Any]]) -> None:
    for event in events:
        print(_event_line(event))


def _event_line(event: dict[str, Any]) -> str:
    """Fixed widths, so lines printed batch after batch (``--follow``) stay aligned."""
    return (
        f"{event['seq']:>7}  {_clock(event['ts'])}  {event['kind']:<18}  "
        f"{_dash(event['vm_id']):<20}  {_dash(event['job_id']):>6}  {event['message']}"
    )


EVENT_HEADER = f"{'SEQ':>7}  {'TIME':<19}  {'KIND':<18}  {'VM':<20}  {'JOB':>6}  MESSAGE"


def _job_fields(job: dict[str, Any], now: float) -> list[tuple[str, str]]:
    return [
        ("job", str(job["id"])),
        ("state", job["state"] + (f" ({job['reason']})" if job["reason"] else "")),
        ("command", shlex.join(job["command"])),
        ("environment", ", ".join(sorted(job["env"])) or "-"),
        ("attempt", f"{job['attempt']} of {job['max_attempts']}"),
        ("vm", _dash(job["vm_id"])),
        ("submitted", _clock(job["submitted_at"])),
        ("waited", _seconds(job["wait_s"])),
        ("run time", _run_time(job, now)),
        ("wall time", _seconds(job["wall_time_s"])),
        ("exit code", _dash(job["exit_code"])),
        *(
            [("kind", "pilot run"), ("AliEn job", _dash(job.get("alien_job_id")))]
            if job.get("kind") == "pilot"
            else []
        ),
    ]


def _print_output(job: dict[str, Any]) -> None:
    tail = job["output_tail"]
    if tail:
        print("output (tail):")
        for line in tail.rstrip("\n").splitlines():
            print(f"  {line}")
    else:
        print("output: none yet" if job["finished_at"] is None else "output: none")


def cmd_vm(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        reply = await client.vm(args.vm)
        if args.json:
            _print_json(reply)
            return 0
        now, vm, job = reply["now"], reply["vm"], reply["job"]
        _print_fields(
            [
                ("vm", vm["id"]),
                ("cloud", vm["cloud"]),
                ("state", f"{vm['state']} for {_age(now, vm['state_since'])}"),
                ("launched", _clock(vm["launched_at"])),
                ("registered", _clock(vm["registered_at"]) if vm["registered_at"] else "-"),
                ("heartbeat", f"{_age(now, vm['last_heartbeat'])} ago"),
                ("address", vm["address"] or "-"),
                ("kill requested", "yes" if vm["kill_requested"] else "no"),
                *((("slots in use", _vm_jobs(vm)),) if vm.get("slots", 1) > 1 else ()),
            ]
        )
        held = reply.get("jobs") or []
        for current in held:
            print(f"\ncurrent job (slot {current['slot']}):" if len(held) > 1 else "\ncurrent job:")
            _print_fields(_job_fields(current, now))
            _print_output(current)
        if job is not None and not held:
            current = job["id"] == vm["job_id"]
            print(f"\n{'current' if current else 'last'} job:")
            _print_fields(_job_fields(job, now))
            _print_output(job)
        if reply["events"]:
            print("\nevents:")
            _print_events(reply["events"])
        return 0

    return _admin(args, work)


def cmd_job(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        job = await client.job(args.job)
        if args.json:
            _print_json(job)
            return 0
        _print_fields(_job_fields(job, time.time()))
        _print_output(job)
        return 0

    return _admin(args, work)


async def _start_of_events(client: AdminClient, args: argparse.Namespace) -> int:
    """The sequence number to list after: ``--after``, else enough for the last ``--last``."""
    if args.after is not None:
        return int(args.after)
    last_seq = int((await client.status())["last_seq"])
    return max(last_seq - args.last, 0)


def cmd_events(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        after = await _start_of_events(client, args)
        if not args.follow:
            limit = args.last if args.after is None else 1000
            reply: dict[str, Any] = (
                await client.events(after, limit=limit)
                if limit
                else {"events": [], "last_seq": after}
            )
            if args.json:
                _print_json(reply)
            else:
                print(EVENT_HEADER)
                _print_events(reply["events"])
            return 0
        if not args.json:
            print(EVENT_HEADER, flush=True)
        while True:
            reply = await client.events(after, wait=FOLLOW_WAIT_S)
            for event in reply["events"]:
                print(json.dumps(event, sort_keys=True) if args.json else _event_line(event))
            sys.stdout.flush()
            after = reply["last_seq"]

    return _admin(args, work)


FOLLOW_WAIT_S = 30.0


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _usage_error(f"--env takes KEY=VALUE (got {pair!r})")
        if key in env:
            _usage_error(f"--env {key} given twice")  # which one was meant is not ours to guess
        env[key] = value
    return env


def _usage_error(message: str) -> NoReturn:
    """A bad command line (a file it names included): one line, exit 2, as argparse does."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _jobs_file(path: str, env: dict[str, str], wall_time_s: float | None) -> list[dict[str, Any]]:
    """One job per line, a command line split like a shell would; blank lines and # skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        _usage_error(f"{path}: {exc.strerror}")
    except UnicodeDecodeError:
        _usage_error(f"{path}: not UTF-8 text")
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            _usage_error(f"{path}:{number}: {exc}")
        job: dict[str, Any] = {"command": argv, "env": env}
        if wall_time_s is not None:
            job["wall_time_s"] = wall_time_s
        jobs.append(job)
    if not jobs:
        _usage_error(f"{path}: no jobs in the file")
    return jobs


def cmd_submit(args: argparse.Namespace) -> int:
    env = _parse_env(args.env)
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if bool(command) == bool(args.file):
        print("error: give either a command after -- or --file FILE", file=sys.stderr)
        return EXIT_CONFIG
    for text in [*command, *env, *env.values()]:
        if (raw := _not_utf8(text)) is not None:
            print(f"error: not UTF-8 text, which a job cannot carry: {raw!r}", file=sys.stderr)
            return EXIT_CONFIG
    jobs = (
        _jobs_file(args.file, env, args.wall_time)
        if args.file
        else [{"command": command, "env": env, "wall_time_s": args.wall_time}]
    )

    async def work(client: AdminClient) -> int:
        if len(jobs) == 1 and not args.file:
            job = await client.submit(command, env, args.wall_time)
            _answer(args, job, f"submitted job {job['id']}")
        else:
            reply = await client.submit_batch(jobs)
            ids = reply["ids"]
            _answer(args, reply, f"submitted {len(ids)} jobs ({ids[0]}..{ids[-1]})")
        return 0

    return _admin(args, work)


def cmd_cancel(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        job = await client.cancel(args.job)
        _answer(args, job, f"job {job['id']} {job['state']}")
        return 0

    return _admin(args, work)


def cmd_drain(args: argparse.Namespace) -> int:
    if bool(args.vm) == bool(args.all):
        print("error: give a VM id or --all", file=sys.stderr)
        return EXIT_CONFIG

    async def work(client: AdminClient) -> int:
        if args.all:
            reply = await client.drain_all()
            _answer(args, reply, f"draining {len(reply['drained'])} VMs")
        else:
            vm = await client.drain(args.vm)
            _answer(args, vm, f"vm {vm['id']} {vm['state']}")
        return 0

    return _admin(args, work)


def cmd_kill(args: argparse.Namespace) -> int:
    async def work(client: AdminClient) -> int:
        vm = await client.kill(args.vm)
        held = vm.get("jobs") or ([vm["job_id"]] if vm["job_id"] else [])
        named = ", ".join(str(job_id) for job_id in held)
        if len(held) > 1:
            job = f"; jobs {named} go back to the queue"
        else:
            job = f"; job {named} goes back to the queue" if held else ""
        _answer(args, vm, f"vm {vm['id']} will be terminated{job}")
        return 0

    return _admin(args, work)


def cmd_resize(args: argparse.Namespace) -> int:
    if args.min is None and args.max is None:
        print("error: give --min, --max or both", file=sys.stderr)
        return EXIT_CONFIG

    async def work(client: AdminClient) -> int:
        bounds = await client.resize(args.min, args.max)
        _answer(args, bounds, f"pool min {bounds['min_vms']} max {bounds['max_vms']}")
        for warning in bounds.get("warnings", []):  # on stderr, --json or not: seen past jq
            print(f"warning: {warning}", file=sys.stderr)
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
        reply = await client.pause(args.command == "pause")
        _answer(args, reply, "scaling paused" if args.command == "pause" else "scaling resumed")
        return 0

    return _admin(args, work)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


VM_STATES = [str(state) for state in VMState]
JOB_STATES = [str(state) for state in JobState]


JOB_ID_MAX = 2**63 - 1  # what SQLite stores; the admin API's bound too
POOL_VMS_MAX = 1_000_000  # the admin API's bound on min_vms and max_vms (api.admin.MAX_POOL_VMS)
PAGE_MAX = 1000  # the most records one admin API list answers (api.admin.MAX_PAGE)


def _count(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], refused in one line otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high} (got {value})")
        return value

    return parse


def _duration(text: str, *, zero: bool = False) -> float:
    """An argparse type: a positive (``zero``: or zero), finite number of seconds, at most
    10**9 (the API's bound on a wall time)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not ((value >= 0 if zero else value > 0) and value <= 10**9):  # False for nan
        low = "0 or more" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"must be {low} and at most 1e9 (got {text})")
    return value


def _duration_or_zero(text: str) -> float:
    return _duration(text, zero=True)


def _not_utf8(text: str) -> bytes | None:
    """The bytes of an argument that are no UTF-8 (argv keeps them as surrogates, which no
    JSON request can carry); None for UTF-8 text."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="surrogateescape")
    return None


def _vm_id(text: str) -> str:
    """An argparse type: what may be an instance id. One with "/" (or "." or "..") would be
    read as a path to another route, so it is refused here; any other is asked of the core,
    which knows its VMs."""
    if _not_utf8(text) is not None:
        raise argparse.ArgumentTypeError("not an instance id: not UTF-8 text")
    if not text or text in (".", "..") or "/" in text:
        raise argparse.ArgumentTypeError(f"not an instance id: {text!r}")
    return text


def _version() -> str:
    try:
        return metadata.version("alienec2")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="alienec2", description="Elastic EC2 worker pools for grid job queues.")
    top.add_argument("--version", action="version", version=f"alienec2 {_version()}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, text: str, description: str = "", parents: Sequence[Any] = ()
    ) -> argparse.ArgumentParser:
        """A subcommand whose --help starts with a description (the list's line, and more)."""
        return sub.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]}."
            + (f" {description}" if description else ""),
            parents=list(parents),
        )

    check = command(
        "check-config",
        "validate a configuration file and exit",
        "Exit 0 with a one-line summary, or 2 with one 'error: key.path: problem' line each.",
    )
    check.add_argument("file", help="YAML configuration file")
    check.set_defaults(run=cmd_check_config)

    core = command(
        "core",
        "run the headless core (the daemon systemd starts)",
        "Runs until SIGTERM or SIGINT; VMs keep running for the next start.",
    )
    core.add_argument("--config", required=True, help="YAML configuration file")
    core.add_argument(
        "--sandbox",
        action="store_true",
        help="point every cloud at an embedded EC2 sandbox (moto) whose instances boot as "
        "local agent processes, as in the demo",
    )
    core.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning"],
        help="log detail on stderr (default info)",
    )
    core.set_defaults(run=cmd_core)

    demo = command(
        "demo",
        "the whole system on this machine: sandbox cloud, core, agents and the console",
        "SIGTERM, SIGHUP and SIGINT stop everything it started; its temporary directory is "
        "removed unless --workdir is given.",
    )
    demo.add_argument("--headless", action="store_true", help="no console: run jobs, summarise")
    demo.add_argument(
        "--alien",
        action="store_true",
        help="AliEn mode: the jobs wait in a stand-in AliEn central task queue, the core reads "
        "its demand with a command, and each VM's agent runs a stand-in JobAgent as its pilot",
    )
    demo.add_argument("--jobs", type=int, help="jobs to run (headless default 40; else endless)")
    demo.add_argument("--json", action="store_true", help="headless summary as JSON")
    demo.add_argument(
        "--min", type=_count(0, POOL_VMS_MAX), default=1, help="pool min_vms (default 1)"
    )
    demo.add_argument(
        "--max", type=_count(0, POOL_VMS_MAX), default=8, help="pool max_vms (default 8)"
    )
    demo.add_argument(
        "--slots", type=int, default=1, help="pool slots_per_vm: jobs a VM runs at once (default 1)"
    )
    demo.add_argument(
        "--idle-timeout", type=_duration, default=15.0, help="seconds before an idle VM is reaped"
    )
    demo.add_argument(
        "--boot-delay", type=_duration_or_zero, default=3.0, help="VM boot seconds (default 3)"
    )
    demo.add_argument(
        "--never-boot", type=float, default=0.0, help="fraction of VMs that never boot"
    )
    demo.add_argument(
        "--die-mid-job",
        type=_count(0, POOL_VMS_MAX),
        default=0,
        help="VMs that die while running a job",
    )
    demo.add_argument(
        "--capacity-error",
        action="store_true",
        help="the preferred cloud answers InsufficientInstanceCapacity",
    )
    demo.add_argument(
        "--spot-interrupt",
        type=float,
        default=0.0,
        metavar="RATE",
        help="Spot clouds; this fraction of VMs get a termination notice seconds after booting",
    )
    demo.add_argument(
        "--timeout",
        type=_duration,
        default=300.0,
        help="headless time limit in seconds (default 300)",
    )
    demo.add_argument(
        "--workdir",
        help="keep state, log, sockets and instances here (kept afterwards; a new directory)",
    )
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
    admin = [connection]
    answer = argparse.ArgumentParser(add_help=False)
    answer.add_argument(
        "--json", action="store_true", help="print the core's answer as one JSON document"
    )
    changes = [connection, answer]  # commands that change the pool

    status = command("status", "the pool at a glance", parents=admin)
    status.add_argument("--json", action="store_true", help="the full status as JSON")
    status.set_defaults(run=cmd_status)

    snapshot = command(
        "snapshot",
        "what the console starts from, as JSON",
        "Status, every VM not terminated and the newest jobs in one document, with the event "
        "sequence number it is consistent with: `alienec2 events --after SEQ --follow` "
        "continues from it.",
        admin,
    )
    snapshot.add_argument(
        "--jobs", type=_count(0, PAGE_MAX), default=50, metavar="N", help="newest jobs (default 50)"
    )
    snapshot.set_defaults(run=cmd_snapshot, json=True)

    why = command(
        "why",
        "the latest scaling decisions and why",
        "Each cycle's decision with its numbers: waiting jobs, idle and booting VMs, the warm "
        "target with its rate and lead time, clouds skipped and why, what was launched or "
        "terminated.",
        admin,
    )
    why.add_argument(
        "--last",
        type=_count(1, PAGE_MAX),
        default=10,
        metavar="N",
        help=f"how many decisions (1-{PAGE_MAX}, default 10)",
    )
    why.add_argument(
        "--json", action="store_true", help="one JSON document: {now, decisions: [...]}"
    )
    why.set_defaults(run=cmd_why)

    flow = command(
        "flow",
        "jobs submitted, started, finished and failed per minute",
        "What the console's sparklines show, oldest minute first; the current minute is "
        "still counting.",
        admin,
    )
    flow.add_argument(
        "--minutes",
        type=_count(1, 24 * 60),
        default=15,
        metavar="N",
        help="how many minutes back (1-1440, default 15)",
    )
    flow.add_argument(
        "--json", action="store_true", help="one JSON document: {now, last_seq, minutes: [...]}"
    )
    flow.set_defaults(run=cmd_flow)

    vms = command(
        "vms",
        "list the VMs",
        "Live VMs by default; --state terminated lists the ended ones.",
        admin,
    )
    vms.add_argument("--state", choices=VM_STATES, help="only VMs in this state")
    vms.add_argument("--json", action="store_true", help="one JSON document: {now, vms: [...]}")
    vms.set_defaults(run=cmd_vms)

    jobs = command("jobs", "list the jobs", "Up to --limit of them, shown by id.", admin)
    jobs.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    jobs.add_argument(
        "--kind",
        choices=["job", "pilot"],
        help="only the queue's jobs, or only pilot runs (e.g. AliEn JobAgents)",
    )
    jobs.add_argument(
        "--limit",
        type=_count(1, PAGE_MAX),
        default=200,
        help=f"at most this many jobs (1-{PAGE_MAX}, default 200)",
    )
    jobs.add_argument("--json", action="store_true", help="one JSON document: {now, jobs: [...]}")
    jobs.set_defaults(run=cmd_jobs)

    vm = command(
        "vm", "show one VM", "Its state, its current or last job with output, its events.", admin
    )
    vm.add_argument("vm", metavar="VM", type=_vm_id, help="the VM's instance id (see alienec2 vms)")
    vm.add_argument("--json", action="store_true", help="one JSON document: {now, vm, job, events}")
    vm.set_defaults(run=cmd_vm)

    job = command("job", "show one job", "Its command, attempts, exit code and output.", admin)
    job.add_argument(
        "job",
        metavar="JOB",
        type=_count(1, JOB_ID_MAX),
        help="the job's number (see alienec2 jobs)",
    )
    job.add_argument("--json", action="store_true", help="the job as one JSON document")
    job.set_defaults(run=cmd_job)

    events = command(
        "events",
        "list the core's events",
        "The last --last events; --follow keeps printing new ones as they happen "
        "(like kubectl get events -w) until interrupted.",
        admin,
    )
    events.add_argument(
        "--follow", "-f", action="store_true", help="wait for new events and print them"
    )
    events.add_argument(
        "--json",
        action="store_true",
        help="one JSON document {events, last_seq}; with --follow one event object per line",
    )
    events.add_argument(
        "--last",
        type=_count(0, PAGE_MAX),
        default=50,
        help=f"how many past events to start with (0-{PAGE_MAX}, default 50)",
    )
    events.add_argument(
        "--after",
        type=_count(0, 2**62),
        metavar="SEQ",
        help="start after this sequence number",
    )
    events.set_defaults(run=cmd_events)

    submit = command(
        "submit",
        "queue a job: alienec2 submit -- CMD ARGS..., or --file FILE (one per line)",
        parents=changes,
    )
    submit.add_argument("--file", help="a file with one command line per job")
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the job (repeatable)",
    )
    submit.add_argument(
        "--wall-time", type=_duration, metavar="SECONDS", help="kill after this long"
    )
    submit.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    submit.set_defaults(run=cmd_submit)

    cancel = command("cancel", "cancel a job", parents=changes)
    cancel.add_argument("job", metavar="JOB", type=_count(1, JOB_ID_MAX), help="the job's number")
    cancel.set_defaults(run=cmd_cancel)

    drain = command(
        "drain",
        "drain a VM, or --all",
        "A draining VM gets no new job and is terminated once idle.",
        changes,
    )
    drain.add_argument("vm", metavar="VM", type=_vm_id, nargs="?", help="the VM's instance id")
    drain.add_argument("--all", action="store_true", help="drain every idle and busy VM")
    drain.set_defaults(run=cmd_drain)

    kill = command("kill", "terminate a VM now (its jobs go back to the queue)", parents=changes)
    kill.add_argument("vm", metavar="VM", type=_vm_id, help="the VM's instance id")
    kill.set_defaults(run=cmd_kill)

    resize = command(
        "resize",
        "change the pool bounds",
        "Kept across restarts and reloads until a restart or reload finds the configuration's "
        "pool.min_vms or max_vms changed from those in force at the resize: the file is then "
        "the newer word, and an event says so.",
        changes,
    )
    resize.add_argument("--min", type=_count(0, POOL_VMS_MAX), help="new min_vms")
    resize.add_argument("--max", type=_count(0, POOL_VMS_MAX), help="new max_vms")
    resize.set_defaults(run=cmd_resize)

    tui = command("tui", "the console: watch and steer the pool", parents=admin)
    tui.add_argument("--refresh", type=float, default=1.0, help="seconds between refreshes")
    tui.add_argument("--readonly", action="store_true", help="watch only: no key changes the pool")
    tui.set_defaults(run=cmd_tui)

    for name, text in (("pause", "pause scaling"), ("resume", "resume scaling")):
        pause = command(name, text, "Dead VMs are still handled while paused.", changes)
        pause.set_defaults(run=cmd_pause)
    return top


CONNECTION_OPTIONS = ("--socket", "--config", "--url", "--token-env")


def _connection_first(argv: Sequence[str]) -> list[str]:
    """``alienec2 --socket S status`` read as ``alienec2 status --socket S``: where git and
    kubectl users put the connection. Only options before the command move (to just after
    it, ahead of a ``--``); a command that takes none says so as for any unknown option."""
    moved: list[str] = []
    rest = list(argv)
    while rest and rest[0].split("=", 1)[0] in CONNECTION_OPTIONS:
        option = rest.pop(0)
        moved.append(option)
        if "=" not in option and rest:
            moved.append(rest.pop(0))
    return rest[:1] + moved + rest[1:] if moved and rest else list(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(_connection_first(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.run(args))
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "moto":
            raise
        # A production install has no sandbox cloud: say how to get one.
        print(
            "error: the sandbox cloud needs moto: pip install 'alienec2[sandbox]'",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (| head): nothing more to say, and no traceback at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
