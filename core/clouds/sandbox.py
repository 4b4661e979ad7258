"""The sandbox cloud: moto's EC2 server on loopback, and a fault-injecting EC2 endpoint.

boto3 talks HTTP to these exactly as to AWS. ``FaultyEndpoint`` sits in front of an EC2
endpoint and can answer RunInstances with InsufficientInstanceCapacity, or forward it and hold
the answer back (to crash a core between the cloud acting and the core hearing of it). It also
counts the EC2 actions it sees, which is the cloud-side view of our API economy.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from moto.server import ThreadedMotoServer

from core.config import Config
from core.userdata import read_agent_settings

SANDBOX_REGION = "us-east-1"
SANDBOX_IMAGE = "ami-12c6146b"  # one of the AMIs moto knows
SANDBOX_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "sandbox", "AWS_SECRET_ACCESS_KEY": "sandbox"}


class MotoEC2Server:
    """moto's server on a free loopback port; someone else's EC2 implementation."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self.url = ""

    def start(self) -> MotoEC2Server:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        """Forget every resource (between tests)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def __enter__(self) -> MotoEC2Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_CAPACITY_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
    "<Code>InsufficientInstanceCapacity</Code>"
    "<Message>We currently do not have sufficient capacity in the Availability Zone you "
    "requested.</Message></Error></Errors><RequestID>sandbox-fault</RequestID></Response>"
)


class FaultyEndpoint:
    """An EC2 endpoint that forwards to ``upstream`` and injects faults on demand."""

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        self.upstream = upstream.rstrip("/")
        self.capacity_error = False
        self.hold_run_instances = False
        self.run_instances_forwarded = threading.Event()
        self.release = threading.Event()
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> FaultyEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                action = urllib.parse.parse_qs(body.decode()).get("Action", ["?"])[0]
                with endpoint._lock:
                    endpoint.calls[action] += 1
                if action == "RunInstances" and endpoint.capacity_error:
                    self._reply(500, _CAPACITY_ERROR.encode(), "text/xml")
                    return
                status, payload, content_type = endpoint._forward(self.path, body, self.headers)
                if action == "RunInstances" and endpoint.hold_run_instances:
                    endpoint.run_instances_forwarded.set()
                    endpoint.release.wait(timeout=60)
                self._reply(status, payload, content_type)

            def _reply(self, status: int, payload: bytes, content_type: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client died while we held its answer: that was the point

        return Handler

    def _forward(self, path: str, body: bytes, headers: object) -> tuple[int, bytes, str]:
        keep = {
            k: v
            for k, v in headers.items()  # type: ignore[attr-defined]
            if k.lower() not in ("host", "content-length", "connection")
        }
        request = urllib.request.Request(self.upstream + path, data=body, headers=keep)
        try:
            with urllib.request.urlopen(request, timeout=600) as reply:
                return reply.status, reply.read(), reply.headers.get("Content-Type", "text/xml")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers.get("Content-Type", "text/xml")

    def __enter__(self) -> FaultyEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sandbox_config(config: Config, endpoint_url: str) -> Config:
    """The same configuration with every cloud pointed at the sandbox endpoint.

    moto launches MinCount instances, so the sandbox asks for exact counts."""
    clouds = [
        cloud.model_copy(
            update={
                "endpoint_url": endpoint_url,
                "region": SANDBOX_REGION,
                "profile": None,
                "image_id": SANDBOX_IMAGE,
                "exact_count": True,
            }
        )
        for cloud in config.clouds
    ]
    return config.model_copy(update={"clouds": clouds})


def agent_path() -> Path:
    """The job agent script the user data installs, as shipped with this package."""
    return Path(str(resources.files("contextualisation").joinpath("agent.py")))


def prepare_agent(user_data: str, vm_id: str, workdir: Path, **overrides: Any) -> Path:
    """Write the agent settings an instance's user data carries, as cloud-init would on a VM,
    with the instance id (no IMDS here) and a private state directory; returns their path."""
    settings = read_agent_settings(user_data)
    settings.update({"instance_id": vm_id, "state_dir": str(workdir / "state")})
    settings.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "agent.json"
    path.write_text(json.dumps(settings))
    path.chmod(0o600)
    return path


def agent_command(settings_path: Path) -> list[str]:
    return [sys.executable, str(agent_path()), "--settings", str(settings_path)]
