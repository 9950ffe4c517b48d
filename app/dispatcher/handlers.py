"""Applying what agents report: one message, one transaction, then the ack.

Parse → apply through the logic layer (which locks the VM row and drops stale or duplicate
events by their sequence) → commit → return (the bus acks). A malformed message is ``Poison``
(dead-lettered and counted at once); a database error propagates, so the bus retries it with
backoff and dead-letters it only if it keeps failing.
"""

from __future__ import annotations

import logging
from collections import Counter

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.bus import Poison
from app.logic import hosts, jobs, results
from app.messages import RESULT, VERSION, Heartbeat, Inventory, JobStatus, StateChange

log = logging.getLogger("nephos.dispatcher")


class Dispatcher:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.counts: Counter[str] = Counter()

    async def handle(self, body: bytes) -> None:
        try:
            message = RESULT.validate_json(body)
        except ValidationError as exc:
            self.counts["malformed"] += 1
            raise Poison(f"malformed result: {exc.errors()[:1]}") from None
        if message.v != VERSION:
            self.counts["malformed"] += 1
            raise Poison(f"result version {message.v} is not {VERSION}")
        async with self.sessions() as session:
            outcome = await self._apply(session, message)
            await session.commit()
        self.counts[f"{message.kind}:{outcome}"] += 1

    async def _apply(self, session: AsyncSession, message: JobStatus | StateChange | Inventory | Heartbeat) -> str:
        if isinstance(message, JobStatus):
            if message.status == "RUNNING":
                return "running" if await jobs.mark_running(session, job_id=message.job_id) else "ignored"
            outcome = await results.apply_result(
                session,
                job_id=message.job_id,
                success=message.status == "SUCCESS",
                error=message.error,
                seq=message.seq,
                details=message.details,
                domain_state=message.domain_state,
            )
            if outcome is results.Outcome.UNKNOWN:
                if message.details.get("purge"):
                    return "purged"  # reconciliation destroyed an orphan: no job row to update
                self.counts["unknown_job"] += 1
                raise Poison(f"result for unknown job {message.job_id}")
            return outcome.value
        if isinstance(message, StateChange):
            return (
                await results.apply_state_change(
                    session,
                    server_id=message.server_id,
                    observed=message.domain_state,
                    seq=message.seq,
                    reason=message.reason,
                )
            ).value
        if isinstance(message, Heartbeat):
            await hosts.heartbeat(
                session,
                name=message.host,
                zone=message.zone,
                cpus=message.cpus,
                ram_mb=message.ram_mb,
                at=message.sent_at,
                migration_uri=message.migration_uri,
                hypervisor=message.hypervisor,
            )
            return "alive"
        stored = await hosts.store_inventory(
            session, name=message.host, inventory=message.model_dump(mode="json"), taken_at=message.taken_at
        )
        return "stored" if stored else "stale"
