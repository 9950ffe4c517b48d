"""Scheduled actions: one-off actions on a VM at a time, the lease's end among them
(``leases``), run by the dispatcher's sweeper as the system actor through ``actions``."""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic import actions, events, notifications, servers
from app.logic.actor import SYSTEM, Actor
from app.logic.errors import BadRequest, InvalidState, NotFound, Protected, TaskPending
from app.logic.jobs import Outbox
from app.logic.leases import ScheduleKind, ScheduleState
from app.logic.operstate import Action, Operstate
from app.logic.pagination import Page, paginate
from app.models import ScheduledAction, table_of

_actions = table_of(ScheduledAction)

#: What may be scheduled.
SCHEDULABLE = (Action.STOP, Action.START, Action.SUSPEND, Action.RESUME, Action.REBOOT, Action.DESTROY)


async def schedule(
    session: AsyncSession, *, actor: Actor, server_id: uuid.UUID, action: Action, at: datetime
) -> ScheduledAction:
    if action not in SCHEDULABLE:
        raise BadRequest(f"action is one of {', '.join(SCHEDULABLE)}", field="action")
    server = await servers.get(session, actor=actor, server_id=server_id)
    if server.operstate == Operstate.DESTROYED.value:
        raise InvalidState("a destroyed server takes no action", operstate=server.operstate, allowed_from=[])
    row = ScheduledAction(
        server_id=server.id, kind=ScheduleKind.USER, action=action.value, at=at, user_id=actor.user_id
    )
    session.add(row)
    await session.flush()
    return row


async def listed(
    session: AsyncSession, *, actor: Actor, server_id: uuid.UUID, limit: int, cursor: str | None
) -> Page[ScheduledAction]:
    await servers.get(session, actor=actor, server_id=server_id)
    stmt = sa.select(ScheduledAction).where(_actions.c.server_id == server_id)
    return await paginate(session, stmt, _actions.c.id, limit=limit, cursor=cursor)


async def cancel(session: AsyncSession, *, actor: Actor, server_id: uuid.UUID, schedule_id: uuid.UUID) -> None:
    await servers.get(session, actor=actor, server_id=server_id)
    row = await session.get(ScheduledAction, schedule_id)
    if row is None or row.server_id != server_id or row.state != ScheduleState.PENDING:
        raise NotFound(f"no pending scheduled action {schedule_id}", schedule_id=str(schedule_id))
    if row.kind == ScheduleKind.LEASE:
        raise BadRequest("the lease's end is moved by renewing the lease, not cancelled", field="schedule_id")
    row.state, row.reason, row.done_at = ScheduleState.CANCELLED, "cancelled", utcnow()


# -- the sweeper's side ------------------------------------------------------------------------


async def due(session: AsyncSession, *, now: datetime | None = None, limit: int = 200) -> list[uuid.UUID]:
    """Pending actions whose time has come, oldest first."""
    stmt = (
        sa.select(_actions.c.id)
        .where(_actions.c.state == ScheduleState.PENDING, _actions.c.at <= (now or utcnow()))
        .order_by(_actions.c.at, _actions.c.id)
        .limit(limit)
    )
    return list(await session.scalars(stmt))


#: What "already there" means for each action: a due action whose effect the VM already has is
#: done, not failed (a lease stop on a VM its owner stopped).
_ALREADY = {
    Action.STOP: {Operstate.STOPPED},
    Action.START: {Operstate.STARTED},
    Action.SUSPEND: {Operstate.SUSPENDED},
    Action.RESUME: {Operstate.STARTED},
    Action.DESTROY: {Operstate.DESTROYED},
}


async def run(session: AsyncSession, outbox: Outbox, schedule_id: uuid.UUID) -> str:
    """Run one due action as the system actor, in the caller's transaction; returns what
    happened ("done", "failed", "retry", "taken": another sweeper has it, or it is no longer
    pending). The row is claimed first (SKIP LOCKED), so two sweepers never both run it."""
    row = (
        await session.scalars(
            sa.select(ScheduledAction)
            .where(_actions.c.id == schedule_id, _actions.c.state == ScheduleState.PENDING)
            .with_for_update(skip_locked=True)
        )
    ).first()
    if row is None:
        return "taken"
    server = await servers.get(session, actor=SYSTEM, server_id=row.server_id)
    action = Action(row.action)
    why = "the lease ended" if row.kind == ScheduleKind.LEASE else "it was scheduled for this time"
    if Operstate(server.operstate) in _ALREADY.get(action, set()):
        outcome, reason = ScheduleState.DONE, f"nothing to do: the server is already {server.operstate}"
    else:
        try:
            job = await actions.run(action, session, outbox, actor=SYSTEM, server_id=server.id)
        except TaskPending:
            row.attempts += 1  # a job is under way: the next pass tries again
            return "retry"
        except (InvalidState, Protected) as exc:
            outcome, reason = ScheduleState.FAILED, exc.message
        else:
            row.job_id = job.id if job is not None else None
            outcome, reason = ScheduleState.DONE, why
    row.state, row.reason, row.done_at = outcome, reason, utcnow()
    row.attempts += 1
    if row.kind == ScheduleKind.LEASE and outcome == ScheduleState.DONE:
        await notifications.lease_ended(session, server, action=action.value, lease_end=row.at, reason=reason)
    events.record(
        session,
        server,
        f"{row.kind}_action",
        action=action.value,
        job_id=row.job_id,
        before=server.operstate,
        message=f"{action.value}: {reason}",
    )
    return outcome.value
