"""The simulated hypervisor outlives its agent: domains and their run states survive a restart."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from app.backend.driver import Driver, write_test_node


def _params(name: str) -> dict[str, object]:
    return {"name": name, "vcpus": 1, "ram_mb": 512, "disk_gb": 1, "image": {"name": "debian-12"}, "vnc_port": 5901}


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
        running: "running",
        stopped: "shutoff",
        paused: "paused",
    }


async def test_persists_made_together_share_a_write_and_each_returns_only_once_it_is_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs finishing together on a busy simulated host write its node file once, not once
    each; and none returns before a write that began after it was asked has saved its change
    (the agent reports a result only then)."""
    from app.backend import driver as module

    first = Driver(write_test_node(tmp_path, "h", 16, 65536), instance_dir=tmp_path, image_dir=tmp_path)
    await first.open()
    made = [uuid.uuid4() for _ in range(6)]
    for sid in made:
        await first.create(sid, _params(f"vm-{sid.hex[:6]}"))
    writes: list[str] = []
    real = module._write_atomically

    def counted(path: Path, text: str) -> None:
        writes.append(text)
        real(path, text)

    monkeypatch.setattr(module, "_write_atomically", counted)
    await first.persist(made[0])  # alone: one write
    await first.stop(made[1], {"hard": True})
    await asyncio.gather(*(first.persist(sid) for sid in made))  # six at once: the first writes, the rest share one
    assert len(writes) == 3, len(writes)
    await first.destroy(made[2], {})
    await first.persist(made[2])
    assert len(writes) == 4
    await first.close()

    second = Driver(write_test_node(tmp_path, "h", 16, 65536), instance_dir=tmp_path, image_dir=tmp_path)
    await second.open()
    found = {d.server_id: d.state for d in await second.domains()}
    await second.close()
    assert found == {sid: "shutoff" if sid == made[1] else "running" for sid in made if sid != made[2]}


async def test_a_new_domain_has_a_closed_console_and_carries_the_mark(tmp_path: Path) -> None:
    from xml.etree import ElementTree as ET

    import libvirt

    driver = Driver(write_test_node(tmp_path, "h", 4, 8192), instance_dir=tmp_path, image_dir=tmp_path)
    elsewhere = Driver(
        write_test_node(tmp_path, "g", 4, 8192), vnc_listen="192.0.2.7", instance_dir=tmp_path, image_dir=tmp_path
    )
    await driver.open()
    await elsewhere.open()
    try:
        first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await driver.create(first, _params("a"))
        await driver.create(second, _params("b"))
        await elsewhere.create(third, _params("c"))
        graphics = {}
        for d, sid in ((driver, first), (driver, second), (elsewhere, third)):
            assert d.conn is not None
            xml = d.conn.lookupByUUIDString(str(sid)).XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
            graphics[sid] = ET.fromstring(xml).find("./devices/graphics[@type='vnc']")
        assert graphics[first].get("listen") == graphics[second].get("listen") == "127.0.0.1"  # type: ignore[union-attr]
        assert graphics[third].get("listen") == "192.0.2.7"  # type: ignore[union-attr]
        passwords = [g.get("passwd") for g in graphics.values()]  # type: ignore[union-attr]
        assert all(p and len(p) == 8 for p in passwords) and len(set(passwords)) == 3
        # Nephos's domains carry its mark; one defined by hand does not, until adopted and marked.
        assert driver.conn is not None
        stranger = uuid.uuid4()
        driver.conn.defineXML(
            f"<domain type='test'><name>ops</name><uuid>{stranger}</uuid>"
            "<memory unit='MiB'>64</memory><os><type arch='i686'>hvm</type></os></domain>"
        )
        seen = {d.server_id: (d.name, d.owned) for d in await driver.domains()}
        assert seen[first] == (f"nephos-{first}", True) and seen[stranger] == ("ops", False)
        await driver.mark(stranger, {})
        assert {d.server_id: d.owned for d in await driver.domains()}[stranger] is True
    finally:
        await driver.close()
        await elsewhere.close()


