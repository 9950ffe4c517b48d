"""A whole cloud in the test's process -- api, dispatcher, two agents -- so a test can reach an
agent's libvirt connection and the results queue directly. Runs on both transports: SQLite +
the in-memory bus, and PostgreSQL + RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from asgi_lifespan import LifespanManager

from app.api.app import create_app
from app.api.deps import AppState
from app.backend.metaproxy import QuietServer
from app.bus.amqp import AmqpBus
from app.bus.memory import MemoryBus
from app.logic import bootstrap
from app.runtime import Plane, plane
from app.settings import Settings
from tests.conftest import ADMIN_TOKEN, AMQP_URL, _pg_database, amqp_prefix, need_amqp

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Cloud:
    def __init__(self, p: Plane, client: httpx.AsyncClient) -> None:
        self.plane, self.client = p, client

    async def until(self, what: str, check: Callable[[], Awaitable[Any]], timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := await check()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)
        return value

    async def server(self, sid: str) -> dict[str, Any]:
        return (await self.client.get(f"/api/v1/servers/{sid}", headers=ADMIN)).json()  # type: ignore[no-any-return]

    async def started_vm(self) -> dict[str, Any]:
        r = await self.client.post(
            "/api/v1/servers", headers=ADMIN, json={"name": "vm", "flavor": "small", "image": "debian-12"}
        )
        assert r.status_code == 202, r.text
        sid = r.json()["servers"][0]["id"]

        async def started() -> dict[str, Any] | None:
            s = await self.server(sid)
            return s if s["operstate"] == "STARTED" and s["task"] is None else None

        return await self.until("STARTED", started)  # type: ignore[no-any-return]

    async def user(self, name: str) -> dict[str, str]:
        """The headers of a new user in a new project."""
        project = (await self.client.post("/api/v1/admin/projects", headers=ADMIN, json={"name": name})).json()
        made = await self.client.post(
            "/api/v1/admin/users", headers=ADMIN, json={"name": "u", "project_id": project["id"]}
        )
        return {"Authorization": f"Bearer {made.json()['token']}"}

    async def ec2(self, user: dict[str, str]) -> Any:
        """A boto3 EC2 client acting as ``user`` (a cloud made with ``serve_http``)."""
        import boto3
        from botocore.config import Config

        keys = (await self.client.post("/api/v1/credentials/ec2", headers=user)).json()
        return boto3.client(
            "ec2",
            endpoint_url=f"{self.plane.settings.public_api_url}/ec2",
            region_name="us-east-1",
            aws_access_key_id=keys["access_key"],
            aws_secret_access_key=keys["secret_key"],
            config=Config(retries={"max_attempts": 1, "mode": "standard"}),
        )

    async def quotas(self) -> dict[str, Any]:
        return (await self.client.get("/api/v1/quotas", headers=ADMIN)).json()  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def inprocess_cloud(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    *,
    mode: str | None = None,
    agents: dict[str, str] | None = None,
    serve_http: bool = False,
    **extra: Any,
) -> AsyncIterator[Cloud]:
    """``request.param`` picks the transports ("embedded" or "production"); ``agents`` the hosts
    (name: libvirt URI; default two simulated ones); ``extra`` settings. ``serve_http`` also
    serves the API on a real socket (``NEPHOS_API_URL``), for what calls it over HTTP (the
    metadata proxy)."""
    sock = None
    if serve_http:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        extra["api_url"] = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings_kw: dict[str, Any] = {
        "state_dir": tmp_path,
        "secret_key_file": tmp_path / "secret.key",
        "heartbeat_interval": 0.3,
        "sweep_interval": 0.2,
        "lease_interval": 0.2,
        "resend_after": 0.5,
        "inventory_interval": 1,
        **extra,
    }
    if (mode or request.param) == "embedded":
        url, bus, databases = f"sqlite+aiosqlite:///{tmp_path / 'n.db'}", MemoryBus(), None
        from app.db import upgrade

        await upgrade(url)
    else:
        need_amqp()
        databases = _pg_database(request.getfixturevalue("pg_template"))
        url = await databases.__anext__()
        bus = AmqpBus(AMQP_URL, prefix=amqp_prefix())
    settings = Settings(database_url=url, **settings_kw)
    async with plane(settings, bus) as p:
        async with p.sessions() as session:
            await bootstrap.seed(session, admin_token=ADMIN_TOKEN)
            await session.commit()
        await p.start_dispatcher()
        from app.backend.driver import write_test_node

        hosts = agents or {h: write_test_node(tmp_path, h, 16, 32768) for h in ("host-1", "host-2")}
        for host, uri in hosts.items():
            await p.start_agent(host=host, uri=uri)
        state = AppState(
            settings=settings,
            sessions=p.sessions,
            cipher=p.cipher,
            publish=p.outbox.submit,
            bus_ok=lambda: p.bus.connected,
            bus=p.bus,
        )
        app = create_app(settings, state)
        async with LifespanManager(app) as manager, contextlib.AsyncExitStack() as served:
            if sock is not None:
                await served.enter_async_context(_served(manager.app, sock))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as c:
                cloud = Cloud(p, c)
                await cloud.until("hosts up", lambda: _hosts_up(c, len(hosts)))
                yield cloud
        if isinstance(bus, AmqpBus):
            await bus.purge_and_delete(list(hosts))
    if databases is not None:
        await databases.aclose()


@contextlib.asynccontextmanager
async def _served(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    server = QuietServer(uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def _hosts_up(c: httpx.AsyncClient, n: int) -> bool:
    return bool((await c.get("/healthz")).json()["hosts_up"] == n)
