"""The live event stream: what ``GET /api/v1/events/stream`` sends (server-sent events).

* **What**: every server event (``events.record``) becomes one or two stream events --
  ``server.state`` when the operstate changed, and ``server.task`` (an action accepted, a job
  started, a task resumed), ``job.finished`` (a job's result), ``lease.warning``,
  ``lease.action`` or ``server.event`` (anything else) -- and a transaction that moved a
  project's quota usage or pending amounts adds one ``quota.changed`` for that project.
* **Only committed events**: they are noted on the session and written by a ``before_commit``
  hook *in the transaction that made them*, in one multi-row INSERT: a rolled-back change
  never reaches the stream. On PostgreSQL the same statement writes the transaction's webhook
  deliveries (``webhooks``), so what a commit sends out costs it one round trip; and a
  statement trigger on the table (migration 0014) calls ``pg_notify`` (delivered at commit)
  to wake the API processes that stream.
* **Order without loss** (``Cursor``): a row's position is (the writing transaction's id, its
  serial). PostgreSQL hands out neither in commit order, so a reader only reads rows whose
  transaction is older than every transaction still running in this database (``_horizon``):
  no row can appear later behind the cursor, and resuming after any id misses nothing and
  repeats nothing.
  SQLite has one writer at a time, so the serial alone is in commit order (``xid`` is 0). A long
  transaction delays the stream (never loses from it) while it runs.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from app.ids import utcnow
from app.logic import rows, webhooks
from app.logic.actor import Actor
from app.logic.errors import BadRequest, Forbidden
from app.models import NewServerEvent, Server, ServerEvent, StreamEvent, UTCDateTime, table_of

_stream = table_of(StreamEvent)
_events = table_of(ServerEvent)
#: ``session.info``: what the transaction leaves for its commit (``_write``): the stream's
#: events, the projects whose quotas moved, and the VMs' history rows (``server_events``).
_PENDING, _QUOTAS, _HISTORY = "nephos.stream_events", "nephos.stream_quotas", "nephos.server_events"
#: ``session.info``: per open savepoint, how much of each there was when it began.
_MARKS = "nephos.until_commit_marks"
#: Set on a session whose transaction wrote stream events (read by the process's waker).
WRITTEN = "nephos.stream_written"
#: The PostgreSQL channel that wakes streaming API processes when a transaction added events.
CHANNEL = "nephos_stream"
KINDS = (
    "server.state",
    "server.task",
    "job.finished",
    "lease.warning",
    "lease.action",
    "server.event",
    "quota.changed",
)
_TASK_EVENTS = {"action", "job_started", "task_resumed"}
_JOB_EVENTS = {"job_succeeded", "job_failed"}


def kinds_of(event: NewServerEvent) -> list[str]:
    """The stream kinds of a server event (the state change first, if any)."""
    out = ["server.state"] if event.operstate_to is not None and event.operstate_to != event.operstate_from else []
    if event.kind in _TASK_EVENTS:
        out.append("server.task")
    elif event.kind in _JOB_EVENTS:
        out.append("job.finished")
    elif event.kind == "lease_warning":
        out.append("lease.warning")
    elif event.kind in ("lease_action", "user_action"):
        out.append("lease.action")
    elif not out:
        out.append("server.event")
    return out


def keep(session: AsyncSession | Session, event: NewServerEvent) -> None:
    """Called by ``events.record``: the event's row is written to its VM's history when the
    transaction commits."""
    session.info.setdefault(_HISTORY, []).append(event)


def note(session: AsyncSession | Session, server: Server, event: NewServerEvent) -> None:
    """Called by ``events.record``: the event goes to the stream when the transaction commits."""
    pending = session.info.setdefault(_PENDING, [])
    for kind in kinds_of(event):
        pending.append((server, event, kind))


def _data(server: Server, event: NewServerEvent) -> dict[str, Any]:
    """An event as the stream carries it, with the VM's operstate and task as the transaction
    leaves them."""
    return {
        "server_id": str(server.id),
        "project_id": str(server.project_id),
        "event": event.kind,
        "action": event.action,
        "from": event.operstate_from,
        "to": event.operstate_to,
        "operstate": server.operstate,
        "task": server.task,
        "job_id": str(event.job_id) if event.job_id else None,
        "message": event.message,
        "at": event.created_at.isoformat(),
    }


def quota_changed(session: AsyncSession | Session, project_id: uuid.UUID, resources: list[str]) -> None:
    """The project's usage or pending amounts of ``resources`` move in this transaction."""
    session.info.setdefault(_QUOTAS, {}).setdefault(project_id, set()).update(resources)


