"""/api/v1/public-ips: public addresses allocated to a project and associated with its VMs
(``logic.public_ips``); the pools they come from are an admin's (/api/v1/admin/public-ip-pools)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api.deps import AdminUser, CommittingRoute, CurrentUser, Cursor, IdempotentDep, PageLimit, TxDep
from app.api.errors import responses
from app.api.schemas import JobAccepted, Page, PoolIn, PoolOut, PublicIpAssociate, PublicIpIn, PublicIpOut
from app.logic import public_ips
from app.logic.pagination import DEFAULT_LIMIT

router = APIRouter(prefix="/api/v1", tags=["public IPs"], route_class=CommittingRoute)


@router.post("/public-ips", status_code=201, response_model=PublicIpOut, responses=responses(400, 409, 413))
async def allocate(body: PublicIpIn, tx: TxDep, actor: CurrentUser, idem: IdempotentDep) -> JSONResponse:
    """Allocate a public address to the caller's project: one unit of its `public_ip` quota
    (413 `OverLimit` past the limit; 409 `NetworkFull` when no pool has one free)."""

    async def make() -> PublicIpOut:
        return PublicIpOut.model_validate(await public_ips.allocate(tx.session, actor=actor, pool=body.pool))

    return await idem.run(201, make)


@router.get("/public-ips", response_model=Page[PublicIpOut], responses=responses(400))
async def list_public_ips(
    tx: TxDep, actor: CurrentUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[PublicIpOut]:
    page = await public_ips.listed(tx.session, actor=actor, limit=limit, cursor=cursor)
    return Page(items=[PublicIpOut.model_validate(i) for i in page.items], next_cursor=page.next_cursor)


@router.get("/public-ips/{ip_id}", response_model=PublicIpOut, responses=responses(404))
async def get_public_ip(ip_id: uuid.UUID, tx: TxDep, actor: CurrentUser) -> PublicIpOut:
    return PublicIpOut.model_validate(await public_ips.get(tx.session, actor=actor, ip_id=ip_id))


@router.post(
    "/public-ips/{ip_id}/associate", status_code=202, response_model=JobAccepted, responses=responses(400, 404, 409)
)
async def associate(ip_id: uuid.UUID, body: PublicIpAssociate, tx: TxDep, actor: CurrentUser) -> JobAccepted:
    """Map the address to a VM's first private address; its host installs the NAT rule in a
    `public_ip` job (null for a VM not on a host yet). 409 `InUse` if mapped to another VM."""
    ip = await public_ips.get(tx.session, actor=actor, ip_id=ip_id)
    job = await public_ips.associate(tx.session, tx.outbox, actor=actor, ip=ip, server_id=body.server_id)
    return JobAccepted(job_id=job.id if job is not None else None)


@router.post(
    "/public-ips/{ip_id}/disassociate", status_code=202, response_model=JobAccepted, responses=responses(400, 404, 409)
)
async def disassociate(ip_id: uuid.UUID, tx: TxDep, actor: CurrentUser) -> JobAccepted:
    """Unmap the address; the VM's host removes the NAT rule."""
    ip = await public_ips.get(tx.session, actor=actor, ip_id=ip_id)
    job = await public_ips.disassociate(tx.session, tx.outbox, actor=actor, ip=ip)
    return JobAccepted(job_id=job.id if job is not None else None)


@router.delete("/public-ips/{ip_id}", status_code=204, responses=responses(404, 409))
async def release(ip_id: uuid.UUID, tx: TxDep, actor: CurrentUser) -> Response:
    """Give the address back (409 `InUse` while associated); its quota unit comes back."""
    ip = await public_ips.get(tx.session, actor=actor, ip_id=ip_id)
    await public_ips.release(tx.session, actor=actor, ip=ip)
    return Response(status_code=204)


@router.post("/admin/public-ip-pools", status_code=201, response_model=PoolOut, responses=responses(400, 403, 409))
async def create_pool(body: PoolIn, tx: TxDep, actor: AdminUser) -> PoolOut:
    """A pool of public addresses (IPv4, /16 to /32, overlapping no other pool)."""
    return PoolOut.model_validate(await public_ips.create_pool(tx.session, actor=actor, name=body.name, cidr=body.cidr))


@router.get("/admin/public-ip-pools", response_model=Page[PoolOut], responses=responses(400, 403))
async def list_pools(
    tx: TxDep, actor: AdminUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[PoolOut]:
    page = await public_ips.pools(tx.session, actor=actor, limit=limit, cursor=cursor)
    return Page(items=[PoolOut.model_validate(p) for p in page.items], next_cursor=page.next_cursor)
