"""Relative paths in a configuration file mean "next to this file", wherever a command runs."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import yaml

from core.clouds.sandbox import MotoEC2Server
from core.config import MAX_SOCKET_PATH_BYTES, ConfigError, load_config, parse_config
from core.demo import Demo, DemoOptions
from tests.conftest import cloud, running_core

ROOT = Path(__file__).resolve().parent.parent


def write_config(directory: Path, moto_url: str, **sections: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "core_id": "test-core",
        "clouds": [cloud("c", moto_url)],
        "pool": {"min_vms": 0, "max_vms": 0, "cycle_interval_s": 0.05},
        "web": {"host": "127.0.0.1", "port": 0},
        **sections,
    }
    path = directory / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_relative_paths_resolve_against_the_files_directory(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "etc",
        "http://127.0.0.1:1",
        state={"path": "./var/state.db"},
        admin={"socket": "run/admin.sock"},
        web={"ssl_certfile": "../tls/core.pem", "ssl_keyfile": "/abs/core.key"},
        contextualisation={"ca_file": "ca.pem"},
    )
    config = load_config(path)
    assert config.state.path == str(tmp_path / "etc/var/state.db")
    assert config.admin.socket == str(tmp_path / "etc/run/admin.sock")
    assert config.web.ssl_certfile == str(tmp_path / "tls/core.pem")
    assert config.web.ssl_keyfile == "/abs/core.key"
    assert config.contextualisation.ca_file == "ca.pem"  # a path on the VM, not here


def test_example_config_resolves_next_to_itself() -> None:
    config = load_config(ROOT / "config.example.yaml")
    assert config.state.path == str(ROOT / "alienec2-state.db")
    assert config.admin.socket == str(ROOT / "alienec2-admin.sock")


def test_a_socket_path_too_long_to_bind_names_admin_socket(tmp_path: Path) -> None:
    """bind() refuses a Unix socket path of 108 bytes or more: said when the file is read,
    not as a traceback when the core starts."""
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH_BYTES - len(str(tmp_path))))
    path = write_config(tmp_path, "http://127.0.0.1:1", admin={"socket": f"{deep.name}/a.sock"})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [line] = caught.value.errors
    assert line.startswith(f"admin.socket: {deep}/a.sock is ")
    assert f"at most {MAX_SOCKET_PATH_BYTES}" in line

    with pytest.raises(ConfigError) as caught:
        parse_config({"clouds": [cloud("c", "http://x")], "admin": {"socket": "/" + "s" * 107}})
    assert caught.value.errors[0].startswith("admin.socket: ")


async def test_a_demo_in_a_deep_workdir_puts_its_socket_in_a_short_private_directory(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / ("w" * MAX_SOCKET_PATH_BYTES)
    demo = Demo(DemoOptions(jobs=1), workdir)
    socket = demo._admin_socket()
    assert socket.name == "admin.sock" and len(str(socket)) <= MAX_SOCKET_PATH_BYTES
    assert socket.parent.stat().st_mode & 0o777 == 0o700  # private: mkdtemp's mode
    for undo in reversed(demo._cleanup):
        undo()
    assert not socket.parent.exists()


async def admin_cli(cwd: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "core.cli", *args),
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_with_config_works_from_another_directory(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    path = write_config(
        tmp_path / "site", moto.url, state={"path": "state.db"}, admin={"socket": "admin.sock"}
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, _, err = await admin_cli(elsewhere, "status", "--config", str(path))
    assert (code, err.strip()) == (
        1,
        f"error: no core listening at {tmp_path / 'site/admin.sock'}; "
        f"start one with: alienec2 core --config {path}",
    )
    async with running_core(load_config(path)):
        code, out, err = await admin_cli(elsewhere, "status", "--config", str(path))
        assert code == 0, err
        assert out.startswith("pool default: min 0 max 0")
    assert not (elsewhere / "state.db").exists()
    assert (tmp_path / "site/state.db").exists()
