"""Leases and scheduled actions: every VM ends on time, through the same rules as any request.

* A project's **policy** (admin-set; a project without one has ``DEFAULT``): how long a lease
  lasts, the most a VM may live in all (renewals included), when to warn, and what happens at
  the end (destroy, stop or suspend) -- or no lease at all. A VM gets its lease when it is
  created; a changed policy applies to leases given or renewed after it, so it never ends a VM
  sooner than the VM's owner was told.
* **Renewal** moves the end to now + the policy's duration, capped by the maximum lifetime; an
  admin may set an explicit end. It never takes the task lock: a VM busy with a job can be
  renewed.
* **Scheduled actions** (``schedules``) are one-off actions at a time (stop, start, suspend, resume, reboot,
  destroy); the lease's end is one of them (``kind`` "lease"). The dispatcher's sweeper runs
  each due one through ``actions`` as the system actor -- the task lock, the operstate table
  and quotas apply as to any request -- in the transaction that marks it done, so it runs
  exactly once however many dispatchers sweep (rows are claimed with SKIP LOCKED). One refused
  because a task was pending stays pending and is tried again on the next pass; one the table
  refuses for good (stop on a stopped VM) is done or failed, saying why, in an event.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic import events
from app.logic.actor import Actor, require_admin
from app.logic.errors import BadRequest, InvalidState, NotFound
from app.logic.operstate import Action, Operstate
from app.logic.pagination import Page, paginate
from app.models import LeasePolicy, ScheduledAction, Server, table_of

_actions, _servers, _policies = table_of(ScheduledAction), table_of(Server), table_of(LeasePolicy)

DAY = 86400
#: What happens at a lease's end: one of these actions.
ON_EXPIRY = (Action.DESTROY, Action.STOP, Action.SUSPEND)


class ScheduleState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ScheduleKind(StrEnum):
    USER = "user"
    LEASE = "lease"


@dataclass(frozen=True)
class Policy:
    duration_s: int | None = 90 * DAY
    max_lifetime_s: int | None = None
    warn_before_s: list[int] = field(default_factory=lambda: [7 * DAY, DAY])
    on_expiry: Action = Action.DESTROY


DEFAULT = Policy()


async def policy(session: AsyncSession, project_id: uuid.UUID) -> Policy:
    """The project's policy (the default when none was set)."""
    return policy_of(await session.get(LeasePolicy, project_id))


def policy_of(row: LeasePolicy | None) -> Policy:
    """A project's policy from its row, once read (``None``: none was set, the default)."""
    if row is None:
        return DEFAULT
    return Policy(row.duration_s, row.max_lifetime_s, list(row.warn_before_s), Action(row.on_expiry))


async def set_policy(session: AsyncSession, *, actor: Actor, project_id: uuid.UUID, new: Policy) -> Policy:
    """An admin sets a project's policy; leases already given keep their end."""
    require_admin(actor)
    if new.on_expiry not in ON_EXPIRY:
        raise BadRequest(f"on_expiry is one of {', '.join(ON_EXPIRY)}", field="on_expiry")
    for name, value in (("duration_s", new.duration_s), ("max_lifetime_s", new.max_lifetime_s)):
        if value is not None and value <= 0:
            raise BadRequest(f"{name} must be positive (or null)", field=name)
    if any(w <= 0 for w in new.warn_before_s):
        raise BadRequest("warnings are seconds before the end, each positive", field="warn_before_s")
    row = await session.get(LeasePolicy, project_id)
    if row is None:
        row = LeasePolicy(project_id=project_id)
        session.add(row)
    row.duration_s, row.max_lifetime_s = new.duration_s, new.max_lifetime_s
    row.warn_before_s = sorted(set(new.warn_before_s), reverse=True)
    row.on_expiry, row.updated_at = new.on_expiry.value, utcnow()
    await session.flush()
    return await policy(session, project_id)


