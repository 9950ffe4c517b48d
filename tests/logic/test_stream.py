"""The stream's horizon on PostgreSQL, against a real server: a transaction still running in
this database holds back what comes after it (and loses nothing once it ends), while one
running in another database of the same cluster -- transaction ids are cluster-wide -- holds
back nothing."""

from __future__ import annotations

import uuid

import asyncpg

from app.db import make_engine, make_sessionmaker
from app.logic import stream
from app.models import NewServerEvent, Project, Server
from tests.conftest import _pg_url


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _event(sessions, project_id: uuid.UUID, note: str) -> None:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        server = Server(
            name=note,
            project_id=project_id,
            user_id=uuid.uuid4(),
            flavor_id=uuid.uuid4(),
            image_id=uuid.uuid4(),
            operstate="STOPPED",
        )
        stream.note(s, server, NewServerEvent(server_id=server.id, kind="edited", message=note))
        await s.commit()


async def _messages(sessions, project_id: uuid.UUID) -> list[str]:  # type: ignore[no-untyped-def]
    async with sessions() as s:
        events = await stream.after(s, stream.Cursor(), stream.Scope(projects=[project_id]))
    return [e.data["message"] for e in events]


async def test_a_running_transaction_holds_back_only_its_own_database(pg_url: str) -> None:
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    project_id = uuid.uuid4()
    async with sessions() as s:
        s.add(Project(id=project_id, name=f"s-{project_id.hex[:8]}"))
        await s.commit()
    elsewhere = await asyncpg.connect(_dsn(_pg_url("postgres")))
    here = await asyncpg.connect(_dsn(pg_url))
    try:
        # A writing transaction in another database: nothing here waits for it.
        other = elsewhere.transaction()
        await other.start()
        await elsewhere.fetchval("SELECT pg_current_xact_id()")
        await _event(sessions, project_id, "first")
        assert await _messages(sessions, project_id) == ["first"]

        # One in this database: what commits after it waits until it ends, then all of it shows.
        mine = here.transaction()
        await mine.start()
        await here.fetchval("SELECT pg_current_xact_id()")
        await _event(sessions, project_id, "second")
        assert await _messages(sessions, project_id) == ["first"]
        await mine.rollback()
        assert await _messages(sessions, project_id) == ["first", "second"]
        await other.rollback()
    finally:
        await elsewhere.close()
        await here.close()
        await engine.dispose()
