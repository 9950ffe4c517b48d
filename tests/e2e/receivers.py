"""What lease notices reach: a real SMTP server (aiosmtpd) and a webhook receiver (a small
HTTP/1.1 server) that checks every delivery's signature the way docs/leases.md tells
receivers to, independently of Nephos's own code."""

from __future__ import annotations

import asyncio
import email
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller


class Inbox:
    """Mail taken by an aiosmtpd server on 127.0.0.1:``port`` (started and stopped at will)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def start(self) -> None:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def bodies(self, to: str | None = None) -> list[str]:
        """The messages' texts in the order they came (only those to ``to``, if given)."""
        with self._lock:
            return [str(m.get_payload(decode=True), "utf-8") for m in self.messages if to is None or m["To"] == to]

    def subjects(self) -> list[str]:
        with self._lock:
            return [str(m["Subject"]) for m in self.messages]


@dataclass
class Delivery:
    at: float
    headers: dict[str, str]
    body: dict[str, Any]
    valid: bool


@dataclass
class HookReceiver:
    """Answers ``status`` (or hangs for ``hang`` seconds first); records every delivery with
    whether its ``Nephos-Signature`` verified against ``secret``."""

    secret: str
    status: int = 200
    hang: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    @staticmethod
    def verify(secret: str, body: bytes, header: str) -> bool:
        parts = dict(item.split("=", 1) for item in header.split(","))
        expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - int(parts["t"])) < 300

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                valid = self.verify(self.secret, body, headers.get("nephos-signature", "t=0,v1="))
                self.deliveries.append(Delivery(time.monotonic(), headers, json.loads(body), valid))
                if self.hang:
                    await asyncio.sleep(self.hang)
                writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}/hook"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def kinds(self) -> list[str]:
        return [d.body["kind"] for d in self.deliveries]
