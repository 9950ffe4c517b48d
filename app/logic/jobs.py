"""Jobs: the outbox rows that carry an accepted action to a host's agent.

A job is written in the same transaction that accepts its action, and is
published only after that transaction commits: the ``Outbox`` collects the
ids of the jobs a transaction wrote so the edge (route, sweeper) can publish
them once committed. On rollback nothing is published. A job committed but
never confirmed as published stays PENDING, and the dispatcher's sweeper
sends it again.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow, uuid7
from app.logic import events, rows
from app.logic.actor import Actor
from app.logic.errors import NotFound
from app.logic.operstate import Action
from app.models import Job, Server, table_of


class JobStatus(StrEnum):
    PENDING = "PENDING"
    SENT = "SENT"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"


FINAL = frozenset({JobStatus.SUCCESS, JobStatus.ERROR})


class Outbox:
    """Jobs written by this transaction, to publish after it commits."""

    def __init__(self, deadline_seconds: int = 600) -> None:
        self.deadline = timedelta(seconds=deadline_seconds)
        # The rows themselves: once committed, the publisher builds their messages from them
        # instead of reading them back.
        self.jobs: list[Job] = []

    @property
    def job_ids(self) -> list[uuid.UUID]:
        return [job.id for job in self.jobs]

    def add(self, job: Job) -> None:
        self.jobs.append(job)

    def discard(self, job_id: uuid.UUID) -> None:
        """Not to be published after all (the transaction finished it itself)."""
        self.jobs = [job for job in self.jobs if job.id != job_id]

    def clear(self) -> None:
        self.jobs.clear()


#: The job parameter that lists which others are sealed with the server key (a console password):
#: the job row keeps them unreadable, and only the publisher opens them, for the agent's message.
SEALED = "sealed"


def seal(params: dict[str, Any], cipher: Fernet, **secret: str) -> dict[str, Any]:
    """``params`` plus ``secret``'s values, sealed, and named under ``SEALED``."""
    sealed = {name: cipher.encrypt(value.encode()).decode() for name, value in secret.items()}
    return {**params, **sealed, SEALED: sorted({*params.get(SEALED, []), *sealed})}


def unsealed(params: dict[str, Any], cipher: Fernet) -> dict[str, Any]:
    """The parameters as the agent needs them: sealed values opened, the list dropped."""
    names = params.get(SEALED) or []
    opened = {name: cipher.decrypt(str(params[name]).encode()).decode() for name in names if name in params}
    return {**{k: v for k, v in params.items() if k != SEALED}, **opened}


def new_job(
    session: AsyncSession,
    outbox: Outbox,
    server: Server,
    *,
    action: str,
    params: dict[str, Any],
    actor: Actor,
    commission_id: uuid.UUID | None,
    host: str | None,
    job_id: uuid.UUID | None = None,
) -> Job:
    """A new job for ``server`` (under ``job_id`` when its row already names it as its task),
    to be published after the commit."""
    now = utcnow()
    job = Job(
        id=job_id or uuid7(),
        server_id=server.id,
        project_id=server.project_id,
        user_id=actor.user_id,
        action=action,
        params=params,
        host=host,
        commission_id=commission_id,
        created_at=now,
        deadline=now + outbox.deadline,
    )
    session.add(job)
    outbox.add(job)
    return job


async def get(session: AsyncSession, *, actor: Actor, job_id: uuid.UUID) -> Job:
    job = await session.get(Job, job_id)
    if job is None or not actor.sees(job.project_id):
        raise NotFound(f"job {job_id} not found", job_id=str(job_id))
    return job


async def last(session: AsyncSession, server_id: uuid.UUID, action: Action) -> Job | None:
    """The server's latest job of this action."""
    return (
        await session.scalars(
            sa.select(Job)
            .where(_jobs.c.server_id == server_id, _jobs.c.action == action.value)
            .order_by(_jobs.c.created_at.desc(), _jobs.c.id.desc())
            .limit(1)
        )
    ).first()


# -- the outbox's side: what to (re)send, and what was sent ---------------------------------

_jobs = table_of(Job)


#: The outbox's statements, built once per dialect: one text for any number of jobs (``among``),
#: so the rounds' varying sizes neither render nor prepare them again.
_TO_PUBLISH = rows.ByDialect(
    lambda pg: sa.select(Job).where(
        rows.among(_jobs.c.id, "ids", postgres=pg), _jobs.c.status == JobStatus.PENDING.value
    )
)
_SENDABLE = rows.ByDialect(
    lambda pg: (
        sa.select(_jobs.c.id)
        .where(rows.among(_jobs.c.id, "ids", postgres=pg), _jobs.c.status == JobStatus.PENDING.value)
        .order_by(_jobs.c.id)
        .with_for_update(key_share=True, skip_locked=True)
    )
)
_MARK_SENT = rows.ByDialect(
    lambda pg: (
        _jobs.update()
        .where(rows.among(_jobs.c.id, "ids", postgres=pg))
        .values(
            status=JobStatus.SENT.value,
            sent_at=sa.bindparam("now", type_=_jobs.c.sent_at.type),
            attempts=_jobs.c.attempts + 1,
        )
    )
)


async def to_publish(session: AsyncSession, job_ids: list[uuid.UUID]) -> list[Job]:
    """The jobs among ``job_ids`` still waiting to be published (no lock: a publish is idempotent)."""
    if not job_ids:
        return []
    return list(await session.scalars(_TO_PUBLISH.of(session), {"ids": job_ids}))


async def unsent(session: AsyncSession, *, older_than: timedelta, limit: int = 500) -> list[uuid.UUID]:
    """PENDING jobs committed more than ``older_than`` ago: their publish failed or never ran."""
    stmt = (
        sa.select(_jobs.c.id)
        .where(_jobs.c.status == JobStatus.PENDING.value, _jobs.c.created_at < utcnow() - older_than)
        .order_by(_jobs.c.id)
        .limit(limit)
    )
    return list(await session.scalars(stmt))


async def mark_sent(session: AsyncSession, job_ids: list[uuid.UUID]) -> None:
    """Confirmed by the broker. Only PENDING moves (a result may already have been applied);
    rows are taken in id order, and one being finished right now is skipped, not waited for."""
    if not job_ids:
        return
    ids = list(await session.scalars(_SENDABLE.of(session), {"ids": job_ids}))
    if ids:
        await session.execute(_MARK_SENT.of(session), {"ids": ids, "now": utcnow()})


async def mark_running(session: AsyncSession, *, job_id: uuid.UUID) -> bool:
    """The agent started the job; ``False`` when it is unknown or already past that.

    One conditional UPDATE: no lock is held on the job before the event row is written, so
    this never waits in the opposite order to ``apply_result`` (server row, then job row).
    """
    row = (
        await session.execute(
            _jobs.update()
            .where(_jobs.c.id == job_id, _jobs.c.status.in_([JobStatus.PENDING.value, JobStatus.SENT.value]))
            .values(status=JobStatus.RUNNING.value, started_at=utcnow())
            .returning(_jobs.c.server_id, _jobs.c.action, _jobs.c.host)
        )
    ).first()
    if row is None:
        return False
    server = await session.get(Server, row.server_id)
    if server is not None:
        events.record(
            session, server, "job_started", job_id=job_id, action=row.action, message=f"running on {row.host}"
        )
    return True
