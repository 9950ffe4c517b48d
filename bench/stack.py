"""The stack's own floor: the least an action accepted over HTTP costs with this stack.

One endpoint, served by uvicorn (uvloop, httptools) like ``nephos api``: FastAPI parses a
pydantic body, asyncpg commits one single-row INSERT, aio-pika publishes one persistent message
and waits for the broker's confirm, and a consumer in the same process takes it and acks it.
No ORM, no rule, no second process. ``bench/run.py`` drives it with the same client and the same
concurrency as Nephos, so Nephos's rate can be read against what the fixed stack itself allows
on this machine, next to the engines' floor.

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
    await pool.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id uuid PRIMARY KEY, at timestamptz, body text)")
    connection = await aio_pika.connect_robust(os.environ["STACK_AMQP"])
    publish = await connection.channel(publisher_confirms=True)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=64)
    queue = await consume.declare_queue(QUEUE, durable=True)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()

    await queue.consume(on_message)
    state.update(pool=pool, channel=publish)
    yield
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()
    await pool.execute(f"DROP TABLE IF EXISTS {TABLE}")
    await pool.close()


app = FastAPI(lifespan=lifespan)


@app.post("/act", status_code=202)
async def act(body: Body) -> dict[str, str]:
    job = uuid.uuid4()
    await state["pool"].execute(f"INSERT INTO {TABLE} VALUES ($1, now(), $2)", job, body.name)
    message = aio_pika.Message(body.model_dump_json().encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await state["channel"].default_exchange.publish(message, routing_key=QUEUE)
    return {"job_id": str(job)}