def _cap(server: Server, rule: Policy) -> datetime | None:
    return server.created_at + timedelta(seconds=rule.max_lifetime_s) if rule.max_lifetime_s else None


async def _arm(session: AsyncSession, server: Server, end: datetime | None, on_expiry: Action) -> None:
    """The lease's end as the VM's one pending "lease" scheduled action (moved, not duplicated)."""
    row = (
        await session.scalars(
            sa.select(ScheduledAction).where(
                _actions.c.server_id == server.id,
                _actions.c.kind == ScheduleKind.LEASE,
                _actions.c.state == ScheduleState.PENDING,
            )
        )
    ).first()
    if end is None:
        if row is not None:
            row.state, row.reason, row.done_at = ScheduleState.CANCELLED, "the lease was lifted", utcnow()
        return
    if row is None:
        session.add(ScheduledAction(server_id=server.id, kind=ScheduleKind.LEASE, action=on_expiry.value, at=end))
    else:
        row.at, row.action = end, on_expiry.value


def give(servers: list[Server], rule: Policy) -> None:
    """New VMs' leases, from their project's policy: their end, set before they are written."""
    if rule.duration_s is None:
        return
    for server in servers:
        end = server.created_at + timedelta(seconds=rule.duration_s)
        cap = _cap(server, rule)
        server.lease_expires_at = min(end, cap) if cap else end


def arm_given(session: AsyncSession, servers: list[Server], rule: Policy) -> None:
    """Each new VM's lease end as its pending "lease" scheduled action, once the VMs are written
    (``servers.create`` calls ``give``, then this: a new VM has no action to move)."""
    session.add_all(
        ScheduledAction(server_id=s.id, kind=ScheduleKind.LEASE, action=rule.on_expiry.value, at=s.lease_expires_at)
        for s in servers
        if s.lease_expires_at is not None
    )


@dataclass(frozen=True)
class Renewed:
    lease_expires_at: datetime | None
    max_expires_at: datetime | None


async def renew(
    session: AsyncSession, *, actor: Actor, server_id: uuid.UUID, expires_at: datetime | None = None
) -> Renewed:
    """Renew the lease by the policy's duration from now, capped by the maximum lifetime; an
    admin may name the end. No task lock: the row is read without waiting for a job."""
    server = await session.get(Server, server_id)
    if server is None or not actor.sees(server.project_id):
        raise NotFound(f"server {server_id} not found", server_id=str(server_id))
    if server.operstate == Operstate.DESTROYED.value:
        raise InvalidState("a destroyed server has no lease", operstate=server.operstate, allowed_from=[])
    rule = await policy(session, server.project_id)
    cap = _cap(server, rule)
    if expires_at is not None:
        require_admin(actor)
        end: datetime | None = expires_at
    elif rule.duration_s is None:
        raise BadRequest("this project's policy gives no lease", field="duration_s")
    else:
        end = utcnow() + timedelta(seconds=rule.duration_s)
        if cap is not None:
            end = min(end, cap)
    await session.execute(_servers.update().where(_servers.c.id == server.id).values(lease_expires_at=end))
    server.lease_expires_at = end
    await _arm(session, server, end, rule.on_expiry)
    events.record(
        session,
        server,
        "lease_renewed",
        user_id=actor.user_id,
        message=f"the lease now ends {end:%Y-%m-%d %H:%M:%S} UTC",
    )
    return Renewed(end, cap)


async def ending_before(
    session: AsyncSession, *, actor: Actor, before: datetime, limit: int, cursor: str | None
) -> Page[Server]:
    """Admin: live VMs whose lease ends before a time, every project."""
    require_admin(actor)
    stmt = sa.select(Server).where(
        _servers.c.lease_expires_at.is_not(None),
        _servers.c.lease_expires_at < before,
        _servers.c.operstate != Operstate.DESTROYED.value,
    )
    return await paginate(session, stmt, _servers.c.id, limit=limit, cursor=cursor)
