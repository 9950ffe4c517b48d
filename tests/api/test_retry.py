"""A transaction PostgreSQL aborts to break a deadlock is run again, never answered with a 500.

The deadlock is made for real: another connection holds one of the project's quota rows, the
request (a create) locks the project and then waits for that row, and the other connection then
asks for the project's row. PostgreSQL breaks the cycle by aborting the request's transaction
(the other connection waits longer before it checks for deadlocks); the request runs again and
succeeds, once.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx

from tests.conftest import Cloud


async def _waiting_for_a_lock(conn: asyncpg.Connection, other_than: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> $1 "
            "AND wait_event_type = 'Lock'",
            other_than,
        )
    )


async def test_a_deadlocked_create_runs_again_and_succeeds_once(pg_cloud: Cloud) -> None:
    cloud = pg_cloud
    user = await cloud.user()
    project_id = user["X-Project"]
    dsn = cloud.engine.url.render_as_string(hide_password=False).replace("+asyncpg", "")
    other, watcher = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SET LOCAL deadlock_timeout = '60s'")  # the request's check fires first
        await other.execute(
            "UPDATE quotas SET usage = usage WHERE project_id = $1 AND resource = 'vm'", uuid.UUID(project_id)
        )
        request = asyncio.create_task(
            cloud.client.post(
                "/api/v1/servers", headers=user, json={"name": "dl", "flavor": "small", "image": "debian-12"}
            )
        )
        for _ in range(200):
            if await _waiting_for_a_lock(watcher, other.get_server_pid()):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the request never waited for the quota row")
        # Now close the cycle: the request holds the project's row and waits for ours.
        await other.execute("SELECT id FROM projects WHERE id = $1 FOR UPDATE", uuid.UUID(project_id))
        await tx.rollback()
        reply: httpx.Response = await request
    finally:
        await other.close()
        await watcher.close()
    assert reply.status_code == 202, reply.text
    assert "x-nephos-retry" not in reply.headers
    q = await cloud.quotas(user)
    assert q["vm"]["usage"] == 1  # ran again, and counted once
    listed = (await cloud.client.get("/api/v1/servers", headers=user)).json()["items"]
    assert [s["name"] for s in listed] == ["dl"]