#: PostgreSQL: what a committing transaction sends out -- its VMs' history rows, its stream
#: events in the order they were made (the serial follows the ORDER BY; the rows take the
#: writing transaction's id), and the webhook deliveries of those events whose project has an
#: enabled webhook (none found: none written). The arrays are the rows' columns; a statement
#: trigger on ``stream_events`` (migration 0014) notifies CHANNEL. Three INSERTs, sent as one
#: statement: at the commit (``_OUT``), or as CTEs of a caller's last statement (``with_out``).
_HISTORY_INSERT = """
    INSERT INTO server_events (id, server_id, job_id, user_id, kind, action, operstate_from, operstate_to,
                               message, created_at)
    SELECT * FROM unnest(CAST(:h_id AS uuid[]), CAST(:h_server AS uuid[]), CAST(:h_job AS uuid[]),
                         CAST(:h_user AS uuid[]), CAST(:h_kind AS text[]), CAST(:h_action AS text[]),
                         CAST(:h_from AS text[]), CAST(:h_to AS text[]), CAST(:h_message AS text[]),
                         CAST(:h_at AS timestamptz[]))
"""
_STREAM_INSERT = """
    INSERT INTO stream_events (xid, project_id, server_id, kind, body, created_at)
    SELECT pg_current_xact_id()::text::bigint, e.project_id, e.server_id, e.kind, e.body::json, :o_now
      FROM unnest(CAST(:e_project AS uuid[]), CAST(:e_server AS uuid[]), CAST(:e_kind AS text[]),
                  CAST(:e_body AS text[])) WITH ORDINALITY AS e(project_id, server_id, kind, body, n)
     ORDER BY e.n
"""
_DELIVERIES_INSERT = """
    INSERT INTO webhook_deliveries (id, project_id, server_id, kind, body, state, attempts, last_error, created_at)
    SELECT d.id, d.project_id, d.server_id, d.kind, d.body::json, :o_pending, 0, '', :o_now
      FROM unnest(CAST(:w_id AS uuid[]), CAST(:w_project AS uuid[]), CAST(:w_server AS uuid[]),
                  CAST(:w_kind AS text[]), CAST(:w_body AS text[])) WITH ORDINALITY
                  AS d(id, project_id, server_id, kind, body, n)
      JOIN webhooks AS w ON w.project_id = d.project_id AND w.enabled
     ORDER BY d.n
"""
_OUT_BINDS: tuple[sa.BindParameter[Any], ...] = (
    sa.bindparam("o_now", type_=UTCDateTime),
    sa.bindparam("o_pending", value=webhooks.State.PENDING),
)
_OUT = sa.text(f"WITH history AS ({_HISTORY_INSERT}), stream AS ({_STREAM_INSERT}) {_DELIVERIES_INSERT}").bindparams(
    *_OUT_BINDS
)
_OUT_CTES = tuple(
    sa.text(insert).bindparams(*(b for b in _OUT_BINDS if f":{b.key}" in insert)).columns().cte(name)
    for name, insert in (
        ("out_history", _HISTORY_INSERT),
        ("out_stream", _STREAM_INSERT),
        ("out_deliveries", _DELIVERIES_INSERT),
    )
)


