"""Limits at the request boundary: connections, request deadlines, body sizes, proxies, admin TCP.

Everything runs against a real core on loopback, attacked with raw sockets as a hostile VM
network would (half requests, duplicate headers, huge bodies).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from contextualisation.agent import Core as AgentClient
from core.api.access import client_address, forwarded_for, networks
from core.api.limits import (
    MAX_HEADER_BYTES,
    OPEN_FILES_RESERVE,
    UVICORN_FLOOD_LINES,
    ConnectionLimits,
    RateLimitedLog,
    agent_max_connections,
    body_limit,
    listeners_capacity,
    open_files_warning,
    protocol_for,
    throttle_accept_errors,
)
from core.clouds.sandbox import MotoEC2Server
from core.config import Config
from core.daemon import Core
from core.store import JobSpec
from core.userdata import read_agent_settings
from tests.conftest import cloud, core_config, ec2_client, eventually, running_core, wait_for_vms
from tests.test_agent import make_tls_files

FLOOD = 1_100
HALF_REQUEST = b"POST /agent/v1/heartbeat HTTP/1.1\r\nHost: core\r\nContent-Le"


@pytest.fixture(autouse=True, scope="module")
def enough_open_files() -> Iterator[None]:
    """The harness holds the flood's client ends: give it room (the core's limit is the
    subject of the tests, the test process's is not)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def agent_limits_of(core: Core) -> ConnectionLimits:
    return core._servers[0].limits


