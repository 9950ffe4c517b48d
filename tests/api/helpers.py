"""Drive a server to a given operstate through the API and applied results."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from tests.conftest import Cloud


@contextlib.contextmanager
def statements_sent(cloud: Cloud) -> Iterator[list[str]]:
    """The SQL statements the cloud's engine sends while in the block, in order, each with its
    whitespace collapsed to single spaces (a list the caller may clear between steps)."""
    sent: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(" ".join(statement.split()))

    sa.event.listen(cloud.engine.sync_engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        sa.event.remove(cloud.engine.sync_engine, "before_cursor_execute", count)


async def server_in(cloud: Cloud, headers: dict[str, str], state: str, **create: Any) -> dict[str, Any]:
    """A server of ``headers``' project in ``state``, with no task pending."""
    if state == "HOLD":
        reply = await cloud.create(headers, hold=True, **create)
        return reply["servers"][0]
    reply = await cloud.create(headers, **create)
    sid, job = reply["servers"][0]["id"], reply["job_ids"][0]
    assert await cloud.finish(job, success=state != "ERROR") == "applied"
    if state in ("STOPPED", "SUSPENDED", "DESTROYED"):
        action = {"STOPPED": "stop", "SUSPENDED": "suspend", "DESTROYED": "destroy"}[state]
        job = (await cloud.act(headers, sid, action))["job_id"]
        assert await cloud.finish(job) == "applied"
    server = await cloud.server(headers, sid)
    assert server["operstate"] == state and server["task"] is None, server
    return server


def usage(q: dict[str, Any]) -> dict[str, int]:
    return {k: v["usage"] for k, v in q.items()}


def pending(q: dict[str, Any]) -> dict[str, int]:
    return {k: v["pending"] for k, v in q.items()}


SMALL = (1, 2048, 20)
MEDIUM = (2, 4096, 40)


def expected_usage(state: str, flavor: tuple[int, int, int] = SMALL) -> dict[str, int]:
    """A project with one VM in ``state`` (DESIGN.md: active = BUILD, STARTED, SUSPENDED, ERROR)."""
    if state == "DESTROYED":
        return dict.fromkeys(("vm", "cpu", "ram", "disk", "active_cpu", "active_ram", "public_ip"), 0)
    cpu, ram, disk = flavor
    active = state in ("BUILD", "STARTED", "SUSPENDED", "ERROR")
    return {
        "vm": 1,
        "cpu": cpu,
        "ram": ram,
        "disk": disk,
        "active_cpu": cpu if active else 0,
        "active_ram": ram if active else 0,
        "public_ip": 0,
    }
