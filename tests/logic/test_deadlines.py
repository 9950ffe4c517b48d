"""No task is held forever: deadlines resolved from inventories, silent hosts marked down."""

from __future__ import annotations

import uuid
from datetime import timedelta

import sqlalchemy as sa

from app.dispatcher.sweepers import resolve_deadlines
from app.ids import utcnow
from app.logic import deadlines, hosts
from app.models import Host, Job
from tests.api.helpers import expected_usage, server_in, usage
from tests.conftest import Cloud


async def _expire(cloud: Cloud, job_id: str) -> None:
    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.deadline = utcnow() - timedelta(seconds=1)
        await s.commit()


async def _inventory(cloud: Cloud, host: str, domains: list[dict[str, object]]) -> None:
    async with cloud.sessions() as s:
        assert await hosts.store_inventory(
            s, name=host, inventory={"host": host, "domains": domains}, taken_at=utcnow()
        )
        await s.commit()


async def _sweep(cloud: Cloud) -> deadlines.Pass:
    return await resolve_deadlines(cloud.sessions)


async def test_a_lost_result_is_resolved_from_a_fresh_inventory(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    job = (await cloud.act(user, vm["id"], "stop"))["job_id"]
    await _expire(cloud, job)
    # The host's inventory predates the deadline: ask for a fresh one, resolve nothing yet.
    passed = await _sweep(cloud)
    assert passed.need_inventory == {vm["host"]} and passed.resolved == []
    assert (await cloud.server(user, vm["id"]))["task"] == "STOP"
    # The fresh inventory shows the domain off: the stop happened, only its result was lost.
    await _inventory(cloud, vm["host"], [{"server_id": vm["id"], "state": "shutoff", "vcpus": 1, "ram_mb": 2048}])
    passed = await _sweep(cloud)
    assert passed.resolved == [uuid.UUID(job)]
    after = await cloud.server(user, vm["id"])
    assert after["operstate"] == "STOPPED" and after["task"] is None
    assert (await cloud.client.get(f"/api/v1/jobs/{job}", headers=user)).json()["status"] == "SUCCESS"
    assert usage(await cloud.quotas(user)) == expected_usage("STOPPED")


async def test_a_migration_past_its_deadline_is_found_on_its_target(cloud: Cloud) -> None:
    """The source cannot vouch for the target: once the source's fresh inventory lacks the
    domain, the target's is asked for, and the migration succeeded if the target runs it."""
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    job = (await cloud.act(cloud.admin, vm["id"], "live_migrate"))["job_id"]
    async with cloud.sessions() as s:
        found = await s.get(Job, uuid.UUID(job))
        assert found is not None
        source, target = found.host, found.params["target_host"]
    await _expire(cloud, job)
    assert (await _sweep(cloud)).need_inventory == {source}
    await _inventory(cloud, source, [])  # the domain has left the source
    passed = await _sweep(cloud)
    assert passed.need_inventory == {target} and passed.resolved == []
    await _inventory(cloud, target, [{"server_id": vm["id"], "state": "running", "vcpus": 1, "ram_mb": 2048}])
    assert (await _sweep(cloud)).resolved == [uuid.UUID(job)]
    after = await cloud.server(user, vm["id"])
    assert (after["host"], after["operstate"], after["task"]) == (target, "STARTED", None)
    assert (await cloud.client.get(f"/api/v1/jobs/{job}", headers=user)).json()["status"] == "SUCCESS"
    async with cloud.sessions() as s:
        used = {name: cpus for name, cpus in (await s.execute(sa.select(Host.name, Host.used_cpus))).all()}
    assert used[source] == 0 and used[target] > 0
    assert usage(await cloud.quotas(user)) == expected_usage("STARTED")


async def test_a_job_that_did_not_happen_ends_in_error_and_the_vm_follows_the_host(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STOPPED")
    job = (await cloud.act(user, vm["id"], "start"))["job_id"]
    await _expire(cloud, job)
    await _inventory(cloud, vm["host"], [{"server_id": vm["id"], "state": "shutoff", "vcpus": 1, "ram_mb": 2048}])
    await _sweep(cloud)
    final = (await cloud.client.get(f"/api/v1/jobs/{job}", headers=user)).json()
    assert final["status"] == "ERROR" and "reports the domain shutoff" in final["error"]
    after = await cloud.server(user, vm["id"])
    assert after["operstate"] == "STOPPED" and after["task"] is None
    q = await cloud.quotas(user)
    assert usage(q) == expected_usage("STOPPED") and q["active_cpu"]["pending"] == 0


async def test_a_job_on_a_down_host_ends_in_error_at_once(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    job = (await cloud.act(user, vm["id"], "reboot"))["job_id"]
    r = await cloud.client.patch(f"/api/v1/admin/hosts/{vm['host']}", headers=cloud.admin, json={"state": "down"})
    assert r.status_code == 200
    await _expire(cloud, job)
    await _sweep(cloud)
    final = (await cloud.client.get(f"/api/v1/jobs/{job}", headers=user)).json()
    assert final["status"] == "ERROR" and "is down" in final["error"]
    after = await cloud.server(user, vm["id"])
    assert after["operstate"] == "STARTED" and after["task"] is None


async def test_silent_hosts_go_down_and_come_back(cloud: Cloud) -> None:
    async with cloud.sessions() as s:
        await hosts.heartbeat(
            s, name="host-1", zone="default", cpus=16, ram_mb=32768, at=utcnow() - timedelta(seconds=60)
        )
        await hosts.heartbeat(s, name="host-2", zone="default", cpus=16, ram_mb=32768, at=utcnow())
        await hosts.heartbeat(s, name="host-new", zone="edge", cpus=8, ram_mb=8192, at=utcnow())
        await s.commit()
    async with cloud.sessions() as s:
        assert await hosts.mark_silent_down(s, silent_for=timedelta(seconds=15)) == ["host-1"]
        await s.commit()
    r = await cloud.client.get("/api/v1/admin/hosts", headers=cloud.admin)
    listed = {h["name"]: h for h in r.json()["items"]}
    assert listed["host-1"]["state"] == "down" and listed["host-2"]["state"] == "up"
    assert listed["host-new"]["zone"] == "edge" and listed["host-new"]["cpus"] == 8  # registered by its heartbeat
    # A create avoids the down host.
    user = await cloud.user()
    placed = (await cloud.create(user, zone="default"))["servers"][0]
    assert placed["host"] == "host-2"
    # Its next heartbeat revives it; a host an admin disabled stays disabled.
    await cloud.client.patch("/api/v1/admin/hosts/host-2", headers=cloud.admin, json={"state": "disabled"})
    async with cloud.sessions() as s:
        for name in ("host-1", "host-2"):
            await hosts.heartbeat(s, name=name, zone="default", cpus=16, ram_mb=32768, at=utcnow())
        await s.commit()
        states = dict((await s.execute(sa.select(Host.name, Host.state))).all())
    assert states["host-1"] == "up" and states["host-2"] == "disabled"
