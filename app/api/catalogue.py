"""/api/v1/flavors, /images, /zones and /quotas: what a user may build from and with."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CommittingRoute, CurrentUser, Cursor, PageLimit, TxDep
from app.api.errors import responses
from app.api.schemas import (
    FlavorOut,
    ImageOut,
    Page,
    PlacementVerdict,
    QuotaCheckIn,
    QuotaCheckOut,
    QuotasOut,
    ZoneOut,
)
from app.logic import catalogue, quotas, whatif
from app.logic.pagination import DEFAULT_LIMIT

router = APIRouter(prefix="/api/v1", tags=["catalogue"], route_class=CommittingRoute)


@router.get("/flavors", response_model=Page[FlavorOut], responses=responses(400))
async def list_flavors(
    tx: TxDep, _: CurrentUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[FlavorOut]:
    """Flavors, each with how many more VMs of it the hosts can take now, in all and per zone."""
    page, room = await catalogue.list_flavors(tx.session, limit=limit, cursor=cursor)
    items = [
        FlavorOut(
            id=f.id,
            name=f.name,
            vcpus=f.vcpus,
            ram_mb=f.ram_mb,
            disk_gb=f.disk_gb,
            capacity=sum(room[f.id].values()),
            zones=room[f.id],
        )
        for f in page.items
    ]
    return Page(items=items, next_cursor=page.next_cursor)


@router.get("/images", response_model=Page[ImageOut], responses=responses(400))
async def list_images(
    tx: TxDep, actor: CurrentUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[ImageOut]:
    """Public images and the caller's project's own."""
    page = await catalogue.list_images(tx.session, actor=actor, limit=limit, cursor=cursor)
    return Page(items=[ImageOut.model_validate(i) for i in page.items], next_cursor=page.next_cursor)


@router.get("/zones", response_model=Page[ZoneOut], responses=responses(400))
async def list_zones(
    tx: TxDep, _: CurrentUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[ZoneOut]:
    """Zones (clouds) and how many of their hosts are up."""
    page = await catalogue.list_zones(tx.session, limit=limit, cursor=cursor)
    items = [ZoneOut(id=v.zone.id, name=v.zone.name, hosts=v.hosts, hosts_up=v.hosts_up) for v in page.items]
    return Page(items=items, next_cursor=page.next_cursor)


@router.get("/quotas", response_model=QuotasOut, tags=["quotas"], responses=responses())
async def get_quotas(tx: TxDep, actor: CurrentUser) -> QuotasOut:
    """The caller's project's limits, accepted usage and pending reservations."""
    assert actor.project_id is not None
    return QuotasOut.model_validate(await quotas.report(tx.session, actor.project_id))


@router.post("/quotas/check", response_model=QuotaCheckOut, tags=["quotas"], responses=responses(400))
async def check_plan(body: QuotaCheckIn, tx: TxDep, actor: CurrentUser) -> QuotaCheckOut:
    """Would this plan pass now? Each step runs through the code its real request runs (quotas,
    placement, the operstate table, the task lock), each seeing the steps before it; then
    everything is rolled back: nothing is made, sent or streamed. Per step: would it pass, and
    with which code if not; per resource: the headroom before and after the plan; and the room
    on the hosts."""
    plan = [whatif.Step(**step.model_dump()) for step in body.plan]
    answer = await whatif.check(tx.session, actor=actor, plan=plan)
    return QuotaCheckOut(
        ok=answer.ok,
        steps=[{"ok": o.ok, "code": o.code, "message": o.message, "details": o.details} for o in answer.steps],
        quotas=answer.quotas,
        placement=PlacementVerdict(ok=answer.placement_ok, zones=answer.zones, hosts=answer.hosts),
    )
