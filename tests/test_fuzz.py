"""No 500 on any input: both APIs fuzzed from their own OpenAPI schemas with Schemathesis, plus
the hostile inputs that once crashed them, each of which must get a 4xx naming its field.

The core runs on its own event loop in a thread (the fuzzer's HTTP client is synchronous), with
a registered VM so that the agent routes behind the token see generated bodies too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from core.clouds.sandbox import MotoEC2Server
from core.daemon import Core
from core.userdata import read_agent_settings
from tests.conftest import core_config, ec2_client, wait_until

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
# Hypothesis examples per API and generation mode; ~60 s for the four runs on this machine.
EXAMPLES = 150


@dataclass
class LiveCore:
    core: Core
    agent_token: str
    vm_id: str
    job_id: int
    calls: int = 0
    server_errors: list[str] = field(default_factory=list)

    @property
    def admin_url(self) -> str:
        assert self.core.admin_url
        return self.core.admin_url


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, moto_session: MotoEC2Server
) -> Iterator[LiveCore]:
    moto_session.reset()
    tmp_path = tmp_path_factory.mktemp("fuzz")
    config = core_config(
        tmp_path,
        moto_session.url,
        pool={"min_vms": 1, "max_vms": 3},
        admin={
            "socket": str(tmp_path / "admin.sock"),
            "tcp_host": "127.0.0.1",
            "tcp_port": 0,
            "token": ADMIN_TOKEN,
        },
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="core", daemon=True)
    thread.start()

    def on_core(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    core = Core(config)
    on_core(core.start())
    try:
        vm_id = wait_until(lambda: on_core(_vms(core)), 30, "a launched VM")[0]
        raw = ec2_client(moto_session.url).describe_instance_attribute(
            InstanceId=vm_id, Attribute="userData"
        )
        settings_ = read_agent_settings(base64.b64decode(raw["UserData"]["Value"]).decode())
        with httpx.Client(base_url=core.agent_url, timeout=10) as http:
            token = http.post(
                "/agent/v1/register",
                json={
                    "instance_id": vm_id,
                    "launch_id": settings_["launch_id"],
                    "launch_secret": settings_["launch_secret"],
                },
            ).json()["token"]
            job = httpx.post(
                f"{core.admin_url}/admin/v1/jobs",
                json={"command": ["true"]},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ).json()
            http.post("/agent/v1/jobs/next", headers={"Authorization": f"Bearer {token}"})
        # Long polls answer at once from here on: the fuzzer must not sit out 60 s waits.
        loop.call_soon_threadsafe(core.changes.close)
        yield LiveCore(core, token, vm_id, job["id"])
    finally:
        on_core(core.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _vms(core: Core) -> list[str]:
    return [vm.id for vm in core.store.vms()]


def fuzz(live: LiveCore, schema: Any, base_url: str, headers: dict[str, str]) -> None:
    """Run both generation modes over every operation; collect 5xx answers."""
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @given(case=schema.as_strategy(mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=10)
            live.calls += 1
            if response.status_code >= 500:
                live.server_errors.append(
                    f"{response.status_code} {case.method} {case.formatted_path} "
                    f"query={case.query!r} body={case.body!r}: {response.text[:200]}"
                )

        run()


# ---- the inputs that crashed the service once, each a 4xx naming its field ----------------------

NON_ASCII_SECRET = "s\u00e9cr\u00e8t-\u2603"
LONE_SURROGATE = "\ud800"


def post_raw(url: str, path: str, text: str, headers: dict[str, str]) -> httpx.Response:
    """A JSON body as written (NaN, lone surrogate escapes), not as a client would clean it."""
    return httpx.post(
        url + path,
        content=text.encode(),
        headers={"Content-Type": "application/json", **headers},
        timeout=10,
    )


def problem(response: httpx.Response) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    return str(response.json()["error"])


def register_body(**fields: Any) -> str:
    body = {"instance_id": "i-0", "launch_id": "l-0", "launch_secret": "0" * 64, **fields}
    return json.dumps(body)


def test_non_ascii_and_surrogate_secrets_get_4xx_naming_the_field(live: LiveCore) -> None:
    for secret in (NON_ASCII_SECRET, LONE_SURROGATE, "a\u0000b"):
        reply = post_raw(
            live.core.agent_url, "/agent/v1/register", register_body(launch_secret=secret), {}
        )
        assert "launch_secret" in problem(reply)
    reply = post_raw(
        live.core.agent_url, "/agent/v1/register", register_body(launch_id=LONE_SURROGATE), {}
    )
    assert "launch_id" in problem(reply)


def test_integers_beyond_64_bits_get_4xx_naming_the_field(live: LiveCore) -> None:
    agent = {"Authorization": f"Bearer {live.agent_token}"}
    report = json.dumps({"attempt": 1, "status": "finished", "exit_code": 2**63})
    reply = post_raw(live.core.agent_url, f"/agent/v1/jobs/{live.job_id}/report", report, agent)
    assert "exit_code" in problem(reply)
    report = json.dumps({"attempt": 10**20, "status": "started"})
    reply = post_raw(live.core.agent_url, f"/agent/v1/jobs/{live.job_id}/report", report, agent)
    assert "attempt" in problem(reply)
    report = json.dumps({"attempt": 1, "status": "started"})
    reply = post_raw(live.core.agent_url, f"/agent/v1/jobs/{10**20}/report", report, agent)
    assert "job_id" in problem(reply)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    reply = httpx.get(f"{live.admin_url}/admin/v1/jobs/{10**20}", headers=admin, timeout=10)
    assert "job_id" in problem(reply)
    reply = httpx.get(f"{live.admin_url}/admin/v1/events?after={2**64}", headers=admin, timeout=10)
    assert "after" in problem(reply)
    reply = post_raw(live.admin_url, "/admin/v1/pool/resize", json.dumps({"max_vms": 2**70}), admin)
    assert "max_vms" in problem(reply)


def test_nan_and_infinity_get_4xx_naming_the_field(live: LiveCore) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for number in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = '{"command": ["true"], "wall_time_s": ' + number + "}"
        assert "wall_time_s" in problem(post_raw(live.admin_url, "/admin/v1/jobs", body, admin))
    reply = httpx.get(f"{live.admin_url}/admin/v1/events?wait=nan", headers=admin, timeout=10)
    assert "wait" in problem(reply)


def test_nul_and_lone_surrogates_in_job_fields_get_4xx_naming_the_field(live: LiveCore) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for bad in ("a\u0000b", LONE_SURROGATE):
        body = json.dumps({"command": ["echo", bad]})
        assert "command" in problem(post_raw(live.admin_url, "/admin/v1/jobs", body, admin))
        body = json.dumps({"command": ["true"], "env": {"K": bad}})
        assert "env" in problem(post_raw(live.admin_url, "/admin/v1/jobs", body, admin))
    agent = {"Authorization": f"Bearer {live.agent_token}"}
    report = json.dumps(
        {"attempt": 1, "status": "finished", "exit_code": 0, "output_tail": LONE_SURROGATE}
    )
    reply = post_raw(live.core.agent_url, f"/agent/v1/jobs/{live.job_id}/report", report, agent)
    assert "output_tail" in problem(reply)


def test_deep_nesting_gets_4xx(live: LiveCore) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    deep = "[" * 200_000 + "]" * 200_000
    body = '{"command": ["true"], "env": ' + deep + "}"
    reply = post_raw(live.admin_url, "/admin/v1/jobs", body, admin)
    assert 400 <= reply.status_code < 500
    within_the_size_limit = '{"busy": ' + "[" * 5000 + "]" * 5000 + "}"
    agent = {"Authorization": f"Bearer {live.agent_token}"}
    reply = post_raw(live.core.agent_url, "/agent/v1/heartbeat", within_the_size_limit, agent)
    # Not parsed, so no field to name: the body is the fault, and the answer says why.
    assert problem(reply) == "body: JSON nested too deeply"
    assert reply.status_code == 422
    reply = httpx.post(
        live.core.agent_url + "/agent/v1/heartbeat",
        content=b'{"busy": "\xff\xfe"}',  # not UTF-8
        headers={"Content-Type": "application/json", **agent},
        timeout=10,
    )
    assert "body" in problem(reply) and reply.status_code == 422
    too_long = '{"running": [' + "1" * 5000 + "]}"  # past Python's 4,300 digits
    reply = post_raw(live.core.agent_url, "/agent/v1/heartbeat", too_long, agent)
    assert problem(reply).startswith("body: not readable JSON (Exceeds the limit (4300 digits)")
    assert reply.status_code == 422


# ---- generated: last, as they drain, kill and resize at random ----------------------------------


def test_agent_api_answers_no_5xx_to_generated_requests(live: LiveCore) -> None:
    schema = schemathesis.openapi.from_url(f"{live.core.agent_url}/openapi.json")
    started, before = time.monotonic(), live.calls
    fuzz(live, schema, live.core.agent_url, {"Authorization": f"Bearer {live.agent_token}"})
    print(f"agent API: {live.calls - before} cases in {time.monotonic() - started:.1f} s")
    assert not live.server_errors, "\n".join(live.server_errors[:20])


def test_admin_api_answers_no_5xx_to_generated_requests(live: LiveCore) -> None:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{live.admin_url}/openapi.json", headers=auth)
    started, before = time.monotonic(), live.calls
    fuzz(live, schema, live.admin_url, auth)
    print(f"admin API: {live.calls - before} cases in {time.monotonic() - started:.1f} s")
    assert not live.server_errors, "\n".join(live.server_errors[:20])
