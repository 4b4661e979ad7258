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


def test_launch_secret_is_verifiable_and_specific_to_its_launch() -> None:
    key = bytes(32)
    secret = launch_secret(key, "launch-1")
    assert secret_matches(key, "launch-1", secret)
    assert not secret_matches(key, "launch-2", secret)
    assert not secret_matches(bytes([1]) * 32, "launch-1", secret)


def test_settings_carry_the_job_user_slots_spot_watch_and_pilot_accounting() -> None:
    builtin = read_agent_settings(render(settings_for(BUILTIN), BUILTIN))
    assert (builtin["job_user"], builtin["slots"], builtin["spot_poll_s"]) == (
        "alienec2-job",
        1,
        5.0,
    )
    assert "idle_run_s" not in builtin
    config = ContextualisationConfig(
        template="alien",
        job_user="grid",
        spot_poll_s=0,
        alien={"pilot_command": ["ja"], "idle_run_s": 90, "no_job_exit_codes": [3]},
    )
    settings = agent_settings("https://core:8470", "launch-1", "s", config, slots=4)
    alien = read_agent_settings(render(settings, config))
    assert (alien["job_user"], alien["slots"], alien["spot_poll_s"]) == ("grid", 4, 0)
    assert (alien["idle_run_s"], alien["no_job_exit_codes"]) == (90, [3])
    assert alien["alien_job_id_regex"] == config.alien.job_id_regex


@pytest.mark.parametrize("config", [BUILTIN, ALIEN], ids=["builtin", "alien"])
def test_templates_create_the_job_user_and_keep_the_agent_state_root_only(
    config: ContextualisationConfig,
) -> None:
    files = write_files(render(settings_for(config), config))
    script = str(files["/opt/alienec2/job-user.sh"]["content"])
    assert "user='alienec2-job'" in script and "useradd --system" in script
    unit = str(files["/etc/systemd/system/alienec2-agent.service"]["content"])
    assert "ExecStartPre=/opt/alienec2/job-user.sh" in unit
    assert "StateDirectoryMode=0700" in unit


def test_job_user_script_does_nothing_when_jobs_run_as_the_agent_user() -> None:
    config = ContextualisationConfig(job_user="")
    files = write_files(render(settings_for(config), config))
    script = str(files["/opt/alienec2/job-user.sh"]["content"])
    result = subprocess.run(
        ["/bin/sh", "-c", script], env={"PATH": "/nonexistent"}, capture_output=True, timeout=30
    )
    assert result.returncode == 0 and result.stderr == b""


def test_user_data_leaves_headroom_under_the_ec2_limit() -> None:
    sizes = {c.template: len(render(settings_for(c), c).encode()) for c in (BUILTIN, ALIEN)}
    print(f"\nuser data bytes: {sizes} of {USER_DATA_LIMIT}")
    assert max(sizes.values()) < USER_DATA_LIMIT - 2048


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"job_user": "Root User"}, "contextualisation.job_user"),
        ({"alien": {"job_id_regex": "(unclosed"}}, "contextualisation.alien.job_id_regex"),
        ({"spot_poll_s": -1}, "contextualisation.spot_poll_s"),
    ],
)
def test_bad_agent_settings_are_config_errors_naming_their_key(
    section: dict[str, object], error: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"clouds": [{"name": "a", "image_id": "x"}], "contextualisation": section})
    assert any(message.startswith(error) for message in caught.value.errors), caught.value.errors
