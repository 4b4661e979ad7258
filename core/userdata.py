"""What a VM is told at boot: its cloud-init user data and the per-launch secret.

The secret is derived (HMAC of the launch id under a key kept in the store), not random per
call: a launch retried after a crash must send byte-identical parameters with its ClientToken,
and the agent API can verify a secret without storing one per launch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from core.store import Store

KEY_SETTING = "launch_key"


def launch_key(store: Store, now: float) -> bytes:
    """The core's key for launch secrets, created once and kept with the state."""
    key = store.setting(KEY_SETTING)
    if key is None:
        key = secrets.token_hex(32)
        store.set_setting(KEY_SETTING, key, now, "launch key created")
    return bytes.fromhex(key)


def launch_secret(key: bytes, launch_id: str) -> str:
    return hmac.new(key, launch_id.encode(), hashlib.sha256).hexdigest()


def secret_matches(key: bytes, launch_id: str, presented: str) -> bool:
    return hmac.compare_digest(launch_secret(key, launch_id), presented)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """The settings file user data writes on the VM for the job agent."""

    core_url: str
    launch_id: str
    launch_secret: str
    heartbeat_s: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "core_url": self.core_url,
                "launch_id": self.launch_id,
                "launch_secret": self.launch_secret,
                "heartbeat_s": self.heartbeat_s,
            },
            sort_keys=True,
        )


def render_cloud_config(settings: AgentSettings) -> str:
    """A #cloud-config that writes the agent's settings (mode 0600) for its service to read."""
    body = settings.to_json()
    indented = "\n".join("      " + line for line in body.splitlines())
    return (
        "#cloud-config\n"
        "write_files:\n"
        "  - path: /etc/alienec2/agent.json\n"
        "    permissions: '0600'\n"
        "    content: |\n"
        f"{indented}\n"
    )
