"""The simulated hypervisor outlives its agent: domains and their run states survive a restart."""

from __future__ import annotations

import uuid
from pathlib import Path

from app.backend.driver import Driver, write_test_node


def _params(name: str) -> dict[str, object]:
    return {"name": name, "vcpus": 1, "ram_mb": 512, "disk_gb": 1, "image": {"name": "debian-12"},
            "vnc_port": 5901}


async def test_a_restarted_agent_finds_its_domains_as_they_were(tmp_path: Path) -> None:
    first = Driver(write_test_node(tmp_path, "h", 4, 8192), instance_dir=tmp_path, image_dir=tmp_path)
    await first.open()
    running, stopped, paused, gone = (uuid.uuid4() for _ in range(4))
    for sid in (running, stopped, paused, gone):
        await first.create(sid, _params(f"vm-{sid.hex[:6]}"))
    await first.stop(stopped, {"hard": True})
    await first.suspend(paused, {})
    await first.destroy(gone, {})
    await first.persist()
    before = {d.server_id: (d.state, d.vcpus, d.ram_mb) for d in await first.domains()}
    await first.close()  # the agent dies; its node file is all that remains

    second = Driver(write_test_node(tmp_path, "h", 4, 8192), instance_dir=tmp_path, image_dir=tmp_path)
    await second.open()
    after = {d.server_id: (d.state, d.vcpus, d.ram_mb) for d in await second.domains()}
    await second.close()
    assert after == before
    assert {sid: state for sid, (state, *_) in after.items()} == {
        running: "running", stopped: "shutoff", paused: "paused"}
