"""/api/v1/events/stream: the live event stream (server-sent events) of ``logic.stream``.

* A reader sees its project's events (an admin: every project's with ``all_projects=true``, or
  one project's), optionally of one server and some kinds. Each event is ``id: <xid>-<serial>``,
  ``event: <kind>``, ``data: <JSON>``; ``Last-Event-ID`` (header, or ``last_event_id``) resumes
  right after that event, on any API process, after a restart too. Without it, the stream
  starts at the head (what happens from now on).
* **Woken, not polled**: on PostgreSQL every API process LISTENs on ``stream.CHANNEL`` (one
  connection each), and a transaction that wrote events notifies at commit; on SQLite (one
  process) a commit wakes the readers in the process. A reader still looks every
  ``SAFETY_POLL`` seconds, in case a notification was lost with its connection.
* **Bounded**: a reader holds no database connection between reads and reads at most
  ``BATCH`` events at a time; a client that does not take what is sent within
  ``SEND_TIMEOUT`` seconds is cut off (a final ``event: close`` says why, if it can still be
  sent) rather than buffered for.
* A comment line every ``KEEPALIVE`` seconds keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session
from starlette.types import Receive, Scope, Send

from app.api.deps import CommittingRoute, CurrentUser, StateDep, TxDep
from app.api.errors import responses
from app.logic import stream
from app.logic.errors import BadRequest

log = logging.getLogger("nephos.api")
router = APIRouter(prefix="/api/v1/events", tags=["events"], route_class=CommittingRoute)

BATCH = 200
SAFETY_POLL = 5.0
KEEPALIVE = 15.0
SEND_TIMEOUT = 10.0
PING = 30.0


class Waker:
    """Wakes every reader of this process when events may have been committed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def poke(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def poke_threadsafe(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.poke)

    async def wait(self, at_most: float) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a process runs one; tests, one each)
            self._loop, self._event = loop, asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), at_most)


#: This process's waker; ``listen`` feeds it from PostgreSQL, ``_committed`` from SQLite commits.
WAKER = Waker()


@sa_event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    # SQLite: this process's own commits are all there is (PostgreSQL notifies instead).
    if session.info.pop(stream.WRITTEN, False):
        WAKER.poke_threadsafe()


async def listen(database_url: str) -> None:
    """PostgreSQL: LISTEN on the stream's channel for the life of the process (reconnecting
    with a growing pause), poking the waker at each notification."""
    import asyncpg  # PostgreSQL only

    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    pause = 0.5
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(lambda *_, lost=lost: lost.set())
                await conn.add_listener(stream.CHANNEL, lambda *_: WAKER.poke())
                pause = 0.5
                WAKER.poke()  # whatever was committed while not listening
                while not lost.is_set():
                    # A connection can die without a word (a network cut): ping it now and then.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), PING)
                    if not lost.is_set():
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
            finally:
                conn.terminate()  # at once: a polite close waits on a server that may be gone
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("event stream: listening failed (%s); streams poll until it is back", exc)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 10.0)


class EventStream(Response):
    """The SSE response: reads from the database when woken, sends with a time limit."""

    media_type = "text/event-stream"

    def __init__(
        self, state: Any = None, cursor: stream.Cursor | None = None, scope: Any = None, status_code: int = 200
    ) -> None:
        # The defaults are for FastAPI, which reads the status of a response class off its signature.
        super().__init__(status_code=status_code, media_type=self.media_type)
        self.state, self.cursor, self.scope = state, cursor, scope

    async def _events(self) -> AsyncGenerator[bytes, None]:
        assert self.cursor is not None
        yield b"retry: 2000\n\n"
        loop, quiet = asyncio.get_running_loop(), 0.0  # seconds since anything was sent
        while True:
            async with self.state.sessions() as session:
                batch = await stream.after(session, self.cursor, self.scope, limit=BATCH)
            for event in batch:
                data = json.dumps(event.data, separators=(",", ":"))
                yield f"id: {event.cursor}\nevent: {event.kind}\ndata: {data}\n\n".encode()
                self.cursor = event.cursor
            if len(batch) == BATCH:
                continue  # more are waiting: read on at once
            if batch:
                quiet = 0.0
            elif quiet >= KEEPALIVE:
                yield b": keepalive\n\n"
                quiet = 0.0
            # Sleep until a commit may have added events (or the safety look, or the keepalive).
            before = loop.time()
            await WAKER.wait(min(SAFETY_POLL, KEEPALIVE - quiet))
            quiet += loop.time() - before

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        if self.cursor is None:  # the head is fixed before the client hears the stream began
            async with self.state.sessions() as session:
                self.cursor = await stream.head(session)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        left = asyncio.create_task(gone.wait())
        events = self._events()
        try:
            while not gone.is_set():
                nxt = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({nxt, left}, return_when="FIRST_COMPLETED")
                if nxt not in done:
                    nxt.cancel()
                    break
                chunk = nxt.result()
                try:
                    await asyncio.wait_for(
                        send({"type": "http.response.body", "body": chunk, "more_body": True}), SEND_TIMEOUT
                    )
                except TimeoutError:
                    log.info("event stream: a client took nothing for %.0f s: cut off", SEND_TIMEOUT)
                    with contextlib.suppress(Exception):
                        close = b'event: close\ndata: {"reason":"too slow: reconnect with Last-Event-ID"}\n\n'
                        await asyncio.wait_for(
                            send({"type": "http.response.body", "body": close, "more_body": True}), 1
                        )
                    break
            with contextlib.suppress(Exception):
                await asyncio.wait_for(send({"type": "http.response.body", "body": b"", "more_body": False}), 1)
        finally:
            watcher.cancel()
            left.cancel()
            with contextlib.suppress(Exception):
                await events.aclose()


@router.get(
    "/stream",
    responses={
        200: {
            "description": "Server-sent events (text/event-stream): `id: <xid>-<serial>`, `event: <kind>`, "
            "`data: <JSON>`, one per event, until the client leaves",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **responses(400, 403),
    },
)
async def event_stream(
    request: Request,
    tx: TxDep,
    state: StateDep,
    actor: CurrentUser,
    server_id: uuid.UUID | None = None,
    kind: Annotated[list[str], Query(description=f"Kinds to send (default: all): {', '.join(stream.KINDS)}")] = [],  # noqa: B006
    all_projects: Annotated[bool, Query(description="Admin only: every project's events")] = False,
    project_id: Annotated[uuid.UUID | None, Query(description="Admin only: this project's events")] = None,
    last_event_id: Annotated[str | None, Query(description="Resume after this event id")] = None,
    last_event_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventStream:
    """The caller's project's events as they are committed: VM state and task changes, job
    results, lease warnings and actions, quota changes. ``Last-Event-ID`` resumes without loss or
    repetition; without it the stream starts now."""
    scope = stream.scope_for(actor, all_projects=all_projects, project_id=project_id, server_id=server_id, kinds=kind)
    given = last_event_header or last_event_id
    cursor = stream.Cursor.parse(given)
    if given and cursor is None:
        raise BadRequest(f"Last-Event-ID {given[:40]!r} is not an event id of this stream", field="last_event_id")
    # The request's own transaction ends here: a stream holds no connection between its reads.
    await tx.session.close()
    return EventStream(state, cursor, scope)
