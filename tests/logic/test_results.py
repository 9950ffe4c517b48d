"""``apply_result`` for every action: success, failure and a duplicate, on both databases.

Each case drives a VM through the API to the action's starting state, accepts
the action, applies the job's outcome as the dispatcher would, and checks the
operstate, task, job, commission, quota usage and host usage against DESIGN.md.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from app.models import Commission, Host, Image, Job, Port, PublicIp
from tests.api.helpers import MEDIUM, SMALL, expected_usage, pending, server_in, statements_sent, usage
from tests.conftest import Cloud

# action: (from state, extra body, state on success, state on failure)
CASES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "create": ("-", {}, "STARTED", "ERROR"),
    "release": ("HOLD", {}, "STARTED", "ERROR"),
    "start": ("STOPPED", {}, "STARTED", "STOPPED"),
    "stop": ("STARTED", {}, "STOPPED", "STARTED"),
    "reboot": ("STARTED", {}, "STARTED", "STARTED"),
    "suspend": ("STARTED", {}, "SUSPENDED", "STARTED"),
    "resume": ("SUSPENDED", {}, "STARTED", "SUSPENDED"),
    "resize": ("STOPPED", {"flavor": "medium"}, "STOPPED", "STOPPED"),
    "migrate": ("STOPPED", {}, "STOPPED", "STOPPED"),
    "live_migrate": ("STARTED", {}, "STARTED", "STARTED"),
    "save_image": ("STARTED", {"image_name": "snap"}, "STOPPED", "STARTED"),
    "console": ("STARTED", {}, "STARTED", "STARTED"),
    "destroy": ("STARTED", {}, "DESTROYED", "STARTED"),
}


async def _hosts(cloud: Cloud) -> dict[str, tuple[int, int]]:
    async with cloud.sessions() as s:
        return {h.name: (h.used_cpus, h.used_ram_mb) for h in await s.scalars(sa.select(Host))}


@pytest.mark.parametrize("success", [True, False], ids=["success", "failure"])
@pytest.mark.parametrize("action", list(CASES))
async def test_apply_result(cloud: Cloud, action: str, success: bool) -> None:
    start, extra, on_success, on_failure = CASES[action]
    user = cloud.admin  # migrate needs the admin; the admin's project is a project like any
    if action == "create":
        reply = await cloud.create(user)
        server, job_id = reply["servers"][0], reply["job_ids"][0]
    else:
        server = await server_in(cloud, user, start)
        job_id = (await cloud.act(user, server["id"], action, expect=200 if action == "console" else 202, **extra))[
            "job_id"
        ]
    hosts_before = await _hosts(cloud)
    source = (await cloud.server(user, server["id"]))["host"]

    assert await cloud.finish(job_id, success=success, error=None if success else "libvirt: boom") == "applied"

    after = await cloud.server(user, server["id"])
    expected_state = on_success if success else on_failure
    assert after["operstate"] == expected_state
    assert after["task"] is None and after["task_job_id"] is None
    job = (await cloud.client.get(f"/api/v1/jobs/{job_id}", headers=user)).json()
    assert job["status"] == ("SUCCESS" if success else "ERROR") and job["finished_at"] is not None
    assert job["error"] == (None if success else "libvirt: boom")
    resized = action == "resize" and success
    assert after["flavor_id"] != server["flavor_id"] if resized else after["flavor_id"] == server["flavor_id"]
    q = await cloud.quotas(user)
    assert usage(q) == expected_usage(expected_state, MEDIUM if resized else SMALL)
    assert set(pending(q).values()) == {0}
    async with cloud.sessions() as s:
        row = await s.get(Job, uuid.UUID(job_id))
        assert row is not None
        if row.commission_id is not None:
            commission = await s.get(Commission, row.commission_id)
            assert commission is not None
            immediate = action in ("create", "release")
            assert commission.state == ("accepted" if success or immediate else "rejected")
        if action == "save_image":
            image = await s.get(Image, uuid.UUID(row.params["image_id"]))
            assert image is not None and image.status == ("active" if success else "error")

    hosts = await _hosts(cloud)
    if action == "destroy" and success:
        assert hosts[source] == (hosts_before[source][0] - SMALL[0], hosts_before[source][1] - SMALL[1])
    elif action in ("migrate", "live_migrate"):
        target = row.params["target_host"]
        assert target != source
        assert after["host"] == (target if success else source)
        moved_off = target if not success else source
        assert hosts[moved_off] == (hosts_before[moved_off][0] - 1, hosts_before[moved_off][1] - 2048)
    elif action == "resize" and not success:
        assert hosts[source] == (hosts_before[source][0] - 1, hosts_before[source][1] - 2048)
    else:
        assert hosts == hosts_before

    # The same result again (a redelivered message) changes nothing.
    snapshot = (after, await cloud.quotas(user), await _hosts(cloud))
    assert await cloud.finish(job_id, success=success) == "duplicate"
    assert await cloud.finish(job_id, success=not success) == "duplicate"
    assert (await cloud.server(user, server["id"]), await cloud.quotas(user), await _hosts(cloud)) == snapshot


async def test_unknown_job_is_reported_not_raised(cloud: Cloud) -> None:
    assert await cloud.finish(str(uuid.uuid4())) == "unknown"


async def test_destroy_overtaking_a_task(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "STOPPED")
    start = (await cloud.act(user, server["id"], "start"))["job_id"]
    assert (await cloud.quotas(user))["active_cpu"]["pending"] == 1
    destroy = (await cloud.act(user, server["id"], "destroy"))["job_id"]
    after = await cloud.server(user, server["id"])
    assert after["task"] == "DESTROY" and after["task_job_id"] == destroy
    # The overtaken start's reservation was rejected at once.
    assert set(pending(await cloud.quotas(user)).values()) == {0}
    # A second DELETE while the destroy is pending answers with the same job.
    again = await cloud.client.delete(f"/api/v1/servers/{server['id']}", headers=user)
    assert again.status_code == 202 and again.json()["job_id"] == destroy
    # The overtaken start still happened on the host before the destroy ran:
    assert await cloud.finish(start) == "applied"
    mid = await cloud.server(user, server["id"])
    assert mid["operstate"] == "STARTED" and mid["task"] == "DESTROY"
    assert usage(await cloud.quotas(user)) == expected_usage("STARTED")
    assert await cloud.finish(destroy) == "applied"
    assert usage(await cloud.quotas(user)) == expected_usage("DESTROYED")
    final = await cloud.server(user, server["id"])
    assert final["operstate"] == "DESTROYED" and final["task"] is None


async def test_destroy_finishes_overtaken_jobs(cloud: Cloud) -> None:
    server = await server_in(cloud, cloud.admin, "STOPPED")
    migrate = (await cloud.act(cloud.admin, server["id"], "migrate"))["job_id"]
    hosts_mid = await _hosts(cloud)
    destroy = (await cloud.act(cloud.admin, server["id"], "destroy"))["job_id"]
    hosts_after_destroy_accepted = await _hosts(cloud)
    # The migration's reservation on its target was given back when destroy overtook it.
    assert sum(c for c, _ in hosts_after_destroy_accepted.values()) == sum(c for c, _ in hosts_mid.values()) - 1
    assert await cloud.finish(destroy) == "applied"
    job = (await cloud.client.get(f"/api/v1/jobs/{migrate}", headers=cloud.admin)).json()
    assert job["status"] == "ERROR" and job["error"] == "superseded by destroy"
    assert await cloud.finish(migrate) == "duplicate"
    assert all(c == 0 for c, _ in (await _hosts(cloud)).values())


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "from-before-the-parameter"])
async def test_a_destroy_names_the_job_it_overtook_and_its_result_ends_it(cloud: Cloud, recorded: bool) -> None:
    """A destroy's parameters list the live job it overtook (none when the VM had no task): its
    result ends those without looking for others. A destroy accepted before that parameter
    existed (an upgrade with jobs in flight) still has its result look them up."""
    server = await server_in(cloud, cloud.admin, "STOPPED")
    quiet = await server_in(cloud, cloud.admin, "STOPPED")
    migrate = (await cloud.act(cloud.admin, server["id"], "migrate"))["job_id"]
    destroy = (await cloud.act(cloud.admin, server["id"], "destroy"))["job_id"]
    alone = (await cloud.act(cloud.admin, quiet["id"], "destroy"))["job_id"]
    async with cloud.sessions() as s:
        assert (await s.get(Job, uuid.UUID(destroy))).params["overtook"] == [migrate]  # type: ignore[union-attr]
        assert (await s.get(Job, uuid.UUID(alone))).params["overtook"] == []  # type: ignore[union-attr]
        if not recorded:
            for job_id in (destroy, alone):
                job = await s.get(Job, uuid.UUID(job_id))
                assert job is not None
                job.params = {k: v for k, v in job.params.items() if k != "overtook"}
            await s.commit()
    assert await cloud.finish(destroy) == "applied"
    assert await cloud.finish(alone) == "applied"
    job = (await cloud.client.get(f"/api/v1/jobs/{migrate}", headers=cloud.admin)).json()
    assert job["status"] == "ERROR" and job["error"] == "superseded by destroy"
    for vm in (server, quiet):
        final = await cloud.server(cloud.admin, vm["id"])
        assert final["operstate"] == "DESTROYED" and final["task"] is None


async def test_destroy_of_a_held_server_completes_at_once(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "HOLD")
    job_id = (await cloud.act(user, server["id"], "destroy"))["job_id"]
    assert (await cloud.server(user, server["id"]))["operstate"] == "DESTROYED"
    assert (await cloud.client.get(f"/api/v1/jobs/{job_id}", headers=user)).json()["status"] == "SUCCESS"
    assert usage(await cloud.quotas(user)) == expected_usage("DESTROYED")


async def test_what_the_agent_reports_is_kept_and_a_contradicting_success_is_not_believed(cloud: Cloud) -> None:
    from app.logic.results import apply_result

    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    console = await cloud.act(user, vm["id"], "console", expect=200)
    async with cloud.sessions() as s:
        await apply_result(
            s, job_id=uuid.UUID(console["job_id"]), success=True, domain_state="running", details={"port": 5931}
        )
        await s.commit()
    job = (await cloud.client.get(f"/api/v1/jobs/{console['job_id']}", headers=user)).json()
    assert (job["status"], job["domain_state"], job["details"]) == ("SUCCESS", "running", {"port": 5931})

    # The agent says the stop worked, but the domain still runs: the job is an ERROR saying so,
    # and the VM stays what its host reports (STARTED), with quotas to match.
    stop = await cloud.act(user, vm["id"], "stop")
    async with cloud.sessions() as s:
        await apply_result(s, job_id=uuid.UUID(stop["job_id"]), success=True, domain_state="running")
        await s.commit()
    job = (await cloud.client.get(f"/api/v1/jobs/{stop['job_id']}", headers=user)).json()
    assert job["status"] == "ERROR" and "the domain is running" in job["error"], job
    server = await cloud.server(user, vm["id"])
    assert (server["operstate"], server["task"]) == ("STARTED", None)
    q = await cloud.quotas(user)
    assert usage(q) == expected_usage("STARTED") and all(v["pending"] == 0 for v in q.values())

    # A start reported done while the domain is off: the VM is STOPPED, as its host has it.
    stop = await cloud.act(user, vm["id"], "stop")
    await cloud.finish(stop["job_id"])
    start = await cloud.act(user, vm["id"], "start")
    async with cloud.sessions() as s:
        await apply_result(s, job_id=uuid.UUID(start["job_id"]), success=True, domain_state="shutoff")
        await s.commit()
    server = await cloud.server(user, vm["id"])
    assert server["operstate"] == "STOPPED"
    assert usage(await cloud.quotas(user)) == expected_usage("STOPPED")


async def test_migration_uris_come_from_the_heartbeat_to_the_job(cloud: Cloud) -> None:
    """An agent's --migration-uri reaches its host record and every migration job to it; a real
    hypervisor without one refuses the migration up front, instead of a cold boot elsewhere."""
    from datetime import UTC, datetime

    from app.logic import hosts

    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    source, target = vm["host"], "host-2" if vm["host"] == "host-1" else "host-1"
    async with cloud.sessions() as s:
        for name, uri in ((source, "qemu+ssh://src/system"), (target, None)):
            await hosts.heartbeat(
                s,
                name=name,
                zone="default",
                cpus=16,
                ram_mb=32768,
                at=datetime.now(UTC),
                migration_uri=uri,
                hypervisor="qemu",
            )
        await s.commit()
    r = await cloud.client.post(
        f"/api/v1/servers/{vm['id']}/actions", headers=cloud.admin, json={"action": "live_migrate", "host": target}
    )
    assert r.status_code == 400 and "no migration URI" in r.json()["error"]["message"], r.text
    async with cloud.sessions() as s:
        await hosts.heartbeat(
            s,
            name=target,
            zone="default",
            cpus=16,
            ram_mb=32768,
            at=datetime.now(UTC),
            migration_uri="qemu+ssh://dst/system",
            hypervisor="qemu",
        )
        await s.commit()
    job_id = (await cloud.act(cloud.admin, vm["id"], "live_migrate", host=target))["job_id"]
    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(job_id))
        host = (await s.scalars(sa.select(Host).where(Host.__table__.c.name == target))).one()  # type: ignore[attr-defined]
    assert job is not None and job.params["target_uri"] == "qemu+ssh://dst/system"
    assert (host.migration_uri, host.hypervisor) == ("qemu+ssh://dst/system", "qemu")


async def test_a_destroy_result_alone_gives_back_host_room_and_addresses_together(cloud: Cloud) -> None:
    """A destroy's result applied alone gives its host's room, its NICs' addresses and its public
    address back after its commission's lock and before its last write (the order a batch takes
    them in); on PostgreSQL in one statement, not three. On both databases: the host has its
    room again, the VM no port, the public address is the project's still, unmapped."""
    r = await cloud.client.post(
        "/api/v1/admin/public-ip-pools", headers=cloud.admin, json={"name": "edge", "cidr": "203.0.113.0/30"}
    )
    assert r.status_code == 201, r.text
    user = await cloud.user()
    hosts = await _hosts(cloud)
    vm = await server_in(cloud, user, "STARTED", public_ip=True)
    assert vm["addresses"][0]["public_ip"] and vm["addresses"][0]["ip"]
    job = (await cloud.act(user, vm["id"], "destroy"))["job_id"]
    with statements_sent(cloud) as sent:
        assert await cloud.finish(job) == "applied"

    assert await _hosts(cloud) == hosts  # the room the VM held is back
    assert (await cloud.server(user, vm["id"]))["operstate"] == "DESTROYED"
    async with cloud.sessions() as s:
        ports = list(await s.scalars(sa.select(Port).where(Port.server_id == uuid.UUID(vm["id"]))))  # type: ignore[arg-type]
        held = list(await s.scalars(sa.select(PublicIp)))
    assert ports == []
    assert [(ip.server_id, ip.association_id, str(ip.project_id)) for ip in held] == [(None, None, user["X-Project"])]
    touching = [s for s in sent if any(t in s for t in ("UPDATE hosts", "public_ips", "ports"))]
    after_commission = sent.index(next(s for s in sent if " commissions " in s))
    assert all(sent.index(s) > after_commission for s in touching), sent
    if cloud.engine.dialect.name == "postgresql":
        assert len(touching) == 1, touching
        assert all(f" {t} " in f" {touching[0]} " for t in ("hosts", "public_ips", "ports")), touching
    else:
        assert len(touching) == 3, touching