def agent_client(moto_url: str, core_url: str, vm_id: str) -> tuple[AgentClient, dict[str, Any]]:
    """The real agent's HTTP client and the registration its user data allows."""
    raw = ec2_client(moto_url).describe_instance_attribute(InstanceId=vm_id, Attribute="userData")
    settings = read_agent_settings(base64.b64decode(raw["UserData"]["Value"]).decode())
    body = {
        "instance_id": vm_id,
        "launch_id": settings["launch_id"],
        "launch_secret": settings["launch_secret"],
    }
    return AgentClient(core_url, None), body


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(port: int, payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if payload:
        sock.sendall(payload)
    return sock


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the server closed the connection (EOF or reset) within ``timeout`` of its
    last reply, if any."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def raw_request(port: int, *pieces: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send bytes as they are (duplicate headers included), in ``pieces`` written one after
    the other; the status and body of the reply, read to EOF."""
    with connect(port) as sock:
        for piece in pieces:
            sock.sendall(piece)
        sock.settimeout(timeout)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# ---- 1. connections ---------------------------------------------------------------------------


async def test_half_open_flood_leaves_agents_and_the_admin_socket_answering(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url, pool={"min_vms": 1, "max_vms": 2})
    async with running_core(config) as core:
        limits = agent_limits_of(core)
        assert limits.max_connections == 2 * 2 + 256 < FLOOD
        [vm_id] = await wait_for_vms(core, 1)
        agent, registration = agent_client(moto.url, core.agent_url, vm_id)
        status, reply = await asyncio.to_thread(agent.call, "/agent/v1/register", registration)
        assert status == 200, reply
        agent.token = reply["token"]
        # A long poll in flight: a connection with a request is never displaced.
        long_poll = asyncio.create_task(
            asyncio.to_thread(agent.call, "/agent/v1/jobs/next?wait=30", {}, 40)
        )
        await eventually(lambda: core.changes.jobs.waiting == 1)

        port = port_of(core.agent_url)
        flood = await asyncio.to_thread(lambda: [connect(port, HALF_REQUEST) for _ in range(FLOOD)])
        try:
            for _ in range(5):
                status, reply = await asyncio.to_thread(
                    agent.call, "/agent/v1/heartbeat", {"busy": False}, 1.0
                )
                assert (status, reply["action"]) == (200, "run")
            async with httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(core.admin_socket)),
                base_url="http://core",
                timeout=1.0,
            ) as admin:
                assert (await admin.get("/admin/v1/status")).status_code == 200
                submitted = await admin.post("/admin/v1/jobs", json={"command": ["true"]})
                assert submitted.status_code == 201
            status, reply = await asyncio.wait_for(long_poll, 10)
            assert status == 200 and reply["job"]["id"] == submitted.json()["id"]
            assert len(limits.open) <= limits.max_connections
            assert limits.displaced >= FLOOD - limits.max_connections
            assert limits.refused == 0
            # The oldest half-open connections are the ones that made room.
            assert await asyncio.to_thread(closed_by_server, flood[0], 1.0)
        finally:
            for sock in flood:
                sock.close()


async def test_a_request_not_complete_within_the_deadline_is_closed(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url, web={"header_timeout_s": 0.3})
    async with running_core(config) as core:
        limits = agent_limits_of(core)
        port = port_of(core.agent_url)
        silent = connect(port)
        half_headers = connect(port, HALF_REQUEST)
        trickled_body = connect(
            port,
            b"POST /agent/v1/heartbeat HTTP/1.1\r\nHost: core\r\nContent-Length: 100\r\n\r\n{",
        )
        for sock in (silent, half_headers, trickled_body):
            with sock:
                assert await asyncio.to_thread(closed_by_server, sock)
        assert limits.timed_out == 3
        assert not limits.open
        status, _ = await asyncio.to_thread(
            raw_request, port, b"GET /healthz HTTP/1.1\r\nHost: core\r\nConnection: close\r\n\r\n"
        )
        assert status == 200


async def test_at_the_cap_with_every_connection_busy_a_newcomer_is_refused(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(
        tmp_path, moto.url, pool={"min_vms": 1, "slots_per_vm": 2}, web={"max_connections": 2}
    )
    async with running_core(config) as core:
        limits = agent_limits_of(core)
        [vm_id] = await wait_for_vms(core, 1)
        agent, registration = agent_client(moto.url, core.agent_url, vm_id)
        _, reply = await asyncio.to_thread(agent.call, "/agent/v1/register", registration)
        agent.token = reply["token"]
        polls = [  # one per slot: a slot keeps one parked poll
            asyncio.create_task(
                asyncio.to_thread(agent.call, f"/agent/v1/jobs/next?wait=30&slot={slot}", {})
            )
            for slot in range(2)
        ]
        await eventually(lambda: core.changes.jobs.waiting == 2)
        with connect(port_of(core.agent_url), b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n") as sock:
            assert await asyncio.to_thread(closed_by_server, sock)
        assert limits.refused == 1
        core.changes.close()  # answer the polls now: the test is over
        await asyncio.gather(*polls)


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: core\r\n\r\n"


def kept_alive_request(sock: socket.socket, request: bytes = HEALTHZ) -> int:
    """Send a request on an open connection and read exactly its reply (the connection stays
    open): the status."""
    sock.sendall(request)
    sock.settimeout(5)
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(65536)
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if b"content-length" in line
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1])


async def test_an_idle_kept_alive_connection_outlives_the_request_deadline_and_is_reused(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    """An agent's heartbeat loop idles 30 s between requests on its connection: the request
    deadline must not close it, only keep_alive_s."""
    config = core_config(tmp_path, moto.url, web={"header_timeout_s": 0.3, "keep_alive_s": 60})
    async with running_core(config) as core:
        limits = agent_limits_of(core)
        with connect(port_of(core.agent_url)) as sock:
            assert await asyncio.to_thread(kept_alive_request, sock) == 200
            assert not await asyncio.to_thread(closed_by_server, sock, 1.0)  # > 0.3 s idle
            assert await asyncio.to_thread(kept_alive_request, sock) == 200
        assert limits.timed_out == 0


async def test_an_idle_kept_alive_connection_is_closed_after_keep_alive_s(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url, web={"keep_alive_s": 0.3})
    async with running_core(config) as core:
        limits = agent_limits_of(core)
        with connect(port_of(core.agent_url)) as sock:
            assert await asyncio.to_thread(kept_alive_request, sock) == 200
            assert await asyncio.to_thread(closed_by_server, sock)
        await eventually(lambda: not limits.open)


async def test_a_request_trickled_on_a_kept_alive_connection_meets_the_deadline(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url, web={"header_timeout_s": 0.3, "keep_alive_s": 60})
    async with running_core(config) as core:
        limits = agent_limits_of(core)
        with connect(port_of(core.agent_url)) as sock:
            assert await asyncio.to_thread(kept_alive_request, sock) == 200
            sock.sendall(HALF_REQUEST)
            assert await asyncio.to_thread(closed_by_server, sock)
        assert limits.timed_out == 1


async def test_bytes_that_begin_no_request_do_not_keep_an_idle_connection_open(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    """Blank lines after an answer begin no request: the keep-alive timer still closes the
    connection (the request deadline, 60 s, cannot be what closes it within 5 s). An answer
    that did not wait for its request's chunked body (the route reads none) ends the
    connection, as h11 ended it: the rest of that body is not read, however long it runs."""
    config = core_config(tmp_path, moto.url, web={"header_timeout_s": 60, "keep_alive_s": 0.5})
    async with running_core(config) as core:
        port = port_of(core.agent_url)
        with connect(port) as blank, connect(port) as answered_early, connect(port) as sized:
            assert await asyncio.to_thread(kept_alive_request, blank) == 200
            blank.sendall(b"\r\n")
            early = b"POST /nope HTTP/1.1\r\nHost: core\r\nTransfer-Encoding: chunked\r\n\r\n"
            assert await asyncio.to_thread(kept_alive_request, answered_early, early) == 404
            # As the real agent polls: the head, answered before its `{}` is sent. A body of
            # declared length is read to its end and the connection kept.
            poll_head = b"GET /healthz HTTP/1.1\r\nHost: core\r\nContent-Length: 2\r\n\r\n"
            assert await asyncio.to_thread(kept_alive_request, sized, poll_head) == 200
            assert await asyncio.to_thread(kept_alive_request, sized, b"{}" + HEALTHZ) == 200
            for sock in (blank, answered_early):
                assert await asyncio.to_thread(closed_by_server, sock)
        assert agent_limits_of(core).timed_out == 0


class Rig:
    """One connection of ``LimitedProtocol`` on a real transport over a socket pair, the
    listener skipped: the test holds the peer's end and reads from it only when it says.
    The core's end can hold 8 KiB unsent in the kernel, so an answer past that waits in the
    transport. uvicorn's own set of connections says when the connection is gone."""

    def __init__(self, app: Any, **limits: Any) -> None:
        self.limits = ConnectionLimits("test", **limits)
        self.protocol_class = protocol_for(self.limits)
        self.config = uvicorn.Config(
            app, http=self.protocol_class, ws="none", lifespan="off", log_level="warning"
        )
        self.config.load()
        self.state = ServerState()
        self.core_end, self.peer = socket.socketpair()
        self.core_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    async def connect(self) -> Any:
        _, self.connection = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: self.protocol_class(config=self.config, server_state=self.state, app_state={}),
            self.core_end,
        )
        return self.connection

    async def rearmed(self, timer: str) -> None:
        """Wait until the connection's ``timer`` is a new one (it looked and went on)."""
        before = getattr(self.connection, timer)
        await eventually(lambda: getattr(self.connection, timer) not in (None, before))


