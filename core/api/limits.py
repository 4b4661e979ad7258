"""Limits at the listener, before any request reaches a route: connections, header time, bodies.

uvicorn bounds idle keep-alive time, but not the size of a request's head on httptools, nor
the time to receive a request (encode/uvicorn#157: ``timeout_keep_alive`` is cancelled by the
first byte and never armed on a fresh connection), nor open connections
(``limit_concurrency`` answers 503 to *requests*; a connection that never sends one keeps its
file descriptor), nor requests pipelined ahead of their answers, nor a peer that reads none
of its answers. So a subclass of uvicorn's httptools protocol (llhttp parses a request in a
fraction of h11's CPU, benchmarks/README.md), ``LimitedProtocol``, adds:

- a bound on a request's head and trailers (``MAX_HEADER_BYTES``) while they arrive: llhttp
  would keep a header trickled a byte at a time for as long as the deadline below allows;
- at most ``MAX_PIPELINED`` requests waiting behind the one being answered (429, closed);
- a watch on unsent answers: a peer that takes less than ``MIN_PROGRESS`` of them in
  ``keep_alive_s`` is dropped, so a request in full, never timed out, cannot hold its slot
  for ever;
- a deadline for a complete request, armed when a connection opens and when the first byte of
  a further request arrives on a kept-alive one, disarmed once the headers and the body are
  in: a body trickled a byte at a time must not hold a connection any more than headers may
  (a large one still arriving at ``MIN_PROGRESS`` per period is given another). Between
  requests a kept-alive connection may stay idle for ``keep_alive_s`` (uvicorn's
  ``timeout_keep_alive``), longer than an agent's heartbeat period, so each agent loop keeps
  one connection instead of opening one per request;
- a per-listener cap on open connections. At the cap, a newcomer displaces a connection that
  is not busy with a request (as nginx reuses its "reusable" connections when out of them):
  first one that has waited over a second for its request to arrive, then the kept-alive one
  idle the shortest time over a second (``ConnectionLimits.to_displace`` says why); only if
  every connection is busy with a request is the newcomer refused.
  A half-open flood thus costs the flooder its own connections, not the agents their requests.

Bodies are bounded by ``RequestGate``, the one pure ASGI layer of ours ahead of the
application: Content-Length is checked before anything is read and streamed bytes are counted,
so a large body is refused at its first excess chunk (413), never buffered. The same layer
refuses callers outside the listener's networks (403): one layer per request, not two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from core.config import Config

log = logging.getLogger("alienec2.api")

KIB = 1024
MIB = 1024 * KIB
HEADER_TIMEOUT_S = 10.0
# An idle kept-alive connection is closed after this: above the agents' 30 s heartbeat period
# and their own 60 s bound on reusing an idle connection (contextualisation/agent.py,
# REUSE_IDLE_S), so an agent never sends on a connection the core is closing.
KEEP_ALIVE_S = 75.0
# A request arrives within milliseconds of its first byte; a connection idle between requests
# this long is not in the gap of a loop about to send the next (limits.to_displace).
STALE_S = 1.0
# A slow peer keeps its connection while it moves at least this much (or all that is left) in
# each keep_alive_s of its answers and each header_timeout_s of its request's body: a console
# fetching megabytes over a slow link, a large batch of jobs uploaded; not a trickle.
MIN_PROGRESS = 64 * KIB
# Requests a client may send ahead of their answers (pipelining) on one connection: llhttp
# parses every request of a read at once, and uvicorn queues each one (~2 KB) until its turn.
MAX_PIPELINED = 16
# A refused request's answer is the connection's last; a peer that does not read it has this
# long before the socket is aborted, so it cannot hold a descriptor the cap no longer counts.
CLOSE_GRACE_S = 1.0
# Largest request body per route (matched on the path; agent and admin paths are disjoint).
# A report carries an output tail of at most 64 Ki characters: 256 KiB holds it unless most
# of it is JSON-escaped non-ASCII, which is refused (413) like any other oversized body.
BODY_LIMITS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"^/agent/v1/jobs/[^/]+/report$"), 256 * KIB),
    (re.compile(r"^/agent/v1/"), 16 * KIB),
    (re.compile(r"^/admin/v1/jobs/batch$"), 32 * MIB),  # up to 10,000 jobs
    (re.compile(r"^/admin/v1/"), 1 * MIB),
)
DEFAULT_BODY_LIMIT = 16 * KIB
# A request line plus headers. The protocol applies it while a head is still incomplete, so a
# larger block arriving in one read passes it; the gate measures every request's head again.
MAX_HEADER_BYTES = 16 * KIB
HEADERS_TOO_LARGE = f"request headers larger than {MAX_HEADER_BYTES} bytes"


class RateLimitedLog:
    """One log line per ``interval_s`` at most for each message, saying how many occurrences
    it stands for: a flood must not become a flood of log lines, nor hide another kind."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(message, -float("inf")) < self.interval_s:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return
        self._last[message] = now
        count = self._suppressed.pop(message, 0) + 1
        log.log(level, message + " count=%d", *args, count)


