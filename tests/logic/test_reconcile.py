"""Reconciliation, kind by kind: make that exact drift, see it reported, fix it, see it gone."""

from __future__ import annotations

import uuid
from datetime import timedelta

import sqlalchemy as sa

from app.dispatcher import reconciler
from app.ids import utcnow
from app.logic import hosts, reconcile
from app.models import Commission, Host, Job, Quota, table_of
from tests.api.helpers import expected_usage, server_in, usage
from tests.conftest import Cloud


def _domain(
    vm: dict[str, object], state: str = "running", vcpus: int = 1, ram_mb: int = 2048, owned: bool = True
) -> dict[str, object]:
    """A domain as an agent reports it; ``owned``: it carries Nephos's mark."""
    return {
        "server_id": vm["id"],
        "state": state,
        "vcpus": vcpus,
        "ram_mb": ram_mb,
        "name": f"nephos-{vm['id']}" if owned else "operators-own",
        "owned": owned,
    }


async def _inventory(cloud: Cloud, host: str, domains: list[dict[str, object]], settled: bool = True) -> None:
    """A host's inventory; ``settled``: stamped as taken once the VMs' last changes had settled
    (reconciliation does not judge a VM changed within ``SETTLE`` of its host's inventory)."""
    taken = utcnow() + (2 * reconcile.SETTLE if settled else timedelta(0))
    async with cloud.sessions() as s:
        await hosts.store_inventory(s, name=host, inventory={"host": host, "domains": domains}, taken_at=taken)
        await s.commit()


async def _all_seen(cloud: Cloud, vms: list[dict[str, object]]) -> None:
    """Both hosts report exactly the VMs placed on them, as the database has them."""
    for host in ("host-1", "host-2"):
        await _inventory(
            cloud,
            host,
            [_domain(v, "running" if v["operstate"] == "STARTED" else "shutoff") for v in vms if v["host"] == host],
        )


async def _report(cloud: Cloud, fix: bool = False) -> reconciler.reconcile.Report:
    return await reconciler.run(cloud.sessions, fix=fix)


async def test_a_consistent_cloud_reports_nothing(cloud: Cloud) -> None:
    user = await cloud.user()
    vms = [await server_in(cloud, user, "STARTED"), await server_in(cloud, user, "STOPPED")]
    await _all_seen(cloud, vms)
    report = await _report(cloud)
    assert report.empty() and report.unreachable_hosts == []