def answering(size: int, *headers: tuple[bytes, bytes]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        head = [(b"content-length", b"%d" % size), *headers]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b"x" * size})

    return app


@pytest.mark.parametrize(
    ("keep_alive_s", "size", "headers", "then"),
    [
        (0.3, 1 << 20, (), b""),
        (0.3, 40 * 1024, ((b"connection", b"close"),), b""),
        (60.0, 1 << 20, (), b"\x01\r\n\r\n"),
    ],
    ids=["answers", "a closing answer under 64 KiB", "a refusal"],
)
async def test_a_peer_that_reads_none_of_its_answers_is_dropped(
    keep_alive_s: float, size: int, headers: tuple[tuple[bytes, bytes], ...], then: bytes
) -> None:
    """A request in full is never timed out, so a client that reads nothing would hold its
    slot and its answers in memory for as long as it liked: once keep_alive_s passes with
    nothing taken the connection is aborted, also when the answer closes it (then
    asyncio waits for the peer however long). A refusal (a malformed request sent once the
    answer waits; keep_alive_s is then 60 s) is the connection's last answer and waits
    CLOSE_GRACE_S at most."""
    rig = Rig(answering(size, *headers), keep_alive_s=keep_alive_s)
    with rig.peer:
        connection = await rig.connect()
        rig.peer.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await eventually(lambda: connection.flow.write_paused)
        rig.peer.sendall(then)
        await eventually(lambda: not rig.state.connections, timeout=5)
    assert not rig.limits.open


async def test_a_slow_reader_that_keeps_taking_its_answer_is_not_dropped() -> None:
    """A console fetching megabytes over a slow link: each keep_alive_s it takes 128 KiB,
    more than MIN_PROGRESS, and gets the whole answer though it takes several periods."""
    size = 1 << 20
    rig = Rig(answering(size), keep_alive_s=1.0)
    with rig.peer:
        connection = await rig.connect()
        rig.peer.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await eventually(lambda: connection._abort_timer is not None)
        rig.peer.settimeout(5)
        reply = b""
        for _ in range(3):
            reply += await asyncio.to_thread(read_exactly, rig.peer, 128 * 1024)
            await rig.rearmed("_abort_timer")
        assert rig.state.connections
        while len(reply) < size or b"\r\n\r\n" not in reply:
            reply += await asyncio.to_thread(rig.peer.recv, 1 << 20)
    assert reply.endswith(b"x" * size)


async def test_a_large_body_still_arriving_outlives_the_request_deadline() -> None:
    """A batch of jobs uploaded over a slow link: each header_timeout_s brings 128 KiB of the
    body, more than MIN_PROGRESS, so the deadline is pushed on; the trickle of a few bytes is
    still cut (test_a_request_not_complete_within_the_deadline_is_closed)."""
    rig = Rig(answering(2), header_timeout_s=0.5)
    piece = b"y" * (128 * 1024)
    with rig.peer:
        await rig.connect()
        head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (4 * len(piece))
        await asyncio.to_thread(rig.peer.sendall, head + piece)
        for _ in range(3):
            await rig.rearmed("_deadline")
            await asyncio.to_thread(rig.peer.sendall, piece)
        rig.peer.settimeout(5)
        reply = await asyncio.to_thread(rig.peer.recv, 65536)
    assert reply.startswith(b"HTTP/1.1 200")
    assert rig.limits.timed_out == 0


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += sock.recv(size - len(data))
    return data


async def test_at_the_cap_an_idle_kept_alive_connection_makes_room(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url, web={"max_connections": 1})
    async with running_core(config) as core:
        limits = agent_limits_of(core)
        port = port_of(core.agent_url)
        with connect(port) as idle:
            assert await asyncio.to_thread(kept_alive_request, idle) == 200
            with connect(port) as newcomer:
                assert await asyncio.to_thread(kept_alive_request, newcomer) == 200
            assert await asyncio.to_thread(closed_by_server, idle)
        assert (limits.displaced, limits.refused) == (1, 0)


