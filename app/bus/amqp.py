"""RabbitMQ through aio-pika: robust connection, durable queues, confirms, manual acks.

Topology (``prefix`` keeps test runs and deployments apart):

* ``{prefix}.jobs``: direct exchange; one durable queue ``{prefix}.jobs.{host}`` per host,
  bound with the host's name as routing key. The publisher declares a host's queue before its
  first job, so a job for an agent that has not started yet waits for it instead of being lost.
* ``{prefix}.results``: one durable queue, consumed by any number of dispatchers.
* ``{prefix}.dlx`` → ``{prefix}.dead``: where rejected messages are parked, for the admin.

Messages are persistent and published with ``mandatory`` on a confirming channel: a publish
returns only once the broker holds the message. Consumers ack after their handler returns.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection

from app.bus.base import Bus, Handler, Misconfigured

log = logging.getLogger("nephos.bus")


class AmqpBus(Bus):
    def __init__(self, url: str, *, prefix: str = "nephos", prefetch: int = 64, quorum: bool = False) -> None:
        super().__init__()
        self.url, self.prefix, self.prefetch, self.quorum = url, prefix, prefetch, quorum
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._jobs: aio_pika.abc.AbstractExchange | None = None
        self._declared: set[str] = set()
        self._declare_lock = asyncio.Lock()
        self._attempts: dict[str, int] = {}

    # -- names -------------------------------------------------------------------------
    def job_queue(self, host: str) -> str:
        return f"{self.prefix}.jobs.{host}"

    @property
    def results_queue(self) -> str:
        return f"{self.prefix}.results"

    @property
    def heartbeats_queue(self) -> str:
        return f"{self.prefix}.heartbeats"

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def _queue_args(self) -> dict[str, Any]:
        return {"x-dead-letter-exchange": f"{self.prefix}.dlx", **self._kind}

    @property
    def _kind(self) -> dict[str, Any]:
        """Quorum queues (replicated by Raft across a RabbitMQ cluster) when asked for; the
        broker refuses to redeclare an existing classic queue as one, so it is chosen before a
        prefix's first start."""
        return {"x-queue-type": "quorum"} if self.quorum else {}

    def _args_of(self, queue: str) -> dict[str, Any]:
        # Heartbeats are transient: a classic queue always (quorum queues hold every message on disk).
        return {"x-dead-letter-exchange": f"{self.prefix}.dlx"} if queue == self.heartbeats_queue else self._queue_args

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.url, client_properties={"connection_name": "nephos"})
        try:
            await self._declare()
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            await self.close()
            kind = "quorum" if self.quorum else "classic"
            raise Misconfigured(
                f"the broker refuses the {kind} queues of prefix {self.prefix!r} "
                f"({str(exc).split(' - ', 1)[-1]}); NEPHOS_AMQP_QUORUM must be what it was when the prefix was "
                "first used: to switch, start on a new NEPHOS_AMQP_PREFIX"
            ) from None

    async def _declare(self) -> None:
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=True)
        assert isinstance(channel, AbstractRobustChannel)
        self._publish_channel = channel
        dlx = await channel.declare_exchange(f"{self.prefix}.dlx", aio_pika.ExchangeType.FANOUT, durable=True)
        dead = await channel.declare_queue(self.dead_queue, durable=True, arguments=self._kind)
        await dead.bind(dlx)
        self._jobs = await channel.declare_exchange(f"{self.prefix}.jobs", aio_pika.ExchangeType.DIRECT, durable=True)
        await channel.declare_queue(self.results_queue, durable=True, arguments=self._queue_args)
        await channel.declare_queue(self.heartbeats_queue, durable=True, arguments=self._args_of(self.heartbeats_queue))

    async def close(self) -> None:
        await self.drain_tasks()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    # -- publishing ----------------------------------------------------------------------
    @staticmethod
    def _message(body: bytes, message_id: str | None) -> aio_pika.Message:
        return aio_pika.Message(
            body,
            message_id=message_id or uuid.uuid4().hex,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def _declare_host(self, host: str) -> None:
        if host in self._declared:
            return
        async with self._declare_lock:
            if host in self._declared:
                return
            assert self._publish_channel is not None and self._jobs is not None
            queue = await self._publish_channel.declare_queue(
                self.job_queue(host), durable=True, arguments=self._queue_args
            )
            await queue.bind(self._jobs, routing_key=host)
            self._declared.add(host)

    def _require(self) -> None:
        if self._publish_channel is None or self._jobs is None:
            raise ConnectionError("the bus is not connected")

    async def publish_job(self, host: str, body: bytes, message_id: str | None = None) -> None:
        self._require()
        await self._declare_host(host)
        assert self._jobs is not None
        await self._jobs.publish(self._message(body, message_id), routing_key=host, mandatory=True)

    async def publish_result(self, body: bytes, message_id: str | None = None) -> None:
        self._require()
        assert self._publish_channel is not None
        await self._publish_channel.default_exchange.publish(
            self._message(body, message_id), routing_key=self.results_queue, mandatory=True
        )

    async def publish_heartbeat(self, body: bytes) -> None:
        self._require()
        assert self._publish_channel is not None
        # Not persistent: a heartbeat is worth nothing after a broker restart.
        message = aio_pika.Message(body, message_id=uuid.uuid4().hex, content_type="application/json")
        await self._publish_channel.default_exchange.publish(message, routing_key=self.heartbeats_queue, mandatory=True)

    # -- consuming -----------------------------------------------------------------------
    async def _consume(self, queue_name: str, handler: Handler, bind_host: str | None = None) -> None:
        assert self._connection is not None
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        queue = await channel.declare_queue(queue_name, durable=True, arguments=self._args_of(queue_name))
        if bind_host is not None:
            jobs = await channel.declare_exchange(f"{self.prefix}.jobs", aio_pika.ExchangeType.DIRECT, durable=True)
            await queue.bind(jobs, routing_key=bind_host)

        async def on_message(message: AbstractIncomingMessage) -> None:
            # Each delivery runs on its own task, so up to ``prefetch`` are handled at once.
            self.spawn(self._deliver(queue_name, message, handler))

        await queue.consume(on_message)

    async def _deliver(self, where: str, message: AbstractIncomingMessage, handler: Handler) -> None:
        key = message.message_id or str(message.delivery_tag)
        attempt = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempt
        outcome = await self.run_handler(handler, message.body, attempt, where)
        if outcome == "again":
            self._attempts[key] = attempt - 1
        elif outcome != "retry":
            self._attempts.pop(key, None)
        if len(self._attempts) > 100_000:  # bound the bookkeeping of abandoned retries
            self._attempts.clear()
        if outcome == "ack":
            await message.ack()
        elif outcome in ("retry", "again"):
            await message.nack(requeue=True)
        else:
            await message.reject(requeue=False)

    async def consume_jobs(self, host: str, handler: Handler) -> None:
        await self._consume(self.job_queue(host), handler, bind_host=host)

    async def consume_results(self, handler: Handler) -> None:
        await self._consume(self.results_queue, handler)

    async def consume_heartbeats(self, handler: Handler) -> None:
        await self._consume(self.heartbeats_queue, handler)

    async def dead_count(self) -> int:
        assert self._publish_channel is not None
        # Ask the broker itself: aio-pika's robust channel answers a re-declaration from cache.
        underlay = await self._publish_channel.get_underlay_channel()
        declared = await underlay.queue_declare(self.dead_queue, passive=True)
        return int(declared.message_count or 0)

    async def purge_and_delete(self, hosts: list[str]) -> None:
        """Remove this prefix's queues and exchanges (tests clean up after themselves)."""
        assert self._connection is not None
        channel = await self._connection.channel()
        for name in [self.results_queue, self.heartbeats_queue, self.dead_queue, *(self.job_queue(h) for h in hosts)]:
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        for name in (f"{self.prefix}.jobs", f"{self.prefix}.dlx"):
            await channel.exchange_delete(name)
        await channel.close()
