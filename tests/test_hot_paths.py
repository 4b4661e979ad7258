"""Heartbeats and polls through ``HotPaths`` answer exactly as the routes do, whatever comes."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.api.agent import HotPaths, create_agent_app
from core.api.limits import RequestGate
from core.clouds.sandbox import MotoEC2Server
from core.daemon import Core
from tests.conftest import core_config, eventually, running_core, wait_for_vms
from tests.test_api import bearer, register

JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}


class Delegated:
    """Counts the requests the hot paths hand on to the routes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.count = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.count += 1
        await self.app(scope, receive, send)


def hot_paths_of(core: Core) -> HotPaths:
    layer: Any = core._servers[0].config.app  # the listener's RequestGate
    while not isinstance(layer, HotPaths):
        layer = layer.middleware_stack if hasattr(layer, "middleware_stack") else layer.app
    return layer


@pytest.fixture
async def core(tmp_path: Path, moto: MotoEC2Server) -> Any:
    async with running_core(core_config(tmp_path, moto.url, pool={"min_vms": 1})) as running:
        yield running


def requests(token: str) -> list[tuple[str, dict[str, Any], bool]]:
    """(path, httpx arguments, taken by the hot paths)."""
    auth = {"Authorization": f"Bearer {token}"}
    beat, poll = "/agent/v1/heartbeat", "/agent/v1/jobs/next"
    return [
        (beat, {"json": {"busy": False}, "headers": auth}, True),
        (beat, {"json": {"busy": False, "running": []}, "headers": auth}, True),
        (beat, {"content": b'{ "busy" : false }', "headers": {**auth, **JSON}}, True),
        (poll, {"params": {"wait": 0}, "headers": auth}, True),
        (poll, {"params": {"wait": "0.05", "slot": 0}, "headers": auth}, True),
        (poll, {"headers": auth}, True),
        # Left to the routes: what the hot paths do not take as it is.
        (beat, {"json": {"busy": False}}, False),
        (beat, {"json": {"busy": False}, "headers": {"Authorization": "Bearer nope"}}, False),
        (beat, {"json": {"busy": False}, "headers": {"Authorization": token}}, False),
        (beat, {"json": {"busy": "yes"}, "headers": auth}, False),
        (beat, {"json": {"busy": False, "extra": 1}, "headers": auth}, False),
        (beat, {"json": {"running": [0]}, "headers": auth}, False),
        (beat, {"json": {"running": [True]}, "headers": auth}, False),
        (beat, {"json": {"running": [2**63]}, "headers": auth}, False),
        (beat, {"json": {"running": list(range(1, 1026))}, "headers": auth}, False),
        (beat, {"json": None, "headers": auth}, False),
        (beat, {"json": [], "headers": auth}, False),
        (beat, {"content": b"{not json", "headers": {**auth, **JSON}}, False),
        (beat, {"content": b'{"busy": NaN}', "headers": {**auth, **JSON}}, False),
        (beat, {"content": b"\xff\xfe", "headers": {**auth, **JSON}}, False),
        (beat, {"content": b"[" * 5000 + b"]" * 5000, "headers": {**auth, **JSON}}, False),
        (beat, {"content": b"", "headers": auth}, False),
        (
            beat,
            {"content": b'{"busy": true}', "headers": {**auth, "Content-Type": "text/plain"}},
            False,
        ),
        (beat, {"json": {"busy": False}, "headers": [*auth.items(), *auth.items()]}, False),
        (poll, {"params": {"wait": 61}, "headers": auth}, False),
        (poll, {"params": {"wait": "abc"}, "headers": auth}, False),
        (poll, {"params": {"wait": "1e-2"}, "headers": auth}, False),
        (poll, {"params": {"slot": 1}, "headers": auth}, False),
        (poll, {"params": {"slot": -1}, "headers": auth}, False),
        (poll, {"params": {"slot": "00", "wait": "00"}, "headers": auth}, False),
        (poll, {"params": {"other": 1}, "headers": auth}, False),
        (poll, {"params": [("wait", 0), ("wait", 0)], "headers": auth}, False),
        (poll, {"headers": {"Authorization": "Basic x"}}, False),
    ]


async def test_hot_paths_answer_every_request_as_the_routes_do(
    core: Core, moto: MotoEC2Server
) -> None:
    [vm_id] = await wait_for_vms(core, 1)
    routes_only = create_agent_app(core.service, core.changes, 30.0, hot_paths=False)
    async with (
        httpx.AsyncClient(base_url=core.agent_url, timeout=20) as served,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=routes_only), base_url="http://core"
        ) as routes,
    ):
        token = await register(served, moto.url, vm_id)
        await served.post("/agent/v1/heartbeat", json={}, headers={"Authorization": "x"})
        hot = hot_paths_of(core)
        hot.app = delegated = Delegated(hot.app)
        for path, arguments, taken in requests(token):
            before = delegated.count
            hot_reply = await served.post(path, **arguments)
            route_reply = await routes.post(path, **arguments)
            what = f"{path} {arguments}"
            assert (hot_reply.status_code, hot_reply.json()) == (
                route_reply.status_code,
                route_reply.json(),
            ), what
            assert hot_reply.headers["content-type"] == route_reply.headers["content-type"], what
            assert (delegated.count == before) == taken, what


