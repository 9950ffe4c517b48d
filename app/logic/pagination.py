"""Keyset pagination on time-ordered ids: ``ORDER BY id``, ``WHERE id > :cursor``.

The cursor is opaque to clients (URL-safe base64 of the last id); a list of
10,000 rows pages as fast as one of 10 because every page is an index range.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic.errors import BadRequest

T = TypeVar("T")
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(last_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(last_id.bytes).decode().rstrip("=")


def decode_cursor(cursor: str) -> uuid.UUID:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return uuid.UUID(bytes=raw)
    except (binascii.Error, ValueError):
        raise BadRequest("cursor is not one this API handed out", cursor=cursor) from None


async def paginate(
    session: AsyncSession,
    stmt: sa.Select[Any],
    id_column: Any,
    *,
    limit: int,
    cursor: str | None,
) -> Page[Any]:
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}", limit=limit)
    if cursor:
        stmt = stmt.where(id_column > decode_cursor(cursor))
    rows = list((await session.execute(stmt.order_by(id_column).limit(limit + 1))).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1].id) if more and rows else None)
