"""The dispatcher's periodic passes: nothing committed is lost, no task is held forever.

* the outbox: jobs committed but never confirmed as published are published again;
* hosts: an agent silent for ``host_timeout`` marks its host down (no placement there);
* every ``lease_interval``: scheduled actions that are due (leases' ends among them) run through
  the logic layer as the system actor, each exactly once (``logic.schedules``); lease warnings
  whose time has come are recorded, each once (``logic.notifications``; ``notifier`` mails them
  and delivers webhooks, beside this pass); DESTROYED servers past the retention are purged;
* idempotency records past their 24 h are deleted (once a minute);
* deadlines: jobs past their deadline are resolved from their host's inventory, or ended in
  ERROR when the host is down (``logic.deadlines``); hosts whose inventory is older than a
  deadline are asked for a fresh one.

Any number of dispatchers may run these at once: every step is idempotent and row-locked.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.bus import Bus
from app.bus.outbox import OutboxPublisher
from app.dispatcher import reconciler
from app.dispatcher.pace import Pace
from app.logic import deadlines, hosts, idempotency, notifications, retention, schedules
from app.logic.jobs import Outbox
from app.messages import InventoryRequest, encode

log = logging.getLogger("nephos.dispatcher")


async def resolve_deadlines(sessions: async_sessionmaker[AsyncSession]) -> deadlines.Pass:
    """One pass over the jobs past their deadline, each resolved in its own transaction."""
    passed = deadlines.Pass()
    async with sessions() as session:
        expired = await deadlines.expired(session)
    for job_id in expired:
        async with sessions() as session:
            await deadlines.resolve(session, job_id, passed)
            await session.commit()
    return passed


async def run_schedules(sessions: async_sessionmaker[AsyncSession], outbox: OutboxPublisher) -> int:
    """Run the scheduled actions that are due (the leases' ends among them), each in its own
    transaction with its job; publish the jobs after each commit. Returns how many ran."""
    async with sessions() as session:
        due = await schedules.due(session)
    ran = 0
    for schedule_id in due:
        jobs = Outbox()
        async with sessions() as session:
            outcome = await schedules.run(session, jobs, schedule_id)
            await session.commit()
        if jobs.job_ids:
            await outbox.publish(jobs.job_ids)
        ran += outcome in ("done", "failed")
    return ran


class Sweepers:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        bus: Bus,
        outbox: OutboxPublisher,
        *,
        interval: float = 1.0,
        host_timeout: float = 15.0,
        resend_after: float = 3.0,
        reconcile_interval: float = 60.0,
        lease_interval: float = 30.0,
        retention_days: float = 30.0,
        pace: Pace | None = None,
    ) -> None:
        self.sessions, self.bus, self.outbox = sessions, bus, outbox
        self.interval, self.host_timeout, self.resend_after = interval, host_timeout, resend_after
        self.reconcile_interval = reconcile_interval
        self.lease_interval, self.retention_days = lease_interval, retention_days
        self.pace = pace or Pace()
        self._next_purge = 0.0

    async def purge(self) -> int:
        """Idempotency records no replay may use any more (they hold sealed replies)."""
        async with self.sessions() as session:
            purged = await idempotency.purge(session)
            await session.commit()
        return purged

    async def reconcile_forever(self) -> None:
        """The periodic reconciliation pass, whose report ``GET /api/v1/admin/drift`` shows."""
        await self.pace.every(self.reconcile_interval, self._reconcile, "reconciliation", wait_first=True)

    async def _reconcile(self) -> None:
        report = await reconciler.periodic_pass(
            self.sessions, self.bus, wait=min(10.0, self.reconcile_interval / 2), publish=self.outbox.publish
        )
        if not report.empty():
            log.warning("reconciliation found drift %s and fixed it: %s", report.counts(), report.actions)

    async def run(self) -> None:
        await self.pace.every(self.interval, self.once, "sweeper")

    async def once(self) -> dict[str, int]:
        sent = await self.outbox.sweep(older_than=timedelta(seconds=self.resend_after))
        async with self.sessions() as session:
            down = await hosts.mark_silent_down(session, silent_for=timedelta(seconds=self.host_timeout))
            await session.commit()
        if down:
            log.warning("hosts silent for %.0fs, marked down: %s", self.host_timeout, ", ".join(down))
        passed = await resolve_deadlines(self.sessions)
        for host in passed.need_inventory:
            await self.bus.publish_job(host, encode(InventoryRequest(request_id=uuid.uuid4().hex)))
        purged = 0
        if time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + 60.0
            purged = await self.purge()
        return {
            "resent": sent,
            "hosts_down": len(down),
            "deadlines_resolved": len(passed.resolved),
            "idempotency_purged": purged,
        }

    async def leases_forever(self) -> None:
        """The lease pass every ``lease_interval`` seconds (mail and webhooks run beside it, in
        ``notifier``, so neither ever delays a lease's end)."""
        await self.pace.every(self.lease_interval, self.lease_pass, "lease")

    async def lease_pass(self) -> dict[str, int]:
        """Due scheduled actions (leases' ends among them), then the warnings whose time has
        come, then the retention purge of long-DESTROYED servers."""
        ran = await run_schedules(self.sessions, self.outbox)
        async with self.sessions() as session:
            warned = await notifications.plan_warnings(session)
            await session.commit()
        purged = 0
        if self.retention_days > 0:
            async with self.sessions() as session:
                purged = await retention.purge(session, older_than=timedelta(days=self.retention_days))
                await session.commit()
        return {"scheduled_run": ran, "warnings_recorded": warned, "servers_purged": purged}
