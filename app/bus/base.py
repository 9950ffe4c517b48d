"""The bus interface, shared retry policy and dead-letter accounting."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("nephos.bus")

Handler = Callable[[bytes], Awaitable[None]]


class Misconfigured(Exception):
    """The broker refuses this process's topology as configured (a queue declared otherwise
    before): retrying will not help."""


class Poison(Exception):
    """The message can never be handled (malformed, unknown version): dead-letter it now."""


class Bus(abc.ABC):
    max_attempts = 6
    base_backoff = 0.05
    max_backoff = 5.0
    unavailable_backoff = 0.5

    def __init__(self) -> None:
        self.dead_lettered = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Which handler errors are passing (the database restarting, a transaction that lost a
        # race): the process that owns the database says (``runtime.plane``); the bus knows none.
        self.transient: Callable[[BaseException], bool] = lambda _exc: False

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...

    @abc.abstractmethod
    async def publish_job(self, host: str, body: bytes, message_id: str | None = None) -> None: ...

    @abc.abstractmethod
    async def publish_result(self, body: bytes, message_id: str | None = None) -> None: ...

    @abc.abstractmethod
    async def publish_heartbeat(self, body: bytes) -> None:
        """An agent's "alive", on a queue of its own: liveness never waits behind a backlog of
        results (a dispatcher catching up must not judge the hosts that sent them silent)."""

    @abc.abstractmethod
    async def consume_jobs(self, host: str, handler: Handler) -> None: ...

    @abc.abstractmethod
    async def consume_heartbeats(self, handler: Handler) -> None: ...

    @abc.abstractmethod
    async def consume_results(self, handler: Handler) -> None: ...

    @abc.abstractmethod
    async def dead_count(self) -> int:
        """Messages parked in the dead-letter queue (all processes, where the broker knows)."""

    def backoff(self, attempt: int) -> float:
        return float(min(self.max_backoff, self.base_backoff * 2 ** max(0, attempt - 1)))

    async def run_handler(self, handler: Handler, body: bytes, attempt: int, where: str) -> str:
        """Run one delivery: ``"ack"``, ``"retry"`` (after the backoff), ``"again"`` (a retry that
        does not count: the database was away) or ``"dead"``."""
        try:
            await handler(body)
            return "ack"
        except Poison as exc:
            log.warning("dead-lettering a poison message on %s: %s", where, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.transient(exc):
                # The database is away (restarting), or the transaction lost a race: the message
                # is fine, so it waits without using up its attempts, never dead-lettered for it.
                log.warning("database unavailable while handling a message on %s; waiting: %s", where, exc)
                await asyncio.sleep(self.unavailable_backoff)
                return "again"
            if attempt < self.max_attempts:
                log.warning("handler failed on %s (attempt %d), retrying", where, attempt, exc_info=True)
                await asyncio.sleep(self.backoff(attempt))
                return "retry"
            log.exception("handler failed %d times on %s: dead-lettering", attempt, where)
        self.dead_lettered += 1
        return "dead"

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
