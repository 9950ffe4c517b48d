"""A VM's history: every action asked, every job outcome, every out-of-band change. Each also
goes to the live stream (``stream``), and the ones a webhook carries (state changes, lease
warnings and actions) become deliveries (``webhooks``), when their transaction commits."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import stream, webhooks
from app.logic.pagination import Page, paginate
from app.models import NewServerEvent, Server, ServerEvent, table_of


def record(
    session: AsyncSession,
    server: Server,
    kind: str,
    *,
    job_id: uuid.UUID | None = None,
    action: str | None = None,
    before: str | None = None,
    after: str | None = None,
    message: str = "",
    user_id: uuid.UUID | None = None,
) -> NewServerEvent:
    event = NewServerEvent(
        server_id=server.id,
        job_id=job_id,
        kind=kind,
        action=action,
        operstate_from=before,
        operstate_to=after,
        message=message,
        user_id=user_id,
    )
    # No ORM object: the row is written with the stream's at the commit (``stream``), in the
    # same statement on PostgreSQL.
    stream.keep(session, event)
    webhooks.note(session, server, event)
    stream.note(session, server, event)
    return event


async def list_for(session: AsyncSession, server_id: uuid.UUID, *, limit: int, cursor: str | None) -> Page[ServerEvent]:
    table = table_of(ServerEvent)
    stmt = sa.select(ServerEvent).where(table.c.server_id == server_id)
    return await paginate(session, stmt, table.c.id, limit=limit, cursor=cursor)


async def history(session: AsyncSession, server_id: uuid.UUID) -> list[ServerEvent]:
    """Every event of a server, oldest first (the EC2 console output is this log)."""
    table = table_of(ServerEvent)
    stmt = sa.select(ServerEvent).where(table.c.server_id == server_id).order_by(table.c.created_at, table.c.id)
    return list(await session.scalars(stmt))