class RateLimitedRecords(logging.Filter):
    """A log filter in the spirit of ``RateLimitedLog`` for lines we do not write: uvicorn
    logs a WARNING for every malformed request, anyone's, before any token is read. Each of
    ``messages`` passes once per ``interval_s`` at most, saying how many it stands for."""

    def __init__(self, messages: frozenset[str], interval_s: float = 1.0) -> None:
        super().__init__()
        self.messages = messages
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message not in self.messages:
            return True
        now = time.monotonic()
        if now - self._last.get(message, -float("inf")) < self.interval_s:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return False
        self._last[message] = now
        count = self._suppressed.pop(message, 0) + 1
        record.msg, record.args = message.replace("%", "%%") + " count=%d", (count,)
        return True


UVICORN_FLOOD_LINES = RateLimitedRecords(frozenset({"Invalid HTTP request received."}))


@dataclass(slots=True, eq=False)
class ConnectionLimits:
    """One listener's bounds and its live connections (shared by all its protocol objects)."""

    name: str = "api"
    max_connections: int = 1024
    header_timeout_s: float = HEADER_TIMEOUT_S
    keep_alive_s: float = KEEP_ALIVE_S
    open: set[LimitedProtocol] = field(default_factory=set)
    # The connections a newcomer may displace, oldest first (dicts keep insertion order), with
    # when they became so: those waiting for a request to arrive in full (new ones, and
    # kept-alive ones whose next request has begun) ...
    waiting: dict[LimitedProtocol, float] = field(default_factory=dict)
    # ... and kept-alive ones idle between requests.
    idle: dict[LimitedProtocol, float] = field(default_factory=dict)
    refused: int = 0
    displaced: int = 0
    timed_out: int = 0
    clock: Callable[[], float] = time.monotonic
    _log: RateLimitedLog = field(default_factory=RateLimitedLog)

    def admit(self, protocol: LimitedProtocol) -> bool:
        """Make room for a new connection if it can be had; False: refuse it."""
        if len(self.open) >= self.max_connections:
            displaced = self.to_displace(self.clock())
            if displaced is None:
                self.refused += 1
                self._log(
                    logging.WARNING,
                    "event=connection_refused listener=%s open=%d max=%d",
                    self.name,
                    len(self.open),
                    self.max_connections,
                )
                return False
            self.displaced += 1
            self._log(
                logging.WARNING,
                "event=connection_displaced listener=%s max=%d",
                self.name,
                self.max_connections,
            )
            displaced.drop()
        self.open.add(protocol)
        return True

    def to_displace(self, now: float) -> LimitedProtocol | None:
        """The connection a newcomer at the cap takes the place of, None if every one is
        busy with a request:
        - the oldest still waiting for its request after STALE_S (a request arrives in
          milliseconds: a flood, or a request trickled a byte at a time, pays with its own);
        - else the one idle between requests for the shortest time, but at least STALE_S: a
          heartbeat's connection just used is the one needed last, a period away. The longest
          idle would be the next to beat, so a fleet over the cap (an open-files limit below
          its loops) would reconnect at every beat, each displacing the next: ~350 a second
          at 10,000 agents, measured;
        - else the oldest of either."""
        for protocol, since in self.waiting.items():
            if now - since >= STALE_S:
                return protocol
            break
        for protocol, since in reversed(self.idle.items()):
            if now - since >= STALE_S:
                return protocol
        oldest = [next(iter(found.items())) for found in (self.waiting, self.idle) if found]
        return min(oldest, key=lambda item: item[1])[0] if oldest else None


UNSUPPORTED_CODING = "Transfer-Encoding other than chunked is not supported"


