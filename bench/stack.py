"""The stack's own floors: the least an action costs with this stack and no Nephos logic.

One app, served by uvicorn (uvloop, httptools) like ``nephos api``, with three endpoints driven
by ``bench/run.py`` with the same client and the same concurrency as Nephos:

- ``POST /http``: FastAPI parses a pydantic body and answers 202, nothing else. This is the "one
  HTTP request" of DESIGN.md's floor, measured like the engines' commits and messages.
- ``POST /act``: the same, plus one asyncpg single-row commit and one persistent message
  published with the broker's confirm (consumed and acked in this process): accepting an action.
- ``POST /action``: a whole action, the stack's floor of what Nephos does end to end. The request
  commits a row and publishes the job; an agent's stand-in (a consumer in this process) takes
  the job, publishes its result (persistent, confirmed) and acks; a dispatcher's stand-in takes
  the result, commits it on the row, and acks. The client waits, as ``bench/run.py`` does for
  Nephos, until the row shows the result.

No ORM, no rule, no second process: every figure is a ceiling for Nephos on this machine.

*The design's shape* (``STACK_SHAPE=1``): ``/action`` as above, but as DESIGN.md lays Nephos out
and as the issue asks its hot paths to be written: the agent's and the dispatcher's stand-ins
each run as a process of their own (``python bench/stack.py agent`` and ``... dispatcher``, with
the same environment), and both commits go through SQLAlchemy Core (an async engine on asyncpg,
a transaction of one statement) instead of asyncpg alone. Still no rule, no second statement.

    STACK_PG=postgresql://... STACK_AMQP=amqp://... uvicorn --app-dir bench stack:app
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import sqlalchemy as sa
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

TABLE = os.environ.get("STACK_TABLE", "bench_stack")
QUEUE = os.environ.get("STACK_QUEUE", "bench-stack")
#: The design's shape: stand-ins in processes of their own, commits through SQLAlchemy Core.
SHAPE = os.environ.get("STACK_SHAPE") == "1"
state: dict[str, Any] = {}

_row = sa.table(TABLE, sa.column("id", sa.Uuid), sa.column("at"), sa.column("body", sa.Text), sa.column("result"))
_INSERT = sa.insert(_row).values(id=sa.bindparam("id"), at=sa.func.now(), body=sa.bindparam("body"))
_DONE = sa.update(_row).where(_row.c.id == sa.bindparam("job")).values(result="done")


def core_engine() -> AsyncEngine:
    return create_async_engine(
        os.environ["STACK_PG"].replace("postgresql://", "postgresql+asyncpg://", 1), pool_size=20, max_overflow=0
    )


def agent_part(publish: aio_pika.abc.AbstractChannel, results: str) -> Any:
    """The agent's stand-in: take a job, publish its result (persistent, confirmed), ack."""

    async def on_job(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        reply = aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await publish.default_exchange.publish(reply, routing_key=results)
        await message.ack()

    return on_job


class Body(BaseModel):
    name: str
    flavor: str
    image: str


@contextlib.asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(os.environ["STACK_PG"], min_size=10, max_size=20)
    await pool.execute(
        f"CREATE TABLE IF NOT EXISTS {TABLE} (id uuid PRIMARY KEY, at timestamptz, body text, result text)"
    )
    connection = await aio_pika.connect_robust(os.environ["STACK_AMQP"])
    publish = await connection.channel(publisher_confirms=True)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=64)
    queue = await consume.declare_queue(QUEUE, durable=True)
    jobs = await consume.declare_queue(f"{QUEUE}-jobs", durable=True)
    results = await consume.declare_queue(f"{QUEUE}-results", durable=True)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:  # the dispatcher's part
        await pool.execute(f"UPDATE {TABLE} SET result = 'done' WHERE id = $1", uuid.UUID(message.body.decode()))
        await message.ack()

    await queue.consume(on_message)
    if not SHAPE:  # else ``agent`` and ``dispatcher`` below, as processes of their own
        await jobs.consume(agent_part(publish, results.name))
        await results.consume(on_result)
    engine = core_engine() if SHAPE else None
    state.update(pool=pool, channel=publish, jobs=jobs.name, engine=engine)
    yield
    if engine is not None:
        await engine.dispose()
    for q in (queue, jobs, results):
        await q.delete(if_unused=False, if_empty=False)
    await connection.close()
    await pool.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await pool.close()


app = FastAPI(lifespan=lifespan)


@app.post("/http", status_code=202)
async def http(body: Body) -> dict[str, str]:
    return {"job_id": str(uuid.uuid4())}


async def _commit_and_publish(body: Body, message: bytes | None, queue: str) -> dict[str, str]:
    """One single-row commit, then one persistent message, confirmed (the job's id by default)."""
    job = uuid.uuid4()
    if state["engine"] is not None and message is None:  # the design's shape: a whole action through Core
        async with state["engine"].begin() as connection:
            await connection.execute(_INSERT, {"id": job, "body": body.name})
    else:
        await state["pool"].execute(f"INSERT INTO {TABLE} VALUES ($1, now(), $2)", job, body.name)
    sent = aio_pika.Message(message or str(job).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await state["channel"].default_exchange.publish(sent, routing_key=queue)
    return {"job_id": str(job)}


@app.post("/action", status_code=202)
async def action(body: Body) -> dict[str, str]:
    return await _commit_and_publish(body, None, state["jobs"])


@app.post("/act", status_code=202)
async def act(body: Body) -> dict[str, str]:
    return await _commit_and_publish(body, body.model_dump_json().encode(), QUEUE)


async def stand_in(role: str) -> None:
    """The design's shape: the agent's stand-in (take a job, publish its result, confirmed, ack)
    or the dispatcher's (take a result, commit it on its row through SQLAlchemy Core, ack), as a
    process of its own, until SIGTERM."""
    connection = await aio_pika.connect_robust(os.environ["STACK_AMQP"])
    publish = await connection.channel(publisher_confirms=True)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=64)
    results = await consume.declare_queue(f"{QUEUE}-results", durable=True)
    engine = core_engine() if role == "dispatcher" else None

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert engine is not None
        async with engine.begin() as db:
            await db.execute(_DONE, {"job": uuid.UUID(message.body.decode())})
        await message.ack()

    if role == "agent":
        jobs = await consume.declare_queue(f"{QUEUE}-jobs", durable=True)
        await jobs.consume(agent_part(publish, results.name))
    else:
        await results.consume(on_result)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await connection.close()
    if engine is not None:
        await engine.dispose()


if __name__ == "__main__":
    import uvloop

    uvloop.run(stand_in(sys.argv[1]))