async def test_stale_vm(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    await _all_seen(cloud, [])  # its host lost it
    report = await _report(cloud)
    assert [e["server_id"] for e in report.stale] == [vm["id"]]
    fixed = await _report(cloud, fix=True)
    assert fixed.fixed and any("marked DESTROYED" in a for a in fixed.actions)
    assert (await cloud.server(user, vm["id"]))["operstate"] == "DESTROYED"
    assert usage(await cloud.quotas(user)) == expected_usage("DESTROYED")
    hosts_now = (await cloud.client.get("/api/v1/admin/hosts", headers=cloud.admin)).json()["items"]
    assert all(h["used_cpus"] == 0 for h in hosts_now)
    assert (await _report(cloud)).empty()


async def test_a_vm_found_on_another_host_has_moved_not_vanished(cloud: Cloud) -> None:
    """A migration whose result was lost (or that ended after its deadline was resolved): the
    VM's own host no longer has it, another runs its marked domain. Found by the invariant
    suite: it was reported stale, marked DESTROYED, and its running domain became reapable."""
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    other = "host-2" if vm["host"] == "host-1" else "host-1"
    await _inventory(cloud, vm["host"], [])
    await _inventory(cloud, other, [_domain(vm, "shutoff")])
    report = await _report(cloud)
    assert report.stale == [] and report.orphans == []
    assert [(e["server_id"], e["host"], e["found_on"], e["observed"]) for e in report.moved] == [
        (vm["id"], vm["host"], other, "shutoff")
    ]
    fixed = await _report(cloud, fix=True)
    assert any(f"found on {other}" in a for a in fixed.actions), fixed.actions
    after = await cloud.server(user, vm["id"])
    assert (after["host"], after["operstate"], after["task"]) == (other, "STOPPED", None)
    assert usage(await cloud.quotas(user)) == expected_usage("STOPPED")
    used = {
        h["name"]: h["used_cpus"]
        for h in (await cloud.client.get("/api/v1/admin/hosts", headers=cloud.admin)).json()["items"]
    }
    assert used == {vm["host"]: 0, other: 1}
    await _inventory(cloud, other, [_domain(vm, "shutoff")])
    assert (await _report(cloud)).empty()


async def test_orphan_domain(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    stranger = {"id": str(uuid.uuid4())}
    await _inventory(cloud, vm["host"], [_domain(vm), _domain(stranger, owned=False)])
    other = "host-2" if vm["host"] == "host-1" else "host-1"
    await _inventory(cloud, other, [_domain(vm)])  # a copy left behind where it is not placed
    report = await _report(cloud)
    assert sorted((o["domain_uuid"], o["host"]) for o in report.orphans) == sorted(
        [(stranger["id"], vm["host"]), (vm["id"], other)]
    )
    by_uuid = {o["domain_uuid"]: o for o in report.orphans}
    assert by_uuid[stranger["id"]] == {
        "host": vm["host"],
        "domain_name": "operators-own",
        "domain_uuid": stranger["id"],
        "state": "running",
        "owned": False,
        "server_id": None,
        "operstate": None,
    }
    assert by_uuid[vm["id"]]["owned"] and by_uuid[vm["id"]]["operstate"] == "STARTED"
    assert report.stale == []
    # Neither is Nephos's to remove: a foreign domain, and a copy of a live VM.
    assert not any(reconcile.reapable(o) for o in report.orphans)


async def test_only_a_marked_domain_of_a_destroyed_vm_is_reapable(cloud: Cloud) -> None:
    user = await cloud.user()
    gone = await server_in(cloud, user, "DESTROYED")
    foreign_same_id = {"id": gone["id"]}
    marked_no_row = {"id": str(uuid.uuid4())}
    await _inventory(cloud, gone["host"], [_domain(gone)])
    report = await _report(cloud)
    assert [(o["domain_uuid"], o["operstate"], reconcile.reapable(o)) for o in report.orphans] == [
        (gone["id"], "DESTROYED", True)
    ]
    # The same UUID without the mark (someone else's domain) is not reaped; nor a marked one
    # whose VM Nephos has no row for.
    await _inventory(cloud, gone["host"], [_domain(foreign_same_id, owned=False), _domain(marked_no_row)])
    report = await _report(cloud)
    assert sorted((o["domain_uuid"], reconcile.reapable(o)) for o in report.orphans) == sorted(
        [(gone["id"], False), (marked_no_row["id"], False)]
    )


async def test_unsynced_operstate(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    await _inventory(cloud, vm["host"], [_domain(vm, "shutoff")])
    report = await _report(cloud)
    assert [(e["server_id"], e["observed"]) for e in report.unsynced_operstate] == [(vm["id"], "shutoff")]
    await _report(cloud, fix=True)
    assert (await cloud.server(user, vm["id"]))["operstate"] == "STOPPED"
    assert usage(await cloud.quotas(user)) == expected_usage("STOPPED")
    assert (await _report(cloud)).empty()


async def test_unsynced_flavor(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    await _inventory(cloud, vm["host"], [_domain(vm, vcpus=4, ram_mb=8192)])
    report = await _report(cloud)
    assert report.unsynced_flavor == [
        {
            "server_id": vm["id"],
            "project_id": user["X-Project"],
            "host": vm["host"],
            "operstate": "STARTED",
            "flavor": "small",
            "expected": {"vcpus": 1, "ram_mb": 2048},
            "observed": {"vcpus": 4, "ram_mb": 8192},
        }
    ]
    # The fix follows the host: the VM becomes a "large", its quota and host room with it.
    fixed = await _report(cloud, fix=True)
    assert any("small -> large" in a for a in fixed.actions), fixed.actions
    server = await cloud.server(user, vm["id"])
    flavors = (await cloud.client.get("/api/v1/flavors", headers=user)).json()["items"]
    assert server["flavor_id"] == next(f["id"] for f in flavors if f["name"] == "large")
    assert usage(await cloud.quotas(user)) == expected_usage("STARTED", flavor=(4, 8192, 80))
    assert (await _report(cloud)).empty()


async def test_unsynced_flavor_of_no_known_size_is_left_for_an_operator(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    await _inventory(cloud, vm["host"], [_domain(vm, vcpus=3, ram_mb=3000)])
    fixed = await _report(cloud, fix=True)
    assert any("left for an operator" in a for a in fixed.actions), fixed.actions
    assert usage(await cloud.quotas(user)) == expected_usage("STARTED")
    assert len((await _report(cloud)).unsynced_flavor) == 1


async def test_stuck_task(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    job_id = (await cloud.act(user, vm["id"], "stop"))["job_id"]
    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.deadline = utcnow() - timedelta(seconds=1)
        await s.commit()
    await _inventory(cloud, vm["host"], [_domain(vm, "shutoff")])
    report = await _report(cloud)
    assert [e["job_id"] for e in report.stuck_tasks] == [job_id]
    assert report.unsynced_operstate == []  # a VM with a task in flight is not judged
    await _report(cloud, fix=True)
    assert (await cloud.server(user, vm["id"]))["operstate"] == "STOPPED"
    assert (await _report(cloud)).empty()


async def test_quota_drift(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    await _all_seen(cloud, [vm])
    quotas = table_of(Quota)
    async with cloud.sessions() as s:  # someone edits a usage row by hand
        await s.execute(
            quotas.update()
            .where(quotas.c.project_id == uuid.UUID(user["X-Project"]), quotas.c.resource == "cpu")
            .values(usage=7)
        )
        await s.commit()
    report = await _report(cloud)
    assert report.quota_drift == [{"project_id": user["X-Project"], "resource": "cpu", "recorded": 7, "recomputed": 1}]
    fixed = await _report(cloud, fix=True)
    assert any("usage adjusted by {'cpu': -6}" in a for a in fixed.actions)
    assert usage(await cloud.quotas(user)) == expected_usage("STARTED")
    assert (await _report(cloud)).empty()
    async with cloud.sessions() as s:
        adjustments = list(await s.scalars(sa.select(Commission).where(table_of(Commission).c.issuer == "reconcile")))
    assert [(a.cpu, a.state) for a in adjustments] == [(-6, "accepted")]


async def test_pending_commission_without_a_live_job(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STOPPED")
    job_id = (await cloud.act(user, vm["id"], "start"))["job_id"]
    async with cloud.sessions() as s:  # a job ended without its commission being resolved
        job = await s.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.status = "ERROR"
        await s.commit()
    async with cloud.sessions() as s:
        from app.models import Server

        server = await s.get(Server, uuid.UUID(vm["id"]))
        assert server is not None
        server.task, server.task_job_id = None, None
        await s.commit()
    await _all_seen(cloud, [vm])
    report = await _report(cloud)
    assert [e["server_id"] for e in report.pending_without_job] == [vm["id"]]
    assert (await cloud.quotas(user))["active_cpu"]["pending"] == 1
    await _report(cloud, fix=True)
    assert (await cloud.quotas(user))["active_cpu"]["pending"] == 0
    assert (await _report(cloud)).empty()


async def test_a_host_without_a_fresh_inventory_is_unreachable_not_empty(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    await _all_seen(cloud, [])
    report = await reconciler.run(cloud.sessions, fix=True, fresh_since=utcnow() + timedelta(seconds=1))
    assert sorted(report.unreachable_hosts) == ["host-1", "host-2"]
    assert report.stale == [] and report.empty()
    assert (await cloud.server(user, vm["id"]))["operstate"] == "STARTED"


async def test_a_vm_changed_after_its_hosts_inventory_is_not_judged_by_it(cloud: Cloud) -> None:
    """Found by the fault suite: under load, a VM created or stopped after its host's inventory
    was taken looked stale or unsynced, and the fix destroyed or restarted it."""
    user = await cloud.user()
    running = await server_in(cloud, user, "STARTED")
    for host in ("host-1", "host-2"):
        await _inventory(cloud, host, [_domain(running)] if host == running["host"] else [], settled=False)
    # Then, after the inventory: the VM is stopped, and another one is built.
    stopped = await server_in(cloud, user, "STOPPED")  # (built, then stopped: not in the inventory)
    job = await cloud.act(user, running["id"], "stop")
    await cloud.finish(job["job_id"])
    report = await _report(cloud, fix=True)
    assert report.empty(), report
    assert (await cloud.server(user, running["id"]))["operstate"] == "STOPPED"
    assert (await cloud.server(user, stopped["id"]))["operstate"] == "STOPPED"


async def test_a_host_down_refuses_actions_destroys_locally_and_reaps_the_domain_when_back(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    async with cloud.sessions() as s:
        await s.execute(sa.update(table_of(Host)).where(table_of(Host).c.name == vm["host"]).values(state="down"))
        await s.commit()
    r = await cloud.client.post(f"/api/v1/servers/{vm['id']}/actions", headers=user, json={"action": "stop"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "HostDown", r.text
    # Destroy does not wait for a host that may never answer: it completes now.
    r = await cloud.client.delete(f"/api/v1/servers/{vm['id']}", headers=user)
    assert r.status_code == 202, r.text
    job = (await cloud.client.get(f"/api/v1/jobs/{r.json()['job_id']}", headers=user)).json()
    assert job["status"] == "SUCCESS"
    assert (await cloud.server(user, vm["id"]))["operstate"] == "DESTROYED"
    assert usage(await cloud.quotas(user)) == expected_usage("DESTROYED")
    # The host comes back with the domain still there: an orphan, which the fix reaps.
    async with cloud.sessions() as s:
        await s.execute(sa.update(table_of(Host)).where(table_of(Host).c.name == vm["host"]).values(state="up"))
        await s.commit()
    await _all_seen(cloud, [])
    await _inventory(cloud, vm["host"], [_domain(vm)])
    report = await _report(cloud)
    assert [(o["server_id"], reconcile.reapable(o)) for o in report.orphans] == [(vm["id"], True)]
