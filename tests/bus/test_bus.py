"""One behavioural suite for both transports: RabbitMQ (aio-pika) and the in-memory bus."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest

from app.bus import Bus, Poison
from app.bus.amqp import AmqpBus
from app.bus.memory import MemoryBus
from tests.conftest import AMQP_URL, amqp_prefix, need_amqp

HOSTS = ["h1", "h2"]


def _make(kind: str, prefix: str) -> Bus:
    if kind == "memory":
        return MemoryBus()
    return AmqpBus(AMQP_URL, prefix=prefix, prefetch=8, quorum=kind == "amqp-quorum")


@pytest.fixture(params=["memory", "amqp", "amqp-quorum"])
async def make_bus(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Bus]]:
    """A factory: every bus it makes shares one broker namespace (a unique prefix). The same
    behaviour holds with classic and with quorum queues (``NEPHOS_AMQP_QUORUM``)."""
    if request.param != "memory":
        need_amqp()
    prefix, made = amqp_prefix(), []
    shared = MemoryBus() if request.param == "memory" else None

    def factory() -> Bus:
        bus = shared or _make(request.param, prefix)
        made.append(bus)
        return bus

    yield factory
    for bus in made:
        await bus.close()
    if request.param != "memory":
        cleaner = AmqpBus(AMQP_URL, prefix=prefix, quorum=request.param == "amqp-quorum")
        await cleaner.start()
        await cleaner.purge_and_delete(HOSTS)
        await cleaner.close()


async def _until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_jobs_go_to_their_host_only(make_bus: Callable[[], Bus]) -> None:
    bus = make_bus()
    await bus.start()
    got: dict[str, list[bytes]] = {h: [] for h in HOSTS}
    for h in HOSTS:

        async def handler(body: bytes, h: str = h) -> None:
            got[h].append(body)

        await bus.consume_jobs(h, handler)
    await asyncio.gather(*(bus.publish_job("h1" if i % 3 else "h2", b"%d" % i) for i in range(30)))
    await _until(lambda: sum(map(len, got.values())) == 30)
    assert sorted(got["h2"]) == sorted(b"%d" % i for i in range(30) if i % 3 == 0)
    assert len(got["h1"]) == 20


async def test_a_job_published_before_its_agent_starts_waits_for_it(make_bus: Callable[[], Bus]) -> None:
    publisher = make_bus()
    await publisher.start()
    await publisher.publish_job("h1", b"early")
    agent = make_bus()
    await agent.start()
    got: list[bytes] = []

    async def handler(body: bytes) -> None:
        got.append(body)

    await agent.consume_jobs("h1", handler)
    await _until(lambda: got == [b"early"])


async def test_failed_handler_is_retried_then_acked_once(make_bus: Callable[[], Bus]) -> None:
    bus = make_bus()
    await bus.start()
    calls: Counter[bytes] = Counter()

    async def flaky(body: bytes) -> None:
        calls[body] += 1
        if body == b"flaky" and calls[body] < 3:
            raise RuntimeError("database is down")

    await bus.consume_results(flaky)
    await bus.publish_result(b"flaky")
    await bus.publish_result(b"fine")
    await _until(lambda: calls[b"flaky"] == 3 and calls[b"fine"] == 1)
    await asyncio.sleep(0.3)
    assert calls == {b"flaky": 3, b"fine": 1}
    assert await bus.dead_count() == 0


async def test_a_database_away_longer_than_every_retry_loses_nothing(make_bus: Callable[[], Bus]) -> None:
    """PostgreSQL restarting: the handler fails more times than a message may be retried, yet
    the message waits for the database instead of being dead-lettered."""
    from app.db import transient

    bus = make_bus()
    bus.unavailable_backoff = 0.02
    bus.transient = transient  # as every process that owns a database sets it (runtime.plane)
    await bus.start()
    calls: Counter[bytes] = Counter()
    times = bus.max_attempts * 2

    async def database_away(body: bytes) -> None:
        calls[body] += 1
        if calls[body] <= times:
            raise ConnectionRefusedError(111, "Connect call failed")

    await bus.consume_results(database_away)
    await bus.publish_result(b"result")
    await _until(lambda: calls[b"result"] == times + 1, timeout=20)
    await asyncio.sleep(0.3)
    assert calls == {b"result": times + 1}
    assert await bus.dead_count() == 0


async def test_poison_is_dead_lettered_and_the_queue_moves_on(make_bus: Callable[[], Bus]) -> None:
    bus = make_bus()
    await bus.start()
    seen: list[bytes] = []

    async def handler(body: bytes) -> None:
        if body == b"garbage":
            raise Poison("not a message")
        if body == b"always-fails":
            raise RuntimeError("never works")
        seen.append(body)

    bus.base_backoff = 0.001
    await bus.consume_results(handler)
    for body in (b"garbage", b"good-1", b"always-fails", b"good-2"):
        await bus.publish_result(body)
    await _until(lambda: len(seen) == 2)
    await _until(lambda: bus.dead_lettered == 2)
    async with asyncio.timeout(10):
        while await bus.dead_count() != 2:
            await asyncio.sleep(0.05)
    assert seen == [b"good-1", b"good-2"] or sorted(seen) == [b"good-1", b"good-2"]


async def test_unacked_message_is_redelivered_to_the_next_consumer(make_bus: Callable[[], Bus]) -> None:
    first = make_bus()
    await first.start()
    started = asyncio.Event()

    async def stuck(body: bytes) -> None:
        started.set()
        await asyncio.sleep(3600)  # the consumer dies before acknowledging

    await first.consume_results(stuck)
    await first.publish_result(b"important")
    await asyncio.wait_for(started.wait(), 10)
    await first.close()

    second = make_bus()
    await second.start()
    got: list[bytes] = []

    async def handler(body: bytes) -> None:
        got.append(body)

    await second.consume_results(handler)
    await _until(lambda: got == [b"important"])


async def test_competing_consumers_share_the_results_queue(make_bus: Callable[[], Bus]) -> None:
    a, b = make_bus(), make_bus()
    await a.start()
    if b is not a:
        await b.start()
    got: list[bytes] = []

    async def handler(body: bytes) -> None:
        got.append(body)

    await a.consume_results(handler)
    await b.consume_results(handler)
    await asyncio.gather(*(a.publish_result(b"%d" % i) for i in range(100)))
    await _until(lambda: len(got) == 100)
    assert sorted(got) == sorted(b"%d" % i for i in range(100))  # each exactly once


async def test_heartbeats_never_wait_behind_results(make_bus: Callable[[], Bus]) -> None:
    """A dispatcher with a backlog of results still hears every host: heartbeats have their own queue."""
    bus = make_bus()
    await bus.start()
    release = asyncio.Event()
    beats: list[bytes] = []

    async def slow(body: bytes) -> None:
        await release.wait()

    async def alive(body: bytes) -> None:
        beats.append(body)

    await bus.consume_results(slow)
    await bus.consume_heartbeats(alive)
    await asyncio.gather(*(bus.publish_result(b"%d" % i) for i in range(100)))
    await bus.publish_heartbeat(b"alive")
    await _until(lambda: beats == [b"alive"])
    release.set()
