"""The admin API client: the only code in the console (and the CLI) that speaks HTTP.

Connects over the core's unix socket by default, or to a TCP URL with a bearer token.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_SOCKET = "/run/alienec2/admin.sock"


class AdminError(Exception):
    """The core answered with an error; ``message`` is its own words."""

    def __init__(self, message: str, code: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class CoreUnreachable(Exception):
    """No answer from the core (not running, wrong socket or URL)."""


def _segment(value: str) -> str:
    """``value`` as one path segment: an id holding "/", "?" or "#" names that id (and is
    not found), never another route."""
    return quote(value, safe="")


# What a terminal acts on instead of showing: C0 and C1 controls (escape sequences that set
# the title, clear the screen, write the clipboard, move the cursor) and the bidirectional
# marks that reorder what is shown. Job output, commands and a VM's words are untrusted.
_BIDI = r"\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_UNSAFE_IN_LINE = re.compile(rf"[\x00-\x1f\x7f-\x9f{_BIDI}]")
_UNSAFE_IN_TEXT = re.compile(rf"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")  # keeps \t and \n
# Output keeps its lines and tabs; every other string is one line of a table or a message.
_TEXT_FIELDS = frozenset({"output_tail"})
# A body holding none of these (a JSON escape other than \" \\ \/, or any character but
# printable ASCII) is used as it came, without walking it: the common case, and 10,000 VMs
# in a snapshot. Whatever the encoder escapes, and however, is walked.
_MAYBE_UNSAFE = re.compile(r"\\[bfnrtu]|[^\x20-\x7e]")


def _escaped(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]  # "\x1b", "\r", "\u202e": seen, not obeyed


def shown(value: Any, key: str = "") -> Any:
    """``value`` with every string safe to print to a terminal: controls (and, outside
    ``output_tail``, newlines and tabs) written as escapes; a "\\r\\n" ending is a newline.
    Dicts and lists are changed in place: they are a reply just parsed, nobody else's."""
    if isinstance(value, str):
        if key in _TEXT_FIELDS:
            return _UNSAFE_IN_TEXT.sub(_escaped, value.replace("\r\n", "\n"))
        return value if value.isprintable() else _UNSAFE_IN_LINE.sub(_escaped, value)
    if isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, str | dict | list):
                value[index] = shown(item, key)
    elif isinstance(value, dict):
        if not all(name.isprintable() for name in value):  # a job's environment names
            # Every name written as Python would (backslashes too): no two may look alike.
            return {repr(name)[1:-1]: shown(item, name) for name, item in value.items()}
        for name, item in value.items():
            if isinstance(item, str | dict | list):
                value[name] = shown(item, name)  # the same keys: iterating stays valid
    return value


def default_socket() -> str:
    return os.environ.get("ALIENEC2_SOCKET", DEFAULT_SOCKET)


class AdminClient:
    def __init__(
        self,
        socket_path: str | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
        raw: bool = False,
    ) -> None:
        """``raw``: strings as the core sent them, for JSON output (whose encoder escapes
        controls itself); otherwise as ``shown``, safe to print or draw."""
        self.raw = raw
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url:
            self.where = url
            self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout)
        else:
            path = socket_path or default_socket()
            self.where = f"unix:{path}"
            transport = httpx.AsyncHTTPTransport(uds=path)
            self._http = httpx.AsyncClient(
                transport=transport, base_url="http://alienec2", headers=headers, timeout=timeout
            )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        try:
            reply = await self._http.request(
                method,
                path,
                json=json,
                params={k: v for k, v in (params or {}).items() if v is not None},
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except (httpx.TransportError, OSError) as exc:
            raise CoreUnreachable(f"cannot reach the core at {self.where}: {exc}") from None
        if reply.is_success:
            body = reply.json()
            return body if self.raw or not _MAYBE_UNSAFE.search(reply.text) else shown(body)
        try:
            body = reply.json()
            raise AdminError(
                shown(body.get("error", reply.text)), body.get("code", "error"), reply.status_code
            )
        except ValueError:
            raise AdminError(
                shown(reply.text or reply.reason_phrase), "error", reply.status_code
            ) from None

    # ---- reading --------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return await self._call("GET", "/admin/v1/status")

    async def decisions(self, limit: int = 20) -> dict[str, Any]:
        """The latest scaling decisions with their inputs, newest last."""
        return await self._call("GET", "/admin/v1/decisions", params={"limit": limit})

    async def vms(self, state: str | None = None) -> dict[str, Any]:
        return await self._call("GET", "/admin/v1/vms", params={"state": state})

    async def vm(self, vm_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/admin/v1/vms/{_segment(vm_id)}")

    async def jobs(
        self, state: str | None = None, limit: int = 200, kind: str | None = None
    ) -> dict[str, Any]:
        params = {"state": state, "limit": limit, "kind": kind}
        return await self._call("GET", "/admin/v1/jobs", params=params)

    async def job(self, job_id: int) -> dict[str, Any]:
        return await self._call("GET", f"/admin/v1/jobs/{job_id}")

    async def snapshot(self, jobs: int = 50) -> dict[str, Any]:
        """Status, VMs and the newest ``jobs`` jobs, consistent with event ``seq``."""
        return await self._call("GET", "/admin/v1/snapshot", params={"jobs": jobs})

    async def events(
        self, after: int = 0, wait: float = 0, limit: int = 1000, records: bool = False
    ) -> dict[str, Any]:
        """Events after a sequence number; long-polls up to ``wait`` seconds for new ones.
        ``records``: with the VMs and jobs they name, as they are now."""
        params: dict[str, Any] = {"after": after, "wait": wait, "limit": limit}
        if records:
            params["records"] = "true"
        return await self._call("GET", "/admin/v1/events", params=params, timeout=wait + 10)

    async def heartbeats(self, since: float) -> dict[str, Any]:
        """Last heartbeats received at or after ``since`` (core time), by VM id."""
        return await self._call("GET", "/admin/v1/heartbeats", params={"since": since})

    async def flow(self, minutes: int = 60) -> dict[str, Any]:
        """Job events per minute over the last ``minutes``, oldest first."""
        return await self._call("GET", "/admin/v1/flow", params={"minutes": minutes})

    # ---- steering -------------------------------------------------------------------------

    async def submit(
        self,
        command: list[str],
        env: dict[str, str] | None = None,
        wall_time_s: float | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"command": command, "env": env or {}}
        if wall_time_s is not None:
            body["wall_time_s"] = wall_time_s
        return await self._call("POST", "/admin/v1/jobs", json=body)

    async def submit_batch(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        return await self._call("POST", "/admin/v1/jobs/batch", json={"jobs": jobs})

    async def cancel(self, job_id: int) -> dict[str, Any]:
        return await self._call("POST", f"/admin/v1/jobs/{job_id}/cancel")

    async def drain(self, vm_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/admin/v1/vms/{_segment(vm_id)}/drain")

    async def drain_all(self) -> dict[str, Any]:
        return await self._call("POST", "/admin/v1/vms/drain")

    async def kill(self, vm_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/admin/v1/vms/{_segment(vm_id)}/kill")

    async def resize(
        self, min_vms: int | None = None, max_vms: int | None = None
    ) -> dict[str, Any]:
        body = {k: v for k, v in (("min_vms", min_vms), ("max_vms", max_vms)) if v is not None}
        return await self._call("POST", "/admin/v1/pool/resize", json=body)

    async def pause(self, paused: bool) -> dict[str, Any]:
        return await self._call("POST", f"/admin/v1/pool/{'pause' if paused else 'resume'}")
