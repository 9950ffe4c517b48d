"""Applying what agents report: in batches when results queue up, one by one when not.

Parse (a malformed message is ``Poison``: dead-lettered and counted at once) → queue → a
runner takes what is queued, up to ``batch`` messages, and applies them in one transaction
through the logic layer → commit → each message's handler returns (the bus acks it).

* When nothing is queued, a message is applied at once, alone: no window, no added latency.
* In a batch, every VM the messages touch is locked first, in id order; each VM's events are
  applied in the order of their sequence numbers, and a duplicate or stale one is caught by
  the VM's ``last_seq`` as it would be alone. Host and usage moves are summed and made last,
  one UPDATE per host and per project (``results.begin_batch`` / ``end_batch``).
* If the batch's transaction fails, for whatever reason, each of its messages is applied again
  alone, in its own transaction: the one that fails then fails alone (the bus retries it with
  backoff, or dead-letters it), and the others are acked.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.bus import Poison
from app.logic import hosts, jobs, results
from app.messages import RESULT, VERSION, Heartbeat, Inventory, JobStatus, StateChange

log = logging.getLogger("nephos.dispatcher")

Message = JobStatus | StateChange | Inventory | Heartbeat


@dataclass
class _Waiting:
    message: Message
    done: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def settle(self, outcome: str | None = None, error: BaseException | None = None) -> None:
        if self.done.done():  # its handler was cancelled (the process stops): it is redelivered
            return
        if error is not None:
            self.done.set_exception(error)
        else:
            self.done.set_result(outcome or "")


class Dispatcher:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, batch: int = 32, runners: int = 4) -> None:
        self.sessions = sessions
        self.batch, self.runners = max(1, batch), max(1, runners)
        self.counts: Counter[str] = Counter()
        self._queued: deque[_Waiting] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False

    async def handle(self, body: bytes) -> None:
        try:
            message = RESULT.validate_json(body)
        except ValidationError as exc:
            self.counts["malformed"] += 1
            raise Poison(f"malformed result: {exc.errors()[:1]}") from None
        if message.v != VERSION:
            self.counts["malformed"] += 1
            raise Poison(f"result version {message.v} is not {VERSION}")
        if self._closing:
            raise asyncio.CancelledError  # not acked: another dispatcher, or this one restarted, takes it
        if isinstance(message, Heartbeat):  # liveness waits behind no result: applied at once
            async with self.sessions() as session:
                outcome = await self._apply(session, message)
                await session.commit()
            self.counts[f"{message.kind}:{outcome}"] += 1
            return
        waiting = _Waiting(message)
        self._queued.append(waiting)
        # A runner when none runs; another only when the running ones each have a full batch
        # waiting. Runners that start while a few results wait would each apply one or two in a
        # transaction of their own, where the running one, once done, takes them all in one.
        if not self._running or (
            len(self._running) < self.runners and len(self._queued) > self.batch * len(self._running)
        ):
            runner = asyncio.create_task(self._run())
            self._running.add(runner)
            runner.add_done_callback(self._running.discard)
        outcome = await waiting.done
        self.counts[f"{message.kind}:{outcome}"] += 1

    async def close(self, grace: float = 5.0) -> None:
        """The process stops: the runners finish the batch they are in (cancelled after
        ``grace``); what is still queued is not acked, so the bus redelivers it."""
        self._closing = True
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=grace)
            for runner in late:
                runner.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        while self._queued:
            self._queued.popleft().done.cancel()

    async def _run(self) -> None:
        try:
            await self._drain()
        finally:
            # In the step that saw the queue empty: a result queued after it finds no runner
            # here, and starts one (a done-callback would say so a step later).
            self._running.discard(asyncio.current_task())

    async def _drain(self) -> None:
        while self._queued and not self._closing:
            taken: list[_Waiting] = []
            while self._queued and len(taken) < self.batch:
                waiting = self._queued.popleft()
                if not waiting.done.done():
                    taken.append(waiting)
            try:
                if len(taken) > 1:
                    await self._apply_batch(taken)
                elif taken:
                    await self._apply_alone(taken[0])
            except asyncio.CancelledError:
                for waiting in taken:  # not acked: their handlers end, and the bus redelivers them
                    waiting.done.cancel()
                raise

    async def _apply_alone(self, waiting: _Waiting) -> None:
        try:
            async with self.sessions() as session:
                about_a_vm = isinstance(waiting.message, JobStatus | StateChange)
                if about_a_vm:
                    results.begin_alone(session)
                outcome = await self._apply(session, waiting.message)
                if about_a_vm:
                    await results.end_alone(session)
                await session.commit()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the message's own failure: its handler raises it
            waiting.settle(error=exc)
        else:
            waiting.settle(outcome)

    async def _apply_batch(self, taken: list[_Waiting]) -> None:
        # Hosts' reports are not about VMs: they are applied alone, outside the batch's locks.
        alone = [w for w in taken if isinstance(w.message, Heartbeat | Inventory)]
        batch = [w for w in taken if not isinstance(w.message, Heartbeat | Inventory)]
        outcomes: list[str] = []
        try:
            if len(batch) > 1:
                async with self.sessions() as session:
                    owners = await results.begin_batch(
                        session,
                        job_ids={w.message.job_id for w in batch if isinstance(w.message, JobStatus)},
                        server_ids={w.message.server_id for w in batch if isinstance(w.message, StateChange)},
                    )
                    # A result for a job nobody knows is applied alone (purged, or poison).
                    alone += [w for w in batch if isinstance(w.message, JobStatus) and w.message.job_id not in owners]
                    batch = [
                        w for w in batch if not (isinstance(w.message, JobStatus) and w.message.job_id not in owners)
                    ]

                    def vm_and_seq(w: _Waiting) -> tuple[uuid.UUID, int] | None:
                        m = w.message
                        if isinstance(m, JobStatus):
                            owner = owners.get(m.job_id)
                            return None if owner is None else (owner, m.seq)
                        return (m.server_id, m.seq) if isinstance(m, StateChange) else None

                    batch = results.in_sequence(batch, vm_and_seq)
                    for waiting in batch:
                        outcomes.append(await self._apply(session, waiting.message))
                    await results.end_batch(session)
                    await session.commit()
                self.counts["batches"] += 1
                for waiting, outcome in zip(batch, outcomes, strict=True):
                    waiting.settle(outcome)
            else:
                alone += batch
        except asyncio.CancelledError:
            raise
        except Exception:
            log.info("a batch of %d results failed; applying them one by one", len(batch), exc_info=True)
            self.counts["batches_split"] += 1
            alone += batch
        for waiting in alone:
            await self._apply_alone(waiting)

    async def _apply(self, session: AsyncSession, message: Message) -> str:
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
