"""A whole cloud in this test's process -- api, dispatcher, two agents -- so the test can reach
an agent's libvirt connection and the results queue directly. Runs on both transports:
SQLite + the in-memory bus, and PostgreSQL + RabbitMQ."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.messages import JobStatus, StateChange, encode
from tests.api.helpers import expected_usage
from tests.e2e.inprocess import ADMIN, Cloud, inprocess_cloud


@pytest.fixture(params=["embedded", "production"])
async def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cloud]:
    async with inprocess_cloud(request, tmp_path) as c:
        yield c


async def test_a_domain_stopped_behind_our_back(cloud: Cloud) -> None:
    vm = await cloud.started_vm()
    assert {k: v["usage"] for k, v in (await cloud.quotas()).items()} == expected_usage("STARTED")
    agent = next(a for a in cloud.plane.agents if a.host == vm["host"])
    assert agent.driver.conn is not None
    # An operator on the host (or the guest itself) powers it off; nobody asks Nephos.
    agent.driver.conn.lookupByUUIDString(vm["id"]).destroy()

    async def stopped() -> bool:
        return (await cloud.server(vm["id"]))["operstate"] == "STOPPED"

    await cloud.until("the database to follow the host", stopped)
    q = await cloud.quotas()
    assert {k: v["usage"] for k, v in q.items()} == expected_usage("STOPPED")
    assert all(v["pending"] == 0 for v in q.values())
    events = (await cloud.client.get(f"/api/v1/servers/{vm['id']}/events", headers=ADMIN)).json()["items"]
    assert events[-1]["kind"] == "out_of_band" and events[-1]["operstate_to"] == "STOPPED"


async def test_duplicates_reordering_and_garbage_on_the_results_queue(cloud: Cloud) -> None:
    vm = await cloud.started_vm()
    sid = uuid.UUID(vm["id"])
    r = await cloud.client.post(f"/api/v1/servers/{vm['id']}/actions", headers=ADMIN, json={"action": "stop"})
    job_id = uuid.UUID(r.json()["job_id"])

    async def stopped() -> bool:
        s = await cloud.server(vm["id"])
        return bool(s["operstate"] == "STOPPED" and s["task"] is None)

    await cloud.until("STOPPED", stopped)
    bus = cloud.plane.bus
    dispatcher = cloud.plane.dispatcher
    assert dispatcher is not None
    old = time.time_ns() - 10**12
    # The same result again, a "running" that is older than what was applied, and garbage.
    await bus.publish_result(
        encode(
            JobStatus(job_id=job_id, server_id=sid, host=vm["host"], status="SUCCESS", domain_state="shutoff", seq=old)
        )
    )
    await bus.publish_result(encode(StateChange(server_id=sid, host=vm["host"], domain_state="running", seq=old)))
    await bus.publish_result(b"\x00 this is not json")
    await bus.publish_result(b'{"kind": "job_status", "v": 1}')
    # ...and then a good message, which is still applied.
    await bus.publish_result(
        encode(StateChange(server_id=sid, host=vm["host"], domain_state="running", seq=time.time_ns() + 10**9))
    )

    async def running() -> bool:
        return (await cloud.server(vm["id"]))["operstate"] == "STARTED"

    await cloud.until("the good message to be applied", running)
    await cloud.until("two dead letters", lambda: _dead(bus, 2))

    async def all_handled() -> bool:  # handlers run concurrently: wait for the stragglers
        counts = dispatcher.counts
        return (counts["malformed"], counts["job_status:duplicate"], counts["state_change:duplicate"]) == (2, 1, 1)

    await cloud.until("the duplicate and the stale event to be dropped", all_handled)
    q = await cloud.quotas()
    assert {k: v["usage"] for k, v in q.items()} == expected_usage("STARTED")


async def _dead(bus: Any, n: int) -> bool:
    return bool(await bus.dead_count() == n)


def foreign_xml(domain_uuid: uuid.UUID, name: str = "operators-vm") -> str:
    """A domain an operator defined on the host by hand: no Nephos mark."""
    return (
        f"<domain type='test'><name>{name}</name><uuid>{domain_uuid}</uuid><memory unit='MiB'>2048</memory>"
        "<vcpu>1</vcpu><os><type arch='i686'>hvm</type></os></domain>"
    )


async def _reconcile(cloud: Cloud, fix: bool) -> dict[str, Any]:
    r = await cloud.client.post("/api/v1/admin/reconcile", headers=ADMIN, json={"fix": fix, "wait": 10})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_reconcile_through_the_api(cloud: Cloud) -> None:
    kept, lost = await cloud.started_vm(), await cloud.started_vm()
    agents = {a.host: a for a in cloud.plane.agents}
    conn = agents[kept["host"]].driver.conn
    assert conn is not None
    # Behind Nephos's back: an operator's own domain, and a VM's domain undefined on its host.
    stranger = uuid.uuid4()
    conn.defineXML(foreign_xml(stranger)).create()
    lost_conn = agents[lost["host"]].driver.conn
    assert lost_conn is not None
    lost_dom = lost_conn.lookupByUUIDString(lost["id"])
    lost_dom.destroy()
    lost_dom.undefine()

    async def found() -> dict[str, Any] | None:
        dry = await _reconcile(cloud, False)
        return dry if dry["stale"] and dry["orphans"] else None

    dry = await cloud.until("the drift to show", found)
    assert dry["orphans"] == [
        {
            "host": kept["host"],
            "domain_name": "operators-vm",
            "domain_uuid": str(stranger),
            "state": "running",
            "owned": False,
            "server_id": None,
            "operstate": None,
        }
    ]
    assert [s["server_id"] for s in dry["stale"]] == [lost["id"]]
    assert dry["fixed"] is False and dry["unreachable_hosts"] == []
    fixed = await _reconcile(cloud, True)
    assert fixed["fixed"] and any("left alone" in a for a in fixed["actions"]), fixed
    assert (await cloud.server(lost["id"]))["operstate"] == "DESTROYED"

    async def clean() -> bool:
        again = await _reconcile(cloud, False)
        return not any(again[k] for k in ("stale", "unsynced_operstate", "quota_drift"))

    await cloud.until("an empty report", clean)
    # The operator's domain is still there, running: only an admin who names it removes it.
    assert conn.lookupByUUIDString(str(stranger)).isActive()
    assert (await cloud.server(kept["id"]))["operstate"] == "STARTED"
    q = await cloud.quotas()
    assert q["vm"]["usage"] == 1 and q["active_cpu"]["usage"] == 1


async def test_a_foreign_domain_survives_periodic_passes_until_an_admin_destroys_it(cloud: Cloud) -> None:
    from app.dispatcher import reconciler

    vm = await cloud.started_vm()
    agent = next(a for a in cloud.plane.agents if a.host == vm["host"])
    assert agent.driver.conn is not None
    stranger = uuid.uuid4()
    agent.driver.conn.defineXML(foreign_xml(stranger)).create()
    for _ in range(3):  # the dispatcher's pass, with its fixes, as often as it likes
        report = await reconciler.periodic_pass(cloud.plane.sessions, cloud.plane.bus, wait=5)
        assert [o["domain_uuid"] for o in report.orphans] == [str(stranger)]
        assert agent.driver.conn.lookupByUUIDString(str(stranger)).isActive()
    drift = (await cloud.client.get("/api/v1/admin/drift", headers=ADMIN)).json()
    assert drift["report"]["orphans"][0]["domain_name"] == "operators-vm"
    # A VM's own domain cannot be destroyed this way; an unknown one is 404; users may not.
    base = f"/api/v1/admin/hosts/{vm['host']}/domains"
    r = await cloud.client.post(f"{base}/{vm['id']}/destroy", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "InUse", r.text
    assert (await cloud.client.post(f"{base}/{uuid.uuid4()}/destroy", headers=ADMIN)).status_code == 404
    r = await cloud.client.post(f"{base}/{stranger}/destroy", headers=ADMIN)
    assert r.status_code == 202, r.text
    assert r.json() == {"host": vm["host"], "domain_uuid": str(stranger), "domain_name": "operators-vm", "owned": False}

    async def gone() -> bool:
        return str(stranger) not in {d.UUIDString() for d in agent.driver.conn.listAllDomains()}  # type: ignore[union-attr]

    await cloud.until("the agent to destroy it", gone)
    assert (await cloud.server(vm["id"]))["operstate"] == "STARTED"


async def test_an_admin_adopts_a_foreign_domain_into_a_project(cloud: Cloud) -> None:
    vm = await cloud.started_vm()
    agent = next(a for a in cloud.plane.agents if a.host == vm["host"])
    assert agent.driver.conn is not None
    stranger = uuid.uuid4()
    agent.driver.conn.defineXML(foreign_xml(stranger, "legacy-db")).create()
    dry = await cloud.until("the orphan to show", lambda: _orphans(cloud))
    assert dry[0]["domain_uuid"] == str(stranger)
    project = (await cloud.client.post("/api/v1/admin/projects", headers=ADMIN, json={"name": "legacy"})).json()
    r = await cloud.client.post(
        f"/api/v1/admin/hosts/{vm['host']}/domains/{stranger}/adopt",
        headers=ADMIN,
        json={"project_id": project["id"], "image": "debian-12"},
    )
    assert r.status_code == 201, r.text
    adopted = r.json()
    assert (adopted["id"], adopted["name"], adopted["operstate"], adopted["host"]) == (
        str(stranger),
        "legacy-db",
        "STARTED",
        vm["host"],
    )
    again = (await cloud.client.get(f"/api/v1/admin/projects/{project['id']}", headers=ADMIN)).json()
    assert again["quotas"]["vm"]["usage"] == 1 and again["quotas"]["active_ram"]["usage"] == 2048

    async def marked() -> bool:
        return any(d.server_id == stranger and d.owned for d in await agent.driver.domains())

    await cloud.until("the agent to mark it", marked)
    # It is a VM like any other now: reconciliation finds nothing, and Nephos can stop it.
    assert not await _orphans(cloud)
    r = await cloud.client.post(f"/api/v1/servers/{stranger}/actions", headers=ADMIN, json={"action": "stop"})
    assert r.status_code == 202, r.text


async def _orphans(cloud: Cloud) -> list[dict[str, Any]]:
    return (await _reconcile(cloud, False))["orphans"]  # type: ignore[no-any-return]


async def test_drift_report_and_gauges_show_drift_then_its_repair(cloud: Cloud) -> None:
    vm = await cloud.started_vm()
    sweepers = cloud.plane.sweepers
    assert sweepers is not None
    agent = next(a for a in cloud.plane.agents if a.host == vm["host"])
    assert agent.driver.conn is not None
    dom = agent.driver.conn.lookupByUUIDString(vm["id"])
    dom.destroy()
    dom.undefine()  # the host loses the VM
    from app.dispatcher import reconciler

    async def drift_seen() -> dict[str, Any] | None:
        await reconciler.periodic_pass(cloud.plane.sessions, cloud.plane.bus, wait=5)
        d = (await cloud.client.get("/api/v1/admin/drift", headers=ADMIN)).json()
        return d if d["counts"].get("stale") else None

    drift = await cloud.until("the pass to see the drift", drift_seen)
    assert drift["fixed"] and any("marked DESTROYED" in a for a in drift["report"]["actions"])
    metrics = (await cloud.client.get("/metrics")).text
    assert 'nephos_drift_findings{kind="stale"} 1.0' in metrics
    # The next pass finds the cloud repaired.
    await reconciler.periodic_pass(cloud.plane.sessions, cloud.plane.bus, wait=5)
    drift = (await cloud.client.get("/api/v1/admin/drift", headers=ADMIN)).json()
    assert not any(drift["counts"].values()), drift
    assert 'nephos_drift_findings{kind="stale"} 0.0' in (await cloud.client.get("/metrics")).text
    assert (await cloud.server(vm["id"]))["operstate"] == "DESTROYED"


async def test_the_sweeper_ends_a_lease_on_time(cloud: Cloud) -> None:
    """A policy of seconds: the dispatcher's own sweeper stops the VM at its lease's end, with an
    event saying why and the quota moved exactly."""
    project = (await cloud.client.get("/api/v1/lease-policy", headers=ADMIN)).json()["project_id"]
    r = await cloud.client.put(
        f"/api/v1/admin/projects/{project}/lease-policy",
        headers=ADMIN,
        json={"duration_s": 2, "warn_before_s": [1], "on_expiry": "stop"},
    )
    assert r.status_code == 200, r.text
    vm = await cloud.started_vm()

    async def stopped() -> bool:
        return (await cloud.server(vm["id"]))["operstate"] == "STOPPED"

    await cloud.until("the lease to stop the VM", stopped, timeout=30)
    events = (await cloud.client.get(f"/api/v1/servers/{vm['id']}/events", headers=ADMIN)).json()["items"]
    assert any(e["kind"] == "lease_action" and "the lease ended" in e["message"] for e in events)
    assert {k: v["usage"] for k, v in (await cloud.quotas()).items()} == expected_usage("STOPPED")


async def test_a_firewall_change_reaches_the_host(cloud: Cloud) -> None:
    """The agent records the VM's rule set in its domain (the test driver has no nwfilter: the
    embedded mode shows what a real host enforces)."""
    vm = await cloud.started_vm()
    agent = next(a for a in cloud.plane.agents if a.host == vm["host"])
    assert agent.driver.conn is not None
    dom = agent.driver.conn.lookupByUUIDString(vm["id"])
    assert agent.driver.rules_of(dom) == []  # made with an empty set: inbound closed
    r = await cloud.client.post(
        f"/api/v1/servers/{vm['id']}/firewall",
        headers=ADMIN,
        json={"open": {"protocol": "tcp", "port": [80, 81], "cidr": "192.0.2.0/24"}},
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    async def done() -> bool:
        job = (await cloud.client.get(f"/api/v1/jobs/{job_id}", headers=ADMIN)).json()
        return bool(job["status"] == "SUCCESS")

    await cloud.until("the firewall job", done)
    assert agent.driver.rules_of(dom) == [{"protocol": "tcp", "port_min": 80, "port_max": 81, "cidr": "192.0.2.0/24"}]


async def test_a_public_ip_association_reaches_the_host(cloud: Cloud) -> None:
    """The agent records the VM's public-to-private mappings in its domain (on a real host it
    installs them as NAT rules too), and a disassociation empties them."""
    r = await cloud.client.post(
        "/api/v1/admin/public-ip-pools", headers=ADMIN, json={"name": "edge", "cidr": "198.51.100.0/30"}
    )
    assert r.status_code == 201, r.text
    vm = await cloud.started_vm()
    ip = (await cloud.client.post("/api/v1/public-ips", headers=ADMIN, json={})).json()
    agent = next(a for a in cloud.plane.agents if a.host == vm["host"])
    assert agent.driver.conn is not None
    dom = agent.driver.conn.lookupByUUIDString(vm["id"])

    async def run(path: str, **body: str) -> None:
        reply = await cloud.client.post(f"/api/v1/public-ips/{ip['id']}/{path}", headers=ADMIN, json=body or None)
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["job_id"]

        async def done() -> bool:
            job = (await cloud.client.get(f"/api/v1/jobs/{job_id}", headers=ADMIN)).json()
            return bool(job["status"] == "SUCCESS")

        await cloud.until(f"the {path} job", done)

    await run("associate", server_id=vm["id"])
    assert agent.driver.mappings_of(dom) == [{"public": ip["address"], "private": vm["addresses"][0]["ip"]}]
    await run("disassociate")
    assert agent.driver.mappings_of(dom) == []
