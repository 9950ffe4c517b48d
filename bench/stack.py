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

    STACK_PG=postgresql://... STACK_AMQP=amqp://... uvicorn --app-dir bench stack:app
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
from fastapi import FastAPI
from pydantic import BaseModel

TABLE = os.environ.get("STACK_TABLE", "bench_stack")
QUEUE = os.environ.get("STACK_QUEUE", "bench-stack")
state: dict[str, Any] = {}


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

    async def on_job(message: aio_pika.abc.AbstractIncomingMessage) -> None:  # the agent's part
        reply = aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await publish.default_exchange.publish(reply, routing_key=results.name)
        await message.ack()

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:  # the dispatcher's part
        await pool.execute(f"UPDATE {TABLE} SET result = 'done' WHERE id = $1", uuid.UUID(message.body.decode()))
        await message.ack()

    await queue.consume(on_message)
    await jobs.consume(on_job)
    await results.consume(on_result)
    state.update(pool=pool, channel=publish, jobs=jobs.name)
    yield
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