async def test_an_agent_on_a_real_hypervisor_never_fakes_a_migration() -> None:
    """Without the target's migration URI, a qemu agent refuses the job with a clear error; it
    never exports the definition and boots it cold on the target (the test driver's way)."""
    import libvirt
    import pytest

    from app.backend.agent import Agent
    from app.bus.memory import MemoryBus
    from app.messages import JobMessage

    agent = Agent(host="h1", zone="z", driver=Driver("qemu:///system"), bus=MemoryBus())
    job = JobMessage(
        job_id=uuid.uuid4(), server_id=uuid.uuid4(), action="live_migrate", host="h1", params={"target_host": "h2"}
    )
    with pytest.raises(libvirt.libvirtError, match="no migration URI for host h2"):
        await agent._migrate(job)
    assert agent.driver.hypervisor == "qemu" and Driver("test:///default").hypervisor == "test"


async def test_a_nic_gets_its_network_and_reservation_and_a_destroy_gives_it_back(tmp_path: Path) -> None:
    """The network is made (isolated, marked) on first use, each NIC's MAC reserved its address;
    both survive an agent restart; a destroy removes the reservation, not the network."""
    from xml.etree import ElementTree as ET

    net_id = uuid.uuid4()
    nic = {
        "network_id": str(net_id),
        "network": "default",
        "bridge": "nph" + net_id.hex[:12],
        "cidr": "10.128.0.0/24",
        "gateway": "10.128.0.1",
    }
    driver = Driver(write_test_node(tmp_path, "h", 4, 8192), instance_dir=tmp_path, image_dir=tmp_path)
    await driver.open()
    a, b = uuid.uuid4(), uuid.uuid4()
    await driver.create(a, {**_params("a"), "nics": [{**nic, "ip": "10.128.0.2", "mac": "52:00:00:00:00:0a"}]})
    await driver.create(b, {**_params("b"), "nics": [{**nic, "ip": "10.128.0.3", "mac": "52:00:00:00:00:0b"}]})
    await driver.create(b, {**_params("b"), "nics": [{**nic, "ip": "10.128.0.3", "mac": "52:00:00:00:00:0b"}]})
    await driver.persist()
    await driver.close()

    again = Driver(write_test_node(tmp_path, "h", 4, 8192), instance_dir=tmp_path, image_dir=tmp_path)
    await again.open()
    assert again.conn is not None
    net = again.conn.networkLookupByName(f"nephos-{net_id}")
    root = ET.fromstring(net.XMLDesc(0))
    assert root.find("forward") is None  # isolated
    assert {(h.get("mac"), h.get("ip")) for h in root.findall("./ip/dhcp/host")} == {
        ("52:00:00:00:00:0a", "10.128.0.2"),
        ("52:00:00:00:00:0b", "10.128.0.3"),
    }
    iface = ET.fromstring(again.conn.lookupByUUIDString(str(a)).XMLDesc(0)).find("./devices/interface")
    assert iface is not None and iface.find("mac").get("address") == "52:00:00:00:00:0a"  # type: ignore[union-attr]
    await again.destroy(a, {})
    hosts = ET.fromstring(net.XMLDesc(0)).findall("./ip/dhcp/host")
    assert [(h.get("mac"), h.get("ip")) for h in hosts] == [("52:00:00:00:00:0b", "10.128.0.3")]
    await again.close()


