"""Retention: servers DESTROYED long ago leave the database (OpenNebula's finalize, lease-it's
clean-up), with their jobs, events, commissions, schedules, notifications and tags (and the
live stream's events of that age); each
project keeps a count of what was purged (``projects.purged_servers``). A server with a task
or a pending commission is never purged, whatever its age. ``NEPHOS_RETENTION_DAYS`` sets the
age (0 keeps everything)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic.operstate import Operstate
from app.logic.quotas import CommissionState
from app.models import (
    Commission,
    Ec2Tag,
    Job,
    Notification,
    Project,
    ScheduledAction,
    Server,
    ServerEvent,
    ServerSecurityGroup,
    StreamEvent,
    WebhookDelivery,
    table_of,
)

_servers, _commissions, _projects = table_of(Server), table_of(Commission), table_of(Project)


async def purge(session: AsyncSession, *, older_than: timedelta, limit: int = 500) -> int:
    """Purge up to ``limit`` servers DESTROYED more than ``older_than`` ago; returns how many.
    Live-stream events that old go too (a stream resumes within the retention period)."""
    stream = table_of(StreamEvent)
    old = sa.select(stream.c.id).where(stream.c.created_at < utcnow() - older_than).limit(limit * 10)
    await session.execute(stream.delete().where(stream.c.id.in_(old.scalar_subquery())))
    pending = sa.select(_commissions.c.id).where(
        _commissions.c.server_id == _servers.c.id, _commissions.c.state == CommissionState.PENDING.value
    )
    rows = (
        await session.execute(
            sa.select(_servers.c.id, _servers.c.project_id, _servers.c.ec2_id)
            .where(
                _servers.c.operstate == Operstate.DESTROYED.value,
                _servers.c.destroyed_at < utcnow() - older_than,
                _servers.c.task.is_(None),
                ~sa.exists(pending),
            )
            .order_by(_servers.c.destroyed_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    if not rows:
        return 0
    ids = [row.id for row in rows]
    for model in (ServerEvent, Job, Commission, ScheduledAction, ServerSecurityGroup, Notification, WebhookDelivery):
        table = table_of(model)
        await session.execute(table.delete().where(table.c.server_id.in_(ids)))
    await session.execute(table_of(Ec2Tag).delete().where(table_of(Ec2Tag).c.resource_id.in_([r.ec2_id for r in rows])))
    await session.execute(_servers.delete().where(_servers.c.id.in_(ids)))
    for project_id, n in Counter(row.project_id for row in rows).items():
        await session.execute(
            _projects.update().where(_projects.c.id == project_id).values(purged_servers=_projects.c.purged_servers + n)
        )
    return len(rows)
