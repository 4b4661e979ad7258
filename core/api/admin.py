"""The admin API: what the console and the CLI use to watch and steer the pool.

A thin router over ``PoolService``. Served on a unix socket (mode 0600: the file system is the
access control) and, optionally, on TCP where every request needs the bearer token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.types import ASGIApp, Receive, Scope, Send

from core.api import metrics
from core.api.errors import ApiError, error_body, install_error_handlers, unauthorized
from core.api.fields import EnvName, ProcessText
from core.api.longpoll import Changes
from core.model import ALIVE_STATES, VM, EventKind, Job, JobState, VMState
from core.service import Invalid, PoolService
from core.store import JobSpec

MAX_WAIT_S = 60.0
MAX_PAGE = 1000  # the most records one list request returns; page with ``before``/``after``
INT64 = 2**63 - 1
FLOW_KINDS = {
    EventKind.JOB_QUEUED: "submitted",
    EventKind.JOB_RUNNING: "started",
    EventKind.JOB_DONE: "finished",
    EventKind.JOB_FAILED: "failed",
}
MAX_POOL_VMS = 1_000_000  # far beyond any quota; keeps the number a number SQLite stores


class _Body(BaseModel):
    """Strict: a value has the JSON type it claims ("yes" is no boolean, "1" no number)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class SubmitRequest(_Body):
    command: Annotated[
        list[Annotated[ProcessText, Field(min_length=1, max_length=4096)]],
        Field(min_length=1, max_length=1024),
    ]
    env: Annotated[
        dict[EnvName, Annotated[ProcessText, Field(max_length=4096)]], Field(max_length=256)
    ] = {}
    wall_time_s: Annotated[float, Field(gt=0, le=10**9)] | None = None
    max_attempts: Annotated[int, Field(ge=1, le=100)] | None = None


class SubmitBatchRequest(_Body):
    jobs: Annotated[list[SubmitRequest], Field(min_length=1, max_length=10_000)]


class ResizeRequest(_Body):
    min_vms: Annotated[int, Field(ge=0, le=MAX_POOL_VMS)] | None = None
    max_vms: Annotated[int, Field(ge=0, le=MAX_POOL_VMS)] | None = None

    @model_validator(mode="after")
    def _something(self) -> ResizeRequest:
        if self.min_vms is None and self.max_vms is None:
            raise ValueError("give min_vms, max_vms or both")
        return self


