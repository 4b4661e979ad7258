"""User data: both templates render, pass `cloud-init schema`, and carry no credentials."""

from __future__ import annotations

import ast
import base64
import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, ContextualisationConfig, parse_config
from core.userdata import (
    USER_DATA_LIMIT,
    AgentSettings,
    agent_settings,
    installed_agent,
    launch_secret,
    read_agent_settings,
    render,
    secret_matches,
)

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ContextualisationConfig(extra_env={"SITE": "test"})
ALIEN = ContextualisationConfig(
    template="alien",
    alien={
        "pilot_command": ["/bin/bash", "-lc", "start-jobagent"],
        "cvmfs_http_proxy": "http://squid:3128",
    },
)


def settings_for(config: ContextualisationConfig) -> AgentSettings:
    return agent_settings("https://core.example.org:8470", "launch-1", "s3cret", config)


def write_files(text: str) -> dict[str, dict[str, object]]:
    document = yaml.safe_load(text)
    return {item["path"]: item for item in document["write_files"]}


@pytest.mark.parametrize("config", [BUILTIN, ALIEN], ids=["builtin", "alien"])
def test_rendered_user_data_passes_cloud_init_schema(
    config: ContextualisationConfig, tmp_path: Path
) -> None:
    cloud_init = shutil.which("cloud-init")
    if cloud_init is None:
        if os.environ.get("CI"):
            pytest.fail("cloud-init is missing: .ci/run installs Debian's cloud-init")
        pytest.skip("cloud-init not installed (apt-get install cloud-init)")
    path = tmp_path / "user-data"
    path.write_text(render(settings_for(config), config))
    result = subprocess.run(
        [cloud_init, "schema", "--config-file", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_builtin_user_data_installs_the_agent_and_its_settings() -> None:
    text = render(settings_for(BUILTIN), BUILTIN)
    assert text.startswith("#cloud-config\n")
    assert len(text.encode()) < USER_DATA_LIMIT
    files = write_files(text)
    agent = gzip.decompress(base64.b64decode(files["/opt/alienec2/agent.py"]["content"]))
    shipped = (ROOT / "contextualisation" / "agent.py").read_bytes()
    assert agent.startswith(b"#!/usr/bin/env python3\n")
    assert ast.dump(ast.parse(agent)) == ast.dump(ast.parse(installed_agent(shipped)))
    assert len(agent) < len(shipped) and b"def flush_spool" in agent
    assert files["/etc/alienec2/agent.json"]["permissions"] == "0600"
    settings = read_agent_settings(text)
    assert settings["core_url"] == "https://core.example.org:8470"
    assert settings["launch_secret"] == "s3cret"
    assert settings["env"] == {"SITE": "test"}
    assert "pilot_command" not in settings
    assert ["systemctl", "enable", "--now", "alienec2-agent.service"] in yaml.safe_load(text)[
        "runcmd"
    ]


def test_alien_user_data_sets_up_cvmfs_and_runs_the_site_pilot() -> None:
    text = render(settings_for(ALIEN), ALIEN)
    files = write_files(text)
    cvmfs = str(files["/etc/cvmfs/default.local"]["content"])
    assert "CVMFS_REPOSITORIES=alice.cern.ch,alice-ocdb.cern.ch,grid.cern.ch" in cvmfs
    assert "CVMFS_HTTP_PROXY='http://squid:3128'" in cvmfs
    assert read_agent_settings(text)["pilot_command"] == ["/bin/bash", "-lc", "start-jobagent"]
    assert ["cvmfs_config", "setup"] in yaml.safe_load(text)["runcmd"]


def test_alien_template_without_a_pilot_command_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "clouds": [{"name": "a", "image_id": "x"}],
                "contextualisation": {"template": "alien"},
            }
        )
    assert caught.value.errors == [
        "contextualisation.alien: pilot_command: required when template is 'alien' "
        "(the site's JobAgent command)"
    ]


def test_rendering_is_deterministic_so_a_retried_launch_sends_identical_parameters() -> None:
    assert render(settings_for(BUILTIN), BUILTIN) == render(settings_for(BUILTIN), BUILTIN)


def test_user_data_never_carries_credentials_or_the_admin_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    monkeypatch.setenv("ALIENEC2_ADMIN_TOKEN", "admin-token-value")
    text = render(settings_for(BUILTIN), BUILTIN)
    decoded = text + json_of(text)
    for secret in ("aws-secret-value", "admin-token-value", "AWS_SECRET", "ALIENEC2_ADMIN"):
        assert secret not in decoded


def json_of(text: str) -> str:
    return str(read_agent_settings(text))


def test_launch_secret_is_verifiable_and_specific_to_its_launch() -> None:
    key = bytes(32)
    secret = launch_secret(key, "launch-1")
    assert secret_matches(key, "launch-1", secret)
    assert not secret_matches(key, "launch-2", secret)
    assert not secret_matches(bytes([1]) * 32, "launch-1", secret)
