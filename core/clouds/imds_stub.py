"""A stand-in for the EC2 instance metadata service (IMDSv2) on loopback.

IMDS exists only on a VM; the sandbox's instances and the tests give agents this one instead
(their ``imds_url``). It answers what the agent asks: a session token (PUT, as IMDSv2 requires),
the instance id, and the two Spot notices, which 404 until announced, as on EC2.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPOT_ACTION = "/latest/meta-data/spot/instance-action"
REBALANCE = "/latest/meta-data/events/recommendations/rebalance"


class IMDSStub:
    """One instance's metadata service. Thread-safe; announce notices from any thread."""

    def __init__(self, instance_id: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.instance_id = instance_id
        self._tokens: set[str] = set()
        self._documents: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> IMDSStub:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> IMDSStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def announce_termination(self, action: str = "terminate", in_s: float = 120.0) -> None:
        """EC2's two-minute Spot interruption notice."""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + in_s))
        self._set(SPOT_ACTION, json.dumps({"action": action, "time": when}))

    def recommend_rebalance(self) -> None:
        """EC2's rebalance recommendation: this instance is at elevated risk."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._set(REBALANCE, json.dumps({"noticeTime": now}))

    def _set(self, path: str, document: str) -> None:
        with self._lock:
            self._documents[path] = document

    def _answer(self, path: str) -> str | None:
        if path == "/latest/meta-data/instance-id":
            return self.instance_id
        with self._lock:
            return self._documents.get(path)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                if self.path != "/latest/api/token" or not self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    self.send_error(400)
                    return
                token = secrets.token_urlsafe(16)
                with stub._lock:
                    stub._tokens.add(token)
                self._send(token)

            def do_GET(self) -> None:
                with stub._lock:
                    known = self.headers.get("X-aws-ec2-metadata-token") in stub._tokens
                if not known:
                    self.send_error(401)  # IMDSv2 only: no token, no answer
                    return
                answer = stub._answer(self.path)
                if answer is None:
                    self.send_error(404)
                else:
                    self._send(answer)

            def _send(self, text: str) -> None:
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
