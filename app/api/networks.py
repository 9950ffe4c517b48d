"""/api/v1/networks: a project's private networks (``logic.networks``); where networks made without
a CIDR come from is an admin's (/api/v1/admin/network-pool)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api.deps import AdminUser, CommittingRoute, CurrentUser, Cursor, IdempotentDep, PageLimit, TxDep
from app.api.errors import responses
from app.api.schemas import NetworkIn, NetworkOut, NetworkPoolBody, NetworkPoolOut, Page
from app.logic import networks
from app.logic.pagination import DEFAULT_LIMIT

router = APIRouter(prefix="/api/v1", tags=["networks"], route_class=CommittingRoute)


@router.post("/networks", status_code=201, response_model=NetworkOut, responses=responses(400, 409))
async def create_network(body: NetworkIn, tx: TxDep, actor: CurrentUser, idem: IdempotentDep) -> JSONResponse:
    """A private network of the caller's project: the CIDR given (409 ``InUse`` if it overlaps
    another network), or the next free range of the pool (``/api/v1/admin/network-pool``). VMs
    get addresses on it at create
    (``"networks": [...]`` in the create; a project's first create makes ``default``)."""

    async def make() -> NetworkOut:
        made = await networks.create(tx.session, actor=actor, name=body.name, cidr=body.cidr)
        return NetworkOut.model_validate(made)

    return await idem.run(201, make)


@router.get("/networks", response_model=Page[NetworkOut], responses=responses(400))
async def list_networks(
    tx: TxDep, actor: CurrentUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[NetworkOut]:
    """The caller's project's networks (an admin's: every project's)."""
    page = await networks.listed(tx.session, actor=actor, limit=limit, cursor=cursor)
    return Page(items=[NetworkOut.model_validate(n) for n in page.items], next_cursor=page.next_cursor)


@router.get("/networks/{network_id}", response_model=NetworkOut, responses=responses(404))
async def get_network(network_id: uuid.UUID, tx: TxDep, actor: CurrentUser) -> NetworkOut:
    return NetworkOut.model_validate(await networks.get(tx.session, actor=actor, network_id=network_id))


@router.delete("/networks/{network_id}", status_code=204, responses=responses(404, 409))
async def delete_network(network_id: uuid.UUID, tx: TxDep, actor: CurrentUser) -> Response:
    """Remove a network; 409 ``InUse`` while a VM holds an address on it."""
    await networks.delete(tx.session, actor=actor, network_id=network_id)
    return Response(status_code=204)


@router.get("/admin/network-pool", tags=["admin"], response_model=NetworkPoolOut, responses=responses(403))
async def get_network_pool(tx: TxDep, actor: AdminUser) -> NetworkPoolOut:
    """Where networks made without a CIDR come from (a project's ``default`` among them)."""
    found = await networks.pool(tx.session)
    return NetworkPoolOut(cidr=str(found.cidr), prefix=found.prefix)


@router.put("/admin/network-pool", tags=["admin"], response_model=NetworkPoolOut, responses=responses(400, 403))
async def set_network_pool(body: NetworkPoolBody, tx: TxDep, actor: AdminUser) -> NetworkPoolOut:
    """Set the pool: a private IPv4 range and the size of the networks cut from it. Networks
    already made keep their ranges; new ones never overlap them."""
    found = await networks.set_pool(tx.session, actor=actor, cidr=body.cidr, prefix=body.prefix)
    return NetworkPoolOut(cidr=str(found.cidr), prefix=found.prefix)
