"""What a transaction leaves for its commit (its VMs' history rows, stream events, webhook
deliveries) goes, on PostgreSQL, in the same statement as its last change when the caller says
it is the last (``stream.with_out``): an action's job and mark, a create's quota move. On both
databases the history and the stream must say the same as when the commit wrote them: every
event once, with the VM's state and task as the transaction left them, and nothing of a
transaction that was refused after its events went out."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa

from app.logic import events, rows, stream
from app.models import Server, ServerEvent, table_of
from tests.api.helpers import server_in, statements_sent
from tests.conftest import Cloud

_events = table_of(ServerEvent)


async def _stream(cloud: Cloud, project_id: str) -> list[dict[str, Any]]:
    async with cloud.sessions() as s:
        found = await stream.after(s, stream.Cursor(), stream.Scope(projects=[uuid.UUID(project_id)]))
    return [{"kind": e.kind, **e.data} for e in found]


async def _history(cloud: Cloud, server_id: str) -> list[tuple[str, str | None]]:
    async with cloud.sessions() as s:
        found = await s.execute(
            sa.select(_events.c.kind, _events.c.action)
            .where(_events.c.server_id == uuid.UUID(server_id))
            .order_by(_events.c.created_at, _events.c.id)
        )
    return [(kind, action) for kind, action in found]


async def test_an_action_sends_its_event_with_its_job(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    before = len(await _stream(cloud, user["X-Project"]))
    with statements_sent(cloud) as sent:
        await cloud.act(user, vm["id"], "stop")
    writes = [s for s in sent if "INSERT INTO server_events" in s]
    assert len(writes) == 1, writes
    if cloud.engine.dialect.name == "postgresql":
        # The action's mark, its job and its event: one statement.
        assert "UPDATE servers SET" in writes[0] and "INSERT INTO jobs" in writes[0], writes[0]
    assert (await _history(cloud, vm["id"]))[-1] == ("action", "stop")
    new = (await _stream(cloud, user["X-Project"]))[before:]
    task = [e for e in new if e["kind"] == "server.task"]
    assert len(task) == 1, new
    # The state and task the action left, as the commit would have written them.
    assert (task[0]["event"], task[0]["operstate"], task[0]["task"]) == ("action", "STARTED", "STOP")


async def test_a_create_sends_its_events_with_its_quota_move(cloud: Cloud) -> None:
    user = await cloud.user()
    with statements_sent(cloud) as sent:
        vm = (await cloud.create(user))["servers"][0]
    writes = [s for s in sent if "INSERT INTO server_events" in s]
    assert len(writes) == 1, writes
    if cloud.engine.dialect.name == "postgresql":
        assert "UPDATE quotas" in writes[0], writes[0]
    assert await _history(cloud, vm["id"]) == [("action", "create")]
    kinds = [e["kind"] for e in await _stream(cloud, user["X-Project"])]
    assert kinds.count("server.state") == 1 and kinds.count("server.task") == 1, kinds
    assert kinds.count("quota.changed") == 1, kinds


async def test_a_create_refused_after_its_events_went_out_leaves_none(cloud: Cloud) -> None:
    """The quota check is the statement that carries the events; its refusal rolls them back."""
    user = await cloud.user(vm=1)
    first = (await cloud.create(user))["servers"][0]
    seen = await _stream(cloud, user["X-Project"])
    refused = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "vm", "flavor": "small", "image": "debian-12"}
    )
    assert refused.status_code == 413, refused.text
    assert await _stream(cloud, user["X-Project"]) == seen
    async with cloud.sessions() as s:
        servers = await s.scalar(
            sa.select(sa.func.count()).select_from(_events).where(_events.c.server_id != uuid.UUID(first["id"]))
        )
    assert servers == 0


async def test_inside_a_savepoint_the_commit_writes_them(cloud: Cloud) -> None:
    """A savepoint's rollback must find what it noted still waiting: ``with_out`` leaves it."""
    user = await cloud.user()
    vm = await server_in(cloud, user, "STOPPED")
    statement = sa.select(sa.literal(1))
    async with cloud.sessions() as s:
        server = await s.get(Server, uuid.UUID(vm["id"]))
        assert server is not None
        savepoint = await s.begin_nested()
        events.record(s, server, "edited", message="kept back")
        along = stream.with_out(s, (statement, {}))
        assert along[0] is statement  # nothing taken: the commit writes it
        await savepoint.rollback()
        events.record(s, server, "edited", message="kept")
        if rows.postgres(s):
            carried, params = stream.with_out(s, (statement, {}))
            assert carried is not statement and params["h_message"] == ["kept"]
            await s.execute(carried, params)
        await s.commit()
    async with cloud.sessions() as s:
        kept = list(
            await s.scalars(
                sa.select(_events.c.message).where(
                    _events.c.server_id == uuid.UUID(vm["id"]), _events.c.kind == "edited"
                )
            )
        )
    assert kept == ["kept"]
