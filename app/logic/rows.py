"""Row-level helpers shared by the logic modules."""

from __future__ import annotations

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
