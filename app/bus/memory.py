"""The in-memory bus of the embedded mode: the AMQP contract, inside one process."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from app.bus.base import Bus, Handler


@dataclass
class _Delivery:
    message_id: str
    body: bytes
    attempt: int = 1


class MemoryBus(Bus):
    def __init__(self, prefetch: int = 64) -> None:
        super().__init__()
        self.prefetch = prefetch
        self._queues: dict[str, asyncio.Queue[_Delivery]] = {}
        self.dead: list[bytes] = []
        self._running = False

    async def start(self) -> None:
        self._running = True

    async def close(self) -> None:
        self._running = False
        await self.drain_tasks()

    @property
    def connected(self) -> bool:
        return self._running

    async def dead_count(self) -> int:
        return len(self.dead)

    def _queue(self, name: str) -> asyncio.Queue[_Delivery]:
        return self._queues.setdefault(name, asyncio.Queue())

    def depth(self, name: str) -> int:
        return self._queue(name).qsize()

    async def publish_job(self, host: str, body: bytes, message_id: str | None = None) -> None:
        self._queue(f"jobs.{host}").put_nowait(_Delivery(message_id or uuid.uuid4().hex, body))

    async def publish_result(self, body: bytes, message_id: str | None = None) -> None:
        self._queue("results").put_nowait(_Delivery(message_id or uuid.uuid4().hex, body))

    async def publish_heartbeat(self, body: bytes) -> None:
        self._queue("heartbeats").put_nowait(_Delivery(uuid.uuid4().hex, body))

    async def consume_heartbeats(self, handler: Handler) -> None:
        self.spawn(self._consume("heartbeats", handler))

    async def consume_jobs(self, host: str, handler: Handler) -> None:
        self.spawn(self._consume(f"jobs.{host}", handler))

    async def consume_results(self, handler: Handler) -> None:
        self.spawn(self._consume("results", handler))

    async def _consume(self, name: str, handler: Handler) -> None:
        queue = self._queue(name)
        slots = asyncio.Semaphore(self.prefetch)
        while True:
            await slots.acquire()
            delivery = await queue.get()
            self.spawn(self._deliver(name, queue, delivery, handler, slots))

    async def _deliver(
        self,
        name: str,
        queue: asyncio.Queue[_Delivery],
        delivery: _Delivery,
        handler: Handler,
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            outcome = await self.run_handler(handler, delivery.body, delivery.attempt, name)
        except asyncio.CancelledError:
            # Unacknowledged when the consumer stops: back on the queue, as a broker would.
            queue.put_nowait(delivery)
            raise
        finally:
            slots.release()
        if outcome in ("retry", "again"):
            delivery.attempt += outcome == "retry"
            queue.put_nowait(delivery)
        elif outcome == "dead":
            self.dead.append(delivery.body)
