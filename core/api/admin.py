"""The admin API: what the console and the CLI use to watch and steer the pool.

Served on a unix socket (mode 0600: the file system is the access control) and, optionally, on
TCP where every request needs the bearer token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.api import metrics
from core.api.errors import ApiError, install_error_handlers, unauthorized
from core.api.fields import EnvName, ProcessText
from core.api.longpoll import Changes
from core.engine import Engine
from core.model import ALIVE_STATES, Job, JobState, VMState
from core.store import Conflict, JobSpec

MAX_WAIT_S = 60.0
MAX_POOL_VMS = 1_000_000  # far beyond any quota; keeps the number a number SQLite stores


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SubmitRequest(_Body):
    command: Annotated[list[Annotated[ProcessText, Field(min_length=1)]], Field(min_length=1)]
    env: dict[EnvName, ProcessText] = {}
    wall_time_s: Annotated[float, Field(gt=0)] | None = None
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


def job_view(job: Job) -> dict[str, Any]:
    view = as_dict(job)
    began = job.started_at or job.assigned_at
    view["wait_s"] = began - job.submitted_at if began is not None else None
    return view


def status(engine: Engine, changes: Changes) -> dict[str, Any]:
    """The pool at a glance: what the console's header and `alienec2 status` show."""
    store, now = engine.store, engine.clock()
    settings = engine.settings()
    vm_counts = store.vm_counts()
    alive: dict[str, int] = {}
    for vm in store.vms(ALIVE_STATES):
        alive[vm.cloud] = alive.get(vm.cloud, 0) + 1
    clouds = []
    for cloud in engine.config.clouds:
        cloud_status = store.cloud_status(cloud.name)
        clouds.append(
            {
                "name": cloud.name,
                "priority": cloud.priority,
                "max_instances": cloud.max_instances,
                "alive": alive.get(cloud.name, 0),
                "backoff_s": max(cloud_status.backoff_until - now, 0.0),
                "last_error": cloud_status.last_error,
            }
        )
    return {
        "now": now,
        "core_id": engine.config.core_id,
        "pool": {
            "name": engine.config.pool.name,
            "min_vms": settings.min_vms,
            "max_vms": settings.max_vms,
            "paused": settings.paused,
            "vms": {str(state): n for state, n in vm_counts.items()},
        },
        "queue": {
            "kind": engine.config.queue.kind,
            "jobs": {str(state): n for state, n in store.job_counts().items()},
        },
        "clouds": clouds,
        "agents_waiting": changes.jobs.waiting,
        "last_seq": store.last_seq(),
    }


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def create_admin_app(
    engine: Engine,
    changes: Changes,
    token: str | None = None,
    readonly_token: str | None = None,
) -> FastAPI:
    """``token`` None: no authentication (the unix socket); else every request, the OpenAPI
    schema included, needs it, or ``readonly_token``, which allows reads and events only."""
    store = engine.store
    max_attempts = getattr(engine.config.queue, "max_attempts", 3)
    tokens = [(t.encode(), a) for t, a in ((token, "full"), (readonly_token, "readonly")) if t]

    async def authenticated(request: Request) -> None:
        request.state.access = "full"
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        presented = given.encode("utf-8", "surrogateescape")
        # Compare with every token, always: the time taken must not tell which one matched.
        matches = [a for t, a in tokens if hmac.compare_digest(presented, t)]
        if scheme.lower() != "bearer" or not matches:
            raise unauthorized()
        request.state.access = matches[0]
        if matches[0] == "readonly" and request.method not in READ_METHODS:
            raise ApiError(403, "this token may only read", "read_only")

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
        return Response(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/admin/v1/status")
    async def get_status(request: Request) -> dict[str, Any]:
        return {**status(engine, changes), "access": request.state.access}

    @app.get("/admin/v1/vms")
    async def list_vms(
        state: VMState | None = None, include_terminated: bool = False
    ) -> dict[str, Any]:
        if state is not None:
            vms = store.vms([state])
        elif include_terminated:
            vms = store.vms()
        else:
            vms = store.vms(ALIVE_STATES)
        return {"now": engine.clock(), "vms": [as_dict(vm) for vm in vms]}

    @app.get("/admin/v1/vms/{vm_id}")
    async def get_vm(vm_id: str) -> dict[str, Any]:
        vm = store.vm(vm_id)
        events = [as_dict(e) for e in store.events_for_vm(vm_id)]
        job = store.job(vm.job_id) if vm.job_id is not None else store.last_job_of_vm(vm_id)
        view = job_view(job) if job is not None else None
        return {"now": engine.clock(), "vm": as_dict(vm), "job": view, "events": events}

    @app.post("/admin/v1/vms/{vm_id}/drain")
    async def drain(vm_id: str) -> dict[str, Any]:
        vm = store.drain_vm(vm_id, engine.clock())
        engine.wake.set()
        return as_dict(vm)

    @app.post("/admin/v1/vms/drain")
    async def drain_all() -> dict[str, Any]:
        drained = []
        for vm in store.vms([VMState.IDLE, VMState.BUSY]):
            try:
                store.drain_vm(vm.id, engine.clock(), "drain all requested")
                drained.append(vm.id)
            except Conflict:
                continue  # it changed state meanwhile
        engine.wake.set()
        return {"drained": drained}

    @app.post("/admin/v1/vms/{vm_id}/kill")
    async def kill(vm_id: str) -> dict[str, Any]:
        vm = store.request_kill(vm_id, engine.clock())
        engine.wake.set()
        return as_dict(vm)

    @app.post("/admin/v1/pool/resize")
    async def resize(body: ResizeRequest) -> dict[str, Any]:
        try:
            settings = engine.resize(body.min_vms, body.max_vms)
        except ValueError as exc:
            raise ApiError(422, str(exc), "invalid_request") from None
        return {"min_vms": settings.min_vms, "max_vms": settings.max_vms}

    @app.post("/admin/v1/pool/pause")
    async def pause() -> dict[str, Any]:
        engine.pause(True)
        return {"paused": True}

    @app.post("/admin/v1/pool/resume")
    async def resume() -> dict[str, Any]:
        engine.pause(False)
        return {"paused": False}

    @app.get("/admin/v1/jobs")
    async def list_jobs(
        state: JobState | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 200
    ) -> dict[str, Any]:
        return {"now": engine.clock(), "jobs": [job_view(j) for j in store.jobs(state, limit)]}

    @app.get("/admin/v1/jobs/{job_id}")
    async def get_job(job_id: int) -> dict[str, Any]:
        return job_view(store.job(job_id))

    @app.post("/admin/v1/jobs", status_code=201)
    async def submit(body: SubmitRequest) -> dict[str, Any]:
        [job_id] = store.submit_jobs([spec(body)], engine.clock())
        engine.wake.set()
        return job_view(store.job(job_id))

    @app.post("/admin/v1/jobs/batch", status_code=201)
    async def submit_batch(body: SubmitBatchRequest) -> dict[str, Any]:
        ids = store.submit_jobs([spec(job) for job in body.jobs], engine.clock())
        engine.wake.set()
        return {"ids": ids}

    @app.post("/admin/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: int) -> dict[str, Any]:
        return job_view(store.cancel_job(job_id, engine.clock()))

    @app.get("/admin/v1/events")
    async def events(
        after: Annotated[int, Query(ge=0)] = 0,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> dict[str, Any]:
        """Events with seq > ``after``; waits up to ``wait`` seconds for the first one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            found = store.events_after(after, limit)
            remaining = deadline - loop.time()
            if found or remaining <= 0 or changes.closing:
                last = found[-1].seq if found else after
                return {"events": [as_dict(e) for e in found], "last_seq": last}
            await changes.events.wait(remaining)

    return app
