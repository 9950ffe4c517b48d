"""Webhooks: a project's events POSTed as signed JSON to a URL its users chose.

* **What is sent**: VM state changes (``server.state``), lease warnings (``lease.warning``) and
  scheduled or lease actions (``lease.action``). ``events.record`` marks such an event on the
  session; when that transaction commits, one delivery row per enabled webhook is written *in
  the same transaction* -- so a rolled-back change is never sent and a committed one is never
  lost. On PostgreSQL that is part of the statement that writes the transaction's stream
  events (``stream``): a project without a webhook costs nothing more than a join that finds
  none. On SQLite it is one indexed lookup, and an INSERT when a webhook wants them.
* **How**: ``app.dispatcher.notifier`` claims a project's webhook (no row lock is held over the
  network), POSTs its pending deliveries oldest first, each signed (``sign``), and stops at the
  first failure: the webhook waits ``notify_retry * 2**(failures-1)`` seconds, and after
  ``webhook_max_failures`` failures in a row it is disabled, its pending deliveries dropped,
  and the project's users told by mail. ``PUT`` again re-enables it.
* **Signature**: header ``Nephos-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
  "<t>.<body>" keyed with the secret>``; the secret is stored sealed with the server key.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.ids import utcnow, uuid7
from app.logic.actor import Actor, require_admin
from app.logic.errors import BadRequest, NotFound
from app.models import NewServerEvent, Project, Server, Webhook, WebhookDelivery, table_of

_hooks, _deliveries = table_of(Webhook), table_of(WebhookDelivery)

#: ``session.info``: the events noted for webhooks until the commit (``stream`` forgets them on a
#: rollback, and on a savepoint's rollback those noted since it began).
PENDING = "nephos.webhook_events"


class State:
    PENDING = "pending"
    DELIVERED = "delivered"
    DROPPED = "dropped"


def kind_of(event: NewServerEvent) -> str | None:
    """The webhook kind of a server event, or None when webhooks do not carry it."""
    if event.kind == "lease_warning":
        return "lease.warning"
    if event.kind in ("lease_action", "user_action"):
        return "lease.action"
    if event.operstate_to is not None and event.operstate_to != event.operstate_from:
        return "server.state"
    return None


def note(session: AsyncSession | Session, server: Server, event: NewServerEvent) -> None:
    """Called by ``events.record``: remember an event webhooks carry until the commit."""
    kind = kind_of(event)
    if kind is None:
        return
    body = {
        "id": str(event.id),
        "kind": kind,
        "project_id": str(server.project_id),
        "server_id": str(server.id),
        "at": event.created_at.isoformat(),
        "data": {
            "event": event.kind,
            "action": event.action,
            "from": event.operstate_from,
            "to": event.operstate_to,
            "message": event.message,
            "job_id": str(event.job_id) if event.job_id else None,
        },
    }
    session.info.setdefault(PENDING, []).append(body)


def take(session: AsyncSession | Session) -> list[dict[str, Any]]:
    """The events this transaction noted for webhooks (forgotten from the session): the
    commit's writer (``stream``) makes them deliveries, in the transaction that made them."""
    pending: list[dict[str, Any]] = session.info.pop(PENDING, [])
    return pending


def delivery(body: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The delivery row of a noted event (written only if its project has an enabled webhook)."""
    return {
        # Time-ordered, as every id: the deliveries of one transaction share its commit's time,
        # and leave in the order of their ids (``due``), which is the order of their events.
        "id": uuid7(),
        "project_id": uuid.UUID(body["project_id"]),
        "server_id": uuid.UUID(body["server_id"]),
        "kind": body["kind"],
        "body": body,
        "state": State.PENDING,
        "attempts": 0,
        "last_error": "",
        "created_at": now,
    }


def write(session: Session, pending: list[dict[str, Any]], now: datetime) -> None:
    """Write the deliveries of ``pending`` whose projects have an enabled webhook: a lookup,
    then an INSERT if any has (SQLite's way; PostgreSQL's is one statement with the stream's
    rows, in ``stream``)."""
    projects = {uuid.UUID(body["project_id"]) for body in pending}
    wanted = set(
        session.execute(sa.select(_hooks.c.project_id).where(_hooks.c.project_id.in_(projects), _hooks.c.enabled))
        .scalars()
        .all()
    )
    rows = [delivery(body, now) for body in pending if uuid.UUID(body["project_id"]) in wanted]
    if rows:
        session.execute(_deliveries.insert(), rows)


def sign(secret: str, body: bytes, t: int | None = None) -> str:
    """The ``Nephos-Signature`` header's value for a body."""
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, tolerance: float = 300) -> bool:
    """What a receiver does (docs/leases.md shows the same in a few lines)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - t) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, t), header)


# -- the REST side -----------------------------------------------------------------------------


def _target(actor: Actor, project_id: uuid.UUID | None) -> uuid.UUID:
    if project_id is not None and project_id != actor.project_id:
        require_admin(actor)
        return project_id
    if actor.project_id is None:
        raise BadRequest("the caller has no project", field="project_id")
    return actor.project_id


async def put(
    session: AsyncSession, *, actor: Actor, project_id: uuid.UUID | None, url: str, secret: str, cipher: Fernet
) -> Webhook:
    """Set (or replace) the project's webhook; it starts enabled with no failures."""
    target = _target(actor, project_id)
    if await session.get(Project, target) is None:
        raise NotFound(f"project {target} not found", project_id=str(target))
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("url must be an http:// or https:// URL with a host", field="url")
    if len(secret) < 16:
        raise BadRequest("secret must be at least 16 characters", field="secret")
    hook = await session.get(Webhook, target, with_for_update=True)
    now = utcnow()
    sealed = cipher.encrypt(secret.encode()).decode()
    if hook is None:
        hook = Webhook(project_id=target, url=url, secret_sealed=sealed)
        session.add(hook)
    hook.url, hook.secret_sealed, hook.enabled, hook.failures = url, sealed, True, 0
    hook.disabled_reason, hook.next_at, hook.updated_at = "", now, now
    await session.flush()
    return hook


