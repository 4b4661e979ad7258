"""Credentials end: launch secrets register only within their launch's boot window, launch
keys rotate without breaking launches in flight, and a gone VM's token is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.clouds.sandbox import MotoEC2Server
from core.daemon import build_engine
from core.engine import Engine
from core.service import Forbidden, PoolService
from core.store import Store
from core.userdata import launch_secret
from tests.conftest import ManualClock, cloud, make_config


def service_of(engine: Engine) -> PoolService:
    return PoolService(
        engine.config,
        engine.store,
        engine.liveness,
        engine.clock,
        engine.wake.set,
        engine.launch_keys,
    )


async def launched(engine: Engine) -> tuple[str, str]:
    """(instance id, launch id) of a VM the engine launched this cycle."""
    await engine.cycle()
    await engine.settle()
    vm = engine.store.vms()[-1]
    return vm.id, vm.launch_id


def secret_of(engine: Engine, launch_id: str) -> str:
    launch = engine.store.launch(launch_id)
    return launch_secret(engine.launch_keys.for_launch(launch.created_at), launch_id)


async def test_a_launch_secret_no_longer_registers_once_its_boot_window_has_passed(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock
) -> None:
    config = make_config(
        tmp_path, [cloud("c", moto.url)], pool={"min_vms": 1, "boot_timeout_s": 600}
    )
    store = Store(config.state.path)
    engine = build_engine(config, store, clock)
    await engine.start()
    vm_id, launch_id = await launched(engine)
    secret = secret_of(engine, launch_id)
    clock.advance(601)
    with pytest.raises(Forbidden):
        service_of(engine).register(vm_id, launch_id, secret)
    store.close()


async def test_launch_keys_rotate_and_launches_made_before_keep_working_in_their_window(
    tmp_path: Path, moto: MotoEC2Server, clock: ManualClock
) -> None:
    config = make_config(
        tmp_path,
        [cloud("c", moto.url)],
        pool={"min_vms": 1, "boot_timeout_s": 3 * 86400},
        contextualisation={"launch_key_rotation_days": 1},
    )
    store = Store(config.state.path)
    engine = build_engine(config, store, clock)
    await engine.start()
    old_vm, old_launch = await launched(engine)
    old_secret = secret_of(engine, old_launch)
    old_user_data = engine._request(store.launch(old_launch)).user_data

    clock.advance(86400 + 1)
    store.set_settings({"min_vms": 2}, clock(), "one more VM")
    new_vm, new_launch = await launched(engine)
    assert new_launch != old_launch
    new_secret = secret_of(engine, new_launch)
    rotated = [e for e in store.events_after(0) if e.message == "launch key rotated"]
    assert len(rotated) == 1

    # A launch resumed after the rotation sends the very same user data.
    assert engine._request(store.launch(old_launch)).user_data == old_user_data
    service = service_of(engine)
    with pytest.raises(Forbidden):  # the old key does not sign new launches
        service.register(new_vm, new_launch, launch_secret(bytes.fromhex("00" * 32), new_launch))
    assert service.register(old_vm, old_launch, old_secret).vm.id == old_vm
    assert service.register(new_vm, new_launch, new_secret).vm.id == new_vm
    store.close()
