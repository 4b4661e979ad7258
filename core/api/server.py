"""uvicorn inside the core's event loop, on sockets the core binds itself.

Binding ourselves lets the admin socket be created with mode 0600 (no window where it is
world-accessible) and lets tests ask for port 0 and learn the real port. Every listener runs
with the limits of ``core/api/limits.py``: a connection cap, a request deadline and body sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp, Scope

from core.api.limits import (
    UVICORN_FLOOD_LINES,
    ConnectionLimits,
    RequestGate,
    accept_batch,
    protocol_for,
    throttle_accept_errors,
)


class EmbeddedServer(uvicorn.Server):
    """The core owns SIGTERM/SIGINT; uvicorn must not install its own handlers."""

    limits: ConnectionLimits

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        throttle_accept_errors(asyncio.get_running_loop())
        await super().serve(sockets)


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one: every parked long poll holds a
    socket, and a soft limit of 1,024 (many distributions' default) would refuse the 1,000th
    agent. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def tcp_socket(host: str, port: int) -> socket.socket:
    raise_open_files_limit()  # at start, before the agents come
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only for
    # such sockets, and without it a two-part response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def unix_socket(path: str | Path) -> socket.socket:
    """A listening unix socket only its owner can use (mode 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        if not stat.S_ISSOCK(path.stat().st_mode):
            raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()  # left behind by a core that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def make_server(
    app: ASGIApp,
    *,
    limits: ConnectionLimits | None = None,
    admits: Callable[[Scope], bool] | None = None,
    guard: Callable[[ASGIApp], ASGIApp] | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> EmbeddedServer:
    """``limits`` None: the defaults (10 s request deadline, 1,024 connections); ``admits``:
    whose requests reach ``app`` (the agent API's allowed networks), None: everyone's;
    ``guard``: a layer in front of everything, the request gate too (the admin token)."""
    limits = limits or ConnectionLimits()
    front: ASGIApp = RequestGate(app, admits)
    config = uvicorn.Config(
        guard(front) if guard is not None else front,
        http=protocol_for(limits),
        ws="none",  # nothing here speaks WebSocket: an upgrade is answered and closed
        backlog=accept_batch(limits.max_connections),
        # No limit_concurrency: it answers 503 to requests once *connections* reach it, which
        # the cap in limits.py already bounds by closing the ones that never send a request.
        # Agents keep a connection per loop; idle ones are closed after keep_alive_s (75 s:
        # longer than a 30 s heartbeat gap; see limits.py) and the cap displaces them first.
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]  # call_later takes a float
        lifespan="off",
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # access.py decides whose X-Forwarded-For counts
        server_header=False,
        timeout_graceful_shutdown=2,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    # After uvicorn.Config, which configures its loggers: a flood of malformed requests is
    # one line a second, not one each.
    logging.getLogger("uvicorn.error").addFilter(UVICORN_FLOOD_LINES)
    server = EmbeddedServer(config)
    server.limits = limits
    return server