class Refused(Exception):
    """A request the protocol answers itself, and closes: raised in a parser callback."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request deadline, a head bound and a connection cap
    (see the module doc). The parser's callbacks say where a connection is; ``_settle`` files
    it where ``ConnectionLimits`` looks for one to displace, with the one timer that state has:
    - *waiting*, under the deadline: no request yet on a new connection, or one begun and not
      in full (its head, or its body, also after an answer that did not wait for it);
    - *idle*, under uvicorn's keep-alive timer: nothing arriving, nothing being answered;
    - *busy*, in neither: a request in full being answered. A pipelined request's head
      arriving meanwhile waits for its turn to be timed, so no deadline ends a long poll.
    A peer that reads none of its answers for ``keep_alive_s`` is dropped, whatever the state."""

    limits: ConnectionLimits  # set on the per-listener subclass made by ``protocol_for``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._deadline: asyncio.TimerHandle | None = None
        # Aborts a connection whose peer reads nothing: its answers, or a refusal's.
        self._abort_timer: asyncio.TimerHandle | None = None
        # The request being answered; uvicorn's ``cycle`` is the last one parsed.
        self._serving: RequestResponseCycle | None = None
        self._in_head = self._in_body = self._chunked = False
        # Bytes of the current request that are neither body nor part of a complete head:
        # its head while it arrives, chunk framing and trailers (llhttp keeps a header, or a
        # trailer, until it is complete, however slowly it comes).
        self._framing = 0
        self._begun = self._completed = 0  # requests begun and completed in the current read
        self._body_seen = False  # in the current read
        self._body_bytes = self._body_checked = 0  # of the current request; at the deadline
        self._unsent = 0  # bytes the peer had not taken when the write watch last looked
        self._admitted = self.limits.admit(self)
        if not self._admitted:
            # BaseTransport has no abort(); the server's transports are TCP ones, which do.
            transport.abort()  # type: ignore[attr-defined]
            return
        # uvicorn types its parameter as a TCP transport, asyncio's protocol as the base one.
        super().connection_made(transport)  # type: ignore[arg-type]
        # Paused whenever a write is not all taken by the kernel: every answer the peer is
        # not reading is watched (_watch_writes), also the last one of a closing connection.
        # Not on TLS: asyncio's TLS transport would never resume a protocol paused at 0; it
        # keeps its default (paused past 64 KiB not yet encrypted).
        if self.scheme == "http":
            self.transport.set_write_buffer_limits(high=0)
        self._settle()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._forget()
        _disconnect(self._serving)  # uvicorn tells only the last request parsed
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the parser's reason in a JSON 400, upgrades refused, the bytes that
        are not body bounded while they arrive, and no timer touched but by ``_settle``: a
        read that begins no request (blank lines, the rest of a body already answered) must
        not leave a connection without one."""
        between = not (self._in_head or self._in_body)
        self._begun = self._completed = 0
        self._body_seen = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse_upgrade()
            return
        except httptools.HttpParserError as exc:
            refusal = exc.__context__  # raised by a callback (ours, or uvicorn's parse_url)
            if not isinstance(refusal, Refused):
                reason = refusal if isinstance(refusal, httptools.HttpParserError) else exc
                refusal = Refused(400, "malformed_request", f"malformed HTTP request: {reason}")
            self.logger.warning("Invalid HTTP request received.")
            self._refuse(refusal)
            return
        if self.transport.is_closing():
            return
        if self._in_head:
            # All of this read is the head's, unless the head began after something else in
            # it (a request before it, pipelined).
            if not self._begun or (between and self._begun == 1 and not self._completed):
                self._framing += len(data)
        elif self._in_body and not (between or self._begun or self._body_seen):
            self._framing += len(data)  # within a body, no byte of it: framing or trailers
        if self._framing > MAX_HEADER_BYTES:
            self._refuse(Refused(431, "headers_too_large", HEADERS_TOO_LARGE))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun += 1
        self._in_head, self._framing = True, 0
        self._body_bytes = self._body_checked = 0
        self._settle()

    def on_headers_complete(self) -> None:
        """Rules llhttp leaves to the server: HTTP/1.x, one Host (RFC 9112 3.2) and no
        transfer coding but chunked (whose bytes would reach the app still coded), as h11
        kept them; and no more than MAX_PIPELINED requests queued behind the one answered."""
        self._in_head, self._in_body, self._framing = False, True, 0
        hosts = 0
        self._chunked = False
        for name, value in self.headers:
            if name == b"host":
                hosts += 1
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise Refused(501, "unsupported_transfer_coding", UNSUPPORTED_CODING)
                self._chunked = True
        version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise Refused(505, "http_version_not_supported", "HTTP/1.1 or HTTP/1.0 only")
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            raise Refused(400, "malformed_request", "a request needs one Host header")
        if len(self.pipeline) >= MAX_PIPELINED:
            raise Refused(
                429, "too_many_pipelined", f"more than {MAX_PIPELINED} requests ahead of answers"
            )
        super().on_headers_complete()
        # Trailers after a chunked body come as more on_header calls: into a list nobody
        # reads, as h11 dropped them. Appended to the request's headers, they would arrive
        # after the gate and the token checks had read those.
        self.headers = []

    def on_body(self, body: bytes) -> None:
        self._body_seen, self._framing = True, 0
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body = False
        self._completed += 1
        self._settle()

    def on_response_complete(self) -> None:
        """The next pipelined request starts (uvicorn), or the connection waits for one. If
        the answer did not wait for its request's chunked body, the rest of it is not read:
        the connection closes, as h11 closed it (else a route that answers without reading,
        a 404, took an endless body). The rest of a body of declared length is read, under
        the deadline: the real agent sends a poll's ``{}`` after its head, and the poll is
        often answered before it arrives."""
        unread_body = self._in_body and self._chunked and self.cycle is self._serving
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if unread_body:
            self.transport.close()
            self._busy()
            return
        self._settle()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._abort_timer is None:
            self._watch_writes()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._abort_timer is not None and not self.transport.is_closing():
            self._abort_timer.cancel()
            self._abort_timer = None
            self._settle()  # all taken: idle now, if nothing else is going on

    def drop(self) -> None:
        """Close now, freeing the slot at once (the transport reports the loss later)."""
        self._forget()
        self.transport.abort()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._serving = cycle
        super()._start_asgi_task(cycle, app)

    def _refuse_upgrade(self) -> None:
        """Nothing here speaks WebSocket or CONNECT, and llhttp parses nothing after such a
        request: its answer (the app's) is the connection's last."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
        else:
            self.transport.close()

    def _refuse(self, refusal: Refused) -> None:
        """The answer to a request the protocol refused, the connection's last. Requests
        that had started the app read a disconnect and their answers are dropped; otherwise
        they answered on a closed connection, and each such request logged two tracebacks.
        The slot is freed when the socket closes, within CLOSE_GRACE_S if the peer reads
        nothing."""
        if self.transport.is_closing():
            return
        _disconnect(self._serving)
        _disconnect(self.cycle)
        self._busy()
        body = json.dumps({"error": refusal.message, "code": refusal.code}).encode()
        self.transport.write(
            STATUS_LINE[refusal.status]
            + b"content-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % len(body) + body
        )
        self.transport.close()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self._abort_timer = self.loop.call_later(CLOSE_GRACE_S, self.transport.abort)

    def _settle(self) -> None:
        serving = self._serving is not None and not self._serving.response_complete
        serving = serving or self.flow.write_paused  # an answer not all taken yet
        receiving = self._in_head or self._in_body
        if self.cycle is None or (receiving and not serving):
            self._wait()  # a new connection, or a request arriving with nothing being answered
        elif self._in_body and self.cycle is self._serving:
            self._wait()  # the body of the request being answered
        elif not (receiving or serving):
            self._idle()
        else:
            self._busy()

    def _wait(self) -> None:
        self._unset_keepalive_if_required()
        if self in self.limits.waiting:
            return  # still oldest first: a trickled request keeps its place
        self.limits.idle.pop(self, None)
        self.limits.waiting[self] = self.limits.clock()
        if self._deadline is None:
            self._deadline = self.loop.call_later(
                self.limits.header_timeout_s, self._request_overdue
            )

    def _idle(self) -> None:
        if self not in self.limits.idle:
            self._busy()
            self.limits.idle[self] = self.limits.clock()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _busy(self) -> None:
        self._unset_keepalive_if_required()
        self.limits.waiting.pop(self, None)
        self.limits.idle.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_overdue(self) -> None:
        self._deadline = None
        if self._in_body and self._body_bytes - self._body_checked >= MIN_PROGRESS:
            self._body_checked = self._body_bytes  # a large body still coming: time it again
            self._deadline = self.loop.call_later(
                self.limits.header_timeout_s, self._request_overdue
            )
            return
        self.limits.timed_out += 1
        self.limits._log(
            logging.INFO,
            "event=header_timeout listener=%s timeout_s=%g",
            self.limits.name,
            self.limits.header_timeout_s,
        )
        self.drop()

    def _watch_writes(self) -> None:
        self._unsent = self.transport.get_write_buffer_size()
        self._abort_timer = self.loop.call_later(self.limits.keep_alive_s, self._check_writes)

    def _check_writes(self) -> None:
        """Drop a connection whose peer took less than MIN_PROGRESS (or all there was) of
        its answers in keep_alive_s: a request in full is never timed out, so a peer reading
        nothing would hold its slot, busy, and its answers in memory for as long as it liked."""
        self._abort_timer = None
        unsent = self.transport.get_write_buffer_size()
        if not unsent:
            return
        if self._unsent - unsent >= min(self._unsent, MIN_PROGRESS):
            self._watch_writes()
            return
        self.limits._log(
            logging.INFO,
            "event=write_stalled listener=%s unsent=%d after_s=%g",
            self.limits.name,
            unsent,
            self.limits.keep_alive_s,
        )
        self.drop()

    def _forget(self) -> None:
        self._busy()
        self.limits.open.discard(self)
        if self._abort_timer is not None:  # the socket is closing or closed: no abort after
            self._abort_timer.cancel()
            self._abort_timer = None


def _disconnect(cycle: RequestResponseCycle | None) -> None:
    """Tell a request still being answered that its connection is gone: the app reads a
    disconnect, and what it sends is dropped."""
    if cycle is not None and not cycle.response_complete:
        cycle.disconnected = True
        cycle.message_event.set()


def protocol_for(limits: ConnectionLimits) -> type[LimitedProtocol]:
    """A protocol class bound to one listener's limits (uvicorn instantiates it per
    connection with its own arguments, so the limits travel on the class)."""
    return type(f"LimitedProtocol_{limits.name}", (LimitedProtocol,), {"limits": limits})


# ---- bodies -----------------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes its limit. An HTTPException, so
    FastAPI's body reader lets it through and the error handlers answer 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


def body_limit(path: str) -> int:
    for pattern, limit in BODY_LIMITS:
        if pattern.match(path):
            return limit
    return DEFAULT_BODY_LIMIT


class RequestGate:
    """413 for a body over its route's limit, decided before the application reads it; 403
    for a caller ``admits`` refuses (the agent API's allowed networks), before anything runs."""

    def __init__(self, app: ASGIApp, admits: Callable[[Scope], bool] | None = None) -> None:
        self.app = app
        self.admits = admits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size, declared = _head(scope)
        if size > MAX_HEADER_BYTES:
            await _headers_too_large(send)
            return
        limit = body_limit(scope["path"])
        if declared is not None and declared > limit:
            await _too_large(limit, send)
            return
        if self.admits is not None and not self.admits(scope):
            await _forbidden(send)
            return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, bounded_receive, send)


