"""Notifications and retention on both databases: a warning is recorded once however many
sweepers race, a claim is held by one sender, a failure backs off, a renewal re-arms, webhook
deliveries follow only committed events, and long-DESTROYED servers are purged and counted."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from app.ids import utcnow
from app.logic import events, notifications, retention, stream, webhooks
from app.models import Notification, Server, WebhookDelivery, table_of
from tests.api.helpers import server_in
from tests.conftest import Cloud

_notes, _servers, _deliveries = table_of(Notification), table_of(Server), table_of(WebhookDelivery)


async def _leased(cloud: Cloud, seconds_left: float) -> tuple[dict[str, str], dict[str, str]]:
    """A user (with an address) and a started VM whose lease ends in ``seconds_left``."""
    project = (await cloud.project())["id"]
    r = await cloud.client.post(
        "/api/v1/admin/users",
        headers=cloud.admin,
        json={"name": "dana", "email": "dana@example.org", "project_id": project},
    )
    user = {"Authorization": f"Bearer {r.json()['token']}", "X-Project": project}
    r = await cloud.client.put(
        f"/api/v1/admin/projects/{project}/lease-policy",
        headers=cloud.admin,
        json={"duration_s": 3600, "warn_before_s": [600, 60], "on_expiry": "stop"},
    )
    assert r.status_code == 200
    vm = await server_in(cloud, user, "STARTED")
    end = (datetime.now(UTC) + timedelta(seconds=seconds_left)).isoformat()
    r = await cloud.client.post(f"/api/v1/servers/{vm['id']}/lease", headers=cloud.admin, json={"expires_at": end})
    assert r.status_code == 200
    return user, vm


async def _plan(cloud: Cloud) -> int:
    async with cloud.sessions() as s:
        made = await notifications.plan_warnings(s)
        await s.commit()
    return made


async def test_the_most_urgent_warning_is_recorded_once_however_many_sweep(cloud: Cloud) -> None:
    _, vm = await _leased(cloud, 30)  # inside both windows: only "1 minute" is said
    made = await asyncio.gather(*(_plan(cloud) for _ in range(4)))
    assert sum(made) == 1, made
    async with cloud.sessions() as s:
        rows = (await s.execute(sa.select(_notes.c.offset_s, _notes.c.kind))).all()
    assert [tuple(r) for r in rows] == [(60, notifications.Kind.WARNING)]
    events = (await cloud.client.get(f"/api/v1/servers/{vm['id']}/events", headers=cloud.admin)).json()["items"]
    assert [e["kind"] for e in events].count("lease_warning") == 1
    # A renewal moves the end: the warnings of the new end are new.
    r = await cloud.client.post(
        f"/api/v1/servers/{vm['id']}/lease",
        headers=cloud.admin,
        json={"expires_at": (datetime.now(UTC) + timedelta(seconds=40)).isoformat()},
    )
    assert r.status_code == 200
    assert await _plan(cloud) == 1
    assert await _plan(cloud) == 0


async def test_a_claim_is_held_by_one_sender_and_a_failure_backs_off(cloud: Cloud) -> None:
    await _leased(cloud, 30)
    await _plan(cloud)

    async def claim() -> list[notifications.Digest]:
        async with cloud.sessions() as s:
            got = await notifications.claim(s, hold=60)
            await s.commit()
        return got

    first, second = await asyncio.gather(claim(), claim())
    assert sorted([len(first), len(second)]) == [0, 1]
    digest = (first or second)[0]
    assert digest.email == "dana@example.org"
    subject, body = notifications.compose(digest, api_url="https://cloud.example.org")
    assert "1 leases ending in 1 minute" in subject
    assert f"POST https://cloud.example.org/api/v1/servers/{digest.items[0].server_id}/lease" in body
    async with cloud.sessions() as s:
        await notifications.failed(s, digest.ids, error="down", retry=30)
        await s.commit()
    assert await claim() == []  # backed off: not before next_at
    async with cloud.sessions() as s:
        row = (await s.execute(sa.select(_notes.c.attempts, _notes.c.next_at, _notes.c.sent_at))).one()
    assert row.attempts == 1 and row.next_at > utcnow() + timedelta(seconds=25) and row.sent_at is None


async def test_webhook_deliveries_follow_committed_events_only(cloud: Cloud) -> None:
    user = await cloud.user()
    r = await cloud.client.put(
        "/api/v1/webhook", headers=user, json={"url": "http://127.0.0.1:9/x", "secret": "0123456789abcdef"}
    )
    assert r.status_code == 200, r.text
    vm = await server_in(cloud, user, "STARTED")
    await server_in(cloud, await cloud.user(), "STARTED")  # a project without a webhook: no deliveries
    async with cloud.sessions() as s:
        kinds = list(await s.scalars(sa.select(_deliveries.c.kind).order_by(_deliveries.c.created_at)))
        owners = set(await s.scalars(sa.select(_deliveries.c.project_id)))
    assert kinds == ["server.state", "server.state"]  # created (BUILD), then STARTED
    assert owners == {uuid.UUID(user["X-Project"])}
    # A transaction that records a state change and rolls back leaves no delivery.
    async with cloud.sessions() as s:
        server = await s.get(Server, uuid.UUID(vm["id"]))
        assert server is not None
        events.record(s, server, "out_of_band", before="STARTED", after="STOPPED")
        await s.flush()
        await s.rollback()
    async with cloud.sessions() as s:
        assert await webhooks.pending_count(s, uuid.UUID(user["X-Project"])) == 2
    # The signature a receiver checks.
    body = json.dumps({"a": 1}).encode()
    header = webhooks.sign("0123456789abcdef", body)
    assert webhooks.verify("0123456789abcdef", body, header)
    assert not webhooks.verify("0123456789abcdef", body + b" ", header)
    assert not webhooks.verify("another-secret-!!", body, header)
    stale = webhooks.sign("0123456789abcdef", body, int(time.time()) - 3600)
    assert not webhooks.verify("0123456789abcdef", body, stale)


async def test_a_rolled_back_savepoint_forgets_only_what_was_recorded_inside_it(cloud: Cloud) -> None:
    """History rows, stream events and webhook deliveries wait for the commit: a savepoint's
    rollback drops those recorded inside it and keeps those recorded before; a transaction's
    rollback drops them all."""
    user = await cloud.user()
    r = await cloud.client.put(
        "/api/v1/webhook", headers=user, json={"url": "http://127.0.0.1:9/x", "secret": "0123456789abcdef"}
    )
    assert r.status_code == 200, r.text
    vm = await server_in(cloud, user, "STARTED")
    project = uuid.UUID(user["X-Project"])
    async with cloud.sessions() as s:
        delivered = await webhooks.pending_count(s, project)
        streamed = len(await stream.after(s, stream.Cursor(), stream.Scope(projects=[project])))
    async with cloud.sessions() as s:
        server = await s.get(Server, uuid.UUID(vm["id"]))
        assert server is not None
        events.record(s, server, "out_of_band", before="STARTED", after="STOPPED", message="kept")
        try:
            async with s.begin_nested():
                events.record(s, server, "out_of_band", before="STOPPED", after="STARTED", message="dropped")
                raise RuntimeError("the savepoint rolls back")
        except RuntimeError:
            pass
        await s.commit()
    async with cloud.sessions() as s:
        events.record(s, server, "out_of_band", before="STOPPED", after="STARTED", message="rolled back")
        await s.rollback()
    history = (await cloud.client.get(f"/api/v1/servers/{vm['id']}/events", headers=user)).json()["items"]
    assert [e["message"] for e in history if e["kind"] == "out_of_band"] == ["kept"]
    async with cloud.sessions() as s:
        assert await webhooks.pending_count(s, project) == delivered + 1
        after = await stream.after(s, stream.Cursor(), stream.Scope(projects=[project]))
    assert [e.data["message"] for e in after[streamed:]] == ["kept"]


async def test_retention_purges_long_destroyed_servers_and_counts_them(cloud: Cloud) -> None:
    user = await cloud.user()
    gone = await server_in(cloud, user, "DESTROYED")
    kept = await server_in(cloud, user, "DESTROYED")
    alive = await server_in(cloud, user, "STARTED")
    async with cloud.sessions() as s:
        await s.execute(
            _servers.update()
            .where(_servers.c.id == uuid.UUID(gone["id"]))
            .values(destroyed_at=utcnow() - timedelta(days=31))
        )
        await s.commit()
    async with cloud.sessions() as s:
        assert await retention.purge(s, older_than=timedelta(days=30)) == 1
        await s.commit()
    assert (await cloud.client.get(f"/api/v1/servers/{gone['id']}", headers=user)).status_code == 404
    for still in (kept, alive):
        assert (await cloud.client.get(f"/api/v1/servers/{still['id']}", headers=user)).status_code == 200
    project = (await cloud.client.get(f"/api/v1/admin/projects/{user['X-Project']}", headers=cloud.admin)).json()
    assert project["purged_servers"] == 1
    async with cloud.sessions() as s:
        assert await retention.purge(s, older_than=timedelta(days=30)) == 0
