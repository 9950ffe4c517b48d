"""Races: the task lock, quota serialization and host capacity hold under load.

Requests run concurrently through one app and the engine's pool, so each has its own
connection and transaction, as with many clients against one API process. On PostgreSQL
row locks serialize them; on SQLite (the embedded mode) ``BEGIN IMMEDIATE`` does.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from app.logic import placement
from app.models import Host, Server
from app.settings import HostSpec
from tests.api.helpers import server_in, statements_sent
from tests.conftest import Cloud, start_cloud, stop_cloud

BODY = {"name": "race", "flavor": "small", "image": "debian-12"}


async def test_twenty_starts_one_wins(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "STOPPED")
    url = f"/api/v1/servers/{server['id']}/actions"
    replies = await asyncio.gather(*(cloud.client.post(url, headers=user, json={"action": "start"}) for _ in range(20)))
    codes = Counter(r.status_code for r in replies)
    assert codes == {202: 1, 409: 19}
    winner = next(r.json()["job_id"] for r in replies if r.status_code == 202)
    for r in replies:
        if r.status_code == 409:
            assert r.json()["error"] == {
                "code": "TaskPending",
                "message": "task START is pending on this server",
                "details": {"task": "START", "job_id": winner},
            }
    q = await cloud.quotas(user)
    assert q["active_cpu"]["pending"] == 1  # one reservation, not twenty


async def test_destroy_during_a_pending_task_replaces_it(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "STARTED")
    url = f"/api/v1/servers/{server['id']}/actions"
    reboot, destroy = await asyncio.gather(
        cloud.client.post(url, headers=user, json={"action": "reboot"}),
        cloud.client.delete(f"/api/v1/servers/{server['id']}", headers=user),
    )
    assert destroy.status_code == 202
    after = await cloud.server(user, server["id"])
    assert after["task"] == "DESTROY" and after["task_job_id"] == destroy.json()["job_id"]
    # Whichever came first, a reboot after the destroy is refused and one before it was overtaken.
    assert reboot.status_code in (202, 409)


async def test_fifty_creates_with_room_for_ten(cloud: Cloud) -> None:
    user = await cloud.user(vm=10, cpu=100, ram=10**6, active_cpu=100, active_ram=10**6, disk=10**4)
    replies = await asyncio.gather(*(cloud.client.post("/api/v1/servers", headers=user, json=BODY) for _ in range(50)))
    codes = Counter(r.status_code for r in replies)
    assert codes == {202: 10, 413: 40}
    assert all(r.json()["error"]["details"]["resource"] == "vm" for r in replies if r.status_code == 413)
    q = await cloud.quotas(user)
    assert q["vm"]["usage"] == 10 and q["cpu"]["usage"] == 10 and q["ram"]["usage"] == 10 * 2048
    assert q["active_cpu"]["usage"] == 10 and q["disk"]["usage"] == 10 * 20
    listed = (await cloud.client.get("/api/v1/servers", headers=user)).json()["items"]
    assert len(listed) == 10


@pytest.fixture
async def one_host_cloud(db_url: str) -> AsyncIterator[Cloud]:
    cloud, manager = await start_cloud(db_url, hosts=[HostSpec("solo", 2, 8192)])
    yield cloud
    await stop_cloud(cloud, manager)


async def test_two_projects_filling_one_host(one_host_cloud: Cloud) -> None:
    cloud = one_host_cloud
    big = {"vm": 100, "cpu": 100, "ram": 10**6, "active_cpu": 100, "active_ram": 10**6, "disk": 10**4}
    a, b = await cloud.user(**big), await cloud.user(**big)
    # 8192 MiB holds four 2048 MiB VMs (RAM is not overcommitted; 2 CPUs x 4 would allow 8).
    replies = await asyncio.gather(*(cloud.client.post("/api/v1/servers", headers=h, json=BODY) for h in [a, b] * 15))
    codes = Counter(r.status_code for r in replies)
    assert codes == {202: 4, 503: 26}
    async with cloud.sessions() as s:
        host = (await s.scalars(sa.select(Host))).one()
        placed = list(await s.scalars(sa.select(Server).where(Server.__table__.c.host == "solo")))
    assert len(placed) == 4
    assert host.used_ram_mb == 4 * 2048 <= host.ram_mb * host.ram_ratio
    assert host.used_cpus == 4 <= host.cpus * host.cpu_ratio
    qa, qb = await cloud.quotas(a), await cloud.quotas(b)
    assert qa["vm"]["usage"] + qb["vm"]["usage"] == 4


async def test_concurrent_actions_on_many_servers_keep_usage_exact(cloud: Cloud) -> None:
    user = await cloud.user(vm=20, cpu=20, active_cpu=3, ram=10**6, active_ram=10**6, disk=10**4)
    servers = [await server_in(cloud, user, "STOPPED") for _ in range(8)]
    replies = await asyncio.gather(
        *(
            cloud.client.post(f"/api/v1/servers/{s['id']}/actions", headers=user, json={"action": "start"})
            for s in servers
        )
    )
    codes = Counter(r.status_code for r in replies)
    assert codes == {202: 3, 413: 5}  # active_cpu 3 admits three pending starts, not more
    for r in replies:
        if r.status_code == 202:
            await cloud.finish(r.json()["job_id"])
    q = await cloud.quotas(user)
    assert q["active_cpu"] == {"limit": 3, "usage": 3, "pending": 0}


async def test_a_create_waits_for_the_freest_host_in_one_statement_when_every_host_is_held(pg_url: str) -> None:
    """PostgreSQL: while other creates still open hold every host's row, a create waits for the
    freest one (as its snapshot saw it) in the same statement that looked for one nobody held,
    and reserves on it once they are done; each host's usage stays exact."""
    cloud, manager = await start_cloud(pg_url, hosts=[HostSpec("roomy", 8, 32768), HostSpec("snug", 8, 16384)])
    try:
        user = await cloud.user(vm=10, cpu=100, ram=10**6, active_cpu=100, active_ram=10**6, disk=10**4)
        async with cloud.sessions() as first, cloud.sessions() as second:
            held = [await placement.reserve(s, vcpus=1, ram_mb=2048, zone=None) for s in (first, second)]
            assert sorted(h.host for h in held) == ["roomy", "snug"]
            with statements_sent(cloud) as sent:
                create = asyncio.ensure_future(cloud.client.post("/api/v1/servers", headers=user, json=BODY))
                await asyncio.sleep(0.5)
                assert not create.done()  # waiting for a host's row
                await first.rollback()
                await second.rollback()
                r = await asyncio.wait_for(create, 10)
            assert r.status_code == 202 and r.json()["servers"][0]["host"] == "roomy", r.text
            assert sum(1 for s in sent if s.startswith("UPDATE hosts")) == 1, [s[:80] for s in sent]
        async with cloud.sessions() as s:
            used = {h.name: h.used_ram_mb for h in await s.scalars(sa.select(Host))}
        assert used == {"roomy": 2048, "snug": 0}
    finally:
        await stop_cloud(cloud, manager)


