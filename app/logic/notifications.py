"""Mails owed to users: lease warnings, a lease's end, a disabled webhook.

Each notification is a row, recorded in a transaction before any mail goes out, with a unique
key -- the VM, the kind, the lease end it refers to and, for a warning, its offset -- so
however many dispatchers sweep, and however often one restarts, a warning is recorded once. A
renewal moves the lease's end, and the warnings of the new end are new rows: they are re-armed.

Sending is separate (``app.dispatcher.notifier``): a sender *claims* due rows for a while (a
conditional update, committed; no row lock is held while it talks to the mail server), mails one
digest per user, then marks them sent. A mail server that refuses or is away leaves the rows
unsent with a later ``next_at`` (backoff): mail is delayed, never lost, and leases never wait
for it. The one window where a mail could go twice is a sender killed between the mail server's
"accepted" and its own commit; the digest's ``Message-ID`` is made from the rows' ids, so a
mail system that sees it twice can tell.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow, uuid7
from app.logic import events, rows
from app.logic.leases import DEFAULT
from app.logic.operstate import Operstate
from app.models import LeasePolicy, Notification, Server, User, table_of

_notes, _servers, _users, _policies = (
    table_of(Notification),
    table_of(Server),
    table_of(User),
    table_of(LeasePolicy),
)


class Kind:
    WARNING = "lease_warning"
    ENDED = "lease_ended"
    WEBHOOK_DISABLED = "webhook_disabled"


def humanize(seconds: float) -> str:
    """ "7 days", "1 day", "3 hours", "20 seconds": how a warning names its offset."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size:
            n = round(seconds / size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return "moments"


def _due_offset(now: datetime, end: datetime, offsets: list[int]) -> int | None:
    """The most urgent warning whose time has come for a lease ending at ``end``: of the
    offsets already passed, the smallest (a VM created a day before its end gets "tomorrow",
    not a late "in 7 days")."""
    passed = [w for w in offsets if end - timedelta(seconds=w) <= now]
    return min(passed) if passed else None


def _row(
    server: Server, kind: str, lease_end: datetime | None, offset_s: int, data: dict[str, object]
) -> dict[str, object]:
    now = utcnow()
    return {
        "id": uuid7(),  # time-ordered, as every id
        "user_id": server.user_id,
        "project_id": server.project_id,
        "server_id": server.id,
        "kind": kind,
        "lease_end": lease_end,
        "offset_s": offset_s,
        "data": data,
        "created_at": now,
        "next_at": now,
        "attempts": 0,
        "last_error": "",
    }


async def plan_warnings(session: AsyncSession, *, now: datetime | None = None) -> int:
    """Record the warnings whose time has come (each once); each also becomes a server event
    ``lease_warning`` (and so a webhook delivery). Returns how many were recorded now."""
    now = now or utcnow()
    policies = {
        row.project_id: list(row.warn_before_s)
        for row in (await session.execute(sa.select(_policies.c.project_id, _policies.c.warn_before_s))).all()
    }
    horizon = max([w for ws in policies.values() for w in ws] + DEFAULT.warn_before_s + [0])
    candidates = (
        await session.scalars(
            sa.select(Server).where(
                _servers.c.lease_expires_at.is_not(None),
                _servers.c.lease_expires_at > now,
                _servers.c.lease_expires_at <= now + timedelta(seconds=horizon),
                _servers.c.operstate != Operstate.DESTROYED.value,
            )
        )
    ).all()
    if not candidates:
        return 0
    stmt = sa.select(_notes.c.server_id, _notes.c.lease_end, _notes.c.offset_s).where(
        _notes.c.kind == Kind.WARNING, _notes.c.server_id.in_([s.id for s in candidates])
    )
    recorded = {(row.server_id, row.lease_end, row.offset_s) for row in (await session.execute(stmt)).all()}
    made = 0
    for server in candidates:
        end = server.lease_expires_at
        assert end is not None
        offset = _due_offset(now, end, policies.get(server.project_id, DEFAULT.warn_before_s))
        if offset is None or (server.id, end, offset) in recorded:
            continue
        data = {"server_name": server.name, "lease_expires_at": end.isoformat(), "warn_before_s": offset}
        if await rows.insert_or_skip(session, _notes, _row(server, Kind.WARNING, end, offset, data)):
            events.record(
                session,
                server,
                "lease_warning",
                message=f"the lease ends {end:%Y-%m-%d %H:%M:%S} UTC (in {humanize((end - now).total_seconds())})",
            )
            made += 1
    return made


async def lease_ended(session: AsyncSession, server: Server, *, action: str, lease_end: datetime, reason: str) -> None:
    """The lease's end ran (in the transaction that ran it): the owner is told, once."""
    data: dict[str, object] = {
        "server_name": server.name,
        "action": action,
        "reason": reason,
        "lease_expires_at": lease_end.isoformat(),
    }
    await rows.insert_or_skip(session, _notes, _row(server, Kind.ENDED, lease_end, 0, data))


async def tell_project(session: AsyncSession, project_id: uuid.UUID, kind: str, data: dict[str, object]) -> int:
    """A notification for every user of a project with an address (a disabled webhook)."""
    users = (
        await session.scalars(sa.select(_users.c.id).where(_users.c.project_id == project_id, _users.c.email != ""))
    ).all()
    now = utcnow()
    for user_id in users:
        session.add(
            Notification(user_id=user_id, project_id=project_id, kind=kind, data=data, created_at=now, next_at=now)
        )
    return len(users)


# -- the sender's side -------------------------------------------------------------------------


@dataclass
class Digest:
    """What one user is told in one mail."""

    user_id: uuid.UUID
    email: str
    name: str
    items: list[Notification] = field(default_factory=list)

    @property
    def ids(self) -> list[uuid.UUID]:
        return [n.id for n in self.items]


async def claim(session: AsyncSession, *, hold: float, limit: int = 500, now: datetime | None = None) -> list[Digest]:
    """Claim due, unsent notifications for ``hold`` seconds (the caller commits, then mails)
    and group them per user. A claim is a conditional update: two senders never both hold one."""
    now = now or utcnow()
    token = uuid.uuid4()
    free = sa.and_(
        _notes.c.sent_at.is_(None),
        _notes.c.next_at <= now,
        sa.or_(_notes.c.claimed_until.is_(None), _notes.c.claimed_until < now),
    )
    due = sa.select(_notes.c.id).where(free).order_by(_notes.c.user_id, _notes.c.created_at).limit(limit)
    await session.execute(
        _notes.update()
        .where(_notes.c.id.in_(due.scalar_subquery()), free)
        .values(claim=token, claimed_until=now + timedelta(seconds=hold))
        .execution_options(synchronize_session=False)
    )
    rows = (
        await session.execute(
            sa.select(Notification, _users.c.email, _users.c.name)
            .join(_users, _users.c.id == _notes.c.user_id)
            .where(_notes.c.claim == token)
            .order_by(_notes.c.user_id, _notes.c.created_at)
        )
    ).all()
    digests: dict[uuid.UUID, Digest] = {}
    for note, email, name in rows:
        digests.setdefault(note.user_id, Digest(note.user_id, email, name)).items.append(note)
    return list(digests.values())


async def sent(session: AsyncSession, ids: list[uuid.UUID], *, error: str = "") -> None:
    """The mail server took them (or there was no address: ``error`` says so)."""
    await session.execute(
        _notes.update()
        .where(_notes.c.id.in_(ids))
        .values(sent_at=utcnow(), claim=None, claimed_until=None, last_error=error)
        .execution_options(synchronize_session=False)
    )


async def failed(session: AsyncSession, ids: list[uuid.UUID], *, error: str, retry: float) -> None:
    """Not mailed: try again after ``retry`` seconds, doubled per attempt (capped at an hour)."""
    now = utcnow()
    attempts = (await session.execute(sa.select(_notes.c.id, _notes.c.attempts).where(_notes.c.id.in_(ids)))).all()
    for note_id, tried in attempts:
        delay = min(retry * 2**tried, 3600.0)
        await session.execute(
            _notes.update()
            .where(_notes.c.id == note_id)
            .values(
                attempts=tried + 1,
                next_at=now + timedelta(seconds=delay),
                claim=None,
                claimed_until=None,
                last_error=error[:2000],
            )
        )


_HEADINGS = {
    "stop": "were stopped at their lease's end",
    "suspend": "were suspended at their lease's end",
    "destroy": "were destroyed at their lease's end",
}


def compose(digest: Digest, *, api_url: str, now: datetime | None = None) -> tuple[str, str]:
    """The digest's subject and plain-text body: the user's VMs grouped by what is said of them,
    with the request that renews each lease."""
    now = now or utcnow()
    groups: dict[str, list[Notification]] = defaultdict(list)
    for note in digest.items:
        if note.kind == Kind.WARNING:
            heading = (
                "leases ending tomorrow"
                if 3600 < note.offset_s <= 86400
                else f"leases ending in {humanize(note.offset_s)}"
            )
        elif note.kind == Kind.ENDED:
            heading = "servers that " + _HEADINGS.get(
                str(note.data.get("action")), "were acted on at their lease's end"
            )
        else:
            heading = "notices"
        groups[heading].append(note)
    lines = [f"Hello {digest.name or digest.email},", ""]
    warned = False
    for heading, notes in groups.items():
        lines.append(f"{heading.capitalize()}:")
        for note in notes:
            name = note.data.get("server_name", "")
            if note.kind == Kind.WARNING:
                warned = True
                lines.append(f"  - {name} ({note.server_id}): the lease ends {note.data.get('lease_expires_at')}")
                lines.append(f"      renew: POST {api_url}/api/v1/servers/{note.server_id}/lease")
            elif note.kind == Kind.ENDED:
                lines.append(f"  - {name} ({note.server_id}): {note.data.get('action')} -- {note.data.get('reason')}")
            else:
                lines.append(f"  - {note.data.get('message', note.kind)}")
        lines.append("")
    if warned:
        lines += [
            "To renew a lease, send the renew request with your token, e.g.:",
            f'  curl -X POST -H "Authorization: Bearer $TOKEN" {api_url}/api/v1/servers/<id>/lease',
            "",
        ]
    lines.append("-- Nephos")
    counts = ", ".join(f"{len(n)} {h}" for h, n in groups.items())
    return f"[Nephos] {counts}", "\n".join(lines) + "\n"
