"""``rows.insert_new``: the session's new rows of several tables in one statement on PostgreSQL
(one per row on SQLite), whatever order they were added in, kept as persistent afterwards; a
changed row that names a new one is written after it."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from app.db import make_engine, make_sessionmaker
from app.ids import uuid7
from app.logic import rows
from app.models import Project, Webhook, WebhookDelivery, table_of

_projects, _deliveries = table_of(Project), table_of(WebhookDelivery)
_LOCK = sa.select(_projects.c.id).where(_projects.c.id == sa.bindparam("project")).with_for_update()


async def test_new_rows_go_in_one_statement_and_stay_in_the_session(db_url: str) -> None:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    sent: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    old, new = uuid7(), uuid7()
    try:
        async with sessions() as s:
            s.add(Project(id=old, name=f"r-{old.hex[-12:]}"))
            await s.flush()
            s.add(WebhookDelivery(project_id=old, kind="state"))
            await s.commit()
        async with sessions() as s:
            moved = (await s.scalars(sa.select(WebhookDelivery).where(_deliveries.c.project_id == old))).one()
            # Added children first: the statement's order is not the session's.
            hook = Webhook(project_id=new, url="http://127.0.0.1:9/", secret_sealed="sealed")
            deliveries = [WebhookDelivery(project_id=new, kind="state", body={"n": i}) for i in range(3)]
            s.add(hook)
            s.add_all(deliveries)
            s.add(Project(id=new, name=f"r-{new.hex[-12:]}"))
            moved.project_id = new  # a changed row naming a new one
            sent.clear()
            await rows.insert_new(s, along=(_LOCK, {"project": new}))
            if rows.postgres(s):
                assert len(sent) == 1, sent  # five rows and the lock: one round trip
            else:
                assert len(sent) == 4, sent  # an INSERT per table, then the lock
            assert all(sa.inspect(o).persistent for o in (hook, *deliveries))
            assert not s.new
            hook.url = "http://127.0.0.1:10/"  # kept in the session: a change is an UPDATE
            sent.clear()
            await s.flush()
            assert sorted(x.split()[0] for x in sent) == ["UPDATE", "UPDATE"], sent
            await s.commit()
        async with sessions() as s:
            assert (await s.get(Webhook, new)).url == "http://127.0.0.1:10/"  # type: ignore[union-attr]
            found = await s.scalars(sa.select(WebhookDelivery).where(_deliveries.c.project_id == new))
            assert sorted(d.body.get("n", -1) for d in found) == [-1, 0, 1, 2]
    finally:
        await engine.dispose()


async def test_connections_plan_each_statement_once_unless_told_not_to(pg_url: str) -> None:
    """``NEPHOS_DB_GENERIC_PLANS`` reaches every PostgreSQL connection of a process."""
    for generic, mode in ((True, "force_generic_plan"), (False, "auto")):
        engine = make_engine(pg_url, generic_plans=generic)
        try:
            async with engine.connect() as conn:
                assert (await conn.execute(sa.text("SHOW plan_cache_mode"))).scalar() == mode
        finally:
            await engine.dispose()


async def test_changed_rows_are_one_statement_of_one_shape_whatever_the_order(db_url: str) -> None:
    """``rows.changed_rows``: the loaded rows' changes as one statement, the same statement for
    the same kinds of change whatever order they were made in; once it has run (``written``),
    the rows are clean and the commit writes nothing more."""
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    a, b = uuid7(), uuid7()
    async with sessions() as s:
        s.add_all([Project(id=a, name=f"c-{a.hex[-12:]}"), Project(id=b, name=f"c-{b.hex[-12:]}")])
        s.add(Webhook(project_id=a, url="http://127.0.0.1:9/", secret_sealed="sealed"))
        await s.commit()
    made = []
    for n, (first, second) in enumerate(((a, b), (b, a))):
        async with sessions() as s:
            loaded = {p.id: p for p in await s.scalars(sa.select(Project).where(_projects.c.id.in_([a, b])))}
            hook = (await s.scalars(sa.select(Webhook).where(table_of(Webhook).c.project_id == a))).one()
            loaded[first].name += "-1"
            hook.url = f"http://127.0.0.1:9/hooks/{n}"
            loaded[second].name += "-2"
            found = rows.changed_rows(s)
            assert found is not None
            statement, params, objects = found
            made.append(statement)
            assert len(objects) == 3
            if rows.postgres(s):
                await s.execute(statement, params)
                rows.written(s, objects)
                assert not s.dirty
            await s.commit()
    assert made[0] is made[1]
    async with sessions() as s:
        names = dict(
            (await s.execute(sa.select(_projects.c.id, _projects.c.name).where(_projects.c.id.in_([a, b])))).all()
        )
        url = (await s.scalars(sa.select(Webhook.url).where(table_of(Webhook).c.project_id == a))).one()
    assert names == {a: f"c-{a.hex[-12:]}-1-2", b: f"c-{b.hex[-12:]}-2-1"}
    assert url == "http://127.0.0.1:9/hooks/1"
    await engine.dispose()
