"""``Idempotency-Key`` on creating POSTs: the same key and body replay the first reply.

The record is written in the same transaction as what the request created,
under a primary key of (user, key). Two concurrent requests with one key
both run, but only one can commit: the other's insert clashes, its whole
transaction rolls back (nothing it created survives), and it answers with
the winner's stored reply.

A reply may hold what is shown once -- a new user's token, an EC2 secret key, a generated
private key, a console password -- so it is never stored readable: the record keeps the reply
sealed with the server key (Fernet: AES with an HMAC), and only a replay opens it. A record names
what its request created when that can be deleted (``resource``); deleting it forgets the
record. Records past ``TTL`` are purged by the dispatcher's sweeper (``purge``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic.errors import BadRequest, IdempotencyConflict
from app.models import IdempotencyRecord, table_of

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


async def replay(session: AsyncSession, *, user_id: uuid.UUID, key: str, fp: str, cipher: Fernet) -> Stored | None:
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
    try:
        reply = json.loads(cipher.decrypt(str((record.response or {}).get("sealed", "")).encode()))
    except InvalidToken:
        raise IdempotencyConflict(
            "the reply stored for this Idempotency-Key was sealed with another server key "
            "and cannot be replayed; use a new key",
            key=key,
        ) from None
    return Stored(record.status_code, reply)


def store(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    key: str,
    fp: str,
    status_code: int,
    response: Any,
    cipher: Fernet,
    resource: str | None = None,
) -> None:
    sealed = cipher.encrypt(json.dumps(response, separators=(",", ":")).encode()).decode()
    session.add(
        IdempotencyRecord(
            user_id=user_id,
            key=key,
            fingerprint=fp,
            status_code=status_code,
            response={"sealed": sealed},
            resource=resource,
        )
    )


async def forget(session: AsyncSession, resource: str) -> None:
    """``resource`` was deleted: a replay never hands back something that no longer exists, so
    the records that created it go (the same key then creates it anew)."""
    records = table_of(IdempotencyRecord)
    await session.execute(records.delete().where(records.c.resource == resource))


async def purge(session: AsyncSession, *, older_than: timedelta = TTL) -> int:
    """Delete the records no replay may use any more; returns how many."""
    records = table_of(IdempotencyRecord)
    result = await session.execute(records.delete().where(records.c.created_at < utcnow() - older_than))
    return int(getattr(result, "rowcount", 0) or 0)
