"""Test harness: every test gets its own database, on SQLite and on PostgreSQL.

PostgreSQL: one template database per test process is migrated once, and each
test clones it (``CREATE DATABASE ... TEMPLATE``), so a test never sees
another's rows and leftovers of an earlier run never matter. SQLite: the
migrated file is copied per test. A missing PostgreSQL is a skip locally and
a failure in CI (``CI=true``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import functools
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.api.app import create_app
from app.api.deps import AppState
from app.db import make_engine, make_sessionmaker, upgrade_sync
from app.logic import bootstrap
from app.settings import HostSpec, Settings

PG_DSN = os.environ.get("NEPHOS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
RUN = f"{os.getpid()}_{uuid.uuid4().hex[:8]}"
ADMIN_TOKEN = "nph_test_admin_token_0123456789"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_url(database: str) -> str:
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{database}"


async def _pg_exec(*statements: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


def _in_thread(fn: Any, *args: Any) -> Any:
    """Run blocking set-up (``asyncio.run`` inside) off the test's running event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def _pg_sync(*statements: str) -> None:
    _in_thread(asyncio.run, _pg_exec(*statements))


def _need_pg() -> None:
    try:
        _pg_sync("SELECT 1")
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL is not reachable at {PG_DSN}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def pg_template() -> Any:
    _need_pg()
    name = f"nephos_tmpl_{RUN}"
    _pg_sync(f'CREATE DATABASE "{name}"')
    _in_thread(upgrade_sync, _pg_url(name))
    yield name
    _pg_sync(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    _in_thread(upgrade_sync, f"sqlite+aiosqlite:///{path}")
    return path


async def _pg_database(template: str) -> AsyncIterator[str]:
    name = f"nephos_t_{uuid.uuid4().hex[:16]}"
    await _pg_exec(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _pg_url(name)
    finally:
        await _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pg_url(pg_template: str) -> AsyncIterator[str]:
    async for url in _pg_database(pg_template):
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "nephos.db"
        shutil.copy(template, path)
        yield f"sqlite+aiosqlite:///{path}"
    else:
        async for url in _pg_database(request.getfixturevalue("pg_template")):
            yield url


HOSTS = [HostSpec("host-1", 16, 32768), HostSpec("host-2", 16, 32768)]


@dataclass
class Cloud:
    """A running API on its own database, with the bootstrap admin's headers."""

    client: httpx.AsyncClient
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    state: AppState
    admin: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {ADMIN_TOKEN}"})

    async def project(self, name: str | None = None, **quotas: int) -> dict[str, Any]:
        r = await self.client.post(
            "/api/v1/admin/projects",
            headers=self.admin,
            json={"name": name or f"p-{uuid.uuid4().hex[:8]}", "quotas": quotas},
        )
        assert r.status_code == 201, r.text
        return r.json()

    async def user(self, project_id: str | None = None, role: str = "user", **quotas: int) -> dict[str, str]:
        """Headers of a new user, in a new project (with ``quotas``) unless one is given."""
        if project_id is None:
            project_id = (await self.project(**quotas))["id"]
        r = await self.client.post(
            "/api/v1/admin/users", headers=self.admin, json={"name": "u", "project_id": project_id, "role": role}
        )
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['token']}", "X-Project": project_id}

    async def create(self, headers: dict[str, str], expect: int = 202, **body: Any) -> Any:
        body.setdefault("name", "vm")
        if "flavor_id" not in body:
            body.setdefault("flavor", "small")
        if "image_id" not in body:
            body.setdefault("image", "debian-12")
        r = await self.client.post("/api/v1/servers", headers=headers, json=body)
        assert r.status_code == expect, r.text
        return r.json()

    async def server(self, headers: dict[str, str], server_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/api/v1/servers/{server_id}", headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    async def act(self, headers: dict[str, str], server_id: str, action: str, expect: int = 202, **extra: Any) -> Any:
        r = await self.client.post(
            f"/api/v1/servers/{server_id}/actions", headers=headers, json={"action": action, **extra}
        )
        assert r.status_code == expect, r.text
        return r.json()

    async def quotas(self, headers: dict[str, str]) -> dict[str, Any]:
        r = await self.client.get("/api/v1/quotas", headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    async def finish(self, job_id: str, success: bool = True, error: str | None = None) -> str:
        """Apply a job's result as the dispatcher applies one alone, in its own transaction."""
        from app.logic import results

        async with self.sessions() as session:
            results.begin_alone(session)
            outcome = await results.apply_result(session, job_id=uuid.UUID(job_id), success=success, error=error)
            await results.end_alone(session)
            await session.commit()
        return outcome.value


async def start_cloud(url: str, hosts: list[HostSpec] | None = None) -> tuple[Cloud, LifespanManager]:
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    async with sessions() as session:
        await bootstrap.seed(session, admin_token=ADMIN_TOKEN, hosts=HOSTS if hosts is None else hosts)
        await session.commit()
    settings = Settings(database_url=url)
    state = AppState(settings=settings, sessions=sessions, cipher=Fernet(Fernet.generate_key()))
    app = create_app(settings, state)
    manager = LifespanManager(app)
    await manager.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://nephos.test")
    return Cloud(client, engine, sessions, state), manager


async def stop_cloud(cloud: Cloud, manager: LifespanManager) -> None:
    await cloud.client.aclose()
    await manager.__aexit__(None, None, None)
    await cloud.engine.dispose()


@pytest.fixture
async def cloud(db_url: str) -> AsyncIterator[Cloud]:
    c, manager = await start_cloud(db_url)
    yield c
    await stop_cloud(c, manager)


@pytest.fixture
async def pg_cloud(pg_url: str) -> AsyncIterator[Cloud]:
    c, manager = await start_cloud(pg_url)
    yield c
    await stop_cloud(c, manager)


AMQP_URL = os.environ.get("NEPHOS_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


@functools.cache
def _amqp_problem() -> str | None:
    """Why RabbitMQ cannot serve the tests, or None. Checked once a process: a broker that takes
    connections but not messages (a memory or disk alarm blocks publishers) fails here in 10 s
    instead of hanging every test that publishes."""

    async def ping() -> None:
        import aio_pika

        async with asyncio.timeout(10):
            connection = await aio_pika.connect(AMQP_URL, timeout=5)
            try:
                channel = await connection.channel(publisher_confirms=True)
                queue = await channel.declare_queue(exclusive=True, auto_delete=True)
                await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key=queue.name)
                while await queue.get(fail=False) is None:
                    await asyncio.sleep(0.05)
            finally:
                await connection.close()

    try:
        _in_thread(asyncio.run, ping())
    except TimeoutError:
        return f"RabbitMQ at {AMQP_URL} did not take and hand back a message within 10 s (a resource alarm?)"
    except Exception as exc:  # any failure to reach the broker
        return f"RabbitMQ is not reachable at {AMQP_URL}: {exc!r}"
    return None


def need_amqp() -> None:
    message = _amqp_problem()
    if message is not None:
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def amqp_prefix() -> str:
    return f"nephos-test-{uuid.uuid4().hex[:12]}"


# -- make test-fast: the edit-test loop ----------------------------------------------------------

FAST = os.environ.get("NEPHOS_FAST", "").lower() in ("1", "true", "yes")
_SERVICE_FIXTURES = {"pg_url", "pg_cloud", "pg_template", "prod_cluster", "qemu_cloud"}


#: Each worker's trail (var/test-trace/<worker>.log): the test it starts, and Python's fault
#: handler's stacks should the process die in C. A worker that vanishes mid-test leaves its last
#: test here; .ci/run prints the trails when the suite fails.
TRACE_DIR = Path(os.environ.get("NEPHOS_TEST_TRACE", Path(__file__).resolve().parents[1] / "var" / "test-trace"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long runs (fuzzing, the fault suite, browsers); not in make test-fast")
    TRACE_DIR.mkdir(parents=True, exist_ok=True)
    trail = (TRACE_DIR / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.log").open("a", buffering=1)
    faulthandler.enable(file=trail, all_threads=True)
    _TRAIL[:] = [trail]


_TRAIL: list[Any] = []


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    for trail in _TRAIL:
        trail.write(f"{time.strftime('%H:%M:%S')} start {nodeid}\n")


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    for trail in _TRAIL:
        trail.write(f"{time.strftime('%H:%M:%S')} end   {nodeid}\n")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``NEPHOS_FAST=1`` (make test-fast): SQLite and the in-memory bus only, no slow runs.
    ``make test`` always runs everything."""
    if not FAST:
        return
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        ids = set(params.params.values()) if params is not None else set()
        services = _SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if services or ids & {"postgresql", "production"} or item.get_closest_marker("slow"):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
