"""No task is held forever: a job past its deadline is resolved from what its host reports.

When the host is down, the job ends in ERROR at once. Otherwise the host's agent is asked for
a fresh inventory, and once one taken after the deadline is in, the job is resolved from it:
SUCCESS when the domain is where the action would have left it, ERROR otherwise -- and then
the VM takes the state the host reports, through the same out-of-band path as any surprise.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic import hosts, results
from app.logic.hoststate import HostState
from app.logic.jobs import FINAL
from app.logic.operstate import Action, Operstate, target_state
from app.models import Job, Server, table_of

_jobs = table_of(Job)


@dataclass
class Pass:
    resolved: list[uuid.UUID] = field(default_factory=list)
    need_inventory: set[str] = field(default_factory=set)


async def expired(session: AsyncSession, *, now: datetime | None = None, limit: int = 200) -> list[uuid.UUID]:
    stmt = (
        sa.select(_jobs.c.id)
        .where(_jobs.c.status.notin_([s.value for s in FINAL]), _jobs.c.deadline < (now or utcnow()))
        .order_by(_jobs.c.deadline)
        .limit(limit)
    )
    return list(await session.scalars(stmt))


def _observed(inventory: dict[str, object] | None, server_id: uuid.UUID) -> tuple[str, int | None]:
    for domain in (inventory or {}).get("domains", []):  # type: ignore[attr-defined]
        if domain["server_id"] == str(server_id):
            return str(domain["state"]), int(domain["vcpus"])
    return "missing", None


async def resolve(session: AsyncSession, job_id: uuid.UUID, into: Pass) -> None:
    """Resolve one expired job, or note that its host must be asked for a fresh inventory."""
    job = await session.get(Job, job_id)
    if job is None or job.status in FINAL:
        return
    host = await hosts.get(session, job.host, inventory=True)
    if host is None or host.state == HostState.DOWN:
        await results.apply_result(
            session, job_id=job.id, success=False, error=f"no result before the deadline, and host {job.host} is down"
        )
        into.resolved.append(job.id)
        return
    if host.inventory_at is None or host.inventory_at < job.deadline:
        into.need_inventory.add(host.name)
        return
    server = await session.get(Server, job.server_id)
    assert server is not None
    observed, vcpus = _observed(host.inventory, server.id)
    action = Action(job.action)
    now_state = Operstate(server.operstate)
    arrived = "missing"  # a migration's domain, on its target
    if action is Action.DESTROY:
        success = observed == "missing"
    elif action in (Action.CREATE, Action.RELEASE):
        success = observed == "running"
    elif action is Action.RESIZE:
        success = observed != "missing" and vcpus == job.params.get("vcpus")
    elif action in (Action.MIGRATE, Action.LIVE_MIGRATE):
        # The source cannot vouch for the target: the migration happened when the domain has
        # left the source and the target runs it, as the target's own fresh inventory says.
        if observed == "missing":
            found = await _arrived(session, job, server.id, into)
            if found is None:
                return  # the target must send a fresh inventory first
            arrived = found
        success = arrived != "missing"
    else:
        success = results.OBSERVED.get(observed) is target_state(action, now_state, True)
    await results.apply_result(
        session,
        job_id=job.id,
        success=success,
        error=None if success else f"no result before the deadline; host {host.name} reports the domain {observed}",
    )
    # A failed job leaves the VM as its host reports it; a migration that happened leaves it as
    # the target reports it (the same when the domain runs there, as a migration leaves it).
    migrated = success and action in (Action.MIGRATE, Action.LIVE_MIGRATE)
    reported = arrived if migrated else observed
    if reported != "missing" and (migrated or not success):
        await results.apply_state_change(
            session,
            server_id=server.id,
            observed=reported,
            seq=None,
            reason="resolved from the host's inventory after a deadline",
        )
    into.resolved.append(job.id)


async def _arrived(session: AsyncSession, job: Job, server_id: uuid.UUID, into: Pass) -> str | None:
    """A migration past its deadline whose domain left the source: the domain's state on the
    target as the target's inventory (taken after the deadline) reports it -- ``missing`` when
    the target is down or does not have it -- or None when that inventory must be asked for."""
    target = await hosts.get(session, job.params.get("target_host"), inventory=True)
    if target is None or target.state == HostState.DOWN:
        return "missing"
    if target.inventory_at is None or target.inventory_at < job.deadline:
        into.need_inventory.add(target.name)
        return None
    return _observed(target.inventory, server_id)[0]