@sa_event.listens_for(Session, "before_commit")
def _write(session: Session) -> None:
    """The transaction commits: its VMs' history rows, its stream events and its webhook
    deliveries are written in it (those ``with_out`` has not sent already).

    The history rows wait for the commit too (``events.record`` adds no ORM object): on
    PostgreSQL they go in the same statement as the rest, instead of an INSERT of their own."""
    session.info.pop(_MARKS, None)
    taken = _take(session)
    if taken is None:
        return
    history, pending, quotas, hooks = taken
    if history and session.new:
        session.flush()  # a history row's server may be one this transaction makes
    if rows.postgres(session):
        session.execute(_OUT, _out_params(history, pending, quotas, hooks))
        return
    now = utcnow()
    if history:
        session.execute(
            _events.insert(),
            [{column: getattr(h, column) for column in _HISTORY_BINDS.values()} for h in history],
        )
    if events := _stream_rows(pending, quotas, now):
        session.execute(_stream.insert().values(xid=0), events)
        session.info[WRITTEN] = True
    if hooks:
        webhooks.write(session, hooks, now)


_Taken = tuple[
    list[NewServerEvent], list[tuple[Server, NewServerEvent, str]], dict[uuid.UUID, set[str]], list[dict[str, Any]]
]


def _take(session: AsyncSession | Session) -> _Taken | None:
    """What waits for the commit, taken out of the session (None: nothing)."""
    history: list[NewServerEvent] = session.info.pop(_HISTORY, [])
    pending: list[tuple[Server, NewServerEvent, str]] = session.info.pop(_PENDING, [])
    quotas: dict[uuid.UUID, set[str]] = session.info.pop(_QUOTAS, {})
    hooks = webhooks.take(session)
    if not history and not pending and not quotas and not hooks:
        return None
    return history, pending, quotas, hooks


def _stream_rows(
    pending: list[tuple[Server, NewServerEvent, str]], quotas: dict[uuid.UUID, set[str]], now: datetime
) -> list[dict[str, Any]]:
    """The stream's rows: the VMs' events, then one per project whose quotas moved."""
    return [
        {"project_id": s.project_id, "server_id": s.id, "kind": kind, "body": _data(s, e), "created_at": now}
        for s, e, kind in pending
    ] + [
        {
            "project_id": project_id,
            "server_id": None,
            "kind": "quota.changed",
            "body": {"project_id": str(project_id), "resources": sorted(resources), "at": now.isoformat()},
            "created_at": now,
        }
        for project_id, resources in sorted(quotas.items())
    ]


def _out_params(
    history: list[NewServerEvent],
    pending: list[tuple[Server, NewServerEvent, str]],
    quotas: dict[uuid.UUID, set[str]],
    hooks: list[dict[str, Any]],
) -> dict[str, Any]:
    """``_OUT``'s (and ``_OUT_CTES``') parameters."""
    now = utcnow()
    events = _stream_rows(pending, quotas, now)
    deliveries = [webhooks.delivery(body, now) for body in hooks]
    return {f"h_{name}": [getattr(h, column) for h in history] for name, column in _HISTORY_BINDS.items()} | {
        "o_now": now,
        "e_project": [r["project_id"] for r in events],
        "e_server": [r["server_id"] for r in events],
        "e_kind": [r["kind"] for r in events],
        "e_body": [json.dumps(r["body"]) for r in events],
        "w_id": [d["id"] for d in deliveries],
        "w_project": [d["project_id"] for d in deliveries],
        "w_server": [d["server_id"] for d in deliveries],
        "w_kind": [d["kind"] for d in deliveries],
        "w_body": [json.dumps(d["body"]) for d in deliveries],
    }


@functools.lru_cache(maxsize=32)
def _carrying(statement: Any) -> Any:
    """``statement`` with ``_OUT_CTES`` as CTEs of it, built once per statement (the callers'
    are module-level, built once)."""
    return statement.add_cte(*_OUT_CTES)


