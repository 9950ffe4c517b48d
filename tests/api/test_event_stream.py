"""The event stream's response against an ASGI peer that stops reading: it is cut off after
``SEND_TIMEOUT`` with a last ``event: close`` offered, and the stream ends -- nothing is held
for it. (The stream itself, over real HTTP, is ``tests/e2e/test_stream.py``.)"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from app.api import events
from app.logic import stream
from tests.conftest import Cloud


async def test_a_client_that_stops_reading_is_cut_off(cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "SEND_TIMEOUT", 0.3)
    user = await cloud.user()
    r = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "vm", "flavor": "small", "image": "debian-12"}
    )
    assert r.status_code == 202
    scope = stream.Scope(projects=[uuid.UUID(user["X-Project"])])
    response = events.EventStream(cloud.state, stream.Cursor(), scope)
    sent: list[dict[str, Any]] = []
    stuck = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        body = message.get("body", b"")
        if b"event: " in body and b"event: close" not in body:
            await stuck.wait()  # the peer's window is full: this send never completes

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the peer never hangs up either
        return {"type": "http.disconnect"}

    await asyncio.wait_for(response({"type": "http"}, receive, send), 5)
    bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert any(b.startswith(b"id: ") for b in bodies)  # the one that stuck
    assert b"event: close" in bodies[-2] and b"too slow" in bodies[-2]
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
