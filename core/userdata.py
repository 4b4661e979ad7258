"""What a VM is told at boot: its cloud-init user data and the per-launch secret.

The secret is derived (HMAC of the launch id under a key kept in the store), not random per
call: a launch retried after a crash must send byte-identical parameters with its ClientToken,
and the agent API can verify a secret without storing one per launch. User data carries that
secret and the core's URL; never cloud credentials and never the admin token.
"""

from __future__ import annotations

import base64
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

KEY_SETTING = "launch_key"
USER_DATA_LIMIT = 16 * 1024  # EC2 refuses larger user data


def launch_key(store: Store, now: float) -> bytes:
    """The core's key for launch secrets, created once and kept with the state."""
    key = store.setting(KEY_SETTING)
    if key is None:
        key = secrets.token_hex(32)
        store.set_setting(KEY_SETTING, key, now, "launch key created")
    return bytes.fromhex(key)


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
    pilot_pause_s: float = 60.0

    def to_json(self) -> str:
        data = {
            "core_url": self.core_url,
            "launch_id": self.launch_id,
            "launch_secret": self.launch_secret,
            "heartbeat_s": self.heartbeat_s,
            "fetch_wait_s": self.fetch_wait_s,
            "ca_file": self.ca_file,
            "env": self.env,
        }
        if self.pilot_command:
            data["pilot_command"] = self.pilot_command
            data["pilot_pause_s"] = self.pilot_pause_s
        return json.dumps(data, sort_keys=True)


def agent_settings(
    core_url: str, launch_id: str, secret: str, config: ContextualisationConfig
) -> AgentSettings:
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
    )


def _asset(name: str) -> bytes:
    return resources.files("contextualisation").joinpath(name).read_bytes()


def render(settings: AgentSettings, config: ContextualisationConfig) -> str:
    """The #cloud-config for one launch. Deterministic: same inputs, same bytes."""
    agent = gzip.compress(_asset("agent.py"), mtime=0)
    template = Template(_asset(f"{config.template}.yaml").decode())
    text = template.substitute(
        settings_b64=base64.b64encode(settings.to_json().encode()).decode(),
        agent_gz_b64=base64.b64encode(agent).decode(),
        cvmfs_repositories=",".join(config.alien.cvmfs_repositories),
        cvmfs_http_proxy=config.alien.cvmfs_http_proxy,
        cvmfs_quota_mb=config.alien.cvmfs_quota_mb,
    )
    if len(text.encode()) > USER_DATA_LIMIT:
        raise ValueError(f"user data is {len(text.encode())} bytes, EC2 allows {USER_DATA_LIMIT}")
    return text


def read_agent_settings(user_data: str) -> dict[str, object]:
    """The agent settings a rendered user data carries (the sandbox runner boots from this)."""
    import yaml

    document = yaml.safe_load(user_data)
    for item in document.get("write_files", []):
        if item.get("path") == "/etc/alienec2/agent.json":
            return json.loads(base64.b64decode(item["content"]))
    raise ValueError("user data carries no /etc/alienec2/agent.json")
