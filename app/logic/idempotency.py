"""``Idempotency-Key`` on creating POSTs: the same key and body replay the first reply.

The record is written in the same transaction as what the request created,
under a primary key of (user, key). Two concurrent requests with one key
both run, but only one can commit: the other's insert clashes, its whole
transaction rolls back (nothing it created survives), and it answers with
the winner's stored reply.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic.errors import BadRequest, IdempotencyConflict
from app.models import IdempotencyRecord

TTL = timedelta(hours=24)
MAX_KEY = 255


@dataclass(frozen=True)
class Stored:
    status_code: int
    response: Any


def fingerprint(method: str, path: str, body: bytes) -> str:
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + canonical).hexdigest()


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY:
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY} characters", field="Idempotency-Key")


async def replay(session: AsyncSession, *, user_id: uuid.UUID, key: str, fp: str) -> Stored | None:
    """The stored reply for this key, ``None`` if there is none, or ``IdempotencyConflict``."""
    record = await session.get(IdempotencyRecord, (user_id, key), populate_existing=True)
    if record is None:
        return None
    if record.created_at < utcnow() - TTL:
        await session.delete(record)
        await session.flush()
        return None
    if record.fingerprint != fp:
        raise IdempotencyConflict("this Idempotency-Key was used with a different request", key=key)
    return Stored(record.status_code, record.response)


def store(session: AsyncSession, *, user_id: uuid.UUID, key: str, fp: str, status_code: int,
          response: Any) -> None:
    session.add(IdempotencyRecord(user_id=user_id, key=key, fingerprint=fp,
                                  status_code=status_code, response=response))
