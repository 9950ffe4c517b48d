"""Engines and sessions (made by the edges: ``lifespan``, ``main()``, tests).

PostgreSQL runs at READ COMMITTED with row locks (``SELECT ... FOR UPDATE``).
SQLite has no row locks, so every transaction there starts with
``BEGIN IMMEDIATE``: writers take the database's write lock up front and wait
for each other (busy timeout) instead of failing half-way, which gives the
embedded mode the same serialization the row locks give PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


class StatementCounts:
    """What a process asked of its database: statements sent (round trips) and transactions
    committed, counted when ``NEPHOS_STATEMENT_COUNTS`` names a directory (the benchmark's
    instrumentation; off, it costs nothing). A daemon thread writes ``<dir>/<pid>.json`` every
    0.2 s when the counts moved, so a reader can take deltas while the process runs."""

    def __init__(self, directory: Path) -> None:
        self.statements = self.commits = 0
        self.path = directory / f"{os.getpid()}.json"
        directory.mkdir(parents=True, exist_ok=True)
        event.listen(Engine, "before_cursor_execute", self._statement)
        event.listen(Engine, "commit", self._commit)
        threading.Thread(target=self._write_forever, name="statement-counts", daemon=True).start()

    def _statement(self, *_: Any) -> None:
        self.statements += 1

    def _commit(self, *_: Any) -> None:
        self.commits += 1

    def _write_forever(self) -> None:
        written = None
        while True:
            counts = {"statements": self.statements, "commits": self.commits}
            if counts != written:  # an idle process (an agent has no statements) writes nothing
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(counts))
                os.replace(tmp, self.path)
                written = counts
            time.sleep(0.2)


_COUNTS: StatementCounts | None = None


def _counting() -> None:
    global _COUNTS
    directory = os.environ.get("NEPHOS_STATEMENT_COUNTS")
    if directory and _COUNTS is None:
        _COUNTS = StatementCounts(Path(directory))


def engine_of(settings: Settings) -> AsyncEngine:
    """A process's engine as its settings say (pool sizes, generic plans)."""
    pool = {} if settings.is_sqlite else {"pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow}
    return make_engine(settings.database_url, generic_plans=settings.db_generic_plans, **pool)


#: The settings' defaults, for an engine made without settings (a one-shot command, a test):
#: one place says what they are, and why (``Settings``).
_DEFAULTS = {
    name: Settings.model_fields[name].default for name in ("db_pool_size", "db_max_overflow", "db_generic_plans")
}


def make_engine(url: str, *, generic_plans: bool = _DEFAULTS["db_generic_plans"], **kwargs: Any) -> AsyncEngine:
    """The engine of a process. ``generic_plans`` (PostgreSQL): each prepared statement is
    planned once per connection (``plan_cache_mode = force_generic_plan``), not again at every
    execution as PostgreSQL does for the statements it judges worth it (``NEPHOS_DB_GENERIC_PLANS``;
    what it saves and what it risks: docs/production.md)."""
    _counting()
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_size", _DEFAULTS["db_pool_size"])
        kwargs.setdefault("max_overflow", _DEFAULTS["db_max_overflow"])
        # No pre-ping: it costs a round trip on every checkout (measured: ~9% of a dispatcher's
        # time). Recycling bounds connection age instead; a broken connection fails its
        # transaction, which the caller retries (dispatcher) or reports (API).
        kwargs.setdefault("pool_recycle", 1800)
        if generic_plans:
            kwargs.setdefault("connect_args", {"server_settings": {"plan_cache_mode": "force_generic_plan"}})
        return create_async_engine(url, **kwargs)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args={"timeout": 60}, **kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, say when a transaction begins.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=True)


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_sync(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


async def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations (alembic runs its own event loop, so off this one)."""
    await asyncio.to_thread(upgrade_sync, url, revision)


def sqlstate(exc: sa_exc.DBAPIError) -> str:
    """The SQLSTATE of a database error ("" when the driver gave none)."""
    return str(getattr(exc.orig, "sqlstate", "") or getattr(exc.orig, "pgcode", "") or "")


def database_unavailable(exc: BaseException) -> bool:
    """Is this the database being away (refused, dropped, shutting down) rather than a bug?"""
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc.orig, OSError | ConnectionError | TimeoutError):
            return True
        # 08: connection exceptions; 57P: admin/crash shutdown, cannot connect now.
        return sqlstate(exc).startswith(("08", "57P")) or "connection is closed" in str(exc)
    return isinstance(exc, OSError | ConnectionError | TimeoutError)


#: SQLSTATEs after which the whole transaction may simply run again: serialization failure and
#: deadlock (PostgreSQL rolled the victim back; nothing it wrote survives).
RETRIABLE = frozenset({"40001", "40P01"})


def retriable(exc: BaseException) -> bool:
    """Did the database abort this transaction only because of a concurrent one?"""
    return isinstance(exc, sa_exc.DBAPIError) and sqlstate(exc) in RETRIABLE


def transient(exc: BaseException) -> bool:
    """An error that passes by itself: the database away for a moment, or a lost race."""
    return database_unavailable(exc) or retriable(exc)


async def snapshot(session: AsyncSession) -> None:
    """Read everything that follows in this transaction from one snapshot: REPEATABLE READ on
    PostgreSQL (SQLite's single writer gives one already). Only at the start of a transaction."""
    if session.get_bind().dialect.name == "postgresql" and not session.in_transaction():
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