async def test_a_create_takes_the_next_host_while_the_freest_is_being_filled(pg_url: str) -> None:
    """PostgreSQL: while a create still open holds the freest host's row, another create goes to
    the next best host at once instead of waiting for it; each host's usage stays exact."""
    cloud, manager = await start_cloud(pg_url, hosts=[HostSpec("roomy", 8, 32768), HostSpec("snug", 8, 16384)])
    try:
        user = await cloud.user(vm=10, cpu=100, ram=10**6, active_cpu=100, active_ram=10**6, disk=10**4)
        async with cloud.sessions() as open_create:
            held = await placement.reserve(open_create, vcpus=1, ram_mb=2048, zone=None)
            assert held.host == "roomy"
            r = await asyncio.wait_for(cloud.client.post("/api/v1/servers", headers=user, json=BODY), 10)
            assert r.status_code == 202, r.text
            assert r.json()["servers"][0]["host"] == "snug"
            await open_create.rollback()
        r = await cloud.client.post("/api/v1/servers", headers=user, json=BODY)
        assert r.status_code == 202 and r.json()["servers"][0]["host"] == "roomy", r.text
        async with cloud.sessions() as s:
            used = {h.name: h.used_ram_mb for h in await s.scalars(sa.select(Host))}
        assert used == {"roomy": 2048, "snug": 2048}
    finally:
        await stop_cloud(cloud, manager)
