"""Leases and scheduled actions: a project's policy, renewals, one-off actions at a time."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BeforeValidator

from app.api.deps import AdminUser, CommittingRoute, CurrentUser, Cursor, PageLimit, TxDep
from app.api.errors import responses
from app.api.schemas import (
    LeaseOut,
    LeasePolicyIn,
    LeasePolicyOut,
    LeaseRenew,
    Page,
    ScheduleIn,
    ScheduleOut,
    ServerOut,
    iso_8601,
)
from app.logic import accounts, catalogue, leases, schedules
from app.logic.errors import BadRequest
from app.logic.operstate import Action
from app.logic.pagination import DEFAULT_LIMIT

router = APIRouter(prefix="/api/v1", tags=["leases"], route_class=CommittingRoute)


def _policy_out(project_id: uuid.UUID, rule: leases.Policy) -> LeasePolicyOut:
    return LeasePolicyOut(
        project_id=project_id,
        duration_s=rule.duration_s,
        max_lifetime_s=rule.max_lifetime_s,
        warn_before_s=rule.warn_before_s,
        on_expiry=rule.on_expiry.value,
    )


@router.get("/lease-policy", response_model=LeasePolicyOut, responses=responses())
async def get_lease_policy(tx: TxDep, actor: CurrentUser) -> LeasePolicyOut:
    """The caller's project's lease policy (the default when none was set)."""
    if actor.project_id is None:
        raise BadRequest("the caller has no project")
    return _policy_out(actor.project_id, await leases.policy(tx.session, actor.project_id))


@router.put("/admin/projects/{project_id}/lease-policy", response_model=LeasePolicyOut, responses=responses(403, 404))
async def put_lease_policy(project_id: uuid.UUID, body: LeasePolicyIn, tx: TxDep, actor: AdminUser) -> LeasePolicyOut:
    """Set a project's lease policy; leases already given keep their end."""
    await accounts.get_project(tx.session, actor=actor, project_id=project_id)
    rule = leases.Policy(body.duration_s, body.max_lifetime_s, list(body.warn_before_s), Action(body.on_expiry))
    return _policy_out(project_id, await leases.set_policy(tx.session, actor=actor, project_id=project_id, new=rule))


@router.post("/servers/{server_id}/lease", response_model=LeaseOut, responses=responses(403, 404, 409))
async def renew_lease(server_id: uuid.UUID, body: LeaseRenew, tx: TxDep, actor: CurrentUser) -> LeaseOut:
    """Renew the lease by the policy's duration from now, capped by the maximum lifetime (never
    waits for a pending task); an admin may set the end."""
    renewed = await leases.renew(tx.session, actor=actor, server_id=server_id, expires_at=body.expires_at)
    return LeaseOut(lease_expires_at=renewed.lease_expires_at, max_expires_at=renewed.max_expires_at)


@router.post(
    "/servers/{server_id}/schedule", status_code=201, response_model=ScheduleOut, responses=responses(404, 409)
)
async def schedule_action(server_id: uuid.UUID, body: ScheduleIn, tx: TxDep, actor: CurrentUser) -> ScheduleOut:
    """Schedule a one-off action at a time; the sweeper runs it through the usual rules."""
    row = await schedules.schedule(tx.session, actor=actor, server_id=server_id, action=Action(body.action), at=body.at)
    return ScheduleOut.model_validate(row)


@router.get("/servers/{server_id}/schedule", response_model=Page[ScheduleOut], responses=responses(404))
async def list_schedule(
    server_id: uuid.UUID, tx: TxDep, actor: CurrentUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[ScheduleOut]:
    """The server's scheduled actions, the lease's end among them (``kind`` lease)."""
    page = await schedules.listed(tx.session, actor=actor, server_id=server_id, limit=limit, cursor=cursor)
    return Page(items=[ScheduleOut.model_validate(r) for r in page.items], next_cursor=page.next_cursor)


@router.delete("/servers/{server_id}/schedule/{schedule_id}", status_code=204, responses=responses(404))
async def cancel_schedule(server_id: uuid.UUID, schedule_id: uuid.UUID, tx: TxDep, actor: CurrentUser) -> Response:
    """Cancel a pending scheduled action (the lease's end is moved by renewing)."""
    await schedules.cancel(tx.session, actor=actor, server_id=server_id, schedule_id=schedule_id)
    return Response(status_code=204)


@router.get("/admin/leases", response_model=Page[ServerOut], responses=responses(403))
async def leases_ending(
    tx: TxDep,
    actor: AdminUser,
    before: Annotated[
        datetime, BeforeValidator(iso_8601), Query(description="Leases ending before this time (ISO 8601)")
    ],
    limit: PageLimit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Page[ServerOut]:
    """Live VMs whose lease ends before a time, every project."""
    page = await leases.ending_before(tx.session, actor=actor, before=before, limit=limit, cursor=cursor)
    labels = await catalogue.labels(tx.session, page.items)
    return Page(items=[ServerOut.of(s, labels) for s in page.items], next_cursor=page.next_cursor)
