"""The host side of the metadata service: a small HTTP proxy in the agent.

A guest asks ``http://169.254.169.254/latest/...``. The host's DNAT rule for the guest's
network (``driver.metadata_redirect``) sends the request to this proxy on the network's gateway
address, so the address a connection arrived at names the network, and its source address
names the VM within it. The proxy forwards the request to Nephos's ``/metadata`` with the
proxies' shared key, the network's id and the guest's address; Nephos attributes it to a VM or
refuses it. A connection that did not arrive on a Nephos network's gateway gets 403 here and
never reaches Nephos.

The proxy keeps no state beyond the gateway-to-network map, which it reads again from libvirt
when it meets an address it does not know. It is a uvicorn server running as one task of the
agent's process; it leaves the process's signals to the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import uvicorn

log = logging.getLogger("nephos.agent")
#: The headers of a guest's request that Nephos's metadata service reads (IMDSv2), and those of
#: its answer the guest needs back.
_ASKED = ("x-aws-ec2-metadata-token", "x-aws-ec2-metadata-token-ttl-seconds")
_ANSWERED = ("content-type", "x-aws-ec2-metadata-token-ttl-seconds")
_MAX_BODY = 64 * 1024


class QuietServer(uvicorn.Server):
    """A uvicorn server that runs as one task among others: it does not take the process's
    signals (the process that runs it decides when it stops)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class MetadataProxy:
    def __init__(
        self,
        *,
        gateways: Callable[[], Awaitable[dict[str, uuid.UUID]]],
        upstream: str,
        key: str,
        listen: str = "0.0.0.0",
        port: int = 8775,
        timeout: float = 5.0,
    ) -> None:
        self._read_gateways, self.upstream, self.key = gateways, upstream.rstrip("/"), key
        self.listen, self.port = listen, port
        self._gateways: dict[str, uuid.UUID] = {}
        self._http = httpx.AsyncClient(timeout=timeout)
        self._server: QuietServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = uvicorn.Config(
            self, host=self.listen, port=self.port, lifespan="off", access_log=False, log_level="warning"
        )
        # Bound here, so a taken port is an OSError the agent reports (uvicorn would exit the
        # process).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.listen, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"the metadata proxy cannot listen on {self.listen}:{self.port}: {exc}") from None
        sock.listen(128)  # connections wait in the backlog until uvicorn takes the socket
        self._server = QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        log.info("metadata proxy on %s:%d, forwarding to %s", self.listen, self.port, self.upstream)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
        await self._http.aclose()

    async def network_of(self, local: str) -> uuid.UUID | None:
        """The Nephos network whose gateway is ``local`` (the address a request arrived at)."""
        if local not in self._gateways:
            self._gateways = await self._read_gateways()
        return self._gateways.get(local)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status, headers, body = await self._answer(scope, receive)
        # A length, always: without it uvicorn chunks the answer, even to an HTTP/1.0 client.
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: dict[str, Any], receive: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        refused: tuple[int, list[tuple[bytes, bytes]], bytes] = (403, [], b"")
        local, client = scope.get("server"), scope.get("client")
        if not local or not client:
            return refused
        network = await self.network_of(str(local[0]))
        if network is None:
            return refused
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > _MAX_BODY:
                return 413, [], b""
            if not message.get("more_body"):
                break
        asked = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        headers = {k: asked[k] for k in _ASKED if k in asked}
        headers |= {"X-Nephos-Proxy-Key": self.key, "X-Nephos-Network": str(network), "X-Forwarded-For": client[0]}
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"{self.upstream}/metadata{path}" + (f"?{query}" if query else "")
        try:
            reply = await self._http.request(scope["method"], url, headers=headers, content=body)
        except httpx.HTTPError as exc:
            log.warning("metadata proxy: Nephos did not answer %s %s: %s", scope["method"], url, exc)
            return 502, [], b""
        back = [(k.encode(), reply.headers[k].encode()) for k in _ANSWERED if k in reply.headers]
        return reply.status_code, back, reply.content
