"""Clusters of real processes for end-to-end tests.

``production``: ``nephos api``, ``nephos dispatcher`` and two ``nephos agent`` processes on a
fresh PostgreSQL database and a private RabbitMQ prefix. ``embedded``: one ``nephos up`` on
SQLite and the in-memory bus. Both serve the same HTTP API, so the same tests drive both.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.bus.amqp import AmqpBus
from tests.conftest import AMQP_URL, _pg_database, amqp_prefix, need_amqp
from tests.procs import free_port, nephos_bin

TOKEN = "nph_e2e_admin_token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
HOSTS = ("host-1", "host-2")
FAST = {
    "NEPHOS_HEARTBEAT_INTERVAL": "0.5",
    "NEPHOS_SWEEP_INTERVAL": "0.3",
    "NEPHOS_LEASE_INTERVAL": "0.3",
    "NEPHOS_RESEND_AFTER": "1",
    "NEPHOS_HOST_TIMEOUT": "5",
    "NEPHOS_INVENTORY_INTERVAL": "2",
    "NEPHOS_LOG_LEVEL": "warning",
    # Small pools: clusters of several processes share PostgreSQL's 100 connections with
    # the other test worker.
    "NEPHOS_DB_POOL_SIZE": "4",
    "NEPHOS_DB_MAX_OVERFLOW": "8",
}


@dataclass
class Cluster:
    mode: str
    base: str
    env: dict[str, str]
    workdir: Path
    commands: dict[str, list[str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    bases: dict[str, str] = field(default_factory=dict)  # API processes beyond the first
    client: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.AsyncClient(base_url=self.base, timeout=30)

    def spawn(self, name: str, argv: list[str] | None = None, **extra: str) -> None:
        argv = argv or self.commands[name]
        self.commands[name] = argv
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            argv, cwd=self.workdir, env={**self.env, **extra}, stdout=log, stderr=subprocess.STDOUT
        )
        _SPAWNED.append(self.procs[name])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Cluster]:
        """Until the body ends: wait for both hosts, then stop every process."""
        try:
            await self.hosts_up()
            await self.apis_up()
            yield self
        finally:
            await self.client.aclose()
            for name in list(self.procs):
                self.kill(name, signal.SIGTERM)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.workdir.glob("*.log")))

    async def get(self, path: str) -> Any:
        r = await self.client.get(path, headers=ADMIN)
        assert r.status_code == 200, r.text
        return r.json()

    async def wait_for(self, what: str, check: Any, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")
            await asyncio.sleep(0.1)

    async def hosts_up(self, n: int = 2) -> None:
        async def up() -> bool:
            try:
                r = await self.client.get("/healthz")
            except httpx.TransportError:
                return False
            return r.status_code == 200 and r.json()["hosts_up"] >= n

        await self.wait_for(f"{n} hosts up", up, timeout=60)

    async def apis_up(self) -> None:
        """Every API process beyond the first answers (``hosts_up`` asked the first only): a
        test that turns to one must not find it still starting."""
        for name, base in self.bases.items():

            async def answers(base: str = base) -> bool:
                try:
                    return (await self.client.get(f"{base}/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await self.wait_for(f"{name} answering", answers, timeout=60)

    async def job_done(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        async def final() -> dict[str, Any] | None:
            job = await self.get(f"/api/v1/jobs/{job_id}")
            return job if job["status"] in ("SUCCESS", "ERROR") else None

        return await self.wait_for(f"job {job_id}", final, timeout)  # type: ignore[no-any-return]

    async def idle(self, server_id: str, timeout: float = 30) -> dict[str, Any]:
        async def no_task() -> dict[str, Any] | None:
            server = await self.get(f"/api/v1/servers/{server_id}")
            return server if server["task"] is None else None

        return await self.wait_for(f"server {server_id} idle", no_task, timeout)  # type: ignore[no-any-return]


def _base_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEPHOS_")}
    return {
        **env,
        **FAST,
        "NEPHOS_ADMIN_TOKEN": TOKEN,
        "NEPHOS_STATE_DIR": str(workdir / "var"),
        "NEPHOS_SECRET_KEY_FILE": str(workdir / "var" / "secret.key"),
    }


@contextlib.asynccontextmanager
async def production_cluster(
    pg_url: str,
    workdir: Path,
    dispatchers: int = 1,
    apis: int = 1,
    size: str = "16:32768",
    amqp_url: str = AMQP_URL,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[Cluster]:
    need_amqp()
    prefix = amqp_prefix()
    port = free_port()
    env = {
        **_base_env(workdir),
        "NEPHOS_DATABASE_URL": pg_url,
        "NEPHOS_AMQP_URL": amqp_url,
        "NEPHOS_AMQP_PREFIX": prefix,
        "NEPHOS_PORT": str(port),
        **(extra_env or {}),
    }
    seed = await asyncio.create_subprocess_exec(
        nephos_bin(), "seed", cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    assert await seed.wait() == 0
    cluster = Cluster("production", f"http://127.0.0.1:{port}", env, workdir)
    for i in range(apis):
        name = "api" if i == 0 else f"api-{i + 1}"
        extra = {} if i == 0 else {"NEPHOS_PORT": str(free_port())}
        if extra:
            cluster.bases[name] = f"http://127.0.0.1:{extra['NEPHOS_PORT']}"
        cluster.spawn(name, [nephos_bin(), "api"], **extra)
    for i in range(dispatchers):
        cluster.spawn("dispatcher" if i == 0 else f"dispatcher-{i + 1}", [nephos_bin(), "dispatcher"])
    for host in HOSTS:
        cluster.spawn(host, [nephos_bin(), "agent", "--host", host, "--simulate", size])
    try:
        async with cluster.running():
            yield cluster
    finally:
        cleaner = AmqpBus(AMQP_URL, prefix=prefix)
        await cleaner.start()
        await cleaner.purge_and_delete(list(HOSTS))
        await cleaner.close()


@contextlib.asynccontextmanager
async def embedded_cluster(workdir: Path, extra_env: dict[str, str] | None = None) -> AsyncIterator[Cluster]:
    port = free_port()
    env = {
        **_base_env(workdir),
        "NEPHOS_PORT": str(port),
        "NEPHOS_HOSTS": ",".join(f"{h}:16:32768" for h in HOSTS),
        "NEPHOS_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'var' / 'nephos.db'}",
        **(extra_env or {}),
    }
    cluster = Cluster("embedded", f"http://127.0.0.1:{port}", env, workdir)
    cluster.spawn("up", [nephos_bin(), "up"])
    async with cluster.running():
        yield cluster


@pytest.fixture(params=["embedded", "production"])
async def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    if request.param == "embedded":
        async with embedded_cluster(tmp_path) as c:
            yield c
    else:
        # The template is a plain fixture; an async one cannot be asked for from inside a loop.
        async for url in _pg_database(request.getfixturevalue("pg_template")):
            async with production_cluster(url, tmp_path) as c:
                yield c


@pytest.fixture
async def prod_cluster(pg_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with production_cluster(pg_url, tmp_path) as c:
        yield c


_SPAWNED: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftovers() -> None:
    """A run cut short (a timeout, ^C) skips fixture teardown: never leave processes behind."""
    for proc in _SPAWNED:
        if proc.poll() is None:
            proc.kill()
