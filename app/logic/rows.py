"""Row-level helpers shared by the logic modules."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic.errors import AlreadyExists


async def insert_unique(session: AsyncSession, row: object, what: str) -> None:
    """Insert ``row``; a unique clash is the client's ``AlreadyExists``, not a 500.

    A savepoint keeps the clash from aborting the caller's transaction.
    """
    try:
        async with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise AlreadyExists(f"{what} already exists") from None


async def insert_or_skip(session: AsyncSession, table: sa.Table, values: dict[str, object]) -> bool:
    """``INSERT ... ON CONFLICT DO NOTHING``: True when this call inserted the row. A concurrent
    insert of the same unique key waits for the other transaction's end, then yields to it."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table).values(**values).on_conflict_do_nothing()
    return (await session.execute(stmt.returning(*table.primary_key.columns))).first() is not None
