"""`alienec2 core --config FILE --sandbox` runs jobs: its instances boot as local agents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent


def alienec2(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def processes_under(path: Path) -> list[str]:
    """Processes whose command line or working directory is inside ``path``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and (str(path) in args or cwd.startswith(str(path))):
            found.append(f"{proc.name}: {args}")
    return found


def example_config(directory: Path, **changes: object) -> Path:
    """config.example.yaml as shipped, moved to a free port and short timers."""
    data = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    data["web"]["port"] = 0
    data["pool"].update(min_vms=1, max_vms=2, cycle_interval_s=0.5)  # min 1: an agent stays
    data["contextualisation"]["agent_heartbeat_s"] = 1
    for section, values in changes.items():
        data[section].update(values)  # type: ignore[call-overload]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sandbox_core_boots_agents_and_runs_a_submitted_job(tmp_path: Path) -> None:
    config = example_config(tmp_path / "site")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    core = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "core", "--config", str(config), "--sandbox"],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        socket = tmp_path / "site/alienec2-admin.sock"

        def answers() -> bool:
            assert core.poll() is None, core.communicate()[1]
            return alienec2("status", "--config", str(config)).returncode == 0

        wait_until(answers, 60, "the core answering on its socket")
        assert socket.exists()
        submitted = alienec2("submit", "--config", str(config), "--", "echo", "hi")
        assert (submitted.returncode, submitted.stdout.strip()) == (0, "submitted job 1")

        def finished() -> dict[str, Any] | None:
            job = json.loads(alienec2("job", "1", "--json", "--socket", str(socket)).stdout)
            return job if job["state"] in ("done", "failed") else None

        job = wait_until(finished, 90, "job 1 finishing")
        assert (job["state"], job["exit_code"], job["output_tail"].strip()) == ("done", 0, "hi")
        assert processes_under(scratch), "the instance's agent runs under the sandbox directory"
    finally:
        core.send_signal(signal.SIGTERM)
        _, err = core.communicate(timeout=60)
    assert core.returncode == 0, err
    assert "Traceback" not in err
    assert processes_under(scratch) == []
    assert list(scratch.iterdir()) == []


def test_sandbox_core_refuses_the_alien_template_saying_why(tmp_path: Path) -> None:
    config = example_config(
        tmp_path,
        contextualisation={"template": "alien", "alien": {"pilot_command": ["/bin/true"]}},
    )
    result = alienec2("core", "--config", str(config), "--sandbox")
    assert result.returncode == 2
    assert result.stderr.startswith("error: contextualisation.template: --sandbox boots")
    assert "Traceback" not in result.stderr
