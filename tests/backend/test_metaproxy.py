"""The host-side metadata proxy, over real sockets: it forwards what a guest on a Nephos network
asks to Nephos with the proxies' key, the network and the guest's address, passes IMDSv2's
headers both ways, and refuses -- without asking Nephos -- what did not arrive on a Nephos
network's gateway. (The whole path, from a booted guest through the host's DNAT rule, is the
qemu tier's test.)"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from app.backend.metaproxy import MetadataProxy, QuietServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Upstream:
    """A stand-in Nephos that records what it was asked and answers like the metadata service."""

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.asked.append({"method": scope["method"], "path": scope["path"], "query": scope["query_string"], **headers})
        reply = [(b"content-type", b"text/plain"), (b"x-aws-ec2-metadata-token-ttl-seconds", b"60"), (b"x-other", b"1")]
        await send({"type": "http.response.start", "status": 200, "headers": reply})
        await send({"type": "http.response.body", "body": b"i-0123456789abcdef0"})


@contextlib.asynccontextmanager
async def _serving(app: Any, port: int) -> AsyncIterator[None]:
    server = QuietServer(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[MetadataProxy, Upstream, uuid.UUID]]:
    network = uuid.uuid4()
    gateways = {"127.0.0.1": network}
    upstream, up_port = Upstream(), _free_port()

    async def read_gateways() -> dict[str, uuid.UUID]:
        return dict(gateways)

    proxy = MetadataProxy(
        gateways=read_gateways, upstream=f"http://127.0.0.1:{up_port}/", key="k3y", listen="0.0.0.0", port=_free_port()
    )
    async with _serving(upstream, up_port):
        await proxy.start()
        try:
            yield proxy, upstream, network
        finally:
            await proxy.stop()


async def test_a_request_on_a_gateway_reaches_nephos_vouched_with_its_network_and_source(
    proxied: tuple[MetadataProxy, Upstream, uuid.UUID],
) -> None:
    proxy, upstream, network = proxied
    async with httpx.AsyncClient() as http:
        r = await http.put(
            f"http://127.0.0.1:{proxy.port}/latest/api/token?x=1",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Nephos-Network": "forged", "Cookie": "c"},
        )
    assert r.status_code == 200 and r.text == "i-0123456789abcdef0"
    assert r.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "60"
    assert r.headers["content-length"] == str(len(r.content))
    assert "x-other" not in r.headers
    [asked] = upstream.asked
    assert asked["method"] == "PUT" and asked["path"] == "/metadata/latest/api/token" and asked["query"] == b"x=1"
    assert asked["x-nephos-proxy-key"] == "k3y"
    assert asked["x-nephos-network"] == str(network)  # the proxy's word, never the guest's
    assert asked["x-forwarded-for"] == "127.0.0.1"
    assert asked["x-aws-ec2-metadata-token-ttl-seconds"] == "60"
    assert "cookie" not in asked


async def test_a_request_not_on_a_nephos_gateway_is_refused_without_asking_nephos(
    proxied: tuple[MetadataProxy, Upstream, uuid.UUID],
) -> None:
    proxy, upstream, _ = proxied
    async with httpx.AsyncClient() as http:
        # 127.0.0.2 is this machine too, but no Nephos network's gateway.
        r = await http.get(f"http://127.0.0.2:{proxy.port}/latest/meta-data/instance-id")
    assert (r.status_code, r.text) == (403, "")
    assert upstream.asked == []


async def test_nephos_away_is_a_502_and_a_taken_port_a_clear_error() -> None:
    async def gateways() -> dict[str, uuid.UUID]:
        return {"127.0.0.1": uuid.uuid4()}

    proxy = MetadataProxy(
        gateways=gateways, upstream=f"http://127.0.0.1:{_free_port()}", key="k", listen="127.0.0.1", port=_free_port()
    )
    await proxy.start()
    try:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{proxy.port}/latest/meta-data/")
        assert r.status_code == 502
        twin = MetadataProxy(gateways=gateways, upstream="http://x", key="k", listen="127.0.0.1", port=proxy.port)
        with pytest.raises(OSError, match="cannot listen"):
            await twin.start()
        await twin.stop()
    finally:
        await proxy.stop()