async def get(session: AsyncSession, *, actor: Actor, project_id: uuid.UUID | None) -> Webhook:
    target = _target(actor, project_id)
    hook = await session.get(Webhook, target)
    if hook is None:
        raise NotFound("this project has no webhook", project_id=str(target))
    return hook


async def pending_count(session: AsyncSession, project_id: uuid.UUID) -> int:
    stmt = sa.select(sa.func.count()).where(
        _deliveries.c.project_id == project_id, _deliveries.c.state == State.PENDING
    )
    return int((await session.execute(stmt)).scalar_one())


async def delete(session: AsyncSession, *, actor: Actor, project_id: uuid.UUID | None) -> None:
    hook = await get(session, actor=actor, project_id=project_id)
    await session.execute(
        _deliveries.update()
        .where(_deliveries.c.project_id == hook.project_id, _deliveries.c.state == State.PENDING)
        .values(state=State.DROPPED, last_error="the webhook was deleted")
    )
    await session.delete(hook)


# -- the deliverer's side ----------------------------------------------------------------------


async def claim(session: AsyncSession, *, hold: float, now: datetime | None = None) -> list[uuid.UUID]:
    """Claim, for ``hold`` seconds, every enabled webhook with deliveries due (the caller
    commits, then delivers); returns their projects."""
    now = now or utcnow()
    token = uuid.uuid4()
    free = sa.and_(
        _hooks.c.enabled,
        _hooks.c.next_at <= now,
        sa.or_(_hooks.c.claimed_until.is_(None), _hooks.c.claimed_until < now),
    )
    waiting = (
        sa.select(_deliveries.c.project_id).where(_deliveries.c.state == State.PENDING).distinct().scalar_subquery()
    )
    await session.execute(
        _hooks.update()
        .where(free, _hooks.c.project_id.in_(waiting))
        .values(claim=token, claimed_until=now + timedelta(seconds=hold))
    )
    return list(await session.scalars(sa.select(_hooks.c.project_id).where(_hooks.c.claim == token)))


async def due(
    session: AsyncSession, project_id: uuid.UUID, cipher: Fernet, *, limit: int = 100
) -> tuple[str, str, list[WebhookDelivery]]:
    """A claimed webhook's URL, secret and pending deliveries, oldest first."""
    hook = await session.get(Webhook, project_id)
    if hook is None:
        return "", "", []
    secret = cipher.decrypt(hook.secret_sealed.encode()).decode()
    rows = await session.scalars(
        sa.select(WebhookDelivery)
        .where(_deliveries.c.project_id == project_id, _deliveries.c.state == State.PENDING)
        .order_by(_deliveries.c.created_at, _deliveries.c.id)
        .limit(limit)
    )
    return hook.url, secret, list(rows)


async def delivered(session: AsyncSession, project_id: uuid.UUID, ids: list[uuid.UUID]) -> None:
    """These were delivered (a success ends a run of failures); the claim is given back."""
    values: dict[str, Any] = {"claim": None, "claimed_until": None}
    if ids:
        await session.execute(
            _deliveries.update()
            .where(_deliveries.c.id.in_(ids))
            .values(state=State.DELIVERED, delivered_at=utcnow(), attempts=_deliveries.c.attempts + 1)
        )
        values["failures"] = 0
    await session.execute(_hooks.update().where(_hooks.c.project_id == project_id).values(**values))


async def failed(
    session: AsyncSession,
    project_id: uuid.UUID,
    delivery_id: uuid.UUID,
    *,
    error: str,
    retry: float,
    max_failures: int,
) -> str | None:
    """A delivery failed: back off, or disable the webhook after ``max_failures`` in a row
    (pending deliveries dropped). Returns why it was disabled (None: it was not); the caller
    tells the project's users (``notifications.tell_project``)."""
    hook = await session.get(Webhook, project_id)
    if hook is None:
        return None
    await session.execute(
        _deliveries.update()
        .where(_deliveries.c.id == delivery_id)
        .values(attempts=_deliveries.c.attempts + 1, last_error=error[:2000])
    )
    failures = hook.failures + 1
    now = utcnow()
    values: dict[str, Any] = {
        "failures": failures,
        "claim": None,
        "claimed_until": None,
        "next_at": now + timedelta(seconds=min(retry * 2 ** (failures - 1), 3600.0)),
    }
    disabled = failures >= max_failures
    if disabled:
        reason = f"disabled after {failures} failed deliveries in a row; the last: {error[:500]}"
        values.update(enabled=False, disabled_reason=reason)
        await session.execute(
            _deliveries.update()
            .where(_deliveries.c.project_id == project_id, _deliveries.c.state == State.PENDING)
            .values(state=State.DROPPED)
        )
    await session.execute(_hooks.update().where(_hooks.c.project_id == project_id).values(**values))
    return f"the project's webhook {hook.url} was {values['disabled_reason']}" if disabled else None
