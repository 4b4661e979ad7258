"""The sandbox AliEn's clients of its central task queue: the stand-in JobAgent (an agent's
``pilot_command``) and the waiting-jobs query (a ``queue.kind: command`` demand source).

Both run as a new Python process, the demand query once per engine cycle and a JobAgent once
per pilot run, so this file imports as little as it can (no argparse, no urllib or
http.client; subprocess only when a job runs) and is run with ``python -S``: standard library
only, no site packages.

    python -S alien_clients.py jobagent --queue URL
    python -S alien_clients.py demand --queue URL
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

NO_JOB_EXIT = 3  # the stand-in JobAgent's "no job matched" (list it in no_job_exit_codes)
USAGE = "usage: alien_clients.py {jobagent|demand} --queue URL"


def call(
    queue_url: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    """One JSON request to the central queue (``http://host:port``), as plain HTTP/1.0 over a
    socket: http.client would pull in ssl and email, a third of this process's start-up."""
    address = queue_url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = address.rpartition(":")
    data = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{'GET' if body is None else 'POST'} {path} HTTP/1.0\r\nHost: {address}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(head.encode() + data)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    header, _, payload = reply.partition(b"\r\n\r\n")
    status = header.split(b" ", 2)[1:2]
    if status != [b"200"]:
        raise OSError(f"{path} answered {header[:80]!r}")
    return json.loads(payload)


def run_jobagent(queue_url: str, agent: str) -> int:
    """Take one job, run it, report it: exit 0; no job: exit ``NO_JOB_EXIT`` at once."""
    job = call(queue_url, "/jobs/take", {"agent": agent})["job"]
    if job is None:
        print("JobAgent: no matching job, exiting", flush=True)
        return NO_JOB_EXIT
    print(f"JobAgent: running job {job['id']}", flush=True)
    import subprocess

    try:
        code = subprocess.run(job["command"], stdin=subprocess.DEVNULL, check=False).returncode
    except OSError as exc:
        print(f"JobAgent: cannot start job {job['id']}: {exc}", flush=True)
        code = 127
    call(queue_url, f"/jobs/{job['id']}/done", {"exit_code": code})
    print(f"JobAgent: job {job['id']} ended with exit code {code}", flush=True)
    return 0


def run_demand(queue_url: str) -> int:
    """The ``command`` demand contract: one integer on stdout and exit 0, or a message on
    stderr and exit 1."""
    try:
        counts = call(queue_url, "/counts", timeout=5.0)
        waiting = int(counts["waiting"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"central queue {queue_url} did not answer: {exc}", file=sys.stderr)
        return 1
    print(waiting)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("jobagent", "demand") or argv[1] != "--queue":
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "demand":
        return run_demand(argv[2])
    return run_jobagent(argv[2], socket.gethostname())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