def with_out(session: AsyncSession, along: tuple[Any, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """``along`` (a statement and its parameters), carrying what the transaction has left so
    far for its commit (``_write``): sent now in the same statement, the commit then has
    nothing left to send, one round trip fewer. For a caller whose statement is its last
    change: the stream's events carry the VMs' state and task as they are now.

    Only on PostgreSQL and outside a savepoint (whose rollback must find what it noted still
    waiting): elsewhere ``along`` comes back as it is, and the commit writes as usual."""
    if not rows.postgres(session) or session.info.get(_MARKS):
        return along
    taken = _take(session)
    if taken is None:
        return along
    statement, params = along
    return _carrying(statement), params | _out_params(*taken)


async def write_last(session: AsyncSession, also: tuple[sa.Update, dict[str, Any]] | None = None) -> None:
    """What a transaction has left to write before its commit, in one statement on PostgreSQL
    (outside a savepoint): its new rows and its changes to loaded rows (``rows.insert_new``,
    ``rows.changed_rows``), ``also`` (an UPDATE of other rows, as a CTE), and what waits for
    the commit (``with_out``). For a transaction that changes nothing after it: a result applied
    alone writes its VM, its job, its usage move and their events at once, instead of a
    statement per table and the events at the commit. Elsewhere, or when the unit of work must
    write them, ``also`` is sent alone and the commit's flush does the rest as usual."""
    found = None if not rows.postgres(session) or session.info.get(_MARKS) else rows.changed_rows(session)
    if found is None:
        if also is not None:
            await session.execute(*also)
        return
    statement, params, objects = found
    if also is not None:
        statement, params = _along_with(statement, also[0]), params | also[1]
    await rows.insert_new(session, along=with_out(session, (statement, params)))
    rows.written(session, objects)


@functools.lru_cache(maxsize=32)
def _along_with(statement: sa.Update, other: sa.Update) -> sa.Update:
    """``statement`` with ``other`` as a CTE of it, built once per pair."""
    return statement.add_cte(other.cte("also"))


#: ``_OUT``'s history parameters (``h_<name>``) and the column each fills.
_HISTORY_BINDS = {
    "id": "id",
    "server": "server_id",
    "job": "job_id",
    "user": "user_id",
    "kind": "kind",
    "action": "action",
    "from": "operstate_from",
    "to": "operstate_to",
    "message": "message",
    "at": "created_at",
}

#: What waits for the commit, kept in ``session.info``.
_UNTIL_COMMIT = (_HISTORY, _PENDING, webhooks.PENDING)


def _mark(session: Session) -> dict[str, Any]:
    info = session.info
    return {key: len(info.get(key, ())) for key in _UNTIL_COMMIT} | {
        _QUOTAS: {project: set(resources) for project, resources in info.get(_QUOTAS, {}).items()}
    }


@sa_event.listens_for(Session, "after_transaction_create")
def _savepoint(session: Session, transaction: SessionTransaction) -> None:
    """A savepoint begins: remember how much waits for the commit, for its rollback."""
    if transaction.nested:
        session.info.setdefault(_MARKS, {})[transaction] = _mark(session)


@sa_event.listens_for(Session, "after_soft_rollback")
def _forget(session: Session, previous: SessionTransaction) -> None:
    """A rollback: what the rolled-back part noted is forgotten -- all of it for the
    transaction, only what came after the savepoint began for a savepoint."""
    info = session.info
    if not previous.nested:
        for key in (*_UNTIL_COMMIT, _QUOTAS, _MARKS):
            info.pop(key, None)
        return
    mark = info.get(_MARKS, {}).pop(previous, None)
    if mark is None:
        return
    for key in _UNTIL_COMMIT:
        if key in info:
            del info[key][mark[key] :]
    info[_QUOTAS] = mark[_QUOTAS]


@dataclass(frozen=True, order=True)
class Cursor:
    """A position in the stream: (transaction id, serial). Its text form is the SSE event id."""

    xid: int = 0
    serial: int = 0

    def __str__(self) -> str:
        return f"{self.xid}-{self.serial}"

    @classmethod
    def parse(cls, text: str | None) -> Cursor | None:
        """A client's ``Last-Event-ID`` (None: not one of ours, or none)."""
        if not text:
            return None
        try:
            xid, serial = text.strip().split("-", 1)
            return cls(int(xid), int(serial))
        except ValueError:
            return None


@dataclass(frozen=True)
class Event:
    cursor: Cursor
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Scope:
    """Whose events a reader may see: some projects (None: every project, an admin's), one
    server, some kinds."""

    projects: list[uuid.UUID] | None
    server_id: uuid.UUID | None = None
    kinds: list[str] | None = None


def scope_for(
    actor: Actor, *, all_projects: bool, project_id: uuid.UUID | None, server_id: uuid.UUID | None, kinds: list[str]
) -> Scope:
    """Whose events ``actor`` asks for: its own project's; an admin's, every project's or one
    named. Unknown kinds are refused (400), another project's stream for a user too (403)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise BadRequest(f"unknown event kinds {', '.join(unknown)}; known: {', '.join(KINDS)}", field="kind")
    if (all_projects or project_id is not None) and not actor.is_admin:
        raise Forbidden("only an admin streams other projects' events")
    if all_projects:
        projects = None
    elif project_id is not None:
        projects = [project_id]
    else:
        if actor.project_id is None:
            raise BadRequest("the caller has no project: an admin streams with all_projects=true")
        projects = [actor.project_id]
    return Scope(projects=projects, server_id=server_id, kinds=kinds or None)


async def head(session: AsyncSession) -> Cursor:
    """Where a new reader starts: after everything already readable."""
    horizon = await _horizon(session)
    stmt = sa.select(_stream.c.xid, _stream.c.id).order_by(_stream.c.xid.desc(), _stream.c.id.desc()).limit(1)
    if horizon is not None:
        stmt = stmt.where(_stream.c.xid < horizon)
    row = (await session.execute(stmt)).first()
    return Cursor(int(row[0]), int(row[1])) if row else Cursor()


#: The oldest transaction still running that may write to this database, from one consistent
#: snapshot. Transaction ids are the whole PostgreSQL cluster's: a long transaction in another
#: database must not hold this one's stream back, so the running transactions that
#: ``pg_stat_activity`` places in another database are left out. One it cannot place (another
#: role's session, a prepared transaction) counts: the horizon errs on the side of waiting.
#: With none running, everything before the snapshot's ``xmax`` is final.
_HORIZON = sa.text(
    """
    SELECT least(
        pg_snapshot_xmax(s)::text::bigint,
        (SELECT min(x::text::bigint) FROM pg_snapshot_xip(s) AS x
          WHERE NOT EXISTS (
            SELECT 1 FROM pg_stat_activity AS a
             WHERE a.backend_xid IS NOT NULL
               AND a.datname IS DISTINCT FROM current_database()
               AND a.backend_xid::text::bigint = x::text::bigint % 4294967296)))
      FROM pg_current_snapshot() AS s
    """
)


async def _horizon(session: AsyncSession) -> int | None:
    """PostgreSQL: rows of transactions below this id are final (see ``_HORIZON``)."""
    if not rows.postgres(session):
        return None
    return int((await session.execute(_HORIZON)).scalar_one())


async def after(session: AsyncSession, cursor: Cursor, scope: Scope, *, limit: int = 500) -> list[Event]:
    """The events after ``cursor`` a reader of ``scope`` may see, in stream order."""
    horizon = await _horizon(session)
    stmt = (
        sa.select(_stream.c.xid, _stream.c.id, _stream.c.kind, _stream.c.body)
        .where(sa.tuple_(_stream.c.xid, _stream.c.id) > sa.tuple_(sa.literal(cursor.xid), sa.literal(cursor.serial)))
        .order_by(_stream.c.xid, _stream.c.id)
        .limit(limit)
    )
    if horizon is not None:
        stmt = stmt.where(_stream.c.xid < horizon)
    if scope.projects is not None:
        stmt = stmt.where(_stream.c.project_id.in_(scope.projects))
    if scope.server_id is not None:
        stmt = stmt.where(_stream.c.server_id == scope.server_id)
    if scope.kinds:
        stmt = stmt.where(_stream.c.kind.in_(scope.kinds))
    rows = (await session.execute(stmt)).all()
    return [Event(Cursor(int(xid), int(serial)), kind, {**body, "kind": kind}) for xid, serial, kind, body in rows]