class Link:
    """A connection as ConnectionLimits sees it: dropped, it leaves every set."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.dropped = False

    def drop(self) -> None:
        self.dropped = True
        self.limits.open.discard(self)  # type: ignore[arg-type]
        self.limits.waiting.pop(self, None)  # type: ignore[call-overload]
        self.limits.idle.pop(self, None)  # type: ignore[call-overload]


def test_at_the_cap_a_stale_request_goes_first_then_the_connection_idle_the_shortest_time() -> None:
    limits = ConnectionLimits(max_connections=10)
    idle_long, idle_recent, idle_now, sending, trickling = (Link(limits) for _ in range(5))
    limits.idle.update({idle_long: 0.0, idle_recent: 10.0, idle_now: 19.8})  # type: ignore[dict-item]
    assert limits.to_displace(20.0) is idle_recent  # its next use is the farthest away
    limits.waiting[sending] = 19.9  # type: ignore[index]  # a request arriving: not yet
    assert limits.to_displace(20.0) is idle_recent
    limits.waiting = {trickling: 15.0, sending: 19.9}  # type: ignore[dict-item]
    assert limits.to_displace(20.0) is trickling  # waited 5 s for its request
    limits.idle = {idle_now: 19.8}  # type: ignore[dict-item]
    limits.waiting = {sending: 19.9}  # type: ignore[dict-item]
    assert limits.to_displace(20.0) is idle_now  # nothing stale: the oldest of either
    limits.idle, limits.waiting = {}, {}
    assert limits.to_displace(20.0) is None  # all busy with requests: refuse the newcomer


def test_a_fleet_over_the_cap_reconnects_a_few_heartbeats_not_every_one() -> None:
    """100 agents beat every 30 s on kept-alive connections; the cap holds 95 (an open-files
    limit below the fleet's loops). Displacing the longest idle would pick the next to beat,
    so every beat would reconnect and displace the next one: 900 in ten periods."""
    clock = [0.0]
    limits = ConnectionLimits(max_connections=95, clock=lambda: clock[0])
    links: list[Link | None] = [None] * 100
    reconnects = 0
    for beat in range(1000):
        agent, clock[0] = beat % 100, beat * 0.3  # each agent every 30 s, phases spread
        link = links[agent]
        if link is None or link.dropped:
            link = links[agent] = Link(limits)
            assert limits.admit(link)  # type: ignore[arg-type]
            reconnects += beat >= 100  # after the first period
        limits.idle.pop(link, None)  # type: ignore[call-overload]  # the beat's request
        limits.idle[link] = clock[0]  # type: ignore[index]  # answered: idle again
    assert reconnects <= 5 * 9 + 5  # about the five the cap lacks, once a period


def test_default_cap_is_a_connection_per_agent_loop_per_vm_plus_headroom(tmp_path: Path) -> None:
    config = core_config(tmp_path, "http://127.0.0.1:9", pool={"max_vms": 500})
    assert agent_max_connections(config) == 1256
    slots = core_config(
        tmp_path,
        "http://127.0.0.1:9",
        pool={"max_vms": 500, "slots_per_vm": 4},
        contextualisation={"template": "alien", "alien": {"pilot_command": ["jobagent"]}},
    )
    assert agent_max_connections(slots) == 5 * 500 + 256  # a heartbeat and 4 long polls
    pinned = core_config(tmp_path, "http://127.0.0.1:9", web={"max_connections": 300})
    assert agent_max_connections(pinned) == 300


def test_the_default_cap_stays_within_the_open_files_limit_and_says_so(tmp_path: Path) -> None:
    """Past RLIMIT_NOFILE accept() fails and asyncio stops accepting for a second: the agent
    API's cap stays below it (a newcomer displaces an idle connection), and the start-up
    warning still tells the admin to raise the limit."""
    config = core_config(tmp_path, "http://127.0.0.1:9", pool={"max_vms": 10_000})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        room = low - OPEN_FILES_RESERVE - config.admin.max_connections
        assert agent_max_connections(config) == room < 2 * 10_000
        warning = open_files_warning(listeners_capacity(config))
        assert warning is not None and "LimitNOFILE" in warning
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_caps_above_the_open_file_limit_are_warned_about() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    warning = open_files_warning(soft)
    assert warning is not None and "LimitNOFILE" in warning
    assert open_files_warning(min(soft // 2, 256)) is None


async def test_accept_failures_are_logged_once_a_second_without_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    others: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: others.append(context))
    try:
        throttle_accept_errors(loop)
        throttle_accept_errors(loop)  # idempotent: one wrapper per loop
        emfile = OSError(24, "Too many open files")
        with caplog.at_level(logging.ERROR, logger="alienec2.api"):
            for _ in range(1000):
                loop.call_exception_handler(
                    {"message": "socket.accept() out of system resource", "exception": emfile}
                )
            loop.call_exception_handler({"message": "something else"})
    finally:
        loop.set_exception_handler(previous)
    accept_lines = [r for r in caplog.records if "event=accept_failed" in r.getMessage()]
    assert len(accept_lines) == 1 and accept_lines[0].exc_info is None
    assert "Too many open files" in accept_lines[0].getMessage()
    assert [c["message"] for c in others] == ["something else"]


# ---- 2. bodies --------------------------------------------------------------------------------


def test_body_limits_per_route() -> None:
    assert body_limit("/agent/v1/register") == 16 * 1024
    assert body_limit("/agent/v1/heartbeat") == 16 * 1024
    assert body_limit("/agent/v1/jobs/7/report") == 256 * 1024
    assert body_limit("/admin/v1/jobs/batch") > body_limit("/admin/v1/jobs") >= 1024 * 1024


@pytest.fixture
async def core(tmp_path: Path, moto: MotoEC2Server) -> Any:
    async with running_core(core_config(tmp_path, moto.url)) as running:
        yield running


async def chunks(chunk: bytes, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield chunk


async def test_oversized_bodies_get_413_with_a_message(core: Core) -> None:
    async with httpx.AsyncClient(base_url=core.agent_url, timeout=5) as http:
        declared = await http.post("/agent/v1/register", content=b"x" * (17 * 1024))
        streamed = await http.post(  # chunked: no Content-Length to refuse it by
            "/agent/v1/register", content=chunks(b"x" * 4096, 5)
        )
        report = await http.post(
            "/agent/v1/jobs/1/report", content=json.dumps({"output_tail": "y" * 200_000})
        )
    for reply in (declared, streamed):
        assert reply.status_code == 413
        assert reply.headers["connection"] == "close"  # the rest of the body is unread
        assert reply.json()["code"] == "body_too_large"
        assert "16384 bytes" in reply.json()["error"]
    assert report.status_code == 401  # 200 KB is within the report's limit: on to the token


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


async def test_a_header_block_over_16_kib_sent_in_one_write_gets_431_and_is_closed(
    core: Core,
) -> None:
    """h11 bounds headers only while they are incomplete: 100 KB arriving in one read passed
    it, on any route, before any token was looked at."""
    port = port_of(core.agent_url)
    big = b"X-Big: " + b"a" * 100_000 + b"\r\n"
    request = b"POST /agent/v1/heartbeat HTTP/1.1\r\nHost: core\r\n" + big
    request += b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    status, body = await asyncio.to_thread(raw_request, port, request)  # read to EOF: closed
    assert status == 431
    assert json.loads(body)["code"] == "headers_too_large"
    many = b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 10) for n in range(3000))
    request = b"GET /healthz HTTP/1.1\r\nHost: core\r\n" + many + b"\r\n"
    status, _ = await asyncio.to_thread(raw_request, port, request)
    assert status == 431


async def test_a_head_growing_past_16_kib_gets_431_before_it_is_complete(core: Core) -> None:
    """llhttp keeps an incomplete header however long it grows, so the head is bounded while
    it arrives. Exactly one byte too many, in pieces the core reads as they come: it answers
    431 and closes within 5 s, where its request deadline is 10 s."""
    limits = agent_limits_of(core)
    head = b"GET /healthz HTTP/1.1\r\nHost: core\r\nX-Long: "
    head += b"a" * (MAX_HEADER_BYTES + 1 - len(head))
    pieces = [head[start : start + 1024] for start in range(0, len(head), 1024)]
    status, body = await asyncio.to_thread(raw_request, port_of(core.agent_url), *pieces)
    assert status == 431
    assert json.loads(body)["code"] == "headers_too_large"
    assert limits.timed_out == 0


@pytest.mark.parametrize(
    ("head", "status", "says"),
    [
        (b"GET /healthz HTTP/1.1\r\n", 400, "one Host header"),
        (b"GET /healthz HTTP/1.1\r\nHost: core\r\nHost: other\r\n", 400, "one Host header"),
        (
            b"POST /agent/v1/heartbeat HTTP/1.1\r\nHost: core\r\n"
            b"Transfer-Encoding: gzip, chunked\r\n",
            501,
            "other than chunked",
        ),
        (b"GET /healthz HTTP/1.1\r\nHost: core\r\nX: a\r\n b\r\n", 400, "whitespace"),
        (b"GET /healthz HTTP/2.0\r\nHost: core\r\n", 505, "HTTP/1.1 or HTTP/1.0 only"),
    ],
)
async def test_requests_the_parser_refuses_get_a_json_error_saying_why(
    core: Core, head: bytes, status: int, says: str
) -> None:
    """No Host or two (RFC 9112 3.2: a request is routed by it), a transfer coding whose bytes
    would reach the app still coded, an obsolete folded header: refused and closed."""
    port = port_of(core.agent_url)
    answer, body = await asyncio.to_thread(raw_request, port, head + b"\r\n2\r\n{}\r\n0\r\n\r\n")
    assert answer == status
    assert says in json.loads(body)["error"]


async def test_trailers_are_not_headers_and_are_bounded(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    """A chunked body's trailers come after the gate and the token check read the headers:
    a VM's token sent as one must not count. And llhttp keeps a trailer until it is complete,
    so they are bounded like a head (431), not by the request deadline (10 s)."""
    config = core_config(tmp_path, moto.url, pool={"min_vms": 1, "max_vms": 1})
    async with running_core(config) as core:
        [vm_id] = await wait_for_vms(core, 1)
        agent, registration = agent_client(moto.url, core.agent_url, vm_id)
        _, reply = await asyncio.to_thread(agent.call, "/agent/v1/register", registration)
        port = port_of(core.agent_url)
        beat = (
            b"POST /agent/v1/heartbeat HTTP/1.1\r\nHost: core\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"f\r\n" + b'{"busy": false}' + b"\r\n0\r\n"
        )
        smuggled = b"Authorization: Bearer " + reply["token"].encode() + b"\r\n\r\n"
        status, _ = await asyncio.to_thread(raw_request, port, beat + smuggled)
        assert status == 401
        # One trailer that never ends, past what one read can hold (256 KiB): what the
        # core read of it after the body's read exceeds 16 KiB and the core closes, within 5 s
        # where its deadline is 10 s (a reset: the rest is unread).
        with connect(port, beat + b"X-Trailer: ") as sock:
            await asyncio.to_thread(send_until_closed, sock, b"v" * 1024, 300)
            assert await asyncio.to_thread(closed_by_server, sock)
        assert agent_limits_of(core).timed_out == 0


def send_until_closed(sock: socket.socket, piece: bytes, times: int) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for _ in range(times):
            sock.sendall(piece)


async def test_requests_pipelined_far_ahead_of_their_answers_are_refused(core: Core) -> None:
    """llhttp parses every request of a read at once and uvicorn queues each one (~2 KB):
    300,000 tiny requests on one connection took the core from 342 MB to 1 GB. Past
    MAX_PIPELINED waiting, the connection is answered 429 and closed."""
    requests = b"GET /healthz HTTP/1.1\r\nHost: core\r\n\r\n" * 2000
    status_lines, body = await asyncio.to_thread(pipelined, port_of(core.agent_url), requests)
    assert [line for line in status_lines if b"HTTP/1.1 429" in line] == status_lines[-1:]
    assert len(status_lines) < 1000  # answered: those before the refusal
    assert b'"code": "too_many_pipelined"' in body


def pipelined(port: int, requests: bytes) -> tuple[list[bytes], bytes]:
    """Send ``requests`` in one write and read to EOF: the status lines, and all the bytes."""
    with connect(port) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(requests)
        sock.settimeout(5)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
    return [line for line in reply.split(b"\r\n") if b"HTTP/1.1 " in line], reply


async def test_an_upgrade_request_is_answered_and_its_connection_closed(core: Core) -> None:
    """Nothing here speaks WebSocket; llhttp parses nothing after an upgrade request, so its
    answer is the connection's last (raw_request reads to EOF)."""
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: core\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"\r\nGET /healthz HTTP/1.1\r\nHost: core\r\n\r\n"
    )
    status, body = await asyncio.to_thread(raw_request, port_of(core.agent_url), request)
    assert status == 200
    assert b"HTTP/1.1" not in body  # one answer