def as_dict(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


# Whether this request may read job environments (set per request by the access check):
# a job's environment may carry its secrets, and the read-only token is for dashboards.
_environments_readable: ContextVar[bool] = ContextVar("environments_readable", default=True)
REDACTED = "(hidden from read-only access)"


def job_view(job: Job) -> dict[str, Any]:
    view = as_dict(job)
    if not _environments_readable.get():
        view["env"] = dict.fromkeys(job.env, REDACTED)
    began = job.started_at or job.assigned_at
    view["wait_s"] = began - job.submitted_at if began is not None else None
    return view


def vm_view(vm: VM, slots: int) -> dict[str, Any]:
    """A VM with its slots in use: ``jobs`` (ids, by slot), ``slots_used`` of ``slots``, and
    ``job_id`` (its lowest slot's job) for clients that show one job per VM."""
    view = as_dict(vm)
    view["jobs"] = [vm.jobs[slot] for slot in sorted(vm.jobs)]
    view["job_id"] = vm.job_id
    view["slots_used"] = len(vm.jobs)
    view["slots"] = slots
    return view


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class EngineView(Protocol):
    """What the admin API reads of the engine: its health and its recent decisions."""

    @property
    def cycles(self) -> int: ...

    @property
    def decisions(self) -> Sequence[Any]:  # policy.Decision records, oldest first
        ...

    @property
    def outdated(self) -> int:  # VMs a rollout will replace
        ...


ACCESS = "access"  # the key of the token gate's verdict in the request's state


class TokenGate:
    """401 for a request without a valid token before routing or reading its body: a caller
    without one learns nothing, not which routes exist (404 against 401) nor how its body
    parses (422). The route dependency still tells full from read-only access."""

    def __init__(self, app: ASGIApp, access_of: Callable[[bytes], str | None]) -> None:
        self.app = app
        self.access_of = access_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            access = self.access_of(authorization)
            if access is None:
                response = JSONResponse(
                    error_body("unauthorized", "unauthorized"),
                    401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
            # The verdict, for the routes (``request.state.access``): compared once.
            scope.setdefault("state", {})[ACCESS] = access
        await self.app(scope, receive, send)


def token_access(token: str | None, readonly_token: str | None) -> Callable[[bytes], str | None]:
    """The access an Authorization header grants: "full", "readonly" or None."""
    tokens = [(t.encode(), a) for t, a in ((token, "full"), (readonly_token, "readonly")) if t]

    def access_of(authorization: bytes) -> str | None:
        scheme, _, presented = authorization.partition(b" ")
        # Compare with every token, always: the time taken must not tell which one matched.
        matches = [a for t, a in tokens if hmac.compare_digest(presented, t)]
        return matches[0] if scheme.lower() == b"bearer" and matches else None

    return access_of


def token_gate(token: str | None, readonly_token: str | None) -> Callable[[ASGIApp], ASGIApp]:
    """The outermost layer of the admin API on TCP (``server.make_server(guard=)``): its 401
    comes before the request gate sizes a body by its route (1 MiB here, 32 MiB there),
    which told a caller without a token which routes exist."""
    access_of = token_access(token, readonly_token)
    return lambda app: TokenGate(app, access_of)


def create_admin_app(
    service: PoolService,
    changes: Changes,
    engine: EngineView,
    token: str | None = None,
    readonly_token: str | None = None,
) -> FastAPI:
    """``token`` None: no authentication (the unix socket); else every request, the OpenAPI
    schema included, needs it, or ``readonly_token``, which allows reads and events only.
    With a token, serve it behind ``token_gate`` (``server.make_server(guard=)``)."""
    store = service.store
    config = service.config
    max_attempts = getattr(config.queue, "max_attempts", 3)

    def slots() -> int:
        return service.config.pool.slots_per_vm  # a reload may change it

    async def authenticated(request: Request) -> None:
        if token is None:
            request.state.access = "full"
            return
        access = getattr(request.state, ACCESS, None)  # the token gate's verdict
        if access is None:
            raise unauthorized()  # served without its gate: nobody gets in
        if access == "readonly" and request.method not in READ_METHODS:
            raise ApiError(403, "this token may only read", "read_only")
        _environments_readable.set(access == "full")  # this request's context only

    app = FastAPI(
        title="alienec2 admin API",
        version="1",
        dependencies=[Depends(authenticated)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the same dependency as every route
    )
    install_error_handlers(app)

    def spec(body: SubmitRequest) -> JobSpec:
        return JobSpec(body.command, body.env, body.wall_time_s, body.max_attempts or max_attempts)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "cycles": engine.cycles}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(service), media_type="text/plain; version=0.0.4")

    def full_status(request: Request) -> dict[str, Any]:
        latest = engine.decisions[-1] if engine.decisions else None
        status = service.status()
        status["pool"]["outdated"] = engine.outdated
        return {
            **status,
            "agents_waiting": changes.jobs.waiting,
            "access": request.state.access,
            "last_decision": latest.reason if latest is not None else None,
        }

    @app.get("/admin/v1/status")
    async def get_status(request: Request) -> dict[str, Any]:
        return full_status(request)

    @app.get("/admin/v1/snapshot")
    async def snapshot(
        request: Request, jobs: Annotated[int, Query(ge=0, le=MAX_PAGE)] = 50
    ) -> dict[str, Any]:
        """Status, every VM not terminated and the newest ``jobs`` jobs, consistent with event
        ``seq``: nothing before it is missing, and a follower that applies the events after it
        (``/events?after=seq&records=true``) stays current. ``started_at`` changes when the
        core restarts (heartbeat times do not survive a restart: take a new snapshot)."""
        seq = store.last_seq()  # first: whatever the reads below see is at least this recent
        return {
            "seq": seq,
            "started_at": service.liveness.started_at,
            "status": full_status(request),
            "now": service.clock(),
            "vms": [vm_view(vm, slots()) for vm in service.vms(ALIVE_STATES)],
            "jobs": [job_view(j) for j in store.jobs(None, jobs, None, None)] if jobs else [],
        }

    @app.get("/admin/v1/heartbeats")
    async def heartbeats(
        since: Annotated[float, Query(ge=0, le=1e12, allow_inf_nan=False)] = 0,
    ) -> dict[str, Any]:
        """Last heartbeats received at or after ``since`` (a core time: pass the previous
        answer's ``now``), by VM id. Heartbeats are not events; this is the follower's delta."""
        now = service.clock()
        return {
            "now": now,
            "started_at": service.liveness.started_at,
            "heartbeats": service.heartbeats_since(since),
        }

    @app.get("/admin/v1/decisions")
    async def decisions(
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    ) -> dict[str, Any]:
        """The latest scaling decisions with their inputs (the engine keeps 1,000), newest
        last: why each launch and termination happened, with the numbers."""
        recent = list(engine.decisions)[-limit:]
        return {"now": service.clock(), "decisions": [as_dict(d) for d in recent]}

    @app.get("/admin/v1/vms")
    async def list_vms(
        state: VMState | None = None, include_terminated: bool = False
    ) -> dict[str, Any]:
        if state is not None:
            vms = service.vms([state])
        elif include_terminated:
            vms = service.vms()
        else:
            vms = service.vms(ALIVE_STATES)
        return {"now": service.clock(), "vms": [vm_view(vm, slots()) for vm in vms]}

    @app.get("/admin/v1/vms/{vm_id}")
    async def get_vm(vm_id: Annotated[str, Path(max_length=64)]) -> dict[str, Any]:
        vm = service.vm(vm_id)
        events = [as_dict(e) for e in store.events_for_vm(vm_id)]
        job = store.job(vm.job_id) if vm.job_id is not None else store.last_job_of_vm(vm_id)
        view = job_view(job) if job is not None else None
        jobs = [job_view(store.job(vm.jobs[slot])) for slot in sorted(vm.jobs)]
        return {
            "now": service.clock(),
            "vm": vm_view(vm, slots()),
            "job": view,
            "jobs": jobs,  # every job its slots hold, by slot
            "events": events,
        }

    @app.post("/admin/v1/vms/{vm_id}/drain")
    async def drain(vm_id: Annotated[str, Path(max_length=64)]) -> dict[str, Any]:
        return vm_view(service.drain(vm_id), slots())

    @app.post("/admin/v1/vms/drain")
    async def drain_all() -> dict[str, Any]:
        return {"drained": service.drain_all()}

    @app.post("/admin/v1/vms/{vm_id}/kill")
    async def kill(vm_id: Annotated[str, Path(max_length=64)]) -> dict[str, Any]:
        return vm_view(service.kill(vm_id), slots())

    @app.post("/admin/v1/pool/resize")
    async def resize(body: ResizeRequest) -> dict[str, Any]:
        try:
            low, high = service.resize(body.min_vms, body.max_vms)
        except Invalid as exc:
            raise ApiError(422, str(exc), "invalid_request") from None
        return {"min_vms": low, "max_vms": high, "warnings": service.bound_warnings(low, high)}

    @app.post("/admin/v1/pool/pause")
    async def pause() -> dict[str, Any]:
        service.pause(True)
        return {"paused": True}

    @app.post("/admin/v1/pool/resume")
    async def resume() -> dict[str, Any]:
        service.pause(False)
        return {"paused": False}

    @app.get("/admin/v1/jobs")
    async def list_jobs(
        state: JobState | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 200,
        before: Annotated[int | None, Query(ge=0, le=INT64)] = None,
        kind: Literal["job", "pilot"] | None = None,
    ) -> dict[str, Any]:
        """Newest first (``before``: an id, to page back); with ``state``, oldest first
        (``before`` then means after that id). ``kind``: only queue jobs or only pilot runs."""
        jobs = store.jobs(state, limit, before, kind)
        return {"now": service.clock(), "jobs": [job_view(j) for j in jobs]}

    @app.get("/admin/v1/jobs/{job_id}")
    async def get_job(job_id: Annotated[int, Path(ge=1, le=INT64)]) -> dict[str, Any]:
        detail = service.job_detail(job_id)
        return {
            **job_view(detail["job"]),
            "events": [as_dict(e) for e in detail["events"]],
        }

    @app.post("/admin/v1/jobs", status_code=201)
    async def submit(body: SubmitRequest) -> dict[str, Any]:
        [job_id] = service.submit([spec(body)])
        return job_view(store.job(job_id))

    @app.post("/admin/v1/jobs/batch", status_code=201)
    async def submit_batch(body: SubmitBatchRequest) -> dict[str, Any]:
        return {"ids": service.submit([spec(job) for job in body.jobs])}

    @app.post("/admin/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: Annotated[int, Path(ge=1, le=INT64)]) -> dict[str, Any]:
        return job_view(service.cancel(job_id))

    @app.get("/admin/v1/events")
    async def events(
        after: Annotated[int, Query(ge=0, le=INT64)] = 0,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
        records: bool = False,
    ) -> dict[str, Any]:
        """Events with seq > ``after``; waits up to ``wait`` seconds for the first one.
        ``first_seq`` is the oldest event kept: a follower whose ``after`` is below it missed
        pruned events and should take a fresh snapshot. ``records``: also the VMs and jobs
        the events name, as they are now (null: gone), by id, so a follower applies the
        changes without reading the fleet again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            found = store.events_after(after, limit)
            remaining = deadline - loop.time()
            if found or remaining <= 0 or changes.closing:
                last = found[-1].seq if found else after
                reply: dict[str, Any] = {
                    "events": [as_dict(e) for e in found],
                    "last_seq": last,
                    "first_seq": store.first_seq(),
                }
                if records:
                    vms, jobs = service.changed(found)
                    reply["now"] = service.clock()
                    reply["vms"] = {k: vm_view(v, slots()) if v else None for k, v in vms.items()}
                    reply["jobs"] = {str(k): job_view(j) if j else None for k, j in jobs.items()}
                return reply
            await changes.events.wait(remaining)

    @app.get("/admin/v1/flow")
    async def flow(minutes: Annotated[int, Query(ge=1, le=24 * 60)] = 60) -> dict[str, Any]:
        """Jobs submitted, started, finished and failed per minute over the last ``minutes``,
        oldest first: what the console's sparklines start from."""
        now, last_seq = service.clock(), store.last_seq()
        first = int(now // 60) - minutes + 1
        rows = {
            minute: dict.fromkeys(FLOW_KINDS.values(), 0)
            for minute in range(first, first + minutes)
        }
        for minute, kind, count in store.flow(first * 60.0, tuple(FLOW_KINDS), last_seq):
            if minute in rows:
                rows[minute][FLOW_KINDS[EventKind(kind)]] = count
        return {
            "now": now,
            "last_seq": last_seq,  # a client tailing events from here counts nothing twice
            "minutes": [{"t": minute * 60, **counts} for minute, counts in rows.items()],
        }

    return app