def test_nat_rules_are_exactly_the_mappings_and_only_the_vms_own(tmp_path: Path) -> None:
    """A real host's NAT for public IPs (iptables, Nephos's own chains: DNAT, SNAT and the
    FORWARD accept): applying a VM's mappings twice leaves one copy, a new set replaces the old,
    another VM's rules stay, an empty set removes the VM's, and the FORWARD chain is put back
    first when something was inserted before it (which stays). Addresses are TEST-NET ones;
    nothing is sent."""
    import shutil
    import subprocess

    import pytest

    from app.backend.driver import DNAT_CHAIN, FWD_CHAIN, SNAT_CHAIN, nat_apply

    if shutil.which("iptables") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("iptables (root) is needed: the hypervisor tier's hosts have it")
        pytest.skip("iptables as root is needed")

    def rules(server_id: uuid.UUID) -> list[str]:
        out = []
        for table, chain in (("nat", DNAT_CHAIN), ("nat", SNAT_CHAIN), ("filter", FWD_CHAIN)):
            listed = subprocess.run(["iptables", "-w", "-t", table, "-S", chain], capture_output=True, text=True)
            out += [line for line in listed.stdout.splitlines() if f"nephos:{server_id}" in line]
        return out

    def forward() -> list[str]:
        return subprocess.run(["iptables", "-w", "-S", "FORWARD"], capture_output=True, text=True).stdout.splitlines()

    tag = f"not-nephos-{uuid.uuid4()}"
    foreign = ["FORWARD", "-s", "192.0.2.99/32", "-m", "comment", "--comment", tag, "-j", "RETURN"]
    one, two = uuid.uuid4(), uuid.uuid4()
    try:
        nat_apply(one, [{"public": "192.0.2.10", "private": "10.231.9.2"}])
        nat_apply(one, [{"public": "192.0.2.10", "private": "10.231.9.2"}])
        nat_apply(two, [{"public": "192.0.2.11", "private": "10.231.9.3"}])
        assert len(rules(one)) == 3 and any("--to-destination 10.231.9.2" in r for r in rules(one))
        assert any("-d 10.231.9.2/32" in r and "DNAT" in r and "ACCEPT" in r for r in rules(one))
        nat_apply(one, [{"public": "192.0.2.12", "private": "10.231.9.2"}])
        assert len(rules(one)) == 3 and any("192.0.2.12" in r for r in rules(one))
        assert not any("192.0.2.10" in r for r in rules(one))
        assert len(rules(two)) == 3
        assert forward()[1] == f"-A FORWARD -j {FWD_CHAIN}"
        subprocess.run(["iptables", "-w", "-I", *foreign[:1], "1", *foreign[1:]], check=True)
        nat_apply(two, [{"public": "192.0.2.11", "private": "10.231.9.3"}])
        assert forward()[1] == f"-A FORWARD -j {FWD_CHAIN}"
        assert sum(line == f"-A FORWARD -j {FWD_CHAIN}" for line in forward()) == 1
        assert any(tag in line for line in forward())
    finally:
        subprocess.run(["iptables", "-w", "-D", *foreign], check=False)
        nat_apply(one, [])
        nat_apply(two, [])
    assert rules(one) == [] and rules(two) == []


async def test_a_write_for_one_domain_keeps_the_others_as_read_and_rereads_those_touched(tmp_path: Path) -> None:
    """After the first write, a write for one domain reads only that one again, with those
    ``touched`` since (the agent's lifecycle events: a change made outside a job); the others
    are kept as the last write read them."""
    first = Driver(write_test_node(tmp_path, "h", 8, 16384), instance_dir=tmp_path, image_dir=tmp_path)
    await first.open()
    assert first.conn is not None
    a, b, c = (uuid.uuid4() for _ in range(3))
    for sid in (a, b, c):
        await first.create(sid, _params(f"vm-{sid.hex[:6]}"))
    await first.persist(a)  # the first write reads every domain
    first.conn.lookupByUUIDString(str(b)).destroy()  # outside a job, and said
    first.touched(b)
    first.conn.lookupByUUIDString(str(c)).destroy()  # outside a job, unsaid: kept as last read
    await first.persist(a)
    await first.close()

    second = Driver(write_test_node(tmp_path, "h", 8, 16384), instance_dir=tmp_path, image_dir=tmp_path)
    await second.open()
    found = {d.server_id: d.state for d in await second.domains()}
    await second.close()
    assert found == {a: "running", b: "shutoff", c: "running"}
