"""Publishing the outbox: jobs committed by a transaction go to their hosts' queues.

Always after the commit (never inside a transaction, so no row lock is held across the
network). The API hands the jobs it committed (the rows themselves, or their ids) to ``submit``
and answers at once; a background flusher publishes whatever has been submitted since its last
round concurrently (confirms awaited as a window, not one by one), at once when nothing else is
queued. Rows handed over are published as they are, without reading them back; ids are read
first. The confirmed jobs are marked SENT in one short transaction per ``mark_after`` seconds
(0.25), not one per round: under load and when idle alike, marking costs no transaction per
action. If the process dies in between, the jobs are still PENDING rows, and the dispatcher's
sweeper (``sweep``, after NEPHOS_RESEND_AFTER seconds) publishes them: nothing committed is
lost. A job whose publish failed stays PENDING too; agents treat a repeated job as done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import timedelta

from cryptography.fernet import Fernet
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.bus.base import Bus
from app.logic import jobs
from app.messages import JobMessage, encode
from app.models import Job

log = logging.getLogger("nephos.outbox")


def job_message(job: Job, cipher: Fernet) -> JobMessage:
    """The message for the job's agent, with the parameters the row keeps sealed opened."""
    assert job.host is not None
    return JobMessage(
        job_id=job.id,
        server_id=job.server_id,
        action=job.action,
        host=job.host,
        params=jobs.unsealed(job.params, cipher),
    )


class OutboxPublisher:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        bus: Bus,
        cipher: Callable[[], Fernet],
        *,
        timeout: float = 5.0,
        mark_after: float = 0.25,
    ) -> None:
        # The server key opens the parameters a job row keeps sealed; asked for when first needed.
        self.sessions, self.bus, self._cipher, self.timeout = sessions, bus, cipher, timeout
        self.mark_after = mark_after
        self._submitted: list[uuid.UUID | Job] = []
        self._confirmed: list[uuid.UUID] = []  # published, not yet marked SENT
        self._oldest = 0.0  # when the oldest of those was confirmed (monotonic)
        self._wake = asyncio.Event()
        self._stopping = False

    async def submit(self, jobs: Iterable[uuid.UUID | Job]) -> None:
        """Queue committed jobs (rows, or ids) for the flusher (``run``); returns at once."""
        self._submitted.extend(jobs)
        self._wake.set()

    def stop(self) -> None:
        """The flusher publishes what it has, then ends (``run`` returns)."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """The flusher: publish what was submitted, a round at a time, and mark what was
        confirmed SENT every ``mark_after`` seconds, until stopped."""
        while True:
            wait = None if not self._confirmed else max(0.0, self._oldest + self.mark_after - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            if self._submitted:
                batch, self._submitted = self._submitted, []
                try:
                    confirmed = await self._publish(batch)
                except Exception:  # never let the flusher die; the sweeper covers what it missed
                    log.exception("publishing %d jobs failed; the sweeper will resend them", len(batch))
                    confirmed = []
                if confirmed and not self._confirmed:
                    self._oldest = time.monotonic()
                self._confirmed += confirmed
            if self._confirmed and (self._stopping or time.monotonic() >= self._oldest + self.mark_after):
                marked, self._confirmed = self._confirmed, []
                await self._mark(marked)
            if self._stopping and not self._submitted and not self._confirmed:
                return

    async def publish(self, jobs_or_ids: Iterable[uuid.UUID | Job]) -> int:
        """Publish these jobs (rows just committed, or ids read back and sent if still PENDING)
        and mark them SENT; returns how many the broker confirmed (the sweeper's and
        reconciliation's way: marked at once)."""
        confirmed = await self._publish(list(jobs_or_ids))
        await self._mark(confirmed)
        return len(confirmed)

    async def _publish(self, items: list[uuid.UUID | Job]) -> list[uuid.UUID]:
        """Publish: rows as they are (just committed by this process), ids once read back and
        still PENDING. The ids the broker confirmed."""
        pending = [item for item in items if isinstance(item, Job)]
        ids = [item for item in items if not isinstance(item, Job)]
        if ids:
            try:
                async with self.sessions() as session:
                    pending += await jobs.to_publish(session, ids)
            except SQLAlchemyError:
                log.warning("could not read %d jobs to publish; the sweeper will", len(ids), exc_info=True)
        if not pending:
            return []
        outcomes = await asyncio.gather(*(self._send(job) for job in pending))
        return [job.id for job, ok in zip(pending, outcomes, strict=True) if ok]

    async def _mark(self, confirmed: list[uuid.UUID]) -> None:
        if not confirmed:
            return
        try:
            async with self.sessions() as session:
                await jobs.mark_sent(session, confirmed)
                await session.commit()
        except SQLAlchemyError:
            # Sent, but not marked: the sweeper sends them again, and agents treat a
            # repeated job as done. Never an error for the request that committed them.
            log.warning("could not mark %d jobs SENT; the sweeper will resend them", len(confirmed), exc_info=True)

    async def _send(self, job: Job) -> bool:
        try:
            message = encode(job_message(job, self._cipher()))
            await asyncio.wait_for(self.bus.publish_job(job.host or "", message, str(job.id)), self.timeout)
            return True
        except (TimeoutError, ConnectionError, OSError, RuntimeError) as exc:
            # The broker is away: the job stays PENDING and the sweeper sends it later.
            log.warning("job %s not published yet (%s): left for the sweeper", job.id, exc or type(exc).__name__)
            return False
        except Exception:
            log.exception("job %s not published: left for the sweeper", job.id)
            return False

    async def sweep(self, *, older_than: timedelta = timedelta(seconds=5)) -> int:
        """Send again what was committed but never confirmed as published."""
        async with self.sessions() as session:
            ids = await jobs.unsent(session, older_than=older_than)
        return await self.publish(ids) if ids else 0
