"""What a VM is told at boot: its cloud-init user data and the per-launch secret.

The secret is derived (HMAC of the launch id under a key kept in the store), not random per
call: a launch retried after a crash must send byte-identical parameters with its ClientToken,
and the agent API can verify a secret without storing one per launch. User data carries that
secret and the core's URL; never cloud credentials and never the admin token.
"""

from __future__ import annotations

import ast
import base64
import functools
import gzip
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from importlib import resources
from string import Template

from core.config import ContextualisationConfig
from core.store import Store

KEY_SETTING = "launch_key"  # the first releases' single key
KEYS_SETTING = "launch_keys"
USER_DATA_LIMIT = 16 * 1024  # EC2 refuses larger user data


class LaunchKeys:
    """The keys launch secrets are derived from, kept with the state: the current one, and
    the previous one for launches made before the last rotation. A launch's secret always
    comes from the key in force when the launch was written, so a launch resumed after a
    crash sends byte-identical user data, and a VM registers only within its launch's boot
    window (the service checks that), after which the previous key is of no use."""

    def __init__(self, store: Store, now: float) -> None:
        self._store = store
        keys = store.setting(KEYS_SETTING)
        if keys is None:
            # A first release's single key has signed every launch so far: it is "current"
            # since the start of time, and rotates out at the first due rotation.
            legacy = store.setting(KEY_SETTING)
            since = 0.0 if legacy else now
            keys = {"current": legacy or secrets.token_hex(32), "since": since, "previous": None}
            store.set_setting(KEYS_SETTING, keys, now, "launch key created")
        self._keys = keys

    @property
    def rotated_at(self) -> float:
        return float(self._keys["since"])

    def for_launch(self, created_at: float | None) -> bytes:
        """The key of a launch written at ``created_at`` (None: a launch not known)."""
        if created_at is not None and created_at < self.rotated_at and self._keys["previous"]:
            return bytes.fromhex(self._keys["previous"])
        return bytes.fromhex(self._keys["current"])

    def rotate_if_due(self, now: float, every_s: float) -> bool:
        """Start a new key once the current one is ``every_s`` old (0: never)."""
        if not every_s or now - self.rotated_at < every_s:
            return False
        self._keys = {
            "current": secrets.token_hex(32),
            "since": now,
            "previous": self._keys["current"],
        }
        self._store.set_setting(KEYS_SETTING, self._keys, now, "launch key rotated")
        return True


def launch_secret(key: bytes, launch_id: str) -> str:
    return hmac.new(key, launch_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def secret_matches(key: bytes, launch_id: str, presented: str) -> bool:
    """Constant time, and for any text: compare_digest refuses non-ASCII str, so bytes."""
    expected = launch_secret(key, launch_id).encode()
    return hmac.compare_digest(expected, presented.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """The settings file user data writes on the VM (/etc/alienec2/agent.json)."""

    core_url: str
    launch_id: str
    launch_secret: str
    heartbeat_s: float
    fetch_wait_s: float = 20.0
    ca_file: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    pilot_command: list[str] | None = None
    pilot_pause_s: float = 10.0
    job_user: str = "alienec2-job"  # "" runs jobs as the agent's user (sandboxes only)
    slots: int = 1  # a fallback: the register reply's ``slots`` wins
    spot_poll_s: float = 5.0
    idle_run_s: float = 150.0
    no_job_exit_codes: list[int] = field(default_factory=list)
    alien_job_id_regex: str | None = None  # None: the agent's default

    def to_json(self) -> str:
        data: dict[str, object] = {
            "core_url": self.core_url,
            "launch_id": self.launch_id,
            "launch_secret": self.launch_secret,
            "heartbeat_s": self.heartbeat_s,
            "fetch_wait_s": self.fetch_wait_s,
            "ca_file": self.ca_file,
            "env": self.env,
            "job_user": self.job_user,
            "slots": self.slots,
            "spot_poll_s": self.spot_poll_s,
        }
        if self.pilot_command:
            data["pilot_command"] = self.pilot_command
            data["pilot_pause_s"] = self.pilot_pause_s
            data["idle_run_s"] = self.idle_run_s
            data["no_job_exit_codes"] = self.no_job_exit_codes
            data["alien_job_id_regex"] = self.alien_job_id_regex
        return json.dumps(data, sort_keys=True)


def agent_settings(
    core_url: str, launch_id: str, secret: str, config: ContextualisationConfig, slots: int = 1
) -> AgentSettings:
    """``slots`` is ``pool.slots_per_vm``: the register reply carries it too, this is the
    fallback for a core that does not send it."""
    alien = config.template == "alien"
    return AgentSettings(
        core_url=core_url,
        launch_id=launch_id,
        launch_secret=secret,
        heartbeat_s=config.agent_heartbeat_s,
        fetch_wait_s=config.fetch_wait_s,
        ca_file=config.ca_file,
        env=dict(config.extra_env),
        pilot_command=list(config.alien.pilot_command) if alien else None,
        pilot_pause_s=config.alien.pilot_pause_s,
        job_user=config.job_user,
        slots=slots,
        spot_poll_s=config.spot_poll_s,
        idle_run_s=config.alien.idle_run_s,
        no_job_exit_codes=list(config.alien.no_job_exit_codes),
        alien_job_id_regex=config.alien.job_id_regex,
    )


def _asset(name: str) -> bytes:
    return resources.files("contextualisation").joinpath(name).read_bytes()


def installed_agent(source: bytes) -> bytes:
    """The agent as user data installs it: the same program without docstrings and comments,
    so it fits EC2's 16 KiB with room to spare (about a quarter smaller once gzipped)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = node.body[1:] or [ast.Pass()]
    return b"#!/usr/bin/env python3\n" + ast.unparse(tree).encode() + b"\n"


def render(settings: AgentSettings, config: ContextualisationConfig) -> str:
    """The #cloud-config for one launch. Deterministic: same inputs, same bytes."""
    text = render_unchecked(settings, config)
    if len(text.encode()) > USER_DATA_LIMIT:
        raise ValueError(f"user data is {len(text.encode())} bytes, EC2 allows {USER_DATA_LIMIT}")
    return text


@functools.cache
def _agent_gz_b64() -> str:
    """The installed agent, gzipped and base64-encoded once per process."""
    agent = gzip.compress(installed_agent(_asset("agent.py")), mtime=0)
    return base64.b64encode(agent).decode()


def render_unchecked(settings: AgentSettings, config: ContextualisationConfig) -> str:
    """The user data text, whatever its size."""
    template = Template(_asset(f"{config.template}.yaml").decode())
    return template.substitute(
        settings_b64=base64.b64encode(settings.to_json().encode()).decode(),
        agent_gz_b64=_agent_gz_b64(),
        cvmfs_repositories=",".join(config.alien.cvmfs_repositories),
        cvmfs_http_proxy=config.alien.cvmfs_http_proxy,
        cvmfs_quota_mb=config.alien.cvmfs_quota_mb,
        job_user=settings.job_user,
    )


def read_agent_settings(user_data: str) -> dict[str, object]:
    """The agent settings a rendered user data carries (the sandbox runner boots from this)."""
    import yaml

    document = yaml.safe_load(user_data)
    for item in document.get("write_files", []):
        if item.get("path") == "/etc/alienec2/agent.json":
            return json.loads(base64.b64decode(item["content"]))
    raise ValueError("user data carries no /etc/alienec2/agent.json")