async def call(app: ASGIApp, headers: list[tuple[bytes, bytes]], receive: Receive) -> list[Message]:
    """One heartbeat straight through ``app`` (no socket): what it sends back."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/agent/v1/heartbeat",
        "raw_path": b"/agent/v1/heartbeat",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 9),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
        "http_version": "1.1",
        "root_path": "",
    }
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_the_token_is_judged_once_the_body_is_in_as_the_routes_do(
    core: Core, moto: MotoEC2Server
) -> None:
    """A VM drained while its heartbeat's body was on the way hears "drain", not "run"."""
    [vm_id] = await wait_for_vms(core, 1)
    async with httpx.AsyncClient(base_url=core.agent_url, timeout=20) as served:
        token = await register(served, moto.url, vm_id)
    body = b'{"busy": false}'

    async def drained_meanwhile() -> Message:
        core.service.drain(vm_id)
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    app = create_agent_app(core.service, core.changes, 30.0)
    sent = await call(app, headers, drained_meanwhile)
    assert sent[0]["status"] == 200
    assert b'"action":"drain"' in sent[1]["body"]


async def test_a_chunked_body_past_its_limit_gets_the_routes_413(
    core: Core, moto: MotoEC2Server
) -> None:
    """A chunked body carries no length to judge up front: the gate counts the chunks and
    refuses past the limit; the hot path must not turn that into a 500."""
    [vm_id] = await wait_for_vms(core, 1)
    async with httpx.AsyncClient(base_url=core.agent_url, timeout=20) as served:
        token = await register(served, moto.url, vm_id)
    chunks = [b'{"busy": false, "x": "', b"y" * 20_000, b'"}']

    async def chunked() -> Message:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    headers = [
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
        (b"transfer-encoding", b"chunked"),
    ]
    gate = RequestGate(create_agent_app(core.service, core.changes, 30.0))
    sent = await call(gate, headers, chunked)
    assert sent[0]["status"] == 413


async def test_a_newer_poll_of_a_slot_ends_the_one_parked_before_it(
    core: Core, moto: MotoEC2Server
) -> None:
    """Parked polls are busy connections, never displaced: one VM's token (a job on it) held
    300 of them, filled the agent API's cap and cut every other VM off. A slot keeps one
    parked poll; an older one is answered "no job" at once, its connection free again."""
    [vm_id] = await wait_for_vms(core, 1)
    async with (
        httpx.AsyncClient(base_url=core.agent_url, timeout=90) as first,
        httpx.AsyncClient(base_url=core.agent_url, timeout=90) as second,
    ):
        token = await register(first, moto.url, vm_id)
        poll = "/agent/v1/jobs/next?wait=60"
        parked = asyncio.ensure_future(first.post(poll, headers=bearer(token)))
        await eventually(lambda: core.changes.jobs.waiting == 1)
        newer = asyncio.ensure_future(second.post(poll, headers=bearer(token)))
        # Without the bound the first poll would end 45-60 s from now, at its deadline.
        reply = await asyncio.wait_for(parked, 30)
        assert reply.status_code == 200
        assert reply.json()["job"] is None
        await eventually(lambda: core.changes.jobs.waiting == 1)  # the newer one is parked
        job = core.store.submit_job(["true"], core.clock())
        reply = await asyncio.wait_for(newer, 30)
        assert reply.json()["job"]["id"] == job.id


@pytest.mark.parametrize("path", ["/agent/v1/heartbeat", "/agent/v1/jobs/next?wait=0"])
async def test_a_store_failure_on_a_hot_path_is_a_json_500_and_a_logged_error(
    core: Core,
    moto: MotoEC2Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """The hot paths sit in front of FastAPI's layers, so their own errors must still get
    the app's answer: a disk error while the token is looked up is a 500 saying nothing
    more, and a log line with its traceback."""
    [vm_id] = await wait_for_vms(core, 1)
    async with httpx.AsyncClient(base_url=core.agent_url, timeout=20) as served:
        token = await register(served, moto.url, vm_id)

        def failing(token: str) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(core.service, "authenticate", failing)
        reply = await served.post(path, json={"busy": False}, headers=bearer(token))
    assert reply.status_code == 500
    assert reply.json() == {"error": "internal error", "code": "internal"}
    [logged] = [r for r in caplog.records if "event=api_error" in r.getMessage()]
    assert logged.exc_info is not None