def _head(scope: Scope) -> tuple[int, int | None]:
    """One pass over a request's head, which every request pays for: its size in bytes and
    its Content-Length (llhttp refuses a second one, and one beside Transfer-Encoding)."""
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    declared: int | None = None
    for name, value in scope["headers"]:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            with contextlib.suppress(ValueError):  # llhttp has already refused a malformed one
                declared = int(value)
    return size, declared


async def send_json(send: Send, status: int, body: bytes, close: bool = False) -> None:
    """A whole JSON response from a pure ASGI layer (``close``: the connection ends with it)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _forbidden(send: Send) -> None:
    await send_json(send, 403, b'{"error":"forbidden","code":"forbidden"}')


async def _headers_too_large(send: Send) -> None:
    body = json.dumps({"error": HEADERS_TOO_LARGE, "code": "headers_too_large"}).encode()
    await send_json(send, 431, body, close=True)


async def _too_large(limit: int, send: Send) -> None:
    body = b'{"error":"request body larger than %d bytes","code":"body_too_large"}' % limit
    await send_json(send, 413, body, close=True)


# ---- per listener and process-wide ------------------------------------------------------------


def agent_connections_wanted(config: Config, max_vms: int = 0) -> int:
    """``web.max_connections``, or one per agent loop (the heartbeat and each slot's long
    poll: each keeps its connection open) of every VM, and headroom. ``max_vms``: the bound
    in force when a resize raised it above the configured one."""
    per_vm = 1 + config.pool.slots_per_vm
    return config.web.max_connections or per_vm * max(config.pool.max_vms, max_vms) + 256


def agent_max_connections(config: Config, max_vms: int = 0) -> int:
    """The agent API's cap: the connections wanted, but no more than the open-files limit
    holds. Past that limit accept() fails (EMFILE) and asyncio stops accepting for a second,
    every newcomer waiting; at the cap a newcomer displaces an idle connection instead (a
    heartbeat's, reopened at its next beat)."""
    return min(agent_connections_wanted(config, max_vms), open_files_room(config))


def open_files_room(config: Config) -> int:
    """Connections the agent API can hold beside the admin listeners and the reserve."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return max(MIN_AGENT_CONNECTIONS, soft - OPEN_FILES_RESERVE - admin_connections(config))


def agent_limits(config: Config, max_vms: int = 0) -> ConnectionLimits:
    return ConnectionLimits(
        "agent",
        agent_max_connections(config, max_vms),
        config.web.header_timeout_s,
        config.web.keep_alive_s,
    )


def follow_pool_bounds(limits: ConnectionLimits, config: Config, max_vms: int) -> None:
    """Resize the agent listener's cap when a reload (slots, max_vms) or a resize changes how
    many loops the fleet keeps open: parked long polls cannot be displaced, so a cap sized for
    the old pool would refuse heartbeats and VMs would be declared lost."""
    cap = agent_max_connections(config, max_vms)
    if cap != limits.max_connections:
        log.info("event=connection_cap listener=agent from=%d to=%d", limits.max_connections, cap)
        limits.max_connections = cap
        warning = open_files_warning(listeners_capacity(config, max_vms))
        if warning:
            log.warning("event=open_files_limit msg=%s", warning)


def admin_limits(config: Config, name: str = "admin") -> ConnectionLimits:
    return ConnectionLimits(
        name, config.admin.max_connections, config.web.header_timeout_s, config.web.keep_alive_s
    )


def admin_connections(config: Config) -> int:
    """Connections the admin listeners (the socket, and TCP if enabled) may hold at once."""
    return config.admin.max_connections * (2 if config.admin.tcp_host else 1)


def listeners_capacity(config: Config, max_vms: int = 0) -> int:
    """Connections all listeners would hold at once, the open-files limit aside: the agent
    API, the admin socket, admin TCP."""
    return agent_connections_wanted(config, max_vms) + admin_connections(config)


OPEN_FILES_RESERVE = 128  # the store, boto3's connection pools, logs, the listeners themselves
MIN_AGENT_CONNECTIONS = 64  # the agent API's cap, however low the open-files limit
MIN_ACCEPT_BATCH, MAX_ACCEPT_BATCH = 16, 2048


def open_files_warning(connections: int) -> str | None:
    """Why ``connections`` may not fit this process's RLIMIT_NOFILE, or None if they do."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or connections + OPEN_FILES_RESERVE <= soft:
        return None
    return (
        f"listeners may hold {connections} connections but RLIMIT_NOFILE is {soft} "
        f"({OPEN_FILES_RESERVE} more are needed for the rest), so the agent API holds fewer "
        "and closes idle ones (heartbeats reconnect): raise LimitNOFILE in the systemd unit "
        "or lower web.max_connections / admin.max_connections"
    )


def accept_batch(max_connections: int) -> int:
    """The listen backlog, which asyncio also uses as the number of connections it accepts in
    one go, before any of them reaches the cap. A displaced connection's descriptor is closed
    three loop iterations after its successor was accepted, and a batch may be accepted in
    each: four batches beyond the cap must fit under RLIMIT_NOFILE, or a burst of connections
    meets EMFILE (measured: 1,100 at once against 1,024 files with the default 2,048)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_ACCEPT_BATCH
    spare = soft - OPEN_FILES_RESERVE - max_connections
    return max(MIN_ACCEPT_BATCH, min(MAX_ACCEPT_BATCH, spare // 4))


def warn_if_open_files_short(config: Config) -> None:
    """Called once at start: a cap above the descriptor limit turns a flood into EMFILE."""
    warning = open_files_warning(listeners_capacity(config))
    if warning:
        log.warning("event=open_files_limit msg=%s", warning)


_ACCEPT_EXHAUSTED = "socket.accept() out of system resource"


def throttle_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log accept failures (EMFILE, ENFILE, ENOBUFS) as one line a second, no traceback.
    asyncio already pauses the listener a second after each; it logs a traceback each time."""
    previous = loop.get_exception_handler()
    if getattr(previous, "throttles_accept_errors", False):
        return
    report = RateLimitedLog()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == _ACCEPT_EXHAUSTED:
            exc = context.get("exception")
            report(logging.ERROR, "event=accept_failed error=%s", exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    # A mark on the function, so a second install can tell it is already ours.
    handler.throttles_accept_errors = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
