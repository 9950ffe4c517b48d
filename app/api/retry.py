"""Whole-request retries for transactions the database aborted because of a concurrent one.

Every request is one transaction, so a request whose transaction deadlocked or failed to
serialize (SQLSTATE 40P01 / 40001: PostgreSQL rolled it back, nothing it wrote survives and
nothing was published) can simply run again. The error handlers answer such a failure with a
503 that carries ``RETRY_HEADER``; this middleware, which sees every answer before the client
does, swallows that answer and runs the request again with the same body, up to ``attempts``
times with a short jittered pause. Only when every attempt failed does the client get the 503
(with ``Retry-After``, without the marker). A client never sees a 500 for a lost race.

It is a plain ASGI middleware (not ``BaseHTTPMiddleware``) so the body can be replayed and the
reply held back before anything reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("nephos.api")

#: Set by the error handlers on a reply that may be replaced by running the request again.
RETRY_HEADER = b"x-nephos-retry"
ATTEMPTS = 5


class RetryTransactions:
    def __init__(self, app: ASGIApp, attempts: int = ATTEMPTS, pause: float = 0.02) -> None:
        self.app, self.attempts, self.pause = app, attempts, pause

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive)
        if disconnected:
            return
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            retry = await self._attempt(dict(scope), body, receive, send, last)
            if not retry:
                return
            log.info(
                "%s %s: transaction lost a race (attempt %d of %d); running it again",
                scope.get("method"),
                scope.get("path"),
                attempt,
                self.attempts,
            )
            await asyncio.sleep(self.pause * attempt * (0.5 + random.random()))

    async def _attempt(self, scope: Scope, body: bytes, receive: Receive, send: Send, last: bool) -> bool:
        """Run the app once; ``True`` when its reply was a retriable failure and was held back."""
        sent_body = False

        async def replay() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, if it comes

        retry = False

        async def guard(message: Message) -> None:
            nonlocal retry
            if message["type"] == "http.response.start":
                headers: list[tuple[bytes, bytes]] = list(message.get("headers", []))
                if any(name == RETRY_HEADER for name, _ in headers):
                    if not last:
                        retry = True
                        return
                    message = {**message, "headers": [h for h in headers if h[0] != RETRY_HEADER]}
            if retry:
                return  # the held-back reply's body
            await send(message)

        await self.app(scope, replay, guard)
        return retry


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    while True:
        message: dict[str, Any] = dict(await receive())
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False
