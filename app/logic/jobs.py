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

from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic.actor import Actor
from app.logic.errors import NotFound
from app.models import Job, Server


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
        self.job_ids: list[uuid.UUID] = []

    def add(self, job: Job) -> None:
        self.job_ids.append(job.id)

    def clear(self) -> None:
        self.job_ids.clear()


def new_job(
    session: AsyncSession, outbox: Outbox, server: Server, *, action: str, params: dict[str, Any],
    actor: Actor, commission_id: uuid.UUID | None, host: str | None,
) -> Job:
    now = utcnow()
    job = Job(server_id=server.id, project_id=server.project_id, user_id=actor.user_id,
              action=action, params=params, host=host, commission_id=commission_id,
              created_at=now, deadline=now + outbox.deadline)
    session.add(job)
    outbox.add(job)
    return job


async def get(session: AsyncSession, *, actor: Actor, job_id: uuid.UUID) -> Job:
    job = await session.get(Job, job_id)
    if job is None or not actor.sees(job.project_id):
        raise NotFound(f"job {job_id} not found", job_id=str(job_id))
    return job