async def test_a_result_alone_locks_its_vm_its_job_and_its_commission_in_one_statement(cloud: Cloud) -> None:
    """A result applied alone reads its VM, job and commission in one statement, and on
    PostgreSQL locks them there in the lock order (VM and job in a sub-SELECT, the commission in
    a LATERAL one joined to what it gave), so settling the commission sends no statement of its
    own. A job without a commission is found all the same; a duplicate changes nothing."""
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    job = (await cloud.act(user, vm["id"], "stop"))["job_id"]
    before = usage(await cloud.quotas(user))
    with statements_sent(cloud) as sent:
        assert await cloud.finish(job) == "applied"
        stop, sent[:] = list(sent), []
        assert await cloud.finish(job) == "duplicate"
    assert (await cloud.server(user, vm["id"]))["operstate"] == "STOPPED"
    after = usage(await cloud.quotas(user))
    assert after["active_cpu"] == before["active_cpu"] - SMALL[0] and after["cpu"] == before["cpu"]
    async with cloud.sessions() as s:
        commission = await s.scalar(sa.select(Commission).where(Commission.job_id == uuid.UUID(job)))  # type: ignore[arg-type]
    assert commission is not None and commission.state == "accepted"
    reads = [s for s in stop if s.startswith("SELECT") and " commissions " in s]
    assert len(reads) == 1 and stop.index(reads[0]) == next(i for i, s in enumerate(stop) if s.startswith("SELECT")), (
        stop
    )
    if cloud.engine.dialect.name == "postgresql":
        assert "FOR NO KEY UPDATE OF servers, jobs) AS held LEFT OUTER JOIN LATERAL" in reads[0], reads[0]
        assert reads[0].endswith("FOR NO KEY UPDATE) AS commission ON true"), reads[0]
        assert len([s for s in stop if s.startswith("SELECT") and "FOR NO KEY UPDATE" in s]) == 1, stop

    # A job with no commission (a reboot moves no usage) is found by the same statement.
    console = (await cloud.act(user, vm["id"], "start"))["job_id"]
    assert await cloud.finish(console) == "applied"
    job = (await cloud.act(user, vm["id"], "reboot"))["job_id"]
    async with cloud.sessions() as s:
        assert (await s.get(Job, uuid.UUID(job))).commission_id is None  # type: ignore[union-attr]
    assert await cloud.finish(job) == "applied"
