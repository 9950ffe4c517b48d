"""Running reconciliation: ask the hosts for fresh inventories, compare, and (with ``fix``)
repair each finding in its own transaction; an orphan domain Nephos made for a DESTROYED VM is
destroyed by a job to its host, and any other orphan is only reported.

The same function serves ``POST /api/v1/admin/reconcile``, ``nephos admin reconcile`` and the
dispatcher's periodic pass.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.bus import Bus
from app.db import sqlstate
from app.ids import utcnow
from app.logic import reconcile, repairs
from app.logic.hoststate import HostState
from app.logic.jobs import Outbox
from app.messages import Action, InventoryRequest, JobMessage, encode
from app.models import Host, table_of

_hosts = table_of(Host)


#: Told how far a run is: (phase, done, total) -- "inventories" (hosts that answered), "repairs".
Progress = Callable[[str, int, int], None]


def _quiet(_phase: str, _done: int, _total: int) -> None:
    return None


#: Publishes jobs a repair wrote, after its commit (the outbox's sweeper would, later).
Publish = Callable[[list[uuid.UUID]], Awaitable[object]]


async def _later(_job_ids: list[uuid.UUID]) -> None:
    return None


async def fresh(
    sessions: async_sessionmaker[AsyncSession],
    bus: Bus,
    *,
    fix: bool,
    wait: float = 10.0,
    progress: Progress = _quiet,
    publish: Publish = _later,
) -> reconcile.Report:
    """Ask every host that is up for its inventory, wait for the answers (up to ``wait``
    seconds), then reconcile against them; a host that did not answer is reported."""
    started = utcnow()
    async with sessions() as session:
        # Hosts that are down (their agents silent) or whose agent never spoke (registered by
        # hand) are not waited for: they are reported as unreachable at once, never judged empty.
        names = list(
            await session.scalars(
                sa.select(_hosts.c.name).where(_hosts.c.state == HostState.UP, _hosts.c.last_heartbeat.is_not(None))
            )
        )
    for name in names:
        await bus.publish_job(name, encode(InventoryRequest(request_id=uuid.uuid4().hex)))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        async with sessions() as session:
            behind = (
                await session.execute(
                    sa.select(sa.func.count())
                    .select_from(_hosts)
                    .where(
                        _hosts.c.name.in_(names),
                        sa.or_(_hosts.c.inventory_at.is_(None), _hosts.c.inventory_at < started),
                    )
                )
            ).scalar_one()
        progress("inventories", len(names) - behind, len(names))
        if not behind:
            break
        await asyncio.sleep(0.1)
    report = await run(sessions, fix=fix, fresh_since=started, progress=progress, publish=publish)
    if fix:
        for orphan in report.orphans:
            where = f"domain {orphan['domain_name'] or '?'} ({orphan['domain_uuid']}) on {orphan['host']}"
            if reconcile.reapable(orphan):
                await send_untracked(bus, orphan["host"], uuid.UUID(orphan["domain_uuid"]), Action.DESTROY)
                report.actions.append(f"{where}: its VM is DESTROYED; destroy sent")
            else:
                why = "not made by Nephos" if not orphan["owned"] else "its VM is not DESTROYED"
                report.actions.append(f"{where}: {why}; left alone (an admin may destroy or adopt it)")
    return report


async def send_untracked(bus: Bus, host: str, domain_uuid: uuid.UUID, action: str) -> None:
    """A job with no row (reaping an orphan, marking an adopted domain): the agent runs it like
    any other, and the dispatcher drops its result (``purge``: no job to update)."""
    await bus.publish_job(
        host,
        encode(
            JobMessage(job_id=uuid.uuid4(), server_id=domain_uuid, action=action, host=host, params={"purge": True})
        ),
    )


async def run(
    sessions: async_sessionmaker[AsyncSession],
    *,
    fix: bool,
    fresh_since: datetime | None = None,
    progress: Progress = _quiet,
    publish: Publish = _later,
) -> reconcile.Report:
    async with sessions() as session:
        report = await reconcile.compare(session, fresh_since=fresh_since)
    if not fix:
        return report
    total, done = sum(len(getattr(report, kind)) for kind in repairs.FIXABLE), 0
    for kind in repairs.FIXABLE:
        for entry in getattr(report, kind):
            jobs = Outbox()
            async with sessions() as session:
                report.actions += await repairs.fix_entry(session, kind, entry, jobs)
                await session.commit()
            if jobs.job_ids:
                await publish(jobs.job_ids)
            done += 1
            progress("repairs", done, total)
    try:
        async with sessions() as session:
            report.actions += await repairs.fix_usage(session)
            await session.commit()
    except sa_exc.DBAPIError as exc:
        if sqlstate(exc) != "40001":
            raise
        # A result moved usage while the drift was measured: measure again on the next pass.
        report.actions.append("usage: changed while it was checked; the next pass checks it again")
    report.fixed = True
    return report


async def periodic_pass(
    sessions: async_sessionmaker[AsyncSession], bus: Bus, *, wait: float, publish: Publish = _later
) -> reconcile.Report:
    """The dispatcher's pass: reconcile with fixes, and store the report (``GET /admin/drift``)."""
    started, t0 = utcnow(), time.monotonic()
    report = await fresh(sessions, bus, fix=True, wait=wait, publish=publish)
    async with sessions() as session:
        await reconcile.record(session, report, started_at=started, duration_s=time.monotonic() - t0)
        await session.commit()
    return report