async def test_both_framing_headers_get_400_and_the_connection_is_closed(core: Core) -> None:
    """Content-Length beside Transfer-Encoding is how requests are smuggled past a proxy that
    reads the other one (RFC 9112 6.3): llhttp refuses it, the 400 says why, and nothing more
    is read on the connection."""
    port = port_of(core.agent_url)
    request = (
        b"POST /agent/v1/heartbeat HTTP/1.1\r\nHost: core\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: 13\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: core\r\n\r\n"
    )
    status, body = await asyncio.to_thread(raw_request, port, request)  # one reply, then EOF
    assert status == 400
    refusal = json.loads(body)
    assert refusal["code"] == "malformed_request"
    assert "Content-Length can't be present with Transfer-Encoding" in refusal["error"]
    assert b"HTTP/1.1" not in body


async def test_a_malformed_chunk_gets_400_without_a_traceback_in_the_log(
    core: Core, caplog: pytest.LogCaptureFixture
) -> None:
    """The headers start the app, then h11 refuses a chunk and answers 400 itself: the app
    must not answer again on the closed connection (that logged two tracebacks a request,
    from anyone, on any path)."""
    port = port_of(core.agent_url)
    caplog.set_level(logging.WARNING)
    for path in (b"/healthz", b"/agent/v1/heartbeat", b"/agent/v1/register"):
        request = (
            b"POST " + path + b" HTTP/1.1\r\nHost: core\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5000\r\n" + b"a" * 0x4FFF + b"\r\n0\r\n\r\n"
        )
        status, _ = await asyncio.to_thread(raw_request, port, request)
        assert status == 400
    # The app's task ends on the loop after the reply: let it run before reading the log.
    status, _ = await asyncio.to_thread(
        raw_request, port, b"GET /healthz HTTP/1.1\r\nHost: core\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_flood_of_malformed_requests_is_one_warning_a_second(core: Core) -> None:
    """uvicorn logs each malformed request it refuses, before any token is read: anyone
    could fill the log. Its line passes once a second at most, with how many it stands for."""
    port = port_of(core.agent_url)
    uvicorn_log = logging.getLogger("uvicorn.error")  # its own logger does not propagate
    records: list[logging.LogRecord] = []
    collect = logging.Handler(logging.WARNING)
    collect.emit = records.append  # type: ignore[method-assign]
    uvicorn_log.addHandler(collect)
    try:
        UVICORN_FLOOD_LINES._last.clear()  # an earlier test's flood in this process
        UVICORN_FLOOD_LINES._suppressed.clear()
        started = time.monotonic()
        for _ in range(30):
            status, _ = await asyncio.to_thread(raw_request, port, b"NOT HTTP AT ALL\r\n\r\n")
            assert status == 400
        elapsed = time.monotonic() - started
    finally:
        uvicorn_log.removeHandler(collect)
    lines = [r.getMessage() for r in records if r.getMessage().startswith("Invalid HTTP")]
    assert 1 <= len(lines) <= 1 + elapsed  # not 30
    assert lines[0] == "Invalid HTTP request received. count=1"
    assert all(line.startswith("Invalid HTTP request received. count=") for line in lines)


@contextlib.contextmanager
def core_process(
    tmp_path: Path, moto_url: str, nofile: int | None = None, **sections: Any
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`alienec2 core` as its own process (its memory and open files its own), optionally
    with a lower RLIMIT_NOFILE: (process, agent port). Its log is ``tmp_path/core.log``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {
        "core_id": "test-core",
        "clouds": [cloud("c", moto_url)],
        "state": {"path": str(tmp_path / "state.db"), "synchronous": "normal"},
        "admin": {"socket": str(tmp_path / "admin.sock")},
        "web": {"host": "127.0.0.1", "port": port},
        "pool": {"cycle_interval_s": 0.2, "adaptive_warm": False},
        **sections,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
            )

    log = (tmp_path / "core.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "core", "--config", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=limit_files,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "core did not start"
            time.sleep(0.05)  # polling for readiness, not synchronising on an event
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_a_core_with_systemds_default_1024_files_survives_a_half_open_flood(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    """The issue's scenario as it was: 1,100 half-open connections against a core limited to
    1,024 open files, while an agent heartbeats and the admin socket is used."""
    pool = {"min_vms": 1, "max_vms": 2, "cycle_interval_s": 0.2, "adaptive_warm": False}
    with (
        core_process(tmp_path, moto.url, nofile=1024, pool=pool) as (proc, port),
        httpx.Client(
            transport=httpx.HTTPTransport(uds=str(tmp_path / "admin.sock")),
            base_url="http://core",
            timeout=1.0,
        ) as admin,
        concurrent.futures.ThreadPoolExecutor(1) as background,
    ):
        deadline = time.monotonic() + 30
        while not (vms := admin.get("/admin/v1/vms").json()["vms"]):
            assert time.monotonic() < deadline, "no VM launched"
            time.sleep(0.05)
        agent, registration = agent_client(moto.url, f"http://127.0.0.1:{port}", vms[0]["id"])
        status, reply = agent.call("/agent/v1/register", registration)
        assert status == 200, reply
        agent.token = reply["token"]
        long_poll = background.submit(agent.call, "/agent/v1/jobs/next?wait=30", {}, 40)
        while admin.get("/admin/v1/status").json()["agents_waiting"] != 1:
            assert time.monotonic() < deadline, "the long poll never parked"
            time.sleep(0.05)

        flood = [connect(port, HALF_REQUEST) for _ in range(FLOOD)]
        try:
            for _ in range(5):
                status, reply = agent.call("/agent/v1/heartbeat", {"busy": False}, 1.0)
                assert (status, reply["action"]) == (200, "run")
            assert admin.get("/admin/v1/status").status_code == 200
            submitted = admin.post("/admin/v1/jobs", json={"command": ["true"]})
            status, reply = long_poll.result(timeout=10)
            assert status == 200 and reply["job"]["id"] == submitted.json()["id"]
        finally:
            for sock in flood:
                sock.close()
        assert proc.poll() is None
    log = (tmp_path / "core.log").read_text()
    assert "Traceback" not in log and "accept_failed" not in log
    assert "event=connection_displaced" in log


def test_four_concurrent_50_mb_bodies_add_under_20_mb(tmp_path: Path, moto: MotoEC2Server) -> None:
    """Measured as the core process's peak resident memory (VmHWM, reset before the bodies are
    sent) over its resident memory at that moment."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read a process's peak memory")
    with core_process(tmp_path, moto.url) as (proc, port):
        grown, statuses = send_four_large_bodies(proc.pid, port)
    print(f"four 50 MB bodies: core peak RSS +{grown:.2f} MiB")
    assert statuses == [413] * 4
    assert grown < 20, f"peak resident memory grew {grown:.1f} MiB"


def send_four_large_bodies(pid: int, port: int) -> tuple[float, list[int]]:
    """Two with a declared length, two chunked; MiB the peak RSS grew by, and the statuses."""
    chunk = b"x" * (1024 * 1024)
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    heads = [
        b"POST /agent/v1/register HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
        + (
            b"Content-Length: 52428800\r\n\r\n"
            if declared
            else b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for declared in (True, False, True, False)
    ]

    def send(head: bytes) -> int:
        with connect(port, head) as sock:
            with contextlib.suppress(OSError):  # the server answers early and closes
                for _ in range(50):
                    sock.sendall(framed if b"chunked" in head else chunk)
            sock.settimeout(5)
            reply = sock.recv(65536)
        return int(reply.split()[1])

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    before = memory_kib(pid, "VmRSS")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(send, heads))
    return (memory_kib(pid, "VmHWM") - before) / 1024, statuses


# ---- 4. proxies -------------------------------------------------------------------------------


def test_forwarded_for_lines_are_combined_in_order() -> None:
    headers = [(b"x-forwarded-for", b"10.1.1.1, 10.2.2.2"), (b"x-forwarded-for", b"192.0.2.9")]
    assert forwarded_for(headers) == "10.1.1.1, 10.2.2.2, 192.0.2.9"
    assert forwarded_for([(b"host", b"core")]) is None
    trusted = networks(["127.0.0.1/32"])
    assert client_address("127.0.0.1", forwarded_for(headers), trusted) == "192.0.2.9"


async def test_a_second_forwarded_for_line_from_haproxy_is_believed(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    web = {"allowed_networks": ["10.0.0.0/8"], "trusted_proxies": ["127.0.0.0/8"]}
    async with running_core(core_config(tmp_path, moto.url, web=web)) as core:
        port = port_of(core.agent_url)

        def healthz(*lines: bytes) -> int:
            headers = b"".join(b"X-Forwarded-For: " + line + b"\r\n" for line in lines)
            request = b"GET /healthz HTTP/1.1\r\nHost: c\r\nConnection: close\r\n"
            return raw_request(port, request + headers + b"\r\n")[0]

        # The client forges an allowed address; HAProxy appends the address it really saw.
        assert await asyncio.to_thread(healthz, b"10.1.2.3", b"192.0.2.9") == 403
        assert await asyncio.to_thread(healthz, b"192.0.2.9", b"10.1.2.3") == 200


# ---- 5. admin TCP -----------------------------------------------------------------------------


FULL, READONLY = "full-token-0123456789", "readonly-token-0123456789"


def admin_tcp_config(tmp_path: Path, moto_url: str, **admin: Any) -> Config:
    section = {"socket": str(tmp_path / "a.sock"), "tcp_host": "127.0.0.1", "tcp_port": 0}
    return core_config(tmp_path, moto_url, admin={**section, "token": FULL, **admin})


async def test_admin_tcp_needs_a_token_for_every_route_and_the_schema(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    async with running_core(admin_tcp_config(tmp_path, moto.url)) as core:
        assert core.admin_url
        async with httpx.AsyncClient(base_url=core.admin_url, timeout=5) as http:
            for path in ("/openapi.json", "/healthz", "/metrics", "/admin/v1/status"):
                assert (await http.get(path)).status_code == 401, path
            # Without a valid token nothing else is told: not which routes exist, nor how a
            # body parses.
            wrong = {"Authorization": "Bearer not-the-token"}
            for headers in ({}, wrong):
                for path in ("/docs", "/nonexistent", "/admin/v1/vms/i-nope"):
                    assert (await http.get(path, headers=headers)).status_code == 401, path
                for body in (b"{bad", b"[1", b'{"command": []}'):
                    reply = await http.post("/admin/v1/jobs", content=body, headers=headers)
                    assert reply.status_code == 401, body
                    assert reply.json() == {"error": "unauthorized", "code": "unauthorized"}
                    assert reply.headers["www-authenticate"] == "Bearer"
            # Nor a route's body limit (1 MiB here, 32 MiB for a batch): 401 comes first.
            port = port_of(core.admin_url)
            for path in (b"/admin/v1/jobs/batch", b"/admin/v1/jobs", b"/nonexistent"):
                request = (
                    b"POST " + path + b" HTTP/1.1\r\nHost: core\r\nConnection: close\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n"
                )
                status, _ = await asyncio.to_thread(raw_request, port, request)
                assert status == 401, path
            auth = {"Authorization": f"Bearer {FULL}"}
            schema = await http.get("/openapi.json", headers=auth)
            assert schema.status_code == 200 and "/admin/v1/status" in schema.json()["paths"]
            for path in ("/docs", "/redoc"):  # off: no page
                assert (await http.get(path, headers=auth)).status_code == 404
            status = await http.get("/admin/v1/status", headers=auth)
            assert status.json()["access"] == "full"


async def test_readonly_token_reads_and_follows_events_but_cannot_change_anything(
    tmp_path: Path, moto: MotoEC2Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALIENEC2_ADMIN_READONLY_TOKEN", READONLY)
    async with running_core(admin_tcp_config(tmp_path, moto.url)) as core:
        assert core.admin_url
        auth = {"Authorization": f"Bearer {READONLY}"}
        async with httpx.AsyncClient(base_url=core.admin_url, timeout=5, headers=auth) as http:
            status = await http.get("/admin/v1/status")
            assert status.status_code == 200 and status.json()["access"] == "readonly"
            assert (await http.get("/admin/v1/events", params={"after": 0})).status_code == 200
            assert (await http.get("/admin/v1/jobs")).status_code == 200
            for path, body in (
                ("/admin/v1/pool/pause", None),
                ("/admin/v1/jobs", {"command": ["true"]}),
                ("/admin/v1/vms/drain", None),
            ):
                refused = await http.post(path, json=body)
                assert refused.status_code == 403, path
                assert refused.json()["code"] == "read_only"
        assert not core.engine.settings().paused
        assert not core.store.jobs(None, 10)
        # A job's environment may carry its secrets: read-only access sees the names only.
        [job_id] = core.service.submit([JobSpec(["true"], {"API_KEY": "s3cret"})])
        async with httpx.AsyncClient(base_url=core.admin_url, timeout=5, headers=auth) as http:
            for path in (f"/admin/v1/jobs/{job_id}", "/admin/v1/jobs", "/admin/v1/snapshot"):
                text = (await http.get(path)).text
                assert "s3cret" not in text and "API_KEY" in text, path
            shown = (await http.get(f"/admin/v1/jobs/{job_id}")).json()
            assert shown["env"] == {"API_KEY": "(hidden from read-only access)"}
        full = {"Authorization": f"Bearer {FULL}"}
        async with httpx.AsyncClient(base_url=core.admin_url, timeout=5, headers=full) as http:
            assert (await http.get(f"/admin/v1/jobs/{job_id}")).json()["env"] == {
                "API_KEY": "s3cret"
            }


async def test_admin_tcp_serves_tls_with_its_own_certificate(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    ca, cert, key = make_tls_files(tmp_path)
    config = admin_tcp_config(tmp_path, moto.url, ssl_certfile=str(cert), ssl_keyfile=str(key))
    async with running_core(config) as core:
        assert core.admin_url and core.admin_url.startswith("https://127.0.0.1:")
        tls = ssl.create_default_context(cafile=str(ca))
        async with httpx.AsyncClient(base_url=core.admin_url, verify=tls, timeout=5) as http:
            reply = await http.get("/admin/v1/status", headers={"Authorization": f"Bearer {FULL}"})
        assert reply.status_code == 200


async def test_unix_socket_status_reports_full_access(core: Core) -> None:
    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(core.admin_socket)), base_url="http://core"
    ) as admin:
        assert (await admin.get("/admin/v1/status")).json()["access"] == "full"
        assert (await admin.get("/openapi.json")).status_code == 200


def test_rate_limited_lines_of_one_kind_do_not_hide_another(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A slowloris's header timeouts must not hide that a peer reading nothing was dropped
    in the same second (the outside trial saw no write_stalled line)."""
    caplog.set_level(logging.INFO, logger="alienec2.api")
    report = RateLimitedLog(interval_s=3600)
    for _ in range(5):
        report(logging.INFO, "event=header_timeout listener=%s", "agent")
    report(logging.INFO, "event=write_stalled listener=%s", "agent")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "event=header_timeout listener=agent count=1",
        "event=write_stalled listener=agent count=1",
    ]
    report(logging.INFO, "event=header_timeout listener=%s", "agent")
    assert len(caplog.records) == 2  # still within the interval: counted, not written
