"""/healthz: is the database reachable, is the bus connected, how many hosts are up."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import CommittingRoute, StateDep
from app.api.schemas import Health
from app.logic import catalogue

router = APIRouter(tags=["health"], route_class=CommittingRoute)
log = logging.getLogger("nephos.api")


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
async def healthz(state: StateDep) -> JSONResponse:
    """200 when the database and the bus answer, 503 (same body) when one does not."""
    database, hosts_up = "ok", 0
    try:
        async with state.sessions() as session:
            hosts_up = await catalogue.hosts_up(session)
    except (SQLAlchemyError, OSError) as exc:
        log.warning("health check: database unreachable: %s", exc)
        database = "unreachable"
    bus = "ok" if state.bus_ok() else "unreachable"
    body = Health(database=database, bus=bus, hosts_up=hosts_up)
    return JSONResponse(body.model_dump(), status_code=200 if database == bus == "ok" else 503)
