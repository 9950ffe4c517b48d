"""How the dispatcher's loops wait between passes, and stop: between passes, never halfway.

A loop cancelled in the middle of a database call can leave a connection half-closed (aiosqlite's
close, shielded from the cancellation, may then never finish); so a stopping process first sets
``Pace.stopping``, each loop finishes the pass it is in and returns, and only what is still
running after a grace period is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("nephos.dispatcher")


class Pace:
    def __init__(self) -> None:
        self.stopping = asyncio.Event()

    async def wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; False (at once) when the process is stopping."""
        if self.stopping.is_set():
            return False
        try:
            async with asyncio.timeout(seconds):
                await self.stopping.wait()
        except TimeoutError:
            return True
        return False

    async def every(
        self, interval: float, step: Callable[[], Awaitable[Any]], what: str, *, wait_first: bool = False
    ) -> None:
        """Run ``step`` every ``interval`` seconds until the process stops, a failed pass logged
        (the database or the broker may be away; the next pass retries)."""
        if wait_first and not await self.wait(interval):
            return
        while not self.stopping.is_set():
            try:
                await step()
            except Exception:
                log.warning("%s pass failed", what, exc_info=True)
            await self.wait(interval)
