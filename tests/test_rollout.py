"""Live reload (SIGHUP) and rollouts: a changed configuration is applied where it can be, and
VMs launched with old settings are replaced gradually."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from core.clouds.sandbox import SANDBOX_IMAGE, MotoEC2Server
from core.config import Config, load_config
from core.daemon import Core, build_engine
from core.engine import LAUNCH_SETTINGS
from core.model import EventKind, VMState
from core.store import Store
from tests.conftest import ManualClock, cloud, core_config, ec2_client, make_config, wait_until

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, config: Config, **changes: Any) -> Path:
    data = config.model_dump(mode="json")
    for section, values in changes.items():
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    path.write_text(yaml.safe_dump(data))
    return path


async def test_reload_applies_the_pool_live_refuses_a_broken_file_and_names_restart_sections(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url, pool={"max_vms": 3})
    path = write(tmp_path / "config.yaml", config)
    core = Core(config)
    await core.start()
    try:
        write(path, config, pool={"max_vms": 7, "idle_timeout_s": 42})
        assert core.reload(lambda: load_config(path)) == ["pool"]
        assert core.engine.config.pool.max_vms == 7
        assert core.service.bounds() == (0, 7)

        path.write_text("pool: {max_vms: -1}\n")
        assert core.reload(lambda: load_config(path)) == []
        assert core.engine.config.pool.max_vms == 7  # the one in force stays
        [refused] = [e for e in core.store.events_after(0) if "refused" in e.message]
        assert "clouds: required key is missing" in refused.message

        write(path, config, pool={"max_vms": 7, "idle_timeout_s": 42}, web={"port": 1234})
        assert core.reload(lambda: load_config(path)) == []
        assert core.engine.config.web == config.web
        [restart] = [e for e in core.store.events_after(0) if "need a restart" in e.message]
        assert "web changed but need a restart" in restart.message
    finally:
        await core.stop()


async def test_the_agent_connection_cap_follows_a_resize_and_a_reload_of_slots(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    """Parked long polls cannot be displaced: a cap sized for the pool at start would refuse
    heartbeats once a reload gives VMs more slots or a resize allows more VMs."""
    config = core_config(tmp_path, moto.url, pool={"max_vms": 10})
    path = write(tmp_path / "config.yaml", config)
    core = Core(config)
    await core.start()
    try:
        assert core.agent_limits.max_connections == 2 * 10 + 256  # heartbeat + 1 slot per VM
        core.service.resize(max_vms=100)
        assert core.agent_limits.max_connections == 2 * 100 + 256
        write(path, config, pool={"max_vms": 10, "slots_per_vm": 4})
        assert core.reload(lambda: load_config(path)) == ["pool"]
        assert core.agent_limits.max_connections == 5 * 100 + 256  # the resize still holds
        core.service.resize(max_vms=5)
        assert core.agent_limits.max_connections == 5 * 10 + 256  # never below the config's
    finally:
        await core.stop()


async def test_a_resize_holds_until_the_file_changes_the_bounds_and_then_the_file_rules(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url, pool={"max_vms": 3})
    path = write(tmp_path / "config.yaml", config)

    async def started() -> Core:
        core = Core(load_config(path))
        await core.start()
        return core

    def said(core: Core) -> list[str]:
        return [e.message for e in core.store.events_after(0) if "pool bounds" in e.message]

    core = await started()
    try:
        core.service.resize(max_vms=5)
        write(path, config, pool={"max_vms": 3, "idle_timeout_s": 42})  # the bounds unchanged
        assert core.reload(lambda: load_config(path)) == ["pool"]
        assert core.service.bounds() == (0, 5) and core.engine.settings().max_vms == 5
        write(path, config, pool={"max_vms": 6})  # the admin edits the file: the newer word
        core.reload(lambda: load_config(path))
        assert core.service.bounds() == (0, 6) and core.engine.settings().max_vms == 6
        assert said(core) == [
            "pool bounds min 0 max 6 from the configuration replace min 0 max 5 set by "
            "resize: the file changed them since"
        ]
        core.service.resize(min_vms=1, max_vms=2)
    finally:
        await core.stop()
    core = await started()  # the file as it was at the resize: the resize holds
    try:
        assert core.service.bounds() == (1, 2)
    finally:
        await core.stop()
    write(path, config, pool={"max_vms": 9})  # edited while the core was down
    core = await started()
    try:
        assert core.service.bounds() == (0, 9)
        # A resize stored before this rule (no record of the file it overrode) holds over
        # the file as it is at the next start, and is forgotten when the file changes.
        core.store.set_settings({"min_vms": 2, "max_vms": 4}, core.clock(), "an old resize")
    finally:
        await core.stop()
    core = await started()
    try:
        assert core.service.bounds() == (2, 4)
        assert said(core)[-1] == (
            "pool bounds min 2 max 4 set by resize are kept over the configuration's min 0 "
            "max 9 until the file changes them"
        )
        write(path, config, pool={"max_vms": 8})
        core.reload(lambda: load_config(path))
        assert core.service.bounds() == (0, 8)
        # An old resize the file was later made to agree with: forgotten, so that the next
        # edit of the file counts.
        core.store.set_settings({"min_vms": 0, "max_vms": 8}, core.clock(), "an old resize")
        core.reload(lambda: load_config(path))
        assert said(core)[-1] == "pool bounds min 0 max 8 follow the configuration again"
        write(path, config, pool={"max_vms": 5})
        core.reload(lambda: load_config(path))
        assert core.service.bounds() == (0, 5)
    finally:
        await core.stop()


async def test_vms_launched_with_an_old_image_are_replaced_one_at_a_time(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock
) -> None:
    config = make_config(
        tmp_path, [cloud("c", moto.url)], pool={"min_vms": 2, "max_replace_per_cycle": 1}
    )
    store = Store(config.state.path)
    engine = build_engine(config, store, clock)
    await engine.start()

    async def step() -> None:
        await engine.cycle()
        await engine.settle()
        for vm in store.vms([VMState.REQUESTED, VMState.BOOTING]):
            store.register_vm(vm.id, clock())
        store.save_heartbeats({vm.id: clock() for vm in store.vms([VMState.IDLE])})

    await step()
    old = {vm.id for vm in store.vms([VMState.IDLE])}
    assert len(old) == 2
    image = ec2_client(moto.url).create_image(Name="new-image", InstanceId=next(iter(old)))
    new_cloud = config.clouds[0].model_copy(update={"image_id": image["ImageId"]})
    engine.config = config.model_copy(update={"clouds": [new_cloud]})  # what a reload does

    draining_at_once = []
    for _ in range(8):
        clock.advance(1)
        await step()
        draining_at_once.append(len(store.vms([VMState.DRAINING])))
    serving = store.vms([VMState.IDLE, VMState.BUSY])
    assert len(serving) == 2 and not {vm.id for vm in serving} & old
    assert max(draining_at_once) <= 1
    kinds = [(e.kind, e.reason) for e in store.events_after(0) if e.vm_id in old]
    assert kinds.count((EventKind.VM_DRAINING, "outdated")) == 2
    assert image["ImageId"] != SANDBOX_IMAGE
    store.close()


def test_sighup_reloads_a_running_core_and_it_keeps_serving(
    tmp_path: Path, moto: MotoEC2Server
) -> None:
    config = core_config(tmp_path, moto.url)
    path = write(tmp_path / "config.yaml", config)
    log = tmp_path / "core.log"
    with log.open("w") as out:
        core = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "core", "--config", str(path)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        socket = Path(config.admin.socket)
        status = [sys.executable, "-m", "core.cli", "status", "--socket", str(socket)]

        def answers(command: list[str], text: str = "") -> bool:
            assert core.poll() is None, log.read_text()
            reply = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            return reply.returncode == 0 and text in reply.stdout

        wait_until(lambda: answers(status), 60, "the core answering")
        write(path, config, pool={"max_vms": 9})
        core.send_signal(signal.SIGHUP)
        events = [sys.executable, "-m", "core.cli", "events", "--socket", str(socket), "--json"]
        wait_until(
            lambda: answers(events, "configuration reloaded: pool changed"), 60, "a reload event"
        )
        assert core.poll() is None
    finally:
        core.send_signal(signal.SIGTERM)
        assert core.wait(timeout=30) == 0
    assert "Traceback" not in log.read_text()
    assert os.path.exists(path)


async def test_a_new_slots_per_vm_makes_running_vms_outdated_but_one_slot_keeps_old_ones(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock
) -> None:
    """An agent runs as many loops as its register reply said: after a reload to another
    slot count its VM is replaced, as after a new image. One slot is the fingerprint of VMs
    launched before slots existed, so upgrading replaces nothing."""
    config = make_config(tmp_path, [cloud("c", moto.url)])
    store = Store(config.state.path)
    engine = build_engine(config, store, clock)

    def fingerprint(slots: int) -> str:
        pool = config.pool.model_copy(update={"slots_per_vm": slots})
        engine.config = config.model_copy(update={"pool": pool})
        return engine.launch_fingerprint("c")

    # The fingerprint as the release before slots computed it, for the VMs it launched.
    parts = {
        "cloud": config.clouds[0].model_dump(mode="json", include=set(LAUNCH_SETTINGS)),
        "contextualisation": config.contextualisation.model_dump(mode="json"),
    }
    released = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint(1) == released
    assert len({fingerprint(1), fingerprint(2), fingerprint(4)}) == 3
    store.close()
