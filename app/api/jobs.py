"""/api/v1/jobs: the state of one job."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from app.api.deps import CommittingRoute, CurrentUser, TxDep
from app.api.errors import responses
from app.api.schemas import JobOut
from app.logic import jobs

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], route_class=CommittingRoute)


@router.get("/{job_id}", response_model=JobOut, responses=responses(404))
async def get_job(job_id: uuid.UUID, tx: TxDep, actor: CurrentUser) -> JobOut:
    """A job; it is final no later than the moment its server's task is cleared."""
    return JobOut.model_validate(await jobs.get(tx.session, actor=actor, job_id=job_id))
