"""A small server-sent events reader for tests, over a real HTTP connection (httpx)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Sent:
    id: str
    kind: str
    data: dict[str, Any]


class Reader:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.comments: list[str] = []

    async def next(self, timeout: float = 10.0) -> Sent | None:
        """The next event, or None if none comes within ``timeout`` seconds (or the stream ends)."""
        fields: dict[str, str] = {}
        try:
            async with asyncio.timeout(timeout):
                async for line in self._lines:
                    if line == "":
                        if "data" in fields:
                            return Sent(
                                fields.get("id", ""), fields.get("event", "message"), json.loads(fields["data"])
                            )
                        continue
                    if line.startswith(":"):
                        self.comments.append(line)
                        continue
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
        except TimeoutError:
            return None
        return None

    async def until(self, predicate: Any, timeout: float = 30.0) -> list[Sent]:
        """Events read until one satisfies ``predicate`` (included); fails after ``timeout``."""
        seen: list[Sent] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            event = await self.next(deadline - loop.time())
            if event is None:
                break
            seen.append(event)
            if predicate(event):
                return seen
        raise AssertionError(f"the awaited event never came; saw {[(e.kind, e.data.get('event')) for e in seen]}")


@contextlib.asynccontextmanager
async def events(base: str, headers: dict[str, str], **params: Any) -> AsyncIterator[Reader]:
    """A stream of ``/api/v1/events/stream`` (``last_event_id`` as the header, as browsers send it)."""
    last = params.pop("last_event_id", None)
    extra = {"Last-Event-ID": last} if last else {}
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(30, read=None)) as client:
        async with client.stream(
            "GET", "/api/v1/events/stream", headers={**headers, **extra}, params=params
        ) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            assert response.headers["content-type"].startswith("text/event-stream")
            yield Reader(response)
